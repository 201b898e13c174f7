# -*- test-case-name: tests.test_tap,tests.test_reload -*-
"""
C{twistd wsproxy}: command-line options and the service they make.

Every startup failure is one line on standard error and exit status 1, no
traceback: a configuration that does not load (including its TLS
certificates and C{listen} strings) stops C{twistd} before anything is
bound, naming the file, the key and the problem; a listener that cannot be
bound (address in use, permission denied) names the file, the listener and
the address.

SIGHUP reloads the file (and the certificates) as one transaction: a file
that does not load, or that cannot be applied without a restart, is logged
in one line and the running configuration stays wholly in force.  SIGUSR1
reopens the access-log files (after logrotate moved them); with workers,
the parent sends it on to each of them.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from .accesslog import reopenAccessLogs
from .config import Config, ConfigError, loadConfig
from .listeners import StartupError
from .listeners import makeService as makeProxyService
from .metrics import noteReload

__all__ = ["OnHangup", "OnUsr1", "Options", "WsproxyService", "checkConfig", "makeService", "reloadFrom", "reopenLogs"]

log = Logger()


class Options(usage.Options):
    """Options of C{twistd wsproxy}."""

    synopsis = "[--config FILE | --demo]"
    longdesc = (
        "A WebSocket-aware HTTP/1.1 reverse proxy: plain-HTTP redirect and TLS "
        "listeners in front of a round-robin pool of upstream servers."
    )
    optParameters = [
        ["config", "c", None, "The configuration file: wsproxy's TOML, or an nginx.conf (converted as it is read)."],
        ["demo-port", None, 8080, "The port of the demo proxy (with --demo).", int],
    ]
    optFlags = [
        ["demo", None, "Run a demo: the proxy on 127.0.0.1:8080 in front of a built-in WebSocket echo app."],
        [
            "check",
            None,
            "Load the configuration and everything it names (TLS files included), print the routing "
            "table and exit 0, or print the error and exit 1; nothing is bound (nginx -t).",
        ],
        [
            "accept-unsupported",
            None,
            "Run an nginx configuration even when it has unsupported directives that change what clients "
            "receive (they are skipped; --check lists them).",
        ],
    ]

    def opt_version(self) -> NoReturn:
        """Print wsproxy's version (and Twisted's and Python's) and exit."""
        from twisted import version as twistedVersion

        from . import __version__

        python = ".".join(map(str, sys.version_info[:3]))
        print(f"wsproxy {__version__} (Twisted {twistedVersion.short()}, Python {python})")
        sys.exit(0)

    def postOptions(self) -> None:
        if not self["config"] and not self["demo"]:
            raise usage.UsageError("give --config FILE (or --demo to try it out)")
        if self["config"] and self["demo"]:
            raise usage.UsageError("--config and --demo cannot be combined")
        if self["check"] and not self["config"]:
            raise usage.UsageError("--check needs --config FILE")


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    The service C{twistd} runs for these options: a L{WsproxyService}
    holding the proxy (or the worker pool) and the SIGHUP handler.

    @raise SystemExit: with one line, if the configuration does not load.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    if options["demo"]:
        from .demo import makeDemoService

        return makeDemoService(options["demo-port"], reactor)
    path = options["config"]
    accept = bool(options["accept-unsupported"])
    if options["check"]:
        checkConfig(path, reactor, acceptUnsupported=accept)
    try:
        config = loadConfig(path, accept)
        if config.workers > 1:
            from .workers import WorkerPool, stopWithStatus

            service: Any = WorkerPool(config, reactor, onFatal=lambda: stopWithStatus(reactor, 1))
        else:
            service = makeProxyService(config, reactor)
    except ConfigError as e:
        raise SystemExit(f"wsproxy: {e}") from None
    parent = getattr(options, "parent", None)
    foreground = parent is None or bool(parent.get("nodaemon", True))
    top = WsproxyService(foreground)
    service.setServiceParent(top)
    OnHangup(reactor, lambda: reloadFrom(service, path, accept)).setServiceParent(top)
    OnUsr1(reactor, lambda: reopenLogs(service)).setServiceParent(top)
    return top


