"""
Metrics, C{/healthz} and C{/readyz} on real listeners: C{/metrics} is
scraped before and after a scripted mix of requests, upgrades, refusals,
failures, TLS handshakes and reloads, and the change of every counter is
compared with what the mix must have caused, exactly.  The upstreams are
real (autobahn's echo, scripted raw servers, a port nobody listens on),
TLS is real (trustme), on plain and TLS listeners alike.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from prometheus_client.parser import text_string_to_metric_families
from support import (
    LOOPBACK,
    RawClient,
    connectRaw,
    exchange,
    listenEcho,
    listenScripted,
    ok,
    switching,
    until,
    upgradeRequest,
)
from test_reload import toml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS

from wsproxy import metricsweb, parseConfig
from wsproxy.config import ConfigError
from wsproxy.listeners import ProxyService, StartupError
from wsproxy.metrics import NO_METRICS
from wsproxy.tap import reloadFrom

LISTEN = f"tcp:0:interface={LOOPBACK}"
METRICS = {"listen": LISTEN}
GET = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
#: A masked text frame "hello" (2 + 4 + 5 bytes), and autobahn's echo of it (2 + 5).
HELLO = b"\x81\x85\x00\x00\x00\x00hello"
HELLO_ECHO = b"\x81\x05hello"
#: What a scrape may change that no request causes.
_UNCOUNTED = ("process_", "wsproxy_config_loaded_timestamp_seconds", "wsproxy_upstream_server_")


# Helpers


class Site:
    """A proxy under test: its ports, and how to reach them over plain TCP or TLS."""

    def __init__(self, service: ProxyService, ca: trustme.CA | None) -> None:
        self.service = service
        self.ca = ca
        self.ports = [listener.port.getHost().port for listener in service.listeners]
        self.metricsPort = service.metricsService._waitingForPort.result.getHost().port

    async def connect(self, index: int, tls: bool) -> RawClient:
        endpoint: Any = TCP4ClientEndpoint(reactor, LOOPBACK, self.ports[index])
        if tls:
            options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(self.ca.cert_pem.bytes()))
            endpoint = wrapClientTLS(options, endpoint)
        return await connectProtocol(endpoint, RawClient())

    async def exchange(self, index: int, tls: bool, data: bytes) -> bytes:
        client = await self.connect(index, tls)
        client.transport.write(data)
        received = await client.waitClosed(10)
        assert received is not None, "the proxy did not close"
        return received

    async def scrape(self) -> dict[str, float]:
        return await scrape(self.metricsPort)

    async def get(self, path: bytes) -> bytes:
        response = await exchange(self.metricsPort, b"GET %b HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n" % path)
        assert response is not None
        return response


async def scrape(port: int) -> dict[str, float]:
    """Every sample of C{/metrics}, by name and labels: C{'name{a="1",b="2"}'}."""
    response = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
    assert response is not None and response.startswith(b"HTTP/1.1 200 ")
    body = response.partition(b"\r\n\r\n")[2].decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def changes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """
    What changed between two scrapes: counters and gauges, and each
    histogram's count (its buckets and sum depend on timing).
    """
    changed = {}
    for key, value in after.items():
        name = key.partition("{")[0]
        if name.startswith(_UNCOUNTED) or name.endswith(("_created", "_bucket", "_sum")):
            continue
        if value != before.get(key, 0.0):
            changed[key] = value - before.get(key, 0.0)
    return changed


def sample(name: str, **labels: str) -> str:
    return f"{name}{{{','.join(f'{k}={chr(34)}{v}{chr(34)}' for k, v in sorted(labels.items()))}}}"


def place(listener: str, location: str, upstream: str, server: str = "localhost") -> dict[str, str]:
    return {"listener": listener, "server": server, "location": location, "upstream": upstream}


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def closedPort() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture
def certificates(tmp_path: Path) -> tuple[trustme.CA, str, str]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    certificate, key = tmp_path / "localhost.pem", tmp_path / "localhost.key"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(certificate))
    leaf.private_key_pem.write_to_path(str(key))
    return ca, str(certificate), str(key)


async def startSite(cleanup: Any, document: dict[str, Any], ca: trustme.CA | None = None) -> Site:
    service = cleanup.service(ProxyService(parseConfig(document, source="(test)"), reactor))
    service.startService()
    for listener in service.listeners:
        await listener.listeningPort()
    await service.metricsService.listeningPort()
    return Site(service, ca)


def tlsBlock(certificates: tuple[trustme.CA, str, str], **block: Any) -> dict[str, Any]:
    _, certificate, key = certificates
    return {"ssl_certificate": certificate, "ssl_certificate_key": key, **block}


# The scripted mix


def mixDocument(echoPort: int, deadPort: int, certificates: tuple[trustme.CA, str, str]) -> dict[str, Any]:
    locations = [
        {"match": "/", "proxy_pass": "http://app"},
        {"match": "/ws", "proxy_pass": "http://app", "allowed_origins": ["https://good.example"]},
        {"match": "/dead/", "proxy_pass": "http://dead"},
        {"match": "= /teapot", "return": "418 short and stout"},
    ]
    server = {"listen": LISTEN, "server_name": "localhost", "access_log": False, "location": locations}
    return {
        "upstream": {
            "app": {"servers": [f"{LOOPBACK}:{echoPort}"]},
            "dead": {"servers": [f"{LOOPBACK}:{deadPort}"], "max_fails": 0},
        },
        "server": [server, tlsBlock(certificates, **server)],
        "shutdown_timeout": 1,
        "metrics": METRICS,
    }


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_a_scripted_mix_changes_each_counter_exactly(cleanup, certificates, tmp_path, tls):
    echo = cleanup.port(listenEcho())
    document = mixDocument(echo.getHost().port, closedPort(), certificates)
    site = await startSite(cleanup, document, certificates[0])
    index = 1 if tls else 0
    listener, tlsListener = f"{LISTEN}#{index}", f"{LISTEN}#1"
    root, ws, dead, teapot = (
        place(listener, "/", "app"),
        place(listener, "/ws", "app"),
        place(listener, "/dead/", "dead"),
        place(listener, "= /teapot", ""),
    )
    before = await site.scrape()

    for _ in range(2):
        assert status(await site.exchange(index, tls, GET)) == 200
    assert status(await site.exchange(index, tls, GET.replace(b"/", b"/teapot", 1))) == 418
    assert status(await site.exchange(index, tls, GET.replace(b"/", b"/dead/x", 1))) == 502
    assert status(await site.exchange(index, tls, upgradeRequest(b"/dead/x"))) == 502
    evil = upgradeRequest(b"/ws", b"Origin: https://evil.example\r\n")
    assert status(await site.exchange(index, tls, evil)) == 403

    tunnel = await site.connect(index, tls)
    tunnel.transport.write(upgradeRequest(b"/ws", b"Origin: https://good.example\r\n"))
    await tunnel.waitFor(b"\r\n\r\n")
    assert tunnel.received.startswith(b"HTTP/1.1 101 ")
    tunnel.received = b""
    tunnel.transport.write(HELLO)
    assert await tunnel.waitFor(HELLO_ECHO) == HELLO_ECHO
    during = await site.scrape()
    assert during[sample("wsproxy_tunnels_open", **ws)] == 1
    assert during[sample("wsproxy_client_connections_open", listener=listener)] == 1
    upstreamServer = {"upstream": "app", "server": f"{LOOPBACK}:{echo.getHost().port}"}
    assert during[sample("wsproxy_upstream_server_tunnels_open", **upstreamServer)] == 1
    tunnel.transport.loseConnection()

    path = tmp_path / "wsproxy.toml"
    path.write_text(toml(document))
    assert reloadFrom(site.service, str(path)) is True
    path.write_text("this is [not toml\n")
    assert reloadFrom(site.service, str(path)) is False
    assert status(await site.exchange(index, tls, GET)) == 200

    garbage = await connectRaw(site.ports[1])
    garbage.transport.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert await garbage.waitClosed(10) is not None

    connectionsClosed = sample("wsproxy_client_connections_open", listener=listener)
    closed = {}

    async def settled() -> bool:
        closed.update(await site.scrape())
        return closed[connectionsClosed] == 0 and closed.get(sample("wsproxy_tunnels_open", **ws)) == 0

    assert await untilAsync(settled, 10)
    after = closed
    tlsConnections = 8 if tls else 0
    expected = {
        sample("wsproxy_requests_total", **root, status_class="2xx"): 3,
        sample("wsproxy_requests_total", **teapot, status_class="4xx"): 1,
        sample("wsproxy_requests_total", **dead, status_class="5xx"): 2,
        sample("wsproxy_requests_total", **ws, status_class="4xx"): 1,
        sample("wsproxy_requests_total", **ws, status_class="1xx"): 1,
        sample("wsproxy_request_duration_seconds_count", **root): 3,
        sample("wsproxy_request_duration_seconds_count", **teapot): 1,
        sample("wsproxy_request_duration_seconds_count", **dead): 2,
        sample("wsproxy_request_duration_seconds_count", **ws): 1,
        sample("wsproxy_upstream_response_head_seconds_count", **root): 3,
        sample("wsproxy_upstream_response_head_seconds_count", **ws): 1,
        sample("wsproxy_websocket_upgrades_total", **dead, result="failed_upstream"): 1,
        sample("wsproxy_websocket_upgrades_total", **ws, result="refused_origin"): 1,
        sample("wsproxy_websocket_upgrades_total", **ws, result="accepted"): 1,
        sample("wsproxy_tunnel_duration_seconds_count", **ws): 1,
        sample("wsproxy_tunnel_bytes_total", **ws, direction="client_to_upstream"): len(HELLO),
        sample("wsproxy_tunnel_bytes_total", **ws, direction="upstream_to_client"): len(HELLO_ECHO),
        # The first GET connects; the upgrade takes that kept-alive connection, so the last GET connects again.
        sample("wsproxy_upstream_connect_attempts_total", upstream="app"): 2,
        sample("wsproxy_upstream_connect_attempts_total", upstream="dead"): 2,
        sample("wsproxy_upstream_connect_failures_total", upstream="dead", reason="refused"): 2,
        sample("wsproxy_upstream_connect_seconds_count", upstream="app"): 2,
        sample("wsproxy_tls_handshake_failures_total", listener=tlsListener, reason="http request"): 1,
        sample("wsproxy_config_reloads_total", result="ok"): 1,
        sample("wsproxy_config_reloads_total", result="rejected"): 1,
    }
    if tls:
        expected[sample("wsproxy_tls_handshakes_total", listener=tlsListener, version="TLSv1.3")] = tlsConnections
    assert changes(before, after) == expected
    assert after["wsproxy_config_loaded_timestamp_seconds{}"] > before["wsproxy_config_loaded_timestamp_seconds{}"]


async def untilAsync(condition: Any, timeout: float) -> bool:
    """L{until} for a condition that must itself wait (a scrape)."""
    deadline = reactor.seconds() + timeout
    while not await condition():
        if reactor.seconds() >= deadline:
            return False
        await until(lambda: False, 0.05)
    return True


# Readiness and health


class HeldEndpoint:
    """A server endpoint still binding until L{bind} is called."""

    def __init__(self) -> None:
        self.binding: Deferred = Deferred()
        self.factory: Any = None

    def listen(self, factory: Any) -> Deferred:
        self.factory = factory
        return self.binding

    def bind(self) -> Any:
        port = reactor.listenTCP(0, self.factory, interface=LOOPBACK)
        self.binding.callback(port)
        return port


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_until_the_listeners_are_bound_and_healthz_is_200_throughout(cleanup):
    upstream, _ = listenScripted(ok())
    cleanup.port(upstream)
    document = {
        "upstream": {"app": {"servers": [f"{LOOPBACK}:{upstream.getHost().port}"]}},
        "server": [{"listen": LISTEN, "proxy_pass": "http://app", "access_log": False}],
        "metrics": METRICS,
    }
    held = HeldEndpoint()
    service = cleanup.service(ProxyService(parseConfig(document, source="(test)"), reactor, endpoints=[held]))
    service.startService()
    metricsPort = (await service.metricsService.listeningPort()).getHost().port

    async def get(path: bytes) -> bytes:
        response = await exchange(metricsPort, b"GET %b HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n" % path)
        assert response is not None
        return response

    assert status(await get(b"/readyz")) == 503
    assert (await get(b"/readyz")).endswith(b"\r\n\r\nnot ready\n")
    assert status(await get(b"/healthz")) == 200
    assert (await scrape(metricsPort))["wsproxy_ready{}"] == 0
    port = held.bind()
    assert status(await get(b"/readyz")) == 200
    assert (await get(b"/readyz")).endswith(b"\r\n\r\nready\n")
    assert (await scrape(metricsPort))["wsproxy_ready{}"] == 1
    assert status(await exchange(port.getHost().port, GET)) == 200


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_readyz_turns_503_as_the_drain_starts_and_the_listener_closes_after_it(cleanup, certificates, tls):
    held: list[Any] = []

    def answer(request: bytes, connection: Any) -> None:
        held.append(connection)

    upstream, _ = listenScripted(answer)
    cleanup.port(upstream)
    block = {"listen": LISTEN, "proxy_pass": "http://app", "access_log": False}
    document = {
        "upstream": {"app": {"servers": [f"{LOOPBACK}:{upstream.getHost().port}"]}},
        "server": [tlsBlock(certificates, **block) if tls else block],
        "shutdown_timeout": 30,
        "metrics": METRICS,
    }
    site = await startSite(cleanup, document, certificates[0])
    assert status(await site.get(b"/readyz")) == 200
    client = await site.connect(0, tls)
    client.transport.write(GET)
    assert await until(lambda: held, 10)

    stopping = site.service.stopService()
    stopped: list[object] = []
    stopping.addBoth(lambda result: stopped.append(result) or result)
    assert status(await site.get(b"/readyz")) == 503
    assert status(await site.get(b"/healthz")) == 200
    during = await site.scrape()
    assert during["wsproxy_ready{}"] == 0
    assert during[sample("wsproxy_client_connections_open", listener=f"{LISTEN}#0")] == 1
    assert not stopped

    held[0].transport.write(ok(b"late"))
    held[0].transport.loseConnection()
    assert (await client.waitClosed(10)).endswith(b"late")
    await stopping
    with pytest.raises(ConnectionRefusedError):
        await connectRaw(site.metricsPort)


# Other counters


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_connections_over_the_limit_are_counted_as_refused(cleanup, certificates, tls):
    upstream, _ = listenScripted(ok())
    cleanup.port(upstream)
    block = {"listen": LISTEN, "proxy_pass": "http://app", "access_log": False, "max_connections": 1}
    document = {
        "upstream": {"app": {"servers": [f"{LOOPBACK}:{upstream.getHost().port}"]}},
        "server": [tlsBlock(certificates, **block) if tls else block],
        "metrics": METRICS,
    }
    site = await startSite(cleanup, document, certificates[0])
    before = await site.scrape()
    first = await site.connect(0, tls)
    refused = await site.exchange(0, tls, GET)
    assert status(refused) == 503
    listener = f"{LISTEN}#0"
    handshakes = sample("wsproxy_tls_handshakes_total", listener=listener, version="TLSv1.3")
    after: dict[str, float] = {}

    async def bothHandshakesDone() -> bool:
        after.update(await site.scrape())
        return not tls or after.get(handshakes) == 2

    assert await untilAsync(bothHandshakesDone, 10)
    first.transport.loseConnection()
    expected = {
        sample("wsproxy_client_connections_refused_total", listener=listener): 1,
        sample("wsproxy_client_connections_open", listener=listener): 1,
    }
    if tls:
        expected[handshakes] = 2
    assert changes(before, after) == expected


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_timeouts_are_counted_by_kind(cleanup, certificates, tls):
    def answer(request: bytes, connection: Any) -> bytes | None:
        return switching() if b"Upgrade: websocket" in request else None

    upstream, _ = listenScripted(answer)
    cleanup.port(upstream)
    base = {"listen": LISTEN, "access_log": False}
    slowHeads = {**base, "proxy_pass": "http://app", "client_header_timeout": "1s"}
    quick = {
        **base,
        "proxy_pass": "http://app",
        "proxy_read_timeout": "300ms",
        "websocket_idle_timeout": "300ms",
        "client_body_timeout": "300ms",
    }
    if tls:
        slowHeads, quick = tlsBlock(certificates, **slowHeads), tlsBlock(certificates, **quick)
    document = {
        "upstream": {"app": {"servers": [f"{LOOPBACK}:{upstream.getHost().port}"]}},
        "server": [slowHeads, quick],
        "metrics": METRICS,
    }
    site = await startSite(cleanup, document, certificates[0])
    before = await site.scrape()

    assert status(await site.exchange(0, tls, b"GET / HTTP/1.1\r\nHost: loc")) == 408
    assert status(await site.exchange(1, tls, GET)) == 504
    stalled = b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nab"
    assert status(await site.exchange(1, tls, stalled)) == 408
    idle = await site.exchange(1, tls, upgradeRequest(b"/ws"))
    assert status(idle) == 101

    after = await site.scrape()
    listener0, listener1 = f"{LISTEN}#0", f"{LISTEN}#1"
    quickRoot = place(listener1, "/", "app", server="server[1]")
    expected = {
        sample("wsproxy_timeouts_total", kind="client_header"): 1,
        sample("wsproxy_timeouts_total", kind="proxy_read"): 1,
        sample("wsproxy_timeouts_total", kind="client_body"): 1,
        sample("wsproxy_timeouts_total", kind="websocket_idle"): 1,
        sample("wsproxy_requests_total", **place(listener0, "", "", server=""), status_class="4xx"): 1,
        sample("wsproxy_request_duration_seconds_count", **place(listener0, "", "", server="")): 1,
        sample("wsproxy_requests_total", **quickRoot, status_class="5xx"): 1,
        sample("wsproxy_requests_total", **quickRoot, status_class="4xx"): 1,
        sample("wsproxy_requests_total", **quickRoot, status_class="1xx"): 1,
        sample("wsproxy_request_duration_seconds_count", **quickRoot): 2,
        sample("wsproxy_upstream_response_head_seconds_count", **quickRoot): 1,
        sample("wsproxy_websocket_upgrades_total", **quickRoot, result="accepted"): 1,
        sample("wsproxy_tunnel_duration_seconds_count", **quickRoot): 1,
        sample("wsproxy_tunnel_bytes_total", **quickRoot, direction="client_to_upstream"): 0,
        sample("wsproxy_tunnel_bytes_total", **quickRoot, direction="upstream_to_client"): 0,
        sample("wsproxy_upstream_connect_attempts_total", upstream="app"): 3,
        sample("wsproxy_upstream_connect_seconds_count", upstream="app"): 3,
    }
    if tls:
        expected[sample("wsproxy_tls_handshakes_total", listener=listener0, version="TLSv1.3")] = 1
        expected[sample("wsproxy_tls_handshakes_total", listener=listener1, version="TLSv1.3")] = 3
    assert {key: value for key, value in expected.items() if value} == changes(before, after)


@pytest_twisted.ensureDeferred
async def test_a_tls_handshake_that_runs_out_of_time_is_a_failure_and_a_timeout(cleanup, certificates):
    upstream, _ = listenScripted(ok())
    cleanup.port(upstream)
    block = tlsBlock(certificates, listen=LISTEN, proxy_pass="http://app", ssl_handshake_timeout="300ms")
    document = {
        "upstream": {"app": {"servers": [f"{LOOPBACK}:{upstream.getHost().port}"]}},
        "server": [block],
        "metrics": METRICS,
    }
    site = await startSite(cleanup, document, certificates[0])
    before = await site.scrape()
    silent = await connectRaw(site.ports[0])
    assert await silent.waitClosed(10) == b""
    listener = f"{LISTEN}#0"
    assert changes(before, await site.scrape()) == {
        sample("wsproxy_tls_handshake_failures_total", listener=listener, reason="timeout"): 1,
        sample("wsproxy_timeouts_total", kind="ssl_handshake"): 1,
    }


@pytest_twisted.ensureDeferred
async def test_each_servers_state_health_and_load_are_read_at_scrape_time(cleanup):
    held: list[Any] = []
    upstream, _ = listenScripted(lambda request, connection: held.append(connection))
    cleanup.port(upstream)
    deadPort = closedPort()
    document = {
        "upstream": {
            "app": {"servers": [f"{LOOPBACK}:{upstream.getHost().port}"]},
            "dead": {"servers": [f"{LOOPBACK}:{deadPort}"], "fail_timeout": "1h"},
        },
        "server": [
            {
                "listen": LISTEN,
                "access_log": False,
                "location": [
                    {"match": "/", "proxy_pass": "http://app"},
                    {"match": "/dead/", "proxy_pass": "http://dead"},
                ],
            }
        ],
        "metrics": METRICS,
    }
    site = await startSite(cleanup, document)
    app = {"upstream": "app", "server": f"{LOOPBACK}:{upstream.getHost().port}"}
    dead = {"upstream": "dead", "server": f"{LOOPBACK}:{deadPort}"}
    client = await site.connect(0, False)
    client.transport.write(GET)
    assert await until(lambda: held, 10)
    assert status(await site.exchange(0, False, GET.replace(b"/", b"/dead/", 1))) == 502

    now = await site.scrape()
    assert now[sample("wsproxy_upstream_server_requests_open", **app)] == 1
    assert now[sample("wsproxy_upstream_server_healthy", **app)] == 1
    assert now[sample("wsproxy_upstream_server_state", **app, state="up")] == 1
    assert now[sample("wsproxy_upstream_server_healthy", **dead)] == 0
    states = {
        key: value for key, value in now.items() if key.startswith("wsproxy_upstream_server_state{") and "dead" in key
    }
    assert states == {
        sample("wsproxy_upstream_server_state", **dead, state=state): float(state == "down_by_failures")
        for state in ("up", "backup", "down_by_failures", "down_by_check", "draining", "down_by_config")
    }
    held[0].transport.write(ok())
    held[0].transport.loseConnection()
    await client.waitClosed(10)
    assert await until(lambda: site.service.pools["app"].servers[0].load.requests == 0, 10)
    assert (await site.scrape())[sample("wsproxy_upstream_server_requests_open", **app)] == 0


# Configuration


@pytest_twisted.ensureDeferred
async def test_without_a_metrics_table_nothing_is_recorded_or_served(cleanup):
    upstream, _ = listenScripted(ok())
    cleanup.port(upstream)
    document = {
        "upstream": {"app": {"servers": [f"{LOOPBACK}:{upstream.getHost().port}"]}},
        "server": [{"listen": LISTEN, "proxy_pass": "http://app", "access_log": False}],
    }
    service = cleanup.service(ProxyService(parseConfig(document, source="(test)"), reactor))
    service.startService()
    port = (await service.listeners[0].listeningPort()).getHost().port
    assert service.metrics is NO_METRICS and service.metricsService is None
    settings = service.listeners[0].proxyFactory.settings
    assert settings.metrics is NO_METRICS
    assert all(location.metrics is NO_METRICS for vhost in settings.vhosts for location in vhost.allLocations)
    assert service.pools["app"].metrics is NO_METRICS
    assert status(await exchange(port, GET)) == 200
    assert list(service) == service.listeners


@pytest_twisted.ensureDeferred
async def test_two_proxies_in_one_process_keep_their_own_metrics(cleanup):
    upstream, _ = listenScripted(ok())
    cleanup.port(upstream)
    document = {
        "upstream": {"app": {"servers": [f"{LOOPBACK}:{upstream.getHost().port}"]}},
        "server": [{"listen": LISTEN, "proxy_pass": "http://app", "access_log": False}],
        "metrics": METRICS,
    }
    first, second = await startSite(cleanup, document), await startSite(cleanup, document)
    assert status(await first.exchange(0, False, GET)) == 200
    requests = sample(
        "wsproxy_requests_total", **place(f"{LISTEN}#0", "/", "app", server="server[0]"), status_class="2xx"
    )
    assert (await first.scrape())[requests] == 1
    assert requests not in await second.scrape()


@pytest.mark.parametrize(
    "table, key, problem",
    [
        ({}, "metrics.listen", "required"),
        ({"listen": ""}, "metrics.listen", "required"),
        ({"listen": 9145}, "metrics.listen", "expected a string"),
        ({"listen": "tcp:9145", "path": "/m"}, "metrics.path", "unknown key"),
    ],
)
def test_a_bad_metrics_table_is_one_line_naming_its_key(table, key, problem):
    document = {"server": [{"listen": "tcp:8080", "proxy_pass": "http://127.0.0.1:9000"}], "metrics": table}
    with pytest.raises(ConfigError) as caught:
        parseConfig(document, source="wsproxy.toml")
    assert caught.value.key == key and problem in caught.value.problem
    assert str(caught.value).startswith(f"wsproxy.toml: {key}: ") and "\n" not in str(caught.value)


def test_metrics_and_workers_do_not_go_together_yet():
    document = {
        "server": [{"listen": "tcp:8080", "proxy_pass": "http://127.0.0.1:9000"}],
        "metrics": {"listen": "tcp:9145"},
        "workers": 2,
    }
    with pytest.raises(ConfigError, match=r"^wsproxy.toml: metrics: not available with workers > 1"):
        parseConfig(document, source="wsproxy.toml")


def test_a_metrics_listen_twisted_cannot_parse_is_a_config_error():
    document = {
        "server": [{"listen": LISTEN, "proxy_pass": "http://127.0.0.1:9000"}],
        "metrics": {"listen": "nonsense:9145"},
    }
    with pytest.raises(ConfigError, match=r"^\(test\): metrics.listen: 'nonsense:9145': "):
        ProxyService(parseConfig(document, source="(test)"), reactor)


@pytest_twisted.ensureDeferred
async def test_a_metrics_port_in_use_stops_the_start_in_one_line(cleanup):
    taken = cleanup.port(reactor.listenTCP(0, _Nobody(), interface=LOOPBACK))
    document = {
        "server": [{"listen": LISTEN, "proxy_pass": "http://127.0.0.1:9000"}],
        "metrics": {"listen": f"tcp:{taken.getHost().port}:interface={LOOPBACK}"},
    }
    service = ProxyService(parseConfig(document, source="(test)"), reactor)
    with pytest.raises(StartupError) as caught:
        service.privilegedStartService()
    assert str(caught.value) == (
        f"(test): metrics.listen: cannot listen on 'tcp:{taken.getHost().port}:interface={LOOPBACK}': "
        "address already in use"
    )
    assert all(listener.port is None for listener in service.listeners)


@pytest_twisted.ensureDeferred
async def test_changing_the_metrics_listener_needs_a_restart(cleanup, tmp_path):
    upstream, _ = listenScripted(ok())
    cleanup.port(upstream)
    document = {
        "upstream": {"app": {"servers": [f"{LOOPBACK}:{upstream.getHost().port}"]}},
        "server": [{"listen": LISTEN, "proxy_pass": "http://app", "access_log": False}],
        "metrics": METRICS,
    }
    site = await startSite(cleanup, document)
    for metrics in ({"listen": f"tcp:0:interface={LOOPBACK}:backlog=5"}, None):
        changed = {**document, "metrics": metrics} if metrics else {k: v for k, v in document.items() if k != "metrics"}
        with pytest.raises(
            ConfigError, match=r"^\(test\): metrics.listen: changing the metrics listener needs a restart"
        ):
            site.service.reload(parseConfig(changed, source="(test)"))
        path = tmp_path / "wsproxy.toml"
        path.write_text(toml(changed))
        assert reloadFrom(site.service, str(path)) is False
    assert (await site.scrape())[sample("wsproxy_config_reloads_total", result="rejected")] == 2


class _Nobody(Factory):
    """Holds a port."""

    noisy = False
    protocol = Protocol


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_to_the_metrics_listener_is_dropped(cleanup, monkeypatch):
    monkeypatch.setattr(metricsweb, "IDLE_TIMEOUT", 0.3)
    document = {
        "upstream": {"app": {"servers": [f"{LOOPBACK}:9"]}},
        "server": [{"listen": LISTEN, "proxy_pass": "http://app", "access_log": False}],
        "metrics": {"listen": LISTEN},
    }
    site = await startSite(cleanup, document)
    silent = await connectRaw(site.metricsPort)
    assert await silent.waitClosed(timeout=10) == b"", "a connection that sends nothing is closed"
