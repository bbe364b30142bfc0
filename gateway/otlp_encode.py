"""Finished spans to OTLP protobuf bytes, without building protobuf messages.

What it is for: the body of an OTLP/HTTP trace export (an
``ExportTraceServiceRequest``, opentelemetry-proto ``trace_service.proto`` and
``trace.proto``), written straight from the SDK's ``ReadableSpan`` objects.
The official encoder (opentelemetry-exporter-otlp-proto-common 1.45.1,
``encode_spans``) builds a tree of protobuf message objects first and costs
~45 µs per gateway span; it runs on the export thread holding the GIL, so the
event loop waits for it. Here each field is written as wire-format bytes
(protobuf encoding guide: varints, fixed64/fixed32 little endian,
length-delimited records), resource and scope bytes are built once per
object, attribute keys are encoded once per key.

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

Not for: sending (``gateway/otlp_exporter.py``), metrics or logs, decoding.
"""

from __future__ import annotations

import logging
import operator
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, StatusCode

log = logging.getLogger(__name__)

_pack_fixed64: Final[Callable[[int], bytes]] = struct.Struct("<Q").pack
_pack_double: Final[Callable[[float], bytes]] = struct.Struct("<d").pack

_UINT32_LIMIT: Final = 1 << 32
_UINT64_LIMIT: Final = 1 << 64
_INT64_MIN: Final = -(1 << 63)
_INT64_LIMIT: Final = 1 << 63
_UINT64_MASK: Final = (1 << 64) - 1

_ONE_BYTE: Final = tuple(bytes((n,)) for n in range(0x80))


def _varint(n: int) -> bytes:
    """Base-128 varint of a non-negative int (protobuf encoding guide, "Base 128 Varints")."""
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


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
_KEY_VALUE_KEY: Final = b"\x0a"  # KeyValue.key = 1
_KEY_VALUE_VALUE: Final = b"\x12"  # KeyValue.value = 2
_ANY_STRING: Final = b"\x0a"  # AnyValue.string_value = 1
_ANY_BOOL_TRUE: Final = b"\x10\x01"  # AnyValue.bool_value = 2
_ANY_BOOL_FALSE: Final = b"\x10\x00"
_ANY_INT: Final = b"\x18"  # AnyValue.int_value = 3
_ANY_DOUBLE: Final = b"\x21"  # AnyValue.double_value = 4, fixed64
_ANY_ARRAY: Final = b"\x2a"  # AnyValue.array_value = 5
_ANY_KVLIST: Final = b"\x32"  # AnyValue.kvlist_value = 6
_ANY_BYTES: Final = b"\x3a"  # AnyValue.bytes_value = 7
_LIST_VALUES: Final = b"\x0a"  # ArrayValue.values = 1, KeyValueList.values = 1

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

#: Attribute key → encoded ``KeyValue.key`` field. Keys come from code, not
#: from requests, but the cache is bounded all the same.
_KEY_CACHE: dict[str, bytes] = {}
_KEY_CACHE_MAX: Final = 2048

#: Resource / InstrumentationScope object → its encoded message. Keyed by
#: identity, never by equality: equal resources can encode differently
#: (attribute order, ``1 == True``). The entry holds the object itself, so
#: its id cannot be reused while it is cached.
_OBJECT_CACHE: dict[int, tuple[object, bytes]] = {}
_OBJECT_CACHE_MAX: Final = 256

#: (tag, key, type, value) → the whole encoded attribute record, for short
#: str, int and bool values; (tag, key) → a double attribute's record minus
#: its value. The type is part of the key because ``1 == True``.
_RECORDS: dict[tuple[bytes, str, type, Any], bytes] = {}
_DOUBLE_PREFIXES: dict[tuple[bytes, str], bytes] = {}
#: Span name → encoded Span.name field ("GET", "POST", "HTTP"...).
_NAME_FIELDS: dict[str, bytes] = {}
_RECORDS_MAX: Final = 4096
_RECORD_VALUE_MAX: Final = 64

#: Resource object → its hash (a Resource is immutable; same holding rule).
_HASHES: dict[int, tuple[object, int]] = {}

#: Attribute keys already warned about, so a bad attribute on every span
#: writes one line, not one per span.
_WARNED_KEYS: set[object] = set()
_WARNED_KEYS_MAX: Final = 256


