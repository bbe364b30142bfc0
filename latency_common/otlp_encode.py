"""Finished spans to OTLP protobuf bytes, without building protobuf messages.

What it is for: the body of an OTLP/HTTP trace export (an
``ExportTraceServiceRequest``, opentelemetry-proto ``trace_service.proto`` and
``trace.proto``), written straight from the SDK's ``ReadableSpan`` objects.
The official encoder (opentelemetry-exporter-otlp-proto-common 1.45.1,
``encode_spans``) builds a tree of protobuf message objects first and costs
35-45 µs of CPU per gateway span (~8 µs here, benchmarks/encoder_bench.py);
it runs on the export thread holding the GIL, so the event loop waits. Here
each field is written as wire-format bytes (protobuf encoding guide: varints,
fixed64/fixed32 little endian, length-delimited records; the pieces and the
attribute records are in ``latency_common/otlp_wire.py``), resource and scope bytes
are built once per object.

The output parses to the same message as the official encoder's, field for
field (tests/test_otlp_encode.py proves it with hypothesis): same grouping by
resource and instrumentation scope (by equality, in order of first
appearance), same ``flags`` (the ``SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE`` bit
always, ``..._IS_REMOTE`` when the parent or linked context is remote, no
trace-flag bits), no link ``trace_state`` (1.45.1 does not send it), an
attribute the official encoder cannot encode (an int outside int64, an
unknown type) left out with a warning, and the same exception types for a span
it refuses (an id or time out of range, a lone surrogate in a name, an unknown
kind).

Not for: sending (``latency_common/otlp_exporter.py``), metrics or logs, decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, StatusCode

from latency_common.otlp_wire import (
    RECORD_VALUE_MAX,
    RECORDS_MAX,
    UINT64_LIMIT,
    append_attributes,
    fixed64_field,
    id_bytes,
    pack_fixed64,
    string_field,
    uint_field,
    varint,
)

# Field tags, (field number << 3) | wire type, from opentelemetry-proto
# trace.proto and common.proto (wire types: 0 varint, 1 fixed64, 2
# length-delimited, 5 fixed32).
_REQUEST_RESOURCE_SPANS: Final = b"\x0a"  # ExportTraceServiceRequest.resource_spans = 1
_RESOURCE_SPANS_RESOURCE: Final = b"\x0a"  # ResourceSpans.resource = 1
_RESOURCE_SPANS_SCOPE_SPANS: Final = b"\x12"  # ResourceSpans.scope_spans = 2
_RESOURCE_SPANS_SCHEMA_URL: Final = b"\x1a"  # ResourceSpans.schema_url = 3
_RESOURCE_ATTRIBUTES: Final = b"\x0a"  # Resource.attributes = 1
_SCOPE_SPANS_SCOPE: Final = b"\x0a"  # ScopeSpans.scope = 1
_SCOPE_SPANS_SPANS: Final = b"\x12"  # ScopeSpans.spans = 2
_SCOPE_SPANS_SCHEMA_URL: Final = b"\x1a"  # ScopeSpans.schema_url = 3
_SCOPE_NAME: Final = b"\x0a"  # InstrumentationScope.name = 1
_SCOPE_VERSION: Final = b"\x12"  # InstrumentationScope.version = 2
_SCOPE_ATTRIBUTES: Final = b"\x1a"  # InstrumentationScope.attributes = 3
_SPAN_TRACE_ID: Final = b"\x0a\x10"  # Span.trace_id = 1, 16 bytes
_SPAN_SPAN_ID: Final = b"\x12\x08"  # Span.span_id = 2, 8 bytes
_SPAN_TRACE_STATE: Final = b"\x1a"  # Span.trace_state = 3
_SPAN_PARENT_SPAN_ID: Final = b"\x22\x08"  # Span.parent_span_id = 4, 8 bytes
_SPAN_NAME: Final = b"\x2a"  # Span.name = 5
_SPAN_START: Final = b"\x39"  # Span.start_time_unix_nano = 7, fixed64
_SPAN_END: Final = b"\x41"  # Span.end_time_unix_nano = 8, fixed64
_SPAN_ATTRIBUTES: Final = b"\x4a"  # Span.attributes = 9
_SPAN_DROPPED_ATTRIBUTES: Final = b"\x50"  # Span.dropped_attributes_count = 10
_SPAN_EVENTS: Final = b"\x5a"  # Span.events = 11
_SPAN_DROPPED_EVENTS: Final = b"\x60"  # Span.dropped_events_count = 12
_SPAN_LINKS: Final = b"\x6a"  # Span.links = 13
_SPAN_DROPPED_LINKS: Final = b"\x70"  # Span.dropped_links_count = 14
_SPAN_STATUS: Final = b"\x7a"  # Span.status = 15
_SPAN_STATUS_UNSET: Final = b"\x7a\x00"  # an empty Status message
_SPAN_FLAGS: Final = b"\x85\x01"  # Span.flags = 16, fixed32
_EVENT_TIME: Final = b"\x09"  # Span.Event.time_unix_nano = 1, fixed64
_EVENT_NAME: Final = b"\x12"  # Span.Event.name = 2
_EVENT_ATTRIBUTES: Final = b"\x1a"  # Span.Event.attributes = 3
_EVENT_DROPPED_ATTRIBUTES: Final = b"\x20"  # Span.Event.dropped_attributes_count = 4
_LINK_TRACE_ID: Final = b"\x0a\x10"  # Span.Link.trace_id = 1, 16 bytes
_LINK_SPAN_ID: Final = b"\x12\x08"  # Span.Link.span_id = 2, 8 bytes
_LINK_ATTRIBUTES: Final = b"\x22"  # Span.Link.attributes = 4
_LINK_DROPPED_ATTRIBUTES: Final = b"\x28"  # Span.Link.dropped_attributes_count = 5
_LINK_FLAGS: Final = b"\x35"  # Span.Link.flags = 6, fixed32
_STATUS_MESSAGE: Final = b"\x12"  # Status.message = 2
_STATUS_CODE: Final = b"\x18"  # Status.code = 3


#: Span.kind (trace.proto SpanKind: INTERNAL 1, SERVER 2, CLIENT 3, PRODUCER 4,
#: CONSUMER 5), tag 6 included.
_KIND: Final[dict[SpanKind, bytes]] = {
    SpanKind.INTERNAL: b"\x30\x01",
    SpanKind.SERVER: b"\x30\x02",
    SpanKind.CLIENT: b"\x30\x03",
    SpanKind.PRODUCER: b"\x30\x04",
    SpanKind.CONSUMER: b"\x30\x05",
}

#: ``flags`` as the official 1.45.1 encoder sets it (``_span_flags``):
#: SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK (0x100) always, plus
#: SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK (0x200) for a remote parent or link; it
#: leaves the W3C trace-flags byte (bits 0-7) out, and so does this module.
_FLAGS_LOCAL: Final = (0x100).to_bytes(4, "little")
_FLAGS_REMOTE: Final = (0x300).to_bytes(4, "little")

#: Span name → encoded Span.name field ("GET", "POST", "HTTP"...).
_NAME_FIELDS: dict[str, bytes] = {}

#: Resource / InstrumentationScope object → its encoded message. Keyed by
#: identity, never by equality: equal resources can encode differently
#: (attribute order, ``1 == True``). The entry holds the object itself, so
#: its id cannot be reused while it is cached.
_OBJECT_CACHE: dict[int, tuple[object, bytes]] = {}
_OBJECT_CACHE_MAX: Final = 256

#: Resource object → its hash (a Resource is immutable; same holding rule).
_HASHES: dict[int, tuple[object, int]] = {}


def _cached(obj: object, encode: Callable[[], bytes]) -> bytes:
    entry = _OBJECT_CACHE.get(id(obj))
    if entry is not None and entry[0] is obj:
        return entry[1]
    encoded = encode()
    if len(_OBJECT_CACHE) >= _OBJECT_CACHE_MAX:
        _OBJECT_CACHE.clear()
    _OBJECT_CACHE[id(obj)] = (obj, encoded)
    return encoded


def _resource_message(resource: Resource) -> bytes:
    def encode() -> bytes:
        out: list[bytes] = []
        append_attributes(_RESOURCE_ATTRIBUTES, resource.attributes, out)
        return b"".join(out)

    return _cached(resource, encode)


def _scope_message(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return b""

    def encode() -> bytes:
        out = [string_field(_SCOPE_NAME, scope.name), string_field(_SCOPE_VERSION, scope.version)]
        append_attributes(_SCOPE_ATTRIBUTES, scope.attributes, out)
        return b"".join(out)

    return _cached(scope, encode)


def encode_span(span: ReadableSpan) -> bytes:
    """One ``Span`` message (trace.proto), fields in field-number order.

    Raises what the official encoder raises for the same span (ValueError,
    TypeError, OverflowError, KeyError, UnicodeError): the caller decides
    whether that drops the span or the batch."""
    context = span.get_span_context()
    assert context is not None  # a ReadableSpan always has one; mypy cannot know
    out = [
        _SPAN_TRACE_ID,
        id_bytes(context.trace_id, 16),
        _SPAN_SPAN_ID,
        id_bytes(context.span_id, 8),
    ]
    trace_state = context.trace_state
    if trace_state:  # None or empty: no field
        out.append(
            string_field(_SPAN_TRACE_STATE, ",".join([f"{k}={v}" for k, v in trace_state.items()]))
        )
    parent = span.parent
    if parent:
        out += (_SPAN_PARENT_SPAN_ID, id_bytes(parent.span_id, 8))
    name = span.name
    name_field = _NAME_FIELDS.get(name) if type(name) is str else None
    if name_field is None:
        name_field = string_field(_SPAN_NAME, name)
        if type(name) is str and len(name) <= RECORD_VALUE_MAX:
            if len(_NAME_FIELDS) >= RECORDS_MAX:
                _NAME_FIELDS.clear()
            _NAME_FIELDS[name] = name_field
    out += (name_field, _KIND[span.kind])
    for tag, time_ns in ((_SPAN_START, span.start_time), (_SPAN_END, span.end_time)):
        if type(time_ns) is int and 0 < time_ns < UINT64_LIMIT:
            out += (tag, pack_fixed64(time_ns))
        else:
            out.append(fixed64_field(tag, time_ns))
    append_attributes(_SPAN_ATTRIBUTES, span.attributes, out)
    dropped = span.dropped_attributes
    if dropped or type(dropped) is not int:
        out.append(uint_field(_SPAN_DROPPED_ATTRIBUTES, dropped))
    for event in span.events or ():
        fields = [
            fixed64_field(_EVENT_TIME, event.timestamp),
            string_field(_EVENT_NAME, event.name),
        ]
        append_attributes(_EVENT_ATTRIBUTES, event.attributes, fields)
        fields.append(uint_field(_EVENT_DROPPED_ATTRIBUTES, event.dropped_attributes))
        _length_delimited(_SPAN_EVENTS, fields, out)
    dropped = span.dropped_events
    if dropped or type(dropped) is not int:
        out.append(uint_field(_SPAN_DROPPED_EVENTS, dropped))
    for link in span.links or ():
        linked = link.context
        fields = [
            _LINK_TRACE_ID,
            id_bytes(linked.trace_id, 16),
            _LINK_SPAN_ID,
            id_bytes(linked.span_id, 8),
        ]
        append_attributes(_LINK_ATTRIBUTES, link.attributes, fields)
        fields += (
            uint_field(_LINK_DROPPED_ATTRIBUTES, link.dropped_attributes),
            _LINK_FLAGS,
            _FLAGS_REMOTE if linked.is_remote else _FLAGS_LOCAL,
        )
        _length_delimited(_SPAN_LINKS, fields, out)
    dropped = span.dropped_links
    if dropped or type(dropped) is not int:
        out.append(uint_field(_SPAN_DROPPED_LINKS, dropped))
    status = span.status
    if (
        status is not None
        and status.status_code is StatusCode.UNSET
        and (status.description is None or status.description == "")
    ):
        out.append(_SPAN_STATUS_UNSET)
    elif status is not None:
        fields = [
            string_field(_STATUS_MESSAGE, status.description),
            _STATUS_CODE + varint(status.status_code.value) if status.status_code.value else b"",
        ]
        _length_delimited(_SPAN_STATUS, fields, out)
    out += (_SPAN_FLAGS, _FLAGS_REMOTE if parent and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(out)


def _length_delimited(tag: bytes, fields: list[bytes], out: list[bytes]) -> None:
    body = b"".join(fields)
    out += (tag, varint(len(body)), body)


class EncodedSpan(ReadableSpan):
    """A finished span carrying its own ``Span`` message, written when it
    was built, on the thread that ended it.

    The batch processor's thread then only joins bytes under the resource
    and scope headers and posts them: encoding 64 spans there held the GIL
    for about 0.5 ms against the event loop (benchmarks/loop_lag.py). A span
    that cannot be encoded keeps ``wire`` None and is encoded again at
    export, where it is left out alone and counted, as any other."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wire: bytes | None
        try:
            self.wire = encode_span(self)
        except Exception:  # whatever encode_span raises: the export decides
            self.wire = None


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """An export request body, and the spans that had to be left out of it."""

    body: bytes
    dropped: int = 0
    #: The first refused span's error, for a log line ("" when none was).
    first_error: str = ""


