# -*- test-case-name: tests.test_http -*-
"""
HTTP/1.1 message heads: strict parsing (RFC 9112), body framing, and the
hop-by-hop rules a proxy applies between the two connections.

Everything here works on bytes and knows nothing about transports, so the
request and response parsers can be tested, and fuzzed, on their own.  The
parsers are deliberately strict: a request that two HTTP implementations
could read differently (the root of request smuggling) is refused rather
than guessed at.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

__all__ = [
    "BodyDecoder",
    "ChunkedDecoder",
    "HTTPError",
    "Limits",
    "LengthDecoder",
    "RequestHead",
    "ResponseHead",
    "errorResponse",
    "forwardedFor",
    "forwardedRequestHeaders",
    "fromTrustedProxy",
    "parseRequestHead",
    "parseResponseHead",
    "websocketAccept",
]

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"

#: Headers that concern one connection only (RFC 9110 §7.6.1), never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Headers the proxy sets or must keep; naming them in Connection removes
#: nothing.  The WebSocket handshake fields are here so that a
#: C{Connection: Origin} cannot slip a cross-site upgrade past an upstream
#: that checks C{Origin}, nor strip the handshake itself.
PROTECTED = frozenset(
    {
        b"host",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"forwarded",
        b"origin",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
    }
)

#: Request headers the proxy writes itself: the client's are never sent on.
_REQUEST_WRITTEN = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
    }
)
#: Credentials meant for this proxy (RFC 9110 §11.7.4), never for the upstream.
_FOR_THE_PROXY = frozenset({b"proxy-authorization"})
#: Where a request came from or was addressed to, as some proxy in front
#: claims it; only a trusted client (C{set_real_ip_from}) may say so, else
#: an upstream could be told any address, port, prefix or URL.
_CLIENT_ROUTING = frozenset(
    {
        b"forwarded",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-client-ip",
        b"true-client-ip",
        b"x-original-url",
        b"x-rewrite-url",
    }
)
_UNDERSCORE = ord("_")
_DROP_FROM_TRUSTED = HOP_BY_HOP | _REQUEST_WRITTEN | _FOR_THE_PROXY
_DROP_FROM_UNTRUSTED = _DROP_FROM_TRUSTED | _CLIENT_ROUTING

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN_RE = re.compile(_TOKEN)
#: What a field value may never hold (RFC 9110 §5.5); other CTLs are retained.
_VALUE_FORBIDDEN = re.compile(rb"[\x00\r\n]")
#: The request-target is any run of VCHAR or obs-text; obs-text is %-encoded
#: before it is forwarded, and a fragment is dropped.
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) (HTTP/[0-9]\.[0-9]) *")
_OBS_TEXT = re.compile(rb"[\x80-\xff]")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+)(?::[0-9]*)?")
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+\-.]*)://([^/?#]*)(.*)")
_CHUNK_EXT = re.compile(
    rb"(?:[ \t]*;[ \t]*"
    + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb'|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"))?)*'
)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_BARE_LF = re.compile(rb"(?<!\r)\n|\r(?!\n)")
#: Every byte but a lowercase letter or digit: deleted to compare a name's letters.
_NOT_ALNUM = bytes(b for b in range(256) if not (0x61 <= b <= 0x7A or 0x30 <= b <= 0x39))
_LOOK_ALIKES = (b"contentlength", b"transferencoding")
#: A whole header section that is well formed, line after line: checked
#: in one pass; the lines are only looked at one by one to say what is wrong.
_FIELD_BLOCK = re.compile(_TOKEN + rb":[^\x00\r\n]*(?:\r\n" + _TOKEN + rb":[^\x00\r\n]*)*")
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
#: Transfer codings a proxy can pass on without understanding them.
_KNOWN_CODINGS = frozenset({b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"})
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HTTPError(Exception):
    """
    A message cannot be handled; C{status} is what the client is told.

    The message is short plain text meant for the person debugging the client.
    C{headers} are fields the response must carry (a 426's
    C{Sec-WebSocket-Version}), written before any configured ones.
    """

    def __init__(self, status: int, message: str, *, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.headers = headers

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits on a request head, nginx's C{large_client_header_buffers}."""

    maxRequestLine: int = 8192
    maxHeaderSize: int = 32768
    maxHeaders: int = 100


