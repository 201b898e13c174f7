"""
Balancing over real sockets on loopback: a proxy in front of three scripted
upstream servers, for each policy the spread of 1,000 requests and of 300
long-lived tunnels, sticky sessions across a WebSocket upgrade that follows
long-polling requests, C{max_conns}, C{backup}, and the server counts that
must come back to 0 however an exchange or a tunnel ends.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from support import (
    LOOPBACK,
    ScriptedUpstream,
    ServerCertificate,
    connectRaw,
    connectTo,
    exchange,
    gather,
    ok,
    startProxy,
    switching,
    until,
    upgradeRequest,
)
from twisted.internet import reactor

from wsproxy import parseConfig


class Upstream:
    """A scripted server that answers requests with its name and grants upgrades; knows what it got."""

    def __init__(self, cleanup: Any, name: bytes, port: int = 0) -> None:
        self.name = name
        self.factory = ScriptedUpstream(self._answer, closeAfter=False)
        self.port = cleanup.port(reactor.listenTCP(port, self.factory, interface=LOOPBACK))
        self.number = self.port.getHost().port

    def _answer(self, request: bytes, connection: Any) -> bytes | None:
        if b"\r\nUpgrade: websocket" in request:
            return switching()
        return ok(self.name)

    @property
    def tunnels(self) -> int:
        return sum(1 for c in self.factory.connections if c.switched and c.transport.connected)

    async def restart(self, cleanup: Any) -> None:
        """Drop every connection and listen again on the same port."""
        await self.port.stopListening()
        for connection in self.factory.connections:
            connection.transport.abortConnection()
        self.factory.connections.clear()
        self.port = cleanup.port(reactor.listenTCP(self.number, self.factory, interface=LOOPBACK))


async def proxyOver(cleanup: Any, upstreams: list[Upstream], parameters: tuple[str, ...] = (), **table: Any) -> Any:
    servers = [f"{LOOPBACK}:{u.number} {p}".strip() for u, p in zip(upstreams, parameters or [""] * 3, strict=False)]
    return cleanup.service(await startProxy({"app": {"servers": servers, **table}}, {"proxy_pass": "http://app"}))


def three(cleanup: Any) -> list[Upstream]:
    return [Upstream(cleanup, name) for name in (b"A", b"B", b"C")]


def load(proxy: Any) -> list[tuple[int, int]]:
    return [(s.requests, s.tunnels) for s in proxy.pools["app"].snapshot()]


def idle(proxy: Any) -> bool:
    return all(counts == (0, 0) for counts in load(proxy))


async def keepAliveRequests(port: int, targets: list[bytes]) -> list[bytes]:
    """Send each request after the previous answer, on one connection; return the bodies."""
    client = await connectRaw(port)
    bodies = []
    for target in targets:
        before = len(client.received)
        client.transport.write(b"GET %b HTTP/1.1\r\nHost: h\r\n\r\n" % target)
        received = await client.waitFor(lambda r, b=before: 0 <= r.find(b"\r\n\r\n", b) < len(r) - 4)
        bodies.append(received[-1:])
    client.transport.loseConnection()
    return bodies


async def openTunnels(port: int, paths: list[bytes], certificate: ServerCertificate | None = None) -> list[Any]:
    clients = [await connectTo(port, certificate) for _ in paths]
    for client, path in zip(clients, paths, strict=True):
        client.transport.write(upgradeRequest(path))
    await gather(*(client.waitFor(b"\r\n\r\n") for client in clients))
    assert all(c.received.startswith(b"HTTP/1.1 101 ") for c in clients)
    return clients


async def closeAll(clients: list[Any]) -> None:
    for client in clients:
        client.transport.loseConnection()
    await gather(*(client.closed for client in clients))


POLICIES = {
    "round_robin": {},
    "least_conn": {"balance": "least_conn"},
    "random_two": {"balance": "random_two"},
    "hash": {"balance": "hash", "hash": "$arg_u"},
    "ip_hash": {"balance": "ip_hash"},
}


@pytest.mark.parametrize("policy", POLICIES)
@pytest_twisted.ensureDeferred
async def test_the_spread_of_1000_requests_and_300_tunnels(cleanup, policy, capsys):
    upstreams = three(cleanup)
    proxy = await proxyOver(cleanup, upstreams, ("weight=1", "weight=2", "weight=3"), **POLICIES[policy])
    port = proxy.ports[0]
    bodies = await keepAliveRequests(port, [b"/poll?u=%d" % i for i in range(1000)])
    requests = Counter(bodies)
    tunnels = await openTunnels(port, [b"/ws?u=%d" % i for i in range(300)])
    spread = +Counter({u.name: u.tunnels for u in upstreams})
    with capsys.disabled():
        print(
            f"\n{policy} (weights 1:2:3): 1,000 requests {dict(sorted(requests.items()))}; "
            f"300 tunnels {dict(sorted(spread.items()))}"
        )
    assert load(proxy) == [(0, spread[b"A"]), (0, spread[b"B"]), (0, spread[b"C"])]
    await closeAll(tunnels)
    assert await until(lambda: idle(proxy))
    assert sum(requests.values()) == 1000 and sum(spread.values()) == 300
    if policy == "ip_hash":
        # Every client is 127.0.0.1: one /24, one server.
        assert len(requests) == 1 and len(spread) == 1 and set(requests) == set(spread)
        return
    if policy in ("round_robin", "least_conn"):
        assert abs(requests[b"A"] - 167) <= 1 and abs(requests[b"B"] - 333) <= 1 and abs(requests[b"C"] - 500) <= 1
        assert all(abs(spread[name] - level) <= 2 for name, level in ((b"A", 50), (b"B", 100), (b"C", 150))), spread
    else:
        for name, share in ((b"A", 1 / 6), (b"B", 2 / 6), (b"C", 3 / 6)):
            assert abs(requests[name] / 1000 - share) < 0.12, requests
            assert abs(spread[name] / 300 - share) < 0.12, spread


@pytest_twisted.ensureDeferred
async def test_least_conn_sends_new_tunnels_to_a_restarted_server_until_level(cleanup):
    upstreams = three(cleanup)
    proxy = await proxyOver(cleanup, upstreams, balance="least_conn")
    port = proxy.ports[0]
    first = await openTunnels(port, [b"/ws"] * 300)
    assert [u.tunnels for u in upstreams] == [100, 100, 100]
    await upstreams[1].restart(cleanup)
    assert await until(lambda: load(proxy)[1] == (0, 0)), "the restarted server's tunnels ended"
    assert await until(lambda: sum(c.closed.called for c in first) == 100)
    second = await openTunnels(port, [b"/ws"] * 100)
    assert [u.tunnels for u in upstreams] == [100, 100, 100], "all 100 new tunnels went to the restarted server"
    third = await openTunnels(port, [b"/ws"] * 3)
    assert [u.tunnels for u in upstreams] == [101, 101, 101]
    await closeAll([c for c in first if not c.closed.called] + second + third)
    assert await until(lambda: idle(proxy))


def cookieOf(response: bytes) -> bytes | None:
    match = re.search(rb"\r\nSet-Cookie: srv=([0-9a-f]+); Path=/; HttpOnly\r\n", response)
    return match.group(1) if match else None


@pytest_twisted.ensureDeferred
async def test_a_sticky_cookie_holds_long_polling_and_the_upgrade_that_follows_on_one_server(cleanup):
    upstreams = three(cleanup)
    proxy = await proxyOver(cleanup, upstreams, sticky_cookie="srv")
    port = proxy.ports[0]
    polling = b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: h\r\nConnection: close\r\n%b\r\n"
    first = await exchange(port, polling % b"")
    served = first[-1:]
    cookie = cookieOf(first)
    assert cookie is not None and served.decode() not in cookie.decode()
    for _ in range(4):
        again = await exchange(port, polling % b"Cookie: a=1; srv=%b\r\n" % cookie)
        assert again[-1:] == served and cookieOf(again) is None, "pinned, and no new cookie"
    (tunnel,) = await openTunnels(port, [b"/socket.io/?EIO=4&transport=websocket"])
    assert cookieOf(tunnel.received) is not None, "the upgrade without the cookie is told one"
    before = {u.name: u.tunnels for u in upstreams}
    client = await connectRaw(port)
    client.transport.write(upgradeRequest(b"/socket.io/?EIO=4&transport=websocket", b"Cookie: srv=%b\r\n" % cookie))
    await client.waitFor(b"\r\n\r\n")
    assert client.received.startswith(b"HTTP/1.1 101 ") and cookieOf(client.received) is None
    grew = [u.name for u in upstreams if u.tunnels > before[u.name]]
    assert grew == [served], "the pinned upgrade reached the server that served the polling"
    await closeAll([tunnel, client])


@pytest_twisted.ensureDeferred
async def test_hash_on_a_query_argument_keeps_polling_and_upgrade_together(cleanup):
    upstreams = three(cleanup)
    proxy = await proxyOver(cleanup, upstreams, balance="hash", hash="$arg_sid")
    port = proxy.ports[0]
    where = {}
    for sid in (b"s1", b"s2", b"s3", b"s4", b"s5", b"s6"):
        bodies = await keepAliveRequests(port, [b"/socket.io/?EIO=4&transport=polling&sid=%b" % sid] * 3)
        assert len(set(bodies)) == 1
        where[sid] = bodies[0]
        before = [u.tunnels for u in upstreams]
        (tunnel,) = await openTunnels(port, [b"/socket.io/?EIO=4&transport=websocket&sid=%b" % sid])
        grew = [u.name for u, was in zip(upstreams, before, strict=True) if u.tunnels > was]
        assert grew == [where[sid]]
        await closeAll([tunnel])
    assert len(set(where.values())) > 1, "different sessions spread"


@pytest_twisted.ensureDeferred
async def test_max_conns_backup_and_down_over_real_sockets(cleanup):
    main, spare, off = three(cleanup)
    proxy = await proxyOver(cleanup, [main, spare, off], ("max_conns=2", "backup max_conns=1", "down"))
    port = proxy.ports[0]
    held = await openTunnels(port, [b"/ws"] * 3)
    assert (main.tunnels, spare.tunnels, off.tunnels) == (2, 1, 0), "the backup took the one past max_conns"
    refused = await exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"connection limit" in refused
    await closeAll(held[:1])
    assert await until(lambda: load(proxy)[0] == (0, 1))
    served = await exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert served.endswith(b"A") and not off.factory.requests
    await closeAll(held[1:])
    assert await until(lambda: idle(proxy))


GET = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("kind", ["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_counts_return_to_zero_however_an_exchange_or_a_tunnel_ends(cleanup, kind, tmp_path):
    behaviour = {"mode": "ok"}

    def answer(request: bytes, connection: Any) -> bytes | None:
        mode = behaviour["mode"]
        if b"\r\nUpgrade: websocket" in request:
            return switching()
        if mode == "ok":
            return ok(b"fine")
        if mode == "garbage":
            return b"NOT HTTP\r\n\r\n"
        if mode == "partial":
            connection.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
            connection.transport.loseConnection()  # mid-body: the response is cut
            return None
        return None  # silent

    factory = ScriptedUpstream(answer, closeAfter=False)
    port = cleanup.port(reactor.listenTCP(0, factory, interface=LOOPBACK))
    servers = [f"{LOOPBACK}:{port.getHost().port}"]
    certificate = ServerCertificate(tmp_path) if kind == "tls" else None
    block = {"proxy_pass": "http://app", **(certificate.block if certificate is not None else {})}
    proxy = cleanup.service(await startProxy({"app": {"servers": servers}}, block))
    listener = proxy.ports[0]

    async def exchange(port: int, data: bytes) -> bytes:
        """Send C{data}; everything the proxy sent before it closed."""
        client = await connectTo(port, certificate)
        client.transport.write(data)
        received = await client.waitClosed()
        assert received is not None, "the proxy did not close"
        return received

    assert (await exchange(listener, GET)).endswith(b"fine")
    assert await until(lambda: idle(proxy)), "a normal end"
    behaviour["mode"] = "garbage"
    assert (await exchange(listener, GET)).startswith(b"HTTP/1.1 502 ")
    assert await until(lambda: idle(proxy)), "an error"
    behaviour["mode"] = "partial"
    truncated = await exchange(listener, GET)
    assert truncated.endswith(b"abc")
    assert await until(lambda: idle(proxy)), "an upstream abort mid-response"
    behaviour["mode"] = "silent"
    client = await connectTo(listener, certificate)
    client.transport.write(GET)
    assert await until(lambda: load(proxy) == [(1, 0)]), "held while the request is open"
    client.transport.abortConnection()
    assert await until(lambda: idle(proxy)), "a client abort"

    for closer in ("client", "upstream"):
        (tunnel,) = await openTunnels(listener, [b"/ws"], certificate)
        assert load(proxy) == [(0, 1)]
        if closer == "client":
            tunnel.transport.loseConnection()
        else:
            next(c for c in factory.connections if c.switched and c.transport.connected).transport.loseConnection()
        await tunnel.closed
        assert await until(lambda: idle(proxy)), f"a tunnel closed by the {closer}"


@pytest_twisted.ensureDeferred
async def test_a_reload_that_changes_the_upstream_keeps_the_counts_of_the_servers_that_stay(cleanup):
    a, b, c = three(cleanup)
    proxy = await proxyOver(cleanup, [a, b], balance="least_conn")
    tunnels = await openTunnels(proxy.ports[0], [b"/ws"] * 2)
    old = proxy.pools["app"]
    servers = [f"{LOOPBACK}:{a.number} weight=2", f"{LOOPBACK}:{c.number}"]
    block = {"listen": proxy.config.servers[0].listen, "proxy_pass": "http://app", "access_log": False}
    proxy.reload(parseConfig({"upstream": {"app": {"servers": servers}}, "server": [block]}, source="(test)"))
    new = proxy.pools["app"]
    assert new is not old and old.retired
    assert [(s.address, s.tunnels, s.state.value) for s in new.snapshot()] == [
        (f"{LOOPBACK}:{a.number}", 1, "up"),
        (f"{LOOPBACK}:{c.number}", 0, "up"),
    ]
    assert old.snapshot()[1].state.value == "draining"
    await closeAll(tunnels)
    assert await until(lambda: idle(proxy) and all(s.tunnels == 0 for s in old.snapshot()))
