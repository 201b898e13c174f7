"""
A leg, the one owner of a transport: its producer registration, its
backpressure on the other leg, its send timeout, its read timers and its
close, with a fake clock and string transports.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from wsproxy.leg import BULK_READ_SIZE, CLOSE_BOUND, Leg, Unowned


class TLSLikeTransport(StringTransport):
    """
    Like TLSMemoryBIOProtocol: a close requested while a producer is
    registered does not happen; it records what it was asked.
    """

    def __init__(self) -> None:
        super().__init__()
        self.closedWithProducer: list[bool] = []
        self.aborted = False

    def loseConnection(self) -> None:
        self.closedWithProducer.append(self.producer is not None)
        super().loseConnection()

    def abortConnection(self) -> None:
        self.aborted = True
        super().loseConnection()


class QueuedTransport(TLSLikeTransport):
    """A transport whose pending bytes can be set, as the kernel takes them or not."""

    _tempDataLen = 0
    offset = 0

    def __init__(self) -> None:
        super().__init__()
        self.dataBuffer = b""


class RecordingOwner:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost: list[Failure] = []
        self.drained = 0

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)

    def writable(self) -> None:
        self.drained += 1


def connected(transport: StringTransport | None = None, sendTimeout: float = 0.0) -> tuple[Leg, Clock]:
    clock = Clock()
    leg = Leg(clock)
    leg.owner = RecordingOwner()
    leg.sendTimeout = sendTimeout
    leg.makeConnection(transport or TLSLikeTransport())
    return leg, clock


def test_the_leg_is_its_transports_producer_for_life():
    leg, _ = connected()
    assert leg.transport.producer is leg and leg.transport.streaming
    leg.dataReceived(b"x")
    assert leg.owner.data == [b"x"]


def test_close_unregisters_before_it_closes():
    """The reason TLS connections hung: the close must come with no producer registered."""
    leg, _ = connected()
    leg.close()
    assert leg.transport.closedWithProducer == [False]
    assert leg.closing
    leg.close()
    assert leg.transport.closedWithProducer == [False], "one close only"


def test_a_close_that_does_not_finish_is_aborted():
    leg, clock = connected(sendTimeout=5)
    leg.close()
    clock.advance(4.9)
    assert not leg.transport.aborted
    clock.advance(0.1)
    assert leg.transport.aborted and leg.sendTimedOut


def test_a_close_is_bounded_without_a_send_timeout():
    leg, clock = connected(sendTimeout=0)
    leg.close()
    clock.advance(CLOSE_BOUND)
    assert leg.transport.aborted


def test_a_close_that_finishes_cancels_its_bound():
    leg, clock = connected(sendTimeout=5)
    leg.close()
    leg.connectionLost(Failure(ConnectionDone()))
    assert not clock.getDelayedCalls()


def test_a_full_write_buffer_pauses_the_feeder():
    client, _ = connected()
    upstream, _ = connected()
    client.feedFrom(upstream)
    client.pauseProducing()
    assert upstream.gate.held and upstream.transport.producerState == "paused"
    client.resumeProducing()
    assert not upstream.gate.held and upstream.transport.producerState == "producing"
    assert client.owner.drained == 1


def test_changing_feeders_while_blocked_moves_the_hold():
    client, _ = connected()
    first, _ = connected()
    second, _ = connected()
    client.feedFrom(first)
    client.pauseProducing()
    client.feedFrom(second)
    assert not first.gate.held and second.gate.held
    client.feedFrom(None)
    assert not second.gate.held


def test_send_timeout_aborts_a_leg_whose_writes_do_not_move():
    leg, clock = connected(QueuedTransport(), sendTimeout=10)
    leg.transport.dataBuffer = b"x" * 1000
    leg.pauseProducing()
    clock.advance(9)
    assert not leg.transport.aborted
    clock.advance(1)
    assert leg.transport.aborted and leg.sendTimedOut


def test_send_timeout_is_time_between_writes():
    """A slow reader that takes some bytes within each period is not dropped."""
    leg, clock = connected(QueuedTransport(), sendTimeout=10)
    leg.transport.dataBuffer = b"x" * 1000
    leg.pauseProducing()
    for remaining in (900, 800, 700):
        leg.transport.offset = 1000 - remaining
        clock.advance(10)
        assert not leg.transport.aborted
    clock.advance(10)
    assert leg.transport.aborted


def test_a_drained_buffer_stops_the_send_timeout():
    leg, clock = connected(QueuedTransport(), sendTimeout=10)
    leg.transport.dataBuffer = b"x" * 10
    leg.pauseProducing()
    leg.resumeProducing()
    clock.advance(20)
    assert not leg.transport.aborted
    assert not clock.getDelayedCalls()


def test_no_send_timeout_when_it_is_off():
    leg, clock = connected(QueuedTransport(), sendTimeout=0)
    leg.pauseProducing()
    assert not clock.getDelayedCalls()


def test_a_deadline_fires_once_unless_replaced():
    leg, clock = connected()
    fired: list[str] = []
    leg.setDeadline(3, lambda: fired.append("first"))
    leg.setDeadline(5, lambda: fired.append("second"))
    clock.advance(3)
    assert fired == []
    clock.advance(2)
    assert fired == ["second"]


def test_a_later_deadline_reuses_the_scheduled_call():
    """A keep-alive connection's per-request waits schedule nothing new."""
    leg, clock = connected()
    fired: list[str] = []
    leg.setDeadline(5, lambda: fired.append("idle"))
    scheduled = clock.getDelayedCalls()
    for _ in range(3):
        leg.cancelTimer()
        clock.advance(1)
        leg.expectData(10, lambda: fired.append("stalled"))
        leg.cancelTimer()
        leg.setDeadline(5, lambda: fired.append("idle"))
    assert clock.getDelayedCalls() == scheduled
    clock.advance(4.5)
    assert fired == []
    clock.advance(0.5)
    assert fired == ["idle"]
    assert not clock.getDelayedCalls()


