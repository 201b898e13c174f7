"""Load generator for the wsproxy-vs-nginx benchmark.

Why hand-written: a Python proxy core can relay tens of thousands of small
messages a second, and a client that parses every echoed frame would saturate
first.  So the client pre-builds one masked frame per scenario, never parses
echoes (it counts echoed *bytes*: the echo of a known frame has a known size)
and answers N finished echoes with one ``writelines``.  Scenarios that need
more than one core's worth of client can fan out over ``--workers`` processes
(``multiprocessing``, fork); all workers measure the same wall-clock window.

The proxy's CPU (utime+stime) and RSS are sampled from /proc by *this*
process at the exact window edges, for the pids given with ``--pid`` and all
their descendants, so the figures exclude connection set-up and warm-up.

Every scenario is bounded: warm-up + duration + a few seconds of grace, after
which workers are terminated.  Output is one JSON object on stdout.

Scenarios: ws-small, ws-large, latency, handshake (``--tls`` for wss), http
(drives ``wrk``), idle.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import multiprocessing
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import procstat
from upstream import raise_nofile, tune_malloc, unmask

GRACE = 5.0  # seconds past the window before a worker is abandoned


# --------------------------------------------------------------------------
# Frames and handshake


def build_frame(payload_size: int) -> bytes:
    """A masked binary frame (client-to-server) with a random key."""
    payload = (b"0123456789abcdef" * (payload_size // 16 + 1))[:payload_size]
    key = os.urandom(4)
    if payload_size < 126:
        head = bytes((0x82, 0x80 | payload_size))
    elif payload_size < 65536:
        head = bytes((0x82, 0x80 | 126)) + payload_size.to_bytes(2, "big")
    else:
        head = bytes((0x82, 0x80 | 127)) + payload_size.to_bytes(8, "big")
    return head + key + unmask(payload, key)


def echo_size(payload_size: int) -> int:
    """Size of the unmasked server frame that echoes ``payload_size`` bytes."""
    if payload_size < 126:
        return 2 + payload_size
    if payload_size < 65536:
        return 4 + payload_size
    return 10 + payload_size


def handshake_request(host: str, port: int) -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET / HTTP/1.1\r\n"
        b"Host: " + f"{host}:{port}".encode() + b"\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )


def client_tls_context() -> ssl.SSLContext:
    """TLS client context that does not verify (self-signed test cert)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class WsClient(asyncio.Protocol):
    """Does the opening handshake, then hands raw bytes to ``on_bytes``."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.upgraded = False
        self.opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self.on_bytes(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        if not self.head.startswith(b"HTTP/1.1 101"):
            status = bytes(self.head.split(b"\r\n", 1)[0])
            if not self.opened.done():
                self.opened.set_exception(ConnectionError(f"handshake: {status!r}"))
            assert self.transport is not None
            self.transport.close()
            return
        self.upgraded = True
        rest = bytes(self.head[end + 4 :])
        self.head = bytearray()
        if not self.opened.done():
            self.opened.set_result(True)
        if rest:
            self.on_bytes(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before 101: {exc}"))

    def on_bytes(self, data: bytes) -> None:
        """Bytes after the handshake; the base class ignores them."""


async def open_client(
    factory: Callable[[], WsClient],
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    timeout: float = 10.0,
) -> WsClient:
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(factory, host, port, ssl=tls, server_hostname="" if tls else None),
        timeout,
    )
    await asyncio.wait_for(proto.opened, timeout)
    return proto


async def sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop when installed (cheaper client), else asyncio."""
    try:
        import uvloop  # type: ignore[import-not-found]

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


# --------------------------------------------------------------------------
# Closed-loop echo throughput (scenarios 1 and 2)


class Counter:
    value = 0


class EchoPump(WsClient):
    """Keeps ``inflight`` frames outstanding; counts echoes by byte count."""

    def __init__(self, request: bytes, frame: bytes, esize: int, counter: Counter) -> None:
        super().__init__(request)
        self.frame = frame
        self.esize = esize
        self.counter = counter
        self.rx = 0
        self.done = 0

    def start(self, inflight: int) -> None:
        assert self.transport is not None
        self.transport.writelines([self.frame] * inflight)

    def on_bytes(self, data: bytes) -> None:
        self.rx += len(data)
        done = self.rx // self.esize
        new = done - self.done
        if new:
            self.done = done
            self.counter.value += new
            assert self.transport is not None
            self.transport.writelines([self.frame] * new)


