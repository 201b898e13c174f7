# -*- test-case-name: tests.test_accesslog,tests.test_relay -*-
"""
The access log: one line per request and one per finished tunnel.

C{access_log = true} (the default) logs an event in the namespace
C{wsproxy.access} with the request's fields (C{client}, C{method},
C{target}, C{status}, C{upstream}, C{bytesIn}, C{bytesOut}, C{duration},
and C{closedBy} for a tunnel) for structured observers such as C{twistd
--logger} with JSON output, and the fixed line a text log shows, formatted
here with C{%}: Twisted's text observer formats only the fields its
C{log_format} names, and formatting eight fields with C{str.format} for
every request was a quarter of the proxy's CPU time when logging to a file.

C{access_log = "/path"} or C{{ path = "...", format = "..." }} writes a
line in an nginx C{log_format} (L{compileLogFormat}), or a JSON object
(L{JSON_FIELDS}), to a file.  The format is compiled once; a line is made
from a L{LogEntry}, which holds what the request path had at hand when the
request ended and builds the request's L{RequestContext} only for a
format that reads a request variable.  Each path is opened once and
shared by every server and location that names it (L{AccessLogs}), and
each line is one C{write(2)} on a descriptor opened with C{O_APPEND}, as
nginx writes without C{buffer=}: nothing is held in memory, a line is
never split between two processes, and C{SIGUSR1} (L{reopenAccessLogs})
can reopen the files after logrotate moved them.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from .config import AccessLog, Config, ConfigError, ServerBlock
from .variables import PREFIXES, VARIABLES, RequestContext, Template, VariableError, compileTemplate

if TYPE_CHECKING:
    from .http import RequestHead

__all__ = [
    "logAnswer",
    "COMBINED",
    "JSON_FIELDS",
    "LOG_VARIABLES",
    "AccessLogs",
    "LogEntry",
    "LogFile",
    "LogFormat",
    "accessLogs",
    "compileLogFormat",
    "logRequest",
    "logTunnel",
    "openAccessLogs",
    "reopenAccessLogs",
]

log = Logger(namespace="wsproxy.access")
_problems = Logger()

#: Where the time of a line comes from; the tests fix it.
wallClock: Callable[[], float] = time.time

#: nginx's predefined C{combined} format.
COMBINED = (
    '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"'
)

#: The variables of the C{json} preset, each the key of its own value.
JSON_FIELDS = (
    "time_iso8601",
    "remote_addr",
    "request_id",
    "connection",
    "request_method",
    "request_uri",
    "server_protocol",
    "host",
    "status",
    "body_bytes_sent",
    "bytes_sent",
    "bytes_received",
    "request_time",
    "upstream_addr",
    "upstream_status",
    "upstream_response_time",
    "http_referer",
    "http_user_agent",
    "tunnel_closed_by",
    "tunnel_close_reason",
    "websocket_close_code",
)


class LogEntry:
    """
    What one line is made of: the data the request path has at hand when a
    request or a tunnel ends.  Nothing is computed until a format asks.

    @ivar leg: the client's L{wsproxy.server.ClientLeg}, if known.
    @ivar settings: the listener's or location's settings, if known (for
        C{$scheme}, C{$server_name} and the trust rules).
    @ivar headBytes: the bytes of the response head sent, as far as known.
    @ivar closedBy: C{"client"}, C{"upstream"} or C{"proxy"} for a tunnel.
    @ivar time: when the line was made (L{wallClock}).
    """

    __slots__ = (
        "client",
        "method",
        "target",
        "status",
        "upstream",
        "bytesIn",
        "bytesOut",
        "duration",
        "request",
        "leg",
        "settings",
        "upstreamStatus",
        "headBytes",
        "closedBy",
        "closeReason",
        "closeCode",
        "time",
        "needsFull",
        "_context",
    )

    def __init__(
        self,
        client: str,
        method: str,
        target: str,
        status: int,
        upstream: str,
        bytesIn: int,
        bytesOut: int,
        duration: float,
        request: RequestHead | None = None,
        leg: Any = None,
        settings: Any = None,
        context: RequestContext | None = None,
        upstreamStatus: int | None = None,
        headBytes: int = 0,
        closedBy: str | None = None,
        closeReason: str | None = None,
        closeCode: int | None = None,
    ) -> None:
        self.client = client
        self.method = method
        self.target = target
        self.status = status
        self.upstream = upstream
        self.bytesIn = bytesIn
        self.bytesOut = bytesOut
        self.duration = duration
        self.request = request
        self.leg = leg
        self.settings = settings
        self.upstreamStatus = upstreamStatus
        self.headBytes = headBytes
        self.closedBy = closedBy
        self.closeReason = closeReason
        self.closeCode = closeCode
        self.time = wallClock()
        self._context = context
        #: Whether the format reads a variable a light context lacks (set by the format).
        self.needsFull = False

    def context(self) -> RequestContext | None:
        """
        The request's variables: the one the exchange built if it did, else
        one made now, with the normalised path, the query, the ports and
        C{X-Forwarded-For} only if C{needsFull}.  C{None} without a request
        head.
        """
        context = self._context
        if context is not None:
            return context
        request = self.request
        if request is None:
            return None
        settings = self.settings
        block: ServerBlock | None = getattr(settings, "block", None)
        scheme = getattr(settings, "scheme", b"http")
        scheme = scheme.encode("ascii") if isinstance(scheme, str) else scheme
        serverName = block.server_name.encode("ascii") if block is not None else b""
        underscores = block.underscores_in_headers if block is not None else False
        if self.needsFull:
            context = self._fullContext(request, scheme, serverName, underscores)
        else:
            context = RequestContext(
                request, self.client, 0, 0, scheme, serverName, b"", b"", b"", underscores=underscores
            )
        self._context = context
        return context

    def _fullContext(self, request: RequestHead, scheme: bytes, serverName: bytes, underscores: bool) -> RequestContext:
        from .http import HTTPError, forwardedFor
        from .matching import normalizePath, splitTarget

        path, args = splitTarget(request.path)
        try:
            uri = normalizePath(path)
        except HTTPError:
            uri = path
        transport = getattr(self.leg, "transport", None)
        peerPort = getattr(transport.getPeer(), "port", 0) if transport is not None else 0
        hostPort = getattr(transport.getHost(), "port", 0) if transport is not None else 0
        if getattr(self.settings, "trustedProxies", None) is not None:
            forwarded = forwardedFor(request, self.client, self.settings)
        else:
            forwarded = self.client.encode("ascii")
        return RequestContext(
            request, self.client, peerPort, hostPort, scheme, serverName, uri, args, forwarded, underscores=underscores
        )


#: What a variable's getter gives: text, a number, or C{None} for no value.
Value = bytes | int | float | None
Getter = Callable[[LogEntry], Value]

_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")


class _Times:
    """C{$time_local} and C{$time_iso8601} for a second, made once per second (as nginx caches them)."""

    second: int | None = None
    local = iso = b""

    def of(self, when: float) -> _Times:
        second = int(when)
        if second != self.second:
            tm = time.localtime(second)
            offset = tm.tm_gmtoff // 60
            sign = b"-" if offset < 0 else b"+"
            hours, minutes = divmod(abs(offset), 60)
            clock = b"%02d:%02d:%02d" % (tm.tm_hour, tm.tm_min, tm.tm_sec)
            day = (tm.tm_mday, _MONTHS[tm.tm_mon - 1], tm.tm_year)
            self.local = b"%02d/%b/%d:" % day + clock + b" %b%02d%02d" % (sign, hours, minutes)
            self.iso = (
                b"%d-%02d-%02dT" % (tm.tm_year, tm.tm_mon, tm.tm_mday)
                + clock
                + b"%b%02d:%02d"
                % (
                    sign,
                    hours,
                    minutes,
                )
            )
            self.second = second
        return self


_times = _Times()


def _request(entry: LogEntry) -> bytes:
    request = entry.request
    if request is None:
        return b"%s %s" % (entry.method.encode("ascii"), entry.target.encode("ascii", "backslashreplace"))
    return b"%b %b %b" % (request.method, request.target, request.version)


def _upstream(entry: LogEntry) -> bytes | None:
    return None if entry.upstream == "-" else entry.upstream.encode("ascii")


def _connection(entry: LogEntry) -> int | None:
    return getattr(entry.leg, "serial", None)


def _connectionRequests(entry: LogEntry) -> int | None:
    loop = getattr(entry.leg, "loop", None)
    return getattr(loop, "requests", None) or None


def _pipe(entry: LogEntry) -> bytes:
    return b"p" if getattr(getattr(entry.leg, "loop", None), "pipelined", False) else b"."


#: The variables only a log line has, read from the L{LogEntry}; some
#: (C{$remote_addr}, C{$request_method}, C{$request_uri}) are request
#: variables read here without building a request context.
_LOG_GETTERS: dict[str, Getter] = {
    "status": lambda e: e.status,
    "body_bytes_sent": lambda e: e.bytesOut,
    "bytes_sent": lambda e: e.bytesOut + e.headBytes,
    "bytes_received": lambda e: e.bytesIn,
    "request_time": lambda e: e.duration,
    "request": _request,
    "remote_addr": lambda e: e.client.encode("ascii"),
    "remote_user": lambda e: None,
    "request_method": lambda e: e.method.encode("ascii"),
    "request_uri": lambda e: e.request.path if e.request is not None else e.target.encode("ascii", "replace"),
    "server_protocol": lambda e: e.request.version if e.request is not None else None,
    "upstream_addr": _upstream,
    "upstream_status": lambda e: e.upstreamStatus,
    "upstream_response_time": lambda e: e.duration if e.upstream != "-" else None,
    "time_local": lambda e: _times.of(e.time).local,
    "time_iso8601": lambda e: _times.of(e.time).iso,
    "msec": lambda e: b"%.3f" % e.time,
    "connection": _connection,
    "connection_requests": _connectionRequests,
    "pipe": _pipe,
    "tunnel_closed_by": lambda e: e.closedBy.encode("ascii") if e.closedBy else None,
    "tunnel_close_reason": lambda e: e.closeReason.encode("ascii") if e.closeReason else None,
    "websocket_close_code": lambda e: e.closeCode,
}

#: Every variable a log format has beyond the request variables of
#: L{wsproxy.variables}.
LOG_VARIABLES: frozenset[str] = frozenset(_LOG_GETTERS)

#: Request variables a context without the path, query, ports and
#: forwarding chain can give.
_LIGHT = frozenset({"host", "http_host", "scheme", "server_name", "request_id", "content_length", "content_type"})


def _requestGetter(name: str) -> Getter:
    """A request variable (L{wsproxy.variables}); one with no value (a missing header) is C{None}."""
    template: Template = compileTemplate("$" + name)
    expand = template.expand
    absent: bytes | None = None if name.startswith(PREFIXES) else b""

    def getRequestVariable(entry: LogEntry) -> Value:
        context = entry.context()
        if context is None:
            return None
        return expand(context) or absent

    return getRequestVariable


def _needsFull(name: str) -> bool:
    """Whether variable C{name} needs a full request context (see L{LogEntry.context})."""
    name = name.lower()
    return not (name in _LOG_GETTERS or name in _LIGHT or name.startswith(("http_", "cookie_")))


def _getter(name: str) -> Getter:
    name = name.lower()
    return _LOG_GETTERS.get(name) or _requestGetter(name)


_UNSAFE = re.compile(rb'["\\\x00-\x1f\x7f-\xff]')


def _escapeDefault(value: bytes) -> bytes:
    """nginx's default escaping: C{"}, C{\\}, control and non-ASCII bytes as C{\\xHH}."""
    if _UNSAFE.search(value) is None:
        return value
    return _UNSAFE.sub(lambda match: b"\\x%02X" % match.group()[0], value)


