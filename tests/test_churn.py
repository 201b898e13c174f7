"""
Connection churn: 10,000 client connections opened and closed through a
real C{twistd wsproxy} process, plain requests and WebSocket upgrades
mixed, must leave no file descriptor and no significant memory behind.

Why a subprocess: a leak is only visible in the process that leaks.  The
proxy runs as an operator runs it (C{twistd -n wsproxy --config}), and its
open descriptors (C{/proc/PID/fd}) and resident memory (C{VmRSS}) are read
from outside after a warm-up of 1,000 connections and again after the
10,000, each time once the connections have settled.  The upstream
(an HTTP keep-alive responder and a one-frame WebSocket echo) and the
clients run on this test's reactor.

Why the upstream idle pool cannot hide a leak: the pool keeps idle
upstream connections (C{keepalive}) only for C{keepalive_timeout} = 1 s,
so once the churn has settled for longer than that the pool is empty both
times and the descriptor counts must be I{equal}, not merely close.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from support import (
    ENVIRONMENT,
    LOOPBACK,
    TWISTD,
    RawClient,
    connectRaw,
    listeningPortsOf,
    sleep,
    stillAfter,
    unsent,
    until,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

WARMUP = 1_000
CONNECTIONS = 10_000
BATCH = 100
#: Python's allocator keeps freed arenas and glibc keeps its heap top, so
#: some growth is not a leak; a leak of even 1 KiB per connection is 10 MiB.
RSS_GROWTH_LIMIT_KIB = 8 * 1024
SETTLE_SECONDS = 20.0
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = base64.b64encode(b"churn-churn-key!")
ECHO = b"hello"

#: Requests for C{/slow?TOKEN} on their way: the upstream fires its
#: L{Deferred} with C{True} once the request is in.
SLOW_ARRIVALS: dict[bytes, Deferred] = {}
SLOW_TOKENS = itertools.count()


# --------------------------------------------------------------------- upstream


class ChurnUpstream(Protocol):
    """
    One upstream connection: HTTP/1.1 keep-alive until an upgrade, then a
    WebSocket echo.  It does just enough for each way a connection can end:

      - C{GET /slow?TOKEN} answers after 0.2 s, so that a client can abort
        while the proxy is still waiting for the response head (the
        client learns from L{SLOW_ARRIVALS} that the request is in);
      - C{Connection: close} (which the proxy sends when it keeps no idle
        connections) is honoured;
      - after the upgrade, data frames are echoed; on C{/ws/upstream-closes}
        the upstream then sends a close frame and hangs up itself, otherwise
        it waits for the client's close frame, answers it and hangs up (the
        server closes the TCP connection first, RFC 6455 section 7.1.1).
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.websocket = False
        self.upstreamCloses = False
        self.delayed: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while not self.websocket and self.delayed is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            lines = head.split(b"\r\n")
            target = lines[0].split(b" ")[1]
            headers = {
                name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines[1:])
            }
            closing = headers.get(b"connection", b"").lower() == b"close"
            if headers.get(b"upgrade", b"").lower() == b"websocket":
                accept = base64.b64encode(hashlib.sha1(headers[b"sec-websocket-key"] + WS_GUID).digest())
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: %b\r\n\r\n" % accept
                )
                self.websocket = True
                self.upstreamCloses = target == b"/ws/upstream-closes"
            elif target.startswith(b"/slow?"):
                self.delayed = reactor.callLater(0.2, self._answer, closing)
                arrived = SLOW_ARRIVALS.pop(target.partition(b"?")[2], None)
                if arrived is not None:
                    arrived.callback(True)
            else:
                self._answer(closing)
        if self.websocket:
            self._frames()

    def _answer(self, closing: bool) -> None:
        self.delayed = None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n%b\r\nok" % (b"Connection: close\r\n" if closing else b"")
        )
        if closing:
            self.transport.loseConnection()
        elif self.buffer:
            self.dataReceived(b"")

    def _frames(self) -> None:
        """Echo each complete small masked frame; answer a close and hang up."""
        while len(self.buffer) >= 6:
            opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
            if len(self.buffer) < 6 + length:
                return
            mask, payload = self.buffer[2:6], self.buffer[6 : 6 + length]
            self.buffer = self.buffer[6 + length :]
            payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
            if opcode == 0x8:
                self.transport.write(b"\x88" + bytes((len(payload),)) + payload)
                self.transport.loseConnection()
                return
            self.transport.write(bytes((0x80 | opcode, len(payload))) + payload)
            if self.upstreamCloses:
                self.transport.write(b"\x88\x02\x03\xe8")
                self.transport.loseConnection()
                return

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.delayed is not None and self.delayed.active():
            self.delayed.cancel()


