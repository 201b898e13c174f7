# -*- test-case-name: tests.test_conformance,tests.test_tap -*-
"""
Autobahn TestSuite conformance through the proxy.

C{wsproxy-conformance} (or C{python -m wsproxy.conformance}) starts
autobahn's echo application, puts the proxy in front of it with a plain and
a TLS listener, and runs the Autobahn fuzzing client three times: directly
against the echo, through the plain listener and through the TLS listener.

The proxied runs are judged against the direct run, case by case, not
against the absolute verdicts.  Once the handshake is done the proxy is a
byte pipe, so it must not change any verdict: autobahn's own C{NON-STRICT}
or C{INFORMATIONAL} answers are the upstream's business, any I{difference}
is the proxy's.

The fuzzing client is kosoku, run as a child process: it has its own event
loop (asyncio and Rust), and the Twisted reactor that serves the echo, the
proxy and the TLS forwarder must stay free to serve it.  kosoku speaks only
C{ws://}, so the TLS run goes through a L{TLSForwarder}: plain on a loopback
port, TLS towards the proxy, trusting a certificate authority made at
start-up.

kosoku and trustme come with the C{conformance} extra (C{pip install
'wsproxy[conformance]'}); they are imported only when needed, and the
command says in one line what to install when one is missing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, TextIO

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from .config import parseConfig
from .demo import echoSite
from .flow import ReadGate
from .listeners import ProxyService

__all__ = [
    "Comparison",
    "Difference",
    "FuzzingRunError",
    "Options",
    "Ports",
    "Selection",
    "Targets",
    "TLSForwarder",
    "Verdict",
    "baselineProblems",
    "compare",
    "describeBaseline",
    "echoThroughProxy",
    "fuzz",
    "fuzzAll",
    "judge",
    "kosokuCommand",
    "listenTLSForwarder",
    "main",
    "parseArguments",
    "readVerdicts",
    "runConformance",
    "runProcess",
    "serve",
]

log = Logger()

LOOPBACK = "127.0.0.1"

#: The name the test certificate is issued for and checked against.
TLS_NAME = "localhost"

#: kosoku's verdict for a case it could not run at all (no connection,
#: a crash): a baseline with one of these compares nothing.
ERROR = "ERROR"


# Verdicts and their comparison.


@dataclass(frozen=True)
class Verdict:
    """How one case ended: the Autobahn C{behavior} and C{behaviorClose}."""

    behavior: str
    behaviorClose: str

    def __str__(self) -> str:
        return f"{self.behavior}/{self.behaviorClose}"


def caseOrder(caseId: str) -> tuple[int, ...]:
    """Sort key putting C{1.2.10} after C{1.2.9}, as the reports do."""
    return tuple(int(part) for part in caseId.split("."))


def readVerdicts(reportDir: Path) -> dict[str, Verdict]:
    """
    The verdicts of an Autobahn-format report, by case id.

    C{index.json} maps agent (the C{Server} header) to case id to entry;
    the agent is left out because a case is the same case whoever answers
    it.
    """
    index = json.loads((reportDir / "index.json").read_text(encoding="utf-8"))
    return {
        caseId: Verdict(entry["behavior"], entry["behaviorClose"])
        for cases in index.values()
        for caseId, entry in cases.items()
    }


@dataclass(frozen=True)
class Difference:
    """A case that did not end the same way; C{None} for a case not run."""

    caseId: str
    direct: Verdict | None
    proxied: Verdict | None


@dataclass(frozen=True)
class Comparison:
    """One proxied run judged against the direct run."""

    name: str
    total: int
    differences: tuple[Difference, ...]

    @property
    def identical(self) -> bool:
        """Whether cases were run and every one of them ended identically."""
        return self.total > 0 and not self.differences

    def lines(self) -> list[str]:
        """The summary line, then one line per differing case."""
        same = self.total - len(self.differences)
        return [f"{self.name}: {same}/{self.total} identical to direct"] + [
            f"  {d.caseId}: direct {d.direct or 'not run'}, {self.name} {d.proxied or 'not run'}"
            for d in self.differences
        ]


def compare(name: str, direct: Mapping[str, Verdict], proxied: Mapping[str, Verdict]) -> Comparison:
    """
    Judge the run C{name} against the direct run.  A case present in only
    one of them is a difference too: a proxy that loses a case must not
    pass by omission.
    """
    caseIds = sorted(direct.keys() | proxied.keys(), key=caseOrder)
    differences = tuple(
        Difference(caseId, direct.get(caseId), proxied.get(caseId))
        for caseId in caseIds
        if direct.get(caseId) != proxied.get(caseId)
    )
    return Comparison(name, len(caseIds), differences)


def describeBaseline(direct: Mapping[str, Verdict]) -> str:
    """
    One line on the direct run, so that a reader sees what "identical"
    means: C{direct: 517 cases (504 OK, 10 NON-STRICT, 3 INFORMATIONAL)}.
    """
    counts = Counter(verdict.behavior for verdict in direct.values())
    spelled = ", ".join(f"{count} {behavior}" for behavior, count in counts.most_common())
    return f"direct: {len(direct)} cases ({spelled or 'none'})"


def baselineProblems(direct: Mapping[str, Verdict]) -> list[str]:
    """
    Why the direct run cannot serve as a baseline, if it cannot.

    Being identical to a run that ran nothing, or that could not reach the
    echo application, proves nothing about the proxy.
    """
    if not direct:
        return ["direct: no case was run (check --cases and --exclude)"]
    broken = sorted((c for c, v in direct.items() if v.behavior == ERROR), key=caseOrder)
    if broken:
        return [f"direct: {len(broken)} cases could not be run against the echo itself: {' '.join(broken)}"]
    return []


# Running kosoku.


@dataclass(frozen=True)
class Selection:
    """Which cases kosoku runs, and how many at a time."""

    cases: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    parallelism: int = 4

    def arguments(self) -> list[str]:
        """kosoku's command-line options for this selection."""
        arguments = ["--parallelism", str(self.parallelism)]
        for case in self.cases:
            arguments += ["--include", case]
        for case in self.exclude:
            arguments += ["--exclude", case]
        return arguments


