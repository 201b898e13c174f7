# -*- test-case-name: tests.test_listeners,tests.test_reload -*-
"""
Listeners: one L{StreamServerEndpointService} per C{[[server]]} block, all
under one L{ProxyService} that can reload its configuration and drains
connections on shutdown.

A reload is a transaction: L{ProxyService.reload} first builds everything
the new configuration needs (upstream pools, TLS contexts, listener
settings) aside, and only when all of it is built puts it in use, in one
step that cannot fail.  Whatever goes wrong before that leaves the running
configuration wholly as it was.

Each pool with a C{health_check} or C{resolve} servers is watched by child
services of L{ProxyService} (L{wsproxy.health.PoolHealth},
L{wsproxy.discovery.PoolDiscovery}): they run while the service runs, and a
reload replaces those of the pools it replaces, handing the new pools the
verdicts and addresses of the servers that stay.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from .accesslog import openAccessLogs
from .config import Config, ConfigError, ListenAddress, ServerBlock
from .matching import RoutingError
from .metrics import NO_METRICS, ProxyMetrics
from .proxyprotocol import ProxyHeaderFactory, bareListen, expectsProxyHeader
from .router import AddressSettings
from .server import ProxyFactory
from .tls import PreparedTLS, ServerTLS, TLSConfigError, combineTLS, prepareTLS, upstreamTLSOptions
from .tunnel import tunnelOf
from .upstream import UpstreamPool

__all__ = [
    "Listener",
    "PreparedConfig",
    "ProxyService",
    "StartupError",
    "announceListening",
    "checkReload",
    "describeAddress",
    "describeListenFailure",
    "makeService",
    "parseListen",
    "prepareConfig",
]

log = Logger()

#: How long, after a drain's last close handshake had to end, connections
#: still closing (a TLS close waiting for the peer) are given before they
#: are dropped.
CLOSE_GRACE = 1.0


class StartupError(Exception):
    """
    A listener could not be bound.  C{str(error)} is one line:
    C{"FILE: server[I].listen: cannot listen on ...: why"}.
    """


#: Said after "permission denied" on a port below 1024.
PRIVILEGED_PORT_HINT = (
    "ports below 1024 need privileges: start twistd as root with --uid/--gid "
    "(it binds, then drops to that user), or grant CAP_NET_BIND_SERVICE "
    "(setcap cap_net_bind_service=+ep on the Python interpreter)"
)

_ERRNO_WORDS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied",
    errno.EADDRNOTAVAIL: "address not available (no such local address)",
}


def describeListenFailure(listen: str, error: BaseException) -> str:
    """
    Why binding C{listen} failed, in words for one line, with a hint when
    a port below 1024 needs privileges.
    """
    cause: Any = error.socketError if isinstance(error, CannotListenError) else error
    number = getattr(cause, "errno", None)
    if number in _ERRNO_WORDS:
        why = _ERRNO_WORDS[number]
    elif isinstance(number, int):
        why = os.strerror(number).lower()
    else:
        why = str(cause) or type(cause).__name__
    port = getattr(error, "port", None)
    if number in (errno.EACCES, errno.EPERM) and isinstance(port, int) and 0 < port < 1024:
        why += f"; {PRIVILEGED_PORT_HINT}"
    return f"cannot listen on {listen!r}: {why}"


def describeAddress(address: Any) -> str:
    """
    A bound address for a log line: C{host:port}, C{[host]:port} for IPv6,
    or a UNIX socket's path.
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return os.fsdecode(name)
    return str(address)


def announceListening(name: str, port: Any) -> None:
    """
    Log, once a listener is bound, where it listens: with C{tcp:0} this is
    how an operator (or a test) learns the port that was picked.

    @param name: the listener, C{"server[I] LISTEN"}.
    @param port: its L{IListeningPort}.
    """
    log.info("{name} listening on {address}", name=name, address=describeAddress(port.getHost()))


