"""Beacon → browser span (gateway/beacon.py), pure and through the real endpoint.

Attacks found against the earlier code, each proven over real sockets here:
huge times that poisoned the export batch, inputs that got a 500 with a
traceback, and tokens from ``/__gateway/clock`` or another trace that
attached browser spans to any trace."""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

from gateway import beacon
from gateway.timing import make_bind, make_token
from latency_common.redact import QueryRedactor
from tests.conftest import GatewayFactory, Traced
from tests.otlp_receiver import OtlpReceiver
from tests.servers import Process

KEY = b"k" * 32  # the key the `gateway` fixture configures
KEYS = beacon.Keys(KEY)
REDACTOR = QueryRedactor()
T = 1_764_000_000_000.0
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
RESOURCE = Resource.create({"service.name": "browser"})
ORIGIN = {"Origin": "http://localhost:3000"}


def _token(t1: float, ts: float, u: float | None, e: float | None = 2.0) -> str:
    return make_token(
        KEY, t2_ms=t1 + 3, t1_ms=t1, ts_ms=ts, uplink_ms=u, error_ms=e, nonce=b"\x02" * 8
    )


def _bind(tok: str, trace: str = TRACE, span: str = SPAN, key: bytes = KEY) -> str:
    return make_bind(key, tok, int(trace, 16), int(span, 16))


def _build(entry: dict[str, Any], now_ms: float) -> tuple[Any, str]:
    tok = entry.get("tok")
    if "b" not in entry and isinstance(tok, str) and tok.isascii():
        entry = {**entry, "b": _bind(entry["tok"])}
    return beacon.build_span(entry, keys=KEYS, now_ms=now_ms, resource=RESOURCE, redactor=REDACTOR)


def _entry(**changes: Any) -> dict[str, Any]:
    # The client clock is 1 h behind: its fetch() at C = T − 1 h − 25 ms was
    # received 25 ms later at T on the server.
    ts = T - 3_600_000 - 25
    tok = _token(T, ts, 25.0)
    entry: dict[str, Any] = {
        "tp": f"00-{TRACE}-{SPAN}-03",
        "m": "GET",
        "u": "http://127.0.0.1:8080/api/activities/home",
        "tok": tok,
        "b": _bind(tok),
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
    if "tok" in changes and "b" not in changes:
        del entry["b"]  # _build signs the new token
    return entry


def test_entry_becomes_a_browser_client_span_anchored_on_the_token() -> None:
    span, reason = _build(_entry(), T + 5_000)
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
    span, reason = _build(entry, T + 1_000)
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
        ({"m": 42}, "method"),
        # RFC 9110 §9.1 / §5.6.2: a method is a token of tchars.
        ({"m": "GET POST"}, "method"),
        ({"m": "G" * 33}, "method"),
        ({"m": ""}, "method"),
        ({"u": "http://x/" + "a" * 2048}, "url"),
        ({"u": "ftp://x/"}, "url"),
        ({"u": ["http://x/"]}, "url"),
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
        # Numbers where numbers are expected, finite and in range, else dropped.
        ({"marks": {"startTime": 10**400, "responseEnd": 10**400}}, "marks"),
        ({"marks": {"startTime": 1e303, "responseEnd": 1e303}}, "marks"),
        ({"marks": {"startTime": 1e20, "responseEnd": 1e20}}, "marks"),
        ({"marks": {"startTime": True, "responseEnd": T}}, "marks"),
        ({"marks": {"startTime": str(T), "responseEnd": T}}, "marks"),
        ({"marks": {"startTime": float("inf"), "responseEnd": T}}, "marks"),
        # Tokens: non-ASCII (hmac.compare_digest raised TypeError), oversized.
        ({"tok": "1.2.3.4.5.6." + "a" * 300}, "token_invalid"),
        ({"tok": "1.2.3.4.5.6.é"}, "token_invalid"),
    ],
)
def test_bad_entries_are_dropped_with_a_reason(changes: dict[str, Any], reason: str) -> None:
    span, why = _build(_entry(**changes), T + 1_000)
    assert span is None
    assert why == reason


