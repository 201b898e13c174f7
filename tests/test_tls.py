"""
The TLS listener on real sockets with real TLS: certificates are made for
each test with trustme, clients are Python's C{ssl} module (run in a
thread, because it blocks), Twisted's own TLS client, C{openssl s_client}
and autobahn; upstreams are real servers on loopback, some behind TLS too.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography import x509
from support import (
    LOOPBACK,
    RawClient,
    ScriptedUpstream,
    connectRaw,
    listenEcho,
    listeningPortsOf,
    listenScripted,
    ok,
    sleep,
    startProxy,
    stillAfter,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from wsproxy import tap
from wsproxy.config import Upstream, UpstreamAddress
from wsproxy.tls import WATCH_INTERVAL, describeTLSFailure, upstreamTLSOptions

REPO = Path(__file__).resolve().parent.parent
GET_CLOSE = b"GET /page HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
WS_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + WS_KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
HSTS = "max-age=31536000"
TLS12_CLIENT_ORDER = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"


# Certificates


@dataclass
class PKI:
    """A test CA and the files of the certificates it issued."""

    ca: trustme.CA
    directory: Path

    @property
    def caFile(self) -> str:
        path = self.directory / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return str(path)

    @property
    def caPEM(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def issue(self, stem: str, *identities: str, ca: trustme.CA | None = None) -> tuple[str, str, int]:
        """Write C{stem}.pem (chain, leaf first) and C{stem}.key; return their paths and the leaf's serial."""
        leaf = (ca or self.ca).issue_cert(*identities)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        certificate, key = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        _replace(certificate, chain)
        _replace(key, leaf.private_key_pem.bytes())
        return str(certificate), str(key), x509.load_pem_x509_certificate(chain).serial_number


def _replace(path: Path, data: bytes) -> None:
    """Write C{path} the way certbot and most deploy hooks do: a new file renamed into place."""
    temporary = path.with_suffix(path.suffix + ".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(trustme.CA(), tmp_path)


@pytest.fixture
def logged():
    """Every log event's text while the test runs."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


# Clients


@dataclass
class Handshake:
    version: str
    cipher: str
    reused: bool
    session: ssl.SSLSession | None
    alpn: str | None
    serial: int
    response: bytes


class TLSClient:
    """
    Python's C{ssl} module as a client, in a thread.  One instance keeps one
    C{SSLContext}, so that a session from one connection can resume on the
    next.
    """

    def __init__(
        self,
        caFile: str,
        minimum: ssl.TLSVersion | None = None,
        maximum: ssl.TLSVersion | None = None,
        ciphers: str | None = None,
        alpn: list[str] | None = None,
        tickets: bool = True,
    ) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(caFile)
        if minimum is not None and minimum < ssl.TLSVersion.TLSv1_2:
            # The client must be able to speak the old versions, so that
            # refusing them is the server's doing.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
        if ciphers is not None:
            context.set_ciphers(ciphers)
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        if not tickets:
            context.options |= ssl.OP_NO_TICKET
        self.context = context

    def connect(
        self,
        port: int,
        serverName: str | None = "localhost",
        session: ssl.SSLSession | None = None,
        request: bytes = GET_CLOSE,
    ) -> Deferred:
        """Handshake, send C{request}, read until the server closes; fire with a L{Handshake}."""
        return deferToThread(self._connect, port, serverName, session, request)

    def _connect(self, port: int, serverName: str | None, session: ssl.SSLSession | None, request: bytes) -> Handshake:
        self.context.check_hostname = serverName is not None
        with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
            with self.context.wrap_socket(raw, server_hostname=serverName, session=session) as tls:
                response = b""
                if request:
                    tls.sendall(request)
                    while chunk := tls.recv(65536):
                        response += chunk
                der = tls.getpeercert(binary_form=True)
                return Handshake(
                    version=tls.version() or "",
                    cipher=tls.cipher()[0],
                    reused=tls.session_reused,
                    session=tls.session,
                    alpn=tls.selected_alpn_protocol(),
                    serial=x509.load_der_x509_certificate(der).serial_number,
                    response=response,
                )


async def connectTLS(port: int, caPEM: bytes, name: str = "localhost") -> RawClient:
    """Twisted's TLS client, verifying C{name}, with a raw byte protocol on top."""
    options = optionsForClientTLS(name, trustRoot=Certificate.loadPEM(caPEM))
    return await connectProtocol(wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOOPBACK, port)), RawClient())


