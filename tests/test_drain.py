"""
A drain that speaks WebSocket: the frame tracker on pure input (split at
every byte offset), and on real sockets, plain and TLS, a proxy that ends
its tunnels with a 1001 Close frame at a frame boundary each way, with
autobahn on both ends (large and fragmented messages in flight: a Close
inside a frame would make autobahn fail the connection), and a TCP close
for what is not WebSocket.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from support import (
    LOOPBACK,
    RawClient,
    connectRaw,
    listenScripted,
    proxyTo,
    startProxy,
    stillAfter,
    switching,
    until,
    upgradeRequest,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS

from wsproxy import parseConfig
from wsproxy.config import ConfigError
from wsproxy.demo import EchoProtocol, echoFactory
from wsproxy.frames import GOING_AWAY, NO_STATUS, FrameTracker, closeFrame
from wsproxy.tunnel import Tunnel, tunnelOf

MASK = b"\x37\xfa\x21\x3d"


def frame(opcode: int, payload: bytes, final: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """A frame as RFC 6455 §5.2 lays it out, with the shortest length encoding."""
    head = bytes([(0x80 if final else 0) | rsv | opcode])
    bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        head += bytes([bit | size])
    elif size < 65536:
        head += bytes([bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def stream(masked: bool) -> tuple[bytes, list[int]]:
    """
    Frames of every kind, and the offsets where each ends: small data
    frames (one with a deflate RSV bit), 16-bit lengths, a fragmented
    message with a ping and a pong between its fragments, an empty frame,
    and a Close with status 1000 last.
    """
    frames = [
        frame(0x1, b"hello", masked=masked),
        frame(0x2, bytes(range(64)), masked=masked, rsv=0x40),
        frame(0x2, os.urandom(300), masked=masked),
        frame(0x1, b"frag", final=False, masked=masked),
        frame(0x9, b"ping", masked=masked),
        frame(0x0, os.urandom(200), final=False, masked=masked),
        frame(0xA, b"", masked=masked),
        frame(0x0, b"end", masked=masked),
        frame(0x2, b"", masked=masked),
        frame(0x8, (1000).to_bytes(2, "big") + b"bye", masked=masked),
    ]
    ends, position = [], 0
    for one in frames:
        position += len(one)
        ends.append(position)
    return b"".join(frames), ends


# The tracker on pure input


@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_boundaries_known_at_every_split(masked):
    data, ends = stream(masked)
    for split in range(len(data) + 1):
        tracker = FrameTracker(masked)
        tracker.feed(data[:split])
        assert tracker.atBoundary == (split == 0 or split in ends), split
        assert tracker.closed == (split >= ends[-1])
        tracker.feed(data[split:])
        assert tracker.failed is None
        assert tracker.atBoundary and not tracker.inMessage
        assert tracker.closed and tracker.closeCode == 1000


@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_one_byte_at_a_time(masked):
    data, ends = stream(masked)
    tracker = FrameTracker(masked)
    betweenFragments = ends[3:7]
    for position in range(len(data)):
        tracker.feed(data[position : position + 1])
        assert tracker.atBoundary == (position + 1 in ends), position
        if tracker.atBoundary:
            assert tracker.inMessage == (position + 1 in betweenFragments), position
    assert tracker.closeCode == 1000


@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_until_boundary_stops_at_the_end_of_the_frame_in_progress(masked):
    data, ends = stream(masked)
    for split in range(len(data)):
        tracker = FrameTracker(masked)
        tracker.feed(data[:split])
        through = tracker.untilBoundary(data[split:])
        following = 0 if split in ends or split == 0 else next(end for end in ends if end > split)
        assert through == (following - split if following else 0), split
        assert tracker.atBoundary
        tracker.feed(data[split + through :])
        assert tracker.atBoundary and tracker.closeCode == 1000


def test_until_boundary_of_a_frame_that_goes_on():
    big = frame(0x2, os.urandom(70000))
    tracker = FrameTracker(masked=True)
    assert tracker.untilBoundary(big[:5]) == 0, "at a boundary nothing belongs to a frame in progress"
    tracker.feed(big[:5])
    assert tracker.untilBoundary(big[5:1000]) == 995
    assert not tracker.atBoundary
    assert tracker.untilBoundary(big[1000:] + b"\x81") == len(big) - 1000
    assert tracker.atBoundary


def test_64_bit_lengths_and_large_chunks():
    data = frame(0x2, os.urandom(70000)) + frame(0x1, b"x" * 200) + frame(0x2, os.urandom(65536))
    for size in (1, 7, 1000, 65536, len(data)):
        tracker = FrameTracker(masked=True)
        for start in range(0, len(data), size):
            tracker.feed(data[start : start + size])
        assert tracker.atBoundary and tracker.failed is None


def test_close_codes():
    tracker = FrameTracker(masked=True)
    seen = []
    tracker.onClose = seen.append
    tracker.feed(frame(0x8, b""))
    assert (tracker.closed, tracker.closeCode, seen) == (True, NO_STATUS, [NO_STATUS])
    tracker.feed(frame(0x8, (4000).to_bytes(2, "big")))
    assert tracker.closeCode == NO_STATUS and seen == [NO_STATUS], "the first close code is kept"
    server = FrameTracker(masked=False)
    server.feed(closeFrame(GOING_AWAY, masked=False, reason=b"going away"))
    assert server.closeCode == GOING_AWAY
    client = FrameTracker(masked=True)
    client.feed(closeFrame(GOING_AWAY, masked=True))
    assert client.closeCode == GOING_AWAY
    assert closeFrame(GOING_AWAY, masked=False) == b"\x88\x02\x03\xe9"


@pytest.mark.parametrize(
    "masked, data",
    [
        (True, frame(0x1, b"hi", masked=False)),
        (False, frame(0x1, b"hi", masked=True)),
        (True, frame(0x3, b"hi")),
        (True, frame(0xB, b"")),
        (True, frame(0x0, b"hi")),
        (True, frame(0x1, b"a", final=False) + frame(0x1, b"b")),
        (True, frame(0x9, b"x" * 126)),
        (True, frame(0x9, b"x", final=False)),
        (True, frame(0x8, b"\x03")),
        (True, b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"),
        (True, b"\x82\xff\x80" + bytes(7) + MASK),
    ],
    ids=[
        "unmasked-from-client",
        "masked-from-server",
        "reserved-data-opcode",
        "reserved-control-opcode",
        "continuation-outside-message",
        "new-message-inside-fragmented",
        "long-control",
        "fragmented-control",
        "one-byte-close",
        "http",
        "64-bit-top-bit",
    ],
)
def test_invalid_framing_gives_up(masked, data):
    for split in range(len(data) + 1):
        tracker = FrameTracker(masked)
        tracker.feed(frame(0x2, b"fine", masked=masked))
        tracker.feed(data[:split])
        tracker.feed(data[split:])
        assert tracker.failed is not None, split
        assert not tracker.atBoundary
        tracker.feed(b"\x81\x00" * 10)
        assert tracker.untilBoundary(b"more") == 4


# The configuration


def test_configuration_keys():
    base = {
        "upstream": {"app": {"servers": ["127.0.0.1:1"]}},
        "server": [{"listen": "tcp:0", "proxy_pass": "http://app"}],
    }
    config = parseConfig(base, "t.toml")
    assert (config.websocket_close_timeout, config.websocket_drain_close_after) == (5.0, None)
    config = parseConfig({**base, "websocket_close_timeout": "2s", "websocket_drain_close_after": True}, "t.toml")
    assert (config.websocket_close_timeout, config.websocket_drain_close_after) == (2.0, 0.0)
    config = parseConfig({**base, "websocket_drain_close_after": "1m"}, "t.toml")
    assert config.websocket_drain_close_after == 60.0
    assert parseConfig({**base, "websocket_drain_close_after": False}, "t.toml").websocket_drain_close_after is None
    with pytest.raises(ConfigError) as caught:
        parseConfig({**base, "websocket_drain_close_after": "soon"}, "t.toml")
    assert str(caught.value) == (
        "t.toml: (top level).websocket_drain_close_after: not a duration: 'soon' (use 30, 30s, 10m, 500ms)"
    )
    with pytest.raises(ConfigError) as caught:
        parseConfig({**base, "websocket_close_timeout": -1}, "t.toml")
    assert str(caught.value) == "t.toml: (top level).websocket_close_timeout: must not be negative"


# Real peers


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, Any]:
    """A certificate for 127.0.0.1 and the client options that trust it."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    certificate, key = tmp_path / "server.pem", tmp_path / "server.key"
    certificate.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca.cert_pem.bytes()))
    return {"block": {"ssl_certificate": str(certificate), "ssl_certificate_key": str(key)}, "client": options}


