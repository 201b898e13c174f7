"""
nginx variables in configuration values: compiling (names, C{${}}, captures,
the errors nginx makes a configuration fail with) and expanding against
requests parsed by the proxy's own parser.  Where nginx's behaviour is not
obvious, C{test_variables_nginx} checks the same cases against a real nginx.
"""

from __future__ import annotations

import re

import pytest

from wsproxy.http import parseRequestHead
from wsproxy.variables import (
    PREFIXES,
    VARIABLES,
    RequestContext,
    VariableError,
    compileTemplate,
    headerValueOK,
)


def context(
    head: bytes = b"GET /p?a=1 HTTP/1.1\r\nHost: example.com\r\n",
    *,
    uri: bytes | None = None,
    captures: tuple[bytes | None, ...] = (),
    underscores: bool = False,
    **overrides: object,
) -> RequestContext:
    """A context for the request C{head} (without its blank line), as the request path would build it."""
    request = parseRequestHead(head + b"\r\n")
    path, _, args = request.path.partition(b"?")
    arguments = {
        "clientAddress": "192.0.2.7",
        "clientPort": 51234,
        "serverPort": 8443,
        "scheme": b"https",
        "serverName": b"proxy.example",
        "uri": path if uri is None else uri,
        "args": args,
        "forwardedFor": b"198.51.100.1, 192.0.2.7",
    }
    arguments.update(overrides)
    return RequestContext(request, captures=captures, underscores=underscores, **arguments)  # type: ignore[arg-type]


def expand(text: str, ctx: RequestContext | None = None) -> bytes:
    return compileTemplate(text).expand(ctx or context())


FULL = (
    b"POST http://Example.COM.:8080/a/b?x=1&y=%20 HTTP/1.1\r\nHost: ignored.example:81\r\n"
    b"Content-Length: 3\r\nContent-Type: text/plain\r\n"
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("host", b"example.com"),
        ("http_host", b"ignored.example:81"),
        ("remote_addr", b"192.0.2.7"),
        ("remote_port", b"51234"),
        ("scheme", b"https"),
        ("server_name", b"proxy.example"),
        ("server_port", b"8443"),
        ("request_uri", b"/a/b?x=1&y=%20"),
        ("uri", b"/a/b"),
        ("document_uri", b"/a/b"),
        ("args", b"x=1&y=%20"),
        ("query_string", b"x=1&y=%20"),
        ("is_args", b"?"),
        ("request_method", b"POST"),
        ("content_length", b"3"),
        ("content_type", b"text/plain"),
        ("proxy_add_x_forwarded_for", b"198.51.100.1, 192.0.2.7"),
    ],
)
def test_every_fixed_variable(name: str, expected: bytes) -> None:
    """The host of an absolute-form target wins over the Host header, as in nginx."""
    assert expand("$" + name, context(FULL)) == expected


