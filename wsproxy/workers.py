# -*- test-case-name: tests.test_workers -*-
"""
C{workers = N}: N processes serving the same listening sockets, like
nginx's C{worker_processes}.

The parent checks the whole configuration before it binds or starts
anything (TLS certificates and keys included: it builds every TLS context
once, and refuses to start, in one line, if one does not load).  It binds
every listener (in C{privilegedStartService}, so ports below 1024 work
with C{--uid}/C{--gid}), never accepts on them itself, and hands the
sockets to each worker as inherited file descriptors; a worker adopts them
(L{AdoptedStreamServerEndpoint}) and runs an ordinary L{ProxyService} in
its own reactor.  The kernel spreads connections over the workers.

A worker never reads the configuration file: the parent sends it the
L{Config} it checked, pickled and length-prefixed (L{Int32StringReceiver}
framing), on the worker's standard input.  The first message starts the
worker; each later one is a reload, applied with L{ProxyService.reload}.
So a worker started again after it died serves what the parent runs, not
whatever the file says by then.

SIGUSR1 (reopen the access logs) is sent on by the parent to every worker,
which reopens its own files.

SIGHUP reaches the parent only (workers ignore it): the parent loads and
checks the file with the same rules as a single-process reload and, if it
is good, sends it to every worker; if not, it logs one line and the
workers keep theirs.  SIGTERM stops the workers, each draining its
connections.

A worker that dies is started again after L{RESTART_DELAY} seconds.  One
that dies before it is ready, or within L{FAST_FAILURE} seconds of its
start, L{FAST_FAILURES} times in a row, stops the whole service: its last
lines of output are logged and C{twistd} exits with status 1, instead of
looking healthy while its workers crash one after the other.
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python import usage
from twisted.python.failure import Failure

from .accesslog import reopenAccessLogs
from .config import Config, ConfigError
from .listeners import (
    StartupError,
    announceListening,
    checkReload,
    describeListenFailure,
    parseListen,
    prepareConfig,
)

__all__ = ["WorkerPool", "main", "stopWithStatus"]

log = Logger()

#: How long to wait before starting a worker again after it died.
RESTART_DELAY = 1.0

#: A worker that dies within this many seconds of its start (or before it
#: is ready) failed fast.
FAST_FAILURE = 1.0

#: After this many fast failures of one worker in a row, the service stops.
FAST_FAILURES = 3

#: How many of a worker's last output lines are kept, to explain its death.
OUTPUT_KEPT = 5

#: What a worker prints once it serves.
READY = "wsproxy-worker-ready"

#: The largest configuration message a worker accepts.
MAX_MESSAGE = 64 * 1024 * 1024


def frame(config: Config) -> bytes:
    """C{config} as one message on a worker's standard input."""
    data = pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    return struct.pack("!I", len(data)) + data


