"""
L{wsproxy.matching} rule by rule: C{$host}, server names, location
arguments, location precedence and auto-redirect, C{$uri} normalisation,
escaping and C{proxy_pass} URI replacement.  C{$uri} is also checked
against a line-by-line port of nginx's C{ngx_http_parse_complex_uri}, and
the compiled look-ups against plain linear scans, on generated input;
C{tests/test_matching_nginx.py} checks the same rules against nginx itself.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from wsproxy.http import HTTPError
from wsproxy.matching import (
    LocationMatch,
    Locations,
    RoutingError,
    ServerNames,
    escapeURI,
    isComplexPath,
    isQuotedPath,
    normalizeHost,
    normalizePath,
    parseLocationMatch,
    replaceURI,
    splitTarget,
)

# -- normalizeHost ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"example.com", b"example.com"),
        (b"Example.COM", b"example.com"),
        (b"example.com.", b"example.com"),
        (b"example.com:8080", b"example.com"),
        (b"EXAMPLE.com.:80", b"example.com"),
        (b"example.com:", b"example.com"),
        (b"[::1]", b"[::1]"),
        (b"[::1]:80", b"[::1]"),
        (b"[::FFFF:1.2.3.4]:443", b"[::ffff:1.2.3.4]"),
        (b"[::1].", b"[::1]"),
        (b"127.0.0.1:80", b"127.0.0.1"),
        (b".example.com", b".example.com"),
        (b"[::1]x:80", b"[::1]"),
        (b"_", b"_"),
        (b"", b""),
    ],
)
def test_normalize_host_is_nginxs_host_variable(host, expected):
    assert normalizeHost(host) == expected


@pytest.mark.parametrize("host", [b"a..b", b"example.com..", b"a:1..2", b":80", b".", b".:80", b"a/b", b"a\0b"])
def test_normalize_host_refuses_what_nginx_refuses(host):
    with pytest.raises(HTTPError) as raised:
        normalizeHost(host)
    assert raised.value.status == 400


# -- ServerNames --------------------------------------------------------------------------------


def names(*entries: list[str], default: str = "default") -> ServerNames[str]:
    """Server names whose values are C{"0"}, C{"1"}... in file order."""
    return ServerNames([(entry, str(index)) for index, entry in enumerate(entries)], default)


def test_exact_names_are_lowercased():
    servers = names(["Example.COM", "www.example.com"], ["other.test"])
    assert servers.lookup(b"example.com") == "0"
    assert servers.lookup(b"www.example.com") == "0"
    assert servers.lookup(b"other.test") == "1"
    assert servers.lookup(b"example.co") == "default"
    assert servers.lookup(b"xexample.com") == "default"


def test_the_longest_leading_wildcard_wins():
    servers = names(["*.example.com"], ["*.a.example.com"], ["*.com"])
    assert servers.lookup(b"b.example.com") == "0"
    assert servers.lookup(b"x.b.example.com") == "0"
    assert servers.lookup(b"a.example.com") == "0"
    assert servers.lookup(b"x.a.example.com") == "1"
    assert servers.lookup(b"y.x.a.example.com") == "1"
    assert servers.lookup(b"example.com") == "2", "*.example.com needs one more label"
    assert servers.lookup(b"com") == "default"
    assert servers.lookup(b"example.comx") == "default"


def test_a_leading_dot_is_the_name_and_its_wildcard():
    servers = names([".example.org"], ["*.org"])
    assert servers.lookup(b"example.org") == "0"
    assert servers.lookup(b"www.example.org") == "0"
    assert servers.lookup(b"a.b.example.org") == "0"
    assert servers.lookup(b"other.org") == "1"
    assert servers.lookup(b"xexample.org") == "1"


def test_the_longest_trailing_wildcard_wins():
    servers = names(["www.example.*"], ["www.*"])
    assert servers.lookup(b"www.example.com") == "0"
    assert servers.lookup(b"www.example.co.uk") == "0"
    assert servers.lookup(b"www.example") == "1", "www.example.* needs one more label"
    assert servers.lookup(b"www.other.net") == "1"
    assert servers.lookup(b"www") == "default"
    assert servers.lookup(b"wwwx.example.com") == "default"


def test_precedence_exact_then_leading_then_trailing_then_regex():
    servers = names(["~^w"], ["www.*"], ["*.example.com"], ["www.example.com"])
    assert servers.lookup(b"www.example.com") == "3"
    assert servers.lookup(b"www.x.example.com") == "2"
    assert servers.lookup(b"www.example.net") == "1"
    assert servers.lookup(b"www") == "0"


def test_regexes_are_tried_in_file_order_and_caselessly():
    servers = names(["~^api\\d+\\."], ["~^API"], ["~^(www\\.)?regex\\.test$"])
    assert servers.lookup(b"api1.example") == "0"
    assert servers.lookup(b"apix") == "1"
    assert servers.lookup(b"regex.test") == "2"
    assert servers.lookup(b"www.regex.test") == "2"
    assert servers.lookup(b"wwww.regex.test") == "default"


def test_pcre_named_groups_are_accepted():
    servers = names(["~^(?<sub>[a-z]+)\\.named\\.test$"], ["~^\\(?<x>"])
    assert servers.lookup(b"zz.named.test") == "0"
    assert servers.lookup(b"1.named.test") == "default"
    assert servers.lookup(b"(<x>") == "1", "an escaped parenthesis is not a group"


def test_the_empty_name_is_a_request_without_host():
    servers = names(["~.*"], ["", "_"])
    assert servers.lookup(b"") == "1"
    assert servers.lookup(b"_") == "1"
    assert servers.lookup(b"anything") == "0"
    assert names(["~.*"]).lookup(b"") == "default", "regexes are not tried without a host"


def test_values_may_be_none():
    servers: ServerNames[str | None] = ServerNames([(["a"], None), (["*.b"], None), (["c.*"], None)], "default")
    assert [servers.lookup(host) for host in (b"a", b"x.b", b"c.x", b"d")] == [None, None, None, "default"]


def test_a_name_repeated_in_one_block_is_fine():
    servers = names(["a", "A", ".b", "b", "*.b", "~x", "~x"])
    assert servers.lookup(b"a") == servers.lookup(b"b") == servers.lookup(b"y.b") == servers.lookup(b"x") == "0"


@pytest.mark.parametrize(
    "name",
    ["*", "*.", "w*w.example.com", "*.example.*", "example..com", "*example.com", "example.*com", ".a.*", "a\0b"],
)
def test_invalid_server_names(name):
    with pytest.raises(RoutingError, match="invalid server name or wildcard") as raised:
        names([name])
    assert name in str(raised.value)


@pytest.mark.parametrize("name", ["~(", "~[a-", "~"])
def test_invalid_server_name_regexes(name):
    with pytest.raises(RoutingError, match="regular expression") as raised:
        names([name])
    assert f'"{name}"' in str(raised.value)


@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        ("example.com", "example.com", '"example.com"'),
        ("Example.com", "example.COM", '"example.COM"'),
        ("example.com", ".example.com", '"example.com" and ".example.com"'),
        (".example.com", "example.com", '".example.com" and "example.com"'),
        ("*.example.com", ".example.com", '"*.example.com" and ".example.com"'),
        ("*.example.com", "*.example.com", '"*.example.com"'),
        ("www.example.*", "www.example.*", '"www.example.*"'),
        ("~^a$", "~^a$", '"~^a$"'),
        ("", "", '""'),
    ],
)
def test_a_name_in_two_blocks_is_refused(first, second, named):
    with pytest.raises(RoutingError, match="conflicting server names") as raised:
        names([first], ["other"], [second])
    assert named in str(raised.value)


def test_names_that_only_look_alike_coexist():
    servers = names(["example.com"], ["*.example.com"], ["example.*"], ["~^example\\.com$"])
    assert [servers.lookup(host) for host in (b"example.com", b"a.example.com", b"example.net")] == ["0", "1", "2"]


# -- parseLocationMatch -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("= /p", ("=", "/p")),
        ("^~ /p", ("^~", "/p")),
        ("~ \\.php$", ("~", "\\.php$")),
        ("~* \\.(png|jpg)$", ("~*", "\\.(png|jpg)$")),
        ("/p", ("", "/p")),
        ("/", ("", "/")),
        ("@name", ("@", "name")),
        ("=/p", ("=", "/p")),
        ("^~/p", ("^~", "/p")),
        ("~re", ("~", "re")),
        ("~*re", ("~*", "re")),
        ("/a b/", ("", "/a b/")),
        ("~ a b", ("~", "a b")),
        ("~~ x", ("~", "~ x")),
        ("=  /p", ("=", "/p")),
    ],
)
def test_parse_location_match(text, expected):
    assert parseLocationMatch(text) == expected


@pytest.mark.parametrize("text", ["", "p", "= p", "^~ p", "=", "~", "~*", "@", "== /p", "^ /p", " /p", "*.php"])
def test_parse_location_match_refuses(text):
    with pytest.raises(RoutingError) as raised:
        parseLocationMatch(text)
    assert "\n" not in str(raised.value)


# -- Locations ----------------------------------------------------------------------------------


def locations(*texts: str, proxied: tuple[str, ...] = ()) -> Locations[str]:
    """Locations whose value is their own text; those in C{proxied} redirect like nginx's proxied ones."""
    return Locations([(text, text, text in proxied and parseLocationMatch(text)[1].endswith("/")) for text in texts])


