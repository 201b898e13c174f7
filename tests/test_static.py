"""
L{wsproxy.static}: files served as nginx's C{root}, C{alias}, C{index} and
C{try_files} serve them.

The answers are checked on real sockets, each test twice: on a plain
listener and on a TLS one (certificates made with trustme for the test).
The listener is a L{ListenerFactory} of the test's own whose
C{startExchange} does what a location will do: find the file with
L{StaticFiles} and answer with L{StaticAnswer}, or with the 404, 403 or 301
the lookup calls for.  Where nginx is the specification (validators,
conditional and range requests) a real nginx serving the same directory
is the oracle.

Large files are read by a client that hashes the body as it comes, so that
the test's own memory stays flat; what the proxy does with the file is
watched from outside, through C{/proc/self/fd} and C{/proc/self/fdinfo}:
which descriptors point at it and where their offset is.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
import pytest_twisted
from nginxprocess import NginxProcess, httpConfiguration
from support import LOOPBACK, RawClient, ServerCertificate, connectTo, sleep, stillAfter, until
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from wsproxy.config import ServerBlock
from wsproxy.flow import pendingBytes
from wsproxy.http import HTTPError, RequestHead, errorResponse
from wsproxy.interfaces import IExchange, IRequestLoop
from wsproxy.server import ConnectionSettings, ListenerFactory
from wsproxy.static import NeedsSlash, StaticAnswer, StaticFiles, contentType
from wsproxy.tls import ServerTLS

MiB = 1024 * 1024


# What the routing will do, reduced to one location


@implementer(IExchange)
class Refusal:
    """The routing's own answer when there is no file: the lookup's status (and a 301's Location)."""

    readyForBody = False

    def __init__(self, loop: IRequestLoop, request: RequestHead, status: int, location: bytes | None = None) -> None:
        self.loop, self.request, self.status, self.location = loop, request, status, location

    def start(self) -> None:
        headers = ((b"Location", self.location),) if self.location else ()
        head = self.request.method == b"HEAD"
        self.loop.leg.write(errorResponse(self.status, "no file", headers=headers, head=head))
        self.loop.exchangeFinished(False)

    def bodyReceived(self, data: bytes) -> None:
        raise RuntimeError("no body")

    def bodyComplete(self) -> None:
        raise RuntimeError("no body")

    def fail(self, status: int, message: str) -> None:
        pass

    def clientWritable(self) -> None:
        pass

    def clientLost(self) -> None:
        pass


class FileListener(ListenerFactory):
    """
    A listener with one location serving C{files}; a missing file is
    answered with C{errorPage} as a 404 if there is one (nginx's
    C{error_page 404 /404.html}).

    @ivar answers: every L{StaticAnswer} started, in order.
    """

    def __init__(
        self, settings: ConnectionSettings, files: StaticFiles, errorPage: Path | None, accessLog: bool
    ) -> None:
        super().__init__(settings, reactor)
        self.files = files
        self.errorPage = errorPage
        self.accessLog = accessLog
        self.answers: list[StaticAnswer] = []
        self.port = 0

    def startExchange(self, loop: Any, request: RequestHead) -> IExchange:
        target, _, query = request.path.partition(b"?")
        uri = unquote_to_bytes(target)
        try:
            path = self.files.find(uri)
        except NeedsSlash as e:
            return Refusal(loop, request, 301, e.location + (b"?" + query if query else b""))
        except HTTPError as e:
            return Refusal(loop, request, e.status)
        status = 200
        if path is None:
            if self.errorPage is None:
                return Refusal(loop, request, 404)
            path, status = self.errorPage, 404
        answer = StaticAnswer(loop, request, path, status=status, accessLog=self.accessLog)
        self.answers.append(answer)
        return answer


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def responses(received: bytes, methods: tuple[bytes, ...] = (b"GET",)) -> list[Response]:
    """The complete responses in C{received}, framed by Content-Length; C{methods}: the requests', in order."""
    found = []
    while received:
        end = received.find(b"\r\n\r\n")
        if end < 0:
            break
        lines = received[:end].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines[1:])}
        method = methods[len(found)] if len(found) < len(methods) else methods[-1]
        length = 0 if method == b"HEAD" or status == 304 else int(headers.get(b"content-length", b"0"))
        found.append(Response(status, headers, received[end + 4 : end + 4 + length]))
        received = received[end + 4 + length :]
    return found