def stopWithStatus(reactor: Any, status: int) -> None:
    """
    Stop the reactor (services stop, workers drain) and make the process
    exit with C{status} once C{twistd} has finished its own shutdown.

    C{twistd} has no way for a service to choose its exit status: after the
    reactor stops it removes its pidfile, logs "Server Shut Down." and
    returns normally (its only hook, C{reactor._exitSignal}, re-raises a
    signal).  So an C{atexit} handler, registered here, flushes the
    standard streams and ends the interpreter with C{status}
    (C{os._exit}), after everything C{twistd} does.
    """
    atexit.register(_exitWith, status)
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _exitWith(status: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    os._exit(status)


class _NeverAccepts(Factory):
    """The parent's factory: its ports stop reading at once, workers accept."""

    noisy = False


class WorkerProcess(ProcessProtocol):
    """
    One worker, seen from the parent: its output goes to the parent's log
    (the last lines are kept), its death is reported to the pool.
    """

    def __init__(self, pool: WorkerPool, index: int, started: float) -> None:
        self.pool = pool
        self.index = index
        self.started = started
        self.ready = False
        self.ended: Deferred = Deferred()
        self.lastLines: deque[str] = deque(maxlen=OUTPUT_KEPT)
        self._partial = {1: b"", 2: b""}

    def send(self, config: Config) -> None:
        """Send C{config} to the worker, unless it is gone."""
        if self.transport is None or self.ended.called:
            return
        try:
            self.transport.write(frame(config))
        except (KeyError, OSError):
            pass  # Its standard input is closed: it is ending, and will be reported.

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._line(line)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if line == READY:
            self.ready = True
            log.info("worker {index} ready", index=self.index)
            return
        if line.strip():
            self.lastLines.append(line.strip())
        log.info("worker {index}: {line}", index=self.index, line=line)

    def processEnded(self, reason: Any) -> None:
        for childFD, rest in self._partial.items():
            if rest:
                self._line(rest)
            self._partial[childFD] = b""
        self.pool.workerEnded(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    Binds the listeners of C{config}, then runs C{config.workers} worker
    processes on them and keeps them running.

    @ivar config: the configuration the workers run (the last one that
        passed L{reload}'s checks).
    @ivar failed: whether the pool gave up on a worker that kept failing.
    """

    def __init__(self, config: Config, reactor: Any, onFatal: Callable[[], object] | None = None) -> None:
        """
        @param onFatal: called once a worker failed fast L{FAST_FAILURES}
            times in a row (C{twistd wsproxy} stops with status 1); by
            default the reactor is stopped.

        @raise ConfigError: if the configuration cannot be used (a TLS
            certificate or key does not load, a C{listen} string does not
            parse): the parent checks before it binds or starts anything.
        """
        prepareConfig(config, reactor)
        self.config = config
        self.reactor = reactor
        self.onFatal = onFatal if onFatal is not None else self._stopReactor
        self.ports: list[Any] = []
        self.workers: dict[int, WorkerProcess] = {}
        self.fastFailures: dict[int, int] = {}
        self.failed = False
        self._restarts: dict[int, Any] = {}
        self._stopping = False

    def _stopReactor(self) -> None:
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def privilegedStartService(self) -> None:
        """
        Bind every listener (C{twistd} calls this before it drops
        privileges; C{twist} only calls L{startService}, which binds then).

        @raise StartupError: one line naming the listener, if one cannot be
            bound.
        """
        self._bind()
        super().privilegedStartService()

    def _bind(self) -> None:
        if self.ports:
            return
        for address, indexes in self.config.addresses.items():
            listen, index = address.listen, indexes[0]
            where = f"{self.config.source}: server[{index}].listen"
            endpoint = parseListen(self.reactor, self.config.source, index, listen)
            outcome: list[Any] = []
            endpoint.listen(_NeverAccepts()).addBoth(outcome.append)
            if not outcome:
                raise StartupError(f"{where}: {listen!r} does not bind at once; it cannot be shared by workers")
            if isinstance(outcome[0], Failure):
                raise StartupError(f"{where}: {describeListenFailure(listen, outcome[0].value)}")
            port = outcome[0]
            port.stopReading()
            self.ports.append(port)
            announceListening(f"server[{index}] {listen}", port)

    def startService(self) -> None:
        self._bind()
        super().startService()
        for index in range(self.config.workers):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        fds = [port.fileno() for port in self.ports]
        args = [sys.executable, "-m", "wsproxy.workers", "--index", str(index)]
        for fd, port in zip(fds, self.ports, strict=True):
            args += ["--fd", f"{fd}:{_family(port)}"]
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        childFDs.update({fd: fd for fd in fds})
        worker = WorkerProcess(self, index, self.reactor.seconds())
        self.workers[index] = worker
        self.reactor.spawnProcess(worker, sys.executable, args, env=os.environ.copy(), childFDs=childFDs)
        worker.send(self.config)
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.transport.pid)

    def workerEnded(self, worker: WorkerProcess, reason: Any) -> None:
        index = worker.index
        if self.workers.get(index) is not worker or self._stopping or not self.running:
            return
        fast = not worker.ready or self.reactor.seconds() - worker.started < FAST_FAILURE
        self.fastFailures[index] = self.fastFailures.get(index, 0) + 1 if fast else 0
        if self.fastFailures[index] >= FAST_FAILURES:
            self.failed = True
            output = " | ".join(worker.lastLines) or "(no output)"
            log.critical(
                "worker {index} failed {count} times in a row right after its start ({why}); "
                "stopping wsproxy. Its last output: {output}",
                index=index,
                count=self.fastFailures[index],
                why=reason.getErrorMessage(),
                output=output,
            )
            self.onFatal()
            return
        log.warn("worker {index} ended ({why}); starting it again", index=index, why=reason.getErrorMessage())
        self._restarts[index] = self.reactor.callLater(RESTART_DELAY, self._respawn, index)

    def _respawn(self, index: int) -> None:
        if self.running and not self._stopping:
            self._spawn(index)

    def reload(self, config: Config) -> None:
        """
        Check C{config} as a single-process reload would (same listeners of
        the same kinds, every TLS context builds) and send it to every
        worker, which applies it with L{ProxyService.reload}.  A worker
        started later gets it too.

        @raise ConfigError: if C{config} cannot be applied; the workers
            then keep the configuration they have.
        """
        checkReload(self.config, config)
        prepareConfig(config, self.reactor)
        self.config = config
        running = [worker for worker in self.workers.values() if not worker.ended.called]
        for worker in running:
            worker.send(config)
        log.info(
            "configuration from {source} checked; sent to {count} workers", source=config.source, count=len(running)
        )

    def signalWorkers(self, signal: str) -> None:
        """Send C{signal} (C{"TERM"}, C{"INT"}) to every worker."""
        for worker in self.workers.values():
            if worker.transport is not None and worker.transport.pid is not None:
                try:
                    worker.transport.signalProcess(signal)
                except OSError:
                    pass

    def stopService(self) -> Deferred:
        """Ask every worker to stop (each drains its connections) and wait."""
        self._stopping = True
        super().stopService()
        for pending in self._restarts.values():
            if pending.active():
                pending.cancel()
        self._restarts.clear()
        ended = [worker.ended for worker in self.workers.values() if not worker.ended.called]
        self.signalWorkers("TERM")
        for port in self.ports:
            port.stopListening()
        return DeferredList(ended)


def _family(port: Any) -> str:
    handle = port.socket
    return {socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}[handle.family]


# The worker process.


class WorkerOptions(usage.Options):
    optParameters = [
        ["index", None, "0", "This worker's number."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["fds"] = []

    def opt_fd(self, value: str) -> None:
        """An inherited listening socket, FD:FAMILY, one per [[server]] in order."""
        fd, _, family = value.partition(":")
        self["fds"].append((int(fd), family))


class Worker:
    """
    A worker's side: the first configuration from the parent starts the
    proxy on the adopted sockets, each later one reloads it.

    @ivar status: the exit status of the worker process.
    """

    def __init__(self, reactor: Any, index: str, endpoints: Sequence[Any]) -> None:
        self.reactor = reactor
        self.index = index
        self.endpoints = endpoints
        self.service: Any = None
        self.status = 0

    def configReceived(self, config: Config) -> None:
        from .listeners import ProxyService

        if self.service is not None:
            try:
                self.service.reload(config)
            except ConfigError as e:
                log.error("reload rejected, the running configuration stays: {why}", why=e)
            return
        try:
            service = ProxyService(config, self.reactor, endpoints=self.endpoints)
            service.startService()
        except (ConfigError, StartupError) as e:
            self.fail(f"wsproxy worker {self.index}: {e}")
            return
        self.service = service
        print(READY, flush=True)

    def fail(self, line: str) -> None:
        """Give up: one line on standard error, exit status 1."""
        print(line, file=sys.stderr, flush=True)
        self.status = 1
        self.stop()

    def parentGone(self) -> None:
        """The parent closed our standard input: it is gone, stop."""
        self.stop()

    def stop(self) -> None:
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def stopService(self) -> Any:
        if self.service is not None and self.service.running:
            return self.service.stopService()
        return None


class ParentChannel(Int32StringReceiver):
    """The worker's standard input: pickled L{Config} messages from the parent."""

    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def stringReceived(self, data: bytes) -> None:
        try:
            config = pickle.loads(data)
        except Exception as e:
            self.worker.fail(f"wsproxy worker {self.worker.index}: an unreadable configuration from the parent: {e}")
            return
        self.worker.configReceived(config)

    def lengthLimitExceeded(self, length: int) -> None:
        self.worker.fail(f"wsproxy worker {self.worker.index}: a configuration of {length} bytes from the parent")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.worker.parentGone()


def main(argv: Sequence[str] | None = None) -> None:
    """Run one worker: adopt the sockets, serve what the parent sends until SIGTERM."""
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner, textFileLogObserver

    options = WorkerOptions()
    options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    # Only the parent reloads; a worker takes its configuration from it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The parent sends SIGUSR1 on: each worker reopens its own access logs.
    signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(reopenAccessLogs))
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout, timeFormat="")], redirectStandardIO=False)
    families = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}
    endpoints = [AdoptedStreamServerEndpoint(reactor, fd, families[family]) for fd, family in options["fds"]]
    worker = Worker(reactor, options["index"], endpoints)
    reactor.addSystemEventTrigger("before", "shutdown", worker.stopService)
    # The worker only reads from the parent; its output goes to its own
    # standard output (blocking, as the log observer expects), so the
    # channel's unused write side is /dev/null.
    StandardIO(ParentChannel(worker), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY), reactor=reactor)
    reactor.run()
    sys.exit(worker.status)


if __name__ == "__main__":
    main()
