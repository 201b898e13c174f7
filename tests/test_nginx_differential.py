"""
nginx is the oracle for the converter: each corpus configuration that
converts without C{--accept-unsupported} runs under real nginx and then
under wsproxy (converted from the very same file), and the same generated
requests go to both.  For every request the two must agree on the upstream
that answered, the status and the C{Location}.

The file both run is the corpus configuration rewritten on crossplane's
parsed structure and written back with C{crossplane.build}: every listening
address becomes a UNIX socket in the test's directory (one per port, so that
virtual hosts still share it), every upstream server and every address in a
C{proxy_pass} a scripted upstream that names itself (all servers of one
C{upstream} block answer with that block's name, so that balancing policies
need not agree), certificates trustme's, C{root} and C{alias} a small tree
of files, log and cache paths the test's directory.  A TLS server without a
certificate of its own gets the test's.  The process-wide directives
(C{user}, C{pid}, C{daemon}, C{worker_processes}) are left out of the file
and given to nginx on its command line.

Requests are generated per configuration from that structure: every
location (prefixes, their near-misses and slash variants, exact matches,
an example string for each regex and its case-swapped twin), every server
name and near-misses of it, unknown hosts, WebSocket upgrades, and a few
generic paths for static files and redirects.
"""

from __future__ import annotations

import re
import re._parser as sre_parse
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crossplane
import pytest
import pytest_twisted
import trustme
from nginxprocess import NginxProcess, SNIOnly
from support import KEY, RawClient, listenScripted, stopProxy
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol, wrapClientTLS

from wsproxy import parseConfig
from wsproxy.http import websocketAccept
from wsproxy.listeners import ProxyService
from wsproxy.nginxconf import convertFile

CORPUS = Path(__file__).parent / "data" / "nginx" / "corpus"
NAMES = sorted(entry.name for entry in CORPUS.iterdir() if entry.is_dir())

#: Directives of the main context that nginx gets on its command line instead.
PROCESS = {"user", "pid", "daemon", "worker_processes", "master_process"}
#: C{listen} parameters kept on a UNIX socket; the others concern IP sockets.
KEPT_LISTEN = {"ssl", "default_server", "default", "http2", "proxy_protocol"}
GENERIC_PATHS = ["/", "/index.html", "/sub", "/sub/", "/sub/page.html", "/missing.css", "/x/../index.html"]
UNKNOWN_HOST = "unknown.invalid"
#: How a request without C{Host} is named in reports.
NO_HOST = "(none)"
HOST = re.compile(r"^[A-Za-z0-9._-]+$")
#: Per-request wait for a response head; a proxy that does not answer in time answers "no answer".
ANSWER_TIMEOUT = 5.0
#: The whole run's bound: generous for a loaded machine, yet it fails a run that loses its way.
RUN_BOUND = 110.0


def named(name: str) -> Any:
    """A scripted upstream's answer: who it is, in a 200, or in the 101 of an upgrade it is asked for."""

    def answer(request: bytes, connection: Any) -> bytes:
        head = request.lower()
        if b"\r\nupgrade: websocket" in head and b"upgrade" in head.partition(b"\r\nconnection:")[2].split(b"\r\n")[0]:
            return (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: %b\r\nX-Upstream: %b\r\n\r\n" % (websocketAccept(KEY), name.encode())
            )
        return b"HTTP/1.1 200 OK\r\nX-Upstream: %b\r\nContent-Length: 0\r\n\r\n" % name.encode()

    return answer


def directives(block: list[dict[str, Any]]) -> Any:
    for directive in block:
        yield directive
        yield from directives(directive.get("block") or [])


def example(pattern: str) -> str | None:
    """A path that the regex C{pattern} matches, built from its parse tree; C{None} if none is found."""
    try:
        tree = sre_parse.parse(pattern)
    except re.error:
        return None
    text = "".join(_generate(tree))
    return text if re.search(pattern, text) else None


def _generate(tree: Any) -> Any:
    for op, value in tree:
        name = str(op)
        if name == "LITERAL":
            yield chr(value)
        elif name == "NOT_LITERAL":
            yield "b" if chr(value) == "a" else "a"
        elif name == "ANY":
            yield "x"
        elif name == "IN":
            yield _oneOf(value)
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, _, sub = value
            for _ in range(max(low, 1)):
                yield from _generate(sub)
        elif name == "SUBPATTERN":
            yield from _generate(value[-1])
        elif name == "BRANCH":
            yield from _generate(value[1][0])
        elif name == "CATEGORY":
            yield _category(str(value))


