"""
C{twistd -n wsproxy --demo}: the proxy in front of a built-in WebSocket
echo application, with a small page to try it in a browser.

The echo application is autobahn's, with permessage-deflate accepted, so
the demo is also a ready-made upstream for the Autobahn TestSuite.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from twisted.application.service import MultiService
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from .config import parseConfig
from .listeners import makeService

__all__ = ["EchoProtocol", "echoFactory", "echoSite", "makeDemoService"]


class EchoProtocol(WebSocketServerProtocol):
    """Sends every message back as it came."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


def _acceptDeflate(offers: list[Any]) -> Any:
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


def echoFactory(url: str = "ws://127.0.0.1/ws", **options: Any) -> WebSocketServerFactory:
    """An autobahn echo factory that accepts permessage-deflate."""
    factory = WebSocketServerFactory(url, server="wsproxy-demo-echo")
    factory.protocol = EchoProtocol
    factory.setProtocolOptions(perMessageCompressionAccept=_acceptDeflate, **options)
    return factory


def echoSite() -> Site:
    """The demo application: the page at C{/} and the echo at C{/ws}."""
    root = Resource()
    page = files("wsproxy").joinpath("demo.html").read_bytes()
    root.putChild(b"", Data(page, "text/html; charset=utf-8"))
    root.putChild(b"ws", WebSocketResource(echoFactory()))
    return Site(root)


def makeDemoService(port: int, reactor: Any) -> MultiService:
    """The echo application on an ephemeral port and the proxy on C{port}."""
    top = MultiService()
    appPort = reactor.listenTCP(0, echoSite(), interface="127.0.0.1")
    config = parseConfig(
        {
            "upstream": {"app": {"servers": [f"127.0.0.1:{appPort.getHost().port}"]}},
            "server": [{"listen": f"tcp:{port}:interface=127.0.0.1", "proxy_pass": "http://app"}],
        },
        source="(demo)",
    )
    makeService(config, reactor).setServiceParent(top)
    return top
