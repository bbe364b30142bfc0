"""Latency measurement: pure functions for clock maths, tokens and verdicts.

What it is for: turning what a client claims (``X-Client-Timestamp``,
``X-Client-Clock``, ``X-Client-Prev``) and what the gateway knows (its receipt
time t1, the clock token it signed earlier) into an uplink estimate with an
error bound and a verdict (README, "How latency is measured"). Every time is passed in; nothing here
reads a clock, so tests are exact.

Not for: reading headers off a request or writing spans (``app.py``).

Times are epoch milliseconds as floats (client times on the client's clock,
server times on the server's). The client clock offset ``off`` is
server − client.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Literal

Status = Literal["ok", "absent", "invalid", "unsynced", "implausible", "rate_limited"]
Trust = Literal["server_bounded", "client_only"]

# -- thresholds, each with the reason for its value ---------------------------

#: ARCHITECTURE.md §6: each timing header is capped at 512 bytes; a longer one is
#: invalid before any parsing (a parser never sees attacker-sized input).
MAX_HEADER_BYTES: Final = 512
#: An uplink longer than this is not a network latency but a stalled or lying
#: client; the bound also caps what a client without a token can claim.
MAX_UPLINK_MS: Final = 60_000.0
#: |t1 − ts| beyond a day is no clock anyone runs: the header is invalid.
MAX_RAW_OFFSET_MS: Final = 24 * 3600 * 1000.0
#: The drift model: how fast an honest client's clock may run against the
#: gateway's. One model feeds both the error of an estimate (drift since the
#: sync sample) and the drift rule's allowance (drift since the token's
#: request), so an honest clock never falls between the two (the error once
#: allowed 50 ppm while the rule allowed 1 000 ppm, and an ntpd-slewed clock
#: sending every two minutes was called a liar).
#:
#: * A free-running quartz clock is within 100 ppm; ntpd disciplines it by
#:   slewing at most 500 ppm (its hard limit). Together: 600 ppm, always
#:   allowed, at full trust.
#: * chrony slews far faster, at up to 83 333 ppm (its ``maxslewrate``), while
#:   it removes an offset (after a laptop resumes, say), and
#:   ``performance.now()`` follows that slew. Within one exchange that cannot
#:   be told from a lying clock, so it is not called a lie: the verdict says
#:   ``clock_corrected`` and drops to ``client_only``. It is bounded by the
#:   offset being removed: more than ``SLEW_MAX_MS`` of correction within one
#:   gap is what only a lying (or broken) clock does. A step of the clock is
#:   the snippet's business: it re-anchors when Date.now() jumps.
#: * 1 ms covers the millisecond rounding of Date.now() on both sides.
HONEST_RATE: Final = 600e-6
SLEW_RATE: Final = 83_333e-6
SLEW_MAX_MS: Final = 1_000.0
ROUNDING_MS: Final = 1.0
#: A clock token older than this gives no bound (ARCHITECTURE.md §6): long enough for a
#: page that makes a request every few minutes, short enough that a replayed
#: token only loosens the bound of a recent request.
TOKEN_MAX_AGE_MS: Final = 10 * 60 * 1000.0
#: Sanity limits on what X-Client-Clock and X-Client-Prev may carry: values
#: beyond them cannot come from an honest snippet.
MAX_SYNC_DELAY_MS: Final = 60_000.0
MAX_SYNC_AGE_MS: Final = 24 * 3600 * 1000.0
MAX_RTT_MS: Final = 10 * 60 * 1000.0
#: Rate-limiter memory cap: one entry per client key, least recently used
#: evicted first. 10 000 entries cost about 1.5 MB.
RATE_LIMIT_MAX_CLIENTS: Final = 10_000

OFFSET_BUCKETS: Final = ((1_000.0, "<1s"), (60_000.0, "<1m"), (3_600_000.0, "<1h"))

# -- header parsing ----------------------------------------------------------------

# ARCHITECTURE.md §6: time values are epoch milliseconds with up to 3 decimals. An RFC
# 8941 Decimal allows 12 integer digits; epoch ms need 13, so we accept 13.
_NUMBER: Final = r"-?\d{1,13}(?:\.\d{1,3})?"
_TIMESTAMP_RE: Final = re.compile(r"\d{1,13}(?:\.\d{1,3})?")
_NUMBER_RE: Final = re.compile(_NUMBER)
# RFC 8941 §3.2: a key is lcalpha / "*" followed by lcalpha, digits, "_-.*".
_KEY_RE: Final = re.compile(r"[a-z*][a-z0-9_\-.*]*")
# RFC 8941 §3.3.3 sf-string, restricted to the token alphabet we mint
# (base64url, dots and the "-" placeholder): nothing else can be ours.
_TOKEN_STRING_RE: Final = re.compile(r'"([A-Za-z0-9_\-.]{1,256})"')
_SPAN_ID_RE: Final = re.compile(r"[0-9a-f]{16}")


class HeaderError(ValueError):
    """A timing header is malformed; ``reason`` is the verdict's reason code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ClientClock:
    """``X-Client-Clock``: the snippet's offset estimate and its provenance."""

    off_ms: float
    delay_ms: float
    age_ms: float
    token: str | None


