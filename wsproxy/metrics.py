# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics, and the C{/healthz} and C{/readyz} probes, served on a
listener of their own when the configuration has a C{[metrics]} table.

Two rules shape this module:

  - Recording must cost about nothing, and nothing at all when metrics are
    off.  Each place that counts (where an access log line is written, a
    tunnel ends, a timer fires) makes one call on a recorder that the
    configuration put on the object at hand: a L{Place} on each
    location's settings, a L{PoolMetrics} on each upstream pool.  With
    metrics off that recorder is L{NO_METRICS}, whose methods do nothing.
    What every request records (its status class, its duration, the
    upstream's response-head time) is kept in plain integers and lists on
    the recorder and turned into metrics when Prometheus scrapes
    (L{_RequestCollector}): C{prometheus_client}'s counters and histograms
    take a lock per increment, which cost several per cent of the request
    rate.  Rarer events (tunnels, upgrades, connects, TLS handshakes,
    timeouts) use C{prometheus_client}'s metrics, whose time series a
    recorder looks up (C{labels()}, which is slow) once and keeps.
    Nothing is recorded per chunk of data, and what the proxy already
    counts (open connections, each server's state and load) is read only
    when Prometheus scrapes (L{_ProxyCollector}).
  - Labels are bounded by the configuration: a listener's C{listen}
    string, a server block (its first C{server_name}, else
    C{server[INDEX]}), a location as written, an upstream pool's name, a
    status class.  Never a path or a client address.

Each L{wsproxy.listeners.ProxyService} has its own L{CollectorRegistry}
(L{ProxyMetrics}), not C{prometheus_client}'s global one, so that several
proxies in one process (tests, embedding programs) do not collide.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from prometheus_client.core import Metric

__all__ = [
    "NO_METRICS",
    "TIMEOUT_KINDS",
    "Place",
    "PoolMetrics",
    "ProxyMetrics",
    "listenerLabel",
    "noteReload",
    "serverLabel",
]

#: The C{kind} label of C{wsproxy_timeouts_total}, one per configuration key.
TIMEOUT_KINDS = (
    "client_header",
    "client_body",
    "send",
    "proxy_connect",
    "proxy_read",
    "proxy_send",
    "websocket_idle",
    "ssl_handshake",
)

_PLACE = ("listener", "server", "location", "upstream")
_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
_ACCEPTED, _REFUSED_ORIGIN, _FAILED_UPSTREAM = "accepted", "refused_origin", "failed_upstream"
#: C{prometheus_client}'s default buckets, for request durations and response-head times.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TUNNEL_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 24 * 3600.0)


class _NoMetrics:
    """
    The recorder of every place while metrics are off: each method does
    nothing.  It has the methods of L{Place}, L{PoolMetrics} and
    L{ProxyMetrics} that the proxy calls.
    """

    __slots__ = ()

    def requestEnded(self, status: int, started: float | None, upgrade: bytes | None = None) -> None:
        pass

    def responseHead(self, started: float) -> None:
        pass

    def upgradeRefused(self) -> None:
        pass

    def tunnelOpened(self) -> None:
        pass

    def tunnelEnded(self, started: float, bytesIn: int, bytesOut: int) -> None:
        pass

    def timeout(self, kind: str) -> None:
        pass

    def connectionRefused(self) -> None:
        pass

    def tlsHandshake(self, version: str) -> None:
        pass

    def tlsFailed(self, reason: Failure, timedOut: bool) -> None:
        pass

    def connected(self, began: float) -> None:
        pass

    def connectFailed(self, error: BaseException) -> None:
        pass

    def reloaded(self, ok: bool) -> None:
        pass

    def instrument(self, prepared: Any, listeners: Sequence[Any]) -> None:
        pass


#: What every hook calls while metrics are off.
NO_METRICS = _NoMetrics()


def listenerLabel(address: Any) -> str:
    """
    The C{listener} label of a L{wsproxy.config.ListenAddress}: its
    C{listen} string, and for a port 0 (a port of its own for each block)
    the block's index after a C{#}.
    """
    return address.listen if address.owner is None else f"{address.listen}#{address.owner}"


def serverLabel(index: int, names: Sequence[str]) -> str:
    """The C{server} label of C{server[index]}: its first C{server_name}, else C{server[INDEX]}."""
    return names[0] if names else f"server[{index}]"


def noteReload(service: Any, ok: bool) -> None:
    """Count a reload of C{service} (a L{wsproxy.listeners.ProxyService}, or a service without metrics)."""
    getattr(service, "metrics", NO_METRICS).reloaded(ok)


def _tlsFailureReason(reason: Failure) -> str:
    """
    A failed handshake's C{reason} label: OpenSSL's reason (a fixed set of
    phrases, such as C{"wrong version number"} or C{"no shared cipher"}),
    or C{"closed"} when the peer went away before finishing.
    """
    error = reason.value
    if isinstance(error, SSL.Error):
        details = error.args[0] if error.args else None
        if isinstance(details, list) and details and details[-1]:
            return str(details[-1][-1])
        return "error"
    return "closed"


def _connectFailureReason(error: BaseException) -> str:
    if isinstance(error, ConnectTimeout):
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, DNSLookupError):
        return "dns"
    return "error"


class ProxyMetrics:
    """
    Every metric of one L{wsproxy.listeners.ProxyService}, in a registry of
    its own (L{registry}), and the recorders handed to the places that
    count.

    @ivar clock: what durations are measured with (the proxy's reactor).
    """

    def __init__(self, service: Any, clock: Any) -> None:
        """
        @param service: the L{wsproxy.listeners.ProxyService} whose
            listeners and pools are read at scrape time.
        """
        # Loaded only by a proxy that serves metrics.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.process_collector import ProcessCollector

        self.clock = clock
        self.registry = registry = CollectorRegistry()
        self.upgrades = Counter(
            "wsproxy_websocket_upgrades",
            "Upgrade requests: accepted (a tunnel opened), refused_origin (allowed_origins), "
            "failed_upstream (the upstream did not grant it, or could not be reached).",
            [*_PLACE, "result"],
            registry=registry,
        )
        self.tunnelsOpen = Gauge("wsproxy_tunnels_open", "Tunnels open now.", _PLACE, registry=registry)
        self.tunnelDuration = Histogram(
            "wsproxy_tunnel_duration_seconds",
            "How long each tunnel lasted, recorded when it ends.",
            _PLACE,
            buckets=_TUNNEL_BUCKETS,
            registry=registry,
        )
        self.tunnelBytes = Counter(
            "wsproxy_tunnel_bytes",
            "Bytes through tunnels, each way, recorded when each tunnel ends.",
            [*_PLACE, "direction"],
            registry=registry,
        )
        self.connectAttempts = Counter(
            "wsproxy_upstream_connect_attempts",
            "New connections tried to an upstream's servers (a kept-alive connection reused is not one).",
            ["upstream"],
            registry=registry,
        )
        self.connectFailures = Counter(
            "wsproxy_upstream_connect_failures",
            "New connections to an upstream's servers that failed: timeout, refused, dns, error.",
            ["upstream", "reason"],
            registry=registry,
        )
        self.connectTime = Histogram(
            "wsproxy_upstream_connect_seconds",
            "How long a successful new connection to an upstream server took.",
            ["upstream"],
            buckets=_CONNECT_BUCKETS,
            registry=registry,
        )
        self.connectionsRefused = Counter(
            "wsproxy_client_connections_refused",
            "Client connections refused by max_connections or max_connections_per_ip.",
            ["listener"],
            registry=registry,
        )
        self.tlsHandshakes = Counter(
            "wsproxy_tls_handshakes",
            "TLS handshakes completed, by protocol version.",
            ["listener", "version"],
            registry=registry,
        )
        self.tlsFailures = Counter(
            "wsproxy_tls_handshake_failures",
            "TLS connections that ended before their handshake completed, by OpenSSL's reason, "
            '"timeout" (ssl_handshake_timeout) or "closed" (the client went away).',
            ["listener", "reason"],
            registry=registry,
        )
        self.timeouts = Counter(
            "wsproxy_timeouts", "Timeouts that fired, by configuration key.", ["kind"], registry=registry
        )
        self.reloads = Counter(
            "wsproxy_config_reloads", "Configuration reloads: ok, or rejected.", ["result"], registry=registry
        )
        self.configLoaded = Gauge(
            "wsproxy_config_loaded_timestamp_seconds",
            "When the configuration in force was loaded (Unix time).",
            registry=registry,
        )
        self._timeouts = {kind: self.timeouts.labels(kind) for kind in TIMEOUT_KINDS}
        for result in ("ok", "rejected"):
            self.reloads.labels(result)
        registry.register(_RequestCollector(self))
        registry.register(_ProxyCollector(service))
        ProcessCollector(registry=registry)
        #: Every recorder handed out, by its labels.
        self.places: dict[tuple[str, str, str, str], Place] = {}
        self._pools: dict[str, PoolMetrics] = {}

    def place(self, listener: str, server: str = "", location: str = "", upstream: str = "") -> Place:
        """
        The recorder of one place: a location, or (with the finer labels
        empty) a virtual host or a listener.  The same labels give the same
        recorder, across reloads too.
        """
        key = (listener, server, location, upstream)
        found = self.places.get(key)
        if found is None:
            found = self.places[key] = Place(self, key)
        return found

    def pool(self, name: str) -> PoolMetrics:
        """The recorder of the upstream pool C{name}."""
        found = self._pools.get(name)
        if found is None:
            found = self._pools[name] = PoolMetrics(self, name)
        return found

    def instrument(self, prepared: Any, listeners: Sequence[Any]) -> None:
        """
        Hand each place of a configuration about to be put in use its
        recorder: each pool, each listening address, virtual host and
        location of C{prepared} (a L{wsproxy.listeners.PreparedConfig}),
        and each TLS listener's factory.  Marks the configuration as loaded
        now.
        """
        for name, pool in prepared.pools.items():
            pool.metrics = self.pool(name)
        for address, settings in prepared.settings.items():
            listen = listenerLabel(address)
            settings.metrics = self.place(listen)
            for vhost in settings.vhosts:
                server = serverLabel(vhost.index, vhost.block.server_names)
                vhost.metrics = self.place(listen, server)
                if vhost.redirect is not None:
                    vhost.redirect.metrics = vhost.metrics
                for location in vhost.allLocations:
                    upstream = location.pool.name if location.pool is not None else ""
                    location.metrics = self.place(listen, server, location.match, upstream)
        for listener in listeners:
            if listener.tls is not None:
                listener.factory.metrics = self.place(listenerLabel(listener.address))
        self.configLoaded.set(self.clock.seconds())

    def timeout(self, kind: str) -> None:
        """Count a timeout of C{kind} (one of L{TIMEOUT_KINDS})."""
        self._timeouts[kind].inc()

    def reloaded(self, ok: bool) -> None:
        """Count a reload, applied (C{ok}) or rejected."""
        self.reloads.labels("ok" if ok else "rejected").inc()


class Place:
    """
    The recorder of one place of the configuration, with its labels fixed.

    @ivar labels: C{(listener, server, location, upstream)}.
    @ivar requests: how many requests it answered, by status class (an
        index into C{_CLASSES}).
    @ivar durations: the request-duration histogram, L{_Histogram}.
    @ivar heads: the response-head-time histogram, L{_Histogram}.
    """

    __slots__ = (
        "_metrics",
        "labels",
        "_clock",
        "requests",
        "durations",
        "heads",
        "_upgrades",
        "_tunnels",
        "_refused",
    )

    def __init__(self, metrics: ProxyMetrics, labels: tuple[str, str, str, str]) -> None:
        self._metrics = metrics
        self.labels = labels
        self._clock = metrics.clock
        self.requests = [0] * len(_CLASSES)
        self.durations = _Histogram(_REQUEST_BUCKETS)
        self.heads = _Histogram(_REQUEST_BUCKETS)
        self._upgrades: dict[str, Any] = {}
        self._tunnels: tuple[Any, Any, Any, Any] | None = None
        self._refused: Any = None

    def _upgrade(self, result: str) -> None:
        counter = self._upgrades.get(result)
        if counter is None:
            counter = self._upgrades[result] = self._metrics.upgrades.labels(*self.labels, result)
        counter.inc()

    # Requests

    def requestEnded(self, status: int, started: float | None, upgrade: bytes | None = None) -> None:
        """
        A request was answered with C{status}.

        @param started: when its head was read (on the proxy's clock), or
            C{None} for an answer given at once.
        @param upgrade: the protocol it asked to switch to, if it did: it
            got no tunnel.
        """
        self.requests[status // 100 if 100 <= status < 600 else 0] += 1
        self.durations.observe(0.0 if started is None else self._clock.seconds() - started)
        if upgrade is not None:
            self._upgrade(_FAILED_UPSTREAM)

    def responseHead(self, started: float) -> None:
        """The upstream's response head arrived, for a request read at C{started}."""
        self.heads.observe(self._clock.seconds() - started)

    def upgradeRefused(self) -> None:
        """An upgrade was refused for its C{Origin}."""
        self._upgrade(_REFUSED_ORIGIN)

    # Tunnels

    def _tunnelSeries(self) -> tuple[Any, Any, Any, Any]:
        series = self._tunnels
        if series is None:
            metrics, labels = self._metrics, self.labels
            series = self._tunnels = (
                metrics.tunnelsOpen.labels(*labels),
                metrics.tunnelDuration.labels(*labels),
                metrics.tunnelBytes.labels(*labels, "client_to_upstream"),
                metrics.tunnelBytes.labels(*labels, "upstream_to_client"),
            )
        return series

    def tunnelOpened(self) -> None:
        """An upgrade was granted: a tunnel opens."""
        self._upgrade(_ACCEPTED)
        self._tunnelSeries()[0].inc()

    def tunnelEnded(self, started: float, bytesIn: int, bytesOut: int) -> None:
        """A tunnel opened at C{started} ended after moving C{bytesIn} to the upstream and C{bytesOut} back."""
        open_, duration, toUpstream, toClient = self._tunnelSeries()
        open_.dec()
        self.requests[1] += 1
        duration.observe(self._clock.seconds() - started)
        toUpstream.inc(bytesIn)
        toClient.inc(bytesOut)

    # Connections

    def timeout(self, kind: str) -> None:
        """A timeout of C{kind} (one of L{TIMEOUT_KINDS}) fired."""
        self._metrics.timeout(kind)

    def connectionRefused(self) -> None:
        """A client connection was refused by a connection limit."""
        refused = self._refused
        if refused is None:
            refused = self._refused = self._metrics.connectionsRefused.labels(self.labels[0])
        refused.inc()

    def tlsHandshake(self, version: str) -> None:
        """A TLS handshake completed with protocol C{version} (C{"TLSv1.3"})."""
        self._metrics.tlsHandshakes.labels(self.labels[0], version).inc()

    def tlsFailed(self, reason: Failure, timedOut: bool) -> None:
        """A TLS connection ended for C{reason} before its handshake completed, or it C{timedOut}."""
        if timedOut:
            self._metrics.timeout("ssl_handshake")
        why = "timeout" if timedOut else _tlsFailureReason(reason)
        self._metrics.tlsFailures.labels(self.labels[0], why).inc()


class _Histogram:
    """
    A histogram's state, without locks (the reactor thread alone touches
    it): a count per bucket (not cumulative; the last one is C{+Inf}) and
    the sum.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """The cumulative buckets, as Prometheus shows them."""
        result, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            result.append((bound, total))
        return result


class _RequestCollector:
    """What each L{Place} counted of its requests, as metrics."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        requests = CounterMetricFamily(
            "wsproxy_requests",
            "Requests answered (proxied, answered by the proxy itself, or refused), by status class; "
            "a WebSocket upgrade counts as 1xx when its tunnel ends.",
            labels=[*_PLACE, "status_class"],
        )
        durations = HistogramMetricFamily(
            "wsproxy_request_duration_seconds",
            "From the request head to the end of the answer, for requests that did not become tunnels.",
            labels=_PLACE,
        )
        heads = HistogramMetricFamily(
            "wsproxy_upstream_response_head_seconds",
            "From the request head to the upstream's response head (connecting included).",
            labels=_PLACE,
        )
        for place in self.metrics.places.values():
            labels = list(place.labels)
            for name, count in zip(_CLASSES, place.requests, strict=True):
                if count:
                    requests.add_metric([*labels, name], count)
            for family, histogram in ((durations, place.durations), (heads, place.heads)):
                if any(histogram.counts):
                    family.add_metric(labels, histogram.buckets(), histogram.sum)
        yield from (requests, durations, heads)


class PoolMetrics:
    """The recorder of one upstream pool: new connections to its servers."""

    __slots__ = ("_metrics", "_clock", "_attempts", "_time", "_name")

    def __init__(self, metrics: ProxyMetrics, name: str) -> None:
        self._metrics = metrics
        self._clock = metrics.clock
        self._name = name
        self._attempts = metrics.connectAttempts.labels(name)
        self._time = metrics.connectTime.labels(name)

    def connected(self, began: float) -> None:
        """A new connection, tried at C{began}, is established."""
        self._attempts.inc()
        self._time.observe(self._clock.seconds() - began)

    def connectFailed(self, error: BaseException) -> None:
        """A new connection failed with C{error}."""
        self._attempts.inc()
        reason = _connectFailureReason(error)
        if reason == "timeout":
            self._metrics.timeout("proxy_connect")
        self._metrics.connectFailures.labels(self._name, reason).inc()


class _ProxyCollector:
    """
    What the proxy counts anyway, read when Prometheus scrapes: open client
    connections per listener, readiness, and each upstream server's state,
    health and load from L{wsproxy.upstream.UpstreamPool.snapshot}.
    """

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        service = self.service
        ready = GaugeMetricFamily("wsproxy_ready", "1 while /readyz answers 200.", value=float(service.ready))
        connections = GaugeMetricFamily(
            "wsproxy_client_connections_open", "Client connections open now.", labels=["listener"]
        )
        for listener in service.listeners:
            connections.add_metric([listenerLabel(listener.address)], len(listener.proxyFactory.connections))
        server = ["upstream", "server"]
        state = GaugeMetricFamily(
            "wsproxy_upstream_server_state",
            "1 for each upstream server's current state, 0 for the others.",
            labels=[*server, "state"],
        )
        healthy = GaugeMetricFamily(
            "wsproxy_upstream_server_healthy",
            "1 if the server takes new requests (up, or a healthy backup), else 0.",
            labels=server,
        )
        requests = GaugeMetricFamily(
            "wsproxy_upstream_server_requests_open", "Requests open to each server.", labels=server
        )
        tunnels = GaugeMetricFamily(
            "wsproxy_upstream_server_tunnels_open", "Tunnels open to each server.", labels=server
        )
        for name, pool in service.pools.items():
            for snapshot in pool.snapshot():
                labels = [name, snapshot.address]
                for each in type(snapshot.state):
                    state.add_metric([*labels, each.name.lower()], float(each is snapshot.state))
                healthy.add_metric(labels, float(snapshot.state.name in ("UP", "BACKUP")))
                requests.add_metric(labels, snapshot.requests)
                tunnels.add_metric(labels, snapshot.tunnels)
        yield from (ready, connections, state, healthy, requests, tunnels)
