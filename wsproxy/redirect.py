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

import os
import re
from http import HTTPStatus
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from .config import ServerBlock
from .http import CRLF, HEAD_END, HTTPError, RequestHead, errorResponse, findHeadEnd, parseRequestHead

__all__ = ["RedirectFactory", "RedirectProtocol", "RedirectSettings"]

log = Logger()

_HOSTNAME = re.compile(
    rb"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?|\[[0-9a-f:.]+\])"
    rb"(?::([0-9]{1,5}))?"
)
_VARIABLE = re.compile(r"\$(host|request_uri|scheme|server_port|server_name)\b")
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,256}")
ACME_PREFIX = b"/.well-known/acme-challenge/"


class RedirectSettings:
    """A redirect listener's C{return} and C{acme_challenge_root}, prepared once."""

    def __init__(self, block: ServerBlock) -> None:
        self.block = block
        code, _, self.template = block.return_.partition(" ")
        self.status = int(code)
        self.acmeRoot = block.acme_challenge_root
        self.extraHeaders = tuple((k.encode("ascii"), v.encode("ascii")) for k, v in block.add_header)

    def location(self, request: RequestHead, host: str, localPort: int) -> str:
        """Expand the nginx variables of the C{return} URL."""
        values = {
            "host": host,
            "request_uri": request.path.decode("ascii"),
            "scheme": "http",
            "server_port": str(localPort),
            "server_name": self.block.server_name or host,
        }
        return _VARIABLE.sub(lambda m: values[m.group(1)], self.template)


class RedirectProtocol(Protocol):
    """Answers every request with the configured redirect (or a challenge file)."""

    factory: RedirectFactory

    def connectionMade(self) -> None:
        self.settings = self.factory.settings
        self._buffer = b""
        self.factory.connections.add(self)
        self._timer = self.factory.reactor.callLater(self.settings.block.client_header_timeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer[:2] == CRLF:
            self._buffer = self._buffer[2:]
        if not self._buffer:
            return
        block = self.settings.block
        try:
            end = findHeadEnd(self._buffer, block.max_request_line + block.max_header_size)
            if end < 0:
                if len(self._buffer) > block.max_request_line + block.max_header_size:
                    raise HTTPError(431, "request header section too large")
                return
            request = parseRequestHead(self._buffer[:end], upgradeProtocols=())
        except HTTPError as e:
            self.transport.write(errorResponse(e.status, e.message))
            self.transport.loseConnection()
            return
        self._buffer = self._buffer[end:]
        try:
            keepAlive = self._answer(request)
        except HTTPError as e:
            self.transport.write(errorResponse(e.status, e.message, head=request.method == b"HEAD"))
            keepAlive = False
        if not keepAlive:
            self.transport.loseConnection()
            return
        if self._buffer:
            self.dataReceived(b"")

    def _answer(self, request: RequestHead) -> bool:
        """Write the response to C{request}; return whether to keep the connection."""
        keepAlive = request.keepAlive and not (request.chunked or request.bodyLength)
        if self.settings.acmeRoot is not None and request.path.startswith(ACME_PREFIX):
            self._challenge(request, keepAlive)
            return keepAlive
        local = self.transport.getHost()
        if request.host:
            match = _HOSTNAME.fullmatch(request.host.lower())
            if match is None:
                raise HTTPError(400, "invalid Host for a redirect")
            host = request.host.lower()
            if match.group(1):
                host = host[: -len(match.group(1)) - 1]
            host = host.decode("ascii")
        else:
            host = self.settings.block.server_name or getattr(local, "host", "localhost")
        location = self.settings.location(request, host, getattr(local, "port", 0))
        status = self.settings.status
        body = f"Redirecting to {location}\n".encode("ascii", "replace")
        self._write(request, status, [(b"Location", location.encode("ascii", "replace")),
                                      (b"Content-Type", b"text/plain; charset=utf-8")], body, keepAlive)
        log.info('{client} "{method} {target}" {status} -> {location}', client=self.transport.getPeer().host,
                 method=request.method.decode("ascii"), target=request.target.decode("ascii", "replace"),
                 status=status, location=location)
        return keepAlive

    def _challenge(self, request: RequestHead, keepAlive: bool) -> None:
        token = request.path[len(ACME_PREFIX):]
        if request.method not in (b"GET", b"HEAD"):
            raise HTTPError(405, "only GET and HEAD for challenge files")
        path = os.path.join(self.settings.acmeRoot, ".well-known", "acme-challenge", token.decode("ascii"))
        if not _TOKEN.fullmatch(token) or not os.path.isfile(path):
            raise HTTPError(404, "no such challenge")
        with open(path, "rb") as f:
            body = f.read(65536)
        self._write(request, 200, [(b"Content-Type", b"application/octet-stream")], body, keepAlive)

    def _write(self, request: RequestHead, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
               keepAlive: bool) -> None:
        lines = [b"HTTP/1.1 %d %b" % (status, HTTPStatus(status).phrase.encode("ascii"))]
        lines.extend(b"%b: %b" % pair for pair in headers)
        lines.append(b"Content-Length: %d" % len(body))
        if not keepAlive:
            lines.append(b"Connection: close")
        elif request.version == b"HTTP/1.0":
            lines.append(b"Connection: keep-alive")
        lines.extend(b"%b: %b" % pair for pair in self.settings.extraHeaders)
        self.transport.write(CRLF.join(lines) + HEAD_END + (b"" if request.method == b"HEAD" else body))

    def _timedOut(self) -> None:
        self.transport.loseConnection()

    def closeIfIdle(self) -> None:
        if not self._buffer:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self._timer.active():
            self._timer.cancel()
        self.factory.connections.discard(self)


class RedirectFactory(Factory):
    """Builds a L{RedirectProtocol} per connection."""

    protocol = RedirectProtocol

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