async def echo_worker(
    host: str, port: int, conns: int, inflight: int, size: int, t0: float, t1: float, t2: float
) -> dict[str, Any]:
    frame, esize, counter = build_frame(size), echo_size(size), Counter()
    request = handshake_request(host, port)
    results = await asyncio.gather(
        *(open_client(lambda: EchoPump(request, frame, esize, counter), host, port, None) for _ in range(conns)),
        return_exceptions=True,
    )
    pumps = [r for r in results if isinstance(r, EchoPump)]
    errors = [repr(r) for r in results if not isinstance(r, EchoPump)]
    await sleep_until(t0)
    for pump in pumps:
        pump.start(inflight)
    await sleep_until(t1)
    start = counter.value
    await sleep_until(t2)
    count = counter.value - start
    for pump in pumps:
        assert pump.transport is not None
        pump.transport.abort()
    return {"messages": count, "connected": len(pumps), "errors": errors[:3], "n_errors": len(errors)}


# --------------------------------------------------------------------------
# Handshake rate (scenarios 4 and 5)


async def handshake_worker(
    host: str, port: int, conns: int, use_tls: bool, t0: float, t1: float, t2: float
) -> dict[str, Any]:
    request = handshake_request(host, port)
    tls = client_tls_context() if use_tls else None
    stats = {"handshakes": 0, "n_errors": 0}
    errors: list[str] = []

    async def slot() -> None:
        while time.time() < t2:
            try:
                proto = await open_client(lambda: WsClient(request), host, port, tls, timeout=5.0)
            except (TimeoutError, OSError, ssl.SSLError) as exc:
                stats["n_errors"] += 1
                if len(errors) < 3:
                    errors.append(repr(exc))
                await asyncio.sleep(0.01)
                continue
            now = time.time()
            if t1 <= now < t2:
                stats["handshakes"] += 1
            assert proto.transport is not None
            proto.transport.abort() if use_tls else proto.transport.close()

    await sleep_until(t0)
    tasks = [asyncio.ensure_future(slot()) for _ in range(conns)]
    await asyncio.wait(tasks, timeout=max(0.0, t2 - time.time()) + 3.0)
    for task in tasks:
        task.cancel()
    return {**stats, "errors": errors}


# --------------------------------------------------------------------------
# Worker fan-out