@pytest.fixture(params=["plain", "tls"])
def listener(request, tls) -> dict[str, Any]:
    """The block settings and client TLS options (or C{None}) of a plain or a TLS listener."""
    return tls if request.param == "tls" else {"block": {}, "client": None}


async def drainingProxy(cleanup, upstreamPort: int, listener: dict[str, Any], **topLevel: Any):
    upstreams, block = proxyTo(upstreamPort, **listener["block"])
    return cleanup.service(await startProxy(upstreams, block, **topLevel))


def tunnels(proxy) -> list[Tunnel]:
    return [t for t in map(tunnelOf, proxy.listeners[0].proxyFactory.connections) if t is not None]


class RecordingEcho(EchoProtocol):
    """Autobahn's echo, remembering how each connection closed."""

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closes.append((wasClean, code))


def listenRecordingEcho(cleanup, fragmentSize: int = 8192):
    """An autobahn echo that sends its messages in fragments of C{fragmentSize}."""
    factory = echoFactory(f"ws://{LOOPBACK}/ws", autoFragmentSize=fragmentSize)
    factory.protocol = RecordingEcho
    factory.closes = []
    return cleanup.port(reactor.listenTCP(0, factory, interface=LOOPBACK)), factory


class StreamingClient(WebSocketClientProtocol):
    """
    Keeps two large binary messages in flight (sent in fragments), sending
    another each time one comes back, and checks each echo.
    """

    def onOpen(self) -> None:
        self.factory.client = self
        self.factory.opened.callback(self)
        self.sent: list[bytes] = []
        for _ in range(2):
            self.sendOne()

    def sendOne(self) -> None:
        payload = os.urandom(self.factory.messageSize)
        self.sent.append(payload)
        self.sendMessage(payload, isBinary=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert payload == self.sent.pop(0)
        self.factory.echoed += 1
        self.sendOne()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closed.callback((wasClean, code))


async def connectStreaming(port: int, listener: dict[str, Any], messageSize: int = 300_000) -> WebSocketClientFactory:
    scheme = "wss" if listener["client"] is not None else "ws"
    factory = WebSocketClientFactory(f"{scheme}://{LOOPBACK}:{port}/ws")
    factory.protocol = StreamingClient
    factory.setProtocolOptions(autoFragmentSize=16384)
    factory.opened, factory.closed = Deferred(), Deferred()
    factory.echoed, factory.messageSize = 0, messageSize
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, port)
    if listener["client"] is not None:
        endpoint = wrapClientTLS(listener["client"], endpoint)
    await endpoint.connect(factory)
    await factory.opened.addTimeout(10, reactor)
    return factory


