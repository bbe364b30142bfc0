"""Browser timings from the snippet's beacon → browser CLIENT spans.

What it is for: ``POST /__gateway/beacon`` (README, "Add it to your
frontend"). The snippet sends, per finished request, its traceparent, method,
URL, Resource Timing marks (in client epoch ms), the clock token from that
request's own response and the bind mac that came with it. Each entry becomes
a CLIENT span in a resource of its own (``service.name`` = ``browser``) with
the span id the browser put in its traceparent, so it is the parent of the
gateway's SERVER span. Stateless: the token and bind carry everything needed,
so any gateway process or replica with the key can take any beacon.

Where the span sits in time: it starts at T1 − U on the server's clock (T1 and
U are authenticated server values from the token, so the browser span starts
before the gateway span by construction) and its other marks are converted
with the offset that anchor implies. A token without U: the snippet's own
offset, the start clamped to T1 at the latest.

Not for: accepting anything as truth. Every byte is the browser's, so every
value is checked before it becomes a span: an entry is dropped, with a
counted reason, unless its token and bind verify for its own traceparent,
its numbers are finite and in range, its strings bounded, and its span
encloses the gateway's (T1..T2, within the token's error) and ends before
the beacon arrived. An out-of-range timestamp would not only be a lie: the
OTLP encoder refuses it, and with it the whole export batch.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Final

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway import timing
from gateway.http import method_attribute, span_name
from latency_common import attributes as attr
from latency_common.redact import QueryRedactor

#: sendBeacon bodies are capped at 64 KiB by browsers anyway (Fetch standard,
#: keepalive quota); anything larger is not from our snippet.
MAX_BEACON_BYTES: Final = 64 * 1024
#: The snippet flushes at 20 entries; leave room, refuse floods.
MAX_ENTRIES: Final = 50
MAX_URL_CHARS: Final = 2048
#: Longer than any method a browser sends; RFC 9110 sets no limit.
MAX_METHOD_CHARS: Final = 32
#: A browser span longer than this is not a network timing worth a span (the
#: same bound as the longest uplink the gateway believes).
MAX_DURATION_MS: Final = timing.MAX_UPLINK_MS
#: Marks are client epoch ms: beyond this (year 2286) no clock, honest or
#: skewed by a day, can be; the bound also keeps ints of any size and their
#: float() OverflowError out.
MAX_MARK_MS: Final = 1e13
#: The token's fields are whole ms (T1, TS, U to nearest, T2 down), the
#: marks have 3 decimals: 3 ms covers every rounding that adds up.
ROUNDING_MS: Final = 3.0
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
#: RFC 9110 §9.1: a method is a token; §5.6.2: token = 1*tchar.
_METHOD_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}")

_W3C: Final = TraceContextTextMapPropagator()
_SCOPE: Final = InstrumentationScope("gateway.beacon")


class BeaconError(ValueError):
    """The beacon as a whole is unusable (not JSON, wrong shape)."""


@dataclass(frozen=True, slots=True)
class BeaconResult:
    accepted: int
    dropped: Counter[str]


def _number(value: Any, limit: float) -> float | None:
    """A JSON number with |value| ≤ limit, else None: bools, strings, NaN,
    infinities and ints of any size are refused before ``float()`` sees them."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and abs(value) > limit:
        return None  # before float(): 10**400 would raise OverflowError
    number = float(value)
    return number if math.isfinite(number) and abs(number) <= limit else None


def _span_context(traceparent: Any) -> SpanContext | None:
    if not isinstance(traceparent, str) or len(traceparent) > 128:
        return None
    ctx = _W3C.extract({"traceparent": traceparent})
    span_context = get_current_span(ctx).get_span_context()
    return span_context if span_context.is_valid else None


@dataclass(frozen=True, slots=True)
class Keys:
    """The clock key and the previous keys still accepted (a rotation)."""

    key: bytes
    previous: tuple[bytes, ...] = ()


