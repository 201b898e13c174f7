# -*- test-case-name: tests.test_balancing,tests.test_relay,tests.test_server -*-
"""
The upstream pool: which server gets each new request or tunnel, failover,
passive health, and what each server is carrying.

This is nginx's C{upstream} block with C{proxy_next_upstream error timeout}
and C{max_fails}/C{fail_timeout}, plus the balancing methods that matter
for long-lived connections: a tunnel holds its server for hours, so
C{least_conn} and C{random_two} count open tunnels as well as open
requests, and C{ip_hash}/C{hash} use a consistent-hash ring, so that a
change of one server of N moves only about 1/N of the clients.

Every request, then its tunnel, holds its server through one L{Lease}:
the only thing that changes a server's counts, released once whatever
ends the exchange or the tunnel.

Two other things take a server out of rotation, without cutting what it
already carries: an active health check (L{wsproxy.health}) sets
C{checkDown} through L{UpstreamPool.markChecked}, and DNS discovery
(L{wsproxy.discovery}) expands a C{resolve} server into one server per
address through L{UpstreamPool.updateResolved}, retiring the addresses
that vanish.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from random import Random
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IProtocol, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .config import Upstream, UpstreamAddress
from .interfaces import ILegOwner
from .metrics import NO_METRICS
from .variables import compileTemplate

__all__ = [
    "Lease",
    "NoUpstreamAvailable",
    "ServerSnapshot",
    "ServerState",
    "UpstreamPool",
    "UpstreamServer",
    "UpstreamsFull",
    "ipHashKey",
]

log = Logger()

#: Points on the hash ring per unit of weight (nginx's C{hash ... consistent} uses 160).
RING_POINTS = 160


class NoUpstreamAvailable(Exception):
    """Every server of the pool was tried for one request, and none connected."""

    def __init__(self, pool: str, failures: list[tuple[UpstreamAddress, str]]) -> None:
        self.pool = pool
        self.failures = failures
        summary = "; ".join(f"{address}: {why}" for address, why in failures)
        super().__init__(f"no server of upstream {pool!r} could be reached ({summary})")


class UpstreamsFull(NoUpstreamAvailable):
    """Every server that could take a new request is at its C{max_conns}: a 503."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.failures = []
        Exception.__init__(self, f"every server of upstream {pool!r} is at its max_conns")


class ServerState(enum.Enum):
    """
    Where a server stands, as logged and as L{UpstreamPool.snapshot} shows it.

      - C{UP}: takes new requests and tunnels.
      - C{BACKUP}: a healthy C{backup} server: takes them only while no
        primary can.
      - C{DOWN_BY_FAILURES}: C{max_fails} connect failures within
        C{fail_timeout}; back after C{fail_timeout}.
      - C{DOWN_BY_CHECK}: an active health check failed (L{UpstreamServer.checkDown}).
      - C{DRAINING}: leaving (a reload removed it, or its name no longer
        resolves to it): nothing new, its open tunnels run on.
      - C{DOWN_BY_CONFIG}: marked C{down} in the configuration.
    """

    UP = "up"
    BACKUP = "backup"
    DOWN_BY_FAILURES = "down by failures"
    DOWN_BY_CHECK = "down by check"
    DRAINING = "draining"
    DOWN_BY_CONFIG = "down by config"


@dataclass(frozen=True)
class ServerSnapshot:
    """One server of a pool at one moment: see L{UpstreamPool.snapshot}."""

    address: str
    id: str
    state: ServerState
    weight: int
    backup: bool
    requests: int
    tunnels: int
    max_conns: int


class ServerLoad:
    """
    What a server is carrying.  Shared by the server objects of the old
    and the new pool after a reload, so that a lease taken before the
    reload releases what the new pool counts.
    """

    __slots__ = ("requests", "tunnels")

    def __init__(self) -> None:
        self.requests = 0
        self.tunnels = 0

    @property
    def total(self) -> int:
        return self.requests + self.tunnels


