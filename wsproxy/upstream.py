# -*- test-case-name: tests.test_relay,tests.test_server -*-
"""
The upstream pool: round-robin over servers, failover, passive health.

This is nginx's C{upstream} block with C{proxy_next_upstream error timeout}
and C{max_fails}/C{fail_timeout}: each request starts at the next server;
a server that refuses or does not answer the connection in time is skipped
for the rest of that request and marked down for a while.

Two other things take a server out of rotation, without cutting what it
already carries: an active health check (L{wsproxy.health}) sets
C{checkDown} through L{UpstreamPool.markChecked}, and DNS discovery
(L{wsproxy.discovery}) expands a C{resolve} server into one server per
address through L{UpstreamPool.updateResolved}, retiring the addresses
that vanish.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IProtocol, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from .config import Upstream, UpstreamAddress
from .interfaces import ILegOwner

__all__ = ["NoUpstreamAvailable", "UpstreamPool", "UpstreamServer"]

log = Logger()


class NoUpstreamAvailable(Exception):
    """Every server of the pool was tried for one request, and none connected."""

    def __init__(self, pool: str, failures: list[tuple[UpstreamAddress, str]]) -> None:
        self.pool = pool
        self.failures = failures
        summary = "; ".join(f"{address}: {why}" for address, why in failures)
        super().__init__(f"no server of upstream {pool!r} could be reached ({summary})")


class UpstreamServer:
    """
    One server of a pool and its passive health: C{max_fails} failures
    within C{fail_timeout} seconds mark it down for C{fail_timeout} seconds.

    @ivar checkDown: an active health check marked it down.
    @ivar retiring: DNS no longer names it; it has left the pool.
    @ivar origin: the C{resolve} server this one was resolved from, or
        C{None} for a server given as such.
    """

    __slots__ = ("address", "_endpointFor", "_failures", "downUntil", "idle", "checkDown", "retiring", "origin")

    def __init__(
        self,
        address: UpstreamAddress,
        endpointFor: Callable[[float], Any],
        origin: UpstreamAddress | None = None,
    ) -> None:
        self.address = address
        self._endpointFor = endpointFor
        self._failures: deque[float] = deque()
        self.downUntil = 0.0
        #: Idle keep-alive connections to this server, the most recent last.
        self.idle: list[Any] = []
        self.checkDown = False
        self.retiring = False
        self.origin = origin

    @property
    def acceptsNew(self) -> bool:
        """Whether it may get a new request or tunnel (checks and DNS permitting)."""
        return not (self.checkDown or self.retiring)

    def endpoint(self, timeout: float) -> Any:
        """A client endpoint to this server, with the given connect timeout."""
        return self._endpointFor(timeout)

    def isUp(self, now: float) -> bool:
        return now >= self.downUntil

    def failed(self, now: float, maxFails: int, failTimeout: float) -> bool:
        """Record a failure; return whether this marked the server down."""
        if maxFails == 0:
            return False
        failures = self._failures
        failures.append(now)
        while failures and failures[0] <= now - failTimeout:
            failures.popleft()
        if len(failures) >= maxFails:
            failures.clear()
            self.downUntil = now + failTimeout
            return True
        return False

    def succeeded(self) -> None:
        self._failures.clear()
        self.downUntil = 0.0


class UpstreamPool:
    """
    The servers of one C{[upstream.NAME]} table, picked in turn.

    @ivar name: the upstream's name, for logs and error messages.
    """

    def __init__(
        self,
        upstream: Upstream,
        reactor: IReactorTCP | IReactorTime | Any,
        tlsOptionsFor: Callable[[UpstreamAddress], Any] | None = None,
    ) -> None:
        self.name = upstream.name
        self.upstream = upstream
        self._reactor = reactor
        self._tlsOptionsFor = tlsOptionsFor
        self.servers = [UpstreamServer(a, self._endpointFactory(a)) for a in upstream.servers]
        self._next = 0
        self.retired = False

    def _endpointFactory(
        self, address: UpstreamAddress, tlsAddress: UpstreamAddress | None = None
    ) -> Callable[[float], Any]:
        """
        @param tlsAddress: whose name the TLS certificate must carry, when
            it is not C{address}'s (an address resolved from a name).
        """
        reactor = self._reactor
        if address.isLiteralIP:
            kind = TCP6ClientEndpoint if ":" in address.host else TCP4ClientEndpoint

            def plain(timeout: float) -> Any:
                return kind(reactor, address.host, address.port, timeout=timeout)

        else:

            def plain(timeout: float) -> Any:
                return HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)

        if not address.tls:
            return plain
        if self._tlsOptionsFor is None:
            raise ValueError(f"{address} needs TLS but the pool has no TLS options")
        options = self._tlsOptionsFor(tlsAddress or address)
        return lambda timeout: wrapClientTLS(options, plain(timeout))

    def pickOrder(self) -> list[UpstreamServer]:
        """
        The servers to try for one request: the next one in turn first,
        then the others; servers marked down come last, so that a request
        still gets through when every server has been marked down and one
        has come back.  Servers that take no new request (L{markChecked},
        L{updateResolved}) are left out, unless that leaves none: then the
        order is for L{connectInOrder} to refuse.
        """
        servers = self.servers
        start = self._next % len(servers)
        self._next = (start + 1) % len(servers)
        ordered = servers[start:] + servers[:start]
        taking = [s for s in ordered if s.acceptsNew]
        if not taking:
            return ordered
        ordered = taking
        now = self._reactor.seconds()
        up = [s for s in ordered if s.isUp(now)]
        if len(up) == len(ordered):
            return ordered
        return up + [s for s in ordered if not s.isUp(now)]

    def connect(self, protocolFactory: Callable[[], IProtocol], timeout: float, reuse: bool = True) -> Deferred:
        """
        Get a connection to the next server: an idle keep-alive one if it
        has one (and C{reuse} is true), else a new protocol connected to the
        first server that accepts, trying each server at most once.

        @return: a L{Deferred} firing with C{(UpstreamServer, protocol,
            reused)}, or failing with L{NoUpstreamAvailable}.  Cancelling it
            abandons the attempt in progress.
        """
        order = self.pickOrder()
        if reuse:
            leg = self.takeIdle(order[0])
            if leg is not None:
                return succeed((order[0], leg, True))
        return self.connectInOrder(order, protocolFactory, timeout)

    def takeIdle(self, server: UpstreamServer) -> Any | None:
        """
        An idle keep-alive connection to C{server} that is still open, taken
        out of the pool; C{None} if there is none.  No L{Deferred}: a
        request on a reused connection goes out in the same reactor turn.
        """
        idle = server.idle
        if not server.acceptsNew:
            return None
        while idle:
            keeper = idle.pop()
            if keeper.takeBack():
                return keeper.leg
        return None

    def connectInOrder(
        self, order: list[UpstreamServer], protocolFactory: Callable[[], IProtocol], timeout: float
    ) -> Deferred:
        """
        A new connection to the first server of C{order} (from L{pickOrder})
        that accepts; see L{connect}.
        """
        return ensureDeferred(self._connect(order, protocolFactory, timeout))

    def release(self, server: UpstreamServer, leg: Any) -> bool:
        """
        Keep a connection whose exchange is complete for the next request
        to C{server} (nginx C{keepalive}).

        @return: whether it was kept; if not, the caller closes it.
        """
        if self.retired or not server.acceptsNew or len(server.idle) >= self.upstream.keepalive:
            return False
        server.idle.append(_IdleConnection(self, server, leg))
        return True

    def markChecked(self, server: UpstreamServer, up: bool, why: str) -> None:
        """
        An active health check's verdict on C{server}: down, it gets no new
        request or tunnel (its idle connections are closed, its open
        tunnels run on) until a check brings it back up.  A change is
        logged.
        """
        if server.checkDown == (not up):
            return
        server.checkDown = not up
        fields = {"pool": self.name, "server": str(server.address), "why": why}
        if up:
            log.info("upstream {pool} server {server} back up: {why}", **fields)
            return
        log.warn("upstream {pool} server {server} down by health check: {why}", **fields)
        while server.idle:
            server.idle.pop().close()

    def updateResolved(self, template: UpstreamAddress, addresses: Sequence[str]) -> None:
        """
        What DNS says C{template} (a C{resolve} server of this pool) names
        now: one server per address, with C{template}'s parameters.  A new
        address joins; one that vanished is marked C{retiring} and leaves
        C{servers} at once, while the exchanges and tunnels that hold it
        run on.  The first update replaces C{template}'s own server, which
        until then connects through the system's resolver.  Each change is
        logged.

        @param addresses: IPv4 and IPv6 addresses; an empty sequence
            changes nothing (the last good set stays).

        @raise ValueError: if C{template} is not a server of this pool.
        """
        if not addresses:
            return
        wanted = dict.fromkeys(addresses)
        place = None
        kept: dict[str, UpstreamServer] = {}
        servers: list[UpstreamServer] = []
        for server in self.servers:
            if server.origin != template and (server.origin is not None or server.address != template):
                servers.append(server)
                continue
            if place is None:
                place = len(servers)
            if server.origin is not None and server.address.host in wanted:
                kept[server.address.host] = server
                continue
            server.retiring = True
            while server.idle:
                server.idle.pop().close()
            if server.origin is not None:
                log.info(
                    "upstream {pool} server {server} retiring: {name} no longer resolves to it",
                    pool=self.name,
                    server=str(server.address),
                    name=template.host,
                )
        if place is None:
            raise ValueError(f"{template} is not a server of upstream {self.name!r}")
        resolved = []
        for host in sorted(wanted, key=_addressOrder):
            server = kept.get(host)
            if server is None:
                address = dataclasses.replace(template, host=host, resolve=False)
                server = UpstreamServer(address, self._endpointFactory(address, template), origin=template)
                log.info(
                    "upstream {pool} server {server} joined: {name} resolves to it",
                    pool=self.name,
                    server=str(address),
                    name=template.host,
                )
            resolved.append(server)
        servers[place:place] = resolved
        self.servers = servers

    def retire(self) -> None:
        """
        A reload replaced this pool: close its idle connections, and keep
        none that exchanges still under way release later.
        """
        self.retired = True
        self.closeIdle()

    def closeIdle(self) -> None:
        """Close every idle keep-alive connection."""
        for server in self.servers:
            while server.idle:
                server.idle.pop().close()

    async def _connect(
        self, order: list[UpstreamServer], protocolFactory: Callable[[], IProtocol], timeout: float
    ) -> tuple:
        upstream = self.upstream
        failures = []
        for server in order:
            if not server.acceptsNew:
                failures.append((server.address, "retiring" if server.retiring else "down by health check"))
                continue
            try:
                protocol = await server.endpoint(timeout).connect(_OneConnection(protocolFactory()))
            except CancelledError:
                raise
            except (ConnectError, ConnectTimeout, OSError) as e:
                why = "timed out" if isinstance(e, ConnectTimeout) else _describe(e)
                failures.append((server.address, why))
                if server.failed(self._reactor.seconds(), upstream.max_fails, upstream.fail_timeout):
                    log.warn(
                        "upstream {pool} server {server} marked down for {seconds}s: {why}",
                        pool=self.name,
                        server=str(server.address),
                        seconds=upstream.fail_timeout,
                        why=why,
                    )
                continue
            server.succeeded()
            return server, protocol, False
        raise NoUpstreamAvailable(self.name, failures)


@implementer(ILegOwner)
class _IdleConnection:
    """
    Owns an upstream leg while it waits in the pool: a byte from the
    server (there is no request to answer) or the idle timeout closes it,
    and a close by the server removes it.
    """

    __slots__ = ("server", "leg")

    def __init__(self, pool: UpstreamPool, server: UpstreamServer, leg: Any) -> None:
        self.server = server
        self.leg = leg
        leg.owner = self
        leg.setDeadline(pool.upstream.keepalive_timeout, self.close)

    def takeBack(self) -> bool:
        """Leave the pool for a new exchange; false if the connection is gone."""
        leg = self.leg
        leg.cancelTimer()
        return leg.connected and not leg.closing

    def close(self) -> None:
        self._forget()
        self.leg.close()

    def _forget(self) -> None:
        if self in self.server.idle:
            self.server.idle.remove(self)

    def dataReceived(self, data: bytes) -> None:
        self.close()

    def connectionLost(self, reason: Any) -> None:
        self._forget()

    def writable(self) -> None:
        pass


class _OneConnection(Factory):
    """Hands out one protocol, quietly: no log line per upstream connection."""

    noisy = False

    def __init__(self, protocol: IProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> IProtocol:
        return self._protocol


def _describe(error: Exception) -> str:
    text = getattr(error, "osError", None) or error
    return str(text).strip() or type(error).__name__


def _addressOrder(host: str) -> tuple[int, Any]:
    """IPv4 before IPv6, each in numeric order: a stable order for a DNS answer."""
    ip = ipaddress.ip_address(host)
    return ip.version, ip
