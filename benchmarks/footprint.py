"""Footprint: bytes a page downloads, memory a gateway holds.

What it is for: section 3 of ``make bench``. Sizes: the snippet measured by
the project's own ``frontend-snippet/scripts/size.mjs`` (terser, gzip -9),
what the gateway sends at ``/__gateway/snippet.js`` (its start-up code:
comments out, plain and gzip -9),
and the OpenTelemetry web SDK bundled by ``footprint/size.mjs`` (esbuild,
minify, gzip -9) from the pinned ``footprint/package.json``. Memory: the RSS
of a fresh ``python -m gateway`` (all its processes) idle, then after
100 000 requests, with the exporter up and with it down.

Not for: installing node packages (``run.py`` does, with ``npm ci``).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from harness import BENCH, ROOT, log, rss_kib, wrk
from servers import Server

_SIZE_RE = re.compile(r"(\d+) B raw, (\d+) B minified, (\d+) B minified\+gzip")


def snippet_size() -> dict[str, int]:
    # size.mjs exits 1 over its budget and still prints the figures: read
    # them whatever the exit code.
    done = subprocess.run(
        ["node", str(ROOT / "frontend-snippet" / "scripts" / "size.mjs")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = _SIZE_RE.search(done.stdout)
    if not match:
        raise RuntimeError(f"size.mjs printed no sizes: {done.stdout} {done.stderr}")
    raw, minified, gz = (int(g) for g in match.groups())
    return {"raw": raw, "min": minified, "gz": gz}


def served_size() -> dict[str, int]:
    """``/__gateway/snippet.js`` as a gateway with an empty allow-list sends
    it: the bytes its start-up builds (``gateway.reserved``), plain and gzip."""
    from gateway.reserved import SNIPPET_PATH, served_source
    from gateway.snippet import Encoded

    encoded = Encoded.of(served_source(SNIPPET_PATH.read_bytes()))
    return {"identity": len(encoded.identity), "gzip": len(encoded.gzip)}


def otel_sizes() -> dict[str, dict[str, int]]:
    done = subprocess.run(
        ["node", str(BENCH / "footprint" / "size.mjs")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    sizes: dict[str, dict[str, int]] = json.loads(done.stdout.strip().splitlines()[-1])
    return sizes


def otel_versions() -> dict[str, str]:
    lock = json.loads((BENCH / "footprint" / "package-lock.json").read_text())
    packages: dict[str, Any] = lock.get("packages", {})
    out = {}
    for name in (
        "@opentelemetry/api",
        "@opentelemetry/sdk-trace-web",
        "@opentelemetry/instrumentation-fetch",
        "@opentelemetry/context-zone",
        "@opentelemetry/exporter-trace-otlp-http",
        "zone.js",
        "esbuild",
    ):
        entry = packages.get(f"node_modules/{name}")
        if entry:
            out[name] = entry["version"]
    return out


@dataclass
class RssRun:
    label: str
    idle_kib: int
    after_kib: int = 0
    requests: int = 0
    seconds: float = 0.0
    curve: list[tuple[int, int]] = field(default_factory=list)  # (requests so far, RSS KiB)
    per_process_kib: list[int] = field(default_factory=list)
    chunks: int = 0  # wrk runs
    connections: int = 0  # per wrk run
    errors: int = 0  # wrk's socket errors and timeouts: maybe served, not completed

    @property
    def growth_mib(self) -> float:
        return (self.after_kib - self.idle_kib) / 1024


def rss_after_requests(
    label: str,
    server: Server,
    *,
    target_requests: int,
    headers_fn: Any,
    connections: int = 16,
    max_seconds: float = 150.0,
    settle_s: float = 2.0,
) -> RssRun:
    """Idle RSS, then wrk in chunks (each bounded) until ``target_requests``
    are done or ``max_seconds`` pass, then RSS again once the load stopped."""
    time.sleep(settle_s)
    run = RssRun(label, idle_kib=rss_kib(server.pids()), connections=connections)
    run.curve.append((0, run.idle_kib))
    started = time.monotonic()
    rate = 2000.0
    while run.requests < target_requests and time.monotonic() - started < max_seconds:
        remaining = target_requests - run.requests
        left_s = max_seconds - (time.monotonic() - started)
        chunk_s = max(1.0, min(10.0, math.ceil(remaining / rate * 1.05), left_s))
        result = wrk(
            server.url + "/api/activities/home",
            connections=connections,
            duration_s=chunk_s,
            headers=headers_fn(),
        )
        run.requests += result.requests
        run.chunks += 1
        run.errors += result.errors
        rate = max(result.rps, 100.0)
        run.curve.append((run.requests, rss_kib(server.pids())))
    run.seconds = time.monotonic() - started
    time.sleep(settle_s)
    pids = server.pids()
    run.after_kib = rss_kib(pids)
    run.per_process_kib = [rss_kib([pid]) for pid in pids]
    log(
        f"rss {label}: idle {run.idle_kib / 1024:.1f} MiB, after {run.requests} requests "
        f"{run.after_kib / 1024:.1f} MiB ({run.growth_mib:+.1f} MiB) in {run.seconds:.0f} s"
    )
    return run
