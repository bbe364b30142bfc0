"""Build the OpenTelemetry tracer provider for the gateway and the backend.

What this module is for: one place that turns the standard ``OTEL_*``
environment variables into a ``TracerProvider`` exporting OTLP/HTTP through a
``BatchSpanProcessor``, so gateway and backend are configured alike. The
exporter is :class:`~latency_common.otlp_exporter.FastOTLPSpanExporter` (the
SDK's, with a faster encoder) posting on one kept-alive ``http.client``
connection (:func:`export_transport`), or, when a proxy applies to the
endpoint or a credential-provider plugin is set, through a ``requests.Session``
whose proxy settings are read from the environment once, at start
(:func:`export_session`), not on every post.

It also guards the export: :class:`GuardedExporter` drops a span that
cannot be encoded (a timestamp out of protobuf's range, say) alone, so one
bad span never loses the batch it sits in.

What it is not for: creating spans. Library code never sets the global tracer
provider; the entry points (``python -m gateway``, ``python -m backend``) call
:func:`build_tracer_provider` and pass the result to their ``create_app``.

Telemetry fails open (after the OTel BatchSpanProcessor): the
exporter's blocking HTTP call runs on the processor's own thread, never on the
event loop or a request thread; export failures are logged at most once a
minute per logger, and requests never feel them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import requests
import requests.utils
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler
from opentelemetry.util.re import parse_env_headers

from latency_common.logs import RateLimitFilter
from latency_common.otlp_exporter import FastOTLPSpanExporter
from latency_common.otlp_transport import build_keep_alive_transport

if TYPE_CHECKING:
    from opentelemetry.exporter.http.transport._base import BaseHTTPTransport

log = logging.getLogger(__name__)

#: Where spans go when no OTLP endpoint is configured: the OTel default port,
#: spelled with 127.0.0.1 rather than ``localhost`` so no resolver or IPv6
#: ``::1`` attempt sits in front of every export. The local viewer listens here.
DEFAULT_OTLP_ENDPOINT = "http://127.0.0.1:4318"

#: Spans per export batch unless ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` says
#: otherwise. The processor thread builds and posts a whole batch while
#: holding the GIL, which stalls the gateway's event loop: with the official
#: encoder 512-span batches pushed p99 from 5.6 ms to 29 ms here, 64-span
#: batches to 13 ms (README, "Benchmarks"). The gateway's own spans now
#: arrive encoded (``gateway/spans.py``), so a batch costs the thread the
#: join and the post; the gateway's process also shortens the interpreter's
#: switch interval (``gateway/cli.py``) so that no single hold runs long.
DEFAULT_EXPORT_BATCH_SIZE = 64

#: Loggers the OTLP exporter and the batch processor complain through.
_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.sdk._shared_internal",
    "latency_common.otlp_exporter",
)

#: One export failure message per logger per this many seconds: an endpoint
#: that is down for an hour must not write a line per batch.
EXPORT_LOG_INTERVAL_S = 60.0


def _install_export_log_limits() -> None:
    for name in _EXPORT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
            logger.addFilter(RateLimitFilter(EXPORT_LOG_INTERVAL_S))


#: With a Honeycomb key and no endpoint, spans go to Honeycomb.
HONEYCOMB_ENDPOINT = "https://api.honeycomb.io"
HONEYCOMB_HEADER = "x-honeycomb-team"


def otlp_traces_endpoint(environ: Mapping[str, str]) -> str:
    """The URL spans are posted to, resolved as the OTel SDK documents it.

    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is used as is; the generic
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` gets ``/v1/traces`` appended (OTel
    specification, "Endpoint URLs for OTLP/HTTP"). With neither, Honeycomb
    when ``HONEYCOMB_API_KEY`` is set, else the local viewer.
    """
    signal = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if signal:
        return signal
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not base:
        base = HONEYCOMB_ENDPOINT if _honeycomb_key(environ) else DEFAULT_OTLP_ENDPOINT
    return base.rstrip("/") + "/v1/traces"


def _honeycomb_key(environ: Mapping[str, str]) -> str:
    return environ.get("HONEYCOMB_API_KEY", "").strip()


def otlp_headers(environ: Mapping[str, str]) -> dict[str, str] | None:
    """Export headers: the ``OTEL_EXPORTER_OTLP_*HEADERS`` the SDK would use,
    plus ``x-honeycomb-team`` from ``HONEYCOMB_API_KEY`` unless they already
    set it. None when there is no key: the SDK reads its own.

    An explicit ``headers=`` argument may replace the environment's headers
    (it did in earlier SDKs), so the union is computed here and passed whole.
    """
    key = _honeycomb_key(environ)
    if not key:
        return None
    raw = environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or environ.get(
        "OTEL_EXPORTER_OTLP_HEADERS", ""
    )
    headers = {k.lower(): v for k, v in parse_env_headers(raw, liberal=True).items()}
    headers.setdefault(HONEYCOMB_HEADER, key)
    return headers


def describe_destination(environ: Mapping[str, str]) -> str:
    """Where spans go, for the first log line (never the key itself)."""
    endpoint = otlp_traces_endpoint(environ)
    if _honeycomb_key(environ):
        return f"{endpoint} (OTLP/HTTP protobuf, Honeycomb API key set)"
    if endpoint == DEFAULT_OTLP_ENDPOINT + "/v1/traces":
        return f"{endpoint} (OTLP/HTTP protobuf: the local viewer, python -m viewer)"
    return f"{endpoint} (OTLP/HTTP protobuf)"


#: ``OTEL_PYTHON_EXPORTER_OTLP_HTTP_*CREDENTIAL_PROVIDER``: a plugin that
#: builds the exporter's session itself; the SDK loads it when we pass none.
_CREDENTIAL_PROVIDER_VARS = (
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
)


def _credential_plugin(environ: Mapping[str, str]) -> bool:
    """Whether a credential-provider plugin builds the exporter's session."""
    return any(environ.get(name, "").strip() for name in _CREDENTIAL_PROVIDER_VARS)


def export_session(endpoint: str, environ: Mapping[str, str]) -> requests.Session | None:
    """The exporter's HTTP session, with what ``requests`` would look up in
    the environment on every post resolved once, now.

    ``requests`` with ``trust_env`` (its default) reads the proxy variables
    and ``~/.netrc`` for each request: tens of µs of the export thread's GIL
    time per post. Here ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` and
    ``NO_PROXY`` are applied to the endpoint once and ``trust_env`` is off
    afterwards, so a proxy still works but a change to the variables (or to
    ``~/.netrc``, no longer read) needs a restart. None (the SDK builds its
    own) when a credential-provider plugin is configured.
    """
    if _credential_plugin(environ):
        return None
    session = requests.Session()
    # get_environ_proxies applies NO_PROXY to this endpoint; it reads
    # os.environ, which is what requests itself would have read per post.
    session.proxies.update(requests.utils.get_environ_proxies(endpoint))
    session.trust_env = False
    return session


def _ca_bundle(environ: Mapping[str, str]) -> str | None:
    """``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``, which ``requests`` honours only
    with ``trust_env``: passed on as the exporter's certificate unless an
    ``OTEL_EXPORTER_OTLP_*CERTIFICATE`` names one."""
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE") or environ.get(
        "OTEL_EXPORTER_OTLP_CERTIFICATE"
    ):
        return None
    return environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE") or None


def export_transport(endpoint: str, environ: Mapping[str, str]) -> BaseHTTPTransport | None:
    """The lean keep-alive transport (``latency_common/otlp_transport.py``)
    when nothing needs ``requests``: no proxy applies to the endpoint, no
    credential-provider plugin is configured and this SDK has the transport
    interface. None otherwise: the exporter then posts through
    :func:`export_session`.

    TLS settings are resolved as the SDK resolves them for its own transport:
    ``OTEL_EXPORTER_OTLP_*CERTIFICATE`` / ``*CLIENT_KEY`` /
    ``*CLIENT_CERTIFICATE``, else ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``,
    else the system's CAs."""
    if _credential_plugin(environ):
        return None
    # Reads os.environ (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY), as export_session does.
    if requests.utils.get_environ_proxies(endpoint):
        return None
    verify: bool | str = (
        _ca_bundle(environ)
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
        or environ.get("OTEL_EXPORTER_OTLP_CERTIFICATE")
        or True
    )
    key = environ.get("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY") or environ.get(
        "OTEL_EXPORTER_OTLP_CLIENT_KEY"
    )
    certificate = environ.get("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE") or environ.get(
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"
    )
    cert = (certificate, key) if certificate and key else certificate
    return build_keep_alive_transport(endpoint, verify=verify, cert=cert)


