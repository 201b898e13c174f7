# -*- test-case-name: tests.test_health -*-
"""
Active health checks: each server of an upstream with a C{health_check}
table is probed on its own timer, independently of traffic.

Passive health (a refused or silent connect) misses a server that accepts
TCP and then fails every request, or every WebSocket upgrade.  A check
here asks what a client would: an HTTP C{GET} whose status must be one of
those expected, or (uniquely among proxies) a WebSocket upgrade whose
C{Sec-WebSocket-Accept} must be right, a ping that must be answered by a
pong with the same payload, and a clean close.  C{fails} failures in a row
mark the server down (L{UpstreamPool.markChecked}), C{passes} successes in
a row bring it back.  Its open tunnels are never cut: a check only decides
where new requests go.

The frames of a WebSocket check are written by hand: a masked ping and a
masked close are a few bytes, and a worker that checks needs no
WebSocket library.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import HealthCheck
from .http import HTTPError, parseResponseHead, websocketAccept
from .tls import describeTLSFailure
from .upstream import UpstreamPool, UpstreamServer

__all__ = ["CheckFailed", "HTTPProbe", "PoolHealth", "ServerCheck", "WebSocketProbe", "carryHealth", "probeFor"]

log = Logger()

#: The most a check reads of a response head, or buffers of one frame.
MAX_READ = 65536

_HEAD_END = b"\r\n\r\n"
_PING, _PONG, _CLOSE = 0x9, 0xA, 0x8


class CheckFailed(Exception):
    """A server answered a check wrongly; C{str(error)} says how, for a log line."""


def hostFor(pool: UpstreamPool, server: UpstreamServer) -> bytes:
    """
    The C{Host} a check sends: C{proxy_ssl_name} or the server's name (the
    name it was resolved from, for a resolved address), with the port
    unless it is the scheme's default.
    """
    address = server.origin or server.address
    name = pool.upstream.proxy_ssl_name or address.host
    if ":" in name:
        name = f"[{name}]"
    if address.port != (443 if address.tls else 80):
        name += f":{address.port}"
    return name.encode("idna") if not name.isascii() else name.encode("ascii")


class _Probe(Protocol):
    """
    One check on one connection: L{result} fires with C{None} if the
    server passes, or fails with L{CheckFailed}; cancelling it aborts the
    connection.
    """

    def __init__(self, host: bytes, path: str) -> None:
        self.host = host
        self.path = path.encode("ascii")
        self.result: Deferred[None] = Deferred(lambda _: self._abort())
        self.buffer = b""

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def passed(self) -> None:
        if not self.result.called:
            self.transport.loseConnection()
            self.result.callback(None)

    def failed(self, why: str) -> None:
        if not self.result.called:
            self._abort()
            self.result.errback(CheckFailed(why))

    def readHead(self, data: bytes) -> Any:
        """
        Add C{data} to what was received; return the parsed response head
        once it is complete (the bytes after it stay in C{buffer}), C{None}
        until then.
        """
        self.buffer += data
        end = self.buffer.find(_HEAD_END)
        if end < 0:
            if len(self.buffer) > MAX_READ:
                self.failed("response head too long")
            return None
        head, self.buffer = self.buffer[: end + 4], self.buffer[end + 4 :]
        try:
            return parseResponseHead(head, b"GET")
        except HTTPError as e:
            self.failed(e.message)
            return None

    #: Why the check failed if the server closes now.
    closedEarly = "connection closed before the check completed"

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.failed(describeTLSFailure(reason) or self.closedEarly)


class HTTPProbe(_Probe):
    """An HTTP check: C{GET path}; the status must be one of C{statuses} (any 2xx or 3xx if empty)."""

    def __init__(self, host: bytes, path: str, statuses: tuple[int, ...] = ()) -> None:
        super().__init__(host, path)
        self.statuses = statuses

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET %b HTTP/1.1\r\nHost: %b\r\nUser-Agent: wsproxy-health-check\r\nConnection: close\r\n\r\n"
            % (self.path, self.host)
        )

    def dataReceived(self, data: bytes) -> None:
        head = self.readHead(data)
        while head is not None and 100 <= head.status < 200 and head.status != 101:
            head = self.readHead(b"")
        if head is None:
            return
        if head.status in self.statuses if self.statuses else 200 <= head.status < 400:
            self.passed()
        else:
            self.failed(f"status {head.status}")


class WebSocketProbe(_Probe):
    """
    A WebSocket check: an upgrade with a random key whose
    C{Sec-WebSocket-Accept} must match, a masked ping that must be
    answered by a pong with its payload, then a close (1000) that must be
    answered by a close.
    """

    def __init__(self, host: bytes, path: str) -> None:
        super().__init__(host, path)
        self.key = base64.b64encode(os.urandom(16))
        self.ping = os.urandom(8)
        self.switched = False
        self.closing = False

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET %b HTTP/1.1\r\nHost: %b\r\nUser-Agent: wsproxy-health-check\r\n"
            b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: %b\r\nSec-WebSocket-Version: 13\r\n\r\n" % (self.path, self.host, self.key)
        )

    def dataReceived(self, data: bytes) -> None:
        if not self.switched:
            head = self.readHead(data)
            if head is None:
                return
            if head.status != 101:
                self.failed(f"upgrade refused: status {head.status}")
                return
            if head.first(b"sec-websocket-accept") != websocketAccept(self.key):
                self.failed("wrong Sec-WebSocket-Accept")
                return
            self.switched = True
            self.transport.write(frame(_PING, self.ping))
            data = b""
        self.buffer += data
        while not self.result.called:
            parsed = readFrame(self.buffer)
            if parsed is None:
                if len(self.buffer) > MAX_READ:
                    self.failed("frame too long")
                return
            if isinstance(parsed, str):
                self.failed(parsed)
                return
            opcode, payload, self.buffer = parsed
            self.frameReceived(opcode, payload)

    def frameReceived(self, opcode: int, payload: bytes) -> None:
        if opcode == _CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            if not self.closing:
                self.failed(f"closed (code {code}) before answering the ping")
            elif code not in (None, 1000):
                self.failed(f"closed with code {code}")
            else:
                self.passed()
        elif opcode == _PONG and payload == self.ping and not self.closing:
            self.closing = True
            self.transport.write(frame(_CLOSE, (1000).to_bytes(2, "big")))

    @property
    def closedEarly(self) -> str:  # type: ignore[override]
        if not self.switched:
            return "connection closed before the upgrade was answered"
        if not self.closing:
            return "connection closed without answering the ping"
        return "connection closed without answering the close"


def frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client frame with at most 125 bytes of C{payload}."""
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