def _escapeJSON(value: bytes) -> bytes:
    """The inside of a JSON string (nginx's C{escape=json})."""
    return json.dumps(value.decode("utf-8", "backslashreplace"))[1:-1].encode("ascii")


#: escape: (function for text, what a variable without a value writes)
_ESCAPES: dict[str, tuple[Callable[[bytes], bytes], bytes]] = {
    "default": (_escapeDefault, b"-"),
    "json": (_escapeJSON, b""),
    "none": (lambda value: value, b"-"),
}

#: A reference in a format that L{compileTemplate} has already accepted.
_REFERENCE = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([1-9])|([A-Za-z0-9_]+))")


class LogFormat:
    """
    A compiled C{log_format}: literal bytes and variables, each variable's
    value escaped as the format says.

    @ivar text: the format as configured.
    """

    def __init__(self, text: str, escape: str = "default") -> None:
        self.text = text
        self._escape, self._absent = _ESCAPES[escape]
        parts: list[bytes | Getter] = []
        position = 0
        self.needsFull = False
        for reference in _REFERENCE.finditer(text):
            if reference.start() > position:
                parts.append(text[position : reference.start()].encode("ascii"))
            name = next(group for group in reference.groups() if group)
            parts.append(_getter(name))
            self.needsFull = self.needsFull or _needsFull(name)
            position = reference.end()
        if position < len(text):
            parts.append(text[position:].encode("ascii"))
        self._parts = tuple(parts)

    def render(self, entry: LogEntry) -> bytes:
        """The line for C{entry}, without its line feed."""
        escape, absent = self._escape, self._absent
        entry.needsFull = self.needsFull
        out = []
        for part in self._parts:
            if part.__class__ is bytes:
                out.append(part)
                continue
            value = part(entry)  # type: ignore[operator]
            if value.__class__ is bytes:
                out.append(escape(value))  # type: ignore[arg-type]
            elif value is None:
                out.append(absent)
            elif value.__class__ is float:
                out.append(b"%.3f" % value)
            else:
                out.append(b"%d" % value)  # type: ignore[str-format]
        return b"".join(out)


