# -*- test-case-name: tests.test_redirect -*-
"""
The plain-HTTP listener whose only job is a redirect, nginx's
C{return 308 https://$host$request_uri;}, and which serves Let's Encrypt's
HTTP-01 challenge files so that C{certbot certonly --webroot} works while
the proxy runs.

The request is parsed as strictly as a proxied one, and the C{Host} that
goes into the C{Location} must be a plain host name or address: a redirect
must never send a browser somewhere an attacker chose.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from http import HTTPStatus
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from .config import ServerBlock
from .flow import ReadGate
from .http import CRLF, HEAD_END, HTTPError, RequestHead, errorResponse, findHeadEnd, parseRequestHead

__all__ = ["ACME_PREFIX", "RedirectFactory", "RedirectProtocol", "RedirectSettings"]

log = Logger()

#: A DNS name (labels of at most 63 letters, digits and inner hyphens) or
#: a bracketed IPv6 address, then an optional port.  Nothing else can end
#: up in a C{Location}: no C{@} (userinfo), C{/}, C{\\}, C{%}, spaces or
#: control characters, any of which could make the browser go elsewhere.
_HOSTNAME = re.compile(
    rb"(?P<name>[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?"
    rb"|\[[0-9a-f:.]+\])"
    rb"(?::(?P<port>[0-9]{1,5}))?"
)
_MAX_HOSTNAME = 253
_VARIABLE = re.compile(
    r"\$(?:\{(host|request_uri|scheme|server_port|server_name)\}|(host|request_uri|scheme|server_port|server_name)\b)"
)
#: The characters of an ACME token (RFC 8555 §8.3: base64url, no padding).
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,256}")
ACME_PREFIX = b"/.well-known/acme-challenge/"
#: RFC 6797 §7.2: an HSTS header sent over plain HTTP must be ignored, and
#: nginx's recipe only adds it to the TLS server; never send it here.
_HSTS = b"strict-transport-security"


class RedirectSettings:
    """A redirect listener's C{return} and C{acme_challenge_root}, prepared once."""

    def __init__(self, block: ServerBlock) -> None:
        self.block = block
        code, _, self.template = block.return_.partition(" ") if block.return_ else ("308", "", "")
        self.status = int(code)
        self.acmeRoot = block.acme_challenge_root
        self.scheme = "https" if block.isTLS else "http"
        headers = tuple((k.encode("ascii"), v.encode("ascii")) for k, v in block.add_header)
        if not block.isTLS:
            dropped = [name for name, _ in headers if name.lower() == _HSTS]
            if dropped:
                log.warn(
                    "{listen}: Strict-Transport-Security is not sent over plain HTTP (RFC 6797 section 7.2); "
                    "add it to the TLS listener",
                    listen=block.listen,
                )
            headers = tuple((name, value) for name, value in headers if name.lower() != _HSTS)
        self.extraHeaders = headers

    def location(self, request: RequestHead, host: str, localPort: int) -> str:
        """
        Expand the nginx variables of the C{return} URL.  C{$request_uri} is
        the target as sent (path and query); an C{OPTIONS *} asks about the
        server as a whole, so it is sent to the root of the new one.
        """
        path = request.path.decode("ascii")
        values = {
            "host": host,
            "request_uri": "/" if path == "*" else path,
            "scheme": self.scheme,
            "server_port": str(localPort),
            "server_name": self.block.server_name or host,
        }
        return _VARIABLE.sub(lambda m: values[m.group(1) or m.group(2)], self.template)


