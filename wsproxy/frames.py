# -*- test-case-name: tests.test_drain -*-
"""
Where the WebSocket frames are in a tunnel's byte stream, without reading
them.

To close a tunnel with a Close frame of its own (a drain's 1001 Going
Away), the proxy must write it between two frames: a Close that lands
inside a frame corrupts the stream and the peer fails the connection.
Knowing where a frame ends means following the chain of frame headers
from the first byte after the 101, in each direction, for the whole life
of the tunnel; a L{FrameTracker} does that and nothing more.  It reads the
header lengths of RFC 6455 §5.2 (FIN, opcode, mask bit, 7-, 16- or 64-bit
payload length, masking key) and jumps over payloads without looking at
them: nothing is unmasked except the two-byte status code of a Close
frame, which the access log reports.

It runs on every chunk a tunnel relays, so its cost is per frame header,
not per byte: a chunk inside a large payload costs one subtraction, and a
run of small unfragmented data frames is walked by a tight loop that only
reads their second byte, and a run of alike frames (the same size and
kind) is checked in one go, by slicing out every header at once.  Anything
unusual (control frames, fragments,
long lengths, a header split across two chunks) takes the careful path.

A stream that does not follow the framing rules (a reserved opcode, a
mask bit the wrong way round, a control frame too long or fragmented) is
not WebSocket as far as the tracker is concerned: it stops, C{failed}
says so, and a drain falls back to closing the connections.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["CLOSE", "FrameTracker", "GOING_AWAY", "NO_STATUS", "closeFrame"]

#: The opcode of a Close frame.
CLOSE = 0x8
#: The status code of a server (or proxy) going away (RFC 6455 §7.4.1).
GOING_AWAY = 1001
#: What a Close frame without a status code reports (RFC 6455 §7.1.5).
NO_STATUS = 1005

#: The first byte of an unfragmented text or binary frame: FIN, any RSV
#: bits (an extension such as permessage-deflate may set them), opcode 1 or 2.
_WHOLE_DATA = frozenset(0x80 | rsv | opcode for rsv in range(0, 0x80, 0x10) for opcode in (1, 2))

#: Once a stream stops being WebSocket, every byte is inside this "frame".
_NEVER = 1 << 62


class _NotWebSocket(Exception):
    """The stream broke a framing rule."""


class FrameTracker:
    """
    Follows the frame boundaries of one direction of a WebSocket
    connection.

    @ivar masked: whether this direction's frames are masked (client to
        server) or not (server to client).
    @ivar inMessage: whether a fragmented message has begun and not ended.
    @ivar closed: whether a whole Close frame has passed.
    @ivar closeCode: the status code of the first Close frame that passed
        (L{NO_STATUS} for one without a code), or C{None}.
    @ivar failed: why the stream is not WebSocket, or C{None} while it is.
    @ivar onClose: called with the close code when a Close frame has passed.
    """

    __slots__ = ("masked", "inMessage", "closed", "closeCode", "failed", "onClose", "_remaining", "_head", "_range")

    def __init__(self, masked: bool, onClose: Callable[[int], object] | None = None) -> None:
        self.masked = masked
        self.inMessage = False
        self.closed = False
        self.closeCode: int | None = None
        self.failed: str | None = None
        self.onClose = onClose
        #: Payload bytes of the frame in progress not seen yet.
        self._remaining = 0
        #: The beginning of a frame whose header (or, for a Close, whole
        #: frame) is split across chunks, kept until the rest arrives.
        self._head = b""
        # The second byte of a small masked (or unmasked) frame, and what to
        # add to it to get the frame's size: 0x80 + n + 0x7A - 0x80 = n + 6.
        self._range = (0x80, 0xFE, -0x7A) if masked else (0x00, 0x7E, 2)

    @property
    def atBoundary(self) -> bool:
        """Whether the bytes seen so far end with a whole frame (or none)."""
        return not self._remaining and not self._head and self.failed is None

    def feed(self, data: bytes) -> None:
        """Follow the frames through C{data}, the next bytes of the stream."""
        size = len(data)
        position = self._remaining
        if position >= size:
            self._remaining = position - size
            return
        self._remaining = 0
        if not (self._head or self.inMessage):
            low, high, extra = self._range
            whole = _WHOLE_DATA
            last = size - 1
            previous = -1
            while position < last:
                second = data[position + 1]
                if not (low <= second < high and data[position] in whole):
                    break
                step = second + extra
                if second == previous:
                    # Two alike in a row: maybe a run of them.  Check all
                    # their headers at once, once per chunk.
                    previous = -1
                    count = (size - position) // step
                    end = position + count * step
                    if (
                        count > 1
                        and data[position + 1 : end : step].count(second) == count
                        and data[position:end:step].count(data[position]) == count
                    ):
                        position = end
                        continue
                    previous = 0x100
                elif previous != 0x100:
                    previous = second
                position += step
            if position >= size:
                self._remaining = position - size
                return
        self._scan(data, position, False)

    def untilBoundary(self, data: bytes) -> int:
        """
        Follow the frames through C{data} only as far as the end of the
        frame in progress.

        @return: how many bytes of C{data} belong to the frame in progress:
            0 at a boundary, C{len(data)} if the frame goes on past it (or
            the stream turns out not to be WebSocket: see C{failed}).
        """
        if self.failed is not None:
            return len(data)
        remaining = self._remaining
        if remaining:
            taken = min(remaining, len(data))
            self._remaining = remaining - taken
            return taken
        if not self._head:
            return 0
        return self._scan(data, 0, True)

    def _scan(self, data: bytes, position: int, once: bool) -> int:
        """
        The careful path: follow the frames of C{data} from C{position}
        (after any kept head), all of them or (C{once}) only the one in
        progress.

        @return: the position in C{data} reached.
        """
        offset = len(self._head)
        if offset:
            data = self._head + data
            self._head = b""
        size = len(data)
        try:
            while position < size:
                end = self._frameAt(data, position)
                if end < 0:
                    self._head = data[position:]
                    return size - offset
                if end > size:
                    self._remaining = end - size
                    return size - offset
                position = end
                if once:
                    break
        except _NotWebSocket as e:
            self.failed = str(e)
            self._remaining = _NEVER
            self._head = b""
            return size - offset
        return position - offset

    def _frameAt(self, data: bytes, position: int) -> int:
        """
        Read the header of the frame at C{position}.

        @return: where the frame ends (possibly past the end of C{data}),
            or -1 if its header, or a Close frame's payload, is not all in
            C{data} yet.
        @raise _NotWebSocket: if the header breaks a framing rule.
        """
        size = len(data)
        start = position + 2
        if start > size:
            return -1
        first, second = data[position], data[position + 1]
        if bool(second & 0x80) is not self.masked:
            raise _NotWebSocket("a masked frame from a server" if second & 0x80 else "an unmasked frame from a client")
        length = second & 0x7F
        if length == 126:
            start += 2
            if start > size:
                return -1
            length = int.from_bytes(data[start - 2 : start], "big")
        elif length == 127:
            start += 8
            if start > size:
                return -1
            length = int.from_bytes(data[start - 8 : start], "big")
            if length >> 63:
                raise _NotWebSocket("a 64-bit length with its top bit set")
        if self.masked:
            start += 4
            if start > size:
                return -1
        opcode = first & 0x0F
        final = first & 0x80
        if opcode >= 0x8:
            if opcode > 0xA:
                raise _NotWebSocket(f"reserved control opcode {opcode:#x}")
            if not final or length > 125:
                raise _NotWebSocket("a fragmented or over-long control frame")
            if opcode == CLOSE:
                if start + length > size:
                    return -1
                self._closePassed(data, start, length)
        elif opcode == 0:
            if not self.inMessage:
                raise _NotWebSocket("a continuation frame outside a message")
            if final:
                self.inMessage = False
        elif opcode <= 2:
            if self.inMessage:
                raise _NotWebSocket("a new message inside a fragmented one")
            if not final:
                self.inMessage = True
        else:
            raise _NotWebSocket(f"reserved data opcode {opcode:#x}")
        return start + length

    def _closePassed(self, data: bytes, start: int, length: int) -> None:
        """A whole Close frame with its payload at C{data[start:start + length]}."""
        if length == 1:
            raise _NotWebSocket("a Close frame with a one-byte payload")
        code = NO_STATUS
        if length:
            high, low = data[start], data[start + 1]
            if self.masked:
                high ^= data[start - 4]
                low ^= data[start - 3]
            code = high << 8 | low
        self.closed = True
        if self.closeCode is None:
            self.closeCode = code
            if self.onClose is not None:
                self.onClose(code)


def closeFrame(code: int, masked: bool, reason: bytes = b"") -> bytes:
    """
    A Close frame with status C{code}: unmasked as a server sends it, or
    masked with a random key as a client must (RFC 6455 §5.3).
    """
    payload = code.to_bytes(2, "big") + reason
    if len(payload) > 125:
        raise ValueError("a Close frame's payload is at most 125 bytes")
    if not masked:
        return bytes((0x80 | CLOSE, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x80 | CLOSE, 0x80 | len(payload))) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
