"""The rewritten ``timing.evaluate`` gives the same Verdict as the one it
replaced, over generated headers: timestamps near and far, clock headers with
tokens minted by ``make_token`` from random fields (under the key, an old key
or another one), X-Client-Prev values, and garbage."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway import timing as t

KEY = b"k" * 32
OLD_KEY = b"p" * 32
OTHER_KEY = b"o" * 32
T1 = 1_764_000_000_000.0


# The implementation before the rewrite, kept here as the reference.
def evaluate_before(
    *,
    t1_ms: float,
    timestamp: list[str],
    clock: list[str],
    prev: list[str],
    key: bytes,
    previous_keys: tuple[bytes, ...] = (),
) -> t.Verdict:
    """gateway.timing.evaluate as it was before Verdicts were built once.

    ``timestamp``, ``clock`` and ``prev`` are the header's field values as
    received (empty when absent).
    """
    if not timestamp:
        return t.ABSENT
    try:
        ts = t.parse_timestamp(timestamp)
        client_clock = t.parse_clock(clock) if clock else None
        client_prev = t.parse_prev(prev) if prev else None
    except t.HeaderError as exc:
        return t.Verdict("invalid", exc.reason)
    raw = t1_ms - ts
    if not math.isfinite(raw) or abs(raw) > t.MAX_RAW_OFFSET_MS:
        return t.Verdict("invalid", "timestamp_range", raw_ms=raw, client_ts_ms=ts)
    rtt = client_prev.rtt_ms if client_prev else None
    pre = client_prev.pre_ms if client_prev else None

    if client_clock is None:
        # Hypothesis B: only the client's clock, never checked against ours.
        if 0 <= raw <= t.MAX_UPLINK_MS:
            return t.Verdict(
                "unsynced",
                "no_clock_sync",
                uplink_ms=raw,
                rtt_ms=rtt,
                pre_request_ms=pre,
                offset_bucket=t.offset_bucket(raw),
                raw_ms=raw,
                client_ts_ms=ts,
            )
        return t.Verdict(
            "unsynced",
            "clock_offset",
            rtt_ms=rtt,
            pre_request_ms=pre,
            offset_bucket=t.offset_bucket(raw),
            raw_ms=raw,
            client_ts_ms=ts,
        )

    estimate = t1_ms - (ts + client_clock.off_ms)
    error = t.uplink_error(client_clock)
    token: t.Token | None = None
    trust_reason = "token_missing"
    if client_clock.token is not None:
        token, trust_reason = t.verify_token(key, client_clock.token, t1_ms, previous=previous_keys)
    trust: t.Trust = "server_bounded" if token is not None else "client_only"
    upper = t1_ms - token.t2_ms if token is not None else None
    chain_uplink, chain_error = t.chain_interval(estimate, error, upper)
    base = t.Verdict(
        "ok",
        "bounded" if token is not None else trust_reason,
        trust=trust,
        chain_uplink_ms=chain_uplink,
        chain_error_ms=chain_error,
        upper_bound_ms=upper,
        rtt_ms=rtt,
        pre_request_ms=pre,
        sync_delay_ms=client_clock.delay_ms,
        sync_age_ms=client_clock.age_ms,
        offset_bucket=t.offset_bucket(client_clock.off_ms),
        raw_ms=raw,
        client_ts_ms=ts,
    )
    drift: t.DriftCheck = t.drift_check(token, t1_ms, ts) if token is not None else "ok"
    if drift == "broken":
        # Checked first: it rests on authenticated times alone, and when the
        # client's clock itself is off (fast, frozen, jumped) the bound
        # failures below are only its symptoms.
        return replace(base, status="implausible", reason="clock_rate")
    failure = t._bound_failure(estimate, error, upper)
    if failure is None and drift == "ok":
        # The estimate stands; a negative one within the error is a zero uplink.
        return replace(base, uplink_ms=max(estimate, 0.0), uplink_error_ms=error)
    # Outside what a quartz or ntpd clock explains: a chrony slew since the
    # sample may have moved the client's offset by up to the slew allowance.
    slewed_error = error + t.slew_allowance(client_clock.age_ms)
    failure = t._bound_failure(estimate, slewed_error, upper)
    if failure is not None:
        return replace(base, status="implausible", reason=failure)
    # Honest slewing and a lie cannot be told apart within one exchange: not
    # an accusation, but no server-bounded figure either.
    high = min(upper, t.MAX_UPLINK_MS) if upper is not None else t.MAX_UPLINK_MS
    # The token's interval keeps the unslewed error: a slew that is real shows
    # again in the next check (as a correction, never as a lie, since the rule
    # forgives up to a whole slew), and a lie cannot launder itself into a
    # wide interval that lets the next request pass at full trust.
    chain_uplink, chain_error = t.chain_interval(estimate, error, upper)
    return replace(
        base,
        reason="clock_corrected",
        trust="client_only",
        uplink_ms=min(max(estimate, 0.0), high),
        uplink_error_ms=slewed_error,
        chain_uplink_ms=chain_uplink,
        chain_error_ms=chain_error,
    )


def _ms(draw: st.DrawFn, low: float, high: float) -> float:
    return draw(st.floats(min_value=low, max_value=high, allow_nan=False))


def _num(value: float) -> str:
    return f"{value:.3f}"


@st.composite
def _timestamp(draw: st.DrawFn) -> list[str]:
    kind = draw(st.sampled_from(["near", "far", "garbage", "several", "none"]))
    if kind == "none":
        return []
    if kind == "garbage":
        return [draw(st.text(max_size=40))]
    spread = 70_000.0 if kind == "near" else 3e12
    value = [_num(T1 - _ms(draw, -spread, spread))]
    return value * 2 if kind == "several" else value


@st.composite
def _token(draw: st.DrawFn) -> str:
    def maybe(low: float, high: float) -> float | None:
        return draw(st.none() | st.floats(min_value=low, max_value=high, allow_nan=False))

    minted = t.make_token(
        draw(st.sampled_from([KEY, OLD_KEY, OTHER_KEY])),
        t2_ms=T1 - _ms(draw, -5_000.0, 700_000.0),
        t1_ms=maybe(T1 - 800_000.0, T1 + 5_000.0),
        ts_ms=maybe(T1 - 800_000.0, T1 + 5_000.0),
        uplink_ms=maybe(0.0, 70_000.0),
        error_ms=maybe(0.0, 5_000.0),
        nonce=draw(st.binary(min_size=8, max_size=8)),
    )
    if draw(st.booleans()):
        return minted
    # Tampered with: one character changed, or garbage.
    if draw(st.booleans()) and minted:
        at = draw(st.integers(0, len(minted) - 1))
        return minted[:at] + draw(st.sampled_from("0123456789.-aZ_")) + minted[at + 1 :]
    return draw(st.text(alphabet="0123456789.-abcXYZ_", max_size=120))


@st.composite
def _clock(draw: st.DrawFn) -> list[str]:
    kind = draw(st.sampled_from(["fields", "fields", "fields", "garbage", "none"]))
    if kind == "none":
        return []
    if kind == "garbage":
        return [draw(st.text(max_size=80))]
    members = [
        f"off={_num(_ms(draw, -90_000.0, 90_000.0))}",
        f"d={_num(_ms(draw, -5.0, 70_000.0))}",
        f"age={_num(_ms(draw, -5.0, 4e5))}",
    ]
    if draw(st.booleans()):
        members.append(f'tok="{draw(_token())}"')
    if draw(st.booleans()):
        members = draw(st.permutations(members))
    return [", ".join(members)]


@st.composite
def _prev(draw: st.DrawFn) -> list[str]:
    kind = draw(st.sampled_from(["fields", "garbage", "none"]))
    if kind == "none":
        return []
    if kind == "garbage":
        return [draw(st.text(max_size=60))]
    members = [f"rtt={_num(_ms(draw, -5.0, 700_000.0))}"]
    if draw(st.booleans()):
        members.append(f"pre={_num(_ms(draw, 0.0, 1_000.0))}")
    if draw(st.booleans()):
        members.append("span=" + draw(st.sampled_from(["b7ad6b7169203331"] * 4 + ["B7AD", "zz"])))
    return [", ".join(members)]


@st.composite
def _snippet(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """Timestamp and clock of a client that follows the protocol (or nearly):
    a true offset and uplink, a token from its previous request, noise on
    what it claims, so every branch of the verdict is reached."""
    off = _ms(draw, -5_000.0, 5_000.0)  # server − client
    uplink = _ms(draw, -50.0, 400.0)
    ts = T1 - uplink - off
    gap = _ms(draw, -10.0, 700_000.0)  # T2 of the token, before t1
    t2 = T1 - gap
    t1_prev = t2 - _ms(draw, 0.0, 50.0)
    u_prev = _ms(draw, 0.0, 300.0)
    ts_prev = t1_prev - u_prev - off + _ms(draw, -2_000.0, 2_000.0) * draw(st.sampled_from([0, 1]))
    minted = t.make_token(
        draw(st.sampled_from([KEY, KEY, KEY, OLD_KEY, OTHER_KEY])),
        t2_ms=t2,
        t1_ms=t1_prev,
        ts_ms=ts_prev,
        uplink_ms=u_prev,
        error_ms=_ms(draw, 0.0, 20.0),
        nonce=b"\x00" * 8,
    )
    claimed_off = off + _ms(draw, -5.0, 5.0) * draw(st.sampled_from([0, 1, 100]))
    members = [
        f"off={_num(claimed_off)}",
        f"d={_num(_ms(draw, 0.0, 50.0))}",
        f"age={_num(_ms(draw, 0.0, 200_000.0))}",
    ]
    if draw(st.integers(0, 5)):
        members.append(f'tok="{minted}"')
    return [_num(ts)], [", ".join(members)]


def _same(a: t.Verdict, b: t.Verdict) -> bool:
    # NaN never equals itself; no field should be NaN, but compare it as equal.
    def norm(v: t.Verdict) -> t.Verdict:
        values = {name: getattr(v, name) for name in t.Verdict.__slots__}
        fields = {
            k: None if isinstance(x, float) and math.isnan(x) else x for k, x in values.items()
        }
        return replace(v, **fields)

    return norm(a) == norm(b)


@settings(max_examples=2000, deadline=None)
@given(
    request=_snippet() | st.tuples(_timestamp(), _clock()),
    prev=_prev(),
    t1_shift=st.floats(min_value=-1.0, max_value=1.0, allow_nan=False),
    previous=st.sampled_from([(), (OLD_KEY,)]),
)
def test_evaluate_gives_the_verdict_the_old_one_gave(
    request: tuple[list[str], list[str]],
    prev: list[str],
    t1_shift: float,
    previous: tuple[bytes, ...],
) -> None:
    timestamp, clock = request
    arguments = {
        "t1_ms": T1 + t1_shift,
        "timestamp": timestamp,
        "clock": clock,
        "prev": prev,
        "key": KEY,
        "previous_keys": previous,
    }
    verdict = t.evaluate(**arguments)  # type: ignore[arg-type]
    event(f"{verdict.status}/{verdict.reason}/{verdict.trust}")
    assert _same(verdict, evaluate_before(**arguments))  # type: ignore[arg-type]
