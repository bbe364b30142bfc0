"""The local viewer when full: every page's time and the server's memory at
the retention limit; writes the "Viewer when full" section of RESULTS.md.

What it is for: the claim that each page of ``python -m viewer``
(``/``, ``/traces/<id>``, ``/latency``, the ``/api/*`` JSON) answers in
under 300 ms with the store at its default retention limit. It fills a
SQLite store with 200 000 spans (50 000 traces as the stack exports them:
browser CLIENT, gateway SERVER with the ``latency.*`` attributes, backend
SERVER with ``http.route``, its mock-data span; a few dozen routes, over
the last 20 hours), starts the viewer on a loopback port, times several
requests of every page over a real socket (median and max) and reads the
viewer's RSS (now and peak) from ``/proc``. ``run.py`` calls it after
writing RESULTS.md; alone:

    .venv/bin/python benchmarks/viewer_bench.py [--spans N] [--requests N] [--out RESULTS.md]

Not for: pass/fail (the tests check behaviour, not time); a page over
300 ms is reported as "not met".
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import BENCH, Procs, free_port, log, python, wait_http

from viewer.spans import SpanRecord
from viewer.store import DEFAULT_MAX_SPANS, Store

TARGET_MS = 300.0
SPANS_PER_TRACE = 4
MS = 1_000_000
SECTION_START = "<!-- viewer-bench:start -->"
SECTION_END = "<!-- viewer-bench:end -->"
ROUTES = [
    f"/api/{area}/{leaf}"
    for area in ("activities", "users", "orders", "search", "feed", "billing")
    for leaf in ("home", "list", "<int:id>", "detail", "stats", "export")
]  # 36 routes


def _ids(rng: random.Random) -> Iterator[str]:
    while True:
        yield f"{rng.getrandbits(64) | 1:016x}"


def synthetic_trace(rng: random.Random, start_ns: int) -> list[SpanRecord]:
    """One browser request through the gateway, with the attributes the
    real services set (sizes of the stored JSON are realistic)."""
    trace_id = f"{rng.getrandbits(128) | 1:032x}"
    ids = _ids(rng)
    browser, gateway, backend, mock = next(ids), next(ids), next(ids), next(ids)
    route = ROUTES[min(int(rng.expovariate(0.15)), len(ROUTES) - 1)]  # a few busy routes
    uplink_ms = round(rng.lognormvariate(3.0, 0.6), 3)
    backend_ms = round(rng.lognormvariate(3.2, 0.5), 3)
    gateway_ms = round(rng.uniform(0.3, 3.0), 3)
    rtt_ms = round(2 * uplink_ms + backend_ms + gateway_ms, 3)
    ok = rng.random() < 0.9
    path = route.replace("<int:id>", str(rng.randrange(1, 10_000)))
    gw_start = start_ns + int(uplink_ms * MS)
    be_start = gw_start + int(gateway_ms * MS / 2)
    http = {
        "http.request.method": "GET",
        "url.path": path,
        "url.scheme": "http",
        "server.address": "localhost",
        "server.port": 8080,
        "network.protocol.version": "1.1",
        "user_agent.original": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131",
        "http.response.status_code": 200,
    }
    latency = {
        "latency.status": "ok" if ok else "unsynced",
        "latency.reason": "bounded" if ok else "no_clock_token",
        "latency.rtt_ms": rtt_ms,
        "latency.gateway_ms": gateway_ms,
        "client.address": "127.0.0.1",
    }
    if ok:
        latency |= {"latency.uplink_ms": uplink_ms, "latency.trust": "server_bounded"}

    def span(
        span_id: str, parent: str, service: str, name: str, kind: int, start: int, dur_ms: float,
        attributes: dict[str, object],
    ) -> SpanRecord:  # fmt: skip
        return SpanRecord(trace_id, span_id, parent, service, name, kind, start,
                          start + int(dur_ms * MS), 0, "", attributes, [])  # fmt: skip

    total_ms = rtt_ms + gateway_ms
    return [
        span(browser, "", "browser", "GET", 3, start_ns, total_ms, {**http, "url.full": path}),
        span(gateway, browser, "gateway", f"GET {route}", 2, gw_start, backend_ms + gateway_ms,
             {**http, **latency}),
        span(backend, gateway, "backend", f"GET {route}", 2, be_start, backend_ms,
             {**http, "http.route": route}),
        span(mock, backend, "backend", "mock-data", 1, be_start + MS, backend_ms / 2,
             {"mock.items": rng.randrange(1, 50)}),
    ]  # fmt: skip


def fill(db: Path, spans: int, seed: int = 12) -> tuple[float, str, str]:
    """Fill ``db`` with ``spans`` spans in exporter-sized batches (512) over
    the last 20 hours; returns (spans stored per second, the newest trace id,
    an old trace id)."""
    rng = random.Random(seed)
    traces = spans // SPANS_PER_TRACE
    now_ns = time.time_ns()
    span_ns = 20 * 3600 * 10**9 // traces
    started = time.perf_counter()
    first = newest = ""
    with Store(db, max_spans=DEFAULT_MAX_SPANS) as store:
        batch: list[SpanRecord] = []
        for i in range(traces):
            trace = synthetic_trace(rng, now_ns - (traces - i) * span_ns)
            first, newest = first or trace[0].trace_id, trace[0].trace_id
            batch += trace
            if len(batch) >= 512:
                store.insert(batch)
                batch = []
        store.insert(batch)
        stored = store.count()
    elapsed = time.perf_counter() - started
    log(f"viewer bench: {stored} spans stored in {elapsed:.1f} s")
    return stored / elapsed, newest, first


@dataclass
class PageTime:
    path: str
    status: int
    size_bytes: int
    median_ms: float
    max_ms: float

    @property
    def met(self) -> bool:
        return self.status == 200 and self.max_ms < TARGET_MS


def time_page(port: int, path: str, requests: int) -> PageTime:
    """One warm-up, then ``requests`` timed requests, each on a new
    connection (what a browser tab reload costs)."""
    times: list[float] = []
    status = size = 0
    for i in range(requests + 1):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        started = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        elapsed_ms = (time.perf_counter() - started) * 1000
        conn.close()
        status, size = response.status, len(body)
        if i:
            times.append(elapsed_ms)
    return PageTime(path, status, size, statistics.median(times), max(times))


def rss_kib(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    now = re.search(r"VmRSS:\s+(\d+) kB", text)
    peak = re.search(r"VmHWM:\s+(\d+) kB", text)
    return (int(now.group(1)) if now else 0, int(peak.group(1)) if peak else 0)


@dataclass
class Result:
    spans: int
    fill_spans_per_s: float
    db_bytes: int
    pages: list[PageTime]
    rss_kib: int
    peak_rss_kib: int
    requests: int
    load_average: float


def run(spans: int = DEFAULT_MAX_SPANS, requests: int = 7) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="viewer-bench-"))
    db = workdir / "traces.db"
    rate, newest, oldest = fill(db, spans)
    procs = Procs(workdir)
    port = free_port()
    try:
        viewer = procs.start(
            "viewer",
            [python(), "-m", "viewer", "--port", str(port), "--db", str(db)],
        )
        wait_http(f"http://127.0.0.1:{port}/api/traces?limit=1", viewer)
        load_average = os.getloadavg()[0]
        paths = [
            "/",
            "/?limit=500",
            f"/traces/{newest}",
            f"/traces/{oldest}",
            "/latency",
            "/latency?since_minutes=60",
            "/api/traces",
            "/api/traces?limit=500",
            f"/api/traces/{newest}",
            "/api/latency",
            "/api/latency?since_minutes=60",
        ]
        pages = [time_page(port, path, requests) for path in paths]
        for page in pages:
            log(f"viewer bench: {page.path}: median {page.median_ms:.1f} ms, max {page.max_ms:.1f}")
        rss, peak = rss_kib(viewer.pid)
    finally:
        procs.stop_all()
    with Store(db) as store:
        stored, used = store.count(), store.used_bytes()
    for path in workdir.iterdir():
        path.unlink()
    workdir.rmdir()
    return Result(stored, rate, used, pages, rss, peak, requests, load_average)


def section(result: Result) -> str:
    met = all(p.met for p in result.pages)
    lines = [
        SECTION_START,
        "## Viewer when full (`benchmarks/viewer_bench.py`)",
        "",
        f"A store at the retention limit: **{result.spans:,} spans** (traces of 4 spans: "
        "browser, gateway SERVER, backend SERVER, mock-data; 36 routes; over 20 hours), "
        f"{result.db_bytes / 2**20:.0f} MiB of pages, filled at "
        f"{result.fill_spans_per_s:,.0f} spans/s in batches of 512. Each page: one warm-up, then "
        f"{result.requests} requests on fresh loopback connections. Target: every page under "
        f"{TARGET_MS:.0f} ms — **{'met' if met else 'not met'}**.",
        "",
        "| page | status | bytes | median ms | max ms | < 300 ms |",
        "|---|---|---:|---:|---:|---|",
    ]
    for p in result.pages:
        path = re.sub(r"[0-9a-f]{32}", "<id>", p.path)
        lines.append(
            f"| `{path}` | {p.status} | {p.size_bytes:,} | {p.median_ms:.1f} | {p.max_ms:.1f} "
            f"| {'met' if p.met else 'not met'} |"
        )
    lines += [
        "",
        f"Viewer RSS after the requests: {result.rss_kib / 1024:.0f} MiB "
        f"(peak {result.peak_rss_kib / 1024:.0f} MiB). Load average (1 min) when the "
        f"requests began: {result.load_average:.2f} on {os.cpu_count()} cores (other work "
        "on the machine slows every figure).",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def write_section(results_md: Path, text: str) -> None:
    """Replace this bench's section of ``results_md`` (or add it before the
    log), leaving every other section as it is."""
    old = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    if SECTION_START in old and SECTION_END in old:
        head, rest = old.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        new = head + text + ("\n" + tail if tail else "")
    elif "\n## Log\n" in old:
        head, tail = old.split("\n## Log\n", 1)
        new = head.rstrip("\n") + "\n\n" + text + "\n## Log\n" + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text
    results_md.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=DEFAULT_MAX_SPANS)
    parser.add_argument("--requests", type=int, default=7)
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args(argv)
    result = run(args.spans, args.requests)
    text = section(result)
    write_section(args.out, text)
    print(text)
    log(f"viewer bench: wrote its section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
