"""
nginx is the oracle for routing: one routing table is written both as an
nginx.conf and as a wsproxy TOML configuration, in front of the same scripted
upstreams, each of which says who it is. Generated requests go to both
(every location, names and near-misses, wildcards and regexes, encoded and
dot-segment paths, slash redirects, files, upgrades). For each request the
two must agree on the upstream chosen, the target it received, the status and
the C{Location}.

Both proxies listen on UNIX sockets in the test's directory, so that no port
needs guessing and their redirects are comparable: a redirect names no port
there, in nginx as in wsproxy. The TLS run gives every virtual host the same
certificate and sends the C{Host} as SNI; the cases where wsproxy
deliberately differs (421 on a mismatch) are in test_routing_listener.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from nginxprocess import NginxProcess, SNIOnly, httpConfiguration
from support import RawClient, listenScripted, switching
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol, wrapClientTLS

from wsproxy import parseConfig
from wsproxy.listeners import ProxyService

#: (server names, default_server, [(match, handler)]). A handler is an
#: upstream's name, "name/uri" for proxy_pass with a URI part, "return ..."
#: or "files".
SITES: list[tuple[list[str], bool, list[tuple[str, str]]]] = [
    (
        ["example.com", "*.example.com"],
        False,
        [
            ("/", "app"),
            ("/ws/", "chat"),
            ("= /exact", "exact"),
            ("^~ /static/", "static"),
            ("~ \\.php$", "php"),
            ("~* \\.(png|jpg)$", "images"),
            ("/api/", "api/v2/"),
            ("= /old", "return 301 /new"),
            ("/docs", "docs"),
            ("/docs/internal/", "internal"),
            ("~ ^/users/(\\d+)$", "users"),
        ],
    ),
    (["www.example.*"], False, [("/", "www"), ("/ws/", "wschat")]),
    (["~^(?<sub>[a-z]+)\\.regex\\.test$", "exact.regex.test"], False, [("/", "regex")]),
    (["files.test"], False, [("/", "files"), ("@app", "fileapp")]),
    ([], False, [("/", "unnamed")]),
    (["default.test"], True, [("/", "default"), ("= /", "root")]),
]

HOSTS = [
    "example.com",
    "EXAMPLE.COM",
    "example.com:8080",
    "a.example.com",
    "a.b.example.com",
    "example.co",
    "xexample.com",
    "example.com.evil.test",
    "www.example.org",
    "www.example.com",
    "abc.regex.test",
    "exact.regex.test",
    "ab1.regex.test",
    "files.test",
    "default.test",
    "unknown.test",
]

PATHS = [
    "/",
    "/exact",
    "/exact/",
    "/exactly",
    "/static/a.png",
    "/static/a.php",
    "/a/b.php",
    "/a/b.PHP",
    "/a/b.png",
    "/a/b.PNG",
    "/ws/",
    "/ws/room",
    "/ws",
    "/wsx",
    "/api/users?page=2",
    "/api/a%20b/c",
    "/api",
    "/old",
    "/old/",
    "/docs",
    "/docs/",
    "/docs/internal/x",
    "/docs/internal",
    "/users/42",
    "/users/42/x",
    "/%77s/room",
    "/x/../ws/room",
    "/x/./ws/../api/y",
    "//ws//room",
    "/ws/%2e%2e/api/z",
    "/%2e%2e/x",
    "/a/%2F/b",
    "/index.html",
    "/sub",
    "/sub/",
    "/sub/page.html",
    "/missing.css",
    "/empty/",
]


def handlerUpstream(handler: str) -> str | None:
    if handler.startswith("return") or handler == "files":
        return None
    return handler.partition("/")[0]


def upstreamNames() -> list[str]:
    return sorted({u for _, _, locations in SITES for _, h in locations if (u := handlerUpstream(h))})


def nginxConf(prefix: Path, ports: dict[str, int], root: Path, tls: dict[str, str] | None) -> str:
    servers = []
    for names, default, locations in SITES:
        body = []
        for match, handler in locations:
            body.append(f"        location {match} {{ {nginxHandler(handler, ports, root)} }}")
        listen = f"unix:{prefix}/nginx.sock" + (" ssl" if tls else "") + (" default_server" if default else "")
        certificate = (
            f"        ssl_certificate {tls['ssl_certificate']};\n        ssl_certificate_key {tls['ssl_certificate_key']};\n"
            if tls
            else ""
        )
        serverName = f"        server_name {' '.join(names)};\n" if names else ""
        servers.append(
            f"    server {{\n        listen {listen};\n{serverName}{certificate}" + "\n".join(body) + "\n    }"
        )
    http = f"""
    access_log off;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
{chr(10).join(servers)}
"""
    return httpConfiguration(prefix, http)


def nginxHandler(handler: str, ports: dict[str, int], root: Path) -> str:
    if handler.startswith("return"):
        return handler + ";"
    if handler == "files":
        return f"root {root}; try_files $uri $uri/ @app;"
    name, slash, uri = handler.partition("/")
    return (
        f"proxy_pass http://127.0.0.1:{ports[name]}{slash}{uri}; proxy_http_version 1.1; "
        "proxy_set_header Host $host; proxy_set_header Upgrade $http_upgrade; "
        "proxy_set_header Connection $connection_upgrade;"
    )


def wsproxyDocument(socket: Path, ports: dict[str, int], root: Path, tls: dict[str, str] | None) -> dict[str, Any]:
    servers = []
    for names, default, locations in SITES:
        entries = []
        for match, handler in locations:
            entry: dict[str, Any] = {"match": match}
            if handler.startswith("return"):
                entry["return"] = handler.removeprefix("return ")
            elif handler == "files":
                entry.update(root=str(root), try_files=["$uri", "$uri/", "@app"])
            else:
                name, slash, uri = handler.partition("/")
                entry["proxy_pass"] = f"http://127.0.0.1:{ports[name]}{slash}{uri}"
            entries.append(entry)
        server = {"listen": f"unix:{socket}", "location": entries, "access_log": False}
        if names:
            server["server_name"] = names
        if default:
            server["default_server"] = True
        server.update(tls or {})
        servers.append(server)
    return {"server": servers, "shutdown_timeout": 1}


def named(name: str) -> Any:
    def answer(request: bytes, connection: Any) -> bytes:
        if b"\r\nupgrade: websocket" in request.lower():
            return switching() + b""
        line = request.split(b"\r\n", 1)[0]
        return b"HTTP/1.1 200 OK\r\nX-Upstream: %b\r\nX-Target: %b\r\nContent-Length: 0\r\n\r\n" % (
            name.encode(),
            line.split(b" ")[1],
        )

    return answer


async def ask(socket: Path, request: bytes, sni: str | None) -> bytes:
    endpoint: Any = UNIXClientEndpoint(reactor, str(socket))
    if sni is not None:
        endpoint = wrapClientTLS(SNIOnly(sni), endpoint)
    client = await connectProtocol(endpoint, RawClient())
    client.transport.write(request)
    received = await client.waitFor(lambda data: b"\r\n\r\n" in data, timeout=5)
    client.transport.abortConnection()
    return received


def verdict(response: bytes) -> tuple[Any, ...]:
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1")
    if not head:
        return ("no answer",)
    lines = head.split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    status = int(lines[0].split(" ")[1])
    return (status, fields.get("x-upstream"), fields.get("x-target"), fields.get("location"))


def requests(tls: bool) -> list[tuple[str, bytes]]:
    cases = []
    for host in HOSTS:
        for path in PATHS:
            cases.append((host, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()))
    if not tls:
        # HTTP/1.0 without a Host: the server without a server_name answers
        # (over TLS, wsproxy keeps to the server SNI chose; nginx does not).
        for path in ("/", "/ws/", "/api/x", "/old"):
            cases.append(("", f"GET {path} HTTP/1.0\r\n\r\n".encode()))
    for host in ("example.com", "www.example.com", "default.test"):
        for path in ("/ws/", "/ws/chat", "/", "/a.php"):
            upgrade = (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                "Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            cases.append((host, upgrade.encode()))
    return cases


@pytest.fixture(params=["plain", "tls"])
def kind(request: Any) -> str:
    return request.param


@pytest_twisted.ensureDeferred
async def test_wsproxy_routes_as_nginx_does(kind, cleanup, tmp_path):
    root = tmp_path / "www"
    (root / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "index.html").write_text("index")
    (root / "sub" / "page.html").write_text("page")
    (root / "sub" / "index.html").write_text("sub index")
    ports = {}
    for name in upstreamNames():
        port, _ = listenScripted(named(name), closeAfter=False)
        cleanup.port(port)
        ports[name] = port.getHost().port
    tls = None
    if kind == "tls":
        ca = trustme.CA()
        leaf = ca.issue_cert("*.example.com", "example.com", "*.regex.test", "files.test", "default.test")
        (tmp_path / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        (tmp_path / "cert.key").write_bytes(leaf.private_key_pem.bytes())
        tls = {"ssl_certificate": str(tmp_path / "cert.pem"), "ssl_certificate_key": str(tmp_path / "cert.key")}

    prefix = tmp_path / "nginx"
    nginx = NginxProcess(prefix, nginxConf(prefix, ports, root, tls))
    try:
        await nginx.started()

        ours = tmp_path / "wsproxy.sock"
        service = ProxyService(parseConfig(wsproxyDocument(ours, ports, root, tls), "(oracle)"), reactor)
        service.startService()
        cleanup.service(service)
        for listener in service.listeners:
            await listener.listeningPort()

        disagreements = []
        cases = requests(tls is not None)
        for host, request in cases:
            sni = host.partition(":")[0].lower() if tls else None
            expected = verdict(await ask(nginx.socket, request, sni))
            got = verdict(await ask(ours, request, sni))
            if expected != got:
                line = request.split(b"\r\n")[0].decode()
                disagreements.append(f"{line} Host: {host}: nginx {expected}, wsproxy {got}")
        assert not disagreements, f"{len(disagreements)} of {len(cases)} disagree:\n" + "\n".join(disagreements)
    finally:
        nginx.stop()
