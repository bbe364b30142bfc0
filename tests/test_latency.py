"""Latency measurement over real sockets: a scripted client that behaves like
the snippet (syncs with /__gateway/clock, then sends timed requests on a
deliberately skewed clock) through a loopback relay with a known delay."""

from __future__ import annotations

import asyncio
import math
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan

from gateway.timing import SLEW_RATE, ClockSample, best_sample, clock_sample
from tests.conftest import GatewayFactory, Traced
from tests.otlp_receiver import OtlpReceiver
from tests.relay import DelayRelay
from tests.servers import BackendThread, Process

_CLOCK_RE = re.compile(r't1=([0-9.]+), t2=([0-9.]+), tok="([^"]+)"')
STATUSES = {"ok", "absent", "invalid", "unsynced", "implausible", "rate_limited"}


@dataclass
class ScriptedSnippet:
    """What the snippet does, in Python: a clock C = real time + skew, a sync
    burst, the min-delay sample of the last 8, the latest token."""

    http: aiohttp.ClientSession
    base: str
    skew_ms: float
    samples: list[ClockSample] = field(default_factory=list)
    token: str | None = None
    prev: str | None = None
    #: An honest clock's rate against real time (1.0005: ntpd slewing at its
    #: 500 ppm limit) and a correction chrony slews in from 1 s after start
    #: at its 83 333 ppm maximum (performance.now() follows the slew).
    rate: float = 1.0
    slew_ms: float = 0.0
    started_ms: float = field(default_factory=lambda: time.time() * 1000)

    def now(self) -> float:
        real = time.time() * 1000
        elapsed = real - self.started_ms
        clock = real + self.skew_ms + elapsed * (self.rate - 1.0)
        if self.slew_ms:
            slewed = min(abs(self.slew_ms), SLEW_RATE * max(elapsed - 1_000.0, 0.0))
            clock += math.copysign(slewed, self.slew_ms)
        return clock

    def _learn(self, t0: float, header: str, t3: float) -> None:
        match = _CLOCK_RE.fullmatch(header)
        assert match, header
        t1, t2 = float(match.group(1)), float(match.group(2))
        sample = clock_sample(t0, t1, t2, t3)
        # As the snippet: a negative delay is no exchange a clock could
        # measure (it was stepped or slewed under it); the sample goes.
        if sample.delay_ms >= 0:
            self.samples.append(sample)
        self.token = match.group(3)

    async def sync(self, count: int = 8) -> None:
        for _ in range(count):
            t0 = self.now()
            async with self.http.get(self.base + "/__gateway/clock") as resp:
                t3 = self.now()
                assert resp.status == 204
                self._learn(t0, resp.headers["X-Gateway-Clock"], t3)

    def clock_header(self, token: str | None) -> str:
        best = best_sample(self.samples)
        assert best is not None
        age = max(self.now() - best.taken_at_ms, 0.0)
        value = f"off={best.offset_ms:.3f}, d={best.delay_ms:.3f}, age={age:.3f}"
        return value + (f', tok="{token}"' if token else "")

    async def get(
        self,
        path: str = "/api/echo",
        *,
        lie_ms: float = 0.0,
        token: str | None = None,
        timestamp_only: bool = False,
    ) -> aiohttp.ClientResponse:
        t0 = self.now()
        headers = {"X-Client-Timestamp": f"{t0 + lie_ms:.3f}"}
        if not timestamp_only:
            headers["X-Client-Clock"] = self.clock_header(token or self.token)
        if self.prev:
            headers["X-Client-Prev"] = self.prev
        async with self.http.get(self.base + path, headers=headers) as resp:
            t3 = self.now()
            await resp.read()
            self._learn(t0, resp.headers["X-Gateway-Clock"], t3)
            gw = float(resp.headers["Server-Timing"].split("gw;dur=")[1].split(",")[0])
            self.prev = f"rtt={max(t3 - t0 - gw, 0):.3f}, pre=0"
            return resp


