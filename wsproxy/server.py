# -*- test-case-name: tests.test_server -*-
"""
The client-facing side: a Twisted protocol that reads HTTP/1.1 requests off
a client connection, one at a time and in order, and hands each to an
L{Exchange}; after a granted upgrade the connection becomes one end of a
L{Tunnel}.

Bytes that arrive while a response is in flight (pipelined requests, or a
client's first WebSocket frames) wait in a bounded buffer; past the bound
the client is paused, so a client cannot make the proxy buffer without
limit.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import ServerBlock
from .flow import ReadGate, writerFor
from .http import (
    CRLF,
    ChunkedDecoder,
    HTTPError,
    LengthDecoder,
    Limits,
    RequestHead,
    errorResponse,
    findHeadEnd,
    parseRequestHead,
)
from .relay import Exchange
from .tunnel import Tunnel, setNoDelay
from .upstream import UpstreamPool

__all__ = ["ListenerSettings", "ProxyFactory", "ProxyProtocol"]

log = Logger()

#: What the start of a request line can look like: a method token, then a space.
_METHOD_PREFIX = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*(?: |\Z)")

#: How much a client may send ahead while its previous request is answered.
PIPELINE_BUFFER = 65536


class ListenerSettings:
    """
    Everything a listener's connections need, derived once from its
    L{ServerBlock}.  A reload builds a new one; requests already under way
    keep the one they started with.
    """

    def __init__(self, block: ServerBlock, pool: UpstreamPool | None, reactor: Any, secure: bool = False) -> None:
        self.block = block
        self.pool = pool
        self.reactor = reactor
        self.secure = secure
        self.scheme = b"https" if secure else b"http"
        self.limits = Limits(block.max_request_line, block.max_header_size, block.max_headers)
        self.headLimit = block.max_request_line + block.max_header_size
        self.extraHeaders = tuple((k.encode("ascii"), v.encode("ascii")) for k, v in block.add_header)
        self.extraHeaderLines = tuple(b"%b: %b" % pair for pair in self.extraHeaders)
        self.upgradeProtocols = frozenset(p.encode("ascii") for p in block.upgrade_protocols)
        self.allowedOrigins = frozenset(o.lower().rstrip("/").encode("ascii") for o in block.allowed_origins)
        self.trustedProxies = tuple(ipaddress.ip_network(n, strict=False) for n in block.set_real_ip_from)


class ProxyProtocol(Protocol):
    """
    One client connection: requests in, responses out, in order.

    @ivar gate: pauses reading from the client for as long as any reason
        holds it (upstream slow to read, pipeline buffer full).
    """

    factory: ProxyFactory
    settings: ListenerSettings
    clientAddress: str = "-"
    gate: ReadGate

    def connectionMade(self) -> None:
        self.settings = self.factory.settings
        peer = self.transport.getPeer()
        self.clientAddress = getattr(peer, "host", None) or "-"
        self.gate = ReadGate(self.transport)
        self.writeNow = writerFor(self.transport)
        self._buffer = b""
        self._exchange: Exchange | None = None
        self._decoder: Any = None
        self._tunnel: Tunnel | None = None
        self._closing = False
        self._pumping = False
        self._timer: Any = None
        setNoDelay(self.transport)
        self._startTimer(self.settings.block.client_header_timeout, self._headTimedOut)

    # Reading requests

    def dataReceived(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data
        self._pump()

    def _pump(self) -> None:
        """Make as much progress as the buffered bytes allow."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._closing and self._tunnel is None:
                exchange = self._exchange
                if exchange is None:
                    if not self._readHead():
                        return
                elif exchange.bodyPending:
                    if not exchange.connected or not self._buffer:
                        self._holdIfFull()
                        return
                    if not self._readBody(exchange):
                        return
                else:
                    self._holdIfFull()
                    return
        finally:
            self._pumping = False

    def _holdIfFull(self) -> None:
        if len(self._buffer) > PIPELINE_BUFFER:
            self.gate.hold("buffer")
        else:
            self.gate.release("buffer")

    def _readHead(self) -> bool:
        buffer = self._buffer
        while buffer[:2] == CRLF:
            buffer = buffer[2:]
        self._buffer = buffer
        if not buffer:
            return False
        settings = self.settings
        limits = settings.limits
        request = None
        try:
            end = findHeadEnd(buffer, settings.headLimit)
            if end < 0:
                if _METHOD_PREFIX.match(buffer) is None:
                    raise HTTPError(400, "this is not an HTTP request")
                if len(buffer) > limits.maxRequestLine and buffer.find(CRLF, 0, limits.maxRequestLine + 2) < 0:
                    raise HTTPError(414, "request line too long")
                if len(buffer) > settings.headLimit:
                    raise HTTPError(431, "request header section too large")
                if self._timer is not None and self._timer.func == self._idleTimedOut:
                    self._startTimer(settings.block.client_header_timeout, self._headTimedOut)
                return False
            request = parseRequestHead(buffer[:end], limits, settings.upgradeProtocols)
            self._buffer = buffer[end:]
            self._cancelTimer()
            self._check(request)
        except HTTPError as e:
            self._refuse(e, request)
            return False
        self._decoder = (
            ChunkedDecoder() if request.chunked else LengthDecoder(request.bodyLength) if request.bodyLength else None
        )
        self._exchange = Exchange(self, request, settings)
        self._exchange.start()
        return True

    def _check(self, request: RequestHead) -> None:
        """Refuse what the listener's policy does not allow, before any upstream is contacted."""
        settings = self.settings
        limit = settings.block.client_max_body_size
        if limit and request.bodyLength and request.bodyLength > limit:
            raise HTTPError(413, "request body too large")
        if request.upgrade is not None and settings.allowedOrigins:
            origin = (request.first(b"origin") or b"").lower().rstrip(b"/")
            if origin not in settings.allowedOrigins:
                raise HTTPError(403, "WebSocket upgrade from an origin that is not allowed")

    def _readBody(self, exchange: Exchange) -> bool:
        try:
            payload, rest = self._decoder.feed(self._buffer)
        except HTTPError as e:
            self._buffer = b""
            exchange.fail(e.status, e.message)
            return False
        self._buffer = b""
        if payload:
            exchange.sendBody(payload)
        if rest is not None:
            self._buffer = rest
            exchange.endBody()
        return True

    def upstreamReady(self) -> None:
        """The exchange is connected: the request body can flow."""
        self._pump()

    # Ending an exchange

    def exchangeFinished(self, keepAlive: bool) -> None:
        """The response is complete; go on with the next request, or close."""
        self._exchange = None
        self.transport.unregisterProducer()
        self.gate.release("peer")
        if not keepAlive or self._closing or self.factory.draining:
            self._close()
            return
        self.gate.release("buffer")
        self._startTimer(self.settings.block.keepalive_timeout, self._idleTimedOut)
        self.settings = self.factory.settings
        if self._buffer:
            self._pump()

    def closeIfIdle(self) -> None:
        """Close the connection if it is between requests."""
        if self._exchange is None and self._tunnel is None:
            self._close()

    def exchangeAborted(self) -> None:
        """The response was cut short: the client must see a truncated message."""
        self._exchange = None
        self._close()

    def switchToTunnel(self, tunnel: Tunnel, fromUpstream: bytes) -> None:
        """The upstream granted the upgrade: from now on, move bytes only."""
        self._exchange = None
        self._cancelTimer()
        self._tunnel = tunnel
        self.factory.tunnels.add(tunnel)
        early, self._buffer = self._buffer, b""
        tunnel.start(early, fromUpstream)

    def tunnelClosed(self, tunnel: Tunnel) -> None:
        self.factory.tunnels.discard(tunnel)

    # Errors and timeouts

    def _refuse(self, error: HTTPError, request: RequestHead | None) -> None:
        """Answer a request the proxy will not forward, and close."""
        log.info(
            "{client} refused: {status} {message}",
            client=self.clientAddress,
            status=error.status,
            message=error.message,
        )
        head = request is not None and request.method == b"HEAD"
        self.transport.write(errorResponse(error.status, error.message, self.settings.extraHeaders, head=head))
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._cancelTimer()
        self.transport.loseConnection()

    def _headTimedOut(self) -> None:
        self._timer = None
        if self._buffer:
            self._refuse(HTTPError(408, "the request head did not arrive in time"), None)
        else:
            self._close()

    def _idleTimedOut(self) -> None:
        self._timer = None
        if self._exchange is None and not self._buffer:
            self._close()

    def _startTimer(self, seconds: float, action: Any) -> None:
        self._cancelTimer()
        if seconds:
            self._timer = self.settings.reactor.callLater(seconds, action)

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:
        self._closing = True
        self._cancelTimer()
        if self._exchange is not None:
            self._exchange.clientLost()
            self._exchange = None
        if self._tunnel is not None:
            self._tunnel.clientLost(reason)
        self.factory.connectionClosed(self)


