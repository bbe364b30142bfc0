"""Protobuf wire format for OTLP: varints, scalar fields and attribute records.

What it is for: the pieces ``latency_common/otlp_encode.py`` assembles spans from
(protobuf encoding guide: base-128 varints, fixed64/fixed32 little endian,
length-delimited records), and the ``KeyValue``/``AnyValue`` attribute
records of opentelemetry-proto ``common.proto``, written as the official
encoder (opentelemetry-exporter-otlp-proto-common 1.45.1, ``_encode_value``
and ``_encode_attributes``) would: same type tests in the same order, same
values refused with the same exception types, an attribute that cannot be
encoded left out with a warning. Attribute records that repeat from span to
span (a method, a status, a port) are encoded once and cached.

Not for: spans, resources, scopes or grouping (``latency_common/otlp_encode.py``).
"""

from __future__ import annotations

import logging
import operator
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

log = logging.getLogger(__name__)

pack_fixed64: Final[Callable[[int], bytes]] = struct.Struct("<Q").pack
_pack_double: Final[Callable[[float], bytes]] = struct.Struct("<d").pack

_UINT32_LIMIT: Final = 1 << 32
UINT64_LIMIT: Final = 1 << 64
_INT64_MIN: Final = -(1 << 63)
_INT64_LIMIT: Final = 1 << 63
_UINT64_MASK: Final = (1 << 64) - 1

_ONE_BYTE: Final = tuple(bytes((n,)) for n in range(0x80))


def varint(n: int) -> bytes:
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
# common.proto (wire types: 0 varint, 1 fixed64, 2 length-delimited).
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

#: Attribute key → encoded ``KeyValue.key`` field. Keys come from code, not
#: from requests, but the cache is bounded all the same.
_KEY_CACHE: dict[str, bytes] = {}
_KEY_CACHE_MAX: Final = 2048

#: (tag, key, type, value) → the whole encoded attribute record, for short
#: str, int and bool values; (tag, key) → a double attribute's record minus
#: its value. The type is part of the key because ``1 == True``.
_RECORDS: dict[tuple[bytes, str, type, Any], bytes] = {}
_DOUBLE_PREFIXES: dict[tuple[bytes, str], bytes] = {}
RECORDS_MAX: Final = 4096
RECORD_VALUE_MAX: Final = 64

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


def string_field(tag: bytes, value: Any) -> bytes:
    """A proto3 string field; None and "" are left out, as protobuf does."""
    if value is None:
        return b""
    data = _text(value)
    if not data:
        return b""
    return tag + varint(len(data)) + data


def uint_field(tag: bytes, value: Any, limit: int = _UINT32_LIMIT) -> bytes:
    number = _uint(value, limit)
    return tag + varint(number) if number else b""


def fixed64_field(tag: bytes, value: Any) -> bytes:
    if value is None:
        return b""
    number = _uint(value, UINT64_LIMIT)
    return tag + pack_fixed64(number) if number else b""


def id_bytes(value: int, length: int) -> bytes:
    # The official encoder's int.to_bytes: OverflowError for a negative or
    # too large id, AttributeError/TypeError for a non-int.
    return value.to_bytes(length=length, byteorder="big", signed=False)


def _any_value(value: Any) -> bytes:
    """The fields of an ``AnyValue`` (common.proto), type tests in the order
    the official ``_encode_value`` makes them."""
    kind = type(value)
    if kind is str:
        data: bytes = value.encode()
        return _ANY_STRING + varint(len(data)) + data
    if kind is bool:
        return _ANY_BOOL_TRUE if value else _ANY_BOOL_FALSE
    if kind is int:
        if not _INT64_MIN <= value < _INT64_LIMIT:
            raise ValueError(f"Value out of range: {value}")
        return _ANY_INT + varint(value & _UINT64_MASK)
    if kind is float:
        return _ANY_DOUBLE + _pack_double(value)
    if value is None:
        return b""
    if isinstance(value, bool):
        return _ANY_BOOL_TRUE if value else _ANY_BOOL_FALSE
    if isinstance(value, str):
        data = _text(value)
        return _ANY_STRING + varint(len(data)) + data
    if isinstance(value, int):
        number = int(value)
        if not _INT64_MIN <= number < _INT64_LIMIT:
            raise ValueError(f"Value out of range: {number}")
        return _ANY_INT + varint(number & _UINT64_MASK)
    if isinstance(value, float):
        return _ANY_DOUBLE + _pack_double(value)
    if isinstance(value, bytes):
        return _ANY_BYTES + varint(len(value)) + bytes(value)
    if isinstance(value, Sequence):
        body = b"".join(_list_item(_any_value(item)) for item in value)
        return _ANY_ARRAY + varint(len(body)) + body
    if isinstance(value, Mapping):
        body = b"".join(
            _list_item(_key_value(_key_field(str(k)), _any_value(v))) for k, v in value.items()
        )
        return _ANY_KVLIST + varint(len(body)) + body
    raise TypeError(f"Invalid type {kind} of value {value!r}")


def _list_item(message: bytes) -> bytes:
    return _LIST_VALUES + varint(len(message)) + message


def _key_field(key: Any) -> bytes:
    encoded = _KEY_CACHE.get(key) if type(key) is str else None
    if encoded is not None:
        return encoded
    encoded = string_field(_KEY_VALUE_KEY, key)
    if type(key) is str:
        if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
            _KEY_CACHE.clear()
        _KEY_CACHE[key] = encoded
    return encoded


def _key_value(key_field: bytes, any_value: bytes) -> bytes:
    # KeyValue.value is always present, even when the AnyValue is empty (None).
    return key_field + _KEY_VALUE_VALUE + varint(len(any_value)) + any_value


def append_attributes(tag: bytes, attributes: Mapping[Any, Any] | None, out: list[bytes]) -> None:
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
            if kind is int or kind is bool or (kind is str and len(value) <= RECORD_VALUE_MAX):
                cache_key = (tag, key, kind, value)
                record = _RECORDS.get(cache_key)
                if record is None:
                    record = _record(tag, key, value)
                    if record is None:
                        continue
                    if len(_RECORDS) >= RECORDS_MAX:
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
    return tag + varint(len(key_value)) + key_value


def _double_prefix(tag: bytes, key: str) -> bytes:
    """Everything of a double attribute's record before its 8 value bytes;
    b"" for a key that cannot be encoded (the slow path logs it)."""
    try:
        key_field = _key_field(key)
    except UnicodeEncodeError:  # a lone surrogate
        return b""
    # KeyValue: key, then value = AnyValue of 9 bytes (tag 0x21 + fixed64).
    key_value_size = len(key_field) + 2 + 9
    prefix = tag + varint(key_value_size) + key_field + _KEY_VALUE_VALUE + b"\x09" + _ANY_DOUBLE
    if len(_DOUBLE_PREFIXES) >= RECORDS_MAX:
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
