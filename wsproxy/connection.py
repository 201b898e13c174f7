# -*- test-case-name: tests.test_connection -*-
"""
The server side of one HTTP/1.1 connection, without I/O: bytes in, events
out, in the spirit of h11's C{Connection}.

A L{RequestCycle} knows where the client is in its request (L{State}), what
the proxy has said about its response, whether another request may follow
on the same connection, and which bytes are left over after a protocol
switch.  It never touches a transport or a clock, so every transition is
tested with plain bytes; both listeners (the proxy and the redirect) drive
one through L{wsproxy.server.RequestLoop}.

The receive buffer remembers how far it has looked for the end of a head
and which bytes it has checked for a bare CR or LF, so a head that arrives
a byte at a time costs linear time, and leading empty lines are dropped in
one step however many there are.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .http import (
    HEAD_END,
    ChunkedDecoder,
    HTTPError,
    LengthDecoder,
    Limits,
    RequestHead,
    parseRequestHead,
)

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "BodyData",
    "EndOfRequest",
    "ReceiveBuffer",
    "RequestCycle",
    "RequestReceived",
    "State",
]

_BARE_CR_OR_LF = re.compile(rb"(?<!\r)\n|\r(?!\n)")
_EMPTY_LINES = re.compile(rb"(?:\r\n)+")
#: What the start of a request line can look like: a method token, then a space.
_METHOD_PREFIX = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*(?: |\Z)")
#: How much of a new request is checked for a method before its head is complete.
_PREFIX_CHECKED = 32


class State(enum.Enum):
    """
    Where the client is in its current request.

      - C{IDLE}: between requests; the next bytes are a request head.
      - C{SEND_BODY}: the head is in, its body is arriving.
      - C{DONE}: the request is complete; bytes that follow are the next
        (pipelined) request and wait until the response is complete.
      - C{MUST_CLOSE}: no further request will be read on this connection
        (the response said so, or the body could not be read to its end).
      - C{SWITCHED_PROTOCOL}: the connection now speaks another protocol;
        what is buffered is L{RequestCycle.trailingData}.
      - C{ERROR}: the client sent something that is not HTTP/1.1.
    """

    IDLE = "IDLE"
    SEND_BODY = "SEND_BODY"
    DONE = "DONE"
    MUST_CLOSE = "MUST_CLOSE"
    SWITCHED_PROTOCOL = "SWITCHED_PROTOCOL"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A request head is complete."""

    request: RequestHead


