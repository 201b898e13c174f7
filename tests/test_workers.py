"""
C{workers = N}: one parent checking the configuration and binding the
listeners, N worker processes serving them with the configuration the
parent sends; a dead worker comes back (with the parent's configuration),
SIGHUP makes the parent reload and send the result to them all, SIGTERM
stops them, and a worker that keeps failing at its start stops twistd
with status 1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import trustme
from support import ENVIRONMENT, TWISTD, listeningPorts


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


def ageOf(pid: int) -> float:
    """How long process C{pid} has been running, in seconds."""
    started = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - started / os.sysconf("SC_CLK_TCK")


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
    config = tmp_path / "wsproxy.toml"
    template = (
        'workers = 2\n[upstream.app]\nservers = ["127.0.0.1:{}"]\nkeepalive = 0\n'
        '[[server]]\nlisten = "tcp:0:interface=127.0.0.1"\nproxy_pass = "http://app"\n'
    )
    config.write_text(template.format(one.port))
    log = tmp_path / "twistd.log"
    with open(log, "wb") as output:
        parent = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "wsproxy", "--config", str(config)],
            env=ENVIRONMENT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        (port,) = listeningPorts(log, parent)

        def workerPids(without: int = 0) -> set[int] | None:
            pids = childrenOf(parent.pid)
            return pids if len(pids) == 2 and without not in pids else None

        workers = waitUntil(workerPids)
        waitUntil(lambda: log.read_text().count(" ready") == 2)
        assert log.read_text().count(" listening on ") == 1, "the parent says where it listens, the workers do not"

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

        config.write_text(template.format(two.port))
        os.kill(parent.pid, signal.SIGHUP)
        waitUntil(lambda: log.read_text().count("configuration reloaded") >= 2)
        for _ in range(6):
            assert get(port, [one, two]).endswith(b"two")
    finally:
        parent.terminate()
        parent.wait(timeout=30)
    assert not childrenOf(parent.pid)
    assert "Main loop terminated" in log.read_text()


TEMPLATE = (
    'workers = 2\n[upstream.app]\nservers = ["127.0.0.1:{upstream}"]\nkeepalive = 0\n'
    '[[server]]\nlisten = "tcp:0:interface=127.0.0.1"\nproxy_pass = "http://app"\n{extra}'
)


class Parent:
    """C{twistd -n wsproxy} with workers, its log in a file."""

    def __init__(self, tmp_path: Path, text: str, runner: tuple[str, ...] = (TWISTD, "-n", "--pidfile=")) -> None:
        self.config = tmp_path / "wsproxy.toml"
        self.config.write_text(text)
        self.logPath = tmp_path / "twistd.log"
        with open(self.logPath, "wb") as output:
            self.process = subprocess.Popen(
                [*runner, "wsproxy", "--config", str(self.config)],
                env=ENVIRONMENT,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.logPath.read_text()

    def port(self) -> int:
        """The port the parent bound (C{tcp:0}), from its log."""
        (port,) = listeningPorts(self.logPath, self.process)
        return port

    def workers(self, count: int = 2, without: set[int] = frozenset()) -> set[int] | None:
        pids = childrenOf(self.process.pid)
        return pids if len(pids) == count and not pids & without else None

    def waitReady(self, total: int) -> None:
        """Until C{total} workers in all have said they are ready (or the parent ended)."""
        waitUntil(lambda: self.log().count(" ready") >= total or self.process.poll() is not None)
        assert self.process.poll() is None, self.log()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)


def test_a_bad_key_stops_the_parent_before_any_worker_starts(tmp_path):
    authority = trustme.CA()
    certificate, other = authority.issue_cert("localhost"), authority.issue_cert("localhost")
    (tmp_path / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in certificate.cert_chain_pems))
    (tmp_path / "key.pem").write_bytes(other.private_key_pem.bytes())  # another certificate's key
    path = tmp_path / "wsproxy.toml"
    extra = f'ssl_certificate = "{tmp_path / "cert.pem"}"\nssl_certificate_key = "{tmp_path / "key.pem"}"\n'
    path.write_text(TEMPLATE.format(upstream=9, extra=extra))
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "wsproxy", "--config", str(path)],
        env=ENVIRONMENT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"wsproxy: {path}: server[0].ssl_certificate_key: ") and "does not match" in lines[0]
    assert "worker" not in result.stdout, "no worker was started"


def test_a_respawned_worker_serves_the_parents_configuration_not_the_edited_file(tmp_path):
    one, two = TinyUpstream(b"one"), TinyUpstream(b"two")
    parent = Parent(tmp_path, TEMPLATE.format(upstream=one.port, extra=""))
    try:
        port = parent.port()
        first = waitUntil(parent.workers)
        parent.waitReady(2)
        # Edited (validly) but no SIGHUP: the running configuration is still the old one.
        parent.config.write_text(TEMPLATE.format(upstream=two.port, extra=""))
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        waitUntil(lambda: parent.workers(without=first))
        parent.waitReady(4)
        for _ in range(8):
            assert get(port, [one, two]).endswith(b"one")
        assert parent.log().count("configuration reloaded") == 0
    finally:
        parent.stop()


def test_sighup_checks_in_the_parent_a_bad_file_is_one_line_and_the_workers_keep_theirs(tmp_path):
    one, two = TinyUpstream(b"one"), TinyUpstream(b"two")
    parent = Parent(tmp_path, TEMPLATE.format(upstream=one.port, extra=""))
    try:
        port = parent.port()
        waitUntil(parent.workers)
        parent.waitReady(2)
        # Another number of workers needs a restart.
        parent.config.write_text(TEMPLATE.format(upstream=two.port, extra="").replace("workers = 2", "workers = 3"))
        os.kill(parent.process.pid, signal.SIGHUP)
        waitUntil(lambda: "reload rejected" in parent.log())
        rejected = [line for line in parent.log().splitlines() if "reload rejected" in line]
        assert len(rejected) == 1 and ": workers: " in rejected[0]
        assert "worker" not in rejected[0].split("reload rejected")[0], "the parent checked it, not a worker"
        for _ in range(4):
            assert get(port, [one, two]).endswith(b"one")

        parent.config.write_text(TEMPLATE.format(upstream=two.port, extra=""))
        os.kill(parent.process.pid, signal.SIGHUP)
        waitUntil(lambda: parent.log().count("configuration reloaded") >= 2)
        for _ in range(6):
            assert get(port, [one, two]).endswith(b"two")
        assert len([line for line in parent.log().splitlines() if "reload rejected" in line]) == 1
    finally:
        parent.stop()
    assert parent.process.returncode in (0, -signal.SIGTERM)


def test_a_worker_that_keeps_failing_at_its_start_stops_twistd_with_status_1(tmp_path):
    authority = trustme.CA()
    issued = authority.issue_cert("localhost")
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    extra = f'ssl_certificate = "{certificate}"\nssl_certificate_key = "{key}"\n'
    upstream = TinyUpstream(b"one")
    parent = Parent(tmp_path, TEMPLATE.format(upstream=upstream.port, extra=extra))
    try:
        workers = waitUntil(parent.workers)
        parent.waitReady(2)
        # The parent checked the key at its start; a worker started now cannot load it.
        key.write_text("not a key any more\n")
        victim = sorted(workers)[0]
        # Past its first second, the victim's death is no failure at start; its successors' are.
        waitUntil(lambda: ageOf(victim) > 1.5)
        os.kill(victim, signal.SIGKILL)
        status = parent.process.wait(timeout=60)
    finally:
        parent.stop()
    log = parent.log()
    assert status == 1, log
    (fatal,) = [line for line in log.splitlines() if "times in a row" in line]
    assert "worker 0 failed 3 times in a row" in fatal and "stopping wsproxy" in fatal
    assert "server[0].ssl_certificate_key" in fatal, "the worker's own error is in the line"
    assert log.count("started (pid") == 5, "two workers, then three tries of the failing one"
    assert "Main loop terminated" in log
    assert not childrenOf(parent.process.pid)


def test_workers_under_twist_get_the_parents_sockets(tmp_path):
    """
    C{python -m twisted} (twist) starts services without
    C{privilegedStartService}: the parent must still bind before it forks,
    or every worker but the first would find the address in use.
    """
    parent = Parent(
        tmp_path, TEMPLATE.format(upstream=9, extra=""), runner=(sys.executable, "-m", "twisted", "--log-format=text")
    )
    try:
        port = parent.port()
        parent.waitReady(2)
        assert parent.workers() is not None, parent.log()
        served = re.findall(r"worker \d: +\[-\] ProxyFactory starting on (\d+)", parent.log())
        assert served == [str(port)] * 2, "both workers serve the parent's socket"
    finally:
        parent.stop()
