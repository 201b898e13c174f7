# -*- test-case-name: tests.test_routing_listener -*-
"""
The answers the proxy gives by itself once a request has been routed: an
error (no location, a refused upgrade, a file that is not there), a
location's C{return}, and nginx's C{return 444}, which closes without a
word.

Each is an L{IExchange} like a proxied exchange, so the request loop
treats them alike: the answer is written, then the connection goes on
with its next request or closes.  A request whose body has not been read
cannot leave its connection usable (the body's bytes would be read as the
next request), so such an answer always closes.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from .accesslog import logAnswer
from .config import AccessLog
from .http import CRLF, HEAD_END, RequestHead, errorResponse
from .interfaces import IExchange, IRequestLoop
from .metrics import NO_METRICS

__all__ = ["CloseAnswer", "ErrorAnswer", "TextAnswer"]

log = Logger()


def _reusable(loop: IRequestLoop, request: RequestHead) -> bool:
    """Whether the connection may serve another request after this answer."""
    return request.keepAlive and not (request.chunked or request.bodyLength or loop.draining)


@implementer(IExchange)
class _Answer:
    """What the proxy's own answers share: no body to read, nothing to stream."""

    readyForBody = False
    #: Set by the router to the recorder of the place that answers.
    metrics: Any = NO_METRICS

    def __init__(
        self, loop: IRequestLoop, request: RequestHead, extraHeaders: Any, accessLog: bool | AccessLog = True
    ) -> None:
        self.loop = loop
        self.request = request
        self.extraHeaders = extraHeaders
        self.accessLog = accessLog

    def bodyReceived(self, data: bytes) -> None:
        raise RuntimeError("the proxy's own answers read no request body")

    def bodyComplete(self) -> None:
        raise RuntimeError("the proxy's own answers read no request body")

    def clientWritable(self) -> None:
        pass

    def clientLost(self) -> None:
        pass

    def fail(self, status: int, message: str) -> None:
        ErrorAnswer(self.loop, self.request, status, message, self.extraHeaders).start()

    def _log(self, status: int, bytesOut: int) -> None:
        self.metrics.requestEnded(status, None)
        if self.accessLog:
            logAnswer(self.loop, self.request, status, bytesOut, self.accessLog, self.loop.settings)


class ErrorAnswer(_Answer):
    """An error of the proxy's own: a status and a one-line plain-text reason."""

    def __init__(
        self,
        loop: IRequestLoop,
        request: RequestHead,
        status: int,
        message: str,
        extraHeaders: Any = (),
        headers: Any = (),
        accessLog: bool | AccessLog = True,
    ) -> None:
        super().__init__(loop, request, extraHeaders, accessLog)
        self.status = status
        self.message = message
        self.headers = headers

    def start(self) -> None:
        request = self.request
        # After a refused upgrade the client may already be sending frames.
        keepAlive = (
            _reusable(self.loop, request)
            and request.upgrade is None
            and self.status not in (400, 408, 413, 414, 421, 431)
        )
        self.loop.leg.write(
            errorResponse(
                self.status,
                self.message,
                self.extraHeaders,
                close=not keepAlive,
                head=request.method == b"HEAD",
                headers=self.headers,
            )
        )
        self._log(self.status, 0)
        self.loop.exchangeFinished(keepAlive)


class TextAnswer(_Answer):
    """
    A location's C{return}: a redirect (C{Location}), or a status with a
    short text body, as nginx's C{return CODE [URL|TEXT]}.
    """

    def __init__(
        self,
        loop: IRequestLoop,
        request: RequestHead,
        status: int,
        body: bytes = b"",
        location: bytes | None = None,
        extraHeaders: Any = (),
        accessLog: bool | AccessLog = True,
    ) -> None:
        super().__init__(loop, request, extraHeaders, accessLog)
        self.status = status
        self.body = body
        self.location = location

    def start(self) -> None:
        request, status = self.request, self.status
        keepAlive = _reusable(self.loop, request)
        try:
            phrase = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            phrase = b""
        body = self.body
        lines = [b"HTTP/1.1 %d %b" % (status, phrase)]
        if self.location is not None:
            lines.append(b"Location: " + self.location)
        lines.append(b"Content-Type: text/plain; charset=utf-8" if body else b"Content-Type: text/plain")
        lines.append(b"Content-Length: %d" % len(body))
        if not keepAlive:
            lines.append(b"Connection: close")
        elif request.version == b"HTTP/1.0":
            lines.append(b"Connection: keep-alive")
        lines.extend(b"%b: %b" % pair for pair in self.extraHeaders)
        self.loop.leg.write(CRLF.join(lines) + HEAD_END + (b"" if request.method == b"HEAD" else body))
        self._log(status, len(body))
        self.loop.exchangeFinished(keepAlive)


class CloseAnswer(_Answer):
    """nginx's C{return 444}: close the connection without answering."""

    def start(self) -> None:
        self._log(444, 0)
        self.loop.exchangeAborted()
