"""The local trace viewer (``viewer/``): OTLP/HTTP receiver, store,
web UI, CLI and report, against real servers on loopback ports, the real
OTel exporter, real SQLite files and real Chromium.

Spec references: OTLP/HTTP (https://opentelemetry.io/docs/specs/otlp/#otlphttp)
for encodings, status codes and the JSON hex-id rule; RFC 9110 §7.2 and
§15.5.20 for the Host check; the README's "No key? The local viewer" for the
route definition and the command line.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import itertools
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from google.protobuf import json_format
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from playwright.async_api import async_playwright

from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.servers import Process, parse_head, raw_request
from viewer import hosts, otlp
from viewer.app import create_app
from viewer.cli import ServeConfig, UsageError, report_config, serve_config
from viewer.report import percentile, route_stats
from viewer.spans import SpanRecord, upstream_wait, waterfall
from viewer.store import Store

ROOT = Path(__file__).resolve().parents[1]
MS = 1_000_000
T = TypeVar("T")


# -- helpers -----------------------------------------------------------------


async def poll(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout_s: float = 20
) -> T:
    """``probe()`` until ``ok(result)``, with a deadline (no bare sleeps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if ok(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition never held; last result: {result!r}")
        await asyncio.sleep(0.05)


def record(
    trace_no: int,
    span_no: int,
    *,
    parent_no: int | None = None,
    service: str = "backend",
    name: str = "span",
    kind: int = 1,
    start_ns: int,
    duration_ns: int = MS,
    attributes: dict[str, Any] | None = None,
) -> SpanRecord:
    return SpanRecord(
        trace_id=f"{trace_no + 1:032x}",
        span_id=f"{span_no + 1:016x}",
        parent_span_id="" if parent_no is None else f"{parent_no + 1:016x}",
        service=service,
        name=name,
        kind=kind,
        start_ns=start_ns,
        end_ns=start_ns + duration_ns,
        status_code=0,
        status_message="",
        attributes=attributes or {},
        events=[],
    )


def synthetic_trace(
    trace_no: int,
    *,
    start_ns: int,
    route: str | None = "/api/activities/home",
    uplink_ms: float = 25.3,
    rtt_ms: float = 51.2,
    gateway_ms: float = 3.1,
    backend_ms: float = 24.0,
    status: str = "ok",
) -> list[SpanRecord]:
    """What one browser request through the gateway exports: browser CLIENT
    → gateway SERVER → gateway CLIENT → backend SERVER → mock-data, on the
    gateway's clock (the browser span starts one uplink before the gateway's)."""
    up_ns = int(uplink_ms * MS)
    be_ns = int(backend_ms * MS)
    gw_start = start_ns + up_ns
    latency = {
        "latency.status": status,
        "latency.reason": "bounded" if status == "ok" else "clock_rate",
        "latency.rtt_ms": rtt_ms,
        "latency.gateway_ms": gateway_ms,
    }
    if status == "ok":
        latency |= {"latency.uplink_ms": uplink_ms, "latency.trust": "server_bounded"}
    method = "GET " + route if route else "GET"
    spans = [
        record(trace_no, 0, service="browser", name=method, kind=3, start_ns=start_ns,
               duration_ns=up_ns + be_ns + 8 * MS + up_ns),
        record(trace_no, 1, parent_no=0, service="gateway", name=method, kind=2,
               start_ns=gw_start, duration_ns=be_ns + 6 * MS, attributes=latency),
        record(trace_no, 2, parent_no=1, service="gateway", name="GET", kind=3,
               start_ns=gw_start + 1 * MS, duration_ns=be_ns + 4 * MS),
    ]  # fmt: skip
    if route is not None:
        spans += [
            record(trace_no, 3, parent_no=2, service="backend", name=method, kind=2,
                   start_ns=gw_start + 2 * MS, duration_ns=be_ns,
                   attributes={"http.route": route}),
            record(trace_no, 4, parent_no=3, service="backend", name="mock-data",
                   start_ns=gw_start + 3 * MS, duration_ns=be_ns // 2),
        ]  # fmt: skip
    return spans


def proto_request(spans: list[SpanRecord]) -> ExportTraceServiceRequest:
    """An export request as an SDK would build it: one resource per service."""
    message = ExportTraceServiceRequest()
    for service in dict.fromkeys(s.service for s in spans):
        resource_spans = message.resource_spans.add()
        resource_spans.resource.attributes.append(
            KeyValue(key="service.name", value=AnyValue(string_value=service))
        )
        scope = resource_spans.scope_spans.add()
        for s in (s for s in spans if s.service == service):
            proto = ProtoSpan(
                trace_id=bytes.fromhex(s.trace_id),
                span_id=bytes.fromhex(s.span_id),
                parent_span_id=bytes.fromhex(s.parent_span_id),
                name=s.name,
                kind=s.kind,  # type: ignore[arg-type]  # an int is what the wire carries
                start_time_unix_nano=s.start_ns,
                end_time_unix_nano=s.end_ns,
            )
            for key, value in s.attributes.items():
                any_value = (
                    AnyValue(string_value=value)
                    if isinstance(value, str)
                    else AnyValue(double_value=value)
                )
                proto.attributes.append(KeyValue(key=key, value=any_value))
            scope.spans.append(proto)
    return message


def seed(store: Store, now_ns: int) -> str:
    """Traces for three routes: ``/api/activities/home`` ten minutes ago,
    ``/api/slow`` five, and two in the last ten seconds (one ``implausible``
    on the home route, one with no backend span). Returns the id of the
    first home trace (uplink 25.3 ms, backend 20 ms)."""
    home_uplinks = [25.3, 21.0, 22.5, 23.1, 24.0, 26.2, 27.9, 31.4, 48.0]
    batch: list[SpanRecord] = []
    for i, uplink in enumerate(home_uplinks):
        batch += synthetic_trace(i, start_ns=now_ns - (600 - i) * 1000 * MS, uplink_ms=uplink,
                                 rtt_ms=40 + i * 2.5, backend_ms=20 + i)  # fmt: skip
    for i in range(4):
        batch += synthetic_trace(20 + i, start_ns=now_ns - (300 - i) * 1000 * MS,
                                 route="/api/slow", uplink_ms=60 + i * 30, rtt_ms=130 + i,
                                 backend_ms=250 + i * 10)  # fmt: skip
    batch += synthetic_trace(30, start_ns=now_ns - 10_000 * MS, status="implausible", uplink_ms=1)
    batch += synthetic_trace(31, start_ns=now_ns - 5_000 * MS, route=None)
    store.insert(batch)
    return f"{1:032x}"


@dataclass
class ViewerServer:
    url: str
    store: Store


@pytest.fixture
async def viewer(tmp_path: Path) -> AsyncIterator[ViewerServer]:
    store = Store(tmp_path / "traces.db")
    server = TestServer(create_app(store), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield ViewerServer(str(server.make_url("")).rstrip("/"), store)
    finally:
        await server.close()
        store.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session


async def get_json(client: aiohttp.ClientSession, url: str) -> Any:
    async with client.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def get_text(client: aiohttp.ClientSession, url: str, status: int = 200) -> str:
    async with client.get(url) as response:
        assert response.status == status
        return await response.text()


# -- ingest through the real OTel exporter ---------------------------------------


def export_three_services(endpoint: str) -> dict[str, str]:
    """browser CLIENT → gateway SERVER → backend SERVER, each service with its
    own TracerProvider and OTLP exporter, as three processes would have.
    Times are explicit so the waterfall maths is exact: 0–60, 25–55, 28–52 ms."""
    providers = {}
    for service in ("browser", "gateway", "backend"):
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        providers[service] = provider
    base = time.time_ns() - 1000 * MS
    browser = (
        providers["browser"]
        .get_tracer("test")
        .start_span("GET /api/activities/home", kind=trace.SpanKind.CLIENT, start_time=base)
    )
    gateway = (
        providers["gateway"]
        .get_tracer("test")
        .start_span(
            "GET /api/activities/home",
            context=trace.set_span_in_context(browser),
            kind=trace.SpanKind.SERVER,
            start_time=base + 25 * MS,
            attributes={
                "latency.status": "ok",
                "latency.trust": "server_bounded",
                "latency.uplink_ms": 25.3,
                "latency.rtt_ms": 51.2,
                "latency.gateway_ms": 3.1,
                # One gateway span per request: the upstream wait is on it.
                "latency.upstream_ms": 2.5,
            },
        )
    )
    backend = (
        providers["backend"]
        .get_tracer("test")
        .start_span(
            "GET /api/activities/home",
            context=trace.set_span_in_context(gateway),
            kind=trace.SpanKind.SERVER,
            start_time=base + 28 * MS,
            attributes={"http.route": "/api/activities/home"},
        )
    )
    backend.end(end_time=base + 52 * MS)
    gateway.end(end_time=base + 55 * MS)
    browser.end(end_time=base + 60 * MS)
    for provider in providers.values():
        provider.shutdown()
    return {
        "trace": f"{browser.get_span_context().trace_id:032x}",
        "browser": f"{browser.get_span_context().span_id:016x}",
        "gateway": f"{gateway.get_span_context().span_id:016x}",
        "backend": f"{backend.get_span_context().span_id:016x}",
    }


async def test_real_exporter_spans_show_with_parentage_and_numbers(
    viewer: ViewerServer, client: aiohttp.ClientSession
) -> None:
    # The exporter posts from this thread while the loop serves the viewer.
    ids = await asyncio.to_thread(export_three_services, f"{viewer.url}/v1/traces")

    listing = await poll(
        lambda: get_json(client, f"{viewer.url}/api/traces"),
        lambda doc: bool(doc["traces"]) and doc["traces"][0]["span_count"] == 3,
    )
    (summary,) = listing["traces"]
    assert summary["trace_id"] == ids["trace"]
    assert summary["root_service"] == "browser"
    assert summary["services"] == ["browser", "gateway", "backend"]
    assert summary["latency_status"] == "ok"
    assert summary["uplink_ms"] == 25.3
    assert summary["duration_ms"] == 60.0

    doc = await get_json(client, f"{viewer.url}/api/traces/{ids['trace']}")
    spans = doc["spans"]
    assert [s["service"] for s in spans] == ["browser", "gateway", "backend"]
    assert [s["span_id"] for s in spans] == [ids["browser"], ids["gateway"], ids["backend"]]
    assert [s["parent_span_id"] for s in spans] == ["", ids["browser"], ids["gateway"]]
    assert [s["kind"] for s in spans] == ["client", "server", "server"]
    assert [s["depth"] for s in spans] == [0, 1, 2]
    assert [(s["offset_pct"], s["width_pct"]) for s in spans] == [
        (0.0, 100.0),
        (41.667, 50.0),
        (46.667, 40.0),
    ]
    assert doc["gateway"]["span_id"] == ids["gateway"]
    assert doc["gateway"]["latency"]["latency.rtt_ms"] == 51.2
    # The upstream wait inside the gateway's bar: sent 3.1 − 2.5 ms after
    # receipt, 2.5 ms of its 30 ms.
    assert [s["upstream_wait_pct"] for s in spans] == [None, [2.0, 8.333], None]

    page = await get_text(client, f"{viewer.url}/traces/{ids['trace']}")
    rows = re.findall(
        r'<div class="span-row (svc-\w+)" data-span-id="(\w+)" data-depth="(\d)"', page
    )
    assert rows == [
        ("svc-browser", ids["browser"], "0"),
        ("svc-gateway", ids["gateway"], "1"),
        ("svc-backend", ids["backend"], "2"),
    ]
    assert (
        'class="wait" title="waiting for the upstream" style="margin-left:2.000%;width:8.333%"'
        in page
    )
    assert 'style="margin-left:41.667%;width:50.000%"' in page
    assert re.search(r'data-key="latency.uplink_ms">.*?<td class="num">25.3</td>', page)
    assert '<span class="verdict verdict-ok">ok</span>' in page

    index = await get_text(client, f"{viewer.url}/")
    assert f'href="/traces/{ids["trace"]}"' in index
    assert "verdict-ok" in index
    assert '<td class="num uplink">25.3</td>' in index

    (route,) = (await get_json(client, f"{viewer.url}/api/latency"))["routes"]
    assert route["route"] == "/api/activities/home"
    assert route["count"] == 1
    assert [route[m]["p50"] for m in ("rtt_ms", "uplink_ms", "gateway_ms", "backend_ms")] == [
        51.2,
        25.3,
        3.1,
        24.0,
    ]


# -- encodings and OTLP/HTTP answers ----------------------------------------------------

JSON_TRACE = "5B8EFFF798038103D269B633813FC60C"  # upper case: hex is case-insensitive


def otlp_json(start_ns: int) -> dict[str, Any]:
    """OTLP/JSON as the spec writes it: hex ids, enums as numbers, 64-bit
    integers as strings."""
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "gateway"}}]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "hand-written"},
                        "spans": [
                            {
                                "traceId": JSON_TRACE,
                                "spanId": "eee19b7ec3c1b174",
                                "parentSpanId": "eee19b7ec3c1b173",
                                "name": "GET /json",
                                "kind": 2,
                                "startTimeUnixNano": str(start_ns),
                                "endTimeUnixNano": str(start_ns + 5 * MS),
                                "attributes": [
                                    {"key": "latency.status", "value": {"stringValue": "ok"}},
                                    {"key": "latency.uplink_ms", "value": {"doubleValue": 12.5}},
                                    {
                                        "key": "http.response.status_code",
                                        "value": {"intValue": "502"},
                                    },
                                ],
                                "events": [{"timeUnixNano": str(start_ns + MS), "name": "retry"}],
                                "status": {"code": 2, "message": "upstream unreachable"},
                                "futureField": "ignored, as the spec requires",
                            }
                        ],
                    }
                ],
            }
        ]
    }