class _Refusal(Protocol):
    """Answers a connection over the listener's limits with 503 and closes it."""

    def __init__(self, extraHeaders: tuple[tuple[bytes, bytes], ...]) -> None:
        self.extraHeaders = extraHeaders

    def connectionMade(self) -> None:
        self.transport.write(errorResponse(503, "too many connections", self.extraHeaders))
        self.transport.loseConnection()


class ProxyFactory(Factory):
    """
    Builds a L{ProxyProtocol} per client connection, and keeps count of
    connections (for C{max_connections}) and open tunnels (for a graceful
    shutdown).

    @ivar settings: the current L{ListenerSettings}; replace it to reload.
    """

    protocol = ProxyProtocol

    def __init__(self, settings: ListenerSettings) -> None:
        self.settings = settings
        self.connections: set[ProxyProtocol] = set()
        self.perAddress: dict[str, int] = {}
        self.tunnels: set[Tunnel] = set()
        self.draining = False

    def drain(self) -> None:
        """
        Shutting down: close idle connections now, and every other one as
        soon as its current exchange is complete.
        """
        self.draining = True
        for protocol in list(self.connections):
            protocol.closeIfIdle()

    def buildProtocol(self, addr: Any) -> Protocol | None:
        block = self.settings.block
        host = getattr(addr, "host", "-")
        if (block.max_connections and len(self.connections) >= block.max_connections) or (
            block.max_connections_per_ip and self.perAddress.get(host, 0) >= block.max_connections_per_ip
        ):
            log.warn("{client} refused: connection limit reached", client=host)
            return _Refusal(self.settings.extraHeaders)
        protocol = ProxyProtocol()
        protocol.factory = self
        self.connections.add(protocol)
        self.perAddress[host] = self.perAddress.get(host, 0) + 1
        protocol.clientAddress = host
        return protocol

    def connectionClosed(self, protocol: ProxyProtocol) -> None:
        if protocol in self.connections:
            self.connections.discard(protocol)
            host = protocol.clientAddress
            count = self.perAddress.get(host, 1) - 1
            if count:
                self.perAddress[host] = count
            else:
                self.perAddress.pop(host, None)
