"""Real servers for tests: the backend in a thread, processes for gateway and
backend, raw-socket helpers. Every wait here has a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from werkzeug.serving import BaseWSGIServer, make_server

if TYPE_CHECKING:
    from tests.conftest import Traced

ROOT = Path(__file__).resolve().parent.parent
_LISTEN_RE = re.compile(rb"listening on http://([0-9.]+|\[[0-9a-f:]+\]):(\d+)")


class BackendThread:
    """The Flask backend on werkzeug's threaded server, in this process."""

    def __init__(self, traced: Traced, *, enable_test_callback: bool = True) -> None:
        from backend.app import create_app

        self.traced = traced
        app = create_app(tracer_provider=traced.provider, enable_test_callback=enable_test_callback)
        self._server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def reset(self) -> None:
        self.traced.exporter.clear()


class Process:
    """A child process started with ``python -m MODULE``, told its port by
    its ``listening on http://HOST:PORT`` line on stdout."""

    def __init__(
        self,
        module: str,
        args: list[str],
        env: Mapping[str, str] | None = None,
        *,
        expect_listen: bool = True,
        timeout_s: float = 20.0,
        command: list[str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        """``command`` replaces ``python -m MODULE`` (say, an installed
        console script), ``cwd`` the checkout as working directory."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", module]), *args],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stdout = b""
        self.port = 0
        if expect_listen:
            self.port = self._wait_listening(timeout_s)
        self.url = f"http://127.0.0.1:{self.port}"
        # Keep reading both pipes: a child whose log fills an unread pipe
        # blocks on its next write (and a blocked event loop serves no one).
        self._stderr = bytearray()
        self._drains = [
            threading.Thread(target=self._drain, args=(stream, buf), daemon=True)
            for stream, buf in ((self.proc.stdout, None), (self.proc.stderr, self._stderr))
        ]
        for thread in self._drains:
            thread.start()

    def _drain(self, stream: Any, buf: bytearray | None) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            if buf is None:
                self.stdout += chunk
            else:
                buf.extend(chunk)

    def _wait_listening(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.stdout += chunk
                match = _LISTEN_RE.search(self.stdout)
                if match:
                    return int(match.group(2))
            if self.proc.poll() is not None:
                break
        self.kill()
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        raise RuntimeError(f"{self.proc.args} did not start: {self.stdout!r} {err}")

    def rss_kib(self) -> int:
        """Resident memory of the process and its children (workers)."""
        total = 0
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            match = re.search(r"VmRSS:\s+(\d+) kB", status)
            total += int(match.group(1)) if match else 0
        return total

    def terminate(self, timeout_s: float = 20.0) -> tuple[int, str]:
        """SIGTERM, wait, return (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait(timeout=5)
        self._join_drains()
        return self.proc.returncode, self._stderr.decode(errors="replace")

    def stderr_text(self) -> str:
        return self._stderr.decode(errors="replace")

    def _join_drains(self) -> None:
        for thread in self._drains:
            thread.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def kill(self) -> None:
        for pid in _children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._join_drains()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raw_request(
    port: int, data: bytes, *, timeout_s: float = 10.0, until_close: bool = False
) -> bytes:
    """Send raw bytes, read one response (or, ``until_close``, everything
    until the server closes) or until the deadline passes. For requests a
    normal client library refuses to send."""
    deadline = time.monotonic() + timeout_s
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        out = b""
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
            if not until_close and _complete(out):
                break
        return out


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if match:
        return len(body) >= int(match.group(1))
    if re.search(rb"(?i)\r\ntransfer-encoding:\s*chunked", head):
        return body.endswith(b"0\r\n\r\n")
    status = head.split(b" ", 2)[1] if b" " in head else b""
    return status in (b"204", b"304") or head.startswith(b"HTTP/1.1 1")


def parse_head(data: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    return status, headers, body


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` on the running loop until it holds, bounded in count
    and time (tests never sleep to synchronise)."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s * 100)):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[int]:
    """``app`` on a loopback port (yielded) as the gateway's CLI runs it:
    through an ``AppRunner``, where a client that disconnects does not cancel
    the handler (aiohttp's ``TestServer`` would)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
