"""
What metrics cost: proxied HTTP requests and 64-byte tunnel messages per
second through an in-process L{wsproxy.listeners.ProxyService}, with
C{[metrics]} off and on, and the ratio (on / off).

Everything runs in one process and one reactor (client, proxy, upstream),
so the figures are far below those of C{benchmarks/run.py}; only the ratio
matters.  Rates are per second of this process's CPU time, not of the
wall clock, so that other load on a shared machine counts less.  Runs alternate off/on to spread the noise of a shared machine
evenly, after one unrecorded pair to warm up, and each side's median is
reported.

Run: C{PYTHONPATH=. python benchmarks/metrics_cost.py [--requests N]
[--messages N] [--rounds R]}.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import react

from wsproxy import parseConfig
from wsproxy.listeners import ProxyService
from wsproxy.metrics import ProxyMetrics

LOOPBACK = "127.0.0.1"
BODY = b"hello from upstream\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%b" % (len(BODY), BODY)
REQUEST = b"GET /bench HTTP/1.1\r\nHost: bench\r\nUser-Agent: metrics_cost\r\n\r\n"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
#: A masked binary frame with a 64-byte payload; the upstream echoes bytes as they come.
FRAME = b"\x82\xc0\x01\x02\x03\x04" + bytes(64)
CONNECTIONS = 8


class Upstream(Protocol):
    """Answers each GET with L{RESPONSE}; after an upgrade, echoes every byte."""

    def connectionMade(self) -> None:
        self.pending = b""
        self.echoing = False

    def dataReceived(self, data: bytes) -> None:
        if self.echoing:
            self.transport.write(data)
            return
        self.pending += data
        answers = []
        while (end := self.pending.find(b"\r\n\r\n")) >= 0:
            head, self.pending = self.pending[: end + 4], self.pending[end + 4 :]
            if b"Upgrade: websocket" in head:
                self.transport.write(b"".join(answers) + SWITCHED)
                self.echoing = True
                if self.pending:
                    self.transport.write(self.pending)
                return
            answers.append(RESPONSE)
        if answers:
            self.transport.write(b"".join(answers))


def _next(shared: dict[str, Any], transport: Any, data: bytes) -> None:
    """One answer is in: send the next, if any are left, or say that all are in."""
    shared["answered"] += 1
    if shared["sent"] < shared["count"]:
        shared["sent"] += 1
        transport.write(data)
    elif shared["answered"] == shared["count"]:
        shared["done"].callback(None)


class Requester(Protocol):
    """Sends one request at a time on a kept-alive connection, C{count} in all (with the other requesters)."""

    def __init__(self, shared: dict[str, Any], expected: int) -> None:
        self.shared = shared
        self.expected = expected
        self.received = 0

    def connectionMade(self) -> None:
        self.transport.write(REQUEST)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        while self.received >= self.expected:
            self.received -= self.expected
            self._answered()

    def _answered(self) -> None:
        _next(self.shared, self.transport, REQUEST)


class Messenger(Protocol):
    """Upgrades, then keeps one 64-byte frame in flight, C{count} in all (with the other messengers)."""

    def __init__(self, shared: dict[str, Any]) -> None:
        self.shared = shared
        self.switched = False
        self.received = 0

    def connectionMade(self) -> None:
        self.transport.write(UPGRADE)

    def dataReceived(self, data: bytes) -> None:
        if not self.switched:
            self.switched = True  # the 101 arrives in one piece on loopback
            self.shared["open"].append(self)
            if len(self.shared["open"]) == CONNECTIONS:
                self.shared["ready"].callback(None)
            return
        self.received += len(data)
        while self.received >= len(FRAME):
            self.received -= len(FRAME)
            _next(self.shared, self.transport, FRAME)


async def startProxy(reactor: Any, upstreamPort: int, metrics: bool) -> tuple[ProxyService, int]:
    document: dict[str, Any] = {
        "upstream": {"app": {"servers": [f"{LOOPBACK}:{upstreamPort}"], "keepalive": 64}},
        "server": [{"listen": f"tcp:0:interface={LOOPBACK}", "proxy_pass": "http://app", "access_log": False}],
        "shutdown_timeout": 1,
    }
    if metrics:
        document["metrics"] = {"listen": f"tcp:0:interface={LOOPBACK}"}
    service = ProxyService(parseConfig(document, source="(benchmark)"), reactor)
    service.startService()
    port = await service.listeners[0].listeningPort()
    return service, port.getHost().port


async def requestsPerSecond(reactor: Any, proxyPort: int, count: int) -> float:
    shared: dict[str, Any] = {"count": count, "sent": CONNECTIONS, "answered": 0, "done": Deferred()}
    expected = len(RESPONSE)
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, proxyPort)
    started = time.process_time()
    clients = [await connectProtocol(endpoint, Requester(shared, expected)) for _ in range(CONNECTIONS)]
    await shared["done"]
    elapsed = time.process_time() - started
    for client in clients:
        client.transport.loseConnection()
    return count / elapsed


async def messagesPerSecond(reactor: Any, proxyPort: int, count: int) -> float:
    shared: dict[str, Any] = {"count": count, "sent": CONNECTIONS, "answered": 0, "done": Deferred()}
    shared.update(ready=Deferred(), open=[])
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, proxyPort)
    for _ in range(CONNECTIONS):
        await connectProtocol(endpoint, Messenger(shared))
    await shared["ready"]
    started = time.process_time()
    for client in shared["open"]:
        client.transport.write(FRAME)
    await shared["done"]
    elapsed = time.process_time() - started
    for client in shared["open"]:
        client.transport.loseConnection()
    return count / elapsed


async def main(reactor: Any, options: argparse.Namespace) -> None:
    factory = Factory.forProtocol(Upstream)
    factory.noisy = False
    upstream = reactor.listenTCP(0, factory, interface=LOOPBACK)
    rates: dict[tuple[str, bool], list[float]] = {}
    try:
        for round in range(-1, options.rounds):
            for metrics in (False, True) if round % 2 == 0 else (True, False):
                service, port = await startProxy(reactor, upstream.getHost().port, metrics)
                try:
                    http = await requestsPerSecond(reactor, port, options.requests)
                    ws = await messagesPerSecond(reactor, port, options.messages)
                finally:
                    await service.stopService()
                if round < 0:
                    continue  # warming up
                rates.setdefault(("http", metrics), []).append(http)
                rates.setdefault(("ws", metrics), []).append(ws)
                print(f"round {round + 1} metrics {'on ' if metrics else 'off'}: {http:8.0f} req/s  {ws:8.0f} msg/s")
    finally:
        await upstream.stopListening()
    for name, unit in (("http", "HTTP requests/s"), ("ws", "64 B messages/s")):
        off = statistics.median(rates[(name, False)])
        on = statistics.median(rates[(name, True)])
        print(f"{unit:>16}: off {off:8.0f}  on {on:8.0f}  ratio on/off {on / off:.3f}")
    print(f"recording one proxied request (both calls): {recordingCost(reactor) * 1e6:.2f} µs")


def recordingCost(reactor: Any, calls: int = 200000) -> float:
    """Seconds of what a proxied request records: its response head, then its end."""
    place = ProxyMetrics(None, reactor).place("tcp:8080", "example.com", "/", "app")
    started = reactor.seconds()

    def once() -> None:
        place.responseHead(started)
        place.requestEnded(200, started, None)

    return timeit.timeit(once, number=calls) / calls


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="proxied GETs per run")
    parser.add_argument("--messages", type=int, default=50000, help="64-byte messages per run")
    parser.add_argument("--rounds", type=int, default=6, help="runs with metrics off and on, each")
    arguments = parser.parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
