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
import json
import socket
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import GatewayFactory, Traced
from tests.servers import BackendThread, parse_head
from tests.upstream import ScriptedUpstream, fixed

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


class _RecordingUpstream:
    """A raw upstream that records what arrives and when its connection ends.

    ``answer`` is sent once the request head has arrived; with ``endless``
    it then streams a chunked body until the gateway stops reading or closes.
    """

    def __init__(self, answer: bytes = b"", *, endless: bool = False) -> None:
        self.answer = answer
        self.endless = endless
        self.received = b""
        self.head_seen = asyncio.Event()
        self.closed = asyncio.Event()
        self.closed_at = 0.0
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> _RecordingUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

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
