"""Telemetry configuration (latency_common/telemetry.py): endpoints, headers, the
Honeycomb convenience of README "Configuration", samplers, export log limits."""

from __future__ import annotations

import logging
import time

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanContext

from latency_common import telemetry
from latency_common.logs import RateLimitFilter
from latency_common.otlp_exporter import FastOTLPSpanExporter
from tests.otlp_receiver import OtlpReceiver


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({}, "http://127.0.0.1:4318/v1/traces"),
        ({"HONEYCOMB_API_KEY": "k"}, "https://api.honeycomb.io/v1/traces"),
        (
            {"HONEYCOMB_API_KEY": "k", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"},
            "http://collector:4318/v1/traces",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otlp.example"}, "https://otlp.example/v1/traces"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "https://otlp.example",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/custom",
            },
            "https://traces.example/custom",
        ),
    ],
)
def test_endpoint_resolution(env: dict[str, str], endpoint: str) -> None:
    assert telemetry.otlp_traces_endpoint(env) == endpoint


def test_honeycomb_key_adds_the_team_header_to_the_environments_headers() -> None:
    env = {"HONEYCOMB_API_KEY": "secret-key", "OTEL_EXPORTER_OTLP_HEADERS": "x-a=1,x-b=two%20words"}
    assert telemetry.otlp_headers(env) == {
        "x-a": "1",
        "x-b": "two words",
        "x-honeycomb-team": "secret-key",
    }


def test_explicit_team_header_wins_over_the_key() -> None:
    env = {"HONEYCOMB_API_KEY": "k1", "OTEL_EXPORTER_OTLP_HEADERS": "X-Honeycomb-Team=k2"}
    assert telemetry.otlp_headers(env) == {"x-honeycomb-team": "k2"}


def test_signal_specific_headers_take_precedence() -> None:
    env = {
        "HONEYCOMB_API_KEY": "k",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-generic=1",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-traces=1",
    }
    assert telemetry.otlp_headers(env) == {"x-traces": "1", "x-honeycomb-team": "k"}


def test_no_key_leaves_headers_to_the_sdk() -> None:
    assert telemetry.otlp_headers({"OTEL_EXPORTER_OTLP_HEADERS": "a=b"}) is None


def test_destination_never_shows_the_key() -> None:
    text = telemetry.describe_destination({"HONEYCOMB_API_KEY": "hush-hush-key"})
    assert "hush-hush" not in text
    assert "api.honeycomb.io" in text
    assert "local viewer" in telemetry.describe_destination({})


def test_service_name_default_and_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert telemetry.build_resource("gateway").attributes["service.name"] == "gateway"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs,team=edge")
    resource = telemetry.build_resource("gateway")
    assert resource.attributes["service.name"] == "from-attrs"
    assert resource.attributes["team"] == "edge"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout-gateway")
    assert telemetry.build_resource("gateway").attributes["service.name"] == "checkout-gateway"


def test_sampler_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    gateway = telemetry.build_tracer_provider("gateway", default_sampler=ALWAYS_ON)
    backend = telemetry.build_tracer_provider("backend")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    ratio = telemetry.build_tracer_provider("gateway", default_sampler=ALWAYS_ON)
    try:
        assert gateway.sampler is ALWAYS_ON
        assert isinstance(backend.sampler, ParentBased)
        assert "0.25" in ratio.sampler.get_description()
    finally:
        for provider in (gateway, backend, ratio):
            telemetry.shutdown_tracer_provider(provider, timeout_s=1)


def test_export_failure_logs_are_rate_limited() -> None:
    limiter = RateLimitFilter(interval_s=3600)
    records = [
        logging.LogRecord("x", logging.WARNING, __file__, 1, "export failed", None, None)
        for _ in range(50)
    ]
    passed = [r for r in records if limiter.filter(r)]
    assert len(passed) == 1
    debug = logging.LogRecord("x", logging.DEBUG, __file__, 1, "detail", None, None)
    assert limiter.filter(debug)


def _span(name: str, span_id: int, start_ns: int) -> ReadableSpan:
    return ReadableSpan(
        name=name,
        context=SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id, is_remote=False),
        resource=Resource.create({"service.name": "gateway"}),
        start_time=start_ns,
        end_time=start_ns + 1_000,
    )


