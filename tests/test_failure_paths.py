"""
The proxy's failure paths on real sockets, each test run twice: once
against a plain listener and once against a TLS listener (certificates
made with trustme for each test, the client being Twisted's own TLS).

Every test ends by checking the proxy's own bookkeeping: each listener's
C{connections} set is empty, and the upstream connection the exchange used
was closed.  Waits are events (a byte arrived, a connection closed) or
polls of a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support import (
    LOOPBACK,
    RawClient,
    ScriptedConnection,
    ScriptedUpstream,
    ServerCertificate,
    connectTo,
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
from twisted.internet.task import LoopingCall

GET = b"GET /page HTTP/1.1\r\nHost: h\r\n\r\n"
GET_CLOSE = b"GET /page HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
BIG = 32 * 1024 * 1024


def headers(response: bytes) -> dict[bytes, bytes]:
    head = response.split(b"\r\n\r\n", 1)[0]
    return {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]}


def statuses(received: bytes) -> list[bytes]:
    """The status codes of the responses in C{received}, in order."""
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", received)


def complete(received: bytes) -> int:
    """How many complete responses (each framed by Content-Length) C{received} holds."""
    count = 0
    while True:
        end = received.find(b"\r\n\r\n")
        if end < 0:
            return count
        length = int(headers(received[: end + 4]).get(b"content-length", b"0"))
        if len(received) < end + 4 + length:
            return count
        count, received = count + 1, received[end + 4 + length :]


def maskedText(payload: bytes, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """A client's WebSocket text frame (RFC 6455 section 5.3), payload under 126 bytes."""
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# Waiting


async def fires(deferred: Deferred, timeout: float = 3.0) -> bool:
    """Whether C{deferred} fires within C{timeout} seconds (it is left untouched)."""
    waiting: Deferred = Deferred()

    def fired(result: Any) -> Any:
        if not waiting.called:
            waiting.callback(True)
        return result

    deferred.addBoth(fired)
    timer = reactor.callLater(timeout, lambda: waiting.called or waiting.callback(False))
    result = await waiting
    if timer.active():
        timer.cancel()
    return result


# Upstreams