def readFrame(data: bytes) -> tuple[int, bytes, bytes] | str | None:
    """
    The first server frame in C{data}: C{(opcode, payload, rest)}, C{None}
    if it is incomplete, or what is wrong with it.
    """
    if len(data) < 2:
        return None
    if data[1] & 0x80:
        return "the server masked a frame"
    length, offset = data[1] & 0x7F, 2
    if length >= 126:
        offset = 4 if length == 126 else 10
        if len(data) < offset:
            return None
        length = int.from_bytes(data[2:offset], "big")
    if length > MAX_READ:
        return "frame too long"
    end = offset + length
    if len(data) < end:
        return None
    return data[0] & 0x0F, data[offset:end], data[end:]


def describeFailure(failure: Failure, timeout: float) -> str:
    """Why a check failed, for a log line."""
    if failure.check(CheckFailed):
        return str(failure.value)
    if failure.check(TimeoutError, ConnectTimeout):
        return f"no answer within {timeout:g}s"
    tls = describeTLSFailure(failure)
    if tls is not None:
        return tls
    if failure.check(ConnectError, ConnectionDone, OSError):
        return str(failure.value).strip().rstrip(".") or type(failure.value).__name__
    return f"{type(failure.value).__name__}: {failure.value}"


def probeFor(pool: UpstreamPool, check: HealthCheck) -> Callable[[UpstreamServer], Deferred]:
    """
    What checks one server of C{pool} once: connects (with the pool's TLS
    settings for a TLS server) and runs an L{HTTPProbe} or a
    L{WebSocketProbe}; the L{Deferred} fails with why.
    """

    async def probe(server: UpstreamServer) -> None:
        host = hostFor(pool, server)
        protocol = (
            WebSocketProbe(host, check.path) if check.kind == "websocket" else HTTPProbe(host, check.path, check.status)
        )
        await connectProtocol(server.endpoint(check.timeout), protocol)
        await protocol.result

    return lambda server: ensureDeferred(probe(server))


