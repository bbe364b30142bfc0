"""Browser timings from the snippet's beacon → browser CLIENT spans.

What it is for: ``POST /__gateway/beacon`` (DESIGN §6). The snippet sends,
per finished request, its traceparent, method, URL, Resource Timing marks (in
client epoch ms) and the clock token from that request's own response. Each
entry becomes a CLIENT span in a resource of its own (``service.name`` =
``browser``) with the span id the browser put in its traceparent, so it is the
parent of the gateway's SERVER span. Stateless: the token carries everything
needed, so any gateway process or replica can take any beacon.

Where the span sits in time: it starts at T1 − U on the server's clock (T1 and
U are authenticated server values from the token, so the browser span starts
before the gateway span by construction) and its other marks are converted
with the offset that anchor implies. A token without U: the snippet's own
offset, the start clamped to T1 at the latest.

Not for: accepting anything as truth. Entries without a valid token, with
marks out of order or otherwise malformed are dropped and counted.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway import timing
from gateway.http import method_attribute, span_name

#: sendBeacon bodies are capped at 64 KiB by browsers anyway (Fetch standard,
#: keepalive quota); anything larger is not from our snippet.
MAX_BEACON_BYTES: Final = 64 * 1024
#: The snippet flushes at 20 entries; leave room, refuse floods.
MAX_ENTRIES: Final = 50
MAX_URL_CHARS: Final = 2048
#: A fetch that took longer than this is not a network timing worth a span.
MAX_DURATION_MS: Final = 10 * 60 * 1000.0
#: Resource Timing marks in the order a fetch passes them (W3C Resource
#: Timing, "Resource Timing attributes"); a mark of 0 is unavailable.
MARKS: Final = (
    "startTime",
    "fetchStart",
    "domainLookupStart",
    "domainLookupEnd",
    "connectStart",
    "connectEnd",
    "requestStart",
    "responseStart",
    "responseEnd",
)

_W3C: Final = TraceContextTextMapPropagator()
_SCOPE: Final = InstrumentationScope("gateway.beacon")


class BeaconError(ValueError):
    """The beacon as a whole is unusable (not JSON, wrong shape)."""


@dataclass(frozen=True, slots=True)
class BeaconResult:
    accepted: int
    dropped: Counter[str]


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _span_context(traceparent: Any) -> SpanContext | None:
    if not isinstance(traceparent, str) or len(traceparent) > 128:
        return None
    ctx = _W3C.extract({"traceparent": traceparent})
    span_context = get_current_span(ctx).get_span_context()
    return span_context if span_context.is_valid else None


def build_span(
    entry: Any, *, key: bytes, now_ms: float, resource: Resource
) -> tuple[ReadableSpan | None, str]:
    """``(span, "")`` for a valid entry, else ``(None, reason)``."""
    if not isinstance(entry, dict):
        return None, "entry_shape"
    parent = _span_context(entry.get("tp"))
    if parent is None:
        return None, "traceparent"
    method = entry.get("m")
    url = entry.get("u")
    if not isinstance(method, str) or not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        return None, "entry_shape"
    if not url.startswith(("http://", "https://")):
        return None, "url"
    tok = entry.get("tok")
    if not isinstance(tok, str):
        return None, "token_missing"
    token, reason = timing.verify_token(key, tok, now_ms)
    if token is None:
        return None, reason
    if token.t1_ms is None:
        return None, "token_without_request"
    marks_in = entry.get("marks")
    if not isinstance(marks_in, dict):
        return None, "marks"
    marks: dict[str, float] = {}
    previous = -math.inf
    for name in MARKS:
        value = _finite(marks_in.get(name, 0))
        if value is None or value < 0:
            return None, "marks"
        if value == 0:
            continue  # unavailable (e.g. no connection set-up on a reused one)
        if value < previous:
            return None, "marks_order"
        previous = value
        marks[name] = value
    start_c = marks.get("startTime")
    end_c = marks.get("responseEnd")
    if start_c is None or end_c is None or end_c - start_c > MAX_DURATION_MS:
        return None, "marks"

    if token.uplink_ms is not None and token.ts_ms is not None:
        # The server's clock at the request's fetch() is T1 − U; the client
        # read TS there, so every client mark m maps to m + (T1 − U − TS).
        start_server = float(token.t1_ms - token.uplink_ms)
        offset = start_server - token.ts_ms
    else:
        off = _finite(entry.get("off"))
        if off is None or abs(off) > timing.MAX_RAW_OFFSET_MS:
            return None, "offset"
        offset = off
        # Never after the gateway received it: the browser span must start
        # before its child, whatever the snippet's offset says.
        start_server = min(start_c + offset, float(token.t1_ms))
    end_server = max(end_c + offset, start_server)

    known = method_attribute(method.upper())
    events = tuple(Event(name, timestamp=_ns(value + offset)) for name, value in marks.items())
    span = ReadableSpan(
        name=span_name(known),
        context=SpanContext(
            parent.trace_id,
            parent.span_id,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        ),
        parent=None,
        resource=resource,
        attributes={
            "http.request.method": known,
            "url.full": url,
            "latency.source": "beacon",
        },
        events=events,
        kind=SpanKind.CLIENT,
        start_time=_ns(start_server),
        end_time=_ns(end_server),
        instrumentation_scope=_SCOPE,
    )
    return span, ""


def _ns(ms: float) -> int:
    return int(ms * 1_000_000)


def browser_resource(service_name: str) -> Resource:
    return Resource.create({SERVICE_NAME: service_name})


def ingest(
    payload: Any,
    *,
    key: bytes,
    now_ms: float,
    resource: Resource,
    processor: SpanProcessor | None,
) -> BeaconResult:
    """Validate every entry and hand the valid ones to the span processor."""
    if not isinstance(payload, dict) or not isinstance(payload.get("e"), list):
        raise BeaconError('expected {"v": 1, "e": [entries]}')
    entries = payload["e"]
    dropped: Counter[str] = Counter()
    if len(entries) > MAX_ENTRIES:
        dropped["too_many_entries"] += len(entries) - MAX_ENTRIES
        entries = entries[:MAX_ENTRIES]
    accepted = 0
    for entry in entries:
        span, reason = build_span(entry, key=key, now_ms=now_ms, resource=resource)
        if span is None:
            dropped[reason] += 1
            continue
        if processor is not None:
            processor.on_end(span)
        accepted += 1
    return BeaconResult(accepted, dropped)
