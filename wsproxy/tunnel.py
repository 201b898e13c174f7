# -*- test-case-name: tests.test_tunnel -*-
"""
After the 101: two legs wired together.

This is C{twisted.protocols.portforward} plus what a WebSocket proxy needs:
the bytes either side sent right behind the handshake are delivered first,
each leg pauses the other while its write buffer is full (so a slow reader
throttles the fast writer and memory stays bounded), a side whose pending
writes do not move for C{send_timeout} is dropped, and when one side
closes the other is closed once its pending data is written.  There is no
idle timeout unless C{websocket_idle_timeout} asks for one.

A WebSocket tunnel also follows the frame boundaries of each direction
(L{wsproxy.frames.FrameTracker}), so that a drain can end it with a close
handshake of its own (L{Tunnel.goAway}, L{wsproxy.goingaway}) and the
access log can say which close code passed.

The tunnel takes the legs over from the exchange by becoming their owner:
nothing of the HTTP layer stays on the data path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .accesslog import logTunnel
from .frames import FrameTracker
from .goingaway import GoingAway
from .interfaces import ILegOwner
from .upstream import Lease

if TYPE_CHECKING:
    from .leg import Leg
    from .server import ListenerSettings

__all__ = ["Tunnel", "tunnelOf"]

log = Logger()


@implementer(ILegOwner)
class _TunnelEnd:
    """One side of a tunnel: what it reads goes to the other side as it is."""

    __slots__ = ("tunnel", "side", "write", "count")

    #: The frames this end's direction follows: none, unless it is a
    #: L{_TrackedEnd}.
    frames: FrameTracker | None = None

    def __init__(self, tunnel: Tunnel, side: str, towards: Leg) -> None:
        self.tunnel = tunnel
        self.side = side
        self.write = towards.write
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.tunnel.sideClosed(self.side)

    def writable(self) -> None:
        pass


class _TrackedEnd(_TunnelEnd):
    """
    One side of a WebSocket tunnel: the frames it relays are followed on
    the way.

    The tracker is made when the first byte passes, or when a drain asks
    for it (no byte has passed: the direction is at a frame boundary).  Many
    tunnels sit idle for most of their life, and one that never carried a
    message then keeps no tracker at all.
    """

    __slots__ = ("masked", "feed", "_frames")

    def __init__(self, tunnel: Tunnel, side: str, towards: Leg, masked: bool) -> None:
        super().__init__(tunnel, side, towards)
        self.masked = masked
        #: The tracker's C{feed}, once there is a tracker.
        self.feed: Callable[[bytes], None] | None = None
        self._frames: FrameTracker | None = None

    @property  # type: ignore[override]
    def frames(self) -> FrameTracker:
        """The frames this end's direction follows."""
        frames = self._frames
        if frames is None:
            # A Close is reported through a method of this end rather than
            # a partial of the tunnel's: one object less per direction.
            frames = self._frames = FrameTracker(self.masked, onClose=self.closeSeen)
            self.feed = frames.feed
        return frames

    def closeSeen(self, code: int) -> None:
        """A Close frame with C{code} passed in this end's direction."""
        self.tunnel.closeSeen(self.side, code)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        feed = self.feed
        if feed is None:
            feed = self.frames.feed
        feed(data)
        self.write(data)


def tunnelOf(leg: Leg) -> Tunnel | None:
    """The tunnel C{leg} is an end of, if it is one."""
    return getattr(leg.owner, "tunnel", None)