def picked(table: Locations[str], path: bytes) -> str | None:
    match = table.lookup(path)
    return None if match is None else match.value


def test_the_longest_prefix_wins():
    table = locations("/", "/docs/", "/docs/api/", "/a", "/ab", "/abc")
    assert picked(table, b"/") == "/"
    assert picked(table, b"/docs") == "/"
    assert picked(table, b"/docs/") == "/docs/"
    assert picked(table, b"/docs/api") == "/docs/"
    assert picked(table, b"/docs/api/v1") == "/docs/api/"
    assert picked(table, b"/abcd") == "/abc"
    assert picked(table, b"/abd") == "/ab"
    assert picked(table, b"/b") == "/"
    match = table.lookup(b"/docs/api/v1")
    assert match == LocationMatch("/docs/api/", "", b"/docs/api/", ())


def test_no_location_matches():
    table = locations("/only/", "= /exact", "~ ^/re")
    assert table.lookup(b"/") is None
    assert table.lookup(b"/only") is None
    assert table.lookup(b"/exact/") is None


def test_an_exact_location_wins_at_once():
    table = locations("/", "= /exact", "/exact", "~ exact", "^~ /ex")
    assert table.lookup(b"/exact") == LocationMatch("= /exact", "=", b"/exact", ())
    assert picked(table, b"/exact/") == "~ exact", "an exact location is not a prefix"
    assert picked(table, b"/exactly") == "~ exact"
    assert picked(table, b"/ex") == "^~ /ex"