def _uint(value: Any, limit: int) -> int:
    """``value`` as protobuf's uint32/fixed32/fixed64 setters accept it."""
    if type(value) is int and 0 <= value < limit:
        return value
    if isinstance(value, bool):
        raise TypeError(f"expected an int, got a boolean: {value!r}")
    number = operator.index(value)  # TypeError for floats, str, None
    if not 0 <= number < limit:
        raise ValueError(f"Value out of range: {number}")
    return number


def _text(value: Any) -> bytes:
    """UTF-8 of a protobuf string field's value, refused as protobuf refuses it."""
    if isinstance(value, str):
        return value.encode()  # UnicodeEncodeError for lone surrogates, as protobuf
    if isinstance(value, bytes):
        value.decode()  # protobuf takes bytes for a string field only if UTF-8
        return bytes(value)
    raise TypeError(f"expected str, got {type(value).__name__}")


def _string_field(tag: bytes, value: Any) -> bytes:
    """A proto3 string field; None and "" are left out, as protobuf does."""
    if value is None:
        return b""
    data = _text(value)
    if not data:
        return b""
    return tag + _varint(len(data)) + data


def _uint_field(tag: bytes, value: Any, limit: int = _UINT32_LIMIT) -> bytes:
    number = _uint(value, limit)
    return tag + _varint(number) if number else b""


def _fixed64_field(tag: bytes, value: Any) -> bytes:
    if value is None:
        return b""
    number = _uint(value, _UINT64_LIMIT)
    return tag + _pack_fixed64(number) if number else b""


def _id(value: int, length: int) -> bytes:
    # The official encoder's int.to_bytes: OverflowError for a negative or
    # too large id, AttributeError/TypeError for a non-int.
    return value.to_bytes(length=length, byteorder="big", signed=False)


def _any_value(value: Any) -> bytes:
    """The fields of an ``AnyValue`` (common.proto), type tests in the order
    the official ``_encode_value`` makes them."""
    kind = type(value)
    if kind is str:
        data: bytes = value.encode()
        return _ANY_STRING + _varint(len(data)) + data
    if kind is bool:
        return _ANY_BOOL_TRUE if value else _ANY_BOOL_FALSE
    if kind is int:
        if not _INT64_MIN <= value < _INT64_LIMIT:
            raise ValueError(f"Value out of range: {value}")
        return _ANY_INT + _varint(value & _UINT64_MASK)
    if kind is float:
        return _ANY_DOUBLE + _pack_double(value)
    if value is None:
        return b""
    if isinstance(value, bool):
        return _ANY_BOOL_TRUE if value else _ANY_BOOL_FALSE
    if isinstance(value, str):
        data = _text(value)
        return _ANY_STRING + _varint(len(data)) + data
    if isinstance(value, int):
        number = int(value)
        if not _INT64_MIN <= number < _INT64_LIMIT:
            raise ValueError(f"Value out of range: {number}")
        return _ANY_INT + _varint(number & _UINT64_MASK)
    if isinstance(value, float):
        return _ANY_DOUBLE + _pack_double(value)
    if isinstance(value, bytes):
        return _ANY_BYTES + _varint(len(value)) + bytes(value)
    if isinstance(value, Sequence):
        body = b"".join(_list_item(_any_value(item)) for item in value)
        return _ANY_ARRAY + _varint(len(body)) + body
    if isinstance(value, Mapping):
        body = b"".join(
            _list_item(_key_value(_key_field(str(k)), _any_value(v))) for k, v in value.items()
        )
        return _ANY_KVLIST + _varint(len(body)) + body
    raise TypeError(f"Invalid type {kind} of value {value!r}")


def _list_item(message: bytes) -> bytes:
    return _LIST_VALUES + _varint(len(message)) + message


def _key_field(key: Any) -> bytes:
    encoded = _KEY_CACHE.get(key) if type(key) is str else None
    if encoded is not None:
        return encoded
    encoded = _string_field(_KEY_VALUE_KEY, key)
    if type(key) is str:
        if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
            _KEY_CACHE.clear()
        _KEY_CACHE[key] = encoded
    return encoded


def _key_value(key_field: bytes, any_value: bytes) -> bytes:
    # KeyValue.value is always present, even when the AnyValue is empty (None).
    return key_field + _KEY_VALUE_VALUE + _varint(len(any_value)) + any_value


