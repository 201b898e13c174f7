# -*- test-case-name: tests.test_flow -*-
"""
Flow control between the two legs of a proxied connection.

Twisted's transports pause and resume the producer registered with them as
their write buffer fills and drains.  A client connection can need pausing
for more than one reason at a time (the upstream is slow to read, and
pipelined requests are piling up while a response streams), so a
L{ReadGate} keeps a set of reasons and only resumes reading when none is
left.  Without it, the upstream draining would resume a client that is held
for another reason, and a buffer would grow without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

__all__ = ["ReadGate", "pendingBytes", "writerFor"]


@implementer(IPushProducer)
class ReadGate:
    """
    Pauses reading from one transport for as long as any reason holds it.

    In the proxy a L{wsproxy.leg.Leg} owns its transport's producer
    registration and holds the other leg's gate for the reason C{"peer"}
    while its write buffer is full.  A gate can also be registered with
    another transport as its streaming producer directly (the conformance
    command's small TLS forwarder does): L{pauseProducing} holds it for
    C{"peer"}.
    """

    __slots__ = ("_transport", "_holds")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        #: The reasons holding the gate, or C{None} while none does: a gate
        #: is open nearly all the time, and a tunnel keeps two for as long as
        #: it lives, so an open gate costs no set.
        self._holds: set[str] | None = None

    @property
    def held(self) -> bool:
        """Whether reading is paused for any reason."""
        return self._holds is not None

    def hold(self, reason: str) -> None:
        """Stop reading until C{reason} is released."""
        holds = self._holds
        if holds is None:
            self._transport.pauseProducing()
            self._holds = {reason}
        else:
            holds.add(reason)

    def release(self, reason: str) -> None:
        """Resume reading if C{reason} was the last one holding the gate."""
        holds = self._holds
        if holds is not None and reason in holds:
            holds.discard(reason)
            if not holds:
                self._holds = None
                self._transport.resumeProducing()

    def open(self) -> None:
        """Resume reading, whatever held the gate."""
        if self._holds is not None:
            self._holds = None
            self._transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.hold("peer")

    def resumeProducing(self) -> None:
        self.release("peer")

    def stopProducing(self) -> None:
        """
        The consumer went away; each side closes the other itself, so there
        is nothing to do here.
        """


def pendingBytes(transport: Any) -> int:
    """
    How many bytes C{transport} holds that the kernel has not taken yet,
    looking through TLS wrappers to the TCP transport underneath (a TLS
    transport hands its ciphertext straight down).  A send timeout measures
    progress by this number shrinking.
    """
    while transport is not None:
        if hasattr(transport, "_tempDataLen"):
            return transport._tempDataLen + len(transport.dataBuffer) - transport.offset
        transport = getattr(transport, "transport", None)
    return 0


def writerFor(transport: Any) -> Callable[[bytes], None]:
    """
    A C{write} for C{transport} that hands bytes to the kernel at once when
    nothing is queued.

    Twisted's C{write} always queues and sends on the next reactor
    iteration, which costs two C{epoll_ctl} calls and a pass through the
    reactor per write; a proxy writes once per chunk it relays, so that is
    most of its cost per small message.  When the transport has nothing
    queued, sending now changes no ordering; whatever the kernel does not
    take, and every write while something is queued, goes through the
    transport as usual (flow control included).  Transports other than
    plain TCP (TLS, UNIX sockets under test doubles) use their own C{write}.
    """
    if type(transport) not in _DIRECT:
        return transport.write
    return _DirectWriter(transport).write


class _DirectWriter:
    """
    L{writerFor}'s C{write} for a plain TCP transport.

    An object with slots rather than a closure: every leg keeps one for as
    long as its connection lives, and a closure (its function, its cells)
    is several times the size.
    """

    __slots__ = ("_transport", "_send", "_queue")

    def __init__(self, transport: tcp.Connection) -> None:
        self._transport = transport
        self._send = transport.socket.send
        # The transport's own write, bound now: a TLS connection's TCP
        # transport gets this writer as its C{write} (see L{wsproxy.tls}).
        self._queue = transport.write

    def write(self, data: bytes) -> None:
        transport = self._transport
        if (
            transport._tempDataLen
            or len(transport.dataBuffer) > transport.offset
            or transport.disconnecting
            or not transport.connected
        ):
            self._queue(data)
            return
        try:
            sent = self._send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._queue(data)
            return
        if sent < len(data):
            self._queue(data[sent:])


_DIRECT = (tcp.Server, tcp.Client)