def headers(response: bytes) -> dict[bytes, bytes]:
    head = response.split(b"\r\n\r\n", 1)[0]
    return {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]}


def maskedText(payload: bytes, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """A client's WebSocket text frame (RFC 6455 §5.3), payload under 126 bytes."""
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# Proxies


async def tlsProxy(cleanup, pki: PKI, upstreamPort: int, **block: Any):
    """A TLS listener for "localhost" and 127.0.0.1 in front of C{upstreamPort}."""
    if "ssl_certificate" not in block:
        certificate, key, _ = pki.issue("server", "localhost", "127.0.0.1")
        block = {"ssl_certificate": certificate, "ssl_certificate_key": key, **block}
    upstreams = {"app": {"servers": [f"{LOOPBACK}:{upstreamPort}"]}}
    return cleanup.service(await startProxy(upstreams, {"proxy_pass": "http://app", **block}))


async def okUpstream(cleanup, body: bytes = b"hello") -> tuple[int, ScriptedUpstream]:
    port, factory = listenScripted(lambda request, connection: ok(body))
    cleanup.port(port)
    return port.getHost().port, factory


# Protocol versions and ciphers


@pytest_twisted.ensureDeferred
async def test_tls12_and_tls13_accepted_by_default(cleanup, pki):
    upstream, _ = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        result = await TLSClient(pki.caFile, minimum=version, maximum=version).connect(proxy.ports[0])
        assert result.version == {"TLSv1.2": "TLSv1.2", "TLSv1.3": "TLSv1.3"}[version.name.replace("_", ".")]
        assert result.response.startswith(b"HTTP/1.1 200 OK\r\n") and result.response.endswith(b"hello")


@pytest_twisted.ensureDeferred
async def test_tls10_and_tls11_refused_by_default(cleanup, pki, logged):
    upstream, factory = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream)
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        client = TLSClient(pki.caFile, minimum=version, maximum=version)
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
            await client.connect(proxy.ports[0])
    assert factory.requests == []
    assert not any("RFC 8996" in line for line in logged)


@pytest_twisted.ensureDeferred
async def test_legacy_versions_only_when_configured_with_a_warning(cleanup, pki, logged):
    upstream, _ = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream, ssl_protocols=["TLSv1", "TLSv1.2"])
    assert any("TLSv1" in line and "RFC 8996" in line for line in logged)
    legacy = await TLSClient(pki.caFile, minimum=ssl.TLSVersion.TLSv1, maximum=ssl.TLSVersion.TLSv1).connect(
        proxy.ports[0]
    )
    assert legacy.version == "TLSv1" and legacy.response.endswith(b"hello")
    # A list with a gap does not allow what lies between its ends (the
    # server answers with TLSv1, which this client refuses).
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL"):
        await TLSClient(pki.caFile, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1).connect(
            proxy.ports[0]
        )
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        await TLSClient(pki.caFile, minimum=ssl.TLSVersion.TLSv1_3).connect(proxy.ports[0])


@pytest_twisted.ensureDeferred
async def test_server_cipher_preference_honoured(cleanup, pki):
    upstream, _ = await okUpstream(cleanup)
    serverOrder = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256"
    client = TLSClient(pki.caFile, maximum=ssl.TLSVersion.TLSv1_2, ciphers=TLS12_CLIENT_ORDER)
    preferring = await tlsProxy(cleanup, pki, upstream, ssl_ciphers=serverOrder, ssl_prefer_server_ciphers=True)
    assert (await client.connect(preferring.ports[0])).cipher == "ECDHE-ECDSA-AES256-GCM-SHA384"
    following = await tlsProxy(cleanup, pki, upstream, ssl_ciphers=serverOrder, ssl_prefer_server_ciphers=False)
    assert (await client.connect(following.ports[0])).cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"