def test_an_unencodable_span_is_dropped_alone_not_with_its_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One span with a timestamp beyond protobuf's fixed64 (what a 1e20 ms
    beacon made) used to lose every span of its batch: OTLPSpanExporter
    logs "Failed to encode span batch" and returns FAILURE for all."""
    now_ns = time.time_ns()
    good = [_span(f"GET {i}", i + 1, now_ns) for i in range(5)]
    poisoned = _span("GET poisoned", 99, int(1e20 * 1e6))
    with OtlpReceiver() as receiver:
        exporter = telemetry.GuardedExporter(
            OTLPSpanExporter(endpoint=receiver.endpoint + "/v1/traces")
        )
        with caplog.at_level(logging.WARNING, logger="latency_common.telemetry"):
            result = exporter.export([*good[:2], poisoned, *good[2:]])
            exporter.export([poisoned])  # counted again, warned about once a minute
        assert result is SpanExportResult.SUCCESS
        spans = receiver.wait_for(lambda spans: len(spans) >= 5, timeout_s=10)
        exporter.shutdown()
    assert sorted(s.name for s in spans) == sorted(s.name for s in good)
    assert exporter.unencodable_spans == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "latency_common.telemetry"]
    assert warnings == [
        "dropped 1 span(s) that cannot be encoded for OTLP (GET poisoned); 1 so far"
    ]


def test_a_failing_endpoint_is_not_mistaken_for_an_encoding_problem() -> None:
    exporter = telemetry.GuardedExporter(
        OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=1)
    )
    assert exporter.export([_span("GET", 1, time.time_ns())]) is SpanExportResult.FAILURE
    assert exporter.unencodable_spans == 0
    exporter.shutdown()


def test_telemetry_handle_counts_queued_and_exported_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The health report's figures come from our own counts, not from the
    SDK's private queue: a span waits in the queue, then a real receiver
    takes it and the count moves to exported."""
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # nothing leaves before the flush
        built = telemetry.build_telemetry("gateway", default_sampler=ALWAYS_ON)
        built.provider.get_tracer("t").start_span("queued").end()
        status = built.exporter_status()
        assert (status["ended_spans"], status["queued_spans"], status["exported_spans"]) == (
            1,
            1,
            0,
        )
        assert telemetry.shutdown_tracer_provider(built.provider, timeout_s=10)
        status = built.exporter_status()
        assert (status["queued_spans"], status["exported_spans"], status["failed_spans"]) == (
            0,
            1,
            0,
        )
        assert [s.name for s in receiver.spans] == ["queued"]


def test_no_private_sdk_attribute_is_read_anywhere() -> None:
    import re

    from tests.servers import ROOT

    private = re.compile(r"\._(active_span_processor|batch_processor|queue|max_queue_size)\b")
    for package in ("gateway", "viewer", "latency_common", "backend"):
        for path in (ROOT / package).rglob("*.py"):
            assert not private.search(path.read_text()), path


# -- the exporter build_telemetry wires -----------------------------------------------


def test_build_telemetry_exports_with_the_fast_encoder_behind_the_guard() -> None:
    built = telemetry.build_telemetry("gateway", default_sampler=ALWAYS_ON)
    try:
        assert built.exporter is not None
        assert isinstance(built.exporter.delegate, FastOTLPSpanExporter)
    finally:
        built.provider.shutdown()


def test_the_fast_exporter_drops_an_unencodable_span_alone_and_counts_it() -> None:
    now_ns = time.time_ns()
    good = [_span(f"GET {i}", i + 1, now_ns) for i in range(3)]
    poisoned = _span("GET poisoned", 99, int(1e20 * 1e6))
    with OtlpReceiver() as receiver:
        exporter = telemetry.build_exporter(
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint + "/v1/traces"}
        )
        assert exporter.export([good[0], poisoned, *good[1:]]) is SpanExportResult.SUCCESS
        spans = receiver.wait_for(lambda spans: len(spans) >= 3, timeout_s=10)
        exporter.shutdown()
    assert sorted(s.name for s in spans) == sorted(s.name for s in good)
    # /__gateway/health's unencodable_spans counts what the encoder left out.
    assert exporter.unencodable_spans == 1


def test_the_export_session_resolves_proxies_once_and_honours_https_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTPS_PROXY/HTTP_PROXY and NO_PROXY are applied when the exporter is
    built; requests reads no environment per post afterwards."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        for spelled in (name, name.lower()):
            monkeypatch.delenv(spelled, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    session = telemetry.export_session("https://api.honeycomb.io/v1/traces", {})
    assert session is not None
    assert session.trust_env is False
    assert session.proxies.get("https") == "http://127.0.0.1:3128"
    monkeypatch.setenv("NO_PROXY", "api.honeycomb.io")
    bypassed = telemetry.export_session("https://api.honeycomb.io/v1/traces", {})
    assert bypassed is not None
    assert bypassed.proxies == {}
    # A credential-provider plugin builds its own session (the SDK loads it).
    plugin = {"OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER": "x"}
    assert telemetry.export_session("https://api.honeycomb.io/v1/traces", plugin) is None


def test_spans_reach_the_collector_through_the_http_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real loopback proxy: the endpoint's host does not resolve, so spans
    arrive only if the exporter posts through HTTP_PROXY. The receiver plays
    the forward proxy (it gets the absolute-form request line)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        for spelled in (name, name.lower()):
            monkeypatch.delenv(spelled, raising=False)
    with OtlpReceiver() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.endpoint)
        endpoint = "http://collector.invalid:4318/v1/traces"
        exporter = telemetry.build_exporter({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint})
        # Resolved once: unsetting the variable now changes nothing.
        monkeypatch.delenv("HTTP_PROXY")
        result = exporter.export([_span("GET proxied", 1, time.time_ns())])
        assert result is SpanExportResult.SUCCESS
        spans = proxy.wait_for(lambda spans: len(spans) >= 1, timeout_s=10)
        exporter.shutdown()
    assert [s.name for s in spans] == ["GET proxied"]
    assert proxy.headers[0]["Host"] == "collector.invalid:4318"