async def post(
    client: aiohttp.ClientSession,
    url: str,
    body: Any,
    content_type: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes, Any]:
    if isinstance(body, bytes):
        body = io.BytesIO(body)  # aiohttp warns about large raw bytes bodies
    async with client.post(
        f"{url}/v1/traces", data=body, headers={"Content-Type": content_type, **(headers or {})}
    ) as response:
        return response.status, response.content_type, await response.read(), response.headers


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
async def test_json_encoding_with_hex_ids(
    viewer: ViewerServer, client: aiohttp.ClientSession, compress: bool
) -> None:
    body = json.dumps(otlp_json(time.time_ns())).encode()
    headers = {"Content-Encoding": "gzip"} if compress else {}
    status, ctype, answer, _ = await post(
        client, viewer.url, gzip.compress(body) if compress else body, "application/json", headers
    )
    # OTLP/HTTP: the response is an ExportTraceServiceResponse in the request's encoding.
    assert (status, ctype, json.loads(answer)) == (200, "application/json", {})
    doc = await get_json(client, f"{viewer.url}/api/traces/{JSON_TRACE.lower()}")
    (span,) = doc["spans"]
    # Read as base64 instead of hex, these ids would come out as other bytes.
    assert (span["span_id"], span["parent_span_id"]) == ("eee19b7ec3c1b174", "eee19b7ec3c1b173")
    assert span["service"] == "gateway"
    assert span["kind"] == "server"
    assert span["attributes"] == {
        "latency.status": "ok",
        "latency.uplink_ms": 12.5,
        "http.response.status_code": 502,
    }
    assert (span["status_code"], span["status_message"]) == ("error", "upstream unreachable")
    assert span["events"][0]["name"] == "retry"
    assert span["duration_ms"] == 5.0