# ---------------------------------------------------------------------- clients


def maskedFrame(opcode: int, payload: bytes) -> bytes:
    """A client frame (masked, as RFC 6455 requires) with a fresh mask."""
    mask = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def upgrade(path: bytes) -> bytes:
    return (
        b"GET %b HTTP/1.1\r\nHost: churn\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: %b\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, KEY)
    )


GET = b"GET / HTTP/1.1\r\nHost: churn\r\n\r\n"
GET_CLOSE = b"GET / HTTP/1.1\r\nHost: churn\r\nConnection: close\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\n"
ECHOED = b"\x81\x05" + ECHO


def responses(received: bytes) -> int:
    return received.count(RESPONSE)


async def upgraded(port: int, path: bytes) -> tuple[RawClient, bytes]:
    """Open a tunnel and send one frame; return the client and what came back once it is echoed."""
    client = await connectRaw(port)
    client.transport.write(upgrade(path) + maskedFrame(0x1, ECHO))
    received = await client.waitFor(lambda got: b"\r\n\r\n" in got and ECHOED in got.split(b"\r\n\r\n", 1)[1])
    return client, received


async def plainKeptAlive(port: int) -> bool:
    """Two requests on one kept-alive connection, then the client closes it."""
    client = await connectRaw(port)
    client.transport.write(GET)
    await client.waitFor(lambda got: responses(got) == 1 and got.endswith(b"ok"))
    client.transport.write(GET)
    received = await client.waitFor(lambda got: responses(got) == 2 and got.endswith(b"ok"))
    keptAlive = not client.closed.called
    client.transport.loseConnection()
    return responses(received) == 2 and keptAlive


async def plainConnectionClose(port: int) -> bool:
    """One request with C{Connection: close}: the proxy answers and closes."""
    client = await connectRaw(port)
    client.transport.write(GET_CLOSE)
    received = await client.waitClosed()
    if received is None:
        client.transport.abortConnection()
        return False
    return received.startswith(RESPONSE) and received.endswith(b"ok")


async def websocketClientCloses(port: int) -> bool:
    """One echoed frame, then the client starts the closing handshake."""
    client, received = await upgraded(port, b"/ws")
    client.transport.write(maskedFrame(0x8, b"\x03\xe8"))
    final = await client.waitClosed()
    if final is None:
        client.transport.abortConnection()
        return False
    return received.startswith(b"HTTP/1.1 101 ") and final.endswith(b"\x88\x02\x03\xe8")


async def websocketClientDrops(port: int) -> bool:
    """One echoed frame, then the client drops TCP without a closing handshake."""
    client, received = await upgraded(port, b"/ws")
    ok = received.startswith(b"HTTP/1.1 101 ") and ECHOED in received and not client.closed.called
    client.transport.loseConnection()
    return ok


async def websocketUpstreamCloses(port: int) -> bool:
    """One echoed frame, then the upstream closes the WebSocket and its connection."""
    client, received = await upgraded(port, b"/ws/upstream-closes")
    final = await client.waitClosed()
    if final is None:
        client.transport.abortConnection()
        return False
    return received.startswith(b"HTTP/1.1 101 ") and final.endswith(ECHOED + b"\x88\x02\x03\xe8")


async def abortedHead(port: int) -> bool:
    """Half a request head, then a reset."""
    client = await connectRaw(port)
    client.transport.write(b"GET / HTTP/1.1\r\nHost: ch")
    handedOver = await until(lambda: not unsent(client.transport))
    client.transport.abortConnection()
    return handedOver


async def abortedWhileUpstreamThinks(port: int) -> bool:
    """A complete request whose response is slow, reset before the response comes."""
    client = await connectRaw(port)
    token = b"%d" % next(SLOW_TOKENS)
    arrived: Deferred = Deferred()
    SLOW_ARRIVALS[token] = arrived
    arrived.addTimeout(5, reactor, onTimeoutCancel=lambda result, timeout: False)
    client.transport.write(b"GET /slow?%b HTTP/1.1\r\nHost: churn\r\n\r\n" % token)
    reached = await arrived
    SLOW_ARRIVALS.pop(token, None)
    client.transport.abortConnection()
    return reached


async def abortedTunnel(port: int) -> bool:
    """An upgrade that is reset as soon as the 101 arrives."""
    client = await connectRaw(port)
    client.transport.write(upgrade(b"/ws"))
    received = await client.waitFor(b"\r\n\r\n")
    client.transport.abortConnection()
    return received.startswith(b"HTTP/1.1 101 ")


Scenario = Callable[[int], Awaitable[bool]]

