"""Trace-context trust policy on top of the OpenTelemetry propagators.

What it is for: deciding which trace the gateway's SERVER span joins, from
the headers a client sent, and writing exactly one fresh context for the
upstream. ``traceparent`` and B3 are parsed by the OTel propagators (W3C
``tracecontext`` first, then B3 single and multi); ``tracestate`` by
``latency_common.tracestate`` (W3C Trace Context Level 2 rules, which OTel's Level 1
key grammar does not follow). This module adds the gateway's policy (README,
"Trace context"):

* size limits before any parser sees a header;
* at most one inbound context, chosen in a fixed order;
* a duplicated ``traceparent`` is invalid: two field lines combine into one
  value that no longer parses (RFC 9110 §5.3), so the trace restarts (the W3C
  suite's ``test_traceparent_duplicated``);
* ``tracestate`` parsed only once ``traceparent`` was (W3C Level 2 §3.3),
  kept in ``continue`` mode only, trimmed as §3.3.3.1 (tracestate limits)
  says; a request without one never reaches its parser;
* the inbound ``sampled`` flag decides nothing on its own: the gateway's
  sampler does (``always_on`` unless ``OTEL_TRACES_SAMPLER`` says otherwise);
  the Level 2 ``random`` flag (§3.2.2.5.2) is the SDK's: carried from the
  parent on ``continue``, set for a trace id the SDK's random id generator
  made on ``link`` and ``restart``.

Malformed input is a verdict, never an exception (as in the OTel propagators:
a spec violation returns the incoming context unchanged).

Not for: creating spans (``app.py``) or forwarding headers (``proxy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config import TrustMode
from latency_common import tracestate

#: Inbound propagation headers, never forwarded: the gateway injects its own.
PROPAGATION_HEADERS: Final = frozenset(
    {
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
    }
)

#: A version-00 traceparent is exactly 55 characters; later versions may
#: append fields (W3C §3.2.4, "versioning of traceparent"), so leave room,
#: but no parser ever sees a header larger than this.
MAX_TRACEPARENT_CHARS: Final = 512
#: Combined tracestate field lines larger than this cannot be a valid list
#: written as W3C Level 2 §3.3.2 asks (32 members at their maximum, single
#: spaces around commas): discarded unparsed, the traceparent still holds.
MAX_TRACESTATE_HEADER_CHARS: Final = tracestate.MAX_HEADER_CHARS
#: B3 single: 32 + 1 + 16 + 1 + 1 + 1 + 16 characters at most.
MAX_B3_CHARS: Final = 128

# OTel's own W3C propagator for traceparent (and inject); tracestate is
# hidden from it by _TRACEPARENT_GETTER and parsed below.
_W3C: Final = TraceContextTextMapPropagator()
_B3_SINGLE: Final = B3SingleFormat()
_B3_MULTI: Final = B3MultiFormat()


class _HeadersGetter(Getter[CIMultiDictProxy[str]]):
    def get(self, carrier: CIMultiDictProxy[str], key: str) -> list[str] | None:
        values = carrier.getall(key, None)
        return list(values) if values else None

    def keys(self, carrier: CIMultiDictProxy[str]) -> list[str]:
        return list(carrier.keys())


class _HeadersSetter(Setter[CIMultiDict[str]]):
    def set(self, carrier: CIMultiDict[str], key: str, value: str) -> None:
        carrier[key] = value


class _TraceparentGetter(_HeadersGetter):
    """Shows OTel's parser ``traceparent`` only: ``tracestate`` is parsed
    here, by Level 2 rules, and only when there is one."""

    def get(self, carrier: CIMultiDictProxy[str], key: str) -> list[str] | None:
        if key != "traceparent":
            return None
        values = carrier.getall(key, None)
        return list(values) if values else None


_GETTER: Final = _HeadersGetter()
_TRACEPARENT_GETTER: Final = _TraceparentGetter()
_SETTER: Final = _HeadersSetter()


@dataclass(frozen=True, slots=True)
class InboundContext:
    """What the gateway makes of a request's trace headers.

    ``parent`` is the OTel context to start the SERVER span in (an empty
    context starts a new trace); ``links`` go on that span; ``source`` says
    which header format was used (``traceparent``, ``b3``, ``b3multi``) or why
    none was (``none``, ``invalid``), and becomes ``gateway.context.source``.
    """

    parent: Context
    links: tuple[Link, ...]
    source: str


_ROOT: Final = Context()
_NONE: Final = InboundContext(_ROOT, (), "none")
_INVALID: Final = InboundContext(_ROOT, (), "invalid")


def extract(headers: CIMultiDictProxy[str], mode: TrustMode) -> InboundContext:
    """Choose the inbound context (at most one) and apply the trust policy."""
    if mode == "restart":
        # The browser's context is ignored entirely: nothing to parse.
        return _NONE
    span_context, source = _parse(headers)
    if span_context is None:
        return _INVALID if source == "invalid" else _NONE
    if mode == "link":
        return InboundContext(_ROOT, (Link(span_context),), source)
    return InboundContext(trace.set_span_in_context(NonRecordingSpan(span_context)), (), source)


def _parse(headers: CIMultiDictProxy[str]) -> tuple[SpanContext | None, str]:
    traceparents = headers.getall("traceparent", ())
    if traceparents:
        if len(traceparents) > 1 or len(traceparents[0]) > MAX_TRACEPARENT_CHARS:
            # RFC 9110 §5.3: two traceparent lines make one invalid value → restart;
            # an oversized one is refused before the parser sees it.
            return None, "invalid"
        span_context = _span_context(_W3C.extract(headers, getter=_TRACEPARENT_GETTER))
        if span_context is None:
            # W3C §4.3 (processing model): an invalid traceparent means a new
            # trace; B3 is not consulted, since the client did speak W3C; and
            # §3.3: tracestate MUST NOT be parsed then.
            return None, "invalid"
        fields = headers.getall("tracestate", ())
        if fields:
            # RFC 9110 §5.3 / Level 2 §3.3.2: every field line, in order.
            state = tracestate.trim(tracestate.parse(fields))
            span_context = tracestate.with_trace_state(span_context, state)
        return span_context, "traceparent"
    if "b3" in headers:
        b3 = headers.getall("b3")
        if len(b3) == 1 and len(b3[0]) <= MAX_B3_CHARS:
            span_context = _span_context(_B3_SINGLE.extract(headers, getter=_GETTER))
            if span_context is not None:
                return span_context, "b3"
        return None, "invalid"
    if "x-b3-traceid" in headers:
        if all(len(v) <= MAX_B3_CHARS for k, v in headers.items() if k.lower().startswith("x-b3")):
            span_context = _span_context(_B3_MULTI.extract(headers, getter=_GETTER))
            if span_context is not None:
                return span_context, "b3multi"
        return None, "invalid"
    return None, "none"


def _span_context(ctx: Context) -> SpanContext | None:
    span_context = trace.get_current_span(ctx).get_span_context()
    return span_context if span_context.is_valid else None


def inject(headers: CIMultiDict[str], span_context: SpanContext) -> None:
    """Write exactly one W3C context (``traceparent`` and, when non-empty,
    ``tracestate``) for ``span_context`` into the outbound headers."""
    ctx = trace.set_span_in_context(NonRecordingSpan(span_context))
    _W3C.inject(headers, context=ctx, setter=_SETTER)


def format_traceparent(span_context: SpanContext) -> str:
    """The traceparent of a span, as W3C §3.2.2 spells it (lowercase hex)."""
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{int(span_context.trace_flags):02x}"
    )
