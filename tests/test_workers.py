"""
C{workers = N}: one parent binding the listeners, N worker processes
serving them; a dead worker comes back, SIGHUP and SIGTERM reach them all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from support import ENVIRONMENT, TWISTD, freePort


def childrenOf(pid: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.add(int(entry.name))
    return children


def waitUntil(condition, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


class TinyUpstream:
    """A listening socket the test answers from, one request per accepted connection."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]


def get(port: int, upstreams: list[TinyUpstream]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        for upstream in upstreams:
            upstream.socket.settimeout(0.3)
        while True:
            for upstream in upstreams:
                try:
                    connection, _ = upstream.socket.accept()
                except OSError:
                    continue
                with connection:
                    connection.recv(65536)
                    connection.sendall(
                        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b"
                        % (len(upstream.body), upstream.body)
                    )
                response = b""
                while chunk := client.recv(65536):
                    response += chunk
                return response


def test_workers_share_the_listener_restart_and_follow_signals(tmp_path):
    one, two = TinyUpstream(b"one"), TinyUpstream(b"two")
    port = freePort()
    config = tmp_path / "wsproxy.toml"
    template = (
        'workers = 2\n[upstream.app]\nservers = ["127.0.0.1:{}"]\nkeepalive = 0\n'
        '[[server]]\nlisten = "tcp:{}:interface=127.0.0.1"\nproxy_pass = "http://app"\n'
    )
    config.write_text(template.format(one.port, port))
    log = tmp_path / "twistd.log"
    with open(log, "wb") as output:
        parent = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "wsproxy", "--config", str(config)],
            env=ENVIRONMENT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:

        def workerPids(without: int = 0) -> set[int] | None:
            pids = childrenOf(parent.pid)
            return pids if len(pids) == 2 and without not in pids else None

        workers = waitUntil(workerPids)
        waitUntil(lambda: log.read_text().count(" ready") == 2)

        def served() -> set[str]:
            lines = log.read_text().splitlines()
            return {line.split("worker ")[1][0] for line in lines if '"GET /" 200' in line}

        # Which worker accepts is up to the kernel: ask until both have answered.
        for _ in range(300):
            assert get(port, [one, two]).endswith(b"one")
            if served() == {"0", "1"}:
                break
        assert served() == {"0", "1"}, "both workers accept connections"

        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        replaced = waitUntil(lambda: workerPids(without=victim))
        assert len(replaced & workers) == 1
        waitUntil(lambda: log.read_text().count(" ready") == 3)
        assert get(port, [one, two]).endswith(b"one")

        config.write_text(template.format(two.port, port))
        os.kill(parent.pid, signal.SIGHUP)
        waitUntil(lambda: log.read_text().count("configuration reloaded") >= 2)
        for _ in range(6):
            assert get(port, [one, two]).endswith(b"two")
    finally:
        parent.terminate()
        parent.wait(timeout=30)
    assert not childrenOf(parent.pid)
    assert "Main loop terminated" in log.read_text()