def parseListen(reactor: Any, source: str, index: int, listen: str) -> Any:
    """
    The server endpoint for C{server[index].listen}; a C{haproxy:} prefix
    is left to the L{Listener}, which reads the PROXY header itself.

    @raise ConfigError: if Twisted cannot parse it (an unknown endpoint
        type, a port that is not a number, ...).
    """
    try:
        return serverFromString(reactor, bareListen(listen))
    except Exception as e:
        raise ConfigError(source, f"server[{index}].listen", f"{listen!r}: {e}") from None


def _tlsError(source: str, index: int | None, error: TLSConfigError) -> ConfigError:
    """A L{TLSConfigError} of C{server[index]} (or of an upstream) as a L{ConfigError}."""
    key = error.key if index is None else f"server[{index}].{error.key}"
    return ConfigError(source, key, error.problem)


@dataclass(frozen=True)
class PreparedConfig:
    """
    Everything a configuration needs before it can serve, built aside by
    L{prepareConfig}: nothing in it is in use yet.

    @ivar pools: one pool per C{[upstream.NAME]}; pools handed to
        L{prepareConfig} in C{keep} are reused where their upstream did not
        change.
    @ivar tls: per listening address, its TLS contexts (its virtual hosts'
        certificates, picked by SNI) or C{None}.
    @ivar settings: per listening address, its L{AddressSettings}.
    """

    config: Config
    pools: Mapping[str, UpstreamPool]
    tls: Mapping[ListenAddress, PreparedTLS | None]
    settings: Mapping[ListenAddress, AddressSettings]


def prepareConfig(config: Config, reactor: Any, keep: Mapping[str, UpstreamPool] | None = None) -> PreparedConfig:
    """
    Build the upstream pools and TLS contexts of C{config} and check every
    C{listen} string, without binding or changing anything.

    @param keep: pools in use; one whose upstream is unchanged is reused,
        and the servers that stay in a changed one keep their counts and
        health (L{UpstreamPool.adopt}).

    @raise ConfigError: naming the key of the first thing that fails.
    """
    pools: dict[str, UpstreamPool] = {}
    for name, upstream in config.upstreams.items():
        old = (keep or {}).get(name)
        if old is not None and old.upstream == upstream:
            pools[name] = old
            continue
        try:
            pools[name] = UpstreamPool(upstream, reactor, upstreamTLSOptions(upstream))
        except TLSConfigError as e:
            raise _tlsError(config.source, None, e) from None
        if old is not None:
            pools[name].adopt(old)
    perBlock: dict[int, PreparedTLS] = {}
    for index, block in enumerate(config.servers):
        for listen in block.listens or (block.listen,):
            parseListen(reactor, config.source, index, listen)
        if block.isTLS:
            try:
                perBlock[index] = prepareTLS(block)
            except TLSConfigError as e:
                raise _tlsError(config.source, index, e) from None
    tls: dict[ListenAddress, PreparedTLS | None] = {}
    settings: dict[ListenAddress, AddressSettings] = {}
    if config.metrics is not None:
        _metricsEndpoint(reactor, config)
    for address, indexes in config.addresses.items():
        default = config.defaultServer(address)
        if default in perBlock:
            tls[address] = combineTLS(perBlock[default], [perBlock[i] for i in indexes if i != default])
        else:
            tls[address] = None
        try:
            settings[address] = AddressSettings(config, address, pools, reactor, secure=default in perBlock)
        except RoutingError as e:
            raise ConfigError(config.source, f"server[{indexes[0]}]", str(e)) from None
    return PreparedConfig(config, pools, tls, settings)


def _metricsEndpoint(reactor: Any, config: Config) -> Any:
    """
    The server endpoint of C{[metrics]}.

    @raise ConfigError: if Twisted cannot parse C{metrics.listen}.
    """
    listen = config.metrics.listen
    try:
        return serverFromString(reactor, listen)
    except Exception as e:
        raise ConfigError(config.source, "metrics.listen", f"{listen!r}: {e}") from None


