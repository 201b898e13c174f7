"""Benchmark wsproxy side by side with nginx (and the bare upstream) in one run.

    python benchmarks/run.py [--quick] [--rounds 3] [--scenarios ws-small,http,...]

Why one runner for all targets: figures from different runs, days or
machines are not comparable; here the same upstream, the same load generator
and the same CPU pinning drive "direct" (the upstream alone), nginx and
wsproxy alternately, round after round, and the medians are tabulated with
each proxy's CPU time per unit of work.  The proxy under test runs on CPU 0,
the upstream and the load generator on CPU 1.

Writes benchmarks/RESULTS.md (and prints the table).  A target that fails a
scenario gets "error: ..." in its cell; the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import processes  # noqa: E402
import procstat  # noqa: E402
import report  # noqa: E402
from processes import Child, pinned  # noqa: E402
from upstream import raise_nofile  # noqa: E402

PROXY_CPU = 0
LOAD_CPU = 1
SCENARIOS = ["ws-small", "ws-large", "latency", "handshake", "handshake-tls", "http", "http-close", "idle"]
TARGETS = ["direct", "nginx", "wsproxy", "wsproxy-w2"]
#: Variants of wsproxy for what a feature costs, compared with "wsproxy" in
#: the same run: the metrics listener on, WebSocket frame tracking off.
VARIANTS = {
    "wsproxy-metrics": ('[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n', ""),
    "wsproxy-notrack": ("", "websocket_frame_tracking = false\n"),
}
#: wsproxy with ``workers = 2``: two worker processes on both CPUs (which the
#: load generator shares), to show what a second core buys; not pinned to one.
WORKERS_CPUS = "0,1"
# `python -m twisted` is Twisted's foreground runner ("twist"); it takes no -n.
# Logging at "warn" matches nginx's "access_log off; error_log ... error;".
DEFAULT_WSPROXY_CMD = f"{shlex.quote(sys.executable)} -m twisted --log-level=warn wsproxy --config {{config}}"
NO_TLS = "wsproxy has no TLS listener yet"
#: Not a load scenario: each target's RSS once it listens, before any load.
STARTED = "started"
#: How long a target that listens is left alone before its RSS is read.
STARTED_SETTLE = 1.0


class Target:
    """One thing to measure: a server process and the ports it listens on."""

    def __init__(self, name: str, child: Child, port: int, tls_port: int | None, config: Any = None) -> None:
        self.name = name
        self.child = child
        self.port = port
        self.tls_port = tls_port
        self.config = config  # how to rebuild the child (wsproxy: TLS or not)
        self.tls_na: str | None = None
        self.start_error: str | None = None

    def start(self) -> None:
        self.child.start()
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        self.child.wait_ports(ports)

    def restart(self) -> None:
        self.child.stop()
        time.sleep(0.3)
        self.start()


def make_certs(workdir: Path) -> tuple[Path, Path]:
    """Self-signed test CA and a leaf for 127.0.0.1/localhost (trustme)."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    chain, key = workdir / "fullchain.pem", workdir / "privkey.pem"
    leaf.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    return chain, key


def wsproxy_toml(
    upstream_port: int,
    port: int,
    tls_port: int | None,
    chain: Path,
    key: Path,
    workers: int = 1,
    top: str = "",
    server: str = "",
) -> str:
    text = (
        f"workers = {workers}\n"
        f"{top}"
        "[upstream.app]\n"
        f'servers = ["127.0.0.1:{upstream_port}"]\n\n'
        "[[server]]\n"
        f'listen = "tcp:{port}:interface=127.0.0.1"\n'
        'proxy_pass = "http://app"\n'
        "access_log = false\n"  # as nginx.conf.template's access_log off
        f"{server}"
    )
    if tls_port:
        text += (
            "\n[[server]]\n"
            f'listen = "tcp:{tls_port}:interface=127.0.0.1"\n'
            'proxy_pass = "http://app"\n'
            f'ssl_certificate = "{chain}"\n'
            f'ssl_certificate_key = "{key}"\n'
            "access_log = false\n"
            f"{server}"
        )
    return text


def start_wsproxy(
    args: argparse.Namespace,
    work: Path,
    up_port: int,
    port: int,
    tls_port: int,
    chain: Path,
    key: Path,
    name: str = "wsproxy",
    workers: int = 1,
    top: str = "",
    server: str = "",
) -> Target:
    """Start wsproxy with a TLS listener; without one if it refuses the TLS block."""
    attempts: list[tuple[int | None, str]] = [(tls_port, f"{name}.toml"), (None, f"{name}-notls.toml")]
    last_error = ""
    for tport, fname in attempts:
        config = work / fname
        config.write_text(wsproxy_toml(up_port, port, tport, chain, key, workers, top, server))
        argv = [part.replace("{config}", str(config)) for part in shlex.split(args.wsproxy_cmd)]
        # The repo root goes first on PYTHONPATH so that an uninstalled checkout
        # (wsproxy/ and twisted/plugins/) is what runs; cwd keeps twistd.pid out.
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
        }
        cpus = WORKERS_CPUS if workers > 1 else PROXY_CPU
        child = Child(name, pinned(cpus, argv), work / f"{fname}.log", env=env, cwd=work)
        target = Target(name, child, port, tport)
        try:
            target.start()
        except RuntimeError as exc:
            child.stop()
            last_error = str(exc)
            print(f"  wsproxy ({'with' if tport else 'without'} TLS) did not start: {exc}", flush=True)
            continue
        if tport is None:
            target.tls_na = NO_TLS
        return target
    dead = Target(name, Child(name, [], work / "none.log"), port, None)
    dead.start_error = f"wsproxy did not start: {last_error}"
    return dead


