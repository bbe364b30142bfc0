"""WSGI entry point for gunicorn: ``gunicorn backend.wsgi:app``.

What this module is for: being imported by a WSGI server. Unlike the rest of
the package it does its work at import time, because that is the job of an
entry point: it builds the OTLP tracer provider from the ``OTEL_*`` variables
and the app. With ``--workers N`` (no ``--preload``) each worker imports it,
so each process gets its own provider and batch-processor thread.

What it is not for: tests (they call ``backend.app.create_app`` with their
own provider) or flags (gunicorn has its own; the ``BACKEND_*`` variables of
``python -m backend`` do not apply, except ``BACKEND_ENABLE_TEST_CALLBACK``;
``FRONTEND_URL`` names the browser origins granted CORS, as for
``python -m backend``).
"""

from __future__ import annotations

import os

from opentelemetry.propagate import set_global_textmap

from backend.app import DEFAULT_FRONTEND_ORIGINS, create_app, parse_frontend_url
from backend.cli import TRUE_VALUES
from latency_common.telemetry import build_tracer_provider
from latency_common.tracestate import global_propagator

provider = build_tracer_provider("backend")
# W3C Trace Context Level 2 tracestate rules for the Flask and requests
# instrumentations (they propagate through the global propagator).
set_global_textmap(global_propagator())
app = create_app(
    tracer_provider=provider,
    enable_test_callback=os.environ.get("BACKEND_ENABLE_TEST_CALLBACK", "").strip().lower()
    in TRUE_VALUES,
    frontend_origins=parse_frontend_url(
        os.environ.get("FRONTEND_URL") or ",".join(DEFAULT_FRONTEND_ORIGINS)
    ),
)
