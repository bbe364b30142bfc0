"""The delay relay (tests/relay.py) the accuracy tests and the bench rely on:
it adds what it is told to, no less, and barely more."""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time

import pytest

from tests.relay import _RelayServer


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
