"""Child processes of the benchmark: start, pin, wait for, and always kill.

Why a module of its own: the run must never leave an nginx, an upstream, a
wsproxy or a load-generator worker behind, whatever happens (exception,
Ctrl-C, SIGTERM, a hung load generator).  So every child

* is started in its own session (process group), pinned with ``taskset``,
  with PR_SET_PDEATHSIG so that it dies even if the runner is SIGKILLed;
* is registered here, and ``stop_all`` kills each group (SIGTERM, then
  SIGKILL) by its own id, never by name;
* is bounded in time: ``run_bounded`` kills the group at the deadline.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_live: list[Child] = []


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGKILL us when the runner dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def pinned(cpu: int | str, argv: list[str]) -> list[str]:
    """Prefix ``argv`` with taskset so the process (and its children) use one CPU (or a list, "0,1")."""
    if isinstance(cpu, str):
        return ["taskset", "-c", cpu, *argv]
    if cpu < 0 or (os.cpu_count() or 1) <= cpu:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


def _kill_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    if proc.poll() is not None:
        # The leader is gone; children in its group may not be.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # stragglers (e.g. nginx workers) in the same group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Child:
    """A long-running server process (upstream, nginx, wsproxy)."""

    def __init__(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env=self.env,
                cwd=self.cwd,
            )
        _live.append(self)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
        if self in _live:
            _live.remove(self)

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def wait_ports(self, ports: list[int], timeout: float = 15.0) -> None:
        """Return once every port accepts a connection; raise if the child dies."""
        deadline = time.monotonic() + timeout
        pending = list(ports)
        while pending:
            if not self.alive():
                rc = self.proc.returncode if self.proc else None
                raise RuntimeError(f"{self.name} exited (rc={rc}): {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: port(s) {pending} not listening after {timeout:.0f}s")
            try:
                with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                    pending.pop(0)
            except OSError:
                time.sleep(0.1)


def stop_all() -> None:
    """Kill every registered child's process group (newest first)."""
    for child in reversed(list(_live)):
        child.stop()


def run_bounded(argv: list[str], timeout: float) -> tuple[int, str, str]:
    """Run a short-lived command in its own group; kill the group at ``timeout``."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc, grace=1.0)
        out, err = proc.communicate()
        return -1, out, f"timed out after {timeout:.0f}s; {err[-200:]}"
    except BaseException:
        _kill_group(proc, grace=1.0)
        raise
    _kill_group(proc, grace=0.5)  # workers left behind, if any
    return proc.returncode, out, err


def free_ports(count: int) -> list[int]:
    """Ask the kernel for ``count`` distinct free loopback ports."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