class Lease:
    """
    An exchange's hold on a server, from the moment it is picked (so that
    concurrent picks see it) until the exchange ends; after a granted
    upgrade, the tunnel's until the tunnel ends.  Failover moves it;
    L{release} ends it for good, so that a late move cannot count again.

    @ivar server: the L{UpstreamServer} held, or C{None}.
    """

    __slots__ = ("server", "tunnel", "released")

    def __init__(self) -> None:
        self.server: UpstreamServer | None = None
        self.tunnel = False
        self.released = False

    def hold(self, server: UpstreamServer) -> None:
        """Count an open request on C{server} instead of the server held so far."""
        if self.released or server is self.server or self.tunnel:
            return
        if self.server is not None:
            self.server.load.requests -= 1
        self.server = server
        server.load.requests += 1

    def becomeTunnel(self) -> None:
        """The request became a tunnel on the same server."""
        server = self.server
        if self.released or server is None or self.tunnel:
            return
        self.tunnel = True
        server.load.requests -= 1
        server.load.tunnels += 1

    def release(self) -> None:
        """The exchange or tunnel is over: count it no more, whatever is said later."""
        server = self.server
        if self.released:
            return
        self.released = True
        if server is None:
            return
        if self.tunnel:
            server.load.tunnels -= 1
        else:
            server.load.requests -= 1


def ipHashKey(clientAddress: str) -> bytes:
    """
    The C{ip_hash} key of a client: as nginx, the first three octets of an
    IPv4 address (a /24 sticks together), the whole of an IPv6 address.
    """
    try:
        ip = ipaddress.ip_address(clientAddress)
    except ValueError:
        return clientAddress.encode("utf-8", "surrogateescape")
    return ip.packed[:3] if ip.version == 4 else ip.packed


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.md5(data, usedforsecurity=False).digest()[:4], "big")


class UpstreamServer:
    """
    One server of a pool: its parameters, its passive health (C{max_fails}
    failures within C{fail_timeout} seconds mark it down for
    C{fail_timeout} seconds), what it carries, and its idle connections.

    @ivar id: an opaque, stable name of the server for the sticky cookie:
        the same in every worker and across reloads, and not its address.
    @ivar checkDown: an active health check says it is down.
    @ivar retiring: it is leaving; it gets nothing new.
    @ivar load: its open requests and tunnels (L{ServerLoad}).
    """

    __slots__ = (
        "address",
        "id",
        "weight",
        "maxConns",
        "maxFails",
        "failTimeout",
        "checkDown",
        "retiring",
        "load",
        "current",
        "loggedState",
        "_endpointFor",
        "_connectTo",
        "_failures",
        "downUntil",
        "idle",
        "origin",
    )

    def __init__(
        self,
        address: UpstreamAddress,
        endpointFor: Callable[[float], Any],
        maxFails: int = 1,
        failTimeout: float = 10.0,
        origin: UpstreamAddress | None = None,
        connectTo: Callable[[IProtocol, float], Deferred] | None = None,
    ) -> None:
        self.address = address
        #: The C{resolve} server this one was resolved from, or C{None}.
        self.origin = origin
        self.id = hashlib.sha256(b"wsproxy-server:" + str(address).encode()).hexdigest()[:16]
        self.weight = address.weight
        self.maxConns = address.max_conns
        self.maxFails = maxFails if address.max_fails is None else address.max_fails
        self.failTimeout = failTimeout if address.fail_timeout is None else address.fail_timeout
        self.checkDown = False
        self.retiring = False
        self.load = ServerLoad()
        #: The smooth weighted round-robin's running weight.
        self.current = 0
        self._endpointFor = endpointFor
        self._connectTo = connectTo
        self._failures: deque[float] = deque()
        self.downUntil = 0.0
        #: Idle keep-alive connections to this server, the most recent last.
        self.idle: list[Any] = []
        self.loggedState = self.state(0.0)

    def endpoint(self, timeout: float) -> Any:
        """A client endpoint to this server, with the given connect timeout."""
        return self._endpointFor(timeout)

    def connect(self, protocol: IProtocol, timeout: float) -> Deferred:
        """
        Connect C{protocol} to this server.

        @return: a L{Deferred} firing with C{protocol} once it is connected.
        """
        if self._connectTo is not None:
            return self._connectTo(protocol, timeout)
        return self._endpointFor(timeout).connect(_OneConnection(protocol))

    @property
    def acceptsNew(self) -> bool:
        """Whether checks and DNS let it get a new request or tunnel."""
        return not (self.checkDown or self.retiring)

    @property
    def inRotation(self) -> bool:
        """Whether it may get new requests at all (not down by configuration or check, not leaving)."""
        return not (self.address.down or self.checkDown or self.retiring)

    @property
    def isFull(self) -> bool:
        return bool(self.maxConns) and self.load.total >= self.maxConns

    @property
    def ratio(self) -> float:
        """Open requests and tunnels per unit of weight: what C{least_conn} compares."""
        return self.load.total / self.weight

    def isUp(self, now: float) -> bool:
        """Whether passive health lets it be tried first."""
        return now >= self.downUntil

    def state(self, now: float) -> ServerState:
        if self.address.down:
            return ServerState.DOWN_BY_CONFIG
        if self.retiring:
            return ServerState.DRAINING
        if self.checkDown:
            return ServerState.DOWN_BY_CHECK
        if not self.isUp(now):
            return ServerState.DOWN_BY_FAILURES
        return ServerState.BACKUP if self.address.backup else ServerState.UP

    def failed(self, now: float, maxFails: int | None = None, failTimeout: float | None = None) -> bool:
        """Record a failure; return whether this marked the server down."""
        maxFails = self.maxFails if maxFails is None else maxFails
        failTimeout = self.failTimeout if failTimeout is None else failTimeout
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

    def takeHealthFrom(self, other: UpstreamServer) -> None:
        """A reload kept this server: carry over its load and health."""
        self.load = other.load
        self._failures = deque(other._failures)
        self.downUntil = other.downUntil
        self.checkDown = other.checkDown
        self.loggedState = other.loggedState


