"""Read CPU time and resident memory of a process tree from /proc.

Why a module of its own: the load generator samples the proxy's CPU and RSS at
the exact edges of its measurement window (not around the whole subprocess,
which would include connection set-up and warm-up), and the runner needs the
same numbers to find nginx's worker processes.  Both therefore share these few
functions.  A proxy may fork workers (nginx always does), so every figure is
summed over the process and all of its descendants.
"""

from __future__ import annotations

import os

CLK_TCK: int = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read().decode("ascii", "replace")
    return raw[raw.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """Return ``root`` and all its live descendants (scan of /proc, no psutil)."""
    parent_of: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            parent_of[int(name)] = int(_stat_fields(int(name))[1])
        except (OSError, ValueError, IndexError):
            continue
    tree = [root]
    frontier = [root]
    while frontier:
        nxt = [pid for pid, ppid in parent_of.items() if ppid in frontier]
        tree.extend(nxt)
        frontier = nxt
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime, in seconds, summed over ``pids`` (vanished pids count 0)."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        # After "pid (comm) ", field 0 is state; utime/stime are fields 11/12.
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    """VmRSS in KiB from /proc/PID/status, summed over ``pids``."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total
