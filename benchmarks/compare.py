"""CPU per proxied request of this checkout against an older commit, side by side.

What it is for: checking a change to the gateway's hot path on a shared,
noisy machine. One run starts the static nginx upstream, the bare aiohttp
proxy, an OTLP sink and, for this checkout and for ``--baseline`` (a git
revision, extracted with ``git archive`` into a temporary directory), the
gateway with tracing disabled (``OTEL_SDK_DISABLED=true``) and with full
tracing; then it loads each case with ``wrk`` in alternating order, several
times, and prints the median CPU µs per request (utime + stime of the
server's process tree over the wrk window, as ``make bench`` measures it).
Every request carries what the snippet sends (``run.snippet_headers``).

Not for: the published figures (``make bench`` writes RESULTS.md).

    python benchmarks/compare.py [--baseline REV] [--repeats N] [--duration S] [--workers N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import harness  # noqa: E402
import servers  # noqa: E402
from harness import ROOT, Procs, log  # noqa: E402
from run import PATH, snippet_headers  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every case (≥ 1)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--workers", type=int, default=2, help="gateway and bare proxy workers")
    parser.add_argument(
        "--no-full", action="store_true", help="skip the full-tracing gateway cases"
    )
    args = parser.parse_args()
    if not 1 <= args.repeats <= 20 or not 1 <= args.duration <= 60:
        parser.error("--repeats must be 1..20 and --duration 1..60")
    return args


def extract(revision: str, into: Path) -> None:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


@dataclass
class Bench:
    """What a side-by-side comparison runs in: a scratch directory, the
    baseline revision's tree in it, the process set, nginx and an OTLP sink."""

    workdir: Path
    baseline: Path
    procs: Procs
    upstream: servers.Server
    sink: servers.Server


@contextmanager
def bench(revision: str, prefix: str) -> Iterator[Bench]:
    """The set-up both comparison scripts share; every process stops on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers (user nobody) read their config dir
        base_src = workdir / "baseline"
        base_src.mkdir()
        extract(revision, base_src)
        logs = workdir / "logs"
        logs.mkdir()
        procs = Procs(logs)
        try:
            upstream = servers.nginx_static(procs, workdir)
            yield Bench(workdir, base_src, procs, upstream, servers.sink(procs))
        finally:
            procs.stop_all()


def main() -> int:
    args = parse_args()
    with bench(args.baseline, "compare-") as b:
        procs, upstream, sink, base_src = b.procs, b.upstream, b.sink, b.baseline
        targets = {"bare": servers.bare_aiohttp(procs, upstream.url, workers=args.workers)}
        modes = {"notrace": {"OTEL_SDK_DISABLED": "true"}}
        if not args.no_full:
            modes["full"] = {}
        for mode, env in modes.items():
            for label, source in (("base", base_src), ("new", ROOT)):
                name = f"{label}-{mode}"
                targets[name] = servers.gateway(
                    procs,
                    name,
                    upstream.url,
                    workers=args.workers,
                    otlp_endpoint=sink.url,
                    env=env,
                    source=source,
                )
        token_url = targets["new-notrace"].url
        for server in targets.values():  # warm-up
            harness.wrk(
                server.url + PATH,
                connections=args.connections,
                duration_s=1,
                headers=snippet_headers(token_url),
            )
        cpu: dict[str, list[float]] = {name: [] for name in targets}
        order = list(targets)
        for round_no in range(args.repeats):
            for name in order if round_no % 2 == 0 else reversed(order):
                server = targets[name]
                sample = harness.measured_load(
                    name,
                    server.url + PATH,
                    server.pids(),
                    connections=args.connections,
                    duration_s=args.duration,
                    headers=snippet_headers(token_url),
                )
                errors = sample.result.errors + sample.result.non_2xx
                log(
                    f"{name:<13} {sample.result.rps:7.0f} req/s "
                    f"{sample.cpu_us_per_request:6.1f} µs/req"
                    + (f"  errors {errors}" if errors else "")
                )
                cpu[name].append(sample.cpu_us_per_request)
    bare = statistics.median(cpu["bare"])
    print(f"\nCPU µs/request, median of {args.repeats} (min–max), ×bare:")
    for name, values in cpu.items():
        median = statistics.median(values)
        print(
            f"  {name:<13} {median:6.1f}  ({min(values):.0f}–{max(values):.0f})"
            f"  {median / bare:4.2f}×"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
