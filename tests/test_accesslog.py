"""
Access-log formats, files and reopening: each format against a golden
line, the C{json} preset's types, per-server and per-location files on
plain and TLS listeners, tunnel lines with who closed them and the bytes,
C{SIGUSR1} after logrotate's rename (in a C{twistd} process, with and
without workers), and the configuration's one-line errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from support import (
    ENVIRONMENT,
    LOOPBACK,
    TWISTD,
    RawClient,
    listeningPorts,
    listenScripted,
    ok,
    switching,
    until,
    upgradeRequest,
)
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS

from wsproxy import accesslog, parseConfig
from wsproxy.accesslog import LogEntry, LogFile, compileLogFormat, formatFor, logTunnel
from wsproxy.config import AccessLog, ConfigError
from wsproxy.http import parseRequestHead
from wsproxy.listeners import ProxyService

#: 2023-11-14T22:13:20.123Z.
NOW = 1700000000.123
REQUEST_ID = bytes(range(16)).hex()


@pytest.fixture
def fixedClock(monkeypatch):
    """Lines made at L{NOW}, in a zone 5:30 east of UTC, with the request ID L{REQUEST_ID}."""
    monkeypatch.setattr(accesslog, "wallClock", lambda: NOW)
    monkeypatch.setattr(accesslog, "_times", accesslog._Times())
    monkeypatch.setattr(os, "urandom", lambda size: bytes(range(size)))
    monkeypatch.setenv("TZ", "WSP-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def head(*fields: bytes, target: bytes = b"/a?b=1") -> Any:
    return parseRequestHead(b"GET %b HTTP/1.1\r\nHost: Example.COM:8080\r\n%b\r\n" % (target, b"".join(fields)))


def entry(**overrides: Any) -> LogEntry:
    values: dict[str, Any] = {
        "client": "192.0.2.7",
        "method": "GET",
        "target": "/a?b=1",
        "status": 200,
        "upstream": "10.0.0.2:8080",
        "bytesIn": 0,
        "bytesOut": 5,
        "duration": 0.0421,
        "request": head(b"User-Agent: curl/8.4\r\n", b"Referer: https://r.example/\r\n"),
        "upstreamStatus": 200,
        "headBytes": 60,
    }
    values.update(overrides)
    return LogEntry(**values)


# Formats against golden lines


def test_combined_is_nginxs_combined(fixedClock):
    line = formatFor(AccessLog(path=None)).render(entry())
    assert line == (
        b'192.0.2.7 - - [15/Nov/2023:03:43:20 +0530] "GET /a?b=1 HTTP/1.1" 200 5 "https://r.example/" "curl/8.4"'
    )


def test_a_missing_header_is_a_dash_and_values_are_escaped_as_nginx_does(fixedClock):
    request = head(b'User-Agent: a"b\\c\xc3\xa9\r\n')
    line = formatFor(AccessLog(path=None)).render(entry(request=request))
    assert line.endswith(b'"-" "a\\x22b\\x5Cc\\xC3\\xA9"')


def test_a_custom_format_with_the_log_and_request_variables(fixedClock):
    text = (
        "$remote_addr [$time_iso8601] $msec $request_method $request_uri $uri $args $host $scheme "
        '"$request" $status $body_bytes_sent $bytes_sent $request_time $upstream_addr $upstream_status '
        "$upstream_response_time $request_id $http_x_missing $server_protocol $remote_user"
    )
    line = compileLogFormat(text).render(entry())
    assert line == (
        b"192.0.2.7 [2023-11-15T03:43:20+05:30] 1700000000.123 GET /a?b=1 /a b=1 example.com http "
        b'"GET /a?b=1 HTTP/1.1" 200 5 65 0.042 10.0.0.2:8080 200 0.042 ' + REQUEST_ID.encode() + b" - HTTP/1.1 -"
    )


def test_an_answer_of_the_proxys_own_has_no_upstream_values(fixedClock):
    text = "$status $upstream_addr $upstream_status $upstream_response_time"
    assert compileLogFormat(text).render(entry(upstream="-", upstreamStatus=None, status=404)) == b"404 - - -"


def test_escape_json_writes_json_strings_and_nothing_for_no_value(fixedClock):
    text = '{"ua":"$http_user_agent","ref":"$http_x_none","status":$status,"t":$request_time}'
    request = head(b'User-Agent: a"b\\c\r\n')
    line = compileLogFormat(text, "json").render(entry(request=request))
    assert json.loads(line) == {"ua": 'a"b\\c', "ref": "", "status": 200, "t": 0.042}


def test_the_json_preset_is_one_typed_object(fixedClock):
    line = formatFor(AccessLog(path=None, format="json")).render(entry())
    assert b"\n" not in line
    assert json.loads(line) == {
        "time_iso8601": "2023-11-15T03:43:20+05:30",
        "remote_addr": "192.0.2.7",
        "request_id": REQUEST_ID,
        "connection": None,
        "request_method": "GET",
        "request_uri": "/a?b=1",
        "server_protocol": "HTTP/1.1",
        "host": "example.com",
        "status": 200,
        "body_bytes_sent": 5,
        "bytes_sent": 65,
        "bytes_received": 0,
        "request_time": 0.042,
        "upstream_addr": "10.0.0.2:8080",
        "upstream_status": 200,
        "upstream_response_time": 0.042,
        "http_referer": "https://r.example/",
        "http_user_agent": "curl/8.4",
        "tunnel_closed_by": None,
        "tunnel_close_reason": None,
        "websocket_close_code": None,
    }


def test_a_tunnel_line_has_who_closed_the_close_code_and_the_bytes(fixedClock, tmp_path):
    path = tmp_path / "tunnels.log"
    spec = AccessLog(
        path=str(path),
        format="main",
        text="$status $tunnel_closed_by $tunnel_close_reason "
        '$websocket_close_code $bytes_received $body_bytes_sent $request_time "$request"',
    )
    fields = {"client": "192.0.2.7", "method": "GET", "target": "/ws", "upstream": "10.0.0.2:8080"}
    logTunnel(
        **fields,
        bytesIn=40,
        bytesOut=1200,
        duration=12.5,
        side="proxy",
        destination=spec,
        request=head(target=b"/ws"),
        closeReason="drain",
        closeCode=1001,
    )
    logTunnel(**fields, bytesIn=3, bytesOut=0, duration=0.25, side="client", destination=spec)
    assert path.read_bytes() == (
        b'101 proxy drain 1001 40 1200 12.500 "GET /ws HTTP/1.1"\n101 client - - 3 0 0.250 "GET /ws"\n'
    )


# Files


def test_a_file_is_opened_once_per_path_and_shared(tmp_path):
    logs = accesslog.AccessLogs()
    path = str(tmp_path / "shared.log")
    logs.writerFor(AccessLog(path=path))(entry())
    logs.writerFor(AccessLog(path=path, format="json"))(entry())
    assert list(logs.files) == [path]
    first, second = Path(path).read_bytes().splitlines()
    assert first.startswith(b"192.0.2.7 - - [") and json.loads(second)["status"] == 200


def test_reopen_after_a_rename_writes_to_a_new_file(tmp_path):
    path = tmp_path / "access.log"
    logFile = LogFile(str(path))
    logFile.write(b"one\n")
    path.rename(tmp_path / "access.log.1")
    logFile.write(b"two\n")
    assert not path.exists(), "until reopened, lines go to the renamed file"
    assert logFile.reopen()
    logFile.write(b"three\n")
    logFile.close()
    assert (tmp_path / "access.log.1").read_bytes() == b"one\ntwo\n"
    assert path.read_bytes() == b"three\n"


def test_a_reopen_that_fails_keeps_the_old_file(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    logFile = LogFile(str(directory / "access.log"))
    (directory / "access.log").rename(tmp_path / "moved.log")
    directory.rmdir()
    assert not logFile.reopen()
    logFile.write(b"still here\n")
    logFile.close()
    assert (tmp_path / "moved.log").read_bytes() == b"still here\n"


# Configuration


def config(**server: Any) -> dict[str, Any]:
    return {
        "upstream": {"app": {"servers": ["127.0.0.1:9"]}},
        "server": [{"listen": "tcp:0", "proxy_pass": "http://app", **server}],
    }


def test_access_log_as_a_boolean_a_path_or_a_table(tmp_path):
    path = str(tmp_path / "a.log")
    assert parseConfig(config(access_log=False)).servers[0].access_log is False
    assert parseConfig(config()).servers[0].access_log is True
    assert parseConfig(config(access_log=path)).servers[0].access_log == AccessLog(path=path)
    document = config(
        access_log={"path": path, "format": "main"}, location=[{"match": "/ws/", "access_log": {"format": "json"}}]
    )
    document["log_format"] = {"main": {"format": "$remote_addr $status", "escape": "json"}}
    parsed = parseConfig(document)
    server = parsed.servers[0]
    assert server.access_log == AccessLog(path=path, format="main", text="$remote_addr $status", escape="json")
    assert server.locations[0].block.access_log == AccessLog(path=None, format="json")
    assert parsed.log_format == {"main": ("$remote_addr $status", "json")}


@pytest.mark.parametrize(
    "change, key, problem",
    [
        ({"access_log": {"path": "/x.log", "format": "nope"}}, "server[0].access_log", "unknown format 'nope'"),
        ({"log_format": {"main": "$remote_adr"}}, "log_format.main", "unknown variable $remote_adr"),
        ({"log_format": {"json": "$status"}}, "log_format.json", "is a preset"),
        ({"log_format": {"main": {"format": "$status", "escape": "xml"}}}, "log_format.main.escape", "expected one of"),
        ({"access_log": 3}, "server[0].access_log", "expected a boolean or a string or a table"),
        ({"access_log": {"file": "/x.log"}}, "server[0].access_log.file", "unknown key"),
        ({"access_log": "/no/such/dir/a.log"}, "server[0].access_log.path", "no such directory"),
    ],
)
def test_configuration_errors_are_one_line(change, key, problem):
    document = config()
    for name, value in change.items():
        (document if name == "log_format" else document["server"][0])[name] = value
    with pytest.raises(ConfigError) as raised:
        parseConfig(document, source="wsproxy.toml")
    assert raised.value.key == key
    assert problem in raised.value.problem
    assert "\n" not in str(raised.value)


def test_a_file_that_cannot_be_opened_stops_the_start(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    parsed = parseConfig(config(access_log=str(directory)), source="wsproxy.toml")
    with pytest.raises(ConfigError, match=r"^wsproxy.toml: server\[0\].access_log: cannot open .*: Is a directory$"):
        ProxyService(parsed, reactor)


# Live listeners


class Site:
    """A proxy in front of a scripted upstream, reached over plain TCP or TLS."""

    def __init__(self, cleanup: Any, kind: str, tmp_path: Path) -> None:
        self.cleanup = cleanup
        self.kind = kind
        self.tmp = tmp_path
        self.ca = trustme.CA()
        upstream, self.upstream = listenScripted(
            lambda request, c: switching() if b"upgrade: websocket" in request.lower() else ok(b"hello"),
            closeAfter=False,
        )
        cleanup.port(upstream)
        self.upstreamPort = upstream.getHost().port

    def server(self, **block: Any) -> dict[str, Any]:
        server = {"listen": f"tcp:0:interface={LOOPBACK}", "proxy_pass": "http://app", **block}
        server = {key: value for key, value in server.items() if value is not None}
        if self.kind == "tls":
            leaf = self.ca.issue_cert("localhost")
            certificate, key = self.tmp / "cert.pem", self.tmp / "key.pem"
            certificate.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            key.write_bytes(leaf.private_key_pem.bytes())
            server.update(ssl_certificate=str(certificate), ssl_certificate_key=str(key))
        return server

    async def start(self, *servers: dict[str, Any], **topLevel: Any) -> ProxyService:
        document = {
            "upstream": {"app": {"servers": [f"{LOOPBACK}:{self.upstreamPort}"]}},
            "server": list(servers),
            "shutdown_timeout": 1,
            **topLevel,
        }
        service = self.cleanup.service(ProxyService(parseConfig(document, source="(test)"), reactor))
        service.startService()
        self.ports = [(await listener.listeningPort()).getHost().port for listener in service.listeners]
        return service

    async def connect(self, index: int = 0) -> RawClient:
        endpoint: Any = TCP4ClientEndpoint(reactor, LOOPBACK, self.ports[index])
        if self.kind == "tls":
            trust = Certificate.loadPEM(self.ca.cert_pem.bytes())
            endpoint = wrapClientTLS(optionsForClientTLS("localhost", trustRoot=trust), endpoint)
        client = await connectProtocol(endpoint, RawClient())
        self.cleanup.transport(_Aborter(client))
        return client

    async def get(self, path: str, index: int = 0) -> bytes:
        client = await self.connect(index)
        client.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: t/1\r\nConnection: close\r\n\r\n".encode()
        )
        received = await client.waitClosed()
        assert received is not None and received.startswith(b"HTTP/1.1 200 "), received
        return received


class _Aborter:
    """Lets the cleanup fixture abort a client that is still open (a closed TLS transport cannot be aborted)."""

    def __init__(self, client: RawClient) -> None:
        self.client = client

    def abortConnection(self) -> None:
        if not self.client.closed.called:
            self.client.transport.abortConnection()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


@pytest.fixture(params=["plain", "tls"])
def site(request, cleanup, tmp_path):
    return Site(cleanup, request.param, tmp_path)


@pytest_twisted.ensureDeferred
async def test_each_server_and_location_writes_its_own_file(site, fixedClock, tmp_path):
    first, second, api = tmp_path / "first.log", tmp_path / "second.log", tmp_path / "api.log"
    await site.start(
        site.server(
            access_log=str(first),
            location=[
                {"match": "/api/", "access_log": {"path": str(api), "format": "json"}},
                {"match": "/quiet/", "access_log": False},
                {"match": "/"},
            ],
        ),
        site.server(access_log={"path": str(second), "format": "main"}),
        log_format={"main": "$scheme $request_uri $status $upstream_status $bytes_sent"},
    )
    await site.get("/a")
    await site.get("/quiet/x")
    await site.get("/api/v1")
    await site.get("/b", index=1)
    assert lines(first) == [b'127.0.0.1 - - [15/Nov/2023:03:43:20 +0530] "GET /a HTTP/1.1" 200 5 "-" "t/1"']
    (record,) = [json.loads(line) for line in lines(api)]
    assert (record["request_uri"], record["status"], record["upstream_status"]) == ("/api/v1", 200, 200)
    assert record["upstream_addr"] == f"{LOOPBACK}:{site.upstreamPort}"
    assert isinstance(record["request_time"], float) and isinstance(record["connection"], int)
    assert record["bytes_sent"] > record["body_bytes_sent"] == 5
    scheme = b"https" if site.kind == "tls" else b"http"
    (line,) = lines(second)
    words = line.split()
    assert words[:4] == [scheme, b"/b", b"200", b"200"] and int(words[4]) > 5


@pytest_twisted.ensureDeferred
async def test_the_proxys_own_answers_go_to_the_servers_file(site, tmp_path):
    path = tmp_path / "own.log"
    await site.start(
        site.server(
            proxy_pass=None,
            access_log={"path": str(path), "format": "main"},
            location=[{"match": "/only/", "proxy_pass": "http://app"}, {"match": "= /gone", "return": "410"}],
        ),
        log_format={"main": "$status $request_uri $upstream_addr"},
    )
    for target in ("/other", "/gone", "/only/x"):
        client = await site.connect()
        client.transport.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        assert await client.waitClosed() is not None
    assert await until(lambda: len(lines(path)) == 3)
    assert lines(path) == [
        b"404 /other -",
        b"410 /gone -",
        b"200 /only/x %s:%d" % (LOOPBACK.encode(), site.upstreamPort),
    ]


@pytest_twisted.ensureDeferred
async def test_a_reload_opens_the_new_files_or_is_rejected(site, tmp_path):
    before, after = tmp_path / "before.log", tmp_path / "after.log"
    service = await site.start(site.server(access_log=str(before)))
    await site.get("/one")

    def reconfigured(path: Path) -> Any:
        document = {"upstream": {"app": {"servers": [f"{LOOPBACK}:{site.upstreamPort}"]}}, "shutdown_timeout": 1}
        server = {
            **site.server(access_log={"path": str(path), "format": "json"}),
            "listen": service.config.servers[0].listen,
        }
        return parseConfig({**document, "server": [server]}, source="(test)")

    with pytest.raises(ConfigError, match=r"server\[0\]\.access_log: cannot open .*Is a directory"):
        service.reload(reconfigured(tmp_path))
    await site.get("/two")
    service.reload(reconfigured(after))
    await site.get("/three")
    assert [line.split(b'"')[1] for line in lines(before)] == [b"GET /one HTTP/1.1", b"GET /two HTTP/1.1"]
    assert [json.loads(line)["request_uri"] for line in lines(after)] == ["/three"]


@pytest_twisted.ensureDeferred
async def test_a_tunnel_logs_its_own_line_when_it_ends(site, tmp_path):
    path = tmp_path / "ws.log"
    await site.start(site.server(access_log={"path": str(path), "format": "json"}))
    client = await site.connect()
    client.transport.write(upgradeRequest() + b"ping")
    await client.waitFor(b"\r\n\r\n")
    assert await until(lambda: site.upstream.connections and site.upstream.connections[-1].received.endswith(b"ping"))
    site.upstream.connections[-1].transport.write(b"pong!")
    await client.waitFor(b"pong!")
    client.transport.loseConnection()
    assert await until(lambda: lines(path), timeout=10)
    (record,) = [json.loads(line) for line in lines(path)]
    assert record["status"] == 101 and record["upstream_status"] == 101
    assert (record["tunnel_closed_by"], record["tunnel_close_reason"], record["websocket_close_code"]) == (
        "client",
        None,
        None,
    )
    assert (record["bytes_received"], record["body_bytes_sent"]) == (4, 5)
    assert record["request_uri"] == "/ws" and record["request_method"] == "GET"


@pytest_twisted.ensureDeferred
async def test_a_tunnel_the_upstream_or_the_idle_timeout_ends_says_so(site, tmp_path):
    path = tmp_path / "ws.log"
    text = "$status $tunnel_closed_by $tunnel_close_reason $bytes_received $body_bytes_sent"
    await site.start(
        site.server(
            access_log={"path": str(path), "format": "main"},
            location=[{"match": "/idle", "websocket_idle_timeout": 0.3}, {"match": "/"}],
        ),
        log_format={"main": text},
    )
    client = await site.connect()
    client.transport.write(upgradeRequest(b"/ws") + b"abc")
    await client.waitFor(b"\r\n\r\n")
    assert await until(lambda: site.upstream.connections and site.upstream.connections[-1].received.endswith(b"abc"))
    site.upstream.connections[-1].transport.loseConnection()
    assert await client.waitClosed(timeout=10) is not None
    assert await until(lambda: len(lines(path)) == 1, timeout=10)
    idle = await site.connect()
    idle.transport.write(upgradeRequest(b"/idle"))
    assert await idle.waitClosed(timeout=10) is not None, "the idle tunnel was closed"
    assert await until(lambda: len(lines(path)) == 2, timeout=10)
    assert lines(path) == [b"101 upstream - 3 0", b"101 proxy idle_timeout 0 0"]


# SIGUSR1 in a twistd process


def readyLines(log: Path) -> int:
    return log.read_text(errors="replace").count("access logs reopened")


def getThrough(port: int, path: str) -> bytes:
    import socket

    with socket.create_connection((LOOPBACK, port), timeout=10) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    return response


def waitFor(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_reopens_the_files_after_logrotate_renamed_them(tmp_path, workers):
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM], stdout=subprocess.PIPE, env=ENVIRONMENT)
    try:
        upstreamPort = int(upstream.stdout.readline())
        access = tmp_path / "access.log"
        config = tmp_path / "wsproxy.toml"
        config.write_text(
            f'workers = {workers}\n[upstream.app]\nservers = ["127.0.0.1:{upstreamPort}"]\n'
            f'[[server]]\nlisten = "tcp:0:interface=127.0.0.1"\nproxy_pass = "http://app"\n'
            f'access_log = {{ path = "{access}", format = "json" }}\n'
        )
        log = tmp_path / "twistd.log"
        with open(log, "wb") as output:
            proxy = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "wsproxy", "--config", str(config)],
                env=ENVIRONMENT,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            (port,) = listeningPorts(log, proxy)
            if workers > 1:
                waitFor(lambda: log.read_text().count(" ready") == workers)
            for number in range(4):
                assert getThrough(port, f"/before/{number}").startswith(b"HTTP/1.1 200 ")
            waitFor(lambda: len(lines(access)) == 4)
            access.rename(tmp_path / "access.log.1")
            os.kill(proxy.pid, signal.SIGUSR1)
            waitFor(lambda: readyLines(log) == workers)
            for number in range(6):
                assert getThrough(port, f"/after/{number}").startswith(b"HTTP/1.1 200 ")
            waitFor(lambda: len(lines(access)) == 6)
            assert proxy.poll() is None, "SIGUSR1 does not stop the proxy"
        finally:
            proxy.terminate()
            proxy.wait(timeout=30)
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
    before = [json.loads(line)["request_uri"] for line in lines(tmp_path / "access.log.1")]
    after = [json.loads(line)["request_uri"] for line in lines(access)]
    assert before == [f"/before/{n}" for n in range(4)]
    assert sorted(after) == [f"/after/{n}" for n in range(6)]


#: An upstream in its own process: prints its port, answers 200 to anything.
UPSTREAM = """
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

class Answer(Protocol):
    def dataReceived(self, data):
        if b"\\r\\n\\r\\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
            self.transport.loseConnection()

port = reactor.listenTCP(0, Factory.forProtocol(Answer), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""
