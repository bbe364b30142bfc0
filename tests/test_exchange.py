"""``gateway/proxy.py``'s upstream exchange on its own: an ``Upstream`` with an
injected ``ClientSession``, driven by a small aiohttp app with no spans (the
steps in the order ``app.py`` calls them), against scripted upstreams on real
loopback sockets. Checks the error mapping, what the client receives, and
whether the upstream connection goes back to the pool or is closed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from gateway import proxy
from gateway.config import GatewayConfig
from tests.servers import free_port, parse_head, serving, wait_for
from tests.upstream import LoopbackServer, ScriptedUpstream, fixed, send, stall

Outcome = proxy.Failure | proxy.Relayed


class KeepAliveUpstream(LoopbackServer):
    """A raw upstream that answers many requests per connection (the bytes
    for each path), and records which connection each request came on."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        super().__init__()
        self.answers = answers
        #: (connection number, path) per request received.
        self.seen: list[tuple[int, str]] = []
        self._connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        number = self._connections
        try:
            for _ in range(100):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
                path = head.split(b" ", 2)[1].decode()
                self.seen.append((number, path))
                writer.write(self.answers[path])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.transport.abort()


@dataclass
class Exchange:
    """The exchange app's URL and what each of its requests ended with."""

    url: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def exchange(upstream_url: str, **changes: object) -> AsyncIterator[Exchange]:
    """``proxy.Upstream`` over ``proxy.build_session`` behind a span-free
    aiohttp app that calls each step once, as ``Gateway._forward`` does."""
    config = GatewayConfig().replace(
        upstream=upstream_url, workers=1, clock_key=b"k" * 32, **changes
    )
    session = proxy.build_session(config)
    upstream = proxy.Upstream(config.upstream_url, session, config.client_timeout_s)
    outcomes: list[Outcome] = []

    async def refuse(request: web.Request, failure: proxy.Failure) -> web.Response:
        outcomes.append(failure)
        response = web.Response(status=failure.status, text=failure.message)
        if failure.cut_client:
            return await proxy.cut_client(request, response)
        return response

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await proxy.read_body(request, config)
        if isinstance(body, proxy.Failure):
            return await refuse(request, body)
        target = upstream.target(request.raw_path)
        if isinstance(target, proxy.Failure):
            return await refuse(request, target)
        answer = await upstream.call(request.method, target, CIMultiDict(), body)
        if isinstance(answer, proxy.Failure):
            return await refuse(request, answer)
        response = upstream.response(answer)
        if isinstance(response, proxy.Failure):
            return await refuse(request, response)
        outcomes.append(await upstream.relay(request, answer, response))
        return response

    app = web.Application()
    app.on_response_prepare.append(proxy.drop_default_headers)
    app.router.add_route("*", "/{tail:.*}", handle)
    # As the gateway's CLI runs it, so relay() sees a client go.
    try:
        async with serving(app) as port:
            yield Exchange(f"http://127.0.0.1:{port}", outcomes)
    finally:
        await session.close()


