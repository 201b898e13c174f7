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

import enum
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .accesslog import logRequest
from .config import AccessLog
from .connection import ReceiveBuffer
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
    forwardedFor,
    forwardedRequestHeaders,
    fromTrustedProxy,
    parseResponseHead,
    websocketAccept,
)
from .interfaces import IExchange, ILegOwner, IRequestLoop
from .leg import Leg, Unowned
from .tls import describeTLSFailure
from .upstream import Lease, NoUpstreamAvailable, UpstreamsFull, ipHashKey
from .variables import contextFor, headerValueOK

if TYPE_CHECKING:
    from .server import ListenerSettings

__all__ = ["Exchange", "ExchangeState", "UpstreamLeg"]

log = Logger()

MAX_RESPONSE_HEAD = 65536

#: Methods a request may be sent again for (RFC 9110 §9.2.2).
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_RESPONSE_DROP = frozenset({b"content-length"})
_OWN_NAMES = {
    b"x-forwarded-for": b"X-Forwarded-For",
    b"x-real-ip": b"X-Real-IP",
    b"x-forwarded-proto": b"X-Forwarded-Proto",
    b"x-forwarded-host": b"X-Forwarded-Host",
}
_INTERIM_FORWARDED = (100, 102, 103)


class UpstreamLeg(Leg):
    """
    The proxy's connection to an upstream server.  Its owner is the
    L{Exchange} it serves, then a tunnel end, or the pool while it waits
    for the next request.
    """

    __slots__ = ()


class ExchangeState(enum.Enum):
    """
    Where an L{Exchange} is.

      - C{CONNECTING}: waiting for a connection to an upstream server (a
        new one, or one from the pool).
      - C{SENDING}: the request head has been sent; its body streams.
      - C{WAITING}: the request has been sent whole; the response head is
        awaited (C{proxy_read_timeout}).
      - C{RECEIVING}: the response head has gone to the client and its body
        streams (the request body may still be streaming: an early
        response).
      - C{SWITCHED}: the upstream granted an upgrade; both connections
        belong to a tunnel now.
      - C{DONE}: over: complete, failed or abandoned.  Nothing it is told
        any more has an effect.
    """

    CONNECTING = "CONNECTING"
    SENDING = "SENDING"
    WAITING = "WAITING"
    RECEIVING = "RECEIVING"
    SWITCHED = "SWITCHED"
    DONE = "DONE"


# Module-level names: the states are compared several times per request.
_CONNECTING = ExchangeState.CONNECTING
_SENDING = ExchangeState.SENDING
_WAITING = ExchangeState.WAITING
_RECEIVING = ExchangeState.RECEIVING
_SWITCHED = ExchangeState.SWITCHED
_DONE = ExchangeState.DONE
_OVER = (_SWITCHED, _DONE)


