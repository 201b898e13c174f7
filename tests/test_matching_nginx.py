"""
A real nginx is the oracle for L{wsproxy.matching}: one nginx.conf is built
from the same server blocks and locations the tests compile with
L{ServerNames} and L{Locations}, every location answers with its own id
(C{return 200 "<id> $uri"}, or an upstream's C{$request_uri} for a proxied
one, with the id in an C{X-Location} header), and many generated requests
must get from nginx exactly what the module predicts: the server block, the
location, C{$uri}, the 400s, the auto-redirect 301s with their
C{Location}, and the target C{proxy_pass} sends upstream.  C{nginx -t}
is the oracle for what a configuration may say.

nginx runs in the foreground on UNIX sockets in a temporary prefix, with
C{error_log stderr} kept in a file; a missing nginx fails the tests.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nginxprocess import NginxProcess, configurationTest, httpConfiguration

from wsproxy.http import HTTPError
from wsproxy.matching import (
    Locations,
    RoutingError,
    ServerNames,
    escapeURI,
    isQuotedPath,
    normalizeHost,
    normalizePath,
    parseLocationMatch,
    replaceURI,
    splitTarget,
)

UPSTREAM = "upstream"


@dataclass
class Location:
    """
    One C{location}: its argument, and its C{proxy_pass} URI part (C{""}
    for a C{proxy_pass} without one, C{None} for a location that answers
    C{"<id> $uri"} itself).
    """

    text: str
    proxy: str | None = None

    def directives(self, ident: str, prefix: Path) -> str:
        """The block's body: C{X-Location: <id>} on every answer, and the answer."""
        if self.proxy is None:
            answer = f'return 200 "{ident} $uri";'
        else:
            uri = f":{self.proxy}" if self.proxy else ""
            answer = f"proxy_pass http://unix:{prefix}/{UPSTREAM}.sock{uri};"
        return f"add_header X-Location {ident} always; {answer}"


@dataclass
class Server:
    """One C{server} block: an id, its names, its locations."""

    ident: str
    names: list[str]
    locations: list[Location] = field(default_factory=lambda: [Location("/")])

    def locationIds(self) -> list[str]:
        """C{<server id>-<index>} for each location, in file order."""
        return [f"{self.ident}-{index}" for index in range(len(self.locations))]

    def compiled(self) -> Locations[tuple[str, Location]]:
        """The locations for L{wsproxy.matching}: nginx redirects to a proxied one whose name ends with C{/}."""
        entries = []
        for ident, location in zip(self.locationIds(), self.locations, strict=True):
            _, pattern = parseLocationMatch(location.text)
            entries.append((location.text, (ident, location), location.proxy is not None and pattern.endswith("/")))
        return Locations(entries)


def quoted(word: str) -> str:
    """A configuration token nginx reads back as C{word}."""
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"' if word else '""'


def locationArgument(text: str) -> str:
    """The C{location} argument C{text} (valid or not) in nginx's syntax."""
    try:
        modifier, pattern = parseLocationMatch(text)
    except RoutingError:
        modifier, _, pattern = text.partition(" ")
    if modifier == "@":
        return quoted(text)
    return f"{modifier} {quoted(pattern)}" if modifier else quoted(pattern)


def configuration(prefix: Path, servers: list[Server]) -> str:
    """An nginx.conf with C{servers} on one socket and the upstream on another."""
    blocks = []
    for server in servers:
        names = " ".join(quoted(name) for name in server.names)
        locations = "\n".join(
            f"        location {locationArgument(location.text)} {{ {location.directives(ident, prefix)} }}"
            for ident, location in zip(server.locationIds(), server.locations, strict=True)
        )
        blocks.append(
            f"    server {{\n        listen unix:{prefix}/nginx.sock;\n        server_name {names};\n{locations}\n    }}"
        )
    http = f"""
    access_log off;
    absolute_redirect off;
    root {prefix}/nothing;
    server {{
        listen unix:{prefix}/{UPSTREAM}.sock;
        location / {{ return 200 "{UPSTREAM} $request_uri"; }}
    }}
{chr(10).join(blocks)}
"""
    return httpConfiguration(prefix, http, errorLog="stderr warn")


def checkConfiguration(prefix: Path, text: str) -> str:
    """What C{nginx -t} says about C{text}, a whole nginx.conf."""
    return configurationTest(prefix, text).stderr.decode(errors="replace")


