"""A loopback TCP relay that adds a known delay per direction.

It stands in for the network between a client and the gateway: every chunk
from the client reaches the gateway ``up_ms`` later, every chunk back reaches
the client ``down_ms`` later, in order.

``DelayRelay`` runs it in a process of its own (``python -m tests.relay``), so
its timing depends neither on the test's event loop nor on the test
process's GIL; ``_RelayServer`` is the relay itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import threading
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


class _RelayServer:
    def __init__(self, target_port: int, up_ms: float, down_ms: float) -> None:
        self.target_port = target_port
        self.up_s = up_ms / 1000
        self.down_s = down_ms / 1000
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DelayRelay:
        ready = threading.Event()

        async def start() -> None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(start())
            self._loop.run_forever()
            self._loop.run_until_complete(self._close())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="delay-relay", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("relay did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                _pipe(reader, up_writer, self.up_s), _pipe(up_reader, writer, self.down_s)
            )
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.transport.abort()
            up_writer.transport.abort()
            self._tasks.discard(task)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy src to dst, each chunk delivered ``delay_s`` after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    dst.write_eof()
                return
            dst.write(data)
            await dst.drain()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await src.read(65536)
            await queue.put((loop.time() + delay_s, data))
            if not data:
                break
        await sender
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


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
