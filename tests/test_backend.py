"""Tests for ``backend/``: routes, spans, the CLI and the W3C callback service.

Route behaviour runs in-process through Flask's test client with an in-memory
span exporter; what depends on a real HTTP server (raw request targets,
chunked bodies, propagated headers, signals) runs on werkzeug's server or a
``python -m backend`` subprocess on an ephemeral 127.0.0.1 port.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from werkzeug.serving import make_server

from backend.app import CHUNK_BYTES, COOKIES, MAX_BYTES, callback_url_problem, create_app
from backend.cli import parse_options

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(rb"^backend listening on http://127\.0\.0\.1:(\d+)\r?\n$")
INBOUND_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
INBOUND_PARENT_ID = "b7ad6b7169203331"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def _app(exporter: InMemorySpanExporter, *, enable_test_callback: bool = False) -> Flask:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return create_app(tracer_provider=provider, enable_test_callback=enable_test_callback)


@pytest.fixture
def client(exporter: InMemorySpanExporter) -> FlaskClient:
    return _app(exporter, enable_test_callback=True).test_client()


# --- the home feed and its custom span --------------------------------------


@pytest.mark.parametrize(
    ("header", "user_id"),
    [
        ({"X-User-Id": "worf42"}, "worf42"),
        ({"X-User-Id": "a b;c"}, "andrewbrown"),
        ({}, "andrewbrown"),
    ],
)
def test_home_feed_has_mock_data_span_under_the_server_span(
    client: FlaskClient, exporter: InMemorySpanExporter, header: dict[str, str], user_id: str
) -> None:
    response = client.get("/api/activities/home", headers=header)
    assert response.status_code == 200
    activities = response.get_json()
    assert len(activities) == 5
    assert {"uuid", "handle", "display_name", "message", "replies"} <= activities[0].keys()
    assert datetime.fromisoformat(activities[0]["created_at"]).tzinfo is not None

    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    (mock,) = [s for s in spans if s.name == "mock-data"]
    assert server.name == "GET /api/activities/home"
    assert mock.context.trace_id == server.context.trace_id
    assert mock.parent is not None
    assert mock.parent.span_id == server.context.span_id
    attributes = mock.attributes or {}
    now = datetime.fromisoformat(str(attributes["app.now"]))
    assert now.tzinfo is not None
    assert abs((datetime.now(UTC) - now).total_seconds()) < 60
    assert attributes["app.user_id"] == user_id
    assert attributes["app.result_length_bytes"] == len(response.data)


# --- demo and test routes ----------------------------------------------------


def test_health_and_redirect(client: FlaskClient) -> None:
    assert client.get("/api/health").get_json() == {"status": "ok"}
    response = client.get("/api/redirect")
    assert response.status_code == 302
    assert response.headers["Location"] == "/api/activities/home"


def test_slow_sleeps_for_the_asked_time(client: FlaskClient) -> None:
    started = time.perf_counter()
    response = client.get("/api/slow?ms=50")
    assert time.perf_counter() - started >= 0.05
    assert response.get_json() == {"slept_ms": 50}


@pytest.mark.parametrize(
    "query", ["", "?ms=", "?ms=-1", "?ms=abc", "?ms=1.5", "?ms=+5", "?ms=60001"]
)
def test_slow_rejects_bad_ms_with_json_400(client: FlaskClient, query: str) -> None:
    response = client.get(f"/api/slow{query}")
    assert response.status_code == 400
    assert response.content_type == "application/json"
    assert "ms must be an integer from 0 to 60000" in response.get_json()["error"]


@pytest.mark.parametrize(
    ("code", "expected_status", "expected_body"),
    [
        (200, 200, b'{"status":200}\n'),
        (418, 418, b'{"status":418}\n'),
        (599, 599, b'{"status":599}\n'),
        (204, 204, b""),  # RFC 9110 §15.3.5, §15.4.5: no content, no Content-Type
        (304, 304, b""),
        (100, 400, None),  # 1xx are interim, never a final answer (RFC 9110 §15.2)
        (600, 400, None),
    ],
)
def test_status_answers_that_status(
    client: FlaskClient, code: int, expected_status: int, expected_body: bytes | None
) -> None:
    response = client.get(f"/api/status/{code}")
    assert response.status_code == expected_status
    if expected_body is None:
        assert "from 200 to 599" in response.get_json()["error"]
    else:
        assert response.data == expected_body
        assert ("Content-Type" in response.headers) == bool(expected_body)


@pytest.mark.parametrize("n", [0, 1, 255, CHUNK_BYTES, 200_000])
def test_bytes_are_deterministic_and_streamed_in_chunks(client: FlaskClient, n: int) -> None:
    response = client.get(f"/api/bytes?n={n}", buffered=False)
    try:
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert response.headers["Content-Length"] == str(n)
        chunks = list(response.iter_encoded())
    finally:
        response.close()
    assert b"".join(chunks) == bytes(i % 256 for i in range(n))
    assert all(len(chunk) <= CHUNK_BYTES for chunk in chunks)


def test_bytes_accepts_2_gib_and_refuses_more(client: FlaskClient) -> None:
    head = client.head(f"/api/bytes?n={MAX_BYTES}")  # HEAD: the 2 GiB are never produced
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(2 * 1024**3)
    for bad in (str(MAX_BYTES + 1), "-1", "x", ""):
        response = client.get(f"/api/bytes?n={bad}")
        assert response.status_code == 400, bad
        assert "n must be an integer" in response.get_json()["error"]


def test_gzip_body_is_compressed_json_with_its_own_length(client: FlaskClient) -> None:
    first, second = client.get("/api/gzip"), client.get("/api/gzip")
    assert first.headers["Content-Encoding"] == "gzip"
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["Content-Length"] == str(len(first.data))
    assert json.loads(gzip.decompress(first.data))["compressed"] is True
    assert first.data == second.data  # mtime=0: identical bytes every time


def test_cookies_are_two_separate_headers(client: FlaskClient) -> None:
    response = client.get("/api/cookies")
    assert response.status_code == 200
    cookies = response.headers.getlist("Set-Cookie")
    assert cookies == list(COOKIES)
    assert "Expires=" in cookies[0]
    assert "HttpOnly" in cookies[1]


def test_echo_reports_method_target_headers_and_body_hash(client: FlaskClient) -> None:
    body = os.urandom(300_000)
    response = client.post(
        "/api/echo/a%2Fb?q=%2F",
        data=body,
        headers=[("X-First", "1"), ("X-Second", "2")],
    )
    echoed = response.get_json()
    assert echoed["method"] == "POST"
    assert echoed["raw_uri"] == "/api/echo/a%2Fb?q=%2F"
    assert echoed["body_bytes"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    headers = [tuple(pair) for pair in echoed["headers"]]
    assert headers.index(("X-First", "1")) < headers.index(("X-Second", "2"))


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"])
def test_echo_accepts_any_method(client: FlaskClient, method: str) -> None:
    response = client.open("/api/echo", method=method)
    assert response.status_code == 200
    assert response.get_json()["method"] == method


def test_echo_head_has_headers_but_no_body(client: FlaskClient) -> None:
    response = client.head("/api/echo")
    assert response.status_code == 200
    assert response.data == b""
    assert int(response.headers["Content-Length"]) > 0


def test_errors_are_json(client: FlaskClient) -> None:
    missing = client.get("/api/nope")
    assert missing.status_code == 404
    assert missing.content_type == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", missing.get_json()["trace_id"])
    wrong_method = client.post("/api/health")
    assert wrong_method.status_code == 405
    assert wrong_method.get_json()["status"] == 405
    assert "GET" in wrong_method.headers["Allow"]


# --- the W3C trace-context service -------------------------------------------


def test_trace_context_route_absent_without_the_flag(exporter: InMemorySpanExporter) -> None:
    response = _app(exporter).test_client().post("/api/trace-context-test", json=[])
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:7777/x", True),
        ("http://127.2.3.4/", True),
        ("http://[::1]:80/", True),
        ("http://localhost:1/", True),
        ("http://example.com/cb", False),
        ("http://10.0.0.1/cb", False),
        ("http://[::ffff:10.0.0.1]/cb", False),
        ("https://127.0.0.1/cb", False),
        ("ftp://127.0.0.1/cb", False),
        ("http://user:pw@127.0.0.1/cb", False),
        ("http://127.0.0.1:99999/cb", False),
        ("http:///cb", False),
    ],
)
def test_callback_urls_must_be_plain_http_to_loopback(url: str, allowed: bool) -> None:
    assert (callback_url_problem(url) is None) == allowed


@pytest.mark.parametrize(
    "body",
    [
        [{"url": "http://example.com/", "arguments": []}],
        {"url": "x"},
        [{"url": "http://127.0.0.1/"}],
        [1],
        [{"url": "http://127.0.0.1/", "arguments": []}] * 17,
    ],
)
def test_trace_context_refuses_bad_bodies_before_calling_anything(
    client: FlaskClient, body: Any
) -> None:
    response = client.post("/api/trace-context-test", json=body)
    assert response.status_code == 400
    assert response.get_json()["error"]


class _Recorder(BaseHTTPRequestHandler):
    calls: list[tuple[str, list[str], bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.calls.append((self.path, self.headers.get_all("traceparent") or [], body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _serving(server: Any) -> Iterator[int]:
    # A short poll interval keeps shutdown() (and so teardown) quick.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def callback_calls() -> Iterator[tuple[int, list[tuple[str, list[str], bytes]]]]:
    calls: list[tuple[str, list[str], bytes]] = []
    handler = type("Recorder", (_Recorder,), {"calls": calls})
    with _serving(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as port:
        yield port, calls


@pytest.fixture
def backend_port(exporter: InMemorySpanExporter) -> Iterator[int]:
    app = _app(exporter, enable_test_callback=True)
    with _serving(make_server("127.0.0.1", 0, app, threaded=True)) as port:
        yield port


def _request(port: int, method: str, target: str, **kwargs: Any) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, target, **kwargs)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_trace_context_callbacks_carry_the_propagated_context(
    backend_port: int, callback_calls: tuple[int, list[tuple[str, list[str], bytes]]]
) -> None:
    callback_port, calls = callback_calls
    items = [
        {
            "url": f"http://127.0.0.1:{callback_port}/one",
            "arguments": [{"url": "u", "arguments": []}],
        },
        {"url": f"http://127.0.0.1:{callback_port}/two", "arguments": []},
    ]
    traceparent = f"00-{INBOUND_TRACE_ID}-{INBOUND_PARENT_ID}-01"
    status, body = _request(
        backend_port,
        "POST",
        "/api/trace-context-test",
        body=json.dumps(items),
        headers={"Content-Type": "application/json", "traceparent": traceparent},
    )
    assert (status, json.loads(body)) == (200, {})
    assert [path for path, _, _ in calls] == ["/one", "/two"]
    for (_, traceparents, sent), item in zip(calls, items, strict=True):
        assert len(traceparents) == 1
        version, trace_id, parent_id, _flags = traceparents[0].split("-")
        assert (version, trace_id) == ("00", INBOUND_TRACE_ID)
        assert parent_id != INBOUND_PARENT_ID
        assert re.fullmatch(r"[0-9a-f]{16}", parent_id)
        assert json.loads(sent) == item["arguments"]


def test_echo_on_a_real_server_keeps_the_raw_target_and_dechunks(backend_port: int) -> None:
    pieces = [b"abc", os.urandom(70_000), b"", b"xyz"]
    status, body = _request(
        backend_port, "PUT", "/api/echo/a%2Fb?q=%2F%20", body=iter(pieces), encode_chunked=True
    )
    echoed = json.loads(body)
    assert status == 200
    assert echoed["raw_uri"] == "/api/echo/a%2Fb?q=%2F%20"
    assert ["Transfer-Encoding", "chunked"] in echoed["headers"]
    assert echoed["body_bytes"] == sum(map(len, pieces))
    assert echoed["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


# --- the backend's own CORS (FRONTEND_URL) --------------------------------------

DEMO = "http://localhost:3000"
CORS_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Expose-Headers",
)


@pytest.mark.parametrize("origin", [DEMO, "http://127.0.0.1:3000"])
def test_backend_grants_its_frontend_origins_without_credentials(
    client: FlaskClient, origin: str
) -> None:
    response = client.get("/api/activities/home", headers={"Origin": origin})
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert response.headers["Access-Control-Expose-Headers"] == "location, link"
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "Origin" in response.headers["Vary"]


@pytest.mark.parametrize(
    ("method", "requested", "allow_headers"),
    [
        ("POST", "Content-Type, traceparent", "content-type"),
        ("GET", "if-modified-since", "if-modified-since"),
        ("GET", None, None),
    ],
)
def test_backend_preflight_grants_its_methods_and_headers_only(
    client: FlaskClient, method: str, requested: str | None, allow_headers: str | None
) -> None:
    headers = {"Origin": DEMO, "Access-Control-Request-Method": method}
    if requested is not None:
        headers["Access-Control-Request-Headers"] = requested
    response = client.options("/api/activities/home", headers=headers)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == DEMO
    assert response.headers["Access-Control-Allow-Methods"] == "OPTIONS, GET, HEAD, POST"
    assert response.headers.get("Access-Control-Allow-Headers") == allow_headers
    assert "Access-Control-Allow-Credentials" not in response.headers


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/api/activities/home", {"Origin": "https://evil.example"}),
        ("GET", "/api/activities/home", {"Origin": "HTTP://LOCALHOST:3000"}),
        ("GET", "/api/activities/home", {"Origin": DEMO + "/"}),
        ("GET", "/api/activities/home", {}),
        ("OPTIONS", "/api/echo", {"Origin": DEMO, "Access-Control-Request-Method": "PUT"}),
        ("OPTIONS", "/api/echo", {"Origin": DEMO, "Access-Control-Request-Method": "DELETE"}),
    ],
)
def test_backend_grants_nothing_else(
    client: FlaskClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = client.open(path, method=method, headers=headers)
    for name in CORS_HEADERS:
        assert name not in response.headers


def test_backend_cors_is_for_api_paths_only(exporter: InMemorySpanExporter) -> None:
    app = _app(exporter)
    app.add_url_rule("/elsewhere", view_func=lambda: "x")
    response = app.test_client().get("/elsewhere", headers={"Origin": DEMO})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_frontend_url_names_the_granted_origins(exporter: InMemorySpanExporter) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    options = parse_options([], {"FRONTEND_URL": "https://app.example.com/ , http://a.test:8080"})
    assert options.frontend_origins == ("https://app.example.com", "http://a.test:8080")
    app = create_app(tracer_provider=provider, frontend_origins=options.frontend_origins)
    for origin, granted in ((DEMO, False), ("https://app.example.com", True)):
        response = app.test_client().get("/api/health", headers={"Origin": origin})
        assert ("Access-Control-Allow-Origin" in response.headers) is granted
    assert parse_options([], {}).frontend_origins == (DEMO, "http://127.0.0.1:3000")
    flag = parse_options(["--frontend-url", "http://x.test"], {"FRONTEND_URL": "bad"})
    assert flag.frontend_origins == ("http://x.test",)


# --- the command line ----------------------------------------------------------


def test_options_flag_beats_environment_beats_default() -> None:
    defaults = parse_options([], {})
    assert (defaults.host, defaults.port, defaults.log_level) == ("127.0.0.1", 4567, "info")
    assert defaults.enable_test_callback is False
    env = {
        "BACKEND_PORT": "5000",
        "BACKEND_LOG_LEVEL": "DEBUG",
        "BACKEND_ENABLE_TEST_CALLBACK": "1",
    }
    from_env = parse_options([], env)
    assert (from_env.port, from_env.log_level, from_env.enable_test_callback) == (
        5000,
        "debug",
        True,
    )
    flags = parse_options(["--port", "0", "--no-enable-test-callback"], env)
    assert (flags.port, flags.enable_test_callback) == (0, False)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "65536"], {}, "--port='65536': the port must be an integer from 0 to 65535"),
        ([], {"BACKEND_PORT": "-1"}, "BACKEND_PORT='-1'"),
        ([], {"BACKEND_LOG_LEVEL": "loud"}, "the log level must be one of"),
        ([], {"BACKEND_ENABLE_TEST_CALLBACK": "maybe"}, "BACKEND_ENABLE_TEST_CALLBACK='maybe'"),
        (["--host", " "], {}, "--host is empty"),
        ([], {"FRONTEND_URL": "localhost:3000"}, "FRONTEND_URL='localhost:3000': origins look"),
        (["--frontend-url", "http://a.test/path"], {}, "--frontend-url='http://a.test/path'"),
    ],
)
def test_options_bad_values_exit_2_with_the_source_named(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_options(argv, env)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "OTEL_"))}
    # Nothing listens on port 1: spans go nowhere real.
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:1"
    return env | extra


def _wait_listening(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            line = proc.stdout.readline()
            assert line, f"backend exited with {proc.wait(timeout=5)} before listening"
            if match := LISTENING.match(line):
                return int(match.group(1))
    raise AssertionError(f"no listening line within {timeout_s} s")


@contextlib.contextmanager
def _backend(tmp_path: Path, *args: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    with (
        (tmp_path / "stderr.txt").open("wb") as stderr,
        subprocess.Popen(
            [sys.executable, "-m", "backend", *args],
            cwd=ROOT,
            env=_env(**env),
            stdout=subprocess.PIPE,
            stderr=stderr,
        ) as proc,
    ):
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_cli_serves_the_feed_and_stops_on_sigterm(tmp_path: Path) -> None:
    with _backend(tmp_path, "--port", "0") as proc:
        port = _wait_listening(proc)
        status, body = _request(port, "GET", "/api/activities/home")
        assert status == 200
        assert len(json.loads(body)) == 5
        proc.send_signal(signal.SIGTERM)
        # Bounded even though the OTLP endpoint is dead: the span of the GET
        # above is still queued and the exporter would retry for 10 s.
        assert proc.wait(timeout=8) == 0
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr
    assert "/api/activities/home" not in stderr  # no per-request access log at info


def test_cli_flag_beats_bad_env_and_ctrl_c_is_clean(tmp_path: Path) -> None:
    with _backend(tmp_path, "--port", "0", BACKEND_PORT="abc") as proc:
        _wait_listening(proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=8) == 0
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["--port", "99999"], {}, 2, "backend: error: --port='99999': the port must be"),
        ([], {"BACKEND_PORT": "abc"}, 2, "backend: error: BACKEND_PORT='abc': the port must be"),
        (["--help"], {}, 0, None),
    ],
)
def test_cli_help_and_bad_port(
    args: list[str], env: dict[str, str], code: int, message: str | None
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "backend", *args],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == code
    assert "Traceback" not in done.stderr
    if message is None:
        for flag in ("--host", "--port", "--log-level", "--enable-test-callback", "BACKEND_PORT"):
            assert flag in done.stdout
    else:
        # argparse prints its usage, then exactly one error line, last.
        errors = [line for line in done.stderr.splitlines() if line.startswith("backend:")]
        assert errors == [done.stderr.rstrip().splitlines()[-1]]
        assert errors[0].startswith(message)