@dataclass(slots=True)
class RequestHead:
    """
    A parsed request head, with what the proxy needs to forward it.

    C{headers} keeps the client's names and order; C{fields} maps lowercased
    names to their values.  C{bodyLength} is C{None} for a chunked body and
    0 when there is no body.  C{upgrade} is the protocol asked for by a
    valid upgrade request (C{b"websocket"}), else C{None}.
    """

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    fields: dict[bytes, list[bytes]]
    host: bytes
    path: bytes
    bodyLength: int | None
    chunked: bool
    keepAlive: bool
    connectionTokens: frozenset[bytes]
    upgrade: bytes | None = None
    transferCodings: tuple[bytes, ...] = ()

    def first(self, name: bytes) -> bytes | None:
        """The first value of header C{name} (lowercase), or C{None}."""
        values = self.fields.get(name)
        return values[0] if values else None


@dataclass(slots=True)
class ResponseHead:
    """A parsed response head from an upstream server."""

    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    fields: dict[bytes, list[bytes]]
    bodyLength: int | None
    chunked: bool
    closeDelimited: bool
    keepAlive: bool
    connectionTokens: frozenset[bytes]

    def first(self, name: bytes) -> bytes | None:
        """The first value of header C{name} (lowercase), or C{None}."""
        values = self.fields.get(name)
        return values[0] if values else None


def _splitField(line: bytes) -> tuple[bytes, bytes] | None:
    """
    C{field-name ":" OWS field-value OWS} as (name, value), or C{None}.

    Done with C{partition} and C{strip} rather than one regular expression:
    a regex with optional whitespace on both sides of the value backtracks
    quadratically on a long run of whitespace that ends in a bad byte.
    """
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN_RE.fullmatch(name) or _VALUE_FORBIDDEN.search(value):
        return None
    return name, value.strip(b" \t")


def _rejectLookAlikes(fields: dict[bytes, list[bytes]], status: int) -> None:
    """
    Refuse a name that is not a framing header but reads as one once its
    punctuation is ignored (C{Content_Length}, C{Transfer---Encoding}): a
    backend that maps C{_} to C{-} (CGI, WSGI) would frame the body by it.
    """
    for name in fields:
        if name not in _FRAMING and name.translate(None, _NOT_ALNUM) in _LOOK_ALIKES:
            raise HTTPError(status, "a header name that looks like a framing header")


def _splitFields(
    lines: list[bytes], maxHeaders: int, status: int
) -> tuple[list[tuple[bytes, bytes]], dict[bytes, list[bytes]]]:
    if len(lines) > maxHeaders:
        raise HTTPError(431 if status == 400 else status, f"more than {maxHeaders} header fields")
    headers = []
    fields: dict[bytes, list[bytes]] = {}
    if lines and _FIELD_BLOCK.fullmatch(CRLF.join(lines)) is None:
        for line in lines:
            if _splitField(line) is None:
                raise HTTPError(status, _fieldProblem(line))
    for line in lines:
        name, _, value = line.partition(b":")
        value = value.strip(b" \t")
        headers.append((name, value))
        lower = name.lower()
        if lower in fields:
            fields[lower].append(value)
        else:
            fields[lower] = [value]
    return headers, fields


def _fieldProblem(line: bytes) -> str:
    """Say why a header line was refused, for the error body."""
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding in the header section"
    name, colon, _ = line.partition(b":")
    if not colon:
        return "a header line without a colon"
    if name != name.rstrip(b" \t") or not name:
        return "whitespace between a header name and its colon"
    if not _TOKEN_RE.fullmatch(name):
        return "invalid characters in a header name"
    return "invalid characters in a header value"


def _tokens(values: list[bytes] | None, status: int, what: str) -> list[bytes]:
    """Split comma-separated header values into lowercase tokens."""
    tokens = []
    for value in values or ():
        for element in value.split(b","):
            element = element.strip(b" \t")
            if not element:
                continue
            if not _TOKEN_RE.fullmatch(element):
                raise HTTPError(status, f"invalid {what} value")
            tokens.append(element.lower())
    return tokens