class DeafConnection(ScriptedConnection):
    """An upstream connection that is accepted and then never read from."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.pauseProducing()


class EarlyConnection(ScriptedConnection):
    """Answers as soon as a request head is in, with the head given and a large body, before the request body."""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.answered and b"\r\n\r\n" in self.received:
            self.answered = True
            self.factory.requests.append(self.received)
            self.transport.write(self.factory.answer(self.received, self) + b"x" * BIG)


class EarlyUpstream(ScriptedUpstream):
    connectionClass = EarlyConnection


class DeafUpstream(ScriptedUpstream):
    connectionClass = DeafConnection


def drip(connection: ScriptedConnection, piece: bytes, interval: float = 0.05) -> None:
    """Write C{piece} to C{connection} every C{interval} seconds until it closes."""
    writing = LoopingCall(connection.transport.write, piece)
    writing.clock = reactor
    writing.start(interval, now=False)
    connection.lost.addBoth(lambda _: writing.stop() if writing.running else None)


# The listener under test


class Listener:
    """
    Starts proxies and redirect listeners of one kind (plain or TLS), opens
    client connections to them, and checks what they have left open.
    """

    def __init__(self, kind: str, cleanup: Any, directory: Path) -> None:
        self.kind = kind
        self.cleanup = cleanup
        self.services: list[Any] = []
        self.clients: list[RawClient] = []
        self.upstreams: list[ScriptedUpstream] = []
        self.certificate = ServerCertificate(directory) if kind == "tls" else None
        self.block: dict[str, Any] = self.certificate.block if self.certificate is not None else {}

    @property
    def tls(self) -> bool:
        return self.kind == "tls"

    # Starting things

    def upstream(
        self,
        answer: Callable[[bytes, Any], bytes | None] | bytes,
        closeAfter: bool = True,
        factory: ScriptedUpstream | None = None,
    ) -> ScriptedUpstream:
        """A scripted upstream server listening on loopback; its port is C{factory.port}."""
        if factory is None:
            port, factory = listenScripted(answer, closeAfter)
        else:
            port = reactor.listenTCP(0, factory, interface=LOOPBACK)
        self.cleanup.port(port)
        factory.port = port.getHost().port
        self.upstreams.append(factory)
        return factory

    async def proxy(self, upstream: ScriptedUpstream, **block: Any) -> Any:
        """A proxy listener in front of C{upstream}."""
        upstreams = {"app": {"servers": [f"{LOOPBACK}:{upstream.port}"]}}
        return await self._start(upstreams, {"proxy_pass": "http://app", **self.block, **block})

    async def redirect(self, target: str = "308 https://$host$request_uri", **block: Any) -> Any:
        """A redirect listener."""
        return await self._start({}, {"return": target, **self.block, **block})

    async def _start(self, upstreams: dict[str, Any], block: dict[str, Any]) -> Any:
        service = self.cleanup.service(await startProxy(upstreams, block))
        self.services.append(service)
        return service

    async def connect(self, service: Any) -> RawClient:
        """A raw client connection to the first listener of C{service} (over TLS for a TLS listener)."""
        client = await connectTo(service.ports[0], self.certificate)
        self.clients.append(client)
        return client

    # Checking what is left

    def factories(self) -> list[Any]:
        return [listener.proxyFactory for service in self.services for listener in service.listeners]

    async def settled(self, timeout: float = 3.0) -> None:
        """Every listener's C{connections} set empties within C{timeout} seconds."""
        factories = self.factories()
        empty = await until(lambda: all(not factory.connections for factory in factories), timeout)
        assert empty, f"the proxy still holds client connections: {[len(f.connections) for f in factories]}"

    async def upstreamClosed(self, upstream: ScriptedUpstream, timeout: float = 3.0) -> None:
        """Every connection C{upstream} accepted is closed within C{timeout} seconds."""
        assert upstream.connections, "the proxy never connected to the upstream"
        for connection in upstream.connections:
            assert await fires(connection.lost, timeout), "the upstream connection was left open"

    def abortAll(self) -> None:
        for client in self.clients:
            if not client.closed.called:
                client.transport.abortConnection()
        for upstream in self.upstreams:
            for connection in upstream.connections:
                if connection.transport.connected:
                    connection.transport.abortConnection()


@pytest.fixture(params=["plain", "tls"])
def listener(request: Any, cleanup: Any, tmp_path: Path):
    state = Listener(request.param, cleanup, tmp_path)
    yield state
    state.abortAll()


# 1, 2: a response cut short is passed on cut short, and the client closed


@pytest_twisted.ensureDeferred
async def test_truncated_content_length_body_closes_the_client(listener):
    upstream = listener.upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
    proxy = await listener.proxy(upstream)
    client = await listener.connect(proxy)
    client.transport.write(GET)
    received = await client.waitFor(b"only part")
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and headers(received)[b"content-length"] == b"100"
    received = await client.waitClosed(3)
    assert received is not None, "the proxy must close the client connection after a truncated response"
    assert received.endswith(b"only part")
    await listener.settled()
    await listener.upstreamClosed(upstream)


@pytest_twisted.ensureDeferred
async def test_chunked_body_cut_mid_chunk_closes_the_client(listener):
    upstream = listener.upstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nhello")
    proxy = await listener.proxy(upstream)
    client = await listener.connect(proxy)
    client.transport.write(GET)
    received = await client.waitFor(b"hello")
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and b"hello" in received
    received = await client.waitClosed(3)
    assert received is not None, "the proxy must close the client connection after a truncated response"
    assert not received.endswith(b"0\r\n\r\n")
    await listener.settled()
    await listener.upstreamClosed(upstream)


