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

import re
from http import HTTPStatus
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from .accesslog import logAnswer
from .acme import readChallenge
from .config import AccessLog, ServerBlock
from .http import CRLF, HEAD_END, HTTPError, RequestHead, errorResponse
from .interfaces import IExchange, IRequestLoop
from .server import ConnectionSettings

__all__ = ["ACME_PREFIX", "RedirectAnswer", "RedirectSettings"]

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
ACME_PREFIX = b"/.well-known/acme-challenge/"
#: RFC 6797 §7.2: an HSTS header sent over plain HTTP must be ignored, and
#: nginx's recipe only adds it to the TLS server; never send it here.
_HSTS = b"strict-transport-security"


class RedirectSettings(ConnectionSettings):
    """A redirect listener's C{return} and C{acme_challenge_root}, prepared once."""

    def __init__(self, block: ServerBlock) -> None:
        super().__init__(block)
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
        self.extraHeaderLines = tuple(b"%b: %b" % pair for pair in headers)

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


@implementer(IExchange)
class RedirectAnswer:
    """
    The answer to one request on a redirect listener: the configured
    redirect, or a challenge file.  A request with a body is answered and
    the connection closed: there is nothing to do with the body, and
    reading it only to throw it away would let a client keep the
    connection busy.
    """

    readyForBody = False

    def __init__(self, loop: IRequestLoop, request: RequestHead, settings: RedirectSettings) -> None:
        self.loop = loop
        self.request = request
        self.settings = settings

    def start(self) -> None:
        request = self.request
        keepAlive = request.keepAlive and not (request.chunked or request.bodyLength or self.loop.draining)
        try:
            if self.settings.acmeRoot is not None and request.path.startswith(ACME_PREFIX):
                self._challenge(keepAlive)
            else:
                self._redirect(keepAlive)
        except HTTPError as e:
            self.fail(e.status, e.message)
            return
        self.loop.exchangeFinished(keepAlive)

    def _redirect(self, keepAlive: bool) -> None:
        request = self.request
        local = self.loop.leg.transport.getHost()
        host = _redirectHost(request.host) if request.host else self._listenerName(local)
        location = self.settings.location(request, host, getattr(local, "port", 0))
        status = self.settings.status
        body = f"Redirecting to {location}\n".encode("ascii")
        headers = [(b"Location", location.encode("ascii")), (b"Content-Type", b"text/plain; charset=utf-8")]
        self._write(status, headers, body, keepAlive)
        if isinstance(self.settings.block.access_log, AccessLog):
            self._log(status, len(body))
        elif self.settings.block.access_log:
            log.info(
                '{client} "{method} {target}" {status} -> {location}',
                client=self.loop.leg.clientAddress,
                method=request.method.decode("ascii"),
                target=request.target.decode("ascii", "backslashreplace"),
                status=status,
                location=location,
            )

    def _log(self, status: int, bytesOut: int) -> None:
        """A line in the C{access_log}'s format."""
        logAnswer(self.loop, self.request, status, bytesOut, self.settings.block.access_log, self.settings)

    def _listenerName(self, local: Any) -> str:
        """
        nginx's C{$host} for a request without a C{Host} (HTTP/1.0): the
        C{server_name}, or else the address the client connected to.
        """
        if self.settings.block.server_name:
            return self.settings.block.server_name
        address = getattr(local, "host", "localhost")
        return f"[{address}]" if ":" in address else address

    def _challenge(self, keepAlive: bool) -> None:
        """Serve C{/.well-known/acme-challenge/TOKEN} from C{acme_challenge_root}."""
        request = self.request
        if request.method not in (b"GET", b"HEAD"):
            raise HTTPError(405, "only GET and HEAD for challenge files")
        token = request.path[len(ACME_PREFIX) :].partition(b"?")[0]
        body = readChallenge(self.settings.acmeRoot, token)
        self._write(200, [(b"Content-Type", b"text/plain")], body, keepAlive)
        log.info(
            "{client} ACME challenge {token} served", client=self.loop.leg.clientAddress, token=token.decode("ascii")
        )

    def _write(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, keepAlive: bool) -> None:
        self.settings.metrics.requestEnded(status, None)
        request = self.request
        lines = [b"HTTP/1.1 %d %b" % (status, HTTPStatus(status).phrase.encode("ascii"))]
        lines.extend(b"%b: %b" % pair for pair in headers)
        lines.append(b"Content-Length: %d" % len(body))
        if not keepAlive:
            lines.append(b"Connection: close")
        elif request.version == b"HTTP/1.0":
            lines.append(b"Connection: keep-alive")
        lines.extend(self.settings.extraHeaderLines)
        self.loop.leg.write(CRLF.join(lines) + HEAD_END + (b"" if request.method == b"HEAD" else body))

    def bodyReceived(self, data: bytes) -> None:
        raise RuntimeError("a redirect reads no request body")

    def bodyComplete(self) -> None:
        raise RuntimeError("a redirect reads no request body")

    def fail(self, status: int, message: str) -> None:
        """Answer what cannot be redirected with a plain-text error, and close."""
        extra = self.settings.extraHeaders
        if status == 405:
            extra = ((b"Allow", b"GET, HEAD"), *extra)
        leg = self.loop.leg
        self.settings.metrics.requestEnded(status, None)
        leg.write(errorResponse(status, message, extra, head=self.request.method == b"HEAD"))
        log.info("{client} refused: {status} {message}", client=leg.clientAddress, status=status, message=message)
        self.loop.exchangeFinished(False)

    def clientWritable(self) -> None:
        pass

    def clientLost(self) -> None:
        pass


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
