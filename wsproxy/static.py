# -*- test-case-name: tests.test_static -*-
"""
Files served from disk, the way an nginx location with C{root} or
C{alias}, C{index} and C{try_files} serves them.

L{StaticFiles} is a location's file settings, prepared once: it maps a
request's normalised URI to a path and finds what is there (a file, a
directory's index file, a directory that needs its trailing slash).  No
path it returns leaves the location's directory: not lexically (an
C{alias} whose location lacks its trailing slash, C{/img../secret}), and,
while C{disableSymlinks} is on, not through a symbolic link either.

L{StaticAnswer} answers one request with one file, with nginx's
validators and conditional and range requests, and streams the body in
pieces under flow control: a piece is read only when the client's write
buffer has room, so memory stays bounded whatever the file's size, and a
client that stops reading stops the reading of the file.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from email.utils import formatdate, mktime_tz, parsedate_tz
from functools import cache
from http import HTTPStatus
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from .accesslog import logAnswer
from .config import AccessLog
from .http import CRLF, HEAD_END, HTTPError, RequestHead
from .interfaces import IExchange, IRequestLoop
from .metrics import NO_METRICS

__all__ = ["NeedsSlash", "StaticAnswer", "StaticFiles", "contentType"]

log = Logger()

#: How much of the file is read and written at a time.
CHUNK = 65536
#: How much is sent in one reactor turn before the reactor gets to run
#: other connections; a client on a fast link never fills its buffer.
TURN = 16 * CHUNK

#: nginx's C{mime.types} for what web sites serve; other extensions go to
#: Python's built-in table (never the system's, so that a host's
#: C{/etc/mime.types} does not change the answers), then to
#: C{application/octet-stream}.  Text is sent without a charset, as nginx
#: does by default.
_TYPES = {
    "html": "text/html",
    "htm": "text/html",
    "shtml": "text/html",
    "css": "text/css",
    "xml": "text/xml",
    "txt": "text/plain",
    "js": "application/javascript",
    "mjs": "application/javascript",
    "json": "application/json",
    "map": "application/json",
    "wasm": "application/wasm",
    "pdf": "application/pdf",
    "zip": "application/zip",
    "gif": "image/gif",
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "png": "image/png",
    "svg": "image/svg+xml",
    "svgz": "image/svg+xml",
    "webp": "image/webp",
    "avif": "image/avif",
    "ico": "image/x-icon",
    "bmp": "image/x-ms-bmp",
    "woff": "font/woff",
    "woff2": "font/woff2",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "m4a": "audio/x-m4a",
    "mp4": "video/mp4",
    "webm": "video/webm",
    "m3u8": "application/vnd.apple.mpegurl",
    "ts": "video/mp2t",
    "atom": "application/atom+xml",
    "rss": "application/rss+xml",
    "xhtml": "application/xhtml+xml",
    "bin": "application/octet-stream",
    "exe": "application/octet-stream",
    "iso": "application/octet-stream",
}
_DEFAULT_TYPE = b"application/octet-stream"

#: Why a path is simply not there (nginx: 404).
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG})
#: Why a path may not be read (nginx: 403); ELOOP is a symbolic link loop.
_FORBIDDEN = frozenset({errno.EACCES, errno.EPERM, errno.ELOOP, errno.EMLINK})

#: One byte-range-spec of a C{Range: bytes=} list, with the spaces nginx
#: allows: C{a-b}, C{a-} or C{-n}.
_RANGE_SPEC = re.compile(rb" *(?:([0-9]+) *- *([0-9]+)? *|-([0-9]+) *)")
#: nginx refuses a number that does not fit an C{off_t}.
_MAX_OFFSET = 2**63 - 1


@cache
def _builtInTypes() -> dict[str, str]:
    """
    Python's table of types by extension, for those L{_TYPES} lacks.

    Built on first use rather than at import: most proxies serve no static
    files, and the table (several hundred entries, copied from the system's
    C{mime.types}) would stay in memory for as long as they run.
    """
    import mimetypes

    return mimetypes.MimeTypes().types_map[True]


def contentType(name: str) -> bytes:
    """
    The C{Content-Type} for a file called C{name}, from its extension
    (case-insensitive, as nginx matches them).
    """
    _, dot, extension = name.rpartition(".")
    if not dot:
        return _DEFAULT_TYPE
    extension = extension.lower()
    known = _TYPES.get(extension)
    if known is None:
        known = _builtInTypes().get("." + extension)
    return known.encode("ascii") if known else _DEFAULT_TYPE


class NeedsSlash(Exception):
    """
    The URI names a directory but lacks its trailing slash: nginx answers
    C{301} with C{Location: URI/} (and the query, if any).

    @ivar location: the URI with its slash, to redirect to.
    """

    def __init__(self, uri: bytes) -> None:
        super().__init__(uri)
        self.uri = uri
        self.location = uri + b"/"


class StaticFiles:
    """
    A location's file settings, prepared once at configuration time.

    Exactly one of C{root} and C{alias} is given.  With C{root}, a URI's
    file is C{root + uri}; with C{alias}, C{alias} replaces the location's
    prefix (C{locationPrefix}).  Either way the result must stay inside
    that directory, called the base below.

    With C{disableSymlinks} (the default) a path is resolved before it is
    used, and refused if the resolved path leaves the base: a symbolic
    link inside the tree may point elsewhere inside it, but not out.  The
    path returned is the resolved one, so what is opened is what was
    checked.  (nginx's own C{disable_symlinks on} refuses every link; this
    is the containment half of it.)  Without it, links are followed as
    nginx's default does.

    @ivar base: the directory (or, for an C{alias} of one file, the file)
        no path may leave.
    """

    def __init__(
        self,
        root: str | None,
        alias: str | None,
        locationPrefix: bytes,
        index: tuple[str, ...] = ("index.html",),
        disableSymlinks: bool = True,
    ) -> None:
        if (root is None) == (alias is None):
            raise ValueError("a location serves files from either a root or an alias")
        self.root = root
        self.alias = alias
        self.locationPrefix = locationPrefix
        self.index = index
        self.disableSymlinks = disableSymlinks
        self._directory = os.fsencode(root.rstrip("/") if root is not None else str(alias))
        self.base = os.path.normpath(os.fsdecode(self._directory) or "/")

    def filePath(self, uri: bytes) -> Path:
        """
        nginx's mapping of C{uri} (normalised: percent-decoded, dot
        segments resolved) to a path: C{root + uri}, or C{alias} followed
        by what follows the location's prefix.  Nothing is checked here.
        """
        if self.alias is not None:
            uri = uri[len(self.locationPrefix) :] if uri.startswith(self.locationPrefix) else uri
        return Path(os.fsdecode(self._directory + uri))

    def find(self, uri: bytes) -> Path | None:
        """
        The file to serve for C{uri}, or C{None} if there is none (nginx's
        404; the caller may try the next C{try_files} entry).

        A URI with a trailing slash names a directory: its first C{index}
        file that exists is served.

        @raise NeedsSlash: C{uri} names a directory and has no trailing slash.
        @raise HTTPError: 403 for a directory without an index file, a path
            that leaves the base, or one the proxy may not read; 500 for an
            unexpected failure.
        """
        if uri.endswith(b"/"):
            found = self._lookup(uri)
            if found is None or not stat.S_ISDIR(found[1].st_mode):
                return None
            for name in self.index:
                candidate = self._lookup(uri + os.fsencode(name))
                if candidate is not None and stat.S_ISREG(candidate[1].st_mode):
                    return candidate[0]
            raise HTTPError(403, "directory index is forbidden")
        found = self._lookup(uri)
        if found is None:
            return None
        path, status = found
        if stat.S_ISDIR(status.st_mode):
            raise NeedsSlash(uri)
        if not stat.S_ISREG(status.st_mode):
            log.warn("{path} is not a regular file", path=path)
            return None
        return path

    def exists(self, uri: bytes, directory: bool = False) -> bool:
        """
        Whether C{uri} names a regular file (C{try_files $uri}) or, with
        C{directory}, a directory (C{try_files $uri/}), under the same
        containment rules as L{find}.  A path that cannot be used counts as
        absent, as it does in nginx's C{try_files}.
        """
        try:
            found = self._lookup(uri)
        except HTTPError:
            return False
        if found is None:
            return False
        test = stat.S_ISDIR if directory else stat.S_ISREG
        return test(found[1].st_mode)

    def _lookup(self, uri: bytes) -> tuple[Path, os.stat_result] | None:
        """
        The path for C{uri}, checked, and what C{stat} says of it; C{None}
        if nothing is there.

        @raise HTTPError: 403 if the path leaves the base or may not be
            read, 500 for anything unexpected.
        """
        if b"\0" in uri or not uri.startswith(b"/"):
            return None
        nominal = str(self.filePath(uri))
        # os.path functions drop a trailing slash, which must keep its
        # meaning: "a.txt/" is no file.
        slash = "/" if uri.endswith(b"/") else ""
        if not _inside(os.path.normpath(nominal), self.base):
            log.warn("{uri} leaves {base}; refused", uri=uri.decode("ascii", "backslashreplace"), base=self.base)
            raise HTTPError(403, "outside the served directory")
        path = nominal
        if self.disableSymlinks:
            resolved = os.path.realpath(nominal)
            if not _inside(resolved, os.path.realpath(self.base)):
                log.warn(
                    "{path} is a symbolic link out of {base}; refused",
                    path=nominal,
                    base=self.base,
                )
                raise HTTPError(403, "outside the served directory")
            path = resolved
        path += slash
        try:
            status = os.stat(path)
        except OSError as e:
            if e.errno in _MISSING:
                return None
            if e.errno in _FORBIDDEN:
                raise HTTPError(403, "not readable") from None
            log.error("cannot look up {path}: {why}", path=path, why=e.strerror or str(e))
            raise HTTPError(500, "the file could not be looked up") from None
        return Path(path), status


def _inside(path: str, base: str) -> bool:
    """Whether C{path} is C{base} or below it; both normalised, absolute."""
    return path == base or path.startswith(base.rstrip("/") + "/")


class _Unsatisfiable(Exception):
    """A C{Range} no byte of the file satisfies: 416."""


def _byteRange(value: bytes, size: int) -> tuple[int, int] | None:
    """
    The one range of C{Range: bytes=...} to send, as C{(start, end)} with
    C{end} exclusive, or C{None} to send the whole file.

    This is nginx's parser with C{max_ranges 1}: a second satisfiable range
    means the whole file (rather than a C{multipart/byteranges} body);
    ranges past the end are skipped; C{a-b} is cut at the end of the file;
    a C{bytes=0-} or a range of an empty file is the whole file.

    @raise _Unsatisfiable: the value does not parse, or no range lies
        within the file.
    """
    found: tuple[int, int] | None = None
    for spec in value[6:].split(b","):
        match = _RANGE_SPEC.fullmatch(spec)
        if match is None:
            raise _Unsatisfiable()
        first, last, suffix = match.groups()
        if suffix is not None:
            length = int(suffix)
            if length > _MAX_OFFSET:
                raise _Unsatisfiable()
            start, end = max(size - length, 0), size
        else:
            start = int(first)
            end = size if last is None else min(int(last) + 1, size)
            if start > _MAX_OFFSET or (last is not None and int(last) > _MAX_OFFSET):
                raise _Unsatisfiable()
        if start < end:
            if found is not None:
                return None
            found = (start, end)
        elif start == 0:
            return None
    if found is None:
        raise _Unsatisfiable()
    return found


def _httpDate(seconds: float) -> bytes:
    return formatdate(seconds, usegmt=True).encode("ascii")


def _parseDate(value: bytes) -> int | None:
    """An HTTP date (any of RFC 9110's three formats) as a timestamp, or C{None}."""
    parsed = parsedate_tz(value.decode("latin-1"))
    return None if parsed is None else mktime_tz(parsed)


def _matches(header: bytes, etag: bytes, weak: bool) -> bool:
    """
    Whether an C{If-Match} or C{If-None-Match} list names C{etag}; with
    C{weak} (If-None-Match), a C{W/} tag matches too.
    """
    if header.strip() == b"*":
        return True
    for tag in header.split(b","):
        tag = tag.strip(b" \t")
        if weak and tag.startswith(b"W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


@implementer(IExchange)
class StaticAnswer:
    """
    The answer to one request with the file at C{path}: nginx's static
    module and the filters behind it.

      - C{GET} and C{HEAD} only (else 405 with C{Allow}).
      - C{Last-Modified}, and nginx's C{ETag}: the modification time and
        the size in hexadecimal, C{"5f3e1a2b-1c8"}.
      - Conditional requests as nginx evaluates them: a failed
        C{If-Unmodified-Since} or C{If-Match} is 412; a C{304} needs every
        one of C{If-Modified-Since} (exactly the file's time, nginx's
        C{if_modified_since exact}) and C{If-None-Match} that was sent to
        say the client's copy is current.
      - One C{Range} (C{bytes=a-b}, C{a-}, C{-n}), honouring C{If-Range}:
        206 with C{Content-Range}; none satisfiable: 416 with
        C{Content-Range: bytes */SIZE}.  Several ranges are answered with
        the whole file, 200, as nginx does with C{max_ranges 1}: a
        C{multipart/byteranges} body is rarely useful and costly to get
        right.
      - A C{status} other than 200 (an C{error_page}, such as 404 with
        C{/404.html}) is sent as is, for any method, with neither
        conditional nor range handling, and like nginx without
        C{Last-Modified}.

    The body is read in L{CHUNK}s only while the client's write buffer has
    room, and at most L{TURN} bytes per reactor turn; the file is closed
    when the answer is complete or abandoned.

    @ivar bytesOut: body bytes written so far.
    """

    readyForBody = False
    #: Set by the router to the recorder of the location that answers.
    metrics: Any = NO_METRICS

    def __init__(
        self,
        loop: IRequestLoop,
        request: RequestHead,
        path: Path,
        extraHeaders: tuple[tuple[bytes, bytes], ...] = (),
        status: int = 200,
        accessLog: bool | AccessLog = True,
    ) -> None:
        self.loop = loop
        self.request = request
        self.path = path
        self.extraHeaders = extraHeaders
        self.status = status
        self.accessLog = accessLog
        self.clock = loop.leg.clock
        self.started = self.clock.seconds()
        self.bytesOut = 0
        # A body the request loop never reads cannot be told from a next
        # request: such a connection ends with this answer.
        self.keepAlive = request.keepAlive and not (request.chunked or request.bodyLength or loop.draining)
        self._fd: int | None = None
        self._remaining = 0
        self._later: Any = None
        self._sending = False
        self._done = False

    # Answering

    def start(self) -> None:
        request = self.request
        if self.status == 200 and request.method not in (b"GET", b"HEAD"):
            self._refuse(405, "only GET and HEAD for files", ((b"Allow", b"GET, HEAD"),))
            return
        try:
            info = self._open()
        except HTTPError as e:
            self._refuse(e.status, e.message)
            return
        size = info.st_size
        etag = b'"%x-%x"' % (int(info.st_mtime), size)
        if self.status != 200:
            self._begin(self.status, [(b"ETag", etag)], 0, size)
            return
        modified = int(info.st_mtime)
        validators = [(b"Last-Modified", _httpDate(modified)), (b"ETag", etag)]
        outcome = self._preconditions(modified, etag)
        if outcome == 412:
            self._refuse(412, "a precondition does not hold")
        elif outcome == 304:
            self._respond(304, validators, b"")
        else:
            self._ranged(size, modified, etag, validators)

    def _open(self) -> os.stat_result:
        """
        Open the file and say what C{fstat} says of it.

        @raise HTTPError: 404 if it is missing or not a regular file, 403 if
            it may not be read, 500 otherwise.
        """
        path = self.path
        try:
            # O_NONBLOCK: opening a FIFO for reading would wait for a writer.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            if e.errno in _MISSING:
                raise HTTPError(404, "no such file") from None
            if e.errno in _FORBIDDEN:
                raise HTTPError(403, "the file may not be read") from None
            log.error("cannot open {path}: {why}", path=str(path), why=e.strerror or str(e))
            raise HTTPError(500, "the file could not be opened") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise HTTPError(404, "not a regular file")
        self._fd = fd
        return info

    def _preconditions(self, modified: int, etag: bytes) -> int:
        """
        nginx's not-modified filter: 412, 304, or 200 to go on.  Unlike RFC
        9110 §13.2.2, C{If-Modified-Since} is not ignored when
        C{If-None-Match} is there: both must say "not modified".
        """
        fields = self.request.fields
        unmodifiedSince = self.request.first(b"if-unmodified-since")
        if unmodifiedSince is not None:
            # nginx: a date that does not parse is "-1", so it fails.
            when = _parseDate(unmodifiedSince)
            if when is None or when < modified:
                return 412
        if b"if-match" in fields and not _matches(b",".join(fields[b"if-match"]), etag, weak=False):
            return 412
        modifiedSince = self.request.first(b"if-modified-since")
        noneMatch = fields.get(b"if-none-match")
        if modifiedSince is None and noneMatch is None:
            return 200
        if modifiedSince is not None and _parseDate(modifiedSince) != modified:
            return 200
        if noneMatch is not None and not _matches(b",".join(noneMatch), etag, weak=True):
            return 200
        return 304

    def _ranged(self, size: int, modified: int, etag: bytes, validators: list[tuple[bytes, bytes]]) -> None:
        """Send the whole file, or the range asked for."""
        wanted = self.request.first(b"range")
        if wanted is None or len(wanted) < 7 or wanted[:6].lower() != b"bytes=" or not self._ifRange(modified, etag):
            self._begin(200, [*validators, (b"Accept-Ranges", b"bytes")], 0, size)
            return
        try:
            span = _byteRange(wanted, size)
        except _Unsatisfiable:
            self._refuse(416, "no byte of the file is in the range", ((b"Content-Range", b"bytes */%d" % size),))
            return
        if span is None:
            self._begin(200, [*validators, (b"Accept-Ranges", b"bytes")], 0, size)
            return
        start, end = span
        contentRange = (b"Content-Range", b"bytes %d-%d/%d" % (start, end - 1, size))
        self._begin(206, [*validators, contentRange], start, end - start)

    def _ifRange(self, modified: int, etag: bytes) -> bool:
        """Whether C{If-Range}, if sent, lets the range through: the same ETag, or exactly the same date."""
        condition = self.request.first(b"if-range")
        if condition is None:
            return True
        if len(condition) >= 2 and condition.endswith(b'"'):
            return condition == etag
        return _parseDate(condition) == modified

    def _begin(self, status: int, headers: list[tuple[bytes, bytes]], offset: int, length: int) -> None:
        """Write the head of a file's answer and start on its body."""
        self.status = status
        self._writeHead(status, [(b"Content-Type", contentType(self.path.name)), *headers], length)
        if self.request.method == b"HEAD" or not length:
            self._finish()
            return
        if offset:
            os.lseek(self._fd, offset, os.SEEK_SET)  # type: ignore[arg-type]
        self._remaining = length
        self._send()

    def _refuse(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer with a short plain-text error instead of the file."""
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        body = f"{status} {phrase}: {message}\n".encode()
        self._respond(status, [(b"Content-Type", b"text/plain; charset=utf-8"), *headers], body)

    def _respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A complete answer that is not the file: an error, a 304."""
        self.status = status
        self._writeHead(status, headers, len(body) if status != 304 else None, body)
        self._finish()

    def _writeHead(
        self, status: int, headers: list[tuple[bytes, bytes]], length: int | None, body: bytes = b""
    ) -> None:
        request = self.request
        lines = [b"HTTP/1.1 %d %b" % (status, HTTPStatus(status).phrase.encode("ascii"))]
        lines.append(b"Date: " + _httpDate(self.clock.seconds()))
        lines.extend(b"%b: %b" % pair for pair in headers)
        if length is not None:
            lines.append(b"Content-Length: %d" % length)
        if not self.keepAlive:
            lines.append(b"Connection: close")
        elif request.version == b"HTTP/1.0":
            lines.append(b"Connection: keep-alive")
        lines.extend(b"%b: %b" % pair for pair in self.extraHeaders)
        head = CRLF.join(lines) + HEAD_END
        self.loop.leg.write(head + body if body and request.method != b"HEAD" else head)

    # Streaming the body

    def _send(self) -> None:
        """
        Write pieces of the file while the client's buffer has room, up to
        L{TURN} bytes; then wait for L{clientWritable}, or for the next
        reactor turn.
        """
        if self._sending or self._done:
            return
        if self._later is not None:
            self._later.cancel()
            self._later = None
        self._sending = True
        leg = self.loop.leg
        budget = TURN
        try:
            while self._remaining and not self._done and not leg.writeBlocked:
                if budget <= 0:
                    self._later = self.clock.callLater(0, self._sendLater)
                    return
                try:
                    piece = os.read(self._fd, min(CHUNK, self._remaining))  # type: ignore[arg-type]
                except OSError as e:
                    log.error("reading {path} failed: {why}", path=str(self.path), why=e.strerror or str(e))
                    self._abort()
                    return
                if not piece:
                    log.error("{path} became shorter while it was sent; response cut short", path=str(self.path))
                    self._abort()
                    return
                self._remaining -= len(piece)
                self.bytesOut += len(piece)
                budget -= len(piece)
                leg.write(piece)
            if not self._remaining and not self._done:
                self._finish()
        finally:
            self._sending = False

    def _sendLater(self) -> None:
        self._later = None
        self._send()

    def clientWritable(self) -> None:
        """The client read what it was sent: go on with the file."""
        self._send()

    # Endings

    def _close(self) -> None:
        """Close the file, stop any scheduled piece, and log the answer; once."""
        self._done = True
        if self._later is not None:
            self._later.cancel()
            self._later = None
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self.metrics.requestEnded(self.status, self.started)
        if self.accessLog:
            duration = self.clock.seconds() - self.started
            logAnswer(self.loop, self.request, self.status, self.bytesOut, self.accessLog, self.loop.settings, duration)

    def _finish(self) -> None:
        self._close()
        self.loop.exchangeFinished(self.keepAlive)

    def _abort(self) -> None:
        """The body cannot be completed: the client must see the connection close."""
        self._close()
        self.loop.exchangeAborted()

    def bodyReceived(self, data: bytes) -> None:
        raise RuntimeError("a file answer reads no request body")

    def bodyComplete(self) -> None:
        raise RuntimeError("a file answer reads no request body")

    def fail(self, status: int, message: str) -> None:
        """The request cannot go on; the head is out already, so the answer is cut short."""
        if self._done:
            return
        log.info(
            "{client} {target}: {status} {message}; file answer cut short",
            client=self.loop.leg.clientAddress,
            target=self.request.target.decode("ascii", "backslashreplace"),
            status=status,
            message=message,
        )
        self._abort()

    def clientLost(self) -> None:
        """The client went away: close the file."""
        if not self._done:
            self._close()
