"""The gateway's light spans (gateway/spans.py) against the OTel SDK's own.

The reference is opentelemetry-sdk's ``Tracer.start_span`` and ``Span``: the
same calls made on both, with the same sampler, ids, limits, parent context,
links and times, must export the same ``ExportTraceServiceRequest`` (the
official encoder's, ids and times included), give back a span context with
the same flags and trace state, and the pre-encoded bytes a light span carries
must be what the exporter would have written for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as official
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import Attributes

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.spans import LightSpan, LightTracer, gateway_tracer
from latency_common import attributes as attr
from latency_common.otlp_encode import EncodedSpan, encode_span
from latency_common.telemetry import Telemetry
from tests.conftest import make_traced
from tests.servers import BackendThread, free_port

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACEPARENT_UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


class CountingIds(IdGenerator):
    """Ids from a counter, so both pipelines draw the same ones."""

    def __init__(self, random_ids: bool) -> None:
        self.next = 1
        self.random_ids = random_ids

    def generate_span_id(self) -> int:
        self.next += 1
        return self.next

    def generate_trace_id(self) -> int:
        self.next += 1
        return self.next << 64

    def is_trace_id_random(self) -> bool:
        return self.random_ids


class Decorating(Sampler):
    """A sampler that adds attributes and a trace state, as samplers may."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Any = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        added = dict(attributes or {})
        added["sampler.saw"] = f"{name}/{len(links or ())}"
        return SamplingResult(self.decision, added, TraceState([("smp", name[:8] or "x")]))

    def get_description(self) -> str:
        return "Decorating"


SAMPLERS = [
    ALWAYS_ON,
    ALWAYS_OFF,
    ParentBased(ALWAYS_ON),
    TraceIdRatioBased(0.5),
    Decorating(Decision.RECORD_AND_SAMPLE),
    Decorating(Decision.RECORD_ONLY),
]

KEYS = ["http.request.method", "url.path", "error.type", "latency.uplink_ms", "k", ""]

#: What the gateway sets (kept as they are), and the rest (the SDK's path).
plain_values = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
)
other_values = st.one_of(
    st.lists(st.text(max_size=4), max_size=3),
    st.none(),
    st.binary(max_size=4),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
)
# Mostly plain values on known keys, so that spans stay on the fast path
# for a while before something sends them to the SDK's.
values = st.one_of(*[plain_values] * 12, other_values)
keys = st.one_of(*[st.sampled_from(KEYS[:-1])] * 8, st.sampled_from(KEYS), st.text(max_size=6))
attribute_sets = st.dictionaries(keys, values, max_size=8)


@st.composite
def parents(draw: st.DrawFn) -> Context | None:
    choice = draw(st.sampled_from(["none", "empty", "remote", "invalid"]))
    if choice == "none":
        return None
    if choice == "empty":
        return Context()
    trace_id = 0 if choice == "invalid" else draw(st.integers(1, 2**128 - 1))
    flags = draw(st.sampled_from([0, 1, 2, 3]))
    state = TraceState([("vendor", "v1")]) if draw(st.booleans()) else None
    parent = SpanContext(trace_id, draw(st.integers(1, 2**64 - 1)), True, TraceFlags(flags), state)
    return trace_api.set_span_in_context(NonRecordingSpan(parent))


@st.composite
def link_lists(draw: st.DrawFn) -> list[Link]:
    links = []
    for _ in range(draw(st.integers(0, 3))):
        valid = draw(st.booleans())
        context = SpanContext(
            draw(st.integers(1, 2**64)) if valid else 0,
            draw(st.integers(1, 2**32)) if valid else 0,
            is_remote=draw(st.booleans()),
        )
        links.append(Link(context, draw(st.one_of(st.none(), attribute_sets))))
    return links


operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), keys, values),
        st.tuples(st.just("set_many"), attribute_sets),
        st.tuples(
            st.just("status"),
            st.sampled_from(list(StatusCode)),
            st.one_of(st.none(), st.text(max_size=6)),
            st.booleans(),
        ),
        st.tuples(st.just("event"), st.text(max_size=6), attribute_sets),
        st.tuples(st.just("rename"), st.text(max_size=6)),
        st.tuples(st.just("link"), link_lists()),
        st.tuples(st.just("exception"), st.text(max_size=6), st.booleans()),
    ),
    max_size=12,
)


limit_sets = st.builds(
    SpanLimits,
    max_span_attributes=st.sampled_from([0, 1, 3, 128, 128, 128]),
    max_span_attribute_length=st.sampled_from([None, None, None, 0, 5]),
    max_links=st.sampled_from([0, 1, 128]),
    max_events=st.sampled_from([0, 1, 128]),
)