def request(path: bytes = b"/a.txt", extra: bytes = b"", method: bytes = b"GET", close: bool = True) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"%b %b HTTP/1.1\r\nHost: h\r\n%b%b\r\n" % (method, path, extra, connection)


class FileClient(Protocol):
    """
    Reads one response and hashes its body as it comes, keeping nothing
    but the head: a client for files larger than a test should hold.
    """

    def __init__(self) -> None:
        self.headBytes = b""
        self.status = 0
        self.length: int | None = None
        self.received = 0
        self.digest = hashlib.sha256()
        self.complete: Deferred = Deferred()
        self.closed: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.length is None:
            self.headBytes += data
            end = self.headBytes.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.headBytes[:end], self.headBytes[end + 4 :]
            self.headBytes = head
            self.status = int(head.split(b" ")[1])
            (length,) = (
                line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
            )
            self.length = int(length)
        self.received += len(data)
        self.digest.update(data)
        if self.received >= self.length and not self.complete.called:
            self.complete.callback(self)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.complete.called:
            self.complete.callback(self)
        self.closed.callback(None)


# The site under test


class Site:
    """
    A directory of files (C{root}) and listeners of one kind (plain or
    TLS) serving it; clients connect to them, and whatever is left open is
    dropped at the end of the test.
    """

    def __init__(self, kind: str, cleanup: Any, directory: Path) -> None:
        self.kind = kind
        self.cleanup = cleanup
        self.root = directory / "www"
        self.root.mkdir()
        self.clients: list[Any] = []
        self.certificate = ServerCertificate(directory) if kind == "tls" else None
        self.block: dict[str, Any] = self.certificate.block if self.certificate is not None else {}

    def file(self, name: str, content: bytes = b"hello\n") -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def serve(
        self, files: StaticFiles | None = None, errorPage: Path | None = None, accessLog: bool = False
    ) -> FileListener:
        block = ServerBlock(listen="tcp:0", access_log=accessLog, **self.block)
        if files is None:
            files = StaticFiles(str(self.root), None, b"/")
        factory = FileListener(ConnectionSettings(block), files, errorPage, accessLog)
        wrapped = ServerTLS(block, reactor).wrapFactory(factory) if self.kind == "tls" else factory
        port = self.cleanup.port(reactor.listenTCP(0, wrapped, interface=LOOPBACK))
        factory.port = port.getHost().port
        return factory

    async def connect(self, listener: FileListener, protocol: Protocol | None = None) -> Any:
        client = await connectTo(listener.port, self.certificate, protocol)
        self.clients.append(client)
        return client

    async def get(self, listener: FileListener, data: bytes, methods: tuple[bytes, ...] = (b"GET",)) -> Response:
        """Send C{data} (one request, or several), and return the last response once the listener closes."""
        client = await self.connect(listener)
        client.transport.write(data)
        received = await client.waitClosed()
        assert received is not None, "the listener did not close the connection"
        return responses(received, methods)[-1]

    async def settled(self, listener: FileListener) -> None:
        assert await until(lambda: not listener.connections, 3), "the listener still holds connections"

    def dropClients(self) -> None:
        for client in self.clients:
            if client.transport.connected:
                client.transport.abortConnection()


@pytest.fixture(params=["plain", "tls"])
def site(request: Any, cleanup: Any, tmp_path: Path):
    state = Site(request.param, cleanup, tmp_path)
    yield state
    state.dropClients()


