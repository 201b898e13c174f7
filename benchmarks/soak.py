"""Soak test: thousands of WebSocket tunnels through wsproxy while upstreams restart.

Why: a proxy that passes every unit test can still lose or garble a message
once in a hundred thousand, or keep a descriptor for each tunnel an upstream
crash cut.  This script runs the real thing for minutes and counts:

* a ``twistd wsproxy`` process in front of a pool of 3 upstream echo servers
  (this script again, ``--serve-upstream PORT``: a Twisted WebSocket echo that
  names itself in its 101 with ``X-Soak-Upstream: PORT``, so the client knows
  which upstream holds each tunnel);
* N concurrent tunnels (``--tunnels``, default 2,000) opened by this process
  with Twisted, each sending a checksummed message every ``1/--rate``
  seconds: ``connection id, sequence number, random payload, CRC32``.  Every
  echo is checked (CRC, connection id, the next sequence number expected:
  a message out of order or from another tunnel is a corruption);
* every ``--restart-every`` seconds one upstream, in turn, is killed
  (SIGKILL, a crash), stays down ``--down`` seconds, and is started again on
  the same port.  A tunnel the proxy closes while its own upstream is being
  restarted is *cut* (its unanswered messages are reported, not counted as
  lost) and reconnected; a tunnel closed for any other reason is a fault.

At the end the script stops sending, waits for the last echoes, and reports
messages sent, received, lost (sent on tunnels whose upstream stayed up and
never echoed: must be 0), corrupted (must be 0), tunnels cut, reconnects,
the proxy's peak RSS (sampled, and the kernel's VmHWM) and its descriptors
before the tunnels and after they are all closed.  Exit status 1 when
anything was lost or corrupted, or a tunnel closed unexpectedly.

It is bounded: ``--duration`` seconds of traffic (default 180) plus about
20 s of set-up and drain, then every child process group is killed, also
on Ctrl-C, SIGTERM or an exception (children also die with this process,
PR_SET_PDEATHSIG).

Run: ``python benchmarks/soak.py [--duration 180] [--tunnels 2000]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import processes  # noqa: E402
from processes import Child, free_ports  # noqa: E402
from twisted.internet.defer import Deferred, ensureDeferred  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.internet.task import LoopingCall, deferLater  # noqa: E402
from upstream import frame_header, handshake_response, raise_nofile, unmask  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
LOOPBACK = "127.0.0.1"
HEADER = struct.Struct(">QQ")  # connection id, sequence number
CLOSE_FRAME_OK = b"\x88\x02\x03\xe8"
#: How long after its upstream was killed the proxy may take to close a tunnel
#: for the close to count as "cut by the restart" rather than a fault.
CUT_GRACE = 5.0


# ----------------------------------------------------------------- frames


def parseFrames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """
    Take every complete frame off the front of C{buffer} and return
    C{(opcode, unmasked payload)} for each; the incomplete tail stays.
    """
    frames = []
    pos, size = 0, len(buffer)
    while size - pos >= 2:
        length, header = buffer[pos + 1] & 0x7F, 2
        if length == 126:
            if size - pos < 4:
                break
            length, header = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), 4
        elif length == 127:
            if size - pos < 10:
                break
            length, header = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), 10
        masked = buffer[pos + 1] & 0x80
        if masked:
            header += 4
        end = pos + header + length
        if end > size:
            break
        payload = bytes(buffer[pos + header : end])
        if masked:
            payload = unmask(payload, buffer[pos + header - 4 : pos + header])
        frames.append((buffer[pos] & 0x0F, payload))
        pos = end
    del buffer[:pos]
    return frames


def clientFrame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 section 5.3) with a fresh mask."""
    mask = os.urandom(4)
    header = bytearray(frame_header(0x80 | opcode, len(payload)))
    header[1] |= 0x80
    return bytes(header) + mask + unmask(payload, mask)


# -------------------------------------------------------- upstream process


