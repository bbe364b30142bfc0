"""A scripted raw-socket upstream, for answers no well-behaved server gives:
a body cut short, no Content-Type, a stall, a header that is not UTF-8.

Each script gets the request head and the stream writer and writes whatever
bytes it likes. Runs in the test's event loop on an ephemeral loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Self

Script = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


class LoopbackServer:
    """A raw asyncio TCP server on an ephemeral loopback port, for
    ``async with``: each connection goes to :meth:`_serve`, and whatever is
    still running at exit is cancelled, so no test leaves a handler behind."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._tracked, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._closing()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _closing(self) -> None:
        """Called at exit before the handlers are cancelled."""

    async def _tracked(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class ScriptedUpstream(LoopbackServer):
    def __init__(self, scripts: dict[str, Script]) -> None:
        super().__init__()
        self.scripts = scripts
        self.requests: list[bytes] = []
        self._stalled: list[asyncio.StreamWriter] = []

    def _closing(self) -> None:
        for writer in self._stalled:
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._answer(reader, writer)
        finally:
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            writer.transport.abort()
            return
        self.requests.append(head)
        path = head.split(b" ", 2)[1].decode()
        script = self.scripts.get(path.split("?")[0])
        if script is None:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        else:
            self._stalled.append(writer)
            await script(head, writer)
        with contextlib.suppress(ConnectionError):
            await writer.drain()


async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


def fixed(response: bytes) -> Script:
    """Answer with these bytes and close."""

    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        await send(writer, response)
        writer.close()

    return script


def cut_after(head_and_partial_body: bytes) -> Script:
    """Send a head and part of the body, then drop the connection."""

    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        await send(writer, head_and_partial_body)
        await asyncio.sleep(0.05)
        writer.transport.abort()

    return script


def stall() -> Script:
    """Accept the request and never answer."""

    async def script(head: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    return script