def loadgen_argv(scenario: str, target: Target, args: argparse.Namespace) -> tuple[list[str], float]:
    """Command line and time limit for one scenario against one target."""
    base = [sys.executable, str(HERE / "loadgen.py")]
    common = [
        "--host",
        "127.0.0.1",
        "--pid",
        str(target.child.pid),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
    ]
    limit = args.warmup + args.duration + 40
    if scenario == "handshake-tls":
        assert target.tls_port
        extra = ["handshake", "--tls", "--port", str(target.tls_port)]
    elif scenario == "idle":
        extra = ["idle", "--port", str(target.port), "--tunnels", str(args.tunnels)]
        limit += args.tunnels / 100 + 60
    else:
        extra = [scenario, "--port", str(target.port)]
    if scenario in ("ws-small", "handshake", "handshake-tls"):
        extra += ["--workers", str(args.workers)]
    return pinned(LOAD_CPU, base + extra + common), limit


def started_rss(target: Target) -> dict[str, Any]:
    """
    RSS of a target that listens and has had no load yet: the process and
    all its descendants (nginx's master and worker, wsproxy's workers), as
    the idle scenario counts them.
    """
    if target.start_error:
        return {"ok": False, "error": target.start_error}
    if not target.child.alive():
        return {"ok": False, "error": f"{target.name} is not running: {target.child.log_tail(1)}"}
    return {"ok": True, "rss_kib": procstat.rss_kib(procstat.descendants(target.child.pid))}


def run_one(scenario: str, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    if target.start_error:
        return {"ok": False, "error": target.start_error}
    if scenario == "handshake-tls" and target.tls_na:
        return {"ok": False, "na": target.tls_na}
    try:
        if scenario == "idle" or not target.child.alive():
            # Fresh process: RSS growth must not be hidden by memory freed
            # (but kept) after earlier scenarios; also revives a dead target.
            target.restart()
    except RuntimeError as exc:
        return {"ok": False, "error": f"restart failed: {exc}"}
    argv, limit = loadgen_argv(scenario, target, args)
    rc, out, err = processes.run_bounded(argv, limit)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"loadgen rc={rc}: {(err or out).strip()[-200:]}"}
    result = json.loads(lines[-1])
    if result.get("ok") and not target.child.alive():
        result = {"ok": False, "error": f"{target.name} died during the run: {target.child.log_tail(1)}"}
    return result


def describe_machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def cmd(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=HERE.parent)
            return (p.stdout or p.stderr).strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = cmd(["git", "rev-parse", "--short", "HEAD"])
    if not commit or "fatal" in commit or "unknown" in commit:
        commit = "none (no commit yet)"
    elif cmd(["git", "status", "--porcelain"]):
        commit += " (with uncommitted changes)"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": cmd(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": cmd(["wrk", "--version"]).splitlines()[0] if cmd(["wrk", "--version"]) else "?",
        "commit": commit,
    }


def loadavg() -> str:
    """1/5/15-minute load average: shows whether something else shared the CPUs."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def write_results(
    path: Path,
    info: dict[str, str],
    args: argparse.Namespace,
    table: str,
    results: dict[str, dict[str, list[dict[str, Any]]]],
    elapsed: float,
) -> None:
    raw = json.dumps(results, indent=1, sort_keys=True)
    text = f"""# wsproxy vs nginx: benchmark results

- Date: {info["date"]}
- Machine: {info["nproc"]} CPUs, {info["cpu"]}, Linux {info["kernel"]}
- Git commit: {info["commit"]}
- Software: Python {info["python"]}, nginx {info["nginx"]}, {info["wrk"]}
- Settings: {args.rounds} round(s), {args.duration:g} s per scenario after {args.warmup:g} s warm-up, {args.tunnels} idle tunnels; proxy on CPU {PROXY_CPU}, upstream + load generator on CPU {LOAD_CPU}; wall time {elapsed:.0f} s
- wsproxy command: `{args.wsproxy_cmd}`
- Load average at start / end: {args.load_start} / {loadavg()} (other processes on the machine share these CPUs and add noise)

Medians over rounds. "direct" is the upstream without a proxy; its CPU rows are the
upstream's own CPU. Proxy CPU = utime+stime of the proxy process and its children over
the measurement window, divided by the work done in it. The ratio column is
wsproxy/nginx of the medians: above 1 means more of that metric for wsproxy
(better for rates, worse for latency, CPU and memory).

{table}

<details><summary>Per-round raw results (load generator JSON)</summary>