async def test_gzip_protobuf_is_stored(viewer: ViewerServer, client: aiohttp.ClientSession) -> None:
    spans = synthetic_trace(7, start_ns=time.time_ns())
    body = gzip.compress(proto_request(spans).SerializeToString())
    status, ctype, answer, _ = await post(
        client, viewer.url, body, "application/x-protobuf", {"Content-Encoding": "gzip"}
    )
    assert (status, ctype) == (200, "application/x-protobuf")
    response = ExportTraceServiceResponse()
    response.ParseFromString(answer)
    assert not response.HasField("partial_success")
    doc = await get_json(client, f"{viewer.url}/api/traces/{spans[0].trace_id}")
    assert [s["span_id"] for s in doc["spans"]] == [s.span_id for s in spans]


async def test_resent_batch_does_not_duplicate_and_bad_ids_are_partial_success(
    viewer: ViewerServer, client: aiohttp.ClientSession
) -> None:
    good = synthetic_trace(3, start_ns=time.time_ns())
    message = proto_request(good)
    bad = message.resource_spans[0].scope_spans[0].spans.add()
    bad.CopyFrom(message.resource_spans[0].scope_spans[0].spans[0])
    bad.trace_id = bytes(16)  # all zeros: invalid (OTLP trace.proto)
    for _ in range(2):
        status, _, answer, _ = await post(
            client, viewer.url, message.SerializeToString(), "application/x-protobuf"
        )
        assert status == 200
        response = ExportTraceServiceResponse()
        response.ParseFromString(answer)
        assert response.partial_success.rejected_spans == 1
        assert "trace_id" in response.partial_success.error_message
    assert await asyncio.to_thread(viewer.store.count) == len(good)


def gzip_bomb() -> bytes:
    """17 MiB of zeros in about 17 KiB: over the 16 MiB decompressed cap."""
    return gzip.compress(bytes(17 * 1024 * 1024), compresslevel=9)


REJECTIONS = [
    # (id, content type, body, extra headers, status)
    pytest.param("text/plain", b"hello", {}, 415, id="415-text-plain"),
    pytest.param("application/x-protobuf", b"x", {"Content-Encoding": "br"}, 415, id="415-br"),
    pytest.param("application/x-protobuf", b"\xff\xff\xff\xff\xff", {}, 400, id="400-protobuf"),
    pytest.param("application/json", b"{not json", {}, 400, id="400-json"),
    pytest.param("application/json", b"[1, 2]", {}, 400, id="400-json-not-object"),
    pytest.param(
        "application/json",
        b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"xyz"}]}]}]}',
        {},
        400,
        id="400-json-bad-hex",
    ),
    pytest.param("application/json", b'{"resourceSpans": 5}', {}, 400, id="400-json-wrong-shape"),
    pytest.param(
        "application/x-protobuf",
        gzip.compress(b"abc")[:-6],
        {"Content-Encoding": "gzip"},
        400,
        id="400-truncated-gzip",
    ),
    pytest.param(
        "application/x-protobuf", b"\x00" * 20, {"Content-Encoding": "gzip"}, 400, id="400-not-gzip"
    ),
    pytest.param(
        "application/x-protobuf",
        bytes(otlp.MAX_BODY_BYTES + 1),
        {},
        413,
        id="413-declared-length",
    ),
    pytest.param(
        "application/x-protobuf", gzip_bomb(), {"Content-Encoding": "gzip"}, 413, id="413-gzip-bomb"
    ),
]


@pytest.mark.parametrize(("content_type", "body", "headers", "status"), REJECTIONS)
async def test_bad_exports_are_refused_and_stored_spans_survive(
    viewer: ViewerServer,
    client: aiohttp.ClientSession,
    content_type: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
) -> None:
    kept = synthetic_trace(1, start_ns=time.time_ns())
    code, _, _, _ = await post(
        client, viewer.url, proto_request(kept).SerializeToString(), "application/x-protobuf"
    )
    assert code == 200

    code, ctype, answer, _ = await post(client, viewer.url, body, content_type, headers)
    assert code == status
    # OTLP/HTTP: error bodies are a google.rpc.Status in the request's
    # encoding (JSON when the encoding itself is what was refused).
    message = status_pb2.Status()
    if ctype == "application/x-protobuf":
        message.ParseFromString(answer)
    else:
        assert ctype == "application/json"
        json_format.Parse(answer, message)
    assert message.message

    assert await asyncio.to_thread(viewer.store.count) == len(kept)
    doc = await get_json(client, f"{viewer.url}/api/traces/{kept[0].trace_id}")
    assert len(doc["spans"]) == len(kept)


