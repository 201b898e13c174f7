"""Benchmark upstream: WebSocket echo plus a tiny keep-alive HTTP responder.

Why hand-written: the upstream must not be the bottleneck, and a general
framework spends far more per message than the proxy under test.  This is a
raw asyncio protocol (uvloop when installed) that

* answers ``GET`` requests with a fixed 200 response, keep-alive, several
  requests per ``data_received`` answered with one write;
* on ``Upgrade: websocket`` does the RFC 6455 handshake itself, then parses
  client frames, unmasks them with one big-integer XOR (C speed, no per-byte
  Python loop) and echoes them unmasked, batching all replies of one read into
  one write.  Close frames are answered and the connection closed; pings get
  pongs.

It raises RLIMIT_NOFILE to the hard limit so it can hold 9,000+ tunnels.
Run: ``python upstream.py --port P [--tls-port Q --cert C --key K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import resource
import signal
import ssl
import sys

try:  # optional: XOR of a large payload in ~0.1 ms/MiB instead of ~4 ms
    import numpy as _np
except ImportError:  # pragma: no cover - the int path below is the fallback
    _np = None

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HTTP_BODY = b"hello from upstream\n"
HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: " + str(len(HTTP_BODY)).encode() + b"\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n" + HTTP_BODY
)
MAX_HEADER = 64 * 1024


def unmask(payload: bytes | bytearray, key: bytes | bytearray) -> bytes:
    """XOR ``payload`` with the repeating 4-byte ``key``.

    Large payloads use numpy (uint32 XOR) when installed; otherwise, and for
    small payloads, one big-integer XOR: both avoid a per-byte Python loop.
    """
    n = len(payload)
    if n == 0:
        return b""
    if _np is not None and n >= 512:
        words = n // 4
        out = bytearray(payload)
        view = _np.frombuffer(out, dtype=_np.uint32, count=words)
        view ^= _np.frombuffer(bytes(key), dtype=_np.uint32)[0]
        for i in range(words * 4, n):
            out[i] ^= key[i % 4]
        return bytes(out)
    stream = (bytes(key) * (n // 4 + 1))[:n]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")
    return value.to_bytes(n, "little")


def frame_header(first_byte: int, length: int) -> bytes:
    """Header of an unmasked (server-to-client) frame."""
    if length < 126:
        return bytes((first_byte, length))
    if length < 65536:
        return bytes((first_byte, 126)) + length.to_bytes(2, "big")
    return bytes((first_byte, 127)) + length.to_bytes(8, "big")


def handshake_response(headers: bytes) -> bytes | None:
    """Build the 101 response for a request head, or None if not an upgrade."""
    key = None
    upgrade = False
    for line in headers.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"sec-websocket-key":
            key = value.strip()
        elif name == b"upgrade" and value.strip().lower() == b"websocket":
            upgrade = True
    if not (upgrade and key):
        return None
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: HTTP until an upgrade, then WebSocket echo."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.websocket = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.websocket:
            self._frames()
        else:
            self._http()

    def _http(self) -> None:
        assert self.transport is not None
        out: list[bytes] = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEADER:
                    self.transport.close()
                break
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            reply = handshake_response(head) if b"pgrade" in head else None
            if reply is not None:
                out.append(reply)
                self.websocket = True
                break
            out.append(HTTP_RESPONSE)
        if out:
            self.transport.writelines(out)
        if self.websocket and self.buf:
            self._frames()

    def _frames(self) -> None:
        assert self.transport is not None
        buf = self.buf
        size = len(buf)
        pos = 0
        out: list[bytes] = []
        close = False
        while size - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            hdr = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hdr = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hdr = 10
            masked = b1 & 0x80
            if masked:
                hdr += 4
            end = pos + hdr + length
            if end > size:
                break
            payload = buf[pos + hdr : end]
            if masked:
                payload = unmask(payload, buf[pos + hdr - 4 : pos + hdr])
            opcode = b0 & 0x0F
            pos = end
            if opcode == 0x8:  # close: answer and hang up
                out.append(frame_header(0x88, len(payload)) + bytes(payload))
                close = True
                break
            if opcode == 0x9:  # ping -> pong
                b0 = (b0 & 0xF0) | 0xA
            elif opcode == 0xA:  # unsolicited pong: ignore
                continue
            out.append(frame_header(b0, length))
            out.append(payload)
        if pos:
            del buf[:pos]
        if out:
            self.transport.writelines(out)
        if close:
            self.transport.close()


MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(16 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 20),
    "MALLOC_TOP_PAD_": str(16 << 20),
}


def tune_malloc() -> None:
    """Re-exec once with glibc malloc tunables that keep 1 MiB buffers on the heap.

    By default glibc serves every allocation over 128 KiB with mmap/munmap, so
    each 1 MiB message costs hundreds of page faults: measured 2.0 ms vs
    0.15 ms per echoed MiB.  Only the benchmark's own processes (upstream,
    load generator) are tuned, never the proxies under test.  The pid is kept.
    """
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def raise_nofile() -> None:
    """Lift the soft descriptor limit to the hard one (9,000+ tunnels)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(UpstreamProtocol, args.host, args.port, backlog=4096, reuse_address=True)]
    if args.tls_port:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        servers.append(
            await loop.create_server(
                UpstreamProtocol,
                args.host,
                args.tls_port,
                ssl=ctx,
                backlog=4096,
                reuse_address=True,
            )
        )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("upstream ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-port", type=int, default=0)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    tune_malloc()
    raise_nofile()
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
