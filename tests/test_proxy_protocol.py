"""
The PROXY protocol on real listeners, plain and TLS: headers v1 and v2
built here byte by byte, as a load balancer sends them, ahead of the HTTP
request (and ahead of the TLS handshake).  The address a header carries is
the client's for the forwarding headers, the trusted-proxy check, the
per-address limit, C{ip_hash} and the logs; a connection without a valid
header is closed without an answer.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from support import LOOPBACK, RawClient, listenEcho, listenScripted, ok, sleep, until, upgradeRequest
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import formatEvent, globalLogPublisher

from wsproxy import parseConfig
from wsproxy.config import ConfigError
from wsproxy.listeners import ProxyService, checkReload
from wsproxy.proxyprotocol import InvalidProxyHeader, parseProxyHeader

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
GET = b"GET /where HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


# Headers, as a load balancer writes them


def v1(source: str, port: int = 40000, destination: str | None = None, family: str | None = None) -> bytes:
    """A v1 header: C{PROXY TCP4 SRC DST SPORT DPORT\\r\\n}."""
    version = ipaddress.ip_address(source).version
    family = family or f"TCP{version}"
    destination = destination or ("192.0.2.1" if version == 4 else "2001:db8::1")
    return f"PROXY {family} {source} {destination} {port} 443\r\n".encode("ascii")


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2(source: str | None, port: int = 40000, tlvs: bytes = b"", command: int = 0x21) -> bytes:
    """
    A v2 header: the signature, version 2 and the command, the family and
    transport, the length, then the addresses and ports (and C{tlvs}).
    C{source=None} is the C{LOCAL} command a balancer's health check sends.
    """
    if source is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    address = ipaddress.ip_address(source)
    if address.version == 4:
        family, destination = 0x11, ipaddress.ip_address("192.0.2.1")
    else:
        family, destination = 0x21, ipaddress.ip_address("2001:db8::1")
    body = address.packed + destination.packed + struct.pack("!HH", port, 443) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


#: What AWS's and GCP's balancers add after the addresses: ALPN, authority, a vendor TLV.
SOME_TLVS = tlv(0x01, b"http/1.1") + tlv(0x02, b"example.com") + tlv(0xEA, b"\x01vpce-0123456789abcdef0")


# The site: a proxy listener that expects the header, plain or TLS


class Site:
    """A proxy behind a (simulated) L4 balancer, and an upstream that records what it gets."""

    def __init__(self, cleanup: Any, kind: str, tmp_path: Path) -> None:
        self.cleanup = cleanup
        self.kind = kind
        self.tmp = tmp_path
        self.ca = trustme.CA()
        self.clients: list[RawClient] = []

    @property
    def tls(self) -> bool:
        return self.kind == "tls"

    def certificate(self) -> dict[str, str]:
        leaf = self.ca.issue_cert("localhost")
        certificate, key = self.tmp / "server.pem", self.tmp / "server.key"
        certificate.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return {"ssl_certificate": str(certificate), "ssl_certificate_key": str(key)}

    async def start(self, upstreams: dict[str, Any] | None = None, prefix: bool = True, **block: Any) -> ProxyService:
        """
        The proxy, in front of a scripted upstream (C{self.upstream}) unless
        C{upstreams} says otherwise; C{prefix} asks for the PROXY protocol
        with C{haproxy:}, else with C{proxy_protocol = true}.
        """
        if upstreams is None:
            port, self.upstream = listenScripted(lambda request, connection: ok(b"hello"))
            self.cleanup.port(port)
            upstreams = {"app": {"servers": [f"{LOOPBACK}:{port.getHost().port}"]}}
        listen = f"tcp:0:interface={LOOPBACK}"
        server = {"listen": f"haproxy:{listen}" if prefix else listen, "proxy_pass": "http://app", **block}
        if not prefix:
            server["proxy_protocol"] = True
        if self.tls:
            server.update(self.certificate())
        document = {"upstream": upstreams, "server": [server], "shutdown_timeout": 1}
        service = ProxyService(parseConfig(document, source="(test)"), reactor)
        service.startService()
        self.cleanup.service(service)
        self.port = (await service.listeners[0].listeningPort()).getHost().port
        self.service = service
        return service

    async def connect(self, header: bytes, pace: int = 0) -> RawClient:
        """
        Connect, send C{header} (in pieces of C{pace} bytes, if given), then
        start TLS on a TLS site: the header comes before the handshake.
        """
        client = await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, self.port), RawClient())
        self.cleanup.transport(client.transport)
        self.clients.append(client)
        step = pace or len(header) or 1
        for start in range(0, len(header), step):
            client.transport.write(header[start : start + step])
            if pace:
                await sleep(0.02)
        if self.tls:
            trust = Certificate.loadPEM(self.ca.cert_pem.bytes())
            client.transport.startTLS(optionsForClientTLS("localhost", trustRoot=trust))
        return client

    async def get(self, header: bytes, request: bytes = GET, pace: int = 0) -> bytes:
        """One request after C{header}; everything the proxy sent before it closed."""
        client = await self.connect(header, pace)
        client.transport.write(request)
        received = await client.waitClosed(timeout=10)
        assert received is not None, "the proxy did not close"
        return received

    async def refused(self, data: bytes) -> bytes | None:
        """Send C{data} in place of a header; what came back before the close (None: no close)."""
        client = await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, self.port), RawClient())
        self.cleanup.transport(client.transport)
        client.transport.write(data)
        return await client.waitClosed(timeout=10)

    def forwarded(self, name: bytes) -> bytes | None:
        """A header of the last request the upstream received."""
        head = self.upstream.requests[-1].partition(b"\r\n\r\n")[0]
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


@pytest.fixture(params=["plain", "tls"])
def site(request: Any, cleanup: Any, tmp_path: Path) -> Site:
    return Site(cleanup, request.param, tmp_path)


@pytest.fixture
def logged():
    """Every log event's text while the test runs."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


