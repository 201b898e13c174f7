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

The tunnel takes the legs over from the exchange by becoming their owner:
nothing of the HTTP layer stays on the data path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .accesslog import logTunnel
from .interfaces import ILegOwner
from .upstream import Lease

if TYPE_CHECKING:
    from .leg import Leg
    from .server import ListenerSettings

__all__ = ["Tunnel"]

log = Logger()


@implementer(ILegOwner)
class _TunnelEnd:
    """One side of a tunnel: what it reads goes to the other side as it is."""

    __slots__ = ("tunnel", "side", "write", "count")

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


class Tunnel:
    """
    Raw pass-through between a client and an upstream after a protocol
    switch.
    """

    def __init__(
        self,
        client: Leg,
        upstream: Leg,
        settings: ListenerSettings,
        logFields: dict[str, Any],
        lease: Lease | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.settings = settings
        self.clock = settings.reactor
        self.started = self.clock.seconds()
        self.logFields = logFields
        self.lease = lease or Lease()
        self.lease.becomeTunnel()
        self.closed = False
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
        self.close()

    def close(self) -> None:
        """Close both sides once their pending data is written."""
        self.client.close()
        self.upstream.close()

    def sideClosed(self, side: str) -> None:
        """One side's connection is gone: close the other, and log the tunnel once."""
        (self.upstream if side == "client" else self.client).close()
        if self.closed:
            return
        self.closed = True
        self.lease.release()
        self.settings.metrics.tunnelEnded(self.started, self.bytesIn, self.bytesOut)
        if self.settings.block.access_log:
            logTunnel(
                bytesIn=self.bytesIn,
                bytesOut=self.bytesOut,
                duration=self.clock.seconds() - self.started,
                side=side,
                **self.logFields,
            )