@pytest_twisted.ensureDeferred
async def test_malformed_chunk_from_the_upstream_closes_both_sides(listener):
    upstream = listener.upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", closeAfter=False
    )
    proxy = await listener.proxy(upstream)
    client = await listener.connect(proxy)
    client.transport.write(GET)
    received = await client.waitClosed(3)
    assert received is not None, "the proxy must close the client connection after a bad chunk"
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert not received.endswith(b"0\r\n\r\n")
    await listener.settled()
    await listener.upstreamClosed(upstream)


@pytest_twisted.ensureDeferred
async def test_stalled_body_closes_both_sides_after_proxy_read_timeout(listener):
    upstream = listener.upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", closeAfter=False)
    proxy = await listener.proxy(upstream, proxy_read_timeout=0.3)
    client = await listener.connect(proxy)
    client.transport.write(GET)
    received = await client.waitFor(b"partial")
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    received = await client.waitClosed(3)
    assert received is not None, "the proxy must close the client connection once the body stalls"
    assert received.endswith(b"partial")
    await listener.settled()
    await listener.upstreamClosed(upstream)


# 3, 4: no answer from the upstream


@pytest_twisted.ensureDeferred
async def test_upstream_reset_before_answering_is_502(listener):
    upstream = listener.upstream(lambda request, connection: connection.transport.abortConnection())
    proxy = await listener.proxy(upstream)
    client = await listener.connect(proxy)
    client.transport.write(GET_CLOSE)
    received = await client.waitClosed(3)
    assert received is not None and received.startswith(b"HTTP/1.1 502 "), received
    assert len(upstream.requests) == 1
    await listener.settled()
    await listener.upstreamClosed(upstream)


@pytest_twisted.ensureDeferred
async def test_silent_upstream_is_504_after_proxy_read_timeout(listener):
    upstream = listener.upstream(lambda request, connection: None)
    proxy = await listener.proxy(upstream, proxy_read_timeout=0.3)
    client = await listener.connect(proxy)
    client.transport.write(GET_CLOSE)
    received = await client.waitClosed(3)
    assert received is not None and received.startswith(b"HTTP/1.1 504 "), received
    await listener.settled()
    await listener.upstreamClosed(upstream)


# 5, 6: client timeouts


@pytest_twisted.ensureDeferred
async def test_partial_head_is_408_after_client_header_timeout(listener):
    upstream = listener.upstream(ok())
    proxy = await listener.proxy(upstream, client_header_timeout=0.3)
    client = await listener.connect(proxy)
    client.transport.write(b"GET / HTTP/1.1\r\nHost: h")
    received = await client.waitClosed(3)
    assert received is not None and received.startswith(b"HTTP/1.1 408 "), received
    assert upstream.requests == []
    await listener.settled()


@pytest_twisted.ensureDeferred
async def test_silent_client_is_closed_after_client_header_timeout(listener):
    upstream = listener.upstream(ok())
    proxy = await listener.proxy(upstream, client_header_timeout=0.3)
    client = await listener.connect(proxy)
    assert await client.waitClosed(3) == b""
    await listener.settled()


@pytest_twisted.ensureDeferred
async def test_idle_keep_alive_connection_is_closed_after_keepalive_timeout(listener):
    upstream = listener.upstream(ok(b"one"), closeAfter=False)
    proxy = await listener.proxy(upstream, keepalive_timeout=0.3)
    client = await listener.connect(proxy)
    client.transport.write(GET)
    await client.waitFor(b"one")
    received = await client.waitClosed(3)
    assert received is not None, "the idle connection must be closed"
    assert statuses(received) == [b"200"] and received.endswith(b"one")
    await listener.settled()


@pytest_twisted.ensureDeferred
async def test_each_request_moves_the_keep_alive_deadline(listener):
    """
    A connection that keeps sending requests stays open past its first
    keep-alive deadline (the one reactor call behind it fires early and
    waits for the rest), and closes once it has been idle for as long.
    """
    upstream = listener.upstream(echoPath, closeAfter=False)
    proxy = await listener.proxy(upstream, keepalive_timeout=0.5)
    client = await listener.connect(proxy)
    for n in range(4):
        client.transport.write(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % n)
        await client.waitFor(b"/%d" % n)
        assert await stillAfter(0.3, lambda: not client.closed.called), f"open 0.3 s after request {n}"
    received = await client.waitClosed(3)
    assert received is not None, "the idle connection must be closed"
    assert statuses(received) == [b"200"] * 4 and received.endswith(b"/3")
    await listener.settled()