@dataclass
class Response:
    """What nginx answered."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes


class Nginx(NginxProcess):
    """A real nginx serving C{servers} on a UNIX socket, in the foreground."""

    def __init__(self, prefix: Path, servers: list[Server]) -> None:
        sockets = [prefix / "nginx.sock", prefix / f"{UPSTREAM}.sock"]
        super().__init__(prefix, configuration(prefix, servers), sockets)
        self.waitStarted()

    def request(self, target: bytes, host: bytes | None) -> Response:
        """Send one request (HTTP/1.0 without C{Host} when C{host} is C{None}) and read the whole answer."""
        if host is None:
            head = b"GET %b HTTP/1.0\r\n\r\n" % target
        else:
            head = b"GET %b HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n" % (target, host)
        top, _, body = self.fetch(head).partition(b"\r\n\r\n")
        lines = top.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return Response(int(lines[0].split()[1]), headers, body)


# -- the configuration under test ---------------------------------------------------------------

NAMES = [
    Server("default", ["default.test"]),
    Server("exact", ["example.com", "www.example.com", "Upper.Example.NET"]),
    Server("star", ["*.example.com"]),
    Server("deepstar", ["*.a.example.com"]),
    Server("dot", [".example.org"]),
    Server("starorg", ["*.org"]),
    Server("tail", ["www.example.*"]),
    Server("shorttail", ["www.*"]),
    Server("regex", [r"~^(www\.)?regex\.test$", r"~^api\d+\."]),
    Server("caseless", ["~^MiXeD"]),
    Server("nohost", ["", "_", "nohost.test"]),
    Server("named", [r"~(?<sub>[a-z]+)\.named\.test$"]),
    Server("shadowed", [r"~^www\.example\.com$", r"~^.*\.example\.com$", r"~^x\.y\.example\.net$"]),
    Server("later", [r"~^api"]),
]

HOSTS = [
    b"default.test",
    b"example.com",
    b"EXAMPLE.com",
    b"example.com.",
    b"example.com:8080",
    b"example.com.:80",
    b"www.example.com",
    b"upper.example.net",
    b"x.y.example.net",
    b"example.co",
    b"xexample.com",
    b"example.com.evil",
    b"a.example.comx",
    b"foo.example.com",
    b"a.b.example.com",
    b".example.com",
    b"a.example.com",
    b"x.a.example.com",
    b"y.x.a.example.com",
    b"example.org",
    b"Example.Org.",
    b"foo.example.org",
    b"a.b.example.org",
    b"other.org",
    b"org",
    b"www.example",
    b"www.example.net",
    b"www.example.co.uk",
    b"www.foo.net",
    b"www",
    b"www.x.example.com",
    b"wwwexample.com",
    b"regex.test",
    b"www.regex.test",
    b"wwww.regex.test",
    b"api1.foo",
    b"API12.x",
    b"api.foo",
    b"apix",
    b"mixed.test",
    b"MIXED-case.test",
    b"zz.named.test",
    b"1.named.test",
    b"_",
    b"nohost.test",
    b"[::1]",
    b"[::1]:8080",
    b"[::1].",
    b"127.0.0.1",
    b"127.0.0.1:80",
    b"a..b",
    b":80",
    b".",
    b"example..com:80",
]

LOCATIONS = [
    Server(
        "loc",
        ["loc.test"],
        [
            Location("= /"),
            Location("/"),
            Location("/docs/"),
            Location("/docs/api/"),
            Location("^~ /static/"),
            Location(r"~ \.php$"),
            Location(r"~* \.(png|jpg)$"),
            Location(r"~ ^/docs/(?<section>[a-z]+)/(\d+)$"),
            Location("= /exact"),
            Location("/exact"),
            Location("/exact/more"),
            Location(r"~ ^/static/.*\.php$"),
            Location("/CaseSensitive"),
            Location("/a"),
            Location("/ab"),
            Location("/abc"),
            Location("~ /x/"),
            Location("/x"),
            Location("/x/y/"),
            Location("^~ /x/y/z"),
            Location("/caf\u00e9/"),
            Location("@named"),
        ],
    ),
    Server("noroot", ["noroot.test"], [Location("/only/"), Location("= /exact"), Location("~ ^/re")]),
]

PATHS = [
    b"/",
    b"/index.html",
    b"/docs",
    b"/docs/",
    b"/docs/x",
    b"/docs/api",
    b"/docs/api/",
    b"/docs/api/v1",
    b"/docs/guide/12",
    b"/docs/guide/12/",
    b"/docs/Guide/12",
    b"/docs/a.php",
    b"/static/",
    b"/static/a.php",
    b"/static/a.PNG",
    b"/static",
    b"/a.php",
    b"/a.PHP",
    b"/a.png",
    b"/a.JPG",
    b"/exact",
    b"/exact/",
    b"/exact/more",
    b"/exact/more/x",
    b"/exactly",
    b"/CaseSensitive",
    b"/casesensitive",
    b"/CaseSensitiveToo",
    b"/a",
    b"/ab",
    b"/abc",
    b"/abcd",
    b"/abd",
    b"/b",
    b"/x",
    b"/x/",
    b"/x/a",
    b"/x/y/",
    b"/x/y/z",
    b"/x/y/z.php",
    b"/x/y/zz",
    b"/xx",
    b"/caf%C3%A9/",
    b"/caf%c3%a9/menu",
    b"/caf%C3%A9",
    b"/only/",
    b"/only/x.php",
    b"/only",
    b"/re",
    b"/rest",
    b"/named",
    b"/@named",
    # normalisation: encoded characters, dot segments, merged slashes
    b"/%64ocs/",
    b"/docs%2Fapi%2Fv1",
    b"/docs%2fapi/",
    b"//docs//api//",
    b"/docs/./api/",
    b"/docs/../static/a.php",
    b"/docs/x/../../exact",
    b"/docs/%2e%2e/exact",
    b"/docs/%2E./exact",
    b"/docs/.%2e/exact",
    b"/docs/%2e/api/",
    b"/docs/.",
    b"/docs/..",
    b"/docs/...",
    b"/docs/..a",
    b"/docs/a..",
    b"/docs/.hidden",
    b"/docs/%2e",
    b"/docs/%2e%2e",
    b"/docs%2F..%2Fexact",
    b"/docs/%25",
    b"/docs/%2541",
    b"/docs/%23frag",
    b"/docs/%3Fq=1",
    b"/docs/%3f",
    b"/docs/..%3F",
    b"/docs/.%23",
    b"/docs/%2e%25",
    b"/docs/a%20b",
    b"/docs/%0a",
    b"/docs/%7e",
    b"/docs/%ff%80",
    b"/docs/+%2B",
    b"/docs/?",
    b"/docs/?a=1&b=%20",
    b"/docs/../?x/../y",
    b"/docs/x?/../..",
    b"/docs/x#frag",
    b"/exact?x",
    b"/exact%3F",
    b"/a.p%68p",
    b"/a.ph%50",
    b"/static/%2e%2e/a.php",
    # refused
    b"/..",
    b"/../x",
    b"/%2e%2e",
    b"/%2e%2e/x",
    b"/a/../..",
    b"/a/%2e%2e/%2E%2E/x",
    b"/%2F..%2F..",
    b"/%00",
    b"/a%00b",
    b"/%",
    b"/%4",
    b"/%4g",
    b"/%g4",
    b"/a%",
    b"/a%2",
]

REDIRECTS = [
    Server(
        "redir",
        ["redir.test"],
        [
            Location("/"),
            Location("/ws/", ""),
            Location("= /exactws/", ""),
            Location("/both/", ""),
            Location("= /both/"),
            Location("/plain/"),
            Location("~ ^/ws$"),
            Location("~ ^/plain$"),
            Location("/pre"),
            Location("/pre/", ""),
            Location("~ ^/regexdir/$", ""),
            Location("^~ /nr/", ""),
            Location("= /eq"),
            Location("/eq/", ""),
            Location("/w"),
            Location("/a b/", ""),
            Location("/sub/", "/elsewhere/"),
        ],
    )
]

REDIRECT_PATHS = [
    b"/ws",
    b"/ws?a=1&b",
    b"/ws?",
    b"/ws/",
    b"/ws/x",
    b"/w",
    b"/wsx",
    b"/w%73",
    b"/w%73?q",
    b"//ws",
    b"/x/../ws",
    b"/ws/.",
    b"/ws/..",
    b"/exactws",
    b"/exactws/",
    b"/exactws/x",
    b"/both",
    b"/both/",
    b"/both/x",
    b"/plain",
    b"/plain/",
    b"/pre",
    b"/pre/",
    b"/prefix",
    b"/regexdir",
    b"/regexdir/",
    b"/nr",
    b"/nr/",
    b"/eq",
    b"/eq/",
    b"/a%20b",
    b"/a%20b/",
    b"/sub",
    b"/sub/x",
]

PASSES = [
    Server(
        "pass",
        ["pass.test"],
        [
            Location("/p/", "/new/"),
            Location("= /exact", "/e"),
            Location("/q", "/r"),
            Location("/keep/", ""),
            Location("/", "/root/"),
        ],
    )
]

PASS_PATHS = (
    [b"/p/%%%02X" % byte for byte in range(1, 256)]
    + [b"/p/a%%%02xz" % byte for byte in range(1, 256)]
    + [
        b"/p/",
        b"/p/a//b",
        b"/p/./x",
        b"/p/x/../y",
        b"/p/x?y=1",
        b"/p/%41?q=%20",
        b"/p/%41?",
        b"/p/a+b",
        b"/p/%2F%2F",
        b"/p/%25%23%3F",
        b"/p/\xc3\xa9",
        b"/p/\xc3\xa9%20",
        b"/p/~!$&'()*+,;=:@",
        b"/q",
        b"/qq/x",
        b"/q%2fx",
        b"/exact",
        b"/exact?x=%41",
        b"/keep/%41//./b",
        b"/keep/a?b",
        b"/other/%7B%7D",
        b"/other/a%5Cb%5E%60%7C%22%3C%3E",
    ]
)


#: Pieces generated paths are made of: real and encoded slashes and dots,
#: the names the locations use, escapes nginx decodes or refuses.
PIECES = [b"/", b"/", b"//", b".", b"..", b"%2e", b"%2E", b"%2f", b"%2F", b"%25", b"%3F", b"%23", b"%20"]
PIECES += [b"docs", b"api", b"static", b"exact", b"x", b"y", b"z", b"a", b"b", b"c", b".php", b".PNG", b"%41"]
PIECES += [b"+", b"~", b"%c3%a9", b"\xc3\xa9", b"%", b"%0", b"%00", b"%zz", b"?", b"?x=%2e&y", b"#f"]


#: Where generated paths start: the locations' names, and near misses.
STARTS = [b"/", b"/docs/", b"/docs/api/", b"/static/", b"/x/y/", b"/exact", b"/only/", b"/ws", b"/both", b"/p/", b"/q"]


def generatedPaths(seed: int, count: int) -> list[bytes]:
    """C{count} paths of 0 to 7 L{PIECES} after one of L{STARTS}, the same for the same C{seed}."""
    generator = random.Random(seed)
    return [
        generator.choice(STARTS) + b"".join(generator.choices(PIECES, k=generator.randint(0, 7))) for _ in range(count)
    ]


@dataclass
class Routed:
    """What the module predicts nginx answers."""

    status: int
    location: str | None = None
    text: bytes | None = None
    redirect: bytes | None = None


class Model:
    """The servers compiled with L{wsproxy.matching}, predicting nginx's answers."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = {server.ident: server for server in servers}
        self.names = ServerNames([(server.names, server.ident) for server in servers], servers[0].ident)
        self.locations = {server.ident: server.compiled() for server in servers}

    def route(self, host: bytes | None, target: bytes) -> Routed:
        try:
            server = self.names.lookup(normalizeHost(host or b""))
            path, args = splitTarget(target)
            uri = normalizePath(path)
        except HTTPError as e:
            return Routed(e.status)
        match = self.locations[server].lookup(uri)
        if match is None:
            return Routed(404)
        ident, location = match.value
        if match.redirectSlash:
            assert match.prefix is not None
            return Routed(301, ident, redirect=escapeURI(match.prefix) + (b"?" + args if args else b""))
        if location.proxy is None:
            return Routed(200, ident, ident.encode() + b" " + uri)
        if not location.proxy:
            return Routed(200, ident, UPSTREAM.encode() + b" " + target.partition(b"#")[0])
        assert match.prefix is not None
        sent = replaceURI(uri, args, match.prefix, location.proxy.encode(), isQuotedPath(path))
        return Routed(200, ident, UPSTREAM.encode() + b" " + sent)