def _oneOf(items: Any) -> str:
    negated = any(str(op) == "NEGATE" for op, _ in items)
    if negated:
        excluded = {chr(v) for op, v in items if str(op) == "LITERAL"}
        return next(c for c in "abc1" if c not in excluded)
    for op, value in items:
        if str(op) == "LITERAL":
            return chr(value)
        if str(op) == "RANGE":
            return chr(value[0])
        if str(op) == "CATEGORY":
            return _category(str(value))
    return "a"


def _category(name: str) -> str:
    return "1" if "DIGIT" in name and "NOT" not in name else " " if "SPACE" in name and "NOT" not in name else "a"


def hostsFor(names: list[str]) -> tuple[list[str], list[str]]:
    """The hosts that C{server_name} C{names} should answer, and near-misses of them."""
    hosts: list[str] = []
    misses: list[str] = []
    for name in names:
        if name.startswith("~"):
            host = example(name[1:])
            if host and HOST.match(host):
                hosts.append(host)
                misses.append("x" + host + "x")
            continue
        if name.startswith("*."):
            hosts.append("a." + name[2:])
            misses.append(name[2:] + ".evil.test")
        elif name.startswith("."):
            hosts += [name[1:], "a" + name]
        elif name.endswith(".*"):
            hosts.append(name[:-2] + ".org")
            misses.append("x" + name[:-2] + ".org")
        elif name and name != "_":
            hosts.append(name)
            misses += ["x" + name, name + ".evil.test", name.upper()]
    keep = lambda host: HOST.match(host) is not None  # noqa: E731
    return [h for h in hosts if keep(h)], [h for h in misses if keep(h)]


def pathsFor(server: dict[str, Any]) -> list[str]:
    """Request paths that exercise C{server}'s locations (nested ones too)."""
    paths: list[str] = []
    for directive in directives(server.get("block") or []):
        if directive["directive"] != "location" or not directive["args"]:
            continue
        args = directive["args"]
        modifier, match = (args[0], args[1]) if len(args) > 1 else ("", args[0])
        if match.startswith("@"):
            continue
        if modifier in ("", "^~"):
            paths += [match, match + "x", match + ("a/b.css" if match.endswith("/") else "/a")]
            if match.endswith("/") and len(match) > 1:
                paths.append(match[:-1])
        elif modifier == "=":
            paths += [match, match + "/"]
        elif modifier in ("~", "~*"):
            found = example(match)
            if found and found.startswith("/") and " " not in found:
                paths += [found, found.swapcase()]
    return list(
        dict.fromkeys(p for p in paths if p.startswith("/") and p.isascii() and p.isprintable() and " " not in p)
    )


@dataclass
class Listener:
    """One UNIX socket of the rewritten configuration and what listens on it."""

    path: Path
    tls: bool = False
    default: bool = False
    servers: list[dict[str, Any]] = field(default_factory=list)