async def test_chunked_body_over_the_limit_is_413_without_reading_it_all(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < 64 * 1024 * 1024:  # bounded, far over the limit
            sent += 64 * 1024
            yield bytes(64 * 1024)

    with Store(tmp_path / "t.db") as store:
        server = TestServer(create_app(store, max_body_bytes=256 * 1024), host="127.0.0.1", port=0)
        await server.start_server()
        try:
            try:
                async with client.post(
                    server.make_url("/v1/traces"),
                    data=endless(),
                    headers={"Content-Type": "application/x-protobuf"},
                ) as response:
                    assert response.status == 413
            except aiohttp.ClientOSError:
                pass  # the server may close while we still send: also a refusal
            assert sent < 64 * 1024 * 1024
        finally:
            await server.close()


async def test_store_failure_is_503_retryable(
    viewer: ViewerServer, client: aiohttp.ClientSession
) -> None:
    await asyncio.to_thread(viewer.store.close)
    body = proto_request(synthetic_trace(2, start_ns=time.time_ns())).SerializeToString()
    code, _, _, headers = await post(client, viewer.url, body, "application/x-protobuf")
    assert code == 503  # OTLP/HTTP: retryable, the exporter sends the batch again
    assert headers["Retry-After"] == "1"


# -- the web UI ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "trace_id",
    ["0" * 32, "zz" * 16, "abc", "f" * 33, "0123456789abcdef0123456789abcdef"],
    ids=["all-zero", "not-hex", "short", "long", "unknown"],
)
async def test_unknown_or_malformed_trace_is_404(
    viewer: ViewerServer, client: aiohttp.ClientSession, trace_id: str
) -> None:
    await asyncio.to_thread(seed, viewer.store, time.time_ns())
    page = await get_text(client, f"{viewer.url}/traces/{trace_id}", status=404)
    assert "Not found" in page
    async with client.get(f"{viewer.url}/api/traces/{trace_id}") as response:
        assert response.status == 404
        assert "error" in await response.json()


async def test_span_data_is_escaped(viewer: ViewerServer, client: aiohttp.ClientSession) -> None:
    evil = '<img src=x onerror="alert(1)">'
    spans = [
        record(40, 0, service=evil, name=evil, start_ns=time.time_ns(), attributes={"x": evil})
    ]
    await asyncio.to_thread(viewer.store.insert, spans)
    for path in ("/", f"/traces/{spans[0].trace_id}"):
        async with client.get(viewer.url + path) as response:
            page = await response.text()
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert "<img" not in page
        assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page


async def test_route_names_are_escaped_on_the_latency_page(
    viewer: ViewerServer, client: aiohttp.ClientSession
) -> None:
    # The route comes from the backend span's http.route: any backend (or
    # anyone who can post OTLP) chooses it, so /latency escapes it like the
    # other pages.
    evil = '<script>alert("route")</script>'
    now = time.time_ns()
    gateway_attrs = {"latency.status": "ok", "latency.uplink_ms": 12.5, "latency.rtt_ms": 30.0}
    spans = [
        record(
            41, 0, service="gateway", name="GET", kind=2, start_ns=now, attributes=gateway_attrs
        ),
        record(
            41,
            1,
            parent_no=0,
            service="backend",
            name=evil,
            kind=2,
            start_ns=now + MS,
            attributes={"http.route": evil},
        ),
    ]
    await asyncio.to_thread(viewer.store.insert, spans)
    page = await get_text(client, f"{viewer.url}/latency")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;route&quot;)&lt;/script&gt;" in page


async def test_latency_page_and_api_per_route(
    viewer: ViewerServer, client: aiohttp.ClientSession
) -> None:
    await asyncio.to_thread(seed, viewer.store, time.time_ns())
    routes = {
        r["route"]: r for r in (await get_json(client, f"{viewer.url}/api/latency"))["routes"]
    }
    assert set(routes) == {"/api/activities/home", "/api/slow", "GET"}
    home = routes["/api/activities/home"]
    assert home["count"] == 10  # 9 ok + 1 implausible
    # Nearest rank over the 9 ok uplinks: the 5th smallest.
    assert (home["uplink_ms"]["count"], home["uplink_ms"]["p50"]) == (9, 25.3)
    assert home["uplink_ms"]["p99"] == 48.0
    assert home["rtt_ms"]["count"] == 10
    assert sum(b["count"] for b in home["uplink_histogram"]) == 9
    assert routes["GET"]["backend_ms"]["count"] == 0  # no backend span: the gateway's name

    page = await get_text(client, f"{viewer.url}/latency")
    row = re.search(r'<tr data-route="/api/activities/home">(.*?)</tr>', page)
    assert row is not None
    assert '<td class="num p50-uplink">25.3</td>' in row.group(1)
    assert '<td class="num n-uplink">9</td>' in row.group(1)

    recent = await get_json(client, f"{viewer.url}/api/latency?since_minutes=1")
    assert {r["route"] for r in recent["routes"]} == {"GET", "/api/activities/home"}
    async with client.get(f"{viewer.url}/latency?since_minutes=soon") as response:
        assert response.status == 400


async def test_recent_traces_newest_first_and_limited(
    viewer: ViewerServer, client: aiohttp.ClientSession
) -> None:
    empty = await get_text(client, f"{viewer.url}/")
    assert "No traces yet" in empty
    await asyncio.to_thread(seed, viewer.store, time.time_ns())
    traces = (await get_json(client, f"{viewer.url}/api/traces?limit=3"))["traces"]
    assert [t["trace_id"] for t in traces] == [f"{32:032x}", f"{31:032x}", f"{24:032x}"]
    assert traces[1]["latency_status"] == "implausible"
    assert traces[1]["uplink_ms"] is None


def test_waterfall_tree_siblings_orphans_and_cycles() -> None:
    def span(n: int, parent: int | None, start_ms: int, end_ms: int) -> SpanRecord:
        return record(0, n, parent_no=parent, start_ns=start_ms * MS,
                      duration_ns=(end_ms - start_ms) * MS)  # fmt: skip

    spans = [
        span(1, 0, 50, 60),  # child of the root, starts later
        span(0, None, 0, 100),  # root
        span(2, 0, 10, 20),  # child of the root, starts first
        span(3, 9, 5, 8),  # orphan: its parent never arrived
        span(4, 5, 30, 40),  # a parent cycle, 4 ↔ 5
        span(5, 4, 35, 45),
    ]
    shape = waterfall(f"{1:032x}", spans)
    order = [(row.span.span_id[-1], row.depth) for row in shape.rows]
    assert order == [("1", 0), ("3", 1), ("2", 1), ("4", 0), ("5", 0), ("6", 1)]
    assert [(row.offset_pct, row.width_pct) for row in shape.rows][:3] == [
        (0.0, 100.0),
        (10.0, 10.0),
        (50.0, 10.0),
    ]
    (instant,) = waterfall("t", [span(0, None, 7, 7)]).rows
    assert (instant.offset_pct, instant.width_pct) == (0.0, 100.0)


