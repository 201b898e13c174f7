"""
Every request of the HTTP desync corpus (aws/http-desync-guardian, 158
cases, see L{desync_corpus}) sent through a real proxy listener to a
recording upstream on loopback:

 - C{Severe}: 400, the client connection closed, nothing reaches the
   upstream (not even a connection);
 - C{Ambiguous}: rejected the same way (4xx/5xx and close, nothing
   forwarded), or, for the few listed in L{NORMALISED_AMBIGUOUS}, forwarded
   only in a normalised form;
 - C{Compliant} / C{Acceptable}: forwarded, with every end-to-end header's
   value as the client sent it, except the short list of
   L{DELIBERATE_REJECTIONS}, each of which the RFCs require or recommend
   refusing, and which must still be refused cleanly.

One proxy and one upstream serve the whole module; each case is its own
test, identified by C{file#index}.
"""

from __future__ import annotations

import re

import pytest
import pytest_twisted
from desync_corpus import loadCases
from support import connectRaw, listenScripted, ok, proxyTo, startProxy, stopProxy, until

CASES = loadCases()
BY_ID = {case.caseId: case for case in CASES}

#: Compliant or Acceptable cases that wsproxy refuses on purpose, with the
#: status it answers and the rule that makes it refuse.
DELIBERATE_REJECTIONS: dict[str, int] = {
    # RFC 9112 §5.1: "A server MUST reject, with a response status code of
    # 400 (Bad Request), any received request message that contains
    # whitespace between a header field name and colon."  Dropping the field
    # instead would let "Content-Length : 100" (severe.yaml#23) through.
    "acceptable.yaml#0": 400,
    "acceptable.yaml#1": 400,
    "acceptable.yaml#3": 400,
    # RFC 9110 §5.1: field-name = token, and \x01 is no tchar; a message that
    # does not match the grammar SHOULD get 400 (RFC 9112 §2.2).  A name is
    # never forwarded in a form another parser may clean up differently.
    "acceptable.yaml#2": 400,
    "bad-header-characters.yaml#11": 400,
    "bad-header-characters.yaml#12": 400,
    # RFC 9110 §2.5 / §15.6.6: wsproxy speaks HTTP/1.0 and 1.1 only; an
    # "HTTP/0.9" request with a header section is neither 0.9 nor 1.x.
    "acceptable.yaml#6": 505,
    # RFC 9112 §3: request-line = method SP request-target SP HTTP-version;
    # "GET /foo/bar " has no version at all.
    "acceptable.yaml#7": 400,
    # RFC 9112 §3 / §3.2: a request-target holds no whitespace; splitting
    # at the outer spaces instead would accept "GET /a HTTP/1.1 HTTP/1.1"
    # (uri-specific-test-cases.yaml#4, Severe).
    "uri-specific-test-cases.yaml#3": 400,
    # RFC 9112 §3.2: the request-target is never empty ("GET  HTTP/1.1").
    "rfc-compliant.yaml#13": 400,
}

#: Ambiguous cases that are forwarded, normalised: identical repeated
#: Content-Length values are replaced by a single one (RFC 9110 §8.6).
NORMALISED_AMBIGUOUS = frozenset({"ambiguous.yaml#9", "real-life-test-cases.yaml#3"})

#: Headers the proxy writes itself, or removes as hop-by-hop (RFC 9110 §7.6.1).
PROXY_WRITTEN = frozenset(
    {
        b"host",
        b"content-length",
        b"x-real-ip",
        b"transfer-encoding",
        b"connection",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
)
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)

CHUNKED_BODY = b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"
CHUNKED_REFRAMED = b"5\r\nhello\r\n0\r\n\r\n"


def _wire(text: str) -> bytes:
    return b"".join(c.encode("latin-1") if ord(c) < 256 else c.encode("utf-8") for c in text)