class JSONFormat:
    """
    The C{json} preset: one object per line, the variables of
    L{JSON_FIELDS} by name, typed: numbers as numbers (times in seconds
    with milliseconds), no value as C{null}.
    """

    text = "json"

    def __init__(self, names: tuple[str, ...] = JSON_FIELDS) -> None:
        self._fields = tuple((name, _getter(name)) for name in names)
        self.needsFull = any(_needsFull(name) for name in names)

    def render(self, entry: LogEntry) -> bytes:
        """The object for C{entry}, without its line feed."""
        entry.needsFull = self.needsFull
        fields: dict[str, Any] = {}
        for name, getter in self._fields:
            value = getter(entry)
            if value.__class__ is bytes:
                value = value.decode("utf-8", "backslashreplace")  # type: ignore[union-attr]
            elif value.__class__ is float:
                value = round(value, 3)  # type: ignore[arg-type]
            fields[name] = value
        return json.dumps(fields, separators=(",", ":")).encode("ascii")


def compileLogFormat(text: str, escape: str = "default") -> LogFormat:
    """
    Compile an nginx C{log_format}: the request variables of
    L{wsproxy.variables} and those of L{LOG_VARIABLES}.

    @raise VariableError: for an unknown variable or a malformed format,
        with L{compileTemplate}'s message.
    """
    compileTemplate(text, extraNames=LOG_VARIABLES - VARIABLES)
    if escape not in _ESCAPES:
        raise VariableError(f"unknown escape {escape!r}")
    return LogFormat(text, escape)