class Pipeline:
    """A provider with its own in-memory exporter and counting ids."""

    def __init__(self, sampler: Sampler, limits: SpanLimits, random_ids: bool) -> None:
        self.memory = InMemorySpanExporter()
        self.processor = SimpleSpanProcessor(self.memory)
        self.provider = TracerProvider(
            sampler=sampler,
            resource=Resource.create({"service.name": "gateway"}),
            id_generator=CountingIds(random_ids),
            span_limits=limits,
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(self.processor)


def _run(
    tracer: trace_api.Tracer,
    script: dict[str, Any],
) -> list[trace_api.Span]:
    span = tracer.start_span(
        script["name"],
        context=script["parent"],
        kind=script["kind"],
        attributes=script["attributes"],
        links=[Link(link.context, link.attributes) for link in script["links"]],
        start_time=script["start"],
    )
    started = [span]
    if script["child"]:
        started.append(
            tracer.start_span(
                "child",
                context=trace_api.set_span_in_context(span),
                kind=SpanKind.CLIENT,
                attributes={"url.full": "http://u/"},
                start_time=script["start"] + 1,
            )
        )
    for target in started:
        for op in script["ops"]:
            if op[0] == "set":
                target.set_attribute(op[1], op[2])
            elif op[0] == "set_many":
                target.set_attributes(op[1])
            elif op[0] == "status":
                if op[3]:
                    target.set_status(Status(op[1], op[2]))
                else:
                    target.set_status(op[1], op[2])
            elif op[0] == "event":
                target.add_event(op[1], op[2], timestamp=script["start"] + 2)
            elif op[0] == "exception":
                target.record_exception(
                    ValueError(op[1]), {"k": 1}, timestamp=script["start"] + 3, escaped=op[2]
                )
            elif op[0] == "link":
                for link in op[1]:
                    target.add_link(link.context, link.attributes)
            else:
                target.update_name(op[1])
    for target in reversed(started):
        target.end(end_time=script["start"] + 10)
    # Calls on an ended span change nothing.
    started[0].set_attribute("late", 1)
    started[0].end(end_time=script["start"] + 20)
    return started


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sampler=st.sampled_from(SAMPLERS),
    limits=limit_sets,
    random_ids=st.booleans(),
    script=st.fixed_dictionaries(
        {
            "name": st.sampled_from(["GET", "POST", "HTTP", ""]),
            "parent": parents(),
            "kind": st.sampled_from([SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL]),
            "attributes": attribute_sets,
            "links": link_lists(),
            "start": st.integers(1, 2**62),
            "child": st.booleans(),
            "ops": operations,
        }
    ),
)
def test_light_spans_export_what_the_sdks_spans_export(
    sampler: Sampler, limits: SpanLimits, random_ids: bool, script: dict[str, Any]
) -> None:
    logging.disable(logging.WARNING)  # the SDK's own warnings about bad values
    try:
        sdk = Pipeline(sampler, limits, random_ids)
        light = Pipeline(sampler, limits, random_ids)
        sdk_tracer = sdk.provider.get_tracer("gateway", "1.2.3")
        light_sdk_tracer = light.provider.get_tracer("gateway", "1.2.3")
        assert isinstance(light_sdk_tracer, trace_api.Tracer)
        ours = LightTracer(
            light_sdk_tracer,  # type: ignore[arg-type]
            light.processor,
            limits,
            InstrumentationScope("gateway", "1.2.3"),
        )
        theirs = _run(sdk_tracer, script)
        mine = _run(ours, script)
    finally:
        logging.disable(logging.NOTSET)
    # The context injected upstream: same ids, flags and trace state.
    for a, b in zip(theirs, mine, strict=True):
        assert a.get_span_context() == b.get_span_context()
        assert a.get_span_context().trace_state == b.get_span_context().trace_state
        assert a.is_recording() == b.is_recording()
    exported_sdk = list(sdk.memory.get_finished_spans())
    exported_light = list(light.memory.get_finished_spans())
    assert official(exported_light) == official(exported_sdk)
    assert [s.dropped_attributes for s in exported_light] == [
        s.dropped_attributes for s in exported_sdk
    ]
    for span in exported_light:
        assert isinstance(span, EncodedSpan)
        assert span.wire == encode_span(span)


def test_a_non_sampled_request_gets_a_non_recording_span_with_flags_00() -> None:
    pipeline = Pipeline(ALWAYS_OFF, SpanLimits(), random_ids=False)
    tracer = gateway_tracer(
        pipeline.provider, Telemetry(pipeline.provider, pipeline.processor), "gateway", "1"
    )
    span = tracer.start_span("GET", kind=SpanKind.SERVER)
    assert not span.is_recording()
    context = span.get_span_context()
    assert context.is_valid
    assert context.trace_flags == 0
    span.end()
    assert pipeline.memory.get_finished_spans() == ()