def encode_spans(spans: Iterable[ReadableSpan]) -> bytes:
    """The ``ExportTraceServiceRequest`` bytes the official encoder would send.

    Raises as the official ``encode_spans`` does when a span cannot be
    encoded; :func:`encode_spans_dropping_invalid` leaves that span out."""
    return _encode_request(spans, drop_invalid=False).body


def encode_spans_dropping_invalid(spans: Iterable[ReadableSpan]) -> EncodedBatch:
    """As :func:`encode_spans`, but a span that cannot be encoded is left out
    (and counted) instead of failing the whole batch."""
    return _encode_request(spans, drop_invalid=True)


class _ScopeGroup:
    """Encoded spans of one instrumentation scope, as ScopeSpans.spans records."""

    __slots__ = ("records", "scope")

    def __init__(self, scope: InstrumentationScope | None) -> None:
        self.scope = scope
        self.records: list[bytes] = []


class _GroupKey:
    """A Resource as a dict key, as the official encoder's dict sees it (its
    own ``__hash__`` and ``__eq__``), with the hash computed once per object:
    ``Resource.__hash__`` dumps the attributes to JSON, every time."""

    __slots__ = ("hash", "obj")

    def __init__(self, obj: object) -> None:
        self.obj = obj
        entry = _HASHES.get(id(obj))
        if entry is not None and entry[0] is obj:
            self.hash = entry[1]
            return
        self.hash = hash(obj)
        if len(_HASHES) >= _OBJECT_CACHE_MAX:
            _HASHES.clear()
        _HASHES[id(obj)] = (obj, self.hash)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        # As a dict compares keys: identity first, then __eq__.
        return isinstance(other, _GroupKey) and (
            self.obj is other.obj or bool(self.obj == other.obj)
        )


