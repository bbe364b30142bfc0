"""``make bench``: overhead, accuracy, footprint and scaling of the gateway,
measured side by side in one run; writes benchmarks/RESULTS.md and
benchmarks/overhead.png and prints the tables.

What it is for: the numbers behind ARCHITECTURE.md §11 and issue 12, on this machine,
against nginx, a bare aiohttp proxy and a gunicorn Flask + requests proxy.
It installs what it needs when missing (Debian ``wrk`` and ``nginx-light``,
the pinned ``benchmarks/requirements.txt`` into this venv, the footprint's
node packages with ``npm ci``), starts every server on a loopback port in a
process group of its own, and stops them all at the end, also on failure.

Not for: pass/fail in CI (``make test`` is that); a missed target is a
finding to report, and the run still exits 0.

    python benchmarks/run.py [--quick] [--out DIR] [--duration S] [--repeats N] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # benchmarks/ modules, then tests.* helpers

import footprint  # noqa: E402
import harness  # noqa: E402
import microbench  # noqa: E402
import pyspy  # noqa: E402
import report  # noqa: E402
import servers  # noqa: E402
import viewer_bench  # noqa: E402
from harness import BENCH, ROOT, Procs, log  # noqa: E402
from report import Case  # noqa: E402

from viewer.store import DEFAULT_MAX_SPANS  # noqa: E402

ALL = (1, 16, 64)

CASES = [
    Case("direct", "direct to nginx", "wrk → the static nginx upstream itself", None, ALL),
    Case(
        "nginx-proxy",
        "nginx proxy_pass",
        "Debian nginx-light, 2 workers, `proxy_pass` to an `upstream` block with keepalive",
        "direct",
        ALL,
    ),
    Case(
        "bare-aiohttp",
        "bare aiohttp proxy",
        "`benchmarks/proxies/bare_aiohttp.py`: one ClientSession, streamed body, copied "
        "headers, uvloop, 2 SO_REUSEPORT processes; no tracing, no checks",
        "direct",
        ALL,
    ),
    Case(
        "gateway-notrace",
        "gateway, tracing disabled",
        "as below with `OTEL_SDK_DISABLED=true`: latency checks, tokens, Server-Timing, "
        "header rules still run; spans are no-ops",
        "direct",
        ALL,
    ),
    Case(
        "gateway",
        "**gateway (full)**",
        "`python -m gateway --workers 2`: full tracing (one SERVER span per request, "
        "OTLP/HTTP to a real receiver in its own process) and latency checks",
        "direct",
        ALL,
    ),
    Case(
        "gateway-2spans",
        "gateway, two spans",
        "the full gateway with `GATEWAY_SPANS=server,client` (SERVER + CLIENT span per request)",
        "direct",
        ALL,
    ),
    Case(
        "flask",
        "Flask + requests",
        "`benchmarks/proxies/flask_requests.py` under gunicorn gthread, 2 workers × 8 threads",
        "direct",
        ALL,
    ),
    Case(
        "flask-otel",
        "Flask + requests + OTel",
        "the same with FlaskInstrumentor + RequestsInstrumentor, BatchSpanProcessor → "
        "the same receiver",
        "direct",
        ALL,
    ),
    Case(
        "gateway-b512",
        "gateway, batch 512",
        "the full gateway with `OTEL_BSP_MAX_EXPORT_BATCH_SIZE=512` (section 4)",
        "direct",
        (1, 16),
    ),
    Case(
        "gateway-w1",
        "gateway, 1 worker",
        "the full gateway with `--workers 1` (section 4)",
        "direct",
        (16, 64),
    ),
    Case(
        "gateway-w4",
        "gateway, 4 workers",
        "the full gateway with `--workers 4` (section 4)",
        "direct",
        (16, 64),
    ),
    Case(
        "backend-direct",
        "direct to the Flask backend",
        "`gunicorn backend.wsgi:app` (gthread 2 × 8, instrumented, exporting), "
        "`GET /api/activities/home`",
        None,
        ALL,
    ),
    Case(
        "gateway-backend",
        "gateway → Flask backend",
        "the full gateway (2 workers) in front of that backend; CPU is the gateway's only",
        "backend-direct",
        ALL,
    ),
]

PATH = "/api/activities/home"
#: Targets that a py-spy profile explains when missed.
PROFILED_TARGETS = ("CPU per request", "added latency", "p99 at c=1")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py", description=__doc__.split("\n\n", 1)[0].replace("\n", " ")
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 repeat, 2 s loads, c=1 and 16 only, fewer accuracy cells, "
        "10 000 requests for RSS; writes to a temporary directory unless --out is given",
    )
    p.add_argument("--out", type=Path, help="where RESULTS.md and the pictures go")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 5, quick 2)")
    p.add_argument("--repeats", type=int, help="repeats per case (default 3, quick 1)")
    p.add_argument(
        "--profile", action="store_true", help="take the py-spy profile even if targets are met"
    )
    p.add_argument("--skip-install", action="store_true", help="do not install missing tools")
    args = p.parse_args()
    if args.duration is not None and not (args.duration.is_integer() and 1 <= args.duration <= 60):
        p.error("--duration must be a whole number of seconds from 1 to 60 (wrk's -d)")
    if args.repeats is not None and not 1 <= args.repeats <= 10:
        p.error("--repeats must be between 1 and 10")
    return args


# -- set-up ------------------------------------------------------------------------


def _run(argv: list[str], **kwargs: Any) -> None:
    log("$ " + " ".join(argv))
    subprocess.run(argv, check=True, **kwargs)


def ensure_tools(skip: bool) -> None:
    """Install what is missing: Debian packages (as root), the pinned Python
    extras, the node packages of the footprint comparison."""
    apt = [
        pkg
        for tool, pkg in (
            ("wrk", "wrk"),
            ("nginx", "nginx-light"),
            ("chromium", "chromium"),
            ("node", "nodejs"),
            ("npm", "npm"),
        )
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()
    ]
    if apt:
        if skip or os.geteuid() != 0:
            raise SystemExit(f"bench: missing {', '.join(apt)}: apt-get install -y {' '.join(apt)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-qq"], env=env)
        _run(["apt-get", "install", "-y", "-qq", *apt], env=env)
    venv_bin = Path(sys.executable).parent
    missing_py = (
        importlib.util.find_spec("matplotlib") is None or not (venv_bin / "py-spy").exists()
    )
    if missing_py:
        if skip:
            raise SystemExit("bench: pip install -r benchmarks/requirements.txt")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-q",
                "-r",
                str(BENCH / "requirements.txt"),
            ]
        )
    for folder, marker in (
        (BENCH / "footprint", "node_modules/esbuild"),
        (ROOT / "frontend-snippet", "node_modules/terser"),
    ):
        installed = folder / "node_modules" / ".package-lock.json"
        lock = folder / "package-lock.json"
        fresh = installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime
        if not (folder / marker).exists() or not fresh:
            if skip:
                raise SystemExit(f"bench: run npm ci in {folder}")
            _run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder)


def machine_and_versions() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text()
    mem = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)

    def out(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except OSError:
            return "?"
        return (
            (done.stdout or done.stderr).strip().splitlines()[0]
            if (done.stdout or done.stderr)
            else "?"
        )

    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    versions = {
        "Python": platform.python_version(),
        "aiohttp": dist("aiohttp"),
        "uvloop": dist("uvloop"),
        "OTel SDK": dist("opentelemetry-sdk"),
        "OTel instrumentations": dist("opentelemetry-instrumentation-flask"),
        "gunicorn": dist("gunicorn"),
        "Flask": dist("flask"),
        "requests": dist("requests"),
        "nginx": out(["nginx", "-v"]).replace("nginx version: nginx/", ""),
        "wrk": out(["wrk", "--version"]).split(" [")[0].replace("wrk ", ""),
        "Chromium": out(["chromium", "--version"]).replace("Chromium ", ""),
        "Playwright": dist("playwright"),
        "node": out(["node", "--version"]),
        "py-spy": dist("py-spy"),
    }
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else "?",
        "mem_gib": int(mem.group(1)) / 1024 / 1024 if mem else 0.0,
        "kernel": platform.release(),
        "versions": versions,
    }


# -- the timing headers ---------------------------------------------------------------


def snippet_headers(gateway_url: str) -> dict[str, str]:
    """What the snippet sends, with a fresh valid token from the gateway.

    ``X-Client-Timestamp`` is the token's own send time t2 (offset 0: the
    bench shares the gateway's clock), so the estimate t1 − ts stays within
    the token's bound and the verdict is ``ok`` for the next 60 s
    (MAX_UPLINK_MS); a run of any length still executes every check.
    """
    _, headers = harness.http_get(gateway_url + "/__gateway/clock")
    clock = headers["x-gateway-clock"]
    t2 = float(re.search(r"t2=([\d.]+)", clock).group(1))  # type: ignore[union-attr]
    token = re.search(r'tok="([^"]+)"', clock).group(1)  # type: ignore[union-attr]
    return {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03",
        "X-Client-Timestamp": f"{t2:.3f}",
        "X-Client-Clock": f'off=0.000, d=1.000, age=1.000, tok="{token}"',
        "X-Client-Prev": "span=b7ad6b7169203331, rtt=1.000, pre=0.100",
    }


# -- sections --------------------------------------------------------------------------


def start_load_servers(
    procs: Procs, workdir: Path, upstream: servers.Server, sink: servers.Server
) -> dict[str, servers.Server]:
    up = upstream.url
    out: dict[str, servers.Server] = {"direct": upstream}
    out["nginx-proxy"] = servers.nginx_proxy(procs, workdir, int(up.rsplit(":", 1)[1]))
    out["bare-aiohttp"] = servers.bare_aiohttp(procs, up, workers=2)
    out["gateway"] = servers.gateway(procs, "gateway", up, workers=2, otlp_endpoint=sink.url)
    out["gateway-notrace"] = servers.gateway(
        procs,
        "gateway-notrace",
        up,
        workers=2,
        otlp_endpoint=sink.url,
        env={"OTEL_SDK_DISABLED": "true"},
    )
    out["gateway-2spans"] = servers.gateway(
        procs,
        "gateway-2spans",
        up,
        workers=2,
        otlp_endpoint=sink.url,
        env={"GATEWAY_SPANS": "server,client"},
    )
    out["gateway-b512"] = servers.gateway(
        procs,
        "gateway-b512",
        up,
        workers=2,
        otlp_endpoint=sink.url,
        env={"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512"},
    )
    out["gateway-w1"] = servers.gateway(procs, "gateway-w1", up, workers=1, otlp_endpoint=sink.url)
    out["gateway-w4"] = servers.gateway(procs, "gateway-w4", up, workers=4, otlp_endpoint=sink.url)
    out["flask"] = servers.flask_requests(procs, up, otel=False, otlp_endpoint=sink.url)
    out["flask-otel"] = servers.flask_requests(procs, up, otel=True, otlp_endpoint=sink.url)
    backend = servers.backend(procs, sink.url)
    out["backend-direct"] = backend
    out["gateway-backend"] = servers.gateway(
        procs, "gateway-backend", backend.url, workers=2, otlp_endpoint=sink.url
    )
    return out


def overhead(
    targets: dict[str, servers.Server],
    cases: list[Case],
    concurrencies: tuple[int, ...],
    repeats: int,
    duration_s: float,
    warmup_s: float,
) -> list[harness.LoadSample]:
    token_gateway = targets["gateway"].url
    for case in cases:
        harness.wrk(
            targets[case.key].url + PATH,
            connections=16,
            duration_s=warmup_s,
            headers=snippet_headers(token_gateway),
        )
    samples: list[harness.LoadSample] = []
    runs = [(c, case) for c in concurrencies for case in cases if c in case.concurrencies]
    total = len(runs) * repeats
    done = 0
    for round_no in range(repeats):
        # Alternate the order so that drift (thermal, page cache, the sink's
        # backlog) does not favour the cases that come first.
        for conc, case in runs if round_no % 2 == 0 else list(reversed(runs)):
            server = targets[case.key]
            sample = harness.measured_load(
                case.key,
                server.url + PATH,
                server.pids(),
                connections=conc,
                duration_s=duration_s,
                headers=snippet_headers(token_gateway),
            )
            samples.append(sample)
            done += 1
            res = sample.result
            log(
                f"[{done}/{total}] {case.key:<16} c={conc:<3} {res.rps:8.0f} req/s  "
                f"p50 {res.p50_ms:7.3f}  p99 {res.p99_ms:7.2f} ms  "
                f"{sample.cpu_us_per_request:7.0f} µs/req"
                + (f"  errors {res.errors + res.non_2xx}" if res.errors + res.non_2xx else "")
            )
    return samples


def encoder_costs() -> list[tuple[int, float, float]]:
    """(batch, official µs/span, otlp_encode µs/span) on the gateway's spans."""
    import encoder_bench

    pair = encoder_bench.gateway_spans()
    rows = []
    for size in (1, 64):
        batch = (pair * size)[:size]
        rows.append(
            (
                size,
                encoder_bench.us_per_span(encoder_bench.ENCODERS["official"], batch),
                encoder_bench.us_per_span(encoder_bench.ENCODERS["otlp_encode"], batch),
            )
        )
    return rows


