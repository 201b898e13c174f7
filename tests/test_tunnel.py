"""
WebSocket upgrades through the proxy: the tunnel is only built on a real
101 from the upstream, bytes on both sides of the handshake arrive in
order, flow control keeps memory bounded, and closing one side closes the
other.
"""

from __future__ import annotations

import base64
import hashlib
import os

import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from support import (
    KEY,
    connectRaw,
    listenEcho,
    listenScripted,
    ok,
    openFileDescriptors,
    sleep,
    startProxyFor,
    stillAfter,
    switching,
    until,
    upgradeRequest,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol


class EchoClient(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.messages.append((payload, isBinary))
        if len(self.factory.messages) == self.factory.expected:
            self.factory.done.callback(self.factory.messages)

    def onClose(self, wasClean: bool, code: int, reason: str) -> None:
        if not self.factory.closed.called:
            self.factory.closed.callback((wasClean, code))


@pytest_twisted.ensureDeferred
async def test_websocket_messages_through_the_proxy(cleanup):
    echo = cleanup.port(listenEcho())
    proxy = await startProxyFor(cleanup, echo.getHost().port)
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{proxy.ports[0]}/ws")
    factory.protocol = EchoClient
    factory.opened, factory.done, factory.closed = Deferred(), Deferred(), Deferred()
    factory.messages, factory.expected = [], 3
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.ports[0])
    await endpoint.connect(factory)
    client = await factory.opened
    client.sendMessage("héllo".encode(), isBinary=False)
    client.sendMessage(os.urandom(70000), isBinary=True)
    client.sendMessage(b"x" * 10, isBinary=False)
    messages = await factory.done
    assert messages[0] == ("héllo".encode(), False)
    assert len(messages[1][0]) == 70000 and messages[1][1]
    client.sendClose(1000)
    assert await factory.closed == (True, 1000)


@pytest_twisted.ensureDeferred
async def test_refused_upgrade_stays_http_and_the_pipelined_request_is_answered(cleanup):
    def answer(request, connection):
        if b"Upgrade: websocket" in request:
            return b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope"
        return ok(b"plain")

    upstream, factory = listenScripted(answer)
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(upgradeRequest() + b"GET /next HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    received = await client.waitClosed()
    assert received.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert received.endswith(b"plain")
    assert factory.requests[1].startswith(b"GET /next HTTP/1.1\r\n")


@pytest_twisted.ensureDeferred
async def test_bytes_on_both_sides_of_the_101_arrive_in_order(cleanup):
    early = b"\x81\x85" + b"\x00" * 4 + b"early"

    def answer(request, connection):
        return switching() + b"\x81\x05first"

    upstream, factory = listenScripted(answer, closeAfter=False)
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(upgradeRequest() + early)
    received = await client.waitFor(b"first")
    assert received.endswith(b"\r\n\r\n\x81\x05first")
    client.transport.write(b"later")
    connection = factory.connections[0]
    for _ in range(50):
        if connection.received.endswith(b"later"):
            break
        await sleep(0.02)
    assert connection.received.split(b"\r\n\r\n", 1)[1] == early + b"later"
    connection.transport.write(b"\x81\x04last")
    assert (await client.waitFor(b"last")).endswith(b"first\x81\x04last")
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_upgrade_is_forwarded_with_connection_upgrade_and_end_to_end_headers(cleanup):
    upstream, factory = listenScripted(switching(), closeAfter=False)
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(
        upgradeRequest(extra=b"Origin: https://site\r\nSec-WebSocket-Protocol: chat\r\nCookie: c=1\r\n")
    )
    received = await client.waitFor(b"\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    sent = factory.requests[0].lower()
    for line in (
        b"connection: upgrade",
        b"upgrade: websocket",
        b"origin: https://site",
        b"sec-websocket-protocol: chat",
        b"cookie: c=1",
        b"sec-websocket-version: 13",
        b"sec-websocket-key: " + KEY.lower(),
    ):
        assert b"\r\n" + line + b"\r\n" in sent
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_101_with_a_wrong_accept_is_502_and_no_tunnel(cleanup):
    upstream, factory = listenScripted(
        switching(key=base64.b64encode(b"another key 1234")) + b"\x81\x02hi", closeAfter=False
    )
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    client = await connectRaw(proxy.ports[0])
    client.transport.write(upgradeRequest() + b"\x81\x80\x00\x00\x00\x00")
    received = await client.waitClosed()
    assert received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"\x81\x02hi" not in received


@pytest_twisted.ensureDeferred
async def test_upstream_dying_closes_the_client_promptly_and_the_other_way_round(cleanup):
    upstream, factory = listenScripted(switching(), closeAfter=False)
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)

    client = await connectRaw(proxy.ports[0])
    client.transport.write(upgradeRequest())
    await client.waitFor(b"\r\n\r\n")
    factory.connections[0].transport.abortConnection()
    assert await client.waitClosed(timeout=2) is not None

    client2 = await connectRaw(proxy.ports[0])
    client2.transport.write(upgradeRequest())
    await client2.waitFor(b"\r\n\r\n")
    client2.transport.abortConnection()
    lost = factory.connections[1].lost
    await lost.addTimeout(2, reactor)


@pytest_twisted.ensureDeferred
async def test_tunnels_have_no_idle_timeout_unless_configured(cleanup):
    upstream, factory = listenScripted(switching(), closeAfter=False)
    cleanup.port(upstream)
    quiet = await startProxyFor(
        cleanup, upstream.getHost().port, proxy_read_timeout=0.2, keepalive_timeout=0.2, client_header_timeout=0.2
    )
    watched = await startProxyFor(cleanup, upstream.getHost().port, websocket_idle_timeout=0.3)
    clients = []
    for proxy in (quiet, watched):
        client = await connectRaw(proxy.ports[0])
        client.transport.write(upgradeRequest())
        await client.waitFor(b"\r\n\r\n")
        clients.append(client)
    # 1 s: past every other timeout of the quiet proxy, and websocket_idle_timeout of the watched one.
    assert await stillAfter(1.0, lambda: not clients[0].closed.called), "a quiet tunnel must stay open"
    assert clients[1].closed.called, "websocket_idle_timeout closes an idle tunnel"
    clients[0].transport.write(b"still here")
    connection = factory.connections[0]
    for _ in range(50):
        if connection.received.endswith(b"still here"):
            break
        await sleep(0.02)
    assert connection.received.endswith(b"still here")
    clients[0].transport.loseConnection()


class Blaster(Protocol):
    """
    After the handshake, writes C{total} bytes of a known pattern as fast as
    flow control lets it, and hashes whatever it receives.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.paused = False
        self.buffer = b""
        self.switched = False
        self.receivedHash = hashlib.sha256()
        self.receivedBytes = 0
        self.chunk = os.urandom(65536)

    def dataReceived(self, data: bytes) -> None:
        if not self.switched:
            self.buffer += data
            if b"\r\n\r\n" in self.buffer:
                self.switched = True
                self.transport.write(switching())
                self.transport.registerProducer(self, True)
                self.resumeProducing()
            return
        self.receivedBytes += len(data)
        self.receivedHash.update(data)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.total:
            self.transport.write(self.chunk)
            self.sent += len(self.chunk)

    def stopProducing(self) -> None:
        self.paused = True


class SlowReader(Protocol):
    """Reads in short bursts with long pauses, hashing what arrives."""

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.headDone = False
        self.buffer = b""
        self.done: Deferred = Deferred()
        self.expected = 0

    def dataReceived(self, data: bytes) -> None:
        if not self.headDone:
            self.buffer += data
            if b"\r\n\r\n" not in self.buffer:
                return
            self.headDone = True
            data = self.buffer.split(b"\r\n\r\n", 1)[1]
        self.received += len(data)
        self.digest.update(data)
        if self.received >= self.expected and not self.done.called:
            self.done.callback(self.received)


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_keeps_the_proxy_buffers_bounded_over_100_mb(cleanup):
    total = 100 * 1024 * 1024
    blasters = []

    class BlasterFactory(Factory):
        def buildProtocol(self, addr):
            blaster = Blaster(total)
            blasters.append(blaster)
            return blaster

    upstream = cleanup.port(reactor.listenTCP(0, BlasterFactory(), interface="127.0.0.1"))
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    reader = SlowReader()
    reader.expected = total
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.ports[0]), reader)
    reader.transport.write(upgradeRequest())
    factory = proxy.listeners[0].proxyFactory
    peak = 0
    deadline = reactor.seconds() + 120
    while not reader.done.called and reactor.seconds() < deadline:
        # Read in short bursts with long pauses.
        reader.transport.pauseProducing()
        for protocol in factory.connections:
            transport = protocol.transport
            buffered = len(transport.dataBuffer) + transport._tempDataLen
            peak = max(peak, buffered)
        await sleep(0.01)
        reader.transport.resumeProducing()
        await sleep(0.002)
    assert reader.done.called, f"{reader.received} of {total} bytes after 120 s"
    blaster = blasters[0]
    expected = hashlib.sha256()
    for _ in range(total // len(blaster.chunk)):
        expected.update(blaster.chunk)
    assert reader.received == total
    assert reader.digest.hexdigest() == expected.hexdigest()
    assert peak < 2 * 1024 * 1024, f"the proxy buffered {peak} bytes for a slow client"
    reader.transport.loseConnection()


async def steadyFileDescriptors(polls: int = 5, timeout: float = 5.0) -> int:
    """
    This process's descriptor count once it is the same C{polls} times in
    a row, 20 ms apart: what earlier tests aborted has finished closing.
    """
    counts = [openFileDescriptors()]

    def steady() -> bool:
        counts.append(openFileDescriptors())
        return len(counts) >= polls and len(set(counts[-polls:])) == 1

    assert await until(steady, timeout, interval=0.02), f"the descriptor count keeps changing: {counts[-polls:]}"
    return counts[-1]


@pytest_twisted.ensureDeferred
async def test_no_file_descriptors_left_after_1000_connections(cleanup):
    def answer(request, connection):
        if b"Upgrade: websocket" in request:
            return switching()
        return ok()

    upstream, _ = listenScripted(answer, closeAfter=False)
    cleanup.port(upstream)
    proxy = await startProxyFor(cleanup, upstream.getHost().port)
    port = proxy.ports[0]
    before = await steadyFileDescriptors()
    for _ in range(20):
        clients = []
        for i in range(50):
            client = await connectRaw(port)
            if i % 2:
                client.transport.write(upgradeRequest())
            else:
                client.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            clients.append(client)
        for client in clients:
            await client.waitFor(b"\r\n\r\n")
            client.transport.loseConnection()
        for client in clients:
            await client.closed
    # Kept-alive upstream connections stay open by design: two descriptors
    # each in this process (the proxy's end and the upstream's end).
    pool = proxy.pools["app"]

    def allowed() -> int:
        return before + 2 * sum(len(server.idle) for server in pool.servers)

    for _ in range(300):
        if not proxy.listeners[0].proxyFactory.connections and openFileDescriptors() <= allowed():
            break
        await sleep(0.05)
    assert not proxy.listeners[0].proxyFactory.connections
    assert sum(len(server.idle) for server in pool.servers) <= pool.upstream.keepalive
    assert openFileDescriptors() <= allowed()
