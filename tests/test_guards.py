"""Behaviours that mutation testing found unguarded: each test here fails on a
realistic one-line bug in the module it names (see the closing note of the
issue that added them for how each was checked against its mutant)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.resources import Resource

from gateway import beacon
from gateway.timing import make_bind, make_token
from latency_common.redact import QueryRedactor
from tests.conftest import GatewayFactory, Traced, start_upstream
from tests.otlp_receiver import OtlpReceiver
from tests.servers import BackendThread, Process
from tests.test_latency import ScriptedSnippet

_CLOCK_RE = re.compile(r't1=([0-9.]+), t2=([0-9.]+), tok="([^"]+)"')


def _server_timing(header: str) -> dict[str, dict[str, str]]:
    metrics: dict[str, dict[str, str]] = {}
    for metric in header.split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        metrics[name] = dict(p.split("=", 1) for p in params)
    return metrics


# -- measure.server_timing: the page sees what the span says -----------------------


async def test_server_timing_uplink_equals_the_span_uplink_on_a_synced_skewed_request(
    gateway: GatewayFactory, gateway_spans: Traced, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    client = ScriptedSnippet(http, base, skew_ms=5_000.0)
    await client.sync()
    resp = await client.get()
    uplink = _server_timing(resp.headers["Server-Timing"])["uplink"]
    assert uplink["desc"] == '"ok"'
    [server] = [
        s
        for s in gateway_spans.spans()
        if s.kind.name == "SERVER" and (s.attributes or {}).get("latency.status") == "ok"
    ]
    span_uplink = (server.attributes or {})["latency.uplink_ms"]
    # The same figure, to the rounding both use (3 decimals): a page showing
    # Server-Timing and a query on the span must agree.
    assert float(uplink["dur"]) == pytest.approx(span_uplink, abs=0.0015)
    # On a skewed clock the raw t1 − ts is ~5 s: a mix-up would show.
    assert 0 <= span_uplink < 1_000


# -- app._finish_headers: t2 − t1 is the gateway's whole time ----------------------


async def test_gateway_clock_t2_minus_t1_equals_gw_dur_and_covers_a_slow_upstream(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    async with http.get(base + "/api/slow?ms=150") as resp:
        assert resp.status == 200
        match = _CLOCK_RE.fullmatch(resp.headers["X-Gateway-Clock"])
        timing = _server_timing(resp.headers["Server-Timing"])
    assert match is not None
    t1, t2 = float(match.group(1)), float(match.group(2))
    gw = float(timing["gw"]["dur"])
    assert t2 - t1 == pytest.approx(gw, abs=0.0015)
    assert t2 - t1 >= 150  # the upstream's wait is inside t1..t2
    assert float(timing["upstream"]["dur"]) >= 150


# -- app/proxy: a declared Content-Length is refused before a byte is read --------


async def test_declared_content_length_far_over_the_limit_is_413_before_reading_or_forwarding(
    gateway: GatewayFactory,
) -> None:
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="upstream")

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", record)
    server, upstream = await start_upstream(upstream_app)
    try:
        base = await gateway(upstream=upstream, max_body_bytes=1_000)
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Several 64 KiB chunks' worth declared, and not one body byte sent:
            # only the declared length can justify an answer.
            writer.write(b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 400000\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        finally:
            writer.transport.abort()
        assert head.startswith(b"HTTP/1.1 413 ")
        assert hits == []  # the upstream never saw the request
    finally:
        await server.close()


# -- proxy.HOP_BY_HOP: Upgrade never crosses the gateway ---------------------------


async def test_upgrade_never_reaches_the_backend_nor_the_client(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    async def upgrade_header(request: web.Request) -> web.Response:
        # An upstream advertising a protocol switch (RFC 9110 §7.8) on a
        # plain 200: hop-by-hop, never passed on.
        return web.Response(text="ok", headers={"Upgrade": "h2c"})

    upstream_app = web.Application()
    upstream_app.router.add_get("/up", upgrade_header)
    server, upstream = await start_upstream(upstream_app)
    try:
        via_backend = await gateway()
        # Upgrade without Connection naming it: RFC 9110 §7.8 makes it
        # hop-by-hop anyway (the hop-by-hop list, not the Connection tokens).
        async with http.get(via_backend + "/api/echo", headers={"Upgrade": "websocket"}) as resp:
            echo = await resp.json()
        assert "upgrade" not in {name.lower() for name, _ in echo["headers"]}
        via_scripted = await gateway(upstream=upstream)
        async with http.get(via_scripted + "/up") as resp:
            assert resp.status == 200
            assert "Upgrade" not in resp.headers
    finally:
        await server.close()


# -- cli/telemetry: the command's own sampler --------------------------------------


@pytest.fixture(scope="module")
def cli_gateway(receiver: OtlpReceiver, backend: BackendThread) -> Iterator[Process]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    args = ["--upstream", backend.url, "--port", "0", "--workers", "1"]
    with Process("gateway", args, env) as proc:
        yield proc


async def test_python_m_gateway_exports_spans_for_an_unsampled_inbound_traceparent(
    cli_gateway: Process, receiver: OtlpReceiver, http: aiohttp.ClientSession
) -> None:
    trace_id = "5a5a" * 8
    # Flags 00: the browser did not sample. The gateway's own sampler decides
    # (always_on by default), so the request is still traced and exported.
    headers = {"traceparent": f"00-{trace_id}-{'1' * 16}-00"}
    async with http.get(cli_gateway.url + "/api/health", headers=headers) as resp:
        assert resp.status == 200
    spans = await asyncio.to_thread(
        receiver.wait_for,
        lambda spans: any(s.trace_id == trace_id and s.service == "gateway" for s in spans),
        20,
    )
    assert any(s.trace_id == trace_id and s.kind == 2 for s in spans)


# -- beacon.build_span: a browser span never ends before it starts -----------------

_KEY = b"k" * 32
_T1 = 1_764_000_000_000.0


@settings(max_examples=300, deadline=None)
@given(
    start=st.floats(-5_000, 5_000),
    duration=st.floats(-5_000, 5_000),
    uplink=st.one_of(st.none(), st.integers(0, 2_000)),
    off=st.floats(-10_000, 10_000),
)
def test_an_accepted_beacon_entry_never_ends_before_it_starts(
    start: float, duration: float, uplink: int | None, off: float
) -> None:
    ts = _T1 - 1_000  # the client's clock reads 1 s behind the server's
    token = make_token(
        _KEY,
        t2_ms=_T1 + 2,
        t1_ms=_T1,
        ts_ms=ts,
        uplink_ms=uplink,
        error_ms=None if uplink is None else 2,
        nonce=b"\x01" * 8,
    )
    marks = {name: 0.0 for name in beacon.MARKS}
    marks["startTime"] = ts + start
    marks["responseEnd"] = ts + start + duration
    trace_id, span_id = "ab" * 16, "cd" * 8
    entry = {
        "tp": f"00-{trace_id}-{span_id}-03",
        "b": make_bind(_KEY, token, int(trace_id, 16), int(span_id, 16)),
        "m": "GET",
        "u": "http://127.0.0.1/api",
        "tok": token,
        "off": off,
        "marks": marks,
    }
    span, _ = beacon.build_span(
        entry,
        keys=beacon.Keys(_KEY),
        now_ms=_T1 + 60_000,
        resource=Resource.create({}),
        redactor=QueryRedactor(),
    )
    if span is not None:
        assert span.start_time is not None
        assert span.end_time is not None
        assert span.end_time >= span.start_time