def openings(path: Path) -> list[int]:
    """The descriptors of this process open on C{path}."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                found.append(int(name))
        except OSError:
            pass
    return found


def offset(descriptor: int) -> int:
    """Where the file offset of C{descriptor} is, as the kernel says."""
    for line in Path(f"/proc/self/fdinfo/{descriptor}").read_text().splitlines():
        if line.startswith("pos:"):
            return int(line.split()[1])
    raise AssertionError("no pos in fdinfo")


def residentBytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def bigFile(path: Path, size: int) -> str:
    """A sparse file of C{size} bytes with random blocks here and there; its SHA-256."""
    with path.open("wb") as f:
        f.truncate(size)
        for position in range(12345, size - 4096, size // 7):
            f.seek(position)
            f.write(os.urandom(4096))
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(MiB):
            digest.update(piece)
    return digest.hexdigest()


def validators(path: Path) -> tuple[bytes, bytes]:
    """The ETag and Last-Modified nginx gives C{path}."""
    info = path.stat()
    return b'"%x-%x"' % (int(info.st_mtime), info.st_size), formatdate(int(info.st_mtime), usegmt=True).encode()


# Content types


def test_content_types_follow_nginx_mime_types():
    assert contentType("index.html") == b"text/html"
    assert contentType("app.js") == b"application/javascript"
    assert contentType("style.css") == b"text/css"
    assert contentType("data.json") == b"application/json"
    assert contentType("font.woff2") == b"font/woff2"
    assert contentType("module.wasm") == b"application/wasm"
    assert contentType("LOGO.PNG") == b"image/png", "extensions match whatever their case"
    assert contentType("archive.tar.gz") == b"application/octet-stream", "never a type with an encoding"
    assert contentType("README") == b"application/octet-stream"
    assert contentType("x.unknown-extension") == b"application/octet-stream"


@pytest_twisted.ensureDeferred
async def test_each_file_is_sent_with_the_type_of_its_extension(site):
    for name in ("a.html", "b.css", "c.js", "d.svg", "e.PNG", "f.bin", "g"):
        site.file(name, name.encode())
    listener = site.serve()
    seen = {}
    for name in ("a.html", "b.css", "c.js", "d.svg", "e.PNG", "f.bin", "g"):
        response = await site.get(listener, request(b"/" + name.encode()))
        assert response.body == name.encode()
        seen[name] = response.headers[b"content-type"]
    assert seen == {
        "a.html": b"text/html",
        "b.css": b"text/css",
        "c.js": b"application/javascript",
        "d.svg": b"image/svg+xml",
        "e.PNG": b"image/png",
        "f.bin": b"application/octet-stream",
        "g": b"application/octet-stream",
    }


# A whole file, and its validators


@pytest_twisted.ensureDeferred
async def test_a_file_comes_with_its_length_validators_and_accept_ranges(site):
    path = site.file("a.txt", b"hello, world\n")
    etag, lastModified = validators(path)
    response = await site.get(site.serve(), request())
    assert response.status == 200
    assert response.body == b"hello, world\n"
    assert response.headers[b"content-length"] == b"13"
    assert response.headers[b"etag"] == etag
    assert response.headers[b"last-modified"] == lastModified
    assert response.headers[b"accept-ranges"] == b"bytes"
    assert response.headers[b"connection"] == b"close"
    assert b"date" in response.headers


@pytest_twisted.ensureDeferred
async def test_an_empty_file_is_an_empty_body(site):
    site.file("empty.txt", b"")
    listener = site.serve()
    client = await site.connect(listener)
    client.transport.write(request(b"/empty.txt", close=False) + request(b"/empty.txt"))
    received = await client.waitClosed()
    assert [(r.status, r.headers[b"content-length"], r.body) for r in responses(received)] == [(200, b"0", b"")] * 2


@pytest_twisted.ensureDeferred
async def test_head_sends_the_head_alone_and_the_connection_goes_on(site):
    site.file("a.txt", b"0123456789")
    listener = site.serve()
    client = await site.connect(listener)
    client.transport.write(request(method=b"HEAD", close=False) + request())
    received = await client.waitClosed()
    head, get = responses(received, (b"HEAD", b"GET"))
    assert head.status == 200 and head.headers[b"content-length"] == b"10" and head.body == b""
    assert get.status == 200 and get.body == b"0123456789", "no body bytes after the HEAD's head"


@pytest_twisted.ensureDeferred
async def test_other_methods_are_405_with_allow(site):
    site.file("a.txt")
    listener = site.serve()
    response = await site.get(listener, request(method=b"DELETE"))
    assert response.status == 405 and response.headers[b"allow"] == b"GET, HEAD"
    # A body the loop never reads cannot be told from a next request: the connection ends.
    client = await site.connect(listener)
    client.transport.write(b"POST /a.txt HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nGET /")
    received = await client.waitClosed()
    assert received is not None, "the connection must close after a request body that was not read"
    (response,) = responses(received)
    assert response.status == 405 and response.headers[b"connection"] == b"close"


@pytest_twisted.ensureDeferred
async def test_two_requests_on_one_connection(site):
    site.file("a.txt", b"first")
    site.file("b.txt", b"second")
    listener = site.serve()
    client = await site.connect(listener)
    client.transport.write(request(b"/a.txt", close=False))
    received = await client.waitFor(lambda data: data.endswith(b"first"))
    (first,) = responses(received)
    assert first.status == 200 and b"connection" not in first.headers
    client.transport.write(request(b"/b.txt"))
    received = await client.waitClosed()
    assert [r.body for r in responses(received)] == [b"first", b"second"]
    await site.settled(listener)


@pytest_twisted.ensureDeferred
async def test_http_1_0_keep_alive_is_said_so(site):
    site.file("a.txt", b"x")
    listener = site.serve()
    client = await site.connect(listener)
    client.transport.write(b"GET /a.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    received = await client.waitFor(lambda data: data.endswith(b"\r\n\r\nx"))
    assert responses(received)[0].headers[b"connection"] == b"keep-alive"
    client.transport.write(b"GET /a.txt HTTP/1.0\r\n\r\n")
    received = await client.waitClosed()
    assert [r.body for r in responses(received)] == [b"x", b"x"]


# Conditional requests


@pytest_twisted.ensureDeferred
async def test_304_when_the_etag_matches(site):
    path = site.file("a.txt")
    etag, lastModified = validators(path)
    listener = site.serve()
    for value in (etag, b"W/" + etag, b'"other", ' + etag, b"*"):
        response = await site.get(listener, request(extra=b"If-None-Match: %b\r\n" % value))
        assert response.status == 304, value
        assert response.headers[b"etag"] == etag and response.headers[b"last-modified"] == lastModified
        assert b"content-length" not in response.headers and b"content-type" not in response.headers
    response = await site.get(listener, request(extra=b'If-None-Match: "other"\r\n'))
    assert response.status == 200 and response.body == b"hello\n"


@pytest_twisted.ensureDeferred
async def test_304_when_the_date_is_exactly_the_files(site):
    path = site.file("a.txt")
    _, lastModified = validators(path)
    listener = site.serve()
    response = await site.get(listener, request(extra=b"If-Modified-Since: %b\r\n" % lastModified))
    assert response.status == 304
    later = formatdate(int(path.stat().st_mtime) + 3600, usegmt=True).encode()
    response = await site.get(listener, request(extra=b"If-Modified-Since: %b\r\n" % later))
    assert response.status == 200, "nginx's if_modified_since exact: only the file's own date is a match"


@pytest_twisted.ensureDeferred
async def test_with_both_validators_both_must_match(site):
    path = site.file("a.txt")
    etag, lastModified = validators(path)
    listener = site.serve()
    old = b"Mon, 01 Jan 2001 00:00:00 GMT"
    both = b"If-None-Match: %b\r\nIf-Modified-Since: %b\r\n"
    assert (await site.get(listener, request(extra=both % (etag, lastModified)))).status == 304
    assert (await site.get(listener, request(extra=both % (etag, old)))).status == 200


@pytest_twisted.ensureDeferred
async def test_412_when_a_precondition_fails(site):
    path = site.file("a.txt")
    etag, lastModified = validators(path)
    listener = site.serve()
    assert (await site.get(listener, request(extra=b'If-Match: "other"\r\n'))).status == 412
    assert (await site.get(listener, request(extra=b"If-Match: %b\r\n" % etag))).status == 200
    old = b"Mon, 01 Jan 2001 00:00:00 GMT"
    assert (await site.get(listener, request(extra=b"If-Unmodified-Since: %b\r\n" % old))).status == 412
    assert (await site.get(listener, request(extra=b"If-Unmodified-Since: %b\r\n" % lastModified))).status == 200


# Ranges


@pytest_twisted.ensureDeferred
async def test_206_for_each_form_of_range(site):
    site.file("a.txt", b"0123456789")
    listener = site.serve()
    cases = {
        b"bytes=2-4": (b"234", b"bytes 2-4/10"),
        b"bytes=7-": (b"789", b"bytes 7-9/10"),
        b"bytes=0-": (b"0123456789", b"bytes 0-9/10"),
        b"bytes=-3": (b"789", b"bytes 7-9/10"),
        b"bytes=8-100": (b"89", b"bytes 8-9/10"),
        b"bytes=-100": (b"0123456789", b"bytes 0-9/10"),
        b"bytes= 1 - 1 ": (b"1", b"bytes 1-1/10"),
        b"bytes=0-0,20-30": (b"0", b"bytes 0-0/10"),
    }
    for value, (body, contentRange) in cases.items():
        response = await site.get(listener, request(extra=b"Range: %b\r\n" % value))
        assert response.status == 206, value
        assert response.body == body and response.headers[b"content-range"] == contentRange, value
        assert response.headers[b"content-length"] == b"%d" % len(body)
        assert b"accept-ranges" not in response.headers


@pytest_twisted.ensureDeferred
async def test_a_head_with_a_range_is_206_without_a_body(site):
    site.file("a.txt", b"0123456789")
    listener = site.serve()
    client = await site.connect(listener)
    client.transport.write(request(method=b"HEAD", extra=b"Range: bytes=-4\r\n", close=False) + request())
    head, get = responses(await client.waitClosed(), (b"HEAD", b"GET"))
    assert head.status == 206 and head.headers[b"content-range"] == b"bytes 6-9/10" and head.body == b""
    assert get.body == b"0123456789"


@pytest_twisted.ensureDeferred
async def test_416_when_no_range_is_satisfiable(site):
    site.file("a.txt", b"0123456789")
    listener = site.serve()
    for value in (b"bytes=10-", b"bytes=50-60", b"bytes=-0", b"bytes=abc", b"bytes=5-3", b"bytes=0-1,"):
        response = await site.get(listener, request(extra=b"Range: %b\r\n" % value))
        assert response.status == 416, value
        assert response.headers[b"content-range"] == b"bytes */10"


@pytest_twisted.ensureDeferred
async def test_several_ranges_are_answered_with_the_whole_file(site):
    site.file("a.txt", b"0123456789")
    listener = site.serve()
    for value in (b"bytes=0-1,4-5", b"bytes=0-9,0-9", b"units=1-2"):
        response = await site.get(listener, request(extra=b"Range: %b\r\n" % value))
        assert response.status == 200 and response.body == b"0123456789", value
        assert response.headers[b"accept-ranges"] == b"bytes"


@pytest_twisted.ensureDeferred
async def test_if_range_lets_the_range_through_only_for_the_same_file(site):
    path = site.file("a.txt", b"0123456789")
    etag, lastModified = validators(path)
    listener = site.serve()
    ranged = b"Range: bytes=0-1\r\nIf-Range: %b\r\n"
    assert (await site.get(listener, request(extra=ranged % etag))).status == 206
    assert (await site.get(listener, request(extra=ranged % lastModified))).status == 206
    assert (await site.get(listener, request(extra=ranged % b'"other"'))).status == 200
    assert (await site.get(listener, request(extra=ranged % b"Mon, 01 Jan 2001 00:00:00 GMT"))).status == 200


@pytest_twisted.ensureDeferred
async def test_an_error_page_keeps_its_status_and_ignores_ranges_and_validators(site):
    page = site.file("404.html", b"<p>gone</p>")
    etag, _ = validators(page)
    listener = site.serve(errorPage=page)
    extra = b"Range: bytes=0-1\r\nIf-None-Match: %b\r\n" % etag
    for method in (b"GET", b"POST"):
        response = await site.get(listener, request(b"/missing", extra=extra, method=method))
        assert response.status == 404 and response.body == b"<p>gone</p>", method
        assert response.headers[b"content-type"] == b"text/html"
        assert response.headers[b"etag"] == etag
        assert b"last-modified" not in response.headers and b"accept-ranges" not in response.headers


# Directories


@pytest_twisted.ensureDeferred
async def test_a_directory_is_served_by_its_index_file(site):
    site.file("docs/index.html", b"<h1>docs</h1>")
    site.file("docs/main.htm", b"<h1>main</h1>")
    (site.root / "bare").mkdir()
    listener = site.serve(StaticFiles(str(site.root), None, b"/", index=("missing.html", "main.htm", "index.html")))
    response = await site.get(listener, request(b"/docs/"))
    assert (response.status, response.body) == (200, b"<h1>main</h1>"), "the first index file there"
    assert response.headers[b"content-type"] == b"text/html"
    assert (await site.get(listener, request(b"/bare/"))).status == 403
    response = await site.get(listener, request(b"/docs?x=1"))
    assert response.status == 301 and response.headers[b"location"] == b"/docs/?x=1"
    assert (await site.get(listener, request(b"/nowhere/"))).status == 404


def test_find_names_what_nginx_would_answer(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "index.html").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.txt").write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo")
    files = StaticFiles(str(tmp_path), None, b"/")
    assert files.find(b"/a.txt") == tmp_path / "a.txt"
    assert files.find(b"/dir/") == tmp_path / "dir" / "index.html"
    with pytest.raises(NeedsSlash) as needed:
        files.find(b"/dir")
    assert needed.value.location == b"/dir/"
    with pytest.raises(HTTPError) as refused:
        files.find(b"/empty/")
    assert refused.value.status == 403
    assert files.find(b"/a.txt/") is None, "a file is no directory"
    assert files.find(b"/missing") is None
    assert files.find(b"/fifo") is None, "only regular files are served"
    assert files.find(b"/a.txt\0.html") is None


def test_exists_is_try_files(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "a.txt").write_bytes(b"x")
    files = StaticFiles(str(tmp_path), None, b"/")
    assert files.exists(b"/a.txt") and not files.exists(b"/a.txt", directory=True)
    assert files.exists(b"/dir", directory=True) and files.exists(b"/dir/", directory=True)
    assert not files.exists(b"/dir"), "$uri is a file, not a directory"
    assert not files.exists(b"/missing") and not files.exists(b"/missing", directory=True)


def test_file_path_is_root_plus_uri_or_alias_instead_of_the_prefix(tmp_path):
    assert StaticFiles("/srv/www", None, b"/static/").filePath(b"/static/a.css") == Path("/srv/www/static/a.css")
    assert StaticFiles("/srv/www/", None, b"/").filePath(b"/a.css") == Path("/srv/www/a.css")
    assert StaticFiles(None, "/data/img/", b"/images/").filePath(b"/images/x/a.png") == Path("/data/img/x/a.png")
    assert StaticFiles(None, "/data/img", b"/images").filePath(b"/images/a.png") == Path("/data/img/a.png")
    name = b"/caf\xe9 \xff.txt"
    assert os.fsencode(StaticFiles("/srv", None, b"/").filePath(name)) == b"/srv" + name, "any byte but NUL"
    with pytest.raises(ValueError):
        StaticFiles("/srv", "/data", b"/")


# Leaving the served directory


def linkedSite(tmp_path: Path) -> tuple[Path, Path]:
    """A root with a link out (to a secret) and a link inside; the secret outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    (root / "a.txt").write_bytes(b"public")
    (root / "out.txt").symlink_to(outside / "secret.txt")
    (root / "outdir").symlink_to(outside)
    (root / "in.txt").symlink_to("a.txt")
    return root, outside