async def _get(ex: Exchange, path: str, *, read: bool = True, keep_alive: bool = False) -> bytes:
    """One raw GET to the exchange app; everything until it closes the
    connection (``read=False``: only the response head). ``keep_alive``: the
    request does not ask for the close, so only a cut closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ex.port)
    connection = "" if keep_alive else "Connection: close\r\n"
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n{connection}\r\n".encode())
        await writer.drain()
        if not read:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.transport.abort()


# -- the upstream URL -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_target", "expected"),
    [
        # Byte for byte: no decoding of %2F, no re-quoting, query untouched.
        ("/a%2Fb/c%20d?x=%20y&&z=1;2", "/a%2Fb/c%20d?x=%20y&&z=1;2"),
        ("/?", "/"),
        # RFC 9112 §3.2.2 absolute-form: only path and query go on; the
        # authority in it never chooses where we connect.
        ("http://evil.example:81/p%2F?q=1", "/p%2F?q=1"),
        ("https://evil.example", "/"),
    ],
)
async def test_target_goes_to_the_configured_upstream_with_path_and_query_unchanged(
    raw_target: str, expected: str
) -> None:
    async with aiohttp.ClientSession() as session:
        upstream = proxy.Upstream(URL("http://127.0.0.1:4567"), session, 1.0)
        target = upstream.target(raw_target)
    assert isinstance(target, URL)
    assert str(target) == "http://127.0.0.1:4567" + expected


@pytest.mark.parametrize("raw_target", ["ftp://h/x", "*", "h:80", "mailto:a@b"])
async def test_a_target_that_is_not_a_path_or_http_url_is_a_400(raw_target: str) -> None:
    async with aiohttp.ClientSession() as session:
        upstream = proxy.Upstream(URL("http://127.0.0.1:4567"), session, 1.0)
        assert upstream.target(raw_target) == proxy.Failure(
            400, "request target must be a path or an http(s) URL", "400"
        )


#: ``target()`` is pure: it never touches the session.
_NO_SESSION = cast("aiohttp.ClientSession", None)
_TARGET_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


@settings(max_examples=300, deadline=None)
@given(
    raw_target=st.one_of(
        st.text(_TARGET_CHARS, max_size=80),
        st.text(max_size=20),
        st.tuples(
            st.sampled_from(["http://", "https://", "ftp://", "//"]), st.text(_TARGET_CHARS)
        ).map("".join),
    )
)
def test_no_target_chooses_where_the_gateway_connects(raw_target: str) -> None:
    """Any target a client can write: a 400, or a URL on the configured
    upstream (never a 500, never the client's authority)."""
    upstream = proxy.Upstream(URL("http://127.0.0.1:4567"), _NO_SESSION, 1.0)
    target = upstream.target(raw_target)
    if isinstance(target, proxy.Failure):
        assert target.status == 400
    else:
        assert (target.scheme, target.raw_authority) == ("http", "127.0.0.1:4567")


# -- the call: error mapping -------------------------------------------------------


async def test_unreachable_upstream_is_a_502_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    async with exchange(f"http://127.0.0.1:{free_port()}") as ex:
        status, _, body = parse_head(await _get(ex, "/down?q=1"))
    assert status == 502
    assert body == b"upstream unreachable"
    assert ex.outcomes == [proxy.Failure(502, "upstream unreachable", "ClientConnectorError")]
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.upstream"] == [
        "upstream GET /down: upstream unreachable (ClientConnectorError)"
    ]


async def test_upstream_silent_past_the_read_timeout_is_a_504() -> None:
    async with (
        ScriptedUpstream({"/slow": stall()}) as up,
        exchange(up.url, read_timeout_s=0.3) as ex,
    ):
        status, _, _ = parse_head(await _get(ex, "/slow"))
    assert status == 504
    assert ex.outcomes == [proxy.Failure(504, "upstream timed out", "timeout")]


@pytest.mark.parametrize(
    ("answer", "error_type"),
    [
        (b"", "ServerDisconnectedError"),
        (b"NOT HTTP AT ALL\r\n\r\n", "ClientResponseError"),
    ],
)
async def test_upstream_that_closes_or_answers_garbage_is_a_502(
    answer: bytes, error_type: str
) -> None:
    async with ScriptedUpstream({"/bad": fixed(answer)}) as up, exchange(up.url) as ex:
        status, _, _ = parse_head(await _get(ex, "/bad"))
    assert status == 502
    assert ex.outcomes == [proxy.Failure(502, "upstream failed", error_type)]


async def test_a_body_that_stalls_while_buffered_is_a_408_that_closes() -> None:
    async with KeepAliveUpstream({}) as up, exchange(up.url, client_timeout_s=0.3) as ex:
        reader, writer = await asyncio.open_connection("127.0.0.1", ex.port)
        try:
            # Within the buffer: read before any upstream call, never finished.
            writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            await writer.drain()
            # Closed at once (aiohttp's lingering read would wait 10 s).
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.transport.abort()
    assert parse_head(answer)[0] == 408
    assert ex.outcomes == [proxy.Failure(408, "request body stalled", "408", cut_client=True)]
    assert up.seen == []  # never forwarded


