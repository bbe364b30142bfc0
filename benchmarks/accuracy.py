"""Accuracy: the snippet in real Chromium behind a delay relay, against the truth.

What it is for: section 2 of ``make bench``. For each path (one-way delays
injected by ``tests/relay.py`` in a process of its own) and each page clock
skew (``tests/browser.py``'s init script), the demo page makes a handful of
sequential requests through relay → gateway (``python -m gateway``, one
worker, exporting to a ``--keep`` sink). Each request's exported
``latency.uplink_ms`` is compared with the injected uplink plus the
request's own pre-request wait (Resource Timing ``requestStart −
startTime``, the snippet's ``pre``), and ``latency.rtt_ms`` with up + down.
Next to them, the naive ``receipt − X-Client-Timestamp`` (t1 from the
response's ``X-Gateway-Clock``, the timestamp from the request Chromium
sent), which carries the page's clock skew.

Each request is also split into its parts from the relay's trace log
(``tests/relay.py --trace-log``): Chromium's ``requestStart`` → the relay,
the relay's actual hold (its errors are also given against that, so a relay
thread that woke late is not counted against the gateway), relay → the
gateway's receipt t1, and the nearest span export. Run alone, it prints
every request::

    .venv/bin/python benchmarks/accuracy.py --paths 0/0,5/5 --skews-s=-3600,0 [--json F]

Not for: pass/fail (``tests/test_browser.py`` asserts; this measures).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import servers
from harness import Procs, free_port, log, python
from servers import Server

from tests.browser import DemoThread, chromium, skew_script

#: The relay stands for a network, which no CPU scheduler delays: as root it
#: runs under SCHED_FIFO (and at this nice value where that is refused), so
#: the threads that hold and pass on each chunk wake ahead of the machine's
#: other busy processes. On a busy 2-core machine nice -10 alone still let it
#: hold requests up to 25 ms too long; under SCHED_FIFO at most 0.32 ms.
RELAY_NICE = -10
RELAY_REALTIME = True
_RELAY_RE = re.compile(r"relay listening on (http://127\.0\.0\.1:\d+)")
_CLOCK_T1_RE = re.compile(r"t1=([\d.]+)")


@dataclass
class Cell:
    up_ms: float
    down_ms: float
    skew_ms: float
    uplink_err_ms: list[float] = field(default_factory=list)
    rtt_err_ms: list[float] = field(default_factory=list)
    naive_err_ms: list[float] = field(default_factory=list)
    exact_err_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    pre_ms: list[float] = field(default_factory=list)
    relay_rtt_ms: float = float("nan")
    #: The same errors against what the relay actually held each request (its
    #: trace log), instead of the nominal up / up + down: see :func:`_held_errors`.
    uplink_err_held_ms: list[float] = field(default_factory=list)
    rtt_err_held_ms: list[float] = field(default_factory=list)
    #: How much longer than nominal the relay held each measured request, up + down.
    relay_extra_ms: list[float] = field(default_factory=list)
    #: One row per measured request, in order: see :func:`_row`.
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def symmetric(self) -> bool:
        return self.up_ms == self.down_ms


def _stats(errors: list[float]) -> tuple[float, float]:
    if not errors:
        return float("nan"), float("nan")
    magnitudes = [abs(e) for e in errors]
    return statistics.fmean(magnitudes), max(magnitudes)


def summarize(cell: Cell) -> dict[str, Any]:
    uplink_mean, uplink_max = _stats(cell.uplink_err_ms)
    rtt_mean, rtt_max = _stats(cell.rtt_err_ms)
    # The same rtt figures against the relay's own measured round trip.
    rtt_probe_mean, _ = _stats(
        [e + cell.up_ms + cell.down_ms - cell.relay_rtt_ms for e in cell.rtt_err_ms]
    )
    naive_mean, naive_max = _stats(cell.naive_err_ms)
    held_uplink_mean, held_uplink_max = _stats(cell.uplink_err_held_ms)
    held_rtt_mean, held_rtt_max = _stats(cell.rtt_err_held_ms)
    exact_mean, exact_max = _stats(cell.exact_err_ms)
    return {
        "path": f"{cell.up_ms:g}/{cell.down_ms:g}",
        "skew_ms": cell.skew_ms,
        "n": len(cell.uplink_err_ms),
        "n_rtt": len(cell.rtt_err_ms),
        "uplink_mean": uplink_mean,
        "uplink_max": uplink_max,
        "uplink_signed_mean": statistics.fmean(cell.uplink_err_ms) if cell.uplink_err_ms else None,
        "rtt_mean": rtt_mean,
        "rtt_max": rtt_max,
        "rtt_probe_mean": rtt_probe_mean,
        "n_held": len(cell.uplink_err_held_ms),
        "n_rtt_held": len(cell.rtt_err_held_ms),
        "uplink_held_mean": held_uplink_mean,
        "uplink_held_max": held_uplink_max,
        "rtt_held_mean": held_rtt_mean,
        "rtt_held_max": held_rtt_max,
        "relay_extra_mean": statistics.fmean(cell.relay_extra_ms) if cell.relay_extra_ms else None,
        "relay_extra_max": max(cell.relay_extra_ms) if cell.relay_extra_ms else None,
        "exact_mean": exact_mean,
        "exact_max": exact_max,
        "naive_mean": naive_mean,
        "naive_max": naive_max,
        "pre_mean": statistics.fmean(cell.pre_ms) if cell.pre_ms else float("nan"),
        "statuses": cell.statuses,
        "relay_rtt_ms": cell.relay_rtt_ms,
        "symmetric": cell.symmetric,
        "to_relay_median": _median(cell.rows, "to_relay_ms"),
        "to_gateway_median": _median(cell.rows, "to_gateway_ms"),
        "rows": cell.rows,
    }


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(values) if values else None


def _start_relay(
    procs: Procs,
    target_port: int,
    up_ms: float,
    down_ms: float,
    name: str = "relay",
    trace_log: Path | None = None,
) -> str:
    proc = procs.start(
        f"{name}-{up_ms:g}-{down_ms:g}",
        [
            python(),
            "-m",
            "tests.relay",
            "--target-port",
            str(target_port),
            "--up-ms",
            str(up_ms),
            "--down-ms",
            str(down_ms),
            *(["--trace-log", str(trace_log)] if trace_log else []),
            "--nice",
            str(RELAY_NICE),
            *(["--realtime"] if RELAY_REALTIME else []),
        ],
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = _RELAY_RE.search(proc.log_path.read_text(errors="replace"))
        if match:
            return match.group(1)
        if not proc.alive():
            break
        time.sleep(0.05)
    raise RuntimeError(f"relay did not start:\n{proc.tail()}")


class _Echo:
    """A loopback TCP echo server in a thread: the far end of the relay probe."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def relay_rtt_ms(relay_url: str, probes: int = 30) -> float:
    """The relay's actual round trip: median time for one byte to go through
    it to an echo server and back. It differs from up + down by the relay's
    own forwarding and wake-up lateness (well under 0.3 ms since it spins the
    last stretch of each delay), which every measurement through it includes."""
    port = int(relay_url.rsplit(":", 1)[1])
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(probes + 1):
            start = time.perf_counter()
            sock.sendall(b"x")
            if not sock.recv(1):
                raise RuntimeError("the relay closed the probe connection")
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])  # the first one also paid the connect


