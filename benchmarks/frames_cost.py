"""
What following WebSocket frames costs a tunnel, in-process.

Every chunk a WebSocket tunnel relays goes through a
L{wsproxy.frames.FrameTracker} (so that a drain can close at a frame
boundary).  This measures that cost on the worst case for it, a stream of
64 B messages, two ways:

  1. The tunnel end alone: the relay's own per-chunk work (count, write)
     with and without the tracker, writing to nothing, in ns per frame, for
     chunks of 1, 16 and 256 frames (16 is what the benchmark's "WS echo,
     64 B, 50 conns x 16 in flight" scenario reads at a time), on a stream
     of 64 B frames (the benchmark's: a run of alike frames, which the
     tracker checks in one go) and on one of mixed sizes averaging 64 B
     (where it walks the headers one by one).
  2. A plain relay over real loopback sockets, without the reactor: recv
     from one socket, hand the chunk to the tunnel end, send it on, the
     other end reads it; the message rate with tracking over the rate
     without.  A relay without the reactor's per-read work is cheaper than
     the proxy's, so this ratio is a lower bound of the proxy's.

Finally the cost in (1) is set against the proxy CPU per message the
side-by-side benchmark measured (C{--proxy-us-per-message}, from
C{benchmarks/RESULTS.md}), for the ratio of message rates a CPU-bound
proxy would see.  Each figure is the best of C{--rounds} rounds.

    python benchmarks/frames_cost.py [--rounds 5] [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsproxy.frames import FrameTracker  # noqa: E402

PAYLOAD = 64


#: Payload sizes of the "mixed" stream: 64 B on average, no two alike in a row.
MIXED = (17, 111, 40, 88, 23, 105, 64, 70, 31, 97, 52, 76, 9, 119, 58, 64)


def frame(size: int, masked: bool) -> bytes:
    """One binary frame of C{size} random bytes, masked as a client sends it or not."""
    if masked:
        key = os.urandom(4)
        return bytes((0x82, 0x80 | size)) + key + os.urandom(size)
    return bytes((0x82, size)) + os.urandom(size)


def frames(count: int, masked: bool, mixed: bool = False) -> bytes:
    """C{count} frames of 64 B (or, C{mixed}, of sizes averaging 64 B)."""
    if mixed:
        return b"".join(frame(MIXED[i % len(MIXED)], masked) for i in range(count))
    return frame(PAYLOAD, masked) * count


class PlainEnd:
    """The relay's per-chunk work without tracking (as C{wsproxy.tunnel._TunnelEnd})."""

    __slots__ = ("write", "count")

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self.write = write
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.write(data)


class TrackedEnd(PlainEnd):
    """The same with the tracker (as C{wsproxy.tunnel._TrackedEnd})."""

    __slots__ = ("feed",)

    def __init__(self, write: Callable[[bytes], object], masked: bool) -> None:
        super().__init__(write)
        self.feed = FrameTracker(masked).feed

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.feed(data)
        self.write(data)


def endCost(perChunk: int, masked: bool, tracked: bool, seconds: float, mixed: bool = False) -> float:
    """Nanoseconds per frame of the tunnel end's work, writing to nothing."""
    chunk = frames(perChunk, masked, mixed)
    end = TrackedEnd(len, masked) if tracked else PlainEnd(len)
    receive = end.dataReceived
    loops = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(1000):
            receive(chunk)
        loops += 1000
        now = time.perf_counter()
        if now >= deadline:
            return (now - started) / (loops * perChunk) * 1e9


def relayRate(perChunk: int, tracked: bool, seconds: float, mixed: bool = False) -> float:
    """Frames per second through a recv/relay/send/recv loop on loopback sockets."""
    source, inbound = socket.socketpair()
    outbound, sink = socket.socketpair()
    chunk = frames(perChunk, True, mixed)
    end = TrackedEnd(outbound.send, True) if tracked else PlainEnd(outbound.send)
    receive = end.dataReceived
    size = len(chunk)
    sent = 0
    started = time.perf_counter()
    deadline = started + seconds
    try:
        while True:
            for _ in range(200):
                source.send(chunk)
                data = inbound.recv(65536)
                receive(data)
                got = len(data)
                while got:
                    got -= len(sink.recv(65536))
                sent += 1
            if time.perf_counter() >= deadline:
                break
        assert end.count == sent * size
        return sent * perChunk / (time.perf_counter() - started)
    finally:
        for s in (source, inbound, outbound, sink):
            s.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="per measurement")
    parser.add_argument(
        "--proxy-us-per-message",
        type=float,
        default=2.05,
        help="proxy CPU per 64 B echo (two frames) in benchmarks/RESULTS.md, scenario 1",
    )
    args = parser.parse_args()

    print("1. tunnel end alone, ns per frame (best of %d)" % args.rounds)
    print("   stream     frames/chunk  direction  plain  tracked  added")
    added: dict[bool, float] = {False: 0.0, True: 0.0}
    for mixed in (False, True):
        for perChunk in (1, 16, 256):
            for masked, direction in ((True, "client"), (False, "server")):
                plain = min(endCost(perChunk, masked, False, args.seconds, mixed) for _ in range(args.rounds))
                tracked = min(endCost(perChunk, masked, True, args.seconds, mixed) for _ in range(args.rounds))
                name = "mixed" if mixed else "64 B"
                print(
                    f"   {name:9s}  {perChunk:12d}  {direction:9s}  {plain:5.0f}  {tracked:7.0f}  {tracked - plain:5.0f}"
                )
                if perChunk == 16:
                    added[mixed] += tracked - plain

    print("2. relay over loopback sockets (no reactor), frames/s (best of %d)" % args.rounds)
    print("   stream     frames/chunk  plain       tracked     ratio")
    for mixed in (False, True):
        for perChunk in (1, 16):
            plain = max(relayRate(perChunk, False, args.seconds, mixed) for _ in range(args.rounds))
            tracked = max(relayRate(perChunk, True, args.seconds, mixed) for _ in range(args.rounds))
            name = "mixed" if mixed else "64 B"
            print(f"   {name:9s}  {perChunk:12d}  {plain:10,.0f}  {tracked:10,.0f}  {tracked / plain:.3f}")

    base = args.proxy_us_per_message
    print(f"3. against {base} us of proxy CPU per echo (one frame each way, 16 frames per chunk):")
    for mixed in (False, True):
        ratio = base / (base + added[mixed] / 1000)
        name = "mixed sizes" if mixed else "64 B"
        print(f"   {name:11s}: +{added[mixed]:.0f} ns per echo, message-rate ratio of a CPU-bound proxy {ratio:.3f}")


if __name__ == "__main__":
    main()
