"""
Proxying ordinary HTTP requests through a real listener to real upstream
servers on loopback: round-robin, failover, errors, header rewriting,
body framing in both directions, keep-alive and pipelining.
"""

from __future__ import annotations

import re

import pytest_twisted
from support import connectRaw, exchange, listenScripted, ok, proxyTo, sleep, startProxy, startProxyFor, until
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

GET = b"GET /path?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n"
GET_CLOSE = b"GET /path?q=1 HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"


def headers(response: bytes) -> dict[bytes, bytes]:
    head = response.split(b"\r\n\r\n", 1)[0]
    return {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]}


def dechunk(body: bytes) -> bytes | None:
    """The payload of a complete chunked body, or None if it is not complete."""
    payload = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        size = int(size.split(b";")[0], 16)
        if size == 0:
            return payload if body == b"\r\n" else None
        payload, body = payload + body[:size], body[size + 2 :]


@pytest_twisted.ensureDeferred
async def test_round_robin_across_two_upstreams(cleanup):
    portA, _ = listenScripted(ok(b"A"))
    portB, _ = listenScripted(ok(b"B"))
    cleanup.port(portA), cleanup.port(portB)
    proxy = await startProxyFor(cleanup, portA.getHost().port, portB.getHost().port)
    bodies = [(await exchange(proxy.ports[0], GET_CLOSE)).split(b"\r\n\r\n", 1)[1] for _ in range(4)]
    assert bodies == [b"A", b"B", b"A", b"B"]


@pytest_twisted.ensureDeferred
async def test_failover_skips_a_refusing_server_and_marks_it_down(cleanup):
    dead, _ = listenScripted(ok(b"dead"))
    deadPort = dead.getHost().port
    await dead.stopListening()
    live, factory = listenScripted(ok(b"live"))
    cleanup.port(live)
    proxy = await startProxyFor(cleanup, deadPort, live.getHost().port)
    responses = [await exchange(proxy.ports[0], GET_CLOSE) for _ in range(3)]
    assert all(r.startswith(b"HTTP/1.1 200 ") and r.endswith(b"live") for r in responses)
    pool = proxy.pools["app"]
    assert not pool.servers[0].isUp(pool._reactor.seconds())
    assert len(factory.requests) == 3


@pytest_twisted.ensureDeferred
async def test_no_server_left_is_502_with_a_plain_text_reason(cleanup):
    dead, _ = listenScripted(ok())
    deadPort = dead.getHost().port
    await dead.stopListening()
    proxy = await startProxyFor(cleanup, deadPort)
    response = await exchange(proxy.ports[0], GET_CLOSE)
    assert response.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert headers(response)[b"content-type"].startswith(b"text/plain")
    assert b"no upstream server could be reached" in response


@pytest_twisted.ensureDeferred
async def test_all_down_then_one_back_succeeds_without_restart(cleanup):
    dead, _ = listenScripted(ok())
    port = dead.getHost().port
    await dead.stopListening()
    proxy = await startProxyFor(cleanup, port)
    assert (await exchange(proxy.ports[0], GET_CLOSE)).startswith(b"HTTP/1.1 502 ")
    from support import ScriptedUpstream
    from twisted.internet import reactor

    back = cleanup.port(reactor.listenTCP(port, ScriptedUpstream(ok(b"back")), interface="127.0.0.1"))
    assert back.getHost().port == port
    assert (await exchange(proxy.ports[0], GET_CLOSE)).endswith(b"back")


@pytest_twisted.ensureDeferred
async def test_no_response_head_in_time_is_504(cleanup):
    silent, factory = listenScripted(lambda request, connection: None)
    cleanup.port(silent)
    proxy = await startProxyFor(cleanup, silent.getHost().port, proxy_read_timeout=0.3)
    response = await exchange(proxy.ports[0], GET_CLOSE)
    assert response.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert len(factory.requests) == 1


