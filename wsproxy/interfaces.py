# -*- test-case-name: tests.test_server,tests.test_leg -*-
"""
The callback sets between the layers a connection goes through, so that
each side of a hand-over is written against a contract and not against
another module's class.

  - A L{wsproxy.leg.Leg} reports to its L{ILegOwner}: the request loop, an
    exchange, a tunnel end, or the pool while the connection is idle.
  - A L{wsproxy.server.RequestLoop} hands each request to an L{IExchange}
    (a proxied exchange, or a redirect) and is told back through
    L{IRequestLoop}.
"""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

__all__ = ["IExchange", "ILegOwner", "IRequestLoop"]


class ILegOwner(Interface):
    """What a leg reports to the layer that currently uses it."""

    def dataReceived(data: bytes) -> None:
        """Bytes read from the leg's connection."""

    def connectionLost(reason: Failure) -> None:
        """The connection is gone; the leg has already let go of its timers and peer."""

    def writable() -> None:
        """The leg's write buffer, full until now, has drained."""


class IExchange(Interface):
    """What a request loop does with one request: answer it, alone or with an upstream's help."""

    readyForBody = Attribute("Whether the request body can be passed on now.")

    def start() -> None:
        """Begin answering; the request head is in."""

    def bodyReceived(data: bytes) -> None:
        """A piece of the request body, de-chunked."""

    def bodyComplete() -> None:
        """The request body is complete."""

    def fail(status: int, message: str) -> None:
        """The request cannot go on: answer C{status}, or cut the response short."""

    def clientWritable() -> None:
        """
        The client's write buffer drained: an exchange that writes a body of
        its own (a static file) writes the next piece.
        """

    def clientLost() -> None:
        """The client went away."""


class IRequestLoop(Interface):
    """What an exchange tells the request loop that started it."""

    leg = Attribute("The client's L{wsproxy.leg.Leg}: where the response is written.")
    settings = Attribute("The listener settings the exchange runs under.")
    draining = Attribute("Whether the listener is shutting down: the response must say Connection: close.")

    def readyForBody() -> None:
        """The exchange can take the request body now."""

    def exchangeFinished(keepAlive: bool) -> None:
        """The response is complete; C{keepAlive}: whether the connection may carry another request."""

    def exchangeAborted() -> None:
        """The response was cut short; the client must see the connection close."""

    def replaceExchange(exchange: Any) -> None:
        """Another exchange answers the request instead (an C{error_page}); start it."""

    def switchToTunnel(
        upstream: Any, fromUpstream: bytes, logFields: dict[str, Any], settings: Any = None, lease: Any = None
    ) -> None:
        """
        The upstream granted an upgrade: hand both connections to a tunnel
        run under C{settings} (the location's), which holds the server's
        L{wsproxy.upstream.Lease} until it ends.
        """