@pytest_twisted.ensureDeferred
async def test_autobahn_peers_get_1001_at_frame_boundaries_mid_stream(cleanup, listener):
    echo, echoes = listenRecordingEcho(cleanup)
    proxy = await drainingProxy(cleanup, echo.getHost().port, listener, shutdown_timeout=0.5)
    client = await connectStreaming(proxy.ports[0], listener, messageSize=1_000_000)
    assert await until(lambda: client.echoed >= 3, timeout=20), "messages flow through the tunnel"
    (tunnel,) = tunnels(proxy)
    # The client is between two fragments of a message when the drain
    # begins (RFC 6455 lets a Close come between them), while the echo
    # streams large fragmented messages back, so that the Close to the
    # client waits for the end of a frame.
    protocol = client.client
    protocol.onMessage = lambda payload, isBinary: None
    protocol.beginMessage(isBinary=True)
    protocol.beginMessageFrame(10_000)
    protocol.sendMessageFrameData(b"a" * 10_000)
    started = time.monotonic()
    stopping = proxy.stopService()
    assert await until(lambda: tunnel.goingAway is not None, timeout=5)
    assert tunnel.goingAway.midStream, "a fragmented message was under way"
    await stopping
    assert time.monotonic() - started < 0.5 + 1 + 1.5, "the handshake ends the drain, not the last call"
    assert await client.closed.addTimeout(5, reactor) == (True, GOING_AWAY)
    assert await until(lambda: echoes.closes, timeout=5)
    assert echoes.closes == [(True, GOING_AWAY)]
    assert (tunnel.closeCode, tunnel.closeFrom) == (GOING_AWAY, "proxy")