class _Ring:
    """
    A ketama-style consistent-hash ring: each server is C{RING_POINTS} ×
    weight points placed by hashing its address, so that the points of the
    servers that stay do not move when one comes or goes.
    """

    def __init__(self, servers: Sequence[UpstreamServer]) -> None:
        points = []
        for server in servers:
            name = str(server.address).encode()
            for i in range(RING_POINTS * server.weight // 4):
                digest = hashlib.md5(b"%b-%d" % (name, i), usedforsecurity=False).digest()
                points.extend((int.from_bytes(digest[j : j + 4], "big"), server) for j in range(0, 16, 4))
        points.sort(key=lambda point: point[0])
        self._hashes = [h for h, _ in points]
        self._servers = [s for _, s in points]
        self._count = len(set(servers))

    def walk(self, key: bytes) -> Iterator[UpstreamServer]:
        """Each server once, clockwise from where C{key} falls."""
        servers = self._servers
        if not servers:
            return
        start = bisect_left(self._hashes, _point(key))
        seen: set[int] = set()
        size = len(servers)
        for i in range(size):
            server = servers[(start + i) % size]
            if id(server) not in seen:
                seen.add(id(server))
                yield server
                if len(seen) == self._count:
                    return


class UpstreamPool:
    """
    The servers of one C{[upstream.NAME]} table and its balancing policy.

    @ivar name: the upstream's name, for logs and error messages.
    """

    #: The recorder of its new connections (see L{wsproxy.metrics}).
    metrics: Any = NO_METRICS

    def __init__(
        self,
        upstream: Upstream,
        reactor: IReactorTCP | IReactorTime | Any,
        tlsOptionsFor: Callable[[UpstreamAddress], Any] | None = None,
        random: Random | None = None,
    ) -> None:
        #: C{balance = "hash"}: the key, compiled once (nginx variables).
        self.hashKey = compileTemplate(upstream.hash) if upstream.hash else None
        self.name = upstream.name
        self.upstream = upstream
        self._reactor = reactor
        self._tlsOptionsFor = tlsOptionsFor
        self._random = random or Random()
        self.servers = [self._server(a, upstream.max_fails, upstream.fail_timeout) for a in upstream.servers]
        self._next = 0
        self.retired = False
        self._buildTiers()

    def _buildTiers(self) -> None:
        """Group the servers into primaries and backups, each with its hash ring."""
        primaries = [s for s in self.servers if not s.address.backup]
        backups = [s for s in self.servers if s.address.backup]
        hashing = self.upstream.balance in ("ip_hash", "hash")
        self._tiers = [(tier, _Ring(tier) if hashing else None) for tier in (primaries, backups) if tier]

    def _server(
        self, address: UpstreamAddress, maxFails: int, failTimeout: float, origin: UpstreamAddress | None = None
    ) -> UpstreamServer:
        connectTo = None
        if address.isLiteralIP and not address.tls:
            reactor = self._reactor

            def connectTo(protocol: IProtocol, timeout: float) -> Deferred:
                return _DirectConnection(reactor, address.host, address.port, protocol, timeout).deferred

        return UpstreamServer(
            address, self._endpointFactory(address, origin), maxFails, failTimeout, origin=origin, connectTo=connectTo
        )

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

    # Choosing

    def pickOrder(self, key: bytes | None = None, sticky: str | bytes | None = None) -> list[UpstreamServer]:
        """
        The servers to try for one new request, the chosen one first.

        The policy chooses among the primaries that are up and below their
        C{max_conns}; if there are none, among such backups.  Failover goes
        on to the others of the same kind, then to the backups, then to the
        servers marked down by failures (so that a request still gets
        through when every server has been marked down and one has come
        back).  Servers down by configuration or by a check, leaving, or
        full are never in the order.

        @param key: the hash key for C{ip_hash} and C{hash} (see
            L{ipHashKey}); without one these fall back to round-robin.
        @param sticky: the value of the request's sticky cookie: the
            server with that L{UpstreamServer.id} comes first while it can
            take the request.

        @raise UpstreamsFull: if only servers at their C{max_conns} could
            have taken it.
        @raise NoUpstreamAvailable: if no server is in rotation.
        """
        now = self._reactor.seconds()
        servers = self.servers
        if len(servers) == 1:
            # One server (a proxy_pass URL): nothing to choose between.
            only = servers[0]
            self._refresh(only, now)
            if only.inRotation and only.isUp(now) and not only.isFull:
                return [only]
        full = False
        chosen: list[UpstreamServer] = []
        spare: list[UpstreamServer] = []
        resting: list[UpstreamServer] = []
        if isinstance(sticky, bytes):
            sticky = sticky.decode("ascii", "replace")
        for servers, ring in self._tiers:
            available = []
            for server in servers:
                self._refresh(server, now)
                if not server.inRotation:
                    continue
                if not server.isUp(now):
                    resting.append(server)
                elif server.isFull:
                    full = True
                else:
                    available.append(server)
            if not available:
                continue
            if chosen:
                spare.extend(self._policyOrder(available, ring, key, advance=False))
                continue
            pinned = [s for s in available if s.id == sticky] if sticky else []
            if pinned:
                rest = [s for s in available if s is not pinned[0]]
                chosen = pinned + self._policyOrder(rest, ring, key, advance=False)
            else:
                chosen = self._policyOrder(available, ring, key, advance=True)
        order = chosen + spare + resting
        if not order:
            if full:
                raise UpstreamsFull(self.name)
            raise NoUpstreamAvailable(self.name, [(s.address, s.state(now).value) for s in self.servers])
        return order

    def _policyOrder(
        self, servers: list[UpstreamServer], ring: _Ring | None, key: bytes | None, advance: bool
    ) -> list[UpstreamServer]:
        """
        C{servers} (all able to take a request) in the policy's order;
        only with C{advance} does the choice count (round-robin turns).
        """
        balance = self.upstream.balance
        if ring is not None and key:
            allowed = {id(s) for s in servers}
            return [s for s in ring.walk(key) if id(s) in allowed]
        if balance in ("least_conn", "random_two"):
            ranked = sorted(servers, key=lambda s: s.ratio)
            if not advance or len(servers) == 1:
                return ranked
            if balance == "least_conn":
                least = ranked[0].ratio
                first = self._smooth([s for s in servers if s.ratio == least])
            else:
                first = self._randomTwo(servers)
            return [first] + [s for s in ranked if s is not first]
        if not advance:
            return servers
        first = self._smooth(servers)
        at = servers.index(first)
        return servers[at:] + servers[:at]

    def _smooth(self, servers: list[UpstreamServer]) -> UpstreamServer:
        """
        nginx's smooth weighted round-robin: over C{sum(weights)} picks each
        server is picked C{weight} times, spread out rather than in runs.
        """
        total = 0
        best = servers[0]
        for server in servers:
            server.current += server.weight
            total += server.weight
            if server.current > best.current:
                best = server
        best.current -= total
        return best

    def _randomTwo(self, servers: list[UpstreamServer]) -> UpstreamServer:
        """nginx's C{random two least_conn}: of two servers drawn by weight, the less loaded."""
        choices = self._random.choices
        first = choices(servers, weights=[s.weight for s in servers])[0]
        others = [s for s in servers if s is not first]
        second = choices(others, weights=[s.weight for s in others])[0]
        return second if second.ratio < first.ratio else first

    # State

    def _refresh(self, server: UpstreamServer, now: float) -> None:
        """A server whose C{fail_timeout} has passed is back: say so."""
        if server.downUntil and now >= server.downUntil:
            server.downUntil = 0.0
            self.noteState(server, "fail_timeout passed")

    def noteState(self, server: UpstreamServer, why: str) -> None:
        """
        Log C{server}'s state if it changed since it was last logged: to
        be called by whatever changes it (failures, checks, reloads,
        discovery).
        """
        now = self._reactor.seconds()
        state = server.state(now)
        was = server.loggedState
        if state is was:
            return
        server.loggedState = state
        emit = log.info if state in (ServerState.UP, ServerState.BACKUP) else log.warn
        emit(
            "upstream {pool} server {server}: {was} -> {state} ({why})",
            pool=self.name,
            server=str(server.address),
            was=was.value,
            state=state.value,
            why=why,
            upstreamPool=self.name,
            upstreamServer=str(server.address),
            upstreamState=state.value,
        )

    def snapshot(self) -> list[ServerSnapshot]:
        """Each server's address, state and open requests and tunnels, for metrics."""
        now = self._reactor.seconds()
        result = []
        for server in self.servers:
            self._refresh(server, now)
            result.append(
                ServerSnapshot(
                    address=str(server.address),
                    id=server.id,
                    state=server.state(now),
                    weight=server.weight,
                    backup=server.address.backup,
                    requests=server.load.requests,
                    tunnels=server.load.tunnels,
                    max_conns=server.maxConns,
                )
            )
        return result

    def adopt(self, previous: UpstreamPool) -> None:
        """
        A reload replaces C{previous} with this pool: each server that
        stays (same host, port and TLS) keeps its open request and tunnel
        counts and its health.  C{previous} is left as it is.
        """
        before = {server.address.endpoint: server for server in previous.servers}
        for server in self.servers:
            old = before.get(server.address.endpoint)
            if old is not None:
                server.takeHealthFrom(old)
                self.noteState(server, "reloaded")

    # Connecting

    def connect(
        self,
        protocolFactory: Callable[[], IProtocol],
        timeout: float,
        reuse: bool = True,
        key: bytes | None = None,
        lease: Lease | None = None,
    ) -> Deferred:
        """
        Get a connection to the next server: an idle keep-alive one if it
        has one (and C{reuse} is true), else a new protocol connected to the
        first server that accepts, trying each server at most once.

        @param lease: moved to each server tried (see L{connectInOrder}).
        @return: a L{Deferred} firing with C{(UpstreamServer, protocol,
            reused)}, or failing with L{NoUpstreamAvailable}.  Cancelling it
            abandons the attempt in progress.
        """
        try:
            order = self.pickOrder(key)
        except NoUpstreamAvailable as e:
            return fail(e)
        if lease is not None:
            lease.hold(order[0])
        if reuse:
            leg = self.takeIdle(order[0])
            if leg is not None:
                return succeed((order[0], leg, True))
        return self.connectInOrder(order, protocolFactory, timeout, lease)

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
        self,
        order: list[UpstreamServer],
        protocolFactory: Callable[[], IProtocol],
        timeout: float,
        lease: Lease | None = None,
    ) -> Deferred:
        """
        A new connection to the first server of C{order} (from L{pickOrder})
        that accepts; see L{connect}.  C{lease}, if given, is moved to each
        server as it is tried; a server that reached its C{max_conns}
        meanwhile is passed over.
        """
        return _Attempt(self, order, protocolFactory, timeout, lease).deferred

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
        if not up:
            while server.idle:
                server.idle.pop().close()
        self.noteState(server, f"health check: {why}")

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
                self.noteState(server, f"{template.host} no longer resolves to it")
        if place is None:
            raise ValueError(f"{template} is not a server of upstream {self.name!r}")
        resolved = []
        for host in sorted(wanted, key=_addressOrder):
            server = kept.get(host)
            if server is None:
                address = dataclasses.replace(template, host=host, resolve=False)
                server = self._server(address, self.upstream.max_fails, self.upstream.fail_timeout, template)
                log.info(
                    "upstream {pool} server {server} joined: {name} resolves to it",
                    pool=self.name,
                    server=str(address),
                    name=template.host,
                )
            resolved.append(server)
        servers[place:place] = resolved
        self.servers = servers
        self._buildTiers()

    def retire(self, successor: UpstreamPool | None = None) -> None:
        """
        A reload replaced this pool: close its idle connections, and keep
        none that exchanges still under way release later.  Its servers
        that C{successor} does not have are draining.
        """
        self.retired = True
        self.closeIdle()
        staying = {s.address.endpoint for s in successor.servers} if successor is not None else set()
        for server in self.servers:
            if server.address.endpoint not in staying:
                server.retiring = True
                self.noteState(server, "removed by a reload")

    def closeIdle(self) -> None:
        """Close every idle keep-alive connection."""
        for server in self.servers:
            while server.idle:
                server.idle.pop().close()