def checkReload(running: Config, new: Config) -> None:
    """
    Whether C{new} can replace C{running} without a restart: the same
    listening addresses, in order, each as plain or TLS as before, and the
    same number of workers.  Names, locations and handlers may change.

    @raise ConfigError: naming the key that needs a restart.
    """
    source = new.source
    old = list(running.addresses)
    addresses = new.addresses
    if list(addresses) != old:
        changed = next((address for address in addresses if address not in old), None)
        key = f"server[{addresses[changed][0]}].listen" if changed is not None else "server"
        raise ConfigError(source, key, "the listen addresses changed; restart wsproxy to change listeners")
    for address in addresses:
        was = running.servers[running.defaultServer(address)].isTLS
        index = new.defaultServer(address)
        if was != new.servers[index].isTLS:
            change = "a plain listener cannot become a TLS one" if not was else "a TLS listener cannot drop TLS"
            raise ConfigError(source, f"server[{index}].ssl_certificate", f"{change} on reload; restart wsproxy")
    for address in addresses:
        if expectsProxyHeader(new, address) != expectsProxyHeader(running, address):
            key = f"server[{new.addresses[address][0]}].proxy_protocol"
            raise ConfigError(source, key, "turning the PROXY protocol on or off needs a restart")
    if new.workers != running.workers:
        raise ConfigError(source, "workers", "changing the number of workers needs a restart")
    if new.metrics != running.metrics:
        raise ConfigError(source, "metrics.listen", "changing the metrics listener needs a restart")


class Listener(StreamServerEndpointService):
    """
    One C{[[server]]} block: its endpoint, its factory, and (for a TLS
    listener) its swappable certificates.  With C{proxyProtocol}, each
    connection's PROXY header is read before anything else, TLS included.

    @ivar announce: whether to log where it listens once bound (see
        L{announceListening}); a worker, which serves sockets its parent
        bound and announced, does not.
    """

    announce = True
    #: The L{IListeningPort} once bound.
    port: Any = None

    def __init__(
        self,
        block: ServerBlock,
        factory: Any,
        reactor: Any,
        tls: ServerTLS | None,
        endpoint: Any = None,
        proxyProtocol: bool | None = None,
    ) -> None:
        self.block = block
        #: The address, as written in C{listen}.
        self.listen = block.listen
        self.proxyFactory = factory
        self.tls = tls
        #: What a bind failure names first: C{"FILE: server[I].listen"}.
        self.where = "listen"
        if endpoint is None:
            endpoint = serverFromString(reactor, bareListen(block.listen))
        if tls is not None:
            factory = tls.wrapFactory(factory)
        if proxyProtocol is None:
            proxyProtocol = block.proxy_protocol or block.listen != bareListen(block.listen)
        if proxyProtocol:
            factory = ProxyHeaderFactory(factory, reactor, lambda: self.block.client_header_timeout)
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        """
        Bind (twistd calls this before it drops privileges).

        @raise StartupError: one line naming the listener and why.
        """
        try:
            super().privilegedStartService()
        except Exception as e:
            raise StartupError(f"{self.where}: {describeListenFailure(self.listen, e)}") from None
        self._waitingForPort.addCallback(self._bound)
        if self.announce:
            self._waitingForPort.addCallback(self._announce)

    def _announce(self, port: Any) -> Any:
        if port is not None:  # None: a failure to bind later on, logged already
            announceListening(self.name or self.listen, port)
        return port

    def _bound(self, port: Any) -> Any:
        self.port = port
        return port

    def listeningPort(self) -> Deferred:
        """
        A L{Deferred} firing with the L{IListeningPort} once bound; useful
        with C{tcp:0} to learn the port that was picked.
        """
        waiting = self._waitingForPort
        if waiting is None:
            raise RuntimeError("the listener has not been started")
        result: Deferred = Deferred()

        def relay(port: Any) -> Any:
            result.callback(port)
            return port

        waiting.addCallback(relay)
        return result