def observed(response: Response) -> Routed:
    """Read nginx's answer the way L{Model.route} predicts it."""
    ident = response.headers.get(b"x-location")
    return Routed(
        response.status,
        ident.decode() if ident is not None else None,
        response.body if response.status == 200 else None,
        response.headers.get(b"location") if response.status == 301 else None,
    )


@pytest.fixture(scope="module")
def nginx(tmp_path_factory) -> Iterator[Nginx]:
    server = Nginx(tmp_path_factory.mktemp("nginx"), NAMES + LOCATIONS + REDIRECTS + PASSES)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(NAMES + LOCATIONS + REDIRECTS + PASSES)


def disagreements(nginx: Nginx, model: Model, requests: list[tuple[bytes | None, bytes]]) -> list[str]:
    """Every request on which nginx and the model differ, described."""
    found = []
    for host, target in requests:
        expected = model.route(host, target)
        got = observed(nginx.request(target, host))
        if got != expected:
            found.append(f"Host {host!r} {target!r}: nginx {got}, routing {expected}")
    return found


def test_server_names_pick_the_server_block_nginx_picks(nginx, model):
    """Exact, leading and trailing wildcards by length, regexes in order, case, ports, dots, 400s."""
    requests: list[tuple[bytes | None, bytes]] = [(host, b"/") for host in HOSTS]
    requests.append((None, b"/"))
    assert disagreements(nginx, model, requests) == []
    assert observed(nginx.request(b"/", b"www.x.example.com")).location == "star-0", "leading beats trailing"