def test_the_light_tracer_is_used_only_when_telemetry_built_the_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = Pipeline(ALWAYS_ON, SpanLimits(), random_ids=True)
    telemetry = Telemetry(pipeline.provider, pipeline.processor)
    assert isinstance(gateway_tracer(pipeline.provider, telemetry, "gateway", "1"), LightTracer)
    # A provider the embedder passed, or a Telemetry without a processor:
    # the SDK's tracer, with whatever processors the provider has.
    for handle in (None, Telemetry(pipeline.provider)):
        tracer = gateway_tracer(pipeline.provider, handle, "gateway", "1")
        assert not isinstance(tracer, LightTracer)
        tracer.start_span("GET").end()
    assert [s.name for s in pipeline.memory.get_finished_spans()] == ["GET", "GET"]
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    disabled = Pipeline(ALWAYS_ON, SpanLimits(), random_ids=True)
    tracer = gateway_tracer(
        disabled.provider, Telemetry(disabled.provider, disabled.processor), "gateway", "1"
    )
    span = tracer.start_span("GET")
    assert not span.is_recording()
    assert not span.get_span_context().is_valid
    span.end()
    assert disabled.memory.get_finished_spans() == ()


def test_start_as_current_span_makes_the_span_current_and_ends_it() -> None:
    pipeline = Pipeline(ALWAYS_ON, SpanLimits(), random_ids=True)
    tracer = gateway_tracer(
        pipeline.provider, Telemetry(pipeline.provider, pipeline.processor), "gateway", "1"
    )
    with tracer.start_as_current_span("outer") as outer:
        assert isinstance(outer, LightSpan)
        assert trace_api.get_current_span() is outer
    [span] = pipeline.memory.get_finished_spans()
    assert span.name == "outer"


#: Requests a browser or a client may send: traced and not, a method the
#: gateway refuses, one it does not know, a query to redact, a body, a 404
#: and an upstream that is not there.
GATEWAY_REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/api/activities/home", {"traceparent": TRACEPARENT, "User-Agent": "t"}, b""),
    ("GET", "/api/activities/home?token=s3cret&page=2", {}, b""),
    ("POST", "/api/activities", {"traceparent": TRACEPARENT}, b'{"message": "hi"}'),
    ("TRACE", "/", {"traceparent": TRACEPARENT}, b""),
    ("PROPFIND", "/dav", {}, b""),
    ("GET", "/no-such-page", {"traceparent": TRACEPARENT_UNSAMPLED}, b""),
]


def _normalised(spans: Sequence[ReadableSpan], roots: bool) -> ExportTraceServiceRequest:
    """The export request minus what differs from run to run: span ids,
    times, the measured durations and (for requests without a parent) the
    trace id."""
    message = official(spans)
    for resource_spans in message.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.span_id = b""
                if span.kind == 3:  # CLIENT: its parent is the SERVER span
                    span.parent_span_id = b""
                if roots:
                    span.trace_id = b""
                span.start_time_unix_nano = span.end_time_unix_nano = 0
                kept = [a for a in span.attributes if a.key not in MEASURED]
                del span.attributes[:]
                span.attributes.extend(kept)
    return message


MEASURED = {attr.GATEWAY_MS, attr.UPSTREAM_MS}


@pytest.mark.parametrize("trust", ["continue", "link"])
@pytest.mark.parametrize("span_kinds", [("server",), ("server", "client")])
async def test_the_gateway_exports_the_same_spans_with_light_and_sdk_spans(
    backend: BackendThread,
    http: aiohttp.ClientSession,
    trust: str,
    span_kinds: tuple[str, ...],
) -> None:
    sdk = make_traced(service="gateway")
    light = make_traced(service="gateway")
    urls: dict[str, str] = {}
    servers: list[TestServer] = []
    for name, upstream in (("up", backend.url), ("down", f"http://127.0.0.1:{free_port()}")):
        config = GatewayConfig().replace(
            upstream=upstream, clock_key=b"k" * 32, trust_context=trust, spans=span_kinds
        )
        for kind, app in (
            ("sdk", create_app(config, tracer_provider=sdk.provider)),
            ("light", create_app(config, telemetry=Telemetry(light.provider, light.processor))),
        ):
            server = TestServer(app, host="127.0.0.1", port=0)
            await server.start_server()
            servers.append(server)
            urls[f"{name}-{kind}"] = str(server.make_url("")).rstrip("/")
    try:
        for name in ("up", "down"):
            for method, path, headers, body in GATEWAY_REQUESTS:
                for kind in ("sdk", "light"):
                    async with http.request(
                        method, urls[f"{name}-{kind}"] + path, headers=headers, data=body
                    ) as response:
                        await response.read()
                    traced = sdk if kind == "sdk" else light
                    assert len(traced.spans()) >= 1
                theirs, ours = sdk.spans(), light.spans()
                assert all(isinstance(span, EncodedSpan) for span in ours)
                assert not any(isinstance(span, EncodedSpan) for span in theirs)
                roots = "traceparent" not in headers or trust == "link"
                assert _normalised(ours, roots) == _normalised(theirs, roots), (method, path)
                sdk.exporter.clear()
                light.exporter.clear()
    finally:
        for server in servers:
            await server.close()
