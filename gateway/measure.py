"""Wiring between a request and the pure latency maths of ``timing.py``.

What it is for: reading the ``X-Client-*`` headers off a request, applying the
per-client rate limit, minting the ``X-Gateway-Clock`` header for the
response (bound to the request's inbound trace), and writing a verdict onto
the SERVER span as the ``latency.*`` attributes (README, "How the latency is
measured").

Not for: the maths itself (``timing.py``), which stays free of I/O and clocks.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any, Final

from multidict import CIMultiDictProxy
from opentelemetry.trace import Span, SpanContext, get_current_span

from gateway import timing
from gateway.config import GatewayConfig
from gateway.context import InboundContext
from latency_common import attributes as attr

log = logging.getLogger("gateway.timing")

_NO_VALUES: Final[list[str]] = []


class Measurement:
    """Per-process measurement state: the clock key and the rate limiter."""

    def __init__(self, config: GatewayConfig) -> None:
        self._key = config.clock_key
        self._previous = config.clock_previous_keys
        self.limiter = timing.RateLimiter(config.timing_rate.per_s, config.timing_rate.burst)
        # Token nonces only have to differ, not to be secret (the HMAC key is
        # the secret): a generator seeded once from the OS, rather than an
        # os.urandom() system call per response, which also gives up the GIL
        # and must then win it back from the span export thread (measured:
        # 8 % of a loaded worker's samples, benchmarks/RESULTS.md).
        self._nonces = random.Random(os.urandom(32))  # noqa: S311 (uniqueness, not secrecy)

    def evaluate(
        self, headers: CIMultiDictProxy[str], client_key: str, t1_ms: float
    ) -> timing.Verdict:
        """The verdict for a request; ``absent`` when it sent no timestamp."""
        stamp = headers.getall("x-client-timestamp", _NO_VALUES)
        if not stamp:
            return timing.ABSENT
        if not self.limiter.allow(client_key, time.monotonic()):
            return timing.RATE_LIMITED
        verdict = timing.evaluate(
            t1_ms=t1_ms,
            timestamp=list(stamp),
            clock=list(headers.getall("x-client-clock", _NO_VALUES)),
            prev=list(headers.getall("x-client-prev", _NO_VALUES)),
            key=self._key,
            previous_keys=self._previous,
        )
        if verdict.raw_ms is not None and log.isEnabledFor(logging.DEBUG):
            # The raw difference holds the client's clock offset: debug log
            # only, never a span.
            log.debug("timing %s/%s raw=%.3f ms", verdict.status, verdict.reason, verdict.raw_ms)
        return verdict

    def clock_header(
        self,
        t1_ms: float,
        t2_ms: float,
        verdict: timing.Verdict | None,
        inbound: SpanContext | None = None,
    ) -> str:
        """``X-Gateway-Clock: t1=…, t2=…, tok="…"`` for a response, plus
        ``bind="…"`` when the request came with a valid inbound span context:
        the mac a beacon entry must show to attach a browser span to that
        trace (none on ``/__gateway/clock`` answers, so their tokens add
        nothing to a beacon)."""
        uplink, error = verdict.token_fields() if verdict is not None else (None, None)
        token = timing.make_token(
            self._key,
            t2_ms=t2_ms,
            t1_ms=t1_ms,
            ts_ms=verdict.client_ts_ms if verdict is not None else None,
            uplink_ms=uplink,
            error_ms=error,
            nonce=self._nonces.getrandbits(64).to_bytes(8, "big"),
        )
        header = f't1={t1_ms:.3f}, t2={t2_ms:.3f}, tok="{token}"'
        if inbound is not None:
            bind = timing.make_bind(self._key, token, inbound.trace_id, inbound.span_id)
            header += f', bind="{bind}"'
        return header


def inbound_span_context(inbound: InboundContext) -> SpanContext | None:
    """The span context the client sent (its traceparent's trace and span
    id), whatever the trust mode made of it: the parent in ``continue``
    mode, the link in ``link`` mode, none in ``restart`` mode."""
    if inbound.links:
        return inbound.links[0].context
    span_context = get_current_span(inbound.parent).get_span_context()
    return span_context if span_context.is_valid else None


def server_timing(verdict: timing.Verdict) -> str | None:
    """``uplink;dur=<ms>;desc="<status>"`` when the request carried timing
    headers, so a page can show what the gateway measured."""
    if verdict is timing.ABSENT:
        return None
    if verdict.uplink_ms is None:
        return f'uplink;desc="{verdict.status}"'
    return f'uplink;dur={verdict.uplink_ms:.3f};desc="{verdict.status}"'


_ATTRIBUTES: Final = (
    (attr.UPLINK_MS, "uplink_ms"),
    (attr.UPLINK_ERROR_MS, "uplink_error_ms"),
    (attr.UPLINK_UPPER_BOUND_MS, "upper_bound_ms"),
    (attr.RTT_MS, "rtt_ms"),
    (attr.PRE_REQUEST_MS, "pre_request_ms"),
    (attr.CLOCK_OFFSET_BUCKET, "offset_bucket"),
    (attr.SYNC_DELAY_MS, "sync_delay_ms"),
    (attr.SYNC_AGE_MS, "sync_age_ms"),
)


def record(span: Span, verdict: timing.Verdict) -> None:
    """The ``latency.*`` attributes (never the raw offset)."""
    if not span.is_recording():
        return  # OTEL_SDK_DISABLED=true or sampled out: not worth building them
    attributes: dict[str, Any] = {
        attr.STATUS: verdict.status,
        attr.REASON: verdict.reason,
    }
    if verdict.status not in ("absent", "rate_limited", "invalid"):
        attributes[attr.TRUST] = verdict.trust
        for key, field in _ATTRIBUTES:
            value = getattr(verdict, field)
            if value is not None:
                attributes[key] = round(value, 3) if isinstance(value, float) else value
    span.set_attributes(attributes)