class _ResourceGroup:
    """The scopes of one resource, in order of first appearance."""

    __slots__ = ("by_id", "resource", "scopes")

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.scopes: dict[InstrumentationScope | None, _ScopeGroup] = {}
        self.by_id: dict[int, _ScopeGroup] = {}


def _encode_request(spans: Iterable[ReadableSpan], *, drop_invalid: bool) -> EncodedBatch:
    # resource → scope → encoded spans. Grouped by equality (Resource and
    # InstrumentationScope define __eq__/__hash__), in order of first
    # appearance, as the official encoder's nested dicts do. The by-id maps
    # only save the hashing (a Resource hashes by dumping its attributes to
    # JSON); the spans keep every object alive, so ids are stable meanwhile.
    resources: dict[_GroupKey, _ResourceGroup] = {}
    resources_by_id: dict[int, _ResourceGroup] = {}
    dropped = 0
    first_error = ""
    for span in spans:
        try:
            wire = span.wire if type(span) is EncodedSpan else None
            encoded = wire if wire is not None else encode_span(span)
        except Exception as error:
            if not drop_invalid:
                raise
            dropped += 1
            first_error = first_error or f"{type(error).__name__}: {error}"
            continue
        resource = span.resource
        group = resources_by_id.get(id(resource))
        if group is None:
            key = _GroupKey(resource)
            group = resources.get(key)
            if group is None:
                group = resources[key] = _ResourceGroup(resource)
            resources_by_id[id(resource)] = group
        scope = span.instrumentation_scope or None
        scope_group = group.by_id.get(id(scope))
        if scope_group is None:
            scope_group = group.scopes.get(scope)
            if scope_group is None:
                scope_group = group.scopes[scope] = _ScopeGroup(scope)
            group.by_id[id(scope)] = scope_group
        scope_group.records += (_SCOPE_SPANS_SPANS, varint(len(encoded)), encoded)
    out: list[bytes] = []
    for group in resources.values():
        _resource_spans(group, out)
    return EncodedBatch(b"".join(out), dropped, first_error)


def _resource_spans(group: _ResourceGroup, out: list[bytes]) -> None:
    """Append one ResourceSpans record; lengths are summed, never re-copied."""
    resource_message = _resource_message(group.resource)
    body = [_RESOURCE_SPANS_RESOURCE, varint(len(resource_message)), resource_message]
    for scope_group in group.scopes.values():
        scope = scope_group.scope
        scope_message = _scope_message(scope)
        head = _SCOPE_SPANS_SCOPE + varint(len(scope_message)) + scope_message
        tail = string_field(_SCOPE_SPANS_SCHEMA_URL, scope.schema_url if scope else None)
        size = len(head) + len(tail) + sum(map(len, scope_group.records))
        body += (_RESOURCE_SPANS_SCOPE_SPANS, varint(size), head)
        body += scope_group.records
        body.append(tail)
    body.append(string_field(_RESOURCE_SPANS_SCHEMA_URL, group.resource.schema_url))
    out += (_REQUEST_RESOURCE_SPANS, varint(sum(map(len, body))))
    out += body