def test_locations_and_uri_normalisation_agree_with_nginx(nginx, model):
    """Exact, longest prefix, ^~, regexes in order with case, C{$uri} for encoded and dot-segment paths, 400s."""
    requests = [(host, path) for host, path in itertools.product([b"loc.test", b"noroot.test"], PATHS)]
    assert disagreements(nginx, model, requests) == []
    assert observed(nginx.request(b"/docs/guide/12", b"loc.test")).location == "loc-7"


def test_generated_paths_agree_with_nginx(nginx, model):
    """Random mixes of encoded and dot segments, on every server with locations; 1200 requests."""
    hosts = [b"loc.test", b"noroot.test", b"redir.test", b"pass.test"]
    requests = [(host, path) for host, path in zip(itertools.cycle(hosts), generatedPaths(2026, 1200))]
    assert disagreements(nginx, model, requests) == []


def test_auto_redirect_to_a_proxied_location_with_a_slash(nginx, model):
    """C{/ws} answers 301 to C{/ws/} when C{location /ws/} is proxied, before regexes; never after an exact match."""
    requests = [(b"redir.test", path) for path in REDIRECT_PATHS]
    assert disagreements(nginx, model, requests) == []
    redirect = observed(nginx.request(b"/ws?a=1&b", b"redir.test"))
    assert (redirect.status, redirect.redirect) == (301, b"/ws/?a=1&b")


