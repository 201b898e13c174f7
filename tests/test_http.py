"""
The strict HTTP/1.1 parser (L{wsproxy.http}) on its own, rule by rule:
what a request or response head must look like, what a chunked body must
look like, the exact payloads of Twisted's request-smuggling fixes, and
property-based tests that no input makes the parser do anything but parse
or answer an L{HTTPError}.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.connection import ReceiveBuffer
from wsproxy.http import (
    ChunkedDecoder,
    HTTPError,
    LengthDecoder,
    Limits,
    endToEnd,
    errorResponse,
    forwardedRequestHeaders,
    parseRequestHead,
    parseResponseHead,
)

CRLF = b"\r\n"


def head(*lines: bytes) -> bytes:
    """A message head: the lines, CRLF-terminated, and the blank line."""
    return CRLF.join(lines) + CRLF + CRLF


def post(*fields: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    """A POST request head with C{fields} after its Host."""
    return head(b"POST /upload " + version, b"Host: example.com", *fields)


def refusal(data: bytes, **kwargs) -> int:
    """The status a request head is refused with."""
    with pytest.raises(HTTPError) as raised:
        parseRequestHead(data, **kwargs)
    return raised.value.status


def responseRefusal(data: bytes, method: bytes = b"GET") -> int:
    with pytest.raises(HTTPError) as raised:
        parseResponseHead(data, method)
    return raised.value.status


def decode(data: bytes, status: int = 400) -> tuple[bytes, bytes | None]:
    return ChunkedDecoder(status).feed(data)


def chunkRefusal(data: bytes, status: int = 400) -> int:
    with pytest.raises(HTTPError) as raised:
        ChunkedDecoder(status).feed(data)
    return raised.value.status


# Body framing


def test_content_length_frames_the_body():
    request = parseRequestHead(post(b"Content-Length: 5"))
    assert (request.bodyLength, request.chunked) == (5, False)


def test_content_length_with_transfer_encoding_is_400():
    assert refusal(post(b"Content-Length: 5", b"Transfer-Encoding: chunked")) == 400


def test_differing_content_lengths_are_400():
    assert refusal(post(b"Content-Length: 5", b"Content-Length: 6")) == 400


def test_identical_content_lengths_are_folded_into_one():
    assert parseRequestHead(post(b"Content-Length: 5", b"Content-Length: 005")).bodyLength == 5


@pytest.mark.parametrize(
    "value", [b"+5", b"-5", b"5 5", b"5,5", b"5.0", b"0x5", b"", b"five", b"\x0b5", b"5\xa0", b"\xd9\xa5"]
)
def test_content_length_that_is_not_plain_digits_is_400(value):
    assert refusal(post(b"Content-Length: " + value)) == 400


def test_content_length_above_18_digits_is_400():
    """2**64 would wrap to 0 in a backend with 64-bit lengths (severe.yaml#4)."""
    assert refusal(post(b"Content-Length: 18446744073709551616")) == 400


def test_content_length_of_18_digits_is_accepted():
    assert parseRequestHead(post(b"Content-Length: " + b"9" * 18)).bodyLength == 10**18 - 1


def test_final_chunked_frames_the_body():
    request = parseRequestHead(post(b"Transfer-Encoding: chunked"))
    assert (request.chunked, request.bodyLength, request.transferCodings) == (True, None, ())


@pytest.mark.parametrize(
    "value", [b"gzip", b"chunked, gzip", b"identity", b"chunked, chunked", b"xchunked", b"chunked\x01", b"chunk", b""]
)
def test_a_transfer_coding_other_than_one_final_chunked_is_400(value):
    assert refusal(post(b"Transfer-Encoding: " + value)) == 400


def test_chunked_in_two_fields_is_400():
    assert refusal(post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")) == 400


def test_an_unknown_coding_before_chunked_is_501():
    assert refusal(post(b"Transfer-Encoding: rot13, chunked")) == 501


def test_registered_codings_before_chunked_are_kept_and_identity_dropped():
    request = parseRequestHead(post(b"Transfer-Encoding: gzip", b"Transfer-Encoding: identity, deflate, chunked"))
    assert request.transferCodings == (b"gzip", b"deflate")


def test_transfer_coding_parameters_are_ignored():
    assert parseRequestHead(post(b"Transfer-Encoding: gzip;q=1, chunked;x=y")).transferCodings == (b"gzip",)


def test_transfer_encoding_in_http10_is_400():
    assert refusal(post(b"Transfer-Encoding: chunked", version=b"HTTP/1.0")) == 400


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize("framing", [b"Content-Length: 3", b"Transfer-Encoding: chunked"])
def test_get_or_head_with_a_body_is_400(method, framing):
    assert refusal(head(method + b" / HTTP/1.1", b"Host: h", framing)) == 400


def test_get_with_content_length_zero_is_accepted():
    assert parseRequestHead(head(b"GET / HTTP/1.1", b"Host: h", b"Content-Length: 0")).bodyLength == 0


# Header field syntax


def test_obs_fold_is_400():
    assert refusal(post(b"X-A: one", b" two")) == 400


@pytest.mark.parametrize("line", [b"X-A : v", b"X-A\t: v", b"Content-Length : 5"])
def test_whitespace_before_the_colon_is_400(line):
    assert refusal(post(line)) == 400


@pytest.mark.parametrize(
    "line",
    [b"X-A: a\x00b", b"X\x00A: v", b"X-A: a\rb", b"X-A: a\nb", b"X\rA: v", b"X\nA: v", b"\x00X-A: v"],
    ids=["NUL-value", "NUL-name", "CR-value", "LF-value", "CR-name", "LF-name", "NUL-line"],
)
def test_nul_or_bare_cr_or_lf_in_a_field_is_400(line):
    assert refusal(post(line)) == 400


@pytest.mark.parametrize("name", [b"X\x01A", b"\x01X", b"X\x7f", b"X A", b"X\xa0", b"Tran\xc5\xbffer-Encoding"])
def test_a_field_name_that_is_not_a_token_is_400(name):
    assert refusal(post(name + b": v")) == 400


@pytest.mark.parametrize("line", [b"no colon", b": empty name"])
def test_a_field_line_without_a_name_and_colon_is_400(line):
    assert refusal(post(line)) == 400


def test_other_control_characters_in_values_are_kept_verbatim():
    """RFC 9110 §5.5: only NUL, CR and LF must be refused; a recipient may retain other CTLs."""
    request = parseRequestHead(post(b"X-A: \x01a\x0bb\x7f"))
    assert request.fields[b"x-a"] == [b"\x01a\x0bb\x7f"]


def test_optional_whitespace_around_a_value_is_not_part_of_it():
    assert parseRequestHead(post(b"X-A: \t a  b \t")).fields[b"x-a"] == [b"a  b"]


@pytest.mark.parametrize("name", [b"Content_Length", b"Transfer_Encoding", b"Transfer---Encoding", b"content.length"])
def test_a_name_that_reads_as_a_framing_header_is_400(name):
    assert refusal(post(name + b": 5")) == 400


def test_underscores_in_other_names_are_accepted():
    assert parseRequestHead(post(b"My_Custom_Header: v")).fields[b"my_custom_header"] == [b"v"]


def test_a_long_run_of_whitespace_is_refused_in_linear_time():
    """A regex with OWS on both sides of the value backtracked quadratically here (10 s for 32 KiB)."""
    data = post(b"X-A:" + b" " * 32000 + b"\x00")
    started = time.perf_counter()
    assert refusal(data, limits=Limits(maxHeaderSize=65536)) == 400
    assert time.perf_counter() - started < 0.5


# Request line and target


@pytest.mark.parametrize("method", [b"G\x01T", b"GET(", b"G\xc3\x89T", b"G/T"])
def test_a_method_that_is_not_a_token_is_400(method):
    assert refusal(head(method + b" / HTTP/1.1", b"Host: h")) == 400


@pytest.mark.parametrize(
    "line",
    [b"GET / http/1.1", b"GET / HTTP/1", b"GET / HTTP/1.1x", b"GET / HTTP/11", b"GET /", b"GET / HTTP/1.1 HTTP/1.1"],
)
def test_a_malformed_version_is_400(line):
    assert refusal(head(line, b"Host: h")) == 400


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
def test_a_well_formed_but_unsupported_version_is_505(version):
    assert refusal(head(b"GET / " + version, b"Host: h")) == 505


def test_a_later_http1_minor_version_is_read_as_11():
    assert parseRequestHead(head(b"GET / HTTP/1.2", b"Host: h")).version == b"HTTP/1.1"


def test_trailing_spaces_after_the_version_are_tolerated():
    assert parseRequestHead(head(b"GET / HTTP/1.1  ", b"Host: h")).version == b"HTTP/1.1"


@pytest.mark.parametrize("target", [b"/a b", b"/a\tb", b"/a\x01b", b"/a\x7fb"])
def test_whitespace_or_control_characters_in_the_target_are_400(target):
    assert refusal(head(b"GET " + target + b" HTTP/1.1", b"Host: h")) == 400


def test_an_empty_target_is_400():
    assert refusal(head(b"GET  HTTP/1.1", b"Host: h")) == 400


def test_a_fragment_is_not_forwarded():
    assert parseRequestHead(head(b"GET /p?q=1#frag HTTP/1.1", b"Host: h")).path == b"/p?q=1"


def test_raw_non_ascii_in_the_target_is_forwarded_percent_encoded():
    request = parseRequestHead(head("GET /я?q=é HTTP/1.1".encode(), b"Host: h"))
    assert request.path == b"/%D1%8F?q=%C3%A9"


def test_connect_is_refused():
    assert refusal(head(b"CONNECT example.com:443 HTTP/1.1", b"Host: example.com:443")) == 405


def test_a_missing_host_on_http11_is_400():
    assert refusal(head(b"GET / HTTP/1.1")) == 400


def test_a_duplicate_host_is_400():
    assert refusal(head(b"GET / HTTP/1.1", b"Host: a", b"Host: a")) == 400


def test_http10_needs_no_host():
    assert parseRequestHead(head(b"GET / HTTP/1.0")).host == b""


@pytest.mark.parametrize("host", [b"a b", b"a/b", b"a@b", b"\x01"])
def test_an_invalid_host_is_400(host):
    assert refusal(head(b"GET / HTTP/1.1", b"Host: " + host)) == 400


def test_an_absolute_form_target_overrides_host():
    request = parseRequestHead(head(b"GET http://real.example:8080/x?y HTTP/1.1", b"Host: other"))
    assert (request.host, request.path) == (b"real.example:8080", b"/x?y")


@pytest.mark.parametrize("target", [b"http://user@h/x", b"ftp://h/x", b"http:///x"])
def test_an_absolute_form_target_with_userinfo_another_scheme_or_no_host_is_400(target):
    assert refusal(head(b"GET " + target + b" HTTP/1.1", b"Host: h")) == 400


@pytest.mark.parametrize("host", [b"a.com,evil.com", b"a.com,", b",a.com", b"a.com:80,evil.com:80"])
def test_a_comma_in_host_is_400(host):
    """Two hosts folded into one value: a backend that splits it may pick the second."""
    assert refusal(head(b"GET / HTTP/1.1", b"Host: " + host)) == 400


@pytest.mark.parametrize("target", [b"http://a.com,evil.com/x", b"https://a.com:443,evil.com/"])
def test_a_comma_in_an_absolute_form_authority_is_400(target):
    assert refusal(head(b"GET " + target + b" HTTP/1.1", b"Host: a.com")) == 400


def test_two_origin_fields_are_400():
    """Which one would an upstream check, and which one would the proxy's C{allowed_origins}?"""
    request = head(b"GET / HTTP/1.1", b"Host: h", b"Origin: https://a.example", b"Origin: https://b.example")
    assert refusal(request) == 400


def test_one_origin_field_is_accepted():
    request = parseRequestHead(head(b"GET / HTTP/1.1", b"Host: h", b"Origin: https://a.example"))
    assert request.first(b"origin") == b"https://a.example"


# Connection, hop-by-hop headers and upgrades


def test_connection_cannot_strip_host_or_forwarded_for():
    request = parseRequestHead(
        head(
            b"GET / HTTP/1.1",
            b"Host: h",
            b"Connection: Host, X-Forwarded-For, X-Secret",
            b"X-Forwarded-For: 1.2.3.4",
            b"X-Secret: s",
        )
    )
    kept = endToEnd(request.headers, request.connectionTokens, frozenset())
    assert [name for name, _ in kept] == [b"Host", b"X-Forwarded-For"]


def test_hop_by_hop_headers_are_not_end_to_end():
    request = parseRequestHead(
        head(
            b"GET / HTTP/1.1",
            b"Host: h",
            b"Keep-Alive: 5",
            b"Proxy-Connection: x",
            b"TE: trailers",
            b"Trailer: t",
            b"Upgrade: h2c",
            b"Connection: close",
        )
    )
    assert endToEnd(request.headers, request.connectionTokens, frozenset()) == [(b"Host", b"h")]


def websocketHandshake(
    version: bytes = b"HTTP/1.1",
    upgrade: bytes = b"websocket",
    key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==",
    wsVersions: tuple[bytes, ...] = (b"13",),
) -> bytes:
    return head(
        b"GET /ws " + version,
        b"Host: h",
        b"Connection: Upgrade",
        b"Upgrade: " + upgrade,
        b"Sec-WebSocket-Key: " + key,
        *(b"Sec-WebSocket-Version: " + v for v in wsVersions),
    )


def test_a_websocket_upgrade_is_recognised():
    assert parseRequestHead(websocketHandshake()).upgrade == b"websocket"


def test_an_h2c_upgrade_is_not_an_upgrade():
    assert parseRequestHead(websocketHandshake(upgrade=b"h2c")).upgrade is None


def test_an_http10_upgrade_is_ignored():
    assert parseRequestHead(websocketHandshake(version=b"HTTP/1.0")).upgrade is None


@pytest.mark.parametrize("key", [b"short", b"!" * 24, b"dGhlIHNhbXBsZSBub25jZQ"])
def test_a_websocket_upgrade_with_an_invalid_key_is_400(key):
    assert refusal(websocketHandshake(key=key)) == 400


def test_a_websocket_upgrade_without_a_version_is_400():
    assert refusal(websocketHandshake(wsVersions=())) == 400


@pytest.mark.parametrize("versions", [(b"99",), (b"8",), (b"013",), (b"13, 8",), (b"13",) * 2, (b"",)])
def test_a_websocket_version_other_than_13_is_426_naming_13(versions):
    """RFC 6455 §4.4: the answer says which version the server speaks."""
    with pytest.raises(HTTPError) as raised:
        parseRequestHead(websocketHandshake(wsVersions=versions))
    error = raised.value
    assert (error.status, error.headers) == (426, ((b"Sec-WebSocket-Version", b"13"),))
    response = errorResponse(error.status, error.message, [(b"X-Extra", b"1")], headers=error.headers)
    assert response.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nSec-WebSocket-Version: 13\r\nX-Extra: 1\r\n" in response


def test_a_version_header_without_an_upgrade_is_not_checked():
    request = parseRequestHead(head(b"GET / HTTP/1.1", b"Host: h", b"Sec-WebSocket-Version: 99"))
    assert request.upgrade is None


def test_errors_and_error_responses_keep_their_old_signatures():
    error = HTTPError(400, "bad")
    assert (error.status, error.message, error.headers, str(error)) == (400, "bad", (), "400 bad")
    assert errorResponse(400, "bad", [(b"X-A", b"1")], False, True) == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 21\r\nX-A: 1\r\n\r\n"
    )


# Request headers sent upstream


def forwarded(*fields: bytes, trustedClient: bool = False, underscores: bool = False) -> list[tuple[bytes, bytes]]:
    """What L{forwardedRequestHeaders} sends on of a GET with C{fields} after its Host."""
    request = parseRequestHead(head(b"GET / HTTP/1.1", b"Host: h", *fields))
    return forwardedRequestHeaders(request, trustedClient=trustedClient, underscores=underscores)


@pytest.mark.parametrize("name", [b"X_Forwarded_For", b"X-Forwarded_Proto", b"X_Forwarded_Host", b"x_real_ip"])
def test_a_name_with_an_underscore_is_dropped_unless_underscores_are_allowed(name):
    field = name + b": 1.2.3.4"
    assert forwarded(field, b"Accept: */*") == [(b"Accept", b"*/*")]
    assert forwarded(field, b"Accept: */*", trustedClient=True) == [(b"Accept", b"*/*")]
    assert forwarded(field, b"Accept: */*", underscores=True) == [(name, b"1.2.3.4"), (b"Accept", b"*/*")]


@pytest.mark.parametrize(
    "name",
    [
        b"Forwarded",
        b"X-Forwarded-Port",
        b"X-Forwarded-Prefix",
        b"X-Client-IP",
        b"True-Client-IP",
        b"X-Original-URL",
        b"X-Rewrite-URL",
        b"x-original-url",
    ],
)
def test_address_and_routing_claims_are_kept_from_a_trusted_client_only(name):
    field = name + b": for=1.2.3.4"
    assert forwarded(field, b"Accept: */*") == [(b"Accept", b"*/*")]
    assert forwarded(field, b"Accept: */*", trustedClient=True) == [(name, b"for=1.2.3.4"), (b"Accept", b"*/*")]


@pytest.mark.parametrize("trustedClient", [False, True])
def test_proxy_authorization_is_never_forwarded(trustedClient):
    fields = (b"Proxy-Authorization: Basic dTpw", b"Authorization: Bearer t")
    assert forwarded(*fields, trustedClient=trustedClient, underscores=True) == [(b"Authorization", b"Bearer t")]


@pytest.mark.parametrize("trustedClient", [False, True])
def test_headers_the_proxy_writes_are_never_forwarded(trustedClient):
    fields = (
        b"X-Forwarded-For: 1.2.3.4",
        b"X-Forwarded-Proto: https",
        b"X-Forwarded-Host: evil",
        b"X-Real-IP: 1.2.3.4",
        b"Content-Length: 0",
        b"Cookie: c=1",
    )
    assert forwarded(*fields, trustedClient=trustedClient, underscores=True) == [(b"Cookie", b"c=1")]


def test_connection_cannot_strip_origin_or_the_websocket_handshake():
    kept = (
        b"Origin: https://site",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Protocol: chat",
        b"Sec-WebSocket-Extensions: permessage-deflate",
    )
    names = b"Origin, Sec-WebSocket-Key, Sec-WebSocket-Version, Sec-WebSocket-Protocol, Sec-WebSocket-Extensions"
    result = forwarded(b"Connection: " + names, *kept)
    assert result == [tuple(field.split(b": ", 1)) for field in kept]


def test_connection_cannot_strip_forwarded_from_a_trusted_client():
    assert forwarded(b"Connection: Forwarded", b"Forwarded: for=1.2.3.4", trustedClient=True) == [
        (b"Forwarded", b"for=1.2.3.4")
    ]


def test_hop_by_hop_and_connection_named_headers_are_dropped_and_the_order_kept():
    result = forwarded(
        b"Accept: */*",
        b"Keep-Alive: 5",
        b"X-Secret: s",
        b"Proxy-Connection: x",
        b"Cookie: a=1",
        b"TE: trailers",
        b"Trailer: t",
        b"Upgrade: h2c",
        b"Connection: close, X-Secret, x-other",
        b"X-Other: o",
        b"User-Agent: ua",
        b"Cookie: b=2",
    )
    assert result == [(b"Accept", b"*/*"), (b"Cookie", b"a=1"), (b"User-Agent", b"ua"), (b"Cookie", b"b=2")]


def test_names_keep_their_case_and_values_their_bytes():
    assert forwarded(b"x-CUSTOM: A\x01b", b"X-Custom: 2") == [(b"x-CUSTOM", b"A\x01b"), (b"X-Custom", b"2")]


# Limits


def test_an_over_long_request_line_is_414():
    assert refusal(head(b"GET /" + b"a" * 100 + b" HTTP/1.1", b"Host: h"), limits=Limits(maxRequestLine=64)) == 414


def test_too_many_header_fields_is_431():
    fields = [b"X-%d: v" % i for i in range(11)]
    assert refusal(post(*fields), limits=Limits(maxHeaders=10)) == 431


def test_an_over_large_header_section_is_431():
    assert refusal(post(b"X-A: " + b"v" * 200), limits=Limits(maxHeaderSize=128)) == 431


def takeHead(data: bytes, limit: int) -> bytes | None:
    buffer = ReceiveBuffer()
    buffer.append(data)
    return buffer.takeHead(limit)


def test_a_head_ends_past_the_blank_line():
    data = head(b"GET / HTTP/1.1", b"Host: h") + b"next"
    buffer = ReceiveBuffer()
    buffer.append(data)
    assert buffer.takeHead(1000) == data[: -len(b"next")]
    assert buffer.takeAll() == b"next"


def test_an_incomplete_head_is_waited_for():
    assert takeHead(b"GET / HTTP/1.1\r\nHost: h\r\n\r", 1000) is None


def test_a_bare_lf_is_refused_before_the_head_is_complete():
    """A client cannot park a connection on a head that can never become valid."""
    with pytest.raises(HTTPError):
        takeHead(b"GET / HTTP/1.1\nHost: h\n", 1000)


def test_a_head_is_not_looked_for_past_the_limit():
    assert takeHead(b"GET / HTTP/1.1\r\nX: " + b"a" * 100 + b"\r\n\r\n", 64) is None


# Responses: the same strictness, as 502


@pytest.mark.parametrize(
    "data",
    [
        head(b"HTTP/1.1 200 OK", b"Content-Length: 2", b"Transfer-Encoding: chunked"),
        head(b"HTTP/1.1 200 OK", b"Content-Length: 2", b"Content-Length: 3"),
        head(b"HTTP/1.1 200 OK", b"Content-Length: +2"),
        head(b"HTTP/1.1 200 OK", b"X-A: b", b" folded"),
        head(b"HTTP/1.1 200 OK", b"X-A : b"),
        head(b"HTTP/1.1 200 OK", b"X-A: a\x00b"),
        head(b"HTTP/1.1 200 OK", b"Content_Length: 2"),
        head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip"),
        head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip, chunked"),
        head(b"HTTP/1.0 200 OK", b"Transfer-Encoding: chunked"),
        head(b"HTTP/1.1 2000 OK"),
        head(b"HTTP/2 200 OK"),
        head(b"ICY 200 OK"),
    ],
    ids=[
        "CL+TE",
        "differing-CL",
        "signed-CL",
        "obs-fold",
        "space-before-colon",
        "NUL",
        "look-alike",
        "gzip-only",
        "gzip-chunked",
        "TE-in-1.0",
        "four-digit-status",
        "HTTP/2",
        "ICY",
    ],
)
def test_a_malformed_or_ambiguous_response_is_502(data):
    assert responseRefusal(data) == 502


def test_a_chunked_response_is_framed_by_its_chunks():
    response = parseResponseHead(head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"), b"GET")
    assert (response.chunked, response.bodyLength, response.closeDelimited) == (True, None, False)


def test_a_bad_chunk_in_a_response_is_502():
    assert chunkRefusal(b"5\r\nhelloXX", status=502) == 502


# Chunked bodies


def test_a_chunked_body_is_decoded_and_what_follows_is_left_alone():
    assert decode(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nGET /next") == (b"hello world", b"GET /next")


def test_chunk_extensions_and_trailer_fields_are_dropped():
    assert decode(b'5;a=b ; c="d e"\r\nhello\r\n0\r\nX-T: t\r\n\r\n') == (b"hello", b"")


@pytest.mark.parametrize(
    "line",
    [b"0x5", b"+5", b"-5", b" 5", b"5 ", b"5\t", b"1" + b"0" * 16, b"", b"g", b"5;", b"5;a b", b"5;a="],
    ids=[
        "0x",
        "plus",
        "minus",
        "leading-SP",
        "trailing-SP",
        "trailing-HTAB",
        "17-digits",
        "empty",
        "not-hex",
        "empty-ext",
        "ext-SP-garbage",
        "ext-no-value",
    ],
)
def test_an_invalid_chunk_size_line_is_400(line):
    assert chunkRefusal(line + b"\r\nhello\r\n0\r\n\r\n") == 400


def test_a_16_digit_chunk_size_is_accepted():
    assert decode(b"0000000000000005\r\nhello\r\n0\r\n\r\n") == (b"hello", b"")


def test_a_missing_crlf_after_chunk_data_is_400():
    assert chunkRefusal(b"5\r\nhelloXX0\r\n\r\n") == 400


@pytest.mark.parametrize("byte", [bytes([b]) for b in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x5C, 0x7F]])
def test_a_control_character_or_backslash_in_a_chunk_extension_is_400(byte):
    """CVE-2022-24801 (GHSA-c2jg-hw38-jrqq): Twisted accepted these, LF included."""
    assert chunkRefusal(b"3; " + byte + b"\r\nabc\r\n") == 400


def test_an_over_long_chunk_size_line_is_400():
    assert chunkRefusal(b"3;" + b"a" * 4096 + b"\r\nabc\r\n") == 400


def test_a_chunk_size_line_that_never_ends_is_refused_after_4_kib():
    decoder = ChunkedDecoder()
    decoder.feed(b"3;" + b"a" * 4000)
    with pytest.raises(HTTPError):
        decoder.feed(b"a" * 100)


def test_chunk_extensions_may_not_outweigh_the_payload():
    """One-byte chunks each carrying a 4 KiB extension make the proxy work for nothing."""
    abusive = (b"1;e=" + b"x" * 4000 + b"\r\na\r\n") * 8 + b"0\r\n\r\n"
    assert chunkRefusal(abusive) == 400


def test_chunk_extensions_in_proportion_to_the_payload_are_accepted():
    signed = (b"400;chunk-signature=" + b"f" * 64 + b"\r\n" + b"a" * 1024 + b"\r\n") * 300 + b"0\r\n\r\n"
    assert decode(signed) == (b"a" * 1024 * 300, b"")


def test_an_invalid_trailer_field_is_400():
    assert chunkRefusal(b"0\r\nX-T : t\r\n\r\n") == 400


def test_a_chunked_body_fed_byte_by_byte_decodes_the_same():
    data = b"5;a=b\r\nhello\r\n6\r\n world\r\n0\r\nX-T: t\r\n\r\nrest"
    decoder = ChunkedDecoder()
    payload, rest = b"", None
    for i in range(len(data)):
        piece, rest = decoder.feed(data[i : i + 1])
        payload += piece
        if rest is not None:
            rest += data[i + 1 :]
            break
    assert (payload, rest) == (b"hello world", b"rest")


def test_a_length_decoder_stops_at_its_length():
    decoder = LengthDecoder(5)
    assert (decoder.feed(b"hel"), decoder.feed(b"loGET /")) == ((b"hel", None), (b"lo", b"GET /"))


# Twisted's request-smuggling fixes, their exact payloads


def test_cve_2020_10108_two_content_lengths():
    data = CRLF.join([b"GET /a HTTP/1.1", b"Content-Length: 56", b"Content-Length: 0", b"Host: host.invalid", b"", b""])
    assert refusal(data) == 400


def test_cve_2020_10109_content_length_and_chunked():
    data = CRLF.join(
        [b"GET /a HTTP/1.1", b"Transfer-Encoding: chunked", b"Content-Length: 0", b"Host: host.invalid", b"", b""]
    )
    assert refusal(data) == 400


@pytest.mark.parametrize("value", [b"+100", b"-100"])
def test_cve_2022_24801_signed_content_length(value):
    data = CRLF.join([b"GET /a HTTP/1.1", b"Content-Length: " + value, b"Host: host.invalid", b"", b""])
    assert refusal(data) == 400


@pytest.mark.parametrize(
    "body", [b"0x3\r\nabc\r\n", b"-3\r\nabc\r\n", b"3; \n\r\nabc\r\n"], ids=["0x", "negative", "LF-in-ext"]
)
def test_cve_2022_24801_chunk_sizes_and_extensions(body):
    assert chunkRefusal(body) == 400


@pytest.mark.parametrize(
    "field", [b"Content-Length: \x0b5", b"Content-Length: 5\x0c", b"Transfer-Encoding: \x0bchunked"]
)
def test_cve_2022_24801_only_space_and_tab_are_stripped_from_values(field):
    assert refusal(post(field)) == 400


# Properties: no input makes the parser do anything but parse or refuse

FAST = settings(max_examples=300, deadline=timedelta(milliseconds=500))
LIMITS = Limits(maxRequestLine=256, maxHeaderSize=1024, maxHeaders=20)
HEAD_LIMIT = LIMITS.maxRequestLine + LIMITS.maxHeaderSize

VALID = [
    post(b"Content-Length: 5"),
    post(b"Transfer-Encoding: gzip, chunked", b"X-A: b"),
    head(b"GET http://h:80/x?y HTTP/1.1", b"Host: other", b"Connection: keep-alive"),
    websocketHandshake(),
    head(b"OPTIONS * HTTP/1.0", b"X-B: \x01c"),
]
INTERESTING = st.sampled_from(list(b'\x00\r\n\t :;,"\\\x01\x7f\x80\xff0aA-_/#?@'))


def parseOrRefuse(data: bytes):
    """The receive buffer then parseRequestHead, as the request cycle uses them; the head or the error."""
    try:
        head = takeHead(data, HEAD_LIMIT)
        if head is not None:
            assert len(head) <= HEAD_LIMIT + 4, "never reads past the limit"
        return parseRequestHead(head, LIMITS) if head is not None else None
    except HTTPError as e:
        assert 400 <= e.status < 600
        return e


@FAST
@given(st.binary(max_size=2048))
def test_any_bytes_parse_or_are_refused(data):
    parseOrRefuse(data)


@st.composite
def mutatedRequests(draw):
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "replace", "delete"]))
        if action == "insert":
            data[position:position] = bytes([draw(INTERESTING)])
        elif position < len(data):
            if action == "replace":
                data[position] = draw(INTERESTING)
            else:
                del data[position]
    return bytes(data)