@pytest_twisted.ensureDeferred
async def test_drain_close_after_sends_1001_before_the_shutdown_timeout(cleanup, listener):
    echo, echoes = listenRecordingEcho(cleanup)
    proxy = await drainingProxy(
        cleanup, echo.getHost().port, listener, shutdown_timeout=60, websocket_drain_close_after="300ms"
    )
    client = await connectStreaming(proxy.ports[0], listener, messageSize=100_000)
    assert await until(lambda: client.echoed >= 2, timeout=20)
    started = time.monotonic()
    stopping = proxy.stopService()
    assert await stillAfter(0.2, lambda: not client.closed.called), "websocket_drain_close_after is waited for"
    assert await client.closed.addTimeout(10, reactor) == (True, GOING_AWAY)
    await stopping
    assert time.monotonic() - started < 10, "the tunnel did not wait for shutdown_timeout"
    assert await until(lambda: echoes.closes, timeout=5)
    assert echoes.closes == [(True, GOING_AWAY)]


@pytest_twisted.ensureDeferred
async def test_without_close_after_the_tunnel_gets_the_shutdown_timeout(cleanup, listener):
    echo, echoes = listenRecordingEcho(cleanup)
    proxy = await drainingProxy(cleanup, echo.getHost().port, listener, shutdown_timeout=1.5)
    client = await connectStreaming(proxy.ports[0], listener, messageSize=1000)
    stopping = proxy.stopService()
    assert await stillAfter(1.0, lambda: not client.closed.called), "the tunnel is given shutdown_timeout"
    echoedBefore = client.echoed
    assert await client.closed.addTimeout(10, reactor) == (True, GOING_AWAY)
    await stopping
    assert echoedBefore > 0, "messages kept flowing during the drain period"


@pytest_twisted.ensureDeferred
async def test_a_close_already_under_way_is_relayed_and_its_code_recorded(cleanup, listener):
    echo, echoes = listenRecordingEcho(cleanup)
    proxy = await drainingProxy(cleanup, echo.getHost().port, listener)
    client = await connectStreaming(proxy.ports[0], listener, messageSize=10)
    (tunnel,) = tunnels(proxy)
    client.client.sendClose(4000, "done")
    wasClean, _ = await client.closed.addTimeout(5, reactor)
    assert wasClean
    assert (tunnel.closeCode, tunnel.closeFrom) == (4000, "client")


class QuietClient(WebSocketClientProtocol):
    """Opens the WebSocket and sends nothing."""

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closed.callback((wasClean, code))


@pytest_twisted.ensureDeferred
async def test_a_tunnel_that_never_carried_a_message_gets_1001_both_ways(cleanup, listener):
    """
    The frame trackers of a tunnel are made when its first byte passes; a
    drain of a tunnel that carried none still knows both directions are at
    a frame boundary, and closes each with its own Close.
    """
    echo, echoes = listenRecordingEcho(cleanup)
    proxy = await drainingProxy(cleanup, echo.getHost().port, listener, shutdown_timeout=0.5)
    scheme = "wss" if listener["client"] is not None else "ws"
    factory = WebSocketClientFactory(f"{scheme}://{LOOPBACK}:{proxy.ports[0]}/ws")
    factory.protocol = QuietClient
    factory.opened, factory.closed = Deferred(), Deferred()
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, proxy.ports[0])
    if listener["client"] is not None:
        endpoint = wrapClientTLS(listener["client"], endpoint)
    await endpoint.connect(factory)
    await factory.opened.addTimeout(10, reactor)
    (tunnel,) = tunnels(proxy)
    await proxy.stopService()
    assert await factory.closed.addTimeout(5, reactor) == (True, GOING_AWAY)
    assert await until(lambda: echoes.closes, timeout=5)
    assert echoes.closes == [(True, GOING_AWAY)]
    assert (tunnel.closeCode, tunnel.closeFrom) == (GOING_AWAY, "proxy")


