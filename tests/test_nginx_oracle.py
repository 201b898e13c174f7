"""
Where nginx's behaviour is the specification, nginx is the oracle: the
same requests go through a real nginx (Debian's package, the classic
recipe's proxy settings) and through wsproxy, to the same scripted
upstream, and what the upstream receives and what is logged must agree.

nginx listens on a UNIX socket in the test's directory, so no port has to
be guessed; wsproxy on C{tcp:0}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from nginxprocess import NginxProcess, httpConfiguration
from support import RawClient, connectRaw, listenScripted, ok, startProxyFor, until
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.logger import globalLogPublisher

HTTP = """
    log_format oracle '$status "$request"';
    access_log {prefix}/access.log oracle;
    server {{
        listen unix:{prefix}/nginx.sock;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
        }}
    }}
"""


class Nginx(NginxProcess):
    """A real nginx in front of one upstream port, in the foreground."""

    def __init__(self, prefix: Path, upstreamPort: int) -> None:
        super().__init__(prefix, httpConfiguration(prefix, HTTP.format(prefix=prefix, upstream=upstreamPort)))
        self.accessLog = prefix / "access.log"

    async def connect(self) -> RawClient:
        return await connectProtocol(UNIXClientEndpoint(reactor, str(self.socket)), RawClient())

    def statuses(self) -> list[str]:
        return self.accessLog.read_text().split() if self.accessLog.exists() else []


@pytest.fixture
def nginxFor(tmp_path: Path):
    started: list[Nginx] = []

    async def start(upstreamPort: int) -> Nginx:
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        server = Nginx(prefix, upstreamPort)
        started.append(server)
        await server.started()
        return server

    yield start
    for server in started:
        server.stop()


def clientHeaderNames(forwarded: bytes, sent: set[bytes]) -> set[bytes]:
    """The names among C{sent} that reached the upstream, lowercased."""
    head = forwarded.split(b"\r\n\r\n", 1)[0]
    names = {line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]}
    return names & sent


@pytest_twisted.ensureDeferred
async def test_header_names_with_underscores_are_dropped_as_nginx_drops_them(cleanup, nginxFor):
    """nginx's default C{underscores_in_headers off}, and wsproxy's."""
    upstream, factory = listenScripted(ok())
    cleanup.port(upstream)
    port = upstream.getHost().port
    nginx = await nginxFor(port)
    proxy = await startProxyFor(cleanup, port)
    request = (
        b"GET /h HTTP/1.1\r\nHost: example.com\r\nX_Forwarded_For: 6.6.6.6\r\nMy_Header: a\r\n"
        b"My-Header: b\r\nX-Custom: c\r\nConnection: close\r\n\r\n"
    )
    sent = {b"x_forwarded_for", b"my_header", b"my-header", b"x-custom"}

    viaNginx = await nginx.connect()
    viaNginx.transport.write(request)
    assert (await viaNginx.waitClosed()).startswith(b"HTTP/1.1 200 ")
    viaProxy = await proxyClient(proxy)
    viaProxy.transport.write(request)
    assert (await viaProxy.waitClosed()).startswith(b"HTTP/1.1 200 ")

    fromNginx, fromProxy = (clientHeaderNames(forwarded, sent) for forwarded in factory.requests)
    assert fromNginx == {b"my-header", b"x-custom"}, "what nginx does here"
    assert fromProxy == fromNginx


@pytest_twisted.ensureDeferred
async def test_a_client_gone_before_the_response_is_logged_499_as_nginx_logs_it(cleanup, nginxFor):
    upstream, factory = listenScripted(lambda request, connection: None)  # never answers
    cleanup.port(upstream)
    port = upstream.getHost().port
    nginx = await nginxFor(port)
    proxy = await startProxyFor(cleanup, port, access_log=True)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for connect in (nginx.connect, lambda: proxyClient(proxy)):
            client = await connect()
            seen = len(factory.requests)
            client.transport.write(b"GET /slow HTTP/1.1\r\nHost: example.com\r\n\r\n")
            assert await until(lambda seen=seen: len(factory.requests) > seen)
            client.transport.loseConnection()
            await client.closed
        assert await until(lambda: nginx.statuses()[:1] == ["499"], 5), nginx.statuses()
        assert await until(lambda: any(e.get("log_namespace") == "wsproxy.access" for e in events))
    finally:
        globalLogPublisher.removeObserver(events.append)
    statuses = [event["status"] for event in events if event.get("log_namespace") == "wsproxy.access"]
    assert statuses == [int(nginx.statuses()[0])] == [499]


async def proxyClient(proxy: Any) -> RawClient:
    return await connectRaw(proxy.ports[0])
