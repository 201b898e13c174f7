# -*- test-case-name: tests.test_leg -*-
"""
One leg of a proxied connection (the client's, or the upstream's) and the
one object that owns its transport.

A L{Leg} is the only code that registers a producer with its transport,
starts a timer for it or closes it.  It registers I{itself} as its
transport's streaming producer once, when the connection is made, and
unregisters once, when it closes; what it passes the transport's pause and
resume on to (the other leg, while the two are wired together) changes
without touching the registration, as C{_newclient}'s
C{TransportProxyProducer} does.  Because every close goes through
L{Leg.close}, the producer is always unregistered before
C{loseConnection}: a TLS transport does not shut down while a producer is
registered, so a close that forgot it worked on plain TCP and hung on TLS.

What the bytes mean is not the leg's business: it hands them to its
L{ILegOwner} (the request loop, an exchange, a tunnel end, the idle pool),
and the owner changes as the connection moves from one layer to the next.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .flow import ReadGate, pendingBytes, writerFor
from .interfaces import ILegOwner

__all__ = ["Leg", "Unowned", "setNoDelay"]

log = Logger()

#: How long a close may take without a byte moving when no send timeout is
#: configured: a peer that never reads must not keep a closing socket open.
CLOSE_BOUND = 60.0

#: What Twisted's TCP transports read at a time.
_READ_SIZE = 64 * 1024

#: What a leg that carries bulk data reads at a time.
BULK_READ_SIZE = 256 * 1024

#: A deadline this close is due: the reactor's clock and float sums need
#: not agree to the last bit.
_SLACK = 0.001


def setNoDelay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off for C{transport}, looking through TLS
    wrappers to the TCP transport underneath; small WebSocket frames must
    not wait for an acknowledgement.
    """
    while transport is not None:
        setter = getattr(type(transport), "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(transport, True)
            except OSError:
                pass
            return
        handle = getattr(transport, "socket", None)
        if isinstance(handle, socket.socket):
            if handle.family in (socket.AF_INET, socket.AF_INET6):
                handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return
        transport = getattr(transport, "transport", None)


@implementer(ILegOwner)
class _Unowned:
    """The owner of a leg that nobody uses (any more): it drops what comes."""

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass

    def writable(self) -> None:
        pass


#: The one owner of every leg nobody uses.
Unowned = _Unowned()


@implementer(IPushProducer)
class Leg(Protocol):
    """
    A connection of the proxy, with its flow control, its timers and its
    close.

    @ivar owner: the L{ILegOwner} the bytes go to.
    @ivar gate: pauses reading from this leg, for as many reasons as hold it.
    @ivar feeder: the leg whose bytes this one writes; it is paused while
        this leg's write buffer is full.
    @ivar writeBlocked: whether this leg's write buffer is full.
    @ivar sendTimeout: how long pending writes may go without moving before
        the leg is aborted (0: for ever); also the bound on a close.
    @ivar sendTimedOut: whether the leg was aborted for that reason.
    """

    # Slots, and every attribute set in __init__: a proxy holds two legs per
    # tunnel for as long as the tunnel lives.  CPython shares one key table
    # between the attribute dicts of a class's instances only for attributes
    # set while few instances exist; one first set later (C{feeder}, once
    # connections are made concurrently) turns every leg's attributes into a
    # dict of its own, several hundred bytes per leg.  (L{Protocol} has no
    # slots, so an attribute not listed here still works, in a dict.)
    __slots__ = (
        "clock",
        "transport",
        "connected",
        "owner",
        "gate",
        "write",
        "sendTimeout",
        "feeder",
        "writeBlocked",
        "closing",
        "sendTimedOut",
        "_moved",
        "_timer",
        "_due",
        "_onDue",
        "_period",
        "_alsoWatching",
        "_sendWatch",
        "_lastPending",
        "_registered",
    )

    owner: Any
    gate: ReadGate
    write: Callable[[bytes], None]
    sendTimeout: float
    feeder: Leg | None

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.transport = None
        self.connected = 0
        self.owner = Unowned
        self.sendTimeout = 0.0
        self.feeder = None
        self.writeBlocked = False
        self.closing = False
        self.sendTimedOut = False
        self._moved = False
        self._timer: Any = None
        self._due: float | None = None
        self._onDue: Callable[[], object] | None = None
        self._period = 0.0
        self._alsoWatching: Leg | None = None
        self._sendWatch: Any = None
        self._lastPending = 0
        self._registered = False

    def connectionMade(self) -> None:
        transport = self.transport
        self.gate = ReadGate(transport)
        self.write = writerFor(transport)
        setNoDelay(transport)
        transport.registerProducer(self, True)
        self._registered = True

    def dataReceived(self, data: bytes) -> None:
        self._moved = True
        if len(data) >= _READ_SIZE:
            self._readInBulk()
        if not self.closing:
            self.owner.dataReceived(data)

    def _readInBulk(self) -> None:
        """
        A read filled Twisted's 64 KiB buffer: this connection carries bulk
        data, and bigger reads move it with fewer passes through the reactor
        and the owner (a 1 MiB message in 4 reads rather than 16).  Only
        such a connection reads more at a time; one moving small messages
        keeps small reads.
        """
        transport = self.transport
        if getattr(transport, "bufferSize", None) == _READ_SIZE:
            transport.bufferSize = BULK_READ_SIZE

    # Flow control: the transport pauses and resumes its producer (this
    # leg) as its write buffer fills and drains.

    def feedFrom(self, other: Leg | None) -> None:
        """
        Pause reading from C{other} whenever this leg's write buffer is
        full (C{None}: nobody feeds this leg any more).
        """
        previous = self.feeder
        if previous is other:
            return
        if previous is not None and self.writeBlocked:
            previous.gate.release("peer")
        self.feeder = other
        if other is not None and self.writeBlocked:
            other.gate.hold("peer")

    def pauseProducing(self) -> None:
        self.writeBlocked = True
        if self.feeder is not None:
            self.feeder.gate.hold("peer")
        self._watchSending()

    def resumeProducing(self) -> None:
        self.writeBlocked = False
        if self.feeder is not None:
            self.feeder.gate.release("peer")
        if not self.closing:
            self._stopWatchingSending()
            self.owner.writable()

    def stopProducing(self) -> None:
        """The transport is going away; L{connectionLost} cleans up."""

    # The send timeout: nginx's send_timeout measures the time between two
    # successful writes.  Twisted resumes a producer only once its buffer
    # is empty, so progress is the number of pending bytes going down.

    def _watchSending(self) -> None:
        seconds = self.sendTimeout or (CLOSE_BOUND if self.closing else 0)
        if self._sendWatch is None and seconds:
            self._lastPending = pendingBytes(self.transport)
            self._sendWatch = self.clock.callLater(seconds, self._checkSending, seconds)

    def _stopWatchingSending(self) -> None:
        if self._sendWatch is not None:
            self._sendWatch.cancel()
            self._sendWatch = None

    def _checkSending(self, seconds: float) -> None:
        self._sendWatch = None
        if not self.connected or not (self.writeBlocked or self.closing):
            return
        pending = pendingBytes(self.transport)
        if pending and pending < self._lastPending:
            self._lastPending = pending
            self._sendWatch = self.clock.callLater(seconds, self._checkSending, seconds)
            return
        self.sendTimedOut = True
        self.abort()

    # Waiting for the peer to send: one deadline per leg, for whatever the
    # layer above waits on now.  A keep-alive connection moves its deadline
    # several times per request (the idle wait, the response head, the
    # body, the idle wait again), almost always later and almost never to
    # the point of firing; so the deadline is a number, and the reactor
    # call behind it is scheduled once and left where it is.  When it
    # fires before the deadline it schedules itself again for the rest;
    # only a deadline earlier than the scheduled call reschedules it.

    def setDeadline(self, seconds: float, action: Callable[[], object]) -> None:
        """Call C{action} in C{seconds} (0: never) unless another wait replaces this one."""
        self._period = 0.0
        self._alsoWatching = None
        self._arm(seconds, action)

    def expectData(self, seconds: float, onStall: Callable[[], object], alsoWatching: Leg | None = None) -> None:
        """
        Call C{onStall} if C{seconds} pass without a byte read from this
        leg (or from C{alsoWatching}); like nginx's read timeouts this is
        the time between two reads, and a leg whose reading is paused by
        flow control is not stalled.

        The check is coarse on purpose: a read only sets a flag, and the
        deadline looks at it every C{seconds}, so a stall is noticed between
        one and two periods after the last byte, and the data path does no
        timer work per read.
        """
        self._moved = False
        if alsoWatching is not None:
            alsoWatching._moved = False
        self._period = seconds
        self._alsoWatching = alsoWatching
        self._arm(seconds, onStall)

    def cancelTimer(self) -> None:
        """
        Stop waiting.  The reactor call stays scheduled, with nothing to do,
        so that the next wait (the next request's) can reuse it; a leg that
        will not wait again soon uses L{dropTimer}.
        """
        self._due = None
        self._onDue = None
        self._alsoWatching = None

    def dropTimer(self) -> None:
        """Stop waiting, and unschedule the reactor call too."""
        self.cancelTimer()
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _arm(self, seconds: float, action: Callable[[], object]) -> None:
        if not seconds:
            self.cancelTimer()
            return
        clock = self.clock
        due = clock.seconds() + seconds
        self._due = due
        self._onDue = action
        timer = self._timer
        if timer is None:
            self._timer = clock.callLater(seconds, self._timerFired)
        elif timer.getTime() > due + _SLACK:
            timer.cancel()
            self._timer = clock.callLater(seconds, self._timerFired)

    def _timerFired(self) -> None:
        self._timer = None
        due = self._due
        if due is None:
            return
        clock = self.clock
        early = due - clock.seconds()
        if early > _SLACK:
            self._timer = clock.callLater(early, self._timerFired)
            return
        action = self._onDue
        assert action is not None
        if self._period:
            other = self._alsoWatching
            moved = self._moved or (other is not None and other._moved)
            paused = self.gate.held or (other is not None and other.gate.held)
            if moved or paused:
                self.expectData(self._period, action, other)
                return
        self.cancelTimer()
        action()

    # Ending

    def close(self) -> None:
        """
        Close once the pending writes are out; abort if they stop moving
        for C{sendTimeout} seconds (or L{CLOSE_BOUND}).
        """
        if self.closing or not self.connected:
            return
        self._release()
        # Read (and drop) what still comes: a TLS close waits for the peer's
        # close_notify, which a paused transport would never read.
        self.gate.open()
        self.transport.loseConnection()
        self._watchSending()

    def abort(self) -> None:
        """Drop the connection now, whatever is pending."""
        if not self.connected:
            return
        self._release()
        self.transport.abortConnection()

    def _release(self) -> None:
        """Let go of the peer, the timers and the producer registration."""
        self.closing = True
        self.dropTimer()
        self._stopWatchingSending()
        self.feedFrom(None)
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    def connectionLost(self, reason: Failure) -> None:
        self._release()
        self.connected = False
        owner, self.owner = self.owner, Unowned
        owner.connectionLost(reason)
