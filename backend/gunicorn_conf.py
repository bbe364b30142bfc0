"""gunicorn settings for the backend: ``gunicorn -c backend/gunicorn_conf.py backend.wsgi:app``.

What it is for: flushing each worker's spans when the worker exits (a
SIGTERM to the arbiter, a max-requests restart, a scale-down), bounded like
every other stop in this project, so a dead collector cannot hold up a
deploy. The batch processor would otherwise rely on the SDK's own atexit
hook, whose wait is unbounded when the endpoint hangs.
"""

from __future__ import annotations

import os
from typing import Any

bind = os.environ.get("BACKEND_BIND", "0.0.0.0:4567")
worker_class = "gthread"
threads = int(os.environ.get("BACKEND_THREADS", "8"))
workers = int(os.environ.get("BACKEND_WORKERS", "2"))
# Spans are the access log; gunicorn's own goes to stderr only when asked.
accesslog = None


def worker_exit(server: Any, worker: Any) -> None:
    from backend import wsgi
    from latency_common.telemetry import shutdown_tracer_provider

    shutdown_tracer_provider(wsgi.provider)