class ServerCheck:
    """
    The checks of one server: one every C{interval} (the first at once),
    each given C{timeout}; counts the results in a row and tells the pool
    when C{fails} or C{passes} is reached.

    @ivar fails: failures in a row, since the last success.
    @ivar passes: successes in a row, since the last failure.
    """

    def __init__(
        self,
        pool: UpstreamPool,
        server: UpstreamServer,
        check: HealthCheck,
        probe: Callable[[UpstreamServer], Deferred],
        clock: Any,
    ) -> None:
        self.pool = pool
        self.server = server
        self.check = check
        self.fails = 0
        self.passes = 0
        self._probe = probe
        self._clock = clock
        self._probing: Deferred | None = None
        self._loop = LoopingCall(self._checkOnce)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.check.interval, now=True)

    def stop(self) -> None:
        """Stop the timer and abandon a check under way, without a verdict."""
        if self._loop.running:
            self._loop.stop()
        probing, self._probing = self._probing, None
        if probing is not None:
            probing.cancel()

    def _checkOnce(self) -> Deferred:
        probing = maybeDeferred(self._probe, self.server)
        probing.addTimeout(self.check.timeout, self._clock)
        self._probing = probing
        done = Deferred()

        def passed(_: object) -> None:
            if self._probing is probing:
                self._probing = None
                self.passedOnce()
            done.callback(None)

        def failed(failure: Failure) -> None:
            if self._probing is probing:
                self._probing = None
                self.failedOnce(describeFailure(failure, self.check.timeout))
            done.callback(None)

        probing.addCallbacks(passed, failed)
        return done

    def passedOnce(self) -> None:
        self.fails = 0
        self.passes += 1
        if self.server.checkDown and self.passes >= self.check.passes:
            self.pool.markChecked(self.server, True, f"passed {self.passes} checks in a row")

    def failedOnce(self, why: str) -> None:
        self.passes = 0
        self.fails += 1
        log.debug(
            "upstream {pool} server {server} failed a check: {why}",
            pool=self.pool.name,
            server=str(self.server.address),
            why=why,
        )
        if not self.server.checkDown and self.fails >= self.check.fails:
            self.pool.markChecked(self.server, False, f"{why} ({self.fails} failed checks in a row)")


class PoolHealth(Service):
    """
    The checks of one pool: one L{ServerCheck} per server, started with
    the service and stopped with it.  L{sync} follows the pool's servers
    as DNS discovery adds and retires them; a C{resolve} server that was
    not resolved yet is not checked.
    """

    def __init__(
        self, pool: UpstreamPool, clock: Any, probe: Callable[[UpstreamServer], Deferred] | None = None
    ) -> None:
        check = pool.upstream.health_check
        if check is None:
            raise ValueError(f"upstream {pool.name!r} has no health_check")
        self.pool = pool
        self.check = check
        self.clock = clock
        self.probe = probe or probeFor(pool, check)
        self.checks: dict[UpstreamServer, ServerCheck] = {}

    def startService(self) -> None:
        super().startService()
        self.sync()

    def stopService(self) -> None:
        super().stopService()
        for check in self.checks.values():
            check.stop()
        self.checks.clear()

    def sync(self) -> None:
        """Check every server the pool has now, and stop checking those it dropped."""
        if not self.running:
            return
        current = [s for s in self.pool.servers if not s.retiring and not s.address.resolve]
        for server in [s for s in self.checks if s not in current]:
            self.checks.pop(server).stop()
        for server in current:
            if server not in self.checks:
                check = self.checks[server] = ServerCheck(self.pool, server, self.check, self.probe, self.clock)
                check.start()


def carryHealth(old: UpstreamPool, new: UpstreamPool) -> None:
    """
    Give the servers of C{new} (a reload's pool) the check verdicts of the
    same servers in C{old}: a server down by its checks stays down until
    the new pool's checks bring it back.
    """
    if new.upstream.health_check is None:
        return
    verdicts = {server.address: server.checkDown for server in old.servers if not server.retiring}
    for server in new.servers:
        server.checkDown = verdicts.get(server.address, False)