def formatFor(spec: AccessLog) -> LogFormat | JSONFormat:
    """The compiled format C{spec} names."""
    if spec.format == "json":
        return JSONFormat()
    if spec.format == "combined" or spec.text is None:
        return compileLogFormat(COMBINED)
    return compileLogFormat(spec.text, spec.escape)


class LogFile:
    """
    One access-log file, shared by every server and location that names
    its path, written one line per C{write(2)} on an C{O_APPEND}
    descriptor.

    @ivar path: the file's path.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = self._open()
        self._failing = False

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, line: bytes) -> None:
        """Append C{line}; a failure (a full disk) is logged once until a write succeeds again."""
        try:
            written = os.write(self.fd, line)
            while written < len(line):
                line = line[written:]
                written = os.write(self.fd, line)
        except OSError as e:
            if not self._failing:
                self._failing = True
                _problems.error("access log {path}: {why}; lines are lost", path=self.path, why=e.strerror)
            return
        self._failing = False

    def reopen(self) -> bool:
        """
        Open the path again (after logrotate renamed the file) and write
        there from now on; if it cannot be opened, keep the old file.

        @return: whether the file was reopened.
        """
        try:
            fd = self._open()
        except OSError as e:
            _problems.error("access log {path}: cannot reopen: {why}", path=self.path, why=e.strerror)
            return False
        old, self.fd = self.fd, fd
        os.close(old)
        return True

    def close(self) -> None:
        os.close(self.fd)


class AccessLogs:
    """
    The access logs in use in this process: each C{access_log} value's
    format compiled once, each path opened once.

    @ivar files: the open files by path.
    """

    def __init__(self) -> None:
        self.files: dict[str, LogFile] = {}
        self._writers: dict[AccessLog, Callable[[LogEntry], None]] = {}

    def writerFor(self, spec: AccessLog) -> Callable[[LogEntry], None]:
        """
        What writes an entry's line where C{spec} says.

        @raise OSError: if the file cannot be opened.
        """
        writer = self._writers.get(spec)
        if writer is None:
            writer = self._writers[spec] = self._makeWriter(spec)
        return writer

    def _makeWriter(self, spec: AccessLog) -> Callable[[LogEntry], None]:
        render = formatFor(spec).render
        if spec.path is None:
            return lambda entry: log.info("{line}", line=render(entry).decode("latin-1"))
        logFile = self.files.get(spec.path)
        if logFile is None:
            logFile = self.files[spec.path] = LogFile(spec.path)
        write = logFile.write
        return lambda entry: write(render(entry) + b"\n")

    def prepare(self, config: Config) -> None:
        """
        Compile the formats and open the files C{config} names, so that a
        file that cannot be opened stops a start or a reload.

        @raise ConfigError: naming the first C{access_log} whose file
            cannot be opened.
        """
        for where, block in _blocks(config):
            spec = block.access_log
            if isinstance(spec, AccessLog):
                try:
                    self.writerFor(spec)
                except OSError as e:
                    raise ConfigError(
                        config.source, f"{where}.access_log", f"cannot open {spec.path!r}: {e.strerror}"
                    ) from None

    def reopen(self) -> None:
        """Reopen every file (C{SIGUSR1}, after logrotate)."""
        for logFile in self.files.values():
            logFile.reopen()
        _problems.info("access logs reopened: {count} files", count=len(self.files))


def _blocks(config: Config) -> Iterator[tuple[str, ServerBlock]]:
    for index, server in enumerate(config.servers):
        yield f"server[{index}]", server
        for position, location in enumerate(server.locations):
            yield f"server[{index}].location[{position}]", location.block


#: This process's access logs.
accessLogs = AccessLogs()


def openAccessLogs(config: Config) -> None:
    """L{AccessLogs.prepare} for this process's access logs."""
    accessLogs.prepare(config)


