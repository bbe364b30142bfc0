"""What each step of the gateway's request path costs, timed in-process.

What it is for: the evidence next to the py-spy profile. Each step the
gateway runs per proxied request (``gateway/app.py``'s ``handle`` and
``_forward``) is called in a loop with the headers the snippet sends, and
timed (best of 5), so RESULTS.md can say how many µs of the gateway's CPU per
request each one explains. The OTLP protobuf encoding of the request's two
spans is timed too: the batch processor's thread does it while holding the
GIL, i.e. on the same core budget as the event loop.

Not for: the end-to-end figures (``run.py`` measures those with wrk). The
steps call the gateway's own functions; when one of their signatures changes,
that row says so instead of failing the run.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from typing import Any

#: Bench headers (run.snippet_headers shape), with a token minted below.
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03"


def _per_call_us(fn: Callable[[], object], budget_s: float = 0.15) -> float:
    timer = timeit.Timer(fn)
    loops, elapsed = timer.autorange()
    loops = max(1, int(loops * budget_s / max(elapsed, 1e-9)))
    best = min(timer.repeat(repeat=5, number=loops))
    return best / loops * 1e6


def measure_steps() -> list[tuple[str, str, float | None, str]]:
    """(step, where, µs per request or None, note) rows."""
    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict, CIMultiDictProxy
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, set_span_in_context

    from gateway import context, measure, proxy
    from gateway import spans as spans_module
    from gateway.config import GatewayConfig, TimingRate
    from latency_common.telemetry import Telemetry

    # The rate limit lifted, as in the load runs: every call runs the checks.
    config = GatewayConfig().replace(
        clock_key=b"k" * 32, workers=1, timing_rate=TimingRate(per_s=1e9, burst=10**9)
    )
    measurement = measure.Measurement(config)
    now_ms = time.time_ns() / 1e6
    clock = measurement.clock_header(now_ms - 5.0, now_ms - 4.9, None)
    token = clock.split('tok="', 1)[1].rstrip('"')
    headers = CIMultiDict(
        {
            "Host": "127.0.0.1:8080",
            "User-Agent": "wrk",
            "traceparent": TRACEPARENT,
            "X-Client-Timestamp": f"{now_ms - 4.9:.3f}",
            "X-Client-Clock": f'off=0.000, d=1.000, age=1.000, tok="{token}"',
            "X-Client-Prev": "span=b7ad6b7169203331, rtt=1.000, pre=0.100",
        }
    )
    request = make_mocked_request("GET", "/api/activities/home", headers=headers)
    proxy_headers = CIMultiDictProxy(headers)
    upstream_headers = CIMultiDictProxy(
        CIMultiDict(
            {
                "Server": "nginx/1.22.1",
                "Date": "Sun, 29 Nov 2026 02:04:46 GMT",
                "Content-Type": "application/json",
                "Content-Length": "1078",
                "Connection": "keep-alive",
            }
        )
    )

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    resource = Resource.create({"service.name": "gateway"})
    batch_provider = TracerProvider(resource=resource)
    batch_processor = BatchSpanProcessor(Discard())
    batch_provider.add_span_processor(batch_processor)
    sdk_tracer = batch_provider.get_tracer("gateway")
    # What the gateway uses when telemetry built the provider (gateway/spans.py).
    tracer = spans_module.gateway_tracer(
        batch_provider, Telemetry(batch_provider, batch_processor), "gateway", "bench"
    )
    memory_light = InMemorySpanExporter()
    memory_light_processor = SimpleSpanProcessor(memory_light)
    memory_light_tracer = spans_module.gateway_tracer(
        batch_provider, Telemetry(batch_provider, memory_light_processor), "gateway", "bench"
    )
    memory = InMemorySpanExporter()
    memory_provider = TracerProvider(resource=resource)
    memory_provider.add_span_processor(SimpleSpanProcessor(memory))

    server_attributes = {
        "http.request.method": "GET",
        "url.path": "/api/activities/home",
        "url.scheme": "http",
        "client.address": "127.0.0.1",
        "network.peer.address": "127.0.0.1",
        "network.protocol.version": "1.1",
        "gateway.context.source": "traceparent",
        "server.address": "127.0.0.1",
        "user_agent.original": "wrk",
        "gateway.upstream.address": "127.0.0.1",
        "gateway.upstream.port": 4567,
    }
    client_attributes = {
        "http.request.method": "GET",
        "url.full": "http://127.0.0.1:4567/api/activities/home",
        "server.address": "127.0.0.1",
        "server.port": 4567,
    }
    state: dict[str, Any] = {}

    def spans(t: Any, with_client: bool = True) -> None:
        inbound = context.extract(proxy_headers, "continue")
        server = t.start_span(
            "GET", context=inbound.parent, kind=SpanKind.SERVER, attributes=server_attributes
        )
        measure.record(server, state["verdict"])
        if with_client:
            client = t.start_span(
                "GET",
                context=set_span_in_context(server),
                kind=SpanKind.CLIENT,
                attributes=client_attributes,
            )
            client.set_attribute("http.response.status_code", 200)
            client.end()
        server.set_attribute("http.response.status_code", 200)
        server.set_attribute("latency.upstream_ms", 0.5)
        server.set_attribute("latency.gateway_ms", 0.9)
        server.end()

    rows: list[tuple[str, str, float | None, str]] = []

    def step(name: str, where: str, fn: Callable[[], object], per_request: float = 1) -> None:
        try:
            fn()
            rows.append((name, where, _per_call_us(fn) * per_request, ""))
        except Exception as exc:  # a renamed function: say so, keep going
            rows.append((name, where, None, f"n/a: {type(exc).__name__}: {exc}"[:120]))

    def evaluate() -> object:
        state["verdict"] = measurement.evaluate(proxy_headers, "127.0.0.1", time.time_ns() / 1e6)
        return state["verdict"]

    step(
        "trace context extract (OTel propagators + policy)",
        "gateway/context.py extract",
        lambda: context.extract(proxy_headers, "continue"),
    )
    step(
        "header size limits",
        "gateway/proxy.py header_limit_error",
        lambda: proxy.header_limit_error(request),
    )
    step(
        "client address / X-Forwarded-*",
        "gateway/proxy.py forwarding",
        lambda: proxy.forwarding(request, 0),
    )
    step(
        "latency checks: parse 3 headers, verify token (HMAC), verdict",
        "gateway/measure.py evaluate → timing.evaluate",
        evaluate,
    )
    verdict = state.get("verdict")
    status = getattr(verdict, "status", "?")
    if status != "ok":
        rows.append(("(the latency verdict above was not ok)", "", None, f"status {status}"))
    step(
        "clock token for the response (HMAC, nonce, base64)",
        "gateway/measure.py clock_header",
        lambda: measurement.clock_header(now_ms, now_ms + 1, verdict),
    )
    step(
        "Server-Timing uplink item",
        "gateway/measure.py server_timing",
        lambda: measure.server_timing(verdict),
    )
    fwd = proxy.forwarding(request, 0)
    step(
        "upstream request headers",
        "gateway/proxy.py upstream_request_headers",
        lambda: proxy.upstream_request_headers(request, fwd),
    )
    step(
        "response headers copy",
        "gateway/proxy.py response_headers",
        lambda: proxy.response_headers(upstream_headers),
    )
    step(
        "SERVER span (the default): start, 16 latency/http attributes, end + OTLP encoding"
        " → batch queue",
        "gateway/spans.py via gateway/app.py handle/_forward + measure.record",
        lambda: spans(tracer, with_client=False),
    )
    step(
        "(SERVER + CLIENT span instead, with GATEWAY_SPANS=server,client)",
        "gateway/spans.py via gateway/app.py handle/_forward + measure.record",
        lambda: spans(tracer),
    )
    step(
        "(the SDK's SERVER span, as before gateway/spans.py; no encoding)",
        "OTel SDK Tracer.start_span / Span",
        lambda: spans(sdk_tracer, with_client=False),
    )
    # What the processor thread does with the request's span, holding the GIL.
    try:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        from latency_common.otlp_encode import encode_spans as fast_encode_spans

        spans(memory_light_tracer, with_client=False)
        encoded = list(memory_light.get_finished_spans())[-1:] * 64  # the default batch size
        step(
            "export request body from 64 spans encoded as they ended (export thread, GIL held)",
            "latency_common/otlp_encode.py encode_spans",
            lambda: fast_encode_spans(encoded),
            per_request=1 / 64,
        )
        spans(memory_provider.get_tracer("gateway"), with_client=False)
        batch = list(memory.get_finished_spans())[-1:] * 64
        step(
            "(OTLP encoding of SDK SERVER spans at export, otlp_encode, as before)",
            "latency_common/otlp_encode.py encode_spans",
            lambda: fast_encode_spans(batch),
            per_request=1 / 64,
        )
        step(
            "(the same with the official encoder, for comparison)",
            "opentelemetry-exporter-otlp-proto-common encode_spans",
            lambda: encode_spans(batch).SerializeToString(),
            per_request=1 / 64,
        )
    except Exception as exc:
        rows.append(("OTLP encoding", "encode_spans", None, f"n/a: {exc}"[:120]))
    batch_provider.shutdown()
    return rows


def gil_handoff_us() -> dict[str, tuple[float, float]]:
    """Per-call time of calls on the request path alone and while another
    Python thread is busy (as the span export thread is under load). A call
    that releases the GIL (``os.urandom`` does, around getrandom(2)) has to
    take it back from the busy thread, which may keep it for up to
    ``sys.getswitchinterval()`` (5 ms)."""
    import hashlib
    import hmac
    import os
    import threading

    calls: dict[str, Callable[[], object]] = {
        "os.urandom(8) (gateway/measure.py clock_header nonce)": lambda: os.urandom(8),
        "hmac-sha256 of a token (holds the GIL)": lambda: hmac.new(
            b"k" * 32, b"1795917886173.1795917886171.1795917886170.1.2.nonce", hashlib.sha256
        ).digest(),
    }

    def per_call(fn: Callable[[], object], n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n * 1e6

    alone = {name: per_call(fn, 2000) for name, fn in calls.items()}
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        time.sleep(0.02)
        busy = {name: per_call(fn, 200) for name, fn in calls.items()}
    finally:
        stop.set()
        thread.join()
    return {name: (alone[name], busy[name]) for name in calls}