class _Attempt:
    """
    One request's way through the servers L{UpstreamPool.pickOrder} chose:
    each is tried in turn, once, until one accepts a connection (nginx's
    C{proxy_next_upstream error timeout}).  Each failure counts towards
    the server's passive health.
    """

    __slots__ = (
        "pool",
        "deferred",
        "_order",
        "_next",
        "_protocolFactory",
        "_timeout",
        "_lease",
        "_failures",
        "_began",
        "_server",
        "_connecting",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        order: list[UpstreamServer],
        protocolFactory: Callable[[], IProtocol],
        timeout: float,
        lease: Lease | None,
    ) -> None:
        self.pool = pool
        self.deferred = Deferred(self._cancel)
        self._order = order
        self._next = 0
        self._protocolFactory = protocolFactory
        self._timeout = timeout
        self._lease = lease
        self._failures: list[tuple[UpstreamAddress, str]] = []
        self._began = 0.0
        self._server: UpstreamServer | None = None
        self._connecting: Deferred | None = None
        self._tryNext()

    def _tryNext(self) -> None:
        order, lease, failures = self._order, self._lease, self._failures
        while self._next < len(order):
            server = order[self._next]
            self._next += 1
            if not server.acceptsNew:
                failures.append((server.address, "retiring" if server.retiring else "down by health check"))
                continue
            if lease is not None:
                if server is not lease.server and server.isFull:
                    failures.append((server.address, "max_conns reached"))
                    continue
                lease.hold(server)
            self._server = server
            self._began = self.pool._reactor.seconds()
            try:
                connecting = self._connecting = server.connect(self._protocolFactory(), self._timeout)
            except Exception:
                self.deferred.errback(Failure())
                return
            connecting.addCallbacks(self._connected, self._failed)
            return
        self.deferred.errback(NoUpstreamAvailable(self.pool.name, failures))

    def _connected(self, protocol: IProtocol) -> None:
        self._connecting = None
        pool, server = self.pool, self._server
        assert server is not None
        pool.metrics.connected(self._began)
        wasDown = server.downUntil
        server.succeeded()
        if wasDown:
            pool.noteState(server, "connected")
        self.deferred.callback((server, protocol, False))

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError, ConnectingCancelledError):
            return
        error = failure.value
        if not isinstance(error, (ConnectError, OSError)):
            self.deferred.errback(failure)
            return
        pool, server = self.pool, self._server
        assert server is not None
        pool.metrics.connectFailed(error)
        why = "timed out" if isinstance(error, ConnectTimeout) else _describe(error)
        self._failures.append((server.address, why))
        if server.failed(pool._reactor.seconds()):
            pool.noteState(server, f"{why}; marked down for {server.failTimeout:g}s")
        self._tryNext()

    def _cancel(self, deferred: Deferred) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()


