# -*- test-case-name: tests.test_metrics -*-
"""
The metrics listener: C{/metrics} for Prometheus, C{/healthz} and
C{/readyz} for a load balancer or Kubernetes, on an endpoint of its own.

A module apart from L{wsproxy.metrics} so that C{twisted.web} and the
exposition code are loaded only by a proxy that has a C{[metrics]} table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

__all__ = ["MetricsPage", "MetricsService"]


class MetricsPage(Resource):
    """
    C{/metrics}: the registry in the format the scraper asks for.

    Rendered in the reactor thread, unlike C{prometheus_client.twisted}'s
    C{MetricsResource}, which renders in the reactor's thread pool: the
    collectors read the proxy's own objects, which only the reactor thread
    may touch.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept")
        encoder, contentType = choose_encoder(accept or "")
        request.setHeader("content-type", contentType)
        return encoder(self.registry)


class _Probe(Resource):
    """A probe: 200 while C{check()} is true, else 503; never cached."""

    isLeaf = True

    def __init__(self, check: Callable[[], bool], up: bytes, down: bytes) -> None:
        super().__init__()
        self.check = check
        self.up = up
        self.down = down

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/plain; charset=utf-8")
        request.setHeader("cache-control", "no-store")
        if self.check():
            return self.up
        request.setResponseCode(503)
        return self.down


#: How long a metrics connection may stay silent (twisted.web's default is 12 hours).
IDLE_TIMEOUT = 60.0


class _QuietSite(Site):
    """
    A L{Site} that writes no access log (scrapes and probes come every few
    seconds) and drops a connection idle for L{IDLE_TIMEOUT} seconds, so
    that a client that opens connections and sends nothing cannot hold them.
    """

    noisy = False

    def log(self, request: Request) -> None:
        pass


class MetricsService(StreamServerEndpointService):
    """
    The metrics listener, plain HTTP on its own endpoint:

      - C{/metrics}: the proxy's metrics (L{MetricsPage});
      - C{/healthz}: 200 while the process serves (a liveness probe);
      - C{/readyz}: 200 while the proxy takes new connections, 503 before
        its listeners are bound and from the start of a shutdown, so that a
        load balancer stops sending before the drain.

    @ivar where: what a bind failure names first (C{"FILE: metrics.listen"}).
    """

    def __init__(
        self, endpoint: Any, registry: CollectorRegistry, ready: Callable[[], bool], listen: str, where: str
    ) -> None:
        root = Resource()
        root.putChild(b"metrics", MetricsPage(registry))
        root.putChild(b"healthz", _Probe(lambda: True, b"ok\n", b""))
        root.putChild(b"readyz", _Probe(ready, b"ready\n", b"not ready\n"))
        super().__init__(endpoint, _QuietSite(root, timeout=IDLE_TIMEOUT))
        self.listen = listen
        self.where = where
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        """
        Bind.

        @raise wsproxy.listeners.StartupError: one line naming the key and why.
        """
        from .listeners import StartupError, announceListening, describeListenFailure

        try:
            super().privilegedStartService()
        except Exception as e:
            raise StartupError(f"{self.where}: {describeListenFailure(self.listen, e)}") from None
        self._waitingForPort.addCallback(self._announce, announceListening)

    def _announce(self, port: Any, announce: Callable[[str, Any], None]) -> Any:
        if port is not None:
            announce(f"metrics {self.listen}", port)
        return port

    def listeningPort(self) -> Deferred:
        """A L{Deferred} firing with the L{IListeningPort} once bound."""
        result: Deferred = Deferred()

        def relay(port: Any) -> Any:
            result.callback(port)
            return port

        self._waitingForPort.addCallback(relay)
        return result