@FAST
@given(mutatedRequests())
def test_mutated_requests_parse_unambiguously_or_are_refused(data):
    result = parseOrRefuse(data)
    if result is None or isinstance(result, HTTPError):
        return
    fields = result.fields
    assert not (b"content-length" in fields and b"transfer-encoding" in fields)
    assert len(set(map(int, fields.get(b"content-length", [b"0"])))) == 1
    assert len(fields.get(b"host", [])) <= 1
    assert result.chunked == (result.bodyLength is None)


def encodeChunks(pieces: list[bytes], extension: bytes) -> bytes:
    return b"".join(b"%x%b\r\n%b\r\n" % (len(p), extension, p) for p in pieces if p) + b"0\r\n\r\n"


@FAST
@given(
    st.lists(st.binary(max_size=300), max_size=8),
    st.sampled_from([b"", b";a", b";a=b", b' ; a="q \\" x"']),
    st.binary(max_size=50),
    st.lists(st.integers(1, 64), max_size=30),
)
def test_a_chunked_body_split_anywhere_yields_its_payload_and_nothing_beyond(pieces, extension, after, cuts):
    data = encodeChunks(pieces, extension) + after
    decoder, payload, rest, position = ChunkedDecoder(), b"", None, 0
    for size in [*cuts, len(data)]:
        piece, rest = decoder.feed(data[position : position + size])
        payload, position = payload + piece, position + size
        if rest is not None or position >= len(data):
            break
    assert payload == b"".join(pieces)
    assert rest + data[position:] == after


@FAST
@given(st.binary(max_size=6000), st.lists(st.integers(1, 2000), max_size=10))
def test_any_bytes_fed_to_the_chunked_decoder_decode_or_are_refused_within_its_limits(data, cuts):
    decoder, position, payload = ChunkedDecoder(), 0, 0
    try:
        for size in [*cuts, len(data)]:
            piece, rest = decoder.feed(data[position : position + size])
            position += size
            payload += len(piece)
            assert payload <= position
            if rest is not None:
                break
    except HTTPError as e:
        assert e.status == 400


@FAST
@given(st.integers(0, 1000), st.binary(max_size=2000), st.lists(st.integers(1, 300), max_size=10))
def test_a_length_decoder_never_consumes_beyond_its_length(length, data, cuts):
    decoder, payload, rest, position = LengthDecoder(length), b"", None, 0
    for size in [*cuts, len(data)]:
        if decoder.done:
            break
        piece, rest = decoder.feed(data[position : position + size])
        payload, position = payload + piece, position + size
    assert payload == data[:length]
    if rest is not None:
        assert rest + data[position:] == data[length:]