@pytest_twisted.ensureDeferred
async def test_default_ciphers_are_forward_secret_aead_only(cleanup, pki):
    upstream, _ = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream)
    cbc = TLSClient(pki.caFile, maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        await cbc.connect(proxy.ports[0])
    aead = await TLSClient(pki.caFile, maximum=ssl.TLSVersion.TLSv1_2).connect(proxy.ports[0])
    assert aead.cipher.startswith("ECDHE-ECDSA-") and ("GCM" in aead.cipher or "CHACHA20" in aead.cipher)


# Session resumption


@pytest.mark.parametrize(
    "version, tickets",
    [(ssl.TLSVersion.TLSv1_2, False), (ssl.TLSVersion.TLSv1_2, True), (ssl.TLSVersion.TLSv1_3, True)],
    ids=["tls1.2-session-id", "tls1.2-ticket", "tls1.3-ticket"],
)
@pytest_twisted.ensureDeferred
async def test_session_resumed(cleanup, pki, version, tickets):
    upstream, _ = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream, ssl_session_cache="shared:SSL:10m", ssl_session_timeout="10m")
    client = TLSClient(pki.caFile, minimum=version, maximum=version, tickets=tickets)
    first = await client.connect(proxy.ports[0])
    assert not first.reused and first.session is not None
    second = await client.connect(proxy.ports[0], session=first.session)
    assert second.reused and second.response.endswith(b"hello")


@pytest_twisted.ensureDeferred
async def test_no_resumption_when_the_cache_is_off(cleanup, pki):
    upstream, _ = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream, ssl_session_cache="off")
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        client = TLSClient(pki.caFile, minimum=version, maximum=version)
        first = await client.connect(proxy.ports[0])
        if first.session is not None:
            assert not (await client.connect(proxy.ports[0], session=first.session)).reused


@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
@pytest_twisted.ensureDeferred
async def test_openssl_s_client_reports_a_reused_session(cleanup, pki, tmp_path, flag):
    upstream, _ = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream)
    session = str(tmp_path / "session.pem")
    base = [
        "openssl",
        "s_client",
        "-connect",
        f"{LOOPBACK}:{proxy.ports[0]}",
        "-servername",
        "localhost",
        "-CAfile",
        pki.caFile,
        "-verify_return_error",
        "-ign_eof",
        flag,
    ]

    def run(*extra: str) -> str:
        done = subprocess.run([*base, *extra], input=GET_CLOSE, capture_output=True, timeout=20)
        assert done.returncode == 0, done.stderr
        return done.stdout.decode("latin-1")

    first = await deferToThread(run, "-sess_out", session)
    assert "\nNew, TLSv1." in first and "HTTP/1.1 200 OK" in first
    second = await deferToThread(run, "-sess_in", session)
    assert "\nReused, TLSv1." in second and "HTTP/1.1 200 OK" in second


# Headers


@pytest_twisted.ensureDeferred
async def test_hsts_on_a_200_a_101_and_a_502(cleanup, pki):
    echo = listenEcho()  # stopped below, for the 502
    proxy = await tlsProxy(cleanup, pki, echo.getHost().port, add_header={"Strict-Transport-Security": HSTS})
    page = await connectTLS(proxy.ports[0], pki.caPEM)
    page.transport.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    response = await page.waitClosed()
    assert response.startswith(b"HTTP/1.1 200 ")
    assert headers(response)[b"strict-transport-security"] == HSTS.encode()

    ws = await connectTLS(proxy.ports[0], pki.caPEM)
    ws.transport.write(WS_UPGRADE)
    response = await ws.waitFor(b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 101 ")
    assert headers(response)[b"strict-transport-security"] == HSTS.encode()

    gone = echo.getHost().port
    ws.transport.abortConnection()
    await echo.stopListening()
    dead = await tlsProxy(cleanup, pki, gone, add_header={"Strict-Transport-Security": HSTS})
    failed = await connectTLS(dead.ports[0], pki.caPEM)
    failed.transport.write(GET_CLOSE)
    response = await failed.waitClosed()
    assert response.startswith(b"HTTP/1.1 502 ")
    assert headers(response)[b"strict-transport-security"] == HSTS.encode()


@pytest_twisted.ensureDeferred
async def test_x_forwarded_proto_is_https(cleanup, pki):
    upstream, factory = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream)
    client = await connectTLS(proxy.ports[0], pki.caPEM)
    client.transport.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-Proto: http\r\nConnection: close\r\n\r\n")
    assert (await client.waitClosed()).startswith(b"HTTP/1.1 200 ")
    forwarded = headers(factory.requests[0])
    assert forwarded[b"x-forwarded-proto"] == b"https"