def test_proxy_pass_with_a_uri_sends_what_nginx_sends(nginx, model):
    """The location's name replaced, the rest escaped only for a client path that had a C{%}, then the args."""
    requests = [(b"pass.test", path) for path in PASS_PATHS]
    assert disagreements(nginx, model, requests) == []
    sent = observed(nginx.request(b"/p/a%20b%3F?x=%20", b"pass.test")).text
    assert sent == b"upstream /new/a%20b%3F?x=%20"


# -- what a configuration may say ---------------------------------------------------------------


def serverNamesConfiguration(prefix: Path, first: list[str], second: list[str]) -> str:
    return configuration(prefix, [Server("one", first), Server("two", second)])


CONFLICTING_NAMES = [
    (["example.com"], ["example.com"]),
    (["Example.com"], ["example.COM"]),
    (["example.com"], [".example.com"]),
    ([".example.com"], ["example.com"]),
    (["*.example.com"], [".example.com"]),
    (["*.example.com"], ["*.example.com"]),
    (["www.example.*"], ["www.example.*"]),
    ([""], [""]),
    (["_"], ["a", "_"]),
]
COEXISTING_NAMES = [
    (["example.com"], ["*.example.com"]),
    (["*.example.com"], ["*.a.example.com"]),
    (["www.*"], ["www.example.*"]),
    (["example.*"], ["*.example"]),
]
#: nginx warns about these too, but one block naming itself twice is no ambiguity.
REPEATED_IN_ONE_BLOCK = [
    ["a", "a"],
    [".example.com", "example.com"],
    ["*.example.com", ".example.com"],
    ["~^a$", "~^a$"],
]
INVALID_NAMES = ["*", "w*w.example.com", "*.example.*", "example..com", "*example.com", "example.*com", "*.", "~("]
VALID_NAMES = ["*.x", "x.*", ".x", "_", "", "localhost", "~^x$", "~(?<a>b)"]