class Rewrite:
    """
    Rewrites a corpus configuration's parsed structure (crossplane, includes
    combined) in place to run in the directory C{run}; records the sockets
    it listens on.
    """

    def __init__(self, run: Path, www: Path, certificate: dict[str, str], dhparam: Path) -> None:
        self.run = run
        self.www = www
        self.certificate = certificate
        self.dhparam = dhparam
        self.listeners: dict[str, Listener] = {}
        self.upstreams: dict[str, int] = {}
        self._unix: dict[str, str] = {}

    def targets(self, parsed: list[dict[str, Any]]) -> set[str]:
        """The upstream names: C{upstream} blocks, and C{host:port} of C{proxy_pass} URLs naming none."""
        blocks = {d["args"][0] for d in directives(parsed) if d["directive"] == "upstream"}
        found = set(blocks)
        for directive in directives(parsed):
            if directive["directive"] == "proxy_pass" and "$" not in directive["args"][0]:
                host = self._authority(directive["args"][0])
                if host not in blocks:
                    found.add(host)
        return found

    @staticmethod
    def _authority(url: str) -> str:
        return url.partition("://")[2].partition("/")[0]

    def rewrite(self, parsed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        main = [d for d in parsed if d["directive"] not in PROCESS]
        for directive in main:
            self._directive(directive)
        return main

    def _directive(self, directive: dict[str, Any]) -> None:
        """Rewrite C{directive} and what its block holds."""
        name, args = directive["directive"], directive["args"]
        if name == "server" and "block" in directive:
            self._server(directive)
            return
        if name == "upstream":
            for member in directive["block"]:
                if member["directive"] == "server":
                    member["args"] = [f"127.0.0.1:{self.upstreams[args[0]]}"] + [
                        a for a in member["args"][1:] if not a.startswith(("resolve", "service="))
                    ]
            return
        if name == "proxy_pass" and "$" not in args[0]:
            authority, slash, uri = args[0].partition("://")[2].partition("/")
            if authority in self.upstreams:
                directive["args"] = [f"http://127.0.0.1:{self.upstreams[authority]}{slash}{uri}"]
        elif name in ("root", "alias") and args:
            directive["args"] = [str(self.www) + ("/" if args[0].endswith("/") and name == "alias" else "")]
        elif name in ("access_log", "error_log") and args and args[0] not in ("off", "stderr"):
            directive["args"] = [str(self.run / f"{name}.log")] + args[1:]
        elif name == "ssl_certificate":
            directive["args"] = [self.certificate["ssl_certificate"]]
        elif name == "ssl_certificate_key":
            directive["args"] = [self.certificate["ssl_certificate_key"]]
        elif name in ("ssl_trusted_certificate", "ssl_client_certificate"):
            directive["args"] = [self.certificate["ssl_certificate"]]
        elif name == "ssl_dhparam":
            directive["args"] = [str(self.dhparam)]
        elif name == "proxy_cache_path":
            directive["args"] = [str(self.run / "cache")] + args[1:]
        for inner in directive.get("block") or []:
            self._directive(inner)

    def _server(self, server: dict[str, Any]) -> None:
        """Give C{server} one UNIX socket per port it listens on, and a certificate if it speaks TLS without one."""
        block = server["block"]
        sslOn = any(d["directive"] == "ssl" and d["args"] == ["on"] for d in block)
        if not any(d["directive"] == "listen" for d in block):
            block.insert(0, {"directive": "listen", "line": server["line"], "args": ["80"]})
        kept: list[dict[str, Any]] = []
        mine: dict[str, dict[str, Any]] = {}
        tls = sslOn
        for directive in block:
            if directive["directive"] != "listen":
                kept.append(directive)
                continue
            address, *params = directive["args"]
            listener = self._listener(address)
            tls = tls or "ssl" in params
            listener.tls = listener.tls or sslOn or "ssl" in params
            params = [p for p in params if p in KEPT_LISTEN]
            if listener.default and any(p in ("default", "default_server") for p in params):
                params = [p for p in params if p not in ("default", "default_server")]
            listener.default = listener.default or any(p in ("default", "default_server") for p in params)
            if listener.path.name in mine:
                merged = mine[listener.path.name]
                merged["args"] += [p for p in params if p not in merged["args"]]
                continue
            listener.servers.append(server)
            directive["args"] = [f"unix:{listener.path}", *params]
            mine[listener.path.name] = directive
            kept.append(directive)
        if tls and not any(d["directive"] == "ssl_certificate" for d in block):
            kept[:0] = [
                {"directive": key, "line": server["line"], "args": [path]} for key, path in self.certificate.items()
            ]
        server["block"] = kept
        for directive in kept:
            self._directive(directive)

    def _listener(self, address: str) -> Listener:
        """The socket standing for C{address}: one per port (or per UNIX path)."""
        if address.startswith("unix:"):
            key = self._unix.setdefault(address, f"u{len(self._unix)}")
        else:
            port = address.rpartition(":")[2] if ":" in address else address
            key = port if port.isdigit() else "80"
        return self.listeners.setdefault(key, Listener(self.run / f"{key}.sock"))


@dataclass
class Case:
    """One request to send to both proxies."""

    socket: Path
    host: str
    sni: str | None
    request: bytes


def variants(paths: list[str]) -> list[str]:
    """C{paths} and, for each, the forms a proxy must normalise or tell apart: a query, the other case,
    a percent-encoded letter, a dot-segment, a doubled slash."""
    found: list[str] = []
    for path in paths:
        found += [path, path + "?q=1", path.swapcase(), "/x/.." + path, "/" + path]
        letter = next((i for i, c in enumerate(path) if c.isalpha()), None)
        if letter is not None:
            found.append(path[:letter] + f"%{ord(path[letter]):02X}" + path[letter + 1 :])
    return list(dict.fromkeys(found))


def caseFor(listener: Listener, host: str | None, path: str, upgrade: bool = False) -> Case:
    """
    A GET of C{path} for C{host} on C{listener}'s socket, an upgrade to
    WebSocket if C{upgrade}; with no C{host}, an HTTP/1.0 request without
    a C{Host} (what nginx's empty C{server_name} is for).
    """
    if host is None:
        return Case(listener.path, NO_HOST, None, f"GET {path} HTTP/1.0\r\n\r\n".encode())
    extra = (
        f"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
        if upgrade
        else "Connection: close\r\n"
    )
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
    return Case(listener.path, host, host.lower() if listener.tls else None, request)


def casesFor(rewrite: Rewrite) -> list[Case]:
    """The requests for a rewritten configuration: per socket, per server, per location."""
    cases: list[Case] = []
    for listener in rewrite.listeners.values():
        seenHosts: set[str | None] = set()
        for server in listener.servers:
            names = [a for d in server["block"] if d["directive"] == "server_name" for a in d["args"]]
            hosts, misses = hostsFor(names)
            paths = pathsFor(server)
            if not hosts:
                hosts = [UNKNOWN_HOST]
            if not names or "" in names:
                hosts.append(None)
            primary = hosts[0]
            for host in hosts:
                if host not in seenHosts:
                    seenHosts.add(host)
                    every = host == primary or host is None
                    for path in (variants(paths) + GENERIC_PATHS) if every else ["/", *paths[:3]]:
                        cases.append(caseFor(listener, host, path))
            if primary != UNKNOWN_HOST:
                cases += [caseFor(listener, f"{primary}:8080", path) for path in ["/", *paths[:2]]]
            for host in misses:
                cases += [caseFor(listener, host, path) for path in ["/", *paths[:2]]]
            cases += [caseFor(listener, primary, path, upgrade=True) for path in variants(paths) or ["/"]]
        if UNKNOWN_HOST not in seenHosts:
            cases += [caseFor(listener, UNKNOWN_HOST, path) for path in GENERIC_PATHS[:3]]
    return cases


async def ask(case: Case) -> bytes:
    endpoint: Any = UNIXClientEndpoint(reactor, str(case.socket), timeout=5)
    if case.sni is not None:
        endpoint = wrapClientTLS(SNIOnly(case.sni), endpoint)
    try:
        client = await connectProtocol(endpoint, RawClient())
    except Exception as failure:  # noqa: BLE001 - a refused connection is an answer too
        return f"refused: {type(failure).__name__}".encode()
    client.transport.write(case.request)
    received = await client.waitFor(lambda data: b"\r\n\r\n" in data, timeout=ANSWER_TIMEOUT)
    client.transport.abortConnection()
    return received


def verdict(response: bytes, hostless: bool = False) -> tuple[Any, ...]:
    """
    What is compared of a response: status, upstream, C{Location}.  For a
    request without C{Host}, only the C{Location}'s path: nginx then names
    the listening address, here a UNIX socket's path.
    """
    if response.startswith(b"refused:"):
        return (response.decode(),)
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1")
    if not head:
        return ("no answer",)
    lines = head.split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    location = fields.get("location")
    if hostless and location is not None:
        location = re.sub(r"^[a-z]+://(unix:.*?\.sock|[^/]*)", "", location)
    return (int(lines[0].split(" ")[1]), fields.get("x-upstream"), location)


def makeTree(www: Path) -> None:
    (www / "sub").mkdir(parents=True)
    (www / "empty").mkdir()
    for name, text in {
        "index.html": "index",
        "sub/index.html": "sub index",
        "sub/page.html": "page",
        "50x.html": "error",
        "404.html": "not found",
        "500.html": "error",
        "502.html": "bad gateway",
        "app.js": "js",
    }.items():
        (www / name).write_text(text)


@dataclass
class Outcome:
    """What one configuration's differential run found."""

    name: str
    requests: int = 0
    agreed: int = 0
    upgrades: int = 0
    disagreements: list[str] = field(default_factory=list)


async def runOne(name: str, base: Path, certificate: dict[str, str], dhparam: Path, cleanup: Any) -> Outcome:
    run = base / name
    www = run / "www"
    makeTree(www)
    payload = crossplane.parse(str(CORPUS / name / "nginx.conf"), combine=True)
    assert payload["status"] == "ok", payload["errors"]
    parsed = payload["config"][0]["parsed"]
    rewrite = Rewrite(run, www, certificate, dhparam)
    for target in sorted(rewrite.targets(parsed)):
        port, _ = listenScripted(named(target), closeAfter=False)
        cleanup.port(port)
        rewrite.upstreams[target] = port.getHost().port
    conf = crossplane.build(rewrite.rewrite(parsed)) + "\n"
    cases = casesFor(rewrite)
    outcome = Outcome(name, requests=len(cases))

    expected = []
    nginx = NginxProcess(
        run,
        conf,
        [listener.path for listener in rewrite.listeners.values()],
        errorLog=str(run / "error.log"),
        directives=f"user root; worker_processes 1; pid {run / 'nginx.pid'};",
    )
    config = nginx.config
    try:
        await nginx.started()
        for case in cases:
            expected.append(verdict(await ask(case), case.sni is None and case.host == NO_HOST))
        refused = sum(str(said[0]).startswith("refused") for said in expected)
        assert not refused, f"{name}: nginx refused {refused} connections:\n" + (run / "error.log").read_text()[-2000:]
    finally:
        nginx.stop()
    for listener in rewrite.listeners.values():
        listener.path.unlink(missing_ok=True)

    conversion = convertFile(config)
    assert not conversion.blocking, f"{name}: the rewritten file is refused: {conversion.blocking[0]}"
    service = ProxyService(parseConfig(conversion.document, str(config)), reactor)
    service.startService()
    cleanup.service(service)
    for listener in service.listeners:
        await listener.listeningPort()
    for case, nginxSays in zip(cases, expected, strict=True):
        wsproxySays = verdict(await ask(case), case.sni is None and case.host == NO_HOST)
        outcome.upgrades += nginxSays[0] == 101
        if wsproxySays == nginxSays:
            outcome.agreed += 1
        else:
            line = case.request.split(b"\r\n")[0].decode()
            kind = " (upgrade)" if b"Upgrade: websocket" in case.request else ""
            outcome.disagreements.append(
                f"{name}: {case.socket.name} {line} Host: {case.host}{kind}: nginx {nginxSays}, wsproxy {wsproxySays}"
            )
    await stopProxy(service)
    return outcome


def accepted() -> tuple[list[str], dict[str, str]]:
    """The corpus configurations the converter accepts as they are, and why the others are not."""
    names, refused = [], {}
    for name in NAMES:
        blocking = convertFile(CORPUS / name / "nginx.conf").blocking
        if blocking:
            refused[name] = f"{blocking[0].file}:{blocking[0].line} {blocking[0].directive}"
        else:
            names.append(name)
    return names, refused


@pytest.fixture(scope="module")
def dhparam(tmp_path_factory: Any) -> Path:
    path = tmp_path_factory.mktemp("dh") / "dhparam.pem"
    subprocess.run(["openssl", "dhparam", "-dsaparam", "-out", str(path), "2048"], check=True, capture_output=True)
    return path


@pytest_twisted.ensureDeferred
async def test_nginx_and_wsproxy_agree_on_the_corpus(cleanup, tmp_path, dhparam, capsys):
    started = time.monotonic()
    # RSA: several corpus configurations offer only ECDHE-RSA and RSA cipher suites.
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert("localhost", "*.test", "example.com", "*.example.com", key_type=trustme.KeyType.RSA)
    (tmp_path / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    (tmp_path / "cert.key").write_bytes(leaf.private_key_pem.bytes())
    certificate = {"ssl_certificate": str(tmp_path / "cert.pem"), "ssl_certificate_key": str(tmp_path / "cert.key")}
    names, refused = accepted()
    outcomes = [await runOne(name, tmp_path, certificate, dhparam, cleanup) for name in names]
    elapsed = time.monotonic() - started
    requests = sum(o.requests for o in outcomes)
    agreed = sum(o.agreed for o in outcomes)
    upgrades = sum(o.upgrades for o in outcomes)
    disagreements = [line for o in outcomes for line in o.disagreements]
    perConfig = Counter({o.name: len(o.disagreements) for o in outcomes})
    with capsys.disabled():
        print(
            f"\nnginx differential: {len(names)} of {len(NAMES)} corpus configurations run; "
            f"{requests} requests ({upgrades} upgraded by nginx), {agreed} agree ({100.0 * agreed / max(requests, 1):.1f}%), "
            f"{elapsed:.1f}s"
        )
        for name, why in refused.items():
            print(f"  not run (needs --accept-unsupported): {name}: {why}")
        for name, count in perConfig.most_common():
            if count:
                print(f"  {name}: {count} disagreements")
    assert names, "the converter accepts none of the corpus configurations"
    assert upgrades, "no request was upgraded: the harness lost its WebSocket cases"
    assert elapsed < RUN_BOUND, f"the differential run took {elapsed:.0f}s"
    assert not disagreements, f"{len(disagreements)} of {requests} disagree:\n" + "\n".join(disagreements)