# The address a header carries is the client's


@pytest.mark.parametrize(
    "header, client",
    [
        (v1("203.0.113.7"), b"203.0.113.7"),
        (v1("2001:db8:0:0:0:0:0:7"), b"2001:db8::7"),
        (v2("203.0.113.7"), b"203.0.113.7"),
        (v2("2001:db8:0:0:0:0:0:7"), b"2001:db8::7"),
        (v2("203.0.113.7", tlvs=SOME_TLVS), b"203.0.113.7"),
        (v2("2001:db8::7", tlvs=SOME_TLVS), b"2001:db8::7"),
    ],
    ids=["v1-ipv4", "v1-ipv6", "v2-ipv4", "v2-ipv6", "v2-ipv4-tlvs", "v2-ipv6-tlvs"],
)
@pytest_twisted.ensureDeferred
async def test_the_header_address_is_forwarded_as_the_client(site, logged, header, client):
    await site.start(proxy_set_header={"X-Client": "$remote_addr port $remote_port"}, access_log=True)
    response = await site.get(header)
    assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"hello")
    assert site.forwarded(b"x-forwarded-for") == client
    assert site.forwarded(b"x-real-ip") == client
    assert site.forwarded(b"x-client") == client + b" port 40000"
    assert site.forwarded(b"x-forwarded-proto") == (b"https" if site.tls else b"http")
    assert await until(lambda: any('"GET /where" 200' in line for line in logged))
    [line] = [line for line in logged if '"GET /where" 200' in line]
    assert line.startswith(client.decode())


@pytest_twisted.ensureDeferred
async def test_the_key_proxy_protocol_is_the_same_as_the_prefix(site):
    await site.start(prefix=False)
    response = await site.get(v2("198.51.100.9"))
    assert response.startswith(b"HTTP/1.1 200 ")
    assert site.forwarded(b"x-forwarded-for") == b"198.51.100.9"


@pytest_twisted.ensureDeferred
async def test_a_header_in_many_reads_then_the_request_in_the_same_read(site):
    await site.start()
    paced = await site.get(v2("203.0.113.9", tlvs=SOME_TLVS), pace=5)
    assert paced.startswith(b"HTTP/1.1 200 ")
    assert site.forwarded(b"x-forwarded-for") == b"203.0.113.9"
    paced = await site.get(v1("203.0.113.10"), pace=3)
    assert paced.startswith(b"HTTP/1.1 200 ")
    assert site.forwarded(b"x-forwarded-for") == b"203.0.113.10"
    if not site.tls:
        together = await site.get(v1("203.0.113.11") + GET)
        assert together.startswith(b"HTTP/1.1 200 ")
        assert site.forwarded(b"x-forwarded-for") == b"203.0.113.11"


