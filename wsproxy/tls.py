# -*- test-case-name: tests.test_tls,tests.test_reload -*-
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

Building contexts is split in two, so that a reload can build every
listener's contexts before it changes any: L{prepareTLS} loads the files
and builds the contexts of one C{[[server]]} block (it raises
L{TLSConfigError} and changes nothing), L{ServerTLS.install} puts prepared
contexts in use.

L{ServerTLS.wrapFactory} puts a listener's factory behind TLS with two
things L{TLSMemoryBIOFactory} does not do on its own: a deadline for the
handshake (C{ssl_handshake_timeout}), and watching the certificate files
for as long as the listening port is open, so that whoever starts the
listener (C{twistd}, a C{.tac} file, an embedding program, a test) gets
certificate renewal without having to remember to ask for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.interfaces import IDelayedCall, IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .config import ServerBlock, Upstream, UpstreamAddress
from .flow import writerFor
from .metrics import NO_METRICS

__all__ = [
    "DEFAULT_CIPHERS",
    "PreparedTLS",
    "ServerTLS",
    "ServerTLSFactory",
    "TLSConfigError",
    "buildContext",
    "combineTLS",
    "describeTLSFailure",
    "prepareTLS",
    "upstreamTLSOptions",
]

log = Logger()

#: Forward secrecy and AEAD only, for TLS 1.2 (TLS 1.3 suites are always
#: AEAD and are not chosen by this string).
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"

#: Added to the default list only when TLSv1 or TLSv1.1 is enabled: those
#: versions have no AEAD suite, so without CBC suites they could never be
#: negotiated although configured.
LEGACY_CIPHERS = "ECDHE+AES:!aNULL:!eNULL:!MD5:!DSS"

_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}

#: The option that switches each version off, for a list with gaps
#: (C{["TLSv1", "TLSv1.3"]}): a minimum and a maximum alone would allow
#: the versions in between.
_VERSION_OFF = {
    SSL.TLS1_VERSION: SSL.OP_NO_TLSv1,
    SSL.TLS1_1_VERSION: SSL.OP_NO_TLSv1_1,
    SSL.TLS1_2_VERSION: SSL.OP_NO_TLSv1_2,
    SSL.TLS1_3_VERSION: SSL.OP_NO_TLSv1_3,
}

#: RFC 8996 deprecates these; they are only enabled when configured.
LEGACY_PROTOCOLS = ("TLSv1", "TLSv1.1")

#: How often certificate files are checked for renewal, in seconds.
WATCH_INTERVAL = 2.0


class TLSConfigError(ValueError):
    """
    A TLS setting that OpenSSL refuses; the message is C{"KEY: problem"},
    KEY relative to the C{[[server]]} block (C{ssl_certificate_key},
    C{ssl_certificates[1].certificate}) or, for an upstream, absolute.
    """

    @property
    def key(self) -> str:
        """The configuration key the message names."""
        return str(self).partition(": ")[0]

    @property
    def problem(self) -> str:
        """The message without the key."""
        key, separator, problem = str(self).partition(": ")
        return problem if separator else key


def _load(context: SSL.Context, certificate: str, key: str, certificateKey: str, keyKey: str) -> None:
    """
    Load a chain and its private key into C{context}, naming the
    configuration key (C{certificateKey} or C{keyKey}) of whatever fails.
    """
    for path, name in ((certificate, certificateKey), (key, keyKey)):
        # OpenSSL reports an unreadable file as "system lib"; ask the OS.
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise TLSConfigError(f"{name}: cannot read {path!r}: {e.strerror}") from None
    try:
        context.use_certificate_chain_file(certificate)
    except SSL.Error as e:
        raise TLSConfigError(f"{certificateKey}: cannot load {certificate!r}: {_why(e)}") from None
    try:
        context.use_privatekey_file(key)
        context.check_privatekey()
    except SSL.Error as e:
        if "mismatch" in _why(e) or not isinstance(e.args[0], list) or not e.args[0]:
            raise TLSConfigError(f"{keyKey}: {key!r} does not match the certificate {certificate!r}") from None
        raise TLSConfigError(f"{keyKey}: cannot load {key!r}: {_why(e)}") from None


