"""
Active health checks: the state machine of one server's checks on a
L{Clock} (thresholds, timing, a check that never answers, stopping), then
real HTTP and WebSocket checks against real upstream servers on loopback,
through a running proxy: what marks a server down, what brings it back,
and that a server down by its checks gets no new request while its open
tunnel runs on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
import trustme
from support import (
    KEY,
    LOOPBACK,
    ScriptedConnection,
    ScriptedUpstream,
    connectRaw,
    exchange,
    listenEcho,
    listenScripted,
    ok,
    startProxy,
    stillAfter,
    switching,
    until,
    upgradeRequest,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from wsproxy import parseConfig
from wsproxy.config import ConfigError, HealthCheck, Upstream, UpstreamAddress
from wsproxy.health import PoolHealth, WebSocketProbe, carryHealth, readFrame
from wsproxy.http import websocketAccept
from wsproxy.upstream import UpstreamPool

GET_CLOSE = b"GET /path HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"


# The state machine, on a Clock.


class ScriptedProbe:
    """A probe whose every check the test answers: C{calls} holds the pending ones."""

    def __init__(self) -> None:
        self.calls: list[Deferred] = []
        self.cancelled = 0

    def __call__(self, server) -> Deferred:
        def cancel(_: Deferred) -> None:
            self.cancelled += 1

        d = Deferred(cancel)
        self.calls.append(d)
        return d

    def answer(self, passed: bool) -> None:
        d = self.calls[-1]
        if passed:
            d.callback(None)
        else:
            d.errback(Exception("status 500"))


def clockedPool(check: HealthCheck, *ports: int) -> tuple[Clock, UpstreamPool, ScriptedProbe, PoolHealth]:
    clock = Clock()
    upstream = Upstream("app", tuple(UpstreamAddress(LOOPBACK, p) for p in ports or (1,)), health_check=check)
    pool = UpstreamPool(upstream, clock)
    probe = ScriptedProbe()
    health = PoolHealth(pool, clock, probe)
    health.startService()
    return clock, pool, probe, health


def test_fails_in_a_row_mark_down_and_passes_in_a_row_bring_back():
    clock, pool, probe, health = clockedPool(HealthCheck(interval=5, timeout=2, fails=3, passes=2))
    server = pool.servers[0]
    for second in range(3):
        assert len(probe.calls) == second + 1, "one check per interval, the first at once"
        assert not server.checkDown
        probe.answer(False)
        clock.advance(5)
    assert server.checkDown
    probe.answer(True)
    assert server.checkDown, "one pass of two"
    clock.advance(5)
    probe.answer(True)
    assert not server.checkDown
    health.stopService()


def test_a_pass_between_failures_starts_the_count_again():
    clock, pool, probe, health = clockedPool(HealthCheck(interval=1, timeout=1, fails=2, passes=1))
    for passed in (False, True, False, True, False):
        probe.answer(passed)
        clock.advance(1)
    assert not pool.servers[0].checkDown
    probe.answer(False)
    assert pool.servers[0].checkDown
    health.stopService()


def test_no_check_between_intervals():
    clock, pool, probe, health = clockedPool(HealthCheck(interval=5, timeout=2))
    probe.answer(True)
    clock.advance(4.9)
    assert len(probe.calls) == 1
    clock.advance(0.1)
    assert len(probe.calls) == 2
    health.stopService()


def test_a_check_that_never_answers_fails_at_the_timeout():
    clock, pool, probe, health = clockedPool(HealthCheck(interval=5, timeout=2, fails=1))
    clock.advance(1.9)
    assert not pool.servers[0].checkDown
    clock.advance(0.1)
    assert pool.servers[0].checkDown
    assert probe.cancelled == 1
    health.stopService()


def test_stopping_abandons_the_check_under_way_without_a_verdict():
    clock, pool, probe, health = clockedPool(HealthCheck(interval=5, timeout=2, fails=1))
    health.stopService()
    assert probe.cancelled == 1
    clock.advance(20)
    assert len(probe.calls) == 1
    assert not pool.servers[0].checkDown
    assert not clock.getDelayedCalls()


def test_each_server_has_its_own_checks():
    clock, pool, probe, health = clockedPool(HealthCheck(interval=5, timeout=2, fails=1), 1, 2)
    assert len(probe.calls) == 2
    probe.calls[0].errback(Exception("refused"))
    probe.calls[1].callback(None)
    assert [s.checkDown for s in pool.servers] == [True, False]
    health.stopService()


def test_servers_that_join_are_checked_and_retired_ones_are_not():
    clock = Clock()
    template = UpstreamAddress("app.test", 80, resolve=True)
    pool = UpstreamPool(Upstream("app", (template,), health_check=HealthCheck(interval=5, timeout=2)), clock)
    probe = ScriptedProbe()
    health = PoolHealth(pool, clock, probe)
    health.startService()
    assert probe.calls == [], "a name not resolved yet is not checked"
    pool.updateResolved(template, ["10.0.0.1", "10.0.0.2"])
    health.sync()
    assert len(probe.calls) == 2
    pool.updateResolved(template, ["10.0.0.2"])
    health.sync()
    assert [str(s.address) for s in health.checks] == ["10.0.0.2:80"]
    assert probe.cancelled == 1
    health.stopService()


def test_marked_down_takes_the_server_out_of_rotation_and_up_puts_it_back():
    clock = Clock()
    pool = UpstreamPool(Upstream("app", (UpstreamAddress(LOOPBACK, 1), UpstreamAddress(LOOPBACK, 2))), clock)
    first, second = pool.servers
    pool.markChecked(first, False, "status 500")
    assert [pool.pickOrder() for _ in range(2)] == [[second], [second]]
    pool.markChecked(first, True, "passed")
    assert first in pool.pickOrder()


def test_a_reload_keeps_the_verdicts_of_servers_that_stay():
    check = HealthCheck(interval=5, timeout=2)
    a, b = UpstreamAddress(LOOPBACK, 1), UpstreamAddress(LOOPBACK, 2)
    old = UpstreamPool(Upstream("app", (a, b), health_check=check), Clock())
    old.markChecked(old.servers[0], False, "status 500")
    new = UpstreamPool(Upstream("app", (b, a), health_check=HealthCheck(interval=1, timeout=1)), Clock())
    carryHealth(old, new)
    assert {str(s.address): s.checkDown for s in new.servers} == {str(a): True, str(b): False}
    unchecked = UpstreamPool(Upstream("app", (a,)), Clock())
    carryHealth(old, unchecked)
    assert not unchecked.servers[0].checkDown, "without checks nothing could bring it back"


# Configuration.


def upstreamOf(table: dict) -> Upstream:
    document = {"upstream": {"app": table}, "server": [{"listen": "tcp:0", "proxy_pass": "http://app"}]}
    return parseConfig(document, "(test)").upstreams["app"]


def test_health_check_table():
    upstream = upstreamOf(
        {
            "servers": ["127.0.0.1:80"],
            "health_check": {"websocket": "/ws", "interval": "500ms", "fails": 3, "passes": 2},
        }
    )
    assert upstream.health_check == HealthCheck("websocket", "/ws", 0.5, 0.5, 3, 2, ())
    plain = upstreamOf({"servers": ["127.0.0.1:80"], "health_check": {"status": [200, 204]}})
    assert plain.health_check == HealthCheck("http", "/", 5.0, 2.0, 1, 1, (200, 204))


@pytest.mark.parametrize(
    "check, key, words",
    [
        ({"uri": "/a", "websocket": "/b"}, "websocket", "not both"),
        ({"uri": "healthz"}, "uri", "expected a path"),
        ({"interval": "1s", "timeout": "2s"}, "timeout", "at most the interval"),
        ({"fails": 0}, "fails", "at least 1"),
        ({"status": [200, 700]}, "status", "100-599"),
        ({"websocket": "/ws", "status": [200]}, "status", "expects 101"),
        ({"expect": 200}, "expect", "unknown key"),
    ],
)
def test_bad_health_check_names_its_key(check, key, words):
    with pytest.raises(ConfigError) as raised:
        upstreamOf({"servers": ["127.0.0.1:80"], "health_check": check})
    assert raised.value.key == f"upstream.app.health_check.{key}"
    assert words in raised.value.problem


# Real checks, through a running proxy.


@pytest.fixture
def changes():
    """The lines wsproxy.upstream logs while the test runs (each change of a server's state)."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "wsproxy.upstream":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


INTERVAL = 0.2


def checked(port: int, fails: int = 2, passes: int = 2, **check) -> dict:
    table = {"interval": INTERVAL, "timeout": INTERVAL / 2, "fails": fails, "passes": passes, **check}
    return {"app": {"servers": [f"{LOOPBACK}:{port}"], "health_check": table}}


async def proxyChecking(cleanup, upstreams: dict):
    return cleanup.service(await startProxy(upstreams, {"proxy_pass": "http://app"}))


async def markedDownInTime(proxy, fails: int = 2) -> float:
    """Wait for the first server to be marked down; return how long it took."""
    server = proxy.pools["app"].servers[0]
    started = reactor.seconds()
    assert await until(lambda: server.checkDown, timeout=INTERVAL * fails + 2)
    return reactor.seconds() - started


# The slack a loaded 2-core machine needs beyond interval x fails.
SLACK = 0.3


class Silent(Protocol):
    """Accepts, then says nothing."""


def listenSilent():
    return reactor.listenTCP(0, Factory.forProtocol(Silent), interface=LOOPBACK)


def acceptingUpgrades(request: bytes, connection) -> bytes:
    key = re.search(rb"Sec-WebSocket-Key: (\S+)", request).group(1)
    return switching(key)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "answer, check, why",
    [
        (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n", {"uri": "/healthz"}, "status 500"),
        (ok(), {"uri": "/healthz", "status": [204]}, "status 200"),
        (ok(), {"websocket": "/ws"}, "upgrade refused: status 200"),
        (switching(KEY), {"websocket": "/ws"}, "wrong Sec-WebSocket-Accept"),
        (acceptingUpgrades, {"websocket": "/ws"}, "no answer within 0.1s"),
    ],
    ids=["http-500", "unexpected-status", "upgrade-refused", "wrong-accept", "no-pong"],
)
async def test_a_failing_server_is_marked_down_within_interval_times_fails(cleanup, changes, answer, check, why):
    port, factory = listenScripted(answer)
    cleanup.port(port)
    proxy = await proxyChecking(cleanup, checked(port.getHost().port, **check))
    took = await markedDownInTime(proxy)
    assert took <= INTERVAL * 2 + SLACK
    address = f"127.0.0.1:{port.getHost().port}"
    assert changes == [
        f"upstream app server {address}: up -> down by check (health check: {why} (2 failed checks in a row))"
    ]
    assert factory.requests, "the check reached the server"
    head = factory.requests[0]
    assert head.startswith(b"GET %b HTTP/1.1\r\n" % (check.get("uri") or check["websocket"]).encode())
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % port.getHost().port in head


@pytest_twisted.ensureDeferred
async def test_accepted_then_silence_is_a_failure_at_the_timeout(cleanup, changes):
    port = cleanup.port(listenSilent())
    proxy = await proxyChecking(cleanup, checked(port.getHost().port, uri="/"))
    assert await markedDownInTime(proxy) <= INTERVAL * 2 + SLACK
    assert "no answer within 0.1s" in changes[0]


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_is_a_failure(cleanup, changes):
    port = listenSilent()
    number = port.getHost().port
    await port.stopListening()
    proxy = await proxyChecking(cleanup, checked(number, uri="/"))
    assert await markedDownInTime(proxy) <= INTERVAL * 2 + SLACK
    assert "refused" in changes[0]


@pytest_twisted.ensureDeferred
async def test_back_up_after_passes(cleanup, changes):
    health = {"status": 500}
    port, _ = listenScripted(
        lambda request, connection: b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % health["status"]
    )
    cleanup.port(port)
    proxy = await proxyChecking(cleanup, checked(port.getHost().port, passes=3, uri="/healthz"))
    await markedDownInTime(proxy)
    server = proxy.pools["app"].servers[0]
    health["status"] = 200
    started = reactor.seconds()
    assert await until(lambda: not server.checkDown, timeout=INTERVAL * 3 + 2)
    assert reactor.seconds() - started <= INTERVAL * 3 + SLACK
    assert reactor.seconds() - started >= INTERVAL * 2 - 0.05, "three passes, one interval apart"
    assert len(changes) == 2
    assert changes[1].endswith(": down by check -> up (health check: passed 3 checks in a row)")


@pytest_twisted.ensureDeferred
async def test_a_healthy_websocket_upstream_stays_up(cleanup):
    echo = cleanup.port(listenEcho())
    proxy = await proxyChecking(cleanup, checked(echo.getHost().port, fails=1, websocket="/ws"))
    (check,) = proxy.monitors["app"][0].checks.values()
    server = proxy.pools["app"].servers[0]
    assert await stillAfter(INTERVAL * 5, lambda: not server.checkDown)
    assert check.passes >= 3, "the checks ran and passed"


@pytest_twisted.ensureDeferred
async def test_a_server_down_by_its_checks_gets_no_new_request_and_keeps_its_tunnel(cleanup):
    health = {"a": 200}

    def answerA(request: bytes, connection) -> bytes:
        if request.startswith(b"GET /healthz "):
            return b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % health["a"]
        if b"Upgrade: websocket" in request:
            return switching(KEY)
        return ok(b"A")

    portA, factoryA = listenScripted(answerA)
    portB, factoryB = listenScripted(lambda request, connection: ok(b"B"))
    cleanup.port(portA), cleanup.port(portB)
    table = {"uri": "/healthz", "interval": INTERVAL, "timeout": INTERVAL / 2, "fails": 1}
    upstreams = {"app": {"servers": [f"{LOOPBACK}:{p.getHost().port}" for p in (portA, portB)], "health_check": table}}
    proxy = await proxyChecking(cleanup, upstreams)
    tunnel = cleanup.transport((client := await connectRaw(proxy.ports[0])).transport)
    client.transport.write(upgradeRequest())
    assert (await client.waitFor(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    (upstreamSide,) = [c for c in factoryA.connections if c.switched]

    health["a"] = 500
    assert await markedDownInTime(proxy, fails=1) <= INTERVAL + SLACK
    responses = [await exchange(proxy.ports[0], GET_CLOSE) for _ in range(4)]
    assert all(response.endswith(b"B") for response in responses)
    assert not [r for r in factoryA.requests if r.startswith(b"GET /path ")]

    tunnel.write(b"still here")
    assert await until(lambda: b"still here" in upstreamSide.received)
    upstreamSide.transport.write(b"and here")
    assert (await client.waitFor(b"and here")).endswith(b"and here")
    assert not client.closed.called


@pytest_twisted.ensureDeferred
async def test_every_server_down_is_a_502(cleanup):
    port, factory = listenScripted(b"HTTP/1.1 500 X\r\nContent-Length: 0\r\n\r\n")
    cleanup.port(port)
    proxy = await proxyChecking(cleanup, checked(port.getHost().port, fails=1, uri="/healthz"))
    await markedDownInTime(proxy, fails=1)
    response = await exchange(proxy.ports[0], GET_CLOSE)
    assert response.startswith(b"HTTP/1.1 502 ")
    assert not [r for r in factory.requests if r.startswith(b"GET /path ")]


@pytest_twisted.ensureDeferred
async def test_checks_stop_with_the_service_and_move_to_the_new_pool_on_reload(cleanup):
    port, factory = listenScripted(b"HTTP/1.1 500 X\r\nContent-Length: 0\r\n\r\n")
    cleanup.port(port)
    proxy = await proxyChecking(cleanup, checked(port.getHost().port, fails=1, uri="/healthz"))
    await markedDownInTime(proxy, fails=1)
    old = proxy.monitors["app"][0]
    block = {"listen": proxy.config.servers[0].listen, "proxy_pass": "http://app", "access_log": False}
    upstreams = checked(port.getHost().port, fails=1, uri="/other")
    config = parseConfig({"upstream": upstreams, "server": [block], "shutdown_timeout": 1}, "(test)")
    proxy.reload(config)
    assert not old.running and not old.checks
    new = proxy.monitors["app"][0]
    assert new.running and new.pool is proxy.pools["app"]
    assert proxy.pools["app"].servers[0].checkDown, "the verdict stays"
    assert await until(lambda: any(r.startswith(b"GET /other ") for r in factory.requests))
    await proxy.stopService()
    assert not new.running and not new.checks


# The frames of a WebSocket check.


def test_server_frames_are_read_whole_or_not_at_all():
    pong = bytes((0x8A, 3)) + b"abc"
    assert readFrame(pong + b"x") == (0xA, b"abc", b"x")
    assert readFrame(pong[:3]) is None
    assert readFrame(bytes((0x82, 126, 0, 200)) + b"y" * 200) == (0x2, b"y" * 200, b"")
    assert readFrame(bytes((0x8A, 0x83)) + b"mask" + b"abc") == "the server masked a frame"


def test_a_websocket_probe_sends_a_valid_upgrade_and_a_masked_ping():
    from twisted.internet.testing import StringTransport

    probe = WebSocketProbe(b"app.test", "/ws")
    transport = StringTransport()
    probe.makeConnection(transport)
    request = transport.value()
    assert b"Sec-WebSocket-Key: %b\r\n" % probe.key in request
    transport.clear()
    probe.dataReceived(switching(probe.key))
    ping = transport.value()
    assert ping[0] == 0x89 and ping[1] == 0x80 | 8, "a final, masked ping"
    unmasked = bytes(b ^ ping[2 + i % 4] for i, b in enumerate(ping[6:]))
    assert unmasked == probe.ping
    assert websocketAccept(probe.key) in switching(probe.key)


class PongWithoutClose(ScriptedConnection):
    """Answers the ping, then never answers the close."""

    def dataReceived(self, data: bytes) -> None:
        if self.switched and data[:1] == b"\x89":
            mask, payload = data[2:6], data[6:14]
            self.transport.write(bytes((0x8A, 8)) + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
            return
        super().dataReceived(data)


@pytest_twisted.ensureDeferred
async def test_a_close_that_is_never_answered_is_a_failure(cleanup, changes):
    factory = ScriptedUpstream(acceptingUpgrades)
    factory.connectionClass = PongWithoutClose
    port = cleanup.port(reactor.listenTCP(0, factory, interface=LOOPBACK))
    proxy = await proxyChecking(cleanup, checked(port.getHost().port, websocket="/ws"))
    assert await markedDownInTime(proxy) <= INTERVAL * 2 + SLACK
    assert "no answer within 0.1s" in changes[0]
    pongs = [c for c in factory.connections if c.switched and c.received.count(b"\x88")]
    assert pongs, "the ping was answered and the close sent"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name, passes", [("app.internal", True), ("other.internal", False)])
async def test_checks_use_the_upstreams_tls_settings(cleanup, tmp_path, changes, name, passes):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf = ca.issue_cert("app.internal")
    options = PrivateCertificate.loadPEM(leaf.private_key_and_cert_chain_pem.bytes()).options()
    factory = ScriptedUpstream(lambda request, connection: ok())
    port = cleanup.port(reactor.listenSSL(0, factory, options, interface=LOOPBACK)).getHost().port
    table = {"uri": "/healthz", "interval": INTERVAL, "timeout": INTERVAL / 2, "fails": 1}
    upstreams = {
        "app": {
            "servers": [f"https://{LOOPBACK}:{port}"],
            "proxy_ssl_trusted_certificate": str(tmp_path / "ca.pem"),
            "proxy_ssl_name": name,
            "health_check": table,
        }
    }
    proxy = await proxyChecking(cleanup, upstreams)
    server = proxy.pools["app"].servers[0]
    if passes:
        assert await until(lambda: len(factory.requests) >= 2)
        assert not server.checkDown
        assert factory.requests[0].startswith(b"GET /healthz HTTP/1.1\r\nHost: app.internal:%d\r\n" % port)
    else:
        await markedDownInTime(proxy, fails=1)
        assert "TLS certificate verification failed" in changes[0]
        assert not factory.requests


def test_checks_load_no_websocket_library():
    code = "import sys, wsproxy.listeners; print(sorted(m for m in sys.modules if m.startswith('autobahn')))"
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)
    assert result.stdout.strip() == "[]"
