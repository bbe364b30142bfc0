"""OTLP/HTTP trace export wire formats: request bodies in, span records out,
and the response bodies the spec asks for.

What it is for: the OTLP/HTTP encodings of ``ExportTraceServiceRequest``
(binary protobuf and OTLP/JSON, optionally gzip-compressed), decoded with
hard size caps, and the ``ExportTraceServiceResponse`` / ``google.rpc.Status``
answers in the request's own encoding. Spec:
https://opentelemetry.io/docs/specs/otlp/#otlphttp

Not for: reading the body off the socket or choosing the HTTP status
(``app.py``), storing anything (``store.py``). Everything here is CPU work
on bytes already in memory, run in a worker thread by the caller.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

# protobuf and googleapis-common-protos ship no type stubs (types-protobuf is
# not a dependency here); the OTLP message classes below are typed.
from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError as ProtobufDecodeError  # type: ignore[import-untyped]
from google.rpc import status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from viewer.spans import SpanRecord

Encoding = Literal["protobuf", "json"]

#: Cap on the body as sent and again after decompression (a gzip bomb of a
#: few KiB can inflate to gigabytes). The OTel SDKs' default batch of 512
#: spans is well under 1 MiB, so this only stops abuse.
MAX_BODY_BYTES: Final = 16 * 1024 * 1024

PROTOBUF_TYPE: Final = "application/x-protobuf"
JSON_TYPE: Final = "application/json"
#: OTLP/HTTP: "application/x-protobuf" for binary, "application/json" for JSON.
#: "application/protobuf" is the IANA-registered spelling some clients send.
CONTENT_TYPES: Final[dict[str, Encoding]] = {
    PROTOBUF_TYPE: "protobuf",
    "application/protobuf": "protobuf",
    JSON_TYPE: "json",
}
#: OTLP/HTTP: clients MAY gzip the body; nothing else is in the spec.
CONTENT_ENCODINGS: Final = ("", "identity", "gzip", "x-gzip")

#: OTLP times are unsigned 64-bit; SQLite integers are signed (year 2262).
MAX_TIME_NS: Final = 2**63 - 1

#: google.rpc.Code values used in error bodies.
INVALID_ARGUMENT: Final = 3
RESOURCE_EXHAUSTED: Final = 8
UNAVAILABLE: Final = 14


#: Defaults of the per-span bounds below (``--max-attribute-chars`` etc.).
DEFAULT_ATTRIBUTE_CHARS: Final = 4096
#: OTel SDK defaults: OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT and
#: OTEL_SPAN_EVENT_COUNT_LIMIT are 128 (specification, "Span Limits").
DEFAULT_ATTRIBUTES_PER_SPAN: Final = 128
DEFAULT_EVENTS_PER_SPAN: Final = 128


@dataclass(frozen=True, slots=True)
class Limits:
    """What one span may weigh once stored, as the OTel SDKs' attribute and
    span limits bound it at the source (specification, "Attribute Limits"
    and "Span Limits"): a sender that does not apply them, or a hostile
    one, must not fill the store with one span.

    ``attribute_chars``: OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT semantics, a
    string value, and each string in an array value, is cut to this many
    characters; other types are kept. The viewer applies it also to keys,
    nested key-value lists, span, event and service names and status
    messages. ``attributes`` / ``events``: the first ones are kept, later
    ones dropped, as the SDKs do."""

    attribute_chars: int = DEFAULT_ATTRIBUTE_CHARS
    attributes: int = DEFAULT_ATTRIBUTES_PER_SPAN
    events: int = DEFAULT_EVENTS_PER_SPAN


class PayloadError(Exception):
    """A body that cannot be decoded: HTTP 400, nothing stored."""


class PayloadTooLarge(Exception):
    """A body over the cap, as sent or once decompressed: HTTP 413."""


def content_encoding_supported(value: str) -> bool:
    return value.strip().lower() in CONTENT_ENCODINGS


def decompress(body: bytes, content_encoding: str, limit: int = MAX_BODY_BYTES) -> bytes:
    if content_encoding.strip().lower() in ("gzip", "x-gzip"):
        return gunzip(body, limit)
    return body


def gunzip(data: bytes, limit: int = MAX_BODY_BYTES) -> bytes:
    """Inflate a gzip body a bounded piece at a time, never holding more than
    ``limit`` + 1 bytes of output (``zlib``'s ``max_length``), so a bomb is
    refused after costing at most ``limit`` bytes of memory. Concatenated
    gzip members are one valid stream (RFC 1952 §2.2)."""
    out = bytearray()
    rest = data
    while True:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        pending = rest
        try:
            while not inflater.eof:
                piece = inflater.decompress(pending, limit + 1 - len(out))
                out += piece
                if len(out) > limit:
                    raise PayloadTooLarge(f"body inflates to more than {limit} bytes")
                pending = inflater.unconsumed_tail
                if not pending and not piece:
                    raise PayloadError("gzip body is truncated")
        except zlib.error as exc:
            raise PayloadError(f"gzip body is corrupt: {exc}") from None
        rest = inflater.unused_data
        if not rest:
            return bytes(out)


def parse_request(body: bytes, encoding: Encoding) -> ExportTraceServiceRequest:
    message = ExportTraceServiceRequest()
    if encoding == "protobuf":
        try:
            message.ParseFromString(body)
        except (ProtobufDecodeError, RecursionError) as exc:
            raise PayloadError(f"not an OTLP protobuf ExportTraceServiceRequest: {exc}") from None
        return message
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise PayloadError("OTLP/JSON body must be an object with resourceSpans")
    _hex_ids_to_base64(document)
    try:
        # OTLP/JSON: "receivers MUST ignore message fields with unknown
        # names", so a newer client's extra fields are not an error.
        json_format.ParseDict(document, message, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, TypeError, ValueError) as exc:
        raise PayloadError(f"not an OTLP/JSON ExportTraceServiceRequest: {exc}") from None
    return message


_ID_KEYS: Final = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")


def _hex_ids_to_base64(document: dict[str, Any]) -> None:
    """OTLP/JSON departs from the proto3 JSON mapping on ids: ``traceId``,
    ``spanId`` and ``parentSpanId`` are hex strings, not base64 (OTLP spec,
    "JSON Protobuf Encoding"), so rewrite them before ``json_format`` reads
    them as ``bytes`` fields. Spans and their links carry ids."""
    for resource_spans in _objects(document, "resourceSpans", "resource_spans"):
        for scope_spans in _objects(resource_spans, "scopeSpans", "scope_spans"):
            for span in _objects(scope_spans, "spans"):
                _convert_ids(span)
                for link in _objects(span, "links"):
                    _convert_ids(link)


def _objects(container: dict[str, Any], *keys: str) -> Iterable[dict[str, Any]]:
    for key in keys:
        items = container.get(key)
        if isinstance(items, list):
            yield from (item for item in items if isinstance(item, dict))


def _convert_ids(obj: dict[str, Any]) -> None:
    for key in _ID_KEYS:
        value = obj.get(key)
        if not isinstance(value, str):
            continue  # absent, or a type json_format will reject with its own message
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise PayloadError(f"{key} must be a hex string, got {value[:40]!r}") from None
        obj[key] = base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True, slots=True)
class Decoded:
    spans: list[SpanRecord]
    rejected: int
    error_message: str


def decode(
    body: bytes,
    encoding: Encoding,
    content_encoding: str,
    limit: int,
    limits: Limits = Limits(),
) -> Decoded:
    """The whole path from received bytes to span records; raises
    ``PayloadError`` / ``PayloadTooLarge`` before anything is stored."""
    return to_records(parse_request(decompress(body, content_encoding, limit), encoding), limits)


def to_records(
    message: ExportTraceServiceRequest,
    limits: Limits = Limits(),
) -> Decoded:
    records: list[SpanRecord] = []
    rejected = 0
    chars = limits.attribute_chars
    for resource_spans in message.resource_spans:
        service = "unknown_service"  # the SDKs' own default (OTel resource semconv)
        for attr in resource_spans.resource.attributes:
            if attr.key == "service.name" and attr.value.string_value:
                service = attr.value.string_value[:chars]
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if not _valid_ids(span.trace_id, span.span_id, span.parent_span_id):
                    rejected += 1
                    continue
                records.append(
                    SpanRecord(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        service=service,
                        name=span.name[:chars],
                        kind=int(span.kind),
                        start_ns=min(span.start_time_unix_nano, MAX_TIME_NS),
                        end_ns=min(span.end_time_unix_nano, MAX_TIME_NS),
                        status_code=int(span.status.code),
                        status_message=span.status.message[:chars],
                        attributes=attributes(span.attributes, limits),
                        events=[
                            {
                                "name": event.name[:chars],
                                "time_ns": event.time_unix_nano,
                                "attributes": attributes(event.attributes, limits),
                            }
                            for event in span.events[: limits.events]
                        ],
                    )
                )
    message_text = (
        f"{rejected} span(s) rejected: trace_id must be 16 bytes and span_id 8 bytes, not all zero"
        if rejected
        else ""
    )
    return Decoded(records, rejected, message_text)


def _valid_ids(trace_id: bytes, span_id: bytes, parent_span_id: bytes) -> bool:
    # OTLP trace.proto: trace_id is 16 bytes, span_id 8, all-zero is invalid;
    # parent_span_id is empty for a root span.
    return (
        len(trace_id) == 16
        and any(trace_id)
        and len(span_id) == 8
        and any(span_id)
        and len(parent_span_id) in (0, 8)
    )


def attributes(
    pairs: Sequence[KeyValue],
    limits: Limits = Limits(),
) -> dict[str, Any]:
    chars = limits.attribute_chars
    # OTel keeps the first attributes up to the count limit; a repeated key
    # keeps its last value, as a dict does.
    return {pair.key[:chars]: any_value(pair.value, chars) for pair in pairs[: limits.attributes]}


def any_value(value: AnyValue, chars: int = DEFAULT_ATTRIBUTE_CHARS) -> Any:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value[:chars]
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        number = value.double_value
        # NaN and ±Infinity are not JSON: keep them as the text OTLP/JSON uses.
        return number if math.isfinite(number) else str(number)
    if kind == "array_value":
        return [any_value(item, chars) for item in value.array_value.values]
    if kind == "kvlist_value":
        pairs = value.kvlist_value.values
        return {pair.key[:chars]: any_value(pair.value, chars) for pair in pairs}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")[:chars]
    return None


def success_body(encoding: Encoding, decoded: Decoded) -> bytes:
    """OTLP/HTTP: 200 with an ``ExportTraceServiceResponse`` in the request's
    encoding; ``partial_success`` only when some spans were rejected."""
    response = ExportTraceServiceResponse()
    if decoded.rejected:
        response.partial_success.rejected_spans = decoded.rejected
        response.partial_success.error_message = decoded.error_message
    return _serialize(response, encoding)


def status_body(encoding: Encoding, code: int, message: str) -> bytes:
    """OTLP/HTTP: 4xx/5xx bodies are a ``google.rpc.Status`` in the request's
    encoding."""
    return _serialize(status_pb2.Status(code=code, message=message), encoding)


def _serialize(message: Any, encoding: Encoding) -> bytes:
    if encoding == "protobuf":
        data: bytes = message.SerializeToString()
        return data
    document = json_format.MessageToDict(message)
    return json.dumps(document).encode("utf-8")


def media_type(encoding: Encoding) -> str:
    return PROTOBUF_TYPE if encoding == "protobuf" else JSON_TYPE