def _worker_entry(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    fn = {"echo": echo_worker, "handshake": handshake_worker}[name]
    return run_async(fn(**kwargs))


def fan_out(
    name: str, kwargs_per_worker: list[dict[str, Any]], t1: float, t2: float, pids: list[int]
) -> tuple[list[dict[str, Any]], float]:
    """Run workers in processes; sample proxy CPU at t1 and t2. Returns (results, cpu_s)."""
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(len(kwargs_per_worker))
    try:
        pending = pool.starmap_async(_worker_entry, [(name, kw) for kw in kwargs_per_worker])
        time.sleep(max(0.0, t1 - time.time()))
        cpu0 = procstat.cpu_seconds(pids)
        time.sleep(max(0.0, t2 - time.time()))
        cpu1 = procstat.cpu_seconds(pids)
        results = pending.get(timeout=GRACE + 10.0)
    finally:
        pool.terminate()
        pool.join()
    return results, cpu1 - cpu0


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def window(args: argparse.Namespace, setup: float = 1.0) -> tuple[float, float, float]:
    t0 = time.time() + setup
    t1 = t0 + args.warmup
    return t0, t1, t1 + args.duration


def scenario_echo(args: argparse.Namespace, pids: list[int]) -> dict[str, Any]:
    t0, t1, t2 = window(args, setup=1.0 + args.connections / 200)
    workers = max(1, min(args.workers, args.connections))
    kws = [
        dict(host=args.host, port=args.port, conns=n, inflight=args.inflight, size=args.size, t0=t0, t1=t1, t2=t2)
        for n in split(args.connections, workers)
    ]
    results, cpu = fan_out("echo", kws, t1, t2, pids)
    msgs = sum(r["messages"] for r in results)
    out = {
        "messages": msgs,
        "msg_per_s": msgs / args.duration,
        "mb": msgs * args.size / 1e6,
        "mb_per_s": msgs * args.size / args.duration / 1e6,
        "cpu_s": cpu,
        "connected": sum(r["connected"] for r in results),
        "n_errors": sum(r["n_errors"] for r in results),
        "errors": [e for r in results for e in r["errors"]][:3],
    }
    if msgs == 0:
        raise RuntimeError(f"no echoes received ({out['connected']} connected; {out['errors']})")
    return out


def scenario_handshake(args: argparse.Namespace, pids: list[int]) -> dict[str, Any]:
    t0, t1, t2 = window(args)
    workers = max(1, min(args.workers, args.connections))
    kws = [
        dict(host=args.host, port=args.port, conns=n, use_tls=args.tls, t0=t0, t1=t1, t2=t2)
        for n in split(args.connections, workers)
    ]
    results, cpu = fan_out("handshake", kws, t1, t2, pids)
    count = sum(r["handshakes"] for r in results)
    out = {
        "handshakes": count,
        "hs_per_s": count / args.duration,
        "cpu_s": cpu,
        "n_errors": sum(r["n_errors"] for r in results),
        "errors": [e for r in results for e in r["errors"]][:3],
    }
    if count == 0:
        raise RuntimeError(f"no handshake completed: {out['errors']}")
    return out


# --------------------------------------------------------------------------
# Latency at a fixed rate (scenario 3)


class LatencyProbe(WsClient):
    """Records the send time of each frame; an echo pops the oldest one."""

    def __init__(self, request: bytes, esize: int, sink: list[float], measure_from: list[float]) -> None:
        super().__init__(request)
        self.esize = esize
        self.sent: collections.deque[float] = collections.deque()
        self.sink = sink
        self.measure_from = measure_from
        self.rx = 0

    def on_bytes(self, data: bytes) -> None:
        self.rx += len(data)
        now = time.perf_counter()
        while self.rx >= self.esize:
            self.rx -= self.esize
            sent = self.sent.popleft()
            if sent >= self.measure_from[0]:
                self.sink.append(now - sent)


async def latency_main(args: argparse.Namespace, pids: list[int]) -> dict[str, Any]:
    frame, esize = build_frame(args.size), echo_size(args.size)
    request = handshake_request(args.host, args.port)
    latencies: list[float] = []
    measure_from = [float("inf")]
    probes = await asyncio.gather(
        *(
            open_client(lambda: LatencyProbe(request, esize, latencies, measure_from), args.host, args.port, None)
            for _ in range(args.connections)
        )
    )
    rate = args.rate
    start = time.perf_counter()
    t1 = start + args.warmup
    t2 = t1 + args.duration
    sent = 0
    cpu0 = None
    sent_in_window = 0
    while True:
        now = time.perf_counter()
        if now >= t2:
            break
        if cpu0 is None and now >= t1:
            measure_from[0] = now
            cpu0 = procstat.cpu_seconds(pids)
        due = int((now - start) * rate)
        while sent < due:
            probe = probes[sent % len(probes)]
            probe.sent.append(time.perf_counter())
            assert probe.transport is not None
            probe.transport.write(frame)
            sent += 1
            if cpu0 is not None:
                sent_in_window += 1
        await asyncio.sleep(0.0005)
    cpu1 = procstat.cpu_seconds(pids)
    deadline = time.perf_counter() + 2.0
    while len(latencies) < sent_in_window and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    for probe in probes:
        assert probe.transport is not None
        probe.transport.abort()
    if not latencies:
        raise RuntimeError("no echoes received")
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return {
        "messages": sent_in_window,
        "received": len(latencies),
        "achieved_rate": sent_in_window / args.duration,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": latencies[-1] * 1000,
        "cpu_s": cpu1 - (cpu0 or cpu1),
    }


# --------------------------------------------------------------------------
# Memory per idle tunnel (scenario 7)


async def idle_main(args: argparse.Namespace, pids: list[int]) -> dict[str, Any]:
    request = handshake_request(args.host, args.port)
    gate = asyncio.Semaphore(200)
    errors: list[str] = []

    async def one() -> WsClient | None:
        async with gate:
            try:
                return await open_client(lambda: WsClient(request), args.host, args.port, None)
            except (TimeoutError, OSError) as exc:
                errors.append(repr(exc))
                return None

    # Warm the proxy's lazily-built state so the baseline excludes it.
    for proto in await asyncio.gather(*(one() for _ in range(50))):
        if proto and proto.transport:
            proto.transport.close()
    await asyncio.sleep(1.0)
    pids = [p for root in args.pid for p in procstat.descendants(root)]
    rss0 = procstat.rss_kib(pids)
    deadline = time.time() + args.duration + 60
    held = [
        p
        for p in await asyncio.wait_for(asyncio.gather(*(one() for _ in range(args.tunnels))), deadline - time.time())
        if p
    ]
    await asyncio.sleep(args.settle)
    pids = [p for root in args.pid for p in procstat.descendants(root)]
    rss1 = procstat.rss_kib(pids)
    for proto in held:
        assert proto.transport is not None
        proto.transport.abort()
    if not held:
        raise RuntimeError(f"no tunnel opened: {errors[:3]}")
    return {
        "tunnels": len(held),
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_tunnel": (rss1 - rss0) / len(held),
        "n_errors": len(errors),
        "errors": errors[:3],
    }


# --------------------------------------------------------------------------
# HTTP keep-alive GETs through wrk (scenario 6)


def scenario_http(args: argparse.Namespace, pids: list[int]) -> dict[str, Any]:
    url = f"http://{args.host}:{args.port}{args.path}"
    seconds = max(1, round(args.duration))  # wrk takes whole seconds only
    headers = ["-H", f"Host: {args.host_header}"] if args.host_header else []
    if args.scenario == "http-close":
        # A new client connection per request (wrk reconnects after each).
        headers += ["-H", "Connection: close"]
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{seconds}s", "--timeout", "5s", *headers, url]
    # Warm-up: a short run whose figures are discarded.
    if args.warmup > 0:
        subprocess.run(
            ["wrk", "-t1", f"-c{args.connections}", f"-d{max(1, round(args.warmup))}s", *headers, url],
            capture_output=True,
            timeout=args.warmup + 30,
        )
    cpu0 = procstat.cpu_seconds(pids)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 30)
    cpu1 = procstat.cpu_seconds(pids)
    text = proc.stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if proc.returncode != 0 or not match or not total:
        raise RuntimeError(f"wrk failed: {proc.stderr.strip() or text.strip()}"[:300])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: (.*)", text)
    return {
        "requests": int(total.group(1)),
        "req_per_s": float(match.group(1)),
        "cpu_s": cpu1 - cpu0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sock.group(1).strip() if sock else "",
    }