def loop_lag(
    procs: Procs,
    workdir: Path,
    upstream: servers.Server,
    sink: servers.Server,
    duration_s: float,
    switch_interval_s: float | None,
) -> dict[str, Any]:
    """One gateway worker with the stall probe (benchmarks/loop_lag.py) under
    wrk at c=1; what it saw, plus wrk's p50/p99."""
    port = harness.free_port()
    out = workdir / f"loop-lag-{switch_interval_s}.json"
    argv = [
        harness.python(),
        str(BENCH / "loop_lag.py"),
        "--upstream",
        upstream.url,
        "--port",
        str(port),
        "--out",
        str(out),
    ]
    if switch_interval_s is not None:
        argv += ["--switch-interval-s", str(switch_interval_s)]
    env = {
        **servers.QUIET_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
        "GATEWAY_CLOCK_KEY": "bench-clock-key-0123456789abcdef",
        "GATEWAY_TIMING_RATE": "1000000/s, burst 1000000",
    }
    proc = procs.start(f"loop-lag-{switch_interval_s}", argv, env=env)
    url = f"http://127.0.0.1:{port}"
    harness.wait_http(url + "/__gateway/clock", proc)
    harness.wrk(url + PATH, connections=1, duration_s=1.0, headers=snippet_headers(url))
    result = harness.wrk(
        url + PATH, connections=1, duration_s=duration_s, headers=snippet_headers(url)
    )
    procs.stop(proc, grace_s=15.0)
    stats: dict[str, Any] = json.loads(out.read_text())
    stats["p50_ms"], stats["p99_ms"] = result.p50_ms, result.p99_ms
    return stats