@pytest_twisted.ensureDeferred
async def test_a_symbolic_link_out_of_the_root_is_refused(site, tmp_path):
    root, _ = linkedSite(tmp_path)
    listener = site.serve(StaticFiles(str(root), None, b"/"))
    for uri in (b"/out.txt", b"/outdir/secret.txt"):
        response = await site.get(listener, request(uri))
        assert response.status == 403 and b"secret" not in response.body, uri
    response = await site.get(listener, request(b"/in.txt"))
    assert (response.status, response.body) == (200, b"public"), "a link that stays inside is followed"


@pytest_twisted.ensureDeferred
async def test_links_are_followed_anywhere_when_allowed(site, tmp_path):
    root, _ = linkedSite(tmp_path)
    listener = site.serve(StaticFiles(str(root), None, b"/", disableSymlinks=False))
    for uri in (b"/out.txt", b"/outdir/secret.txt"):
        response = await site.get(listener, request(uri))
        assert (response.status, response.body) == (200, b"secret"), uri


def test_containment_rules(tmp_path):
    root, outside = linkedSite(tmp_path)
    files = StaticFiles(str(root), None, b"/")
    for uri in (b"/out.txt", b"/outdir/secret.txt", b"/../outside/secret.txt"):
        with pytest.raises(HTTPError) as refused:
            files.find(uri)
        assert refused.value.status == 403, uri
        assert not files.exists(uri)
    assert not files.exists(b"/outdir", directory=True)
    assert files.find(b"/in.txt") == root / "a.txt", "the resolved path: what is opened is what was checked"
    # An alias under a location without its trailing slash: nginx would read /outside/secret.txt.
    alias = StaticFiles(None, str(root), b"/files")
    assert alias.find(b"/files/a.txt") == root / "a.txt"
    with pytest.raises(HTTPError):
        alias.find(b"/files../outside/secret.txt")
    # The root itself may be a link.
    (tmp_path / "current").symlink_to(root)
    assert StaticFiles(str(tmp_path / "current"), None, b"/").find(b"/a.txt") == root / "a.txt"