@pytest.mark.parametrize(("first", "second"), CONFLICTING_NAMES + COEXISTING_NAMES)
def test_conflicting_server_names_are_nginxs_conflicts(tmp_path, first, second):
    """nginx warns and ignores the second; wsproxy refuses the configuration."""
    said = checkConfiguration(tmp_path, serverNamesConfiguration(tmp_path, first, second))
    conflicting = "conflicting server name" in said
    assert conflicting == ((first, second) in CONFLICTING_NAMES), said
    if conflicting:
        with pytest.raises(RoutingError, match="conflicting server names"):
            ServerNames([(first, 1), (second, 2)], 0)
    else:
        ServerNames([(first, 1), (second, 2)], 0)


@pytest.mark.parametrize("names", REPEATED_IN_ONE_BLOCK)
def test_a_name_repeated_in_one_block_is_kept(tmp_path, names):
    said = checkConfiguration(tmp_path, serverNamesConfiguration(tmp_path, names, ["other"]))
    assert "[emerg]" not in said, said
    compiled = ServerNames([(names, 1), (["other"], 2)], 0)
    assert compiled.lookup(names[-1].lstrip("~^.*").rstrip("$").encode()) == 1


@pytest.mark.parametrize("name", INVALID_NAMES + VALID_NAMES)
def test_invalid_server_names_are_nginxs(tmp_path, name):
    said = checkConfiguration(tmp_path, serverNamesConfiguration(tmp_path, [name], ["other"]))
    refused = "[emerg]" in said
    assert refused == (name in INVALID_NAMES), said
    if refused:
        with pytest.raises(RoutingError):
            ServerNames([([name], 1)], 0)
    else:
        ServerNames([([name], 1)], 0)


DUPLICATE_LOCATIONS = [("/p", "/p"), ("/p", "^~ /p"), ("^~ /p", "/p"), ("= /p", "= /p"), ("= /p", "=/p")]
DISTINCT_LOCATIONS = [("= /p", "/p"), ("/p", "/p/"), ("~ a", "~* a"), ("/p", "/P"), ("@n", "@m")]
INVALID_LOCATIONS = ["~ (", "~* [", "== /p", "^ /p"]


@pytest.mark.parametrize(("first", "second"), DUPLICATE_LOCATIONS + DISTINCT_LOCATIONS)
def test_duplicate_locations_are_nginxs(tmp_path, first, second):
    server = Server("one", ["one"], [Location(first), Location(second)])
    said = checkConfiguration(tmp_path, configuration(tmp_path, [server]))
    duplicate = "duplicate location" in said
    assert duplicate == ((first, second) in DUPLICATE_LOCATIONS), said
    if duplicate:
        with pytest.raises(RoutingError, match="duplicate location"):
            server.compiled()
    else:
        server.compiled()


@pytest.mark.parametrize("text", INVALID_LOCATIONS)
def test_invalid_locations_are_nginxs(tmp_path, text):
    said = checkConfiguration(tmp_path, configuration(tmp_path, [Server("one", ["one"], [Location(text)])]))
    assert "[emerg]" in said, said
    with pytest.raises(RoutingError):
        Locations([(text, 1, False)])


def test_what_wsproxy_refuses_though_nginx_accepts(tmp_path):
    """
    nginx accepts two identical regex locations (the second is never
    reached) and two named locations of the same name, and reads
    C{.example.*} as the special name whose last label is a literal C{*};
    each is a mistake that wsproxy reports instead.
    """
    for first, second in [("~ a", "~ a"), ("~* a", "~* a"), ("@n", "@n")]:
        server = Server("one", ["one"], [Location(first), Location(second)])
        said = checkConfiguration(tmp_path, configuration(tmp_path, [server]))
        assert "[emerg]" not in said, said
        with pytest.raises(RoutingError, match="duplicate location"):
            server.compiled()
    said = checkConfiguration(tmp_path, serverNamesConfiguration(tmp_path, [".example.*"], ["other"]))
    assert "[emerg]" not in said, said
    with pytest.raises(RoutingError, match="invalid server name"):
        ServerNames([([".example.*"], 1)], 0)