# --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="WebSocket/HTTP load generator (JSON on stdout)")
    parser.add_argument(
        "scenario", choices=["ws-small", "ws-large", "latency", "handshake", "http", "http-close", "idle"]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", action="store_true", help="wss (handshake scenario)")
    parser.add_argument("--pid", type=int, action="append", default=[], help="process to sample (with children)")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int)
    parser.add_argument("--inflight", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--tunnels", type=int, default=9000)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--path", default="/", help="request path (http scenario)")
    parser.add_argument("--host-header", default="", help="Host header to send (http scenario)")
    args = parser.parse_args()
    defaults = {
        "ws-small": dict(connections=50, inflight=16, size=64),
        "ws-large": dict(connections=4, inflight=1, size=1 << 20),
        "latency": dict(connections=50, inflight=1, size=64),
        "handshake": dict(connections=50),
        "http": dict(connections=50),
        "http-close": dict(connections=50),
        "idle": dict(),
    }[args.scenario]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    tune_malloc()
    raise_nofile()
    pids = [p for root in args.pid for p in procstat.descendants(root)]
    started = time.time()
    try:
        if args.scenario in ("ws-small", "ws-large"):
            result = scenario_echo(args, pids)
        elif args.scenario == "handshake":
            result = scenario_handshake(args, pids)
        elif args.scenario in ("http", "http-close"):
            result = scenario_http(args, pids)
        elif args.scenario == "latency":
            result = run_async(latency_main(args, pids))
        else:
            result = run_async(idle_main(args, pids))
        out = {"ok": True, **result}
    except Exception as exc:  # reported as a table cell, never a crash
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    out["elapsed_s"] = round(time.time() - started, 2)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
