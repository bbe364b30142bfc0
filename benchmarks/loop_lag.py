"""How long one export batch keeps the gateway's event loop from running.

What it is for: the "longest export stall" figure of ``make bench``. It runs
one gateway worker exactly as ``python -m gateway`` does (``run_worker``:
the GIL switch interval, ``build_telemetry``, ``create_app``), plus two
instruments: the exporter records when each batch export starts and ends,
and a probe thread sleeps 0.1 ms in a loop and records how late it wakes.
The export thread's own CPU time per batch is recorded too: the GIL time
one batch costs, which other processes on a shared machine do not blur
(the wake-up delays include their use of the cores).
A thread that wakes needs the GIL back, just as the event loop does after
its poll, so a late wake inside an export's window is the time the export
thread held the GIL against everyone else. On SIGTERM it writes what it saw
as JSON to ``--out``.

Not for: load (run.py drives it with wrk at c=1) or production use.

    python benchmarks/loop_lag.py --upstream URL --port N --out stats.json \
        [--switch-interval-s S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.sdk.trace.export import SpanExportResult  # noqa: E402

from gateway import cli  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from latency_common import telemetry  # noqa: E402

PROBE_SLEEP_S = 0.0001


class Recorder:
    def __init__(self) -> None:
        self.wakes: list[tuple[float, float]] = []  # (woke at, lateness s)
        self.exports: list[tuple[float, float, int]] = []  # (start, end, spans)
        self.export_cpu_s: list[float] = []  # the export thread's CPU per batch
        self.stop = threading.Event()

    def probe(self) -> None:
        clock = time.perf_counter
        while not self.stop.is_set():
            start = clock()
            time.sleep(PROBE_SLEEP_S)
            woke = clock()
            self.wakes.append((woke, woke - start - PROBE_SLEEP_S))

    def summary(self) -> dict[str, Any]:
        wakes = sorted(self.wakes)
        exports = sorted(self.exports)
        per_batch_ms: list[float] = []
        inside: set[int] = set()
        j = 0
        for start, end, _ in exports:
            while j < len(wakes) and wakes[j][0] < start:
                j += 1
            k = j
            worst = 0.0
            while k < len(wakes) and wakes[k][0] <= end + 0.002:
                worst = max(worst, wakes[k][1])
                inside.add(k)
                k += 1
            per_batch_ms.append(worst * 1e3)
        outside = [late * 1e3 for i, (_, late) in enumerate(wakes) if i not in inside]
        return {
            "batches": len(exports),
            "spans": sum(n for _, _, n in exports),
            "export_wall_ms_median": statistics.median((e - s) * 1e3 for s, e, _ in exports)
            if exports
            else None,
            "export_cpu_ms_median": statistics.median(self.export_cpu_s) * 1e3
            if self.export_cpu_s
            else None,
            "export_cpu_ms_p90": _p90([cpu * 1e3 for cpu in self.export_cpu_s]),
            "stall_ms_per_batch_median": statistics.median(per_batch_ms) if per_batch_ms else None,
            "stall_ms_per_batch_p90": _p90(per_batch_ms),
            "stall_ms_per_batch_max": max(per_batch_ms) if per_batch_ms else None,
            "stall_ms_outside_exports_median": statistics.median(outside) if outside else None,
            "stall_ms_outside_exports_p99": _p99(outside),
            "stall_ms_outside_exports_max": max(outside) if outside else None,
            "probes": len(wakes),
            "switch_interval_s": sys.getswitchinterval(),
        }


def _p90(values: list[float]) -> float | None:
    return sorted(values)[int(0.9 * (len(values) - 1))] if values else None


def _p99(values: list[float]) -> float | None:
    return sorted(values)[int(0.99 * (len(values) - 1))] if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--switch-interval-s",
        type=float,
        help="override the gateway's GIL switch interval (to compare)",
    )
    args = parser.parse_args()
    recorder = Recorder()
    build = telemetry.build_telemetry

    def instrumented(name: str, **kwargs: Any) -> telemetry.Telemetry:
        built = build(name, **kwargs)
        exporter = built.exporter
        assert exporter is not None
        export = exporter.export

        def timed(spans: Sequence[ReadableSpan]) -> SpanExportResult:
            start = time.perf_counter()
            cpu = time.thread_time()
            try:
                return export(spans)
            finally:
                recorder.export_cpu_s.append(time.thread_time() - cpu)
                recorder.exports.append((start, time.perf_counter(), len(spans)))

        exporter.export = timed  # type: ignore[method-assign]
        if args.switch_interval_s is not None:
            sys.setswitchinterval(args.switch_interval_s)
        return built

    telemetry.build_telemetry = instrumented  # type: ignore[assignment]
    config = GatewayConfig.from_env(
        {"upstream": args.upstream, "port": args.port, "workers": 1, "host": "127.0.0.1"}
    )
    probe = threading.Thread(target=recorder.probe, name="lag-probe", daemon=True)
    probe.start()
    code = cli.run_worker(config)
    recorder.stop.set()
    probe.join(timeout=5)
    args.out.write_text(json.dumps(recorder.summary()))
    return code


if __name__ == "__main__":
    sys.exit(main())