def _contentLength(values: list[bytes], status: int) -> int:
    """One Content-Length from its values; identical repeats are folded."""
    first = values[0]
    for value in values:
        if not _DIGITS.fullmatch(value):
            raise HTTPError(status, "invalid Content-Length")
        if value != first and int(value) != int(first):
            raise HTTPError(status, "multiple differing Content-Length values")
    return int(first)


def _transferCodings(values: list[bytes], status: int) -> tuple[bytes, ...]:
    """
    Accept exactly one final C{chunked} (RFC 9112 §6.3), after any of the
    registered codings, which are returned to be forwarded as they are;
    C{identity} is dropped, parameters are ignored.
    """
    codings = []
    for value in values:
        for element in value.split(b","):
            name = element.partition(b";")[0].strip(b" \t").lower()
            if not name:
                if element.strip(b" \t"):
                    raise HTTPError(status, "invalid Transfer-Encoding value")
                continue
            if not _TOKEN_RE.fullmatch(name):
                raise HTTPError(status, "invalid Transfer-Encoding value")
            if name != b"identity":
                codings.append(name)
    if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
        raise HTTPError(status, "Transfer-Encoding must end in a single chunked")
    others = tuple(codings[:-1])
    if any(coding not in _KNOWN_CODINGS for coding in others):
        raise HTTPError(501 if status == 400 else status, "unknown transfer coding")
    return others


