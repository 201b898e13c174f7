# -*- test-case-name: tests.test_tap -*-
"""
C{twistd wsproxy}: command-line options and the service they make.

A configuration that does not load stops C{twistd} before anything is
bound, with one line naming the file, the key and the problem.  SIGHUP
reloads the file (and the certificates); a file that does not load then is
logged and the running configuration stays in force.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from .config import ConfigError, loadConfig
from .listeners import ProxyService
from .listeners import makeService as makeProxyService
from .tls import TLSConfigError

__all__ = ["Options", "makeService"]

log = Logger()


class Options(usage.Options):
    """Options of C{twistd wsproxy}."""

    synopsis = "[--config FILE | --demo]"
    longdesc = (
        "A WebSocket-aware HTTP/1.1 reverse proxy: plain-HTTP redirect and TLS "
        "listeners in front of a round-robin pool of upstream servers."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
        ["demo-port", None, 8080, "The port of the demo proxy (with --demo).", int],
    ]
    optFlags = [
        ["demo", None, "Run a demo: the proxy on 127.0.0.1:8080 in front of a built-in WebSocket echo app."],
    ]

    def postOptions(self) -> None:
        if not self["config"] and not self["demo"]:
            raise usage.UsageError("give --config FILE (or --demo to try it out)")
        if self["config"] and self["demo"]:
            raise usage.UsageError("--config and --demo cannot be combined")


def makeService(options: Options, reactor: Any = None) -> IService:
    """The service C{twistd} runs for these options."""
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    if options["demo"]:
        from .demo import makeDemoService

        return makeDemoService(options["demo-port"], reactor)
    path = options["config"]
    top = MultiService()
    try:
        config = loadConfig(path)
        if config.workers > 1:
            from .workers import WorkerPool

            pool = WorkerPool(path, config, reactor)
            pool.setServiceParent(top)
            OnHangup(reactor, lambda: pool.signalWorkers("HUP")).setServiceParent(top)
            return top
        service = makeProxyService(config, reactor)
    except (ConfigError, TLSConfigError) as e:
        raise SystemExit(f"wsproxy: {e}" if isinstance(e, ConfigError) else f"wsproxy: {path}: {e}") from None
    service.setServiceParent(top)
    OnHangup(reactor, lambda: reloadFrom(service, path)).setServiceParent(top)
    return top


def reloadFrom(proxy: ProxyService, path: str) -> bool:
    """
    Load the file at C{path} again and apply it to C{proxy}; keep the
    running configuration if it does not load.
    """
    try:
        proxy.reload(loadConfig(path))
    except (ConfigError, TLSConfigError, ValueError) as e:
        log.error("reload rejected, the running configuration stays: {why}", why=e)
        return False
    return True


class OnHangup(Service):
    """Runs an action in the reactor thread on each SIGHUP while running."""

    def __init__(self, reactor: Any, action: Callable[[], object]) -> None:
        self.reactor = reactor
        self.action = action
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        try:
            self._previous = signal.signal(signal.SIGHUP, self._hangup)
        except ValueError:
            self._previous = None

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.action)
