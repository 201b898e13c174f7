"""
The connection core in memory: a client leg, the request loop, the
exchange and the upstream leg driven byte by byte, with a fake clock, so
that every state of an L{Exchange}, every timer of a L{RequestLoop} and
every close is checked deterministically and without sockets.

The transports are L{StringTransport}s that behave like a reactor's where
it matters: after a close or an abort they tell their protocol the
connection is gone on the next turn of the (fake) reactor, and they record
whether a producer was still registered when C{loseConnection} was called,
which a TLS transport would not survive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from support import KEY, switching, upgradeRequest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from wsproxy.config import parseConfig
from wsproxy.connection import State
from wsproxy.http import LAST_CHUNK, ChunkedDecoder, chunk
from wsproxy.leg import Leg
from wsproxy.relay import Exchange, ExchangeState, UpstreamLeg
from wsproxy.server import REFUSAL_BOUND, ListenerSettings, ProxyFactory, RequestLoop
from wsproxy.tunnel import _TunnelEnd
from wsproxy.upstream import UpstreamPool

CONNECTING = ExchangeState.CONNECTING
SENDING = ExchangeState.SENDING
WAITING = ExchangeState.WAITING
RECEIVING = ExchangeState.RECEIVING
SWITCHED = ExchangeState.SWITCHED
DONE = ExchangeState.DONE

LISTENER = IPv4Address("TCP", "127.0.0.1", 8080)
GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
NOT_YET_CLOSED = object()


class FakeTransport(StringTransport):
    """
    A L{StringTransport} whose close reaches its protocol, one reactor turn
    later, as a real transport's does.  Like TLS, it does not shut down
    while a producer is registered: C{producerAtClose} records what was
    registered when C{loseConnection} was called.
    """

    protocol: Any = None

    def __init__(self, clock: MemoryReactorClock, **kwargs: Any) -> None:
        super().__init__(lenient=True, **kwargs)
        self.clock = clock
        self.producerAtClose: Any = NOT_YET_CLOSED

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.producerAtClose = self.producer
            if self.producer is None:
                self.clock.callLater(0, self.gone, ConnectionDone("closed"))
        super().loseConnection()

    def abortConnection(self) -> None:
        if not self.disconnected:
            self.clock.callLater(0, self.gone, ConnectionAborted())
        super().abortConnection()

    def gone(self, reason: Exception) -> None:
        """The connection is over: tell the protocol, once."""
        if self.connected:
            self.connected = False
            self.protocol.connectionLost(Failure(reason))


@dataclass
class Peer:
    """One connection of the proxy, seen from the other end."""

    leg: Leg
    transport: FakeTransport
    protocol: Any

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        return self.transport.value()

    def take(self) -> bytes:
        """What the proxy wrote since the last C{take}."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def closes(self, reason: Exception | None = None) -> None:
        """This end closes (or resets) the connection."""
        self.transport.gone(reason or ConnectionDone("closed by the peer"))

    @property
    def closed(self) -> bool:
        """The proxy closed or aborted this connection."""
        return bool(self.transport.disconnecting)

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)

    @property
    def gone(self) -> bool:
        return not self.transport.connected