def _attributes(tag: bytes, attributes: Mapping[Any, Any] | None, out: list[bytes]) -> None:
    """Append one ``tag`` KeyValue record per attribute to ``out``.

    As the official ``_encode_attributes``: an attribute that cannot be
    encoded is left out and logged, the rest of the span goes on."""
    if not attributes:
        return
    for key, value in attributes.items():
        kind = type(value)
        if type(key) is str:
            # Fast paths for what the gateway's spans hold: a float is a
            # per-key prefix plus 8 bytes; a short str, an int or a bool
            # (method, status, port...) repeats from span to span.
            if kind is float:
                prefix = _DOUBLE_PREFIXES.get((tag, key)) or _double_prefix(tag, key)
                if prefix:
                    out += (prefix, _pack_double(value))
                    continue
            if kind is int or kind is bool or (kind is str and len(value) <= _RECORD_VALUE_MAX):
                cache_key = (tag, key, kind, value)
                record = _RECORDS.get(cache_key)
                if record is None:
                    record = _record(tag, key, value)
                    if record is None:
                        continue
                    if len(_RECORDS) >= _RECORDS_MAX:
                        _RECORDS.clear()
                    _RECORDS[cache_key] = record
                out.append(record)
                continue
        record = _record(tag, key, value)
        if record is not None:
            out.append(record)


def _record(tag: bytes, key: Any, value: Any) -> bytes | None:
    """``tag`` + length + KeyValue, or None (logged) when it cannot be encoded."""
    try:
        key_value = _key_value(_key_field(key), _any_value(value))
    except Exception as error:  # the official encoder's rule: drop the key alone
        _warn_dropped(key, value, error)
        return None
    return tag + _varint(len(key_value)) + key_value


def _double_prefix(tag: bytes, key: str) -> bytes:
    """Everything of a double attribute's record before its 8 value bytes;
    b"" for a key that cannot be encoded (the slow path logs it)."""
    try:
        key_field = _key_field(key)
    except UnicodeEncodeError:  # a lone surrogate
        return b""
    # KeyValue: key, then value = AnyValue of 9 bytes (tag 0x21 + fixed64).
    key_value_size = len(key_field) + 2 + 9
    prefix = tag + _varint(key_value_size) + key_field + _KEY_VALUE_VALUE + b"\x09" + _ANY_DOUBLE
    if len(_DOUBLE_PREFIXES) >= _RECORDS_MAX:
        _DOUBLE_PREFIXES.clear()
    _DOUBLE_PREFIXES[(tag, key)] = prefix
    return prefix


def _warn_dropped(key: object, value: object, error: Exception) -> None:
    try:
        hash(key)
    except TypeError:
        key = repr(key)
    if key in _WARNED_KEYS:
        return
    if len(_WARNED_KEYS) >= _WARNED_KEYS_MAX:
        _WARNED_KEYS.clear()
    _WARNED_KEYS.add(key)
    log.warning(
        "span attribute %.100r left out of the export: cannot encode a %s value (%.200s)",
        key,
        type(value).__name__,
        error,
    )


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
        _attributes(_RESOURCE_ATTRIBUTES, resource.attributes, out)
        return b"".join(out)

    return _cached(resource, encode)