def test_the_fixed_names_are_the_documented_ones() -> None:
    assert VARIABLES == {
        "host",
        "http_host",
        "remote_addr",
        "remote_port",
        "scheme",
        "server_name",
        "server_port",
        "request_uri",
        "uri",
        "document_uri",
        "args",
        "query_string",
        "is_args",
        "request_id",
        "request_method",
        "content_length",
        "content_type",
        "proxy_add_x_forwarded_for",
    }
    assert PREFIXES == ("http_", "arg_", "cookie_")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"Example.COM", b"example.com"),
        (b"example.com:8080", b"example.com"),
        (b"example.com.", b"example.com"),
        (b"EXAMPLE.com.:80", b"example.com"),
        (b"[::1]:8443", b"[::1]"),
        (b"[2001:DB8::1]", b"[2001:db8::1]"),
        (b"192.0.2.1:80", b"192.0.2.1"),
    ],
)
def test_host_is_lowercased_without_port_and_trailing_dot(host: bytes, expected: bytes) -> None:
    ctx = context(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n")
    assert expand("$host", ctx) == expected
    assert expand("$http_host", ctx) == host


def test_host_without_a_host_is_the_server_name() -> None:
    ctx = context(b"GET / HTTP/1.0\r\n")
    assert expand("$host|$http_host", ctx) == b"proxy.example|"


def test_no_query() -> None:
    ctx = context(b"GET /p HTTP/1.1\r\nHost: h\r\n")
    assert expand("[$args][$is_args][$arg_a][$request_uri]", ctx) == b"[][][][/p]"


def test_an_empty_query_has_no_question_mark() -> None:
    """nginx's C{$is_args} is about the arguments, not the C{?}."""
    ctx = context(b"GET /p? HTTP/1.1\r\nHost: h\r\n")
    assert expand("$uri$is_args$args|$request_uri", ctx) == b"/p|/p?"


def test_ports_that_are_not_there_are_empty() -> None:
    """As nginx says for a UNIX socket: no port, nothing."""
    assert expand("[$remote_port][$server_port]", context(clientPort=0, serverPort=0)) == b"[][]"


def test_content_length_is_empty_without_one() -> None:
    chunked = context(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n")
    assert expand("[$content_length][$content_type]", chunked) == b"[][]"


def test_braces_and_text_around_variables() -> None:
    template = compileTemplate("https://${host}x$request_uri${arg_a}b")
    assert template.expand(context()) == b"https://example.comx/p?a=11b"
    assert template.variables == ("host", "request_uri", "arg_a")
    assert not template.isConstant


def test_a_name_ends_at_the_first_character_that_cannot_be_in_one() -> None:
    assert (
        expand("$host-$host.$host/$host:$host", context())
        == b"example.com-example.com.example.com/example.com:example.com"
    )


def test_names_are_case_insensitive() -> None:
    template = compileTemplate("$HOST|${Arg_A}|$Http_Host")
    assert template.expand(context()) == b"example.com|1|example.com"
    assert template.variables == ("host", "arg_a", "http_host")


def test_each_name_is_reported_once() -> None:
    assert compileTemplate("$host$uri$host$1$1").variables == ("host", "uri", "1")


def test_captures() -> None:
    ctx = context(captures=(b"one", None, b"three"))
    assert expand("[$1][$2][$3][$4][$9]", ctx) == b"[one][][three][][]"


def test_a_capture_is_one_digit() -> None:
    """C{$12} is capture 1 and then the text C{2}, as in nginx."""
    assert expand("$12", context(captures=(b"a",) * 12)) == b"a2"


def test_captures_without_a_match_are_empty() -> None:
    assert expand("<$1>", context()) == b"<>"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("$foo", "unknown variable $foo"),
        ("x/$remote_adr/y", "unknown variable $remote_adr"),
        ("$ho-st", "unknown variable $ho"),
        ("${Foo}", "unknown variable $foo"),
        ("$0", "unknown variable $0"),
        ("${1}", "unknown variable $1"),
        ("$proxy_host", "unknown variable $proxy_host"),
        ("a$", "invalid variable name"),
        ("$$", "invalid variable name"),
        ("a $ b", "invalid variable name"),
        ("${}", "invalid variable name"),
        ("${host", "closing bracket of ${host is missing"),
        ("${ho-st}", "closing bracket of ${ho is missing"),
        ("$arg_", "names nothing after 'arg_'"),
        ("$cookie_", "names nothing after 'cookie_'"),
        ("$http_", "names nothing after 'http_'"),
        ("caf\u00e9", "'\u00e9'"),
        ("a\tb", "'\\t'"),
        ("a\r\nX-Evil: 1", "'\\r'"),
        ("a\x00", "'\\x00'"),
        ("a\x7f", "'\\x7f'"),
    ],
)
def test_compile_errors(text: str, message: str) -> None:
    with pytest.raises(VariableError) as raised:
        compileTemplate(text)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_variable_error_is_a_value_error() -> None:
    """A configuration loader that catches C{ValueError} reports it."""
    assert issubclass(VariableError, ValueError)


@pytest.mark.parametrize("text", ["", "plain text", "301 https://example.com/", "a{b}c%20"])
def test_constants_expand_to_the_same_object(text: str) -> None:
    template = compileTemplate(text)
    assert template.isConstant
    assert template.variables == ()
    first = template.expand(context())
    assert first == text.encode()
    assert template.expand(context(b"GET /other HTTP/1.1\r\nHost: x\r\n")) is first


def test_request_id_is_stable_within_a_request_and_differs_across_requests() -> None:
    template = compileTemplate("$request_id")
    ctx = context()
    first = template.expand(ctx)
    assert re.fullmatch(rb"[0-9a-f]{32}", first)
    assert template.expand(ctx) == first
    assert compileTemplate("${request_id}-$request_id").expand(ctx) == first + b"-" + first
    others = {template.expand(context()) for _ in range(20)}
    assert first not in others and len(others) == 20


def test_request_id_is_made_only_when_asked_for() -> None:
    ctx = context()
    assert ctx._requestId is None
    expand("$host$request_uri", ctx)
    assert ctx._requestId is None
    assert ctx.requestId == expand("$request_id", ctx)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", b"[][]"),
        (b"b=2", b"[][2]"),
        (b"a=", b"[][]"),
        (b"a", b"[][]"),
        (b"a&b=1", b"[][1]"),
        (b"a=1&a=2", b"[1][]"),
        (b"b=2&a=1", b"[1][2]"),
        (b"A=1", b"[1][]"),
        (b"xa=1&a=2", b"[2][]"),
        (b"ba=1", b"[][]"),
        (b"a=b=c&b=", b"[b=c][]"),
        (b"a=%20+x&b=%26", b"[%20+x][%26]"),
        (b"&&a=1&", b"[1][]"),
        (b"a;b=1", b"[][]"),
        (b"c=1&a=2", b"[2][]"),
    ],
)
def test_arguments(query: bytes, expected: bytes) -> None:
    """nginx's C{ngx_http_arg}: the first C{NAME=}, raw, the name case-insensitive; C{;} separates nothing."""
    ctx = context(b"GET /p?" + query + b" HTTP/1.1\r\nHost: h\r\n")
    assert expand("[$arg_a][$arg_b]", ctx) == expected