class TracedExchange(Exchange):
    """An exchange that remembers every state it went through, in order."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            history = self.__dict__.setdefault("history", [])
            if not history or history[-1] is not value:
                history.append(value)
        object.__setattr__(self, name, value)


class Proxy:
    """A proxy listener on a fake reactor, in front of one upstream server."""

    def __init__(self, upstream: dict[str, Any] | None = None, **server: Any) -> None:
        self.reactor = MemoryReactorClock()
        document = {
            "upstream": {"app": {"servers": ["127.0.0.1:9001"], **(upstream or {})}},
            "server": [{"listen": "tcp:0", "proxy_pass": "http://app", "access_log": False, **server}],
        }
        config = parseConfig(document, "(test)")
        self.block = config.servers[0]
        self.pool = UpstreamPool(config.upstreams["app"], self.reactor)
        self.factory = ProxyFactory(ListenerSettings(self.block, self.pool, self.reactor))
        self.factory.startExchange = self._startExchange
        self.exchanges: list[TracedExchange] = []
        self._accepted = 0

    def _startExchange(self, loop: RequestLoop, request: Any) -> TracedExchange:
        exchange = TracedExchange(loop, request, loop.settings)
        self.exchanges.append(exchange)
        return exchange

    @property
    def exchange(self) -> TracedExchange:
        return self.exchanges[-1]

    @property
    def connectAttempts(self) -> int:
        return len(self.reactor.tcpClients)

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)

    def settle(self) -> None:
        """Run what the reactor would run on its next turn (closes)."""
        self.reactor.advance(0)

    def client(self, port: int = 40000) -> Peer:
        address = IPv4Address("TCP", "127.0.0.1", port)
        leg = self.factory.buildProtocol(address)
        transport = FakeTransport(self.reactor, peerAddress=address, hostAddress=LISTENER)
        transport.protocol = leg
        leg.makeConnection(transport)
        return Peer(leg, transport, leg)

    def acceptUpstream(self) -> Peer:
        """The upstream server accepts the oldest connection not accepted yet."""
        assert self._accepted < self.connectAttempts, "the proxy did not ask for a connection"
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[self._accepted]
        assert (host, port) == ("127.0.0.1", 9001)
        self._accepted += 1
        standIn = factory.buildProtocol(None)
        transport = FakeTransport(self.reactor)
        transport.protocol = standIn
        standIn.makeConnection(transport)
        leg = transport.protocol
        assert isinstance(leg, Leg), "the leg has the transport to itself"
        return Peer(leg, transport, leg)

    def refuseUpstream(self) -> None:
        """The upstream server refuses the oldest connection not accepted yet."""
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[self._accepted]
        connector = self.reactor.connectors[self._accepted]
        self._accepted += 1
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))


def requestHead(method: bytes = b"GET", target: bytes = b"/", extra: bytes = b"") -> bytes:
    """The head the proxy forwards for a request from 127.0.0.1 with C{Host: h}."""
    return (
        b"%b %b HTTP/1.1\r\nHost: h\r\n%bX-Forwarded-For: 127.0.0.1\r\nX-Real-IP: 127.0.0.1\r\n"
        b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: h\r\n" % (method, target, extra)
    )


def status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response
    return int(response[9:12])


def dechunk(data: bytes) -> bytes:
    """The payload of whole chunks (no last chunk)."""
    payload, rest = ChunkedDecoder().feed(data)
    assert rest is None, "no last chunk expected"
    return payload


def headLines(response: bytes) -> list[bytes]:
    head, _, _ = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[1:]


@pytest.fixture
def accessLog():
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "wsproxy.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


# 1. A GET, from connect to keep-alive


def test_a_get_goes_connecting_waiting_receiving_done_and_the_connection_is_kept_alive():
    proxy = Proxy(keepalive_timeout=30)
    client = proxy.client()
    client.send(GET)
    exchange = proxy.exchange
    assert exchange.state is CONNECTING
    assert proxy.connectAttempts == 1
    upstream = proxy.acceptUpstream()
    assert exchange.state is WAITING
    assert upstream.received() == requestHead() + b"\r\n"
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    assert exchange.state is RECEIVING
    assert client.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe"
    upstream.send(b"llo")
    assert exchange.state is DONE
    assert exchange.history == [CONNECTING, WAITING, RECEIVING, DONE]
    assert client.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert proxy.pool.servers[0].idle[0].leg is upstream.leg, "the upstream connection went back to the pool"
    assert client.leg.loop.cycle.state is State.IDLE
    proxy.advance(29.9)
    assert not client.closed
    proxy.advance(0.1)
    assert client.closed and not client.aborted
    assert client.transport.producerAtClose is None
    proxy.settle()
    assert client.gone
    assert not proxy.factory.connections


# 2. A request body streams while SENDING


def test_a_content_length_body_streams_in_order_while_sending_then_waiting():
    proxy = Proxy()
    client = proxy.client()
    client.send(b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\n\r\nabc")
    exchange = proxy.exchange
    assert exchange.state is CONNECTING
    upstream = proxy.acceptUpstream()
    assert exchange.state is SENDING
    assert upstream.take() == requestHead(b"POST", b"/form") + b"Content-Length: 8\r\n\r\nabc"
    client.send(b"de")
    assert exchange.state is SENDING
    assert upstream.take() == b"de"
    client.send(b"fgh")
    assert upstream.take() == b"fgh"
    assert exchange.state is WAITING
    upstream.send(OK)
    assert exchange.history == [CONNECTING, SENDING, WAITING, RECEIVING, DONE]
    assert client.received() == OK
    assert not client.closed


def test_a_chunked_body_is_dechunked_and_reframed_in_order_while_sending():
    proxy = Proxy()
    client = proxy.client()
    client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
    upstream = proxy.acceptUpstream()
    exchange = proxy.exchange
    assert exchange.state is SENDING
    assert upstream.take() == requestHead(b"POST", b"/up") + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"ab")
    client.send(b"cde\r\n")
    assert upstream.take() == chunk(b"cde")
    client.send(b"3;ext=1\r\nfgh\r\n2\r\nij\r\n")
    assert exchange.state is SENDING
    assert dechunk(upstream.take()) == b"fghij"
    client.send(b"0\r\nTrailer: x\r\n\r\n")
    assert upstream.take() == LAST_CHUNK
    assert exchange.state is WAITING
    upstream.send(OK)
    assert exchange.history == [CONNECTING, SENDING, WAITING, RECEIVING, DONE]
    assert client.received() == OK


# 3. client_header_timeout


def test_a_client_that_sends_nothing_is_closed_after_the_header_timeout_without_a_response():
    proxy = Proxy(client_header_timeout=10)
    client = proxy.client()
    proxy.advance(9.9)
    assert not client.closed
    proxy.advance(0.1)
    assert client.closed
    assert client.received() == b""
    assert proxy.connectAttempts == 0


def test_a_partial_head_is_408_after_the_header_timeout_then_closed():
    proxy = Proxy(client_header_timeout=10)
    client = proxy.client()
    client.send(b"GET / HTTP/1.1\r\nHo")
    proxy.advance(10)
    assert status(client.received()) == 408
    assert client.closed
    assert client.transport.producerAtClose is None
    assert proxy.connectAttempts == 0


def test_the_header_timeout_replaces_the_keepalive_timeout_once_a_next_head_begins():
    proxy = Proxy(client_header_timeout=10, keepalive_timeout=30)
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    upstream.send(OK)
    assert client.take() == OK
    proxy.advance(5)
    client.send(b"GET /next HT")
    proxy.advance(10)
    assert status(client.received()) == 408
    assert client.closed


# 4. client_body_timeout


def test_a_stalled_request_body_is_408_and_closes_after_the_body_timeout():
    # The read timers check in windows of the timeout: a stall is noticed
    # between one and two timeouts after the last byte (see wsproxy.leg).
    proxy = Proxy(client_body_timeout=10)
    client = proxy.client()
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    upstream = proxy.acceptUpstream()
    proxy.advance(9)
    client.send(b"d")
    proxy.advance(9.9)
    assert not client.closed, "the timeout is the time between two reads"
    proxy.advance(10)
    response = client.received()
    assert status(response) == 408
    assert b"Connection: close" in headLines(response)
    assert client.closed
    assert upstream.aborted
    assert proxy.exchange.history == [CONNECTING, SENDING, DONE]


def test_a_body_stall_is_excused_while_the_upstream_holds_the_clients_reading():
    proxy = Proxy(client_body_timeout=10, proxy_send_timeout=0)
    client = proxy.client()
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    upstream = proxy.acceptUpstream()
    upstream.leg.pauseProducing()
    assert client.transport.producerState == "paused"
    proxy.advance(100)
    assert not client.closed and not upstream.closed
    upstream.leg.resumeProducing()
    assert client.transport.producerState == "producing"
    proxy.advance(20)
    assert status(client.received()) == 408
    assert client.closed


# 5. proxy_read_timeout


def test_no_response_head_within_the_read_timeout_is_504():
    proxy = Proxy(proxy_read_timeout=15)
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    proxy.advance(14)
    assert client.received() == b""
    proxy.advance(1)
    response = client.received()
    assert status(response) == 504
    assert upstream.aborted
    assert proxy.exchange.history == [CONNECTING, WAITING, DONE]
    assert not client.closed, "the request was read whole: the connection stays usable"


def test_a_response_body_that_stalls_is_cut_short_and_the_upstream_aborted():
    proxy = Proxy(proxy_read_timeout=15)
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    proxy.advance(10)
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    proxy.advance(10)
    upstream.send(b"d")
    proxy.advance(14.9)
    assert not client.closed, "the timeout is the time between two reads"
    proxy.advance(15)
    assert client.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd"
    assert client.closed and not client.aborted
    assert client.transport.producerAtClose is None
    assert upstream.aborted
    assert proxy.exchange.history == [CONNECTING, WAITING, RECEIVING, DONE]


# 6. send_timeout


def test_a_client_that_does_not_read_is_aborted_after_the_send_timeout_and_the_upstream_released():
    proxy = Proxy(send_timeout=20)
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    client.leg.pauseProducing()
    assert upstream.transport.producerState == "paused", "the slow client holds the upstream"
    proxy.advance(19.9)
    assert not client.closed
    proxy.advance(0.1)
    assert client.leg.sendTimedOut
    assert client.aborted
    assert upstream.aborted
    assert client.gone and upstream.gone
    assert proxy.exchange.state is DONE
    assert not proxy.pool.servers[0].idle


def test_a_pause_that_ends_within_the_send_timeout_closes_nothing():
    proxy = Proxy(send_timeout=20)
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    client.leg.pauseProducing()
    proxy.advance(19)
    client.leg.resumeProducing()
    assert upstream.transport.producerState == "producing"
    proxy.advance(30)
    assert not client.closed and not upstream.closed
    assert not client.leg.sendTimedOut
    upstream.send(b"defghij")
    assert proxy.exchange.state is DONE
    assert client.received().endswith(b"abcdefghij")
    assert not client.closed


# 7. proxy_send_timeout


def test_an_upstream_that_does_not_read_the_body_is_504_after_the_proxy_send_timeout():
    proxy = Proxy(proxy_send_timeout=5)
    client = proxy.client()
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    upstream = proxy.acceptUpstream()
    upstream.leg.pauseProducing()
    proxy.advance(4.9)
    assert client.received() == b""
    proxy.advance(0.1)
    assert upstream.leg.sendTimedOut and upstream.aborted
    response = client.received()
    assert status(response) == 504
    assert b"Connection: close" in headLines(response)
    assert client.closed, "the body was not all read"
    assert proxy.exchange.history == [CONNECTING, SENDING, DONE]


# 8. A truncated response


def test_a_truncated_response_closes_the_client_with_the_producer_unregistered_first():
    proxy = Proxy()
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd")
    upstream.closes()
    assert client.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd"
    assert client.closed and not client.aborted
    assert client.transport.producerAtClose is None, "a TLS transport would not shut down"
    proxy.settle()
    assert client.gone
    assert proxy.exchange.history == [CONNECTING, WAITING, RECEIVING, DONE]


# 9. An early response


def test_an_early_response_says_connection_close_and_closes_after_it():
    proxy = Proxy()
    client = proxy.client()
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    upstream = proxy.acceptUpstream()
    upstream.send(b"HTTP/1.1 413 Too Big\r\nContent-Length: 2\r\n\r\nno")
    response = client.received()
    assert status(response) == 413
    assert b"Connection: close" in headLines(response)
    assert response.endswith(b"\r\n\r\nno")
    assert client.closed
    assert client.transport.producerAtClose is None
    assert proxy.exchange.history == [CONNECTING, SENDING, RECEIVING, DONE]
    assert not proxy.pool.servers[0].idle, "an upstream whose request was cut is not reused"


def test_after_an_early_response_the_rest_of_the_body_is_read_and_dropped():
    proxy = Proxy()
    client = proxy.client()
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    upstream = proxy.acceptUpstream()
    upstream.take()
    upstream.leg.pauseProducing()
    assert client.transport.producerState == "paused", "the deaf upstream holds the client"
    upstream.send(b"HTTP/1.1 413 Too Big\r\nContent-Length: 2\r\n\r\nno")
    assert client.closed
    assert client.transport.producerState == "producing", "a closing leg reads until the peer has closed"
    response = client.take()
    client.send(b"defg")
    assert client.take() == b"" and upstream.take() == b""
    assert status(response) == 413


# 10. Pipelining


def test_a_pipelined_request_goes_upstream_only_after_the_previous_response():
    proxy = Proxy()
    client = proxy.client()
    client.send(GET + b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream = proxy.acceptUpstream()
    assert upstream.take() == requestHead() + b"\r\n"
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nh")
    assert upstream.take() == b"", "one request at a time"
    assert len(proxy.exchanges) == 1
    upstream.send(b"i")
    assert len(proxy.exchanges) == 2
    assert proxy.connectAttempts == 1, "the kept-alive connection is reused"
    assert upstream.take() == requestHead(b"GET", b"/second") + b"\r\n"
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye")
    assert client.received() == OK + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye"


def test_the_next_pipelined_request_waits_while_the_client_is_write_blocked():
    proxy = Proxy()
    client = proxy.client()
    client.send(GET + b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream = proxy.acceptUpstream()
    upstream.take()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nh")
    client.leg.pauseProducing()
    upstream.send(b"i")
    assert proxy.exchange.state is DONE
    assert len(proxy.exchanges) == 1, "no answer while the client does not read"
    assert upstream.take() == b""
    client.leg.resumeProducing()
    assert len(proxy.exchanges) == 2
    assert upstream.take() == requestHead(b"GET", b"/second") + b"\r\n"


# 11. Retrying on a kept-alive connection


def keptAlive(upstreamTable: dict[str, Any] | None = None, **server: Any) -> tuple[Proxy, Peer, Peer]:
    """A proxy whose one upstream connection is idle in the pool after a GET."""
    proxy = Proxy(upstreamTable, **server)
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    upstream.send(OK)
    assert client.take() == OK
    assert [idle.leg for idle in proxy.pool.servers[0].idle] == [upstream.leg]
    upstream.take()
    return proxy, client, upstream


def test_a_post_on_a_reused_connection_that_the_server_closes_is_502_and_not_retried():
    proxy, client, upstream = keptAlive()
    client.send(b"POST /orders/42/cancel HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    exchange = proxy.exchange
    assert exchange.upstream is upstream.leg and exchange.reused
    assert upstream.take() == requestHead(b"POST", b"/orders/42/cancel") + b"Content-Length: 0\r\n\r\n"
    upstream.closes()
    assert status(client.received()) == 502
    assert proxy.connectAttempts == 1, "a non-idempotent request is not sent twice"
    assert exchange.history == [CONNECTING, WAITING, DONE]


def test_a_get_on_a_reused_connection_that_the_server_closes_is_retried_on_a_new_one():
    proxy, client, upstream = keptAlive()
    client.send(b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n")
    exchange = proxy.exchange
    assert exchange.reused
    upstream.closes()
    assert proxy.connectAttempts == 2
    assert exchange.state is CONNECTING
    fresh = proxy.acceptUpstream()
    assert fresh.take() == requestHead(b"GET", b"/again") + b"\r\n"
    assert exchange.upstream is fresh.leg and not exchange.reused
    fresh.send(OK)
    assert client.received() == OK
    assert exchange.history == [CONNECTING, WAITING, CONNECTING, WAITING, RECEIVING, DONE]


def test_a_post_is_retried_when_non_idempotent_retries_are_allowed():
    proxy, client, upstream = keptAlive(proxy_next_upstream_non_idempotent=True)
    client.send(b"POST /orders/42/cancel HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    upstream.closes()
    assert proxy.connectAttempts == 2
    fresh = proxy.acceptUpstream()
    assert fresh.take() == requestHead(b"POST", b"/orders/42/cancel") + b"Content-Length: 0\r\n\r\n"
    fresh.send(OK)
    assert client.received() == OK


def test_a_reused_connection_that_answered_something_is_not_retried():
    proxy, client, upstream = keptAlive()
    client.send(b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream.send(b"HTTP/1.1 200 OK\r\n")
    upstream.closes()
    assert status(client.received()) == 502
    assert proxy.connectAttempts == 1


# 12. 499 and the access log


def test_a_client_that_goes_away_before_the_response_is_logged_499(accessLog):
    proxy = Proxy(access_log=True)
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    client.closes()
    assert upstream.aborted
    assert [event["status"] for event in accessLog] == [499]
    assert proxy.exchange.history == [CONNECTING, WAITING, DONE]


def test_a_client_that_goes_away_mid_body_keeps_the_responses_status(accessLog):
    proxy = Proxy(access_log=True)
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    upstream.send(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\n\r\nabc")
    client.closes(ConnectionLost("reset"))
    assert upstream.aborted
    assert [(event["status"], event["bytesOut"]) for event in accessLog] == [(206, 3)]


def test_a_client_that_goes_away_while_connecting_abandons_the_attempt(accessLog):
    proxy = Proxy(access_log=True)
    client = proxy.client()
    client.send(GET)
    client.closes()
    assert proxy.reactor.connectors[0].stoppedConnecting
    assert [event["status"] for event in accessLog] == [499]
    assert proxy.exchange.history == [CONNECTING, DONE]


# 13. The switch to a tunnel


def test_a_101_hands_both_legs_to_a_tunnel_and_bytes_flow_both_ways_in_order():
    proxy = Proxy()
    client = proxy.client()
    client.send(upgradeRequest() + b"early frame")
    exchange = proxy.exchange
    upstream = proxy.acceptUpstream()
    sent = upstream.take()
    assert sent.startswith(b"GET /ws HTTP/1.1\r\n")
    assert sent.endswith(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"), "the early bytes wait"
    upstream.send(switching() + b"server hello")
    assert exchange.state is SWITCHED
    assert exchange.history == [CONNECTING, WAITING, SWITCHED]
    response = client.take()
    assert status(response) == 101
    assert response.endswith(b"\r\n\r\nserver hello")
    assert upstream.take() == b"early frame"
    assert isinstance(client.leg.owner, _TunnelEnd) and isinstance(upstream.leg.owner, _TunnelEnd)
    assert client.leg.owner is not upstream.leg.owner
    assert client.leg.owner is not client.leg.loop and upstream.leg.owner is not exchange
    client.send(b"ping")
    assert upstream.take() == b"ping"
    upstream.send(b"pong")
    assert client.take() == b"pong"
    upstream.closes()
    assert client.closed
    assert client.transport.producerAtClose is None


def test_a_tunnel_closes_the_upstream_when_the_client_goes():
    proxy = Proxy()
    client = proxy.client()
    client.send(upgradeRequest())
    upstream = proxy.acceptUpstream()
    upstream.send(switching())
    client.closes()
    assert upstream.closed
    assert upstream.transport.producerAtClose is None
    proxy.settle()
    assert upstream.gone


def test_a_101_that_was_not_asked_for_is_502():
    proxy = Proxy()
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    upstream.send(switching(KEY))
    assert status(client.received()) == 502
    assert upstream.aborted
    assert proxy.exchange.history == [CONNECTING, WAITING, DONE]


# 14. An error in the connected callback


def test_an_exception_while_sending_the_request_head_is_502_and_nothing_hangs(monkeypatch):
    def broken(self: Exchange) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Exchange, "_awaitResponseHead", broken)
    proxy = Proxy()
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    assert status(client.received()) == 502
    assert upstream.aborted
    assert proxy.exchange.state is DONE
    assert client.leg.loop.exchange is None
    proxy.settle()
    assert upstream.gone
    assert not client.closed, "a GET read whole leaves the connection usable"
    proxy.advance(proxy.block.keepalive_timeout)
    assert client.closed, "the keep-alive deadline is armed"


# 15. Draining


def test_drain_closes_an_idle_connection_now_and_a_busy_one_after_its_response():
    proxy = Proxy()
    idle = proxy.client(40000)
    busy = proxy.client(40001)
    busy.send(GET)
    upstream = proxy.acceptUpstream()
    proxy.factory.drain()
    assert idle.closed
    assert not busy.closed
    upstream.send(OK)
    assert busy.received().endswith(b"\r\n\r\nhi") and b"Connection: close" in headLines(busy.received())
    assert busy.closed
    proxy.settle()
    assert not proxy.factory.connections


def test_drain_closes_a_connection_that_is_between_two_requests():
    proxy, client, upstream = keptAlive()
    proxy.factory.drain()
    assert client.closed


# More states and endings


def test_no_upstream_reachable_is_502():
    proxy = Proxy()
    client = proxy.client()
    client.send(GET)
    proxy.refuseUpstream()
    assert status(client.received()) == 502
    assert proxy.exchange.history == [CONNECTING, DONE]
    assert not client.closed


def test_a_post_whose_upstream_cannot_be_reached_is_502_and_closes_since_its_body_was_not_read():
    proxy = Proxy()
    client = proxy.client()
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nab")
    proxy.refuseUpstream()
    response = client.received()
    assert status(response) == 502
    assert b"Connection: close" in headLines(response)
    assert client.closed
    assert client.leg.loop.cycle.state is State.MUST_CLOSE


def test_an_upstream_that_closes_a_fresh_connection_without_answering_is_502():
    proxy = Proxy()
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    upstream.closes()
    assert status(client.received()) == 502
    assert proxy.connectAttempts == 1


def test_a_response_head_split_across_reads_stays_waiting_until_complete():
    proxy = Proxy()
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Le")
    assert proxy.exchange.state is WAITING
    assert client.received() == b""
    upstream.send(b"ngth: 2\r\n\r\nhi")
    assert client.received() == OK


def test_a_response_delimited_by_the_close_is_rechunked_and_finished_by_the_close():
    proxy = Proxy()
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    upstream.send(b"HTTP/1.1 200 OK\r\n\r\nabc")
    upstream.closes()
    assert client.received() == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"abc") + LAST_CHUNK
    assert proxy.exchange.state is DONE
    assert not client.closed


def test_a_malformed_request_is_400_and_closes():
    proxy = Proxy()
    client = proxy.client()
    client.send(b"GET / HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n")
    assert status(client.received()) == 400
    assert client.closed
    assert client.leg.loop.cycle.state is State.ERROR
    assert proxy.connectAttempts == 0


def test_a_body_over_the_limit_mid_stream_is_413_and_closes():
    proxy = Proxy(client_max_body_size=4)
    client = proxy.client()
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    upstream = proxy.acceptUpstream()
    client.send(b"3\r\nabc\r\n3\r\ndef\r\n")
    assert status(client.received()) == 413
    assert client.closed
    assert upstream.aborted


def test_an_upgrade_from_an_origin_not_allowed_is_403_without_an_upstream():
    proxy = Proxy(allowed_origins=["https://good.example"])
    client = proxy.client()
    client.send(upgradeRequest(extra=b"Origin: https://evil.example\r\n"))
    assert status(client.received()) == 403
    assert client.closed
    assert proxy.connectAttempts == 0
    assert proxy.exchanges == []


def test_the_upstream_leg_is_an_upstream_leg_owned_by_its_exchange_while_in_use():
    proxy = Proxy()
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    assert isinstance(upstream.leg, UpstreamLeg)
    assert upstream.leg.owner is proxy.exchange
    assert client.leg.owner is client.leg.loop
    upstream.send(OK)
    assert upstream.leg.owner is proxy.pool.servers[0].idle[0]


def test_an_interim_100_continue_is_relayed_while_sending():
    proxy = Proxy()
    client = proxy.client()
    client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    upstream = proxy.acceptUpstream()
    assert proxy.exchange.state is SENDING
    upstream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert client.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert proxy.exchange.state is SENDING
    client.send(b"abc")
    assert upstream.take().endswith(b"\r\n\r\nabc")
    assert proxy.exchange.state is WAITING
    upstream.send(OK)
    assert client.take() == OK
    assert proxy.exchange.history == [CONNECTING, SENDING, WAITING, RECEIVING, DONE]


def test_a_request_saying_connection_close_ends_the_connection_after_its_response():
    proxy = Proxy()
    client = proxy.client()
    client.send(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    upstream = proxy.acceptUpstream()
    upstream.send(OK)
    response = client.received()
    assert b"Connection: close" in headLines(response)
    assert response.endswith(b"\r\n\r\nhi")
    assert client.closed
    assert client.leg.loop.cycle.state is State.MUST_CLOSE


def test_an_upstream_saying_connection_close_is_not_pooled_and_the_client_stays():
    proxy = Proxy()
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    upstream.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi")
    assert client.received() == OK
    assert upstream.closed and not upstream.aborted
    assert not proxy.pool.servers[0].idle
    assert not client.closed
    client.send(GET)
    assert proxy.connectAttempts == 2


def test_pipelined_bytes_beyond_the_bound_pause_the_client_until_they_are_read():
    proxy = Proxy()
    client = proxy.client()
    body = b"x" * 70000
    client.send(GET + b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert client.transport.producerState == "paused"
    upstream = proxy.acceptUpstream()
    upstream.take()
    upstream.send(OK)
    assert client.transport.producerState == "producing"
    forwarded = upstream.take()
    assert forwarded.startswith(b"POST /big HTTP/1.1\r\n")
    assert forwarded.endswith(b"\r\n\r\n" + body)
    assert proxy.exchange.state is WAITING


def test_a_reload_takes_effect_at_the_next_request_of_a_connection():
    proxy = Proxy(keepalive_timeout=30)
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    reloaded = parseConfig(
        {
            "upstream": {"app": {"servers": ["127.0.0.1:9001"]}},
            "server": [{"listen": "tcp:0", "proxy_pass": "http://app", "access_log": False, "keepalive_timeout": 5}],
        },
        "(reloaded)",
    )
    settings = ListenerSettings(reloaded.servers[0], proxy.pool, proxy.reactor)
    proxy.factory.settings = settings
    assert proxy.exchange.settings is not settings, "the request under way keeps its settings"
    upstream.send(OK)
    assert client.leg.loop.settings is settings
    proxy.advance(5)
    assert client.closed


def test_an_idle_pooled_connection_is_closed_after_the_pools_keepalive_timeout():
    proxy, client, upstream = keptAlive({"keepalive_timeout": 20}, keepalive_timeout=100)
    proxy.advance(19.9)
    assert not upstream.closed
    proxy.advance(0.1)
    assert upstream.closed and upstream.transport.producerAtClose is None
    proxy.settle()
    assert not proxy.pool.servers[0].idle
    client.send(GET)
    assert proxy.connectAttempts == 2


def test_an_idle_pooled_connection_the_server_closes_or_talks_on_leaves_the_pool():
    proxy, client, upstream = keptAlive()
    upstream.closes()
    assert not proxy.pool.servers[0].idle
    client.send(GET)
    assert proxy.connectAttempts == 2
    second = proxy.acceptUpstream()
    second.send(OK)
    assert [idle.leg for idle in proxy.pool.servers[0].idle] == [second.leg]
    second.send(b"HTTP/1.1 200 OK\r\n")
    assert second.closed
    assert not proxy.pool.servers[0].idle


def test_bytes_sent_while_waiting_for_the_101_reach_the_upstream_after_the_head_in_order():
    proxy = Proxy()
    client = proxy.client()
    client.send(upgradeRequest() + b"one,")
    upstream = proxy.acceptUpstream()
    head = upstream.take()
    client.send(b"two,")
    assert upstream.take() == b"", "nothing but the head before the switch"
    upstream.send(switching())
    client.send(b"three")
    assert head.endswith(b"\r\n\r\n")
    assert upstream.take() == b"one,two,three"


def test_a_finished_tunnel_is_logged_once_with_who_closed_it(accessLog):
    proxy = Proxy(access_log=True)
    client = proxy.client()
    client.send(upgradeRequest())
    upstream = proxy.acceptUpstream()
    upstream.send(switching())
    client.send(b"abc")
    upstream.send(b"defgh")
    client.closes()
    proxy.settle()
    assert upstream.gone
    assert [(e["status"], e["closedBy"], e["bytesIn"], e["bytesOut"]) for e in accessLog] == [(101, "client", 3, 5)]


def test_an_idle_tunnel_is_closed_after_the_websocket_idle_timeout():
    proxy = Proxy(websocket_idle_timeout=30)
    client = proxy.client()
    client.send(upgradeRequest())
    upstream = proxy.acceptUpstream()
    upstream.send(switching())
    proxy.advance(29)
    upstream.send(b"x")
    proxy.advance(29)
    client.send(b"y")
    proxy.advance(31)
    assert not client.closed and not upstream.closed, "traffic either way keeps it open"
    proxy.advance(30)
    assert client.closed and upstream.closed
    assert client.transport.producerAtClose is None and upstream.transport.producerAtClose is None


def test_a_tunnel_without_an_idle_timeout_has_no_timer():
    proxy = Proxy()
    client = proxy.client()
    client.send(upgradeRequest())
    upstream = proxy.acceptUpstream()
    upstream.send(switching())
    assert proxy.reactor.getDelayedCalls() == []
    proxy.advance(10000)
    assert not client.closed and not upstream.closed


def test_a_reload_of_upgrade_protocols_applies_at_the_next_request_of_a_kept_alive_connection():
    proxy, client, upstream = keptAlive()
    reloaded = parseConfig(
        {
            "upstream": {"app": {"servers": ["127.0.0.1:9001"]}},
            "server": [{"listen": "tcp:0", "proxy_pass": "http://app", "access_log": False, "upgrade_protocols": []}],
        },
        "(reloaded)",
    )
    proxy.factory.settings = ListenerSettings(reloaded.servers[0], proxy.pool, proxy.reactor)
    fresh = proxy.client(40001)
    fresh.send(upgradeRequest())
    assert proxy.exchange.request.upgrade is None, "a new connection no longer upgrades"
    client.send(upgradeRequest())
    assert proxy.exchange.request.upgrade is None, "nor does the next request of a kept-alive one"


def test_a_response_sent_while_draining_says_connection_close():
    proxy = Proxy()
    busy = proxy.client()
    busy.send(GET)
    upstream = proxy.acceptUpstream()
    proxy.factory.drain()
    upstream.send(OK)
    assert b"Connection: close" in headLines(busy.received())


def test_a_connection_released_to_a_retired_pool_is_closed_not_kept():
    """After a reload replaced the pool, exchanges still under way do not refill it."""
    proxy = Proxy()
    client = proxy.client()
    client.send(GET)
    upstream = proxy.acceptUpstream()
    proxy.pool.retire()
    upstream.send(OK)
    assert client.take() == OK
    assert proxy.pool.servers[0].idle == []
    assert upstream.closed


# Found by a review of the core


def test_a_large_head_alone_is_not_held_by_the_pipelining_bound():
    """The bound is for bytes sent ahead of an answer; a head alone is bounded by 431."""
    proxy = Proxy(max_header_size="128k")
    client = proxy.client()
    client.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 70000)
    assert client.transport.producerState == "producing"
    client.send(b"\r\n\r\n")
    assert proxy.exchange is not None and proxy.exchange.request.first(b"x-big") == b"a" * 70000


def test_a_connection_closed_while_pumping_is_not_paused_again():
    """Paused, a closing TLS connection could not read the client's close_notify."""
    proxy = Proxy(allowed_origins=["https://good.example"])
    client = proxy.client()
    client.send(GET + upgradeRequest(extra=b"Origin: https://evil.example\r\n") + b"x" * 70000)
    upstream = proxy.acceptUpstream()
    assert client.transport.producerState == "paused", "bytes ahead of an answer are bounded"
    upstream.send(OK)
    assert b"HTTP/1.1 403 " in client.received()
    assert client.closed
    assert client.transport.producerState == "producing"


