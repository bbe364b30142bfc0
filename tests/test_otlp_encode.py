"""The fast OTLP encoder (latency_common/otlp_encode.py) against the official one, and
the exporter built on it (latency_common/otlp_exporter.py) against a real receiver.

The reference is opentelemetry-exporter-otlp-proto-common's ``encode_spans``,
the encoder the SDK's OTLPSpanExporter uses: for any span, ours must parse to
the same ``ExportTraceServiceRequest`` (in practice: the same bytes), and refuse
the same spans with the same exception type.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as official
from opentelemetry.exporter.otlp.proto.http import trace_exporter as sdk_trace_exporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util.types import Attributes

from latency_common import otlp_exporter, telemetry
from latency_common.logs import RateLimitFilter
from latency_common.otlp_encode import (
    EncodedSpan,
    encode_span,
    encode_spans,
    encode_spans_dropping_invalid,
)
from latency_common.otlp_exporter import FastOTLPSpanExporter
from tests.conftest import GatewayFactory, Traced
from tests.otlp_receiver import OtlpReceiver
from tests.test_beacon import T as BEACON_T
from tests.test_beacon import _build as build_beacon_span
from tests.test_beacon import _entry as beacon_entry
from tests.test_latency import ScriptedSnippet

Request = ExportTraceServiceRequest


def assert_same_request(spans: list[ReadableSpan]) -> bytes:
    ours = encode_spans(spans)
    reference = official(spans).SerializePartialToString()
    assert Request.FromString(ours) == Request.FromString(reference)
    assert ours == reference  # stronger than needed; keeps a regression obvious
    return ours


# --- random spans --------------------------------------------------------

# Resources and scopes as batches carry them: several, some equal but not
# identical (grouped together by equality, encoded from the first one seen),
# with attributes in a different order.
RESOURCES = [
    Resource({"service.name": "gateway", "host.name": "h1"}),
    Resource({"host.name": "h1", "service.name": "gateway"}),  # equal to the first
    Resource({"service.name": "browser"}, schema_url="https://opentelemetry.io/schemas/1.26.0"),
    Resource({}),
    # Equal (1 == True) but hashed apart by Resource.__hash__ (JSON): two groups.
    Resource({"n": 1}),
    Resource({"n": True}),
]
SCOPES: list[InstrumentationScope | None] = [
    InstrumentationScope("gateway"),
    InstrumentationScope("gateway"),  # equal, distinct object
    InstrumentationScope("gateway.beacon", "1.2", "https://opentelemetry.io/schemas/1.21.0"),
    InstrumentationScope("scoped", None, None, {"scope.attr": 1, "list": ["a", "b"]}),
    None,
]

trace_ids = st.integers(1, 2**128 - 1)
span_ids = st.integers(1, 2**64 - 1)
# Texts without lone surrogates, as the SDK's spans hold them.
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
scalars = st.one_of(
    texts,
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.binary(max_size=12),
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # A named function, not a lambda: hypothesis reads an extend function's
    # source to check it recurses, and a multi-line lambda's source is read
    # wrongly whenever the file changed on disk since it was imported.
    return st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(texts | st.integers(-3, 3) | st.none(), inner, max_size=3),
    )


# Beyond what the SDK's attribute cleaning lets through: mixed sequences,
# None, mappings (their keys go through str()), ints outside int64 and
# unknown types (the official encoder leaves such an attribute out, and so
# must we).
values = st.recursive(
    st.one_of(scalars, st.none(), st.integers(-(2**70), 2**70), st.builds(object), st.just(2**63)),
    _containers,
    max_leaves=6,
)
homogeneous = st.one_of(
    st.lists(texts, max_size=4),
    st.lists(st.booleans(), max_size=4),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4).map(tuple),
    st.lists(st.floats(allow_nan=False), max_size=4),
)
# A key with a lone surrogate cannot be encoded: the attribute is left out.
keys = texts | st.just("bad.\ud800")
attribute_maps = st.dictionaries(keys, st.one_of(scalars, homogeneous, values), max_size=6)
trace_states = st.none() | st.lists(
    st.tuples(
        st.from_regex(r"[a-z][a-z0-9_*/-]{0,8}", fullmatch=True),
        st.from_regex(r"[a-zA-Z0-9.:]{1,8}", fullmatch=True),
    ),
    max_size=3,
    unique_by=lambda kv: kv[0],
).map(TraceState)
contexts = st.builds(
    SpanContext,
    trace_id=trace_ids,
    span_id=span_ids,
    is_remote=st.booleans(),
    trace_flags=st.sampled_from([TraceFlags(0), TraceFlags(1)]),
    trace_state=trace_states,
)
times = st.none() | st.integers(0, 2**64 - 1)


@st.composite
def bounded_attributes(draw: st.DrawFn) -> Attributes:
    """A raw dict, or BoundedAttributes that dropped some (dropped_attributes_count)."""
    from opentelemetry.attributes import BoundedAttributes

    raw = draw(attribute_maps)
    if draw(st.booleans()):
        return raw
    return BoundedAttributes(maxlen=draw(st.integers(0, 4)), attributes=raw, immutable=False)


events = st.builds(
    Event,
    name=texts,
    attributes=st.none() | bounded_attributes(),
    timestamp=st.integers(0, 2**64 - 1),
)
links = st.builds(Link, context=contexts, attributes=st.none() | bounded_attributes())
statuses = st.one_of(
    st.builds(Status, st.sampled_from([StatusCode.UNSET, StatusCode.OK])),
    st.builds(Status, st.just(StatusCode.ERROR), st.none() | texts),
)


@st.composite
def spans(draw: st.DrawFn) -> ReadableSpan:
    event_list = draw(st.lists(events, max_size=3))
    link_list = draw(st.lists(links, max_size=2))
    if draw(st.booleans()):  # BoundedLists that overflowed: dropped counts
        event_list = BoundedList.from_seq(draw(st.integers(0, 3)), event_list)
        link_list = BoundedList.from_seq(draw(st.integers(0, 2)), link_list)
    return ReadableSpan(
        name=draw(texts),
        context=draw(contexts),
        parent=draw(st.none() | contexts),
        resource=draw(st.sampled_from(RESOURCES)),
        attributes=draw(bounded_attributes()),
        events=event_list,
        links=link_list,
        kind=draw(st.sampled_from(list(SpanKind))),
        status=draw(statuses),
        start_time=draw(times),
        end_time=draw(times),
        instrumentation_scope=draw(st.sampled_from(SCOPES)),
    )


@pytest.fixture(autouse=True)
def _quiet_official_encoder() -> Iterator[None]:
    # The official encoder logs a traceback per attribute it leaves out.
    logger = logging.getLogger("opentelemetry.exporter.otlp.proto.common._internal")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(spans(), max_size=8))
def test_random_batches_parse_to_the_official_encoders_message(batch: list[ReadableSpan]) -> None:
    assert_same_request(batch)


def test_nan_infinities_and_negative_zero_encode_byte_for_byte() -> None:
    # NaN != NaN, so message equality cannot say it: bytes can.
    span = ReadableSpan(
        name="floats",
        context=SpanContext(1, 2, False),
        attributes={"nan": math.nan, "inf": -math.inf, "zero": -0.0, "list": [math.nan, 1.0]},
        resource=RESOURCES[0],
    )
    assert encode_spans([span]) == official([span]).SerializePartialToString()


# Each corruption makes the official encoder refuse the span; ours must
# refuse it with the same exception type (so a caller can drop that span).
CORRUPTIONS: dict[str, dict[str, Any]] = {
    "trace id above 128 bits": {"context": SpanContext(2**128, 1, False)},
    "negative span id": {"context": SpanContext(1, -1, False)},
    "parent span id above 64 bits": {"parent": SpanContext(1, 2**64, True)},
    "lone surrogate in the name": {"name": "GET \ud800"},
    "name bytes not UTF-8": {"name": b"\xff"},
    "name not a string": {"name": 42},
    "negative start time": {"start_time": -1},
    "end time above uint64": {"end_time": 2**64},
    "boolean end time": {"end_time": True},
    "float start time": {"start_time": 1.5},
    "unknown kind": {"kind": "SERVER"},
    "event time above uint64": {"events": [Event("e", timestamp=2**64)]},
    "event name surrogate": {"events": [Event("\udfff", timestamp=1)]},
    "link trace id negative": {"links": [Link(SpanContext(-1, 1, False))]},
    "status message surrogate": {"status": Status(StatusCode.ERROR, "\ud834")},
}
#: What the official encoder raises for them (UnicodeError is a ValueError).
REFUSALS = (ValueError, TypeError, OverflowError, KeyError)


def _span(**changes: Any) -> ReadableSpan:
    return ReadableSpan(**_span_fields(**changes))


def _span_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": "GET",
        "context": SpanContext(0xABC, 0xDEF, False),
        "resource": RESOURCES[0],
        "attributes": {"http.request.method": "GET"},
        "kind": SpanKind.SERVER,
        "start_time": 10,
        "end_time": 20,
        "instrumentation_scope": SCOPES[0],
    }
    fields.update(changes)
    return fields


@pytest.mark.parametrize("corruption", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_a_span_the_official_encoder_refuses_is_refused_with_the_same_exception(
    corruption: str,
) -> None:
    batch = [_span(), _span(**CORRUPTIONS[corruption])]
    with pytest.raises(REFUSALS) as theirs:
        official(batch)
    with pytest.raises(REFUSALS) as ours:
        encode_spans(batch)
    assert type(ours.value) is type(theirs.value)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(spans(), max_size=4),
    st.lists(st.sampled_from(list(CORRUPTIONS)), min_size=1, max_size=3),
    st.randoms(use_true_random=False),
)
def test_dropping_invalid_spans_leaves_exactly_the_official_encoding_of_the_rest(
    good: list[ReadableSpan], corruptions: list[str], rnd: Any
) -> None:
    bad = [_span(**CORRUPTIONS[name]) for name in corruptions]
    batch = good + bad
    rnd.shuffle(batch)
    with pytest.raises(REFUSALS):
        encode_spans(batch)
    result = encode_spans_dropping_invalid(batch)
    kept = [s for s in batch if not any(s is b for b in bad)]
    assert result.body == official(kept).SerializePartialToString()
    assert result.dropped == len(bad)
    assert result.first_error


def test_an_attribute_out_of_int64_is_left_out_with_one_warning_and_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spans_ = [_span(attributes={"big": 2**64, "kept": 1, f"odd.{i}": object()}) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="latency_common.otlp_wire"):
        body = assert_same_request(spans_)
    sent = Request.FromString(body).resource_spans[0].scope_spans[0].spans
    assert [[a.key for a in s.attributes] for s in sent] == [["kept"]] * 3
    ours = [r for r in caplog.records if r.name == "latency_common.otlp_wire"]
    # One line per bad key, however many spans carry it.
    assert sum("'big'" in r.getMessage() for r in ours) == 1
    assert all(r.exc_info is None for r in ours)
    assert "cannot encode a int value (Value out of range" in caplog.text


# --- gateway-shaped spans ------------------------------------------------


async def _gateway_spans(
    gateway: GatewayFactory, gateway_spans: Traced, http: aiohttp.ClientSession
) -> list[ReadableSpan]:
    """SERVER and CLIENT spans of the real gateway: a timed snippet request
    (every latency.* attribute), a plain one, a 404, a dead upstream; plus a
    browser span from a beacon, with its own resource and scope. Two spans
    per request (``GATEWAY_SPANS=server,client``), so both kinds are covered."""
    base = await gateway(spans=("server", "client"))
    snippet = ScriptedSnippet(http, base, skew_ms=-3_000.0)
    await snippet.sync(3)
    await snippet.get("/api/echo")
    await snippet.get("/api/echo?token=secret")
    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    async with http.get(base + "/missing", headers=headers) as resp:
        assert resp.status == 404
    dead = await gateway(upstream="http://127.0.0.1:9", spans=("server", "client"))
    async with http.post(dead + "/api/x", data=b"body") as resp:
        assert resp.status == 502
    span, reason = build_beacon_span(beacon_entry(), BEACON_T + 5_000)
    assert span is not None, reason
    spans_ = [*gateway_spans.spans(), span, *gateway_spans.spans()]
    kinds = {s.kind for s in spans_}
    assert kinds == {SpanKind.SERVER, SpanKind.CLIENT}
    server = next(s for s in spans_ if "latency.uplink_ms" in (s.attributes or {}))
    assert server.parent is None or server.parent.is_remote is False
    return spans_


async def test_gateway_spans_encode_as_the_official_encoder_does(
    gateway: GatewayFactory, gateway_spans: Traced, http: aiohttp.ClientSession
) -> None:
    spans_ = await _gateway_spans(gateway, gateway_spans, http)
    body = assert_same_request(spans_)
    message = Request.FromString(body)
    services = [
        next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
        for rs in message.resource_spans
    ]
    assert services == ["gateway", "browser"]
    browser = message.resource_spans[1].scope_spans[0]
    assert browser.scope.name == "gateway.beacon"
    assert [e.name for e in browser.spans[0].events][:2] == ["startTime", "fetchStart"]
    remote = [s for s in message.resource_spans[0].scope_spans[0].spans if s.flags == 0x300]
    assert remote, "the request with a traceparent has a remote parent"


class RecordingReceiver(OtlpReceiver):
    """The test receiver, also keeping each request's raw body, and answering
    503 to the first ``fail_first`` requests."""

    def __init__(self, fail_first: int = 0) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.fail_first = fail_first

    async def _traces(self, request: web.Request) -> web.Response:
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503)
        self.bodies.append(await request.read())
        return await super()._traces(request)


async def _export(exporter: OTLPSpanExporter, spans_: list[ReadableSpan]) -> SpanExportResult:
    # The exporter blocks (requests); the receiver lives on its own thread.
    try:
        return await asyncio.to_thread(exporter.export, spans_)
    finally:
        exporter.shutdown()


async def test_exporter_sends_what_the_official_exporter_sends(
    gateway: GatewayFactory, gateway_spans: Traced, http: aiohttp.ClientSession
) -> None:
    spans_ = await _gateway_spans(gateway, gateway_spans, http)
    with RecordingReceiver() as theirs, RecordingReceiver() as ours:
        official_exporter = OTLPSpanExporter(endpoint=theirs.endpoint + "/v1/traces")
        assert await _export(official_exporter, spans_) is SpanExportResult.SUCCESS
        fast = FastOTLPSpanExporter(endpoint=ours.endpoint + "/v1/traces")
        assert await _export(fast, spans_) is SpanExportResult.SUCCESS
    assert len(ours.bodies) == 1
    assert Request.FromString(ours.bodies[0]) == Request.FromString(theirs.bodies[0])
    assert ours.spans == theirs.spans
    assert {s.service for s in ours.spans} == {"gateway", "browser"}
    assert ours.headers[0]["Content-Type"] == "application/x-protobuf"


async def test_exporter_keeps_the_sdks_environment_compression_headers_and_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-team=edge")
    spans_ = [_span(), _span(name="POST")]
    with RecordingReceiver(fail_first=1) as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint + "/v1/traces")
        result = await _export(FastOTLPSpanExporter(), spans_)
    assert result is SpanExportResult.SUCCESS  # after the SDK's retry of the 503
    assert [s.name for s in receiver.spans] == ["GET", "POST"]
    assert receiver.headers[0]["Content-Encoding"] == "gzip"
    assert receiver.headers[0]["x-team"] == "edge"
    assert receiver.bodies[0] == encode_spans(spans_)  # as aiohttp un-gzipped it


@pytest.fixture
def export_logs_unlimited() -> Iterator[None]:
    """The export loggers without the once-a-minute limit an earlier test's
    telemetry put on them (it would swallow the line this test reads)."""
    stashed = {}
    for name in telemetry._EXPORT_LOGGERS:
        logger = logging.getLogger(name)
        stashed[name] = [f for f in logger.filters if isinstance(f, RateLimitFilter)]
        for limit in stashed[name]:
            logger.removeFilter(limit)
    try:
        yield
    finally:
        for name, limits in stashed.items():
            for limit in limits:
                logging.getLogger(name).addFilter(limit)


@pytest.mark.usefixtures("export_logs_unlimited")
async def test_exporter_drops_only_the_span_that_cannot_be_encoded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = _span(name="\ud800")
    spans_ = [_span(name="A"), bad, _span(name="B")]
    with RecordingReceiver() as theirs, RecordingReceiver() as ours:
        with caplog.at_level(logging.ERROR):
            official_result = await _export(
                OTLPSpanExporter(endpoint=theirs.endpoint + "/v1/traces"), spans_
            )
        fast_result = await _export(
            FastOTLPSpanExporter(endpoint=ours.endpoint + "/v1/traces"), spans_
        )
    # The official exporter loses the whole batch; ours sends the other two.
    assert official_result is SpanExportResult.FAILURE
    assert theirs.spans == []
    assert fast_result is SpanExportResult.SUCCESS
    assert [s.name for s in ours.spans] == ["A", "B"]
    assert "1 of 3 spans left out of an OTLP export" in caplog.text
    assert "UnicodeEncodeError" in caplog.text


def test_the_sdk_exporter_still_serialises_through_its_encode_spans_global() -> None:
    """FastOTLPSpanExporter replaces the global ``encode_spans`` in a copy of
    ``OTLPSpanExporter.export``. When a new SDK stops serialising that way,
    this fails: re-read its ``export`` and adapt latency_common/otlp_exporter.py."""
    code = OTLPSpanExporter.export.__code__
    assert otlp_exporter.SDK_ENCODER_NAME in code.co_names
    assert "SerializePartialToString" in code.co_names
    assert sdk_trace_exporter.encode_spans is official
    assert FastOTLPSpanExporter.export is not OTLPSpanExporter.export


def test_random_batches_reach_a_real_receiver_as_the_official_encoding() -> None:
    with RecordingReceiver() as receiver:
        exporter = FastOTLPSpanExporter(endpoint=receiver.endpoint + "/v1/traces", timeout=10)

        @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(spans(), min_size=1, max_size=6))
        def check(batch: list[ReadableSpan]) -> None:
            receiver.bodies.clear()
            assert exporter.export(batch) is SpanExportResult.SUCCESS
            assert receiver.bodies == [official(batch).SerializePartialToString()]

        try:
            check()
        finally:
            exporter.shutdown()


@pytest.mark.parametrize("corruption", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_spans_encoded_as_they_ended_make_the_same_body_and_a_bad_one_is_dropped_alone(
    corruption: str,
) -> None:
    fields = [_span_fields(name="A"), _span_fields(name="B", resource=RESOURCES[2])]
    good = [EncodedSpan(**f) for f in fields]
    assert all(span.wire is not None for span in good)
    bad = EncodedSpan(**_span_fields(**CORRUPTIONS[corruption]))
    assert bad.wire is None
    batch = encode_spans_dropping_invalid([good[0], bad, good[1]])
    plain = [ReadableSpan(**f) for f in fields]
    assert batch.body == official(plain).SerializeToString()
    assert batch.dropped == 1
    # The export thread sends the bytes written when the span ended, as they are.
    good[1].wire = encode_span(_span(name="C"))
    assert encode_spans([good[1]]).count(b"\x2a\x01C") == 1