def spans_exported(sink: servers.Server, run: footprint.RssRun) -> dict[str, int]:
    """The SERVER spans (with a latency verdict) a receiver got from one
    gateway, against the requests wrk completed on it. wrk stops each chunk
    with up to ``connections`` requests in flight, which the gateway may
    still serve and export (and a request wrk gave up on may still have
    been served), so received − completed is in [0, chunks × connections +
    wrk errors] when nothing was lost; fewer received is spans lost."""
    return {
        "received": sum(sink_stats(sink).get("status", {}).values()),
        "completed": run.requests,
        "in_flight_max": run.chunks * run.connections + run.errors,
    }


def sink_stats(sink: servers.Server) -> dict[str, Any]:
    with urllib.request.urlopen(sink.url + "/stats", timeout=5) as response:
        stats: dict[str, Any] = json.loads(response.read())
        return stats


def wait_for_quiet(max_wait_s: float, busy_below: float = 0.15) -> list[str]:
    """Wait (bounded) until the machine is idle enough to measure; say how
    busy it was, for RESULTS.md."""
    deadline = time.monotonic() + max_wait_s
    busy = harness.busy_fraction()
    first = busy
    while busy >= busy_below and time.monotonic() < deadline:
        log(f"machine {100 * busy:.0f} % busy with other work: waiting for it to settle")
        busy = harness.busy_fraction(5.0)
    note = f"machine {100 * busy:.0f} % busy with other work when the run started"
    if first >= busy_below:
        note += f" (it was {100 * first:.0f} % at first; waited up to {max_wait_s:.0f} s)"
    log(note)
    return [note]


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (say, make was killed) unwinds like Ctrl-C, through main's finally."""
    raise KeyboardInterrupt