# SNI and ALPN


@pytest_twisted.ensureDeferred
async def test_sni_picks_the_certificate(cleanup, pki):
    upstream, _ = await okUpstream(cleanup)
    default, defaultKey, defaultSerial = pki.issue("default", "localhost", "127.0.0.1")
    exact, exactKey, exactSerial = pki.issue("exact", "api.test")
    wildcard, wildcardKey, wildcardSerial = pki.issue("wildcard", "*.example.com")
    proxy = await tlsProxy(
        cleanup,
        pki,
        upstream,
        ssl_certificate=default,
        ssl_certificate_key=defaultKey,
        ssl_certificates=[
            {"server_name": "API.test", "certificate": exact, "key": exactKey},
            {"server_name": "*.example.com", "certificate": wildcard, "key": wildcardKey},
        ],
    )
    client = TLSClient(pki.caFile)
    port = proxy.ports[0]
    assert (await client.connect(port, "api.test")).serial == exactSerial
    assert (await client.connect(port, "www.example.com")).serial == wildcardSerial
    assert (await client.connect(port, "localhost")).serial == defaultSerial
    assert (await client.connect(port, None)).serial == defaultSerial
    # A wildcard covers one label, as in X.509: deeper names get the default.
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.connect(port, "a.b.example.com")


@pytest_twisted.ensureDeferred
async def test_alpn_selects_http11(cleanup, pki):
    upstream, _ = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream)
    offered = await TLSClient(pki.caFile, alpn=["h2", "http/1.1"]).connect(proxy.ports[0])
    assert offered.alpn == "http/1.1" and offered.response.startswith(b"HTTP/1.1 200 ")
    h2only = await TLSClient(pki.caFile, alpn=["h2"]).connect(proxy.ports[0])
    assert h2only.alpn is None and h2only.response.startswith(b"HTTP/1.1 200 ")


# Certificate renewal


async def waitForSerial(port: int, client: TLSClient, serial: int, within: float) -> int:
    """Handshake until the certificate has C{serial}, for at most C{within} seconds; return the last serial."""
    deadline = time.monotonic() + within
    while True:
        seen = (await client.connect(port, request=b"")).serial
        if seen == serial or time.monotonic() > deadline:
            return seen
        await sleep(0.2)


