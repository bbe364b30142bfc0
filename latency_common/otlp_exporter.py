"""The SDK's OTLP/HTTP span exporter, serialising with ``latency_common/otlp_encode.py``.

What it is for: :class:`FastOTLPSpanExporter` is opentelemetry-exporter-otlp-
proto-http's ``OTLPSpanExporter`` (endpoint, headers, compression, retries,
timeouts, the ``OTEL_EXPORTER_OTLP_*`` variables, its size limit and its
metrics all unchanged) with one step replaced: the request body is written by
:mod:`latency_common.otlp_encode` instead of the official protobuf encoder, which
holds the GIL about 4x longer. A span that cannot be encoded is left out with
one warning instead of failing its whole batch.

Not for: choosing where spans go (``latency_common/telemetry.py``) or encoding.

How: ``OTLPSpanExporter.export`` (1.45.1) serialises inline, as
``encode_spans(spans).SerializePartialToString()`` with ``encode_spans`` a
global of its module, then hands the bytes to its retrying HTTP client. There
is no method to override for that step alone, so :func:`_sdk_export_with`
runs the SDK's own ``export`` code with that one global name bound to this
module's encoder: the retry loop, size check and metrics are the SDK's, not a
copy. That is the one place relying on the SDK's internals;
tests/test_otlp_encode.py fails when a new SDK serialises differently (and
until then the exporter falls back to the official encoder, never breaks).
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable, Sequence
from typing import Final, cast

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from latency_common.otlp_encode import encode_spans_dropping_invalid

log = logging.getLogger(__name__)

#: The global name ``OTLPSpanExporter.export`` serialises through.
SDK_ENCODER_NAME: Final = "encode_spans"

_Export = Callable[[OTLPSpanExporter, Sequence[ReadableSpan]], SpanExportResult]

#: How many spans the last batch encoded on this thread left out: the SDK
#: keeps only the bytes of what it asked to be encoded, so the count comes
#: back to :meth:`FastOTLPSpanExporter.export` this way.
_last_batch = threading.local()


class _Serialized:
    """Stands in for the protobuf request the SDK would build: the SDK only
    asks it for its bytes."""

    __slots__ = ("_body",)

    def __init__(self, body: bytes) -> None:
        self._body = body

    def SerializePartialToString(self) -> bytes:  # protobuf's method name
        return self._body


def _encode(spans: Sequence[ReadableSpan]) -> _Serialized:
    batch = encode_spans_dropping_invalid(spans)
    _last_batch.dropped = batch.dropped
    if batch.dropped:
        log.warning(
            "%d of %d spans left out of an OTLP export, they could not be encoded (%.200s)",
            batch.dropped,
            len(spans),
            batch.first_error,
        )
    return _Serialized(batch.body)


def _sdk_export_with(encode: Callable[[Sequence[ReadableSpan]], object]) -> _Export:
    """``OTLPSpanExporter.export`` with its ``encode_spans`` global bound to ``encode``."""
    sdk_export = OTLPSpanExporter.export
    namespace = dict(sdk_export.__globals__)
    namespace[SDK_ENCODER_NAME] = encode
    function = types.FunctionType(
        sdk_export.__code__,
        namespace,
        sdk_export.__name__,
        sdk_export.__defaults__,
        sdk_export.__closure__,
    )
    return cast(_Export, function)


_export: Final = _sdk_export_with(_encode)


class FastOTLPSpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` with the request body written by ``latency_common.otlp_encode``.

    Same constructor, same environment variables, same bytes on the wire.
    ``unencodable_spans`` counts the spans left out."""

    unencodable_spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        _last_batch.dropped = 0
        result = _export(self, spans)
        # One export thread per exporter (the batch processor's): no lock.
        self.unencodable_spans += _last_batch.dropped
        return result


__all__ = ["FastOTLPSpanExporter"]
