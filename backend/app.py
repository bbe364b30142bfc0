"""The example backend: a Cruddur-like Flask API, traced with OpenTelemetry.

What this module is for: :func:`create_app`, the app factory. It builds a
Flask app instrumented with ``FlaskInstrumentor`` (a SERVER span per request)
and ``RequestsInstrumentor`` (CLIENT spans and injected ``traceparent`` for
outgoing calls), the home feed with its custom ``mock-data`` span, the
routes that make demos and proxy tests honest (echo, slow, status, bytes,
gzip, cookies, redirect) and the backend's own CORS (``FRONTEND_URL``). Its
spans follow the gateway's privacy rules (README "Secrets and privacy in
spans"): sensitive query values become ``REDACTED`` and
``Authorization``/``Cookie``/``Set-Cookie`` are never recorded, whatever the
``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*`` variables ask
(:func:`span_scrubber`).

What it is not for: building the tracer provider or serving. Nothing happens
at import time and no global tracer provider is set here (after the Flask
tutorial's ``create_app``); ``backend.cli`` and ``backend.wsgi`` build
the provider and pass it in, tests pass one with an in-memory exporter.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from flask import Flask, Response, abort, current_app, jsonify, redirect, request
from opentelemetry import trace
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.sdk.trace import Span as SdkSpan
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule
from werkzeug.wrappers import Response as BaseResponse

from backend.data import DEMO_USER_ID, home_activities
from latency_common.redact import QueryRedactor

MAX_SLOW_MS = 60_000
MAX_BYTES = 2 * 1024**3
CHUNK_BYTES = 64 * 1024
#: The W3C harness sends a handful of callbacks per case; the cap keeps one
#: request from turning the backend into a request amplifier.
MAX_CALLBACKS = 16
MAX_CALLBACK_BODY_BYTES = 64 * 1024
CALLBACK_TIMEOUT_S = 5.0

#: ``app.user_id`` comes from a header anyone can send: keep it short and
#: plain so it cannot bloat spans or smuggle separators into queries.
_USER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: ASCII digits only: ``int()`` alone would accept " 5", "+5", "5_0" and "٥".
_DIGITS = re.compile(r"[0-9]{1,12}")
#: 64 KiB of 0x00..0xff repeated; every /api/bytes body is a prefix of this
#: pattern repeated, so a client can check any byte at offset i is i % 256.
_PATTERN = bytes(range(256)) * (CHUNK_BYTES // 256)
#: mtime=0 keeps the gzip header, hence the bytes, identical on every call.
_GZIP_BODY = gzip.compress(
    json.dumps({"compressed": True, "message": "hello from a gzip body " * 8}).encode(),
    mtime=0,
)
#: Two cookies a proxy must keep as two fields: the comma inside ``Expires``
#: breaks them if they are ever joined into one line (RFC 6265 §3).
COOKIES = (
    "a=1; Expires=Thu, 21 Oct 2055 07:28:00 GMT; Path=/",
    "b=2; Path=/; HttpOnly",
)
#: RFC 9110 §15.3.5, §15.3.6, §15.4.5: these statuses carry no content.
_NO_BODY_STATUSES = frozenset({204, 205, 304})
_TRACER_KEY = "backend.tracer"
_ORIGINS_KEY = "backend.cors_origins"

#: The browser origins the backend grants CORS to, as the original Cruddur
#: backend did with ``FRONTEND_URL`` (the demo page on port 3000).
DEFAULT_FRONTEND_ORIGINS = ("http://localhost:3000", "http://127.0.0.1:3000")
#: The original backend's flask-cors settings, for ``/api/*``: methods,
#: request headers it accepts and response headers it exposes.
CORS_METHODS = ("OPTIONS", "GET", "HEAD", "POST")
CORS_ALLOW_HEADERS = frozenset({"content-type", "if-modified-since"})
CORS_EXPOSE_HEADERS = "location, link"
#: Extra query keys to redact in spans, comma-separated, on top of the
#: gateway's default list (``latency_common.redact.DEFAULT_SENSITIVE_QUERY_KEYS``).
REDACT_QUERY_PARAMS_ENV = "BACKEND_REDACT_QUERY_PARAMS"


def create_app(
    *,
    tracer_provider: trace.TracerProvider | None = None,
    enable_test_callback: bool = False,
    frontend_origins: tuple[str, ...] = DEFAULT_FRONTEND_ORIGINS,
    redact_query_params: Iterable[str] | None = None,
) -> Flask:
    """A new, instrumented backend app.

    ``tracer_provider`` receives the Flask and custom spans (the global one when
    ``None``). ``requests`` is instrumented once per process, with the provider
    of the first app built; later apps reuse it, so building many apps in one
    test process neither double-instruments nor warns. ``enable_test_callback``
    registers ``POST /api/trace-context-test`` (the W3C test-suite service).
    ``frontend_origins`` are the browser origins granted CORS on ``/api/*``.
    ``redact_query_params`` adds query keys to redact in spans (default: the
    comma-separated ``BACKEND_REDACT_QUERY_PARAMS``).
    """
    if redact_query_params is None:
        raw = os.environ.get(REDACT_QUERY_PARAMS_ENV, "")
        redact_query_params = [key.strip() for key in raw.split(",") if key.strip()]
    scrub = span_scrubber(QueryRedactor(redact_query_params))
    app = Flask(__name__)
    app.extensions[_ORIGINS_KEY] = frozenset(frontend_origins)
    app.after_request(cors)
    # The Flask instrumentation ships without type hints. Its request_hook
    # cannot redact (the instrumentation sets the request attributes again
    # after calling it); the response_hook runs after both the request and
    # the response attributes are set, while the span still records.
    FlaskInstrumentor().instrument_app(  # type: ignore[no-untyped-call]
        app,
        tracer_provider=tracer_provider,
        response_hook=lambda span, _status, _headers: scrub(span),
    )
    instrument_requests(tracer_provider, scrub)
    if tracer_provider is not None:
        app.extensions[_TRACER_KEY] = tracer_provider.get_tracer(__name__)
    else:
        app.extensions[_TRACER_KEY] = trace.get_tracer(__name__)

    app.add_url_rule("/api/activities/home", view_func=home)
    app.add_url_rule("/api/health", view_func=health)
    app.add_url_rule("/api/slow", view_func=slow)
    app.add_url_rule("/api/status/<int:code>", view_func=status)
    app.add_url_rule("/api/bytes", view_func=octets)
    app.add_url_rule("/api/gzip", view_func=gzipped)
    app.add_url_rule("/api/cookies", view_func=cookies)
    app.add_url_rule("/api/redirect", view_func=to_home)
    # Flask's add_url_rule always restricts methods; a bare werkzeug Rule with
    # methods=None matches every method, PROPFIND and friends included.
    app.url_map.add(Rule("/api/echo", endpoint="echo"))
    app.url_map.add(Rule("/api/echo/<path:rest>", endpoint="echo"))
    app.view_functions["echo"] = echo
    if enable_test_callback:
        app.add_url_rule("/api/trace-context-test", view_func=trace_context_test, methods=["POST"])
    app.register_error_handler(HTTPException, json_error)
    return app


def span_scrubber(redactor: QueryRedactor) -> Callable[[trace.Span | None], None]:
    """A hook that overwrites a recording span's secrets (sensitive query
    values, captured credential headers) with ``REDACTED``."""

    def scrub(span: trace.Span | None) -> None:
        # Only SDK spans expose what they recorded; others record nothing
        # this process exports.
        if isinstance(span, SdkSpan) and span.is_recording():
            overrides = redactor.span_overrides(span.attributes or {})
            if overrides:
                span.set_attributes(overrides)

    return scrub


def instrument_requests(
    tracer_provider: trace.TracerProvider | None,
    scrub: Callable[[trace.Span | None], None] | None = None,
) -> None:
    """Instrument ``requests`` once per process (CLIENT spans, injected
    ``traceparent``), with the provider and scrubber of the first caller.

    The scrubber runs after the span starts (URL attributes) and after the
    response (captured response headers)."""
    instrumentor = RequestsInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        return
    if scrub is None:
        scrub = span_scrubber(QueryRedactor())
    hook = scrub
    instrumentor.instrument(
        tracer_provider=tracer_provider,
        request_hook=lambda span, _request: hook(span),
        response_hook=lambda span, _request, _response: hook(span),
    )


def json_error(error: HTTPException) -> BaseResponse:
    """HTTP errors as JSON (clients and the gateway parse them), keeping the
    exception's own headers such as ``Allow`` on a 405."""
    response = error.get_response()
    body: dict[str, Any] = {"error": error.description, "status": error.code}
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        body["trace_id"] = trace.format_trace_id(context.trace_id)
    response.set_data(json.dumps(body))
    response.content_type = "application/json"
    return response


def parse_frontend_url(raw: str) -> tuple[str, ...]:
    """``FRONTEND_URL``: comma-separated origins such as http://localhost:3000."""
    origins = tuple(item.strip().rstrip("/") for item in raw.split(",") if item.strip())
    for origin in origins:
        scheme, sep, host = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not host or "/" in host:
            raise ValueError(f"origins look like http://localhost:3000, got {origin!r}")
    return origins


def cors(response: BaseResponse) -> BaseResponse:
    """The backend's own CORS, what the original backend's flask-cors did:
    ``/api/*`` for the ``FRONTEND_URL`` origins, without credentials.

    A small ``after_request`` hook rather than flask-cors: exact origin
    comparison (browsers send the serialised origin, RFC 6454 §6.1; flask-cors
    compares case-insensitively) and no extra dependency for an example app.
    """
    origin = request.headers.get("Origin")
    if (
        origin is None
        or origin not in current_app.extensions[_ORIGINS_KEY]
        or not request.path.startswith("/api/")
    ):
        return response
    response.vary.add("Origin")
    method = request.headers.get("Access-Control-Request-Method")
    if request.method == "OPTIONS" and method is not None:
        # Fetch standard §3.2.3: the preflight answer names what is allowed;
        # a method or header not listed makes the browser refuse the request.
        if method not in CORS_METHODS:
            return response
        requested = request.headers.get("Access-Control-Request-Headers", "")
        allowed = [
            name.strip().lower()
            for name in requested.split(",")
            if name.strip().lower() in CORS_ALLOW_HEADERS
        ]
        response.headers["Access-Control-Allow-Methods"] = ", ".join(CORS_METHODS)
        if allowed:
            response.headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
    else:
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
    response.headers["Access-Control-Allow-Origin"] = origin
    return response


def _int_arg(name: str, maximum: int) -> int:
    raw = request.args.get(name)
    if raw is None or not _DIGITS.fullmatch(raw) or int(raw) > maximum:
        abort(
            400,
            description=f"query parameter {name} must be an integer from 0 to {maximum},"
            f" got {raw!r}",
        )
    return int(raw)


def _user_id() -> str:
    claimed = request.headers.get("X-User-Id", "")
    return claimed if _USER_ID.fullmatch(claimed) else DEMO_USER_ID


def home() -> BaseResponse:
    tracer: trace.Tracer = current_app.extensions[_TRACER_KEY]
    with tracer.start_as_current_span("mock-data") as span:
        now = datetime.now(UTC)
        body = json.dumps(home_activities(now)).encode()
        span.set_attribute("app.now", now.isoformat())
        span.set_attribute("app.user_id", _user_id())
        span.set_attribute("app.result_length_bytes", len(body))
    return Response(body, mimetype="application/json")


def health() -> BaseResponse:
    return jsonify(status="ok")


def slow() -> BaseResponse:
    slept_ms = _int_arg("ms", MAX_SLOW_MS)
    time.sleep(slept_ms / 1000)
    return jsonify(slept_ms=slept_ms)


def status(code: int) -> BaseResponse:
    # 1xx are interim responses (RFC 9110 §15.2): a WSGI app cannot send one
    # as its final answer.
    if not 200 <= code <= 599:
        abort(400, description=f"status code must be from 200 to 599, got {code}")
    if code in _NO_BODY_STATUSES:
        response = Response(status=code)
        del response.headers["Content-Type"]
        return response
    response = jsonify(status=code)
    response.status_code = code
    return response


def octets() -> BaseResponse:
    n = _int_arg("n", MAX_BYTES)

    def generate() -> Iterator[bytes]:
        full_chunks, rest = divmod(n, CHUNK_BYTES)
        for _ in range(full_chunks):
            yield _PATTERN
        if rest:
            yield _PATTERN[:rest]

    response = Response(generate(), mimetype="application/octet-stream")
    response.headers["Content-Length"] = str(n)
    return response


def gzipped() -> BaseResponse:
    # Always compressed, whatever Accept-Encoding says: the route exists to
    # check that a proxy passes encoded bytes through untouched.
    return Response(_GZIP_BODY, mimetype="application/json", headers={"Content-Encoding": "gzip"})


def cookies() -> BaseResponse:
    response = jsonify(cookies=["a", "b"])
    for cookie in COOKIES:
        response.headers.add("Set-Cookie", cookie)
    return response


def to_home() -> BaseResponse:
    return redirect("/api/activities/home", code=302)


def echo(rest: str = "") -> BaseResponse:
    """What the backend received, so tests can compare it with what was sent."""
    digest = hashlib.sha256()
    body_bytes = 0
    # Streamed in chunks: bodies can be gigabytes (chunked ones included, the
    # WSGI server de-chunks them), memory stays constant.
    while chunk := request.stream.read(CHUNK_BYTES):
        digest.update(chunk)
        body_bytes += len(chunk)
    environ = request.environ
    # RAW_URI (gunicorn, werkzeug) / REQUEST_URI (werkzeug, mod_wsgi, uWSGI) is
    # the request target as received; PATH_INFO is already percent-decoded,
    # so %2F would come back as "/". The fallback is only for other servers.
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or request.full_path
    return jsonify(
        method=request.method,
        raw_uri=raw_uri,
        headers=[[name, value] for name, value in request.headers.items()],
        body_bytes=body_bytes,
        body_sha256=digest.hexdigest(),
    )


def callback_url_problem(url: str) -> str | None:
    """Why ``url`` may not be called back, or ``None`` when it may.

    The callback route fetches URLs its caller chose (server-side request
    forgery by design), so only plain http to this machine is allowed.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError on a malformed port
    except ValueError as error:
        return f"callback url {url!r} is malformed: {error}"
    if parts.scheme != "http":
        return f"callback url {url!r} must use http"
    if host is None or parts.username is not None or parts.password is not None:
        return f"callback url {url!r} must name a host and carry no credentials"
    if host == "localhost":
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return f"callback url {url!r} must point at a loopback address (127.0.0.0/8, ::1)"
    return None


def trace_context_test() -> BaseResponse:
    """The W3C trace-context test-suite "service" (w3c/trace-context test/README).

    For each ``{"url", "arguments"}`` item it POSTs ``arguments`` as JSON to
    ``url`` with the instrumented ``requests``, so the callback carries the
    context OpenTelemetry propagates from this request's span.
    """
    request.max_content_length = MAX_CALLBACK_BODY_BYTES
    items = request.get_json(force=True, silent=True)
    if not isinstance(items, list) or len(items) > MAX_CALLBACKS:
        abort(400, description=f"body must be a JSON list of at most {MAX_CALLBACKS} items")
    calls: list[tuple[str, list[Any]]] = []
    for item in items:
        url = item.get("url") if isinstance(item, dict) else None
        arguments = item.get("arguments") if isinstance(item, dict) else None
        if not isinstance(url, str) or not isinstance(arguments, list):
            abort(400, description='each item must be {"url": string, "arguments": list}')
        problem = callback_url_problem(url)
        if problem is not None:
            abort(400, description=problem)
        calls.append((url, arguments))
    with requests.Session() as session:
        # No proxy from the environment: the callback must reach loopback as is.
        session.trust_env = False
        for url, arguments in calls:
            try:
                session.post(url, json=arguments, timeout=CALLBACK_TIMEOUT_S).close()
            except requests.RequestException as error:
                abort(502, description=f"callback to {url} failed: {error}")
    return jsonify({})