def test_regexes_win_over_prefixes_in_file_order():
    table = locations("/", "/docs/", "~ \\.php$", "~* \\.(png|jpg)$", "~ ^/docs/.*\\.php$")
    assert table.lookup(b"/docs/a.php") == LocationMatch("~ \\.php$", "~", None, ())
    assert picked(table, b"/a.PHP") == "/", "~ is case-sensitive"
    assert picked(table, b"/a.PNG") == "~* \\.(png|jpg)$"
    assert picked(table, b"/docs/a.txt") == "/docs/"


def test_a_caret_tilde_prefix_stops_regexes_only_when_it_is_the_longest():
    table = locations("/", "^~ /static/", "/static/php/", "~ \\.php$")
    assert picked(table, b"/static/a.php") == "^~ /static/"
    assert picked(table, b"/static/php/a.php") == "~ \\.php$", "the longest prefix is not ^~"
    assert table.lookup(b"/static/x") == LocationMatch("^~ /static/", "^~", b"/static/", ())


def test_regex_captures_are_kept():
    table = locations("~ ^/docs/(?<section>[a-z]+)/(\\d+)(/x)?$", "~* ^/(A)(b)?")
    assert table.lookup(b"/docs/guide/12").captures == (b"guide", b"12", None)
    assert table.lookup(b"/docs/guide/12/x").captures == (b"guide", b"12", b"/x")
    assert table.lookup(b"/aB").captures == (b"a", b"B")
    assert locations("/").lookup(b"/").captures == ()


def test_prefixes_are_case_sensitive_bytes():
    table = locations("/", "/CaseSensitive", "/caf\u00e9/")
    assert picked(table, b"/CaseSensitive/x") == "/CaseSensitive"
    assert picked(table, b"/casesensitive") == "/"
    assert table.lookup(b"/caf\xc3\xa9/menu") == LocationMatch("/caf\u00e9/", "", b"/caf\xc3\xa9/", ())


