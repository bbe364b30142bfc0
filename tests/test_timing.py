"""Pure latency maths (gateway/timing.py) on synthetic times: exact, no clocks."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import timing
from gateway.timing import (
    SLEW_RATE,
    TOKEN_MAX_AGE_MS,
    RateLimiter,
    Verdict,
    best_sample,
    clock_sample,
    evaluate,
    make_bind,
    make_token,
    verify_bind,
    verify_token,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
T = 1_764_000_000_000.0  # an epoch time in ms
STATUSES = {"ok", "absent", "invalid", "unsynced", "implausible", "rate_limited"}


def token(
    t2: float,
    t1: float | None = None,
    ts: float | None = None,
    u: float | None = None,
    e: float | None = None,
    key: bytes = KEY,
) -> str:
    return make_token(key, t2_ms=t2, t1_ms=t1, ts_ms=ts, uplink_ms=u, error_ms=e, nonce=b"\x00" * 8)


def clock(off: float, d: float = 2.0, age: float = 1000.0, tok: str | None = None) -> str:
    value = f"off={off:.3f}, d={d:.3f}, age={age:.3f}"
    return value + (f', tok="{tok}"' if tok is not None else "")


def judge(
    t1: float, ts: float, clock_header: str | None = None, prev: str | None = None
) -> Verdict:
    return evaluate(
        t1_ms=t1,
        timestamp=[f"{ts:.3f}" if isinstance(ts, float) else str(ts)],
        clock=[clock_header] if clock_header is not None else [],
        prev=[prev] if prev is not None else [],
        key=KEY,
    )


# -- NTP maths --------------------------------------------------------------------


@pytest.mark.parametrize(
    "skew_ms", [-86_400_000.0, -3_600_000.0, -3_000.0, 0.0, 5_000.0, 3_600_000.0, 86_400_000.0]
)
@pytest.mark.parametrize(("up_ms", "down_ms"), [(25.0, 25.0), (5.0, 5.0), (40.0, 10.0)])
def test_offset_and_delay_from_four_timestamps(
    skew_ms: float, up_ms: float, down_ms: float
) -> None:
    # The client clock reads server time − offset; offset = server − client.
    offset = -skew_ms
    true_send = T
    t0 = true_send - offset
    t1 = true_send + up_ms
    t2 = t1 + 3.0  # the server's own time is not part of the delay
    t3 = (t2 + down_ms) - offset
    sample = clock_sample(t0, t1, t2, t3)
    assert sample.delay_ms == pytest.approx(up_ms + down_ms)
    # Exact on a symmetric path; off by half the asymmetry otherwise
    # (RFC 5905 §8: no two-way exchange can tell uplink from downlink).
    assert sample.offset_ms == pytest.approx(offset + (up_ms - down_ms) / 2)


def test_best_sample_is_the_least_delayed_of_the_last_eight() -> None:
    samples = [
        timing.ClockSample(offset_ms=i, delay_ms=d, taken_at_ms=i)
        for i, d in enumerate([1.0, 9, 8, 7, 6, 5, 4, 3, 2.5])
    ]
    best = best_sample(samples)
    assert best is not None
    # The 1 ms sample is the ninth from the end: out of the window.
    assert best.delay_ms == 2.5
    assert best_sample([]) is None


# -- tokens ----------------------------------------------------------------------


def test_token_round_trip_and_rounding() -> None:
    tok = token(T + 10.9, t1=T + 5.5, ts=T - 20.4, u=24.6, e=2.1)
    parsed, reason = verify_token(KEY, tok, T + 100)
    assert reason == ""
    assert parsed == timing.Token(
        t2_ms=int(T + 10),  # down: only loosens t1 − T2
        t1_ms=int(T + 6),  # nearest
        ts_ms=int(T - 20),  # nearest
        uplink_ms=25,  # nearest
        error_ms=3,  # up
    )
    assert len(tok.split(".")) == 7


def test_token_unknown_fields_are_dashes() -> None:
    tok = token(T)
    assert tok.split(".")[1:5] == ["-", "-", "-", "-"]
    parsed, _ = verify_token(KEY, tok, T)
    assert parsed is not None
    assert parsed.t1_ms is None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "token_invalid"),
        (lambda t: str(int(t.split(".")[0]) + 1) + t[t.index(".") :], "token_invalid"),
        (lambda t: token(T, key=OTHER_KEY), "token_invalid"),
        (lambda t: "not-a-token", "token_invalid"),
        (lambda t: "1.2.3", "token_invalid"),
        (lambda t: t.replace(".", "..", 1), "token_invalid"),
    ],
    ids=["forged mac", "altered T2", "another key", "garbage", "too few fields", "empty field"],
)
def test_token_forgeries_are_rejected(mutate: object, reason: str) -> None:
    good = token(T)
    bad = mutate(good)  # type: ignore[operator]
    parsed, why = verify_token(KEY, bad, T + 1)
    assert parsed is None
    assert why == reason


def test_token_window() -> None:
    tok = token(T)
    assert verify_token(KEY, tok, T)[1] == ""
    assert verify_token(KEY, tok, T + TOKEN_MAX_AGE_MS)[1] == ""
    assert verify_token(KEY, tok, T + TOKEN_MAX_AGE_MS + 1) == (None, "token_expired")
    assert verify_token(KEY, tok, T - 1) == (None, "token_future")


@pytest.mark.parametrize(
    "bad",
    ["1.2.3.4.5.6.\u00e9", "\u00e9" * 10, "1.2.3.4.5.6." + "A" * 300, "1.2.3.4.5.6.\x00"],
    ids=["non-ASCII mac", "non-ASCII", "oversized", "NUL"],
)
def test_hostile_token_strings_are_invalid_never_raise(bad: str) -> None:
    # hmac.compare_digest raises TypeError on non-ASCII str: refused before it.
    assert verify_token(KEY, bad, T) == (None, "token_invalid")
    assert verify_bind(KEY, bad, bad, 1, 1) is False


@given(st.text(max_size=300), st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_verify_never_raises(tok: str, bind: str) -> None:
    verify_token(KEY, tok, T, previous=(OTHER_KEY,))
    verify_bind(KEY, bind, tok, 2**128 - 1, 2**64 - 1, previous=(OTHER_KEY,))


def test_previous_keys_verify_but_never_sign() -> None:
    """A key rotation: tokens from replicas still on the old key verify on
    those already rolled (GATEWAY_CLOCK_PREVIOUS_KEYS), and stop verifying
    once the old key is dropped."""
    old = token(T, key=OTHER_KEY)
    assert verify_token(KEY, old, T) == (None, "token_invalid")
    assert verify_token(KEY, old, T, previous=(OTHER_KEY,))[1] == ""
    assert verify_token(KEY, token(T), T, previous=(OTHER_KEY,))[1] == ""
    assert verify_token(KEY, old, T, previous=(b"x" * 32,)) == (None, "token_invalid")


def test_bind_names_one_token_trace_and_span() -> None:
    tok = token(T, t1=T, ts=T, u=1, e=1)
    trace_id, span_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    bind = make_bind(KEY, tok, trace_id, span_id)
    assert len(bind) == 22  # 128 bits, base64url without padding
    assert verify_bind(KEY, bind, tok, trace_id, span_id)
    assert not verify_bind(KEY, bind, tok, trace_id + 1, span_id)
    assert not verify_bind(KEY, bind, tok, trace_id, span_id + 1)
    assert not verify_bind(KEY, bind, token(T + 1), trace_id, span_id)
    assert not verify_bind(OTHER_KEY, bind, tok, trace_id, span_id)
    assert verify_bind(OTHER_KEY, bind, tok, trace_id, span_id, previous=(KEY,))
    # A bind is no token mac: its body is prefixed, so neither stands for the other.
    assert bind != tok.rsplit(".", 1)[1]


def test_replayed_token_only_loosens_the_bound() -> None:
    old = token(T - 60_000)
    fresh = token(T - 1_000)
    t1, ts = T + 25, T  # an honest 25 ms uplink, synced clock
    with_old = judge(t1, ts, clock(0.0, tok=old))
    with_fresh = judge(t1, ts, clock(0.0, tok=fresh))
    assert with_old.status == with_fresh.status == "ok"
    assert with_old.upper_bound_ms is not None
    assert with_fresh.upper_bound_ms is not None
    assert with_old.upper_bound_ms > with_fresh.upper_bound_ms


# -- verdicts: every status and reason ----------------------------------------------

SKEW = 3_600_000.0  # client clock one hour behind: off = +1 h


@pytest.mark.parametrize(
    ("ts", "clock_header", "prev", "status", "reason"),
    [
        # ok: estimate = t1 − (ts + off) = 25 ms
        (T - SKEW - 25, clock(SKEW, tok=token(T - 500)), None, "ok", "bounded"),
        (T - SKEW - 25, clock(SKEW), None, "ok", "token_missing"),
        (
            T - SKEW - 25,
            clock(SKEW, tok=token(T - 500, key=OTHER_KEY)),
            None,
            "ok",
            "token_invalid",
        ),
        (
            T - SKEW - 25,
            clock(SKEW, tok=token(T - TOKEN_MAX_AGE_MS - 5)),
            None,
            "ok",
            "token_expired",
        ),
        (T - SKEW - 25, clock(SKEW, tok=token(T + 5_000)), None, "ok", "token_future"),
        # implausible
        (T - SKEW + 500, clock(SKEW), None, "implausible", "negative_uplink"),
        (T - SKEW - 900, clock(SKEW, tok=token(T - 100)), None, "implausible", "before_token"),
        (T - SKEW - 90_000, clock(SKEW), None, "implausible", "uplink_too_long"),
        # unsynced (hypothesis B: the timestamp alone)
        (T - 30, None, None, "unsynced", "no_clock_sync"),
        (T - SKEW, None, None, "unsynced", "clock_offset"),
        (T + 5_000, None, None, "unsynced", "clock_offset"),
        # invalid
        ("abc", None, None, "invalid", "timestamp_syntax"),
        ("1.7e12", None, None, "invalid", "timestamp_syntax"),
        ("-1700000000000", None, None, "invalid", "timestamp_syntax"),
        ("NaN", None, None, "invalid", "timestamp_syntax"),
        ("inf", None, None, "invalid", "timestamp_syntax"),
        ("1764000000000.1234", None, None, "invalid", "timestamp_syntax"),
        ("17640000000000", None, None, "invalid", "timestamp_syntax"),  # 14 digits
        ("1" * 600, None, None, "invalid", "timestamp_too_large"),
        (T - 25 * 3_600_000, None, None, "invalid", "timestamp_range"),
        (T - 25, "off=1, d=2", None, "invalid", "clock_syntax"),  # no age
        (T - 25, "off=abc, d=2, age=1", None, "invalid", "clock_syntax"),
        (T - 25, "off=1, d=2, age=1, bare", None, "invalid", "clock_syntax"),
        (T - 25, "off=1, d=2, age=1, tok=unquoted", None, "invalid", "clock_syntax"),
        (T - 25, 'off=1, d=2, age=1, tok="a b"', None, "invalid", "clock_syntax"),
        (T - 25, "off=1, d=-2, age=1", None, "invalid", "clock_range"),
        (T - 25, "off=1, d=2, age=1" + ", x=1" * 200, None, "invalid", "clock_too_large"),
        (T - 25, None, "span=zz, rtt=5", "invalid", "prev_syntax"),
        (T - 25, None, "span=00f067aa0ba902b7", "invalid", "prev_syntax"),  # no rtt
        (T - 25, None, "rtt=-1", "invalid", "prev_range"),
    ],
)
def test_each_verdict_and_reason(
    ts: float | str, clock_header: str | None, prev: str | None, status: str, reason: str
) -> None:
    verdict = judge(T, ts, clock_header, prev)  # type: ignore[arg-type]
    assert (verdict.status, verdict.reason) == (status, reason)


def test_absent_when_no_timestamp() -> None:
    verdict = evaluate(t1_ms=T, timestamp=[], clock=["off=1, d=1, age=1"], prev=[], key=KEY)
    assert (verdict.status, verdict.reason) == ("absent", "no_timestamp")


def test_ok_verdict_carries_estimate_error_and_bound() -> None:
    tok = token(T - 500)
    verdict = judge(
        T,
        T - SKEW - 25,
        clock(SKEW, d=4.0, age=10_000.0, tok=tok),
        "span=00f067aa0ba902b7, rtt=51.5, pre=3",
    )
    assert verdict.status == "ok"
    assert verdict.trust == "server_bounded"
    assert verdict.uplink_ms == pytest.approx(25.0)
    assert verdict.uplink_error_ms == pytest.approx(4.0 / 2 + 1.0 + 600e-6 * 10_000)
    assert verdict.upper_bound_ms == pytest.approx(500.0)
    assert verdict.rtt_ms == 51.5
    assert verdict.pre_request_ms == 3.0
    assert verdict.offset_bucket == ">=1h"


def test_unsynced_raw_is_the_uplink_only_in_range() -> None:
    near = judge(T, T - 30)
    assert near.uplink_ms == pytest.approx(30.0)
    assert near.trust == "client_only"
    far = judge(T, T - 3 * 3_600_000)
    assert far.uplink_ms is None
    assert far.offset_bucket == ">=1h"


def test_token_interval_never_exceeds_the_physical_bound() -> None:
    # An honest estimate: 25 ± 3 ms, within [0, ub = 500].
    ok = judge(T, T - SKEW - 25, clock(SKEW, d=4.0, age=0.0, tok=token(T - 500)))
    assert ok.token_fields() == pytest.approx((25.0, 3.0))
    # A claim of a 900 ms uplink with a token that proves at most 100 ms: the
    # next drift check gets the physical interval [0, 100], not the claim.
    liar = judge(T, T - SKEW - 900, clock(SKEW, tok=token(T - 100)))
    assert liar.status == "implausible"
    assert liar.token_fields() == pytest.approx((50.0, 50.0))
    # No estimate at all (hypothesis B): nothing to carry.
    assert judge(T, T - 30).token_fields() == (None, None)


def test_tolerant_of_spacing_order_and_repeats() -> None:
    # RFC 8941 §4.2.2: OWS around members, any order; a repeated key keeps
    # the last value; several fields are one list (RFC 9110 §5.3).
    verdict = evaluate(
        t1_ms=T,
        timestamp=[f"  {T - SKEW - 25:.3f} "],
        clock=["age=1000 ,\toff=999", f"d=2,off={SKEW}"],
        prev=[],
        key=KEY,
    )
    assert verdict.status == "ok"
    assert verdict.uplink_ms == pytest.approx(25.0)


@pytest.mark.parametrize(
    ("offset", "bucket"),
    [
        (0.0, "<1s"),
        (-999.0, "<1s"),
        (1_000.0, "<1m"),
        (59_999.0, "<1m"),
        (60_000.0, "<1h"),
        (-3_599_999.0, "<1h"),
        (3_600_000.0, ">=1h"),
    ],
)
def test_offset_buckets(offset: float, bucket: str) -> None:
    assert timing.offset_bucket(offset) == bucket


# -- the drift rule on request sequences ---------------------------------------------


@dataclass
class Client:
    """A simulated snippet: a clock C(t) = rate·t + skew (+ jumps) in true
    time t, which the server clock reads exactly. It syncs once (a perfect
    offset at start), then sends requests with the token of the latest
    response it holds."""

    skew_ms: float = -SKEW
    rate: float = 1.0
    frozen_at: float | None = None
    jumps: list[tuple[float, float]] = field(default_factory=list)
    offset_lie_ms: float = 0.0
    #: chrony removing an offset by slewing (its maxslewrate): the clock
    #: gains (or loses) up to ``slew_ms`` from ``slew_at`` on, at 83 333 ppm.
    slew_ms: float = 0.0
    slew_at: float = T
    tok: str | None = None
    off: float | None = None
    delay: float = 2.0
    sampled_at: float = T

    def now(self, t: float) -> float:
        if self.frozen_at is not None and t > self.frozen_at:
            t = self.frozen_at
        c = T + (t - T) * self.rate + self.skew_ms
        if self.slew_ms:
            slewed = min(abs(self.slew_ms), SLEW_RATE * max(t - self.slew_at, 0.0))
            c += math.copysign(slewed, self.slew_ms)
        return c + sum(delta for at, delta in self.jumps if t >= at)

    def sync(self, t: float) -> None:
        self.off = t - self.now(t)
        self.sampled_at = self.now(t)

    def request(
        self, send_t: float, up: float, down: float = 20.0, adjust_offset: bool = False
    ) -> tuple[Verdict, float]:
        """Send at true time send_t; returns (verdict, true arrival time of
        the response at the client)."""
        assert self.off is not None
        ts = self.now(send_t)
        off = self.off
        if adjust_offset:
            # A liar who knows its clock runs fast and keeps the estimate
            # looking like a 25 ms uplink by adjusting its offset claim.
            off = (send_t + up) - ts - 25.0
        t1 = send_t + up
        verdict = evaluate(
            t1_ms=t1,
            timestamp=[f"{ts:.3f}"],
            clock=[clock(off, d=self.delay, age=max(ts - self.sampled_at, 0.0), tok=self.tok)],
            prev=[],
            key=KEY,
        )
        t2 = t1 + 2.0
        u, e = verdict.token_fields()
        self.tok = make_token(
            KEY, t2_ms=t2, t1_ms=t1, ts_ms=ts, uplink_ms=u, error_ms=e, nonce=b"\x01" * 8
        )
        arrived = t2 + down
        # Like the snippet, every response is also a clock sample.
        sample = clock_sample(ts, t1, t2, self.now(arrived))
        if sample.delay_ms >= 0:
            self.off, self.delay, self.sampled_at = sample.offset_ms, sample.delay_ms, ts
        return verdict, arrived


def _run(
    client: Client, gaps_ms: list[float], ups_ms: list[float], adjust_offset: bool = False
) -> list[Verdict]:
    t = T
    client.sync(t)
    verdicts = []
    for gap, up in zip(gaps_ms, ups_ms, strict=True):
        verdict, arrived = client.request(t + gap, up, adjust_offset=adjust_offset)
        verdicts.append(verdict)
        t = arrived
    return verdicts


def test_honest_client_with_jitter_is_never_flagged() -> None:
    rng = random.Random(7)
    gaps = [rng.uniform(0, 3_000) for _ in range(200)]
    # Jitter, a TLS handshake or preflight on some requests (+80 ms), queueing.
    ups = [rng.uniform(5, 60) + (80 if rng.random() < 0.1 else 0) for _ in range(200)]
    verdicts = _run(Client(), gaps, ups)
    assert {v.status for v in verdicts} == {"ok"}
    assert all(v.trust == "server_bounded" for v in verdicts[1:])


def test_clock_disciplined_by_ntp_is_not_flagged() -> None:
    # 500 ppm is the most ntpd ever slews a clock.
    verdicts = _run(Client(rate=1.0005), [10_000.0] * 30, [25.0] * 30)
    assert {v.status for v in verdicts} == {"ok"}


#: Request gaps from one second to ten minutes (the token's lifetime).
GAPS_MS = (1_000.0, 10_000.0, 60_000.0, 120_000.0, 600_000.0)
#: Honest clocks: quartz (±100 ppm) and ntpd slewing (±500 ppm).
DISCIPLINED_CLOCKS = {
    "exact": {},
    "quartz +100 ppm": {"rate": 1.0001},
    "quartz -100 ppm": {"rate": 0.9999},
    "ntpd +500 ppm": {"rate": 1.0005},
    "ntpd -500 ppm": {"rate": 0.9995},
}
#: chrony removing an offset at its maximum slew rate (±83 333 ppm, up to 1 s).
SLEWING_CLOCKS = {
    "chrony slews +200 ms": {"slew_ms": 200.0, "slew_at": T + 500.0},
    "chrony slews -200 ms": {"slew_ms": -200.0, "slew_at": T + 500.0},
    "chrony slews +1 s": {"slew_ms": 1_000.0, "slew_at": T + 500.0},
    "chrony slews -1 s": {"slew_ms": -1_000.0, "slew_at": T + 500.0},
    "chrony slews +1 s on an ntpd-fast clock": {"slew_ms": 1_000.0, "rate": 1.0005},
}


def _honest_run(
    clock: dict[str, float], gap_ms: float, seed: str
) -> tuple[list[Verdict], list[float]]:
    rng = random.Random(seed)
    count = 12
    ups = [rng.uniform(5, 60) for _ in range(count)]
    gaps = [gap_ms * rng.uniform(0.9, 1.0) for _ in range(count)]
    return _run(Client(**clock), gaps, ups), ups  # type: ignore[arg-type]


@pytest.mark.parametrize("gap_ms", GAPS_MS)
@pytest.mark.parametrize("clock_name", list(DISCIPLINED_CLOCKS))
def test_disciplined_clocks_are_ok_and_the_truth_is_inside_the_error(
    clock_name: str, gap_ms: float
) -> None:
    verdicts, ups = _honest_run(DISCIPLINED_CLOCKS[clock_name], gap_ms, clock_name)
    assert {v.status for v in verdicts} == {"ok"}, [(v.status, v.reason) for v in verdicts]
    assert {v.trust for v in verdicts[1:]} == {"server_bounded"}
    for verdict, up in zip(verdicts, ups, strict=True):
        assert verdict.uplink_ms is not None
        assert verdict.uplink_error_ms is not None
        assert abs(verdict.uplink_ms - up) <= verdict.uplink_error_ms + 1e-6


@pytest.mark.parametrize("gap_ms", GAPS_MS)
@pytest.mark.parametrize("clock_name", list(SLEWING_CLOCKS))
def test_clocks_slewed_by_chrony_are_never_called_liars(clock_name: str, gap_ms: float) -> None:
    verdicts, _ = _honest_run(SLEWING_CLOCKS[clock_name], gap_ms, clock_name)
    # Never implausible. While the slew runs, a fast one shows as
    # clock_corrected (client_only); a slow one looks like a longer uplink,
    # which no exchange can tell from one (the token's bound caps it).
    assert {v.status for v in verdicts} == {"ok"}, [(v.status, v.reason) for v in verdicts]
    assert {v.reason for v in verdicts[1:]} <= {"bounded", "clock_corrected"}


#: The error bound an honest, quartz-or-ntpd client gets, against the gap
#: since its sample (the sample's round trip 2 ms): d/2 + 1 ms + 600 ppm × gap.
#: README ("The drift model") shows this table.
ERROR_BY_GAP_MS = {1_000.0: 2.6, 10_000.0: 8.0, 60_000.0: 38.0, 120_000.0: 74.0, 600_000.0: 362.0}


@pytest.mark.parametrize(("gap_ms", "error_ms"), ERROR_BY_GAP_MS.items())
def test_error_bound_width_against_the_request_gap(gap_ms: float, error_ms: float) -> None:
    [verdict] = _run(Client(delay=2.0), [gap_ms], [25.0])
    assert verdict.status == "ok"
    assert verdict.uplink_error_ms == pytest.approx(error_ms, abs=0.05)


def test_concurrent_requests_sharing_a_token_are_not_flagged() -> None:
    client = Client()
    client.sync(T)
    first, arrived = client.request(T, 25.0)
    assert first.status == "ok"
    # Three requests sent at once with the same token, arriving in any order.
    verdicts = [client_copy_request(client, arrived + 1, up) for up in (40.0, 15.0, 90.0)]
    assert {v.status for v in verdicts} == {"ok"}


def client_copy_request(client: Client, send_t: float, up: float) -> Verdict:
    copy = Client(skew_ms=client.skew_ms, tok=client.tok, off=client.off)
    return copy.request(send_t, up)[0]


def test_frozen_clock_is_caught() -> None:
    verdicts = _run(Client(frozen_at=T), [0.0, 2_000.0, 2_000.0, 60_000.0], [25.0] * 4)
    assert verdicts[0].status == "ok"
    # Its fetch() times stand still while the server's token says time passed:
    # it claims to have sent before it held the token it sends.
    assert {v.status for v in verdicts[1:]} == {"implausible"}
    assert {v.reason for v in verdicts[1:]} <= {"before_token", "clock_rate"}


def test_five_percent_fast_over_minutes_is_caught() -> None:
    verdicts = _run(Client(rate=1.05), [0.0, 120_000.0, 120_000.0], [25.0] * 3)
    assert verdicts[0].status == "ok"
    # 5 % of two minutes is 6 s: no honest clock, chrony's fastest slew
    # included (it removes at most SLEW_MAX_MS within one gap), runs that far.
    assert verdicts[1].reason == "clock_rate"
    assert {v.status for v in verdicts[1:]} == {"implausible"}


def test_five_percent_fast_over_seconds_is_not_trusted_nor_accused() -> None:
    verdicts = _run(Client(rate=1.05), [0.0, 10_000.0, 10_000.0], [25.0] * 3)
    # 500 ms in 10 s is what chrony's slew does while it removes an offset:
    # within one exchange a lie and an honest correction look the same.
    assert [v.reason for v in verdicts[1:]] == ["clock_corrected"] * 2
    assert {v.status for v in verdicts[1:]} == {"ok"}
    assert {v.trust for v in verdicts[1:]} == {"client_only"}
    assert all((v.uplink_error_ms or 0) > 500 for v in verdicts[1:])


def test_ten_percent_fast_clock_hiding_behind_its_offset_claim_is_caught() -> None:
    verdicts = _run(Client(rate=1.10), [0.0, 60_000.0, 60_000.0], [25.0] * 3, adjust_offset=True)
    # The adjusted offset makes every estimate look like 25 ms…
    assert verdicts[0].status == "ok"
    # …but the token's authenticated times expose the clock's rate: 6 s a
    # minute, more than any slew removes.
    assert [v.reason for v in verdicts[1:]] == ["clock_rate", "clock_rate"]


def test_a_rate_lie_within_one_slew_is_never_server_bounded() -> None:
    verdicts = _run(Client(rate=1.05), [0.0, 10_000.0, 10_000.0], [25.0] * 3, adjust_offset=True)
    # 500 ms in 10 s: a chrony slew could do it, so no accusation, but the
    # adjusted offset buys no trust either.
    assert [v.reason for v in verdicts[1:]] == ["clock_corrected"] * 2
    assert {v.trust for v in verdicts[1:]} == {"client_only"}


@pytest.mark.parametrize("jump_ms", [5_000.0, -5_000.0])
def test_clock_jumps_are_caught(jump_ms: float) -> None:
    client = Client(jumps=[(T + 1_000, jump_ms)])
    verdicts = _run(client, [0.0, 2_000.0], [25.0, 25.0], adjust_offset=True)
    assert verdicts[0].status == "ok"
    assert verdicts[1].reason == "clock_rate"


# -- rate limit -------------------------------------------------------------------


def test_rate_limiter_token_bucket() -> None:
    limiter = RateLimiter(per_s=20, burst=100)
    assert all(limiter.allow("a", 0.0) for _ in range(100))
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)  # per client
    assert limiter.allow("a", 0.05)  # one token refilled after 50 ms
    assert not limiter.allow("a", 0.05)


def test_rate_limiter_memory_is_capped() -> None:
    limiter = RateLimiter(per_s=1, burst=1, max_clients=100)
    for i in range(10_000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", float(i))
    assert len(limiter) == 100


# -- property: any header values, a verdict and never an exception ------------------

_text = st.one_of(
    st.text(max_size=600),
    st.binary(max_size=600).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["NaN", "inf", "-inf", "1e400", "-0", "0x10", "١٢٣", "1_000", ""]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
)


@settings(max_examples=500, deadline=None)
@given(
    stamp=st.lists(_text, max_size=3),
    clock_values=st.lists(_text, max_size=3),
    prev=st.lists(_text, max_size=3),
    t1=st.floats(min_value=0, max_value=4e12),
)
def test_any_header_values_give_one_of_six_verdicts(
    stamp: list[str], clock_values: list[str], prev: list[str], t1: float
) -> None:
    verdict = evaluate(t1_ms=t1, timestamp=stamp, clock=clock_values, prev=prev, key=KEY)
    assert verdict.status in STATUSES
    if verdict.uplink_ms is not None:
        assert 0 <= verdict.uplink_ms <= timing.MAX_UPLINK_MS + 1_000


# -- exact bounds and whole verdicts (each found by `make mutate`) ---------------------

PREV = "span=00f067aa0ba902b7, rtt=51.5, pre=3"


def test_unsynced_verdicts_carry_every_figure() -> None:
    assert judge(T, T - 30, prev=PREV) == Verdict(
        "unsynced",
        "no_clock_sync",
        uplink_ms=30.0,
        rtt_ms=51.5,
        pre_request_ms=3.0,
        offset_bucket="<1s",
        raw_ms=30.0,
        client_ts_ms=T - 30,
    )
    assert judge(T, T - SKEW, prev=PREV) == Verdict(
        "unsynced",
        "clock_offset",
        rtt_ms=51.5,
        pre_request_ms=3.0,
        offset_bucket=">=1h",
        raw_ms=SKEW,
        client_ts_ms=T - SKEW,
    )
    day = timing.MAX_RAW_OFFSET_MS
    assert judge(T, T - day - 1) == Verdict(
        "invalid", "timestamp_range", raw_ms=day + 1, client_ts_ms=T - day - 1
    )


@pytest.mark.parametrize(
    ("raw", "reason", "uplink"),
    [
        (0.0, "no_clock_sync", 0.0),
        (timing.MAX_UPLINK_MS, "no_clock_sync", timing.MAX_UPLINK_MS),
        (timing.MAX_UPLINK_MS + 1, "clock_offset", None),
        (-1.0, "clock_offset", None),
        (timing.MAX_RAW_OFFSET_MS, "clock_offset", None),  # a day exactly: still a clock
        (-timing.MAX_RAW_OFFSET_MS, "clock_offset", None),
    ],
)
def test_unsynced_bounds_are_inclusive(raw: float, reason: str, uplink: float | None) -> None:
    verdict = judge(T, T - raw)
    assert (verdict.status, verdict.reason, verdict.uplink_ms) == ("unsynced", reason, uplink)


def test_a_bounded_verdict_carries_every_figure() -> None:
    verdict = judge(T, T - SKEW - 25, clock(SKEW, d=4.0, age=10_000.0, tok=token(T - 500)), PREV)
    error = 4.0 / 2 + timing.ROUNDING_MS + timing.HONEST_RATE * 10_000.0
    assert verdict == Verdict(
        "ok",
        "bounded",
        trust="server_bounded",
        uplink_ms=25.0,
        uplink_error_ms=error,
        upper_bound_ms=500.0,
        rtt_ms=51.5,
        pre_request_ms=3.0,
        sync_delay_ms=4.0,
        sync_age_ms=10_000.0,
        offset_bucket=">=1h",
        raw_ms=SKEW + 25,
        client_ts_ms=T - SKEW - 25,
        chain_uplink_ms=25.0,
        chain_error_ms=error,
    )


def test_a_clock_correction_is_client_only_within_the_physical_bound() -> None:
    # The estimate (150 ms) is beyond the token's bound (100 ms) by more than
    # the error (2.6 ms) but within one slew (83 ms over the 1 s sync age).
    verdict = judge(T, T - SKEW - 150, clock(SKEW, d=2.0, age=1_000.0, tok=token(T - 100)))
    error = 2.0 / 2 + timing.ROUNDING_MS + timing.HONEST_RATE * 1_000.0
    assert verdict == Verdict(
        "ok",
        "clock_corrected",
        trust="client_only",
        uplink_ms=100.0,  # capped at what the token proves
        uplink_error_ms=error + timing.slew_allowance(1_000.0),
        upper_bound_ms=100.0,
        sync_delay_ms=2.0,
        sync_age_ms=1_000.0,
        offset_bucket=">=1h",
        raw_ms=SKEW + 150,
        client_ts_ms=T - SKEW - 150,
        chain_uplink_ms=50.0,  # the physical interval [0, 100]: the claim is outside it
        chain_error_ms=50.0,
    )
    # Negative by more than the error, within one slew: a zero uplink.
    negative = judge(T, T - SKEW + 20, clock(SKEW, d=2.0, age=1_000.0))
    assert (negative.reason, negative.uplink_ms) == ("clock_corrected", 0.0)


@pytest.mark.parametrize(
    ("estimate", "upper", "reason", "uplink"),
    [
        # error = d/2 + 1 = 2 ms exactly (age 0, so no slew): each bound is inclusive.
        (-2.0, None, "token_missing", 0.0),  # a negative estimate within the error is zero
        (-0.5, None, "token_missing", 0.0),
        (0.5, None, "token_missing", 0.5),
        (-2.5, None, "negative_uplink", None),
        (102.0, 100.0, "bounded", 102.0),
        (99.0, 100.0, "bounded", 99.0),
        (102.5, 100.0, "before_token", None),
        (60_002.0, None, "token_missing", 60_002.0),
        (60_002.5, None, "uplink_too_long", None),
    ],
)
def test_physical_bounds_allow_exactly_the_error(
    estimate: float, upper: float | None, reason: str, uplink: float | None
) -> None:
    tok = token(T - upper) if upper is not None else None
    verdict = judge(T, T - SKEW - estimate, clock(SKEW, d=2.0, age=0.0, tok=tok))
    assert (verdict.reason, verdict.uplink_ms) == (reason, uplink)


def test_previous_keys_bound_the_uplink_during_a_rotation() -> None:
    header = clock(SKEW, tok=token(T - 500, key=OTHER_KEY))
    stamp = [f"{T - SKEW - 25:.3f}"]
    rotating = evaluate(
        t1_ms=T, timestamp=stamp, clock=[header], prev=[], key=KEY, previous_keys=(OTHER_KEY,)
    )
    assert (rotating.reason, rotating.trust) == ("bounded", "server_bounded")


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        # RFC 9110 §5.3: X-Client-Timestamp is one Item, so two field lines are invalid.
        (["1764000000000", "1764000000001"], "timestamp_syntax"),
        ([" " * 499 + "1764000000000"], None),  # 512 bytes: the cap is inclusive
        ([" " * 500 + "1764000000000"], "timestamp_too_large"),
        # Only SP and HTAB are OWS (RFC 9110 §5.6.3).
        (["\x0b1764000000000"], "timestamp_syntax"),
        (["1764000000000\x0c"], "timestamp_syntax"),
        (["X1764000000000"], "timestamp_syntax"),
        (["\t1764000000000 "], None),
    ],
)
def test_timestamp_shape(values: list[str], reason: str | None) -> None:
    if reason is None:
        assert timing.parse_timestamp(values) == 1_764_000_000_000.0
    else:
        with pytest.raises(timing.HeaderError, match=f"^{reason}$") as caught:
            timing.parse_timestamp(values)
        assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        # Unknown members are ignored (RFC 8941 §4.2.2 leaves room for extensions),
        # whatever their value, as long as the member is key=value.
        ('off=1, d=2, age=1, ext="a=b"', None),
        ("off=1, d=2, age=1, ext=tokenX", None),
        ("off=1, d=2, age=1, ext=a\x0b", None),
        ("off=1, d=2, age=1, Ext=1", "clock_syntax"),  # RFC 8941 §3.2: keys are lower case
        ("off=1, d=2, age=1, ext=", "clock_syntax"),
        ("off=1, d=2, age=1, ext= 1", "clock_syntax"),
        ("off=1,\x0bd=2, age=1", "clock_syntax"),
        ("off=1, Xd=2, age=1", "clock_syntax"),
        # The 512-byte cap counts the joined value and is inclusive.
        ("off=1, d=2, age=1, ext=" + "a" * (512 - 23), None),
        ("off=1, d=2, age=1, ext=" + "a" * (513 - 23), "clock_too_large"),
        # Ranges are inclusive: d and age may be 0, and d 60 s; off ± a day.
        ("off=0, d=0, age=0", None),
        ("off=-86400000, d=60000, age=86400000", None),
        ("off=86400000.001, d=1, age=1", "clock_range"),
        ("off=1, d=60000.001, age=1", "clock_range"),
    ],
)
def test_clock_header_shape(value: str, reason: str | None) -> None:
    if reason is None:
        timing.parse_clock([value])
    else:
        with pytest.raises(timing.HeaderError) as caught:
            timing.parse_clock([value])
        assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("rtt=5", timing.ClientPrev(None, 5.0, None)),
        ("span=00f067aa0ba902b7, rtt=0, pre=0", timing.ClientPrev("00f067aa0ba902b7", 0.0, 0.0)),
        ("rtt=600000, pre=600000", timing.ClientPrev(None, 600_000.0, 600_000.0)),
        ("rtt=5, pre=-1", "prev_range"),
        ("rtt=5, pre=x", "prev_syntax"),
        ("rtt=5, bare", "prev_syntax"),
        ("rtt=5" + ", x=1" * 200, "prev_too_large"),
    ],
)
def test_prev_header_shape(value: str, expected: timing.ClientPrev | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(timing.HeaderError) as caught:
            timing.parse_prev([value])
        assert caught.value.reason == expected
    else:
        assert timing.parse_prev([value]) == expected


def _signed(body: str, key: bytes = KEY) -> str:
    """A token whose mac is right for any body (what only the key's holder can make)."""
    return f"{body}.{timing._mac(key, body)}"


@pytest.mark.parametrize(
    "body",
    [
        "1764000000000.1.2.3.4",  # five fields
        "1764000000000.1.2.3.4.bm9uY2U.extra",  # seven
        "1764000000000.x.2.3.4.bm9uY2U",  # not a number
        "-.1.2.3.4.bm9uY2U",  # no T2
    ],
)
def test_a_correctly_signed_token_of_the_wrong_shape_is_invalid(body: str) -> None:
    assert verify_token(KEY, _signed(body), T) == (None, "token_invalid")


def test_a_token_of_exactly_the_longest_length_verifies() -> None:
    long = make_token(KEY, t2_ms=T, t1_ms=T, ts_ms=T, uplink_ms=1, error_ms=1, nonce=b"\x01" * 140)
    assert len(long) == timing.MAX_TOKEN_CHARS
    assert verify_token(KEY, long, T)[1] == ""
    bind = make_bind(KEY, long, 1, 2)
    assert verify_bind(KEY, bind, long, 1, 2)
    assert not verify_bind(KEY, bind, long + "x", 1, 2)
    assert verify_token(KEY, long + "x", T) == (None, "token_invalid")


def test_a_bind_for_a_non_ascii_token_is_refused() -> None:
    assert not verify_bind(KEY, make_bind(KEY, "1.2", 1, 2), "1.2é", 1, 2)


@pytest.mark.parametrize(
    ("estimate", "error", "upper", "interval"),
    [
        (1.0, 3.0, None, (2.0, 2.0)),  # [0, 4]: never below zero
        (105.0, 5.0, 100.0, (100.0, 0.0)),  # [100, 100]: touching the bound is inside
        (10.0, 1.0, 0.0, (0.0, 0.0)),  # a bound of 0 leaves [0, 0]
    ],
)
def test_chain_interval_edges(
    estimate: float, error: float, upper: float | None, interval: tuple[float, float]
) -> None:
    assert timing.chain_interval(estimate, error, upper) == interval


def test_no_slew_without_elapsed_time() -> None:
    assert timing.slew_allowance(0.0) == 0.0
    assert timing.slew_allowance(-5.0) == 0.0
    assert timing.slew_allowance(1_000.0) == pytest.approx(83.333)


# The token's request: sent at TS, received at T1 = T, U = 25 ± 3, answered at
# T2 = T1 + 2. A request received at t1 = T1 (server elapsed 0, so r = 1 ms):
# the client's elapsed time must lie in [22 + 2 − 1, 0 + 28 + 1] = [23, 29].
DRIFT_TOKEN = timing.Token(t2_ms=int(T) + 2, t1_ms=int(T), ts_ms=0, uplink_ms=25, error_ms=3)


@pytest.mark.parametrize(
    ("client_elapsed", "check"),
    [
        (23.0, "ok"),
        (29.0, "ok"),
        (22.0, "corrected"),
        (20.0, "corrected"),
        (29.5, "corrected"),
        (29.0 + timing.SLEW_MAX_MS, "corrected"),  # a whole slew, exactly
        (29.5 + timing.SLEW_MAX_MS, "broken"),
    ],
)
def test_drift_rule_bounds(client_elapsed: float, check: str) -> None:
    assert timing.drift_check(DRIFT_TOKEN, T, client_elapsed) == check


@pytest.mark.parametrize(
    "partial",
    [
        timing.Token(t2_ms=int(T), t1_ms=None, ts_ms=0, uplink_ms=25, error_ms=3),
        timing.Token(t2_ms=int(T), t1_ms=int(T), ts_ms=None, uplink_ms=25, error_ms=3),
        timing.Token(t2_ms=int(T), t1_ms=int(T), ts_ms=0, uplink_ms=None, error_ms=3),
        timing.Token(t2_ms=int(T), t1_ms=int(T), ts_ms=0, uplink_ms=25, error_ms=None),
    ],
)
def test_a_token_without_the_full_interval_cannot_be_checked(partial: timing.Token) -> None:
    assert timing.drift_check(partial, T + 5_000, 1e9) == "ok"


def test_rate_limiter_forgets_the_least_recent_client() -> None:
    limiter = RateLimiter(per_s=0.001, burst=1, max_clients=2)
    assert limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    assert limiter.allow("c", 0.0)  # "a" is forgotten
    assert not limiter.allow("c", 0.0)  # the newest is remembered
    assert limiter.allow("a", 0.0)  # a forgotten client starts with a full bucket