def test_a_tunnel_whose_reader_is_slow_is_not_idle():
    proxy = Proxy(websocket_idle_timeout=10)
    client = proxy.client()
    client.send(upgradeRequest())
    upstream = proxy.acceptUpstream()
    upstream.send(switching())
    client.leg.pauseProducing()  # the client's write buffer is full: the upstream is not read
    proxy.advance(35)
    assert not client.closed and not upstream.closed
    client.leg.resumeProducing()
    proxy.advance(20)
    assert client.closed and upstream.closed


def test_an_error_answer_while_draining_says_connection_close():
    proxy = Proxy(proxy_read_timeout=5)
    client = proxy.client()
    client.send(GET)
    proxy.acceptUpstream()
    proxy.factory.drain()
    proxy.advance(5)
    assert status(client.received()) == 504
    assert b"Connection: close" in headLines(client.received())
    assert client.closed


def test_a_refused_connection_that_does_not_close_is_dropped():
    proxy = Proxy(max_connections=1)
    proxy.client(40000)
    refused = proxy.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    transport = StringTransport()
    refused.makeConnection(transport)
    assert transport.value().startswith(b"HTTP/1.1 503 ")
    assert transport.disconnecting
    proxy.advance(REFUSAL_BOUND)
    assert transport.disconnected, "aborted"