@pytest.mark.parametrize(
    ("cookies", "expected"),
    [
        ((), b"[][]"),
        ((b"a=1",), b"[1][]"),
        ((b"a=1; b=2",), b"[1][2]"),
        ((b"a=1;b=2",), b"[1][2]"),
        ((b"b=2; a=1",), b"[1][2]"),
        ((b"a = 1 ; b= 2",), b"[1 ][2]"),
        ((b"a=",), b"[][]"),
        ((b"A=1",), b"[1][]"),
        ((b"aa=1; a=2",), b"[2][]"),
        ((b"a=1,b=2",), b"[1,b=2][2]"),
        ((b"x=1, a=2",), b"[2][]"),
        ((b'a="q v"; b',), b'["q v"][]'),
        ((b"a=1", b"b=2"), b"[1][2]"),
        ((b"b=3", b"a=1; b=2"), b"[1][3]"),
        ((b"a=1; a=2",), b"[1][]"),
        ((b"b; a=1",), b"[1][]"),
        # nginx's quirk: once the name is found without "=", the pair after it is skipped too.
        ((b"a; a=1",), b"[][]"),
        ((b"a;a=1; b=2",), b"[][2]"),
    ],
)
def test_cookies(cookies: tuple[bytes, ...], expected: bytes) -> None:
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"Cookie: " + c + b"\r\n" for c in cookies)
    assert expand("[$cookie_a][$cookie_b]", context(head)) == expected


def test_headers_by_name_with_dashes_and_any_case() -> None:
    ctx = context(b"GET / HTTP/1.1\r\nHost: h\r\nx-request-ID: abc\r\nAccept-Language: de\r\n")
    assert (
        expand("$http_x_request_id|$HTTP_X_REQUEST_ID|$http_accept_language|[$http_missing]", ctx) == b"abc|abc|de|[]"
    )


def test_repeated_headers_are_joined_as_nginx_joins_them() -> None:
    ctx = context(
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Y: 1\r\nCookie: a=1\r\nx-y: 2\r\nCookie: b=2\r\nX-Forwarded-For: 1.1.1.1\r\n"
        b"X-Forwarded-For: 2.2.2.2, 3.3.3.3\r\n"
    )
    assert expand("$http_x_y|$http_cookie|$http_x_forwarded_for", ctx) == (b"1, 2|a=1; b=2|1.1.1.1, 2.2.2.2, 3.3.3.3")


def test_header_names_with_underscores_are_invisible_by_default() -> None:
    """nginx ignores them unless C{underscores_in_headers on}: C{X_Real_IP} cannot pose as C{X-Real-IP}."""
    head = b"GET / HTTP/1.1\r\nHost: h\r\nX_Real_IP: 6.6.6.6\r\nX-Real-IP: 1.2.3.4\r\nMy_Header: a\r\n"
    assert expand("$http_x_real_ip|[$http_my_header]", context(head)) == b"1.2.3.4|[]"


def test_header_names_with_underscores_count_when_allowed() -> None:
    head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Y: 1\r\nx_y: 2\r\nX-y: 3\r\nMy_Header: a\r\n"
    assert expand("$http_x_y|$http_my_header", context(head, underscores=True)) == b"1, 2, 3|a"


def test_extra_names() -> None:
    template = compileTemplate("$status $Upstream_Addr", extraNames=("status", "upstream_addr"))
    assert template.variables == ("status", "upstream_addr")
    ctx = context()
    assert template.expand(ctx) == b" "
    ctx.extra = {"status": b"200"}
    assert template.expand(ctx) == b"200 "
    ctx.extra["upstream_addr"] = b"127.0.0.1:8000"
    assert template.expand(ctx) == b"200 127.0.0.1:8000"


def test_extra_names_are_only_known_where_allowed() -> None:
    with pytest.raises(VariableError, match=r"unknown variable \$status"):
        compileTemplate("$status")


@pytest.mark.parametrize("name", ["host", "request_id", "http_x", "arg_a", "cookie_c", "bad-name", ""])
def test_extra_names_cannot_redefine_built_in_ones(name: str) -> None:
    with pytest.raises(VariableError):
        compileTemplate("x", extraNames=(name,))


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"", True),
        (b"plain value; q=0.5", True),
        (b"caf\xc3\xa9\t", True),
        (b"a\r\nX-Evil: 1", False),
        (b"a\nb", False),
        (b"a\rb", False),
        (b"a\x00b", False),
    ],
)
def test_header_value_ok(value: bytes, ok: bool) -> None:
    assert headerValueOK(value) is ok


def test_client_values_cannot_break_a_header_but_a_decoded_uri_can() -> None:
    """
    Header values and the target come through the parser, which refuses
    CR, LF and NUL; C{$uri} is what the caller made of the path, so the
    caller must check the expansion.
    """
    ctx = context(
        b"GET /a%0D%0AX:%201?q=%0D%0A HTTP/1.1\r\nHost: h\r\nX-Y: v\r\nCookie: c=%0A\r\n",
        uri=b"/a\r\nX: 1",
    )
    safe = expand("$http_x_y $cookie_c $arg_q $args $request_uri $host", ctx)
    assert headerValueOK(safe)
    assert not headerValueOK(expand("$uri", ctx))