@pytest.mark.parametrize(
    ("attributes", "wait"),
    [
        ({"latency.gateway_ms": 10.0, "latency.upstream_ms": 6.0}, (20.0, 30.0)),
        ({"latency.gateway_ms": 20.0, "latency.upstream_ms": 20.0}, (0.0, 100.0)),
        # Figures larger than the span (clock maths from a hostile client): clamped.
        ({"latency.gateway_ms": 90.0, "latency.upstream_ms": 10.0}, (100.0, 0.0)),
        ({"latency.gateway_ms": 10.0}, None),
        ({"latency.gateway_ms": 5.0, "latency.upstream_ms": 6.0}, None),
        ({"latency.gateway_ms": "10", "latency.upstream_ms": 6.0}, None),
        ({"latency.gateway_ms": float("nan"), "latency.upstream_ms": 6.0}, None),
        ({"latency.gateway_ms": 10.0, "latency.upstream_ms": -1.0}, None),
    ],
)
def test_upstream_wait_sits_inside_the_gateway_span(
    attributes: dict[str, Any], wait: tuple[float, float] | None
) -> None:
    span = record(0, 0, service="gateway", kind=2, start_ns=0, duration_ns=20 * MS,
                  attributes=attributes)  # fmt: skip
    assert upstream_wait(span) == wait


_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(
    gateway_ms=_ANY_VALUE,
    upstream_ms=_ANY_VALUE,
    duration_ns=st.integers(min_value=-(10**12), max_value=10**12),
)
def test_upstream_wait_never_raises_and_stays_inside_the_bar(
    gateway_ms: Any, upstream_ms: Any, duration_ns: int
) -> None:
    """The figures come from any OTLP client: whatever they are, the wait is
    None or a segment within the span's own bar."""
    span = record(0, 0, service="gateway", kind=2, start_ns=10**18, duration_ns=duration_ns,
                  attributes={"latency.gateway_ms": gateway_ms,
                              "latency.upstream_ms": upstream_ms})  # fmt: skip
    wait = upstream_wait(span)
    if wait is not None:
        offset, width = wait
        assert 0.0 <= offset <= 100.0
        assert 0.0 <= width <= 100.0 - offset + 1e-9


def test_percentile_is_nearest_rank() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert [percentile(values, p) for p in (5, 30, 40, 50, 100)] == [15, 20, 20, 35, 50]
    assert percentile([], 50) is None


def test_route_falls_back_to_the_gateway_span_name() -> None:
    stats = route_stats([synthetic_trace(0, start_ns=0, route=None)])
    assert [(s.route, s.count, s.gateway_ms.p50) for s in stats] == [("GET", 1, 3.1)]


# -- the store ----------------------------------------------------------------------------


def test_retention_by_count_keeps_the_newest(tmp_path: Path) -> None:
    now = time.time_ns()
    with Store(tmp_path / "t.db", max_spans=50) as store:
        for batch in range(15):  # 150 spans, 3 × max_spans
            store.insert(
                [record(0, batch * 10 + i, start_ns=now + (batch * 10 + i) * MS) for i in range(10)]
            )
            assert store.count() <= 50
        assert 45 <= store.count() <= 50
        ids = {s.span_id for s in store.trace(f"{1:032x}")}
        assert f"{150:016x}" in ids  # the newest
        assert f"{1:016x}" not in ids  # the oldest


