"""The real commands as processes: ``python -m gateway`` and ``python -m backend``
exporting to a real OTLP/HTTP receiver; memory with a 200 MB body; 1 000 idle
connections; several workers on one port; clean shutdown on SIGTERM."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.otlp_receiver import OtlpReceiver
from tests.servers import ROOT, Process, free_port

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def _get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _one_worker(backend: Process) -> list[str]:
    return ["--upstream", backend.url, "--port", "0", "--workers", "1"]


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rec:
        yield rec


@pytest.fixture
def backend_proc(receiver: OtlpReceiver) -> Iterator[Process]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with Process("backend", ["--port", "0"], env) as proc:
        yield proc


HONEYCOMB_ENV = {"HONEYCOMB_API_KEY": "test-key", "OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.fixture
def honeycomb_backend(receiver: OtlpReceiver) -> Iterator[Process]:
    env = {**HONEYCOMB_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    with Process("backend", ["--port", "0"], env) as proc:
        yield proc


def test_stack_exports_one_trace_from_both_services_with_the_honeycomb_key(
    receiver: OtlpReceiver, honeycomb_backend: Process
) -> None:
    env = {**HONEYCOMB_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    port = free_port()
    args = ["--upstream", honeycomb_backend.url, "--port", str(port), "--workers", "2"]
    with Process("gateway", args, env) as gateway:
        now_ms = time.time() * 1000
        status, headers, body = _get(
            gateway.port,
            "/api/activities/home",
            {
                "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
                "X-Client-Timestamp": f"{now_ms - 5:.3f}",
                "X-Client-Clock": "off=0, d=2, age=100",
            },
        )
        assert status == 200
        assert json.loads(body)
        assert "traceparent;desc=" in headers["Server-Timing"]
        code, err = gateway.terminate()
        assert code == 0, err
    assert "test-key" not in err
    assert "Honeycomb API key set" in err
    spans = receiver.wait_for(lambda s: len([x for x in s if x.trace_id == TRACE_ID]) >= 3)
    ours = {(s.service, s.name): s for s in spans if s.trace_id == TRACE_ID}
    gateway_spans = [s for s in spans if s.service == "gateway" and s.trace_id == TRACE_ID]
    assert [s.kind for s in gateway_spans] == [2]  # one SERVER span by default
    server = gateway_spans[0]
    flask = ours[("backend", "GET /api/activities/home")]
    mock = ours[("backend", "mock-data")]
    assert server.parent_span_id == PARENT_ID
    assert flask.parent_span_id == server.span_id
    assert mock.parent_span_id == flask.span_id
    assert mock.attributes["app.result_length_bytes"] == len(body)
    assert "latency.gateway_ms" in server.attributes
    assert server.attributes["latency.status"] == "ok"
    assert server.attributes["latency.trust"] == "client_only"
    assert "latency.uplink_ms" in server.attributes
    # README "Configuration": HONEYCOMB_API_KEY becomes the x-honeycomb-team header of
    # every export, from both services.
    assert receiver.headers
    for sent in receiver.headers:
        assert sent["x-honeycomb-team"] == "test-key"
        assert sent["Content-Type"] == "application/x-protobuf"
    assert {s.service for s in spans} >= {"gateway", "backend"}


def test_requests_never_feel_a_dead_or_hanging_exporter(backend_proc: Process) -> None:
    """Exporter down (refused) or hanging (accepts, never answers): requests
    still succeed and the export complaints are rate-limited in the log."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(100)  # accepts connections, never answers
    try:
        for endpoint in (
            f"http://127.0.0.1:{free_port()}",
            f"http://127.0.0.1:{hang.getsockname()[1]}",
        ):
            env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
            }
            with Process("gateway", _one_worker(backend_proc), env) as gw:
                started = time.monotonic()
                for _ in range(300):
                    status, _, _ = _get(gw.port, "/api/health")
                    assert status == 200
                assert time.monotonic() - started < 60
                code, err = gw.terminate()
            assert code == 0
            export_lines = [
                ln for ln in err.splitlines() if "opentelemetry" in ln and "WARNING" in ln
            ]
            assert len(export_lines) <= 6, export_lines
    finally:
        hang.close()


