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

Not for: pass/fail (``tests/test_browser.py`` asserts; this measures).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from harness import Procs, free_port, log, python
from servers import Server

from tests.browser import DemoThread, chromium, skew_script

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
        "exact_mean": exact_mean,
        "exact_max": exact_max,
        "naive_mean": naive_mean,
        "naive_max": naive_max,
        "pre_mean": statistics.fmean(cell.pre_ms) if cell.pre_ms else float("nan"),
        "statuses": cell.statuses,
        "relay_rtt_ms": cell.relay_rtt_ms,
        "symmetric": cell.symmetric,
    }


def _start_relay(
    procs: Procs, target_port: int, up_ms: float, down_ms: float, name: str = "relay"
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


def relay_rtt_ms(relay_url: str, probes: int = 10) -> float:
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
) -> Cell:
    cell = Cell(up_ms, down_ms, skew_ms)
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
        for _ in range(clicks):
            before = await page.evaluate("LatencyGateway.requests.length")
            await page.click("#reload")
            await page.wait_for_function(
                f"LatencyGateway.requests.length > {before}", timeout=30_000
            )
        # Each record is complete once matched to its Resource Timing entry.
        await page.wait_for_function(
            f"LatencyGateway.requests.slice({start}).filter(r => r.pre != null).length >= {clicks}",
            timeout=30_000,
        )
        records: list[dict[str, Any]] = await page.evaluate(
            f"LatencyGateway.requests.slice({start})"
        )
        naive = await _naive_by_trace(responses)
    finally:
        await context.close()

    truth_rtt = up_ms + down_ms
    for record in records:
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
        if trace_id in naive:
            cell.naive_err_ms.append(naive[trace_id] - truth_uplink)
            if attrs.get("latency.uplink_ms") is not None:
                # Page and gateway share this machine's clock and the skew is
                # ours, so t1 − ts + skew is the request's real uplink (to the
                # ms the snippet's Date.now() anchor is truncated to).
                exact = naive[trace_id] + skew_ms
                cell.exact_err_ms.append(float(attrs["latency.uplink_ms"]) - exact)
    return cell


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


async def _naive_by_trace(responses: list[Any]) -> dict[str, float]:
    """trace id → t1 − X-Client-Timestamp, from what Chromium actually sent
    and received (the CORS preflights carry neither and are skipped)."""
    out: dict[str, float] = {}
    for response in responses:
        request_headers = await response.request.all_headers()
        stamp = request_headers.get("x-client-timestamp")
        traceparent = request_headers.get("traceparent", "")
        if stamp is None or traceparent.count("-") != 3:
            continue
        clock = (await response.all_headers()).get("x-gateway-clock", "")
        match = _CLOCK_T1_RE.search(clock)
        if match:
            out[traceparent.split("-")[1]] = float(match.group(1)) - float(stamp)
    return out


def run(
    procs: Procs,
    gateway_factory: Any,
    sink: Server,
    paths: list[tuple[float, float]],
    skews_ms: list[float],
    clicks: int,
) -> list[dict[str, Any]]:
    """Every (path, skew) cell; ``gateway_factory(allowed_origins)`` starts
    the gateway and returns its :class:`Server`."""
    demo_ports = [free_port() for _ in paths]
    origins = ",".join(f"http://127.0.0.1:{port}" for port in demo_ports)
    gateway: Server = gateway_factory(origins)
    gateway_port = int(gateway.url.rsplit(":", 1)[1])
    demos: list[DemoThread] = []
    cells: list[Cell] = []
    echo = _Echo()
    relay_rtts: list[float] = []

    async def drive() -> None:
        async with chromium() as browser:
            for i, ((up_ms, down_ms), demo) in enumerate(zip(paths, demos, strict=True)):
                for skew_ms in skews_ms:
                    cell = await _cell(browser, demo.url, sink, up_ms, down_ms, skew_ms, clicks)
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
            relay_url = _start_relay(procs, gateway_port, up_ms, down_ms)
            demos.append(DemoThread(relay_url, port=port).__enter__())
            probe = _start_relay(procs, echo.port, up_ms, down_ms, name="probe")
            relay_rtts.append(relay_rtt_ms(probe))
            log(f"relay {up_ms:g}/{down_ms:g}: actual round trip {relay_rtts[-1]:.2f} ms")
        asyncio.run(drive())
    finally:
        echo.close()
        for demo in demos:
            demo.__exit__(None, None, None)
    return [summarize(cell) for cell in cells]
