"""
The floor under wsproxy's per-request and per-handshake figures: the CPU a
Twisted relay that knows nothing of HTTP spends on the same traffic, next to
wsproxy's, in the same run.

The relay gives each client connection its own upstream connection and
passes bytes as they are, sent straight to the socket; no parsing, no
routing, no timers.  Whatever wsproxy spends above it is HTTP; what the
relay spends is Twisted's and the kernel's, and no proxy written on Twisted
goes below it.

Run: ``python benchmarks/floor.py [--requests N] [--handshakes N]``.
The proxy under test runs in this process, pinned to CPU 0; the clients and
the upstream run in a child process pinned to CPU 1 (``--serve-peer``).
Every run is bounded by its count and by ``--timeout``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import socket
import subprocess
import sys
import time
from typing import Any

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
GET = b"GET /some/path?x=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: floor\r\nAccept: */*\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nhi"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + base64.b64encode(hashlib.sha1(KEY + GUID).digest()) + b"\r\n\r\n"
)
CONNECTIONS = 10


def servePeer(upstreamPort: int) -> None:
    """
    The child: an upstream that answers every GET with C{OK} and every
    upgrade with C{SWITCHED}, and clients that run what the parent asks on
    stdin (C{"get PORT N"}: N keep-alive GETs over 10 connections;
    C{"upgrade PORT N"}: N upgrades, each on a new connection, closed once
    the 101 is in), then exit.
    """
    from twisted.internet import protocol, reactor

    class Upstream(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            answer = SWITCHED if b"Upgrade:" in data else OK
            self.transport.write(answer * data.count(b"\r\n\r\n"))

    reactor.listenTCP(upstreamPort, protocol.Factory.forProtocol(Upstream), interface="127.0.0.1")
    print("ready", flush=True)
    kind, port, count = sys.stdin.readline().split()
    port, count = int(port), int(count)
    done = [0]

    class Getter(protocol.Protocol):
        def connectionMade(self) -> None:
            self.buffer = b""
            self.transport.write(GET)

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"hi")) >= 0:
                self.buffer = self.buffer[end + 2 :]
                done[0] += 1
                if done[0] == count:
                    reactor.stop()
                if done[0] + CONNECTIONS <= count:
                    self.transport.write(GET)

    class Upgrader(protocol.Protocol):
        def connectionMade(self) -> None:
            self.buffer = b""
            self.transport.write(UPGRADE)

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            if b"\r\n\r\n" in self.buffer:
                self.transport.loseConnection()

        def connectionLost(self, reason: Any) -> None:
            done[0] += 1
            if done[0] == count:
                reactor.stop()
            elif done[0] + CONNECTIONS <= count:
                connect(Upgrader)

    client = protocol.ClientFactory()
    client.noisy = False

    def connect(kind: type[protocol.Protocol]) -> None:
        client.protocol = kind
        reactor.connectTCP("127.0.0.1", port, client)

    for _ in range(CONNECTIONS):
        connect(Getter if kind == "get" else Upgrader)
    reactor.run()


def rawRelay(reactor: Any, upstreamPort: int) -> Any:
    """The floor: a byte relay, one upstream connection per client connection."""
    from twisted.internet import protocol

    class ToUpstream(protocol.Protocol):
        def __init__(self, client: FromClient) -> None:
            self.client = client

        def connectionMade(self) -> None:
            self.client.upstream = self
            if self.client.pending:
                self.transport.socket.send(self.client.pending)
                self.client.pending = b""

        def dataReceived(self, data: bytes) -> None:
            self.client.transport.socket.send(data)

        def connectionLost(self, reason: Any) -> None:
            self.client.transport.loseConnection()

    class FromClient(protocol.Protocol):
        upstream: ToUpstream | None = None
        pending = b""

        def connectionMade(self) -> None:
            factory = protocol.ClientFactory()
            factory.noisy = False
            factory.buildProtocol = lambda addr: ToUpstream(self)
            reactor.connectTCP("127.0.0.1", upstreamPort, factory)

        def dataReceived(self, data: bytes) -> None:
            if self.upstream is None:
                self.pending += data
            else:
                self.upstream.transport.socket.send(data)

        def connectionLost(self, reason: Any) -> None:
            if self.upstream is not None:
                self.upstream.transport.loseConnection()

    return reactor.listenTCP(0, protocol.Factory.forProtocol(FromClient), interface="127.0.0.1").getHost().port


def wsproxy(reactor: Any, upstreamPort: int) -> Any:
    """wsproxy, started as a Twisted service on a port of its own choosing."""
    from wsproxy import parseConfig
    from wsproxy.listeners import ProxyService

    document = {
        "upstream": {"app": {"servers": [f"127.0.0.1:{upstreamPort}"]}},
        "server": [{"listen": "tcp:0:interface=127.0.0.1", "proxy_pass": "http://app", "access_log": False}],
    }
    service = ProxyService(parseConfig(document, "floor"), reactor)
    service.startService()
    return service.listeners[0].listeningPort().addCallback(lambda port: port.getHost().port)


def measure(proxy: str, kind: str, count: int, timeout: float) -> float:
    """CPU µs this process spends per GET or upgrade, with C{proxy} in it."""
    from twisted.internet import defer, reactor

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    upstreamPort = probe.getsockname()[1]
    probe.close()
    peer = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, __file__, "--serve-peer", str(upstreamPort)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert peer.stdout is not None and peer.stdin is not None
    peer.stdout.readline()
    result: list[float] = []

    def started(port: int) -> None:
        peer.stdin.write(f"{kind} {port} {count}\n".encode())
        peer.stdin.flush()
        began, deadline = time.process_time(), time.monotonic() + timeout

        def poll() -> None:
            if peer.poll() is not None:
                result.append((time.process_time() - began) / count * 1e6)
                reactor.stop()
            elif time.monotonic() > deadline:
                peer.kill()
                reactor.stop()
            else:
                reactor.callLater(0.05, poll)

        poll()

    starter = rawRelay if proxy == "relay" else wsproxy
    defer.maybeDeferred(starter, reactor, upstreamPort).addCallback(started)
    reactor.run()
    if not result:
        raise SystemExit(f"{proxy} {kind}: not done within {timeout:g} s")
    return result[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30000, help="keep-alive GETs per run")
    parser.add_argument("--handshakes", type=int, default=10000, help="upgrades per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for one run")
    parser.add_argument("--serve-peer", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=2, metavar=("PROXY", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_peer:
        servePeer(args.serve_peer)
        return
    if args.one:
        proxy, kind = args.one
        count = args.requests if kind == "get" else args.handshakes
        print(f"{measure(proxy, kind, count, args.timeout):.1f}")
        return
    # Each measurement in a fresh, pinned process: a reactor runs once.
    figures: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for kind in ("get", "upgrade"):
            for proxy in ("relay", "wsproxy"):
                argv = ["taskset", "-c", "0", sys.executable, __file__, "--one", proxy, kind]
                argv += ["--requests", str(args.requests), "--handshakes", str(args.handshakes)]
                argv += ["--timeout", str(args.timeout)]
                out = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout + 30, env=os.environ)
                if out.returncode:
                    raise SystemExit(out.stderr.strip() or out.stdout.strip())
                figures.setdefault((proxy, kind), []).append(float(out.stdout.split()[-1]))
    print("proxy CPU per unit, medians of", args.rounds, "rounds (µs)")
    print(f"{'':24}{'relay (floor)':>14}{'wsproxy':>10}")
    for kind, label in (("get", "keep-alive GET"), ("upgrade", "plain handshake")):
        relay = sorted(figures["relay", kind])[len(figures["relay", kind]) // 2]
        proxied = sorted(figures["wsproxy", kind])[len(figures["wsproxy", kind]) // 2]
        print(f"{label:24}{relay:>14.1f}{proxied:>10.1f}")


if __name__ == "__main__":
    main()