```json
{raw}
```
</details>
"""
    path.write_text(text)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 2 s per scenario, 1 round, 2,000 tunnels")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=float, help="measured seconds per scenario (default 5, quick 2)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds first (default 1, quick 0.5)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {','.join(SCENARIOS)}")
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma list of {','.join([*TARGETS, *VARIANTS])} (the variants are not run by default)",
    )
    p.add_argument("--tunnels", type=int, help="idle tunnels to hold (default 9000, quick 2000)")
    p.add_argument("--workers", type=int, default=2, help="load generator processes for scenarios 1, 4, 5")
    p.add_argument(
        "--wsproxy-cmd", default=DEFAULT_WSPROXY_CMD, help="how to launch wsproxy; {config} is the TOML path"
    )
    p.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = p.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    args.tunnels = args.tunnels or (2000 if args.quick else 9000)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for s in args.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}")
    for t in args.targets:
        if t not in TARGETS and t not in VARIANTS:
            p.error(f"unknown target {t!r}")
    return args


def main() -> None:
    args = parse_args()
    raise_nofile()  # inherited by every child: 9,000 tunnels need ~18,000 fds
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    args.load_start = loadavg()
    work = Path(tempfile.mkdtemp(prefix="wsproxy-bench-"))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {s: {t: [] for t in args.targets} for s in args.scenarios}
    try:
        chain, key = make_certs(work)
        up_port, up_tls, ng_port, ng_tls, ws_port, ws_tls, w2_port, w2_tls = processes.free_ports(8)
        targets: dict[str, Target] = {}

        upstream = Child(
            "upstream",
            pinned(
                LOAD_CPU,
                [
                    sys.executable,
                    str(HERE / "upstream.py"),
                    "--port",
                    str(up_port),
                    "--tls-port",
                    str(up_tls),
                    "--cert",
                    str(chain),
                    "--key",
                    str(key),
                ],
            ),
            work / "upstream.log",
        )
        targets["direct"] = Target("direct", upstream, up_port, up_tls)
        targets["direct"].start()
        print(f"upstream on {up_port} (TLS {up_tls}), workdir {work}", flush=True)

        if "nginx" in args.targets:
            prefix = work / "nginx"
            prefix.mkdir()
            conf = (HERE / "nginx.conf.template").read_text()
            for name, value in {
                "PREFIX": prefix,
                "UPSTREAM_PORT": up_port,
                "PORT": ng_port,
                "TLS_PORT": ng_tls,
                "CERT": chain,
                "KEY": key,
            }.items():
                conf = conf.replace(f"@{name}@", str(value))
            (prefix / "nginx.conf").write_text(conf)
            nginx = Child(
                "nginx",
                pinned(PROXY_CPU, ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"]),
                work / "nginx.out",
            )
            targets["nginx"] = Target("nginx", nginx, ng_port, ng_tls)
            try:
                targets["nginx"].start()
                print(f"nginx on {ng_port} (TLS {ng_tls})", flush=True)
            except RuntimeError as exc:
                targets["nginx"].start_error = f"nginx did not start: {exc}"
                print(f"  {targets['nginx'].start_error}", flush=True)

        if "wsproxy" in args.targets:
            targets["wsproxy"] = start_wsproxy(args, work, up_port, ws_port, ws_tls, chain, key)
            if not targets["wsproxy"].start_error:
                print(f"wsproxy on {ws_port} (TLS {targets['wsproxy'].tls_port or 'none'})", flush=True)

        if "wsproxy-w2" in args.targets:
            targets["wsproxy-w2"] = start_wsproxy(
                args, work, up_port, w2_port, w2_tls, chain, key, name="wsproxy-w2", workers=2
            )

        for name, (top, server) in VARIANTS.items():
            if name in args.targets:
                port, tls, metrics_port = processes.free_ports(3)
                top = top.format(metrics_port=metrics_port)
                targets[name] = start_wsproxy(
                    args, work, up_port, port, tls, chain, key, name=name, top=top, server=server
                )

        # Before any load; the other targets' start-up is over too.
        time.sleep(STARTED_SETTLE)
        results[STARTED] = {name: [started_rss(targets[name])] for name in args.targets}
        print(f"started: {json.dumps(results[STARTED])[:300]}", flush=True)

        for rnd in range(args.rounds):
            order = args.targets[rnd % len(args.targets) :] + args.targets[: rnd % len(args.targets)]
            for scenario in args.scenarios:
                for name in order:
                    t0 = time.time()
                    res = run_one(scenario, targets[name], args)
                    results[scenario][name].append(res)
                    brief = {k: v for k, v in res.items() if k not in ("errors",)}
                    print(
                        f"round {rnd + 1}/{args.rounds} {scenario:13s} {name:8s} {time.time() - t0:5.1f}s {json.dumps(brief)[:220]}",
                        flush=True,
                    )
    finally:
        processes.stop_all()

    table = report.table(results, args.targets, [*args.scenarios, STARTED])
    info = describe_machine()
    write_results(Path(args.output), info, args, table, results, time.time() - started)
    print()
    print(table)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        processes.stop_all()
        sys.exit(130)