class FuzzingRunError(Exception):
    """kosoku did not produce a report: it crashed, or ran out of time."""


def kosokuCommand() -> list[str]:
    """
    The command that runs kosoku with this interpreter.

    kosoku has no C{__main__} module, and its console script may not be
    on C{PATH}; its declared entry point is run with C{sys.executable}
    instead, so the child uses the same environment as the parent.
    """
    (entry,) = entry_points(group="console_scripts", name="kosoku")
    module, _, function = entry.value.partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


class _ChildProcess(ProcessProtocol):
    """
    Keeps the tail of a child's output (enough to explain a failure) and
    fires L{ended} with its exit code.  Cancelling L{ended} kills the
    child, so that a timeout leaves nothing running.
    """

    keep = 16 * 1024

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int | None] = Deferred(self._kill)

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output = (self.output + data)[-self.keep :]

    def processEnded(self, reason: Failure) -> None:
        if not self.ended.called:
            self.ended.callback(reason.value.exitCode)

    def _kill(self, ended: Deferred[int | None]) -> None:
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass


async def runProcess(reactor: Any, command: Sequence[str], timeout: float) -> tuple[int | None, str]:
    """
    Run C{command} (with this process's environment) to its end.

    @return: its exit code (C{None} if killed by a signal) and the tail of
        its standard output and error, interleaved.
    @raise TimeoutError: if it ran longer than C{timeout} seconds; it has
        been killed.
    """
    child = _ChildProcess()
    reactor.spawnProcess(child, command[0], list(command), env=os.environ)
    child.ended.addTimeout(timeout, reactor)
    code = await child.ended
    return code, child.output.decode("utf-8", "replace")