def reopenAccessLogs() -> None:
    """L{AccessLogs.reopen} for this process's access logs."""
    accessLogs.reopen()


_REQUEST = (
    '%(client)s "%(method)s %(target)s" %(status)d upstream=%(upstream)s '
    "in=%(bytesIn)d out=%(bytesOut)d %(duration).3fs"
)
_TUNNEL = _REQUEST + " closed by %(closedBy)s"
#: What an event in C{twistd}'s log carries, for a request and a tunnel.
_REQUEST_FIELDS = ("client", "method", "target", "status", "upstream", "bytesIn", "bytesOut", "duration")
_TUNNEL_FIELDS = (*_REQUEST_FIELDS, "closedBy", "closeReason", "closeCode")


def logRequest(
    client: str,
    method: str,
    target: str,
    status: int,
    upstream: str,
    bytesIn: int,
    bytesOut: int,
    duration: float,
    *,
    destination: bool | AccessLog = True,
    request: RequestHead | None = None,
    leg: Any = None,
    settings: Any = None,
    context: RequestContext | None = None,
    upstreamStatus: int | None = None,
    headBytes: int = 0,
) -> None:
    """
    Log one request where C{destination} (an C{access_log} value) says: for
    C{True}, C{127.0.0.1 "GET /" 200 upstream=... in=0 out=20 0.001s} in
    C{twistd}'s log; else a line in its format.
    """
    entry = LogEntry(
        client,
        method,
        target,
        status,
        upstream,
        bytesIn,
        bytesOut,
        duration,
        request,
        leg,
        settings,
        context,
        upstreamStatus,
        headBytes,
    )
    _emit(destination, entry, _REQUEST, _REQUEST_FIELDS)