@pytest_twisted.ensureDeferred
async def test_renewed_certificate_for_new_handshakes_while_a_tunnel_stays_open(cleanup, pki, logged):
    echo = cleanup.port(listenEcho())
    certificate, key, oldSerial = pki.issue("live", "localhost", "127.0.0.1")
    proxy = await tlsProxy(cleanup, pki, echo.getHost().port, ssl_certificate=certificate, ssl_certificate_key=key)
    assert proxy.listeners[0].tls.watching
    tunnel = await connectTLS(proxy.ports[0], pki.caPEM)
    cleanup.transport(tunnel.transport)
    tunnel.transport.write(WS_UPGRADE)
    assert (await tunnel.waitFor(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    tunnel.transport.write(maskedText(b"before"))
    assert (await tunnel.waitFor(b"\x81\x06before")).endswith(b"\x81\x06before")

    _, _, newSerial = pki.issue("live", "localhost", "127.0.0.1")
    client = TLSClient(pki.caFile)
    assert await waitForSerial(proxy.ports[0], client, newSerial, within=WATCH_INTERVAL + 3) == newSerial
    assert any("TLS certificates for" in line and "loaded" in line for line in logged)

    tunnel.transport.write(maskedText(b"after"))
    assert (await tunnel.waitFor(b"\x81\x05after")).endswith(b"\x81\x05after")
    assert tunnel.transport.getPeerCertificate().get_serial_number() == oldSerial


@pytest_twisted.ensureDeferred
async def test_failed_renewal_keeps_the_old_pair_and_logs_why(cleanup, pki, logged):
    upstream, _ = await okUpstream(cleanup)
    certificate, key, oldSerial = pki.issue("live", "localhost", "127.0.0.1")
    proxy = await tlsProxy(cleanup, pki, upstream, ssl_certificate=certificate, ssl_certificate_key=key)
    # A renewal that wrote the new certificate but not yet its key.
    _, otherKey, _ = pki.issue("other", "localhost")
    _replace(Path(key), Path(otherKey).read_bytes())
    deadline = time.monotonic() + WATCH_INTERVAL + 3
    while not any("keeping the old certificate" in line for line in logged) and time.monotonic() < deadline:
        await sleep(0.2)
    failures = [line for line in logged if "keeping the old certificate" in line]
    assert len(failures) == 1
    assert "ssl_certificate_key" in failures[0] and "does not match" in failures[0]
    assert (await TLSClient(pki.caFile).connect(proxy.ports[0])).serial == oldSerial
    # Reported once, not at every check: run the watcher's next checks now.
    for _ in range(3):
        proxy.listeners[0].tls.reloadIfChanged()
    assert len([line for line in logged if "keeping the old certificate" in line]) == 1


@pytest_twisted.ensureDeferred
async def test_watching_follows_the_listening_port(cleanup, pki):
    upstream, _ = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream)
    tls = proxy.listeners[0].tls
    assert tls.watching
    await proxy.stopService()
    assert not tls.watching


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_the_certificates(cleanup, pki, tmp_path, logged):
    upstream, _ = await okUpstream(cleanup)
    certificate, key, _ = pki.issue("live", "localhost", "127.0.0.1")
    config = tmp_path / "wsproxy.toml"
    config.write_text(
        f'[upstream.app]\nservers = ["{LOOPBACK}:{upstream}"]\n'
        f'[[server]]\nlisten = "tcp:0:interface={LOOPBACK}"\nproxy_pass = "http://app"\n'
        f'ssl_certificate = "{certificate}"\nssl_certificate_key = "{key}"\n'
    )
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    top = cleanup.service(tap.makeService(options, reactor))
    top.startService()
    proxy, hangup, _ = list(top)
    port = (await proxy.listeners[0].listeningPort()).getHost().port
    assert signal.getsignal(signal.SIGHUP) == hangup._hangup
    # Only the signal may reload here, not the file watcher.
    proxy.listeners[0].tls.stopWatching()
    _, _, newSerial = pki.issue("live", "localhost", "127.0.0.1")
    os.kill(os.getpid(), signal.SIGHUP)
    assert await waitForSerial(port, TLSClient(pki.caFile), newSerial, within=3) == newSerial
    assert any("configuration reloaded" in line for line in logged)


# Handshake deadline


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_finish_the_handshake_is_closed(cleanup, pki, logged):
    upstream, _ = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream, ssl_handshake_timeout="300ms", client_header_timeout=30)
    for opening in (b"", b"\x16\x03\x01\x02\x00\x01"):  # nothing; a ClientHello cut short
        client = await connectRaw(proxy.ports[0])
        cleanup.transport(client.transport)
        started = time.monotonic()
        client.transport.write(opening)
        assert await client.waitClosed(timeout=5) is not None
        assert time.monotonic() - started < 3
    assert any("TLS handshake not completed within 0.3s" in line for line in logged)


@pytest_twisted.ensureDeferred
async def test_the_handshake_deadline_ends_with_the_handshake(cleanup, pki):
    upstream, _ = await okUpstream(cleanup)
    proxy = await tlsProxy(cleanup, pki, upstream, ssl_handshake_timeout="200ms")
    client = await connectTLS(proxy.ports[0], pki.caPEM)
    cleanup.transport(client.transport)
    client.transport.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert (await client.waitFor(b"hello")).endswith(b"hello")
    assert await stillAfter(0.5, lambda: not client.closed.called), "open past the 200 ms handshake deadline"
    client.transport.write(GET_CLOSE)
    assert (await client.waitClosed()).count(b"HTTP/1.1 200 OK") == 2


# Upstream TLS


