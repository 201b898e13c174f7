# -*- test-case-name: tests.test_server -*-
"""
The client-facing side, shared by every listener: a L{ClientLeg} per
connection, and the L{RequestLoop} that reads requests off it one at a
time, in order, and hands each to an L{IExchange}: a proxied exchange for a
proxy listener, a redirect for a redirect listener.  After a granted
upgrade the connection is handed to a L{wsproxy.tunnel.Tunnel}.

The HTTP/1.1 rules live in L{wsproxy.connection.RequestCycle}, which does
no I/O; this module is the thin Twisted adapter over it: it feeds it bytes,
keeps the client's timers, and stops reading while a response is in
flight.  Bytes that arrive meanwhile (pipelined requests, a client's first
WebSocket frames) wait in a bounded buffer; past the bound the client is
paused, and while the client does not read what it is sent no further
request is answered, so no client can make the proxy buffer without limit.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .config import ServerBlock
from .connection import NEED_DATA, BodyData, RequestCycle, RequestReceived, State
from .http import HTTPError, Limits, RequestHead, errorResponse
from .interfaces import IExchange, ILegOwner, IRequestLoop
from .leg import Leg
from .metrics import NO_METRICS
from .relay import Exchange
from .tunnel import Tunnel
from .upstream import UpstreamPool

__all__ = [
    "ClientLeg",
    "ConnectionSettings",
    "ListenerFactory",
    "ListenerSettings",
    "ProxyFactory",
    "RequestLoop",
]

log = Logger()

#: How much a client may send ahead while its previous request is answered.
PIPELINE_BUFFER = 65536

#: How long a refused connection (503) may take to close before it is dropped.
REFUSAL_BOUND = 5.0

#: Client connections' serial numbers (C{$connection}).
_serials = itertools.count(1)


class ConnectionSettings:
    """
    What every connection of a listener needs, derived once from its
    L{ServerBlock}.  A reload builds new settings; a connection takes them
    up at its next request.
    """

    upgradeProtocols: frozenset[bytes] = frozenset()
    allowedOrigins: frozenset[bytes] = frozenset()
    #: The recorder of this place's metrics (see L{wsproxy.metrics}).
    metrics: Any = NO_METRICS

    def __init__(self, block: ServerBlock) -> None:
        self.block = block
        #: The body limit while the head is read; a location may set its own.
        self.maxBodySize = block.client_max_body_size
        self.limits = Limits(block.max_request_line, block.max_header_size, block.max_headers)
        self.extraHeaders = tuple((k.encode("ascii"), v.encode("ascii")) for k, v in block.add_header)
        self.extraHeaderLines = tuple(b"%b: %b" % pair for pair in self.extraHeaders)


class ListenerSettings(ConnectionSettings):
    """
    A proxy listener's settings: its pool, its scheme and its policies.
    Every request goes to the pool as it came; L{wsproxy.router} builds
    one of these per location, with the location's headers and rewrites.
    """

    #: proxy_set_header: (lowercased name, name, template) triples, and the lowercased names.
    setHeaders: tuple[tuple[bytes, bytes, Any], ...] = ()
    setNames: frozenset[bytes] = frozenset()
    #: Response headers not passed to the client (framing, proxy_hide_header).
    responseDrop: frozenset[bytes] = frozenset({b"content-length"})
    #: proxy_redirect: (prefix, replacement) pairs for a response's Location.
    redirects: tuple[tuple[bytes, bytes], ...] = ()
    #: The configuration's C{map} variables, by name (L{wsproxy.variables.VariableMap}).
    maps: Any = {}

    def __init__(self, block: ServerBlock, pool: UpstreamPool | None, reactor: Any, secure: bool = False) -> None:
        super().__init__(block)
        self.pool = pool
        self.reactor = reactor
        self.secure = secure
        self.scheme = b"https" if secure else b"http"
        self.upgradeProtocols = frozenset(p.encode("ascii") for p in block.upgrade_protocols)
        self.allowedOrigins = frozenset(o.lower().rstrip("/").encode("ascii") for o in block.allowed_origins)
        self.trustedProxies = tuple(ipaddress.ip_network(n, strict=False) for n in block.set_real_ip_from)

    def answer(self, loop: RequestLoop, request: RequestHead) -> IExchange:
        """Every request of the listener goes to the pool."""
        return Exchange(loop, request, self)


@implementer(ILegOwner, IRequestLoop)
class RequestLoop:
    """
    Reads a client connection's requests one at a time, hands each to an
    L{IExchange}, and keeps the client's timers: C{client_header_timeout}
    for a head, C{client_body_timeout} between two reads of a body,
    C{keepalive_timeout} between requests.

    @ivar exchange: the exchange in progress, if any.
    """

    exchange: Any = None
    #: How many requests the connection has begun (C{$connection_requests}).
    requests = 0
    #: Whether the request under way was read from bytes that came with an earlier one (C{$pipe}).
    pipelined = False

    def __init__(
        self,
        leg: ClientLeg,
        settings: Any,
        startExchange: Callable[[RequestLoop, RequestHead], IExchange],
        factory: ListenerFactory,
    ) -> None:
        self.leg = leg
        self.factory = factory
        self._startExchange = startExchange
        self._pumping = False
        self._idle = False
        self.cycle = RequestCycle()
        self._adopt(settings)
        leg.setDeadline(self.block.client_header_timeout, self._headTimedOut)

    def _adopt(self, settings: Any) -> None:
        self.settings = settings
        self.block = block = settings.block
        self.leg.sendTimeout = block.send_timeout
        self.cycle.configure(settings.limits, settings.upgradeProtocols, settings.maxBodySize)

    @property
    def draining(self) -> bool:
        """Whether the listener is shutting down: this response is the connection's last."""
        return self.factory.draining

    # Reading requests

    def dataReceived(self, data: bytes) -> None:
        self.cycle.receiveData(data)
        self._pump()

    def _pump(self) -> None:
        """Make as much progress as the buffered bytes allow."""
        if self._pumping:
            return
        self._pumping = True
        leg, cycle = self.leg, self.cycle
        try:
            while not leg.closing:
                exchange = self.exchange
                if exchange is None:
                    if leg.writeBlocked:
                        # One answer at a time: wait until the client reads.
                        break
                    if self.factory.settings is not self.settings:
                        self._adopt(self.factory.settings)
                    try:
                        event = cycle.nextEvent()
                    except HTTPError as e:
                        self._refuse(e)
                        return
                    if event is NEED_DATA:
                        if self._idle and cycle.buffered:
                            self._idle = False
                            leg.setDeadline(self.block.client_header_timeout, self._headTimedOut)
                        break
                    assert isinstance(event, RequestReceived)
                    self._begin(event.request)
                elif cycle.state is State.SEND_BODY and exchange.readyForBody:
                    try:
                        event = cycle.nextEvent()
                    except HTTPError as e:
                        exchange.fail(e.status, e.message)
                        continue
                    if event is NEED_DATA:
                        break
                    if isinstance(event, BodyData):
                        exchange.bodyReceived(event.data)
                    else:
                        leg.cancelTimer()
                        exchange.bodyComplete()
                else:
                    break
            if leg.closing:
                return
            # Bytes sent ahead of an answer still owed are bounded; a head
            # alone is bounded by the head limit (431), not by this.
            if cycle.buffered > PIPELINE_BUFFER and (self.exchange is not None or leg.writeBlocked):
                leg.gate.hold("buffer")
            else:
                leg.gate.release("buffer")
        finally:
            self._pumping = False

    def _begin(self, request: RequestHead) -> None:
        self.requests += 1
        self._idle = False
        self.leg.cancelTimer()
        try:
            self._check(request)
        except HTTPError as e:
            self._refuse(e, request)
            return
        self.exchange = self._startExchange(self, request)
        self.exchange.start()

    def _check(self, request: RequestHead) -> None:
        """Refuse what the listener's policy does not allow, before anything else is done."""
        allowed = self.settings.allowedOrigins
        if request.upgrade is not None and allowed:
            origin = (request.first(b"origin") or b"").lower().rstrip(b"/")
            if origin not in allowed:
                raise HTTPError(403, "WebSocket upgrade from an origin that is not allowed")

    # What the exchange tells the loop

    def readyForBody(self) -> None:
        """The exchange can take the request body now."""
        if self.cycle.state is State.SEND_BODY:
            self.leg.expectData(self.block.client_body_timeout, self._bodyStalled)
        self._pump()

    def exchangeFinished(self, keepAlive: bool) -> None:
        """The response is complete; go on with the next request, or close."""
        self.exchange = None
        cycle, leg = self.cycle, self.leg
        cycle.finishResponse(keepAlive)
        if cycle.state is not State.DONE or self.factory.draining:
            leg.close()
            return
        cycle.startNextCycle()
        if self.factory.settings is not self.settings:
            self._adopt(self.factory.settings)
        self._idle = True
        leg.setDeadline(self.block.keepalive_timeout, leg.close)
        self.pipelined = bool(cycle.buffered)
        if cycle.buffered:
            self._pump()

    def exchangeAborted(self) -> None:
        """The response was cut short: the client must see a truncated message."""
        self.exchange = None
        self.leg.close()

    def replaceExchange(self, exchange: IExchange) -> None:
        """Another exchange answers the request instead (an C{error_page})."""
        self.exchange = exchange
        exchange.start()

    def switchToTunnel(
        self,
        upstream: Leg,
        fromUpstream: bytes,
        logFields: dict[str, Any],
        settings: Any = None,
        lease: Any = None,
    ) -> None:
        """
        The upgrade was granted: hand both connections to a tunnel run under
        C{settings} (the location's), with the server's lease.
        """
        self.exchange = None
        leg = self.leg
        leg.dropTimer()
        settings = settings or self.settings
        request = self.cycle.request
        websocket = request is not None and request.upgrade == b"websocket" and settings.block.websocket_frame_tracking
        early = self.cycle.switchProtocols()
        leg.gate.release("buffer")
        leg.loop = None  # nothing of the HTTP layer stays with a tunnel
        tunnel = Tunnel(leg, upstream, settings, logFields, lease, websocket=websocket)
        tunnel.start(early, fromUpstream)

    # What the leg tells the loop

    def writable(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.clientWritable()
        elif self.cycle.buffered:
            self._pump()

    def connectionLost(self, reason: Failure) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.clientLost()

    def closeIfIdle(self) -> None:
        """Close the connection if it is between requests."""
        if self.exchange is None and self.cycle.state is State.IDLE and not self.cycle.buffered:
            self.leg.close()

    # Errors and timeouts

    def _refuse(self, error: HTTPError, request: RequestHead | None = None) -> None:
        """Answer a request that goes no further, and close."""
        log.info(
            "{client} refused: {status} {message}",
            client=self.leg.clientAddress,
            status=error.status,
            message=error.message,
        )
        head = request is not None and request.method == b"HEAD"
        self.settings.metrics.requestEnded(error.status, None)
        self.leg.write(
            errorResponse(error.status, error.message, self.settings.extraHeaders, head=head, headers=error.headers)
        )
        self.leg.close()

    def _headTimedOut(self) -> None:
        self.settings.metrics.timeout("client_header")
        if self.cycle.buffered:
            self._refuse(HTTPError(408, "the request head did not arrive in time"))
        else:
            self.leg.close()

    def _bodyStalled(self) -> None:
        self.settings.metrics.timeout("client_body")
        if self.exchange is not None:
            self.exchange.fail(408, "the request body stopped arriving")


class ClientLeg(Leg):
    """
    A client's connection to a listener.  It starts as a L{RequestLoop}'s
    and may end as one end of a tunnel.
    """

    # Slots, as L{Leg}'s: a client leg lives as long as its connection.
    # C{sniHost} stays unset unless a TLS listener's router sets it.
    __slots__ = ("factory", "clientAddress", "loop", "serial", "sniHost")

    factory: ListenerFactory
    clientAddress: str
    loop: RequestLoop | None

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__(clock)
        self.factory = None  # type: ignore[assignment]
        self.clientAddress = "-"
        self.loop = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.serial = next(_serials)
        factory = self.factory
        self.loop = self.owner = RequestLoop(self, factory.settings, factory.startExchange, factory)

    def closeIfIdle(self) -> None:
        """Shutting down: close now if no request is under way."""
        if self.loop is not None and self.owner is self.loop:
            self.loop.closeIfIdle()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if self.sendTimedOut:
            self.factory.settings.metrics.timeout("send")
        self.factory.connectionClosed(self)


class _Refusal(Protocol):
    """
    Answers a connection over the listener's limits with 503 and closes it;
    a peer that does not let the close finish (a TLS client that never
    sends its close_notify) is dropped after L{REFUSAL_BOUND} seconds, so
    that refused connections cannot pile up outside the limits.
    """

    def __init__(self, extraHeaders: tuple[tuple[bytes, bytes], ...], clock: IReactorTime) -> None:
        self.extraHeaders = extraHeaders
        self.clock = clock
        self._bound: Any = None

    def connectionMade(self) -> None:
        self.transport.write(errorResponse(503, "too many connections", self.extraHeaders))
        self.transport.loseConnection()
        self._bound = self.clock.callLater(REFUSAL_BOUND, self.transport.abortConnection)

    def connectionLost(self, reason: Failure) -> None:
        if self._bound is not None and self._bound.active():
            self._bound.cancel()


class ListenerFactory(Factory):
    """
    Builds a L{ClientLeg} per connection, within C{max_connections} and
    C{max_connections_per_ip}, and keeps count of them for a graceful
    shutdown.  Subclasses say what answers a request (L{startExchange}).

    @ivar settings: the current settings; replace them to reload.
    """

    noisy = False

    def __init__(self, settings: Any, reactor: IReactorTime) -> None:
        self.settings = settings
        self.reactor = reactor
        self.connections: set[ClientLeg] = set()
        self.perAddress: dict[str, int] = {}
        self.draining = False

    def startExchange(self, loop: RequestLoop, request: RequestHead) -> IExchange:
        raise NotImplementedError

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
            self.settings.metrics.connectionRefused()
            return _Refusal(self.settings.extraHeaders, self.reactor)
        protocol = ClientLeg(self.reactor)
        protocol.factory = self
        protocol.clientAddress = host
        self.connections.add(protocol)
        self.perAddress[host] = self.perAddress.get(host, 0) + 1
        return protocol

    def connectionClosed(self, protocol: ClientLeg) -> None:
        if protocol in self.connections:
            self.connections.discard(protocol)
            host = protocol.clientAddress
            count = self.perAddress.get(host, 1) - 1
            if count:
                self.perAddress[host] = count
            else:
                self.perAddress.pop(host, None)


class ProxyFactory(ListenerFactory):
    """A proxy listener: each request becomes an L{wsproxy.relay.Exchange} with an upstream."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings, settings.reactor)

    def startExchange(self, loop: RequestLoop, request: RequestHead) -> IExchange:
        return loop.settings.answer(loop, request)
