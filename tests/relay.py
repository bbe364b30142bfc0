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
Each chunk's delay counts from the kernel's receive timestamp
(``SO_TIMESTAMPNS``, socket(7)), not from when the reading thread woke up:
on a busy machine that thread may wake milliseconds late, and the chunk
would be held that much longer than the delay it is meant to carry.

``--trace-log FILE`` (for ``benchmarks/accuracy.py``) appends one JSON line
per chunk that names a W3C trace id (a request's ``traceparent`` header, the
gateway's ``Server-Timing: traceparent;desc=…`` on the way back): when it
reached the relay, when the relay read it and when it passed it on, so a
slow request can be told apart from a late relay.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import signal
import socket
import struct
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


#: socket(7): SO_TIMESTAMPNS, the kernel's receive time of the data as a
#: struct timespec in a control message (Python's socket module lacks the name).
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_CMSG_SPACE = 256
#: A trace id in a request's traceparent or in the gateway's Server-Timing.
_TRACE_RE = re.compile(rb"(?i)traceparent(?::\s*|;desc=\"?)00-([0-9a-f]{32})-")


def _recv_stamped(sock: socket.socket) -> tuple[bytes, float]:
    """A chunk and when it reached this machine, in ``time.perf_counter()``
    seconds: the kernel's receive timestamp, or now when it gave none."""
    data, ancillary, _, _ = sock.recvmsg(65536, _CMSG_SPACE)
    now_perf, now_ns = time.perf_counter(), time.time_ns()
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(payload) >= 16:
            seconds, nanoseconds = struct.unpack("qq", payload[:16])
            age_s = (now_ns - (seconds * 1_000_000_000 + nanoseconds)) / 1e9
            # A timestamp from the future (clock stepped) is not trusted.
            return data, now_perf - age_s if age_s >= 0 else now_perf
    return data, now_perf


class _TraceLog:
    """One JSON line per traced chunk, from any thread (``--trace-log``)."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()

    def chunk(self, direction: str, data: bytes, arrived: float, read: float, sent: float) -> None:
        """``arrived``, ``read``, ``sent``: ``time.perf_counter()`` seconds."""
        match = _TRACE_RE.search(data)
        if match is None:
            return
        now_perf, now_ns = time.perf_counter(), time.time_ns()

        def epoch_ms(perf: float) -> float:
            return round((now_ns - (now_perf - perf) * 1e9) / 1e6, 3)

        line = json.dumps(
            {
                "dir": direction,
                "trace": match.group(1).decode(),
                "arrived_ms": epoch_ms(arrived),
                "read_ms": epoch_ms(read),
                "sent_ms": epoch_ms(sent),
            }
        )
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()


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

    def __init__(
        self, target_port: int, up_ms: float, down_ms: float, trace_log: _TraceLog | None = None
    ) -> None:
        self.target_port = target_port
        self.trace_log = trace_log
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
        # Accepted sockets inherit it, so even the bytes a client sends
        # before we accept its connection carry their receive time.
        listener.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
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
            upstream.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.update((client, upstream))
            remaining = [2]
            for name, src, dst, delay_s in (
                ("up", client, upstream, self.up_s),
                ("down", upstream, client, self.down_s),
            ):
                _Direction(
                    src,
                    dst,
                    delay_s,
                    lambda c=client, u=upstream, r=remaining: self._done(c, u, r),
                    name,
                    self.trace_log,
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
        self,
        src: socket.socket,
        dst: socket.socket,
        delay_s: float,
        done: Callable[[], None],
        name: str = "",
        trace_log: _TraceLog | None = None,
    ) -> None:
        self._src, self._dst, self._delay_s, self._done = src, dst, delay_s, done
        self._name, self._trace_log = name, trace_log
        #: (arrived, read, data): perf_counter() seconds
        self._queue: queue.SimpleQueue[tuple[float, float, bytes]] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="relay-read", daemon=True).start()
        threading.Thread(target=self._deliver, name="relay-deliver", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data, arrived = _recv_stamped(self._src)
            except OSError:
                data, arrived = b"", time.perf_counter()
            self._queue.put((arrived, time.perf_counter(), data))
            if not data:
                return

    def _deliver(self) -> None:
        try:
            while True:
                arrived, read, data = self._queue.get()
                _wait_until(arrived + self._delay_s)
                sent = time.perf_counter()
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
                if self._trace_log is not None:
                    self._trace_log.chunk(self._name, data, arrived, read, sent)
        finally:
            self._done()


def main() -> None:
    parser = argparse.ArgumentParser(description="loopback relay with per-direction delay")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--up-ms", type=float, required=True)
    parser.add_argument("--down-ms", type=float, required=True)
    parser.add_argument("--trace-log", help="append each traced chunk's timings here (JSON lines)")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="add this to the process's nice value before any thread starts (negative: "
        "woken ahead of other busy processes; needs root, ignored otherwise)",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="run under SCHED_FIFO (sched(7)): woken ahead of every ordinary process; "
        "needs root, ignored otherwise",
    )
    args = parser.parse_args()
    if args.realtime:
        # Its threads sleep but for the last 0.3 ms of each delay, so a real-
        # time priority costs the machine next to nothing; the kernel's RT
        # throttling (sched_rt_runtime_us) bounds it in any case.
        with contextlib.suppress(PermissionError, OSError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    if args.nice:
        # The relay stands for a network, which no CPU scheduler delays: on a
        # shared machine a higher priority keeps its threads' wake-ups prompt.
        with contextlib.suppress(PermissionError):
            os.nice(args.nice)
    trace_log = _TraceLog(args.trace_log) if args.trace_log else None
    relay = _RelayServer(args.target_port, args.up_ms, args.down_ms, trace_log)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with relay:
        print(f"relay listening on http://127.0.0.1:{relay.port}", flush=True)
        stop.wait()
    if trace_log is not None:
        trace_log.close()


if __name__ == "__main__":
    main()