def build_span(
    entry: Any,
    *,
    keys: Keys,
    now_ms: float,
    resource: Resource,
    redactor: QueryRedactor,
) -> tuple[ReadableSpan | None, str]:
    """``(span, "")`` for a valid entry, else ``(None, reason)``."""
    if not isinstance(entry, dict):
        return None, "entry_shape"
    parent = _span_context(entry.get("tp"))
    if parent is None:
        return None, "traceparent"
    method = entry.get("m")
    if not isinstance(method, str) or not _METHOD_RE.fullmatch(method):
        return None, "method"
    url = entry.get("u")
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        return None, "url"
    if not url.startswith(("http://", "https://")):
        return None, "url"
    tok = entry.get("tok")
    if not isinstance(tok, str):
        return None, "token_missing"
    token, reason = timing.verify_token(keys.key, tok, now_ms, previous=keys.previous)
    if token is None:
        return None, reason
    bind = entry.get("b")
    if not isinstance(bind, str):
        # A token from /__gateway/clock, or from a request that sent no
        # traceparent: it proves nothing about this entry's trace.
        return None, "bind_missing"
    if not timing.verify_bind(
        keys.key, bind, tok, parent.trace_id, parent.span_id, previous=keys.previous
    ):
        # A token fetched for another trace: attaching browser spans to a
        # trace needs the bind the gateway minted for that trace's request.
        return None, "bind_invalid"
    if token.t1_ms is None:
        return None, "token_without_request"
    marks_in = entry.get("marks")
    if not isinstance(marks_in, dict):
        return None, "marks"
    marks: dict[str, float] = {}
    previous_mark = -math.inf
    for name in MARKS:
        value = _number(marks_in.get(name, 0), MAX_MARK_MS)
        if value is None or value < 0:
            return None, "marks"
        if value == 0:
            continue  # unavailable (e.g. no connection set-up on a reused one)
        if value < previous_mark:
            return None, "marks_order"
        previous_mark = value
        marks[name] = value
    start_c = marks.get("startTime")
    end_c = marks.get("responseEnd")
    if start_c is None or end_c is None or end_c - start_c > MAX_DURATION_MS:
        return None, "marks"

    t1 = float(token.t1_ms)
    if token.uplink_ms is not None and token.ts_ms is not None:
        # The server's clock at the request's fetch() is T1 − U; the client
        # read TS there, so every client mark m maps to m + (T1 − U − TS).
        start_server = t1 - token.uplink_ms
        offset = start_server - token.ts_ms
    else:
        off = _number(entry.get("off"), timing.MAX_RAW_OFFSET_MS)
        if off is None:
            return None, "offset"
        offset = off
        # Never after the gateway received it: the browser span must start
        # before its child, whatever the snippet's offset says.
        start_server = min(start_c + offset, t1)
    end_server = max(end_c + offset, start_server)
    # The window the token's authenticated times allow: the browser's fetch
    # encloses the gateway's T1..T2, it ended before its beacon arrived, and
    # it lasted at most MAX_DURATION_MS; each within the token's own error E
    # (the uncertainty of the offset just used) plus rounding.
    slack = (token.error_ms or 0) + ROUNDING_MS
    if start_server > t1 + slack or end_server < token.t2_ms - slack:
        return None, "window"
    if end_server > now_ms + slack or end_server - start_server > MAX_DURATION_MS:
        return None, "window"

    known = method_attribute(method.upper())
    events = tuple(
        Event(name, timestamp=_ns(min(max(value + offset, start_server), end_server)))
        for name, value in marks.items()
    )
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
            "url.full": redactor.url(url),
            attr.SOURCE: "beacon",
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
    keys: Keys,
    now_ms: float,
    resource: Resource,
    processor: SpanProcessor | None,
    redactor: QueryRedactor,
    sampler: Sampler | None = None,
) -> BeaconResult:
    """Validate every entry and hand the valid ones to the span processor.

    With a ``sampler`` (the gateway's own), a browser span is kept only when
    the gateway's SERVER span for the same request was sampled: the same
    sampler asked the same question (its parent is the browser's span, as
    the gateway saw it in the traceparent), so with ``traceidratio`` or a
    parent-based sampler no browser span is exported for a trace whose
    gateway span was dropped, and none is left without its child."""
    if not isinstance(payload, dict) or not isinstance(payload.get("e"), list):
        raise BeaconError('expected {"v": 1, "e": [entries]}')
    entries = payload["e"]
    dropped: Counter[str] = Counter()
    if len(entries) > MAX_ENTRIES:
        dropped["too_many_entries"] += len(entries) - MAX_ENTRIES
        entries = entries[:MAX_ENTRIES]
    accepted = 0
    seen: set[str] = set()
    for entry in entries:
        tok = entry.get("tok") if isinstance(entry, dict) else None
        if isinstance(tok, str):
            # One request, one token, one browser span: a repeat would
            # export the same span id twice.
            if tok in seen:
                dropped["duplicate_token"] += 1
                continue
            seen.add(tok)
        span, reason = build_span(
            entry, keys=keys, now_ms=now_ms, resource=resource, redactor=redactor
        )
        if span is None:
            dropped[reason] += 1
            continue
        if sampler is not None and not _gateway_sampled(sampler, span, entry):
            dropped["not_sampled"] += 1
            continue
        if processor is not None:
            processor.on_end(span)
        accepted += 1
    return BeaconResult(accepted, dropped)


def _gateway_sampled(sampler: Sampler, span: ReadableSpan, entry: dict[str, Any]) -> bool:
    """The decision the gateway's sampler made for this request's SERVER span.

    The gateway started that span under the browser's context (continue
    mode): the traceparent the entry names, as a remote parent with the
    flags the browser sent. Samplers decide on the trace id (ratio) or that
    parent (parent-based), so asking again gives the same answer. A sampler
    that looks at attributes would need the request's: none of the SDK's do.
    """
    context = span.context
    parent = _span_context(entry.get("tp"))
    if context is None or parent is None:
        return False
    remote = SpanContext(
        parent.trace_id, parent.span_id, is_remote=True, trace_flags=parent.trace_flags
    )
    result = sampler.should_sample(
        set_span_in_context(NonRecordingSpan(remote)),
        context.trace_id,
        span.name,
        SpanKind.SERVER,
    )
    return result.decision == Decision.RECORD_AND_SAMPLE