@dataclass(frozen=True, slots=True)
class BodyData:
    """A piece of the request body, de-chunked."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfRequest:
    """The request body (if any) is complete."""


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: L{RequestCycle.nextEvent}: more bytes are needed.
NEED_DATA = _Sentinel("NEED_DATA")
#: L{RequestCycle.nextEvent}: nothing more is read until the response is done.
PAUSED = _Sentinel("PAUSED")

_END_OF_REQUEST = EndOfRequest()
_DEFAULT_LIMITS = Limits()


class ReceiveBuffer:
    """
    Bytes received and not consumed yet, searched for a message head
    without ever looking at the same bytes twice.
    """

    __slots__ = ("_data", "_searched", "_checked")

    def __init__(self) -> None:
        self._data = bytearray()
        self._searched = 0
        self._checked = 0

    def __len__(self) -> int:
        return len(self._data)

    def append(self, data: bytes) -> None:
        self._data += data

    def dropEmptyLines(self) -> bool:
        """
        Drop the empty lines before a request (RFC 9112 §2.2); return false
        if the buffer ends in a lone CR that may be the start of one more.
        """
        data = self._data
        if data[:1] != b"\r":
            return True
        match = _EMPTY_LINES.match(data)
        if match is not None:
            del data[: match.end()]
            self._searched = self._checked = 0
        return data != b"\r"

    def startsWith(self, pattern: re.Pattern[bytes], length: int) -> bool:
        """Whether the first C{length} bytes match C{pattern}."""
        return pattern.match(self._data, 0, length) is not None

    def find(self, needle: bytes, end: int) -> int:
        return self._data.find(needle, 0, end)

    def takeHead(self, limit: int) -> bytes | None:
        """
        Take a complete head (up to and including its blank line) of at
        most C{limit} bytes, or return C{None} if it is not all here yet.

        @raise HTTPError: 400 if a bare CR or LF has been received, so that
            a client cannot park a connection on bytes that can never
            become a valid head.
        """
        data = self._data
        end = data.find(HEAD_END, max(0, self._searched - 3), limit + 4)
        if end >= 0:
            # A complete head goes to a parser that refuses a bare CR or LF
            # in any line: only an incomplete one is checked here.
            end += 4
            head = bytes(data[:end])
            del data[:end]
            self._searched = self._checked = 0
            return head
        searchEnd = min(len(data), limit + 4)
        self._searched = searchEnd
        if data[searchEnd - 1 : searchEnd] == b"\r":
            searchEnd -= 1
        self._check(searchEnd)
        return None

    def _check(self, end: int) -> None:
        if end > self._checked:
            if _BARE_CR_OR_LF.search(self._data, self._checked, end):
                raise HTTPError(400, "bare CR or LF in the message head")
            self._checked = end

    def takeAll(self) -> bytes:
        data = bytes(self._data)
        self._data.clear()
        self._searched = self._checked = 0
        return data

    def putBack(self, data: bytes) -> None:
        """Return unconsumed bytes to the front of the buffer."""
        self._data[:0] = data
        self._searched = self._checked = 0


class RequestCycle:
    """
    One client connection's HTTP/1.1 request cycle.

    Feed it with L{receiveData}; take events with L{nextEvent} until it
    returns L{NEED_DATA} or L{PAUSED}; say how the response ended with
    L{finishResponse}; go on with L{startNextCycle}, or hand the connection
    to another protocol with L{switchProtocols}.

    @ivar state: the client's L{State}.
    @ivar request: the request of the current cycle, once its head is in.
    @ivar keepAlive: whether another request may follow on this connection.
    """

    def __init__(
        self,
        limits: Limits = _DEFAULT_LIMITS,
        upgradeProtocols: frozenset[bytes] = frozenset({b"websocket"}),
        maxBodySize: int = 0,
    ) -> None:
        self.configure(limits, upgradeProtocols, maxBodySize)
        self.state = State.IDLE
        self.request: RequestHead | None = None
        self.keepAlive = True
        self.bodyBytes = 0
        self._buffer = ReceiveBuffer()
        self._decoder: LengthDecoder | ChunkedDecoder | None = None
        self._responseDone = False

    def configure(self, limits: Limits, upgradeProtocols: frozenset[bytes], maxBodySize: int) -> None:
        """Read the next request under these rules (a reload applies them between requests)."""
        self.limits = limits
        self.upgradeProtocols = upgradeProtocols
        self.maxBodySize = maxBodySize
        self.headLimit = limits.maxRequestLine + limits.maxHeaderSize

    @property
    def buffered(self) -> int:
        """How many received bytes wait to be read as events."""
        return len(self._buffer)

    def receiveData(self, data: bytes) -> None:
        self._buffer.append(data)

    def nextEvent(self) -> RequestReceived | BodyData | EndOfRequest | _Sentinel:
        """
        The next thing the client said.

        @raise HTTPError: the client sent something that cannot be read;
            the cycle is then in the C{ERROR} state, and the status is what
            the client should be told.
        """
        state = self.state
        try:
            if state is State.IDLE:
                return self._readHead()
            if state is State.SEND_BODY:
                return self._readBody()
        except HTTPError:
            self.state = State.ERROR
            self.keepAlive = False
            raise
        return PAUSED

    def _readHead(self) -> RequestReceived | _Sentinel:
        buffer = self._buffer
        if not buffer.dropEmptyLines() or not len(buffer):
            return NEED_DATA
        limits = self.limits
        head = buffer.takeHead(self.headLimit)
        if head is None:
            if not buffer.startsWith(_METHOD_PREFIX, _PREFIX_CHECKED):
                raise HTTPError(400, "this is not an HTTP request")
            size = len(buffer)
            if size > limits.maxRequestLine and buffer.find(b"\r\n", limits.maxRequestLine + 2) < 0:
                raise HTTPError(414, "request line too long")
            if size > self.headLimit:
                raise HTTPError(431, "request header section too large")
            return NEED_DATA
        request = parseRequestHead(head, limits, self.upgradeProtocols)
        self.request = request
        self.bodyBytes = 0
        if not request.keepAlive:
            self.keepAlive = False
        if request.chunked:
            self._decoder = ChunkedDecoder()
        elif request.bodyLength:
            if self.maxBodySize and request.bodyLength > self.maxBodySize:
                raise HTTPError(413, "request body too large")
            self._decoder = LengthDecoder(request.bodyLength)
        else:
            self._decoder = None
            self.state = State.DONE
            return RequestReceived(request)
        self.state = State.SEND_BODY
        return RequestReceived(request)

    def _readBody(self) -> BodyData | EndOfRequest | _Sentinel:
        decoder = self._decoder
        assert decoder is not None
        if decoder.done:
            return self._endOfRequest()
        buffer = self._buffer
        if not len(buffer):
            return NEED_DATA
        payload, rest = decoder.feed(buffer.takeAll())
        if rest:
            buffer.putBack(rest)
        if payload:
            self.bodyBytes += len(payload)
            if self.maxBodySize and self.bodyBytes > self.maxBodySize:
                raise HTTPError(413, "request body too large")
            return BodyData(payload)
        if decoder.done:
            return self._endOfRequest()
        return NEED_DATA

    def _endOfRequest(self) -> EndOfRequest:
        self._decoder = None
        self.state = State.DONE if self.keepAlive else State.MUST_CLOSE
        return _END_OF_REQUEST

    def finishResponse(self, keepAlive: bool) -> None:
        """
        The response to the current request is complete; C{keepAlive} is
        whether the response left the connection usable.  A response that
        ends before its request body has been read closes the connection:
        the rest of the body cannot be told from a next request.
        """
        self._responseDone = True
        if not (keepAlive and self.keepAlive) or self.state is not State.DONE:
            self.keepAlive = False
            if self.state in (State.IDLE, State.SEND_BODY, State.DONE):
                self.state = State.MUST_CLOSE

    def startNextCycle(self) -> None:
        """
        Both the request and its response are complete: read the next one.

        @raise RuntimeError: if either is not, or the connection must close.
        """
        if self.state is not State.DONE or not self._responseDone:
            raise RuntimeError(f"cannot start a new cycle in state {self.state.name}")
        self.state = State.IDLE
        self.request = None
        self._responseDone = False

    def switchProtocols(self) -> bytes:
        """
        The upgrade the client asked for was granted: from now on the
        connection is not HTTP.

        @return: the bytes the client sent after its request (its first
            frames), in order.
        """
        if self.state is not State.DONE or self.request is None or self.request.upgrade is None:
            raise RuntimeError(f"no upgrade to switch to in state {self.state.name}")
        self.state = State.SWITCHED_PROTOCOL
        return self.trailingData()

    def trailingData(self) -> bytes:
        """Take the bytes buffered and not read as events."""
        return self._buffer.takeAll()