class _DirectConnection(ClientFactory):
    """
    A new plain TCP connection to a literal address, made the way
    C{TCP4ClientEndpoint} makes it, minus what a proxy pays for on every
    read: the endpoint leaves a wrapping protocol between the transport
    and the protocol for the connection's whole life.  Here a stand-in
    takes the connection and hands the transport to the protocol itself.
    """

    noisy = False

    def __init__(self, reactor: IReactorTCP, host: str, port: int, protocol: IProtocol, timeout: float) -> None:
        self.deferred = Deferred(self._cancel)
        self._protocol = protocol
        self._connector = reactor.connectTCP(host, port, self, timeout)

    def buildProtocol(self, addr: Any) -> IProtocol:
        return _Handoff(self._protocol, self.deferred)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.deferred.called:
            self.deferred.errback(reason)

    def _cancel(self, deferred: Deferred) -> None:
        connector = self._connector
        deferred.errback(ConnectingCancelledError(connector.getDestination()))
        connector.stopConnecting()


class _Handoff(Protocol):
    """
    Takes a new TCP connection for its real protocol: the transport is
    pointed at the protocol before the protocol is told it is connected,
    so that no read ever goes through this object.
    """

    def __init__(self, protocol: IProtocol, connected: Deferred) -> None:
        self._protocol = protocol
        self._connected = connected

    def logPrefix(self) -> str:
        prefix = getattr(self._protocol, "logPrefix", None)
        return prefix() if prefix is not None else type(self._protocol).__name__

    def makeConnection(self, transport: Any) -> None:
        protocol = self._protocol
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self._connected.callback(protocol)


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
