"""The wiring of ``gateway/measure.py``, pure: headers in, verdict, the
``X-Gateway-Clock`` token and the SERVER span's ``latency.*`` attributes out.
Over real sockets the same path runs in test_latency.py; these are the exact
cases ``make mutate`` found unguarded, fast enough to run per mutant."""

from __future__ import annotations

import base64
import logging

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.sdk.trace import TracerProvider

from gateway import measure, timing
from gateway.config import GatewayConfig, TimingRate

KEY = b"k" * 32
OLD_KEY = b"o" * 32
T = 1_764_000_000_000.0
SKEW = 3_600_000.0


def _measurement(per_s: float = 20.0, burst: int = 100) -> measure.Measurement:
    config = GatewayConfig(
        clock_key=KEY, clock_previous_keys=(OLD_KEY,), timing_rate=TimingRate(per_s, burst)
    )
    return measure.Measurement(config)


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def _token(key: bytes) -> str:
    return timing.make_token(
        key, t2_ms=T - 500, t1_ms=None, ts_ms=None, uplink_ms=None, error_ms=None, nonce=b"n" * 8
    )


def _timed(tok: str | None = None, prev: str | None = None) -> CIMultiDictProxy[str]:
    clock = f"off={SKEW:.3f}, d=2.000, age=0.000" + (f', tok="{tok}"' if tok else "")
    pairs = [("X-Client-Timestamp", f"{T - SKEW - 25:.3f}"), ("X-Client-Clock", clock)]
    if prev is not None:
        pairs.append(("X-Client-Prev", prev))
    return _headers(*pairs)


def test_every_header_reaches_the_verdict() -> None:
    verdict = _measurement().evaluate(_timed(_token(OLD_KEY), "rtt=51.5, pre=3"), "c", T)
    # A token under the previous key still bounds the uplink (a key rotation).
    assert (verdict.status, verdict.reason, verdict.trust) == ("ok", "bounded", "server_bounded")
    assert (verdict.rtt_ms, verdict.pre_request_ms) == (51.5, 3.0)


def test_the_rate_limit_is_per_client() -> None:
    m = _measurement(per_s=0.001, burst=1)
    assert m.evaluate(_timed(), "10.0.0.1", T).status == "ok"
    assert m.evaluate(_timed(), "10.0.0.1", T) is timing.RATE_LIMITED
    assert m.evaluate(_timed(), "10.0.0.2", T).status == "ok"


def test_the_raw_offset_goes_to_the_debug_log_only(caplog: pytest.LogCaptureFixture) -> None:
    m = _measurement()
    with caplog.at_level(logging.DEBUG, logger="gateway.timing"):
        m.evaluate(_timed(), "c", T)
        m.evaluate(_headers(("X-Client-Timestamp", "abc")), "c", T)  # no raw figure
    assert [r.getMessage() for r in caplog.records] == [
        "timing ok/token_missing raw=3600025.000 ms"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.timing"):
        m.evaluate(_timed(), "c", T)
    assert caplog.records == []


def test_the_token_carries_the_uplink_interval_and_an_8_byte_nonce() -> None:
    m = _measurement()
    verdict = m.evaluate(_timed(), "c", T)
    header = m.clock_header(T, T + 2, verdict)
    tok = header.split('tok="')[1].split('"')[0]
    token, reason = timing.verify_token(KEY, tok, T + 2)
    assert reason == ""
    assert token == timing.Token(
        t2_ms=int(T) + 2, t1_ms=int(T), ts_ms=int(T - SKEW - 25), uplink_ms=25, error_ms=2
    )
    nonce = tok.split(".")[5]
    assert len(base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))) == 8


def _attributes(verdict: timing.Verdict) -> dict[str, object]:
    span = TracerProvider().get_tracer("t").start_span("s")
    measure.record(span, verdict)
    span.end()
    return dict(span.attributes or {})  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", ["absent", "rate_limited", "invalid"])
def test_verdicts_without_figures_record_only_status_and_reason(status: str) -> None:
    verdict = timing.Verdict(status, "why", uplink_ms=1.0, rtt_ms=2.0)  # type: ignore[arg-type]
    assert _attributes(verdict) == {"latency.status": status, "latency.reason": "why"}


def test_figures_are_recorded_to_the_microsecond() -> None:
    verdict = timing.Verdict(
        "ok", "bounded", trust="server_bounded", uplink_ms=25.12345, offset_bucket="<1s"
    )
    assert _attributes(verdict) == {
        "latency.status": "ok",
        "latency.reason": "bounded",
        "latency.trust": "server_bounded",
        "latency.uplink_ms": 25.123,
        "latency.clock_offset_bucket": "<1s",
    }
