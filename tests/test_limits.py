"""
Limits and timeouts on a real listener: each is configurable, each answers
with a clear status or closes, and none disturbs what it should not.
"""

from __future__ import annotations

import pytest_twisted
from support import (
    connectRaw,
    exchange,
    listenScripted,
    ok,
    sleep,
    startProxyFor,
    stillAfter,
    switching,
    until,
    upgradeRequest,
)


@pytest_twisted.ensureDeferred
async def test_request_line_and_header_section_limits(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(
        cleanup, upstream.getHost().port, max_request_line=100, max_header_size=300, max_headers=5
    )
    port = proxy.ports[0]
    longLine = await exchange(port, b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert longLine.startswith(b"HTTP/1.1 414 ")
    bigHeaders = await exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 400 + b"\r\n\r\n")
    assert bigHeaders.startswith(b"HTTP/1.1 431 ")
    many = await exchange(
        port, b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(6)) + b"\r\n"
    )
    assert many.startswith(b"HTTP/1.1 431 ")
    assert factory.requests == []


@pytest_twisted.ensureDeferred
async def test_a_header_section_without_end_is_refused_once_past_the_limit(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, max_request_line=100, max_header_size=300)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\n")
    for _ in range(40):
        client.transport.write(b"X-Trickle: 0123456789\r\n")
    received = await client.waitClosed()
    assert received.startswith(b"HTTP/1.1 431 ")


@pytest_twisted.ensureDeferred
async def test_request_body_size_limit(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, client_max_body_size=10)
    declared = await exchange(proxy.ports[0], b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world")
    assert declared.startswith(b"HTTP/1.1 413 ")
    chunked = await exchange(
        proxy.ports[0],
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n",
    )
    assert chunked.startswith(b"HTTP/1.1 413 ")
    fits = await exchange(
        proxy.ports[0], b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    assert fits.startswith(b"HTTP/1.1 200 ")


@pytest_twisted.ensureDeferred
async def test_a_slowloris_client_is_closed_after_client_header_timeout(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, client_header_timeout=0.3)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(b"GET / HTTP/1.1\r\n")
    for _ in range(3):
        await sleep(0.1)
        client.transport.write(b"X-A: b\r\n")
    received = await client.waitClosed(timeout=2)
    assert received is not None and received.startswith(b"HTTP/1.1 408 ")
    silent = await connectRaw(proxy.ports[0])
    assert await silent.waitClosed(timeout=2) == b""
    assert factory.requests == []


@pytest_twisted.ensureDeferred
async def test_idle_keep_alive_connections_are_closed_after_keepalive_timeout(cleanup):
    upstream, _ = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, keepalive_timeout=0.3)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await client.waitFor(b"hello")
    received = await client.waitClosed(timeout=2)
    assert received is not None and received.endswith(b"hello")


@pytest_twisted.ensureDeferred
async def test_connection_limits_answer_503_without_touching_open_tunnels(cleanup):
    upstream, _ = listenScripted(switching(), closeAfter=False)
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, max_connections=2)
    tunnels = []
    for _ in range(2):
        client = await connectRaw(proxy.ports[0])
        client.transport.write(upgradeRequest())
        await client.waitFor(b"\r\n\r\n")
        tunnels.append(client)
    refused = await exchange(proxy.ports[0], b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert not any(t.closed.called for t in tunnels)
    tunnels[0].transport.loseConnection()
    await tunnels[0].closed
    factory = proxy.listeners[0].proxyFactory
    assert await until(lambda: len(factory.connections) == 1), "the proxy has let the closed tunnel go"
    client = await connectRaw(proxy.ports[0])
    client.transport.write(upgradeRequest())
    assert (await client.waitFor(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    for t in (tunnels[1], client):
        t.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_per_address_connection_limit(cleanup):
    upstream, _ = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, max_connections_per_ip=1)
    first = await connectRaw(proxy.ports[0])
    factory = proxy.listeners[0].proxyFactory
    assert await until(lambda: len(factory.connections) == 1), "the proxy has accepted the first connection"
    refused = await exchange(proxy.ports[0], b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 503 ")
    first.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_upgrades_from_origins_not_allowed_get_403_before_any_upstream(cleanup):
    upstream, factory = listenScripted(switching(), closeAfter=False)
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, allowed_origins=["https://good.example"])
    bad = await exchange(proxy.ports[0], upgradeRequest(extra=b"Origin: https://evil.example\r\n"))
    assert bad.startswith(b"HTTP/1.1 403 ")
    missing = await exchange(proxy.ports[0], upgradeRequest())
    assert missing.startswith(b"HTTP/1.1 403 ")
    assert factory.requests == []
    client = await connectRaw(proxy.ports[0])
    client.transport.write(upgradeRequest(extra=b"Origin: https://GOOD.example\r\n"))
    assert (await client.waitFor(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_upgrades_other_than_websocket_are_not_forwarded(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    response = await exchange(
        proxy.ports[0],
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings, close\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    sent = factory.requests[0].lower()
    assert b"upgrade" not in sent and b"http2-settings" not in sent
    assert response.startswith(b"HTTP/1.1 200 ")


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_stalls_mid_body_is_cut_after_proxy_read_timeout(cleanup):
    upstream, _ = listenScripted(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart", closeAfter=False)
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, proxy_read_timeout=0.3)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    received = await client.waitClosed(timeout=3)
    assert received is not None, "the client must not wait forever"
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"part")


@pytest_twisted.ensureDeferred
async def test_a_request_body_that_stops_arriving_is_408_after_client_body_timeout(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, client_body_timeout=0.3)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    received = await client.waitClosed(timeout=3)
    assert received is not None and received.startswith(b"HTTP/1.1 408 ")
    assert factory.requests == [], "the upstream never saw a complete request"


@pytest_twisted.ensureDeferred
async def test_slow_but_steady_transfers_outlast_the_timeouts(cleanup):
    from twisted.internet import reactor

    def answer(request, connection):
        connection.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for i, piece in enumerate((b"ab", b"cd", b"ef")):
            reactor.callLater(0.15 * (i + 1), connection.transport.write, piece)

    upstream, factory = listenScripted(answer, closeAfter=False)
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, proxy_read_timeout=0.25, client_body_timeout=0.25)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
    for piece in (b"w", b"x", b"y", b"z"):
        await sleep(0.15)
        client.transport.write(piece)
    received = await client.waitClosed(timeout=3)
    assert received is not None and received.endswith(b"\r\n\r\nabcdef")
    assert factory.requests[0].endswith(b"\r\n\r\nwxyz")


@pytest_twisted.ensureDeferred
async def test_a_client_that_reads_slowly_is_not_taken_for_a_stalled_upstream(cleanup):
    body = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    upstream, _ = listenScripted(ok(body), closeAfter=False)
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, proxy_read_timeout=0.3)
    client = await connectRaw(proxy.ports[0])
    client.transport.pauseProducing()
    client.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    factory = proxy.listeners[0].proxyFactory
    assert await until(lambda: factory.connections), "the proxy has the connection"
    # The client reads nothing for 1 s, more than proxy_read_timeout: the
    # proxy must keep the connection.
    assert await stillAfter(1.0, lambda: factory.connections), "a slow reader is not a stalled upstream"
    client.transport.resumeProducing()
    received = await client.waitClosed(timeout=20)
    assert received is not None and received.endswith(body[-1000:])
    assert len(received.split(b"\r\n\r\n", 1)[1]) == len(body)
