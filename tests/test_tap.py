"""
The twistd plugin, run as an operator runs it: C{twistd wsproxy}.
"""

from __future__ import annotations

import signal
import socket
import subprocess

import pytest
from support import ENVIRONMENT, TWISTD, connectWhenListening, freePort


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
    port = freePort()
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "wsproxy", "--demo", "--demo-port", str(port)],
        env=ENVIRONMENT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with connectWhenListening(port, process) as connection:
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
    assert process.returncode in (0, -signal.SIGTERM), process.stdout.read()