def test_named_locations_are_apart():
    table = locations("/", "@fallback")
    assert table.named("fallback") == "@fallback"
    assert table.named("@fallback") == "@fallback"
    assert table.named("other") is None
    assert picked(table, b"/fallback") == "/"
    assert picked(table, b"/@fallback") == "/"


def test_a_proxied_location_with_a_slash_redirects_the_path_without_it():
    table = locations("/", "/ws/", "~ ^/ws$", "/w", proxied=("/ws/",))
    assert table.lookup(b"/ws") == LocationMatch("/ws/", "", b"/ws/", (), redirectSlash=True)
    assert table.lookup(b"/ws/") == LocationMatch("/ws/", "", b"/ws/", ())
    assert picked(table, b"/wsx") == "/w"
    assert picked(table, b"/w") == "/w"


def test_no_redirect_without_auto_redirect():
    table = locations("/", "/ws/", "~ ^/ws$", "~ ^/re/$", proxied=("~ ^/re/$",))
    assert picked(table, b"/ws") == "~ ^/ws$"
    assert picked(table, b"/re") == "/", "a regex location never redirects"


def test_no_redirect_when_a_location_has_the_paths_own_name():
    table = locations("/", "/pre", "/pre/", "= /eq", "/eq/", proxied=("/pre/", "/eq/"))
    assert picked(table, b"/pre") == "/pre"
    assert picked(table, b"/eq") == "= /eq"
    assert table.lookup(b"/pre/").redirectSlash is False


def test_an_exact_proxied_location_redirects_too():
    table = locations("/", "= /exactws/", "^~ /nr/", proxied=("= /exactws/", "^~ /nr/"))
    assert table.lookup(b"/exactws") == LocationMatch("= /exactws/", "=", b"/exactws/", (), redirectSlash=True)
    assert table.lookup(b"/nr") == LocationMatch("^~ /nr/", "^~", b"/nr/", (), redirectSlash=True)
    assert picked(table, b"/exactws/x") == "/"


def test_an_exact_and_a_prefix_of_one_name_redirect_with_the_exact():
    table = locations("/", "/both/", "= /both/", proxied=("/both/",))
    assert table.lookup(b"/both") == LocationMatch("= /both/", "=", b"/both/", (), redirectSlash=True)


def test_a_location_match_is_frozen():
    match = locations("/").lookup(b"/")
    with pytest.raises(dataclasses.FrozenInstanceError):
        match.value = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        ("/p", "/p", '"/p"'),
        ("/p", "^~ /p", '"/p"'),
        ("^~ /p", "/p", '"/p"'),
        ("= /p", "=/p", '"/p"'),
        ("~ a", "~ a", '"a"'),
        ("~* a", "~*a", '"a"'),
        ("@n", "@n", '"@n"'),
    ],
)
def test_duplicate_locations_are_refused(first, second, named):
    with pytest.raises(RoutingError, match="duplicate location") as raised:
        locations("/x", first, second)
    assert named in str(raised.value)


def test_locations_that_only_look_alike_coexist():
    table = locations("= /p", "/p", "/p/", "~ a", "~* a", "/P", "@p")
    assert [picked(table, path) for path in (b"/p", b"/px", b"/p/", b"/a", b"/A", b"/P")] == [
        "= /p",
        "/p",
        "/p/",
        "~ a",
        "~* a",
        "/P",
    ]


@pytest.mark.parametrize("text", ["~ (", "~* [", "~ a{2,1}", "p", "= p"])
def test_invalid_locations_are_refused(text):
    with pytest.raises(RoutingError) as raised:
        locations(text)
    assert text in str(raised.value)