def _servers(spans: Traced) -> list[ReadableSpan]:
    return [s for s in spans.spans() if s.kind.name == "SERVER"]


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


@pytest.fixture
async def relay_http() -> Any:
    # One kept-alive connection, like a browser talking to one origin.
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


ACCURACY: list[tuple[float, float, float, float, str]] = []


@pytest.fixture(scope="module")
def gateway_proc(receiver: OtlpReceiver, backend: BackendThread) -> Iterator[Process]:
    """The gateway as production runs it, in a process of its own: nothing in
    the test's event loop can delay its receipt time t1."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "GATEWAY_CLOCK_KEY": "latency-test-clock-key",
    }
    args = ["--upstream", backend.url, "--port", "0", "--workers", "1"]
    with Process("gateway", args, env) as proc:
        yield proc


@pytest.mark.parametrize("skew_ms", [-3_600_000.0, -3_000.0, 0.0, 5_000.0, 3_600_000.0])
async def test_uplink_within_3_ms_of_the_injected_delay_at_any_skew(
    gateway_proc: Process,
    receiver: OtlpReceiver,
    relay_http: aiohttp.ClientSession,
    skew_ms: float,
) -> None:
    with DelayRelay(gateway_proc.port, up_ms=25, down_ms=25) as relay:
        client = ScriptedSnippet(relay_http, relay.url, skew_ms)
        await client.sync()
        trace_ids = []
        for _ in range(8):
            resp = await client.get()
            trace_ids.append(resp.headers["Server-Timing"].split('traceparent;desc="00-')[1][:32])
    spans = await asyncio.to_thread(
        receiver.wait_for,
        lambda spans: len({s.trace_id for s in spans if s.trace_id in trace_ids}) == 8,
    )
    servers = [s for s in spans if s.trace_id in trace_ids and s.kind == 2]
    assert len(servers) == 8
    diffs: list[float] = []
    outside = 0
    for span in servers:
        attrs = span.attributes
        assert attrs["latency.status"] == "ok", attrs
        assert attrs["latency.trust"] == "server_bounded"
        diff = attrs["latency.uplink_ms"] - 25.0
        assert attrs["latency.uplink_upper_bound_ms"] >= attrs["latency.uplink_ms"]
        diffs.append(diff)
        outside += abs(diff) > attrs["latency.uplink_error_ms"]
        ACCURACY.append(
            (skew_ms, 25.0, attrs["latency.uplink_ms"], attrs["latency.uplink_error_ms"], "ok")
        )
    # The truth lies within the error the gateway reported, and the typical
    # request is within 3 ms of the injected delay. One request in eight may be
    # held up by the scheduler of this shared 2-core machine (the gateway's
    # process not running when its bytes arrive): that is allowed, no more.
    assert outside <= 1, diffs
    assert statistics.median(diffs) == pytest.approx(0.0, abs=3.0), diffs
    # The previous request's round trip, reported (≈ 50 ms on this path).
    rtts = [s.attributes["latency.rtt_ms"] for s in servers if "latency.rtt_ms" in s.attributes]
    # Never below the 50 ms the relay adds; a few ms above it is this test
    # process's own event loop noticing the response.
    assert 49.0 <= statistics.median(rtts) <= 58.0, rtts
    # No attribute anywhere holds the client's clock offset.
    if abs(skew_ms) >= 1_000:
        for span in spans:
            if span.trace_id not in trace_ids:
                continue
            for key, value in span.attributes.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    assert abs(abs(value) - abs(skew_ms)) > 1_000, (key, value)
                assert str(int(abs(skew_ms))) not in str(value), (key, value)


async def test_liars_are_implausible(
    gateway: GatewayFactory, gateway_spans: Traced, relay_http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    port = int(base.rsplit(":", 1)[1])
    with DelayRelay(port, up_ms=25, down_ms=25) as relay:
        client = ScriptedSnippet(relay_http, relay.url, skew_ms=-3_000.0)
        await client.sync()
        # Claims to have sent 200 ms after the gateway received it.
        await client.get(lie_ms=+225)
        # Claims to have sent 5 s earlier than the token it holds allows.
        await client.get(lie_ms=-5_000)
    first, second = (_attrs(s) for s in _servers(gateway_spans))
    assert first["latency.status"] == "implausible"
    assert second["latency.status"] == "implausible"
    assert "latency.uplink_ms" not in first
    assert "latency.uplink_ms" not in second


async def test_forged_token_is_client_only(
    gateway: GatewayFactory, gateway_spans: Traced, relay_http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    port = int(base.rsplit(":", 1)[1])
    with DelayRelay(port, up_ms=25, down_ms=25) as relay:
        client = ScriptedSnippet(relay_http, relay.url, skew_ms=5_000.0)
        await client.sync()
        assert client.token is not None
        forged = client.token[:-3] + ("AAA" if not client.token.endswith("AAA") else "BBB")
        await client.get(token=forged)
    [attrs] = (_attrs(s) for s in _servers(gateway_spans))
    assert attrs["latency.trust"] == "client_only"
    assert attrs["latency.reason"] == "token_invalid"
    # The estimate still stands, just without the server's upper bound.
    assert attrs["latency.status"] == "ok"
    assert "latency.uplink_upper_bound_ms" not in attrs


async def test_timestamp_only_on_a_skewed_clock_is_unsynced_without_uplink(
    gateway: GatewayFactory, gateway_spans: Traced, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    client = ScriptedSnippet(http, base, skew_ms=-3_600_000.0)
    async with http.get(base + "/__gateway/clock"):
        pass
    await client.get(timestamp_only=True)
    [attrs] = (_attrs(s) for s in _servers(gateway_spans))
    assert attrs["latency.status"] == "unsynced"
    assert attrs["latency.reason"] == "clock_offset"
    assert attrs["latency.trust"] == "client_only"
    assert attrs["latency.clock_offset_bucket"] == ">=1h"
    assert "latency.uplink_ms" not in attrs


async def test_clock_endpoint_is_cheap_and_never_forwarded(
    gateway: GatewayFactory, gateway_spans: Traced, http: aiohttp.ClientSession, backend: Any
) -> None:
    base = await gateway()
    before = time.time() * 1000
    origin = {"Origin": "http://localhost:3000"}
    async with http.get(base + "/__gateway/clock", headers=origin) as r:
        after = time.time() * 1000
        assert r.status == 204
        assert await r.read() == b""
        match = _CLOCK_RE.fullmatch(r.headers["X-Gateway-Clock"])
        assert match
        t1, t2 = float(match.group(1)), float(match.group(2))
        assert before - 1 <= t1 <= t2 <= after + 1
        assert r.headers["Cache-Control"] == "no-store"
        assert "X-Gateway-Clock" in r.headers["Access-Control-Expose-Headers"]
        assert r.headers["Timing-Allow-Origin"] == "http://localhost:3000"
        fields = match.group(3).split(".")
        assert fields[2:5] == ["-", "-", "-"]  # no TS, U, E on a clock answer
    assert gateway_spans.spans() == []
    assert backend.traced.spans() == []


async def test_every_proxied_response_carries_clock_and_uplink_timing(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    async with http.get(base + "/api/activities/home") as resp:
        assert _CLOCK_RE.fullmatch(resp.headers["X-Gateway-Clock"])
        assert "uplink" not in resp.headers["Server-Timing"]  # no timing headers sent
    stamp = f"{time.time() * 1000 - 20:.3f}"
    async with http.get(base + "/api/status/404", headers={"X-Client-Timestamp": stamp}) as resp:
        assert resp.status == 404
        assert _CLOCK_RE.fullmatch(resp.headers["X-Gateway-Clock"])
        timing = resp.headers["Server-Timing"]
        assert re.search(r'uplink;dur=[0-9.]+;desc="unsynced"', timing), timing


async def test_rate_limited_reports_are_still_served(
    gateway: GatewayFactory, gateway_spans: Traced, http: aiohttp.ClientSession
) -> None:
    from gateway.config import TimingRate

    base = await gateway(timing_rate=TimingRate(per_s=1, burst=3))
    statuses = []
    for _ in range(6):
        stamp = f"{time.time() * 1000:.3f}"
        async with http.get(base + "/api/health", headers={"X-Client-Timestamp": stamp}) as r:
            assert r.status == 200
            statuses.append(r.headers["Server-Timing"])
    verdicts = [_attrs(s)["latency.status"] for s in _servers(gateway_spans)]
    assert verdicts[:3] == ["unsynced"] * 3
    assert "rate_limited" in verdicts[3:]
    for span in _servers(gateway_spans):
        if _attrs(span)["latency.status"] == "rate_limited":
            assert not any(k.startswith("latency.uplink") for k in _attrs(span))


_header_text = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=700),
    st.sampled_from(["NaN", "inf", "-1", "1e400", 'off=1, d=2, age=3, tok="x"', "rtt=5"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    stamp=st.lists(_header_text, min_size=1, max_size=2),
    clock=st.lists(_header_text, max_size=2),
    prev=st.lists(_header_text, max_size=2),
)
async def test_any_timing_headers_are_served_with_one_of_six_verdicts(
    gateway: GatewayFactory,
    gateway_spans: Traced,
    http: aiohttp.ClientSession,
    stamp: list[str],
    clock: list[str],
    prev: list[str],
) -> None:
    gateway_spans.exporter.clear()
    base = await gateway()
    headers = [("X-Client-Timestamp", v.strip()) for v in stamp]
    headers += [("X-Client-Clock", v.strip()) for v in clock]
    headers += [("X-Client-Prev", v.strip()) for v in prev]
    async with http.get(base + "/api/health", headers=headers) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    [server] = _servers(gateway_spans)
    assert _attrs(server)["latency.status"] in STATUSES


def test_print_accuracy_table() -> None:
    """Prints the measured rows (run with -s) for the issue note."""
    for skew, injected, uplink, error, status in ACCURACY:
        print(
            f"skew={skew:>12.0f} ms  injected={injected:.1f}  uplink={uplink:7.3f}  "
            f"error={error:6.3f}  |diff|={abs(uplink - injected):.3f}  {status}"
        )


#: Honest clocks, through the real gateway: exact, quartz, ntpd at its slew
#: limit and chrony slewing a correction in (README "5. The drift model").
HONEST_CLIENTS = {
    "exact": {},
    "quartz -100 ppm": {"rate": 0.9999},
    "ntpd +500 ppm": {"rate": 1.0005},
    "ntpd -500 ppm": {"rate": 0.9995},
    "chrony slews +300 ms": {"slew_ms": 300.0},
    "chrony slews -300 ms": {"slew_ms": -300.0},
}


async def test_honest_clocks_through_the_gateway_are_never_called_liars(
    gateway_proc: Process,
) -> None:
    """The pure-function simulation (tests/test_timing.py) covers gaps up to
    10 minutes; this one sends real requests to a real gateway process with
    gaps of 1 s and 3 s, every clock at once (each its own connection)."""

    async def run(name: str, clock: dict[str, float]) -> list[str]:
        async with aiohttp.ClientSession() as http:
            client = ScriptedSnippet(http, gateway_proc.url, skew_ms=-2_000.0, **clock)
            await client.sync()
            verdicts = []
            for gap_s in (0.0, 1.0, 3.0, 3.0):
                await asyncio.sleep(gap_s)  # the user's think time, not a wait for anything
                resp = await client.get()
                timing = resp.headers["Server-Timing"]
                verdicts.append(timing.split("uplink;")[1].split('desc="')[1].split('"')[0])
            return verdicts

    results = await asyncio.gather(*(run(n, c) for n, c in HONEST_CLIENTS.items()))
    assert dict(zip(HONEST_CLIENTS, results, strict=True)) == {
        name: ["ok"] * 4 for name in HONEST_CLIENTS
    }
