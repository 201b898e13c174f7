# -*- test-case-name: tests.test_tls -*-
"""
TLS: the server context of a TLS listener (certificates, protocol
versions, ciphers, session cache, ALPN, SNI), reloaded when the
certificate files change, and the client options for TLS upstreams.

Twisted's C{ssl:} endpoint string cannot express ciphers, a minimum
version or the session cache, so the pyOpenSSL context is built here.  One
L{ServerTLS} object is the listener's L{IOpenSSLServerConnectionCreator}:
each new connection gets the I{current} context, so swapping the context
renews the certificate for new handshakes while established connections
and tunnels keep theirs.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from .config import ServerBlock, Upstream, UpstreamAddress

__all__ = ["ServerTLS", "TLSConfigError", "buildContext", "upstreamTLSOptions"]

log = Logger()

#: Forward secrecy and AEAD only, for TLS 1.2 (TLS 1.3 suites are always AEAD).
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"

_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}

#: How often certificate files are checked for renewal, in seconds.
WATCH_INTERVAL = 2.0


class TLSConfigError(ValueError):
    """A TLS setting that OpenSSL refuses; the message names the key."""


def _load(context: SSL.Context, certificate: str, key: str) -> None:
    try:
        context.use_certificate_chain_file(certificate)
    except (SSL.Error, OSError) as e:
        raise TLSConfigError(f"ssl_certificate: cannot load {certificate!r}: {_why(e)}") from None
    try:
        context.use_privatekey_file(key)
    except (SSL.Error, OSError) as e:
        raise TLSConfigError(f"ssl_certificate_key: cannot load {key!r}: {_why(e)}") from None
    try:
        context.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"ssl_certificate_key: {key!r} does not match the certificate {certificate!r}") from None


def _why(error: Exception) -> str:
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        return str(error.args[0][-1][-1])
    return getattr(error, "strerror", None) or str(error)


def buildContext(block: ServerBlock, certificate: str, key: str) -> SSL.Context:
    """
    A server context for C{block} with the given certificate chain and key.

    @raise TLSConfigError: naming the key that OpenSSL refused.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    versions = sorted(_VERSIONS[name] for name in block.ssl_protocols)
    context.set_min_proto_version(versions[0])
    context.set_max_proto_version(versions[-1])
    if versions[0] < SSL.TLS1_2_VERSION:
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    options = SSL.OP_NO_COMPRESSION | SSL.OP_SINGLE_ECDH_USE | SSL.OP_NO_RENEGOTIATION
    if block.ssl_prefer_server_ciphers:
        options |= SSL.OP_CIPHER_SERVER_PREFERENCE
    context.set_options(options)
    ciphers = block.ssl_ciphers or DEFAULT_CIPHERS
    if versions[0] < SSL.TLS1_2_VERSION:
        ciphers += ":@SECLEVEL=0"
    try:
        context.set_cipher_list(ciphers.encode("ascii"))
    except SSL.Error:
        raise TLSConfigError(f"ssl_ciphers: OpenSSL accepts no cipher in {block.ssl_ciphers!r}") from None
    _load(context, certificate, key)
    if block.ssl_session_cache:
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        context.set_session_id(b"wsproxy")
        context.set_timeout(int(block.ssl_session_timeout))
    else:
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_options(SSL.OP_NO_TICKET)
    context.set_alpn_select_callback(_selectHTTP11)
    return context


def _selectHTTP11(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The TLS side of one listener: a context per certificate (the default
    one and one per SNI name), swapped in place when the files change or
    on L{reload}.
    """

    def __init__(self, block: ServerBlock, reactor: Any) -> None:
        self.reactor = reactor
        self.block = block
        self._contexts: dict[str, SSL.Context] = {}
        self._default: SSL.Context = None  # type: ignore[assignment]
        self._stamps: dict[str, tuple[float, int]] = {}
        self._build(block)
        self._watcher = LoopingCall(self.reloadIfChanged)
        self._watcher.clock = reactor

    def _files(self, block: ServerBlock) -> list[str]:
        files = [block.ssl_certificate, block.ssl_certificate_key]
        for _, certificate, key in block.ssl_certificates:
            files += [certificate, key]
        return files

    def _build(self, block: ServerBlock) -> None:
        """Build every context for C{block}; replace the current ones only if all load."""
        stamps = {path: _stamp(path) for path in self._files(block)}
        default = buildContext(block, block.ssl_certificate, block.ssl_certificate_key)
        contexts = {name: buildContext(block, cert, key) for name, cert, key in block.ssl_certificates}
        for context in [default, *contexts.values()]:
            context.set_tlsext_servername_callback(self._pickBySNI)
        self._default, self._contexts, self._stamps, self.block = default, contexts, stamps, block

    def _pickBySNI(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        if name is None:
            return
        context = self._contexts.get(name.decode("ascii", "replace").lower())
        if context is None:
            labels = name.decode("ascii", "replace").lower().split(".", 1)
            if len(labels) == 2:
                context = self._contexts.get("*." + labels[1])
        if context is not None:
            connection.set_context(context)

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return SSL.Connection(self._default, None)

    def wrapFactory(self, factory: Any) -> TLSMemoryBIOFactory:
        """C{factory} behind TLS with this object's current certificates."""
        return TLSMemoryBIOFactory(self, False, factory)

    def startWatching(self) -> None:
        if not self._watcher.running:
            self._watcher.start(WATCH_INTERVAL, now=False)

    def stopWatching(self) -> None:
        if self._watcher.running:
            self._watcher.stop()

    def reloadIfChanged(self) -> None:
        """Reload if any certificate or key file changed on disk."""
        if any(_stamp(path) != stamp for path, stamp in self._stamps.items()):
            self.reload()

    def reload(self) -> bool:
        """
        Load the certificate files again.  New handshakes use the new pair;
        a pair that fails to load is logged and the old one kept.
        """
        return self.reconfigure(self.block)

    def reconfigure(self, block: ServerBlock) -> bool:
        try:
            self._build(block)
        except TLSConfigError as e:
            self._stamps = {path: _stamp(path) for path in self._files(block)}
            log.error("TLS reload for {listen} failed, keeping the old certificate: {why}", listen=block.listen, why=e)
            return False
        log.info("TLS certificates for {listen} loaded", listen=block.listen)
        return True


def _stamp(path: str) -> tuple[float, int]:
    try:
        status = os.stat(path)
    except OSError:
        return (0.0, 0)
    return (status.st_mtime, status.st_size)


def upstreamTLSOptions(upstream: Upstream) -> Callable[[UpstreamAddress], Any] | None:
    """
    Client TLS options for an upstream's TLS servers, verified with
    service-identity against C{proxy_ssl_trusted_certificate} (or the
    platform's trust store), for the name C{proxy_ssl_name} (or the
    server's host).
    """
    if not any(address.tls for address in upstream.servers):
        return None
    if upstream.proxy_ssl_trusted_certificate:
        with open(upstream.proxy_ssl_trusted_certificate, "rb") as f:
            pem = f.read()
        certificates = [
            Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + part)
            for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
        ]
        trustRoot = trustRootFromCertificates(certificates)
    else:
        trustRoot = platformTrust()

    def optionsFor(address: UpstreamAddress) -> Any:
        name = upstream.proxy_ssl_name or address.host
        return optionsForClientTLS(name, trustRoot=trustRoot)

    return optionsFor


def _unused(_: Any = crypto) -> None:
    """Keep pyOpenSSL's crypto module imported for its error registration."""
