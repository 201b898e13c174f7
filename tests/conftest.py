"""
Fixtures shared by the tests.  pytest-twisted runs the reactor; a test that
starts listeners or proxies hands them to C{cleanup} so that every port and
connection is closed before the next test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest_twisted

sys.path.insert(0, str(Path(__file__).parent))

from support import stopProxy  # noqa: E402


class Cleanup:
    def __init__(self) -> None:
        self.ports: list[Any] = []
        self.services: list[Any] = []
        self.transports: list[Any] = []

    def port(self, port: Any) -> Any:
        self.ports.append(port)
        return port

    def service(self, service: Any) -> Any:
        self.services.append(service)
        return service

    def transport(self, transport: Any) -> Any:
        self.transports.append(transport)
        return transport


@pytest_twisted.async_yield_fixture
async def cleanup():
    state = Cleanup()
    yield state
    for transport in state.transports:
        transport.abortConnection()
    for service in state.services:
        if service.running:
            await stopProxy(service)
    for port in state.ports:
        stopping = port.stopListening()
        if stopping is not None:
            await stopping