def serveUpstream(port: int) -> None:
    """
    Run one upstream: a WebSocket echo on C{port} that names itself in the
    101.  Why Twisted and not benchmarks/upstream.py: the extra header is what
    lets the client attribute a closed tunnel to the upstream that was killed.
    """
    from twisted.internet import reactor

    class Echo(Protocol):
        def connectionMade(self) -> None:
            self.buffer = bytearray()
            self.websocket = False
            self.transport.setTcpNoDelay(True)

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            if not self.websocket:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > 65536:
                        self.transport.loseConnection()
                    return
                reply = handshake_response(bytes(self.buffer[:end]))
                del self.buffer[: end + 4]
                if reply is None:
                    self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    self.transport.loseConnection()
                    return
                self.transport.write(reply[:-2] + b"X-Soak-Upstream: %d\r\n\r\n" % port)
                self.websocket = True
            out = []
            for opcode, payload in parseFrames(self.buffer):
                if opcode == 0x8:
                    out.append(frame_header(0x88, len(payload)) + payload)
                    self.transport.writeSequence(out)
                    self.transport.loseConnection()
                    return
                out.append(frame_header(0x80 | (0xA if opcode == 0x9 else opcode), len(payload)) + payload)
            if out:
                self.transport.writeSequence(out)

    raise_nofile()
    reactor.listenTCP(port, Factory.forProtocol(Echo), backlog=4096, interface=LOOPBACK)
    print(f"soak upstream on {port}", flush=True)
    reactor.run()


# ------------------------------------------------------------------ client


@dataclass
class Stats:
    """What the run counts; C{lost}, C{corrupted} and C{unexpectedCloses} must stay 0."""

    sent: int = 0
    received: int = 0
    corrupted: int = 0
    lost: int = 0
    unansweredOnCut: int = 0
    cut: int = 0
    unexpectedCloses: int = 0
    reconnects: int = 0
    handshakeFailures: int = 0
    maxEchoSeconds: float = 0.0
    corruptions: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)