def checkConfig(path: str, reactor: Any, out: Any = None, acceptUnsupported: bool = False) -> NoReturn:
    """
    C{--check}: load C{path} and build everything it needs, as a start
    would, without binding; print the routing table and exit 0, or the
    one-line error and exit 1.  For an nginx configuration, the conversion
    report comes first.
    """
    from .listeners import prepareConfig
    from .nginxconf import printReport
    from .router import routingTable

    stream = out or sys.stdout
    try:
        printReport(path, stream)
        config = loadConfig(path, acceptUnsupported)
        prepareConfig(config, reactor)
    except ConfigError as e:
        raise SystemExit(f"wsproxy: {e}") from None
    stream.write(f"wsproxy: {path}: the configuration is valid\n{routingTable(config)}\n")
    stream.flush()
    raise SystemExit(0)


class WsproxyService(MultiService):
    """
    What C{twistd wsproxy} runs.  A listener that cannot be bound ends
    C{twistd} with one line on standard error and status 1.

    C{twistd} binds in L{privilegedStartService} (before C{--uid}/C{--gid}
    take effect), C{twist} in L{startService}; either way the error leaves
    C{twistd}'s C{postApplication} before the reactor runs.  In the
    foreground (C{-n}, C{twist}) the line is written to the original
    standard error and the process exits with status 1 (L{SystemExit});
    daemonized, standard error is gone already, so the line is logged and
    the error re-raised for C{twistd}'s own start-up report (its parent
    process prints it and exits with status 1).

    @ivar foreground: whether C{twistd} runs in the foreground.
    """

    def __init__(self, foreground: bool = True) -> None:
        super().__init__()
        self.foreground = foreground

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartupError as e:
            self._failed(e)

    def startService(self) -> None:
        try:
            super().startService()
        except StartupError as e:
            self._failed(e)

    def _failed(self, error: StartupError) -> None:
        line = f"wsproxy: {error}"
        if not self.foreground:
            log.critical("{line}", line=line)
            raise StartupError(line) from None
        stream = sys.__stderr__ or sys.stderr
        stream.write(line + "\n")
        stream.flush()
        raise SystemExit(1)


def reloadFrom(service: Any, path: str, acceptUnsupported: bool = False) -> bool:
    """
    Load the file at C{path} again and apply it to C{service} (a
    L{ProxyService}, or the L{WorkerPool} that sends it to its workers);
    keep the running configuration if it does not load or cannot be
    applied, and log why in one line.

    @return: whether the new configuration is in force.
    """
    try:
        config: Config = loadConfig(path, acceptUnsupported)
        service.reload(config)
    except ConfigError as e:
        noteReload(service, ok=False)
        log.error("reload rejected, the running configuration stays: {why}", why=e)
        return False
    except Exception:
        noteReload(service, ok=False)
        log.failure("reload rejected, the running configuration stays: unexpected error")
        return False
    noteReload(service, ok=True)
    return True


def reopenLogs(service: Any) -> None:
    """Reopen the access logs: this process's, or each worker's (it reopens its own on the signal)."""
    signalWorkers = getattr(service, "signalWorkers", None)
    if signalWorkers is not None:
        signalWorkers(signal.SIGUSR1)  # Twisted names only TERM, KILL, INT, HUP and STOP
    else:
        reopenAccessLogs()


class OnHangup(Service):
    """Runs an action in the reactor thread on each SIGHUP while running."""

    signalNumber = signal.SIGHUP

    def __init__(self, reactor: Any, action: Callable[[], object]) -> None:
        self.reactor = reactor
        self.action = action
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        try:
            self._previous = signal.signal(self.signalNumber, self._hangup)
        except ValueError:
            self._previous = None

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(self.signalNumber, self._previous)
            self._previous = None
        return super().stopService()

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.action)


class OnUsr1(OnHangup):
    """Runs an action in the reactor thread on each SIGUSR1 while running (nginx's "reopen")."""

    signalNumber = signal.SIGUSR1