async def fuzz(reactor: Any, url: str, selection: Selection, reportDir: Path, timeout: float) -> dict[str, Verdict]:
    """
    Run kosoku's fuzzing client against C{url} and return its verdicts.

    The reports (C{index.json} and HTML) are written to C{reportDir}, which
    is emptied first so that a stale report can never be read as this
    run's.  kosoku exits with 1 when a case fails; that is a verdict, not
    an error: only a missing report is.

    @raise FuzzingRunError: if kosoku wrote no report within C{timeout}
        seconds.
    """
    shutil.rmtree(reportDir, ignore_errors=True)
    command = kosokuCommand() + ["--mode", "fuzzingclient", "--outdir", str(reportDir), *selection.arguments(), url]
    try:
        code, output = await runProcess(reactor, command, timeout)
    except TimeoutError:
        raise FuzzingRunError(f"kosoku against {url} did not finish within {timeout:g} seconds") from None
    written = (reportDir / "index.json").exists()
    # kosoku has been seen to die of a signal on its way out, after its last
    # words ("wrote reports for N cases"): the report is whole, so it counts.
    finished = code in (0, 1) or (code is None and "wrote reports for" in output)
    if not (finished and written):
        raise FuzzingRunError(f"kosoku against {url} exited with {code} and wrote no report:\n{output}")
    return readVerdicts(reportDir)


# The TLS forwarder.


class _Leg(Protocol):
    """
    One side of a forwarded connection: what it reads is written to its
    peer, and when it closes the peer is closed once its pending data is
    written.

    Reading is paused through a L{ReadGate}, registered as the streaming
    producer of the peer's transport: the transports pause and resume it
    as their buffers fill and drain, so a slow reader holds back the fast
    writer and memory stays bounded.  The gate ignores C{stopProducing},
    so a peer that closes never tears this side down without its TLS
    close.
    """

    peer: _Leg | None = None
    gate: ReadGate

    def connectionMade(self) -> None:
        self.gate = ReadGate(self.transport)
        # WebSocket frames are small and often answer one another; Nagle's
        # algorithm would hold them back on a leg the direct run does not have.
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            # A TLS transport postpones its close while a producer is registered.
            peer.transport.unregisterProducer()
            peer.transport.loseConnection()


def _join(one: _Leg, other: _Leg) -> None:
    """Make two connected legs each other's peer, with flow control both ways."""
    one.peer, other.peer = other, one
    one.transport.registerProducer(other.gate, True)
    other.transport.registerProducer(one.gate, True)


