"""What routing costs: proxied HTTP GETs through a large routing table against one location.

    python benchmarks/routing.py [--rounds 3] [--duration 5]

Two wsproxy processes run side by side in front of the same upstream:
"one-location" (one server, ``proxy_pass`` on it) and "routing" (50 server
names with 20 locations each: 9 prefixes, ``=`` exact matches and 10
regexes).  The routing requests are the costly kind: a Host in the middle of
the names, which no exact name matches (so the wildcards are looked up), and
a path that passes every prefix and every regex before the "/" location
takes it.  Each round runs wrk against both, alternating which goes first; the
medians are reported with the proxy's CPU time per request and the ratio,
which issue 10 requires to be at least 0.95.

Writes nothing; prints a Markdown table (and JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import processes  # noqa: E402
from processes import Child, pinned  # noqa: E402
from run import DEFAULT_WSPROXY_CMD, LOAD_CPU, PROXY_CPU, Target  # noqa: E402

NAMES = 50
LOCATIONS = 20
#: The Host routed by the big table: matched by a leading wildcard only.
HOST = "www.site25.example"
#: A path that every prefix and every regex is tried on before "/" answers it.
PATH = "/nothing/matches/here/until/the/root"


def routingTOML(upstreamPort: int, port: int) -> str:
    """50 virtual hosts of 20 locations each, all proxying to one upstream."""
    lines = [f'[upstream.app]\nservers = ["127.0.0.1:{upstreamPort}"]\n']
    for site in range(NAMES):
        lines.append("[[server]]")
        lines.append(f'listen = "tcp:{port}:interface=127.0.0.1"')
        lines.append(f'server_name = ["site{site}.example", "*.site{site}.example"]')
        lines.append("access_log = false")
        if site == 0:
            lines.append("default_server = true")
        locations = [f"/app{n}/" for n in range(8)] + ["= /exact", "/"]
        locations += [f"~ ^/api/v{n}/(\\\\w+)$" for n in range(5)]
        locations += [f"~* \\\\.(css{n}|js{n})$" for n in range(5)]
        assert len(locations) == LOCATIONS
        for match in locations:
            lines.append("[[server.location]]")
            lines.append(f'match = "{match}"')
            lines.append('proxy_pass = "http://app"')
        lines.append("")
    return "\n".join(lines)


def oneLocationTOML(upstreamPort: int, port: int) -> str:
    return (
        f'[upstream.app]\nservers = ["127.0.0.1:{upstreamPort}"]\n\n'
        f'[[server]]\nlisten = "tcp:{port}:interface=127.0.0.1"\nproxy_pass = "http://app"\naccess_log = false\n'
    )


def startProxy(name: str, text: str, port: int, work: Path) -> Target:
    config = work / f"{name}.toml"
    config.write_text(text)
    argv = [part.replace("{config}", str(config)) for part in shlex.split(DEFAULT_WSPROXY_CMD)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    target = Target(name, Child(name, pinned(PROXY_CPU, argv), work / f"{name}.log", env=env, cwd=work), port, None)
    target.start()
    return target


def measure(target: Target, args: argparse.Namespace, host: str, path: str) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(HERE / "loadgen.py"),
        "http",
        "--port",
        str(target.port),
        "--pid",
        str(target.child.pid),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--path",
        path,
        "--host-header",
        host,
    ]
    rc, out, err = processes.run_bounded(pinned(LOAD_CPU, argv), args.duration + args.warmup + 60)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"loadgen rc={rc}: {(err or out).strip()[-300:]}")
    result = json.loads(lines[-1])
    if not result.get("ok", True) or result.get("non_2xx"):
        raise RuntimeError(f"{target.name}: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wsproxy-routing-"))
    upPort, onePort, routingPort = processes.free_ports(3)
    upstream = Child(
        "upstream",
        pinned(LOAD_CPU, [sys.executable, str(HERE / "upstream.py"), "--port", str(upPort)]),
        work / "up.log",
    )
    Target("upstream", upstream, upPort, None).start()
    targets = {
        "one-location": (startProxy("one-location", oneLocationTOML(upPort, onePort), onePort, work), "localhost", "/"),
        "routing": (startProxy("routing", routingTOML(upPort, routingPort), routingPort, work), HOST, PATH),
    }
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    started = time.time()
    try:
        for round in range(args.rounds):
            order = list(targets) if round % 2 == 0 else list(reversed(targets))
            for name in order:
                target, host, path = targets[name]
                results[name].append(measure(target, args, host, path))
                print(f"round {round + 1} {name}: {results[name][-1]['req_per_s']:.0f} req/s", flush=True)
    finally:
        for target, _, _ in targets.values():
            target.child.stop()
        upstream.stop()
    summary = {}
    for name, runs in results.items():
        rate = statistics.median(r["req_per_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] / r["requests"] * 1e6 for r in runs)
        summary[name] = {"req_per_s": rate, "cpu_us_per_request": cpu}
    ratio = summary["routing"]["req_per_s"] / summary["one-location"]["req_per_s"]
    print(f"\n{args.rounds} rounds of {args.duration:g} s, wall {time.time() - started:.0f} s\n")
    print("| config | req/s (median) | proxy CPU µs/request |")
    print("|---|---:|---:|")
    for name, figures in summary.items():
        print(f"| {name} | {figures['req_per_s']:.0f} | {figures['cpu_us_per_request']:.1f} |")
    print(f"\nrouting / one-location: **{ratio:.3f}** (issue 10 asks for >= 0.95)")
    if args.json:
        print(json.dumps({"summary": summary, "ratio": ratio, "runs": results}))


if __name__ == "__main__":
    main()
