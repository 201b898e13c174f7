# -*- test-case-name: tests.test_listeners -*-
"""
Listeners: one L{StreamServerEndpointService} per C{[[server]]} block, all
under one L{ProxyService} that can reload its configuration and drains
connections on shutdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from .config import Config, ServerBlock
from .redirect import RedirectFactory, RedirectSettings
from .server import ListenerSettings, ProxyFactory
from .tls import ServerTLS, upstreamTLSOptions
from .upstream import UpstreamPool

__all__ = ["Listener", "ProxyService", "makeService"]

log = Logger()


class Listener(StreamServerEndpointService):
    """
    One C{[[server]]} block: its endpoint, its factory, and (for a TLS
    listener) its swappable certificates.
    """

    def __init__(
        self, block: ServerBlock, factory: Any, reactor: Any, tls: ServerTLS | None, endpoint: Any = None
    ) -> None:
        self.block = block
        self.proxyFactory = factory
        self.tls = tls
        if endpoint is None:
            endpoint = serverFromString(reactor, block.listen)
        if tls is not None:
            factory = tls.wrapFactory(factory)
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True

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
        """
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.reactor = reactor
        self.config = config
        self.pools: dict[str, UpstreamPool] = {}
        self.listeners: list[Listener] = []
        self.pools = self._makePools(config)
        for index, block in enumerate(config.servers):
            listener = self._makeListener(block, endpoints[index] if endpoints else None)
            listener.setName(f"server[{index}] {block.listen}")
            listener.setServiceParent(self)
            self.listeners.append(listener)

    def _makePools(self, config: Config) -> dict[str, UpstreamPool]:
        return {
            name: UpstreamPool(upstream, self.reactor, upstreamTLSOptions(upstream))
            for name, upstream in config.upstreams.items()
        }

    def _settingsFor(self, block: ServerBlock, tls: ServerTLS | None) -> Any:
        if block.isRedirect:
            return RedirectSettings(block)
        return ListenerSettings(block, self.pools[block.upstream], self.reactor, secure=tls is not None)

    def _makeListener(self, block: ServerBlock, endpoint: Any = None) -> Listener:
        tls = ServerTLS(block, self.reactor) if block.isTLS else None
        settings = self._settingsFor(block, tls)
        factory = RedirectFactory(settings, self.reactor) if block.isRedirect else ProxyFactory(settings)
        return Listener(block, factory, self.reactor, tls, endpoint)

    def reload(self, config: Config) -> None:
        """
        Apply a new configuration to new requests: upstream pools, limits
        and headers change; connections and tunnels already open keep
        running.  Listeners are matched by their C{listen} string; adding or
        removing a listener needs a restart.

        @raise ValueError: if the set of listeners differs.
        """
        if [b.listen for b in config.servers] != [listener.block.listen for listener in self.listeners]:
            raise ValueError("the listen addresses changed; restart wsproxy to change listeners")
        for listener, block in zip(self.listeners, config.servers, strict=True):
            if listener.tls is not None and not listener.tls.reconfigure(block):
                raise ValueError(f"{block.listen}: the TLS settings did not load (see the log)")
        pools = self._makePools(config)
        for name, pool in pools.items():
            old = self.pools.get(name)
            if old is not None and old.upstream == pool.upstream:
                pools[name] = old
        for name, old in self.pools.items():
            if pools.get(name) is not old:
                old.closeIdle()
        self.pools = pools
        for listener, block in zip(self.listeners, config.servers, strict=True):
            listener.block = block
            listener.proxyFactory.settings = self._settingsFor(block, listener.tls)
        self.config = config
        log.info("configuration reloaded from {source}", source=config.source)

    def stopService(self) -> Deferred:
        """
        Stop accepting, let exchanges under way finish and give open tunnels
        C{shutdown_timeout} seconds before they are closed.
        """
        Service.stopService(self)
        stopped = DeferredList([maybeDeferred(listener.stopService) for listener in self.listeners])
        stopped.addCallback(lambda _: self._drain())
        return stopped

    def _drain(self) -> Deferred:
        done: Deferred = Deferred()
        deadline = self.reactor.seconds() + self.config.shutdown_timeout
        factories = [listener.proxyFactory for listener in self.listeners]
        for factory in factories:
            factory.drain()
        for pool in self.pools.values():
            pool.closeIdle()

        def check() -> None:
            remaining = sum(len(getattr(f, "connections", ())) for f in factories)
            if not remaining:
                done.callback(None)
                return
            if self.reactor.seconds() >= deadline:
                log.info("shutdown: closing {count} connections still open", count=remaining)
                for factory in factories:
                    for protocol in list(getattr(factory, "connections", ())):
                        protocol.transport.abortConnection()
                done.callback(None)
                return
            self.reactor.callLater(0.1, check)

        check()
        return done


def makeService(config: Config, reactor: Any = None) -> ProxyService:
    """
    The proxy as a Twisted service, ready to be started or added to an
    application next to other services.
    """
    return ProxyService(config, reactor)