# Streaming: flow control, memory, endings


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_stops_the_reading_of_the_file(site):
    size = 48 * MiB
    path = site.root / "big.bin"
    digest = bigFile(path, size)
    listener = site.serve()
    client = await site.connect(listener, FileClient())
    client.transport.write(request(b"/big.bin"))
    assert await until(lambda: client.received > 0)
    client.transport.pauseProducing()
    (answer,) = listener.answers
    leg = answer.loop.leg
    (descriptor,) = openings(path)

    assert await until(lambda: leg.writeBlocked), "the proxy never found the client's buffer full"
    seen = [offset(descriptor)]

    async def steady() -> bool:
        await sleep(0.2)
        seen.append(offset(descriptor))
        return seen[-1] == seen[-2]

    for _ in range(25):
        if await steady():
            break
    assert seen[-1] == seen[-2], f"the file is still being read: {seen}"
    assert await stillAfter(0.5, lambda: offset(descriptor) == seen[-1] and leg.writeBlocked)
    assert seen[-1] < size // 2, f"read {seen[-1]} bytes ahead of a client that reads nothing"
    assert pendingBytes(leg.transport) <= 4 * 65536, "the proxy's own buffer is bounded"

    client.transport.resumeProducing()
    await client.complete
    assert client.status == 200 and client.received == size
    assert client.digest.hexdigest() == digest
    assert await until(lambda: not openings(path)), "the file is closed once sent"