def test_retention_by_age_and_no_duplicates(tmp_path: Path) -> None:
    now = [time.time_ns()]
    hour = 3600 * 1000 * MS
    with Store(tmp_path / "t.db", max_age_s=3600, clock_ns=lambda: now[0]) as store:
        old = [record(1, i, start_ns=now[0] - 2 * hour + i) for i in range(5)]
        fresh = [record(2, i, start_ns=now[0] - hour // 2 + i) for i in range(5)]
        assert store.insert(old + fresh) == 10
        assert store.count() == 5  # the old ones pruned in the same commit
        assert store.insert(fresh) == 0  # a re-sent batch adds nothing
        assert store.count() == 5
        assert store.trace(old[0].trace_id) == []
        now[0] += hour
        assert store.prune() == 5
        assert store.count() == 0


WRITER = """
import sys, time
from viewer.spans import SpanRecord, waterfall
from viewer.store import Store
with Store(sys.argv[1]) as store:
    for batch in range(20):
        store.insert([SpanRecord(f"{9999:032x}", f"{batch * 50 + i + 1:016x}", "", "proc", "s",
                                 1, time.time_ns(), time.time_ns(), 0, "", {}, [])
                      for i in range(50)])
"""


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    stores = [Store(path), Store(path)]
    errors: list[BaseException] = []
    now = time.time_ns()

    def write(store: Store, writer: int) -> None:
        try:
            for batch in range(40):
                store.insert(
                    [
                        record(writer, batch * 25 + i, start_ns=now + i, service=f"w{writer}")
                        for i in range(25)
                    ]
                )
        except BaseException as exc:
            errors.append(exc)

    # Another process on the same file as well: separate locks, same rules.
    other = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stderr=subprocess.PIPE
    )
    threads = [threading.Thread(target=write, args=(stores[n % 2], n)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    _, stderr = other.communicate(timeout=120)
    for store in stores:
        store.close()
    assert not errors
    assert other.returncode == 0, stderr.decode()
    with Store(path) as reader:
        assert reader.count() == 4 * 40 * 25 + 1000
        for writer in range(4):
            assert len(reader.trace(f"{writer + 1:032x}")) == 1000


# -- the command line --------------------------------------------------------------------


def viewer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIEWER_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


async def test_cli_serves_accepts_a_post_and_stops_on_sigterm(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    db = tmp_path / "nested" / "dir" / "traces.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "viewer", "--port", "0", "--db", str(db),
        cwd=tmp_path, env=viewer_env(VIEWER_PORT="not-used-flag-wins"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.fullmatch(
            r"viewer listening on (http://127\.0\.0\.1:(\d+)) \(OTLP/HTTP: POST /v1/traces\)\n",
            line,
        )
        assert match, line
        assert int(match.group(2)) > 0
        spans = synthetic_trace(5, start_ns=time.time_ns())
        code, _, _, _ = await post(
            client,
            match.group(1),
            proto_request(spans).SerializeToString(),
            "application/x-protobuf",
        )
        assert code == 200
        doc = await get_json(client, f"{match.group(1)}/api/traces")
        assert doc["traces"][0]["trace_id"] == spans[0].trace_id
        assert db.is_file()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert b"Traceback" not in stderr


async def test_cli_defaults_to_dot_viewer_db_and_reads_env(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "viewer", cwd=tmp_path, env=viewer_env(VIEWER_PORT="0"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("viewer listening on http://127.0.0.1:")
        assert not line.startswith("viewer listening on http://127.0.0.1:4318 ")
        assert (tmp_path / ".viewer" / "traces.db").is_file()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.communicate(), 20)


def run_cli(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "viewer", *args],
        cwd=cwd,
        env=viewer_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "abc"], {}, "--port"),
        (["--port", "70000"], {}, "--port"),
        ([], {"VIEWER_PORT": "abc"}, "VIEWER_PORT"),
        (["--max-spans", "0"], {}, "--max-spans"),
        (["--max-age-hours", "nan"], {}, "--max-age-hours"),
        (["--bogus"], {}, "--bogus"),
        (["report", "--since-minutes", "-5"], {}, "--since-minutes"),
    ],
)
def test_cli_bad_value_is_one_line_and_exit_2(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = run_cli(*args, **env)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("viewer: error: ")
    assert named in lines[0]
    assert lines[0].endswith("(see --help)")
    assert result.stdout == ""


def test_cli_help() -> None:
    for args in (["--help"], ["report", "--help"]):
        result = run_cli(*args)
        assert result.returncode == 0
        assert "VIEWER_DB" in result.stdout


def test_flag_beats_env_beats_default() -> None:
    assert serve_config({}, {}) == ServeConfig()
    assert serve_config({}, {}).port == 4318
    assert serve_config({}, {"VIEWER_PORT": "7000"}).port == 7000
    assert serve_config({"port": "9000"}, {"VIEWER_PORT": "abc"}).port == 9000
    assert serve_config({}, {"VIEWER_MAX_AGE_HOURS": "2"}).max_age_s == 7200
    assert serve_config({"db": "x.db"}, {"VIEWER_DB": "y.db"}).db == Path("x.db")
    assert report_config({}, {"VIEWER_SINCE_MINUTES": "15"}).since_minutes == 15
    with pytest.raises(UsageError, match="VIEWER_HOST"):
        serve_config({}, {"VIEWER_HOST": "  "})


def test_report_prints_the_per_route_table(tmp_path: Path) -> None:
    db = tmp_path / "traces.db"
    with Store(db) as store:
        seed(store, time.time_ns())
    result = run_cli("report", "--db", str(db), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("route"))
    home = next(line for line in lines if line.startswith("/api/activities/home"))
    assert "uplink_ms p50/p95/p99" in header
    # count 10, uplink n 9 with p50 25.3 / p95 48.0 / p99 48.0 (nearest rank)
    assert re.search(r"\s10\s.*\s9\s+25\.3 / 48\.0 / 48\.0\s", home), home
    # Aligned: every cell column starts where the header's does.
    assert home.index("  10 ") + 4 == header.index("traces") + len("traces")

    recent = run_cli("report", "--db", str(db), "--since-minutes", "1")
    assert recent.returncode == 0
    assert "/api/slow" not in recent.stdout
    assert "/api/activities/home" in recent.stdout

    missing = run_cli("report", "--db", str(tmp_path / "nope.db"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("viewer: error: no span store at")
    assert not (tmp_path / "nope.db").exists()


# -- real Chromium -------------------------------------------------------------------------


async def test_waterfall_and_latency_pages_in_chromium(
    viewer: ViewerServer, tmp_path: Path
) -> None:
    trace_id = await asyncio.to_thread(seed, viewer.store, time.time_ns())
    shots = ROOT / "docs" if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 700})
            await page.goto(f"{viewer.url}/traces/{trace_id}")
            bars = await page.eval_on_selector_all(
                ".span-row",
                """rows => rows.map(row => {
                    const bar = row.querySelector('.bar').getBoundingClientRect();
                    const track = row.querySelector('.track').getBoundingClientRect();
                    return {service: [...row.classList].find(c => c.startsWith('svc-')),
                            left: (bar.left - track.left) / track.width * 100,
                            width: bar.width / track.width * 100,
                            color: getComputedStyle(row.querySelector('.bar')).backgroundColor};
                })""",
            )
            assert [b["service"] for b in bars] == [
                "svc-browser",
                "svc-gateway",
                "svc-gateway",
                "svc-backend",
                "svc-backend",
            ]
            # The trace: browser 0–(2 × 25.3 + 20 + 8) ms, gateway from 25.3 ms
            # for 20 + 6 ms (see synthetic_trace).
            total = 2 * 25.3 + 20 + 8
            expected = [(0, 100), (25.3 / total * 100, 26 / total * 100)]
            for bar, (left, width) in zip(bars, expected, strict=False):
                assert bar["left"] == pytest.approx(left, abs=0.3)
                assert bar["width"] == pytest.approx(width, abs=0.3)
            lefts = [b["left"] for b in bars]
            assert lefts == sorted(lefts)
            # Each child's bar lies within its parent's.
            for parent, child in itertools.pairwise(bars):
                assert child["left"] + child["width"] <= parent["left"] + parent["width"] + 0.3
            assert len({b["color"] for b in bars}) == 3  # one colour per service
            verdict = await page.text_content(".verdict")
            assert verdict == "ok"
            await page.screenshot(path=str(shots / "viewer-waterfall.png"))

            await page.goto(f"{viewer.url}/latency")
            home = 'tr[data-route="/api/activities/home"]'
            assert await page.text_content(f"{home} td.p50-uplink") == "25.3"
            assert await page.text_content(f"{home} td.p50-rtt") == "50.0"
            assert await page.text_content(f"{home} td.p50-backend") == "24.0"
            assert await page.text_content('tr[data-route="/api/slow"] td.p50-uplink') == "90.0"
            hist = await page.eval_on_selector_all(
                '.hist-route[data-route="/api/activities/home"] .hbar',
                "bars => bars.map(b => b.getBoundingClientRect().height)",
            )
            assert max(hist) > 0
            assert hist.index(max(hist)) == 3  # most uplinks in the 20–50 ms bin
            await page.screenshot(path=str(shots / "viewer-latency.png"))
        finally:
            await browser.close()
    assert (shots / "viewer-waterfall.png").stat().st_size > 1000


# -- DNS rebinding: the Host header ------------------------------------------------------
#
# A page on evil.example can resolve its own name to 127.0.0.1 and read the viewer
# as same-origin; its requests still say "Host: evil.example" (RFC 9110 §7.2).


def host_request(port: int, method: str, path: str, host: bytes | None, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\n".encode()
    if host is not None:
        head += b"Host: " + host + b"\r\n"
    if method == "POST":
        head += f"Content-Type: application/x-protobuf\r\nContent-Length: {len(body)}\r\n".encode()
    else:
        body = b""
    return raw_request(port, head + b"Connection: close\r\n\r\n" + body)


@pytest.mark.parametrize(
    ("method", "path", "content_type"),
    [
        ("GET", "/", "text/plain"),
        ("GET", "/latency", "text/plain"),
        ("GET", "/traces/" + "1" * 32, "text/plain"),
        ("GET", "/api/traces", "application/json"),
        ("GET", "/api/latency", "application/json"),
        ("POST", "/v1/traces", "application/json"),
    ],
)
@pytest.mark.parametrize(
    "host",
    [
        b"evil.example",
        b"evil.example:4318",
        b"127.0.0.1.evil.example",
    ],
)
async def test_foreign_host_is_421_for_the_ui_and_the_receiver(
    viewer: ViewerServer, method: str, path: str, content_type: str, host: bytes
) -> None:
    seed(viewer.store, time.time_ns())
    before = viewer.store.count()
    port = int(viewer.url.rsplit(":", 1)[1])
    body = proto_request(synthetic_trace(77, start_ns=time.time_ns())).SerializeToString()
    response = await asyncio.to_thread(host_request, port, method, path, host, body)
    status, head, payload = parse_head(response)
    headers = {k.lower(): v for k, v in head}
    # RFC 9110 §15.5.20: 421, this server does not answer for that name.
    assert status == 421, response[:300]
    assert headers["content-type"].startswith(content_type)
    text = payload.decode()
    assert host.decode() in text
    assert "--allowed-hosts" in text
    assert "/api/activities" not in text  # no stored data leaks into the refusal
    assert viewer.store.count() == before  # and nothing was stored


@pytest.mark.parametrize(
    "host", [b"localhost\r\nHost: evil.example", b"evil.example\r\nHost: localhost"]
)
async def test_two_host_headers_are_400(viewer: ViewerServer, host: bytes) -> None:
    # RFC 9112 §3.2: more than one Host field is a 400 (aiohttp's parser).
    port = int(viewer.url.rsplit(":", 1)[1])
    response = await asyncio.to_thread(host_request, port, "GET", "/api/traces", host)
    assert parse_head(response)[0] == 400, response[:300]


@pytest.mark.parametrize(
    "host", [b"127.0.0.1", b"127.0.0.1:{port}", b"LOCALHOST:{port}", b"localhost.", b"[::1]:{port}",
             b"127.0.0.2"],
)  # fmt: skip
async def test_own_names_are_answered(viewer: ViewerServer, host: bytes) -> None:
    port = int(viewer.url.rsplit(":", 1)[1])
    value = host.replace(b"{port}", str(port).encode())
    response = await asyncio.to_thread(host_request, port, "GET", "/api/traces", value)
    assert parse_head(response)[0] == 200, response[:300]


@pytest.mark.parametrize(
    ("header", "verdict"),
    [
        (None, False),  # RFC 9112 §3.2: HTTP/1.1 requires Host; browsers always send it
        ("", False),
        ("viewer", True),
        ("viewer:4318", True),
        ("Viewer.:4318", True),  # RFC 9110 §4.2.3: case-insensitive; a root dot is the same name
        ("viewer:43x8", False),
        ("viewer:123456", False),
        ("viewer.evil.example", False),
        ("evil.example", False),
        ("localhost", True),
        ("127.9.9.9:80", True),  # all of 127.0.0.0/8 is loopback
        ("[::1]", True),
        ("[::1", False),
        ("[::2]:80", False),
        ("10.0.0.8:4318", False),
        ("0.0.0.0:4318", False),  # a wildcard bind is not a name
    ],
)
def test_host_verdicts(header: str | None, verdict: bool) -> None:
    allowed = hosts.allowed_names("0.0.0.0", ["viewer"])
    assert hosts.is_allowed(header, allowed) is verdict


@pytest.fixture(scope="module")
def docker_like_viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """The viewer as docker-compose runs it: every interface, --allowed-hosts viewer."""
    db = tmp_path_factory.mktemp("compose") / "traces.db"
    args = ["--host", "0.0.0.0", "--port", "0", "--db", str(db), "--allowed-hosts", "viewer"]
    with Process("viewer", args, viewer_env()) as proc:
        yield proc


def test_cli_allowed_hosts_lets_the_collector_post_as_viewer(docker_like_viewer: Process) -> None:
    port = docker_like_viewer.port
    body = proto_request(synthetic_trace(78, start_ns=time.time_ns())).SerializeToString()
    for host, status in ((b"viewer:4318", 200), (b"evil.example:4318", 421)):
        response = host_request(port, "POST", "/v1/traces", host, body)
        assert parse_head(response)[0] == status, response[:300]


OWN_NAME = re.compile(rb"(?i)(viewer|localhost|127(\.[0-9]{1,3}){3}|\[::1\])\.?(:[0-9]{0,5})?")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(host=st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b))
def test_fuzzed_host_headers_never_500_and_only_own_names_pass(
    docker_like_viewer: Process, host: bytes
) -> None:
    response = host_request(docker_like_viewer.port, "GET", "/api/traces", host)
    status = parse_head(response)[0]
    assert status in (200, 400, 421), response[:300]
    if status == 200:  # only the viewer's own names, spelled out independently of hosts.py
        assert OWN_NAME.fullmatch(host.strip()), host
    assert "Traceback" not in docker_like_viewer.stderr_text()


# -- per-span limits ----------------------------------------------------------------------


async def test_attribute_values_are_cut_and_counts_bounded(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    store = Store(tmp_path / "traces.db")
    limits = otlp.Limits(attribute_chars=100, attributes=20, events=5)
    server = TestServer(create_app(store, limits=limits), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        spans = synthetic_trace(40, start_ns=time.time_ns())
        message = proto_request(spans)
        proto = message.resource_spans[0].scope_spans[0].spans[0]
        proto.name = "N" * 500
        proto.attributes.extend(
            [
                KeyValue(key="long", value=AnyValue(string_value="é" * 5000)),
                KeyValue(key="k" * 300, value=AnyValue(int_value=7)),
                KeyValue(key="big.number", value=AnyValue(int_value=2**62)),
            ]
        )
        array = AnyValue()
        array.array_value.values.extend(
            [AnyValue(string_value="a" * 150), AnyValue(int_value=5), AnyValue(string_value="b")]
        )
        proto.attributes.append(KeyValue(key="array", value=array))
        proto.attributes.extend(
            KeyValue(key=f"extra.{i:03}", value=AnyValue(int_value=i)) for i in range(50)
        )
        for i in range(12):
            event = proto.events.add(name=f"event {i} " + "x" * 200, time_unix_nano=i)
            event.attributes.extend(
                KeyValue(key=f"e{j}", value=AnyValue(string_value="v" * 300)) for j in range(30)
            )
        url = str(server.make_url("")).rstrip("/")
        status, _, _, _ = await post(
            client, url, message.SerializeToString(), "application/x-protobuf"
        )
        assert status == 200
        doc = await get_json(client, f"{url}/api/traces/{spans[0].trace_id}")
        span = next(s for s in doc["spans"] if s["span_id"] == spans[0].span_id)
        attrs = span["attributes"]
        # OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT: strings, and strings in arrays, cut to N
        # characters (not bytes); other types untouched.
        assert span["name"] == "N" * 100
        assert attrs["long"] == "é" * 100
        assert attrs["k" * 100] == 7
        assert attrs["big.number"] == 2**62
        assert attrs["array"] == ["a" * 100, 5, "b"]
        # The count limit keeps the first attributes, as the SDKs do.
        assert len(attrs) == 20
        assert "extra.015" in attrs
        assert "extra.016" not in attrs
        assert [e["name"] for e in span["events"]] == [f"event {i} " + "x" * 92 for i in range(5)]
        assert all(len(e["attributes"]) == 20 for e in span["events"])
        assert all(v == "v" * 100 for e in span["events"] for v in e["attributes"].values())
    finally:
        await server.close()
        store.close()


_FUZZ_IDS = itertools.count(5000)
# Any text (no lone surrogates: protobuf strings are UTF-8) after a run of
# characters that puts it near the 4096-character limit, on either side.
_AROUND_THE_LIMIT = st.builds(
    lambda n, tail: "é" * n + tail,
    st.integers(3900, 4200),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=300),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_AROUND_THE_LIMIT, items=st.lists(_AROUND_THE_LIMIT, max_size=3))
def test_fuzzed_attribute_values_are_stored_cut_to_4096_characters(
    docker_like_viewer: Process, value: str, items: list[str]
) -> None:
    spans = synthetic_trace(next(_FUZZ_IDS), start_ns=time.time_ns())
    message = proto_request(spans)
    proto = message.resource_spans[0].scope_spans[0].spans[0]
    array = AnyValue()
    array.array_value.values.extend(AnyValue(string_value=item) for item in items)
    proto.attributes.extend(
        [
            KeyValue(key="fuzz", value=AnyValue(string_value=value)),
            KeyValue(key="list", value=array),
        ]
    )
    url = docker_like_viewer.url
    request = urllib.request.Request(
        f"{url}/v1/traces",
        data=message.SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{url}/api/traces/{spans[0].trace_id}", timeout=30) as response:
        doc = json.load(response)
    attrs = next(s for s in doc["spans"] if s["span_id"] == spans[0].span_id)["attributes"]
    assert attrs["fuzz"] == value[:4096]
    assert attrs["list"] == [item[:4096] for item in items]


def test_default_limits_cut_at_4096_characters() -> None:
    message = proto_request(synthetic_trace(41, start_ns=1))
    proto = message.resource_spans[0].scope_spans[0].spans[0]
    proto.attributes.append(KeyValue(key="long", value=AnyValue(string_value="z" * 10_000)))
    decoded = otlp.to_records(message)
    assert decoded.spans[0].attributes["long"] == "z" * 4096


# -- the size cap -------------------------------------------------------------------------


def test_size_cap_keeps_the_newest_spans_under_max_db_bytes(tmp_path: Path) -> None:
    cap = 1024 * 1024
    now = time.time_ns()
    blob = "x" * 2000  # ~2 KB of JSON per span: 2 000 spans are ~4× the cap
    with Store(tmp_path / "t.db", max_db_bytes=cap) as store:
        for batch in range(40):
            store.insert(
                [
                    record(
                        batch * 50 + i,
                        0,
                        start_ns=now + (batch * 50 + i) * MS,
                        attributes={"blob": blob},
                    )
                    for i in range(50)
                ]
            )
            assert store.used_bytes() <= cap
        kept = store.count()
        assert 100 < kept < 2000
        assert store.trace(f"{2000:032x}") != []  # the newest trace
        assert store.trace(f"{1:032x}") == []  # the oldest
        # What is kept is the newest stretch, without holes.
        assert all(store.trace(f"{n:032x}") for n in range(2001 - kept, 2001, 97))
    file_bytes = (tmp_path / "t.db").stat().st_size
    assert file_bytes <= cap + 256 * 1024


def test_cli_reads_the_new_settings() -> None:
    config = serve_config(
        {"max_attribute_chars": "64"},
        {
            "VIEWER_MAX_DB_BYTES": "1_048_576",
            "VIEWER_MAX_ATTRIBUTE_CHARS": "9",
            "VIEWER_MAX_SPAN_ATTRIBUTES": "10",
            "VIEWER_MAX_SPAN_EVENTS": "3",
            "VIEWER_ALLOWED_HOSTS": "viewer, viewer.local",
        },
    )
    assert config.max_db_bytes == 1_048_576
    assert config.limits == otlp.Limits(attribute_chars=64, attributes=10, events=3)
    assert config.allowed_hosts == ("viewer", "viewer.local")
    assert ServeConfig().max_db_bytes == 512 * 1024 * 1024
    assert ServeConfig().limits.attribute_chars == 4096


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--max-db-bytes", "1000"], "--max-db-bytes"),
        (["--max-attribute-chars", "0"], "--max-attribute-chars"),
        (["--max-span-events", "x"], "--max-span-events"),
        (["--allowed-hosts", "http://viewer"], "--allowed-hosts"),
    ],
)
def test_cli_bad_new_values_are_one_line_and_exit_2(args: list[str], named: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert named in result.stderr


# -- per-route latency from SQL equals the reference computation ------------------------


def generated_traces(seed_no: int, traces: int, now_ns: int) -> list[list[SpanRecord]]:
    """Traces in every shape the rules distinguish: routes with and without a
    backend span, each verdict, figures missing or not numbers, SERVER spans
    of other services, ties in values."""
    rng = random.Random(seed_no)
    routes = ["/api/a", "/api/b", "/api/c/<id>", "/x", None]
    out = []
    for n in range(traces):
        spans = synthetic_trace(
            1000 + n,
            start_ns=now_ns - rng.randrange(1, 3600) * 1000 * MS,
            route=rng.choice(routes),
            uplink_ms=rng.choice([rng.uniform(0.1, 3000), 5.0, 10.0, 20.0]),
            rtt_ms=round(rng.uniform(1, 500), rng.choice([0, 1, 3])),
            gateway_ms=rng.choice([0.5, 1.0, rng.uniform(0, 10)]),
            backend_ms=rng.uniform(0, 300),
            status=rng.choice(["ok", "ok", "ok", "implausible", "unsynced"]),
        )
        if rng.random() < 0.05:
            spans[1].attributes["latency.rtt_ms"] = "not a number"
        if rng.random() < 0.05:
            del spans[1].attributes["latency.status"]  # falls back to the service name
        if rng.random() < 0.03:
            spans = [s for s in spans if s.service != "gateway"]
        out.append(spans)
    return out


def reference_stats(store: Store, since_ns: int | None = None) -> list[Any]:
    return route_stats(store.server_spans(since_ns).values())


def test_sql_route_stats_equal_the_in_memory_computation(tmp_path: Path) -> None:
    now = time.time_ns()
    traces = generated_traces(7, 1500, now)
    rng = random.Random(8)
    with Store(tmp_path / "t.db", max_spans=5000) as store:
        # As the exporters send them: each service's spans in its own batches,
        # in any order, some re-sent.
        spans = [s for t in traces for s in t]
        rng.shuffle(spans)
        for i in range(0, len(spans), 300):
            store.insert(spans[i : i + 300])
        store.insert(spans[:500])
        assert store.count() < len(spans)  # retention cut some traces in half
        stats = store.route_stats()
        assert len(stats) >= 5  # fallback names of traces cut in half too
        assert stats == reference_stats(store)
        # A window no trace straddles: the same traces for both definitions.
        since_ns = now - 1800 * 1000 * MS - 500 * MS
        assert store.route_stats(since_ns) == reference_stats(store, since_ns)
        assert store.route_stats(now) == []
        store.max_age_s = 1200
        store.prune()
        assert store.route_stats() == reference_stats(store)


def test_a_version_1_store_is_upgraded_with_its_figures(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Store(path) as store:
        seed(store, time.time_ns())
        expected = reference_stats(store)
    with sqlite3.connect(path) as conn:  # what a version 1 file lacks
        conn.execute("DROP TABLE trace_figures")
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    with Store(path) as store:
        assert store.route_stats() == expected
        assert len(expected) == 3