def _sink_trace(sink: Server, trace_id: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{sink.url}/trace/{trace_id}", timeout=5) as response:
        spans: list[dict[str, Any]] = json.loads(response.read())
        return spans


async def _cell(
    browser: Any,
    demo_url: str,
    sink: Server,
    up_ms: float,
    down_ms: float,
    skew_ms: float,
    clicks: int,
    gateway_pids: list[int],
) -> Cell:
    cell = Cell(up_ms, down_ms, skew_ms)
    runqueue_ms: list[float] = []  # per click: the gateway's wait for a CPU meanwhile
    context = await browser.new_context()
    try:
        await context.add_init_script(skew_script(skew_ms))
        page = await context.new_page()
        responses: list[Any] = []
        page.on("response", lambda response: responses.append(response))
        await page.goto(demo_url)
        await page.wait_for_function(
            # A clock sample: `best` in older snippets, its fields merged in newer ones.
            "(c => !!c && (c.best != null || c.off != null))"
            "(window.LatencyGateway && LatencyGateway.clock())",
            timeout=30_000,
        )
        await _burst_done(responses, quiet_s=3 * (up_ms + down_ms) / 1000 + 0.3)
        await page.evaluate("window.demoReady")
        start = await page.evaluate("LatencyGateway.requests.length")
        for _ in range(WARMUP_CLICKS + clicks):
            before = await page.evaluate("LatencyGateway.requests.length")
            waited_before_ms = runqueue_wait_ms(gateway_pids)
            await page.click("#reload")
            await page.wait_for_function(
                f"LatencyGateway.requests.length > {before}", timeout=30_000
            )
            runqueue_ms.append(max(0.0, runqueue_wait_ms(gateway_pids) - waited_before_ms))
        # Each record is complete once matched to its Resource Timing entry.
        await page.wait_for_function(
            f"LatencyGateway.requests.slice({start}).filter(r => r.pre != null).length"
            f" >= {WARMUP_CLICKS + clicks}",
            timeout=30_000,
        )
        every: list[dict[str, Any]] = await page.evaluate("LatencyGateway.requests")
        records = every[start + WARMUP_CLICKS :]
        timing: dict[str, dict[str, float]] = await page.evaluate(_RESOURCE_TIMING_JS)
        burst_end_ms = timing.pop("burst", {}).get("end")
        exchanges = await _exchanges_by_trace(responses)
    finally:
        await context.close()

    span_to_trace = {r.get("spanId"): r.get("traceId") for r in every}
    truth_rtt = up_ms + down_ms
    for index, record in enumerate(records):
        trace_id = record.get("traceId")
        if not trace_id or record.get("pre") is None:
            continue
        spans: list[dict[str, Any]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not spans:
            spans = _sink_trace(sink, trace_id)
            if not spans:
                await asyncio.sleep(0.1)
        if not spans:
            raise RuntimeError(f"the gateway span of trace {trace_id} never reached the sink")
        attrs = spans[0]
        status = str(attrs.get("latency.status"))
        cell.statuses[status] = cell.statuses.get(status, 0) + 1
        truth_uplink = up_ms + float(record["pre"])
        cell.pre_ms.append(float(record["pre"]))
        if attrs.get("latency.uplink_ms") is not None:
            cell.uplink_err_ms.append(float(attrs["latency.uplink_ms"]) - truth_uplink)
        if attrs.get("latency.rtt_ms") is not None:
            cell.rtt_err_ms.append(float(attrs["latency.rtt_ms"]) - truth_rtt)
        real_uplink = None
        exchange = exchanges.get(trace_id)
        if exchange is not None:
            cell.naive_err_ms.append(exchange.naive_ms - truth_uplink)
            # Page and gateway share this machine's clock and the skew is
            # ours, so t1 − ts + skew is the request's real uplink (to the
            # ms the snippet's Date.now() anchor is truncated to).
            real_uplink = exchange.naive_ms + skew_ms
            if attrs.get("latency.uplink_ms") is not None:
                cell.exact_err_ms.append(float(attrs["latency.uplink_ms"]) - real_uplink)
        row = _row(index, record, attrs, timing.get(trace_id, {}), real_uplink)
        row["t1_ms"] = exchange.t1_ms if exchange else None
        row["gw_runqueue_ms"] = round(runqueue_ms[WARMUP_CLICKS + index], 3)
        prev_span = exchange.prev_span if exchange else None
        row["prev_trace"] = span_to_trace.get(prev_span or "")
        if row["start_ms"] is not None and burst_end_ms:
            row["after_burst_ms"] = row["start_ms"] - burst_end_ms
        cell.rows.append(row)
    return cell


#: Resource Timing of every request the gateway answered, by trace id (from
#: the gateway's traceparent in Server-Timing), relative to the page's start.
_RESOURCE_TIMING_JS = """() => {
  const out = {};
  for (const e of performance.getEntriesByType("resource")) {
    for (const m of e.serverTiming || []) {
      if (m.name !== "traceparent") continue;
      out[m.description.split("-")[1]] = {
        start: e.startTime, connectStart: e.connectStart, connectEnd: e.connectEnd,
        requestStart: e.requestStart, responseStart: e.responseStart,
      };
    }
  }
  const clocks = performance.getEntriesByType("resource").filter(
    (e) => e.name.includes("/__gateway/clock"));
  out.burst = { end: Math.max(0, ...clocks.map((e) => e.responseEnd)), n: clocks.length };
  return out;
}"""


def _row(
    index: int,
    record: dict[str, Any],
    attrs: dict[str, Any],
    timing: dict[str, float],
    real_uplink_ms: float | None,
) -> dict[str, Any]:
    """What one request did, for the per-request table of a standalone run:
    the page's view (pre, its own round trip), the gateway's span, and the
    real uplink (t1 − ts + skew)."""

    def num(value: Any) -> float | None:
        return None if value is None else float(value)

    connect = (
        timing["connectEnd"] - timing["connectStart"]
        if timing.get("connectStart") is not None
        else None
    )
    return {
        "i": index,
        "trace": record.get("traceId"),
        "start_ms": num(timing.get("start")),
        "new_connection": bool(connect) if connect is not None else None,
        "pre_ms": num(record.get("pre")),
        "page_rtt_ms": num(record.get("rtt")),
        "gw_ms": num(record.get("gw")),
        "uplink_ms": num(attrs.get("latency.uplink_ms")),
        "real_uplink_ms": real_uplink_ms,
        "rtt_ms": num(attrs.get("latency.rtt_ms")),
        "prev_pre_ms": num(attrs.get("latency.pre_request_ms")),
        "sync_delay_ms": num(attrs.get("latency.sync_delay_ms")),
        "status": attrs.get("latency.status"),
        "exported_ms": num(attrs.get("sink.received_ms")),
    }


#: The gateway's span export interval in this section.
SCHEDULE_DELAY_MS = 100


def start_gateway(
    procs: Procs,
    upstream_url: str,
    sink: Server,
    schedule_delay_ms: int = SCHEDULE_DELAY_MS,
) -> Callable[[str, dict[str, str]], Server]:
    """The ``gateway_factory`` :func:`run` takes: one worker in front of
    ``upstream_url``, exporting to ``sink`` every ``schedule_delay_ms``."""
    return lambda origins, env: servers.gateway(
        procs,
        "gateway-accuracy",
        upstream_url,
        workers=1,
        otlp_endpoint=sink.url,
        env={**env, "OTEL_BSP_SCHEDULE_DELAY": str(schedule_delay_ms)},
        allowed_origins=origins,
    )


#: Requests made, and not counted, before a cell's measured ones. The first
#: request after a page load meets a machine still busy with that page load
#: (a new renderer process starts per browser context, the demo renders its
#: feed), so it carries scheduling delays no network has; and the first
#: measured request's rtt is that of the request before it (X-Client-Prev).
WARMUP_CLICKS = 2

#: The snippet's start-up sync burst (its default ``syncSamples``).
BURST_SAMPLES = 5


async def _burst_done(responses: list[Any], quiet_s: float) -> None:
    """Until the sync burst is over (its requests carry no clock data before):
    all its answers are in, or none came for ``quiet_s``. Counted from the
    network, not from the snippet's internals, which are free to change."""
    deadline = time.monotonic() + 30
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = sum("/__gateway/clock" in r.url for r in responses)
        if count >= BURST_SAMPLES:
            return
        if count != seen:
            seen, since = count, time.monotonic()
        elif count and time.monotonic() - since > quiet_s:
            return
        await asyncio.sleep(0.02)
    raise RuntimeError("the snippet's clock sync burst never finished")


@dataclass
class _Exchange:
    """One request as Chromium sent it and the gateway answered it."""

    naive_ms: float  # t1 − X-Client-Timestamp
    t1_ms: float  # the gateway's receipt, from X-Gateway-Clock
    prev_span: str | None  # X-Client-Prev's span: whose round trip this request reports


_PREV_SPAN_RE = re.compile(r"span=([0-9a-f]{16})")


async def _exchanges_by_trace(responses: list[Any]) -> dict[str, _Exchange]:
    """trace id → its exchange, from what Chromium actually sent and received
    (the CORS preflights carry no timestamp and are skipped)."""
    out: dict[str, _Exchange] = {}
    for response in responses:
        request_headers = await response.request.all_headers()
        stamp = request_headers.get("x-client-timestamp")
        traceparent = request_headers.get("traceparent", "")
        if stamp is None or traceparent.count("-") != 3:
            continue
        clock = (await response.all_headers()).get("x-gateway-clock", "")
        match = _CLOCK_T1_RE.search(clock)
        if match:
            t1 = float(match.group(1))
            prev = _PREV_SPAN_RE.search(request_headers.get("x-client-prev", ""))
            out[traceparent.split("-")[1]] = _Exchange(
                t1 - float(stamp), t1, prev.group(1) if prev else None
            )
    return out


def run(
    procs: Procs,
    gateway_factory: Any,
    sink: Server,
    paths: list[tuple[float, float]],
    skews_ms: list[float],
    clicks: int,
) -> list[dict[str, Any]]:
    """Every (path, skew) cell; ``gateway_factory(allowed_origins, env)``
    starts the gateway with ``env`` added to its environment (the GC pause
    log, ``benchmarks/gc_watch``) and returns its :class:`Server`."""
    demo_ports = [free_port() for _ in paths]
    origins = ",".join(f"http://127.0.0.1:{port}" for port in demo_ports)
    gc_log = procs.log_dir / "gateway-gc.jsonl"
    gateway: Server = gateway_factory(origins, gc_watch_env(gc_log))
    gateway_port = int(gateway.url.rsplit(":", 1)[1])
    demos: list[DemoThread] = []
    cells: list[Cell] = []
    echo = _Echo()
    relay_rtts: list[float] = []
    trace_logs: list[Path] = []

    async def drive() -> None:
        async with chromium() as browser:
            for i, ((up_ms, down_ms), demo) in enumerate(zip(paths, demos, strict=True)):
                for skew_ms in skews_ms:
                    cell = await _cell(
                        browser, demo.url, sink, up_ms, down_ms, skew_ms, clicks, gateway.pids()
                    )
                    cell.relay_rtt_ms = relay_rtts[i]
                    summary = summarize(cell)
                    log(
                        f"accuracy {summary['path']:>7} skew {skew_ms / 1000:+8.0f} s: "
                        f"uplink |err| mean {summary['uplink_mean']:.2f} ms, "
                        f"rtt |err| mean {summary['rtt_mean']:.2f} ms, "
                        f"naive |err| mean {summary['naive_mean']:.0f} ms {cell.statuses}"
                    )
                    cells.append(cell)

    try:
        for (up_ms, down_ms), port in zip(paths, demo_ports, strict=True):
            trace_log = procs.log_dir / f"relay-{up_ms:g}-{down_ms:g}.jsonl"
            trace_logs.append(trace_log)
            relay_url = _start_relay(procs, gateway_port, up_ms, down_ms, trace_log=trace_log)
            demos.append(DemoThread(relay_url, port=port).__enter__())
            probe = _start_relay(procs, echo.port, up_ms, down_ms, name="probe")
            relay_rtts.append(relay_rtt_ms(probe))
            log(f"relay {up_ms:g}/{down_ms:g}: actual round trip {relay_rtts[-1]:.2f} ms")
        asyncio.run(drive())
    finally:
        echo.close()
        for demo in demos:
            demo.__exit__(None, None, None)
    relay_times: dict[str, dict[str, float]] = {}
    for path in trace_logs:
        for line in path.read_text().splitlines() if path.exists() else []:
            chunk = json.loads(line)
            times = relay_times.setdefault(chunk["trace"], {})
            for key in ("arrived_ms", "read_ms", "sent_ms"):
                # The first chunk of each direction: where the headers are.
                times.setdefault(f"relay_{chunk['dir']}_{key}", chunk[key])
    for cell in cells:
        for row in cell.rows:
            _add_relay_times(row, cell.up_ms, relay_times.get(row["trace"] or "", {}))
        _held_errors(cell, relay_times)
        _add_gc_pauses(cell.rows, gc_log)
        exports = [row["exported_ms"] for row in cell.rows if row.get("exported_ms")]
        for row in cell.rows:
            if exports and row.get("t1_ms"):
                # The span export nearest this request's receipt (ms after
                # t1; negative: before): the export thread holds the GIL.
                row["export_ms"] = round(min((e - row["t1_ms"] for e in exports), key=abs), 1)
    return [summarize(cell) for cell in cells]


def runqueue_wait_ms(pids: list[int]) -> float:
    """How long the threads of ``pids`` have waited, runnable, for a CPU
    (``/proc/<pid>/task/<tid>/schedstat``, its second field: proc(5)), ms.
    Its growth over a request is the time the gateway could not run because
    other processes held both cores."""
    total_ns = 0
    for pid in pids:
        for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total_ns += int(stat.read_text().split()[1])
    return total_ns / 1e6


def gc_watch_env(log_path: Path) -> dict[str, str]:
    """Environment that makes a Python process log its GC pauses to
    ``log_path`` (``benchmarks/gc_watch/sitecustomize.py``)."""
    paths = [str(Path(__file__).parent / "gc_watch"), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p), "BENCH_GC_LOG": str(log_path)}


def _add_gc_pauses(rows: list[dict[str, Any]], gc_log: Path) -> None:
    """``gc_ms``: the gateway's GC pause time between the relay passing a
    request on and the gateway's receipt t1 (the request waited through it)."""
    if not gc_log.exists():
        return
    pauses = [json.loads(line) for line in gc_log.read_text().splitlines() if line]
    for row in rows:
        sent, t1 = row.get("relay_up_sent_ms"), row.get("t1_ms")
        if sent is None or t1 is None:
            continue
        overlap = sum(
            max(0.0, min(t1, p["start_ms"] + p["pause_ms"]) - max(sent, p["start_ms"]))
            for p in pauses
        )
        row["gc_ms"] = round(overlap, 3)


def _held(times: dict[str, Any], direction: str) -> float | None:
    """How long the relay held a request's first chunk in one direction, ms."""
    arrived = times.get(f"relay_{direction}_arrived_ms")
    sent = times.get(f"relay_{direction}_sent_ms")
    return None if arrived is None or sent is None else sent - arrived


def _held_errors(cell: Cell, relay_times: dict[str, dict[str, float]]) -> None:
    """Each request's errors against the delay the relay really applied to it.

    The relay's threads can wake late on a busy machine (another process
    holds both cores): the request then really spent longer in the "network"
    than ``up_ms``, and the gateway measured that, rightly. The truth for
    ``latency.uplink_ms`` is then ``pre`` + the up hold of that request, and
    for ``latency.rtt_ms`` (the round trip of the request before it, sent in
    ``X-Client-Prev``) that request's up + down holds. A request the trace log
    misses keeps no such error (counted as n held)."""
    for row in cell.rows:
        held_up = _held(row, "up")
        if held_up is not None and row["uplink_ms"] is not None and row["pre_ms"] is not None:
            cell.uplink_err_held_ms.append(row["uplink_ms"] - (row["pre_ms"] + held_up))
        prev = relay_times.get(row.get("prev_trace") or "", {})
        prev_up, prev_down = _held(prev, "up"), _held(prev, "down")
        if prev_up is not None and prev_down is not None and row["rtt_ms"] is not None:
            cell.rtt_err_held_ms.append(row["rtt_ms"] - (prev_up + prev_down))
        held_down = _held(row, "down")
        if held_up is not None and held_down is not None:
            row["relay_extra_ms"] = round(held_up + held_down - cell.up_ms - cell.down_ms, 3)
            cell.relay_extra_ms.append(row["relay_extra_ms"])


def _add_relay_times(row: dict[str, Any], up_ms: float, times: dict[str, float]) -> None:
    """Split the request's real uplink (page fetch() → gateway receipt t1)
    into what each party took, from the relay's trace log (epoch ms, this
    machine's one clock): the page before sending (``pre``), Chromium's
    network service to the relay, the relay's hold beyond ``up_ms``, and
    relay → gateway's receipt."""
    row.update(times)
    if not times.get("relay_up_arrived_ms") or row.get("t1_ms") is None:
        return
    if row.get("real_uplink_ms") is None or row.get("pre_ms") is None:
        return
    request_start_ms = row["t1_ms"] - row["real_uplink_ms"] + row["pre_ms"]
    row["to_relay_ms"] = round(times["relay_up_arrived_ms"] - request_start_ms, 3)
    row["relay_wake_ms"] = round(times["relay_up_read_ms"] - times["relay_up_arrived_ms"], 3)
    row["relay_late_ms"] = round(
        times["relay_up_sent_ms"] - times["relay_up_arrived_ms"] - up_ms, 3
    )
    row["to_gateway_ms"] = round(row["t1_ms"] - times["relay_up_sent_ms"], 3)


# -- run alone -----------------------------------------------------------------------


def _path(text: str) -> tuple[float, float]:
    up, _, down = text.partition("/")
    return float(up), float(down)


def print_rows(summaries: list[dict[str, Any]]) -> None:
    """Every request of every cell: where an outlier comes from."""
    header = (
        f"{'i':>2} {'new conn':>8} {'after burst':>11} {'pre':>6} {'uplink':>7} "
        f"{'real up':>7} {'excess':>7} {'→relay':>7} {'wake':>5} {'late':>5} {'→gw t1':>7} "
        f"{'rtt (prev)':>10} {'page rtt':>8} {'gw':>5} {'relay+':>6} {'export':>7} {'gc':>5} "
        f"{'cpu wait':>8} status"
    )
    for summary in summaries:
        print(
            f"\n{summary['path']} skew {summary['skew_ms'] / 1000:+.0f} s: |err| mean/max "
            f"uplink {summary['uplink_mean']:.2f}/{summary['uplink_max']:.2f}, "
            f"rtt {summary['rtt_mean']:.2f}/{summary['rtt_max']:.2f}; against the relay's "
            f"actual hold: uplink {summary['uplink_held_mean']:.2f}/"
            f"{summary['uplink_held_max']:.2f}, rtt {summary['rtt_held_mean']:.2f}/"
            f"{summary['rtt_held_max']:.2f}; vs real uplink {summary['exact_mean']:.2f}"
        )
        print(header)
        up_ms = float(summary["path"].split("/")[0])
        for row in summary["rows"]:
            export = row.get("export_ms")

            def f(value: Any, digits: int = 2) -> str:
                return "-" if value is None else f"{value:.{digits}f}"

            excess = (
                row["real_uplink_ms"] - up_ms - row["pre_ms"]
                if row["real_uplink_ms"] is not None and row["pre_ms"] is not None
                else None
            )
            print(
                f"{row['i']:>2} {row['new_connection']!s:>8} "
                f"{f(row.get('after_burst_ms'), 0):>11} {f(row['pre_ms']):>6} "
                f"{f(row['uplink_ms']):>7} {f(row['real_uplink_ms']):>7} {f(excess):>7} "
                f"{f(row.get('to_relay_ms')):>7} {f(row.get('relay_wake_ms')):>5} "
                f"{f(row.get('relay_late_ms')):>5} {f(row.get('to_gateway_ms')):>7} "
                f"{f(row['rtt_ms']):>10} {f(row['page_rtt_ms']):>8} {f(row['gw_ms']):>5} "
                f"{f(row.get('relay_extra_ms')):>6} {f(export, 1):>7} {f(row.get('gc_ms'), 1):>5} "
                f"{f(row.get('gw_runqueue_ms'), 1):>8} "
                f"{row['status']}"
            )


def main() -> int:
    """The accuracy section alone, with every request's row printed."""
    import argparse
    import tempfile

    from harness import Procs

    parser = argparse.ArgumentParser(description="benchmarks/accuracy.py: section 2 alone")
    parser.add_argument("--paths", default="0/0,5/5,25/25", help="up/down ms, comma-separated")
    parser.add_argument("--skews-s", default="-3600,0,5", help="page clock skews, seconds")
    parser.add_argument("--clicks", type=int, default=8, help="measured requests per cell")
    parser.add_argument("--json", type=Path, help="write the cells, rows included, here")
    parser.add_argument(
        "--schedule-delay-ms",
        type=int,
        help="the gateway's OTEL_BSP_SCHEDULE_DELAY (default: the bench's, SCHEDULE_DELAY_MS)",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    procs = Procs(workdir)
    try:
        upstream = servers.nginx_static(procs, workdir)
        sink = servers.sink(procs, "sink-accuracy", keep=True)
        summaries = run(
            procs,
            start_gateway(procs, upstream.url, sink, args.schedule_delay_ms or SCHEDULE_DELAY_MS),
            sink,
            [_path(p) for p in args.paths.split(",")],
            [float(s) * 1000 for s in args.skews_s.split(",")],
            args.clicks,
        )
    finally:
        procs.stop_all()
    print_rows(summaries)
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=1))
    log(f"server logs in {workdir}")
    return 0


if __name__ == "__main__":
    import sys

    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
    sys.exit(main())