def _validKey(key: bytes | None) -> bool:
    if key is None or len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def websocketAccept(key: bytes) -> bytes:
    """The C{Sec-WebSocket-Accept} value for C{key} (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest())


def parseRequestHead(
    head: bytes, limits: Limits = Limits(), upgradeProtocols: Iterable[bytes] = (b"websocket",)
) -> RequestHead:
    """
    Parse a request head (everything up to and including the blank line).

    @raise HTTPError: 400 for anything malformed or ambiguous, 414 for an
        over-long request line, 431 for too many or too large header
        fields, 501 for an unsupported transfer coding, 505 for an HTTP
        version other than 1.0 and 1.1, 405 for CONNECT, 426 (with a
        C{Sec-WebSocket-Version: 13} header) for a WebSocket version
        other than 13.  A comma in the host (C{a.com,evil.com}) and a
        repeated C{Origin} are malformed.
    """
    if len(head) > limits.maxHeaderSize + limits.maxRequestLine:
        raise HTTPError(431, "request header section too large")
    lines = head.split(CRLF)
    requestLine = lines[0]
    if len(requestLine) > limits.maxRequestLine:
        raise HTTPError(414, "request line too long")
    fieldLines = lines[1:-2]
    if lines[-2:] != [b"", b""]:
        raise HTTPError(400, "malformed request head")
    if len(head) - len(requestLine) > limits.maxHeaderSize:
        raise HTTPError(431, "request header section too large")
    m = _REQUEST_LINE.fullmatch(requestLine)
    if m is None:
        raise HTTPError(400, "malformed request line")
    method, target, version = m.groups()
    if version[5:6] != b"1":
        raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if version != b"HTTP/1.0":
        # A later 1.x minor version is answered as the highest we speak (RFC 9110 §2.5).
        version = b"HTTP/1.1"
    if method == b"CONNECT":
        raise HTTPError(405, "CONNECT is not supported by this proxy")

    headers, fields = _splitFields(fieldLines, limits.maxHeaders, 400)
    http11 = version == b"HTTP/1.1"
    _rejectLookAlikes(fields, 400)

    hosts = fields.get(b"host")
    if hosts is not None and len(hosts) > 1:
        raise HTTPError(400, "more than one Host header")
    host = hosts[0] if hosts else b""
    if host and not _HOST.fullmatch(host):
        raise HTTPError(400, "invalid Host header")
    # A comma is a legal sub-delim in a reg-name, but "a.com,evil.com" is the
    # shape of two Host values folded into one: a backend or cache that
    # splits it picks a host of its own.
    if b"," in host:
        raise HTTPError(400, "a comma in the Host header")
    origins = fields.get(b"origin")
    if origins is not None and len(origins) > 1:
        raise HTTPError(400, "more than one Origin header")

    if target[0:1] == b"/":
        path = target.partition(b"#")[0]
    elif target == b"*" and method == b"OPTIONS":
        path = target
    else:
        absolute = _ABSOLUTE.fullmatch(target)
        if absolute is None or absolute.group(1).lower() not in (b"http", b"https"):
            raise HTTPError(400, "invalid request target")
        authority = absolute.group(2)
        if not _HOST.fullmatch(authority) or b"@" in authority or b"," in authority:
            raise HTTPError(400, "invalid authority in the request target")
        host = authority
        path = absolute.group(3).partition(b"#")[0] or b"/"
        if path[0:1] != b"/":
            path = b"/" + path
    # A fragment is the user agent's business (RFC 9110 §4.2.5), never sent on;
    # raw non-ASCII bytes go on %-encoded, as a browser would have sent them.
    path = _OBS_TEXT.sub(lambda m: b"%%%02X" % m.group()[0], path)
    if http11 and not host:
        raise HTTPError(400, "missing Host header")

    connection = frozenset(_tokens(fields.get(b"connection"), 400, "Connection"))
    transferEncodings = fields.get(b"transfer-encoding")
    lengths = fields.get(b"content-length")
    chunked = False
    codings: tuple[bytes, ...] = ()
    bodyLength: int | None = 0
    if transferEncodings is not None:
        if not http11:
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if lengths is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        codings = _transferCodings(transferEncodings, 400)
        chunked, bodyLength = True, None
    elif lengths is not None:
        bodyLength = _contentLength(lengths, 400)
    if (chunked or bodyLength) and method in (b"GET", b"HEAD"):
        raise HTTPError(400, f"a {method.decode()} request with a body")

    if http11:
        keepAlive = b"close" not in connection
    else:
        keepAlive = b"keep-alive" in connection and b"close" not in connection

    upgrade = None
    if http11 and b"upgrade" in connection and b"upgrade" in fields:
        offered = _tokens(fields[b"upgrade"], 400, "Upgrade")
        allowed = frozenset(upgradeProtocols)
        for protocol in offered:
            name = protocol.partition(b"/")[0]
            if name in allowed:
                upgrade = name
                break
        if upgrade == b"websocket":
            if method != b"GET":
                raise HTTPError(400, "a WebSocket upgrade must use GET")
            if not _validKey(fields.get(b"sec-websocket-key", [None])[-1]) or len(fields[b"sec-websocket-key"]) != 1:
                raise HTTPError(400, "invalid Sec-WebSocket-Key")
            versions = fields.get(b"sec-websocket-version")
            if versions is None:
                raise HTTPError(400, "missing Sec-WebSocket-Version")
            if versions != [b"13"]:
                # RFC 6455 §4.4: say which version this side speaks.
                raise HTTPError(426, "unsupported Sec-WebSocket-Version", headers=((b"Sec-WebSocket-Version", b"13"),))
        if upgrade is not None and (chunked or bodyLength):
            raise HTTPError(400, "an upgrade request with a body")

    return RequestHead(
        method=method,
        target=target,
        version=version,
        headers=headers,
        fields=fields,
        host=host,
        path=path,
        bodyLength=bodyLength,
        chunked=chunked,
        keepAlive=keepAlive,
        connectionTokens=connection,
        upgrade=upgrade,
        transferCodings=codings,
    )


def parseResponseHead(head: bytes, requestMethod: bytes, maxHeaders: int = 200) -> ResponseHead:
    """
    Parse an upstream's response head, as strictly as a request head.

    @raise HTTPError: always with status 502: a response the proxy cannot
        frame unambiguously is never relayed.
    """
    lines = head.split(CRLF)
    if lines[-2:] != [b"", b""]:
        raise HTTPError(502, "malformed response head from the upstream")
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise HTTPError(502, "malformed status line from the upstream")
    version, statusText, reason = m.groups()
    status = int(statusText)
    headers, fields = _splitFields(lines[1:-2], maxHeaders, 502)
    _rejectLookAlikes(fields, 502)
    connection = frozenset(_tokens(fields.get(b"connection"), 502, "Connection"))

    transferEncodings = fields.get(b"transfer-encoding")
    lengths = fields.get(b"content-length")
    chunked = closeDelimited = False
    bodyLength: int | None = None
    if transferEncodings is not None and lengths is not None:
        raise HTTPError(502, "upstream sent both Content-Length and Transfer-Encoding")
    if requestMethod == b"HEAD" or status < 200 or status in (204, 304):
        bodyLength = 0
        if lengths is not None:
            _contentLength(lengths, 502)
    elif transferEncodings is not None:
        if version != b"HTTP/1.1":
            raise HTTPError(502, "upstream sent Transfer-Encoding in an HTTP/1.0 response")
        if _transferCodings(transferEncodings, 502):
            raise HTTPError(502, "upstream used a transfer coding other than chunked")
        chunked = True
    elif lengths is not None:
        bodyLength = _contentLength(lengths, 502)
    else:
        closeDelimited = True

    if version == b"HTTP/1.1":
        keepAlive = b"close" not in connection
    else:
        keepAlive = b"keep-alive" in connection and b"close" not in connection
    return ResponseHead(
        version=version,
        status=status,
        reason=reason or b"",
        headers=headers,
        fields=fields,
        bodyLength=bodyLength,
        chunked=chunked,
        closeDelimited=closeDelimited,
        keepAlive=keepAlive and not closeDelimited,
        connectionTokens=connection,
    )


def endToEnd(
    headers: list[tuple[bytes, bytes]], connectionTokens: frozenset[bytes], drop: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """
    The headers to forward: without hop-by-hop ones, those the message's
    C{Connection} names (unless L{PROTECTED}), and those in C{drop}.
    """
    named = connectionTokens - PROTECTED
    return [
        (name, value)
        for name, value in headers
        if (lower := name.lower()) not in HOP_BY_HOP and lower not in named and lower not in drop
    ]


def forwardedRequestHeaders(
    request: RequestHead, *, trustedClient: bool, underscores: bool
) -> list[tuple[bytes, bytes]]:
    """
    The client's header fields to send upstream, in the client's order.

    Left out: hop-by-hop fields; those the request's C{Connection} names
    (unless L{PROTECTED}); those the proxy writes itself (C{Host}, the
    framing, C{X-Forwarded-For}/C{-Proto}/C{-Host}, C{X-Real-IP});
    C{Proxy-Authorization}, which is meant for the proxy; and, unless
    C{trustedClient} (a C{set_real_ip_from} address), the address and
    routing claims a client could forge (C{Forwarded},
    C{X-Forwarded-Port}, C{X-Forwarded-Prefix}, C{X-Client-IP},
    C{True-Client-IP}, C{X-Original-URL}, C{X-Rewrite-URL}).

    Unless C{underscores} (nginx C{underscores_in_headers on}), a name with
    C{_} in it is left out too: CGI and WSGI servers turn C{-} and C{_}
    alike into C{_}, so C{X_Forwarded_For} would pose as the
    C{X-Forwarded-For} the proxy writes.
    """
    drop = _DROP_FROM_TRUSTED if trustedClient else _DROP_FROM_UNTRUSTED
    named = request.connectionTokens - PROTECTED - drop
    if named:
        drop = drop | named
    if underscores:
        return [(name, value) for name, value in request.headers if name.lower() not in drop]
    # An int is looked for with memchr; b"_" would go through the buffer protocol, ten times slower.
    return [(name, value) for name, value in request.headers if _UNDERSCORE not in name and name.lower() not in drop]


class BodyDecoder:
    """
    Reads a message body off a byte stream, a piece at a time.

    C{feed(data)} returns the payload found in C{data} and, once the body
    is complete, the bytes that follow it (else C{None}).
    """

    done: bool = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        raise NotImplementedError


class LengthDecoder(BodyDecoder):
    """A body of known length (Content-Length)."""

    __slots__ = ("remaining", "done")

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        remaining = self.remaining
        if len(data) < remaining:
            self.remaining = remaining - len(data)
            return data, None
        self.remaining = 0
        self.done = True
        return data[:remaining], data[remaining:]


class ChunkedDecoder(BodyDecoder):
    """
    A chunked body (RFC 9112 §7.1), decoded strictly: a malformed size
    line, a missing CRLF after a chunk, an over-long line or a malformed
    trailer field is an L{HTTPError}.  Trailer fields are read and dropped.
    """

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)
    __slots__ = (
        "_state",
        "_remaining",
        "_buffer",
        "_status",
        "_trailerBytes",
        "_extensionBytes",
        "_payloadBytes",
        "done",
    )

    maxLine = 4096
    maxTrailer = 16384
    #: Chunk extensions are read and dropped; past this many bytes of them,
    #: they may not outweigh the payload (tiny chunks with huge extensions
    #: cost the proxy work for nothing, like Go's CVE-2023-39326 fix).
    maxExtensions = 16384

    def __init__(self, errorStatus: int = 400) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._buffer = b""
        self._status = errorStatus
        self._trailerBytes = 0
        self._extensionBytes = 0
        self._payloadBytes = 0
        self.done = False

    def _fail(self, message: str) -> HTTPError:
        return HTTPError(self._status, message)

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        data = self._buffer + data if self._buffer else data
        self._buffer = b""
        payload = []
        position = 0
        end = len(data)
        while position < end:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, end - position)
                payload.append(data[position : position + take])
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._DATA_END
                continue
            if state == self._DATA_END:
                if end - position < 2:
                    break
                if data[position : position + 2] != CRLF:
                    raise self._fail("missing CRLF after a chunk")
                position += 2
                self._state = self._SIZE
                continue
            lineEnd = data.find(CRLF, position, position + self.maxLine)
            if lineEnd < 0:
                if end - position >= self.maxLine:
                    raise self._fail("chunk size or trailer line too long")
                if _BARE_LF.search(data, position, end - 1 if data.endswith(b"\r") else end):
                    raise self._fail("bare CR or LF in chunked framing")
                break
            line = data[position:lineEnd]
            position = lineEnd + 2
            if state == self._SIZE:
                size = _HEX.match(line)
                if size is None or not _CHUNK_EXT.fullmatch(line, size.end()):
                    raise self._fail("invalid chunk size line")
                self._remaining = int(size.group(), 16)
                self._payloadBytes += self._remaining
                self._extensionBytes += len(line) - size.end()
                if self._extensionBytes > self.maxExtensions and self._extensionBytes > self._payloadBytes:
                    raise self._fail("chunk extensions outweigh the body")
                self._state = self._DATA if self._remaining else self._TRAILER
            else:
                if not line:
                    self.done = True
                    return b"".join(payload), data[position:]
                self._trailerBytes += len(line) + 2
                if self._trailerBytes > self.maxTrailer:
                    raise self._fail("trailer section too large")
                if _splitField(line) is None:
                    raise self._fail("invalid trailer field")
        self._buffer = data[position:]
        return b"".join(payload), None


def chunk(data: bytes) -> bytes:
    """C{data} framed as one chunk."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def errorResponse(
    status: int,
    message: str,
    extraHeaders: Iterable[tuple[bytes, bytes]] = (),
    close: bool = True,
    head: bool = False,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """
    A complete response that the proxy itself sends: a status line, a short
    plain-text body saying what happened, C{headers} (the L{HTTPError}'s
    own) and C{extraHeaders} (C{add_header}).
    """
    try:
        phrase = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        phrase = b"Error"
    body = f"{status} {phrase.decode()}: {message}\n".encode()
    lines = [
        b"HTTP/1.1 %d %b" % (status, phrase),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
    ]
    if close:
        lines.append(b"Connection: close")
    lines.extend(b"%b: %b" % pair for pair in headers)
    lines.extend(b"%b: %b" % pair for pair in extraHeaders)
    return CRLF.join(lines) + HEAD_END + (b"" if head else body)


def fromTrustedProxy(clientAddress: str, settings: Any) -> bool:
    """
    Whether the client is a proxy of our own (nginx C{set_real_ip_from}),
    whose forwarding headers are believed; from anyone else they are
    replaced, so that a client cannot forge where a request came from.
    """
    networks = settings.trustedProxies
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(clientAddress)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def forwardedFor(request: RequestHead, clientAddress: str, settings: Any, trusted: bool | None = None) -> bytes:
    """
    The C{X-Forwarded-For} sent upstream: the client's chain when the
    client is a trusted proxy, then the client's address; from anyone
    else, the address alone.
    """
    if trusted is None:
        trusted = fromTrustedProxy(clientAddress, settings)
    address = clientAddress.encode("ascii")
    chain = request.fields.get(b"x-forwarded-for") if trusted else None
    return b", ".join((*chain, address)) if chain else address
