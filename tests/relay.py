"""A loopback TCP relay that adds a known delay per direction.

It stands in for the network between a client and the gateway: every chunk
from the client reaches the gateway ``up_ms`` later, every chunk back reaches
the client ``down_ms`` later, in order.

``DelayRelay`` runs it in a process of its own (``python -m tests.relay``), so
its timing depends neither on the test's event loop nor on the test
process's GIL; ``_RelayServer`` is the relay itself. It uses blocking
sockets, threads and a spin for the last 0.3 ms of each delay, not an event
loop, whose timers wake on whole milliseconds: its own round trip adds
well under 0.3 ms to the injected delays (tests/test_latency.py measures it).
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

from tests.servers import Process


class DelayRelay:
    """The relay as a child process, for ``with`` blocks in tests."""

    def __init__(self, target_port: int, up_ms: float, down_ms: float) -> None:
        self._args = [
            "--target-port",
            str(target_port),
            "--up-ms",
            str(up_ms),
            "--down-ms",
            str(down_ms),
        ]
        self._proc: Process | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DelayRelay:
        self._proc = Process("tests.relay", self._args)
        self.port = self._proc.port
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._proc is not None
        self._proc.__exit__(et, e, tb)


#: The last stretch of each delay is spun rather than slept: a sleeping
#: thread wakes 50–100 µs late on Linux, an event loop up to a millisecond
#: late (its poll timeout is whole milliseconds).
_SPIN_S = 0.0003


def _wait_until(due: float) -> None:
    """Return at ``due`` (``time.perf_counter()`` seconds), give or take µs."""
    rest = due - time.perf_counter()
    if rest > _SPIN_S:
        time.sleep(rest - _SPIN_S)
    while time.perf_counter() < due:
        pass


class _RelayServer:
    """Blocking sockets and threads: per connection, per direction, one
    thread reads and stamps each chunk, another delivers it when due."""

    def __init__(self, target_port: int, up_ms: float, down_ms: float) -> None:
        self.target_port = target_port
        self.up_s = up_ms / 1000
        self.down_s = down_ms / 1000
        self.port = 0
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _RelayServer:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        assert self._listener is not None
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in list(self._sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.update((client, upstream))
            remaining = [2]
            for src, dst, delay_s in (
                (client, upstream, self.up_s),
                (upstream, client, self.down_s),
            ):
                _Direction(
                    src, dst, delay_s, lambda c=client, u=upstream, r=remaining: self._done(c, u, r)
                )

    def _done(self, client: socket.socket, upstream: socket.socket, remaining: list[int]) -> None:
        with self._lock:
            remaining[0] -= 1
            if remaining[0]:
                return
            self._sockets.difference_update((client, upstream))
        for sock in (client, upstream):
            sock.close()


class _Direction:
    """One direction of one connection: src's bytes reach dst ``delay_s`` later, in order."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, delay_s: float, done: Callable[[], None]
    ) -> None:
        self._src, self._dst, self._delay_s, self._done = src, dst, delay_s, done
        self._queue: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="relay-read", daemon=True).start()
        threading.Thread(target=self._deliver, name="relay-deliver", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self._src.recv(65536)
            except OSError:
                data = b""
            self._queue.put((time.perf_counter() + self._delay_s, data))
            if not data:
                return

    def _deliver(self) -> None:
        try:
            while True:
                due, data = self._queue.get()
                _wait_until(due)
                if not data:
                    with contextlib.suppress(OSError):
                        self._dst.shutdown(socket.SHUT_WR)
                    return
                try:
                    self._dst.sendall(data)
                except OSError:
                    # The other side is gone: stop reading this one too.
                    with contextlib.suppress(OSError):
                        self._src.shutdown(socket.SHUT_RDWR)
                    return
        finally:
            self._done()


def main() -> None:
    parser = argparse.ArgumentParser(description="loopback relay with per-direction delay")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--up-ms", type=float, required=True)
    parser.add_argument("--down-ms", type=float, required=True)
    args = parser.parse_args()
    relay = _RelayServer(args.target_port, args.up_ms, args.down_ms)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with relay:
        print(f"relay listening on http://127.0.0.1:{relay.port}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