# -- main ---------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    quick = args.quick
    settings: dict[str, Any] = {
        "quick": quick,
        "duration_s": args.duration or (2.0 if quick else 5.0),
        "repeats": args.repeats or (1 if quick else 3),
        "concurrencies": (1, 16) if quick else ALL,
        "warmup_s": 1.0,
        "rss_requests": 10_000 if quick else 100_000,
        "clicks": 3 if quick else 8,
        "paths": [(25.0, 25.0), (40.0, 10.0)]
        if quick
        else [(0.0, 0.0), (5.0, 5.0), (25.0, 25.0), (100.0, 100.0), (40.0, 10.0)],
        "skews_ms": [-3_600_000.0, 0.0] if quick else [-3_600_000.0, 0.0, 5_000.0],
    }
    out_dir: Path = args.out or (Path(tempfile.mkdtemp(prefix="bench-quick-")) if quick else BENCH)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the demo server's access log

    signal.signal(signal.SIGTERM, _interrupt)
    ensure_tools(args.skip_install)

    r_notes = wait_for_quiet(30.0 if quick else 180.0)

    workdir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    workdir.chmod(0o755)  # nginx workers (user nobody) read their config dir
    procs = Procs(workdir)
    r: dict[str, Any] = {"settings": settings, "notes": r_notes}
    ok = False
    try:
        r["meta"] = machine_and_versions()
        log("sizes: snippet (terser) and the OpenTelemetry web SDK (esbuild)")
        r["sizes"] = {
            "snippet": footprint.snippet_size(),
            "served": footprint.served_size(),
            "otel": footprint.otel_sizes(),
            "otel_versions": footprint.otel_versions(),
        }

        log("in-process cost of each step of the gateway's request path")
        r["steps"] = microbench.measure_steps()
        r["gil"] = microbench.gil_handoff_us()

        log("starting servers")
        upstream = servers.nginx_static(procs, workdir)
        sink = servers.sink(procs)
        targets = start_load_servers(procs, workdir, upstream, sink)
        cases = [
            Case(
                c.key,
                c.label,
                c.meaning,
                c.baseline,
                tuple(x for x in c.concurrencies if x in settings["concurrencies"]),
            )
            for c in CASES
        ]
        if quick:
            cases = [c for c in cases if c.concurrencies]
        log(f"overhead: {len(cases)} cases, {settings['repeats']} repeats")
        with harness.ForeignCpu() as foreign:
            r["samples"] = overhead(
                targets,
                cases,
                settings["concurrencies"],
                settings["repeats"],
                settings["duration_s"],
                settings["warmup_s"],
            )
        r["foreign_share"] = foreign.foreign_share
        r["notes"].append(
            f"CPU used by processes other than the bench's own during the overhead section: "
            f"{100 * foreign.foreign_share:.1f} % of all cores (noise in the throughput and "
            "latency figures; CPU per request counts the server's own processes only)"
        )
        log(f"foreign CPU during the overhead section: {100 * foreign.foreign_share:.1f} %")
        time.sleep(1.0)  # the last batches reach the sink
        r["verdicts"] = sink_stats(sink).get("status", {})

        log("export stalls: loop-lag probe at c=1 (gateway's switch interval, then 5 ms)")
        r["loop_lag"] = []
        for interval in (None, 0.005):
            stats = loop_lag(procs, workdir, upstream, sink, settings["duration_s"] * 2, interval)
            r["loop_lag"].append(stats)
            log(
                f"switch interval {stats['switch_interval_s'] * 1e3:g} ms: "
                f"{stats['batches']} batches, stall p90 "
                f"{stats['stall_ms_per_batch_p90']} ms, "
                f"worst {stats['stall_ms_per_batch_max']} ms"
            )
        log("OTLP encoder alone, official against otlp_encode")
        r["encoder"] = encoder_costs()

        agg = report.aggregate(r["samples"])
        missed = [
            t.text
            for t in report.evaluate_targets(r, agg)
            if t.met is False and t.text.startswith(PROFILED_TARGETS)
        ]
        if missed or args.profile:
            why = "missed: " + "; ".join(missed) if missed else "--profile"
            log(f"profiling gateway workers with py-spy ({why})")
            for key, svg in (
                ("gateway", "flamegraph.svg"),
                ("gateway-notrace", "flamegraph-notrace.svg"),
            ):
                gw = targets[key]
                r.setdefault("profiles", {})[key] = pyspy.record(
                    gw.url + PATH,
                    gw.pids()[1:],
                    out_dir / svg,
                    workdir / f"profile-{key}.txt",
                    headers=snippet_headers(targets["gateway"].url),
                    seconds=5 if quick else 10,
                    py_spy=str(Path(sys.executable).parent / "py-spy"),
                )
            r["notes"].append(f"py-spy profiles taken because targets were {why}")

        # The load servers are done: stop them before the memory and browser runs.
        for key, server in targets.items():
            if key != "direct":
                with contextlib.suppress(Exception):
                    procs.stop(server.proc)

        r["rss"] = []
        # A receiver of its own for the run with the exporter up: what it
        # received is then this gateway's spans only, to set against the
        # requests wrk completed ("every span exported").
        rss_sink = servers.sink(procs, "sink-rss")
        for label, endpoint in (
            ("exporter up", rss_sink.url),
            ("exporter down", f"http://127.0.0.1:{harness.free_port()}"),
        ):
            gw = servers.gateway(
                procs,
                f"gateway-rss-{label.split()[1]}",
                upstream.url,
                workers=2,
                otlp_endpoint=endpoint,
            )
            r["rss"].append(
                footprint.rss_after_requests(
                    label,
                    gw,
                    target_requests=settings["rss_requests"],
                    headers_fn=lambda gw=gw: snippet_headers(gw.url),
                    max_seconds=60 if quick else 150,
                )
            )
            # SIGTERM: the gateway drains, then flushes the spans still queued.
            procs.stop(gw.proc, grace_s=30.0)
            if label == "exporter up":
                r["spans_exported"] = spans_exported(rss_sink, r["rss"][-1])
                log(f"every span exported? {r['spans_exported']}")

        log("accuracy: Chromium behind the delay relay")
        import accuracy

        keep_sink = servers.sink(procs, "sink-accuracy", keep=True)
        foreign = harness.ForeignCpu().__enter__()
        r["accuracy"] = accuracy.run(
            procs,
            accuracy.start_gateway(procs, upstream.url, keep_sink),
            keep_sink,
            settings["paths"],
            settings["skews_ms"],
            settings["clicks"],
        )
        foreign.__exit__(None, None, None)
        r["notes"].append(
            f"CPU used by processes other than the bench's own during the accuracy section: "
            f"{100 * foreign.foreign_share:.1f} % of all cores (Chromium, the relay and the "
            "gateway are sensitive to it: a request delayed by another process counts as error)"
        )
        log(f"foreign CPU during the accuracy section: {100 * foreign.foreign_share:.1f} %")
        ok = True
    finally:
        harness.kill_running()
        procs.stop_all()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"failed: server logs kept in {workdir}")

    r["meta"]["runtime_s"] = time.monotonic() - started
    r["meta"]["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    r["notes"].append(
        f"the gateway's CPU is that of its parent and all its workers (walked through "
        f"/proc/<pid>/task/*/children); gunicorn's likewise (master + workers); clock ticks "
        f"of {harness.CLOCK_TICKS_PER_S} Hz"
    )
    png = out_dir / "overhead.png"
    report.plot(png, cases, report.aggregate(r["samples"]))
    results_md = out_dir / "RESULTS.md"
    results_md.write_text(report.render(r, cases, png.name))
    print(report.console_tables(r, cases))
    log("viewer: every page with the store at its retention limit")
    viewer_bench.write_section(
        results_md,
        viewer_bench.section(viewer_bench.run(spans=20_000 if quick else DEFAULT_MAX_SPANS)),
    )
    log(f"wrote {results_md} and {png} in {r['meta']['runtime_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
