"""
wsproxy: a WebSocket-aware HTTP/1.1 reverse proxy on Twisted.

The public API, for embedding the proxy in a Twisted application::

    from wsproxy import loadConfig, makeService
    makeService(loadConfig("wsproxy.toml")).setServiceParent(application)

L{makeService} returns a L{ProxyService}; L{ProxyFactory} and
L{ListenerSettings} build the proxy protocol for an endpoint of your own.
"""

from .config import Config, ConfigError, ServerBlock, Upstream, loadConfig, parseConfig
from .listeners import ProxyService, makeService
from .server import ListenerSettings, ProxyFactory
from .upstream import UpstreamPool

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "ListenerSettings",
    "ProxyFactory",
    "ProxyService",
    "ServerBlock",
    "Upstream",
    "UpstreamPool",
    "loadConfig",
    "makeService",
    "parseConfig",
]