def parseClose(data: bytes) -> tuple[bool, int]:
    """Whether C{data} is exactly one Close frame, masked or not, and its code."""
    assert data[0] == 0x88, data
    masked, length = bool(data[1] & 0x80), data[1] & 0x7F
    key, payload = (data[2:6], data[6:]) if masked else (b"\0\0\0\0", data[2:])
    assert len(payload) == length, data
    payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return masked, int.from_bytes(payload[:2], "big")


async def rawTunnel(proxy, listener: dict[str, Any], request: bytes) -> RawClient:
    if listener["client"] is None:
        client = await connectRaw(proxy.ports[0])
    else:
        endpoint = wrapClientTLS(listener["client"], TCP4ClientEndpoint(reactor, LOOPBACK, proxy.ports[0]))
        client = await connectProtocol(endpoint, RawClient())
    client.transport.write(request)
    await client.waitFor(b"\r\n\r\n")
    return client


@pytest_twisted.ensureDeferred
async def test_the_close_waits_for_the_frame_in_progress_each_way(cleanup, listener):
    upstream, upstreams = listenScripted(switching(), closeAfter=False)
    cleanup.port(upstream)
    proxy = await drainingProxy(
        cleanup, upstream.getHost().port, listener, websocket_drain_close_after=True, websocket_close_timeout=5
    )
    client = await rawTunnel(proxy, listener, upgradeRequest())
    head = client.received
    connection = upstreams.connections[0]
    sent = connection.received
    toUpstream, toClient = frame(0x2, b"0123456789"), frame(0x2, b"abcdefghij", masked=False)
    client.transport.write(toUpstream[:9])
    connection.transport.write(toClient[:5])
    assert await until(lambda: connection.received == sent + toUpstream[:9] and len(client.received) == len(head) + 5)
    (tunnel,) = tunnels(proxy)

    stopping = proxy.stopService()
    assert await until(lambda: tunnel.goingAway is not None)
    assert await stillAfter(0.3, lambda: len(client.received) == len(head) + 5), "no Close inside a frame"
    assert connection.received == sent + toUpstream[:9]

    client.transport.write(toUpstream[9:] + frame(0x1, b"dropped"))
    connection.transport.write(toClient[5:] + frame(0x1, b"dropped", masked=False))
    closeSize = len(closeFrame(GOING_AWAY, masked=True, reason=b"going away"))
    expected = len(sent) + len(toUpstream) + closeSize
    assert await until(lambda: client.received.endswith(b"going away") and len(connection.received) >= expected)
    assert await stillAfter(0.2, lambda: len(connection.received) == expected), "nothing follows the Close"
    assert client.received == head + toClient + closeFrame(GOING_AWAY, masked=False, reason=b"going away")
    toUpstreamClose = connection.received[len(sent) + len(toUpstream) :]
    assert connection.received[len(sent) : len(sent) + len(toUpstream)] == toUpstream
    assert parseClose(toUpstreamClose) == (True, GOING_AWAY)

    # The replies finish the handshakes: the client's connection is closed
    # by the proxy, the upstream's once it has replied too.
    client.transport.write(frame(0x8, (1001).to_bytes(2, "big")))
    assert await client.waitClosed(timeout=3) is not None
    assert not connection.lost.called, "the upstream has not replied yet"
    connection.transport.write(frame(0x8, (1001).to_bytes(2, "big"), masked=False))
    await connection.lost.addTimeout(3, reactor)
    await stopping
    assert (tunnel.closeCode, tunnel.closeFrom) == (GOING_AWAY, "proxy")


@pytest_twisted.ensureDeferred
async def test_peers_that_do_not_reply_are_closed_after_websocket_close_timeout(cleanup, listener):
    upstream, upstreams = listenScripted(switching(), closeAfter=False)
    cleanup.port(upstream)
    proxy = await drainingProxy(
        cleanup, upstream.getHost().port, listener, websocket_drain_close_after=True, websocket_close_timeout=0.5
    )
    client = await rawTunnel(proxy, listener, upgradeRequest())
    started = time.monotonic()
    stopping = proxy.stopService()
    assert await until(lambda: client.received.endswith(b"going away"))
    assert await client.waitClosed(timeout=5) is not None
    assert time.monotonic() - started >= 0.4
    await upstreams.connections[0].lost.addTimeout(5, reactor)
    await stopping