def _scope_message(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return b""

    def encode() -> bytes:
        out = [_string_field(_SCOPE_NAME, scope.name), _string_field(_SCOPE_VERSION, scope.version)]
        _attributes(_SCOPE_ATTRIBUTES, scope.attributes, out)
        return b"".join(out)

    return _cached(scope, encode)


def encode_span(span: ReadableSpan) -> bytes:
    """One ``Span`` message (trace.proto), fields in field-number order.

    Raises what the official encoder raises for the same span (ValueError,
    TypeError, OverflowError, KeyError, UnicodeError): the caller decides
    whether that drops the span or the batch."""
    context = span.get_span_context()
    assert context is not None  # a ReadableSpan always has one; mypy cannot know
    out = [_SPAN_TRACE_ID, _id(context.trace_id, 16), _SPAN_SPAN_ID, _id(context.span_id, 8)]
    trace_state = context.trace_state
    if trace_state:  # None or empty: no field
        out.append(
            _string_field(_SPAN_TRACE_STATE, ",".join([f"{k}={v}" for k, v in trace_state.items()]))
        )
    parent = span.parent
    if parent:
        out += (_SPAN_PARENT_SPAN_ID, _id(parent.span_id, 8))
    name = span.name
    name_field = _NAME_FIELDS.get(name) if type(name) is str else None
    if name_field is None:
        name_field = _string_field(_SPAN_NAME, name)
        if type(name) is str and len(name) <= _RECORD_VALUE_MAX:
            if len(_NAME_FIELDS) >= _RECORDS_MAX:
                _NAME_FIELDS.clear()
            _NAME_FIELDS[name] = name_field
    out += (name_field, _KIND[span.kind])
    for tag, time_ns in ((_SPAN_START, span.start_time), (_SPAN_END, span.end_time)):
        if type(time_ns) is int and 0 < time_ns < _UINT64_LIMIT:
            out += (tag, _pack_fixed64(time_ns))
        else:
            out.append(_fixed64_field(tag, time_ns))
    _attributes(_SPAN_ATTRIBUTES, span.attributes, out)
    dropped = span.dropped_attributes
    if dropped or type(dropped) is not int:
        out.append(_uint_field(_SPAN_DROPPED_ATTRIBUTES, dropped))
    for event in span.events or ():
        fields = [
            _fixed64_field(_EVENT_TIME, event.timestamp),
            _string_field(_EVENT_NAME, event.name),
        ]
        _attributes(_EVENT_ATTRIBUTES, event.attributes, fields)
        fields.append(_uint_field(_EVENT_DROPPED_ATTRIBUTES, event.dropped_attributes))
        _length_delimited(_SPAN_EVENTS, fields, out)
    dropped = span.dropped_events
    if dropped or type(dropped) is not int:
        out.append(_uint_field(_SPAN_DROPPED_EVENTS, dropped))
    for link in span.links or ():
        linked = link.context
        fields = [
            _LINK_TRACE_ID,
            _id(linked.trace_id, 16),
            _LINK_SPAN_ID,
            _id(linked.span_id, 8),
        ]
        _attributes(_LINK_ATTRIBUTES, link.attributes, fields)
        fields += (
            _uint_field(_LINK_DROPPED_ATTRIBUTES, link.dropped_attributes),
            _LINK_FLAGS,
            _FLAGS_REMOTE if linked.is_remote else _FLAGS_LOCAL,
        )
        _length_delimited(_SPAN_LINKS, fields, out)
    dropped = span.dropped_links
    if dropped or type(dropped) is not int:
        out.append(_uint_field(_SPAN_DROPPED_LINKS, dropped))
    status = span.status
    if (
        status is not None
        and status.status_code is StatusCode.UNSET
        and (status.description is None or status.description == "")
    ):
        out.append(_SPAN_STATUS_UNSET)
    elif status is not None:
        fields = [
            _string_field(_STATUS_MESSAGE, status.description),
            _STATUS_CODE + _varint(status.status_code.value) if status.status_code.value else b"",
        ]
        _length_delimited(_SPAN_STATUS, fields, out)
    out += (_SPAN_FLAGS, _FLAGS_REMOTE if parent and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(out)


def _length_delimited(tag: bytes, fields: list[bytes], out: list[bytes]) -> None:
    body = b"".join(fields)
    out += (tag, _varint(len(body)), body)


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
            encoded = encode_span(span)
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
        scope_group.records += (_SCOPE_SPANS_SPANS, _varint(len(encoded)), encoded)
    out: list[bytes] = []
    for group in resources.values():
        _resource_spans(group, out)
    return EncodedBatch(b"".join(out), dropped, first_error)


def _resource_spans(group: _ResourceGroup, out: list[bytes]) -> None:
    """Append one ResourceSpans record; lengths are summed, never re-copied."""
    resource_message = _resource_message(group.resource)
    body = [_RESOURCE_SPANS_RESOURCE, _varint(len(resource_message)), resource_message]
    for scope_group in group.scopes.values():
        scope = scope_group.scope
        scope_message = _scope_message(scope)
        head = _SCOPE_SPANS_SCOPE + _varint(len(scope_message)) + scope_message
        tail = _string_field(_SCOPE_SPANS_SCHEMA_URL, scope.schema_url if scope else None)
        size = len(head) + len(tail) + sum(map(len, scope_group.records))
        body += (_RESOURCE_SPANS_SCOPE_SPANS, _varint(size), head)
        body += scope_group.records
        body.append(tail)
    body.append(_string_field(_RESOURCE_SPANS_SCHEMA_URL, group.resource.schema_url))
    out += (_REQUEST_RESOURCE_SPANS, _varint(sum(map(len, body))))
    out += body