def build_exporter(environ: Mapping[str, str]) -> GuardedExporter:
    """The span exporter :func:`build_telemetry` uses: the fast OTLP/HTTP
    exporter posting through :func:`export_transport`, or through a session
    resolved once (:func:`export_session`) when a proxy or a
    credential-provider plugin needs ``requests``, behind :class:`GuardedExporter`."""
    endpoint = otlp_traces_endpoint(environ)
    transport = export_transport(endpoint, environ)
    if transport is not None:
        exporter = FastOTLPSpanExporter(
            endpoint=endpoint,
            headers=otlp_headers(environ),
            _transport=transport,
        )
    else:
        exporter = FastOTLPSpanExporter(
            endpoint=endpoint,
            headers=otlp_headers(environ),
            certificate_file=_ca_bundle(environ),
            session=export_session(endpoint, environ),
        )
    return GuardedExporter(exporter)


def build_resource(default_service_name: str) -> Resource:
    """Resource with ``service.name``: ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` win over the per-service default."""
    resource = Resource.create({SERVICE_NAME: default_service_name})
    # Resource.create lets its argument win over the environment; merge the
    # environment's own attributes back on top so the documented variables win.
    return resource.merge(OTELResourceDetector().detect())


class GuardedExporter(SpanExporter):
    """Delegates to an exporter; a batch that fails is re-encoded span by
    span with the official OTLP encoder, and the spans that cannot be
    encoded are dropped and counted, the rest exported.

    ``OTLPSpanExporter.export`` (1.45) catches the encoder's exception
    itself, logs "Failed to encode span batch" and returns FAILURE for the
    whole batch: every span in it would be lost for one bad one. The normal
    path costs nothing extra: only a failed export is looked at again.
    """

    def __init__(self, delegate: SpanExporter) -> None:
        self.delegate = delegate
        self._unencodable_spans = 0
        #: Spans the endpoint took, and spans lost to a failed export (after
        #: the SDK exporter's own retries): the health report's figures.
        self.exported_spans = 0
        self.failed_spans = 0
        self._lock = threading.Lock()
        self._next_warning = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._checked(spans)
        # One export thread calls this (the batch processor's): plain counts.
        if result is SpanExportResult.SUCCESS:
            self.exported_spans += len(spans)
        else:
            self.failed_spans += len(spans)
        return result

    def _checked(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.delegate.export(spans)
        if result is SpanExportResult.SUCCESS:
            return result
        good: list[ReadableSpan] = []
        bad: list[ReadableSpan] = []
        for span in spans:
            (good if _encodable(span) else bad).append(span)
        if not bad:
            return result  # not an encoding problem: the endpoint failed
        with self._lock:
            self._unencodable_spans += len(bad)
            total = self.unencodable_spans
            now = time.monotonic()
            warn = now >= self._next_warning
            if warn:
                self._next_warning = now + EXPORT_LOG_INTERVAL_S
        if warn:
            log.warning(
                "dropped %d span(s) that cannot be encoded for OTLP (%s); %d so far",
                len(bad),
                ", ".join(sorted({span.name for span in bad})[:5]),
                total,
            )
        return self.delegate.export(good) if good else SpanExportResult.SUCCESS

    @property
    def unencodable_spans(self) -> int:
        """Spans dropped because they cannot be encoded, here or by a
        delegate that leaves them out itself (``FastOTLPSpanExporter``)."""
        own: int = getattr(self.delegate, "unencodable_spans", 0)
        return self._unencodable_spans + own

    def shutdown(self) -> None:
        self.delegate.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.delegate.force_flush(timeout_millis)


def _encodable(span: ReadableSpan) -> bool:
    try:
        encode_spans([span]).SerializePartialToString()
    except Exception:  # whatever the encoder raises, the span cannot be sent
        return False
    return True


class CountingSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans handed to it.

    The SDK offers no public view of its queue; counting what goes in here
    and what the exporter sent or lost (:class:`GuardedExporter`) gives the
    health report its figures without reaching into private attributes."""

    def __init__(self, exporter: SpanExporter, **options: Any) -> None:
        super().__init__(exporter, **options)
        self.ended_spans = 0

    def on_end(self, span: ReadableSpan) -> None:
        # The batch processor keeps sampled spans only (the same test).
        if span.context is not None and span.context.trace_flags.sampled:
            self.ended_spans += 1
        super().on_end(span)


@dataclass(frozen=True, slots=True)
class Telemetry:
    """The handles a process keeps on what it built: the provider to start
    spans with, the span processor spans built elsewhere (browser spans from
    beacons, the gateway's own spans: ``gateway/spans.py``) are handed to,
    the span limits the provider applies, and the guarded exporter's
    counters. With a processor, it must be the provider's only one: spans
    handed to it directly reach no other."""

    provider: TracerProvider
    processor: SpanProcessor | None = None
    exporter: GuardedExporter | None = field(default=None)
    #: None: ``SpanLimits()``, from the ``OTEL_*_LIMIT`` variables, as the
    #: provider's default.
    span_limits: SpanLimits | None = None

    def exporter_status(self) -> dict[str, Any]:
        """For ``/__gateway/health``: spans handed to the batch processor,
        exported, lost to failed exports and left out as unencodable; the
        difference is what waits in the queue (or was dropped by a full one,
        which the SDK logs)."""
        status: dict[str, Any] = {"queued_spans": None}
        if self.exporter is not None:
            status.update(
                exported_spans=self.exporter.exported_spans,
                failed_spans=self.exporter.failed_spans,
                unencodable_spans=self.exporter.unencodable_spans,
            )
            if isinstance(self.processor, CountingSpanProcessor):
                status["ended_spans"] = ended = self.processor.ended_spans
                done = self.exporter.exported_spans + self.exporter.failed_spans
                status["queued_spans"] = max(ended - done - self.exporter.unencodable_spans, 0)
        return status


def build_telemetry(
    default_service_name: str,
    *,
    default_sampler: Sampler | None = None,
) -> Telemetry:
    """A tracer provider exporting OTLP/HTTP protobuf through a batch
    processor and a :class:`GuardedExporter`, with the handles on both.

    ``default_sampler`` applies only when ``OTEL_TRACES_SAMPLER`` is unset (the
    gateway passes ``ALWAYS_ON``: it samples every request, whatever the
    inbound flag says; the backend passes ``None`` and gets the SDK default,
    ``parentbased_always_on``).
    """
    env = os.environ
    sampler = default_sampler if "OTEL_TRACES_SAMPLER" not in env else None
    limits = SpanLimits()
    provider = TracerProvider(
        resource=build_resource(default_service_name), sampler=sampler, span_limits=limits
    )
    exporter = build_exporter(env)
    batch_size = None if "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" in env else DEFAULT_EXPORT_BATCH_SIZE
    processor = CountingSpanProcessor(exporter, max_export_batch_size=batch_size)
    provider.add_span_processor(processor)
    _install_export_log_limits()
    service = provider.resource.attributes.get(SERVICE_NAME)
    log.info("spans from %s go to %s", service, describe_destination(env))
    return Telemetry(provider, processor, exporter, limits)


def build_tracer_provider(
    default_service_name: str,
    *,
    default_sampler: Sampler | None = None,
) -> TracerProvider:
    """:func:`build_telemetry`'s provider, for processes that need no other handle."""
    return build_telemetry(default_service_name, default_sampler=default_sampler).provider


#: How long a stopping process waits for queued spans to be exported.
SHUTDOWN_FLUSH_TIMEOUT_S = 3.0


def shutdown_tracer_provider(
    provider: TracerProvider, timeout_s: float = SHUTDOWN_FLUSH_TIMEOUT_S
) -> bool:
    """Flush and shut the provider down, waiting at most ``timeout_s``.

    The OTLP exporter retries an unreachable endpoint for up to its 10 s
    timeout; telemetry fails open, so a dead collector must not
    hold up a stop. Spans still queued after the wait are dropped, with one
    warning. Returns True when the flush finished in time.
    """
    flusher = threading.Thread(target=provider.shutdown, name="otel-flush", daemon=True)
    flusher.start()
    flusher.join(timeout_s)
    if flusher.is_alive():
        log.warning(
            "spans not exported within %.0f s of stopping were dropped "
            "(is the OTLP endpoint reachable?)",
            timeout_s,
        )
        return False
    return True


__all__ = [
    "ALWAYS_ON",
    "DEFAULT_OTLP_ENDPOINT",
    "GuardedExporter",
    "Telemetry",
    "build_exporter",
    "build_resource",
    "build_telemetry",
    "build_tracer_provider",
    "export_session",
    "otlp_traces_endpoint",
    "shutdown_tracer_provider",
]
