"""
The sans-IO request cycle: bytes in, events out, no transport and no clock.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.connection import (
    NEED_DATA,
    PAUSED,
    BodyData,
    EndOfRequest,
    ReceiveBuffer,
    RequestCycle,
    RequestReceived,
    State,
)
from wsproxy.http import HTTPError, Limits

GET = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def events(cycle: RequestCycle) -> list:
    """Every event until the cycle needs data or pauses, and that last one."""
    seen = []
    while True:
        event = cycle.nextEvent()
        seen.append(event)
        if event is NEED_DATA or event is PAUSED:
            return seen


def test_a_get_then_the_next_cycle():
    cycle = RequestCycle()
    cycle.receiveData(GET)
    first, paused = events(cycle)
    assert isinstance(first, RequestReceived) and first.request.path == b"/a"
    assert paused is PAUSED and cycle.state is State.DONE
    cycle.finishResponse(keepAlive=True)
    cycle.startNextCycle()
    assert cycle.state is State.IDLE and cycle.request is None
    assert cycle.nextEvent() is NEED_DATA


def test_pipelined_requests_wait_for_the_response():
    cycle = RequestCycle()
    cycle.receiveData(GET + GET.replace(b"/a", b"/b"))
    assert [type(e) for e in events(cycle)] == [RequestReceived, type(PAUSED)]
    assert cycle.nextEvent() is PAUSED
    with pytest.raises(RuntimeError):
        cycle.startNextCycle()
    cycle.finishResponse(keepAlive=True)
    cycle.startNextCycle()
    second = cycle.nextEvent()
    assert second.request.path == b"/b"


def test_a_body_in_pieces():
    cycle = RequestCycle()
    cycle.receiveData(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123")
    head, body, need = events(cycle)
    assert isinstance(head, RequestReceived) and body == BodyData(b"0123") and need is NEED_DATA
    assert cycle.state is State.SEND_BODY
    cycle.receiveData(b"456789" + GET)
    assert events(cycle) == [BodyData(b"456789"), EndOfRequest(), PAUSED]
    assert cycle.state is State.DONE and cycle.buffered == len(GET)


def test_a_chunked_body():
    cycle = RequestCycle()
    cycle.receiveData(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert events(cycle)[1:] == [BodyData(b"abc"), NEED_DATA]
    cycle.receiveData(b"0\r\n\r\n")
    assert events(cycle) == [EndOfRequest(), PAUSED]


def test_connection_close_means_no_next_cycle():
    cycle = RequestCycle()
    cycle.receiveData(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    events(cycle)
    assert not cycle.keepAlive
    cycle.finishResponse(keepAlive=True)
    assert cycle.state is State.MUST_CLOSE
    with pytest.raises(RuntimeError):
        cycle.startNextCycle()


def test_http10_without_keep_alive_must_close():
    cycle = RequestCycle()
    cycle.receiveData(b"GET / HTTP/1.0\r\n\r\n")
    events(cycle)
    cycle.finishResponse(keepAlive=True)
    assert cycle.state is State.MUST_CLOSE


def test_a_response_that_ends_before_the_body_closes_the_connection():
    cycle = RequestCycle()
    cycle.receiveData(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\npart")
    events(cycle)
    cycle.finishResponse(keepAlive=True)
    assert cycle.state is State.MUST_CLOSE and not cycle.keepAlive


def test_the_response_can_refuse_keep_alive():
    cycle = RequestCycle()
    cycle.receiveData(GET)
    events(cycle)
    cycle.finishResponse(keepAlive=False)
    assert cycle.state is State.MUST_CLOSE


def test_switching_protocols_keeps_the_bytes_after_the_request_in_order():
    cycle = RequestCycle()
    cycle.receiveData(UPGRADE + b"\x81\x05first")
    cycle.receiveData(b"\x81\x06second")
    head, paused = events(cycle)
    assert head.request.upgrade == b"websocket"
    assert cycle.switchProtocols() == b"\x81\x05first\x81\x06second"
    assert cycle.state is State.SWITCHED_PROTOCOL
    assert cycle.nextEvent() is PAUSED


def test_no_switch_without_an_upgrade_request():
    cycle = RequestCycle()
    cycle.receiveData(GET)
    events(cycle)
    with pytest.raises(RuntimeError):
        cycle.switchProtocols()


def test_leading_empty_lines_are_ignored_even_split_between_reads():
    """RFC 9112 §2.2; a CR in one read and its LF in the next is still an empty line."""
    cycle = RequestCycle()
    cycle.receiveData(b"\r\n\r")
    assert cycle.nextEvent() is NEED_DATA
    cycle.receiveData(b"\n")
    assert cycle.nextEvent() is NEED_DATA
    assert cycle.buffered == 0
    cycle.receiveData(b"\r")
    assert cycle.nextEvent() is NEED_DATA
    cycle.receiveData(b"\n" + GET)
    assert isinstance(cycle.nextEvent(), RequestReceived)


def test_many_leading_empty_lines_are_dropped_at_once():
    cycle = RequestCycle()
    cycle.receiveData(b"\r\n" * 32768)
    assert cycle.nextEvent() is NEED_DATA
    assert cycle.buffered == 0
    cycle.receiveData(GET)
    assert isinstance(cycle.nextEvent(), RequestReceived)


def test_a_head_a_byte_at_a_time_is_searched_once():
    """The buffer remembers how far it looked: no byte is searched twice."""
    cycle = RequestCycle()
    buffer = cycle._buffer
    for index, byte in enumerate(GET[:-1]):
        cycle.receiveData(bytes([byte]))
        assert cycle.nextEvent() is NEED_DATA
        assert buffer._searched == index + 1
        assert buffer._checked in (index, index + 1)
    cycle.receiveData(GET[-1:])
    assert isinstance(cycle.nextEvent(), RequestReceived)


def test_a_bare_lf_is_refused_before_the_head_is_complete():
    cycle = RequestCycle()
    cycle.receiveData(b"GET / HTTP/1.1\nHost: h")
    with pytest.raises(HTTPError) as raised:
        cycle.nextEvent()
    assert raised.value.status == 400
    assert cycle.state is State.ERROR and not cycle.keepAlive


def test_a_bare_cr_split_from_its_lf_is_not_bare():
    buffer = ReceiveBuffer()
    buffer.append(b"GET / HTTP/1.1\r")
    assert buffer.takeHead(1000) is None
    buffer.append(b"\nHost: h\r\n\r\n")
    assert buffer.takeHead(1000) == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest.mark.parametrize(
    "data, status",
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
        (b"GET /" + b"a" * 200, 414),
        (b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 400, 431),
        (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * 5 + b"\r\n", 431),
    ],
    ids=["tls-on-plain", "request-line", "head-size", "header-count"],
)
def test_limits_before_and_after_the_head_is_complete(data, status):
    cycle = RequestCycle(Limits(maxRequestLine=64, maxHeaderSize=256, maxHeaders=3))
    cycle.receiveData(data)
    with pytest.raises(HTTPError) as raised:
        cycle.nextEvent()
    assert raised.value.status == status


def test_a_declared_body_over_the_limit():
    cycle = RequestCycle(maxBodySize=10)
    cycle.receiveData(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
    with pytest.raises(HTTPError) as raised:
        cycle.nextEvent()
    assert raised.value.status == 413


def test_a_chunked_body_over_the_limit():
    cycle = RequestCycle(maxBodySize=10)
    cycle.receiveData(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert isinstance(cycle.nextEvent(), RequestReceived)
    cycle.receiveData(b"6\r\nabcdef\r\n")
    assert cycle.nextEvent() == BodyData(b"abcdef")
    cycle.receiveData(b"6\r\nghijkl\r\n")
    with pytest.raises(HTTPError) as raised:
        cycle.nextEvent()
    assert raised.value.status == 413


def test_a_bad_chunk_is_an_error_state():
    cycle = RequestCycle()
    cycle.receiveData(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert isinstance(cycle.nextEvent(), RequestReceived)
    with pytest.raises(HTTPError):
        cycle.nextEvent()
    assert cycle.state is State.ERROR
    cycle.finishResponse(keepAlive=True)
    assert cycle.state is State.ERROR


SAMPLES = [
    GET,
    b"\r\n\r\n" + GET,
    UPGRADE + b"\x81\x05hello",
    b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",
    b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"y" * 600 + b"\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.integers(1, 40), min_size=1, max_size=60))
def test_bytes_split_anyhow_give_the_same_events_as_in_one_piece(data, cuts):
    """The buffer's memory of where it searched never changes what it finds."""
    whole = RequestCycle(Limits(maxRequestLine=128, maxHeaderSize=512, maxHeaders=8))
    whole.receiveData(data)
    expected = outcome(whole)
    pieces = RequestCycle(Limits(maxRequestLine=128, maxHeaderSize=512, maxHeaders=8))
    seen: list = []
    position = 0
    for cut in cuts:
        pieces.receiveData(data[position : position + cut])
        position += cut
        seen += outcome(pieces, final=False)
        if seen and isinstance(seen[-1], int):
            break
    if not (seen and isinstance(seen[-1], int)):
        pieces.receiveData(data[position:])
        seen += outcome(pieces)
    assert joined(seen) == joined(expected)


def joined(events: list) -> list:
    """Body pieces run together: how a body is cut into events depends on the reads."""
    result: list = []
    for event in events:
        if isinstance(event, bytes) and result and isinstance(result[-1], bytes):
            result[-1] += event
        else:
            result.append(event)
    return result


def outcome(cycle: RequestCycle, final: bool = True) -> list:
    """The events as comparable values, ending in an error status if there is one."""
    seen: list = []
    while True:
        try:
            event = cycle.nextEvent()
        except HTTPError as e:
            return seen + [e.status]
        if event is NEED_DATA or event is PAUSED:
            return seen
        if isinstance(event, RequestReceived):
            seen.append((event.request.method, event.request.path, tuple(event.request.headers)))
        elif isinstance(event, BodyData):
            seen.append(event.data)
        else:
            seen.append("end")
