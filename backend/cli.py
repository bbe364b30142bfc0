"""``python -m backend``: serve the example backend with werkzeug's threaded server.

What this module is for: the command line (flags, ``BACKEND_*`` environment
variables, defaults; flag > environment > default, as in README
"Configuration"), building the tracer provider, installing the W3C Level 2
propagator, serving, and a clean stop on SIGTERM/SIGINT that flushes the
spans still queued.

What it is not for: production serving (``gunicorn backend.wsgi:app`` is that)
or any route logic (``backend.app``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from werkzeug.serving import BaseWSGIServer, make_server

if TYPE_CHECKING:
    pass

log = logging.getLogger("backend")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4567
DEFAULT_LOG_LEVEL = "info"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
FALSE_VALUES = frozenset({"", "0", "false", "no", "off"})


@dataclass(frozen=True)
class BackendOptions:
    """The resolved command line, each value already validated."""

    host: str
    port: int
    log_level: str
    enable_test_callback: bool
    frontend_origins: tuple[str, ...] = ()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backend",
        description="Serve the example Cruddur-like Flask API, traced with OpenTelemetry "
        "(spans go where the standard OTEL_* variables say).",
    )
    parser.add_argument(
        "--host", help=f"address to listen on (env BACKEND_HOST, default {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port",
        help=f"port to listen on, 0 for any free port (env BACKEND_PORT, default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--log-level",
        help=f"one of {', '.join(LOG_LEVELS)} (env BACKEND_LOG_LEVEL, default {DEFAULT_LOG_LEVEL})",
    )
    parser.add_argument(
        "--frontend-url",
        help="comma-separated browser origins granted CORS on /api/* "
        "(env FRONTEND_URL, default http://localhost:3000,http://127.0.0.1:3000)",
    )
    parser.add_argument(
        "--enable-test-callback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="register POST /api/trace-context-test, the W3C trace-context test-suite "
        "service; it only calls back to loopback addresses "
        "(env BACKEND_ENABLE_TEST_CALLBACK=1, default off)",
    )
    return parser


def _resolve(
    flag: str | None, flag_name: str, env: Mapping[str, str], var: str, default: str
) -> tuple[str, str]:
    """The raw value (flag > environment > default) and its source, which
    error messages name so the user knows what to fix."""
    if flag is not None:
        return flag, flag_name
    if var in env:
        return env[var], var
    return default, "default"


def parse_options(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> BackendOptions:
    """Flags, then ``BACKEND_*`` variables, then defaults; a bad value exits 2
    with one line ``backend: error: ...`` (argparse's ``parser.error``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ

    host, source = _resolve(args.host, "--host", env, "BACKEND_HOST", DEFAULT_HOST)
    if not host.strip():
        parser.error(f"{source} is empty: give an address such as 127.0.0.1 or 0.0.0.0")

    raw_port, source = _resolve(args.port, "--port", env, "BACKEND_PORT", str(DEFAULT_PORT))
    if not (raw_port.isascii() and raw_port.isdigit()) or int(raw_port) > 65535:
        parser.error(f"{source}={raw_port!r}: the port must be an integer from 0 to 65535")

    raw_level, source = _resolve(
        args.log_level, "--log-level", env, "BACKEND_LOG_LEVEL", DEFAULT_LOG_LEVEL
    )
    level = raw_level.strip().lower()
    if level not in LOG_LEVELS:
        parser.error(
            f"{source}={raw_level!r}: the log level must be one of {', '.join(LOG_LEVELS)}"
        )

    enable: bool | None = args.enable_test_callback
    if enable is None:
        raw = env.get("BACKEND_ENABLE_TEST_CALLBACK", "").strip().lower()
        if raw not in TRUE_VALUES | FALSE_VALUES:
            parser.error(
                f"BACKEND_ENABLE_TEST_CALLBACK={raw!r}: use 1/true/yes/on or 0/false/no/off"
            )
        enable = raw in TRUE_VALUES

    from backend.app import DEFAULT_FRONTEND_ORIGINS, parse_frontend_url

    raw_origins, source = _resolve(
        args.frontend_url, "--frontend-url", env, "FRONTEND_URL", ",".join(DEFAULT_FRONTEND_ORIGINS)
    )
    try:
        origins = parse_frontend_url(raw_origins)
    except ValueError as error:
        parser.error(f"{source}={raw_origins!r}: {error}")
    return BackendOptions(
        host=host,
        port=int(raw_port),
        log_level=level,
        enable_test_callback=enable,
        frontend_origins=origins,
    )


def _url(host: str, port: int) -> str:
    # An IPv6 literal needs brackets in a URL (RFC 3986 §3.2.2).
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # werkzeug logs every request at INFO: noise unless debugging.
    if options.log_level != "debug":
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before anything slow, so an early Ctrl-C is a clean stop
    # rather than a KeyboardInterrupt traceback.
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    # Imported here, not at module level, so --help and bad flags answer fast.
    from opentelemetry.propagate import set_global_textmap

    from backend.app import create_app
    from latency_common.telemetry import build_tracer_provider, shutdown_tracer_provider
    from latency_common.tracestate import global_propagator

    provider = build_tracer_provider("backend")
    # W3C Trace Context Level 2 tracestate rules for the Flask and requests
    # instrumentations (they propagate through the global propagator).
    set_global_textmap(global_propagator())
    app = create_app(
        tracer_provider=provider,
        enable_test_callback=options.enable_test_callback,
        frontend_origins=options.frontend_origins,
    )
    try:
        server: BaseWSGIServer = make_server(options.host, options.port, app, threaded=True)
    except OSError as error:
        provider.shutdown()
        print(
            f"backend: error: cannot listen on {_url(options.host, options.port)}: {error}"
            " (choose another --port/BACKEND_PORT or --host/BACKEND_HOST)",
            file=sys.stderr,
        )
        return 2

    listening = f"backend listening on {_url(options.host, server.server_port)}"
    log.info("%s", listening)
    print(listening, flush=True)
    if options.enable_test_callback:
        log.warning("POST /api/trace-context-test is enabled (calls back to loopback only)")

    serving = threading.Thread(target=server.serve_forever, name="backend-http", daemon=True)
    serving.start()
    # The signal handlers set the flag; the timeout lets the loop notice a
    # serving thread that died on its own.
    while not stop.wait(timeout=1.0):
        if not serving.is_alive():
            log.error("the HTTP server stopped unexpectedly")
            break
    log.info("stopping")
    server.shutdown()
    server.server_close()
    shutdown_tracer_provider(provider)
    return 0 if stop.is_set() else 1
