"""
Flow control pieces: a gate held for several reasons at once, and the
direct writer that must never reorder bytes.
"""

from __future__ import annotations

import hashlib

import pytest_twisted
from support import LOOPBACK, until
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from wsproxy.flow import ReadGate, writerFor


def test_a_gate_resumes_only_when_every_reason_is_released():
    transport = StringTransport()
    gate = ReadGate(transport)
    gate.hold("buffer")
    gate.pauseProducing()
    assert transport.producerState == "paused"
    gate.resumeProducing()
    assert transport.producerState == "paused", "still held for the buffer"
    gate.release("buffer")
    assert transport.producerState == "producing"
    gate.release("buffer")
    assert transport.producerState == "producing"


def test_other_transports_keep_their_own_write():
    transport = StringTransport()
    assert writerFor(transport) == transport.write


class Collect(Protocol):
    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)


@pytest_twisted.ensureDeferred
async def test_direct_writes_keep_the_order_when_the_kernel_buffer_fills(cleanup):
    receivers = []
    factory = Factory.forProtocol(Collect)
    factory.buildProtocol = lambda addr: receivers.append(Collect()) or receivers[-1]
    port = cleanup.port(reactor.listenTCP(0, factory, interface=LOOPBACK))
    sender = await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, port.getHost().port), Protocol())
    assert await until(lambda: receivers), "the server side has accepted"
    (receiver,) = receivers
    receiver.transport.pauseProducing()
    write = writerFor(sender.transport)
    expected = hashlib.sha256()
    total = 0
    for i in range(800):
        # About 40 MB in all: more than the kernel buffers of both ends hold.
        piece = bytes([i % 256]) * (1000 + i * 124)
        write(piece)
        expected.update(piece)
        total += len(piece)
    assert sender.transport._tempDataLen or sender.transport.dataBuffer, "the kernel buffer filled up"
    receiver.transport.resumeProducing()
    assert await until(lambda: receiver.count == total)
    assert receiver.digest.hexdigest() == expected.hexdigest()
    sender.transport.loseConnection()