@pytest_twisted.ensureDeferred
async def test_a_large_file_streams_whole_in_bounded_memory(site):
    size = 64 * MiB
    path = site.root / "large.bin"
    digest = bigFile(path, size)
    listener = site.serve()
    client = await site.connect(listener, FileClient())
    before = residentBytes()
    peak = [before]
    sampling = LoopingCall(lambda: peak.append(residentBytes()))
    sampling.clock = reactor
    sampling.start(0.01)
    try:
        client.transport.write(request(b"/large.bin"))
        await client.complete
    finally:
        sampling.stop()
    assert client.status == 200 and client.received == size
    assert client.digest.hexdigest() == digest
    growth = max(peak) - before
    assert growth < 32 * MiB, f"resident memory grew by {growth // MiB} MiB for a {size // MiB} MiB file"
    assert await until(lambda: not openings(path))
    await site.settled(listener)


@pytest_twisted.ensureDeferred
async def test_a_client_gone_mid_file_closes_the_file(site):
    path = site.root / "big.bin"
    bigFile(path, 32 * MiB)
    listener = site.serve()
    client = await site.connect(listener, FileClient())
    client.transport.write(request(b"/big.bin"))
    assert await until(lambda: client.received > MiB)
    assert len(openings(path)) == 1
    client.transport.abortConnection()
    assert await until(lambda: not openings(path)), "the file is still open after the client left"
    await site.settled(listener)