def test_expired_token_is_dropped() -> None:
    span, why = _build(_entry(), T + 11 * 60_000)
    assert (span, why) == (None, "token_expired")


def _ingest(payload: Any, now_ms: float, keys: beacon.Keys = KEYS) -> beacon.BeaconResult:
    return beacon.ingest(
        payload, keys=keys, now_ms=now_ms, resource=RESOURCE, processor=None, redactor=REDACTOR
    )


def _entries(n: int) -> list[dict[str, Any]]:
    """n valid entries, each with its own token (one request, one token)."""
    out = []
    ts = T - 3_600_000 - 25
    for i in range(n):
        tok = make_token(
            KEY, t2_ms=T + 3, t1_ms=T, ts_ms=ts, uplink_ms=25, error_ms=2, nonce=bytes([i]) * 8
        )
        out.append(_entry(tok=tok, b=_bind(tok)))
    return out


def test_ingest_counts_and_caps() -> None:
    payload = {"v": 1, "e": [_entry(tok=None), *_entries(61)]}
    result = _ingest(payload, T + 1_000)
    assert result.accepted == 49
    assert result.dropped == {"token_missing": 1, "too_many_entries": 12}
    with pytest.raises(beacon.BeaconError):
        _ingest([1, 2], T)


def test_one_entry_per_token_per_beacon() -> None:
    entry = _entry()
    result = _ingest(
        {"v": 1, "e": [entry, entry, dict(entry, tp=f"00-{TRACE}-{'1' * 16}-01")]}, T + 1_000
    )
    assert result.accepted == 1
    assert result.dropped == {"duplicate_token": 2}


# -- the window the token's authenticated times allow ---------------------------


def _window_entry(start: float, end: float, *, u: float = 25.0, e: float = 2.0) -> dict[str, Any]:
    # Client clock = server clock here (TS = T1 − U): marks read as server times.
    ts = T - u
    tok = make_token(
        KEY, t2_ms=T + 30, t1_ms=T, ts_ms=ts, uplink_ms=u, error_ms=e, nonce=b"\x05" * 8
    )
    return _entry(tok=tok, b=_bind(tok), marks={"startTime": ts + start, "responseEnd": ts + end})


@pytest.mark.parametrize(
    ("start", "end", "now", "reason"),
    [
        # Encloses the gateway's T1..T2 (T1 − U = 0 here, T2 = U + 30 = 55).
        (0, 60, T + 1_000, ""),
        (0, 55, T + 1_000, ""),
        # Ends before the gateway answered, beyond E (2) + rounding (3): a lie.
        (0, 49, T + 1_000, "window"),
        (0, 50.5, T + 1_000, ""),  # within E + rounding
        # Ends after the beacon arrived.
        (0, 100, T + 30, "window"),  # end = T + 75, the beacon came at T + 30
        (0, 60, T + 31, ""),  # end = T + 35, within E + rounding of now
        # Lasts more than 60 s.
        (0, 60_001, T + 120_000, "marks"),
    ],
)
def test_browser_span_must_enclose_the_gateway_span(
    start: float, end: float, now: float, reason: str
) -> None:
    span, why = _build(_window_entry(start, end), now)
    assert why == reason
    assert (span is None) == bool(reason)
    if span is not None:
        assert span.start_time is not None
        assert span.start_time <= int(T * 1e6)  # starts before the gateway span


def test_token_without_uplink_cannot_start_in_1970() -> None:
    """A /__gateway/clock-style token (T1, no TS/U/E) with the snippet's
    offset: marks near 0 would put the span in 1970, before T2: dropped."""
    tok = make_token(
        KEY, t2_ms=T + 1, t1_ms=T, ts_ms=None, uplink_ms=None, error_ms=None, nonce=b"\x07" * 8
    )
    entry = _entry(tok=tok, b=_bind(tok), off=0, marks={"startTime": 1, "responseEnd": 2})
    assert _build(entry, T + 1_000) == (None, "window")


