"""Span records and the shapes of a trace: roles, route, waterfall, summary.

What it is for: pure functions over spans already decoded (``otlp.py``) or
loaded (``store.py``): which span is the gateway's SERVER span, which the
backend's, what route a trace belongs to, and how a trace lays out as a
waterfall on one time axis. Inputs in, dataclasses out, no clock reads.

Not for: wire formats (``otlp.py``), SQL (``store.py``), statistics
(``report.py``) or HTML (``pages.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from latency_common import attributes as attr

#: OTLP ``Span.SpanKind`` values (opentelemetry/proto/trace/v1/trace.proto).
KIND_INTERNAL: Final = 1
KIND_SERVER: Final = 2
KIND_CLIENT: Final = 3
KIND_NAMES: Final = {
    0: "unspecified",
    1: "internal",
    2: "server",
    3: "client",
    4: "producer",
    5: "consumer",
}
#: OTLP ``Status.StatusCode`` values.
STATUS_NAMES: Final = {0: "unset", 1: "ok", 2: "error"}

GATEWAY_SERVICE: Final = "gateway"
BROWSER_SERVICE: Final = "browser"


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One span as the viewer keeps it: ids as lowercase hex (the form W3C
    traceparent and every tracing UI show), times as epoch nanoseconds."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    service: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    status_code: int
    status_message: str
    attributes: dict[str, Any]
    events: list[dict[str, Any]]

    @property
    def duration_ns(self) -> int:
        # A clock step between start and end can make end < start; a negative
        # bar would draw nothing useful, so it is a zero-length span.
        return max(0, self.end_ns - self.start_ns)

    def to_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "service": self.service,
            "name": self.name,
            "kind": KIND_NAMES.get(self.kind, str(self.kind)),
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_ms": round(self.duration_ns / 1e6, 3),
            "status_code": STATUS_NAMES.get(self.status_code, str(self.status_code)),
            "status_message": self.status_message,
            "attributes": self.attributes,
            "events": self.events,
        }


def number(value: Any) -> float | None:
    """A finite number from an attribute value, else None: attributes come
    from any OTLP client, so a string or a NaN where a figure belongs is
    skipped rather than trusted."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    as_float = float(value)
    return as_float if math.isfinite(as_float) else None


def _by_start(spans: Iterable[SpanRecord]) -> list[SpanRecord]:
    # Ties: the longer span first (a parent and its child often share a
    # start to the nanosecond), then the id so the order is deterministic.
    return sorted(spans, key=lambda s: (s.start_ns, -s.end_ns, s.span_id))


def gateway_span(spans: Iterable[SpanRecord]) -> SpanRecord | None:
    """The gateway's SERVER span: the one carrying ``latency.status`` (every
    gateway SERVER span does, README "How the latency is measured"), else a SERVER span of the
    ``gateway`` service (its name can be changed with OTEL_SERVICE_NAME,
    the latency attributes cannot)."""
    servers = _by_start(s for s in spans if s.kind == KIND_SERVER)
    for span in servers:
        if attr.STATUS in span.attributes:
            return span
    for span in servers:
        if span.service == GATEWAY_SERVICE:
            return span
    return None


def backend_span(spans: Iterable[SpanRecord]) -> SpanRecord | None:
    """The first SERVER span that is neither the gateway's nor a browser's:
    the application behind the gateway."""
    spans = list(spans)
    gateway = gateway_span(spans)
    for span in _by_start(spans):
        if span.kind != KIND_SERVER or span is gateway:
            continue
        if span.service in (GATEWAY_SERVICE, BROWSER_SERVICE):
            continue
        return span
    return None


def route(spans: Iterable[SpanRecord]) -> str | None:
    """The route (README "No key? The local viewer"): the backend span's
    ``http.route``, else the gateway span's name (``{method} {route}`` or
    just ``{method}``)."""
    spans = list(spans)
    backend = backend_span(spans)
    if backend is not None:
        http_route = backend.attributes.get("http.route")
        if isinstance(http_route, str) and http_route:
            return http_route
    gateway = gateway_span(spans)
    return gateway.name if gateway is not None else None


def latency_attributes(span: SpanRecord | None) -> dict[str, Any]:
    if span is None:
        return {}
    return {k: v for k, v in sorted(span.attributes.items()) if k.startswith(attr.PREFIX)}


@dataclass(frozen=True, slots=True)
class WaterfallRow:
    span: SpanRecord
    depth: int
    offset_pct: float
    width_pct: float
    #: On the gateway's SERVER span: (offset, width) of the upstream wait as
    #: % of the span's own bar (see :func:`upstream_wait`).
    wait: tuple[float, float] | None = None