@pytest_twisted.ensureDeferred
async def test_stalled_request_body_is_408_after_client_body_timeout(listener):
    upstream = listener.upstream(ok())
    proxy = await listener.proxy(upstream, client_body_timeout=0.3)
    client = await listener.connect(proxy)
    client.transport.write(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n0123456789")
    received = await client.waitClosed(3)
    assert received is not None and received.startswith(b"HTTP/1.1 408 "), received
    await listener.settled()
    await listener.upstreamClosed(upstream)


# 7: the client goes away at each stage


STAGES = ["mid-head", "before-the-answer", "mid-response-body", "mid-request-body", "in-a-tunnel"]


@pytest.mark.parametrize("stage", STAGES)
@pytest_twisted.ensureDeferred
async def test_client_abort_releases_everything(listener, stage):
    def answer(request: bytes, connection: ScriptedConnection) -> bytes | None:
        if stage == "mid-head":
            return ok(b"first", b"Connection: close\r\n")
        if stage == "mid-response-body":
            drip(connection, b"x" * 10)
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nstart"
        if stage == "in-a-tunnel":
            return switching()
        return None

    upstream = listener.upstream(answer, closeAfter=False)
    proxy = await listener.proxy(upstream)
    client = await listener.connect(proxy)
    if stage == "mid-head":
        # The partial second head arrives with the first request, so once
        # the first is answered the proxy holds it.
        client.transport.write(GET + b"GET /second HTTP/1.1\r\nHo")
        await client.waitFor(b"first")
    elif stage == "before-the-answer":
        client.transport.write(GET)
        assert await until(lambda: len(upstream.requests) == 1)
    elif stage == "mid-response-body":
        client.transport.write(GET)
        assert await until(lambda: client.received.endswith(b"x" * 30))
    elif stage == "mid-request-body":
        client.transport.write(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n0123456789")
        assert await until(
            lambda: bool(upstream.connections) and upstream.connections[0].received.endswith(b"0123456789")
        )
    else:
        client.transport.write(upgradeRequest())
        assert (await client.waitFor(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        frame = maskedText(b"hello")
        client.transport.write(frame)
        assert await until(lambda: upstream.connections[0].received.endswith(frame))
    client.transport.abortConnection()
    await listener.settled()
    await listener.upstreamClosed(upstream)


# 8: keep-alive and pipelining


def echoPath(request: bytes, connection: Any) -> bytes:
    return ok(request.split(b" ")[1])


@pytest_twisted.ensureDeferred
async def test_two_sequential_requests_on_one_connection(listener):
    upstream = listener.upstream(echoPath, closeAfter=False)
    proxy = await listener.proxy(upstream)
    client = await listener.connect(proxy)
    client.transport.write(b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n")
    await client.waitFor(b"/one")
    client.transport.write(b"GET /two HTTP/1.1\r\nHost: h\r\n\r\n")
    received = await client.waitFor(b"/two", timeout=3)
    assert statuses(received) == [b"200", b"200"] and received.endswith(b"/two"), received
    client.transport.loseConnection()
    await listener.settled()


@pytest_twisted.ensureDeferred
async def test_three_pipelined_requests_answered_in_order(listener):
    upstream = listener.upstream(echoPath, closeAfter=False)
    proxy = await listener.proxy(upstream)
    client = await listener.connect(proxy)
    client.transport.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in (1, 2, 3)))
    received = await client.waitFor(lambda r: r.endswith(b"/3"), timeout=3)
    assert re.findall(rb"\r\n\r\n(/\d)", received) == [b"/1", b"/2", b"/3"], received
    assert statuses(received) == [b"200"] * 3
    client.transport.loseConnection()
    await listener.settled()


# 9, 10: a peer that stops reading


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_is_dropped_after_send_timeout(listener):
    upstream = listener.upstream(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG, closeAfter=False)
    proxy = await listener.proxy(upstream, send_timeout=0.5)
    client = await listener.connect(proxy)
    client.transport.write(GET)
    assert (await client.waitFor(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK\r\n")
    client.transport.pauseProducing()
    await listener.settled()
    await listener.upstreamClosed(upstream, timeout=1)


@pytest_twisted.ensureDeferred
async def test_upstream_that_stops_reading_is_dropped_after_proxy_send_timeout(listener):
    upstream = listener.upstream(None, factory=DeafUpstream(ok(), closeAfter=False))
    proxy = await listener.proxy(upstream, proxy_send_timeout=0.5)
    client = await listener.connect(proxy)
    client.transport.write(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG)
    received = await client.waitClosed(3)
    assert received is not None, "the proxy must give up on an upstream that does not read"
    assert received == b"" or received.startswith(b"HTTP/1.1 504 "), received[:200]
    await listener.settled(timeout=1)
    # A connection that does not read cannot see its peer go: let it look.
    for connection in upstream.connections:
        connection.transport.resumeProducing()
    await listener.upstreamClosed(upstream, timeout=1)


@pytest_twisted.ensureDeferred
async def test_an_early_answer_then_a_bad_chunk_from_a_client_that_does_not_read_is_closed(listener):
    """
    Five of these once held a max_connections = 5 listener for ever: the
    early answer, then the 400 for the bad chunk, cannot be delivered to a
    client that reads nothing, and the close must still happen.
    """
    upstream = listener.upstream(None, factory=EarlyUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG))
    proxy = await listener.proxy(upstream, send_timeout=0.5, max_connections=5)
    clients = []
    for count in range(1, 6):
        client = await listener.connect(proxy)
        client.transport.write(b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        # Stop reading once the request is through (a TLS client that stops
        # reading before its handshake is done never sends anything).
        assert await until(lambda count=count: len(upstream.requests) == count, 3)
        client.transport.pauseProducing()
        clients.append(client)
    for client in clients:
        client.transport.write(b"zz\r\n")
    await listener.settled(timeout=5)
    fresh = await listener.connect(proxy)
    fresh.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert not (await fresh.waitFor(b"\r\n")).startswith(b"HTTP/1.1 503 "), "the listener has room again"


@pytest_twisted.ensureDeferred
async def test_a_tunnel_side_that_stops_reading_is_dropped_after_send_timeout(listener):
    """A tunnel keeps no byte it cannot deliver for ever: both ends are closed."""
    upstream = listener.upstream(lambda request, connection: switching() + b"x" * BIG, closeAfter=False)
    proxy = await listener.proxy(upstream, send_timeout=0.5)
    client = await listener.connect(proxy)
    client.transport.write(upgradeRequest())
    assert (await client.waitFor(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    client.transport.pauseProducing()
    await listener.settled(timeout=5)
    await listener.upstreamClosed(upstream)


@pytest_twisted.ensureDeferred
async def test_an_idle_tunnel_is_closed_after_websocket_idle_timeout(listener):
    upstream = listener.upstream(lambda request, connection: switching(), closeAfter=False)
    proxy = await listener.proxy(upstream, websocket_idle_timeout=0.3)
    client = await listener.connect(proxy)
    client.transport.write(upgradeRequest())
    assert (await client.waitFor(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    assert await client.waitClosed(3) is not None, "the idle tunnel is closed"
    await listener.settled()
    await listener.upstreamClosed(upstream)


# 11: the redirect listener


REDIRECT_GET = b"GET /n HTTP/1.1\r\nHost: example.com\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_redirect_with_connection_close_then_eof(listener):
    redirect = await listener.redirect()
    client = await listener.connect(redirect)
    client.transport.write(b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
    received = await client.waitClosed(3)
    assert received is not None, "the redirect listener must close after Connection: close"
    assert received.startswith(b"HTTP/1.1 308 ") and headers(received)[b"location"] == b"https://example.com/a?b=c"
    await listener.settled()


@pytest_twisted.ensureDeferred
async def test_redirect_idle_keep_alive_connection_is_closed(listener):
    redirect = await listener.redirect(keepalive_timeout=0.3)
    client = await listener.connect(redirect)
    client.transport.write(REDIRECT_GET)
    await client.waitFor(b"\r\n\r\n")
    received = await client.waitClosed(3)
    assert received is not None, "the idle connection must be closed"
    assert statuses(received) == [b"308"]
    await listener.settled()


@pytest_twisted.ensureDeferred
async def test_redirect_600_pipelined_requests_then_close(listener):
    redirect = await listener.redirect()
    client = await listener.connect(redirect)
    client.transport.write(REDIRECT_GET * 600 + b"GET /last HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
    received = await client.waitClosed(3)
    assert received is not None, f"no EOF after {len(statuses(client.received))} responses"
    assert statuses(received) == [b"308"] * 601
    assert received.endswith(b"Redirecting to https://example.com/last\n")
    await listener.settled()


@pytest_twisted.ensureDeferred
async def test_redirect_honours_max_headers(listener):
    redirect = await listener.redirect(max_headers=2)
    client = await listener.connect(redirect)
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(9))
    client.transport.write(b"GET / HTTP/1.1\r\nHost: example.com\r\n" + extra + b"\r\n")
    received = await client.waitFor(lambda r: complete(r) >= 1, timeout=3)
    assert statuses(received) == [b"431"], received
    assert await client.waitClosed(3) is not None, "the connection must be closed after a refusal"
    await listener.settled()


@pytest_twisted.ensureDeferred
async def test_redirect_honours_max_request_line(listener):
    redirect = await listener.redirect(max_request_line=64)
    client = await listener.connect(redirect)
    client.transport.write(b"GET /" + b"a" * 499 + b" HTTP/1.1\r\nHost: example.com\r\n\r\n")
    received = await client.waitFor(lambda r: complete(r) >= 1, timeout=3)
    assert statuses(received) == [b"414"], received
    assert await client.waitClosed(3) is not None, "the connection must be closed after a refusal"
    await listener.settled()


# 12: retrying on a fresh connection only what is safe to send twice


def closeOnReuse(request: bytes, connection: Any) -> bytes | None:
    """Answer the first request on a connection, keep it alive, and close it on the second."""
    connection.served = getattr(connection, "served", 0) + 1
    if connection.served > 1:
        connection.transport.loseConnection()
        return None
    return ok(b"fresh")


async def secondOnAReusedConnection(listener: Listener, second: bytes) -> tuple[ScriptedUpstream, bytes]:
    """Send a GET, then C{second} on the same client connection; return the upstream and both responses."""
    upstream = listener.upstream(closeOnReuse, closeAfter=False)
    proxy = await listener.proxy(upstream)
    client = await listener.connect(proxy)
    client.transport.write(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n")
    await client.waitFor(b"fresh")
    assert len(upstream.connections) == 1
    client.transport.write(second)
    received = await client.waitFor(lambda r: complete(r) >= 2, timeout=3)
    client.transport.loseConnection()
    await listener.settled()
    return upstream, received


@pytest_twisted.ensureDeferred
async def test_a_post_is_not_resent_when_the_reused_connection_closes(listener):
    upstream, received = await secondOnAReusedConnection(
        listener, b"POST /orders/42/cancel HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"
    )
    posts = [r for r in upstream.requests if r.startswith(b"POST /orders/42/cancel ")]
    assert len(posts) == 1, f"the POST reached the upstream {len(posts)} times"
    assert statuses(received) == [b"200", b"502"], received


@pytest_twisted.ensureDeferred
async def test_a_get_is_retried_on_a_fresh_connection_when_the_reused_one_closes(listener):
    upstream, received = await secondOnAReusedConnection(listener, b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n")
    assert statuses(received) == [b"200", b"200"] and received.endswith(b"fresh"), received
    assert len(upstream.connections) == 2
    assert sum(r.startswith(b"GET /again ") for r in upstream.requests) == 2