class Soak:
    """
    The orchestration: child processes, the tunnels, the restart schedule
    and the measurements, all driven by one reactor so that a restart never
    pauses the traffic.
    """

    def __init__(self, args: argparse.Namespace, reactor: Any, work: Path) -> None:
        self.args = args
        self.reactor = reactor
        self.work = work
        self.stats = Stats()
        self.upstreamPorts: list[int] = []
        self.upstreams: dict[int, Child] = {}
        self.killedAt: dict[int, float] = {}
        self.proxy: Child | None = None
        self.proxyPort = 0
        self.tunnels: list[TunnelClient | None] = [None] * args.tunnels
        self.nextConnectionId = 1
        self.sending = False
        self.stopping = False
        self.rssSamples: list[int] = []
        self.restartCount = 0
        self.began = time.monotonic()

    # -- processes

    def startUpstream(self, port: int) -> Child:
        child = Child(
            f"upstream-{port}",
            [sys.executable, __file__, "--serve-upstream", str(port)],
            self.work / f"upstream-{port}.log",
        )
        child.start()
        self.upstreams[port] = child
        return child

    def startProxy(self) -> None:
        config = self.work / "wsproxy.toml"
        servers = ", ".join(f'"{LOOPBACK}:{port}"' for port in self.upstreamPorts)
        config.write_text(
            "shutdown_timeout = 2\n"
            f"[upstream.app]\nservers = [{servers}]\nmax_fails = 1\nfail_timeout = 2\n"
            f'[[server]]\nlisten = "tcp:{self.proxyPort}:interface={LOOPBACK}:backlog=4096"\n'
            'proxy_pass = "http://app"\nproxy_connect_timeout = 2\naccess_log = false\n'
        )
        self.proxy = Child(
            "wsproxy",
            [TWISTD, "-n", "--pidfile=", "wsproxy", "--config", str(config)],
            self.work / "wsproxy.log",
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=self.work,
        )
        self.proxy.start()

    async def listening(self, child: Child, port: int, timeout: float = 20.0) -> None:
        """Wait, without blocking the reactor, until C{port} accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                probe = await TCP4ClientEndpoint(self.reactor, LOOPBACK, port, timeout=1).connect(
                    Factory.forProtocol(Protocol)
                )
            except Exception:
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited: {child.log_tail()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name}: port {port} not listening after {timeout:.0f}s") from None
                await self.sleep(0.1)
            else:
                probe.transport.loseConnection()
                return

    def sleep(self, seconds: float) -> Deferred:
        return deferLater(self.reactor, seconds, lambda: None)

    def proxyFds(self) -> int:
        assert self.proxy is not None
        return len(os.listdir(f"/proc/{self.proxy.pid}/fd"))

    def proxyStatus(self, key: str) -> int:
        assert self.proxy is not None
        for line in Path(f"/proc/{self.proxy.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def sampleRss(self) -> None:
        if self.proxy is not None and self.proxy.alive():
            self.rssSamples.append(self.proxyStatus("VmRSS"))

    # -- tunnels

    def connect(self, slot: int, delay: float = 0.0) -> None:
        """Open (after C{delay}) the tunnel of C{slot}; a failure retries with back-off."""
        if self.stopping:
            return
        self.reactor.callLater(delay, self._connect, slot)

    def _connect(self, slot: int) -> None:
        if self.stopping:
            return
        client = TunnelClient(self, slot, self.nextConnectionId)
        self.nextConnectionId += 1
        self.tunnels[slot] = client
        connecting = connectProtocol(TCP4ClientEndpoint(self.reactor, LOOPBACK, self.proxyPort, timeout=10), client)
        connecting.addErrback(lambda failure: client.handshakeFailed(f"connect: {failure.getErrorMessage()}"))

    def closed(self, client: TunnelClient, reason: str) -> None:
        """A tunnel ended without our asking: classify it, settle its messages, reconnect."""
        now = time.monotonic()
        killed = self.killedAt.get(client.upstream or 0)
        unanswered = len(client.pending)
        if killed is not None and client.openedAt < killed <= now <= killed + CUT_GRACE:
            self.stats.cut += 1
            self.stats.unansweredOnCut += unanswered
        else:
            self.stats.unexpectedCloses += 1
            self.stats.lost += unanswered
            self.fault(
                f"tunnel {client.connectionId} via upstream {client.upstream} closed ({reason}) "
                f"with {unanswered} unanswered"
            )
        client.pending.clear()
        self.stats.reconnects += 1
        self.connect(client.slot, random.uniform(0.2, 2.0))

    def fault(self, line: str) -> None:
        """Remember the first few faults for the report."""
        if len(self.stats.faults) < 20:
            self.stats.faults.append(line)

    def tick(self, bucket: int, buckets: int) -> None:
        """Send one message on every open tunnel of this time slice."""
        if not self.sending:
            return
        for slot in range(bucket, len(self.tunnels), buckets):
            client = self.tunnels[slot]
            if client is not None and client.open:
                client.send()

    # -- restarts

    async def restarts(self, until: float) -> None:
        """Kill one upstream at a time (SIGKILL), leave it down, start it again on the same port."""
        victim = 0
        await self.sleep(min(self.args.restart_every, max(until - time.monotonic(), 0)))
        while time.monotonic() + self.args.down + 10 < until and not self.stopping:
            port = self.upstreamPorts[victim % len(self.upstreamPorts)]
            child = self.upstreams[port]
            self.killedAt[port] = time.monotonic()
            os.killpg(child.pid, signal.SIGKILL)
            child.proc.wait(timeout=5)
            child.stop()
            print(f"  t={self.elapsed():5.1f}s killed upstream {port}", flush=True)
            await self.sleep(self.args.down)
            restarted = self.startUpstream(port)
            await self.listening(restarted, port)
            print(f"  t={self.elapsed():5.1f}s upstream {port} back", flush=True)
            victim += 1
            self.restartCount += 1
            await self.sleep(self.args.restart_every)

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    # -- the run

    async def run(self) -> dict[str, Any]:
        args = self.args
        *self.upstreamPorts, self.proxyPort = free_ports(4)
        for port in self.upstreamPorts:
            await self.listening(self.startUpstream(port), port)
        self.startProxy()
        assert self.proxy is not None
        await self.listening(self.proxy, self.proxyPort)
        await self.sleep(1.0)
        fdsBefore, rssBefore = self.proxyFds(), self.proxyStatus("VmRSS")
        sampler = LoopingCall(self.sampleRss)
        sampler.start(0.5)

        print(
            f"opening {args.tunnels} tunnels through wsproxy (pid {self.proxy.pid}, port {self.proxyPort}) "
            f"to upstreams {self.upstreamPorts}",
            flush=True,
        )
        for slot in range(args.tunnels):
            self.connect(slot, slot / 1000)  # 1,000 new tunnels a second
        await self.waitFor(lambda: self.openCount() == args.tunnels, 30)
        print(f"  {self.openCount()} open", flush=True)

        self.began = time.monotonic()
        until = self.began + args.duration
        buckets = max(1, round(20 / args.rate))
        tick = iter(range(10**12))
        sender = LoopingCall(lambda: self.tick(next(tick) % buckets, buckets))
        self.sending = True
        sender.start(0.05)
        progress = LoopingCall(self.progress)
        progress.start(10, now=False)
        await self.restarts(until)
        await self.sleep(max(0.0, until - time.monotonic()))
        self.sending = False
        sender.stop()
        progress.stop()

        # Let the last echoes and reconnections arrive, then settle the books.
        await self.waitFor(lambda: self.pendingCount() == 0 and self.openCount() == args.tunnels, 15)
        self.stopping = True
        for client in self.live():
            self.stats.lost += len(client.pending)
            if client.pending:
                self.fault(f"tunnel {client.connectionId} via {client.upstream}: {len(client.pending)} never echoed")
            client.pending.clear()
        rssPeakSampled = max(self.rssSamples)
        peakHwm = self.proxyStatus("VmHWM")
        rssEnd = self.proxyStatus("VmRSS")

        for client in self.live():
            client.close()
        await self.waitFor(lambda: not self.live(), 15)
        for client in self.live():
            client.transport.abortConnection()
        await self.waitFor(lambda: self.proxyFds() <= fdsBefore, 15)
        fdsAfter = self.proxyFds()
        rssAfterClose = self.proxyStatus("VmRSS")
        sampler.stop()
        s = self.stats
        return {
            "duration_s": args.duration,
            "tunnels": args.tunnels,
            "rate_per_tunnel": args.rate,
            "messages_sent": s.sent,
            "messages_received": s.received,
            "lost": s.lost,
            "corrupted": s.corrupted,
            "unexpected_closes": s.unexpectedCloses,
            "upstream_restarts": self.restartCount,
            "tunnels_cut": s.cut,
            "unanswered_on_cut_tunnels": s.unansweredOnCut,
            "reconnects": s.reconnects,
            "handshake_failures_retried": s.handshakeFailures,
            "max_echo_ms": round(s.maxEchoSeconds * 1000, 1),
            "proxy_rss_kib_start": rssBefore,
            "proxy_rss_kib_peak_sampled": rssPeakSampled,
            "proxy_rss_kib_peak_vmhwm": peakHwm,
            "proxy_rss_kib_end": rssEnd,
            "proxy_rss_kib_after_close": rssAfterClose,
            "proxy_fds_before": fdsBefore,
            "proxy_fds_after": fdsAfter,
            "faults": s.faults,
            "corruptions": s.corruptions[:20],
        }

    async def waitFor(self, condition: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            await self.sleep(0.1)
        return True

    def live(self) -> list[TunnelClient]:
        return [c for c in self.tunnels if c is not None and c.transport is not None and not c.gone]

    def openCount(self) -> int:
        return sum(1 for c in self.tunnels if c is not None and c.open)

    def pendingCount(self) -> int:
        return sum(len(c.pending) for c in self.tunnels if c is not None)

    def progress(self) -> None:
        s = self.stats
        print(
            f"  t={self.elapsed():5.1f}s open={self.openCount()} sent={s.sent} received={s.received} "
            f"cut={s.cut} unexpected={s.unexpectedCloses} corrupted={s.corrupted} "
            f"proxy_rss={self.rssSamples[-1] if self.rssSamples else 0} KiB",
            flush=True,
        )


class TunnelClient(Protocol):
    """
    One WebSocket tunnel: the upgrade, then checksummed messages, each of
    which must come back intact, from this connection, in order.
    """

    def __init__(self, soak: Soak, slot: int, connectionId: int) -> None:
        self.soak = soak
        self.slot = slot
        self.connectionId = connectionId
        self.buffer = bytearray()
        self.open = False
        self.gone = False
        self.closing = False
        self.upstream: int | None = None
        self.openedAt = 0.0
        self.seq = 0
        self.pending: collections.deque[tuple[int, float]] = collections.deque()
        self.key = os.urandom(16).hex()[:22].encode() + b"=="
        self.timeout: Any = None

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(
            b"GET /soak HTTP/1.1\r\nHost: soak\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: %b\r\nSec-WebSocket-Version: 13\r\n\r\n" % self.key
        )
        self.timeout = self.soak.reactor.callLater(10, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.open:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            expected = handshake_response(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: " + self.key)
            accept = expected.split(b"Sec-WebSocket-Accept: ")[1].split(b"\r\n")[0] if expected else b"?"
            if not head.startswith(b"HTTP/1.1 101 ") or accept not in head:
                self.handshakeFailed(head.split(b"\r\n")[0].decode("latin-1"))
                self.transport.loseConnection()
                return
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"x-soak-upstream:"):
                    self.upstream = int(line.split(b":")[1])
            self.timeout.cancel()
            self.open, self.openedAt = True, time.monotonic()
        for opcode, payload in parseFrames(self.buffer):
            if opcode == 0x8:
                self.closing = True
            elif opcode in (0x1, 0x2):
                self.echoed(payload)

    def send(self) -> None:
        self.seq += 1
        body = HEADER.pack(self.connectionId, self.seq) + os.urandom(random.randint(0, self.soak.args.size))
        self.transport.write(clientFrame(0x2, body + struct.pack(">I", zlib.crc32(body))))
        self.pending.append((self.seq, time.monotonic()))
        self.soak.stats.sent += 1

    def echoed(self, payload: bytes) -> None:
        """
        Check one echo.  The pending sequence numbers are consecutive, so a
        valid echo must be the oldest one pending; one that overtakes older
        messages makes those lost.  A bad checksum, a message of another
        connection or a sequence number not pending is a corruption.
        """
        stats = self.soak.stats
        stats.received += 1
        body, crc = payload[:-4], payload[-4:]
        intact = len(payload) >= HEADER.size + 4 and struct.pack(">I", zlib.crc32(body)) == crc
        connectionId, seq = HEADER.unpack_from(body) if len(body) >= HEADER.size else (0, 0)
        first, last = (self.pending[0][0], self.pending[-1][0]) if self.pending else (0, -1)
        if not intact:
            problem = "checksum mismatch"
            if connectionId == self.connectionId and seq == first:
                self.pending.popleft()  # garbled, not also lost
        elif connectionId != self.connectionId:
            problem = f"a message of connection {connectionId}"
        elif not first <= seq <= last:
            problem = f"sequence {seq} not pending ({first}..{last})"
        else:
            problem = None
            while self.pending[0][0] != seq:
                self.pending.popleft()
                stats.lost += 1
                self.soak.fault(f"tunnel {self.connectionId} via {self.upstream}: an echo overtaken by a later one")
            _, sentAt = self.pending.popleft()
            stats.maxEchoSeconds = max(stats.maxEchoSeconds, time.monotonic() - sentAt)
        if problem is not None:
            stats.corrupted += 1
            if len(stats.corruptions) < 20:
                stats.corruptions.append(f"tunnel {self.connectionId} via {self.upstream}: {problem}")

    def handshakeFailed(self, why: str) -> None:
        if self.gone:
            return
        self.gone = True
        self.soak.stats.handshakeFailures += 1
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()
        self.soak.connect(self.slot, random.uniform(0.5, 2.0))

    def close(self) -> None:
        """Our end of the run: the closing handshake (the upstream answers and hangs up)."""
        self.closing = True
        self.transport.write(clientFrame(0x8, b"\x03\xe8"))

    def connectionLost(self, reason: Any = None) -> None:
        if self.timeout is not None and self.timeout.active():
            self.timeout.cancel()
        wasOpen, self.open = self.open, False
        if self.gone:
            return
        self.gone = True
        if not wasOpen:
            self.soak.stats.handshakeFailures += 1
            self.soak.connect(self.slot, random.uniform(0.5, 2.0))
        elif not self.soak.stopping:
            self.soak.closed(self, reason.getErrorMessage() if reason is not None else "?")


# -------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180, help="seconds of traffic (default 180)")
    parser.add_argument("--tunnels", type=int, default=2000, help="concurrent tunnels (default 2000)")
    parser.add_argument("--rate", type=float, default=0.5, help="messages per tunnel per second (default 0.5)")
    parser.add_argument("--size", type=int, default=512, help="largest random payload in bytes (default 512)")
    parser.add_argument("--restart-every", type=float, default=20, help="seconds between upstream restarts")
    parser.add_argument("--down", type=float, default=3, help="seconds a killed upstream stays down")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serveUpstream(args.serve_upstream)
        return 0

    raise_nofile()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.tunnels + 100:
        raise SystemExit(f"RLIMIT_NOFILE is {soft}: too low for {args.tunnels} tunnels")
    from twisted.internet import reactor

    work = Path(tempfile.mkdtemp(prefix="wsproxy-soak-"))
    soak = Soak(args, reactor, work)
    outcome: dict[str, Any] = {}
    # A hard stop, whatever happens to the run: duration + set-up + drain.
    deadline = reactor.callLater(args.duration + 120, reactor.stop)

    def finished(result: Any) -> None:
        if isinstance(result, dict):
            outcome.update(result)
        else:
            outcome["error"] = result.getTraceback()
        if deadline.active():
            deadline.cancel()
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(soak.run()).addBoth(finished))
    # Started in the background by a non-interactive shell, SIGINT arrives ignored
    # and Twisted would leave it so; restore it so that Ctrl-C always ends the run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reactor.run()  # Ctrl-C and SIGTERM stop the reactor; the finally kills the children
    finally:
        soak.stopping = True
        processes.stop_all()

    if "error" in outcome or "lost" not in outcome:
        print(outcome.get("error", "interrupted or timed out before the report"), file=sys.stderr)
        print(f"logs in {work}", file=sys.stderr)
        return 2
    failed = outcome["lost"] or outcome["corrupted"] or outcome["unexpected_closes"]
    print()
    width = max(len(k) for k in outcome)
    for key, value in outcome.items():
        if key in ("faults", "corruptions"):
            for line in value:
                print(f"  {key[:-1]}: {line}")
        else:
            print(f"{key:<{width}}  {value}")
    print(f"RESULT: {'FAIL' if failed else 'PASS'} (logs in {work})")
    if args.json:
        args.json.write_text(json.dumps(outcome, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
