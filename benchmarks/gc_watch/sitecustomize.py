"""Log the garbage collector's pauses of a process the bench starts.

What it is for: ``benchmarks/accuracy.py`` puts this directory on the
gateway's ``PYTHONPATH`` with ``BENCH_GC_LOG=<file>``; Python imports
``sitecustomize`` at start-up, and every collection that pauses the process
longer than 0.5 ms is appended to the file as one JSON line (pid,
generation, start in epoch ms, duration in ms), so a request the gateway
received late can be set against the collections of that moment. Nothing of
the gateway's own code changes.

Not for: production, or any process started without ``BENCH_GC_LOG``.
"""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Any

_LOG_PATH = os.environ.get("BENCH_GC_LOG")
_MIN_PAUSE_MS = 0.5


def _install(path: str) -> None:
    started: list[float] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter(), time.time_ns() / 1e6]
            return
        if not started:
            return
        pause_ms = (time.perf_counter() - started[0]) * 1e3
        if pause_ms >= _MIN_PAUSE_MS:
            line = {
                "pid": os.getpid(),
                "gen": info.get("generation"),
                "start_ms": round(started[1], 3),
                "pause_ms": round(pause_ms, 3),
            }
            with open(path, "a", encoding="utf-8") as log:
                log.write(json.dumps(line) + "\n")

    gc.callbacks.append(callback)


if _LOG_PATH:
    _install(_LOG_PATH)