def logAnswer(
    loop: Any,
    request: RequestHead,
    status: int,
    bytesOut: int,
    destination: bool | AccessLog,
    settings: Any,
    duration: float = 0.0,
) -> None:
    """
    Log an answer of the proxy's own (an error, a C{return}, a redirect, a
    file): no upstream, no request body read.
    """
    logRequest(
        client=loop.leg.clientAddress,
        method=request.method.decode("ascii"),
        target=request.target.decode("ascii", "backslashreplace"),
        status=status,
        upstream="-",
        bytesIn=0,
        bytesOut=bytesOut,
        duration=duration,
        destination=destination,
        request=request,
        leg=loop.leg,
        settings=settings,
    )


def logTunnel(
    client: str,
    method: str,
    target: str,
    upstream: str,
    bytesIn: int,
    bytesOut: int,
    duration: float,
    side: str,
    *,
    destination: bool | AccessLog = True,
    request: RequestHead | None = None,
    leg: Any = None,
    settings: Any = None,
    closeReason: str | None = None,
    closeCode: int | None = None,
) -> None:
    """
    Log a finished tunnel, with who closed it (C{side}: C{"client"},
    C{"upstream"} or C{"proxy"}, then with C{closeReason}), and the status
    of the WebSocket Close frame that passed, if one did: for C{True},
    C{... 101 upstream=... closed by client} in C{twistd}'s log; else a
    line in its format.
    """
    entry = LogEntry(
        client,
        method,
        target,
        101,
        upstream,
        bytesIn,
        bytesOut,
        duration,
        request,
        leg,
        settings,
        upstreamStatus=101,
        closedBy=side,
        closeReason=closeReason,
        closeCode=closeCode,
    )
    _emit(destination, entry, _TUNNEL, _TUNNEL_FIELDS)


def _emit(destination: bool | AccessLog, entry: LogEntry, line: str, names: tuple[str, ...]) -> None:
    """
    Write C{entry} where C{destination} says: a line in an access log's
    format, or (for C{True}) C{line} in C{twistd}'s log, as an event that
    carries the fields C{names}.
    """
    if destination.__class__ is AccessLog:
        accessLogs.writerFor(destination)(entry)  # type: ignore[arg-type]
        return
    fields = {name: getattr(entry, name) for name in names}
    log.info("{line}", line=line % fields, **fields)