def listenTLSUpstream(cleanup, pki: PKI, body: bytes, *identities: str, ca: trustme.CA | None = None):
    leaf = (ca or pki.ca).issue_cert(*identities)
    options = PrivateCertificate.loadPEM(leaf.private_key_and_cert_chain_pem.bytes()).options()
    factory = ScriptedUpstream(lambda request, connection: ok(body))
    port = cleanup.port(reactor.listenSSL(0, factory, options, interface=LOOPBACK))
    return port.getHost().port, factory


def tlsUpstreamTable(pki: PKI, port: int) -> dict[str, Any]:
    return {
        "app": {
            "servers": [f"https://{LOOPBACK}:{port}"],
            "proxy_ssl_trusted_certificate": pki.caFile,
            "proxy_ssl_name": "app.internal",
        }
    }


@pytest_twisted.ensureDeferred
async def test_verified_tls_upstream(cleanup, pki):
    port, factory = listenTLSUpstream(cleanup, pki, b"secure", "app.internal")
    proxy = cleanup.service(await startProxy(tlsUpstreamTable(pki, port), {"proxy_pass": "http://app"}))
    client = await connectRaw(proxy.ports[0])
    client.transport.write(GET_CLOSE)
    response = await client.waitClosed()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and response.endswith(b"secure")
    assert factory.requests[0].startswith(b"GET /page HTTP/1.1\r\n")


@pytest.mark.parametrize("wrong", ["name", "issuer"])
@pytest_twisted.ensureDeferred
async def test_unverified_tls_upstream_is_502_and_logged(cleanup, pki, logged, wrong):
    if wrong == "name":
        port, factory = listenTLSUpstream(cleanup, pki, b"secret", "other.internal")
    else:
        port, factory = listenTLSUpstream(cleanup, pki, b"secret", "app.internal", ca=trustme.CA())
    proxy = cleanup.service(await startProxy(tlsUpstreamTable(pki, port), {"proxy_pass": "http://app"}))
    client = await connectRaw(proxy.ports[0])
    client.transport.write(GET_CLOSE)
    response = await client.waitClosed()
    assert response.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"secret" not in response
    # The request never left the proxy in a connection it could not verify.
    assert factory.requests == []
    assert any(f"{LOOPBACK}:{port}" in line and "verif" in line for line in logged)


@pytest.mark.parametrize(
    "wrong, why",
    [("name", "TLS certificate verification failed: DNSMismatch"), ("issuer", "certificate verify failed")],
)
@pytest_twisted.ensureDeferred
async def test_a_failed_upstream_verification_is_described(cleanup, pki, wrong, why):
    if wrong == "name":
        port, _ = listenTLSUpstream(cleanup, pki, b"x", "other.internal")
    else:
        port, _ = listenTLSUpstream(cleanup, pki, b"x", "app.internal", ca=trustme.CA())
    address = UpstreamAddress(LOOPBACK, port, tls=True)
    upstream = Upstream("app", (address,), proxy_ssl_trusted_certificate=pki.caFile, proxy_ssl_name="app.internal")
    options = upstreamTLSOptions(upstream)(address)

    class Lost(Protocol):
        def __init__(self) -> None:
            self.reason: Deferred = Deferred()

        def connectionLost(self, reason: Any = None) -> None:
            self.reason.callback([reason])

    protocol = await connectProtocol(wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOOPBACK, port)), Lost())
    protocol.transport.write(b"GET / HTTP/1.1\r\nHost: app.internal\r\n\r\n")
    [reason] = await protocol.reason
    description = describeTLSFailure(reason)
    assert description is not None and why in description


# WebSocket over TLS


