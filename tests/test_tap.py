"""
The twistd plugin, run as an operator runs it: C{twistd wsproxy}.  Every
startup failure is one line on standard error and status 1; the
conformance command says what to install when a piece is missing.
"""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from support import ENVIRONMENT, TWISTD, listeningPorts
from twisted.internet.error import CannotListenError

from wsproxy.listeners import describeListenFailure


def twistd(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([TWISTD, *args], capture_output=True, text=True, timeout=timeout, env=ENVIRONMENT)


def test_twistd_lists_the_plugin():
    result = twistd("--help")
    assert result.returncode == 0
    assert "wsproxy" in result.stdout


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[[server]]\nlisten = "tcp:0"\nproxy_pass = "http://nope"\n', "server[0].proxy_pass: no [upstream.nope]"),
        (
            '[upstream.a]\nservers = ["x:1"]\n[[server]]\nlisten = "tcp:0"\nproxy_pass = "http://a"\nbogus = 1\n',
            "server[0].bogus: unknown key",
        ),
    ],
)
def test_a_bad_configuration_stops_twistd_with_one_line(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = twistd("-n", "--pidfile=", "wsproxy", "--config", str(path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [f"wsproxy: {path}: {expected}" + lines[0].split(expected, 1)[1]]


def test_the_demo_serves_its_page_and_websocket_through_the_proxy(tmp_path):
    log = tmp_path / "twistd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "wsproxy", "--demo", "--demo-port", "0"],
            env=ENVIRONMENT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        (port,) = listeningPorts(log, process)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            connection.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := connection.recv(65536):
                response += chunk
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"new WebSocket(" in response
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            connection.sendall(
                b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(4096)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
            connection.sendall(b"\x81\x82\x00\x00\x00\x00hi")
            echoed = head.split(b"\r\n\r\n", 1)[1]
            while len(echoed) < 4:
                echoed += connection.recv(4096)
            assert echoed == b"\x81\x02hi"
    finally:
        process.terminate()
        process.wait(timeout=30)
    # twistd re-raises the SIGTERM it handled once the reactor has stopped cleanly.
    assert process.returncode in (0, -signal.SIGTERM), log.read_text()


def test_an_unknown_endpoint_type_is_one_line(tmp_path):
    path = tmp_path / "wsproxy.toml"
    path.write_text(
        '[upstream.a]\nservers = ["127.0.0.1:9"]\n[[server]]\nlisten = "nosuch:80"\nproxy_pass = "http://a"\n'
    )
    result = twistd("-n", "--pidfile=", "wsproxy", "--config", str(path))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"wsproxy: {path}: server[0].listen: 'nosuch:80': ") and "nosuch" in line.split(": ", 3)[3]
    assert result.stdout == ""


@pytest.mark.parametrize("workers", [1, 2])
def test_an_address_in_use_is_one_line(tmp_path, workers):
    path = tmp_path / "wsproxy.toml"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        listen = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        path.write_text(
            f'workers = {workers}\n[upstream.a]\nservers = ["127.0.0.1:9"]\n'
            f'[[server]]\nlisten = "{listen}"\nproxy_pass = "http://a"\n'
        )
        result = twistd("-n", "--pidfile=", "wsproxy", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"wsproxy: {path}: server[0].listen: cannot listen on {listen!r}: address already in use"
    ]
    assert "Traceback" not in result.stdout and "started (pid" not in result.stdout


def test_permission_denied_on_a_low_port_says_how_to_get_it():
    low = describeListenFailure("tcp:80", CannotListenError("", 80, OSError(errno.EACCES, "Permission denied")))
    assert low.startswith("cannot listen on 'tcp:80': permission denied; ")
    assert "--uid/--gid" in low and "CAP_NET_BIND_SERVICE" in low
    high = describeListenFailure(
        "unix:/run/x.sock", CannotListenError(None, "/run/x.sock", PermissionError(errno.EACCES, "x"))
    )
    assert high == "cannot listen on 'unix:/run/x.sock': permission denied"


def test_a_refused_bind_in_the_foreground_is_one_line_on_stderr_and_status_1(tmp_path):
    """
    What twistd does with C{WsproxyService.privilegedStartService}, with an
    endpoint that the kernel refuses as it refuses port 80 to a user (the
    tests may run as root, who may bind it).
    """
    script = textwrap.dedent(
        """
        import errno
        from twisted.internet import defer, reactor
        from twisted.internet.error import CannotListenError
        from wsproxy import parseConfig
        from wsproxy.listeners import ProxyService
        from wsproxy.tap import WsproxyService

        class Refusing:
            def listen(self, factory):
                return defer.fail(CannotListenError("", 80, PermissionError(errno.EACCES, "Permission denied")))

        config = parseConfig(
            {"upstream": {"a": {"servers": ["127.0.0.1:9"]}}, "server": [{"listen": "tcp:80", "proxy_pass": "http://a"}]},
            source="wsproxy.toml",
        )
        top = WsproxyService()
        ProxyService(config, reactor, endpoints=[Refusing()]).setServiceParent(top)
        top.privilegedStartService()
        print("not reached")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=ENVIRONMENT)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("wsproxy: wsproxy.toml: server[0].listen: cannot listen on 'tcp:80': permission denied; ")
    assert "--uid/--gid" in line


@pytest.mark.parametrize("missing", ["trustme", "kosoku"])
def test_conformance_without_its_extra_says_what_to_install(tmp_path, missing):
    script = (
        f"import sys; sys.modules[{missing!r}] = None; from wsproxy.conformance import main; "
        f"main(['--cases', '1.1.1', '--report-dir', {str(tmp_path)!r}])"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=ENVIRONMENT)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert missing in line and "pip install 'wsproxy[conformance]'" in line
    assert not any(tmp_path.iterdir()), "nothing was run"


def test_a_proxy_started_from_toml_does_not_load_what_it_does_not_use(tmp_path):
    """
    A worker started from a TOML file with a plain and a TLS listener does
    not import the nginx converter, the metrics page's web server, the
    Prometheus client or Autobahn: each would stay in memory for as long
    as the proxy runs.
    """
    from support import ServerCertificate

    tls = ServerCertificate(tmp_path)
    config = tmp_path / "wsproxy.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [upstream.app]
            servers = ["127.0.0.1:9"]

            [[server]]
            listen = "tcp:0:interface=127.0.0.1"
            proxy_pass = "http://app"

            [[server]]
            listen = "tcp:0:interface=127.0.0.1"
            proxy_pass = "http://app"
            ssl_certificate = "{tls.block["ssl_certificate"]}"
            ssl_certificate_key = "{tls.block["ssl_certificate_key"]}"
            """
        )
    )
    script = textwrap.dedent(
        f"""
        import sys
        from wsproxy.tap import Options, makeService

        options = Options()
        options.parseOptions(["--config", {str(config)!r}])
        service = makeService(options)
        service.startService()
        heavy = [
            "wsproxy.nginxconf", "crossplane", "twisted.web", "prometheus_client", "autobahn",
            "wsproxy.health", "wsproxy.discovery", "twisted.names", "wsproxy.metricsweb",
            "wsproxy.conformance", "wsproxy.demo",
        ]
        print(" ".join(name for name in heavy if name in sys.modules))
        service.stopService()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=ENVIRONMENT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