class Tunnel:
    """
    Raw pass-through between a client and an upstream after a protocol
    switch.

    @ivar closeCode: the status code of the first Close frame that passed
        (or that the proxy sent), either way; C{None} if none did.
    @ivar closeFrom: who sent that Close: C{"client"}, C{"upstream"} or
        C{"proxy"} (a drain's L{GOING_AWAY<wsproxy.frames.GOING_AWAY>}).
    @ivar goingAway: the drain's close handshake, once L{goAway} began it.
    """

    # A tunnel lives as long as its connections, idle ones included: slots
    # keep it to the size of its fields.
    __slots__ = (
        "client",
        "upstream",
        "settings",
        "clock",
        "started",
        "logFields",
        "lease",
        "closed",
        "closeReason",
        "closeCode",
        "closeFrom",
        "goingAway",
        "_fromClient",
        "_fromUpstream",
    )

    def __init__(
        self,
        client: Leg,
        upstream: Leg,
        settings: ListenerSettings,
        logFields: dict[str, Any],
        lease: Lease | None = None,
        websocket: bool = False,
    ) -> None:
        """
        @param websocket: whether the protocol switched to is WebSocket:
            only then are frames followed, and a drain can close with a
            Close frame.
        """
        self.client = client
        self.upstream = upstream
        self.settings = settings
        self.clock = settings.reactor
        self.started = self.clock.seconds()
        self.logFields = logFields
        self.lease = lease or Lease()
        self.lease.becomeTunnel()
        self.closed = False
        #: Why the proxy closed the tunnel (C{"idle_timeout"}), if it did.
        self.closeReason: str | None = None
        self.closeCode: int | None = None
        self.closeFrom: str | None = None
        self.goingAway: GoingAway | None = None
        if websocket:
            self._fromClient: _TunnelEnd = _TrackedEnd(self, "client", upstream, masked=True)
            self._fromUpstream: _TunnelEnd = _TrackedEnd(self, "upstream", client, masked=False)
        else:
            self._fromClient = _TunnelEnd(self, "client", upstream)
            self._fromUpstream = _TunnelEnd(self, "upstream", client)

    @property
    def bytesIn(self) -> int:
        """Bytes from the client to the upstream."""
        return self._fromClient.count

    @property
    def bytesOut(self) -> int:
        """Bytes from the upstream to the client."""
        return self._fromUpstream.count

    def start(self, fromClient: bytes, fromUpstream: bytes) -> None:
        """
        Deliver what each side sent behind the handshake, then move every
        further byte as it arrives.
        """
        client, upstream = self.client, self.upstream
        client.owner = self._fromClient
        upstream.owner = self._fromUpstream
        client.sendTimeout = upstream.sendTimeout = self.settings.block.send_timeout
        self.settings.metrics.tunnelOpened()
        if fromUpstream:
            self._fromUpstream.dataReceived(fromUpstream)
        if fromClient:
            self._fromClient.dataReceived(fromClient)
        self._watchIdle()

    def _watchIdle(self) -> None:
        seconds = self.settings.block.websocket_idle_timeout
        if seconds and not self.closed:
            self.client.expectData(seconds, self._idle, alsoWatching=self.upstream)

    def _idle(self) -> None:
        self.settings.metrics.timeout("websocket_idle")
        log.info(
            "{client} tunnel idle for {seconds}s; closing",
            seconds=self.settings.block.websocket_idle_timeout,
            **self.logFields,
        )
        self.closeReason = "idle_timeout"
        self.close()

    def close(self) -> None:
        """Close both sides once their pending data is written."""
        self.client.close()
        self.upstream.close()

    def closeSeen(self, side: str, code: int) -> None:
        """A Close frame with C{code} passed (or the proxy sent one): remember the first."""
        if self.closeCode is None:
            self.closeCode = code
            self.closeFrom = side

    def goAway(self, timeout: float) -> None:
        """
        Shutting down: send both ends a Close frame with status 1001 (Going
        Away), each at the next frame boundary of its direction, give the
        close handshakes C{timeout} seconds, then close.  A tunnel that is
        not WebSocket (or whose bytes stopped being valid framing) is
        closed at once, as is every tunnel if C{timeout} is 0.
        """
        if self.closed or self.goingAway is not None:
            return
        self.closeReason = "drain"
        trackers = (self._fromClient.frames, self._fromUpstream.frames)
        if not timeout or any(frames is None or frames.failed is not None for frames in trackers):
            self.close()
            return
        self.goingAway = GoingAway(self, self._fromClient, self._fromUpstream, timeout)
        self.goingAway.start()

    def sideClosed(self, side: str) -> None:
        """One side's connection is gone: close the other, and log the tunnel once."""
        if self.goingAway is not None:
            self.goingAway.sideClosed(side)
        else:
            (self.upstream if side == "client" else self.client).close()
        if self.closed:
            return
        self.closed = True
        self.lease.release()
        self.settings.metrics.tunnelEnded(self.started, self.bytesIn, self.bytesOut)
        if self.settings.block.access_log:
            if self.client.sendTimedOut or self.upstream.sendTimedOut:
                self.closeReason = self.closeReason or "send_timeout"
            logTunnel(
                bytesIn=self.bytesIn,
                bytesOut=self.bytesOut,
                duration=self.clock.seconds() - self.started,
                side="proxy" if self.closeReason else side,
                **self.logFields,
                destination=self.settings.block.access_log,
                leg=self.client,
                settings=self.settings,
                closeReason=self.closeReason,
                closeCode=self.closeCode,
            )