class ProxyService(MultiService):
    """
    Every listener of one configuration.

    Start it like any Twisted service (C{twistd}, a C{.tac} file, or
    C{startService()} from a test); replace its configuration with
    L{reload}.
    """

    def __init__(self, config: Config, reactor: Any = None, endpoints: Sequence[Any] | None = None) -> None:
        """
        @param endpoints: one server endpoint per C{[[server]]} block, to use
            instead of parsing their C{listen} (a worker process adopting
            sockets its parent bound).

        @raise ConfigError: if a C{listen} string does not parse, or a TLS
            certificate, key or setting does not load (naming its key).
        """
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.reactor = reactor
        prepared = prepareConfig(config, reactor)
        openAccessLogs(config)
        self.config = config
        #: The proxy's metrics (L{wsproxy.metrics.ProxyMetrics}), or L{NO_METRICS}.
        self.metrics: Any = NO_METRICS
        self.metricsService: Any = None
        if config.metrics is not None:
            self.metrics = ProxyMetrics(self, reactor)
            from .metricsweb import MetricsService

            self.metricsService = MetricsService(
                _metricsEndpoint(reactor, config),
                self.metrics.registry,
                lambda: self.ready,
                listen=config.metrics.listen,
                where=f"{config.source}: metrics.listen",
            )
            self.metricsService.setServiceParent(self)
        self.pools: dict[str, UpstreamPool] = dict(prepared.pools)
        self.listeners: list[Listener] = []
        #: The services watching each pool (health checks, DNS discovery).
        self.monitors: dict[str, list[Service]] = {}
        for position, (address, indexes) in enumerate(config.addresses.items()):
            listen = address.listen
            endpoint = endpoints[position] if endpoints else parseListen(reactor, config.source, indexes[0], listen)
            tlsPrepared = prepared.tls[address]
            tls = ServerTLS(tlsPrepared.block, reactor, tlsPrepared) if tlsPrepared is not None else None
            block = config.servers[config.defaultServer(address)]
            proxyProtocol = expectsProxyHeader(config, address)
            listener = Listener(block, ProxyFactory(prepared.settings[address]), reactor, tls, endpoint, proxyProtocol)
            listener.address = address
            listener.listen = listen
            listener.where = f"{config.source}: server[{indexes[0]}].listen"
            listener.setName(f"server[{indexes[0]}] {listen}")
            listener.announce = not endpoints
            listener.setServiceParent(self)
            self.listeners.append(listener)
        self.metrics.instrument(prepared, self.listeners)
        for name, pool in self.pools.items():
            self.monitors[name] = self._monitorsFor(pool)
            for monitor in self.monitors[name]:
                monitor.setServiceParent(self)

    def _monitorsFor(self, pool: UpstreamPool) -> list[Service]:
        """
        The services that check C{pool}'s servers and resolve its names, not
        started.  Their modules (and C{twisted.names}) are loaded only for a
        pool that needs them.
        """
        monitors: list[Service] = []
        health = None
        if pool.upstream.health_check is not None:
            from .health import PoolHealth

            health = PoolHealth(pool, self.reactor)
            monitors.append(health)
        if any(address.resolve for address in pool.upstream.servers):
            from .discovery import PoolDiscovery

            changed = health.sync if health is not None else (lambda: None)
            monitors.append(PoolDiscovery(pool, self.reactor, changed=changed))
        return monitors

    @property
    def ready(self) -> bool:
        """Whether new connections are welcome: running, every listener bound, and not shutting down."""
        return bool(self.running) and all(listener.port is not None for listener in self.listeners)

    def reload(self, config: Config) -> None:
        """
        Apply a new configuration to new requests: upstream pools, limits,
        headers and certificates change; connections and tunnels already
        open keep running.

        Everything is built first, then swapped in one step: if anything
        fails, nothing changes.  Listeners are matched by their C{listen}
        string; adding or removing one, turning a redirect listener into a
        proxy listener (or back), or adding or dropping TLS needs a
        restart.  A pool whose upstream changed is retired: its idle
        connections are closed, and the exchanges still using it keep it
        until they end.

        @raise ConfigError: one line naming the key, if C{config} cannot be
            applied; the running configuration then stays wholly in force.
        """
        checkReload(self.config, config)
        prepared = prepareConfig(config, self.reactor, keep=self.pools)
        monitors = {}
        for name, pool in prepared.pools.items():
            old = self.pools.get(name)
            if old is pool:
                monitors[name] = self.monitors[name]
                continue
            if old is not None:
                _carryMonitored(old, pool)
            monitors[name] = self._monitorsFor(pool)
        self.metrics.instrument(prepared, self.listeners)
        openAccessLogs(config)
        # Nothing below can fail.
        for listener in self.listeners:
            tls = prepared.tls[listener.address]
            if listener.tls is not None and tls is not None:
                listener.tls.install(tls)
            listener.block = config.servers[config.defaultServer(listener.address)]
            listener.proxyFactory.settings = prepared.settings[listener.address]
        retired = [pool for pool in self.pools.values() if pool not in prepared.pools.values()]
        self.pools = dict(prepared.pools)
        self.config = config
        for pool in retired:
            pool.retire(self.pools.get(pool.name))
        for name, watching in self.monitors.items():
            if watching is not monitors.get(name):
                for monitor in watching:
                    monitor.disownServiceParent()
        for name, watching in monitors.items():
            if watching is not self.monitors.get(name):
                for monitor in watching:
                    monitor.setServiceParent(self)
        self.monitors = monitors
        log.info("configuration reloaded from {source}", source=config.source)

    def stopService(self) -> Deferred:
        """
        Stop accepting, let exchanges under way finish and give open tunnels
        C{shutdown_timeout} seconds (or C{websocket_drain_close_after})
        before they are closed: a WebSocket tunnel with a close handshake
        (L{wsproxy.tunnel.Tunnel.goAway}), anything else at once.
        """
        Service.stopService(self)
        for watching in self.monitors.values():
            for monitor in watching:
                if monitor.running:
                    monitor.stopService()
        stopped = DeferredList([maybeDeferred(listener.stopService) for listener in self.listeners])
        stopped.addCallback(lambda _: self._drain())
        if self.metricsService is not None:
            stopped.addCallback(lambda _: self.metricsService.stopService())
        return stopped

    def _drain(self) -> Deferred:
        done: Deferred = Deferred()
        config = self.config
        now = self.reactor.seconds()
        deadline = now + config.shutdown_timeout
        closeAfter = config.websocket_drain_close_after
        goAwayAt = deadline if closeAfter is None else min(deadline, now + closeAfter)
        # Past this, even a close handshake under way is cut short.
        lastCall = deadline + config.websocket_close_timeout + CLOSE_GRACE
        factories = [listener.proxyFactory for listener in self.listeners]
        for factory in factories:
            factory.drain()
        for pool in self.pools.values():
            pool.closeIdle()

        def check() -> None:
            legs = [leg for f in factories for leg in getattr(f, "connections", ())]
            if not legs:
                done.callback(None)
                return
            now = self.reactor.seconds()
            if now >= goAwayAt:
                tunnels = [t for t in map(tunnelOf, legs) if t is not None and t.goingAway is None and not t.closed]
                if tunnels:
                    log.info("shutdown: closing {count} tunnels (WebSocket: 1001 Going Away)", count=len(tunnels))
                for tunnel in tunnels:
                    tunnel.goAway(config.websocket_close_timeout)
            if now >= deadline:
                # Tunnels end with their close handshakes; the rest end now.
                over = now >= lastCall
                cut = legs if over else [leg for leg in legs if tunnelOf(leg) is None]
                if cut:
                    log.info("shutdown: closing {count} connections still open", count=len(cut))
                for leg in cut:
                    leg.abort()
                if over:
                    done.callback(None)
                    return
            self.reactor.callLater(0.1, check)

        check()
        return done


def _carryMonitored(old: UpstreamPool, new: UpstreamPool) -> None:
    """A reload's pool takes over the resolved addresses and check verdicts of the one it replaces."""
    if any(address.resolve for address in new.upstream.servers):
        from .discovery import carryResolved

        carryResolved(old, new)
    if new.upstream.health_check is not None:
        from .health import carryHealth

        carryHealth(old, new)


def makeService(config: Config, reactor: Any = None) -> ProxyService:
    """
    The proxy as a Twisted service, ready to be started or added to an
    application next to other services.

    @raise ConfigError: see L{ProxyService}.
    """
    return ProxyService(config, reactor)
