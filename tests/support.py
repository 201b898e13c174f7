"""
Real parts for the tests: a proxy started from a configuration dictionary,
upstream servers (autobahn's echo, and scripted raw servers for odd
answers), and a raw TCP client that sends exact bytes and collects what
comes back.  Everything listens on 127.0.0.1 with ports the system picks.
"""

from __future__ import annotations

import base64
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater

from wsproxy import parseConfig
from wsproxy.demo import echoSite
from wsproxy.http import websocketAccept
from wsproxy.listeners import ProxyService

LOOPBACK = "127.0.0.1"

TWISTD = str(Path(sys.executable).parent / "twistd")
#: With the source tree on the path, twistd finds the plugin in an editable install too.
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}

KEY = base64.b64encode(b"0123456789abcdef")


#: What C{wsproxy} logs once a listener is bound (L{wsproxy.listeners.announceListening}):
#: C{"server[0] tcp:0:interface=127.0.0.1 listening on 127.0.0.1:41234"}.
#: A line counts once complete, so that a port is never read half written.
LISTENING = re.compile(r"\bserver\[(\d+)\] \S+ listening on \S+:(\d+)\r?\n")


def boundPorts(text: str) -> dict[int, int]:
    """The ports in the "listening on" lines of C{text}, by C{[[server]]} index (the first line of each)."""
    ports: dict[int, int] = {}
    for match in LISTENING.finditer(text):
        ports.setdefault(int(match.group(1)), int(match.group(2)))
    return ports


def _bound(log: Path, process: Any, count: int, lastTry: bool) -> list[int] | None:
    text = log.read_text(errors="replace")
    ports = boundPorts(text)
    if len(ports) >= count:
        return [ports[index] for index in range(count)]
    assert process.poll() is None, f"twistd exited before listening:\n{text}"
    assert not lastTry, f"twistd not listening in time:\n{text}"
    return None


def listeningPorts(log: Path, process: Any, count: int = 1, timeout: float = 20.0) -> list[int]:
    """
    The ports a C{twistd} C{process} bound its first C{count} listeners to
    (with C{tcp:0}), in C{[[server]]} order, read from its C{log} file.  A
    bounded poll: fails if the process exits or C{timeout} passes first.
    """
    deadline = time.monotonic() + timeout
    while (ports := _bound(log, process, count, time.monotonic() >= deadline)) is None:
        time.sleep(0.05)
    return ports


async def listeningPortsOf(log: Path, process: Any, count: int = 1, timeout: float = 20.0) -> list[int]:
    """L{listeningPorts} without blocking the reactor."""
    found = lambda: len(boundPorts(log.read_text(errors="replace"))) >= count or process.poll() is not None  # noqa: E731
    await until(found, timeout)
    ports = _bound(log, process, count, True)
    assert ports is not None
    return ports


def upgradeRequest(path: bytes = b"/ws", extra: bytes = b"") -> bytes:
    """A valid WebSocket upgrade request, with C{extra} header lines."""
    return (
        b"GET %b HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: %b\r\nSec-WebSocket-Version: 13\r\n%b\r\n" % (path, KEY, extra)
    )


def switching(key: bytes = KEY) -> bytes:
    """An upstream's 101 accepting C{key}."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %b\r\n\r\n" % websocketAccept(key)
    )


def sleep(seconds: float) -> Deferred:
    """
    Let C{seconds} pass.  Only to pace what a test sends (a slowloris, a
    slow reader) or between the checks of a bounded poll; a test waits for
    what it depends on with an event, L{until} or L{stillAfter}.
    """
    return deferLater(reactor, seconds, lambda: None)


async def until(condition: Callable[[], object], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """
    Poll C{condition} until it holds or C{timeout} seconds pass; return
    whether it holds.  Assert on the result.
    """
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() >= deadline:
            return False
        await sleep(interval)
    return True


async def stillAfter(seconds: float, condition: Callable[[], object], interval: float = 0.01) -> bool:
    """
    Whether C{condition} stays true for the next C{seconds} (checked every
    C{interval}): for what must I{not} happen within a time, such as a
    connection that must stay open through an idle period.  Returns
    C{False} as soon as it does not hold.
    """
    deadline = reactor.seconds() + seconds
    while condition():
        if reactor.seconds() >= deadline:
            return True
        await sleep(interval)
    return False


def unsent(transport: Any) -> int:
    """How many written bytes a TCP C{transport} still holds, not yet handed to the kernel."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