# -- normalizePath ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/", b"/"),
        (b"/a/b", b"/a/b"),
        (b"//a///b//", b"/a/b/"),
        (b"/a/./b/.", b"/a/b/"),
        (b"/a/b/..", b"/a/"),
        (b"/a/..", b"/"),
        (b"/a/../b", b"/b"),
        (b"/.", b"/"),
        (b"/./", b"/"),
        (b"/...", b"/..."),
        (b"/..a/a../.b", b"/..a/a../.b"),
        (b"/%41%62", b"/Ab"),
        (b"/%2e", b"/"),
        (b"/a/%2E%2e/b", b"/b"),
        (b"/a/.%2e/b", b"/b"),
        (b"/a%2Fb", b"/a/b"),
        (b"/a%2f..%2fb", b"/b"),
        (b"/%2F%2Fa", b"/a"),
        (b"/%25", b"/%"),
        (b"/%2541", b"/%41"),
        (b"/%23x", b"/#x"),
        (b"/%3F", b"/?"),
        (b"/..%3F", b"/..?"),
        (b"/.%23", b"/.#"),
        (b"/a%20b", b"/a b"),
        (b"/%c3%A9", b"/\xc3\xa9"),
        (b"/%0a%7f%ff", b"/\n\x7f\xff"),
        (b"/a+b", b"/a+b"),
    ],
)
def test_normalize_path_is_nginxs_uri(path, expected):
    assert normalizePath(path) == expected


@pytest.mark.parametrize(
    ("path", "why"),
    [
        (b"/..", "above the root"),
        (b"/../a", "above the root"),
        (b"/a/../..", "above the root"),
        (b"/%2e%2e", "above the root"),
        (b"/a/%2E%2E/%2e%2e/x", "above the root"),
        (b"/%2F..%2F..", "above the root"),
        (b"/./..", "above the root"),
        (b"/%00", "NUL"),
        (b"/a%00b", "NUL"),
        (b"/%", "bad %-escape"),
        (b"/a%", "bad %-escape"),
        (b"/%4", "bad %-escape"),
        (b"/%4g", "bad %-escape"),
        (b"/%g4", "bad %-escape"),
        (b"/%%41", "bad %-escape"),
        (b"", "start with /"),
        (b"a/b", "start with /"),
        (b"*", "start with /"),
    ],
)
def test_normalize_path_refuses(path, why):
    with pytest.raises(HTTPError, match=why) as raised:
        normalizePath(path)
    assert raised.value.status == 400


def test_a_simple_path_is_returned_as_it_is():
    path = b"/static/app.js"
    assert normalizePath(path) is path
    assert not isComplexPath(path)


@pytest.mark.parametrize(
    ("path", "complex_", "quoted"),
    [
        (b"/a/b.c", False, False),
        (b"/a.b/c.", False, False),
        (b"/a//b", True, False),
        (b"/a/.b", True, False),
        (b"/.", True, False),
        (b"/a%41", True, True),
        (b"/%", True, True),
    ],
)
def test_complex_and_quoted_paths(path, complex_, quoted):
    assert isComplexPath(path) is complex_
    assert isQuotedPath(path) is quoted


SL, DOT, PERCENT = ord("/"), ord("."), ord("%")


def nginxComplexURI(path: bytes) -> bytes | None:
    """
    A line-by-line port of nginx's C{ngx_http_parse_complex_uri} (merge_slashes
    on, a path without C{?} and C{#}): its states, its C{u -= 4} backtracking,
    and its re-reading of a decoded character in the state before the C{%}.
    C{None} where nginx answers 400.  (nginx: Copyright Igor Sysoev and
    Nginx, Inc., BSD-2-Clause; this is a re-implementation of its algorithm
    in Python for the test's cross-check, not its code.)
    """
    usual, slash, dot, dotDot, quoted, quotedSecond = range(6)
    out = bytearray()
    state = quotedState = usual
    decoded = 0
    position = 0

    def read() -> int:
        nonlocal position
        position += 1
        return path[position - 1] if position <= len(path) else -1

    def backToSlash() -> bool:
        u = len(out) - 4
        while u >= 0:
            if out[u] == SL:
                del out[u + 1 :]
                return True
            u -= 1
        return False

    ch = read()
    while position <= len(path):
        if state == quoted:
            if chr(ch) not in "0123456789abcdefABCDEF":
                return None
            decoded = int(chr(ch), 16)
            state = quotedSecond
            ch = read()
            continue
        if state == quotedSecond:
            if chr(ch) not in "0123456789abcdefABCDEF":
                return None
            ch = decoded * 16 + int(chr(ch), 16)
            if ch in (ord("%"), ord("#"), ord("?")):
                state = usual
                out.append(ch)
                ch = read()
            elif ch == 0:
                return None
            else:
                state = quotedState
            continue
        if ch == PERCENT:
            quotedState, state = state, quoted
        elif state == usual:
            out.append(ch)
            state = slash if ch == SL else usual
        elif state == slash:
            if ch == DOT:
                state = dot
                out.append(ch)
            elif ch != SL:
                state = usual
                out.append(ch)
        elif state == dot:
            if ch == SL:
                state = slash
                out.pop()
            elif ch == DOT:
                state = dotDot
                out.append(ch)
            else:
                state = usual
                out.append(ch)
        elif state == dotDot:
            if ch == SL:
                if not backToSlash():
                    return None
                state = slash
            else:
                state = usual
                out.append(ch)
        ch = read()
    if state in (quoted, quotedSecond):
        return None
    if state == dot:
        out.pop()
    elif state == dotDot and not backToSlash():
        return None
    return bytes(out)


