"""The design the project did not pick: a Flask + requests reverse proxy.

What it is for: the "gunicorn gthread Flask + requests" cases of ``make
bench`` (ARCHITECTURE.md §2 explains the choice). Each gunicorn worker thread forwards
with its own ``requests.Session`` (pooled keep-alive connections to the
upstream), streams the body back, and copies the headers minus the
hop-by-hop ones. With ``BENCH_OTEL=1`` it is instrumented the way such an
app usually is: ``FlaskInstrumentor`` + ``RequestsInstrumentor``, spans
through a ``BatchSpanProcessor`` to the OTLP/HTTP endpoint of the standard
``OTEL_*`` variables (the SDK's defaults otherwise).

Not for: production. Served by ``run.py`` as

    BENCH_UPSTREAM=http://127.0.0.1:P gunicorn --worker-class gthread --workers 2 \\
        --threads 8 --chdir benchmarks/proxies flask_requests:app
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import requests
from flask import Flask, Response, request

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:4567").rstrip("/")
# RFC 9110 §7.6.1: fields that belong to one hop, never forwarded.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)

app = Flask(__name__)
_local = threading.local()


def _session() -> requests.Session:
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        session.trust_env = False
        _local.session = session
    return session


@app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
@app.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
def proxy(path: str) -> Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    body = request.stream if request.content_length else None
    upstream = _session().request(
        request.method,
        # gunicorn's RAW_URI: the path and query as the client sent them.
        UPSTREAM + (request.environ.get("RAW_URI") or request.full_path.rstrip("?")),
        headers=headers,
        data=body,
        stream=True,
        allow_redirects=False,
        timeout=30,
    )

    def chunks() -> Iterator[bytes]:
        try:
            yield from upstream.raw.stream(64 * 1024, decode_content=False)
        finally:
            upstream.close()

    out = [(k, v) for k, v in upstream.raw.headers.items() if k.lower() not in HOP_BY_HOP]
    return Response(chunks(), status=upstream.status_code, headers=out)


if os.environ.get("BENCH_OTEL") == "1":
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # gunicorn imports this module in each worker after the fork (no
    # --preload), so each process gets its own processor thread.
    _provider = TracerProvider(resource=Resource.create({"service.name": "flask-proxy"}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    FlaskInstrumentor().instrument_app(app, tracer_provider=_provider)
    RequestsInstrumentor().instrument(tracer_provider=_provider)