@dataclass(frozen=True, slots=True)
class ClientPrev:
    """``X-Client-Prev``: the previous request as Resource Timing saw it."""

    span_id: str | None
    rtt_ms: float
    pre_ms: float | None


def parse_timestamp(values: list[str]) -> float:
    """``X-Client-Timestamp: <epoch ms>`` (an RFC 8941 Item: one decimal)."""
    if len(values) != 1:
        raise HeaderError("timestamp_syntax")
    value = values[0]
    if len(value.encode()) > MAX_HEADER_BYTES:
        raise HeaderError("timestamp_too_large")
    value = value.strip(" \t")
    if not _TIMESTAMP_RE.fullmatch(value):
        raise HeaderError("timestamp_syntax")
    return float(value)


def parse_dictionary(values: list[str], name: str) -> dict[str, str]:
    """An RFC 8941-shaped dictionary of ``key=value`` members.

    Tolerant of spacing and order (RFC 8941 §4.2.2 allows OWS around commas);
    several fields are one list joined by commas (RFC 9110 §5.3); a repeated
    key keeps its last value (RFC 8941 §4.2.2: "overwrite"). Strict about the
    shape: a member without ``=`` or a bad key makes the header invalid.
    """
    joined = ",".join(values)
    if len(joined.encode()) > MAX_HEADER_BYTES:
        raise HeaderError(f"{name}_too_large")
    members: dict[str, str] = {}
    for member in joined.split(","):
        member = member.strip(" \t")
        key, eq, value = member.partition("=")
        if not eq or not _KEY_RE.fullmatch(key) or not value or value != value.strip(" \t"):
            raise HeaderError(f"{name}_syntax")
        members[key] = value
    return members


def _number(members: dict[str, str], key: str, name: str, low: float, high: float) -> float:
    raw = members.get(key)
    if raw is None or not _NUMBER_RE.fullmatch(raw):
        raise HeaderError(f"{name}_syntax")
    value = float(raw)
    if not low <= value <= high:
        raise HeaderError(f"{name}_range")
    return value


def parse_clock(values: list[str]) -> ClientClock:
    """``X-Client-Clock: off=<ms>, d=<ms>, age=<ms>, tok="<token>"``."""
    members = parse_dictionary(values, "clock")
    off = _number(members, "off", "clock", -MAX_RAW_OFFSET_MS, MAX_RAW_OFFSET_MS)
    delay = _number(members, "d", "clock", 0.0, MAX_SYNC_DELAY_MS)
    age = _number(members, "age", "clock", 0.0, MAX_SYNC_AGE_MS)
    token = None
    if "tok" in members:
        match = _TOKEN_STRING_RE.fullmatch(members["tok"])
        if not match:
            raise HeaderError("clock_syntax")
        token = match.group(1)
    return ClientClock(off, delay, age, token)


def parse_prev(values: list[str]) -> ClientPrev:
    """``X-Client-Prev: span=<16 hex>, rtt=<ms>, pre=<ms>``."""
    members = parse_dictionary(values, "prev")
    rtt = _number(members, "rtt", "prev", 0.0, MAX_RTT_MS)
    pre = _number(members, "pre", "prev", 0.0, MAX_RTT_MS) if "pre" in members else None
    span = members.get("span")
    if span is not None and not _SPAN_ID_RE.fullmatch(span):
        raise HeaderError("prev_syntax")
    return ClientPrev(span, rtt, pre)