@pytest_twisted.ensureDeferred
async def test_the_local_command_and_unknown_keep_the_connections_own_address(site):
    await site.start()
    assert (await site.get(v2(None, tlvs=SOME_TLVS))).startswith(b"HTTP/1.1 200 ")
    assert site.forwarded(b"x-forwarded-for") == LOOPBACK.encode()
    assert (await site.get(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")).startswith(b"HTTP/1.1 200 ")
    assert site.forwarded(b"x-forwarded-for") == LOOPBACK.encode()


@pytest_twisted.ensureDeferred
async def test_set_real_ip_from_trusts_the_header_address_not_the_balancer(site):
    await site.start(set_real_ip_from=["203.0.113.0/24"])
    forged = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 198.51.100.1\r\nConnection: close\r\n\r\n"
    assert (await site.get(v1("203.0.113.7"), forged)).startswith(b"HTTP/1.1 200 ")
    assert site.forwarded(b"x-forwarded-for") == b"198.51.100.1, 203.0.113.7"
    # The balancer itself (127.0.0.1) is not trusted, and counts for nothing.
    assert (await site.get(v1("192.0.2.50"), forged)).startswith(b"HTTP/1.1 200 ")
    assert site.forwarded(b"x-forwarded-for") == b"192.0.2.50"


@pytest_twisted.ensureDeferred
async def test_a_websocket_tunnel_runs_behind_the_header(site):
    echo = site.cleanup.port(listenEcho())
    await site.start({"app": {"servers": [f"{LOOPBACK}:{echo.getHost().port}"]}})
    client = await site.connect(v2("203.0.113.7", tlvs=SOME_TLVS))
    client.transport.write(upgradeRequest(b"/ws"))
    received = await client.waitFor(b"\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 101 ")
    mask = b"\x11\x22\x33\x44"
    payload = b"behind a balancer"
    client.transport.write(
        bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )
    assert payload in await client.waitFor(payload)
    factory = site.service.listeners[0].proxyFactory
    assert [leg.clientAddress for leg in factory.connections] == ["203.0.113.7"]


# Limits and balancing count the header address


@pytest_twisted.ensureDeferred
async def test_max_connections_per_ip_counts_the_header_address(site):
    await site.start(max_connections_per_ip=1)
    held = await site.connect(v1("203.0.113.7"))
    held.transport.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert b"hello" in await held.waitFor(b"hello")
    factory = site.service.listeners[0].proxyFactory
    assert factory.perAddress == {"203.0.113.7": 1}
    again = await site.get(v1("203.0.113.7", port=40001))
    assert again.startswith(b"HTTP/1.1 503 ")
    other = await site.get(v2("203.0.113.8"))
    assert other.startswith(b"HTTP/1.1 200 ")
    assert not held.closed.called


@pytest_twisted.ensureDeferred
async def test_ip_hash_keys_on_the_header_address(site):
    names = {}
    upstreams = {}
    for name in ("a", "b"):
        port, factory = listenScripted(lambda request, connection, name=name: ok(name.encode()))
        site.cleanup.port(port)
        names[name] = factory
        upstreams[f"{LOOPBACK}:{port.getHost().port}"] = name
    await site.start({"app": {"servers": list(upstreams), "balance": "ip_hash"}})
    chosen = {}
    for network in range(16):
        # Every connection comes from 127.0.0.1; only the header tells them apart.
        source = f"10.{network}.0.1"
        first = await site.get(v1(source))
        second = await site.get(v2(source.replace(".0.1", ".0.200")))
        assert first.rsplit(b"\r\n\r\n", 1)[1] == second.rsplit(b"\r\n\r\n", 1)[1]
        chosen[source] = first.rsplit(b"\r\n\r\n", 1)[1]
    assert set(chosen.values()) == {b"a", b"b"}


# No header, a malformed header, no header in time


@pytest_twisted.ensureDeferred
async def test_a_connection_without_a_header_is_closed_unanswered(site):
    await site.start()
    if site.tls:
        # A TLS client that starts its handshake at once.
        trust = Certificate.loadPEM(site.ca.cert_pem.bytes())
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=trust), TCP4ClientEndpoint(reactor, LOOPBACK, site.port)
        )
        client = await connectProtocol(endpoint, RawClient())
        client.transport.write(GET)
        assert await client.waitClosed(timeout=10) == b""
    else:
        assert await site.refused(GET) == b""
    assert site.upstream.requests == []
    assert site.service.listeners[0].proxyFactory.connections == set()


MALFORMED = {
    "v1-bad-address": b"PROXY TCP4 203.0.113.999 192.0.2.1 40000 443\r\n",
    "v1-ipv6-as-tcp4": b"PROXY TCP4 2001:db8::7 192.0.2.1 40000 443\r\n",
    "v1-bad-port": b"PROXY TCP4 203.0.113.7 192.0.2.1 4x000 443\r\n",
    "v1-port-too-big": b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 443\r\n",
    "v1-missing-field": b"PROXY TCP4 203.0.113.7 192.0.2.1 40000\r\n",
    "v1-bad-family": b"PROXY UDP4 203.0.113.7 192.0.2.1 40000 443\r\n",
    "v1-too-long": b"PROXY TCP6 " + b"f" * 120 + b"\r\n",
    "v1-lowercase": b"proxy TCP4 203.0.113.7 192.0.2.1 40000 443\r\n",
    "v2-version-1": V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,
    "v2-bad-command": V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,
    "v2-short-ipv4": V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,
    "v2-short-ipv6": V2_SIGNATURE + b"\x21\x21\x00\x0c" + b"\x00" * 12,
    "v2-bad-signature": V2_SIGNATURE[:-1] + b"X" + b"\x21\x11\x00\x0c" + b"\x00" * 12,
}


