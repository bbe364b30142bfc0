"""Slow, silent and departing clients; shutdown; the worker supervisor.

Every wait on a client is bounded by GATEWAY_CLIENT_TIMEOUT_S (README
"Operating it"): idle keep-alive connections, unfinished request heads,
stalled bodies and clients that stop reading are cut, and the upstream
connection of an unfinished exchange is closed, not pooled. Real sockets on
loopback throughout; the timeouts are short so the tests are.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cli import CrashWindow, kill_deadline_s
from gateway.config import GatewayConfig
from gateway.proxy import StallTimer
from latency_common.logs import RateLimitFilter
from tests.conftest import GatewayFactory, Traced
from tests.otlp_receiver import OtlpReceiver
from tests.servers import ROOT, BackendThread, Process, free_port, parse_head
from tests.upstream import LoopbackServer, ScriptedUpstream, fixed

CLIENT_TIMEOUT_S = 1.0
#: Scheduling slack on a loaded 2-core machine.
SLACK_S = 3.0


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(url)), timeout=30)


def _read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; (bytes, seconds it took)."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    return out, time.monotonic() - started


# -- idle and slow request heads -------------------------------------------------


async def test_idle_connection_is_cut_after_the_client_timeout(gateway: GatewayFactory) -> None:
    base = await gateway(client_timeout_s=CLIENT_TIMEOUT_S)
    with _connect(base) as sock:
        data, elapsed = await asyncio.to_thread(_read_until_closed, sock, 30)
    assert data == b""
    assert CLIENT_TIMEOUT_S * 0.9 <= elapsed < CLIENT_TIMEOUT_S + SLACK_S


async def test_idle_keep_alive_connection_is_cut_after_a_response(
    gateway: GatewayFactory,
) -> None:
    base = await gateway(client_timeout_s=CLIENT_TIMEOUT_S)
    with _connect(base) as sock:
        sock.sendall(b"GET /__gateway/health HTTP/1.1\r\nHost: x\r\n\r\n")
        data, elapsed = await asyncio.to_thread(_read_until_closed, sock, 30)
    status, _, _ = parse_head(data)
    assert status == 200
    assert CLIENT_TIMEOUT_S * 0.9 <= elapsed < CLIENT_TIMEOUT_S + SLACK_S


async def test_request_head_trickling_in_is_cut_after_the_client_timeout(
    gateway: GatewayFactory,
) -> None:
    """Slowloris: bytes keep coming, the head never ends. aiohttp's keep-alive
    timer (started when the connection opens, not reset by incoming bytes)
    is what cuts it; this test fails if a new aiohttp stops doing that."""
    base = await gateway(client_timeout_s=CLIENT_TIMEOUT_S)

    def trickle() -> tuple[float, bool]:
        with _connect(base) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /api/activities/home HTTP/1.1\r\nHost: x\r\n")
            deadline = started + CLIENT_TIMEOUT_S + SLACK_S + 2
            while time.monotonic() < deadline:
                try:
                    sock.sendall(b"X-Slow: a\r\n")
                    sock.settimeout(0.2)
                    if sock.recv(65536) == b"":
                        return time.monotonic() - started, True
                except TimeoutError:
                    continue
                except OSError:
                    return time.monotonic() - started, True
            return time.monotonic() - started, False

    elapsed, cut = await asyncio.to_thread(trickle)
    assert cut, "a request head that never ends was never cut"
    assert CLIENT_TIMEOUT_S * 0.9 <= elapsed < CLIENT_TIMEOUT_S + SLACK_S


# -- request bodies ----------------------------------------------------------------


async def test_small_body_is_read_completely_before_the_upstream_is_called(
    gateway: GatewayFactory,
) -> None:
    scripts = {"/b": fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")}
    async with ScriptedUpstream(scripts) as up:
        base = await gateway(upstream=up.url, client_timeout_s=30)
        with _connect(base) as sock:
            sock.sendall(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
            # Half the body has come: the upstream must not have been called
            # (a backend thread would wait on this client).
            await asyncio.sleep(0.5)
            assert up.requests == []
            sock.sendall(b"world")
            data, _ = await asyncio.to_thread(_read_until_closed_after_response, sock)
        status, _, body = parse_head(data)
        assert (status, body) == (200, b"ok")
        assert len(up.requests) == 1


def _read_until_closed_after_response(sock: socket.socket) -> tuple[bytes, float]:
    sock.settimeout(10)
    out = b""
    while b"\r\n\r\n" not in out or not out.endswith(b"ok"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += chunk
    return out, 0.0


async def test_small_chunked_body_goes_upstream_with_a_content_length(
    gateway: GatewayFactory, backend: BackendThread
) -> None:
    base = await gateway()
    with _connect(base) as sock:
        sock.sendall(
            b"PUT /api/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n"
        )
        data, _ = await asyncio.to_thread(_read_until_closed, sock, 10)
    status, _, body = parse_head(data)
    assert status == 200
    echo = json.loads(body)
    headers = {name.lower(): value for name, value in echo["headers"]}
    assert headers.get("content-length") == "10"
    assert "transfer-encoding" not in headers
    assert echo["body_sha256"] == hashlib.sha256(b"helloworld").hexdigest()


async def test_stalled_small_body_is_408_and_never_forwarded(
    gateway: GatewayFactory, gateway_spans: Traced
) -> None:
    async with ScriptedUpstream({}) as up:
        base = await gateway(upstream=up.url, client_timeout_s=CLIENT_TIMEOUT_S)
        with _connect(base) as sock:
            sock.sendall(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
            data, elapsed = await asyncio.to_thread(_read_until_closed, sock, 30)
        assert up.requests == []
    status, headers, body = parse_head(data)
    assert status == 408
    assert ("Connection", "close") in headers
    assert json.loads(body)["error"] == "request body stalled"
    assert CLIENT_TIMEOUT_S * 0.9 <= elapsed < CLIENT_TIMEOUT_S + SLACK_S
    server = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    assert (server.attributes or {})["http.response.status_code"] == 408


class _RecordingUpstream(LoopbackServer):
    """A raw upstream that records what arrives and when its connection ends.

    ``answer`` is sent once the request head has arrived; with ``endless``
    it then streams a chunked body until the gateway stops reading or closes.
    """

    def __init__(self, answer: bytes = b"", *, endless: bool = False) -> None:
        super().__init__()
        self.answer = answer
        self.endless = endless
        self.received = b""
        self.head_seen = asyncio.Event()
        self.closed = asyncio.Event()
        self.closed_at = 0.0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(60):
                while not reader.at_eof():
                    chunk = await reader.read(65536)
                    self.received += chunk
                    if b"\r\n\r\n" in self.received and not self.head_seen.is_set():
                        self.head_seen.set()
                        if self.answer:
                            writer.write(self.answer)
                        if self.endless:
                            block = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
                            while True:
                                writer.write(block)
                                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self.closed_at = time.monotonic()
            self.closed.set()
            writer.transport.abort()


async def test_stalled_large_body_is_cut_and_the_upstream_connection_closed(
    gateway: GatewayFactory, gateway_spans: Traced
) -> None:
    async with _RecordingUpstream() as up:
        base = await gateway(
            upstream=up.url, client_timeout_s=CLIENT_TIMEOUT_S, buffer_body_bytes=1024
        )
        with _connect(base) as sock:
            sock.sendall(b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            sock.sendall(b"y" * 4096)
            # Larger than the buffer: it streams, the upstream sees it start.
            async with asyncio.timeout(10):
                await up.head_seen.wait()
            stalled_at = time.monotonic()
            data, _ = await asyncio.to_thread(_read_until_closed, sock, 30)
            async with asyncio.timeout(10):
                await up.closed.wait()
    status, _, _ = parse_head(data)
    assert status == 408
    assert up.closed_at - stalled_at < CLIENT_TIMEOUT_S + SLACK_S
    server = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    assert (server.attributes or {})["error.type"] == "408"


async def test_client_that_stops_reading_is_cut_and_the_upstream_closed(
    gateway: GatewayFactory, gateway_spans: Traced
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with _RecordingUpstream(answer, endless=True) as up:
        base = await gateway(upstream=up.url, client_timeout_s=CLIENT_TIMEOUT_S)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        try:
            sock.connect(("127.0.0.1", _port(base)))
            sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
            # Never read: the gateway's writes block, then time out.
            async with asyncio.timeout(CLIENT_TIMEOUT_S + SLACK_S + 20):
                await up.closed.wait()
            data, _ = await asyncio.to_thread(_read_until_closed, sock, 10)
        finally:
            sock.close()
    # The client got a truncated response (never a clean end of the body).
    assert data.startswith(b"HTTP/1.1 200")
    assert not data.endswith(b"0\r\n\r\n")

    # The span ends in the same loop step as the upstream is closed.
    server = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    assert (server.attributes or {})["error.type"] == "client_timeout"


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    size=st.sampled_from([0, 1, 1023, 1024, 1025, 5000]),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=4),
    chunked=st.booleans(),
)
async def test_bodies_around_the_buffer_size_arrive_intact(
    gateway: GatewayFactory, size: int, cuts: list[int], chunked: bool
) -> None:
    """Fuzz: whatever the size (below, at, above GATEWAY_BUFFER_BODY_BYTES),
    framing and segmentation, the backend gets exactly the bytes sent."""
    base = await gateway(buffer_body_bytes=1024, client_timeout_s=10)
    body = bytes(i % 251 for i in range(size))
    if chunked:
        framed = b"".join(
            b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:500], body[500:]) if part
        )
        head = b"PUT /api/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        wire = head + b"Transfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"
    else:
        head = b"PUT /api/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        wire = head + b"Content-Length: %d\r\n\r\n" % size + body
    points = sorted({c for c in cuts if 0 < c < len(wire)})

    def send() -> bytes:
        with _connect(base) as sock:
            start = 0
            for point in [*points, len(wire)]:
                sock.sendall(wire[start:point])
                start = point
            data, _ = _read_until_closed(sock, 10)
            return data

    data = await asyncio.to_thread(send)
    status, _, reply = parse_head(data)
    assert status == 200
    echo = json.loads(reply)
    assert echo["body_bytes"] == size
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


# -- pure logic: the supervisor's crash window, the log rate limit ------------------


def test_crash_window_gives_up_on_max_crashes_within_the_window() -> None:
    window = CrashWindow(max_crashes=5, window_s=60)
    assert [window.record(t) for t in (0, 10, 20, 30)] == [False] * 4
    assert window.record(40)  # the 5th within 60 s


def test_crash_window_forgets_crashes_older_than_the_window() -> None:
    window = CrashWindow(max_crashes=5, window_s=60)
    # A crash every 20 s is 3 per minute: restarted for ever (here, a day).
    assert not any(window.record(t * 20.0) for t in range(4320))
    # A crash each hour over days: never a reason to exit.
    hourly = CrashWindow(max_crashes=5, window_s=60)
    assert not any(hourly.record(h * 3600.0) for h in range(24 * 7))


def test_crash_window_counts_the_edge_of_the_window_out() -> None:
    window = CrashWindow(max_crashes=2, window_s=60)
    assert not window.record(0)
    assert not window.record(60)  # the first one is exactly 60 s old: out
    assert window.record(119.9)


def test_rate_limit_filter_lets_one_line_through_per_interval_with_a_count() -> None:
    now = [0.0]
    limiter = RateLimitFilter(60.0, clock=lambda: now[0])

    def record() -> logging.LogRecord:
        return logging.LogRecord("x", logging.WARNING, __file__, 1, "upstream down", None, None)

    first = record()
    assert limiter.filter(first)
    assert first.getMessage() == "upstream down"
    assert not any(limiter.filter(record()) for _ in range(41))
    now[0] = 61.0
    later = record()
    assert limiter.filter(later)
    assert later.getMessage() == "upstream down (41 similar messages suppressed)"


# -- processes: logs, shutdown, and the backend under an attack --------------------


def test_a_down_backend_logs_one_line_per_interval_not_one_per_request() -> None:
    with Process(
        "gateway",
        ["--upstream", f"http://127.0.0.1:{free_port()}", "--port", "0", "--workers", "1"],
    ) as gw:
        for _ in range(20):
            status, _ = _http_get(gw.port, "/api/activities/home")
            assert status == 502
        code, err = gw.terminate()
    assert code == 0
    lines = [line for line in err.splitlines() if "upstream GET /api/activities/home" in line]
    assert len(lines) == 1, err


def _http_get(port: int, path: str, timeout_s: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class _SlowUpstream:
    """A threaded upstream that answers ``delay_s`` after a request head
    arrives, and says when one has (the request is then in flight)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.head_seen = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> _SlowUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.delay_s + 30)
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                self.head_seen.set()
                # The upstream's own slowness (not a test synchronisation):
                # returns early when the gateway closes the connection.
                if self._stop.wait(0) or _closed_within(conn, self.delay_s):
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")