# -- NTP-style clock samples (the snippet does the same in JS) -------------------------


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One four-timestamp exchange: offset (server − client) and round-trip delay."""

    offset_ms: float
    delay_ms: float
    taken_at_ms: float  # client time of t3


def clock_sample(t0: float, t1: float, t2: float, t3: float) -> ClockSample:
    """NTP's on-wire maths (RFC 5905 §8): t0/t3 client send/receive, t1/t2
    server receive/send. The offset is exact on a symmetric path and off by
    half the asymmetry otherwise; the delay excludes the server's own time."""
    return ClockSample(
        offset_ms=((t1 - t0) + (t2 - t3)) / 2,
        delay_ms=(t3 - t0) - (t2 - t1),
        taken_at_ms=t3,
    )


def best_sample(samples: list[ClockSample], keep: int = 8) -> ClockSample | None:
    """The minimum-delay sample among the last ``keep`` (NTP's clock filter,
    RFC 5905 §10: the least-delayed sample has the least asymmetry error)."""
    recent = samples[-keep:]
    return min(recent, key=lambda s: s.delay_ms) if recent else None


# -- clock tokens ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """What a verified token says: its T2 and the T1, TS, U, E of the
    request whose response carried it (None where that was unknown)."""

    t2_ms: int
    t1_ms: int | None
    ts_ms: int | None
    uplink_ms: int | None
    error_ms: int | None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _field(value: int | None) -> str:
    return "-" if value is None else str(value)


def make_token(
    key: bytes,
    *,
    t2_ms: float,
    t1_ms: float | None,
    ts_ms: float | None,
    uplink_ms: float | None,
    error_ms: float | None,
    nonce: bytes,
) -> str:
    """``<T2>.<T1>.<TS>.<U>.<E>.<nonce>.<mac>`` (README, "The server's own bound").

    T2 is rounded down (rounding down only loosens the bound t1 − T2), T1,
    TS and U to nearest, E up; integers, so the token splits on dots. The mac
    is HMAC-SHA256 over everything before the last dot, truncated to 128 bits
    (RFC 2104 §5 allows truncation to half the hash length or more).
    """
    fields = [
        str(math.floor(t2_ms)),
        _field(_nearest(t1_ms)),
        _field(_nearest(ts_ms)),
        _field(_nearest(uplink_ms)),
        _field(None if error_ms is None else math.ceil(error_ms)),
        _b64(nonce),
    ]
    body = ".".join(fields)
    return f"{body}.{_mac(key, body)}"


def _nearest(value: float | None) -> int | None:
    return None if value is None else math.floor(value + 0.5)


def _mac(key: bytes, body: str) -> str:
    mac = _keyed(key).copy()
    mac.update(body.encode("ascii"))
    return _b64(mac.digest()[:16])


@functools.lru_cache(maxsize=4)
def _keyed(key: bytes) -> hmac.HMAC:
    """The HMAC state after absorbing the key: copying it per token skips the
    key schedule (two hash blocks) that ``hmac.new`` redoes on every call."""
    return hmac.new(key, digestmod=hashlib.sha256)


#: The longest token we mint is ~90 characters; 256 leaves room and keeps an
#: attacker-sized string away from the HMAC.
MAX_TOKEN_CHARS: Final = 256


def verify_token(
    key: bytes, token: str, t1_ms: float, *, previous: tuple[bytes, ...] = ()
) -> tuple[Token | None, str]:
    """``(token, "")`` when authentic and fresh, else ``(None, reason)``.

    The mac is compared in constant time (``hmac.compare_digest``), under
    ``key`` or any of the ``previous`` keys (a key rotation in progress). A
    token is fresh when 0 ≤ t1 − T2 ≤ 10 min. The token itself is not bound
    to a trace (the next request starts a new one); a beacon entry proves it
    belongs to its trace with :func:`make_bind`'s mac instead.
    """
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        # compare_digest raises TypeError on non-ASCII str: refuse it first.
        return None, "token_invalid"
    body, _, mac = token.rpartition(".")
    parts = body.split(".")
    if len(parts) != 6 or not mac:
        return None, "token_invalid"
    if not _mac_ok(key, previous, body, mac):
        # Forged, altered, or minted under another key (a restart with a
        # random key): no evidence of lying, just no server bound.
        return None, "token_invalid"
    try:
        t2, t1, ts, up, err = (None if p == "-" else int(p) for p in parts[:5])
    except ValueError:
        return None, "token_invalid"
    if t2 is None:
        return None, "token_invalid"
    age = t1_ms - t2
    if age < 0:
        return None, "token_future"
    if age > TOKEN_MAX_AGE_MS:
        return None, "token_expired"
    return Token(t2, t1, ts, up, err), ""


def _mac_ok(key: bytes, previous: tuple[bytes, ...], body: str, mac: str) -> bool:
    # Every key is tried (no early exit on the current one's failure alone),
    # each comparison in constant time.
    ok = hmac.compare_digest(mac, _mac(key, body))
    for old in previous:
        ok |= hmac.compare_digest(mac, _mac(old, body))
    return ok


def _bind_body(token: str, trace_id: int, span_id: int) -> str:
    # "bind." first: a bind mac can never be mistaken for a token mac, whose
    # body starts with digits.
    return f"bind.{token}.{trace_id:032x}{span_id:016x}"


def make_bind(key: bytes, token: str, trace_id: int, span_id: int) -> str:
    """The mac that binds ``token`` to the trace and span of the inbound
    traceparent of the request whose response carried it: HMAC-SHA256 over
    ``bind.<token>.<trace id><span id>``, truncated to 128 bits like the
    token's own mac. Stateless: any replica with the key can check it."""
    return _mac(key, _bind_body(token, trace_id, span_id))