class RedirectProtocol(Protocol):
    """
    Answers every request with the configured redirect (or a challenge
    file), keeping the connection open between requests as HTTP/1.1 says,
    for at most C{keepalive_timeout} seconds of idleness.
    """

    factory: RedirectFactory
    _timer: IDelayedCall | None = None
    #: Whether the running timer is the keep-alive one (no request begun).
    _idle = False

    def connectionMade(self) -> None:
        self.settings = self.factory.settings
        self._buffer = b""
        self._closing = False
        self.factory.connections.add(self)
        # A client that pipelines requests without reading the answers is
        # paused once the answers fill the write buffer.
        self.transport.registerProducer(ReadGate(self.transport), True)
        self._startTimer(self.settings.block.client_header_timeout)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        block = self.settings.block
        headLimit = block.max_request_line + block.max_header_size
        while not self._closing:
            while self._buffer[:2] == CRLF:
                self._buffer = self._buffer[2:]
            if not self._buffer:
                return
            request = None
            try:
                end = findHeadEnd(self._buffer, headLimit)
                if end < 0:
                    if len(self._buffer) > headLimit:
                        raise HTTPError(431, "request header section too large")
                    if self._idle:
                        self._startTimer(block.client_header_timeout)
                    return
                request = parseRequestHead(self._buffer[:end], upgradeProtocols=())
                self._buffer = self._buffer[end:]
                keepAlive = self._answer(request)
            except HTTPError as e:
                self._refuse(e, request)
                return
            if not keepAlive:
                self._close()
                return
            self._startTimer(block.keepalive_timeout, idle=True)

    def _answer(self, request: RequestHead) -> bool:
        """
        Write the response to C{request}; return whether to keep the
        connection.  A request with a body is answered and the connection
        closed: there is nothing to do with the body, and reading it only to
        throw it away would let a client keep the connection busy.
        """
        keepAlive = request.keepAlive and not (request.chunked or request.bodyLength)
        if self.settings.acmeRoot is not None and request.path.startswith(ACME_PREFIX):
            self._challenge(request, keepAlive)
            return keepAlive
        local = self.transport.getHost()
        host = _redirectHost(request.host) if request.host else self._listenerName(local)
        location = self.settings.location(request, host, getattr(local, "port", 0))
        status = self.settings.status
        body = f"Redirecting to {location}\n".encode("ascii")
        self._write(
            request,
            status,
            [(b"Location", location.encode("ascii")), (b"Content-Type", b"text/plain; charset=utf-8")],
            body,
            keepAlive,
        )
        if self.settings.block.access_log:
            log.info(
                '{client} "{method} {target}" {status} -> {location}',
                client=self._client(),
                method=request.method.decode("ascii"),
                target=request.target.decode("ascii"),
                status=status,
                location=location,
            )
        return keepAlive

    def _listenerName(self, local: Any) -> str:
        """
        nginx's C{$host} for a request without a C{Host} (HTTP/1.0): the
        C{server_name}, or else the address the client connected to.
        """
        if self.settings.block.server_name:
            return self.settings.block.server_name
        address = getattr(local, "host", "localhost")
        return f"[{address}]" if ":" in address else address

    def _challenge(self, request: RequestHead, keepAlive: bool) -> None:
        """Serve C{/.well-known/acme-challenge/TOKEN} from C{acme_challenge_root}."""
        if request.method not in (b"GET", b"HEAD"):
            raise HTTPError(405, "only GET and HEAD for challenge files")
        token = request.path[len(ACME_PREFIX) :].partition(b"?")[0]
        # The token alphabet has no ".", "/", "%" or "\": no traversal, encoded or not.
        if not _TOKEN.fullmatch(token):
            raise HTTPError(404, "no such challenge")
        path = os.path.join(self.settings.acmeRoot, ".well-known", "acme-challenge", token.decode("ascii"))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.EACCES, errno.ENOTDIR):
                log.error("cannot read challenge file {path}: {why}", path=path, why=e.strerror)
            raise HTTPError(404, "no such challenge") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise HTTPError(404, "no such challenge")
        with os.fdopen(fd, "rb") as f:
            body = f.read(65536)
        self._write(request, 200, [(b"Content-Type", b"text/plain")], body, keepAlive)
        log.info("{client} ACME challenge {token} served", client=self._client(), token=token.decode("ascii"))

    def _write(
        self, request: RequestHead, status: int, headers: list[tuple[bytes, bytes]], body: bytes, keepAlive: bool
    ) -> None:
        lines = [b"HTTP/1.1 %d %b" % (status, HTTPStatus(status).phrase.encode("ascii"))]
        lines.extend(b"%b: %b" % pair for pair in headers)
        lines.append(b"Content-Length: %d" % len(body))
        if not keepAlive:
            lines.append(b"Connection: close")
        elif request.version == b"HTTP/1.0":
            lines.append(b"Connection: keep-alive")
        lines.extend(b"%b: %b" % pair for pair in self.settings.extraHeaders)
        self.transport.write(CRLF.join(lines) + HEAD_END + (b"" if request.method == b"HEAD" else body))

    def _refuse(self, error: HTTPError, request: RequestHead | None) -> None:
        """Answer what cannot be redirected with a plain-text error, and close."""
        extra = self.settings.extraHeaders
        if error.status == 405:
            extra = ((b"Allow", b"GET, HEAD"), *extra)
        head = request is not None and request.method == b"HEAD"
        self.transport.write(errorResponse(error.status, error.message, extra, head=head))
        log.info(
            "{client} refused: {status} {message}", client=self._client(), status=error.status, message=error.message
        )
        self._close()

    def _client(self) -> str:
        return getattr(self.transport.getPeer(), "host", "-")

    # Timers: the head must arrive within client_header_timeout; between
    # requests the connection may idle for keepalive_timeout.

    def _startTimer(self, seconds: float, idle: bool = False) -> None:
        self._cancelTimer()
        self._idle = idle
        if seconds:
            self._timer = self.factory.reactor.callLater(seconds, self._timedOut)

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._cancelTimer()
        self.transport.loseConnection()

    def closeIfIdle(self) -> None:
        """Shutting down: close now unless a request is half received."""
        if not self._buffer:
            self._close()

    def connectionLost(self, reason: Any = None) -> None:
        self._closing = True
        self._cancelTimer()
        self.factory.connections.discard(self)


def _redirectHost(header: bytes) -> str:
    """
    C{$host}: the request's host, lowercased and without its port, if it
    is a plain DNS name or address literal.

    @raise HTTPError: 400 for anything else.
    """
    lowered = header.lower()
    match = _HOSTNAME.fullmatch(lowered)
    if match is None or len(match.group("name")) > _MAX_HOSTNAME:
        raise HTTPError(400, "invalid Host for a redirect")
    return match.group("name").decode("ascii")


class RedirectFactory(Factory):
    """Builds a L{RedirectProtocol} per connection."""

    protocol = RedirectProtocol
    noisy = False

    def __init__(self, settings: RedirectSettings, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.settings = settings
        self.reactor = reactor
        self.connections: set[RedirectProtocol] = set()

    def drain(self) -> None:
        for protocol in list(self.connections):
            protocol.closeIfIdle()
