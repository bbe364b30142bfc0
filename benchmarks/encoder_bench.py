"""OTLP span encoding: the official encoder against latency_common/otlp_encode.py.

What it is for: the figures behind latency_common/otlp_encode.py. On the gateway's
own spans (the SERVER span of a timed snippet request, every ``latency.*``
attribute set, and its CLIENT span), it times both encoders per batch of 1,
16, 64 and 512 spans in one run (timeit on the thread's CPU time, median of
repeats, µs per span), and
probes how long each keeps another thread waiting: a thread that sleeps
0.2 ms in a loop records how late it wakes up while a 64-span batch encodes,
as the event loop waits for the export thread to let go of the GIL.

Not for: end-to-end latency (``run.py``). Run it on a quiet machine:
``.venv/bin/python benchmarks/encoder_bench.py`` (about a minute).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
    encode_spans as official_encode_spans,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    set_span_in_context,
)

from latency_common.otlp_encode import encode_spans

BATCH_SIZES = (1, 16, 64, 512)
PROBE_SLEEP_S = 0.0002


def gateway_spans() -> list[ReadableSpan]:
    """A SERVER + CLIENT pair with the attributes gateway/app.py and
    gateway/measure.py set on a timed, proxied GET."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("gateway")
    remote = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(1),
    )
    server = tracer.start_span(
        "GET",
        context=set_span_in_context(NonRecordingSpan(remote)),
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": "GET",
            "url.path": "/api/activities/home",
            "url.scheme": "http",
            "client.address": "203.0.113.7",
            "network.peer.address": "127.0.0.1",
            "network.protocol.version": "1.1",
            "gateway.context.source": "traceparent",
            "server.address": "shop.example",
            "user_agent.original": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
        },
    )
    server.set_attributes(
        {
            "latency.status": "ok",
            "latency.reason": "",
            "latency.trust": "token",
            "latency.uplink_ms": 23.417,
            "latency.uplink_error_ms": 1.25,
            "latency.uplink_upper_bound_ms": 24.9,
            "latency.rtt_ms": 48.2,
            "latency.pre_request_ms": 0.4,
            "latency.clock_offset_bucket": "1s-1m",
            "latency.sync_delay_ms": 2.5,
            "latency.sync_age_ms": 1800.0,
        }
    )
    client = tracer.start_span(
        "GET",
        context=set_span_in_context(server),
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": "GET",
            "url.full": "http://127.0.0.1:4567/api/activities/home?page=2",
            "server.address": "127.0.0.1",
            "server.port": 4567,
        },
    )
    client.set_attribute("http.response.status_code", 200)
    client.end()
    server.set_attribute("http.response.status_code", 200)
    server.set_attribute("latency.upstream_ms", 3.1)
    server.set_attribute("latency.gateway_ms", 3.6)
    server.end()
    return list(exporter.get_finished_spans())


def _official(batch: list[ReadableSpan]) -> bytes:
    return official_encode_spans(batch).SerializePartialToString()


def _ours(batch: list[ReadableSpan]) -> bytes:
    return encode_spans(batch)


ENCODERS: dict[str, Callable[[list[ReadableSpan]], bytes]] = {
    "official": _official,
    "otlp_encode": _ours,
}


def us_per_span(
    encode: Callable[[list[ReadableSpan]], bytes], batch: list[ReadableSpan], repeat: int = 9
) -> float:
    # CPU time of this thread: the other processes of a shared machine do not count.
    timer = timeit.Timer(lambda: encode(batch), timer=time.thread_time)
    loops, elapsed = timer.autorange()
    loops = max(1, int(loops * 0.1 / max(elapsed, 1e-9)))
    runs = timer.repeat(repeat=repeat, number=loops)
    return statistics.median(runs) / loops / len(batch) * 1e6


def wake_up_lateness_ms(
    encode: Callable[[list[ReadableSpan]], bytes], batch: list[ReadableSpan], batches: int = 40
) -> tuple[float, float]:
    """(median, max) over ``batches`` encodings of the worst lateness of a
    thread sleeping PROBE_SLEEP_S while one batch encodes."""
    worst: list[float] = []
    lateness: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            time.sleep(PROBE_SLEEP_S)
            lateness.append(time.perf_counter() - start - PROBE_SLEEP_S)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        for _ in range(batches):
            time.sleep(0.005)  # the probe runs freely between batches
            lateness.clear()
            encode(batch)
            time.sleep(PROBE_SLEEP_S * 3)  # let the probe's last wake-up land
            worst.append(max(lateness, default=0.0) * 1e3)
    finally:
        stop.set()
        thread.join(timeout=5)
    return statistics.median(worst), max(worst)


def main() -> None:
    pair = gateway_spans()
    assert encode_spans(pair) == _official(pair), "encoders disagree: run the tests"
    print(f"python {sys.version.split()[0]}, switch interval {sys.getswitchinterval() * 1e3} ms")
    print("\nCPU µs per span (median of 9 repeats), gateway SERVER+CLIENT spans")
    print(f"{'batch':>6} {'official':>10} {'otlp_encode':>12} {'speed-up':>9}")
    for size in BATCH_SIZES:
        batch = (pair * size)[:size]
        official = us_per_span(_official, batch)
        ours = us_per_span(_ours, batch)
        print(f"{size:>6} {official:>10.2f} {ours:>12.2f} {official / ours:>8.1f}x")
    batch = (pair * 32)[:64]
    print(f"\nwake-up lateness of a thread sleeping {PROBE_SLEEP_S * 1e3} ms, 64-span batches")
    print(f"{'encoder':>12} {'switch':>8} {'median ms':>10} {'max ms':>8}")
    default = sys.getswitchinterval()
    for interval in (default, 0.0001):
        sys.setswitchinterval(interval)
        try:
            for name, encode in ENCODERS.items():
                median, worst = wake_up_lateness_ms(encode, batch)
                print(f"{name:>12} {interval * 1e3:>6.1f}ms {median:>10.3f} {worst:>8.3f}")
        finally:
            sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