@implementer(IExchange, ILegOwner)
class Exchange:
    """
    One request from a client and the upstream's answer to it.

    The request loop feeds the request body with L{bodyReceived} and
    L{bodyComplete} once L{readyForBody} is true; the upstream's bytes come
    in through L{dataReceived}, as the owner of the upstream leg.  The
    loop is told the outcome through L{IRequestLoop}.

    @ivar state: an L{ExchangeState}.
    @ivar requestSent: whether the request body is complete: nothing of
        the request is left to send once the head is (true from the start
        for a request without a body).
    @ivar reused: whether the upstream connection came from the pool.
    @ivar lease: this exchange's hold on its server, handed to the tunnel
        after an upgrade.
    """

    def __init__(self, loop: IRequestLoop, request: RequestHead, settings: ListenerSettings) -> None:
        self.loop = loop
        self.client = loop.leg
        self.request = request
        self.settings = settings
        self.clock = settings.reactor
        self.started = self.clock.seconds()
        self.state = _CONNECTING
        self.upstream: UpstreamLeg | None = None
        self.server: Any = None
        self.reused = False
        self.lease = Lease()
        self._stickyFrom: bytes | None = None
        self.requestSent = not (request.chunked or request.bodyLength)
        self.status = 0
        self.bytesIn = 0
        self.bytesOut = 0
        self._connecting: Any = None
        self._heard = False
        self._headBuffer = ReceiveBuffer()
        self._response: ResponseHead | None = None
        self._decoder: Any = None
        self._chunkedOut = False
        self._closeAfter = False
        self._upstreamReusable = False
        self._output: list[bytes] = []
        #: The request target sent upstream (a location's proxy_pass URI may replace the client's).
        self.target = request.path
        #: The normalised path and the query, when the router has them already.
        self.uri: bytes | None = None
        self.args: bytes | None = None
        #: The status the client is told instead of the upstream's (an C{error_page} answer).
        self.statusOverride = 0
        #: C{(status, message) -> IExchange | None}: the C{error_page} for an error of the proxy's own.
        self.errorPage: Any = None
        #: The request's variables, once a template needed them (the access log reads the same $request_id).
        self.context: Any = None
        #: The size of the response head sent (C{$bytes_sent}).
        self.headBytes = 0

    @property
    def readyForBody(self) -> bool:
        return self.upstream is not None and self.state not in _OVER

    # The request

    def start(self) -> None:
        """Connect to the next upstream server and send the request head."""
        try:
            self._head = self._requestHead()
        except HTTPError as e:
            self.fail(e.status, e.message)
            return
        except Exception:
            log.failure("{client} {method} {target}: building the request head failed", **self._logFields())
            self.fail(500, "the request could not be forwarded")
            return
        self._connect(reuse=True)

    def _connect(self, reuse: bool) -> None:
        self.state = _CONNECTING
        pool = self.settings.pool
        sticky = pool.upstream.sticky_cookie
        if sticky is not None:
            self._stickyFrom = self._cookie(sticky.encode("ascii"))
        try:
            order = pool.pickOrder(self._balanceKey(), self._stickyFrom)
        except NoUpstreamAvailable:
            self._connectFailed(Failure())
            return
        self.lease.hold(order[0])
        if reuse:
            leg = pool.takeIdle(order[0])
            if leg is not None:
                try:
                    self._connected((order[0], leg, True))
                except Exception:
                    self._connectFailed(Failure())
                return
        connecting = pool.connectInOrder(order, self._newLeg, self.settings.block.proxy_connect_timeout, self.lease)
        self._connecting = connecting
        connecting.addCallback(self._connected)
        connecting.addErrback(self._connectFailed)

    def _balanceKey(self) -> bytes | None:
        """The hash key for C{balance = "ip_hash"} or C{"hash"}, else C{None}."""
        pool = self.settings.pool
        balance = pool.upstream.balance
        if balance == "ip_hash":
            return ipHashKey(self.client.clientAddress)
        if balance != "hash":
            return None
        return pool.hashKey.expand(self._variables())

    def _cookie(self, name: bytes) -> bytes | None:
        """The value of the request's cookie C{name} (case-insensitive, as nginx's C{$cookie_NAME})."""
        name = name.lower()
        for header in self.request.fields.get(b"cookie", []):
            for pair in header.split(b";"):
                cookie, _, value = pair.strip().partition(b"=")
                if cookie.lower() == name:
                    return value
        return None

    def _stickyLines(self) -> list[bytes]:
        """The C{Set-Cookie} that pins the client to its server, unless the request already named it."""
        name = self.settings.pool.upstream.sticky_cookie
        if name is None or self.server is None:
            return []
        value = self.server.id.encode("ascii")
        if value == self._stickyFrom:
            return []
        return [b"Set-Cookie: %b=%b; Path=/; HttpOnly" % (name.encode("ascii"), value)]

    def _newLeg(self) -> UpstreamLeg:
        return UpstreamLeg(self.clock)

    def _connected(self, result: tuple[Any, UpstreamLeg, bool]) -> None:
        self._connecting = None
        server, upstream, reused = result
        if self.state is not _CONNECTING:
            upstream.abort()
            return
        self.server, self.upstream, self.reused = server, upstream, reused
        upstream.owner = self
        upstream.sendTimeout = self.settings.block.proxy_send_timeout
        client = self.client
        client.feedFrom(upstream)
        upstream.feedFrom(client)
        upstream.write(self._head)
        if self.requestSent:
            self._awaitResponseHead()
        else:
            self.state = _SENDING
        self.loop.readyForBody()

    def _connectFailed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError, ConnectingCancelledError):
            return
        if failure.check(UpstreamsFull):
            log.warn("{client} {method} {target}: {why}", why=failure.getErrorMessage(), **self._logFields())
            self.fail(503, "every upstream server is at its connection limit")
        elif failure.check(NoUpstreamAvailable):
            log.error("{client} {method} {target}: {why}", why=failure.getErrorMessage(), **self._logFields())
            self.fail(502, "no upstream server could be reached")
        else:
            # A connection error, or an error of our own while starting the
            # exchange on the new connection: either way the client is told.
            log.failure("{client} {method} {target}: proxying failed", failure, **self._logFields())
            self.fail(502, "the upstream connection failed")

    def _requestHead(self) -> bytes:
        request = self.request
        settings = self.settings
        host = request.host or self._ownName()
        address = self.client.clientAddress.encode("ascii")
        trusted = self._fromTrustedProxy()
        headers = forwardedRequestHeaders(
            request, trustedClient=trusted, underscores=settings.block.underscores_in_headers
        )
        forwarded = forwardedFor(request, self.client.clientAddress, settings, trusted)
        realIP = (request.first(b"x-real-ip") if trusted else None) or address
        if not settings.setNames:
            lines = [b"%b %b HTTP/1.1" % (request.method, self.target), b"Host: " + host]
            lines.extend(b"%b: %b" % pair for pair in headers)
            lines.append(b"X-Forwarded-For: " + forwarded)
            lines.append(b"X-Real-IP: " + realIP)
            lines.append(b"X-Forwarded-Proto: " + settings.scheme)
            lines.append(b"X-Forwarded-Host: " + host)
        else:
            lines = self._setHeaders(host, headers, forwarded, realIP)
        if request.chunked:
            lines.append(b"Transfer-Encoding: " + b", ".join((*request.transferCodings, b"chunked")))
        elif b"content-length" in request.fields:
            lines.append(b"Content-Length: %d" % request.bodyLength)
        if request.upgrade is not None:
            lines.append(b"Connection: Upgrade")
            lines.append(b"Upgrade: " + request.upgrade)
        elif not settings.pool.upstream.keepalive:
            lines.append(b"Connection: close")
        return CRLF.join(lines) + HEAD_END

    def _setHeaders(
        self, host: bytes, headers: list[tuple[bytes, bytes]], forwarded: bytes, realIP: bytes
    ) -> list[bytes]:
        """
        The head's lines with nginx's C{proxy_set_header}: a configured
        value replaces the proxy's and the client's; an empty one removes
        the header.
        """
        settings = self.settings
        own = {
            b"host": host,
            b"x-forwarded-for": forwarded,
            b"x-real-ip": realIP,
            b"x-forwarded-proto": settings.scheme,
            b"x-forwarded-host": host,
        }
        setNames = settings.setNames
        headers = [(name, value) for name, value in headers if name.lower() not in setNames]
        context = self._variables()
        for lower, name, template in settings.setHeaders:
            value = template.expand(context)
            own.pop(lower, None)
            if value:
                if not headerValueOK(value):
                    raise HTTPError(400, f"proxy_set_header {name.decode()} would carry a line break")
                headers.append((name, value))
        lines = [b"%b %b HTTP/1.1" % (self.request.method, self.target)]
        if b"host" in own:
            lines.append(b"Host: " + own.pop(b"host"))
        lines.extend(b"%b: %b" % pair for pair in headers)
        lines.extend(_OWN_NAMES[name] + b": " + value for name, value in own.items())
        return lines

    def _variables(self) -> Any:
        """The request's nginx variables (C{proxy_set_header}, a C{hash} key), made once."""
        if self.context is None:
            self.context = contextFor(self.request, self.client, self.settings, self.uri, self.args)
        return self.context

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

    def _fromTrustedProxy(self) -> bool:
        return fromTrustedProxy(self.client.clientAddress, self.settings)

    def bodyReceived(self, payload: bytes) -> None:
        """Forward a piece of the request body, re-framed."""
        self.bytesIn += len(payload)
        self.upstream.write(chunk(payload) if self.request.chunked else payload)

    def bodyComplete(self) -> None:
        """The request body is complete."""
        self.requestSent = True
        if self.request.chunked:
            self.upstream.write(LAST_CHUNK)
        if self.state is _SENDING:
            self._awaitResponseHead()

    # The response

    def dataReceived(self, data: bytes) -> None:
        if self.state in _OVER:
            return
        self._heard = True
        try:
            if self._response is None:
                data = self._readHead(data)
                if data is None:
                    return
            self._readBody(data)
        finally:
            self._flush()

    def writable(self) -> None:
        pass

    def _emit(self, data: bytes) -> None:
        """Queue bytes for the client; they go out in one write per read from the upstream."""
        self._output.append(data)

    def _flush(self) -> None:
        output = self._output
        if output:
            self._output = []
            self.client.write(output[0] if len(output) == 1 else b"".join(output))

    def _readHead(self, data: bytes) -> bytes | None:
        """
        Read the response head, relaying interim 1xx responses; return the
        bytes after the final head, or C{None} if there is nothing to read
        further yet.
        """
        buffer = self._headBuffer
        buffer.append(data)
        while True:
            try:
                head = buffer.takeHead(MAX_RESPONSE_HEAD)
                if head is None:
                    if len(buffer) > MAX_RESPONSE_HEAD:
                        raise HTTPError(502, "response head from the upstream too large")
                    return None
                response = parseResponseHead(head, self.request.method)
            except HTTPError as e:
                self._badUpstream(e.message)
                return None
            if response.status == 101:
                self._switchProtocols(response, buffer.takeAll())
                return None
            if response.status >= 200:
                break
            if response.status in _INTERIM_FORWARDED and self.request.version == b"HTTP/1.1":
                self._emit(self._responseHeadBytes(response, []))
        self._startResponse(response)
        return buffer.takeAll()

    def _startResponse(self, head: ResponseHead) -> None:
        self.settings.metrics.responseHead(self.started)
        self.state = _RECEIVING
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
        # An answer that comes before the request body is all in ends the
        # connection: the rest of the body cannot be told from a next request.
        # So does a shutdown.
        if not request.keepAlive or self._closeAfter or not self.requestSent or self.loop.draining:
            self._closeAfter = True
            framing.append(b"Connection: close")
        elif not http11:
            framing.append(b"Connection: keep-alive")
        framing.extend(self._stickyLines())
        headBytes = self._responseHeadBytes(head, framing)
        self.headBytes = len(headBytes)
        self._emit(headBytes)
        self.upstream.expectData(self.settings.block.proxy_read_timeout, self._responseBodyStalled)

    def _responseHeadBytes(self, head: ResponseHead, framing: list[bytes]) -> bytes:
        settings = self.settings
        status = self.statusOverride if self.statusOverride and head.status >= 200 else head.status
        reason = head.reason if status == head.status else _phrase(status)
        lines = [b"HTTP/1.1 %d %b" % (status, reason)]
        headers = endToEnd(head.headers, head.connectionTokens, settings.responseDrop)
        if settings.redirects and b"location" in head.fields:
            headers = [
                (name, self._rewriteLocation(value) if name.lower() == b"location" else value)
                for name, value in headers
            ]
        lines.extend(b"%b: %b" % pair for pair in headers)
        lines.extend(framing)
        lines.extend(self.settings.extraHeaderLines)
        return CRLF.join(lines) + HEAD_END

    def _rewriteLocation(self, value: bytes) -> bytes:
        """nginx's C{proxy_redirect}: the first rule whose prefix matches rewrites C{Location}."""
        for old, new in self.settings.redirects:
            if value.startswith(old):
                value = new + value[len(old) :]
                if value.startswith(b"/"):
                    from .router import absoluteURL

                    request = self.request
                    host = (
                        request.host.rpartition(b":")[0]
                        if request.host and request.host[-1:] != b"]" and b":" in request.host
                        else request.host
                    )
                    value = absoluteURL(self.loop, self.settings.scheme, (host or b"").lower(), value)
                return value
        return value

    def _readBody(self, data: bytes) -> None:
        decoder = self._decoder
        if decoder is None:
            if data:
                self._writeBody(data)
            return
        if decoder.done:
            self._upstreamReusable = not data
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
            self._upstreamReusable = not rest
            self._finishResponse()

    def _writeBody(self, payload: bytes) -> None:
        self.bytesOut += len(payload)
        self._emit(chunk(payload) if self._chunkedOut else payload)

    def _finishResponse(self) -> None:
        if self._chunkedOut:
            self._emit(LAST_CHUNK)
        self._flush()
        self._end(keep=self._upstreamReusable and self._response.keepAlive and self.requestSent)
        self.loop.exchangeFinished(not self._closeAfter)

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
        self.settings.metrics.responseHead(self.started)
        self.status = 101
        self.state = _SWITCHED
        switched = [b"Upgrade: " + request.upgrade, b"Connection: Upgrade", *self._stickyLines()]
        self._emit(self._responseHeadBytes(head, switched))
        self._flush()
        upstream = self.upstream
        upstream.dropTimer()
        upstream.sendTimeout = self.settings.block.send_timeout
        logFields = self._logFields()
        if self.settings.block.access_log.__class__ is AccessLog:
            # A log format may read the request's headers when the tunnel ends;
            # otherwise the tunnel does not keep them.
            logFields["request"] = request
        self.loop.switchToTunnel(upstream, early, logFields, self.settings, self.lease)

    # Endings

    def connectionLost(self, reason: Failure) -> None:
        """The upstream connection is gone."""
        if self.state in _OVER:
            return
        if self.upstream.sendTimedOut:
            self.settings.metrics.timeout("proxy_send")
            self.fail(504, "the upstream did not read the request in time")
        elif self._response is None:
            if self.reused and not self._heard and self._mayRetry():
                self._retryFresh()
                return
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
            self.loop.exchangeAborted()

    def _mayRetry(self) -> bool:
        """
        Whether the request may be sent again after a kept-alive connection
        closed as it was reused: it went whole (no body to replay) and its
        method is idempotent, or the configuration allows any method
        (nginx C{proxy_next_upstream ... non_idempotent}).
        """
        request = self.request
        if request.chunked or request.bodyLength:
            return False
        return request.method in IDEMPOTENT_METHODS or self.settings.block.proxy_next_upstream_non_idempotent

    def _retryFresh(self) -> None:
        """
        A kept-alive connection was closed by the server as it was reused,
        before any answer: send the request again on a new connection.
        """
        self.client.feedFrom(None)
        self.upstream = None
        self.reused = False
        self._connect(reuse=False)

    def clientWritable(self) -> None:
        pass

    def clientLost(self) -> None:
        """The client went away: abandon the upstream side (nginx logs 499 if no response had begun)."""
        if self.state in _OVER:
            return
        self.status = self.status or 499
        self._end(abort=True)

    def _awaitResponseHead(self) -> None:
        self.state = _WAITING
        self.upstream.expectData(self.settings.block.proxy_read_timeout, self._responseHeadLate)

    def _responseHeadLate(self) -> None:
        self.settings.metrics.timeout("proxy_read")
        self.fail(504, "the upstream did not respond in time")

    def _responseBodyStalled(self) -> None:
        self.settings.metrics.timeout("proxy_read")
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
        state = self.state
        if state in _OVER:
            return
        self._flush()
        self._end(abort=True, status=self.status if state is _RECEIVING else status)
        if state is _RECEIVING:
            self.loop.exchangeAborted()
            return
        request = self.request
        if self.errorPage is not None and self.requestSent and request.upgrade is None:
            page = self.errorPage(status, message)
            if page is not None:
                self.loop.replaceExchange(page)
                return
        # After a failed upgrade the client may already be sending frames
        # that are not HTTP: the connection cannot be used again.
        close = not self.requestSent or not request.keepAlive or request.upgrade is not None or self.loop.draining
        self.client.write(
            errorResponse(status, message, self.settings.extraHeaders, close=close, head=request.method == b"HEAD")
        )
        self.loop.exchangeFinished(not close)

    def _end(self, abort: bool = False, keep: bool = False, status: int | None = None) -> None:
        """
        Release the upstream connection (back to the pool if C{keep} and
        the pool has room) and log the exchange.
        """
        self.state = _DONE
        self.lease.release()
        if status is not None:
            self.status = status
        if self._connecting is not None:
            self._connecting.cancel()
        upstream = self.upstream
        if upstream is not None:
            self.client.feedFrom(None)
            upstream.feedFrom(None)
            upstream.cancelTimer()
            upstream.owner = Unowned
            if abort:
                upstream.abort()
            elif not (keep and self.settings.pool.release(self.server, upstream)):
                upstream.close()
        self.settings.metrics.requestEnded(self.status, self.started, self.request.upgrade)
        if self.settings.block.access_log:
            logRequest(
                status=self.status,
                bytesIn=self.bytesIn,
                bytesOut=self.bytesOut,
                duration=self.clock.seconds() - self.started,
                **self._logFields(),
                destination=self.settings.block.access_log,
                request=self.request,
                leg=self.client,
                settings=self.settings,
                context=self.context,
                upstreamStatus=self._response.status if self._response is not None else None,
                headBytes=self.headBytes,
            )

    def _logFields(self) -> dict[str, Any]:
        request = self.request
        return {
            "client": self.client.clientAddress,
            "method": request.method.decode("ascii"),
            "target": request.target.decode("ascii", "backslashreplace"),
            "upstream": str(self.server.address) if self.server is not None else "-",
        }


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
