"""
Reload as a transaction (L{ProxyService.reload}, and SIGHUP through
L{reloadFrom}): everything is built aside, any error leaves the running
configuration wholly in force and is logged in one line naming the key, a
good reload swaps everything at once, and a pool it replaces is retired.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from cryptography import x509
from support import LOOPBACK, connectRaw, exchange, listenScripted, ok, startProxy
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from wsproxy import parseConfig
from wsproxy.config import ConfigError
from wsproxy.tap import reloadFrom

GET_CLOSE = b"GET /path HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
LISTEN = f"tcp:0:interface={LOOPBACK}"
REDIRECT = "308 https://$host$request_uri"


@pytest.fixture
def logged():
    """The text of every log event at level error or above while the test runs."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.error:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


class Certificates:
    """A CA, and certificate files for 127.0.0.1 it issued; each knows its serial."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.directory = directory
        self.caFile = str(directory / "ca.pem")
        self.ca.cert_pem.write_to_path(self.caFile)

    def issue(self, stem: str) -> tuple[str, str, int]:
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        certificate, key = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        certificate.write_bytes(chain)
        key.write_bytes(leaf.private_key_pem.bytes())
        return str(certificate), str(key), x509.load_pem_x509_certificate(chain).serial_number


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


def servedSerial(port: int, caFile: str) -> Any:
    """The serial of the certificate the TLS listener on C{port} serves now (in a thread)."""

    def handshake() -> int:
        context = ssl.create_default_context(cafile=caFile)
        with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number

    return deferToThread(handshake)


def document(upstreamPort: int, *servers: dict[str, Any]) -> dict[str, Any]:
    blocks = [{"listen": LISTEN, "access_log": False, **server} for server in servers]
    return {
        "upstream": {"app": {"servers": [f"{LOOPBACK}:{upstreamPort}"]}},
        "server": blocks,
        "shutdown_timeout": 1,
    }


def toml(data: dict[str, Any]) -> str:
    """The small TOML subset these documents need."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(item) for item in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f'"{k}" = {value(item)}' for k, item in v.items()) + " }"
        raise TypeError(v)

    lines = [f"{key} = {value(v)}" for key, v in data.items() if key not in ("upstream", "server")]
    for name, table in data.get("upstream", {}).items():
        lines.append(f"[upstream.{name}]")
        lines += [f"{key} = {value(v)}" for key, v in table.items()]
    for block in data.get("server", []):
        lines.append("[[server]]")
        lines += [f"{key} = {value(v)}" for key, v in block.items()]
    return "\n".join(lines) + "\n"


async def proxyFor(cleanup, upstreamPort: int, *servers: dict[str, Any]):
    data = document(upstreamPort, *servers)
    return cleanup.service(await startProxy(data["upstream"], *data["server"], shutdown_timeout=1))


def refused(proxy, data: dict[str, Any], tmp_path: Path, logged: list[str]) -> str:
    """
    Reload C{data} both ways (L{ProxyService.reload}, and a file through
    L{reloadFrom}); both must refuse.  Return the one error line logged.
    """
    with pytest.raises(ConfigError) as caught:
        proxy.reload(parseConfig(data, source="(test)"))
    assert "\n" not in str(caught.value)
    path = tmp_path / "wsproxy.toml"
    path.write_text(toml(data))
    before = len(logged)
    assert reloadFrom(proxy, str(path)) is False
    (line,) = logged[before:]
    assert "reload rejected" in line and "\n" not in line
    assert caught.value.key in line
    return line


@pytest_twisted.ensureDeferred
async def test_a_redirect_listener_may_become_a_proxy_listener_and_back(cleanup, tmp_path, logged):
    # Every listener routes its requests; a server-level return is one kind of route.
    upstream, _ = listenScripted(ok(b"proxied"))
    cleanup.port(upstream)
    port = upstream.getHost().port
    proxy = await proxyFor(cleanup, port, {"return": REDIRECT}, {"proxy_pass": "http://app"})
    proxy.reload(parseConfig(document(port, {"proxy_pass": "http://app"}, {"return": REDIRECT}), source="(test)"))
    assert (await exchange(proxy.ports[0], GET_CLOSE)).endswith(b"proxied")
    assert (await exchange(proxy.ports[1], GET_CLOSE)).startswith(b"HTTP/1.1 308 ")
    proxy.reload(parseConfig(document(port, {"return": REDIRECT}, {"proxy_pass": "http://app"}), source="(test)"))
    assert (await exchange(proxy.ports[0], GET_CLOSE)).startswith(b"HTTP/1.1 308 ")
    assert (await exchange(proxy.ports[1], GET_CLOSE)).endswith(b"proxied")


@pytest_twisted.ensureDeferred
async def test_a_tls_listener_cannot_drop_tls_nor_a_plain_one_gain_it(cleanup, tmp_path, logged, certificates):
    upstream, _ = listenScripted(ok(b"proxied"))
    cleanup.port(upstream)
    port = upstream.getHost().port
    certificate, key, serial = certificates.issue("live")
    tls = {"proxy_pass": "http://app", "ssl_certificate": certificate, "ssl_certificate_key": key}
    proxy = await proxyFor(cleanup, port, tls, {"proxy_pass": "http://app"})

    line = refused(proxy, document(port, {"proxy_pass": "http://app"}, {"proxy_pass": "http://app"}), tmp_path, logged)
    assert "server[0].ssl_certificate" in line and "cannot drop TLS" in line
    line = refused(proxy, document(port, tls, tls), tmp_path, logged)
    assert "server[1].ssl_certificate" in line and "cannot become a TLS one" in line

    assert await servedSerial(proxy.ports[0], certificates.caFile) == serial
    assert (await exchange(proxy.ports[1], GET_CLOSE)).endswith(b"proxied")