def test_every_owner_implements_its_interface():
    from zope.interface.verify import verifyClass

    from wsproxy.interfaces import IExchange, ILegOwner, IRequestLoop
    from wsproxy.leg import Unowned
    from wsproxy.redirect import RedirectAnswer
    from wsproxy.upstream import _IdleConnection

    for owner in (RequestLoop, Exchange, _TunnelEnd, _IdleConnection, type(Unowned)):
        assert verifyClass(ILegOwner, owner)
    for exchange in (Exchange, RedirectAnswer):
        assert verifyClass(IExchange, exchange)
    assert verifyClass(IRequestLoop, RequestLoop)


def test_an_error_of_our_own_on_a_new_upstream_connection_is_502():
    """An exception while starting on a freshly connected upstream reaches the errback."""
    proxy = Proxy()
    client = proxy.client()
    client.send(GET)
    original = Exchange._awaitResponseHead
    Exchange._awaitResponseHead = lambda self: 1 / 0
    try:
        upstream = proxy.acceptUpstream()
    finally:
        Exchange._awaitResponseHead = original
    assert status(client.received()) == 502
    assert upstream.closed


def test_the_documented_extension_point_answers_some_requests_and_proxies_the_rest():
    """docs/operations.md's ProxyWithHealth, as written there."""
    from zope.interface import implementer

    from wsproxy.interfaces import IExchange

    @implementer(IExchange)
    class Health:
        readyForBody = False

        def __init__(self, loop):
            self.loop = loop

        def start(self):
            self.loop.leg.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            self.loop.exchangeFinished(keepAlive=True)

        def bodyReceived(self, data):
            pass

        def bodyComplete(self):
            pass

        def fail(self, status, message):
            self.loop.exchangeAborted()

        def clientLost(self):
            pass

    class ProxyWithHealth(ProxyFactory):
        def startExchange(self, loop, request):
            if request.path == b"/healthz":
                return Health(loop)
            return super().startExchange(loop, request)

    proxy = Proxy()
    proxy.factory = ProxyWithHealth(proxy.factory.settings)
    client = proxy.client()
    client.send(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n" + GET)
    assert client.take() == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert proxy.connectAttempts == 1, "the next request is proxied"
    upstream = proxy.acceptUpstream()
    upstream.send(OK)
    assert client.take() == OK
    assert not client.closed