async def startProxy(upstreams: dict[str, Any], *servers: dict[str, Any], **topLevel: Any) -> ProxyService:
    """
    Start a proxy; each server block listens on an ephemeral loopback port
    unless it says otherwise.  The ports are in C{service.ports}.
    """
    blocks = [{"listen": f"tcp:0:interface={LOOPBACK}", "access_log": False, **block} for block in servers]
    document = {
        "upstream": upstreams,
        "server": blocks,
        "shutdown_timeout": 1,
        "websocket_close_timeout": 1,
        **topLevel,
    }
    service = ProxyService(parseConfig(document, source="(test)"), reactor)
    service.startService()
    listening = [await listener.listeningPort() for listener in service.listeners]
    service.ports = [port.getHost().port for port in listening]
    return service


async def stopProxy(service: ProxyService) -> None:
    await service.stopService()


def proxyTo(*upstreamPorts: int, **block: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The upstream table and server block for a proxy in front of C{upstreamPorts}."""
    upstreams = {"app": {"servers": [f"{LOOPBACK}:{port}" for port in upstreamPorts]}}
    return upstreams, {"proxy_pass": "http://app", **block}


async def startProxyFor(cleanup: Any, *upstreamPorts: int, **block: Any) -> ProxyService:
    """A proxy in front of C{upstreamPorts}, stopped by C{cleanup} after the test."""
    upstreams, server = proxyTo(*upstreamPorts, **block)
    return cleanup.service(await startProxy(upstreams, server))


def listenEcho() -> Any:
    """Autobahn's echo (with permessage-deflate) at /ws and a page at /."""
    return reactor.listenTCP(0, echoSite(), interface=LOOPBACK)


class ScriptedUpstream(Factory):
    """
    A raw upstream server: records each request head it receives and
    answers with what C{answer(requestBytes, connection)} returns, once the
    head (and any body named by Content-Length) is in.
    """

    noisy = False

    def __init__(self, answer: Callable[[bytes, Any], bytes | None] | bytes, closeAfter: bool = True) -> None:
        self.answer = answer if callable(answer) else (lambda request, connection: answer)
        self.closeAfter = closeAfter
        self.requests: list[bytes] = []
        self.connections: list[ScriptedConnection] = []

    #: The protocol each accepted connection gets; subclasses script other peers.
    connectionClass: type[ScriptedConnection]

    def buildProtocol(self, addr: Any) -> Protocol:
        connection = self.connectionClass()
        connection.factory = self
        self.connections.append(connection)
        return connection


class ScriptedConnection(Protocol):
    """
    Answers each complete request on the connection in turn, until it
    answers one with a 101 (after that, bytes are only recorded) or closes.
    """

    factory: ScriptedUpstream

    def connectionMade(self) -> None:
        self.received = b""
        self.pending = b""
        self.answered = False
        self.switched = False
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.switched:
            return
        self.pending += data
        while not self.switched and self.transport.connected:
            request = self._nextRequest()
            if request is None:
                return
            self.answered = True
            self.factory.requests.append(request)
            reply = self.factory.answer(request, self)
            if reply is None:
                continue
            self.transport.write(reply)
            if reply.startswith(b"HTTP/1.1 101 "):
                self.switched = True
            elif self.factory.closeAfter:
                self.transport.loseConnection()

    def _nextRequest(self) -> bytes | None:
        """Take one complete request (head and body) off the pending bytes."""
        end = self.pending.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.pending[: end + 4]
        if any(
            line.startswith(b"transfer-encoding:") and line.rstrip().endswith(b"chunked")
            for line in head.lower().split(b"\r\n")
        ):
            last = self.pending.find(b"\r\n0\r\n\r\n", end)
            if last < 0:
                return None
            size = last + 7
        else:
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            size = end + 4 + length
            if len(self.pending) < size:
                return None
        request, self.pending = self.pending[:size], self.pending[size:]
        return request

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


ScriptedUpstream.connectionClass = ScriptedConnection


def listenScripted(
    answer: Callable[[bytes, Any], bytes | None] | bytes, closeAfter: bool = True
) -> tuple[Any, ScriptedUpstream]:
    factory = ScriptedUpstream(answer, closeAfter)
    return reactor.listenTCP(0, factory, interface=LOOPBACK), factory


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


class RawClient(Protocol):
    """Sends exact bytes; collects every byte that comes back."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred = Deferred()
        self._waiters: list[tuple[Callable[[bytes], bool], Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for waiter in list(self._waiters):
            if waiter[0](self.received):
                self._waiters.remove(waiter)
                waiter[1].callback(self.received)

    def connectionLost(self, reason: Any = None) -> None:
        for _, waiting in self._waiters:
            waiting.callback(self.received)
        self._waiters = []
        self.closed.callback(self.received)

    def waitFor(self, predicate: Callable[[bytes], bool] | bytes, timeout: float = 5.0) -> Deferred:
        """Fire with everything received once C{predicate} holds (or on close or timeout)."""
        if isinstance(predicate, bytes):
            marker = predicate
            predicate = lambda received: marker in received  # noqa: E731
        if predicate(self.received) or self.closed.called:
            from twisted.internet.defer import succeed

            return succeed(self.received)
        waiting: Deferred = Deferred()
        self._waiters.append((predicate, waiting))
        waiting.addTimeout(timeout, reactor, onTimeoutCancel=lambda result, t: self.received)
        return waiting

    def waitClosed(self, timeout: float = 5.0) -> Deferred:
        """Fire with everything received when the server closes, or C{None} on timeout."""
        waiting: Deferred = Deferred()
        self.closed.addBoth(lambda result: (waiting.called or waiting.callback(result), result)[1])
        waiting.addTimeout(timeout, reactor, onTimeoutCancel=lambda result, t: None)
        return waiting


async def connectRaw(port: int) -> RawClient:
    return await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, port), RawClient())


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes | None:
    """Send C{data}, return all that came back before the proxy closed (None if it did not)."""
    client = await connectRaw(port)
    client.transport.write(data)
    received = await client.waitClosed(timeout)
    if received is None:
        client.transport.abortConnection()
    return received


def openFileDescriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def gather(*deferreds: Deferred) -> Deferred:
    return DeferredList(list(deferreds), fireOnOneErrback=True, consumeErrors=True).addCallback(
        lambda results: [value for _, value in results]
    )


__all__ = [
    "ENVIRONMENT",
    "KEY",
    "LOOPBACK",
    "TWISTD",
    "boundPorts",
    "listeningPorts",
    "listeningPortsOf",
    "startProxyFor",
    "switching",
    "upgradeRequest",
    "RawClient",
    "ScriptedUpstream",
    "connectRaw",
    "ensureDeferred",
    "exchange",
    "gather",
    "listenEcho",
    "listenScripted",
    "ok",
    "openFileDescriptors",
    "proxyTo",
    "sleep",
    "startProxy",
    "stillAfter",
    "stopProxy",
    "unsent",
    "until",
]


class ServerCertificate:
    """
    A listener's certificate for C{localhost} and C{127.0.0.1}, issued by a
    throwaway CA and written to C{directory}: the C{[[server]]} keys that
    load it (L{block}), and client endpoints that trust it.
    """

    def __init__(self, directory: Path, *names: str) -> None:
        import trustme

        authority = trustme.CA()
        leaf = authority.issue_cert(*(names or ("localhost", "127.0.0.1")))
        certificate, key = directory / "server.pem", directory / "server.key"
        certificate.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        self.caPEM = authority.cert_pem.bytes()
        self.block = {"ssl_certificate": str(certificate), "ssl_certificate_key": str(key)}

    def wrap(self, endpoint: Any, hostname: str = "localhost") -> Any:
        """C{endpoint} behind TLS that verifies this certificate for C{hostname}."""
        return wrapClientTLS(optionsForClientTLS(hostname, trustRoot=Certificate.loadPEM(self.caPEM)), endpoint)


async def connectTo(port: int, certificate: ServerCertificate | None = None, protocol: Any = None) -> Any:
    """A client on C{port} of loopback: over TLS when a C{certificate} says so, else plain TCP."""
    endpoint: Any = TCP4ClientEndpoint(reactor, LOOPBACK, port)
    if certificate is not None:
        endpoint = certificate.wrap(endpoint)
    return await connectProtocol(endpoint, protocol or RawClient())