def verify_bind(
    key: bytes,
    bind: str,
    token: str,
    trace_id: int,
    span_id: int,
    *,
    previous: tuple[bytes, ...] = (),
) -> bool:
    """True when ``bind`` is :func:`make_bind`'s mac for this token and trace
    under ``key`` or a previous key. Never raises on hostile strings."""
    if len(bind) > 64 or not bind.isascii() or len(token) > MAX_TOKEN_CHARS:
        return False
    if not token.isascii():
        return False
    return _mac_ok(key, previous, _bind_body(token, trace_id, span_id), bind)


# -- the verdict -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the gateway concludes about one request's timing claims.

    ``uplink_ms`` and the other figures are None where they must not be
    exported. ``raw_ms`` (t1 − ts) contains the client's clock offset: it is
    for the debug log only, never for a span.
    """

    status: Status
    reason: str
    trust: Trust = "client_only"
    uplink_ms: float | None = None
    uplink_error_ms: float | None = None
    upper_bound_ms: float | None = None
    rtt_ms: float | None = None
    pre_request_ms: float | None = None
    sync_delay_ms: float | None = None
    sync_age_ms: float | None = None
    offset_bucket: str | None = None
    raw_ms: float | None = None
    client_ts_ms: float | None = None
    chain_uplink_ms: float | None = None
    chain_error_ms: float | None = None

    def token_fields(self) -> tuple[float | None, float | None]:
        """(U, E) for the response's token, which seed the next request's
        drift check: the uplink interval, or None when none was estimated."""
        return self.chain_uplink_ms, self.chain_error_ms


def chain_interval(
    estimate_ms: float, error_ms: float, upper_ms: float | None
) -> tuple[float, float]:
    """The uplink interval a token carries, as (centre, half-width).

    The estimate ± error, intersected with what physics allows, [0, min(ub,
    60 s)]: a client-influenced estimate can never widen the next drift check
    beyond the physical bound. An implausible estimate outside that range
    falls back to the physical interval itself, so an implausible request
    still seeds a check (a liar cannot escape every other request).
    """
    high_bound = min(upper_ms, MAX_UPLINK_MS) if upper_ms is not None else MAX_UPLINK_MS
    low = max(estimate_ms - error_ms, 0.0)
    high = min(estimate_ms + error_ms, high_bound)
    if low > high:
        low, high = 0.0, max(high_bound, 0.0)
    return (low + high) / 2, (high - low) / 2


ABSENT: Final = Verdict("absent", "no_timestamp")
RATE_LIMITED: Final = Verdict("rate_limited", "rate_limit")


def offset_bucket(offset_ms: float) -> str:
    """Coarse |offset| for spans: the exact offset is a tracking vector."""
    magnitude = abs(offset_ms)
    for limit, label in OFFSET_BUCKETS:
        if magnitude < limit:
            return label
    return ">=1h"


def uplink_error(clock: ClientClock) -> float:
    """error = d/2 + 1 ms + 600 ppm · age: half the sync sample's round trip
    (the most path asymmetry can move its offset), rounding, and what an
    honest clock can drift since the sample (the drift model above)."""
    return clock.delay_ms / 2 + ROUNDING_MS + HONEST_RATE * clock.age_ms


def slew_allowance(elapsed_ms: float) -> float:
    """What a chrony slew may have moved a clock by over ``elapsed_ms``."""
    return min(SLEW_RATE * max(elapsed_ms, 0.0), SLEW_MAX_MS)


DriftCheck = Literal["ok", "corrected", "broken"]


def drift_check(token: Token, t1_ms: float, ts_ms: float) -> DriftCheck:
    """The stateless drift rule.

    The token's request was sent at TS (client clock), received at T1, with
    uplink U ± E, and its response left at T2; the client held that response
    before it sent this request (ts, received at t1). Physics bounds the
    client's elapsed time, with r = 1 ms + 600 ppm · (t1 − T1) for an honest
    rate (the drift model):

        (U − E) + (T2 − T1) − r  ≤  ts − TS  ≤  (t1 − T1) + (U + E) + r

    ``ok`` inside; ``corrected`` outside by no more than one chrony slew can
    remove (``SLEW_MAX_MS``: the slew may have started before the token's
    own request, and skewed that request's U as well, so its rate alone does
    not bound what shows here); ``broken`` beyond. No client-sent offset appears, so no claim
    can widen the bounds. A token without (T1, TS, U, E) cannot be checked
    and passes.
    """
    if token.t1_ms is None or token.ts_ms is None:
        return "ok"
    if token.uplink_ms is None or token.error_ms is None:
        return "ok"
    server_elapsed = max(t1_ms - token.t1_ms, 0.0)
    r = ROUNDING_MS + HONEST_RATE * server_elapsed
    client_elapsed = ts_ms - token.ts_ms
    low = (token.uplink_ms - token.error_ms) + (token.t2_ms - token.t1_ms) - r
    high = server_elapsed + (token.uplink_ms + token.error_ms) + r
    outside = max(low - client_elapsed, client_elapsed - high, 0.0)
    if outside == 0.0:
        return "ok"
    return "corrected" if outside <= SLEW_MAX_MS else "broken"


def _bound_failure(estimate: float, margin: float, upper: float | None) -> str | None:
    """Which physical bound an estimate breaks, with ``margin`` of error."""
    if estimate < -margin:
        # It claims to have sent after we received it.
        return "negative_uplink"
    if upper is not None and estimate > upper + margin:
        # It claims to have sent before it held the token it sent.
        return "before_token"
    if estimate > MAX_UPLINK_MS + margin:
        return "uplink_too_long"
    return None


def evaluate(
    *,
    t1_ms: float,
    timestamp: list[str],
    clock: list[str],
    prev: list[str],
    key: bytes,
    previous_keys: tuple[bytes, ...] = (),
) -> Verdict:
    """The verdict for one request (ARCHITECTURE.md §6); never raises.

    ``timestamp``, ``clock`` and ``prev`` are the header's field values as
    received (empty when absent).
    """
    if not timestamp:
        return ABSENT
    try:
        ts = parse_timestamp(timestamp)
        client_clock = parse_clock(clock) if clock else None
        client_prev = parse_prev(prev) if prev else None
    except HeaderError as exc:
        return Verdict("invalid", exc.reason)
    raw = t1_ms - ts
    if not math.isfinite(raw) or abs(raw) > MAX_RAW_OFFSET_MS:
        return Verdict("invalid", "timestamp_range", raw_ms=raw, client_ts_ms=ts)
    rtt = client_prev.rtt_ms if client_prev else None
    pre = client_prev.pre_ms if client_prev else None

    if client_clock is None:
        # Hypothesis B: only the client's clock, never checked against ours.
        if 0 <= raw <= MAX_UPLINK_MS:
            return Verdict(
                "unsynced",
                "no_clock_sync",
                uplink_ms=raw,
                rtt_ms=rtt,
                pre_request_ms=pre,
                offset_bucket=offset_bucket(raw),
                raw_ms=raw,
                client_ts_ms=ts,
            )
        return Verdict(
            "unsynced",
            "clock_offset",
            rtt_ms=rtt,
            pre_request_ms=pre,
            offset_bucket=offset_bucket(raw),
            raw_ms=raw,
            client_ts_ms=ts,
        )

    estimate = t1_ms - (ts + client_clock.off_ms)
    error = uplink_error(client_clock)
    token: Token | None = None
    trust_reason = "token_missing"
    if client_clock.token is not None:
        token, trust_reason = verify_token(key, client_clock.token, t1_ms, previous=previous_keys)
    trust: Trust = "server_bounded" if token is not None else "client_only"
    upper = t1_ms - token.t2_ms if token is not None else None
    chain_uplink, chain_error = chain_interval(estimate, error, upper)
    bucket = offset_bucket(client_clock.off_ms)
    drift: DriftCheck = drift_check(token, t1_ms, ts) if token is not None else "ok"
    # Each outcome is one Verdict, built once (dataclasses.replace on a
    # shared base cost more than the checks themselves).
    if drift == "broken":
        # Checked first: it rests on authenticated times alone, and when the
        # client's clock itself is off (fast, frozen, jumped) the bound
        # failures below are only its symptoms.
        status: Status = "implausible"
        reason = "clock_rate"
        uplink = uplink_error_ms = None
    elif (failure := _bound_failure(estimate, error, upper)) is None and drift == "ok":
        # The estimate stands; a negative one within the error is a zero uplink.
        status = "ok"
        reason = "bounded" if token is not None else trust_reason
        uplink, uplink_error_ms = max(estimate, 0.0), error
    else:
        # Outside what a quartz or ntpd clock explains: a chrony slew since
        # the sample may have moved the client's offset by up to the slew
        # allowance.
        slewed_error = error + slew_allowance(client_clock.age_ms)
        failure = _bound_failure(estimate, slewed_error, upper)
        if failure is not None:
            status, reason = "implausible", failure
            uplink = uplink_error_ms = None
        else:
            # Honest slewing and a lie cannot be told apart within one
            # exchange: not an accusation, but no server-bounded figure
            # either. The token's interval keeps the unslewed error: a slew
            # that is real shows again in the next check (as a correction,
            # never as a lie, since the rule forgives up to a whole slew),
            # and a lie cannot launder itself into a wide interval that lets
            # the next request pass at full trust.
            high = min(upper, MAX_UPLINK_MS) if upper is not None else MAX_UPLINK_MS
            status, reason, trust = "ok", "clock_corrected", "client_only"
            uplink, uplink_error_ms = min(max(estimate, 0.0), high), slewed_error
    return Verdict(
        status,
        reason,
        trust=trust,
        uplink_ms=uplink,
        uplink_error_ms=uplink_error_ms,
        upper_bound_ms=upper,
        rtt_ms=rtt,
        pre_request_ms=pre,
        sync_delay_ms=client_clock.delay_ms,
        sync_age_ms=client_clock.age_ms,
        offset_bucket=bucket,
        raw_ms=raw,
        client_ts_ms=ts,
        chain_uplink_ms=chain_uplink,
        chain_error_ms=chain_error,
    )


# -- per-client rate limit -------------------------------------------------------


class RateLimiter:
    """Token buckets per client key, in an LRU of bounded size.

    ``allow(key, now_s)`` spends one token; the clock is passed in. Memory is
    capped at ``max_clients`` entries: the least recently seen client is
    forgotten first (and starts again with a full bucket, which only ever
    errs towards serving a timing report).
    """

    __slots__ = ("_buckets", "burst", "max_clients", "per_s")

    def __init__(self, per_s: float, burst: int, max_clients: int = RATE_LIMIT_MAX_CLIENTS) -> None:
        self.per_s = per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now_s: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now_s))
        tokens = min(self.burst, tokens + (now_s - last) * self.per_s)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now_s)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return allowed