@pytest.mark.parametrize("header", list(MALFORMED.values()), ids=list(MALFORMED))
@pytest_twisted.ensureDeferred
async def test_a_malformed_header_is_closed_unanswered(site, logged, header):
    await site.start()
    assert await site.refused(header + GET) == b""
    assert site.upstream.requests == []
    assert any("refused:" in line and "connection closed" in line for line in logged)


@pytest_twisted.ensureDeferred
async def test_no_header_within_client_header_timeout_is_closed(site, logged):
    await site.start(client_header_timeout=0.3)
    client = await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, site.port), RawClient())
    site.cleanup.transport(client.transport)
    client.transport.write(V2_SIGNATURE[:6])
    assert await client.waitClosed(timeout=10) == b""
    assert any("no PROXY protocol header within 0.3s" in line for line in logged)


@pytest_twisted.ensureDeferred
async def test_stopping_the_listener_drops_connections_still_owing_their_header(site):
    await site.start()
    client = await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, site.port), RawClient())
    site.cleanup.transport(client.transport)
    client.transport.write(b"PROXY TCP4 ")
    await site.service.stopService()
    assert await client.waitClosed(timeout=10) == b""


# The header parser on its own: every prefix of a header asks for more


@pytest.mark.parametrize(
    "header",
    [v1("203.0.113.7"), v1("2001:db8::7"), v2("203.0.113.7", tlvs=SOME_TLVS), v2("::1"), v2(None)],
    ids=["v1-ipv4", "v1-ipv6", "v2-ipv4-tlvs", "v2-ipv6", "v2-local"],
)
def test_every_prefix_of_a_header_needs_more(header):
    for end in range(1, len(header)):
        assert parseProxyHeader(header[:end]) is None, end
    source, length = parseProxyHeader(header + b"GET")
    assert length == len(header)


def test_anything_else_is_refused_at_its_first_byte():
    for data in (b"G", b"\x16\x03\x01", b"PROXZ", b"\r\n\r\n\x00\r\nQUIX"):
        with pytest.raises(InvalidProxyHeader):
            parseProxyHeader(data)


# Configuration


def document(*servers: dict[str, Any]) -> dict[str, Any]:
    return {"upstream": {"app": {"servers": ["127.0.0.1:9"]}}, "server": list(servers)}


def test_blocks_on_one_address_agree_on_proxy_protocol():
    with pytest.raises(ConfigError) as error:
        parseConfig(
            document(
                {"listen": "tcp:8080", "server_name": "a", "proxy_pass": "http://app", "proxy_protocol": True},
                {"listen": "tcp:8080", "server_name": "b", "proxy_pass": "http://app"},
            ),
            source="wsproxy.toml",
        )
    assert str(error.value) == (
        "wsproxy.toml: server[1].proxy_protocol: 'tcp:8080' is shared by server[0] and server[1], but only "
        "server[0] has proxy_protocol = true (server[1] does not): blocks on one address must agree on it"
    )
    assert "\n" not in str(error.value)
    prefixed = parseConfig(
        document(
            {"listen": "haproxy:tcp:8080", "server_name": "a", "proxy_pass": "http://app"},
            {"listen": "haproxy:tcp:8080", "server_name": "b", "proxy_pass": "http://app", "proxy_protocol": True},
        )
    )
    assert len(prefixed.addresses) == 1


def test_proxy_protocol_is_a_server_key_and_a_boolean():
    with pytest.raises(ConfigError, match=re.escape("server[0].proxy_protocol: expected a boolean, got str")):
        parseConfig(document({"listen": "tcp:8080", "proxy_pass": "http://app", "proxy_protocol": "yes"}))
    location = {"location": [{"match": "/", "proxy_pass": "http://app", "proxy_protocol": True}]}
    with pytest.raises(ConfigError, match=re.escape("proxy_protocol: unknown key")):
        parseConfig(document({"listen": "tcp:8080", **location}))


def test_turning_the_proxy_protocol_on_or_off_needs_a_restart():
    running = parseConfig(document({"listen": "tcp:8080", "proxy_pass": "http://app"}))
    toggled = parseConfig(document({"listen": "tcp:8080", "proxy_pass": "http://app", "proxy_protocol": True}))
    with pytest.raises(ConfigError, match=re.escape("server[0].proxy_protocol: turning the PROXY protocol on or off")):
        checkReload(running, toggled)
    checkReload(toggled, toggled)