def _split(message: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = [(n, v.strip(b" \t")) for n, _, v in (line.partition(b":") for line in lines[1:])]
    return lines[0], fields, body


def _requestComplete(data: bytes) -> bool:
    """Whether an upstream has the whole (re-framed) request the proxy sends."""
    if b"\r\n\r\n" not in data:
        return False
    _, fields, body = _split(data)
    names = {n.lower(): v for n, v in fields}
    if b"transfer-encoding" in names:
        return body.endswith(b"0\r\n\r\n")
    return len(body) >= int(names.get(b"content-length", b"0"))


def _responseComplete(data: bytes, head: bool) -> bool:
    if b"\r\n\r\n" not in data:
        return False
    _, fields, body = _split(data)
    length = dict((n.lower(), v) for n, v in fields).get(b"content-length")
    return length is not None and (head or len(body) >= int(length))


@pytest_twisted.async_yield_fixture(scope="module")
async def proxy():
    """One recording upstream (it answers when the test says) and a proxy in front of it."""
    port, upstream = listenScripted(lambda request, connection: None)
    upstreams, block = proxyTo(port.getHost().port, client_header_timeout=5)
    service = await startProxy(upstreams, block)
    yield service.ports[0], upstream
    await stopProxy(service)
    for connection in upstream.connections:
        connection.transport.abortConnection()
    await port.stopListening()


async def _send(proxy, case) -> tuple[bytes, bool, list[bytes]]:
    """
    Send C{case}'s head; once the proxy has connected to the upstream, send
    the body a lenient parser would frame, and answer the request with a
    200 when the upstream has it all.  Return what the client received,
    whether the proxy closed the client connection, and what the upstream
    received on each new connection.

    The verdict is the head's alone: the body goes out only for a request
    the proxy forwards.
    """
    port, upstream = proxy
    before = len(upstream.connections)
    head = case.method == "HEAD"
    client = await connectRaw(port)
    client.transport.write(case.toBytes())
    await until(lambda: len(upstream.connections) > before or client.received or client.closed.called, interval=0.002)
    if len(upstream.connections) > before:
        body = case.framedBody()
        client.transport.write(CHUNKED_BODY if body == b"0\r\n\r\n" else body)
        connection = upstream.connections[before]
        if await until(lambda: _requestComplete(connection.received), interval=0.002):
            connection.transport.write(ok(extra=b"Connection: close\r\n"))
            connection.transport.loseConnection()
    received = await client.waitFor(lambda r: _responseComplete(r, head))
    refused = not received.startswith(b"HTTP/1.1 200 ")
    closedByProxy = client.closed.called or (refused and await client.waitClosed(timeout=2) is not None)
    if not client.closed.called:
        client.transport.loseConnection()
        await client.closed
    return received, closedByProxy, [c.received for c in upstream.connections[before:]]


def _expectedPath(case) -> bytes:
    """The target as forwarded: fragment dropped, raw non-ASCII bytes %-encoded."""
    path = _wire(case.uri).partition(b"#")[0]
    return re.sub(rb"[\x80-\xff]", lambda m: b"%%%02X" % m.group()[0], path)


def _endToEnd(case) -> list[tuple[bytes, bytes]]:
    """
    The case's headers an upstream must receive, values OWS-trimmed and
    otherwise as sent; names with an underscore are dropped
    (C{underscores_in_headers = false}, as nginx does by default).
    """
    named = set()
    for name, value in case.headers:
        if name.lower() == "connection":
            named.update(_wire(t.strip(" \t").lower()) for t in value.split(","))
    return [
        (_wire(name), _wire(value).strip(b" \t"))
        for name, value in case.headers
        if (lower := _wire(name).lower()) not in PROXY_WRITTEN | HOP_BY_HOP and lower not in named and b"_" not in lower
    ]


def _assertRefused(case, received: bytes, closed: bool, forwarded: list[bytes], statuses: set[int]) -> None:
    status = received.split(b" ", 2)[1:2]
    assert status and int(status[0]) in statuses, (case.caseId, received[:80])
    _, fields, body = _split(received)
    assert [v for n, v in fields if n.lower() == b"content-length"] == [b"%d" % len(body)], "one response only"
    assert closed, "the proxy must close the client connection"
    assert forwarded == [], "nothing may reach the upstream"


def _assertForwarded(case, received: bytes, closed: bool, forwarded: list[bytes]) -> None:
    answer = b"" if case.method == "HEAD" else b"hello"
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"\r\n\r\n" + answer), received[:80]
    assert len(forwarded) == 1, "the request reaches the upstream once"
    requestLine, fields, body = _split(forwarded[0])
    names = [n.lower() for n, _ in fields]

    assert requestLine == b"%b %b HTTP/1.1" % (_wire(case.method), _expectedPath(case))
    assert names.count(b"host") == 1 and names[0] == b"host"
    framing = [n for n in names if n in (b"content-length", b"transfer-encoding")]
    assert len(framing) <= 1, "one framing header at most"
    assert not set(names) & {b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
    assert [v for n, v in fields if n.lower() == b"connection"] in ([], [b"close"]), "no client Connection tokens"
    assert [(n, v) for n, v in fields if n.lower() not in PROXY_WRITTEN] == _endToEnd(case)

    lenient = case.framedBody()
    if lenient == b"0\r\n\r\n":
        assert framing == [b"transfer-encoding"] and body == CHUNKED_REFRAMED
    elif lenient:
        assert (b"content-length", b"%d" % len(lenient)) in [(n.lower(), v) for n, v in fields]
        assert body == lenient
    else:
        assert body == b""


def _ids(tier: str) -> list[str]:
    return [case.caseId for case in CASES if case.tier == tier]


def test_the_corpus_has_158_cases_in_four_tiers():
    counts = {tier: len(_ids(tier)) for tier in ("Compliant", "Acceptable", "Ambiguous", "Severe")}
    assert counts == {"Compliant": 28, "Acceptable": 15, "Ambiguous": 57, "Severe": 58}


def test_deliberate_rejections_are_only_compliant_or_acceptable_cases():
    assert {BY_ID[i].tier for i in DELIBERATE_REJECTIONS} <= {"Compliant", "Acceptable"}


def test_normalised_forwards_are_only_ambiguous_cases():
    assert {BY_ID[i].tier for i in NORMALISED_AMBIGUOUS} == {"Ambiguous"}


@pytest.mark.parametrize("caseId", _ids("Severe"))
@pytest_twisted.ensureDeferred
async def test_severe_is_400_and_close_with_nothing_forwarded(proxy, caseId):
    case = BY_ID[caseId]
    _assertRefused(case, *(await _send(proxy, case)), statuses={400})


@pytest.mark.parametrize("caseId", _ids("Ambiguous"))
@pytest_twisted.ensureDeferred
async def test_ambiguous_is_refused_or_forwarded_normalised(proxy, caseId):
    case = BY_ID[caseId]
    received, closed, forwarded = await _send(proxy, case)
    if caseId in NORMALISED_AMBIGUOUS:
        _assertForwarded(case, received, closed, forwarded)
    else:
        _assertRefused(case, received, closed, forwarded, statuses={400, 501, 505})


@pytest.mark.parametrize("caseId", _ids("Compliant") + _ids("Acceptable"))
@pytest_twisted.ensureDeferred
async def test_compliant_and_acceptable_are_forwarded_unchanged(proxy, caseId):
    case = BY_ID[caseId]
    received, closed, forwarded = await _send(proxy, case)
    if caseId in DELIBERATE_REJECTIONS:
        _assertRefused(case, received, closed, forwarded, statuses={DELIBERATE_REJECTIONS[caseId]})
    else:
        _assertForwarded(case, received, closed, forwarded)
