"""
Routing on real listeners: virtual hosts picked by Host (and SNI), locations
picked by path, and what each handler does, plain and over TLS.  The
precedence rules themselves are checked case by case against nginx in
tests/test_routing_oracle.py; here each handler and header rule is shown
to reach the wire.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from support import ENVIRONMENT, KEY, LOOPBACK, TWISTD, RawClient, listenScripted, switching, until, upgradeRequest
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS

from wsproxy import parseConfig
from wsproxy.config import ConfigError
from wsproxy.listeners import ProxyService

NAMED = re.compile(rb"X-Upstream: (\w+)")


def named(name: str, extra: bytes = b"") -> Any:
    """A scripted upstream that says who it is and echoes the request line it got."""

    def answer(request: bytes, connection: Any) -> bytes:
        line = request.split(b"\r\n", 1)[0]
        if b"upgrade: websocket" in request.lower():
            return switching()
        body = line + b"\n"
        return b"HTTP/1.1 200 OK\r\nX-Upstream: %b\r\nContent-Length: %d\r\n%b\r\n%b" % (
            name.encode(),
            len(body),
            extra,
            body,
        )

    return answer


class Site:
    """A proxy started from a config dict, with named scripted upstreams and a client that speaks plain or TLS."""

    def __init__(self, cleanup: Any, kind: str, tmp_path: Path) -> None:
        self.cleanup = cleanup
        self.kind = kind
        self.tmp = tmp_path
        self.upstreams: dict[str, Any] = {}
        self.ca = trustme.CA()
        #: Virtual hosts share one address; a UNIX socket in the test's
        #: directory is one no other test can take meanwhile.
        self.socket = tmp_path / "site.sock"
        self.clients: list[RawClient] = []

    @property
    def tls(self) -> bool:
        return self.kind == "tls"

    def upstream(self, name: str, extra: bytes = b"") -> Any:
        port, factory = listenScripted(named(name, extra), closeAfter=False)
        self.cleanup.port(port)
        factory.port = port.getHost().port
        self.upstreams[name] = factory
        return factory

    def certificate(self, *names: str) -> dict[str, str]:
        leaf = self.ca.issue_cert(*names)
        stem = self.tmp / names[0].replace("*", "star")
        certificate, key = Path(f"{stem}.pem"), Path(f"{stem}.key")
        certificate.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return {"ssl_certificate": str(certificate), "ssl_certificate_key": str(key)}

    def server(self, names: list[str] | str = (), **block: Any) -> dict[str, Any]:
        """A server block on the site's address."""
        names = [names] if isinstance(names, str) else list(names)
        server = {"listen": f"unix:{self.socket}", "access_log": False, **block}
        if names:
            server["server_name"] = names
        if self.tls and "ssl_certificate" not in server:
            server.update(self.certificate(*(n for n in names if not n.startswith("~")), "localhost"))
        return server

    def pools(self) -> dict[str, Any]:
        return {name: {"servers": [f"{LOOPBACK}:{f.port}"]} for name, f in self.upstreams.items()}

    async def start(self, *servers: dict[str, Any]) -> ProxyService:
        document = {"upstream": self.pools(), "server": list(servers), "shutdown_timeout": 1}
        service = ProxyService(parseConfig(document, source="(test)"), reactor)
        service.startService()
        self.cleanup.service(service)
        for listener in service.listeners:
            await listener.listeningPort()
        self.service = service
        return service

    async def connect(self, sni: str = "localhost") -> RawClient:
        endpoint: Any = UNIXClientEndpoint(reactor, str(self.socket))
        if self.tls:
            endpoint = wrapClientTLS(
                optionsForClientTLS(sni, trustRoot=Certificate.loadPEM(self.ca.cert_pem.bytes())), endpoint
            )
        client = await connectProtocol(endpoint, RawClient())
        self.clients.append(client)
        return client

    def abortAll(self) -> None:
        for client in self.clients:
            if not client.closed.called:
                client.transport.abortConnection()

    async def get(self, path: str, host: str = "localhost", sni: str | None = None, extra: str = "") -> bytes:
        """One request, Connection: close; everything the proxy sent."""
        client = await self.connect(sni or host.partition(":")[0])
        client.transport.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
        received = await client.waitClosed()
        assert received is not None, "the proxy did not close"
        return received


