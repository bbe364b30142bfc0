"""Beacon → browser span (gateway/beacon.py), pure and through the real endpoint."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.resources import Resource

from gateway import beacon
from gateway.timing import make_token
from tests.conftest import GatewayFactory, Traced

KEY = b"k" * 32  # the key the `gateway` fixture configures
T = 1_764_000_000_000.0
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
RESOURCE = Resource.create({"service.name": "browser"})
ORIGIN = {"Origin": "http://localhost:3000"}


def _token(t1: float, ts: float, u: float | None, e: float | None = 2.0) -> str:
    return make_token(
        KEY, t2_ms=t1 + 3, t1_ms=t1, ts_ms=ts, uplink_ms=u, error_ms=e, nonce=b"\x02" * 8
    )


def _entry(**changes: Any) -> dict[str, Any]:
    # The client clock is 1 h behind: its fetch() at C = T − 1 h − 25 ms was
    # received 25 ms later at T on the server.
    ts = T - 3_600_000 - 25
    entry: dict[str, Any] = {
        "tp": f"00-{TRACE}-{SPAN}-03",
        "m": "GET",
        "u": "http://127.0.0.1:8080/api/activities/home",
        "tok": _token(T, ts, 25.0),
        "off": 3_600_000.0,
        "marks": {
            "startTime": ts,
            "fetchStart": ts + 0.5,
            "domainLookupStart": 0,
            "domainLookupEnd": 0,
            "connectStart": 0,
            "connectEnd": 0,
            "requestStart": ts + 1,
            "responseStart": ts + 60,
            "responseEnd": ts + 61,
        },
    }
    entry.update(changes)
    return entry


def test_entry_becomes_a_browser_client_span_anchored_on_the_token() -> None:
    span, reason = beacon.build_span(_entry(), key=KEY, now_ms=T + 5_000, resource=RESOURCE)
    assert reason == ""
    assert span is not None
    assert f"{span.context.trace_id:032x}" == TRACE
    assert f"{span.context.span_id:016x}" == SPAN  # the browser's own span id
    assert span.kind.name == "CLIENT"
    assert span.resource.attributes["service.name"] == "browser"
    # Starts at T1 − U on the server's clock, whatever the client's clock said.
    assert span.start_time == int((T - 25) * 1e6)
    assert span.end_time == int((T - 25 + 61) * 1e6)
    events = {e.name: e.timestamp for e in span.events}
    assert events["responseStart"] == int((T - 25 + 60) * 1e6)
    assert "connectStart" not in events  # 0 = unavailable
    assert (span.attributes or {})["http.request.method"] == "GET"


def test_token_without_uplink_uses_the_snippets_offset_clamped_to_t1() -> None:
    ts = T - 3_600_000 - 25
    # The snippet's offset claims its fetch() happened 100 ms *after* receipt.
    entry = _entry(tok=_token(T, ts, None, None), off=3_600_000.0 + 125)
    span, reason = beacon.build_span(entry, key=KEY, now_ms=T + 1_000, resource=RESOURCE)
    assert reason == ""
    assert span is not None
    assert span.start_time == int(T * 1e6)  # clamped: never after the gateway's receipt


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"tp": "00-zz-yy-01"}, "traceparent"),
        ({"tp": f"00-{'0' * 32}-{SPAN}-01"}, "traceparent"),
        ({"tok": None}, "token_missing"),
        ({"tok": "1.2.3.4.5.6.7"}, "token_invalid"),
        (
            {
                "tok": make_token(
                    b"x" * 32, t2_ms=T, t1_ms=T, ts_ms=T, uplink_ms=1, error_ms=1, nonce=b"\x00" * 8
                )
            },
            "token_invalid",
        ),
        (
            {
                "tok": make_token(
                    KEY,
                    t2_ms=T,
                    t1_ms=None,
                    ts_ms=None,
                    uplink_ms=None,
                    error_ms=None,
                    nonce=b"\x00" * 8,
                )
            },
            "token_without_request",
        ),
        ({"u": "javascript:alert(1)"}, "url"),
        ({"m": 42}, "entry_shape"),
        ({"marks": "soon"}, "marks"),
        ({"marks": {"startTime": T, "responseEnd": T - 5}}, "marks_order"),
        (
            {
                "marks": {
                    "startTime": T,
                    "requestStart": T + 9,
                    "responseStart": T + 3,
                    "responseEnd": T + 10,
                }
            },
            "marks_order",
        ),
        ({"marks": {"startTime": T, "responseEnd": float("nan")}}, "marks"),
        ({"marks": {"startTime": T, "responseEnd": T + 3_600_000}}, "marks"),
    ],
)
def test_bad_entries_are_dropped_with_a_reason(changes: dict[str, Any], reason: str) -> None:
    span, why = beacon.build_span(_entry(**changes), key=KEY, now_ms=T + 1_000, resource=RESOURCE)
    assert span is None
    assert why == reason


def test_expired_token_is_dropped() -> None:
    span, why = beacon.build_span(_entry(), key=KEY, now_ms=T + 11 * 60_000, resource=RESOURCE)
    assert (span, why) == (None, "token_expired")


def test_ingest_counts_and_caps() -> None:
    payload = {"v": 1, "e": [_entry(), _entry(tok=None), *([_entry()] * 60)]}
    result = beacon.ingest(payload, key=KEY, now_ms=T + 1_000, resource=RESOURCE, processor=None)
    assert result.accepted == 49
    assert result.dropped == {"token_missing": 1, "too_many_entries": 12}
    with pytest.raises(beacon.BeaconError):
        beacon.ingest([1, 2], key=KEY, now_ms=T, resource=RESOURCE, processor=None)


# -- through the real endpoint -------------------------------------------------------


async def test_beacon_makes_the_browser_span_the_parent_of_the_gateway_span(
    gateway: GatewayFactory, gateway_spans: Traced, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    span_id = "b7ad6b7169203331"
    t0 = time.time() * 1000
    headers = {
        **ORIGIN,
        "traceparent": f"00-{TRACE}-{span_id}-03",
        "X-Client-Timestamp": f"{t0:.3f}",
        "X-Client-Clock": "off=0, d=1, age=10",
    }
    async with http.get(base + "/api/activities/home", headers=headers) as resp:
        await resp.read()
        t3 = time.time() * 1000
        tok = re.search(r'tok="([^"]+)"', resp.headers["X-Gateway-Clock"])
        assert tok is not None
    entry = _entry(
        tp=f"00-{TRACE}-{span_id}-03",
        tok=tok.group(1),
        marks={
            "startTime": t0,
            "requestStart": t0 + 0.2,
            "responseStart": t3 - 1,
            "responseEnd": t3,
        },
    )
    body = json.dumps({"v": 1, "e": [entry]})
    async with http.post(
        base + "/__gateway/beacon", data=body, headers={**ORIGIN, "Content-Type": "text/plain"}
    ) as resp:
        assert resp.status == 202
        assert await resp.json() == {"accepted": 1, "dropped": {}}
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN["Origin"]
    spans = gateway_spans.spans()
    browser = next(s for s in spans if s.resource.attributes["service.name"] == "browser")
    server = next(s for s in spans if s.kind.name == "SERVER")
    assert browser.context.trace_id == server.context.trace_id
    assert server.parent is not None
    assert server.parent.span_id == browser.context.span_id
    assert browser.start_time is not None
    assert server.start_time is not None
    assert browser.start_time <= server.start_time
    assert browser.end_time is not None
    assert server.end_time is not None
    assert browser.end_time >= server.end_time - 1_000_000  # ms rounding of the marks


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Origin": "https://evil.example"}, '{"v":1,"e":[]}', 403),
        ({}, '{"v":1,"e":[]}', 403),
        (ORIGIN, "not json", 400),
        (ORIGIN, '{"v":1}', 400),
        (ORIGIN, "[" * 100_000, 413),
        (ORIGIN, "[" * 5_000 + "]" * 5_000, 400),
    ],
)
async def test_bad_beacons_are_refused_never_500(
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    body: str,
    status: int,
) -> None:
    base = await gateway()
    async with http.post(base + "/__gateway/beacon", data=body, headers=headers) as resp:
        assert resp.status == status
        assert "error" in await resp.json()


async def test_beacon_rate_limit(gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    base = await gateway()
    statuses = []
    for _ in range(30):
        async with http.post(
            base + "/__gateway/beacon", data='{"v":1,"e":[]}', headers=ORIGIN
        ) as resp:
            statuses.append(resp.status)
    assert statuses[:20] == [202] * 20
    assert 429 in statuses[20:]
    async with http.get(base + "/__gateway/health") as resp:
        assert (await resp.json())["beacon"]["rate_limited"] >= 1