def _closed_within(conn: socket.socket, seconds: float) -> bool:
    ready, _, _ = select.select([conn], [], [], seconds)
    return bool(ready) and conn.recv(1) == b""


def _gateway_args(upstream: str, workers: int, shutdown_timeout_s: float) -> list[str]:
    port = 0 if workers == 1 else free_port()
    return [
        *("--upstream", upstream, "--port", str(port), "--workers", str(workers)),
        *("--shutdown-timeout-s", str(shutdown_timeout_s)),
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_a_slow_request_finish_then_flushes_its_spans(
    receiver: OtlpReceiver, workers: int
) -> None:
    # A schedule delay far longer than the test: only the exit flush exports.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    with (
        _SlowUpstream(delay_s=1.5) as up,
        Process("gateway", _gateway_args(up.url, workers, 8), env) as gw,
    ):
        answer: list[tuple[int, bytes]] = []
        path = f"/drain-{workers}"
        client = threading.Thread(target=lambda: answer.append(_http_get(gw.port, path)))
        client.start()
        assert up.head_seen.wait(20)
        started = time.monotonic()
        code, err = gw.terminate()
        elapsed = time.monotonic() - started
        client.join(timeout=20)
    assert code == 0, err
    assert answer == [(200, b"slow")]
    assert elapsed < 8
    spans = receiver.wait_for(
        lambda s: any(x.attributes.get("url.path") == path for x in s), timeout_s=10
    )
    server = next(s for s in spans if s.attributes.get("url.path") == path)
    assert server.attributes["http.response.status_code"] == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_cuts_a_request_slower_than_the_shutdown_timeout_in_time(
    receiver: OtlpReceiver, workers: int
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    shutdown_timeout_s = 1.0
    with (
        _SlowUpstream(delay_s=60) as up,
        Process("gateway", _gateway_args(up.url, workers, shutdown_timeout_s), env) as gw,
    ):
        answer: list[object] = []
        path = f"/stuck-{workers}"

        def request() -> None:
            try:
                answer.append(_http_get(gw.port, path))
            except (OSError, http.client.HTTPException) as exc:
                answer.append(exc)

        client = threading.Thread(target=request)
        client.start()
        assert up.head_seen.wait(20)
        started = time.monotonic()
        code, err = gw.terminate(timeout_s=60)
        elapsed = time.monotonic() - started
        client.join(timeout=20)
    config = GatewayConfig(shutdown_timeout_s=shutdown_timeout_s)
    assert code == 0, err
    # Drained for the shutdown timeout, flushed, and out before the parent's
    # SIGKILL deadline (which would leave the span unexported).
    assert shutdown_timeout_s <= elapsed < kill_deadline_s(config), elapsed
    assert "Traceback" not in err
    assert len(answer) == 1
    spans = receiver.wait_for(
        lambda s: any(x.attributes.get("url.path") == path for x in s), timeout_s=10
    )
    server = next(s for s in spans if s.attributes.get("url.path") == path)
    assert server.status_code == 2  # ERROR: cut by the shutdown


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait_all_closed(socks: list[socket.socket], deadline: float) -> list[float]:
    """When each socket was closed by the server (time.monotonic()), draining
    what it sent; sockets still open at the deadline are left out."""
    closed_at: list[float] = []
    pending = {s.fileno(): s for s in socks}
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select(list(pending.values()), [], [], 0.2)
        for sock in ready:
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                closed_at.append(time.monotonic())
                del pending[sock.fileno()]
    return closed_at


def test_idle_slow_and_non_reading_clients_leave_the_backend_free(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The production backend (gunicorn gthread, 16 threads) behind one
    gateway worker, while 200 idle sockets, 16 slow-body senders and 16
    clients that never read their (200 MB) responses hold on: every one of
    them is cut after GATEWAY_CLIENT_TIMEOUT_S, the gateway's file
    descriptors come back, and the backend's 16 threads are free again."""
    timeout_s = 2.0
    port = free_port()
    env = {
        **os.environ,
        "BACKEND_BIND": f"127.0.0.1:{port}",
        "BACKEND_WORKERS": "1",
        "BACKEND_THREADS": "16",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
    }
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "backend/gunicorn_conf.py", "backend.wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    attack: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _http_get(port, "/api/health")[0] == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.2)
        args = ["--upstream", f"http://127.0.0.1:{port}", "--port", "0", "--workers", "1"]
        with Process("gateway", [*args, "--client-timeout-s", str(timeout_s)]) as gw:
            assert _http_get(gw.port, "/api/activities/home")[0] == 200
            fds_before = _fd_count(gw.proc.pid)
            started = time.monotonic()
            idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(200)]
            slow = []
            for _ in range(16):
                sock = socket.create_connection(("127.0.0.1", gw.port))
                sock.sendall(b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
                sock.sendall(b"0123456789")
                slow.append(sock)
            deaf = []
            for _ in range(16):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", gw.port))
                sock.sendall(b"GET /api/bytes?n=209715200 HTTP/1.1\r\nHost: x\r\n\r\n")
                deaf.append(sock)
            attack = idle + slow + deaf
            fds_during = _fd_count(gw.proc.pid)

            # Another client, during the attack: served, at worst once the
            # timeout has freed the backend threads the deaf clients held.
            t0 = time.monotonic()
            assert _http_get(gw.port, "/api/activities/home")[0] == 200
            during_s = time.monotonic() - t0

            cut_deadline = started + timeout_s + SLACK_S + 5
            closed = _wait_all_closed(idle + slow, cut_deadline)
            assert len(closed) == len(idle) + len(slow)
            slowest_cut_s = max(closed) - started
            assert timeout_s * 0.9 <= slowest_cut_s < timeout_s + SLACK_S + 5
            # The deaf clients' connections are gone from the gateway too.
            fd_deadline = time.monotonic() + 10
            while _fd_count(gw.proc.pid) > fds_before + 5 and time.monotonic() < fd_deadline:
                time.sleep(0.1)
            fds_after = _fd_count(gw.proc.pid)
            assert fds_after <= fds_before + 5

            # The backend's 16 threads are free: 16 requests that each hold a
            # thread for 0.5 s finish together, not one after another.
            results: list[int] = []

            def hold() -> None:
                results.append(_http_get(gw.port, "/api/slow?ms=500")[0])

            t0 = time.monotonic()
            threads = [threading.Thread(target=hold) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            parallel_s = time.monotonic() - t0
            assert results == [200] * 16
            assert parallel_s < 0.5 * 4
            with capsys.disabled():
                print(
                    f"\n[connections] fds before/during/after: {fds_before}/{fds_during}/"
                    f"{fds_after}; request during attack {during_s:.2f} s; last idle/slow "
                    f"socket cut at {slowest_cut_s:.2f} s; 16 x 0.5 s after: {parallel_s:.2f} s"
                )
    finally:
        for sock in attack:
            sock.close()
        gunicorn.terminate()
        try:
            gunicorn.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gunicorn.kill()
            gunicorn.wait(timeout=10)


async def test_stall_timer_times_out_a_stalled_await_only() -> None:
    timer = StallTimer(0.2)
    for _ in range(1000):  # quick awaits never time out
        await timer.wait(asyncio.sleep(0))
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await timer.wait(never)
    assert 0.18 <= time.monotonic() - started < 0.2 + SLACK_S
    # Usable again after a timeout.
    assert await timer.wait(asyncio.sleep(0, result=7)) == 7
    timer.stop()


async def test_stall_timer_lets_a_real_cancellation_through() -> None:
    timer = StallTimer(30)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(timer.wait(never))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    timer.stop()