class _Aborter:
    """Lets the cleanup fixture abort a site's clients that are still open."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def abortConnection(self) -> None:
        self.site.abortAll()


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def upstreamOf(response: bytes) -> str | None:
    found = NAMED.search(response)
    return found.group(1).decode() if found else None


def header(response: bytes, name: bytes) -> bytes | None:
    head = response.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


@pytest.fixture(params=["plain", "tls"])
def site(request: Any, cleanup: Any, tmp_path: Path) -> Any:
    state = Site(cleanup, request.param, tmp_path)
    yield state
    state.abortAll()


# Virtual hosts


@pytest_twisted.ensureDeferred
async def test_virtual_hosts_share_one_socket_and_go_by_host(site):
    for name in ("exact", "wild", "fallback"):
        site.upstream(name)
    service = await site.start(
        site.server(["example.com"], proxy_pass="http://exact"),
        site.server(["*.example.com"], proxy_pass="http://wild"),
        site.server(["other.test"], proxy_pass="http://fallback", default_server=True),
    )
    assert len(service.listeners) == 1
    assert upstreamOf(await site.get("/", "example.com")) == "exact"
    assert upstreamOf(await site.get("/", "www.example.com")) == "wild"
    assert upstreamOf(await site.get("/", "EXAMPLE.com.:443", sni="example.com")) == "exact"
    if not site.tls:
        # Over TLS an unknown name gets the default certificate and the default server.
        assert upstreamOf(await site.get("/", "unknown.test")) == "fallback"


@pytest_twisted.ensureDeferred
async def test_a_host_that_differs_from_the_tls_name_is_misdirected(cleanup, tmp_path):
    site = Site(cleanup, "tls", tmp_path)
    cleanup.transports.append(_Aborter(site))
    site.upstream("a")
    site.upstream("b")
    await site.start(
        site.server(["a.test"], proxy_pass="http://a", default_server=True),
        site.server(["b.test"], proxy_pass="http://b"),
    )
    assert upstreamOf(await site.get("/", "b.test", sni="b.test")) == "b"
    response = await site.get("/", "b.test", sni="a.test")
    assert status(response) == 421
    assert upstreamOf(response) is None
    assert len(site.upstreams["b"].requests) == 1


@pytest.mark.parametrize(
    "second, problem",
    [
        ({"server_name": "a.test", "proxy_pass": "http://app"}, "'a.test' is a name of both server[0] and server[1]"),
        ({"default_server": True, "proxy_pass": "http://app"}, "server[0] and server[1] both claim default_server"),
    ],
)
def test_virtual_host_conflicts_name_both_blocks(second, problem):
    document = {
        "upstream": {"app": {"servers": ["127.0.0.1:9"]}},
        "server": [
            {"listen": "tcp:8080", "server_name": "a.test", "default_server": True, "proxy_pass": "http://app"},
            {"listen": "tcp:8080", **second},
        ],
    }
    with pytest.raises(ConfigError) as caught:
        parseConfig(document, "(test)")
    assert problem in str(caught.value)


def test_blocks_on_one_address_agree_on_tls(tmp_path):
    site = Site(None, "tls", tmp_path)
    tls = site.certificate("a.test")
    document = {
        "upstream": {"app": {"servers": ["127.0.0.1:9"]}},
        "server": [
            {"listen": "tcp:8443", "proxy_pass": "http://app", **tls},
            {"listen": "tcp:8443", "server_name": "b.test", "proxy_pass": "http://app"},
        ],
    }
    with pytest.raises(ConfigError) as caught:
        parseConfig(document, "(test)")
    assert "only server[0] has ssl_certificate" in str(caught.value)


# Locations and their handlers


@pytest_twisted.ensureDeferred
async def test_locations_pick_their_handlers(site):
    for name in ("chat", "app", "api"):
        site.upstream(name)
    api = site.upstreams["api"]
    await site.start(
        site.server(
            "localhost",
            location=[
                {"match": "/ws/", "proxy_pass": "http://chat"},
                {"match": "/", "proxy_pass": "http://app"},
                {"match": "/api/", "proxy_pass": f"http://127.0.0.1:{api.port}/v2/"},
                {"match": "= /old", "return": "301 https://$host/new"},
                {"match": "~* \\.PNG$", "return": "200 picture"},
                {"match": "^~ /assets/", "return": "200 assets"},
                {"match": "= /gone", "return": "444"},
            ],
        )
    )
    assert upstreamOf(await site.get("/ws/room")) == "chat"
    assert upstreamOf(await site.get("/elsewhere")) == "app"
    response = await site.get("/api/users?page=2")
    assert upstreamOf(response) == "api"
    assert b"GET /v2/users?page=2 HTTP/1.1" in response
    response = await site.get("/old")
    assert (status(response), header(response, b"location")) == (301, b"https://localhost/new")
    assert (await site.get("/a/b.png")).endswith(b"picture")
    assert (await site.get("/assets/b.png")).endswith(b"assets")
    assert await site.get("/gone") == b""
    # A prefix location ending in / and handled by proxy_pass: the URI without the slash is redirected.
    response = await site.get("/ws?x=1")
    # A UNIX socket has no port: the redirect names none, as nginx's would.
    expected = b"%b://localhost/ws/?x=1" % (b"https" if site.tls else b"http")
    assert (status(response), header(response, b"location")) == (301, expected)


@pytest_twisted.ensureDeferred
async def test_paths_are_normalised_before_matching(site):
    site.upstream("chat")
    site.upstream("app")
    await site.start(
        site.server(
            "localhost",
            location=[{"match": "/ws/", "proxy_pass": "http://chat"}, {"match": "/", "proxy_pass": "http://app"}],
        )
    )
    assert upstreamOf(await site.get("/x/../ws/a")) == "chat"
    assert upstreamOf(await site.get("/%77s/a")) == "chat"
    assert upstreamOf(await site.get("//ws//a")) == "chat"
    # Without a URI part in proxy_pass, the request goes upstream as the client sent it.
    assert b"GET /%77s/a HTTP/1.1" in site.upstreams["chat"].requests[1]
    assert status(await site.get("/../etc/passwd")) == 400


@pytest_twisted.ensureDeferred
async def test_request_headers_are_set_and_removed_and_response_headers_hidden(site):
    site.upstream("app", extra=b"X-Powered-By: php\r\nX-Kept: 1\r\n")
    await site.start(
        site.server(
            "localhost",
            add_header={"X-Server": "s"},
            proxy_set_header={"X-Site": "site"},
            location=[
                {
                    "match": "/",
                    "proxy_pass": "http://app",
                    "proxy_set_header": {
                        "X-Request-Id": "$request_id",
                        "X-Path": "$uri|$args|$arg_a|$http_x_in",
                        "X-Drop": "",
                        "Host": "backend.internal",
                    },
                    "proxy_hide_header": ["X-Powered-By"],
                    "add_header": {"X-Location": "l"},
                }
            ],
        )
    )
    response = await site.get("/p/%41?a=1&b=2", extra="X-Drop: client\r\nX-In: in\r\n")
    sent = site.upstreams["app"].requests[0]
    assert re.search(rb"\r\nX-Request-Id: [0-9a-f]{32}\r\n", sent)
    assert b"\r\nX-Path: /p/A|a=1&b=2|1|in\r\n" in sent
    assert b"\r\nX-Site: site\r\n" in sent
    assert b"\r\nHost: backend.internal\r\n" in sent and b"\r\nHost: localhost\r\n" not in sent
    assert b"X-Drop" not in sent
    assert header(response, b"x-powered-by") is None
    assert header(response, b"x-kept") == b"1"
    # add_header is merged: the server's and the location's.
    assert (header(response, b"x-server"), header(response, b"x-location")) == (b"s", b"l")


@pytest_twisted.ensureDeferred
async def test_a_decoded_line_break_never_reaches_a_header(site):
    site.upstream("app")
    await site.start(
        site.server(
            "localhost",
            location=[
                {"match": "/r/", "return": "302 /to$uri"},
                {"match": "/", "proxy_pass": "http://app", "proxy_set_header": {"X-Uri": "$uri"}},
            ],
        )
    )
    assert status(await site.get("/a%0d%0aSet-Cookie:x")) == 400
    assert status(await site.get("/r/a%0d%0aSet-Cookie:x")) == 400
    assert not site.upstreams["app"].requests


@pytest_twisted.ensureDeferred
async def test_files_then_the_application_and_error_pages(site):
    root = site.tmp / "www"
    root.mkdir()
    (root / "index.html").write_text("home")
    (root / "app.js").write_text("js")
    (root / "50x.html").write_text("sorry")
    site.upstream("app")
    await site.start(
        site.server(
            "localhost",
            root=str(root),
            error_page={"502": "/50x.html"},
            location=[
                {"match": "/", "try_files": ["$uri", "$uri/", "@app"]},
                {"match": "@app", "proxy_pass": "http://app"},
                {"match": "/down/", "proxy_pass": "http://127.0.0.1:9"},
                {"match": "= /50x.html", "internal": True},
            ],
        )
    )
    response = await site.get("/app.js")
    assert (status(response), response.endswith(b"js")) == (200, True)
    assert (await site.get("/")).endswith(b"home")
    response = await site.get("/dynamic/page")
    assert upstreamOf(response) == "app"
    assert b"GET /dynamic/page HTTP/1.1" in site.upstreams["app"].requests[0]
    response = await site.get("/down/x")
    assert (status(response), response.endswith(b"sorry")) == (502, True)
    assert status(await site.get("/50x.html")) == 404


@pytest_twisted.ensureDeferred
async def test_a_location_without_upgrades_sends_the_handshake_as_a_plain_get(site):
    site.upstream("chat")
    await site.start(
        site.server(
            "localhost",
            location=[
                {"match": "/ws/", "proxy_pass": "http://chat"},
                {"match": "/", "proxy_pass": "http://chat", "upgrade_protocols": []},
            ],
        )
    )
    client = await site.connect()
    client.transport.write(upgradeRequest(b"/plain"))
    response = await client.waitFor(b"\r\n\r\n")
    assert status(response) == 200
    sent = site.upstreams["chat"].requests[0]
    assert b"upgrade" not in sent.lower().replace(b"sec-websocket", b"")
    client2 = await site.connect()
    client2.transport.write(upgradeRequest(b"/ws/chat"))
    assert status(await client2.waitFor(b"\r\n\r\n")) == 101
    assert KEY in site.upstreams["chat"].requests[1]


# The config check and reload


def test_check_prints_the_routing_table_and_binds_nothing(tmp_path):
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))  # --check must not try to bind it
    port = holder.getsockname()[1]
    config = tmp_path / "site.toml"
    config.write_text(
        f"""