def test_sigterm_stops_every_worker(backend_proc: Process) -> None:
    port = free_port()
    args = ["--upstream", backend_proc.url, "--port", str(port), "--workers", "2"]
    with Process("gateway", args) as gateway:
        pids = set()
        deadline = time.monotonic() + 20
        # SO_REUSEPORT spreads new connections over both workers.
        while len(pids) < 2 and time.monotonic() < deadline:
            status, _, body = _get(gateway.port, "/__gateway/health")
            assert status == 200
            pids.add(json.loads(body)["pid"])
        assert len(pids) == 2
        code, err = gateway.terminate()
        assert code == 0, err
        assert "Traceback" not in err
        for pid in pids:
            assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_200_mb_response_streams_in_bounded_memory(backend_proc: Process) -> None:
    size = 200 * 1024 * 1024
    with Process(
        "gateway", ["--upstream", backend_proc.url, "--port", "0", "--workers", "1"]
    ) as gw:
        _get(gw.port, "/__gateway/health")
        rss_before = gw.rss_kib()
        peak = rss_before
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
        digest = hashlib.sha256()
        received = 0
        try:
            conn.request("GET", f"/api/bytes?n={size}")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(size)
            # Read slowly enough that a buffering proxy would have to hold it.
            while chunk := resp.read(1024 * 1024):
                digest.update(chunk)
                received += len(chunk)
                if received % (16 * 1024 * 1024) < len(chunk):
                    peak = max(peak, gw.rss_kib())
        finally:
            conn.close()
        peak = max(peak, gw.rss_kib())
    assert received == size
    direct = hashlib.sha256()
    conn = http.client.HTTPConnection("127.0.0.1", backend_proc.port, timeout=60)
    try:
        conn.request("GET", f"/api/bytes?n={size}")
        resp = conn.getresponse()
        while chunk := resp.read(1024 * 1024):
            direct.update(chunk)
    finally:
        conn.close()
    assert digest.hexdigest() == direct.hexdigest()
    # Constant memory: growth is a few buffers, nowhere near the body size.
    assert peak - rss_before < 40 * 1024, (rss_before, peak)


def test_thousand_idle_keepalive_connections_do_not_block_others(
    backend_proc: Process,
) -> None:
    with Process(
        "gateway", ["--upstream", backend_proc.url, "--port", "0", "--workers", "1"]
    ) as gw:
        idle: list[socket.socket] = []
        try:
            for _ in range(1000):
                sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
                idle.append(sock)
            # Half of them have made a request and now sit idle, kept alive;
            # the other half never sent a byte (a slow client's opening).
            for sock in idle[:500]:
                sock.sendall(b"GET /__gateway/clock HTTP/1.1\r\nHost: x\r\n\r\n")
            for sock in idle[:500]:
                assert sock.recv(65536).startswith(b"HTTP/1.1 204")
            results: list[float] = []

            def one() -> None:
                started = time.monotonic()
                status, _, _ = _get(gw.port, "/api/activities/home")
                assert status == 200
                results.append(time.monotonic() - started)

            threads = [threading.Thread(target=one) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            assert len(results) == 20
            # Answered while 1 000 connections sit open: within seconds, not
            # after any idle connection times out.
            assert max(results) < 10
        finally:
            for sock in idle:
                sock.close()


def test_backend_under_gunicorn_flushes_spans_when_its_workers_exit(
    receiver: OtlpReceiver,
) -> None:
    """The production backend (docker-compose's command): the spans of a
    request still queued in a worker reach the collector when gunicorn stops."""
    port = free_port()
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        # A schedule delay far longer than the test: only the exit flush sends.
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
        "BACKEND_BIND": f"127.0.0.1:{port}",
        "BACKEND_WORKERS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "backend/gunicorn_conf.py", "backend.wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _, _ = _get(port, "/api/activities/home")
                break
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.2)
        assert status == 200
        assert not [s for s in receiver.spans if s.service == "backend"]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    spans = receiver.wait_for(lambda s: any(x.name == "mock-data" for x in s), timeout_s=10)
    assert {s.name for s in spans if s.service == "backend"} >= {
        "GET /api/activities/home",
        "mock-data",
    }
