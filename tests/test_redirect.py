"""
The plain-HTTP redirect listener on a real socket: where the C{Location}
points for every kind of request, which requests get a 400 instead (never
a redirect somewhere an attacker chose), keep-alive, and the ACME HTTP-01
challenge files served from C{acme_challenge_root}.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support import connectRaw, exchange, startProxy, stillAfter, until
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from wsproxy import parseConfig
from wsproxy.config import ConfigError
from wsproxy.router import AddressSettings
from wsproxy.server import PIPELINE_BUFFER, ProxyFactory

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
UPSTREAMS = {"app": {"servers": ["127.0.0.1:9"]}}


def headers(response: bytes) -> dict[bytes, bytes]:
    head = response.split(b"\r\n\r\n", 1)[0]
    return {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]}


def responses(data: bytes) -> list[bytes]:
    """Split a stream of responses, each framed by Content-Length."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(headers(head + b"\r\n\r\n").get(b"content-length", b"0"))
        found.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return found


async def redirector(cleanup, target: str = "308 https://$host:8443$request_uri", **block: Any) -> int:
    service = cleanup.service(await startProxy(UPSTREAMS, {"return": target, **block}))
    return service.ports[0]


def request(
    target: bytes = b"/",
    host: bytes | None = b"example.com",
    method: bytes = b"GET",
    version: bytes = b"HTTP/1.1",
    extra: bytes = b"Connection: close\r\n",
) -> bytes:
    hostLine = b"Host: " + host + b"\r\n" if host is not None else b""
    return b"%b %b %b\r\n%b%b\r\n" % (method, target, version, hostLine, extra)


# Where the redirect points


