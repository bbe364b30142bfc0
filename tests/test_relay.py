"""The delay relay (tests/relay.py) the accuracy tests and the bench rely on:
it adds what it is told to, no less, and barely more."""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest

from tests.relay import _SO_TIMESTAMPNS, _Direction, _RelayServer, _TraceLog


class _Echo:
    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := conn.recv(65536):
                    conn.sendall(data)


def _round_trips_ms(port: int, probes: int) -> list[float]:
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(probes + 1):
            start = time.perf_counter()
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            times.append((time.perf_counter() - start) * 1e3)
    return times[1:]  # the first one also paid the connect


@pytest.mark.parametrize(("up_ms", "down_ms"), [(5.0, 5.0), (4.0, 1.5)])
def test_relay_round_trip_is_the_injected_delay_within_a_third_of_a_ms(
    up_ms: float, down_ms: float
) -> None:
    echo = _Echo()
    try:
        with _RelayServer(echo.port, up_ms, down_ms) as relay:
            times = _round_trips_ms(relay.port, 30)
    finally:
        echo.sock.close()
    # Never early: each direction waits its full delay.
    assert min(times) >= up_ms + down_ms
    # An event loop's timers wake on whole milliseconds (up to +1 ms a hop);
    # the relay spins the last stretch, so its median overhead stays small.
    assert statistics.median(times) - (up_ms + down_ms) <= 0.3, times


def test_relay_counts_each_delay_from_when_the_bytes_arrived_not_from_a_late_read() -> None:
    # A busy machine wakes the relay's reading thread late: the chunk must
    # still leave `delay` after it reached the relay, not `delay` after the
    # read, or the relay adds the scheduler's lateness to the injected delay.
    delay_s, late_read_s = 0.3, 0.2
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    out_r, out_w = socket.socketpair()
    done = threading.Event()
    with listener, out_r, out_w:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        with client:
            sent = time.perf_counter()
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            src, _ = listener.accept()
            with src:
                # The reading thread starts late: this is the lateness under test.
                time.sleep(late_read_s)
                _Direction(src, out_w, delay_s, done.set)
                out_r.settimeout(10)
                assert out_r.recv(100).startswith(b"GET /")
                took_s = time.perf_counter() - sent
                client.shutdown(socket.SHUT_WR)
                assert done.wait(10)
    assert took_s >= delay_s
    assert took_s < delay_s + late_read_s * 0.75, took_s


def test_relay_trace_log_says_when_each_request_arrived_and_left(tmp_path: Path) -> None:
    echo = _Echo()
    log_path = tmp_path / "relay.jsonl"
    trace_log = _TraceLog(str(log_path))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    request = f"GET / HTTP/1.1\r\ntraceparent: 00-{trace_id}-00f067aa0ba902b7-01\r\n\r\n"
    try:
        with (
            _RelayServer(echo.port, 20.0, 5.0, trace_log) as relay,
            socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock,
        ):
            before_ms = time.time_ns() / 1e6
            sock.sendall(request.encode())
            received = b""
            while len(received) < len(request):
                received += sock.recv(65536)
            after_ms = time.time_ns() / 1e6
    finally:
        echo.sock.close()
        trace_log.close()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    # The echo sends the request back, traceparent included: both directions.
    assert [(line["dir"], line["trace"]) for line in lines] == [
        ("up", trace_id),
        ("down", trace_id),
    ]
    up, down = lines
    # (rounded to µs: a hair of slack at the ends)
    assert before_ms - 0.01 <= up["arrived_ms"] <= up["read_ms"] <= up["sent_ms"]
    assert up["sent_ms"] - up["arrived_ms"] >= 20.0
    assert down["sent_ms"] - down["arrived_ms"] >= 5.0
    assert up["sent_ms"] <= down["arrived_ms"] <= down["sent_ms"] <= after_ms + 0.01