def test_url_full_is_redacted() -> None:
    url = "https://user:pw@app.example/cb?code=abc&page=2#access_token=xyz"
    span, why = _build(_entry(u=url), T + 1_000)
    assert why == ""
    assert span is not None
    assert (span.attributes or {})["url.full"] == (
        "https://REDACTED:REDACTED@app.example/cb?code=REDACTED&page=2"
    )


def test_previous_key_verifies_token_and_bind_during_a_rotation() -> None:
    old = b"o" * 32
    ts = T - 25
    tok = make_token(
        old, t2_ms=T + 3, t1_ms=T, ts_ms=ts, uplink_ms=25, error_ms=2, nonce=b"\x01" * 8
    )
    entry = _entry(tok=tok, b=_bind(tok, key=old), marks={"startTime": ts, "responseEnd": ts + 40})
    rotating = beacon.Keys(KEY, (old,))
    assert _ingest({"e": [entry]}, T + 1_000, rotating).accepted == 1
    assert _ingest({"e": [entry]}, T + 1_000).dropped == {"token_invalid": 1}
    # A bind signed with the old key over a token of the new one still verifies.
    tok_new = _token(T, T - 3_600_000 - 25, 25.0)
    mixed = _entry(tok=tok_new, b=_bind(tok_new, key=old))
    assert _ingest({"e": [mixed]}, T + 1_000, rotating).accepted == 1
    assert _ingest({"e": [mixed]}, T + 1_000).dropped == {"bind_invalid": 1}


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
        tok, bind = _clock(resp.headers)
        assert bind is not None
    entry = _entry(
        tp=f"00-{TRACE}-{span_id}-03",
        tok=tok,
        b=bind,
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


# -- attacks, over real sockets ------------------------------------------------------


def _clock(headers: Any) -> tuple[str, str | None]:
    value = headers["X-Gateway-Clock"]
    tok = re.search(r'tok="([^"]+)"', value)
    bind = re.search(r'bind="([^"]+)"', value)
    assert tok is not None, value
    return tok.group(1), bind.group(1) if bind else None


def _browser_spans(traced: Traced) -> list[Any]:
    return [s for s in traced.spans() if s.resource.attributes["service.name"] == "browser"]


async def _beacon(http: aiohttp.ClientSession, base: str, entries: list[Any]) -> Any:
    body = json.dumps({"v": 1, "e": entries})
    async with http.post(base + "/__gateway/beacon", data=body, headers=ORIGIN) as resp:
        assert resp.status == 202, await resp.text()
        return await resp.json()


def _now_entry(tp: str, tok: str, bind: str | None, start: Any, end: Any) -> dict[str, Any]:
    entry = {"tp": tp, "m": "GET", "u": "http://127.0.0.1/x", "tok": tok, "off": 0}
    entry["marks"] = {"startTime": start, "responseEnd": end}
    if bind is not None:
        entry["b"] = bind
    return entry


@pytest.mark.parametrize(
    ("start", "end", "reason"),
    [
        # Attack: one anonymous beacon with times around 1e20 was accepted, and
        # the export batch it landed in failed to encode ("Value out of range").
        (1e20, 1e20, "marks"),
        # Attack: these got a 500 with a traceback (float() OverflowError,
        # nanosecond conversion overflow).
        (10**400, 10**400, "marks"),
        (1e303, 1e303, "marks"),
        ("soon", None, "marks"),
    ],
    ids=["1e20", "10**400", "1e303", "string"],
)
async def test_hostile_numbers_are_dropped_and_counted_never_500(
    gateway: GatewayFactory,
    gateway_spans: Traced,
    http: aiohttp.ClientSession,
    start: Any,
    end: Any,
    reason: str,
) -> None:
    base = await gateway()
    tp = f"00-{TRACE}-{SPAN}-01"
    async with http.get(base + "/api/activities/home", headers={"traceparent": tp}) as resp:
        tok, bind = _clock(resp.headers)
    assert await _beacon(http, base, [_now_entry(tp, tok, bind, start, end)]) == {
        "accepted": 0,
        "dropped": {reason: 1},
    }
    assert _browser_spans(gateway_spans) == []
    async with http.get(base + "/__gateway/health") as resp:
        assert (await resp.json())["beacon"][f"dropped_{reason}"] == 1


async def test_non_ascii_token_is_dropped_never_500(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """Attack: hmac.compare_digest raised TypeError on a non-ASCII str → 500."""
    base = await gateway()
    t = time.time() * 1000
    entry = _now_entry(f"00-{TRACE}-{SPAN}-01", "1.2.3.4.5.6.\u00e9", "x", t, t + 1)
    assert await _beacon(http, base, [entry]) == {"accepted": 0, "dropped": {"token_invalid": 1}}


async def test_clock_token_cannot_attach_a_span_to_any_trace(
    gateway: GatewayFactory, gateway_spans: Traced, http: aiohttp.ClientSession
) -> None:
    """Attack: a token from /__gateway/clock attached browser spans to any
    trace id, starting in 1970. Its answer carries no bind: nothing to show."""
    base = await gateway()
    async with http.get(base + "/__gateway/clock", headers=ORIGIN) as resp:
        tok, bind = _clock(resp.headers)
    assert bind is None
    now = time.time() * 1000
    victim = f"00-{'ab' * 16}-{SPAN}-01"
    entries = [
        _now_entry(victim, tok, None, 1, 2),  # 1970
        dict(_now_entry(victim, tok, None, now - 5, now - 1), tok=tok + ""),
    ]
    result = await _beacon(http, base, entries[:1])
    assert result == {"accepted": 0, "dropped": {"bind_missing": 1}}
    # A made-up bind does no better.
    result = await _beacon(http, base, [dict(entries[1], b="A" * 22)])
    assert result == {"accepted": 0, "dropped": {"bind_invalid": 1}}
    assert _browser_spans(gateway_spans) == []


async def test_token_of_one_trace_cannot_attach_a_span_to_another(
    gateway: GatewayFactory, gateway_spans: Traced, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    mine = f"00-{TRACE}-{SPAN}-01"
    t0 = time.time() * 1000
    async with http.get(base + "/api/activities/home", headers={"traceparent": mine}) as resp:
        await resp.read()
        tok, bind = _clock(resp.headers)
    t3 = time.time() * 1000 + 1
    assert bind is not None
    for victim in (f"00-{'ab' * 16}-{SPAN}-01", f"00-{TRACE}-{'cd' * 8}-01"):
        result = await _beacon(http, base, [_now_entry(victim, tok, bind, t0, t3)])
        assert result == {"accepted": 0, "dropped": {"bind_invalid": 1}}
    assert _browser_spans(gateway_spans) == []


@pytest.mark.parametrize(
    ("trust", "traceparent", "bound"),
    [
        ("continue", f"00-{TRACE}-{SPAN}-01", True),
        ("link", f"00-{TRACE}-{SPAN}-01", True),  # the link names the browser's span
        ("restart", f"00-{TRACE}-{SPAN}-01", False),  # the browser's context is ignored
        ("continue", None, False),
        ("continue", "00-zz-yy-01", False),  # invalid traceparent: no context to bind
    ],
)
async def test_clock_header_binds_the_token_to_the_inbound_traceparent(
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    trust: str,
    traceparent: str | None,
    bound: bool,
) -> None:
    base = await gateway(trust_context=trust)
    headers = {"traceparent": traceparent} if traceparent else {}
    async with http.get(base + "/api/activities/home", headers=headers) as resp:
        tok, bind = _clock(resp.headers)
    if bound:
        assert bind == _bind(tok)
    else:
        assert bind is None


def test_a_poisoned_beacon_loses_no_gateway_span(backend: Any) -> None:
    """Attack 1 end to end: a gateway process exporting to a real OTLP
    receiver gets the beacon with 1e20 times between two proxied requests;
    every gateway span of that batch still arrives."""
    import http.client

    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "GATEWAY_CLOCK_KEY": KEY.decode(),
        "GATEWAY_LOG_LEVEL": "debug",
        "GATEWAY_ALLOWED_ORIGINS": "http://localhost:3000",
        # One batch for everything below.
        "OTEL_BSP_SCHEDULE_DELAY": "1500",
    }

    def call(
        port: int, method: str, path: str, headers: dict[str, str], body: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    with OtlpReceiver() as receiver:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        args = ["--upstream", backend.url, "--port", "0", "--workers", "1"]
        with Process("gateway", args, env) as gw:
            tp = f"00-{TRACE}-{SPAN}-01"
            status, headers, _ = call(gw.port, "GET", "/api/activities/home", {"traceparent": tp})
            assert status == 200
            tok, bind = _clock(headers)
            entry = _now_entry(tp, tok, bind, 1e20, 1e20 + 5)
            status, _, body = call(
                gw.port, "POST", "/__gateway/beacon", ORIGIN, json.dumps({"v": 1, "e": [entry]})
            )
            assert status == 202
            status, _, _ = call(gw.port, "GET", "/api/activities/home", {})
            assert status == 200
            spans = receiver.wait_for(
                lambda spans: sum(s.service == "gateway" and s.kind == 2 for s in spans) >= 2,
                timeout_s=15,
            )
            assert [s.service for s in spans].count("browser") == 0
            assert json.loads(body) == {"accepted": 0, "dropped": {"marks": 1}}
            status, _, health = call(gw.port, "GET", "/__gateway/health", {})
            exporter = json.loads(health)["exporter"]
            assert exporter["unencodable_spans"] == 0
            assert isinstance(exporter["queued_spans"], int)
            assert json.loads(health)["beacon"]["dropped_marks"] == 1
            _, stderr = gw.terminate()
        assert "Traceback" not in stderr
        assert "Failed to encode" not in stderr


@pytest.mark.parametrize(
    ("sampler", "flags"),
    [
        (TraceIdRatioBased(0.5), "03"),
        (ParentBased(ALWAYS_ON), "00"),
        (ParentBased(ALWAYS_ON), "01"),
        (ParentBased(TraceIdRatioBased(0.5)), "01"),
    ],
    ids=["traceidratio", "parentbased-unsampled", "parentbased-sampled", "parentbased-ratio"],
)
async def test_browser_spans_follow_the_gateways_sampling_decision(
    http: aiohttp.ClientSession, backend: Any, sampler: Any, flags: str
) -> None:
    from aiohttp.test_utils import TestServer

    from gateway.app import create_app
    from gateway.config import GatewayConfig
    from latency_common.telemetry import Telemetry
    from tests.conftest import make_traced

    traced = make_traced(sampler=sampler, service="gateway")
    config = GatewayConfig().replace(
        upstream=backend.url,
        workers=1,
        clock_key=KEY,
        allowed_origins=(ORIGIN["Origin"],),
    )
    server = TestServer(create_app(config, telemetry=Telemetry(traced.provider, traced.processor)))
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    rng = random.Random(flags + sampler.get_description())
    entries = []
    try:
        for _ in range(40):
            trace_id, span_id = f"{rng.getrandbits(128):032x}", f"{rng.getrandbits(64):016x}"
            t0 = time.time() * 1000
            headers = {**ORIGIN, "traceparent": f"00-{trace_id}-{span_id}-{flags}"}
            async with http.get(base + "/api/health", headers=headers) as resp:
                await resp.read()
                t3 = time.time() * 1000
                tok, bind = _clock(resp.headers)
            assert bind is not None
            marks = {"startTime": t0, "responseEnd": t3}
            entries.append(
                _entry(
                    tp=f"00-{trace_id}-{span_id}-{flags}",
                    tok=tok,
                    b=bind,
                    off=0.0,
                    marks=marks,
                )
            )
        body = json.dumps({"v": 1, "e": entries})
        async with http.post(base + "/__gateway/beacon", data=body, headers=ORIGIN) as resp:
            assert resp.status == 202
            result = await resp.json()
    finally:
        await server.close()
    spans = traced.spans()
    gateway_traces = {s.context.trace_id for s in spans if s.kind.name == "SERVER"}
    browser_traces = {
        s.context.trace_id for s in spans if s.resource.attributes["service.name"] == "browser"
    }
    # The same decision for the same trace: no browser span whose gateway span
    # was dropped, none missing where the gateway span was kept.
    assert browser_traces == gateway_traces
    assert result["accepted"] == len(gateway_traces)
    assert result["dropped"].get("not_sampled", 0) == 40 - len(gateway_traces)
    if flags == "00":
        assert gateway_traces == set()
    elif isinstance(sampler, ParentBased):
        assert len(gateway_traces) == 40  # a sampled remote parent is followed
    else:
        assert 5 < len(gateway_traces) < 35  # the ratio really sampled some out


# -- exact bounds (each one found by `make mutate`) ------------------------------------


@pytest.mark.parametrize(
    ("marks", "reason"),
    [
        # Year 2286 is the last mark a clock can read (MAX_MARK_MS): at the bound
        # it is still a number (dropped later, by the window), past it a bad mark.
        ({"startTime": 10**13, "responseEnd": 1e13}, "window"),
        ({"startTime": 10**13 + 1, "responseEnd": 10**13 + 1}, "marks"),
        ({"startTime": 1e13 + 0.5, "responseEnd": 1e13 + 0.5}, "marks"),
        # A span needs both ends.
        ({"responseEnd": T}, "marks"),
        ({"startTime": T}, "marks"),
    ],
)
def test_marks_at_their_bounds(marks: dict[str, Any], reason: str) -> None:
    assert _build(_entry(marks=marks), T + 1_000) == (None, reason)


def test_equal_consecutive_marks_are_in_order() -> None:
    # A browser reports fetchStart == startTime (and often more equal marks)
    # for a request that needed no redirect, DNS or connection.
    ts = T - 25
    marks = {"startTime": ts, "fetchStart": ts, "requestStart": ts, "responseEnd": ts + 40}
    tok = _token(T, ts, 25.0)
    span, why = _build(_entry(tok=tok, b=_bind(tok), marks=marks), T + 1_000)
    assert why == ""
    assert span is not None
    assert [e.name for e in span.events] == [
        "startTime",
        "fetchStart",
        "requestStart",
        "responseEnd",
    ]


@pytest.mark.parametrize(("extra", "reason"), [(128, ""), (129, "traceparent")])
def test_traceparent_of_a_future_version_up_to_128_characters(extra: int, reason: str) -> None:
    # W3C Trace Context §4.3 (versioning): a higher version may append fields
    # after the flags; the gateway reads at most 128 characters of it.
    tp = f"cc-{TRACE}-{SPAN}-01-"
    tp += "a" * (extra - len(tp))
    assert len(tp) == extra
    span, why = _build(_entry(tp=tp), T + 1_000)
    assert why == reason
    assert (span is None) == bool(reason)


@pytest.mark.parametrize("tp", [42, None, ["00"], {"tp": 1}])
def test_a_traceparent_that_is_not_a_string_is_dropped(tp: Any) -> None:
    assert _build(_entry(tp=tp), T + 1_000) == (None, "traceparent")


def test_a_url_of_exactly_2048_characters_is_kept() -> None:
    url = "http://x/" + "a" * (beacon.MAX_URL_CHARS - len("http://x/"))
    span, why = _build(_entry(u=url), T + 1_000)
    assert why == ""
    assert span is not None
    assert (span.attributes or {})["url.full"] == url


def test_a_token_without_uplink_needs_the_snippets_offset() -> None:
    ts = T - 3_600_000 - 25
    entry = _entry(tok=_token(T, ts, None, None))
    del entry["off"]
    assert _build(entry, T + 1_000) == (None, "offset")


@pytest.mark.parametrize(
    ("start", "end", "now", "u", "e", "reason"),
    [
        # The end may fall short of T2 by E + rounding exactly (T2 = 55 here).
        (0, 50, T + 1_000, 25.0, 2.0, ""),
        # With E = 0 the slack is the 3 ms of rounding alone.
        (0, 52, T + 1_000, 25.0, 0.0, ""),
        (0, 51.5, T + 1_000, 25.0, 0.0, "window"),
        # The end may pass the beacon's arrival by E + rounding exactly.
        (0, 60, T + 30, 25.0, 2.0, ""),
        # Exactly MAX_DURATION_MS long: kept.
        (0, 60_000, T + 120_000, 25.0, 2.0, ""),
    ],
)
def test_window_bounds_are_inclusive(
    start: float, end: float, now: float, u: float, e: float, reason: str
) -> None:
    span, why = _build(_window_entry(start, end, u=u, e=e), now)
    assert why == reason
    if span is not None:
        assert span.end_time is not None
        assert span.start_time is not None
        assert abs((span.end_time - span.start_time) / 1e6 - (end - start)) < 0.001


@pytest.mark.parametrize(("u", "reason"), [(-5.0, ""), (-6.0, "window")])
def test_a_span_starting_after_the_gateway_received_the_request_is_refused(
    u: float, reason: str
) -> None:
    # T1 − U is the start: a U below zero would put the browser span after
    # its child; within E + rounding (5 ms here) it is tolerated, beyond not.
    tok = make_token(
        KEY, t2_ms=T + 30, t1_ms=T, ts_ms=T - u, uplink_ms=u, error_ms=2, nonce=b"\x06" * 8
    )
    marks = {"startTime": T - u, "responseEnd": T - u + 40}
    assert _build(_entry(tok=tok, b=_bind(tok), marks=marks), T + 1_000)[1] == reason


def test_the_browser_span_is_named_and_labelled_for_the_viewer() -> None:
    span, why = _build(_entry(m="post"), T + 1_000)
    assert why == ""
    assert span is not None
    assert span.name == "POST"
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "gateway.beacon"
    assert span.parent is None  # its parent is the page, outside any trace we see
    assert span.context.is_remote is False  # our own span, exported as such
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "url.full": "http://127.0.0.1:8080/api/activities/home",
        "latency.source": "beacon",
    }
    other, _ = _build(_entry(m="BREW"), T + 1_000)
    assert other is not None
    assert other.name == "HTTP"


def test_ingest_counts_every_drop_by_reason() -> None:
    bad = _entry(tp="00-zz-yy-01")
    result = _ingest({"v": 1, "e": [5, "x", bad, dict(bad, tok="other")]}, T + 1_000)
    assert result.accepted == 0
    assert dict(result.dropped) == {"entry_shape": 2, "traceparent": 2}


def test_fifty_entries_are_all_taken() -> None:
    result = _ingest({"v": 1, "e": _entries(beacon.MAX_ENTRIES)}, T + 1_000)
    assert result.accepted == 50
    assert dict(result.dropped) == {}


@pytest.mark.parametrize("payload", [[1, 2], {"v": 1}, {"e": {}}, None, "e"])
def test_a_beacon_of_the_wrong_shape_says_what_is_expected(payload: Any) -> None:
    with pytest.raises(beacon.BeaconError) as caught:
        _ingest(payload, T)
    assert str(caught.value) == 'expected {"v": 1, "e": [entries]}'