@pytest.mark.parametrize(
    "target, host, location",
    [
        (b"/", b"example.com", b"https://example.com:8443/"),
        (b"/a/b?x=1&y=%20z", b"Example.COM:8080", b"https://example.com:8443/a/b?x=1&y=%20z"),
        (b"/?next=//evil.example", b"example.com", b"https://example.com:8443/?next=//evil.example"),
        (b"//evil.example/x", b"example.com", b"https://example.com:8443//evil.example/x"),
        (b"/p", b"[::1]:8080", b"https://[::1]:8443/p"),
        (b"/p", b"192.0.2.7", b"https://192.0.2.7:8443/p"),
        (b"/p", b"example.com.", b"https://example.com.:8443/p"),
        (b"http://other.example/q?r", b"example.com", b"https://other.example:8443/q?r"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_location_keeps_the_target_and_swaps_the_port(cleanup, target: bytes, host: bytes, location: bytes):
    port = await redirector(cleanup)
    response = await exchange(port, request(target, host))
    assert response.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n")
    assert headers(response)[b"location"] == location


@pytest.mark.parametrize(
    "template, location",
    [
        ("301 $scheme://$host$request_uri", b"http://example.com/x?y"),
        ("302 https://${host}:${server_port}${request_uri}", None),
        ("307 https://$server_name$request_uri", b"https://canonical.example/x?y"),
        ("308 https://example.net/moved", b"https://example.net/moved"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_nginx_variables(cleanup, template, location):
    port = await redirector(cleanup, template, server_name="canonical.example")
    response = await exchange(port, request(b"/x?y"))
    expected = location if location is not None else b"https://example.com:%d/x?y" % port
    assert headers(response)[b"location"] == expected


@pytest.mark.parametrize("listenerName, expected", [("", b"127.0.0.1"), ("www.example.org", b"www.example.org")])
@pytest_twisted.ensureDeferred
async def test_http10_without_host_uses_the_listener_name(cleanup, listenerName, expected):
    port = await redirector(cleanup, server_name=listenerName)
    response = await exchange(port, request(b"/old?q=1", host=None, version=b"HTTP/1.0", extra=b""))
    assert response.startswith(b"HTTP/1.1 308 ")
    assert headers(response)[b"location"] == b"https://%b:8443/old?q=1" % expected
    assert headers(response)[b"connection"] == b"close"


@pytest.mark.parametrize(
    "host",
    [
        b"evil.example/x",
        b"good.example@evil.example",
        b"evil.example\\good.example",
        b"good example",
        b"good.example\x01",
        b"good\x7f.example",
        b"%65vil.example",
        b"good_host.example",
        b"-good.example",
        b"a" * 64 + b".example",
        b".".join([b"a" * 63] * 4) + b".ab",
        b"good.example:8080:9",
        b"[::1",
        b"",
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_host_that_is_not_a_plain_name_is_400_without_location(cleanup, host):
    port = await redirector(cleanup)
    response = await exchange(port, request(b"/", host))
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"location" not in headers(response)
    assert b"evil" not in response.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    "line",
    [
        b"GET http://user@evil.example/ HTTP/1.1",
        b"GET evil.example/ HTTP/1.1",
        b"GET /a b HTTP/1.1",
        b"GET /\x00 HTTP/1.1",
        b"GET / HTTP/2.0",
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_malformed_request_line_is_refused(cleanup, line):
    port = await redirector(cleanup)
    response = await exchange(port, line + b"\r\nHost: example.com\r\n\r\n")
    assert response.split(b" ", 2)[1] in (b"400", b"505")
    assert b"location" not in headers(response)


@pytest.mark.parametrize(
    "code, phrase",
    [
        (301, b"Moved Permanently"),
        (302, b"Found"),
        (303, b"See Other"),
        (307, b"Temporary Redirect"),
        (308, b"Permanent Redirect"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_redirect_codes(cleanup, code, phrase):
    port = await redirector(cleanup, f"{code} https://$host$request_uri")
    response = await exchange(port, request(b"/x"))
    assert response.startswith(b"HTTP/1.1 %d %b\r\n" % (code, phrase))
    assert headers(response)[b"location"] == b"https://example.com/x"


@pytest.mark.parametrize(
    "method", [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE", b"PROPFIND"]
)
@pytest_twisted.ensureDeferred
async def test_every_method_is_answered(cleanup, method):
    port = await redirector(cleanup)
    body = b"" if method in (b"GET", b"HEAD") else b"Content-Length: 4\r\n"
    data = request(b"/form", method=method, extra=b"Connection: close\r\n" + body)
    response = await exchange(port, data + (b"data" if body else b""))
    assert response.startswith(b"HTTP/1.1 308 ")
    assert headers(response)[b"location"] == b"https://example.com:8443/form"
    payload = response.split(b"\r\n\r\n", 1)[1]
    assert len(payload) == (0 if method == b"HEAD" else int(headers(response)[b"content-length"]))
    assert len(payload) < 128


@pytest_twisted.ensureDeferred
async def test_options_asterisk_and_connect(cleanup):
    port = await redirector(cleanup)
    response = await exchange(port, request(b"*", method=b"OPTIONS"))
    assert headers(response)[b"location"] == b"https://example.com:8443/"
    response = await exchange(port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 405 ")
    assert b"location" not in headers(response)


# Connections


@pytest_twisted.ensureDeferred
async def test_keep_alive_and_pipelining(cleanup):
    port = await redirector(cleanup)
    client = await connectRaw(port)
    cleanup.transport(client.transport)
    keep = b"Connection: keep-alive\r\n"
    client.transport.write(request(b"/1", extra=b"") + request(b"/2", extra=b"") + b"\r\n")
    both = await client.waitFor(lambda data: len(responses(data)) == 2 and data.endswith(b"/2\n"))
    first, second = responses(both)
    assert headers(first)[b"location"].endswith(b"/1") and headers(second)[b"location"].endswith(b"/2")
    assert b"connection" not in headers(first)
    client.transport.write(request(b"/3", version=b"HTTP/1.0", extra=keep))
    third = responses(await client.waitFor(lambda data: len(responses(data)) == 3))[2]
    assert headers(third)[b"connection"] == b"keep-alive"
    client.transport.write(request(b"/4"))
    everything = await client.waitClosed()
    assert everything is not None and headers(responses(everything)[3])[b"connection"] == b"close"


@pytest_twisted.ensureDeferred
async def test_many_pipelined_requests_in_one_write(cleanup):
    port = await redirector(cleanup)
    data = request(b"/n", extra=b"") * 2000 + request(b"/last")
    response = await exchange(port, data, timeout=10)
    assert len(responses(response)) == 2001


@pytest_twisted.ensureDeferred
async def test_a_request_with_a_body_is_answered_then_closed(cleanup):
    port = await redirector(cleanup)
    client = await connectRaw(port)
    client.transport.write(request(b"/f", method=b"POST", extra=b"Content-Length: 5\r\n") + b"hello")
    response = await client.waitClosed()
    assert response is not None and headers(response)[b"connection"] == b"close"


@pytest_twisted.ensureDeferred
async def test_idle_and_slow_connections_are_closed(cleanup):
    port = await redirector(cleanup, keepalive_timeout="200ms", client_header_timeout="200ms")
    idle = await connectRaw(port)
    idle.transport.write(request(b"/", extra=b""))
    started = time.monotonic()
    answered = await idle.waitClosed()
    assert answered is not None and answered.startswith(b"HTTP/1.1 308 ")
    assert time.monotonic() - started < 2
    slow = await connectRaw(port)
    slow.transport.write(b"GET / HTTP/1.1\r\nHost: exa")
    # The same request loop as the proxy listener's: a head cut short is told why.
    assert (await slow.waitClosed()).startswith(b"HTTP/1.1 408 ")


# HSTS


@pytest_twisted.ensureDeferred
async def test_no_hsts_on_the_plain_http_listener(cleanup):
    warnings: list[str] = []
    observer = lambda event: warnings.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        port = await redirector(
            cleanup, add_header={"Strict-Transport-Security": "max-age=31536000", "X-Served-By": "wsproxy"}
        )
    finally:
        globalLogPublisher.removeObserver(observer)
    for data in (request(b"/"), request(b"/?x", host=b"bad/host")):
        response = await exchange(port, data)
        assert b"strict-transport-security" not in headers(response)
        assert headers(response)[b"x-served-by"] == b"wsproxy"
    assert any("RFC 6797" in line for line in warnings)


# ACME HTTP-01


@pytest.fixture
def webroot(tmp_path: Path) -> Path:
    """A certbot webroot with one challenge, next to a secret the proxy must never serve."""
    root = tmp_path / "www"
    challenges = root / ".well-known" / "acme-challenge"
    challenges.mkdir(parents=True)
    (challenges / TOKEN).write_text(TOKEN + ".thumbprint")
    (tmp_path / "secret").write_text("private key material")
    (root / "secret").write_text("private key material")
    (challenges / "linked").symlink_to(tmp_path / "secret")
    (challenges / "directory").mkdir()
    return root


@pytest_twisted.ensureDeferred
async def test_challenge_files_are_served_instead_of_the_redirect(cleanup, webroot):
    port = await redirector(cleanup, acme_challenge_root=str(webroot))
    path = b"/.well-known/acme-challenge/" + TOKEN.encode()
    response = await exchange(port, request(path))
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\n" + TOKEN.encode() + b".thumbprint")
    head = await exchange(port, request(path, method=b"HEAD"))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert headers(head)[b"content-length"] == str(len(TOKEN) + 11).encode()
    post = await exchange(port, request(path, method=b"POST", extra=b"Content-Length: 0\r\n"))
    assert post.startswith(b"HTTP/1.1 405 ") and headers(post)[b"allow"] == b"GET, HEAD"
    other = await exchange(port, request(b"/.well-known/other"))
    assert other.startswith(b"HTTP/1.1 308 ")


@pytest.mark.parametrize(
    "token",
    [
        b"missing",
        b"../secret",
        b"../../secret",
        b"%2e%2e/secret",
        b"%2E%2E%2Fsecret",
        b"..%2fsecret",
        b"..%5csecret",
        b"..\\secret",
        b"a/../../secret",
        b"%2fetc%2fpasswd",
        b"/etc/passwd",
        b".",
        b"",
        b"linked",
        b"directory",
    ],
)
@pytest_twisted.ensureDeferred
async def test_challenge_traversal_is_404(cleanup, webroot, token):
    port = await redirector(cleanup, acme_challenge_root=str(webroot))
    response = await exchange(port, request(b"/.well-known/acme-challenge/" + token))
    assert response.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"private key material" not in response


# Configuration


@pytest.mark.parametrize(
    "block, problem",
    [
        ({"return": "308 https://$host$uri"}, "server[0].return: unknown variable $uri"),
        ({"return": "308 https://bücher.example/"}, "server[0].return: the URL must be ASCII"),
        ({"return": "200 https://example.com/"}, 'server[0].return: expected "CODE URL"'),
        ({"proxy_pass": "http://app", "acme_challenge_root": "/"}, "server[0].acme_challenge_root: only a redirect"),
        (
            {"return": "308 https://$host/", "acme_challenge_root": "/nonexistent/dir"},
            "server[0].acme_challenge_root: not a directory",
        ),
    ],
)
def test_redirect_configuration_errors_name_the_key(block, problem):
    with pytest.raises(ConfigError) as caught:
        parseConfig({"upstream": UPSTREAMS, "server": [{"listen": "tcp:0", **block}]}, source="test.toml")
    assert str(caught.value).startswith("test.toml: " + problem)
    assert "\n" not in str(caught.value)


def test_no_file_under_the_webroot_is_reachable_except_challenges(webroot):
    """The fixture's secret really is there, so the traversal tests above prove something."""
    assert (webroot / "secret").is_file() and os.path.islink(webroot / ".well-known" / "acme-challenge" / "linked")


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_its_answers_is_paused(cleanup):
    port = await redirector(cleanup)
    client = await connectRaw(port)
    client.transport.pauseProducing()
    client.transport.write(b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n" * 60000)
    connections = lambda: [  # noqa: E731
        protocol
        for service in cleanup.services
        for listener in service.listeners
        for protocol in listener.proxyFactory.connections
    ]
    assert await until(connections), "the redirector has the connection"
    (connection,) = connections()
    transport = connection.transport
    # For 1 s the client reads nothing while its requests keep coming: the answers must not pile up.
    assert await stillAfter(1.0, lambda: len(transport.dataBuffer) + transport._tempDataLen < 2 * 1024 * 1024)
    client.transport.resumeProducing()
    received = await client.waitFor(lambda r: r.count(b"HTTP/1.1 308 ") == 60000, timeout=30)
    assert received.count(b"HTTP/1.1 308 ") == 60000
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_raw_non_ascii_target_is_redirected_percent_encoded(cleanup):
    """With the access log on: writing the raw target to it once raised and dropped the connection."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        port = await redirector(cleanup, access_log=True)
        response = await exchange(port, request(b"/caf\xc3\xa9?q=\xff"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert response.startswith(b"HTTP/1.1 308 ")
    assert headers(response)[b"location"] == b"https://example.com:8443/caf%C3%A9?q=%FF"
    assert not [event for event in events if "log_failure" in event]
    assert any(event.get("location") == "https://example.com:8443/caf%C3%A9?q=%FF" for event in events)


def test_one_answer_at_a_time_while_the_client_does_not_read():
    """
    Pipelined requests from a client that does not read its answers are
    not all answered at once: answering stops while the write buffer is
    full, and reading stops once the unanswered requests pass the bound.
    """
    config = parseConfig({"server": [{"listen": "tcp:0", "return": "308 https://$host$request_uri"}]}, "(test)")
    (address,) = config.addresses
    factory = ProxyFactory(AddressSettings(config, address, {}, MemoryReactorClock(), secure=False))
    leg = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport()
    leg.makeConnection(transport)
    one = request(b"/n", extra=b"")
    leg.dataReceived(one * 3)
    assert transport.value().count(b"HTTP/1.1 308 ") == 3
    leg.pauseProducing()  # what the transport says when its buffer is full
    leg.dataReceived(one * 2000)
    assert transport.value().count(b"HTTP/1.1 308 ") == 3, "no answer while the buffer is full"
    assert leg.gate.held and transport.producerState == "paused", "reading stops past the bound"
    assert leg.loop.cycle.buffered == len(one) * 2000 > PIPELINE_BUFFER
    leg.resumeProducing()
    assert transport.value().count(b"HTTP/1.1 308 ") == 2003