PATH_PIECES = ["/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%25", "%3F", "%3f", "%23", "%00", "%", "%4", "%zz"]
PATH_PIECES += ["a", "b", "%41", "+", "~", "%c3%a9", ".a", "a.", "%2e%2e", "%2E."]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(PATH_PIECES), max_size=12))
def test_normalize_path_is_nginxs_state_machine(pieces):
    path = ("/" + "".join(pieces)).encode()
    expected = nginxComplexURI(path)
    if expected is None:
        with pytest.raises(HTTPError):
            normalizePath(path)
    else:
        assert normalizePath(path) == expected


def test_the_port_of_nginxs_state_machine_is_itself_right():
    """The reference above, on what nginx was seen to answer (C{test_matching_nginx.py})."""
    assert nginxComplexURI(b"/docs%2F..%2Fexact") == b"/exact"
    assert nginxComplexURI(b"/docs/..%3F") == b"/docs/..?"
    assert nginxComplexURI(b"/a/%2e%2e/%2E%2E/x") is None
    assert nginxComplexURI(b"/a//./b/..") == b"/a/"


# -- splitTarget, escapeURI, replaceURI ---------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/a", (b"/a", b"")),
        (b"/a?", (b"/a", b"")),
        (b"/a?x=1&y", (b"/a", b"x=1&y")),
        (b"/a?x?y", (b"/a", b"x?y")),
        (b"/a%3Fb?c", (b"/a%3Fb", b"c")),
        (b"/a#f", (b"/a", b"")),
        (b"/a?x#f?g", (b"/a", b"x")),
        (b"/a#f?x", (b"/a", b"")),
    ],
)
def test_split_target(target, expected):
    assert splitTarget(target) == expected


def test_escape_uri_escapes_nginxs_set():
    kept = b"ABCXYZabcxyz0189-._~!$&'()*+,;=:@/[]"
    assert escapeURI(kept) is kept
    assert escapeURI(b' "#%<>?\\^`{|}') == b"%20%22%23%25%3C%3E%3F%5C%5E%60%7B%7C%7D"
    assert escapeURI(b"\x00\x01\x1f\x7f\x80\xc3\xa9\xff") == b"%00%01%1F%7F%80%C3%A9%FF"
    assert escapeURI(b"/a b/c") == b"/a%20b/c"


@pytest.mark.parametrize(
    ("uri", "args", "prefix", "replacement", "quoted", "expected"),
    [
        (b"/p/x/y", b"", b"/p/", b"/new/", False, b"/new/x/y"),
        (b"/p/x", b"a=1", b"/p/", b"/new/", False, b"/new/x?a=1"),
        (b"/p/a b?#", b"q=%20", b"/p/", b"/new/", True, b"/new/a%20b%3F%23?q=%20"),
        (b"/p/a b", b"", b"/p/", b"/new/", False, b"/new/a b"),
        (b"/p/", b"", b"/p/", b"/", False, b"/"),
        (b"/qq/x", b"", b"/q", b"/r", False, b"/rq/x"),
        (b"/exact", b"x", b"/exact", b"/e", True, b"/e?x"),
        (b"/p/\xc3\xa9", b"", b"/p", b"", True, b"/%C3%A9"),
    ],
)
def test_replace_uri(uri, args, prefix, replacement, quoted, expected):
    assert replaceURI(uri, args, prefix, replacement, quoted) == expected