def _why(error: Exception) -> str:
    """The most specific reason OpenSSL (or the OS) gave, as one short phrase."""
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        return str(error.args[0][-1][-1])
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def buildContext(
    block: ServerBlock,
    certificate: str,
    key: str,
    certificateKey: str = "ssl_certificate",
    keyKey: str = "ssl_certificate_key",
) -> SSL.Context:
    """
    A server context for C{block} with the given certificate chain and key.

    @param certificateKey: the configuration key to name if the chain does
        not load (an C{ssl_certificates} entry has its own).
    @param keyKey: likewise for the private key.

    @raise TLSConfigError: naming the key that OpenSSL refused.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    versions = sorted(_VERSIONS[name] for name in block.ssl_protocols)
    legacy = versions[0] < SSL.TLS1_2_VERSION
    context.set_min_proto_version(versions[0])
    context.set_max_proto_version(versions[-1])
    options = SSL.OP_NO_COMPRESSION | SSL.OP_SINGLE_ECDH_USE | SSL.OP_NO_RENEGOTIATION
    for version in range(versions[0], versions[-1] + 1):
        if version in _VERSION_OFF and version not in versions:
            options |= _VERSION_OFF[version]
    if block.ssl_prefer_server_ciphers:
        options |= SSL.OP_CIPHER_SERVER_PREFERENCE
    context.set_options(options)
    ciphers = block.ssl_ciphers or (DEFAULT_CIPHERS + ":" + LEGACY_CIPHERS if legacy else DEFAULT_CIPHERS)
    if legacy:
        # OpenSSL 3 refuses TLS 1.0/1.1 handshakes (SHA-1 signatures) at the
        # default security level; the operator asked for them explicitly.
        ciphers += ":@SECLEVEL=0"
    try:
        context.set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise TLSConfigError(f"ssl_ciphers: OpenSSL accepts no cipher in {block.ssl_ciphers!r}") from None
    _load(context, certificate, key, certificateKey, keyKey)
    if block.ssl_session_cache:
        # Session IDs (TLS 1.2) are kept in OpenSSL's in-process cache; TLS
        # 1.2 and 1.3 tickets are encrypted with this context's ticket key.
        # Both expire after ssl_session_timeout.
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        context.set_session_id(b"wsproxy")
        context.set_timeout(max(1, int(block.ssl_session_timeout)))
    else:
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_options(SSL.OP_NO_TICKET)
    context.set_alpn_select_callback(_selectHTTP11)
    return context


def _selectHTTP11(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    """
    ALPN: wsproxy speaks HTTP/1.1 only.  A client that offers only other
    protocols gets no ALPN answer rather than a fatal alert, as nginx does.
    """
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


@dataclass(frozen=True)
class PreparedTLS:
    """
    The contexts of one TLS listener, built by L{prepareTLS} and not yet in
    use: L{ServerTLS.install} puts them in use.

    @ivar stamps: what the certificate files looked like when they were read
        (see L{_stamp}), to notice the next change.
    """

    block: ServerBlock
    default: SSL.Context
    contexts: Mapping[str, SSL.Context]
    stamps: Mapping[str, tuple[int, ...]]
    #: The other virtual hosts on the address, and a table from an SNI name
    #: to the one whose certificate answers it (C{None}: this block's).
    others: tuple[PreparedTLS, ...] = ()
    hosts: Any = None

    def allContexts(self) -> list[SSL.Context]:
        """Every context of the address: this block's and its virtual hosts'."""
        own = [self.default, *self.contexts.values()]
        return own + [context for other in self.others for context in other.allContexts()]


def combineTLS(default: PreparedTLS, others: Sequence[PreparedTLS]) -> PreparedTLS:
    """
    One address's TLS from its virtual hosts' (C{default} is the
    C{default_server}'s): SNI picks the block by nginx's C{server_name}
    rules, then that block's certificate for the name.
    """
    if not others:
        return default
    from .matching import ServerNames

    entries = [(other.block.server_names, other) for other in others]
    entries.append((default.block.server_names, None))
    stamps = dict(default.stamps)
    for other in others:
        stamps.update(other.stamps)
    return replace(default, others=tuple(others), hosts=ServerNames(entries, None), stamps=stamps)


def _files(block: ServerBlock) -> list[str]:
    files = [block.ssl_certificate, block.ssl_certificate_key]
    for _, certificate, key in block.ssl_certificates:
        files += [certificate, key]
    return [path for path in files if path is not None]


def prepareTLS(block: ServerBlock) -> PreparedTLS:
    """
    Read the certificate files of C{block} and build its contexts (the
    default one and one per SNI name), without putting them in use.

    @raise TLSConfigError: naming the key of the first thing that fails.
    """
    stamps = {path: _stamp(path) for path in _files(block)}
    if block.ssl_certificate is None or block.ssl_certificate_key is None:
        raise TLSConfigError("ssl_certificate: a TLS listener needs ssl_certificate and ssl_certificate_key")
    default = buildContext(block, block.ssl_certificate, block.ssl_certificate_key)
    contexts = {
        name: buildContext(block, cert, key, f"ssl_certificates[{i}].certificate", f"ssl_certificates[{i}].key")
        for i, (name, cert, key) in enumerate(block.ssl_certificates)
    }
    return PreparedTLS(block, default, contexts, stamps)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The TLS side of one listener: a context per certificate (the default
    one and one per SNI name), swapped in place when the files change or
    on L{reconfigure}/L{install}.

    @ivar block: the configuration the current contexts were built from.
    """

    #: Build the contexts of a block aside (see L{prepareTLS}).
    prepare = staticmethod(prepareTLS)

    def __init__(self, block: ServerBlock, reactor: Any, prepared: PreparedTLS | None = None) -> None:
        """
        @param prepared: the contexts for C{block}, if they were built
            already; else they are built here (which may raise
            L{TLSConfigError}).
        """
        self.reactor = reactor
        self.block: ServerBlock = None  # type: ignore[assignment]
        self._contexts: Mapping[str, SSL.Context] = {}
        self._default: SSL.Context = None  # type: ignore[assignment]
        self._stamps: Mapping[str, tuple[int, ...]] = {}
        self.install(prepared if prepared is not None else prepareTLS(block))
        self._watcher = LoopingCall(self.reloadIfChanged)
        self._watcher.clock = reactor

    @staticmethod
    def _warnLegacy(block: ServerBlock) -> None:
        legacy = [name for name in block.ssl_protocols if name in LEGACY_PROTOCOLS]
        if legacy:
            log.warn(
                "{listen}: ssl_protocols enables {legacy}, deprecated by RFC 8996; "
                "enable them only for clients that cannot do TLSv1.2",
                listen=block.listen,
                legacy=", ".join(legacy),
            )

    def install(self, prepared: PreparedTLS) -> None:
        """
        Use C{prepared} for new handshakes from now on; connections already
        established keep the context they started with.  Cannot fail.
        """
        for context in prepared.allContexts():
            context.set_tlsext_servername_callback(self._pickBySNI)
        if self.block is None or self.block.ssl_protocols != prepared.block.ssl_protocols:
            self._warnLegacy(prepared.block)
        self._default, self._contexts, self._stamps, self.block = (
            prepared.default,
            prepared.contexts,
            prepared.stamps,
            prepared.block,
        )
        self._prepared = prepared

    def _pickBySNI(self, connection: SSL.Connection) -> None:
        """
        Switch C{connection} to the certificate for the name the client
        asked for: an exact C{server_name} first, then a C{*.parent}
        wildcard one label deep (as in X.509), else the default.
        """
        name = connection.get_servername()
        if name is None:
            return
        wanted = name.decode("ascii", "replace").lower().rstrip(".")
        contexts = self._contexts
        hosts = self._prepared.hosts
        if hosts is not None:
            host = hosts.lookup(wanted.encode("ascii", "replace"))
            if host is not None:
                connection.set_context(host.default)
                contexts = host.contexts
        context = contexts.get(wanted)
        if context is None:
            _, dot, parent = wanted.partition(".")
            if dot and parent:
                context = contexts.get("*." + parent)
        if context is not None:
            connection.set_context(context)

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        """
        A connection on the I{current} default context; SNI may switch it.
        When C{protocol} wants to know (L{ServerTLSFactory}'s protocols do),
        it is told as soon as the handshake is complete.
        """
        connection = SSL.Connection(self._default, None)
        finished = getattr(protocol, "handshakeFinished", None)
        if finished is not None:

            def notify(connection: SSL.Connection, where: int, ret: int) -> None:
                if where & SSL.SSL_CB_HANDSHAKE_DONE:
                    finished()

            connection.set_info_callback(notify)
        return connection

    def wrapFactory(self, factory: IProtocolFactory) -> ServerTLSFactory:
        """C{factory} behind TLS with this object's current certificates."""
        return ServerTLSFactory(self, factory)

    def startWatching(self) -> None:
        """Check the certificate files for changes every L{WATCH_INTERVAL} seconds."""
        if not self._watcher.running:
            self._watcher.start(WATCH_INTERVAL, now=False)

    def stopWatching(self) -> None:
        if self._watcher.running:
            self._watcher.stop()

    @property
    def watching(self) -> bool:
        """Whether the certificate files are being watched."""
        return bool(self._watcher.running)

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
        """
        Rebuild the contexts from C{block} (a reloaded configuration, or
        the same one when only the files changed).

        @return: whether the new contexts are in use.
        """
        try:
            prepared = combineTLS(prepareTLS(block), [prepareTLS(other.block) for other in self._prepared.others])
        except TLSConfigError as e:
            # Remember what failed, so that a broken renewal is reported once
            # and not every WATCH_INTERVAL; the next change is tried again.
            self._stamps = {path: _stamp(path) for path in self._stamps}
            log.error("TLS reload for {listen} failed, keeping the old certificate: {why}", listen=block.listen, why=e)
            return False
        self.install(prepared)
        log.info("TLS certificates for {listen} loaded", listen=block.listen)
        return True


class _Ciphertext:
    """
    The C{write} of the TCP transport under a server-side TLS connection:
    bytes go to the kernel at once when nothing is queued (L{writerFor}),
    and while the connection encrypts one application write its records are
    gathered to go out together.
    """

    __slots__ = ("send", "records")

    def __init__(self, transport: Any) -> None:
        self.send = writerFor(transport)
        self.records: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        records = self.records
        if records is not None:
            records.append(data)
        else:
            self.send(data)


class _ServerTLSConnection(TLSMemoryBIOProtocol):
    """
    A server-side TLS connection whose handshake has a deadline, and whose
    records go to the kernel as soon as they are made.

    L{TLSMemoryBIOProtocol} has no timeout of its own, and the HTTP
    protocol above it only counts from the start of a request: without a
    deadline (C{ssl_handshake_timeout}), a client that connects and says
    nothing (or a few bytes of a ClientHello) holds a socket and a TLS
    object for as long as it likes.

    Twisted's default, C{BufferingTLSTransport}, holds every write until
    the next reactor iteration to gather small ones into one record; the
    proxy's legs already write once per chunk they relay, so that only
    added a timer and a reactor pass per write.  Underneath, the TCP
    transport's writes go through L{_Ciphertext}: what one write makes is
    sent at once when nothing is queued, as a plain leg's bytes are.
    Together these take a 64-byte message over C{wss} from 23-24 to about
    20 µs of the proxy's CPU, and a TLS handshake from about 1,136 to 1,090.
    """

    factory: ServerTLSFactory
    _deadline: IDelayedCall | None = None
    #: The protocol version the handshake settled on, once it is complete.
    tlsVersion: str | None = None
    #: Whether the handshake ran out of time.
    timedOut = False

    def makeConnection(self, transport: Any) -> None:
        seconds = self.factory.serverTLS.block.ssl_handshake_timeout
        if seconds:
            self._deadline = self.factory.serverTLS.reactor.callLater(seconds, self._handshakeTimedOut)
        self._ciphertext = _Ciphertext(transport)
        transport.write = self._ciphertext.write
        super().makeConnection(transport)

    def write(self, data: bytes) -> None:
        """
        Encrypt C{data} and hand its records to the kernel in one send:
        OpenSSL makes a record of at most 16 KiB at a time, and a send per
        record leaves the client's kernel a queue of small buffers, whose
        later compaction reopens the window of a client that stopped
        reading, so that it takes in more than it asked for.
        """
        ciphertext = self._ciphertext
        ciphertext.records = records = []
        try:
            super().write(data)
        finally:
            ciphertext.records = None
        if records:
            ciphertext.send(records[0] if len(records) == 1 else b"".join(records))

    def handshakeFinished(self) -> None:
        """Called by L{ServerTLS} when OpenSSL reports the handshake done; only the first report counts."""
        self._cancelDeadline()
        if self.tlsVersion is None:
            self.tlsVersion = self._tlsConnection.get_protocol_version_name()
            self.factory.metrics.tlsHandshake(self.tlsVersion)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _handshakeTimedOut(self) -> None:
        self._deadline = None
        self.timedOut = True
        peer = self.transport.getPeer()
        log.info(
            "{client}: TLS handshake not completed within {seconds}s; connection closed",
            client=getattr(peer, "host", "-"),
            seconds=self.factory.serverTLS.block.ssl_handshake_timeout,
        )
        self.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._cancelDeadline()
        if self.tlsVersion is None:
            self.factory.metrics.tlsFailed(self._reason or reason, self.timedOut)
        super().connectionLost(reason)


class ServerTLSFactory(TLSMemoryBIOFactory):
    """
    A listener's factory behind TLS: handshakes have a deadline, and the
    certificate files are watched while the factory listens (Twisted calls
    L{startFactory} when the port starts listening and L{stopFactory} when
    it stops, whoever started it).
    """

    protocol = _ServerTLSConnection
    #: The recorder of its listener's handshakes (see L{wsproxy.metrics}).
    metrics: Any = NO_METRICS

    def __init__(self, serverTLS: ServerTLS, wrappedFactory: IProtocolFactory) -> None:
        super().__init__(serverTLS, False, wrappedFactory, clock=serverTLS.reactor)
        self.serverTLS = serverTLS

    def startFactory(self) -> None:
        self.serverTLS.startWatching()

    def stopFactory(self) -> None:
        self.serverTLS.stopWatching()


def _stamp(path: str) -> tuple[int, ...]:
    """
    What identifies a file's content cheaply: certbot replaces the symbolic
    link C{live/NAME/fullchain.pem} to point at a new file (new inode);
    other tools rewrite in place (new mtime, usually a new size).
    """
    try:
        status = os.stat(path)
    except OSError:
        return ()
    return (status.st_mtime_ns, status.st_size, status.st_ino, status.st_dev)


def upstreamTLSOptions(upstream: Upstream) -> Callable[[UpstreamAddress], Any] | None:
    """
    Client TLS options for an upstream's TLS servers, verified with
    service-identity against C{proxy_ssl_trusted_certificate} (or the
    platform's trust store), for the name C{proxy_ssl_name} (or the
    server's host).

    No ALPN is offered: an upstream that sets up ALPN without
    C{http/1.1} (Twisted's own C{CertificateOptions} does, and answers a
    list it has no overlap with by an C{internal_error} alert) would fail
    every handshake, and an upstream that offers nothing is assumed to
    speak HTTP/1.1 anyway.

    @raise TLSConfigError: if the CA bundle holds no usable certificate.
    """
    if not any(address.tls for address in upstream.servers):
        return None
    key = f"upstream.{upstream.name}.proxy_ssl_trusted_certificate"
    if upstream.proxy_ssl_trusted_certificate:
        path = upstream.proxy_ssl_trusted_certificate
        try:
            with open(path, "rb") as f:
                pem = f.read()
            marker = b"-----BEGIN CERTIFICATE-----"
            certificates = [Certificate.loadPEM(marker + part) for part in pem.split(marker)[1:]]
        except OSError as e:
            raise TLSConfigError(f"{key}: cannot read {path!r}: {_why(e)}") from None
        except Exception as e:  # pyOpenSSL's crypto.Error, or ValueError from cryptography
            raise TLSConfigError(f"{key}: not a PEM certificate bundle {path!r}: {_why(e)}") from None
        if not certificates:
            raise TLSConfigError(f"{key}: no certificate in {path!r}")
        trustRoot = trustRootFromCertificates(certificates)
    else:
        trustRoot = platformTrust()

    def optionsFor(address: UpstreamAddress) -> Any:
        name = upstream.proxy_ssl_name or address.host
        return optionsForClientTLS(name, trustRoot=trustRoot)

    return optionsFor


def describeTLSFailure(reason: Failure) -> str | None:
    """
    Why a TLS connection ended, in words for a log line, if TLS is what
    ended it; C{None} for an ordinary close or network error.

    Twisted reports a chain that does not verify as the
    L{SSL.Error} OpenSSL raised during the handshake, and a certificate for
    the wrong name as service-identity's L{VerificationError}.
    """
    if reason.check(VerificationError):
        errors = getattr(reason.value, "errors", None) or [reason.value]
        return "TLS certificate verification failed: " + "; ".join(str(e) for e in errors)
    if reason.check(SSL.Error):
        return "TLS handshake failed: " + _why(reason.value)
    return None
