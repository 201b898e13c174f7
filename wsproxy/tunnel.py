# -*- test-case-name: tests.test_tunnel -*-
"""
After the 101: two transports wired together.

This is C{twisted.protocols.portforward} plus what a WebSocket proxy needs:
the bytes either side sent right behind the handshake are delivered first,
each transport stays registered as the streaming producer of the other (so
a slow reader pauses the fast writer and memory stays bounded), and when
one side closes the other is closed once its pending data is written.
There is no idle timeout unless C{websocket_idle_timeout} asks for one.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from .accesslog import logTunnel

if TYPE_CHECKING:
    from .relay import UpstreamProtocol
    from .server import ListenerSettings, ProxyProtocol

__all__ = ["Tunnel", "setNoDelay"]

log = Logger()


def setNoDelay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off for C{transport}, looking through TLS
    wrappers to the TCP transport underneath; small WebSocket frames must
    not wait for an acknowledgement.
    """
    while transport is not None:
        setter = getattr(type(transport), "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(transport, True)
            except OSError:
                pass
            return
        handle = getattr(transport, "socket", None)
        if isinstance(handle, socket.socket):
            handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return
        transport = getattr(transport, "transport", None)


class Tunnel:
    """
    Raw pass-through between a client and an upstream after a protocol
    switch.  The per-chunk path is one method call that counts the bytes
    and writes them on.
    """

    def __init__(
        self,
        client: ProxyProtocol,
        upstream: UpstreamProtocol,
        settings: ListenerSettings,
        logFields: dict[str, Any],
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.settings = settings
        self.clock = settings.reactor
        self.started = self.clock.seconds()
        self.logFields = logFields
        self.bytesIn = 0
        self.bytesOut = 0
        self.closed = False
        self._active = False
        self._idleCheck: Any = None
        self._toUpstream = upstream.writeNow
        self._toClient = client.writeNow

    def start(self, fromClient: bytes, fromUpstream: bytes) -> None:
        """
        Deliver what each side sent behind the handshake, then move every
        further byte as it arrives.
        """
        client, upstream = self.client, self.upstream
        client.gate.release("buffer")
        upstream.owner = self
        if fromUpstream:
            self.bytesOut += len(fromUpstream)
            self._toClient(fromUpstream)
        if fromClient:
            self.bytesIn += len(fromClient)
            self._toUpstream(fromClient)
        idleTimeout = self.settings.block.websocket_idle_timeout
        if idleTimeout:
            client.dataReceived = self._fromClientWatched
            upstream.dataReceived = self._fromUpstreamWatched
            self._idleCheck = self.clock.callLater(idleTimeout, self._checkIdle)
        else:
            client.dataReceived = self._fromClient
            upstream.dataReceived = self._fromUpstream

    def _fromClient(self, data: bytes) -> None:
        self.bytesIn += len(data)
        self._toUpstream(data)

    def _fromUpstream(self, data: bytes) -> None:
        self.bytesOut += len(data)
        self._toClient(data)

    def _fromClientWatched(self, data: bytes) -> None:
        self._active = True
        self.bytesIn += len(data)
        self._toUpstream(data)

    def _fromUpstreamWatched(self, data: bytes) -> None:
        self._active = True
        self.bytesOut += len(data)
        self._toClient(data)

    def _checkIdle(self) -> None:
        if self._active:
            self._active = False
            self._idleCheck = self.clock.callLater(self.settings.block.websocket_idle_timeout, self._checkIdle)
            return
        self._idleCheck = None
        log.info(
            "{client} tunnel idle for {seconds}s; closing",
            seconds=self.settings.block.websocket_idle_timeout,
            **self.logFields,
        )
        self.close()

    def close(self) -> None:
        """Close both sides once their pending data is written."""
        self._closeSide(self.client.transport)
        self._closeSide(self.upstream.transport)

    @staticmethod
    def _closeSide(transport: Any) -> None:
        # A TLS transport does not shut down while a producer is registered
        # with it, and the peer is gone: let go of it first.
        transport.unregisterProducer()
        transport.loseConnection()

    def abort(self) -> None:
        """Drop both sides now."""
        self.client.transport.abortConnection()
        self.upstream.transport.abortConnection()

    def clientLost(self, reason: Failure | None = None) -> None:
        self._ended("client")
        self._closeSide(self.upstream.transport)

    def upstreamLost(self, reason: Failure | None = None) -> None:
        self._ended("upstream")
        self._closeSide(self.client.transport)

    def upstreamData(self, data: bytes) -> None:
        self._fromUpstream(data)

    def _ended(self, side: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._idleCheck is not None and self._idleCheck.active():
            self._idleCheck.cancel()
        self.client.tunnelClosed(self)
        if self.settings.block.access_log:
            logTunnel(
                bytesIn=self.bytesIn,
                bytesOut=self.bytesOut,
                duration=self.clock.seconds() - self.started,
                side=side,
                **self.logFields,
            )