# -- the compiled look-ups against linear scans -------------------------------------------------

LABELS = ["a", "b", "c"]


def linearServerName(entries: list[tuple[list[str], int]], host: str) -> int:
    """nginx's precedence by scanning every name: exact, longest leading, longest trailing, first regex."""
    leading: list[tuple[int, int]] = []
    trailing: list[tuple[int, int]] = []
    for names_, value in entries:
        for name in names_:
            if name == host or (name.startswith(".") and name[1:] == host):
                return value
            if name.startswith(("*.", ".")):
                suffix = name.lstrip("*")
                if host.endswith(suffix) and len(host) > len(suffix):
                    leading.append((len(suffix), value))
            if name.endswith(".*") and host.startswith(name[:-1]) and len(host) > len(name) - 1:
                trailing.append((len(name), value))
    for found in (leading, trailing):
        if found:
            return max(found, key=lambda pair: pair[0])[1]
    return -1


serverNameStrategy = st.builds(
    lambda kind, labels: (
        {"exact": "", "leading": "*.", "dot": ".", "trailing": ""}[kind]
        + ".".join(labels)
        + (".*" if kind == "trailing" else "")
    ),
    st.sampled_from(["exact", "leading", "dot", "trailing"]),
    st.lists(st.sampled_from(LABELS), min_size=1, max_size=3),
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.lists(serverNameStrategy, min_size=1, max_size=3), min_size=1, max_size=5),
    st.lists(st.lists(st.sampled_from(LABELS), min_size=1, max_size=4), min_size=1, max_size=10),
)
def test_server_names_are_a_linear_scan_made_fast(blocks, hosts):
    entries = [(names_, index) for index, names_ in enumerate(blocks)]
    try:
        compiled = ServerNames(entries, -1)
    except RoutingError:
        assume(False)
    for labels in hosts:
        host = ".".join(labels)
        assert compiled.lookup(host.encode()) == linearServerName(entries, host), host


def linearLocation(entries: list[tuple[str, int, bool]], path: str) -> tuple[int, bool] | None:
    """nginx's location precedence by scanning every location."""
    parsed = [(parseLocationMatch(text), value, redirect) for text, value, redirect in entries]
    for (modifier, pattern), value, _ in parsed:
        if modifier == "=" and pattern == path:
            return value, False
    if not any(modifier in ("", "^~") and pattern == path for (modifier, pattern), _, _ in parsed):
        named = [
            (modifier, value, redirect) for (modifier, pattern), value, redirect in parsed if pattern == path + "/"
        ]
        named = [candidate for candidate in named if candidate[0] != "~"]
        if any(redirect for _, _, redirect in named):
            exact = [value for modifier, value, _ in named if modifier == "="]
            return (exact[0] if exact else named[0][1]), True
    prefixes = [
        (len(pattern), modifier, value)
        for (modifier, pattern), value, _ in parsed
        if modifier in ("", "^~") and path.startswith(pattern)
    ]
    longest = max(prefixes, default=None)
    if longest is not None and longest[1] == "^~":
        return longest[2], False
    for (modifier, pattern), value, _ in parsed:
        if modifier == "~" and path.startswith(pattern[1:]):
            return value, False
    return None if longest is None else (longest[2], False)


locationStrategy = st.builds(
    lambda modifier, segments, slash: modifier + "/" + "/".join(segments) + ("/" if slash else ""),
    st.sampled_from(["", "", "= ", "^~ ", "~ ^"]),
    st.lists(st.sampled_from(["a", "b", "ab"]), max_size=3),
    st.booleans(),
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(locationStrategy, st.booleans()), min_size=1, max_size=8),
    st.lists(st.lists(st.sampled_from(["a", "b", "ab", ""]), max_size=4), min_size=1, max_size=10),
)
def test_locations_are_a_linear_scan_made_fast(specs, paths):
    entries = [(text, index, redirect) for index, (text, redirect) in enumerate(specs)]
    try:
        compiled = Locations(entries)
    except RoutingError:
        assume(False)
    for segments in paths:
        path = "/" + "/".join(segments)
        match = compiled.lookup(path.encode())
        got = None if match is None else (match.value, match.redirectSlash)
        assert got == linearLocation(entries, path), path