@pytest_twisted.ensureDeferred
async def test_request_head_is_rewritten_for_the_next_hop(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    request = (
        b"GET /a?b=c HTTP/1.1\r\nHost: Example.COM:8080\r\nConnection: keep-alive, X-Secret, Host, X-Forwarded-For\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n"
        b"Upgrade: h2c\r\nX-Secret: s\r\nX-Forwarded-For: 6.6.6.6\r\nCookie: a=b\r\nX-Custom: kept\r\n"
        b"Connection: close\r\n\r\n"
    )
    response = await exchange(proxy.ports[0], request)
    assert response.startswith(b"HTTP/1.1 200 ")
    sent = factory.requests[0]
    lines = sent.split(b"\r\n")
    assert lines[0] == b"GET /a?b=c HTTP/1.1"
    received = headers(sent)
    assert received[b"host"] == b"Example.COM:8080"
    assert received[b"x-forwarded-for"] == b"127.0.0.1"
    assert received[b"x-forwarded-proto"] == b"http"
    assert received[b"x-forwarded-host"] == b"Example.COM:8080"
    assert received[b"cookie"] == b"a=b"
    assert received[b"x-custom"] == b"kept"
    for hopByHop in (b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade", b"x-secret"):
        assert hopByHop not in received
    assert b"connection" not in received, "the client's Connection header is not forwarded"


@pytest_twisted.ensureDeferred
async def test_ordinary_requests_never_carry_connection_upgrade(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    await exchange(proxy.ports[0], GET_CLOSE)
    await exchange(proxy.ports[0], b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
    for sent in factory.requests:
        assert not re.search(rb"(?im)^connection:.*upgrade", sent)
        assert not re.search(rb"(?im)^upgrade:", sent)


@pytest_twisted.ensureDeferred
async def test_absolute_form_target_overrides_host(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    await exchange(proxy.ports[0], b"GET http://real.example/x?y HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n")
    sent = factory.requests[0]
    assert sent.startswith(b"GET /x?y HTTP/1.1\r\n")
    assert headers(sent)[b"host"] == b"real.example"


@pytest_twisted.ensureDeferred
async def test_client_forwarded_for_is_replaced_unless_from_a_trusted_proxy(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    plain = await startProxyFor(cleanup, upstream.getHost().port)
    trusting = await startProxyFor(cleanup, upstream.getHost().port, set_real_ip_from=["127.0.0.0/8"])
    request = b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.1.1.1\r\nConnection: close\r\n\r\n"
    await exchange(plain.ports[0], request)
    await exchange(trusting.ports[0], request)
    assert headers(factory.requests[0])[b"x-forwarded-for"] == b"127.0.0.1"
    assert headers(factory.requests[1])[b"x-forwarded-for"] == b"10.1.1.1, 127.0.0.1"


ADDRESS_HEADERS = (
    b"X-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Port: 1\r\nX-Forwarded-Prefix: /admin\r\n"
    b"X-Client-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\n"
)


@pytest_twisted.ensureDeferred
async def test_address_and_routing_headers_from_an_untrusted_client_are_dropped(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    plain = await startProxyFor(cleanup, upstream.getHost().port)
    trusting = await startProxyFor(cleanup, upstream.getHost().port, set_real_ip_from=["127.0.0.0/8"])
    request = b"GET / HTTP/1.1\r\nHost: h\r\n%bProxy-Authorization: Basic eDp5\r\nConnection: close\r\n\r\n"
    await exchange(plain.ports[0], request % ADDRESS_HEADERS)
    await exchange(trusting.ports[0], request % ADDRESS_HEADERS)
    untrusted, trusted = (headers(sent) for sent in factory.requests)
    assert untrusted[b"x-real-ip"] == b"127.0.0.1", "set by the proxy, as X-Forwarded-For is"
    for name in (b"forwarded", b"x-forwarded-port", b"x-forwarded-prefix", b"x-client-ip", b"true-client-ip"):
        assert name not in untrusted
    assert b"x-original-url" not in untrusted and b"x-rewrite-url" not in untrusted
    assert trusted[b"x-real-ip"] == b"6.6.6.6" and trusted[b"forwarded"] == b"for=6.6.6.6"
    assert b"proxy-authorization" not in untrusted and b"proxy-authorization" not in trusted


@pytest_twisted.ensureDeferred
async def test_header_names_with_underscores_are_dropped_unless_allowed(cleanup):
    """A WSGI app would read X_Forwarded_For as the proxy's X-Forwarded-For."""
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    strict = await startProxyFor(cleanup, upstream.getHost().port)
    lenient = await startProxyFor(cleanup, upstream.getHost().port, underscores_in_headers=True)
    request = (
        b"GET / HTTP/1.1\r\nHost: h\r\nX_Forwarded_For: 6.6.6.6\r\nX-Forwarded_Proto: https\r\n"
        b"X_Forwarded_Host: evil.com\r\nMy_Header: kept?\r\nConnection: close\r\n\r\n"
    )
    await exchange(strict.ports[0], request)
    await exchange(lenient.ports[0], request)
    dropped, kept = (headers(sent) for sent in factory.requests)
    assert not [name for name in dropped if b"_" in name]
    assert dropped[b"x-forwarded-for"] == b"127.0.0.1" and dropped[b"x-forwarded-proto"] == b"http"
    assert kept[b"my_header"] == b"kept?"


@pytest_twisted.ensureDeferred
async def test_an_unsupported_websocket_version_is_426_naming_13(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    request = (
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 99\r\n\r\n"
    )
    response = await exchange(proxy.ports[0], request)
    assert response.startswith(b"HTTP/1.1 426 ")
    assert headers(response)[b"sec-websocket-version"] == b"13"
    assert factory.requests == []


@pytest_twisted.ensureDeferred
async def test_a_header_the_proxy_relies_on_cannot_be_removed_by_connection(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port, allowed_origins=["https://good.example"])
    request = (
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, Origin\r\nUpgrade: websocket\r\n"
        b"Origin: https://good.example\r\n"
        b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    client = await connectRaw(proxy.ports[0])
    client.transport.write(request)
    await client.waitFor(lambda received: bool(factory.requests) or b"\r\n\r\n" in received)
    client.transport.abortConnection()
    assert headers(factory.requests[0])[b"origin"] == b"https://good.example"


@pytest_twisted.ensureDeferred
async def test_chunked_request_body_is_streamed_and_reframed(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    client.transport.write(b"5;ext=1\r\nhello\r\n")
    # The first chunk goes on before the rest of the body exists.
    assert await until(lambda: any(c.received.endswith(b"5\r\nhello\r\n") for c in factory.connections))
    client.transport.write(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    response = await client.waitClosed()
    assert response.startswith(b"HTTP/1.1 200 ")
    sent = factory.requests[0]
    head, body = sent.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_content_length_request_body_is_forwarded(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    body = bytes(range(256)) * 400
    await exchange(
        proxy.ports[0],
        b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body),
    )
    assert factory.requests[0].endswith(b"\r\n\r\n" + body)
    assert b"Content-Length: %d\r\n" % len(body) in factory.requests[0]


@pytest_twisted.ensureDeferred
async def test_response_framings_are_relayed_right(cleanup):
    answers = {
        b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"/close": b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
        b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
        b"/204": b"HTTP/1.1 204 No Content\r\n\r\n",
        b"/304": b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
        b"/100": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    }
    upstream, _ = listenScripted(lambda request, c: answers[request.split(b" ")[1]])
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    port = proxy.ports[0]

    chunked = await exchange(port, b"GET /chunked HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in chunked and dechunk(chunked.split(b"\r\n\r\n", 1)[1]) == b"abcde"

    close = await exchange(port, b"GET /close HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert dechunk(close.split(b"\r\n\r\n", 1)[1]) == b"until the end"
    close10 = await exchange(port, b"GET /close HTTP/1.0\r\n\r\n")
    assert close10.endswith(b"\r\n\r\nuntil the end") and b"chunked" not in close10

    head = await exchange(port, b"HEAD /head HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert head.endswith(b"\r\n\r\n") and headers(head)[b"content-length"] == b"1234"

    for path, status in ((b"/204", b"204"), (b"/304", b"304")):
        response = await exchange(port, b"GET %b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % path)
        assert response.startswith(b"HTTP/1.1 " + status) and response.endswith(b"\r\n\r\n")
        assert b"chunked" not in response

    interim = await exchange(port, b"GET /100 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert interim.startswith(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\n"
    )
    assert interim.endswith(b"\r\n\r\nok")


@pytest_twisted.ensureDeferred
async def test_keep_alive_and_pipelined_requests_are_answered_in_order(cleanup):
    upstream, _ = listenScripted(lambda request, c: ok(request.split(b" ")[1]))
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    client = await connectRaw(proxy.ports[0])
    paths = [b"/%d" % i for i in range(20)]
    client.transport.write(b"".join(b"GET %b HTTP/1.1\r\nHost: h\r\n\r\n" % p for p in paths))
    received = await client.waitFor(lambda r: r.endswith(b"/19"))
    client.transport.loseConnection()
    bodies = re.findall(rb"\r\n\r\n(/\d+)", received)
    assert bodies == paths
    assert received.count(b"HTTP/1.1 200 OK") == 20


@pytest_twisted.ensureDeferred
async def test_upstream_closing_mid_body_truncates_the_response(cleanup):
    upstream, _ = listenScripted(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    response = await exchange(proxy.ports[0], GET)
    assert response is not None, "the client connection must be closed"
    assert response.endswith(b"only part") and b"Content-Length: 100" in response

    chunkedCut, _ = listenScripted(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    cleanup.port(chunkedCut)
    proxy2 = await startProxyFor(cleanup, chunkedCut.getHost().port)
    response = await exchange(proxy2.ports[0], GET)
    assert response is not None and response.endswith(b"5\r\nhello\r\n")
    assert not response.endswith(b"0\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_bytes_after_a_response_are_never_served_to_the_next_request(cleanup):
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
    upstream, factory = listenScripted(
        lambda request, c: ok(b"first") + smuggled if len(factory.requests) == 1 else ok(b"second")
    )
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(GET)
    await client.waitFor(b"first")
    client.transport.write(GET_CLOSE)
    received = await client.waitClosed()
    assert b"SMUGGLED" not in received and received.endswith(b"second")


@pytest_twisted.ensureDeferred
async def test_malformed_upstream_responses_are_502(cleanup):
    bad = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: b\r\n folded\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ]
    for answer in bad:
        upstream, _ = listenScripted(answer)
        cleanup.port(upstream)
        proxy = await startProxyFor(cleanup, upstream.getHost().port)
        response = await exchange(proxy.ports[0], GET_CLOSE)
        assert response.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), (answer, response)


@pytest_twisted.ensureDeferred
async def test_a_bad_chunk_from_the_upstream_cuts_the_response(cleanup):
    upstream, _ = listenScripted(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", closeAfter=False
    )
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    response = await exchange(proxy.ports[0], GET)
    assert response is not None and not response.endswith(b"0\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_upstream_connections_are_kept_alive_and_reused(cleanup):
    upstream, factory = listenScripted(lambda request, c: ok(b"%d" % len(factory.requests)), closeAfter=False)
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    for expected in (b"1", b"2", b"3"):
        assert (await exchange(proxy.ports[0], GET_CLOSE)).endswith(expected)
    assert len(factory.connections) == 1, "one upstream connection served every request"
    assert all(b"connection:" not in r.lower() for r in factory.requests)


@pytest_twisted.ensureDeferred
async def test_keepalive_zero_closes_every_upstream_connection(cleanup):
    upstream, factory = listenScripted(ok(), closeAfter=False)
    cleanup.port(upstream)
    upstreams, block = proxyTo(upstream.getHost().port)
    upstreams["app"]["keepalive"] = 0
    proxy = cleanup.service(await startProxy(upstreams, block))
    await exchange(proxy.ports[0], GET_CLOSE)
    await exchange(proxy.ports[0], GET_CLOSE)
    assert len(factory.connections) == 2
    assert all(b"\r\nConnection: close\r\n" in r for r in factory.requests)


class OneAnswerPerConnection(Protocol):
    """Answers the first request on a connection, then closes when the next one arrives."""

    def connectionMade(self):
        self.requests = 0

    def dataReceived(self, data):
        self.requests += data.count(b"\r\n\r\n")
        if self.requests == 1:
            self.transport.write(ok(b"fine"))
        else:
            self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_kept_connection_the_server_closes_on_reuse_is_retried_on_a_new_one(cleanup):
    factory = Factory.forProtocol(OneAnswerPerConnection)
    upstream = cleanup.port(reactor.listenTCP(0, factory, interface="127.0.0.1"))
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    for _ in range(3):
        assert (await exchange(proxy.ports[0], GET_CLOSE)).endswith(b"fine")


@pytest_twisted.ensureDeferred
async def test_a_large_body_sent_before_the_upstream_connects_is_forwarded_whole(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    body = bytes(range(256)) * (4_000_000 // 256)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(
        b"PUT /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body)
    )
    response = await client.waitClosed(timeout=20)
    assert response is not None and response.startswith(b"HTTP/1.1 200 ")
    assert factory.requests[0].endswith(b"\r\n\r\n" + body)


@pytest_twisted.ensureDeferred
async def test_an_http10_request_without_host_is_forwarded_with_the_listeners_address(cleanup):
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    await exchange(proxy.ports[0], b"GET /old HTTP/1.0\r\n\r\n")
    assert headers(factory.requests[0])[b"host"] == b"127.0.0.1:%d" % proxy.ports[0]


@pytest_twisted.ensureDeferred
async def test_one_access_log_event_per_request_and_per_finished_tunnel(cleanup):
    from support import switching, upgradeRequest
    from twisted.logger import formatEvent, globalLogPublisher

    events = []
    observer = lambda event: events.append(event) if event.get("log_namespace") == "wsproxy.access" else None
    globalLogPublisher.addObserver(observer)
    try:
        upstream, factory = listenScripted(
            lambda request, c: switching() if b"Upgrade" in request else ok(b"12345"), closeAfter=False
        )
        cleanup.port(upstream)
        proxy = await startProxyFor(cleanup, upstream.getHost().port, access_log=True)
        await exchange(
            proxy.ports[0], b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        )
        client = await connectRaw(proxy.ports[0])
        client.transport.write(upgradeRequest() + b"ping")
        await client.waitFor(b"\r\n\r\n")
        factory.connections[-1].transport.write(b"pong!")
        await client.waitFor(b"pong!")
        client.transport.loseConnection()
        for _ in range(100):
            if len(events) == 2:
                break
            await sleep(0.01)
    finally:
        globalLogPublisher.removeObserver(observer)
    request, tunnel = events
    server = f"127.0.0.1:{upstream.getHost().port}"
    assert {k: request[k] for k in ("client", "method", "target", "status", "upstream", "bytesIn", "bytesOut")} == {
        "client": "127.0.0.1",
        "method": "POST",
        "target": "/form",
        "status": 200,
        "upstream": server,
        "bytesIn": 3,
        "bytesOut": 5,
    }
    assert re.fullmatch(r'127\.0\.0\.1 "POST /form" 200 upstream=\S+ in=3 out=5 \d+\.\d{3}s', formatEvent(request))
    assert (tunnel["status"], tunnel["bytesIn"], tunnel["bytesOut"], tunnel["closedBy"]) == (101, 4, 5, "client")
    assert formatEvent(tunnel).endswith("closed by client")