async def test_a_body_that_stalls_while_streaming_upstream_is_a_408_that_closes() -> None:
    async with (
        ScriptedUpstream({"/up": stall()}) as up,
        exchange(up.url, client_timeout_s=0.3, buffer_body_bytes=1024) as ex,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", ex.port)
        try:
            # Declared above the buffer: streamed at once, then never finished.
            writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\nabc")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)  # until it closes
        finally:
            writer.transport.abort()
    assert parse_head(answer)[0] == 408
    assert ex.outcomes == [proxy.Failure(408, "request body stalled", "408", cut_client=True)]


async def test_a_body_over_the_limit_while_buffered_is_a_413() -> None:
    async with (
        KeepAliveUpstream({}) as up,
        exchange(up.url, max_body_bytes=2048, buffer_body_bytes=16) as ex,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", ex.port)
        try:
            writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"1000\r\n" + b"x" * 4096 + b"\r\n0\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        finally:
            writer.transport.abort()
    assert parse_head(answer)[0] == 413
    assert ex.outcomes == [proxy.Failure(413, "request body too large", "413")]
    assert up.seen == []  # never forwarded


async def test_a_body_over_the_limit_while_streaming_upstream_is_a_413() -> None:
    """The upstream call has started (the body streams) when the limit is
    passed: aiohttp's client wraps the reader's error, the reader tells."""
    async with (
        ScriptedUpstream({"/up": stall()}) as up,
        exchange(up.url, max_body_bytes=2048, buffer_body_bytes=16) as ex,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", ex.port)
        try:
            writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"64\r\n" + b"x" * 100 + b"\r\n")  # past the buffer: streams
            await writer.drain()
            await wait_for(lambda: bool(up.requests))
            writer.write(b"1000\r\n" + b"x" * 4096 + b"\r\n0\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        finally:
            writer.transport.abort()
    assert parse_head(answer)[0] == 413
    assert ex.outcomes == [proxy.Failure(413, "request body too large", "413")]


# -- the response head ---------------------------------------------------------------


async def test_no_content_type_or_server_is_added_when_the_upstream_sent_none() -> None:
    """Fails if aiohttp stops firing ``on_response_prepare`` after it sets its
    default headers (the only place ``proxy.drop_default_headers`` can undo them)."""
    plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    own = b"HTTP/1.1 200 OK\r\nContent-Type: text/x\r\nServer: up/1\r\nContent-Length: 2\r\n\r\nhi"
    async with KeepAliveUpstream({"/plain": plain, "/own": own}) as up, exchange(up.url) as ex:
        plain_status, plain_headers, plain_body = parse_head(await _get(ex, "/plain"))
        own_status, own_headers, _ = parse_head(await _get(ex, "/own"))
    names = [k.lower() for k, _ in plain_headers]
    assert (plain_status, plain_body) == (200, b"hi")
    assert "content-type" not in names
    assert "server" not in names
    assert "date" in names  # RFC 9110 §6.6.1: still added by a recipient with a clock
    assert own_status == 200
    assert [v for k, v in own_headers if k.lower() in ("content-type", "server")] == [
        "text/x",
        "up/1",
    ]


async def test_a_header_that_cannot_pass_unchanged_is_a_502_on_a_fresh_connection_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    # Its body is not all there yet: the connection must not be reused.
    bad = b"HTTP/1.1 200 OK\r\nX-Bad: caf\xe9\r\nContent-Length: 9\r\n\r\nhi"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with KeepAliveUpstream({"/bad": bad, "/ok": ok}) as up, exchange(up.url) as ex:
        status, _, _ = parse_head(await _get(ex, "/bad"))
        assert parse_head(await _get(ex, "/ok"))[2] == b"ok"
    assert status == 502
    assert ex.outcomes[0] == proxy.Failure(
        502, "upstream sent header 'X-Bad' that is not UTF-8", "header"
    )
    # The unread answer's connection was given up, not pooled.
    assert up.seen == [(1, "/bad"), (2, "/ok")]
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.upstream"] == [
        "upstream sent header 'X-Bad' that is not UTF-8"
    ]


async def test_the_upstreams_reason_phrase_reaches_the_client() -> None:
    odd = b"HTTP/1.1 299 Fine Thanks\r\nContent-Length: 2\r\n\r\nok"
    async with KeepAliveUpstream({"/odd": odd}) as up, exchange(up.url) as ex:
        answer = await _get(ex, "/odd")
    assert answer.startswith(b"HTTP/1.1 299 Fine Thanks\r\n")


# -- streaming the body, and aborts ---------------------------------------------------


async def test_a_complete_answer_returns_its_connection_to_the_pool() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    async with KeepAliveUpstream({"/a": ok, "/b": ok}) as up, exchange(up.url) as ex:
        first = parse_head(await _get(ex, "/a"))
        second = parse_head(await _get(ex, "/b"))
    assert first[2] == second[2] == b"hello"
    assert ex.outcomes == [proxy.COMPLETE, proxy.COMPLETE]
    assert up.seen == [(1, "/a"), (1, "/b")]


async def test_upstream_dying_mid_body_cuts_the_clients_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")

    async def cut(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async with ScriptedUpstream({"/cut": cut}) as up, exchange(up.url) as ex:
        answer = await _get(ex, "/cut", keep_alive=True)  # until the gateway drops it
    status, headers, body = parse_head(answer)
    assert status == 200
    assert ("Content-Length", "100") in headers
    assert body == b"x" * 10  # truncated: never completed with a wrong length
    assert ex.outcomes == [proxy.Relayed(upstream_error="ClientPayloadError")]
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.upstream"] == [
        "upstream GET /cut died mid-body: ClientPayloadError"
    ]


async def test_upstream_stalling_mid_body_past_the_read_timeout_cuts_the_client() -> None:
    async def slow(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nxy")
        await writer.drain()
        await asyncio.sleep(3600)

    async with ScriptedUpstream({"/slow": slow}) as up, exchange(up.url, read_timeout_s=0.3) as ex:
        _, _, body = parse_head(await _get(ex, "/slow", keep_alive=True))
    assert body == b"xy"
    assert ex.outcomes == [proxy.Relayed(upstream_error="timeout")]


_BIG = 64 * 1024 * 1024


async def _flood(head: bytes, writer: asyncio.StreamWriter) -> None:
    """A body far larger than every socket buffer, written until refused."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % _BIG)
    chunk = b"z" * (1024 * 1024)
    with contextlib.suppress(ConnectionError):
        for _ in range(_BIG // len(chunk)):
            writer.write(chunk)
            await writer.drain()


async def test_a_client_that_stops_reading_is_dropped() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with (
        ScriptedUpstream({"/big": _flood, "/ok": fixed(ok)}) as up,
        exchange(up.url, client_timeout_s=0.5) as ex,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", ex.port)
        try:
            writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            await writer.drain()
            await wait_for(lambda: bool(ex.outcomes))  # never reading a byte
            # Dropped: what is left in the socket buffers, then the end.
            received = 0
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(5):
                    while chunk := await reader.read(1024 * 1024):
                        received += len(chunk)
        finally:
            writer.transport.abort()
    assert ex.outcomes == [proxy.Relayed(client_error="client_timeout")]
    assert received < _BIG


async def test_a_client_that_disconnects_mid_body_is_reported_as_gone() -> None:
    async with (
        ScriptedUpstream({"/big": _flood}) as up,
        exchange(up.url, client_timeout_s=30) as ex,
    ):
        head = await _get(ex, "/big", read=False)
        await wait_for(lambda: bool(ex.outcomes))
    assert parse_head(head)[0] == 200
    assert ex.outcomes == [proxy.Relayed(client_error="client_disconnected")]


# -- the request body: buffer and limit bounds --------------------------------------


class RecordingUpstream(LoopbackServer):
    """Keeps each request's head (as soon as it is read) and body, answers 200."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            self.heads.append(head.lower())
            body = b""
            if b"transfer-encoding: chunked" in head.lower():
                for _ in range(10_000):
                    size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), 10), 16)
                    chunk = await asyncio.wait_for(reader.readexactly(size + 2), 10)
                    if size == 0:
                        break
                    body += chunk[:-2]
            elif length := re.search(rb"content-length: *(\d+)", head.lower()):
                body = await asyncio.wait_for(reader.readexactly(int(length[1])), 10)
            self.bodies.append(body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()


async def _post(ex: Exchange, fields: bytes, *parts: bytes) -> bytes:
    """A raw POST /up with these header fields and body bytes; the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ex.port)
    try:
        writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + fields + b"\r\n")
        for part in parts:
            writer.write(part)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.transport.abort()


@pytest.mark.parametrize(
    ("fields", "body", "framing"),
    [
        (b"Content-Length: 16\r\n", b"10\r\n", b"content-length: 16\r\n"),
        (b"Content-Length: 17\r\n", b"11\r\n", b"transfer-encoding: chunked\r\n"),
        (b"Transfer-Encoding: chunked\r\n", b"10\r\n", b"content-length: 16\r\n"),
        (b"Transfer-Encoding: chunked\r\n", b"11\r\n", b"transfer-encoding: chunked\r\n"),
    ],
)
async def test_a_body_that_fits_the_buffer_exactly_goes_upstream_with_its_length(
    fields: bytes, body: bytes, framing: bytes
) -> None:
    """GATEWAY_BUFFER_BODY_BYTES is inclusive: a body of exactly that size is
    buffered and sent with its Content-Length; one byte more streams
    (chunked, RFC 9112 §7.1), whether the client declared its length or not."""
    size = int(body.strip(), 16)
    data = b"".join(bytes([97 + i % 26]) for i in range(size))
    payload = body + data + b"\r\n0\r\n\r\n" if b"chunked" in fields else data
    async with RecordingUpstream() as up, exchange(up.url, buffer_body_bytes=16) as ex:
        answer = await _post(ex, fields, payload)
    assert parse_head(answer)[0] == 200
    assert framing in up.heads[0]
    assert up.bodies == [data]


@pytest.mark.parametrize("buffer_bytes", [16, 32])
@pytest.mark.parametrize(("size", "status"), [(32, 200), (33, 413)])
async def test_the_body_limit_is_inclusive_buffered_or_streamed(
    buffer_bytes: int, size: int, status: int
) -> None:
    async with (
        RecordingUpstream() as up,
        exchange(up.url, max_body_bytes=32, buffer_body_bytes=buffer_bytes) as ex,
    ):
        answer = await _post(ex, f"Content-Length: {size}\r\n".encode(), b"x" * size)
    assert parse_head(answer)[0] == status
    if status == 200:
        assert up.bodies == [b"x" * size]


async def test_the_body_limit_counts_every_chunk_not_the_last_one() -> None:
    async with (
        RecordingUpstream() as up,
        exchange(up.url, max_body_bytes=2048, buffer_body_bytes=16) as ex,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", ex.port)
        try:
            writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"64\r\n" + b"x" * 100 + b"\r\n")  # past the buffer: streams
            await writer.drain()
            await wait_for(lambda: bool(up.heads))  # the first 100 bytes were read
            # 2000 bytes: under the limit alone, 2100 with the first ones.
            writer.write(b"7d0\r\n" + b"x" * 2000 + b"\r\n0\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        finally:
            writer.transport.abort()
    assert parse_head(answer)[0] == 413
    assert ex.outcomes == [proxy.Failure(413, "request body too large", "413")]


async def test_a_request_with_a_body_to_an_unreachable_upstream_is_a_502_not_a_408() -> None:
    async with exchange(f"http://127.0.0.1:{free_port()}") as ex:
        answer = await _post(ex, b"Content-Length: 3\r\n", b"abc")
    assert parse_head(answer)[0] == 502
    assert ex.outcomes == [proxy.Failure(502, "upstream unreachable", "ClientConnectorError")]


async def test_stall_timer_measures_each_await_from_its_own_start() -> None:
    """The one timer armed by the first await fires while a later one is
    pending: that one has waited less than ``timeout_s``, so it goes on, and
    the timer sleeps until that await's own deadline (no busy re-checks)."""
    timer = proxy.StallTimer(2.0)
    try:
        await timer.wait(asyncio.sleep(1.0))
        started, cpu_s = time.monotonic(), time.process_time()
        # Pending from 1.0 s to 2.6 s: the timer fires at 2.0 s and re-arms for 3.0 s.
        assert await timer.wait(asyncio.sleep(1.6, result="done")) == "done"
        assert time.monotonic() - started >= 1.6
        assert time.process_time() - cpu_s < 0.2
    finally:
        timer.stop()


async def test_a_declared_length_over_the_buffer_streams_before_the_body_is_all_there() -> None:
    """Content-Length above GATEWAY_BUFFER_BODY_BYTES: the upstream call
    starts at once, nothing is held back to fill the buffer first."""
    async with RecordingUpstream() as up, exchange(up.url, buffer_body_bytes=16) as ex:
        reader, writer = await asyncio.open_connection("127.0.0.1", ex.port)
        try:
            writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n")
            writer.write(b"x" * 10)  # less than the buffer
            await writer.drain()
            await wait_for(lambda: bool(up.heads), timeout_s=3)
            writer.write(b"x" * 4990)
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        finally:
            writer.transport.abort()
    assert parse_head(answer)[0] == 200
    assert b"transfer-encoding: chunked\r\n" in up.heads[0]
    assert up.bodies == [b"x" * 5000]


async def test_the_upstream_pool_opens_at_most_max_connections() -> None:
    """GATEWAY_MAX_CONNECTIONS bounds the upstream pool: a second request
    waits for the first one's connection instead of opening another."""
    release = asyncio.Event()

    async def held(head: bytes, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await send(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    async with (
        ScriptedUpstream({"/held": held}) as up,
        exchange(up.url, max_connections=1) as ex,
    ):
        first = asyncio.create_task(_get(ex, "/held?1"))
        second = asyncio.create_task(_get(ex, "/held?2"))
        await wait_for(lambda: len(up.requests) == 1)
        # A negative check: the second request must not reach the upstream
        # while the only connection is busy (it would within milliseconds).
        with pytest.raises(AssertionError):
            await wait_for(lambda: len(up.requests) > 1, timeout_s=0.3)
        release.set()
        answers = await asyncio.gather(first, second)
    assert [parse_head(a)[2] for a in answers] == [b"ok", b"ok"]
    assert len(up.requests) == 2


async def test_stall_timer_lets_a_real_cancellation_through_and_rearms_after_stop() -> None:
    timer = proxy.StallTimer(0.2)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(timer.wait(never))
    await asyncio.sleep(0)
    task.cancel()  # the client went away: not a stall
    with pytest.raises(asyncio.CancelledError):
        await task
    timer.stop()
    # stop() between two bodies: the next await is bounded again.
    with pytest.raises(TimeoutError):
        await timer.wait(asyncio.get_running_loop().create_future())
    timer.stop()


async def test_a_buffered_body_cut_short_by_the_client_is_a_400() -> None:
    """The client declares 10 bytes, sends 3 and ends its side: the body is
    incomplete (RFC 9112 §6.3), the client's fault; nothing goes upstream."""
    async with RecordingUpstream() as up, exchange(up.url) as ex:
        _, writer = await asyncio.open_connection("127.0.0.1", ex.port)
        try:
            writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            writer.write_eof()
            await writer.drain()
            await wait_for(lambda: bool(ex.outcomes))
        finally:
            writer.transport.abort()
    assert ex.outcomes == [
        proxy.Failure(400, "request body incomplete", "ConnectionResetError", cut_client=True)
    ]
    assert up.heads == []


def _started(up: RecordingUpstream | ScriptedUpstream) -> Callable[[], bool]:
    """Whether the upstream has the request's head: the body streams."""
    if isinstance(up, RecordingUpstream):
        return lambda: bool(up.heads)
    return lambda: bool(up.requests)


@pytest.mark.parametrize("closes", ["its side", "the connection"])
@pytest.mark.parametrize("reads", [True, False], ids=["upstream reads", "upstream waits"])
async def test_a_streamed_body_the_client_does_not_finish_is_its_400_not_an_upstream_failure(
    closes: str, reads: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 9112 §8: a body whose connection closes before its declared
    length is incomplete, and the connection is closed. Once the body streams,
    aiohttp's client reports the reader's error as its own ClientOSError (or
    ServerDisconnectedError), as it would an upstream reset: only the reader
    can tell the client was the cause, so nothing blames the upstream, and the
    answer to a client that is gone is dropped quietly (no traceback)."""
    caplog.set_level(logging.WARNING)
    up = RecordingUpstream() if reads else ScriptedUpstream({"/up": stall()})
    async with up, exchange(up.url, buffer_body_bytes=16) as ex:
        _, writer = await asyncio.open_connection("127.0.0.1", ex.port)
        try:
            writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n")
            writer.write(b"x" * 100)  # past the buffer: streams
            await writer.drain()
            await wait_for(_started(up))
            if closes == "its side":
                writer.write_eof()
            else:
                writer.transport.abort()
            await wait_for(lambda: bool(ex.outcomes))
        finally:
            writer.transport.abort()
    assert ex.outcomes == [
        proxy.Failure(400, "request body incomplete", "ConnectionResetError", cut_client=True)
    ]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_body_the_server_cannot_decode_is_a_400_that_closes_not_a_500() -> None:
    """This app keeps aiohttp's default of decoding a request's
    Content-Encoding (the gateway turns it off): a body that does not decode
    makes aiohttp's parser raise RequestPayloadError, the client's fault."""
    async with RecordingUpstream() as up, exchange(up.url) as ex:
        answer = await _post(
            ex, b"Content-Encoding: gzip\r\nContent-Length: 20\r\n", b"\x1f\x8b" + b"x" * 18
        )
    assert parse_head(answer)[:3:2] == (400, b"request body incomplete")
    assert ex.outcomes == [
        proxy.Failure(400, "request body incomplete", "RequestPayloadError", cut_client=True)
    ]
    assert up.heads == []


async def test_a_buffered_body_read_in_many_pieces_goes_upstream_byte_for_byte() -> None:
    """A body far larger than aiohttp's 64 KiB read buffer reaches the reader
    in several reads (the server stops reading the socket while its buffer is
    full); buffered whole, the pieces are joined back exactly."""
    data = bytes(range(256)) * 2048  # 512 KiB, every offset distinct mod 256
    async with (
        RecordingUpstream() as up,
        exchange(up.url, buffer_body_bytes=1024 * 1024) as ex,
    ):
        answer = await _post(ex, f"Content-Length: {len(data)}\r\n".encode(), data)
    assert parse_head(answer)[0] == 200
    assert f"content-length: {len(data)}\r\n".encode() in up.heads[0]  # buffered, not streamed
    assert up.bodies == [data]


async def test_concurrent_requests_each_get_an_upstream_connection_below_the_limit() -> None:
    """No per-host cap under GATEWAY_MAX_CONNECTIONS: the one upstream gets
    as many parallel connections as the pool allows."""
    release = asyncio.Event()

    async def held(head: bytes, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await send(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    async with (
        ScriptedUpstream({"/held": held}) as up,
        exchange(up.url, max_connections=3) as ex,
    ):
        tasks = [asyncio.create_task(_get(ex, f"/held?{i}")) for i in range(3)]
        await wait_for(lambda: len(up.requests) == 3)  # all three at once
        release.set()
        answers = await asyncio.gather(*tasks)
    assert [parse_head(a)[2] for a in answers] == [b"ok"] * 3


# -- the upstream session's settings ----------------------------------------------


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
async def test_proxy_variables_in_the_gateways_environment_are_ignored(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway talks to GATEWAY_UPSTREAM directly: an HTTP_PROXY meant for
    something else in its environment never reroutes (or leaks) requests."""
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with RecordingUpstream() as trap, KeepAliveUpstream({"/direct": ok}) as up:
        monkeypatch.setenv(variable, trap.url)
        async with exchange(up.url) as ex:
            _, _, body = parse_head(await _get(ex, "/direct"))
    assert body == b"ok"
    assert up.seen == [(1, "/direct")]
    assert trap.heads == []


async def test_an_upstream_that_does_not_accept_in_time_is_a_504_after_the_connect_timeout() -> (
    None
):
    """GATEWAY_CONNECT_TIMEOUT_S bounds the connection to the upstream: a
    listener whose accept queue is full drops the SYN (Linux), so the connect
    would otherwise hang for the kernel's SYN retries (about two minutes)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # one connection fills the accept queue
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            async with exchange(
                f"http://127.0.0.1:{port}", connect_timeout_s=0.5, read_timeout_s=30
            ) as ex:
                started = time.monotonic()
                status, _, body = parse_head(await _get(ex, "/full"))
                elapsed_s = time.monotonic() - started
        finally:
            for filler in fillers:
                filler.close()
    assert (status, body) == (504, b"upstream timed out")
    assert ex.outcomes == [proxy.Failure(504, "upstream timed out", "timeout")]
    assert 0.5 <= elapsed_s < 5


async def test_the_last_words_to_a_client_that_does_not_read_take_at_most_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``cut_client``'s answer (the 408 to a stalled body) goes out within
    a second or not at all: to a client that stopped reading an earlier
    answer, so that the socket and asyncio's buffer past its high-water mark
    are full, the handler is not held until it reads, and nothing raises."""
    caplog.set_level(logging.WARNING)
    took_s: list[float] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        # What an unread earlier answer leaves behind: more than the kernel's
        # buffers and asyncio's 64 KiB high-water mark hold.
        transport.write(b"x" * (16 * 1024 * 1024))
        started = time.monotonic()
        response = await proxy.cut_client(request, web.Response(status=408, text="stalled"))
        took_s.append(time.monotonic() - started)
        return response

    app = web.Application()
    app.router.add_get("/", handle)
    async with serving(app) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            await writer.drain()
            await wait_for(lambda: bool(took_s), timeout_s=5)  # never reading a byte
        finally:
            writer.transport.abort()
    assert 1.0 <= took_s[0] < 3.0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- how the response leaves -----------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ],
)
async def test_an_answer_that_has_all_arrived_leaves_in_one_send(answer: bytes) -> None:
    # One write per response, not one for the head and one for the body: a
    # send on loopback costs as much as the rest of the relay (the bench).
    # aiohttp's StreamResponse sends its head on prepare(); ProxyResponse
    # holds it back with a class attribute aiohttp has no public switch for.
    assert hasattr(web.StreamResponse, "_send_headers_immediately")
    sends: list[bytes] = []
    async with ScriptedUpstream({"/x": fixed(answer)}) as up:
        config = GatewayConfig().replace(upstream=up.url, workers=1, clock_key=b"k" * 32)
        session = proxy.build_session(config)
        upstream = proxy.Upstream(config.upstream_url, session, config.client_timeout_s)

        async def handle(request: web.Request) -> web.StreamResponse:
            target = upstream.target(request.raw_path)
            assert not isinstance(target, proxy.Failure)
            reply = await upstream.call(request.method, target, CIMultiDict(), proxy.NO_BODY)
            assert not isinstance(reply, proxy.Failure)
            await reply.content.wait_eof()  # all of it arrived, as from a fast upstream
            response = upstream.response(reply)
            assert not isinstance(response, proxy.Failure)
            transport = request.transport
            assert transport is not None
            real_write, real_writelines = transport.write, transport.writelines

            def write(data: bytes) -> None:
                sends.append(bytes(data))
                real_write(data)

            def writelines(chunks: list[bytes]) -> None:
                sends.append(b"".join(chunks))
                real_writelines(chunks)

            transport.write = write  # type: ignore[method-assign]
            transport.writelines = writelines  # type: ignore[method-assign]
            assert await upstream.relay(request, reply, response) == proxy.COMPLETE
            return response

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        try:
            async with serving(app) as port:
                received = await _get(Exchange(f"http://127.0.0.1:{port}"), "/x")
        finally:
            await session.close()
    status, _, body = parse_head(received)
    assert status == int(answer.split(b" ")[1])
    assert body in (b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"")
    assert len(sends) == 1
    assert sends[0] == received


async def test_a_streamed_answer_shows_its_head_before_the_body_arrives() -> None:
    # The head is only held back while body bytes are at hand: a client of a
    # stream (server-sent events, a long download) sees the status and
    # headers as soon as the upstream sent them.
    head_seen = asyncio.Event()

    async def stream(head: bytes, writer: asyncio.StreamWriter) -> None:
        await send(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        async with asyncio.timeout(10):
            await head_seen.wait()
        await send(writer, b"late")

    async with ScriptedUpstream({"/s": stream}) as up, exchange(up.url) as ex:
        reader, writer = await asyncio.open_connection("127.0.0.1", ex.port)
        try:
            writer.write(b"GET /s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            head_seen.set()
            body = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.transport.abort()
    assert parse_head(head)[0] == 200
    assert body == b"late"
    assert ex.outcomes == [proxy.COMPLETE]