@pytest_twisted.ensureDeferred
async def test_changed_listen_addresses_are_refused(cleanup, tmp_path, logged):
    upstream, _ = listenScripted(ok(b"proxied"))
    cleanup.port(upstream)
    port = upstream.getHost().port
    proxy = await proxyFor(cleanup, port, {"proxy_pass": "http://app"})
    moved = document(port, {"proxy_pass": "http://app", "listen": f"tcp:0:interface={LOOPBACK}:backlog=7"})
    assert "server[0].listen" in refused(proxy, moved, tmp_path, logged)
    added = document(port, {"proxy_pass": "http://app"}, {"proxy_pass": "http://app"})
    assert "server[1].listen: the listen addresses changed" in refused(proxy, added, tmp_path, logged)
    assert (await exchange(proxy.ports[0], GET_CLOSE)).endswith(b"proxied")


@pytest_twisted.ensureDeferred
async def test_a_broken_key_on_a_later_listener_leaves_every_certificate_as_it_was(
    cleanup, tmp_path, logged, certificates
):
    upstream, _ = listenScripted(ok(b"proxied"))
    cleanup.port(upstream)
    port = upstream.getHost().port
    firstCertificate, firstKey, firstSerial = certificates.issue("first")
    secondCertificate, secondKey, secondSerial = certificates.issue("second")
    proxy = await proxyFor(
        cleanup,
        port,
        {"proxy_pass": "http://app", "ssl_certificate": firstCertificate, "ssl_certificate_key": firstKey},
        {"proxy_pass": "http://app", "ssl_certificate": secondCertificate, "ssl_certificate_key": secondKey},
    )
    for listener in proxy.listeners:
        listener.tls.stopWatching()  # only the reload may change certificates here

    renewedCertificate, renewedKey, renewedSerial = certificates.issue("renewed")
    otherCertificate, otherKey, otherSerial = certificates.issue("other")
    broken = document(
        port,
        {"proxy_pass": "http://app", "ssl_certificate": renewedCertificate, "ssl_certificate_key": renewedKey},
        # The second listener's new key belongs to another certificate.
        {"proxy_pass": "http://app", "ssl_certificate": otherCertificate, "ssl_certificate_key": renewedKey},
    )
    line = refused(proxy, broken, tmp_path, logged)
    assert "server[1].ssl_certificate_key" in line and "does not match" in line
    assert await servedSerial(proxy.ports[0], certificates.caFile) == firstSerial, (
        "the first listener keeps its OLD one"
    )
    assert await servedSerial(proxy.ports[1], certificates.caFile) == secondSerial

    fixed = document(
        port,
        {"proxy_pass": "http://app", "ssl_certificate": renewedCertificate, "ssl_certificate_key": renewedKey},
        {"proxy_pass": "http://app", "ssl_certificate": otherCertificate, "ssl_certificate_key": otherKey},
    )
    proxy.reload(parseConfig(fixed, source="(test)"))
    assert await servedSerial(proxy.ports[0], certificates.caFile) == renewedSerial
    assert await servedSerial(proxy.ports[1], certificates.caFile) == otherSerial
    assert len(logged) == 1, "a good reload logs no error"


@pytest_twisted.ensureDeferred
async def test_a_good_reload_swaps_everything_and_retires_the_replaced_pool(cleanup, logged):
    old, oldFactory = listenScripted(ok(b"old"), closeAfter=False)
    new, _ = listenScripted(ok(b"new"), closeAfter=False)
    kept, _ = listenScripted(ok(b"kept"), closeAfter=False)
    for port in (old, new, kept):
        cleanup.port(port)
    first = {"proxy_pass": "http://app"}
    second = {"proxy_pass": "http://other"}
    data = document(old.getHost().port, first, second, {"return": REDIRECT})
    data["upstream"]["other"] = {"servers": [f"{LOOPBACK}:{kept.getHost().port}"]}
    proxy = cleanup.service(await startProxy(data["upstream"], *data["server"], shutdown_timeout=1))
    # A keep-alive client, so that the upstream connection is idle in the pool afterwards.
    client = await connectRaw(proxy.ports[0])
    cleanup.transport(client.transport)
    client.transport.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.waitFor(b"old")).endswith(b"old")
    (upstreamSide,) = oldFactory.connections
    assert not upstreamSide.lost.called, "kept alive in the pool"
    oldPool, otherPool = proxy.pools["app"], proxy.pools["other"]

    data["upstream"]["app"] = {"servers": [f"{LOOPBACK}:{new.getHost().port}"]}
    data["server"][0] = {**data["server"][0], "add_header": {"X-Reloaded": "yes"}}
    data["server"][2] = {**data["server"][2], "return": "301 https://elsewhere.example$request_uri"}
    data["shutdown_timeout"] = 2
    proxy.reload(parseConfig(data, source="(test)"))

    assert proxy.config.shutdown_timeout == 2
    assert proxy.pools["other"] is otherPool, "an unchanged upstream keeps its pool"
    assert proxy.pools["app"] is not oldPool and oldPool.retired
    await upstreamSide.lost  # the retired pool's idle connection is closed
    response = await exchange(proxy.ports[0], GET_CLOSE)
    assert response.endswith(b"new") and b"X-Reloaded: yes\r\n" in response
    assert (await exchange(proxy.ports[1], GET_CLOSE)).endswith(b"kept")
    redirect = await exchange(proxy.ports[2], GET_CLOSE)
    assert redirect.startswith(b"HTTP/1.1 301 ") and b"location: https://elsewhere.example/path\r\n" in redirect.lower()
    assert not logged
