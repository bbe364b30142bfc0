"""The example backend: a Cruddur-like Flask API instrumented with OpenTelemetry.

What this package is for: the upstream the gateway is demonstrated and tested
against (README "Backend"). ``backend.app.create_app`` is the app factory,
``python -m backend`` (``backend.cli``) serves it with werkzeug, and
``backend.wsgi:app`` is the entry point for gunicorn.

What it is not for: production traffic or anything the gateway needs at run
time. Importing this package does nothing: no tracer provider, no
instrumentation, no sockets.
"""

from __future__ import annotations