#: One round of 100 connections: half plain, half upgrades, and a few resets.
MIX: list[Scenario] = (
    [plainKeptAlive] * 26
    + [plainConnectionClose] * 22
    + [abortedHead] * 1
    + [abortedWhileUpstreamThinks] * 1
    + [websocketClientCloses] * 16
    + [websocketClientDrops] * 16
    + [websocketUpstreamCloses] * 16
    + [abortedTunnel] * 2
)


async def churn(port: int, count: int, outcomes: Counter[str]) -> None:
    """Run C{count} connections of L{MIX}, C{BATCH} at a time, counting how each one went."""

    async def one(scenario: Scenario) -> None:
        try:
            ok = await scenario(port)
        except ConnectError as e:
            outcomes[f"{scenario.__name__} FAILED: {type(e).__name__}"] += 1
        else:
            outcomes[f"{scenario.__name__} {'ok' if ok else 'FAILED'}"] += 1

    for start in range(0, count, BATCH):
        batch = [ensureDeferred(one(MIX[(start + i) % len(MIX)])) for i in range(min(BATCH, count - start))]
        results = await DeferredList(batch, consumeErrors=True)
        for succeeded, result in results:
            if not succeeded:
                outcomes[f"error: {result.getErrorMessage()}"] += 1


# ------------------------------------------------------------------ measurement


def openDescriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def residentKiB(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def settled(pid: int, target: int | None) -> int:
    """
    The proxy's descriptor count once connections have finished closing:
    when it reaches C{target}, or has not changed for 2.5 s (past the 1 s
    upstream keep-alive timeout), or after L{SETTLE_SECONDS}.
    """
    deadline = time.monotonic() + SETTLE_SECONDS
    last, stableSince = openDescriptors(pid), time.monotonic()
    while time.monotonic() < deadline:
        await sleep(0.25)
        now = openDescriptors(pid)
        if now == target:
            # It must stay there: no late close (or leak) about to change it.
            await stillAfter(0.5, lambda: openDescriptors(pid) == target)
            return openDescriptors(pid)
        if now != last:
            last, stableSince = now, time.monotonic()
        elif time.monotonic() - stableSince > 2.5:
            break
    return last


@pytest_twisted.ensureDeferred
async def test_churn_leaves_no_descriptor_or_memory_behind(tmp_path: Path, cleanup: Any, record_property: Any) -> None:
    upstream = cleanup.port(reactor.listenTCP(0, Factory.forProtocol(ChurnUpstream), interface=LOOPBACK, backlog=1024))
    config = tmp_path / "churn.toml"
    config.write_text(
        f"shutdown_timeout = 1\n"
        f'[upstream.app]\nservers = ["{LOOPBACK}:{upstream.getHost().port}"]\nkeepalive = 8\nkeepalive_timeout = 1\n'
        f'[[server]]\nlisten = "tcp:0:interface={LOOPBACK}:backlog=1024"\nproxy_pass = "http://app"\naccess_log = false\n'
    )
    log = tmp_path / "twistd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "wsproxy", "--config", str(config)],
            env=ENVIRONMENT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        (port,) = await listeningPortsOf(log, process)
        began = time.monotonic()
        outcomes: Counter[str] = Counter()

        await churn(port, WARMUP, outcomes)
        fdsBefore = await settled(process.pid, None)
        rssBefore = residentKiB(process.pid)

        await churn(port, CONNECTIONS, outcomes)
        churned = time.monotonic()
        fdsAfter = await settled(process.pid, fdsBefore)
        rssAfter = residentKiB(process.pid)
        assert process.poll() is None, log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)

    figures = {
        "connections": WARMUP + CONNECTIONS,
        "churn_seconds": round(churned - began, 1),
        "fds_after_warmup": fdsBefore,
        "fds_after_churn": fdsAfter,
        "rss_kib_after_warmup": rssBefore,
        "rss_kib_after_churn": rssAfter,
        "rss_growth_kib": rssAfter - rssBefore,
    }
    for name, value in figures.items():
        record_property(name, value)
    print("\nchurn:", figures)
    print("outcomes:", dict(sorted(outcomes.items())))

    failed = {name: n for name, n in outcomes.items() if not name.endswith(" ok")}
    assert not failed, failed
    assert sum(outcomes.values()) == WARMUP + CONNECTIONS
    assert fdsAfter == fdsBefore, f"descriptors: {fdsBefore} after warm-up, {fdsAfter} after churn"
    assert rssAfter - rssBefore < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {rssAfter - rssBefore} KiB"
    assert b"Traceback" not in log.read_bytes(), log.read_text()[-4000:]
