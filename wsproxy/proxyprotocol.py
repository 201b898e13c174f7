# -*- test-case-name: tests.test_proxy_protocol -*-
"""
The PROXY protocol (v1 and v2, U{https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt}):
a listener behind an L4 load balancer learns the client's address from a
header the balancer sends before anything else, and uses it as the
client's address everywhere (C{X-Forwarded-For}, C{X-Real-IP},
C{set_real_ip_from}, C{max_connections_per_ip}, C{ip_hash}, the logs).

A listener expects the header when its C{listen} string starts with
C{haproxy:} (the prefix of Twisted's own endpoint) or its blocks say
C{proxy_protocol = true}.  Twisted's L{twisted.protocols.haproxy} wrapper
is not used as is, for what a proxy needs of it:

  - it builds the wrapped protocol when the connection is accepted, with
    the balancer's address, so per-address limits would count the
    balancer; L{ProxyHeaderReader} builds it only once the header is read,
    from the address the header carries;
  - it drops a connection whose first read is shorter than a header's
    signature, and lets a v1 header with a port that is not a number
    raise out of C{dataReceived}; here a header may arrive in any number
    of reads and every malformed one is closed in the same way;
  - it writes IPv6 addresses uncompressed (C{2001:db8:0:0:0:0:0:1}),
    which would not match the same client in C{X-Forwarded-For} or a
    per-address count.

The header comes first on the connection, before a TLS handshake: the
reader is the outermost wrapper, around the listener's TLS factory.  A
connection that sends anything else, a malformed header, or nothing within
the listener's C{client_header_timeout}, is closed without an answer.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, providedBy

from .config import Config, ListenAddress
from .flow import writerFor

__all__ = [
    "InvalidProxyHeader",
    "LISTEN_PREFIX",
    "ProxyHeaderFactory",
    "ProxyHeaderReader",
    "bareListen",
    "expectsProxyHeader",
    "parseProxyHeader",
]

log = Logger()

#: The C{listen} prefix that asks for the PROXY protocol (Twisted's endpoint name).
LISTEN_PREFIX = "haproxy:"

V1_SIGNATURE = b"PROXY "
#: A v1 header's longest form, CRLF included.
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16
_V2_PROXY, _V2_LOCAL = 0x21, 0x20
_V2_TCP4, _V2_TCP6 = 0x11, 0x21


class InvalidProxyHeader(Exception):
    """What a connection sent first is not a PROXY protocol header."""


def bareListen(listen: str) -> str:
    """C{listen} without the C{haproxy:} prefix: the endpoint that is bound."""
    return listen[len(LISTEN_PREFIX) :] if listen.startswith(LISTEN_PREFIX) else listen


def expectsProxyHeader(config: Config, address: ListenAddress) -> bool:
    """
    Whether connections to C{address} start with a PROXY header: its
    C{listen} has the C{haproxy:} prefix, or its blocks (which agree, see
    L{wsproxy.config}) say C{proxy_protocol = true}.
    """
    if address.listen.startswith(LISTEN_PREFIX):
        return True
    return config.servers[config.addresses[address][0]].proxy_protocol


def parseProxyHeader(data: bytes) -> tuple[IAddress | None, int] | None:
    """
    Read the PROXY header at the start of C{data}.

    @return: C{None} if more bytes are needed; else the source address it
        carries (C{None} for a v2 C{LOCAL} command, C{UNKNOWN} or a family
        other than TCP over IPv4 or IPv6: the connection's own peer is the
        client then) and the header's length.

    @raise InvalidProxyHeader: if C{data} does not start with a valid
        header.
    """
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        return _parseV2(data)
    if data[: len(V1_SIGNATURE)] == V1_SIGNATURE[: len(data)]:
        return _parseV1(data)
    raise InvalidProxyHeader("no PROXY protocol signature")


def _parseV1(data: bytes) -> tuple[IAddress | None, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise InvalidProxyHeader("a v1 header longer than 107 bytes")
        return None
    fields = data[:end].split(b" ")
    family = fields[1] if len(fields) > 1 else b""
    if family == b"UNKNOWN":
        return None, end + 2
    if family not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise InvalidProxyHeader(f"a v1 header that is not TCP4, TCP6 or UNKNOWN with four fields: {data[:end]!r}")
    kind = ipaddress.IPv4Address if family == b"TCP4" else ipaddress.IPv6Address
    try:
        host = kind(fields[2].decode("ascii"))
        kind(fields[3].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidProxyHeader(f"a v1 header with a bad address: {data[:end]!r}") from None
    port = _v1Port(fields[4])
    _v1Port(fields[5])
    if kind is ipaddress.IPv4Address:
        return IPv4Address("TCP", str(host), port), end + 2
    return IPv6Address("TCP", str(host), port), end + 2


def _v1Port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise InvalidProxyHeader(f"a v1 header with a bad port: {text!r}")
    return int(text)


def _parseV2(data: bytes) -> tuple[IAddress | None, int] | None:
    if len(data) < _V2_FIXED:
        return None
    command, family, length = struct.unpack_from("!BBH", data, len(V2_SIGNATURE))
    if command not in (_V2_PROXY, _V2_LOCAL):
        raise InvalidProxyHeader(f"a v2 header with version and command 0x{command:02x}")
    size = _V2_FIXED + length
    if len(data) < size:
        return None
    if command == _V2_LOCAL:
        return None, size
    # Type-length-value fields after the addresses (ALPN, authority, a
    # cloud's endpoint id, ...) are skipped with the rest of the header.
    if family == _V2_TCP4:
        if length < 12:
            raise InvalidProxyHeader("a v2 TCP over IPv4 header too short for its addresses")
        source, _, port, _ = struct.unpack_from("!4s4sHH", data, _V2_FIXED)
        return IPv4Address("TCP", str(ipaddress.IPv4Address(source)), port), size
    if family == _V2_TCP6:
        if length < 36:
            raise InvalidProxyHeader("a v2 TCP over IPv6 header too short for its addresses")
        source, _, port, _ = struct.unpack_from("!16s16sHH", data, _V2_FIXED)
        return IPv6Address("TCP", str(ipaddress.IPv6Address(source)), port), size
    return None, size


class ProxyHeaderReader(ProtocolWrapper):
    """
    Reads a connection's PROXY header, then builds the listener's protocol
    for the address it carries and stands between the two as the
    protocol's transport: C{getPeer} is the header's source.

    @ivar wrappedProtocol: the listener's protocol, once the header is read.
    """

    factory: ProxyHeaderFactory
    wrappedProtocol: Any
    _peer: IAddress | None = None
    _deadline: IDelayedCall | None = None

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        super().__init__(factory, None)
        self._buffer = b""

    def logPrefix(self) -> str:
        return "ProxyHeaderReader"

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        # The TCP transport's direct writer: a wrapper must not cost the
        # protocol above it the fast path of L{writerFor}.
        self.write = writerFor(transport)  # type: ignore[method-assign]
        self.factory.registerProtocol(self)
        seconds = self.factory.timeout()
        if seconds:
            self._deadline = self.factory.clock.callLater(seconds, self._timedOut)

    def getPeer(self) -> IAddress:
        return self._peer or self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        protocol = self.wrappedProtocol
        if protocol is not None:
            protocol.dataReceived(data)
            return
        if self._buffer is None:
            return  # refused already; the close is under way
        self._buffer += data
        try:
            parsed = parseProxyHeader(self._buffer)
        except InvalidProxyHeader as e:
            self._refuse(str(e))
            return
        if parsed is not None:
            self._headerReceived(*parsed)

    def _headerReceived(self, source: IAddress | None, length: int) -> None:
        self._cancelDeadline()
        rest, self._buffer = self._buffer[length:], b""
        self._peer = source
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self._buffer = None
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if rest and self.connected:
            protocol.dataReceived(rest)

    def _refuse(self, why: str) -> None:
        self._cancelDeadline()
        self._buffer = None
        log.info(
            "{client} refused: {why}; connection closed",
            client=getattr(self.transport.getPeer(), "host", "-"),
            why=why,
        )
        self.transport.loseConnection()

    def _timedOut(self) -> None:
        self._deadline = None
        self._buffer = None
        log.info(
            "{client} refused: no PROXY protocol header within {seconds}s; connection closed",
            client=getattr(self.transport.getPeer(), "host", "-"),
            seconds=self.factory.timeout(),
        )
        self.transport.abortConnection()

    def _cancelDeadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def abortWaiting(self) -> None:
        """The listener stops: drop this connection if its header has not come."""
        if self.wrappedProtocol is None and self.connected:
            self._cancelDeadline()
            self._buffer = None
            self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        self._cancelDeadline()
        self.connected = False
        self.factory.unregisterProtocol(self)
        protocol, self.wrappedProtocol = self.wrappedProtocol, None
        if protocol is not None:
            protocol.connectionLost(reason)


class ProxyHeaderFactory(WrappingFactory):
    """
    A listener's factory (or its TLS factory) behind the PROXY protocol:
    each connection's protocol is built once its header is read, for the
    address the header carries.

    @ivar timeout: how long a connection may take to send its header, read
        at each connection (the listener's C{client_header_timeout}, which a
        reload may change); 0 for ever.
    """

    protocol = ProxyHeaderReader

    def __init__(
        self, wrappedFactory: IProtocolFactory, clock: IReactorTime, timeout: Callable[[], float] = lambda: 0.0
    ) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderReader:
        return self.protocol(self)

    def stopFactory(self) -> None:
        for reader in list(self.protocols):
            reader.abortWaiting()
