"""Turn per-round load-generator results into the Markdown results table.

Why separate from the runner: what a cell shows (median over rounds, CPU per
unit of work, the wsproxy/nginx ratio, "error: ..." or "n/a (...)") is the
part readers argue about, so it lives in one small place.  It only reports
figures; it never judges them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Result = dict[str, Any]  # one loadgen JSON object, or {"ok": False, "error"/"na": ...}


@dataclass(frozen=True)
class Metric:
    scenario: str  # key in the results dict
    title: str  # scenario column, shown on its first metric row
    label: str  # metric column
    value: Callable[[Result], float]
    fmt: str


def _per(num_key: str, scale: float, den: Callable[[Result], float]) -> Callable[[Result], float]:
    return lambda r: r[num_key] * scale / den(r)


METRICS: list[Metric] = [
    Metric("ws-small", "1. WS echo, 64 B, 50 conns x 16 in flight", "messages/s", lambda r: r["msg_per_s"], "{:,.0f}"),
    Metric("ws-small", "", "proxy CPU µs/message", _per("cpu_s", 1e6, lambda r: r["messages"]), "{:.2f}"),
    Metric("ws-large", "2. WS echo, 1 MiB, 4 conns", "MB/s (payload echoed)", lambda r: r["mb_per_s"], "{:,.1f}"),
    Metric("ws-large", "", "proxy CPU ms/MB", _per("cpu_s", 1e3, lambda r: r["mb"]), "{:.3f}"),
    Metric("latency", "3. RTT at 1,000 msg/s, 50 conns", "p50 ms", lambda r: r["p50_ms"], "{:.3f}"),
    Metric("latency", "", "p90 ms", lambda r: r["p90_ms"], "{:.3f}"),
    Metric("latency", "", "p99 ms", lambda r: r["p99_ms"], "{:.3f}"),
    Metric("latency", "", "proxy CPU µs/message", _per("cpu_s", 1e6, lambda r: r["messages"]), "{:.1f}"),
    Metric("handshake", "4. WS handshakes, plain", "handshakes/s", lambda r: r["hs_per_s"], "{:,.0f}"),
    Metric("handshake", "", "proxy CPU µs/handshake", _per("cpu_s", 1e6, lambda r: r["handshakes"]), "{:.1f}"),
    Metric("handshake-tls", "5. WS handshakes, TLS (wss)", "handshakes/s", lambda r: r["hs_per_s"], "{:,.0f}"),
    Metric("handshake-tls", "", "proxy CPU µs/handshake", _per("cpu_s", 1e6, lambda r: r["handshakes"]), "{:.1f}"),
    Metric("http", "6. HTTP GET keep-alive (wrk, 50 conns)", "requests/s", lambda r: r["req_per_s"], "{:,.0f}"),
    Metric("http", "", "proxy CPU µs/request", _per("cpu_s", 1e6, lambda r: r["requests"]), "{:.1f}"),
    Metric(
        "http-close",
        "7. HTTP GET, a new connection per request (wrk, 50 conns)",
        "requests/s",
        lambda r: r["req_per_s"],
        "{:,.0f}",
    ),
    Metric("http-close", "", "proxy CPU µs/request", _per("cpu_s", 1e6, lambda r: r["requests"]), "{:.1f}"),
    Metric("idle", "8. Idle tunnels held", "tunnels held", lambda r: r["tunnels"], "{:,.0f}"),
    Metric("idle", "", "RSS KiB/tunnel", lambda r: r["kib_per_tunnel"], "{:.2f}"),
    Metric(
        "started",
        "9. Started, listening, before any load",
        "RSS of a started proxy (MiB)",
        lambda r: r["rss_kib"] / 1024,
        "{:.1f}",
    ),
]


def cell(rounds: list[Result], metric: Metric) -> tuple[str, float | None]:
    """Median over the rounds that succeeded, as (text, value)."""
    values: list[float] = []
    problems: list[str] = []
    for r in rounds:
        if r.get("na"):
            return f"n/a ({r['na']})", None
        if not r.get("ok"):
            problems.append(str(r.get("error", "unknown error")))
            continue
        try:
            values.append(metric.value(r))
        except (KeyError, ZeroDivisionError, TypeError) as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
    if not values:
        if not problems:
            return "not run", None
        return "error: " + problems[0].replace("|", "/").replace("\n", " ")[:160], None
    median = statistics.median(values)
    text = metric.fmt.format(median)
    if problems:
        text += f" ({len(values)}/{len(rounds)} rounds ok)"
    return text, median


def table(results: dict[str, dict[str, list[Result]]], targets: list[str], scenarios: list[str]) -> str:
    head = "| Scenario | Metric | " + " | ".join(targets) + " | wsproxy/nginx |"
    rule = "|---|---|" + "---:|" * (len(targets) + 1)
    lines = [head, rule]
    shown: set[str] = set()
    for metric in METRICS:
        if metric.scenario not in scenarios:
            continue
        title = metric.title if metric.scenario not in shown else ""
        if not metric.title and metric.scenario not in shown:
            title = metric.scenario
        shown.add(metric.scenario)
        texts, values = [], {}
        for target in targets:
            text, value = cell(results.get(metric.scenario, {}).get(target, []), metric)
            texts.append(text)
            values[target] = value
        w, n = values.get("wsproxy"), values.get("nginx")
        ratio = f"{w / n:.2f}" if w is not None and n else "–"
        lines.append(f"| {title} | {metric.label} | " + " | ".join(texts) + f" | {ratio} |")
    return "\n".join(lines)