@pytest_twisted.ensureDeferred
async def test_one_access_line_per_answer(site):
    site.file("a.txt", b"0123456789")
    listener = site.serve(accessLog=True)
    events: list[dict[str, Any]] = []
    observer = lambda event: events.append(event) if event.get("log_namespace") == "wsproxy.access" else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        await site.get(listener, request(extra=b"Range: bytes=0-3\r\n"))
    finally:
        globalLogPublisher.removeObserver(observer)
    (event,) = events
    assert (event["method"], event["target"], event["status"], event["bytesOut"]) == ("GET", "/a.txt", 206, 4)
    assert event["upstream"] == "-"


# nginx as the oracle


NGINX_HTTP = """
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log off;
    server {{
        listen unix:{prefix}/nginx.sock;
        root {root};
        max_ranges 1;
    }}
"""

#: What must agree between nginx and wsproxy for each answer.
COMPARED = (b"content-type", b"content-length", b"content-range", b"etag", b"last-modified", b"accept-ranges")


@pytest_twisted.ensureDeferred
async def test_nginx_answers_the_same(cleanup, tmp_path):
    site = Site("plain", cleanup, tmp_path)
    path = site.file("page.html", b"<p>" + b"x" * 1000 + b"</p>")
    site.file("a.txt", b"")
    (site.root / "dir").mkdir()
    etag, lastModified = validators(path)
    prefix = tmp_path / "nginx"
    nginx = NginxProcess(prefix, httpConfiguration(prefix, NGINX_HTTP.format(prefix=prefix, root=site.root)))
    try:
        await nginx.started()
        listener = site.serve()
        old = b"Mon, 01 Jan 2001 00:00:00 GMT"
        cases = [
            b"",
            b"Range: bytes=0-9\r\n",
            b"Range: bytes=1000-\r\n",
            b"Range: bytes=-5\r\n",
            b"Range: bytes=-5000\r\n",
            b"Range: bytes=5-2000\r\n",
            b"Range: bytes=2000-\r\n",
            b"Range: bytes=-0\r\n",
            b"Range: bytes=x\r\n",
            b"Range: bytes=0-1,3-4\r\n",
            b"Range: bytes=0-1,3000-4000\r\n",
            b"Range: bytes=0-\r\n",
            b"Range: Bytes=1-2\r\n",
            b"Range: bytes=\r\n",
            b"Range: bytes=0-1\r\nIf-Range: %b\r\n" % etag,
            b"Range: bytes=0-1\r\nIf-Range: %b\r\n" % lastModified,
            b'Range: bytes=0-1\r\nIf-Range: "nope"\r\n',
            b"If-None-Match: %b\r\n" % etag,
            b"If-None-Match: W/%b\r\n" % etag,
            b'If-None-Match: "a", %b\r\n' % etag,
            b"If-None-Match: *\r\n",
            b'If-None-Match: "nope"\r\n',
            b"If-Modified-Since: %b\r\n" % lastModified,
            b"If-Modified-Since: %b\r\n" % old,
            b"If-Modified-Since: garbage\r\n",
            b"If-None-Match: %b\r\nIf-Modified-Since: %b\r\n" % (etag, old),
            b"If-Match: %b\r\n" % etag,
            b"If-Match: W/%b\r\n" % etag,
            b'If-Match: "nope"\r\n',
            b"If-Unmodified-Since: %b\r\n" % old,
            b"If-Unmodified-Since: %b\r\n" % lastModified,
            b"If-Unmodified-Since: garbage\r\n",
            b"If-None-Match: %b\r\nRange: bytes=0-1\r\n" % etag,
        ]
        targets = [(b"GET", b"/page.html", extra) for extra in cases]
        targets += [
            (b"HEAD", b"/page.html", b"Range: bytes=3-4\r\n"),
            (b"GET", b"/a.txt", b""),
            (b"GET", b"/a.txt", b"Range: bytes=0-\r\n"),
            (b"GET", b"/a.txt", b"Range: bytes=-1\r\n"),
            (b"GET", b"/dir/", b""),
            (b"GET", b"/missing.txt", b""),
        ]
        for method, target, extra in targets:
            data = request(target, extra=extra, method=method)
            viaNginx = await connectProtocol(UNIXClientEndpoint(reactor, str(nginx.socket)), RawClient())
            viaNginx.transport.write(data)
            (expected,) = responses(await viaNginx.waitClosed(), (method,))
            actual = await site.get(listener, data, (method,))
            assert actual.status == expected.status, (method, target, extra)
            if expected.status in (200, 206, 304):
                assert {k: actual.headers.get(k) for k in COMPARED} == {k: expected.headers.get(k) for k in COMPARED}, (
                    method,
                    target,
                    extra,
                )
                assert actual.body == expected.body
            elif expected.status == 416:
                assert actual.headers[b"content-range"] == expected.headers[b"content-range"]
    finally:
        site.dropClients()
        nginx.stop()