@pytest_twisted.ensureDeferred
async def test_autobahn_client_over_wss(cleanup, pki):
    echo = cleanup.port(listenEcho())
    proxy = await tlsProxy(cleanup, pki, echo.getHost().port, add_header={"Strict-Transport-Security": HSTS})
    received: list[tuple[bytes, bool]] = []
    opened: Deferred = Deferred()
    done: Deferred = Deferred()

    class Client(WebSocketClientProtocol):
        def onOpen(self) -> None:
            opened.callback(self)
            self.sendMessage("héllo".encode(), isBinary=False)
            self.sendMessage(bytes(range(256)) * 64, isBinary=True)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            received.append((payload, isBinary))
            if len(received) == 2:
                self.sendClose(1000)

        def onClose(self, wasClean: bool, code: int, reason: str) -> None:
            done.callback((wasClean, code))

    url = f"wss://localhost:{proxy.ports[0]}/ws"
    factory = WebSocketClientFactory(url)
    factory.protocol = Client
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(pki.caPEM))
    await wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOOPBACK, proxy.ports[0])).connect(factory)
    client = await opened.addTimeout(5, reactor)
    assert client.http_headers["strict-transport-security"] == HSTS
    assert await done.addTimeout(5, reactor) == (True, 1000)
    assert received == [("héllo".encode(), False), (bytes(range(256)) * 64, True)]


# The configuration of issue 3, and twistd


def issueConfiguration(pki: PKI, upstream: int) -> str:
    """
    The configuration of issue 3 on ports the system picks (C{tcp:0}: the
    tests learn them from the listeners, or from twistd's log).  Its
    redirect therefore names no port, as on a server whose HTTPS listener
    is on 443.
    """
    certificate, key, _ = pki.issue("fullchain", "localhost", "127.0.0.1")
    return f"""
[upstream.app]
servers = ["127.0.0.1:{upstream}"]

[[server]]
listen = "tcp:0:interface=127.0.0.1"
return = "308 https://$host$request_uri"

[[server]]
listen = "tcp:0:interface=127.0.0.1"
ssl_certificate = "{certificate}"
ssl_certificate_key = "{key}"
ssl_protocols = ["TLSv1.2", "TLSv1.3"]
ssl_ciphers = "ECDH+AESGCM:ECDH+AES256:ECDH+AES128:!ADH:!AECDH:!MD5"
ssl_prefer_server_ciphers = true
ssl_session_cache = "10m"
ssl_session_timeout = "10m"
add_header = {{ "Strict-Transport-Security" = "max-age=31536000" }}
proxy_pass = "http://app"
"""


@pytest_twisted.ensureDeferred
async def test_the_issue_configuration_runs_as_written(cleanup, pki, tmp_path):
    upstream, factory = await okUpstream(cleanup)
    path = tmp_path / "wsproxy.toml"
    path.write_text(issueConfiguration(pki, upstream))
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    top = cleanup.service(tap.makeService(options, reactor))
    top.startService()
    proxy = list(top)[0]
    redirectPort, tlsPort = [(await listener.listeningPort()).getHost().port for listener in proxy.listeners]

    client = await connectRaw(redirectPort)
    client.transport.write(b"GET /a?b=c HTTP/1.1\r\nHost: Example.COM\r\nConnection: close\r\n\r\n")
    redirect = await client.waitClosed()
    assert redirect.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n")
    assert headers(redirect)[b"location"] == b"https://example.com/a?b=c"
    assert b"strict-transport-security" not in headers(redirect)

    result = await TLSClient(pki.caFile).connect(tlsPort)
    assert result.response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert headers(result.response)[b"strict-transport-security"] == b"max-age=31536000"
    assert headers(factory.requests[0])[b"x-forwarded-proto"] == b"https"