class _Inbound(_Leg):
    """
    The plain side: connects to the proxy when accepted, and does not read
    until that connection is up, so nothing is buffered for a peer that
    does not exist yet.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint
        self._connecting: Deferred[_Leg] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.gate.hold("connecting")
        self._connecting = connectProtocol(self._endpoint, _Leg())
        self._connecting.addCallbacks(self._connected, self._notConnected)

    def _connected(self, outbound: _Leg) -> None:
        self._connecting = None
        _join(self, outbound)
        self.gate.release("connecting")

    def _notConnected(self, reason: Failure) -> None:
        self._connecting = None
        if not reason.check(CancelledError):
            log.failure("TLS forwarder: cannot connect to {endpoint}", reason, endpoint=self._endpoint)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        super().connectionLost(reason)


class TLSForwarder(Factory):
    """
    Accepts plain TCP connections and forwards each, byte for byte, over a
    TLS connection of its own: a C{ws://} client can then test a C{wss://}
    listener.  Test tooling, in the spirit of L{twisted.protocols.portforward}.
    """

    noisy = False

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def buildProtocol(self, addr: Any) -> _Inbound:
        return _Inbound(self.endpoint)


async def listenTLSForwarder(reactor: Any, port: int, caCertificate: bytes, hostname: str = TLS_NAME) -> IListeningPort:
    """
    Forward an ephemeral loopback port to the TLS listener on C{port},
    verifying its certificate for C{hostname} against C{caCertificate}
    (PEM).
    """
    options = optionsForClientTLS(hostname, trustRoot=Certificate.loadPEM(caCertificate))
    toProxy = wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOOPBACK, port))
    return await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(TLSForwarder(toProxy))


# The echo application, reached three ways.


@dataclass(frozen=True)
class Targets:
    """
    The echo application's C{ws://} URLs: directly, and through each
    listener, the TLS one by way of the forwarder.  C{secure} is the TLS
    listener's own C{wss://} URL, for a client that speaks TLS itself.
    """

    direct: str
    plain: str
    tls: str
    secure: str

    def urls(self) -> dict[str, str]:
        """The URLs by run name, the direct run first (it is the baseline)."""
        return {"direct": self.direct, "plain": self.plain, "tls": self.tls}


def _echoURL(port: int) -> str:
    return f"ws://{LOOPBACK}:{port}/ws"


def _stopOnExit(stack: AsyncExitStack, stop: Callable[[], Any]) -> None:
    """Call C{stop} (which may return a L{Deferred}) when C{stack} unwinds."""

    async def call() -> None:
        await maybeDeferred(stop)

    stack.push_async_callback(call)


def _writeCertificate(directory: Path) -> tuple[Path, Path, bytes]:
    """
    A fresh CA and a certificate it issued for L{TLS_NAME}, the chain and
    key written where the proxy's configuration can name them.

    @return: the chain's path, the key's path, the CA certificate (PEM).
    """
    import trustme

    authority = trustme.CA()
    issued = authority.issue_cert(TLS_NAME, LOOPBACK)
    chain, key = directory / "chain.pem", directory / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return chain, key, authority.cert_pem.bytes()


@dataclass(frozen=True)
class Ports:
    """Where to listen on the loopback interface; 0 lets the system pick."""

    echo: int = 0
    plain: int = 0
    tls: int = 0


def _proxyConfig(echoPort: int, ports: Ports, chain: Path, key: Path) -> dict[str, Any]:
    """A plain and a TLS listener on loopback, both in front of the echo."""

    def listener(port: int) -> dict[str, Any]:
        return {"listen": f"tcp:{port}:interface={LOOPBACK}", "proxy_pass": "http://echo", "access_log": False}

    tls = {**listener(ports.tls), "ssl_certificate": str(chain), "ssl_certificate_key": str(key)}
    return {
        "upstream": {"echo": {"servers": [f"{LOOPBACK}:{echoPort}"]}},
        "server": [listener(ports.plain), tls],
        "shutdown_timeout": 1,
    }


@asynccontextmanager
async def echoThroughProxy(reactor: Any, ports: Ports = Ports()) -> AsyncIterator[Targets]:
    """
    Start the echo application, the proxy in front of it (plain and TLS),
    and a TLS forwarder to the TLS listener; stop them all on exit.
    """
    async with AsyncExitStack() as stack:
        directory = Path(stack.enter_context(TemporaryDirectory(prefix="wsproxy-conformance-")))
        chain, key, caCertificate = _writeCertificate(directory)

        echo = reactor.listenTCP(ports.echo, echoSite(), interface=LOOPBACK)
        _stopOnExit(stack, echo.stopListening)
        echoPort = echo.getHost().port

        config = parseConfig(_proxyConfig(echoPort, ports, chain, key), source="(conformance)")
        proxy = ProxyService(config, reactor)
        proxy.startService()
        _stopOnExit(stack, proxy.stopService)
        plain, tls = [(await listener.listeningPort()).getHost().port for listener in proxy.listeners]

        forwarder = await listenTLSForwarder(reactor, tls, caCertificate)
        _stopOnExit(stack, forwarder.stopListening)

        secure = f"wss://{LOOPBACK}:{tls}/ws"
        yield Targets(_echoURL(echoPort), _echoURL(plain), _echoURL(forwarder.getHost().port), secure)


async def fuzzAll(
    reactor: Any,
    targets: Targets,
    selection: Selection,
    reportDir: Path,
    timeout: float,
    out: TextIO | None = None,
) -> dict[str, dict[str, Verdict]]:
    """
    Run kosoku against each target in turn, the reports of each under
    C{reportDir/NAME}.  The runs do not overlap: on a small machine they
    would compete for the processor the echo and the proxy share, and only
    one run's timing would then be like the others'.
    """
    verdicts = {}
    for name, url in targets.urls().items():
        started = reactor.seconds()
        verdicts[name] = await fuzz(reactor, url, selection, reportDir / name, timeout)
        if out is not None:
            elapsed = reactor.seconds() - started
            print(f"({name}: {len(verdicts[name])} cases through {url} in {elapsed:.0f} s)", file=out, flush=True)
    return verdicts


#: How many times a differing case is run again, directly and through the
#: listener, before the difference is believed.
RECHECK_ROUNDS = 3


async def recheck(
    reactor: Any,
    targets: Targets,
    verdicts: dict[str, dict[str, Verdict]],
    reportDir: Path,
    timeout: float,
    out: TextIO | None = None,
) -> None:
    """
    Run the cases that ended differently again, one at a time, directly
    and through their listener, and keep a round's verdicts for a case as
    soon as they agree.

    A few cases end by a race inside the echo itself (in 3.4 whether the
    echo of a message overtakes the close for a bad frame decides between
    OK and NON-STRICT), so one run can differ from another with or without
    a proxy.  What the proxy changes, it changes every time: a difference
    that is there in each of L{RECHECK_ROUNDS} rounds stays a difference.
    """
    urls = targets.urls()
    for name in [name for name in verdicts if name != "direct"]:
        for attempt in range(1, RECHECK_ROUNDS + 1):
            comparison = compare(name, verdicts["direct"], verdicts[name])
            caseIds = tuple(d.caseId for d in comparison.differences)
            if not caseIds:
                break
            selection = Selection(cases=caseIds, parallelism=1)
            where = reportDir / f"recheck-{name}-{attempt}"
            direct = await fuzz(reactor, urls["direct"], selection, where / "direct", timeout)
            proxied = await fuzz(reactor, urls[name], selection, where / name, timeout)
            for caseId in caseIds:
                if caseId in direct and direct.get(caseId) == proxied.get(caseId):
                    verdicts["direct"][caseId] = direct[caseId]
                    verdicts[name][caseId] = proxied[caseId]
                    if out is not None:
                        print(f"({name}: {caseId} ended as {direct[caseId]} both ways on recheck {attempt})", file=out)


def judge(verdicts: Mapping[str, Mapping[str, Verdict]]) -> tuple[list[str], bool]:
    """
    The summary lines for a set of runs, and whether they show the proxy
    changing nothing.
    """
    direct = verdicts["direct"]
    comparisons = [compare(name, direct, proxied) for name, proxied in verdicts.items() if name != "direct"]
    problems = baselineProblems(direct)
    lines = [describeBaseline(direct), *problems]
    for comparison in comparisons:
        lines += comparison.lines()
    return lines, not problems and all(c.identical for c in comparisons)


# The command.


@dataclass(frozen=True)
class Options:
    """What the command was asked to do."""

    selection: Selection
    reportDir: Path
    timeout: float
    serve: Ports | None = None


def parseArguments(argv: Sequence[str]) -> Options:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="wsproxy-conformance",
        description=(
            "Run the Autobahn TestSuite fuzzing client (kosoku) against autobahn's echo directly, "
            "through wsproxy's plain listener and through its TLS listener, and check that every "
            "case ends identically."
        ),
    )
    add = parser.add_argument
    add("--cases", action="append", default=[], metavar="CASE", help="case id or glob, e.g. 9.* (repeatable)")
    add("--exclude", action="append", default=[], metavar="CASE", help="case id or glob to leave out (repeatable)")
    add("--report-dir", type=Path, default=Path("reports/conformance"), help="default: %(default)s")
    add("--parallelism", type=int, default=4, help="cases kosoku runs at a time (default: %(default)s)")
    add("--timeout", type=float, default=3600.0, help="seconds allowed for each run (default: %(default)s)")
    add(
        "--serve",
        nargs=3,
        type=int,
        metavar=("ECHO", "PLAIN", "TLS"),
        help="run no suite: serve the echo and the proxy on these loopback ports until interrupted, "
        "for another fuzzing client (conformance/fuzzingclient.json uses 9001 9002 9003)",
    )
    arguments = parser.parse_args(argv)
    if arguments.parallelism < 1:
        parser.error("--parallelism must be at least 1")
    selection = Selection(tuple(arguments.cases), tuple(arguments.exclude), arguments.parallelism)
    serve = Ports(*arguments.serve) if arguments.serve else None
    return Options(selection, arguments.report_dir, arguments.timeout, serve)


async def runConformance(reactor: Any, options: Options, out: TextIO = sys.stdout) -> int:
    """
    Run the three suites and print the summary.

    @return: the exit code: 0 if every case ended identically through both
        listeners, 1 if not (or if the direct run is no baseline), 2 if a
        run produced no report.
    """
    async with echoThroughProxy(reactor) as targets:
        try:
            verdicts = await fuzzAll(reactor, targets, options.selection, options.reportDir, options.timeout, out)
            await recheck(reactor, targets, verdicts, options.reportDir, options.timeout, out)
        except FuzzingRunError as e:
            print(f"error: {e}", file=out)
            return 2
    lines, identical = judge(verdicts)
    print("\n".join(lines), file=out)
    print(f"reports: {options.reportDir}/{{{','.join(targets.urls())}}}/index.html", file=out, flush=True)
    return 0 if identical else 1


async def serve(reactor: Any, ports: Ports, out: TextIO = sys.stdout) -> None:
    """
    Serve the echo directly and through the proxy until the reactor stops,
    for a fuzzing client run by hand (the original C{wstest}).
    """
    async with echoThroughProxy(reactor, ports) as targets:
        print(f"direct: {targets.direct}", file=out)
        print(f"plain:  {targets.plain}", file=out)
        print(f"tls:    {targets.secure} (certificate from a CA made at start-up)", file=out)
        print("serving; interrupt to stop", file=out, flush=True)
        await Deferred()


def _logWarnings(stream: TextIO) -> None:
    """
    Show the proxy's warnings and errors (a traceback in the proxy explains
    a difference), but not the echo's warnings: the fuzzer provokes them
    on purpose, by the hundred.
    """
    levels = LogLevelFilterPredicate(LogLevel.warn)
    levels.setLogLevelForNamespace("autobahn", LogLevel.error)
    observer = FilteringLogObserver(textFileLogObserver(stream), [levels])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


#: How to get what the command needs.
INSTALL_HINT = "pip install 'wsproxy[conformance]'"


def missingModules(names: Iterable[str]) -> list[str]:
    """Those of the modules C{names} that cannot be imported."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def main(argv: Iterable[str] | None = None) -> None:
    """
    The C{wsproxy-conformance} console script.  Exits with status 2 and one
    line naming the extra to install if kosoku or trustme is missing.
    """
    options = parseArguments(list(sys.argv[1:] if argv is None else argv))
    missing = missingModules(["trustme"] if options.serve is not None else ["kosoku", "trustme"])
    if missing:
        print(
            f"wsproxy-conformance: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
            f"install them with: {INSTALL_HINT}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    _logWarnings(sys.stderr)

    async def run(reactor: Any) -> None:
        if options.serve is not None:
            await serve(reactor, options.serve)
        raise SystemExit(await runConformance(reactor, options))

    react(run)


if __name__ == "__main__":
    main()