@pytest_twisted.ensureDeferred
async def test_a_non_websocket_upgrade_falls_back_to_a_tcp_close(cleanup, listener):
    granted = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw-bytes\r\nConnection: Upgrade\r\n\r\n" + frame(
        0x1, b"x", masked=False
    )
    upstream, upstreams = listenScripted(granted, closeAfter=False)
    cleanup.port(upstream)
    upstreamsTable, block = proxyTo(upstream.getHost().port, upgrade_protocols=["raw-bytes"], **listener["block"])
    proxy = cleanup.service(
        await startProxy(upstreamsTable, block, websocket_drain_close_after=True, websocket_close_timeout=30)
    )
    request = b"GET /raw HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: raw-bytes\r\n\r\n"
    client = await rawTunnel(proxy, listener, request)
    (tunnel,) = tunnels(proxy)
    started = time.monotonic()
    await proxy.stopService()
    assert time.monotonic() - started < 5, "no close handshake is waited for"
    received = await client.waitClosed(timeout=5)
    assert received is not None and b"\x88" not in received.split(b"\r\n\r\n", 1)[1]
    await upstreams.connections[0].lost.addTimeout(5, reactor)
    assert b"\x88" not in upstreams.connections[0].received.split(b"\r\n\r\n", 1)[1]
    assert tunnel.closeCode is None


@pytest_twisted.ensureDeferred
async def test_invalid_framing_falls_back_to_a_tcp_close(cleanup, listener):
    upstream, upstreams = listenScripted(switching(), closeAfter=False)
    cleanup.port(upstream)
    proxy = await drainingProxy(
        cleanup, upstream.getHost().port, listener, websocket_drain_close_after=True, websocket_close_timeout=30
    )
    client = await rawTunnel(proxy, listener, upgradeRequest())
    head = client.received
    client.transport.write(frame(0x1, b"unmasked", masked=False))
    connection = upstreams.connections[0]
    assert await until(lambda: connection.received.endswith(b"unmasked"))
    started = time.monotonic()
    await proxy.stopService()
    assert time.monotonic() - started < 5
    assert await client.waitClosed(timeout=5) == head
    await connection.lost.addTimeout(5, reactor)
    assert connection.received.endswith(b"unmasked")


@pytest_twisted.ensureDeferred
async def test_a_location_without_frame_tracking_falls_back_to_a_tcp_close(cleanup, listener):
    upstream, upstreams = listenScripted(switching(), closeAfter=False)
    cleanup.port(upstream)
    table, block = proxyTo(upstream.getHost().port, websocket_frame_tracking=False, **listener["block"])
    proxy = cleanup.service(
        await startProxy(table, block, websocket_drain_close_after=True, websocket_close_timeout=30)
    )
    client = await rawTunnel(proxy, listener, upgradeRequest())
    head = client.received
    sent = frame(0x1, b"tracked?", masked=True)
    client.transport.write(sent)
    connection = upstreams.connections[0]
    assert await until(lambda: connection.received.endswith(sent))
    (tunnel,) = tunnels(proxy)
    assert tunnel._fromClient.frames is None
    started = time.monotonic()
    await proxy.stopService()
    assert time.monotonic() - started < 5, "no close handshake is waited for"
    assert await client.waitClosed(timeout=5) == head
    await connection.lost.addTimeout(5, reactor)
    assert connection.received.split(b"\r\n\r\n", 1)[1] == sent, "no Close frame was added"


@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_runs_of_alike_frames_and_one_that_differs(masked):
    alike = frame(0x2, b"y" * 64, masked=masked)
    # A Close of the same size as the others, then a text frame of that size
    # too: the run check must not jump over either.
    odd = frame(0x8, (1000).to_bytes(2, "big") + b"z" * 62, masked=masked)
    text = frame(0x1, b"t" * 64, masked=masked)
    data = alike * 5 + text + alike * 3 + odd + alike * 4
    ends = [len(alike) * (i + 1) for i in range(len(data) // len(alike))]
    for split in range(len(data) + 1):
        tracker = FrameTracker(masked)
        tracker.feed(data[:split])
        assert tracker.atBoundary == (split == 0 or split in ends), split
        tracker.feed(data[split:])
        assert tracker.atBoundary and tracker.closeCode == 1000, split
    broken = alike * 3 + frame(0x3, b"r" * 64, masked=masked) + alike * 3
    tracker = FrameTracker(masked)
    tracker.feed(broken)
    assert tracker.failed is not None