def twistdConfig(tmp_path: Path, pki: PKI, **overrides: str) -> Path:
    certificate, key, _ = pki.issue("server", "localhost")
    settings = {"ssl_certificate": f'"{certificate}"', "ssl_certificate_key": f'"{key}"', **overrides}
    lines = "\n".join(f"{name} = {value}" for name, value in settings.items())
    path = tmp_path / "wsproxy.toml"
    path.write_text(
        f'[upstream.app]\nservers = ["127.0.0.1:9"]\n[[server]]\nlisten = "tcp:0:interface=127.0.0.1"\n'
        f'proxy_pass = "http://app"\n{lines}\n'
    )
    return path


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("mismatch", ["ssl_certificate_key: ", "does not match the certificate"]),
        ("unreadable", ["server[0].ssl_certificate: cannot read", "missing.pem"]),
        ("not-pem", ["ssl_certificate: cannot load", "server.pem"]),
        ("not-a-key", ["ssl_certificate_key: cannot load", "server.key"]),
        ("cipher", ["ssl_ciphers: OpenSSL accepts no cipher in 'NO-SUCH-CIPHER'"]),
        ("protocol", ["server[0].ssl_protocols: unknown protocol 'SSLv3'"]),
    ],
)
@pytest_twisted.ensureDeferred
async def test_twistd_refuses_a_bad_tls_setting_in_one_line(pki, tmp_path, problem, expected):
    overrides = {
        "unreadable": {"ssl_certificate": f'"{tmp_path / "missing.pem"}"'},
        "cipher": {"ssl_ciphers": '"NO-SUCH-CIPHER"'},
        "protocol": {"ssl_protocols": '["TLSv1.2", "SSLv3"]'},
    }.get(problem, {})
    path = twistdConfig(tmp_path, pki, **overrides)
    if problem == "mismatch":
        _, otherKey, _ = pki.issue("other", "localhost")
        path.write_text(path.read_text().replace(str(tmp_path / "server.key"), otherKey))
    if problem == "not-pem":
        (tmp_path / "server.pem").write_text("not a certificate\n")
    if problem == "not-a-key":
        (tmp_path / "server.key").write_text("not a key\n")
    done = await deferToThread(
        subprocess.run,
        [sys.executable, "-m", "twisted", "wsproxy", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wsproxy: {path}: ")
    assert all(part in lines[0] for part in expected), lines[0]
    assert done.stdout == b""


@pytest_twisted.ensureDeferred
async def test_twistd_binds_then_drops_privileges(cleanup, pki):
    """
    As root, C{twistd --uid/--gid} binds, loads the certificates, then
    runs as the unprivileged user, which can still read the renewed files
    because they are group-readable (docs/tls.md's recommended layout).
    """
    user = pwd.getpwnam("nobody") if os.getuid() == 0 else pwd.getpwuid(os.getuid())
    upstream, _ = await okUpstream(cleanup)
    directory = Path(tempfile.mkdtemp(prefix="wsproxy-tls-"))
    try:
        os.chown(directory, 0 if os.getuid() == 0 else -1, user.pw_gid)
        directory.chmod(0o750)
        files = PKI(pki.ca, directory)
        path = directory / "wsproxy.toml"
        path.write_text(issueConfiguration(files, upstream))
        for key in directory.glob("*.key"):
            os.chown(key, -1, user.pw_gid)
            key.chmod(0o640)
        output = await runTwistdAs(user, path, pki.caFile)
    finally:
        shutil.rmtree(directory)
    assert "set uid/gid %d/%d" % (user.pw_uid, user.pw_gid) in output
    assert "failed" not in output and "Traceback" not in output, output


async def runTwistdAs(user: pwd.struct_passwd, config: Path, caFile: str) -> str:
    """
    Run C{twistd} for C{config} (the issue's: a redirect listener, then
    the TLS one) until a TLS request through it succeeds, check the user
    it runs as, stop it; return its log.
    """
    twistd = Path(sys.executable).parent / "twistd"
    log = config.parent / "twistd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                str(twistd),
                "--nodaemon",
                "--pidfile=",
                f"--uid={user.pw_uid}",
                f"--gid={user.pw_gid}",
                "wsproxy",
                "--config",
                str(config),
            ],
            cwd=config.parent,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        _, tlsPort = await listeningPortsOf(log, process, count=2, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                result = await TLSClient(caFile).connect(tlsPort)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "twistd did not start"
                await sleep(0.1)
        assert result.response.startswith(b"HTTP/1.1 200 OK\r\n")
        status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
        uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
        gids = next(line for line in status if line.startswith("Gid:")).split()[1:]
        assert set(map(int, uids)) == {user.pw_uid} and set(map(int, gids)) == {user.pw_gid}
        # Past the first certificate check, which runs as the new user.
        assert await stillAfter(WATCH_INTERVAL + 0.5, lambda: process.poll() is None), log.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        await deferToThread(process.wait, timeout=20)
        stdout = log.read_text()
    # Twisted ends with the signal that stopped it, after a clean shutdown.
    assert process.returncode == -signal.SIGTERM and "Server Shut Down." in stdout
    return stdout