[upstream.chat]
servers = ["127.0.0.1:9"]
[[server]]
listen = "tcp:{port}:interface=127.0.0.1"
server_name = ["example.com", "*.example.com"]
[[server.location]]
match = "/ws/"
proxy_pass = "http://chat"
[[server.location]]
match = "/"
proxy_pass = "http://127.0.0.1:8080"
"""
    )
    try:
        done = subprocess.run(
            [TWISTD, "-n", "wsproxy", "--config", str(config), "--check"],
            env=ENVIRONMENT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.close()
    assert done.returncode == 0, done.stderr
    assert "the configuration is valid" in done.stdout
    assert "server[0] example.com *.example.com  [default_server]" in done.stdout
    assert re.search(r"/ws/\s+-> proxy_pass http://chat", done.stdout)
    assert re.search(r"/\s+-> proxy_pass http://127.0.0.1:8080", done.stdout)
    config.write_text(config.read_text().replace('"http://chat"', '"http://nochat"'))
    done = subprocess.run(
        [TWISTD, "-n", "wsproxy", "--config", str(config), "--check"],
        env=ENVIRONMENT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"wsproxy: {config}: server[0].location[0].proxy_pass: no [upstream.nochat] (known: chat)"
    )


@pytest_twisted.ensureDeferred
async def test_reload_changes_locations_and_open_tunnels_keep_running(site):
    site.upstream("chat")
    site.upstream("app")
    first = site.server("localhost", location=[{"match": "/", "proxy_pass": "http://chat"}])
    service = await site.start(first)
    tunnel = await site.connect()
    tunnel.transport.write(upgradeRequest(b"/ws"))
    assert status(await tunnel.waitFor(b"\r\n\r\n")) == 101
    second = dict(first, location=[{"match": "/", "proxy_pass": "http://app"}])
    document = {"upstream": site.pools(), "server": [second], "shutdown_timeout": 1}
    service.reload(parseConfig(document, source="(test)"))
    assert upstreamOf(await site.get("/page")) == "app"
    frame = b"\x81\x85abcd" + bytes(a ^ b for a, b in zip(b"hello", b"abcda", strict=True))
    tunnel.transport.write(frame)
    connection = site.upstreams["chat"].connections[0]
    assert await until(lambda: connection.received.endswith(frame))
    assert not tunnel.closed.called


@pytest_twisted.ensureDeferred
async def test_a_block_listens_on_each_address_of_its_list(site):
    site.upstream("app")
    second = site.tmp / "second.sock"
    server = site.server("localhost", proxy_pass="http://app")
    server["listen"] = [server["listen"], f"unix:{second}"]
    service = await site.start(server)
    assert len(service.listeners) == 2
    assert upstreamOf(await site.get("/")) == "app"
    site.socket = second
    assert upstreamOf(await site.get("/")) == "app"


@pytest_twisted.ensureDeferred
async def test_a_location_sets_its_own_body_limit(site):
    site.upstream("app")
    await site.start(
        site.server(
            "localhost",
            proxy_pass="http://app",
            client_max_body_size=10,
            location=[{"match": "/upload/", "proxy_pass": "http://app", "client_max_body_size": "1k"}],
        )
    )
    for path, size, expected in (("/upload/a", 500, 200), ("/upload/a", 2000, 413), ("/other", 500, 413)):
        client = await site.connect()
        body = b"x" * size
        client.transport.write(
            b"POST %b HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
            % (path.encode(), size, body)
        )
        response = await client.waitClosed()
        assert response is not None and status(response) == expected, (path, size, response[:80])


@pytest_twisted.ensureDeferred
async def test_map_variables_choose_header_values_and_redirects(site):
    site.upstream("app")
    document = {
        "upstream": site.pools(),
        "map": {
            "tenant": {
                "source": "$http_x_tenant",
                "default": "public",
                "values": {"Beta": "beta-$host", "~^g(\\d+)$": "gamma", "~*^OLD": "legacy"},
            },
            "destination": {"source": "$uri", "default": "", "values": {"/old": "/new/$tenant"}},
        },
        "server": [
            site.server(
                "localhost",
                location=[
                    {"match": "= /old", "return": "301 $destination"},
                    {"match": "/", "proxy_pass": "http://app", "proxy_set_header": {"X-Tenant-Name": "$tenant"}},
                ],
            )
        ],
        "shutdown_timeout": 1,
    }
    service = ProxyService(parseConfig(document, source="(test)"), reactor)
    service.startService()
    site.cleanup.service(service)
    await service.listeners[0].listeningPort()
    for sent, expected in (("BETA", b"beta-localhost"), ("g12", b"gamma"), ("old-one", b"legacy"), ("x", b"public")):
        await site.get("/", extra=f"X-Tenant: {sent}\r\n")
        assert b"\r\nX-Tenant-Name: " + expected + b"\r\n" in site.upstreams["app"].requests[-1]
    response = await site.get("/old", extra="X-Tenant: beta\r\n")
    scheme = b"https" if site.tls else b"http"
    assert header(response, b"location") == b"%b://localhost/new/beta-localhost" % scheme


@pytest.mark.parametrize(
    "maps, problem",
    [
        ({"m": {"source": "$nosuch"}}, "map.m: unknown variable $nosuch"),
        ({"m": {"source": "$uri", "values": {"~(": "x"}}}, "map.m: map $m: bad regex"),
        ({"M-1": {"source": "$uri"}}, "map.M-1.(name)"),
    ],
)
def test_map_mistakes_are_one_line(maps, problem):
    document = {
        "upstream": {"app": {"servers": ["127.0.0.1:9"]}},
        "map": maps,
        "server": [{"listen": "tcp:8080", "proxy_pass": "http://app", "proxy_set_header": {"X": "$uri"}}],
    }
    with pytest.raises(ConfigError) as caught:
        parseConfig(document, "(test)")
    assert problem in str(caught.value)