def upstream_wait(span: SpanRecord) -> tuple[float, float] | None:
    """Where the gateway waited for the upstream inside its own span, as
    (offset, width) in % of the span: it sent the request ``gateway_ms −
    upstream_ms`` after receipt and had the response headers at
    ``gateway_ms`` (README, "A traced request"). The same with one span per
    request or with a CLIENT span. None without both figures, or when they
    make no sense (attributes come from any OTLP client)."""
    gateway_ms = number(span.attributes.get(attr.GATEWAY_MS))
    upstream_ms = number(span.attributes.get(attr.UPSTREAM_MS))
    span_ms = span.duration_ns / 1e6
    if gateway_ms is None or upstream_ms is None or span_ms <= 0:
        return None
    if not 0 <= upstream_ms <= gateway_ms:
        return None
    offset = round(min((gateway_ms - upstream_ms) / span_ms * 100, 100.0), 3)
    # Rounded after the clamp to what is left, so the segment never pokes out.
    width = max(min(round(upstream_ms / span_ms * 100, 3), 100.0 - offset), 0.0)
    return offset, width


@dataclass(frozen=True, slots=True)
class Waterfall:
    trace_id: str
    start_ns: int
    end_ns: int
    rows: tuple[WaterfallRow, ...]

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


def _tree_order(spans: Sequence[SpanRecord]) -> list[tuple[SpanRecord, int]]:
    """Depth-first, children by start time. Spans whose parent is not in the
    trace (not received yet, pruned, or in another service's export still in
    flight) are drawn at the top level rather than hidden."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[SpanRecord]] = {}
    top: list[SpanRecord] = []
    for span in spans:
        parent = span.parent_span_id
        if parent and parent in ids and parent != span.span_id:
            children.setdefault(parent, []).append(span)
        else:
            top.append(span)
    order: list[tuple[SpanRecord, int]] = []
    seen: set[str] = set()

    def walk(roots: list[SpanRecord]) -> None:
        # Iterative: a hostile or buggy client can send a chain thousands of
        # spans deep, which would exhaust Python's recursion limit.
        stack = [(span, 0) for span in reversed(_by_start(roots))]
        while stack:
            span, depth = stack.pop()
            if span.span_id in seen:
                continue
            seen.add(span.span_id)
            order.append((span, depth))
            kids = _by_start(children.get(span.span_id, ()))
            stack.extend((kid, depth + 1) for kid in reversed(kids))

    walk(top)
    # A parent cycle (A → B → A) has no top-level span: draw what is left.
    walk([s for s in spans if s.span_id not in seen])
    return order


def waterfall(trace_id: str, spans: Sequence[SpanRecord]) -> Waterfall:
    """Every span on one time axis: offset and width as % of the trace."""
    if not spans:
        return Waterfall(trace_id, 0, 0, ())
    start_ns = min(s.start_ns for s in spans)
    end_ns = max(max(s.end_ns, s.start_ns) for s in spans)
    total_ns = end_ns - start_ns
    rows = []
    for span, depth in _tree_order(spans):
        if total_ns <= 0:
            offset, width = 0.0, 100.0
        else:
            offset = (span.start_ns - start_ns) / total_ns * 100
            width = min(span.duration_ns / total_ns * 100, 100.0 - offset)
        rows.append(
            WaterfallRow(span, depth, round(offset, 3), round(width, 3), upstream_wait(span))
        )
    return Waterfall(trace_id, start_ns, end_ns, tuple(rows))


@dataclass(frozen=True, slots=True)
class TraceSummary:
    trace_id: str
    root_name: str
    root_service: str
    services: tuple[str, ...]
    span_count: int
    start_ns: int
    duration_ns: int
    latency_status: str | None
    uplink_ms: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "root_name": self.root_name,
            "root_service": self.root_service,
            "services": list(self.services),
            "span_count": self.span_count,
            "start_ns": self.start_ns,
            "duration_ms": round(self.duration_ns / 1e6, 3),
            "latency_status": self.latency_status,
            "uplink_ms": self.uplink_ms,
        }


def summarize(trace_id: str, spans: Sequence[SpanRecord]) -> TraceSummary:
    shape = waterfall(trace_id, spans)
    root = shape.rows[0].span if shape.rows else None
    services: list[str] = []
    for row in shape.rows:
        if row.span.service not in services:
            services.append(row.span.service)
    gateway = gateway_span(spans)
    status = gateway.attributes.get(attr.STATUS) if gateway else None
    return TraceSummary(
        trace_id=trace_id,
        root_name=root.name if root else "",
        root_service=root.service if root else "",
        # In order of first appearance: browser → gateway → backend.
        services=tuple(services),
        span_count=len(spans),
        start_ns=shape.start_ns,
        duration_ns=shape.duration_ns,
        latency_status=status if isinstance(status, str) else None,
        uplink_ms=number(gateway.attributes.get(attr.UPLINK_MS)) if gateway else None,
    )
