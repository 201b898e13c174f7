# -*- test-case-name: tests.test_drain -*-
"""
A drain's end of a WebSocket tunnel: the proxy closes it as a WebSocket
server would close the client's connection and a WebSocket client would
close the upstream's, with a Close frame of status 1001 (Going Away) and
a close handshake, so that neither peer sees an abnormal closure (1006)
and a client knows to reconnect, to another instance.

In each direction the frame in progress is relayed to its end (a Close in
the middle of a frame would corrupt the stream), then the proxy's Close
goes in its place: unmasked to the client, masked to the upstream.  From
then on what that direction's sender sends is read only to find its own
Close (the reply to the proxy's, or one it sent first) and is dropped:
its receiver has been told the connection is closing.  A peer has
finished its handshake once it has received a Close and sent one; the
client's connection is then closed by the proxy (as a server closes
first), and the upstream's when the upstream closes it or both are done.
Whatever is still open after the timeout is closed.

If a Close already went one way before the drain, none is added that
way: the peers are closing by themselves and the proxy only waits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure
from zope.interface import implementer

from .frames import GOING_AWAY, closeFrame
from .interfaces import ILegOwner

if TYPE_CHECKING:
    from .leg import Leg
    from .tunnel import Tunnel, _TunnelEnd

__all__ = ["GoingAway"]

#: The reason the proxy's Close frames give.
REASON = b"going away"


@implementer(ILegOwner)
class _Farewell:
    """
    One direction of a tunnel during the proxy's close handshake: the new
    owner of the sender's leg.

    @ivar delivered: whether the receiver has been sent a Close (passed on,
        or the proxy's).
    """

    def __init__(self, goingAway: GoingAway, end: _TunnelEnd, sender: Leg, receiver: Leg, masked: bool) -> None:
        self.goingAway = goingAway
        self.end = end
        self.side = end.side
        self.frames = end.frames
        self.sender = sender
        self.receiver = receiver
        self.masked = masked
        self.delivered = False

    @property
    def tunnel(self) -> Tunnel:
        """The tunnel the sender's leg is still an end of."""
        return self.goingAway.tunnel

    @property
    def replied(self) -> bool:
        """Whether the sender has sent its Close."""
        frames = self.frames
        return frames is not None and frames.closed

    def start(self) -> None:
        self.sender.owner = self
        if self.frames is not None and self.frames.atBoundary:
            self._boundary()

    def dataReceived(self, data: bytes) -> None:
        self.end.count += len(data)
        frames = self.frames
        assert frames is not None
        if not self.delivered:
            through = frames.untilBoundary(data)
            if frames.failed is not None:
                self.goingAway.fallBack()
                return
            if through:
                self.end.write(data[:through])
            if not frames.atBoundary:
                return
            data = data[through:]
            self._boundary()
        if data and not frames.closed:
            frames.feed(data)
            if frames.closed:
                self.goingAway.check()

    def _boundary(self) -> None:
        """The receiver has every whole frame: its Close goes now, unless one went already."""
        self.delivered = True
        if not self.replied:
            self.end.write(closeFrame(GOING_AWAY, self.masked, REASON))
            self.tunnel.closeSeen("proxy", GOING_AWAY)
        # What the sender sends from now on is dropped: the receiver's
        # buffer must no longer hold it back.
        self.receiver.feedFrom(None)
        self.goingAway.check()

    def connectionLost(self, reason: Failure) -> None:
        self.tunnel.sideClosed(self.side)

    def writable(self) -> None:
        pass


class GoingAway:
    """
    The proxy's close handshake with both ends of one WebSocket tunnel
    (see the module docstring).
    """

    def __init__(self, tunnel: Tunnel, fromClient: _TunnelEnd, fromUpstream: _TunnelEnd, timeout: float) -> None:
        """
        @param fromClient: the tunnel's end that relays the client's bytes.
        @param fromUpstream: the one that relays the upstream's.
        @param timeout: how long the handshakes may take.
        """
        self.tunnel = tunnel
        self.timeout = timeout
        client, upstream = tunnel.client, tunnel.upstream
        self.legs = {"client": client, "upstream": upstream}
        self.fromClient = _Farewell(self, fromClient, client, upstream, masked=True)
        self.fromUpstream = _Farewell(self, fromUpstream, upstream, client, masked=False)
        self.lost: set[str] = set()
        self._timer: Any = None
        #: Whether a frame, or a fragmented message, was under way in either
        #: direction when the handshake began.
        self.midStream = any(
            frames is not None and (not frames.atBoundary or frames.inMessage)
            for frames in (fromClient.frames, fromUpstream.frames)
        )

    def start(self) -> None:
        """Send the Close frames that can go now, and start the clock."""
        self._timer = self.tunnel.clock.callLater(self.timeout, self._timedOut)
        self.fromClient.start()
        self.fromUpstream.start()

    def finished(self, side: str) -> bool:
        """Whether C{side} has received a Close and sent its own."""
        if side == "client":
            return self.fromUpstream.delivered and self.fromClient.replied
        return self.fromClient.delivered and self.fromUpstream.replied

    def check(self) -> None:
        """Close what the handshakes are done with."""
        client, upstream = self.finished("client"), self.finished("upstream")
        if client and upstream:
            self.tunnel.close()
        elif client:
            self.legs["client"].close()

    def sideClosed(self, side: str) -> None:
        """
        C{side}'s connection is gone; the other stays until its handshake
        is done (or the timeout).
        """
        self.lost.add(side)
        other = "upstream" if side == "client" else "client"
        if other in self.lost:
            self._stopTimer()
        else:
            towards = self.fromUpstream if other == "client" else self.fromClient
            if self.finished(other) or not towards.delivered:
                # Done, or its Close can no longer be delivered: nothing to wait for.
                self.legs[other].close()

    def fallBack(self) -> None:
        """The bytes are not WebSocket after all: close the connections."""
        self._stopTimer()
        self.tunnel.close()

    def _timedOut(self) -> None:
        self._timer = None
        self.tunnel.close()

    def _stopTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