def test_an_earlier_deadline_is_not_late():
    leg, clock = connected()
    fired: list[str] = []
    leg.setDeadline(60, lambda: fired.append("late"))
    leg.setDeadline(2, lambda: fired.append("soon"))
    clock.advance(2)
    assert fired == ["soon"]
    clock.advance(60)
    assert fired == ["soon"] and not clock.getDelayedCalls()


def test_a_cancelled_deadline_does_nothing_when_its_call_comes():
    leg, clock = connected()
    fired: list[bool] = []
    leg.setDeadline(5, lambda: fired.append(True))
    leg.cancelTimer()
    clock.advance(5)
    assert fired == [] and not clock.getDelayedCalls()


def test_drop_timer_unschedules_the_call():
    leg, clock = connected()
    leg.setDeadline(5, lambda: None)
    leg.dropTimer()
    assert not clock.getDelayedCalls()


def test_expect_data_measures_the_time_between_reads():
    leg, clock = connected()
    stalled: list[bool] = []
    leg.expectData(10, lambda: stalled.append(True))
    clock.advance(6)
    leg.dataReceived(b"a")
    clock.advance(6)
    assert stalled == []
    clock.advance(10)
    assert stalled == [True]


def test_a_leg_paused_by_flow_control_is_not_stalled():
    leg, clock = connected()
    stalled: list[bool] = []
    leg.expectData(10, lambda: stalled.append(True))
    leg.gate.hold("peer")
    clock.advance(30)
    assert stalled == []
    leg.gate.release("peer")
    clock.advance(10)
    assert stalled == [True]


def test_expect_data_can_watch_the_other_leg_too():
    client, clock = connected()
    upstream, _ = connected()
    upstream.clock = clock
    idle: list[bool] = []
    client.expectData(10, lambda: idle.append(True), alsoWatching=upstream)
    clock.advance(6)
    upstream.dataReceived(b"frame")
    clock.advance(6)
    assert idle == []
    clock.advance(10)
    assert idle == [True]


def test_connection_lost_lets_go_of_everything():
    client, clock = connected(QueuedTransport(), sendTimeout=5)
    upstream, _ = connected()
    client.feedFrom(upstream)
    client.pauseProducing()
    client.setDeadline(5, lambda: None)
    owner = client.owner
    reason = Failure(ConnectionDone())
    client.connectionLost(reason)
    assert owner.lost == [reason]
    assert client.owner is Unowned and not client.connected
    assert not upstream.gate.held, "the feeder is released"
    assert not clock.getDelayedCalls(), "no timer outlives the connection"


def test_abort_unregisters_first():
    leg, _ = connected()
    leg.abort()
    assert leg.transport.aborted and leg.transport.producer is None


def test_a_closing_leg_reads_again_and_drops_what_comes():
    """A TLS close needs the peer's close_notify read; nothing read goes up any more."""
    leg, _ = connected()
    leg.gate.hold("buffer")
    leg.gate.hold("peer")
    leg.close()
    assert not leg.gate.held and leg.transport.producerState == "producing"
    leg.dataReceived(b"late")
    assert leg.owner.data == []


class TCPLikeTransport(TLSLikeTransport):
    """Reads up to C{bufferSize} bytes at a time, as Twisted's TCP transports do."""

    bufferSize = 64 * 1024


def test_a_leg_that_fills_its_reads_reads_more_at_a_time():
    leg, _ = connected(TCPLikeTransport())
    leg.dataReceived(b"x" * 1000)
    assert leg.transport.bufferSize == 64 * 1024, "small messages keep small reads"
    leg.dataReceived(b"x" * (64 * 1024))
    assert leg.transport.bufferSize == BULK_READ_SIZE
    assert leg.owner.data == [b"x" * 1000, b"x" * (64 * 1024)], "nothing is held back"


def test_bulk_reads_leave_other_transports_alone():
    leg, _ = connected()
    leg.dataReceived(b"x" * (64 * 1024))
    assert not hasattr(leg.transport, "bufferSize")
