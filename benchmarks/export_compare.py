"""The export thread's cost per batch, this checkout against an older commit.

What it is for: checking a change to how spans are exported (encoder,
exporter, transport) on a shared, noisy machine. One run starts the static
nginx upstream and an OTLP sink, extracts ``--baseline`` (a git revision,
with ``git archive``, as benchmarks/compare.py does), then runs
benchmarks/loop_lag.py (one gateway worker under wrk at c=1, as ``make
bench`` does) from the baseline's tree and from this checkout, alternating,
``--repeats`` times, and prints the medians of the export thread's CPU per
batch (``export_cpu_ms_median``) and of the event-loop stall per batch
(``stall_ms_per_batch_p90``).

Not for: the published figures (``make bench`` writes RESULTS.md).

    python benchmarks/export_compare.py [--baseline REV] [--repeats N] [--duration S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import harness  # noqa: E402
import servers  # noqa: E402
from compare import bench  # noqa: E402
from harness import ROOT, Procs, log  # noqa: E402
from run import PATH, snippet_headers  # noqa: E402

FIGURES = ("export_cpu_ms_median", "stall_ms_per_batch_p90", "stall_ms_per_batch_median")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over both trees (≥ 1)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of wrk per run")
    args = parser.parse_args()
    if not 1 <= args.repeats <= 20 or not 2 <= args.duration <= 60:
        parser.error("--repeats must be 1..20 and --duration 2..60")
    return args


def lag_run(
    procs: Procs,
    name: str,
    source: Path,
    workdir: Path,
    upstream: servers.Server,
    sink: servers.Server,
    duration_s: float,
) -> dict[str, Any]:
    """benchmarks/loop_lag.py of ``source`` under wrk at c=1 (run.loop_lag's recipe)."""
    port = harness.free_port()
    out = workdir / f"{name}.json"
    argv = [harness.python(), str(source / "benchmarks" / "loop_lag.py")]
    argv += ["--upstream", upstream.url, "--port", str(port), "--out", str(out)]
    env = {
        **servers.QUIET_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
        "GATEWAY_CLOCK_KEY": "bench-clock-key-0123456789abcdef",
        "GATEWAY_TIMING_RATE": "1000000/s, burst 1000000",
    }
    proc = procs.start(name, argv, env=env)
    url = f"http://127.0.0.1:{port}"
    harness.wait_http(url + "/__gateway/clock", proc)
    harness.wrk(url + PATH, connections=1, duration_s=1.0, headers=snippet_headers(url))
    harness.wrk(url + PATH, connections=1, duration_s=duration_s, headers=snippet_headers(url))
    procs.stop(proc, grace_s=15.0)
    stats: dict[str, Any] = json.loads(out.read_text())
    return stats


def main() -> int:
    args = parse_args()
    samples: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
    with bench(args.baseline, "export-compare-") as b:
        trees = [("base", b.baseline), ("new", ROOT)]
        for round_no in range(args.repeats):
            for label, source in trees if round_no % 2 == 0 else trees[::-1]:
                name = f"{label}-{round_no}"
                stats = lag_run(b.procs, name, source, b.workdir, b.upstream, b.sink, args.duration)
                samples[label].append(stats)
                log(
                    f"{name:<8} {stats['batches']:4d} batches "
                    + " ".join(f"{figure} {stats[figure]}" for figure in FIGURES)
                )
    print(f"\nmedian of {args.repeats} runs (min–max), baseline {args.baseline}:")
    for figure in FIGURES:
        for label, runs in samples.items():
            values = [run[figure] for run in runs if run[figure] is not None]
            if values:
                print(
                    f"  {figure:<26} {label:<4} {statistics.median(values):7.3f}"
                    f"  ({min(values):.3f}–{max(values):.3f})"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
