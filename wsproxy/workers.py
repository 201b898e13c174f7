# -*- test-case-name: tests.test_workers -*-
"""
C{workers = N}: N processes serving the same listening sockets, like
nginx's C{worker_processes}.

The parent binds every listener (in C{privilegedStartService}, so ports
below 1024 work with C{--uid}/C{--gid}), never accepts on them itself, and
hands the sockets to each worker as inherited file descriptors; a worker
adopts them (L{AdoptedStreamServerEndpoint}) and runs an ordinary
L{ProxyService} in its own reactor.  The kernel spreads connections over
the workers.  A worker that dies is started again; SIGTERM and SIGHUP that
reach the parent are passed to every worker.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from .config import Config, loadConfig

__all__ = ["WorkerPool", "main"]

log = Logger()

#: How long to wait before starting a worker again after it died.
RESTART_DELAY = 1.0

#: What a worker prints once it serves and handles SIGHUP: signals sent
#: before would kill it, and it reads the configuration fresh anyway.
READY = "wsproxy-worker-ready"


class _NeverAccepts(Factory):
    """The parent's factory: its ports stop reading at once, workers accept."""

    noisy = False


class WorkerProcess(ProcessProtocol):
    """One worker: its output goes to the parent's log; its death is reported."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ready = False
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line == READY:
                self.ready = True
                log.info("worker {index} ready", index=self.index)
                continue
            log.info("worker {index}: {line}", index=self.index, line=line)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.pool.workerEnded(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    Binds the listeners of C{config}, then runs C{config.workers} worker
    processes on them.
    """

    def __init__(self, configPath: str, config: Config, reactor: Any) -> None:
        self.configPath = configPath
        self.config = config
        self.reactor = reactor
        self.ports: list[Any] = []
        self.workers: dict[int, WorkerProcess] = {}
        self._stopping = False

    def privilegedStartService(self) -> None:
        for block in self.config.servers:
            listening = serverFromString(self.reactor, block.listen).listen(_NeverAccepts())
            # Stream endpoints bind synchronously: the Deferred has a result already.
            outcome: list[Any] = []
            listening.addBoth(outcome.append)
            if isinstance(outcome[0], Failure):
                outcome[0].raiseException()
            port = outcome[0]
            port.stopReading()
            self.ports.append(port)
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        for index in range(self.config.workers):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        fds = [port.fileno() for port in self.ports]
        families = [_family(port) for port in self.ports]
        args = [sys.executable, "-m", "wsproxy.workers", "--config", self.configPath, "--index", str(index)]
        for fd, family in zip(fds, families, strict=True):
            args += ["--fd", f"{fd}:{family}"]
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        childFDs.update({fd: fd for fd in fds})
        worker = WorkerProcess(self, index)
        self.workers[index] = worker
        self.reactor.spawnProcess(worker, sys.executable, args, env=os.environ.copy(), childFDs=childFDs)
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.transport.pid)

    def workerEnded(self, worker: WorkerProcess, reason: Any) -> None:
        if self.workers.get(worker.index) is not worker:
            return
        if self._stopping or not self.running:
            return
        log.warn("worker {index} ended ({why}); starting it again", index=worker.index, why=reason.getErrorMessage())
        self.reactor.callLater(RESTART_DELAY, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if self.running and not self._stopping:
            self._spawn(index)

    def signalWorkers(self, signal: str) -> None:
        """
        Send C{signal} (C{"TERM"}, C{"HUP"}) to every worker; a worker that
        is still starting gets no C{"HUP"}: it is reading the new file.
        """
        for worker in self.workers.values():
            if signal == "HUP" and not worker.ready:
                continue
            if worker.transport is not None and worker.transport.pid is not None:
                try:
                    worker.transport.signalProcess(signal)
                except OSError:
                    pass

    def stopService(self) -> Deferred:
        """Ask every worker to stop (each drains its connections) and wait."""
        self._stopping = True
        super().stopService()
        ended = [worker.ended for worker in self.workers.values() if not worker.ended.called]
        self.signalWorkers("TERM")
        for port in self.ports:
            port.stopListening()
        return DeferredList(ended)


def _family(port: Any) -> str:
    handle = port.socket
    return {socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}[handle.family]


class WorkerOptions(usage.Options):
    optParameters = [
        ["config", None, None, "The configuration file."],
        ["index", None, "0", "This worker's number."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["fds"] = []

    def opt_fd(self, value: str) -> None:
        """An inherited listening socket, FD:FAMILY, one per [[server]] in order."""
        fd, _, family = value.partition(":")
        self["fds"].append((int(fd), family))


def main(argv: Sequence[str] | None = None) -> None:
    """Run one worker: adopt the sockets, serve until SIGTERM."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from .listeners import ProxyService
    from .tap import OnHangup, reloadFrom

    options = WorkerOptions()
    options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout, timeFormat="")], redirectStandardIO=False)
    config = loadConfig(options["config"])
    families = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}
    endpoints = [AdoptedStreamServerEndpoint(reactor, fd, families[family]) for fd, family in options["fds"]]
    service = ProxyService(config, reactor, endpoints=endpoints)
    hangup = OnHangup(reactor, lambda: reloadFrom(service, options["config"]))
    service.startService()
    hangup.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(lambda: print(READY, flush=True))
    reactor.run()


if __name__ == "__main__":
    main()
