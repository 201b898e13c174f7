# -*- test-case-name: tests.test_relay -*-
"""
One proxied HTTP exchange: a request forwarded to an upstream server and
its response streamed back, or, for a WebSocket upgrade the upstream
accepts, the hand-over to a L{wsproxy.tunnel.Tunnel}.

The request head is rewritten for the next hop (hop-by-hop headers out,
C{Host} kept, C{X-Forwarded-*} set) and sent as one write; bodies stream in
both directions under flow control and are re-framed, never held whole.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .accesslog import logRequest
from .flow import ReadGate, writerFor
from .http import (
    CRLF,
    HEAD_END,
    LAST_CHUNK,
    ChunkedDecoder,
    HTTPError,
    LengthDecoder,
    RequestHead,
    ResponseHead,
    chunk,
    endToEnd,
    errorResponse,
    findHeadEnd,
    parseResponseHead,
    websocketAccept,
)
from .tls import describeTLSFailure
from .tunnel import Tunnel, setNoDelay
from .upstream import NoUpstreamAvailable

if TYPE_CHECKING:
    from .server import ListenerSettings, ProxyProtocol

__all__ = ["Exchange", "UpstreamProtocol"]

log = Logger()

MAX_RESPONSE_HEAD = 65536

#: Request headers the proxy writes itself.
_REQUEST_DROP = frozenset({b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
_RESPONSE_DROP = frozenset({b"content-length"})
_INTERIM_FORWARDED = (100, 102, 103)


class UpstreamProtocol(Protocol):
    """
    The proxy's connection to an upstream server.  It holds no state of its
    own: whatever owns it (an L{Exchange}, later a L{Tunnel}) gets the bytes.
    """

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.gate: ReadGate | None = None

    def connectionMade(self) -> None:
        self.gate = ReadGate(self.transport)
        self.writeNow = writerFor(self.transport)
        setNoDelay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.owner.upstreamData(data)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:
        self.owner.upstreamLost(reason)


class Exchange:
    """
    One request from a client and the upstream's answer to it.

    The client protocol feeds the request body with L{sendBody} and
    L{endBody} once L{connected} is true; the upstream's bytes arrive in
    L{upstreamData}.  When the response is complete the client protocol is
    told with C{exchangeFinished(keepAlive)}.
    """

    def __init__(self, client: ProxyProtocol, request: RequestHead, settings: ListenerSettings) -> None:
        self.client = client
        self.request = request
        self.settings = settings
        self.clock = settings.reactor
        self.started = self.clock.seconds()
        self.upstream: UpstreamProtocol | None = None
        self.server: Any = None
        self.connected = False
        self.bodyPending = bool(request.chunked or request.bodyLength)
        self.status = 0
        self.bytesIn = 0
        self.bytesOut = 0
        self._connecting: Any = None
        self._timer: Any = None
        self._responseBuffer = b""
        self._response: ResponseHead | None = None
        self._decoder: Any = None
        self._chunkedOut = False
        self._closeAfter = False
        self._headSent = False
        self._done = False
        self._reused = False
        self._reusable = False
        self._heard = False
        self._moved = False
        self._output: list[bytes] = []
        self._toClient = client.writeNow
        self._toUpstream: Any = None

    # The request

    def start(self) -> None:
        """Connect to the next upstream server and send the request head."""
        self._connecting = self.settings.pool.connect(
            lambda: UpstreamProtocol(self), self.settings.block.proxy_connect_timeout
        )
        self._connecting.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, result: tuple[Any, UpstreamProtocol, bool]) -> None:
        self._connecting = None
        self.server, upstream, self._reused = result
        if self._done:
            upstream.transport.abortConnection()
            return
        upstream.owner = self
        self.upstream = upstream
        self.connected = True
        client = self.client
        upstream.transport.registerProducer(client.gate, True)
        client.transport.registerProducer(upstream.gate, True)
        self._toUpstream = upstream.writeNow
        self._toUpstream(self._requestHead())
        if self.bodyPending:
            self._awaitRequestBody()
        else:
            self._awaitResponseHead()
        client.upstreamReady()

    def _connectFailed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self._done:
            return
        if failure.check(NoUpstreamAvailable):
            log.error("{client} {method} {target}: {why}", why=failure.getErrorMessage(), **self._logFields())
            self.fail(502, "no upstream server could be reached")
        else:
            log.failure("connecting to upstream {pool}", failure, pool=self.settings.pool.name)
            self.fail(502, "the upstream connection failed")

    def _requestHead(self) -> bytes:
        request = self.request
        settings = self.settings
        host = request.host or self._ownName()
        lines = [b"%b %b HTTP/1.1" % (request.method, request.path), b"Host: " + host]
        lines.extend(b"%b: %b" % pair for pair in endToEnd(request.headers, request.connectionTokens, _REQUEST_DROP))
        lines.append(b"X-Forwarded-For: " + self._forwardedFor())
        lines.append(b"X-Forwarded-Proto: " + settings.scheme)
        lines.append(b"X-Forwarded-Host: " + host)
        if request.chunked:
            lines.append(b"Transfer-Encoding: " + b", ".join((*request.transferCodings, b"chunked")))
        elif b"content-length" in request.fields:
            lines.append(b"Content-Length: %d" % request.bodyLength)
        if request.upgrade is not None:
            lines.append(b"Connection: Upgrade")
            lines.append(b"Upgrade: " + request.upgrade)
        elif not self.settings.pool.upstream.keepalive:
            lines.append(b"Connection: close")
        return CRLF.join(lines) + HEAD_END

    def _ownName(self) -> bytes:
        """
        The Host for an HTTP/1.0 request that sent none: the listener's
        C{server_name}, else the address the client connected to.
        """
        if self.settings.block.server_name:
            return self.settings.block.server_name.encode("ascii")
        local = self.client.transport.getHost()
        host = getattr(local, "host", "localhost")
        return (f"[{host}]" if ":" in host else host).encode("ascii") + b":%d" % getattr(local, "port", 80)

    def _forwardedFor(self) -> bytes:
        """
        The client's address; appended to the chain it sent only when the
        client is a trusted proxy (nginx C{set_real_ip_from}), so that a
        client cannot forge where a request came from.
        """
        address = self.client.clientAddress
        chain = self.request.fields.get(b"x-forwarded-for")
        if chain and self.settings.trustedProxies:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                ip = None
            if ip is not None and any(ip in network for network in self.settings.trustedProxies):
                return b", ".join(chain) + b", " + address.encode("ascii")
        return address.encode("ascii")

    def sendBody(self, payload: bytes) -> None:
        """Forward a piece of the request body, re-framed."""
        self._moved = True
        self.bytesIn += len(payload)
        limit = self.settings.block.client_max_body_size
        if limit and self.bytesIn > limit:
            self.fail(413, "request body too large")
            return
        self._toUpstream(chunk(payload) if self.request.chunked else payload)

    def endBody(self) -> None:
        """The request body is complete."""
        self.bodyPending = False
        if self.request.chunked and self.upstream is not None:
            self._toUpstream(LAST_CHUNK)
        if self.connected and self._response is None and not self._done:
            self._awaitResponseHead()

    # The response

    def upstreamData(self, data: bytes) -> None:
        if self._done:
            return
        self._heard = self._moved = True
        try:
            if self._response is None:
                data = self._readHead(data)
                if data is None:
                    return
            self._readBody(data)
        finally:
            self._flush()

    def _emit(self, data: bytes) -> None:
        """Queue bytes for the client; they go out in one write per read from the upstream."""
        self._output.append(data)

    def _flush(self) -> None:
        output = self._output
        if output:
            self._output = []
            self._toClient(output[0] if len(output) == 1 else b"".join(output))

    def _readHead(self, data: bytes) -> bytes | None:
        """
        Read the response head, relaying interim 1xx responses; return the
        bytes after the final head, or C{None} if there is nothing to read
        further yet.
        """
        buffer = self._responseBuffer + data if self._responseBuffer else data
        while True:
            try:
                end = findHeadEnd(buffer, MAX_RESPONSE_HEAD)
                if end < 0:
                    if len(buffer) > MAX_RESPONSE_HEAD:
                        raise HTTPError(502, "response head from the upstream too large")
                    self._responseBuffer = buffer
                    return None
                head = parseResponseHead(buffer[:end], self.request.method)
            except HTTPError as e:
                self._badUpstream(e.message)
                return None
            buffer = buffer[end:]
            if head.status == 101:
                self._switchProtocols(head, buffer)
                return None
            if head.status >= 200:
                break
            if head.status in _INTERIM_FORWARDED and self.request.version == b"HTTP/1.1":
                self._emit(self._responseHeadBytes(head, []))
        self._responseBuffer = b""
        self._startResponse(head)
        return buffer

    def _startResponse(self, head: ResponseHead) -> None:
        self._awaitResponseBody()
        self._response = head
        self.status = head.status
        request = self.request
        http11 = request.version == b"HTTP/1.1"
        framing: list[bytes] = []
        if head.bodyLength is not None:
            self._decoder = LengthDecoder(head.bodyLength)
            if head.status >= 200 and head.status not in (204, 304):
                if request.method == b"HEAD":
                    framing.extend(b"Content-Length: " + v for v in head.fields.get(b"content-length", [])[:1])
                else:
                    framing.append(b"Content-Length: %d" % head.bodyLength)
            elif head.status == 304:
                framing.extend(b"Content-Length: " + v for v in head.fields.get(b"content-length", [])[:1])
        else:
            self._decoder = ChunkedDecoder(502) if head.chunked else None
            if http11:
                self._chunkedOut = True
                framing.append(b"Transfer-Encoding: chunked")
            else:
                self._closeAfter = True
        if not request.keepAlive or self._closeAfter:
            self._closeAfter = True
            framing.append(b"Connection: close")
        elif not http11:
            framing.append(b"Connection: keep-alive")
        self._emit(self._responseHeadBytes(head, framing))
        self._headSent = True

    def _responseHeadBytes(self, head: ResponseHead, framing: list[bytes]) -> bytes:
        lines = [b"HTTP/1.1 %d %b" % (head.status, head.reason)]
        lines.extend(b"%b: %b" % pair for pair in endToEnd(head.headers, head.connectionTokens, _RESPONSE_DROP))
        lines.extend(framing)
        lines.extend(self.settings.extraHeaderLines)
        return CRLF.join(lines) + HEAD_END

    def _readBody(self, data: bytes) -> None:
        decoder = self._decoder
        if decoder is None:
            if data:
                self._writeBody(data)
            return
        if decoder.done:
            self._reusable = not data
            self._finishResponse()
            return
        if not data:
            return
        try:
            payload, rest = decoder.feed(data)
        except HTTPError as e:
            self._badUpstream(e.message)
            return
        if payload:
            self._writeBody(payload)
        if rest is not None:
            self._reusable = not rest
            self._finishResponse()

    def _writeBody(self, payload: bytes) -> None:
        self.bytesOut += len(payload)
        self._emit(chunk(payload) if self._chunkedOut else payload)

    def _finishResponse(self) -> None:
        if self._chunkedOut:
            self._emit(LAST_CHUNK)
        self._flush()
        self._end(keep=self._reusable and self._response.keepAlive and not self.bodyPending)
        keepAlive = not (self._closeAfter or self.bodyPending)
        self.client.exchangeFinished(keepAlive)

    def _switchProtocols(self, head: ResponseHead, early: bytes) -> None:
        """
        The upstream answered 101.  Only a switch the client asked for, to
        the protocol it asked for, with a correct C{Sec-WebSocket-Accept},
        becomes a tunnel: anything else is a 502, so that no tunnel exists
        that the upstream did not really grant (WebSocket smuggling).
        """
        request = self.request
        if request.upgrade is None:
            self._badUpstream("the upstream switched protocols without being asked")
            return
        offered = [v.strip().lower().partition(b"/")[0] for v in b",".join(head.fields.get(b"upgrade", [])).split(b",")]
        if offered != [request.upgrade] or b"upgrade" not in head.connectionTokens:
            self._badUpstream("the upstream's 101 does not switch to the requested protocol")
            return
        if request.upgrade == b"websocket":
            accept = head.fields.get(b"sec-websocket-accept", [])
            if accept != [websocketAccept(request.fields[b"sec-websocket-key"][0])]:
                self._badUpstream("the upstream's 101 has a wrong Sec-WebSocket-Accept")
                return
        self._cancelTimer()
        self.status = 101
        framing = [b"Upgrade: " + request.upgrade, b"Connection: Upgrade"]
        self._emit(self._responseHeadBytes(head, framing))
        self._flush()
        self._headSent = True
        self._done = True
        tunnel = Tunnel(self.client, self.upstream, self.settings, self._logFields())
        self.client.switchToTunnel(tunnel, early)

    # Endings

    def upstreamLost(self, reason: Failure) -> None:
        if self._done:
            return
        if (
            self._response is None
            and self._reused
            and not self._heard
            and not self.bodyPending
            and not (self.request.chunked or self.request.bodyLength)
        ):
            self._retryFresh()
            return
        if self._response is None:
            why = describeTLSFailure(reason)
            if why is not None:
                log.error("{client} {method} {target}: upstream {upstream}: {why}", why=why, **self._logFields())
                self.fail(502, "the TLS connection to the upstream failed")
            else:
                self._badUpstream("the upstream closed the connection before responding")
        elif self._decoder is None and reason.check(ConnectionDone):
            self._finishResponse()
        else:
            log.warn(
                "{client} {method} {target}: upstream {upstream} closed mid-response; response truncated",
                **self._logFields(),
            )
            self._end()
            self.client.exchangeAborted()

    def _retryFresh(self) -> None:
        """
        A kept-alive connection was closed by the server as it was reused,
        before any answer: send the request again on a new connection, as
        nothing of it can have been processed.
        """
        self.client.transport.unregisterProducer()
        self.client.gate.release("peer")
        self.upstream = None
        self.connected = False
        self._reused = False
        self._cancelTimer()
        self._connecting = self.settings.pool.connect(
            lambda: UpstreamProtocol(self), self.settings.block.proxy_connect_timeout, reuse=False
        )
        self._connecting.addCallbacks(self._connected, self._connectFailed)

    def clientLost(self) -> None:
        """The client went away: abandon the upstream side."""
        if self._done:
            return
        self._end(abort=True)
        self.status = self.status or 499

    # Waiting: one timer, for whatever the exchange waits on now.  Like
    # nginx's timeouts, each measures the time between two reads, and a
    # side that is paused by flow control (the other side reads slowly) is
    # not stalled.

    def _awaitRequestBody(self) -> None:
        self._await(self.settings.block.client_body_timeout, self._requestBodyStalled, self.client.gate)

    def _awaitResponseHead(self) -> None:
        self._await(self.settings.block.proxy_read_timeout, self._responseHeadLate, None)

    def _awaitResponseBody(self) -> None:
        self._await(self.settings.block.proxy_read_timeout, self._responseBodyStalled, self.upstream.gate)

    def _await(self, seconds: float, onStall: Any, excusedBy: ReadGate | None) -> None:
        self._cancelTimer()
        self._moved = False
        if seconds:
            self._timer = self.clock.callLater(seconds, self._checkProgress, seconds, onStall, excusedBy)

    def _checkProgress(self, seconds: float, onStall: Any, excusedBy: ReadGate | None) -> None:
        self._timer = None
        if self._done:
            return
        if self._moved or (excusedBy is not None and excusedBy.held):
            self._await(seconds, onStall, excusedBy)
            return
        onStall()

    def _requestBodyStalled(self) -> None:
        self.fail(408, "the request body stopped arriving")

    def _responseHeadLate(self) -> None:
        self.fail(504, "the upstream did not respond in time")

    def _responseBodyStalled(self) -> None:
        log.warn("{client} {method} {target}: upstream {upstream} stopped sending the body", **self._logFields())
        self.fail(504, "the upstream stopped sending")

    def _badUpstream(self, message: str) -> None:
        log.warn("{client} {method} {target}: upstream {upstream}: {message}", message=message, **self._logFields())
        self.fail(502, message)

    def fail(self, status: int, message: str) -> None:
        """
        Answer with an error of the proxy's own, or cut the response short
        if its head has already been sent.
        """
        if self._done:
            return
        self._flush()
        self.status = status
        self._end(abort=True)
        if self._headSent:
            self.client.exchangeAborted()
            return
        # After a failed upgrade the client may already be sending frames
        # that are not HTTP: the connection cannot be used again.
        close = self.bodyPending or not self.request.keepAlive or self.request.upgrade is not None
        self._toClient(
            errorResponse(status, message, self.settings.extraHeaders, close=close, head=self.request.method == b"HEAD")
        )
        self.client.exchangeFinished(not close)

    def _end(self, abort: bool = False, keep: bool = False) -> None:
        """
        Release the upstream connection (back to the pool if C{keep} and
        the pool has room) and log the exchange.
        """
        self._done = True
        self._cancelTimer()
        if self._connecting is not None:
            self._connecting.cancel()
        upstream = self.upstream
        if upstream is not None:
            upstream.owner = _Detached
            upstream.transport.unregisterProducer()
            upstream.gate.release("peer")
            if abort:
                upstream.transport.abortConnection()
            elif not (keep and self.settings.pool.release(self.server, upstream)):
                upstream.transport.loseConnection()
        if self.settings.block.access_log:
            logRequest(
                status=self.status,
                bytesIn=self.bytesIn,
                bytesOut=self.bytesOut,
                duration=self.clock.seconds() - self.started,
                **self._logFields(),
            )

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _logFields(self) -> dict[str, Any]:
        request = self.request
        return {
            "client": self.client.clientAddress,
            "method": request.method.decode("ascii"),
            "target": request.target.decode("ascii", "replace"),
            "upstream": str(self.server.address) if self.server is not None else "-",
        }


class _Detached:
    """The owner of an upstream connection that its exchange has let go of."""

    @staticmethod
    def upstreamData(data: bytes) -> None:
        pass

    @staticmethod
    def upstreamLost(reason: Failure) -> None:
        pass
