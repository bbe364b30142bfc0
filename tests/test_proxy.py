"""The proxy bullets of ARCHITECTURE.md §3, over real sockets: gateway (aiohttp, real
loopback port) → real Flask backend, or a scripted raw upstream for faults."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import socket
import time
import zlib
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import proxy
from gateway.app import create_app
from gateway.config import GatewayConfig
from latency_common.telemetry import Telemetry
from tests.conftest import GatewayFactory, Traced
from tests.servers import BackendThread, parse_head, raw_request, serving, wait_for
from tests.upstream import ScriptedUpstream, cut_after, fixed, stall

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _raw(url: str, data: bytes, timeout_s: float = 10.0, until_close: bool = False) -> bytes:
    return await asyncio.to_thread(
        raw_request, _port(url), data, timeout_s=timeout_s, until_close=until_close
    )


async def _echo(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> dict[str, Any]:
    async with http.request(kwargs.pop("method", "GET"), url, **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


def _headers(echo: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in echo["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


# -- the whole path --------------------------------------------------------


async def test_home_feed_is_traced_end_to_end(
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    gateway_spans: Traced,
    backend: BackendThread,
) -> None:
    base = await gateway()
    async with http.get(
        base + "/api/activities/home",
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    ) as resp:
        assert resp.status == 200
        feed = await resp.json()
        timing = resp.headers["Server-Timing"]
    assert isinstance(feed, list)
    assert feed
    # One span per request by default: the upstream call is recorded on it.
    assert [s.kind.name for s in gateway_spans.spans()] == ["SERVER"]
    (server_span,) = gateway_spans.spans()
    backend_spans = {s.name: s for s in backend.traced.spans()}
    flask_span = backend_spans["GET /api/activities/home"]
    mock = backend_spans["mock-data"]
    # One trace: browser's → gateway SERVER → backend → mock-data.
    for span in (server_span, flask_span, mock):
        assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert server_span.parent is not None
    assert f"{server_span.parent.span_id:016x}" == PARENT_ID
    assert flask_span.parent is not None
    assert flask_span.parent.span_id == server_span.context.span_id
    assert mock.parent is not None
    assert mock.parent.span_id == flask_span.context.span_id
    # HTTP semantic conventions on the SERVER span.
    attrs = server_span.attributes or {}
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/api/activities/home"
    assert attrs["url.scheme"] == "http"
    assert attrs["http.response.status_code"] == 200
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["server.address"] == "127.0.0.1"
    assert "user_agent.original" in attrs
    # HTTP semconv: server.address on a SERVER span is the host the client
    # addressed; the upstream has attributes of its own.
    backend_port = int(backend.url.rsplit(":", 1)[1])
    assert attrs["gateway.upstream.address"] == "127.0.0.1"
    assert attrs["gateway.upstream.port"] == backend_port
    assert "url.full" not in attrs
    assert 0 < attrs["latency.upstream_ms"] <= attrs["latency.gateway_ms"]
    # Server-Timing names the gateway's own span (ARCHITECTURE.md §3).
    assert f'traceparent;desc="00-{TRACE_ID}-{server_span.context.span_id:016x}-01"' in timing
    gw = float(timing.split("gw;dur=")[1].split(",")[0])
    upstream = float(timing.split("upstream;dur=")[1].split(",")[0])
    assert 0 < upstream <= gw
    assert attrs["latency.gateway_ms"] == gw
    assert attrs["latency.upstream_ms"] == upstream


# -- what crosses the gateway ------------------------------------------------


async def test_raw_path_and_query_are_forwarded_byte_for_byte(
    gateway: GatewayFactory, backend: BackendThread
) -> None:
    base = await gateway()
    target = "/api/echo/a%2Fb/%7Euser/x;y?q=%2F&r=%20a+b&empty=&&z"
    data = await _raw(
        base, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    status, _, body = parse_head(data)
    assert status == 200
    assert json.loads(body)["raw_uri"] == target


async def test_hop_by_hop_and_connection_tokens_are_stripped(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    # RFC 9110 §7.6.1: hop-by-hop fields and every field named in Connection.
    echo = await _echo(
        http,
        base + "/api/echo",
        headers={
            "Connection": "keep-alive, X-Hop-Secret, x-other-hop",
            "X-Hop-Secret": "1",
            "X-Other-Hop": "2",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Proxy-Connection": "keep-alive",
            "X-End-To-End": "kept",
        },
    )
    seen = _headers(echo)
    for name in (
        "x-hop-secret",
        "x-other-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
    ):
        assert name not in seen, name
    assert seen["x-end-to-end"] == ["kept"]


async def test_response_hop_by_hop_headers_are_stripped(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    scripts = {
        "/hop": fixed(
            b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: secret\r\n"
            b"Keep-Alive: timeout=99\r\nProxy-Authenticate: Basic\r\nX-Kept: yes\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
    }
    async with ScriptedUpstream(scripts) as up:
        base = await gateway(upstream=up.url)
        async with http.get(base + "/hop") as resp:
            assert resp.status == 200
            assert await resp.read() == b"ok"
            for name in ("X-Internal", "Keep-Alive", "Proxy-Authenticate"):
                assert name not in resp.headers
            assert resp.headers["X-Kept"] == "yes"


async def test_host_and_forwarded_headers(gateway: GatewayFactory, backend: BackendThread) -> None:
    base = await gateway()
    request = (
        "GET /api/echo HTTP/1.1\r\nHost: shop.example:8443\r\n"
        "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\n"
        "X-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
        "Connection: close\r\n\r\n"
    )
    status, _, body = parse_head(await _raw(base, request.encode()))
    assert status == 200
    seen = _headers(json.loads(body))
    # The upstream's own host (nginx: proxy_set_header Host $proxy_host).
    assert seen["host"] == [f"127.0.0.1:{backend.port}"]
    # With GATEWAY_TRUSTED_PROXIES=0 the spoofed chain is dropped.
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-host"] == ["shop.example:8443"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert "forwarded" not in seen


async def test_trusted_proxy_chain_is_kept_and_client_address_derived(
    gateway: GatewayFactory, gateway_spans: Traced
) -> None:
    base = await gateway(trusted_proxies=1)
    request = (
        "GET /api/echo HTTP/1.1\r\nHost: x\r\n"
        "X-Forwarded-For: 6.6.6.6, 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"
        "Connection: close\r\n\r\n"
    )
    status, _, body = parse_head(await _raw(base, request.encode()))
    assert status == 200
    seen = _headers(json.loads(body))
    # ProxyFix semantics: the last N entries are trusted, the peer appended.
    assert seen["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["https"]
    server = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    assert (server.attributes or {})["client.address"] == "203.0.113.7"


async def test_propagation_headers_replaced_by_exactly_one_context(
    gateway: GatewayFactory, http: aiohttp.ClientSession, gateway_spans: Traced
) -> None:
    base = await gateway()
    echo = await _echo(
        http,
        base + "/api/echo",
        headers={
            "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
            "tracestate": "vendor=value",
            "b3": f"{TRACE_ID}-{PARENT_ID}-1",
            "X-B3-TraceId": TRACE_ID,
            "X-B3-SpanId": PARENT_ID,
            "X-Client-Timestamp": "t=1700000000000",
            "X-Client-Clock": "off=1",
        },
    )
    seen = _headers(echo)
    server_span = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    assert seen["traceparent"] == [f"00-{TRACE_ID}-{server_span.context.span_id:016x}-01"]
    assert seen["tracestate"] == ["vendor=value"]
    for name in ("b3", "x-b3-traceid", "x-b3-spanid", "x-client-timestamp", "x-client-clock"):
        assert name not in seen


async def test_no_default_headers_are_added_upstream(
    gateway: GatewayFactory, backend: BackendThread
) -> None:
    base = await gateway()
    request = (
        "POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    )
    status, _, body = parse_head(await _raw(base, request.encode()))
    assert status == 200
    echo = json.loads(body)
    seen = _headers(echo)
    # aiohttp's client would add these; the browser did not send them.
    for name in ("user-agent", "accept", "accept-encoding", "content-type"):
        assert name not in seen, name
    assert echo["body_bytes"] == 3


async def test_header_order_and_repeats_survive(
    gateway: GatewayFactory, backend: BackendThread
) -> None:
    base = await gateway()
    request = (
        "GET /api/echo HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-B: 2\r\nX-A: 3\r\n"
        "X-Unicode: \u00e9t\u00e9\r\nConnection: close\r\n\r\n"
    )
    status, _, body = parse_head(await _raw(base, request.encode()))
    assert status == 200
    names = [n.lower() for n, _ in json.loads(body)["headers"]]
    assert names.index("x-a") < names.index("x-b")
    # The WSGI server may join repeated fields with ", " (README "Backend").
    assert _headers(json.loads(body))["x-a"] in (["1", "3"], ["1, 3"], ["1,3"])
    # PEP 3333: WSGI hands header values over as latin-1 decoded bytes.
    [unicode] = _headers(json.loads(body))["x-unicode"]
    assert unicode.encode("latin-1").decode("utf-8") == "\u00e9t\u00e9"


async def test_non_utf8_header_value_is_refused_not_altered(gateway: GatewayFactory) -> None:
    base = await gateway()
    data = await _raw(
        base, b"GET /api/echo HTTP/1.1\r\nHost: x\r\nX-Bin: \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    status, _, body = parse_head(data)
    assert status == 400
    assert "not valid UTF-8" in json.loads(body)["error"]


# -- bodies ------------------------------------------------------------------


async def test_gzip_bytes_pass_untouched(
    gateway: GatewayFactory, http: aiohttp.ClientSession, backend: BackendThread
) -> None:
    base = await gateway()
    async with http.get(backend.url + "/api/gzip") as direct:
        expected = await direct.read()
    async with http.get(base + "/api/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        body = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(expected))
    assert body == expected
    assert json.loads(gzip.decompress(body))


async def test_set_cookie_headers_stay_separate(
    gateway: GatewayFactory, http: aiohttp.ClientSession, backend: BackendThread
) -> None:
    base = await gateway()
    async with http.get(backend.url + "/api/cookies") as direct:
        expected = direct.headers.getall("Set-Cookie")
    async with http.get(base + "/api/cookies") as resp:
        cookies = resp.headers.getall("Set-Cookie")
    assert len(expected) == 2
    assert cookies == expected


async def test_redirect_is_passed_through_not_followed(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    async with http.get(base + "/api/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/api/activities/home"


async def test_no_content_type_is_invented(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    scripts = {"/bare": fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbare")}
    async with ScriptedUpstream(scripts) as up:
        base = await gateway(upstream=up.url)
        data = await _raw(base, b"GET /bare HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = parse_head(data)
    assert status == 200
    assert body == b"bare"
    names = [n.lower() for n, _ in headers]
    assert "content-type" not in names
    assert "server" not in names


@pytest.mark.parametrize(
    ("method", "path"),
    [("HEAD", "/api/activities/home"), ("GET", "/api/status/204"), ("GET", "/api/status/304")],
)
async def test_no_body_for_head_204_304(gateway: GatewayFactory, method: str, path: str) -> None:
    base = await gateway()
    # Two requests on one connection: a stray body would corrupt the second.
    request = f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    second = b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = await _raw(base, request + second, until_close=True)
    first, _, rest = data.partition(b"\r\n\r\n")
    assert rest.startswith(b"HTTP/1.1 200"), data[:400]
    assert first.startswith(b"HTTP/1.1 " + (b"200" if method == "HEAD" else path[-3:].encode()))
    if method == "HEAD":
        assert b"content-length:" in first.lower()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_request_body_reaches_the_backend_byte_for_byte(
    gateway: GatewayFactory, http: aiohttp.ClientSession, encoding: str
) -> None:
    """The backend gets the bytes the client sent with the Content-Encoding
    it sent (RFC 9110 §8.4): the gateway decodes nothing, and a body that
    would not decode passes as it is (the backend's to refuse), never a 500."""
    base = await gateway()
    plain = b"hello backend " * 100
    for data in (
        gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain),
        b"\x1f\x8b?",
    ):
        echo = await _echo(
            http,
            base + "/api/echo",
            method="POST",
            data=data,
            headers={"Content-Encoding": encoding},
        )
        assert echo["body_sha256"] == hashlib.sha256(data).hexdigest()
        assert _headers(echo)["content-encoding"] == [encoding]


async def test_large_request_body_streams_with_its_hash(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway(max_body_bytes=64 * 1024 * 1024)
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()

    async def body() -> Any:
        for _ in range(40):
            digest.update(block)
            yield block

    echo = await _echo(http, base + "/api/echo", method="PUT", data=body())
    assert echo["body_bytes"] == 40 * len(block)
    assert echo["body_sha256"] == digest.hexdigest()


async def test_oversized_declared_body_is_413_without_upstream_call(
    gateway: GatewayFactory, http: aiohttp.ClientSession, backend: BackendThread
) -> None:
    base = await gateway(max_body_bytes=1000)
    async with http.post(base + "/api/echo", data=b"x" * 1001) as resp:
        assert resp.status == 413
        assert "trace_id" in await resp.json()
    assert backend.traced.spans() == []


async def test_oversized_chunked_body_is_413(gateway: GatewayFactory) -> None:
    base = await gateway(max_body_bytes=100_000)
    chunk = b"%x\r\n%s\r\n" % (50_000, b"y" * 50_000)
    head = b"POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    data = await _raw(base, head + chunk * 3 + b"0\r\n\r\n")
    status, _, body = parse_head(data)
    assert status == 413
    assert "too large" in json.loads(body)["error"]


# -- limits and bad input ------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ("X-Big: " + "a" * 9000 + "\r\n", 431),  # RFC 6585 §5: one field too large
        ("".join(f"X-H{i}: {'b' * 600}\r\n" for i in range(60)), 431),  # whole section
        ("".join(f"X-N{i}: 1\r\n" for i in range(150)), 431),  # too many fields
    ],
)
async def test_header_limits_answer_431(gateway: GatewayFactory, extra: str, status: int) -> None:
    base = await gateway()
    data = await _raw(
        base, f"GET /api/echo HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode()
    )
    assert parse_head(data)[0] == status


async def test_long_target_is_414(gateway: GatewayFactory) -> None:
    base = await gateway()
    data = await _raw(
        base,
        f"GET /api/echo?{'q' * 9000} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert parse_head(data)[0] == 414


async def test_absolute_form_cannot_choose_the_upstream(
    gateway: GatewayFactory, backend: BackendThread
) -> None:
    base = await gateway()
    for target in ("http://169.254.169.254/api/echo", "http://evil.example:80/api/echo?x=1"):
        request = (
            f"GET {target} HTTP/1.1\r\nHost: evil.example\r\n"
            "X-Forwarded-Host: 10.0.0.1\r\nConnection: close\r\n\r\n"
        )
        status, _, body = parse_head(await _raw(base, request.encode()))
        assert status == 200
        echo = json.loads(body)
        # It reached our backend, with only the path and query of the target.
        assert echo["raw_uri"] == target.split("/", 3)[3].join(["/", ""])
        assert _headers(echo)["host"] == [f"127.0.0.1:{backend.port}"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET //evil.example/api/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /@evil.example/api HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
    ],
)
async def test_ssrf_shapes_never_leave_the_upstream(
    gateway: GatewayFactory, request_bytes: bytes
) -> None:
    scripts: dict[str, Any] = {}
    async with ScriptedUpstream(scripts) as up:
        base = await gateway(upstream=up.url)
        data = await _raw(base, request_bytes, timeout_s=3)
        status = parse_head(data)[0]
        assert status in (400, 404, 405)
        # Whatever was forwarded went to our upstream, with the target as a path.
        for head in up.requests:
            assert head.split(b" ")[1].startswith(b"/")


async def test_reserved_prefix_is_never_forwarded(
    gateway: GatewayFactory, http: aiohttp.ClientSession, backend: BackendThread
) -> None:
    base = await gateway()
    async with http.get(base + "/__gateway/nope") as resp:
        assert resp.status == 404
        assert "no such gateway endpoint" in (await resp.json())["error"]
    assert backend.traced.spans() == []


# -- upstream failures -----------------------------------------------------------


async def test_spans_server_client_puts_the_upstream_call_in_a_client_span(
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    gateway_spans: Traced,
    backend: BackendThread,
) -> None:
    # GATEWAY_SPANS=server,client: gateway SERVER → gateway CLIENT → backend.
    base = await gateway(spans=("server", "client"))
    async with http.get(
        base + "/api/activities/home",
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    ) as resp:
        assert resp.status == 200
        await resp.read()
    assert [s.kind.name for s in gateway_spans.spans()] == ["CLIENT", "SERVER"]
    client_span, server_span = gateway_spans.spans()
    flask_span = {s.name: s for s in backend.traced.spans()}["GET /api/activities/home"]
    assert client_span.parent is not None
    assert client_span.parent.span_id == server_span.context.span_id
    assert flask_span.parent is not None
    assert flask_span.parent.span_id == client_span.context.span_id
    client_attrs = client_span.attributes or {}
    assert client_attrs["url.full"] == backend.url + "/api/activities/home"
    assert client_attrs["server.port"] == int(backend.url.rsplit(":", 1)[1])
    assert client_attrs["http.response.status_code"] == 200
    # The SERVER span keeps the host the client addressed.
    assert (server_span.attributes or {})["server.address"] == "127.0.0.1"


async def test_upstream_down_with_a_client_span_marks_both_spans(
    gateway: GatewayFactory, http: aiohttp.ClientSession, gateway_spans: Traced
) -> None:
    from tests.servers import free_port

    base = await gateway(upstream=f"http://127.0.0.1:{free_port()}", spans=("server", "client"))
    async with http.get(base + "/api/activities/home") as resp:
        assert resp.status == 502
    server = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    client = next(s for s in gateway_spans.spans() if s.kind.name == "CLIENT")
    assert server.status.status_code.name == "ERROR"
    assert client.status.status_code.name == "ERROR"
    assert (client.attributes or {})["error.type"] == "ClientConnectorError"


async def test_upstream_down_is_502_fast_with_error_span(
    gateway: GatewayFactory, http: aiohttp.ClientSession, gateway_spans: Traced
) -> None:
    from tests.servers import free_port

    base = await gateway(upstream=f"http://127.0.0.1:{free_port()}", connect_timeout_s=20)
    started = time.monotonic()
    async with http.get(base + "/api/activities/home") as resp:
        assert resp.status == 502
        body = await resp.json()
    # Refused at once, not after the 20 s connect timeout.
    assert time.monotonic() - started < 10
    assert body["error"] == "upstream unreachable"
    server = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    assert body["trace_id"] == f"{server.context.trace_id:032x}"
    assert server.status.status_code.name == "ERROR"
    assert (server.attributes or {})["error.type"] == "ClientConnectorError"
    assert (server.attributes or {})["http.response.status_code"] == 502


async def test_upstream_silent_is_504_after_read_timeout(
    gateway: GatewayFactory, http: aiohttp.ClientSession, gateway_spans: Traced
) -> None:
    async with ScriptedUpstream({"/stall": stall()}) as up:
        base = await gateway(upstream=up.url, read_timeout_s=0.5)
        started = time.monotonic()
        async with http.get(base + "/stall") as resp:
            assert resp.status == 504
            assert (await resp.json())["error"] == "upstream timed out"
        assert time.monotonic() - started >= 0.5
    server = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    assert (server.attributes or {})["error.type"] == "timeout"


async def test_a_client_gone_mid_upload_is_its_400_on_the_spans_not_an_upstream_failure(
    gateway_spans: Traced, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes before the end of the body it declared, while
    that body streams upstream (above GATEWAY_BUFFER_BODY_BYTES): the SERVER
    span says 400 and the client's error (RFC 9112 §8: the message is
    incomplete), the CLIENT span the same; nothing is logged as an upstream
    failure, and the answer to the departed client is dropped without a
    traceback. Run as the CLI runs it: a departing client does not cancel the
    handler (aiohttp's TestServer would)."""
    caplog.set_level(logging.WARNING)
    async with ScriptedUpstream({"/upload": stall()}) as up:
        config = GatewayConfig().replace(
            upstream=up.url,
            workers=1,
            clock_key=b"k" * 32,
            buffer_body_bytes=16,
            spans=("server", "client"),
        )
        app = create_app(config, telemetry=Telemetry(gateway_spans.provider))
        async with serving(app) as port:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(
                    b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100
                )
                await writer.drain()
                await wait_for(lambda: bool(up.requests))
            finally:
                writer.transport.abort()
            await wait_for(lambda: any(s.kind.name == "SERVER" for s in gateway_spans.spans()))
    client = next(s for s in gateway_spans.spans() if s.kind.name == "CLIENT")
    server = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    server_attrs = server.attributes or {}
    assert server_attrs["http.response.status_code"] == 400
    assert server_attrs["error.type"] == "ConnectionResetError"
    assert server.status.status_code.name == "UNSET"  # a 4xx is the client's (semconv)
    assert (client.attributes or {})["error.type"] == "ConnectionResetError"
    assert client.status.description == "request body incomplete"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_upstream_dying_mid_body_cuts_the_client_response(
    gateway: GatewayFactory, http: aiohttp.ClientSession, gateway_spans: Traced, head: bytes
) -> None:
    async with ScriptedUpstream({"/cut": cut_after(head)}) as up:
        base = await gateway(upstream=up.url)
        async with http.get(base + "/cut") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        # The gateway keeps serving.
        async with http.get(base + "/__gateway/health") as health:
            assert health.status == 200
    server = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    assert server.status.status_code.name == "ERROR"
    assert (server.attributes or {})["error.type"] == "ClientPayloadError"


async def test_upstream_header_that_is_not_utf8_is_a_clear_502(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    scripts = {"/h": fixed(b"HTTP/1.1 200 OK\r\nX-Name: \xe9t\xe9\r\nContent-Length: 0\r\n\r\n")}
    async with ScriptedUpstream(scripts) as up:
        base = await gateway(upstream=up.url)
        async with http.get(base + "/h") as resp:
            assert resp.status == 502
            assert "not UTF-8" in (await resp.json())["error"]


# -- reserved endpoints and CORS ---------------------------------------------------


async def test_health_reports_upstream_and_exporter(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    from tests.servers import free_port

    base = await gateway()
    async with http.get(base + "/__gateway/health") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["upstream"]["reachable"] is True
    assert "version" in body
    assert "exporter" in body
    # Liveness: the backend's state is in the detail, never in the status.
    down = await gateway(upstream=f"http://127.0.0.1:{free_port()}")
    async with http.get(down + "/__gateway/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["upstream"]["reachable"] is False


OURS = ("traceparent", "tracestate", "x-client-timestamp", "x-client-clock", "x-client-prev")
DEMO = "http://localhost:3000"
CORS_NAMES = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Headers",
    "Access-Control-Allow-Methods",
    "Access-Control-Expose-Headers",
    "Timing-Allow-Origin",
)


def _list(value: str | None) -> list[str]:
    return [t.strip().lower() for t in (value or "").split(",") if t.strip()]


def _preflight(origin: str, method: str, request_headers: str | None) -> dict[str, str]:
    headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if request_headers is not None:
        headers["Access-Control-Request-Headers"] = request_headers
    return headers


@pytest.mark.parametrize(
    ("method", "requested"),
    [
        ("GET", "traceparent, x-client-timestamp, x-client-clock, x-client-prev"),
        ("HEAD", "traceparent,tracestate"),
        ("POST", "Traceparent, X-Client-Timestamp"),
    ],
)
async def test_preflight_caused_by_our_headers_only_is_answered_by_the_gateway(
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    gateway_spans: Traced,
    backend: BackendThread,
    method: str,
    requested: str,
) -> None:
    # Fetch standard §3.2.3: our answer grants exactly what was asked.
    base = await gateway()
    async with http.options(
        base + "/api/echo", headers=_preflight(DEMO, method, requested)
    ) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == DEMO
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        assert resp.headers["Access-Control-Allow-Methods"] == method
        # All of ours (a cached answer then covers X-Client-Prev, added from
        # the second request on), and nothing else.
        assert _list(resp.headers["Access-Control-Allow-Headers"]) == list(OURS)
        assert int(resp.headers["Access-Control-Max-Age"]) > 0
        assert "origin" in _list(resp.headers["Vary"])
    assert backend.traced.spans() == []
    assert gateway_spans.spans() == []


@pytest.mark.parametrize(
    ("method", "requested", "granted"),
    [
        # content-type is listed only when its value is not safelisted (Fetch
        # §2.2.2 "CORS-unsafe request-header names"): the backend decides.
        ("POST", "content-type, traceparent", ["content-type"]),
        ("GET", "content-type", ["content-type"]),
        # A header neither ours nor the backend's: the backend does not list
        # it, and neither do we.
        ("POST", "traceparent, x-page", []),
        ("GET", None, []),
    ],
)
async def test_other_preflights_reach_the_backend_and_get_our_names_added(
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    gateway_spans: Traced,
    backend: BackendThread,
    method: str,
    requested: str | None,
    granted: list[str],
) -> None:
    base = await gateway()
    async with http.options(
        base + "/api/activities/home", headers=_preflight(DEMO, method, requested)
    ) as resp:
        assert resp.status == 200  # the backend's answer
        assert resp.headers["Access-Control-Allow-Origin"] == DEMO  # the backend's grant
        assert "Access-Control-Allow-Credentials" not in resp.headers
        allowed = _list(resp.headers["Access-Control-Allow-Headers"])
        assert allowed == [*granted, *OURS]  # merged, each name once
        assert "x-page" not in allowed
    assert [s.name for s in backend.traced.spans()] == ["OPTIONS /api/activities/home"]
    assert [s.name for s in gateway_spans.spans()] == ["OPTIONS"]  # forwarded, traced


async def test_preflight_for_a_method_the_backend_refuses_passes_untouched(
    gateway: GatewayFactory, http: aiohttp.ClientSession, backend: BackendThread
) -> None:
    base = await gateway()
    async with http.options(
        base + "/api/echo", headers=_preflight(DEMO, "PUT", "traceparent")
    ) as resp:
        echo = await resp.json()
        for name in CORS_NAMES:
            assert name not in resp.headers
    assert echo["method"] == "OPTIONS"  # forwarded, not answered by the gateway


@pytest.mark.parametrize("origin", ["https://app.example.com", "https://evil.example"])
async def test_backend_not_granting_an_origin_gets_nothing_added(
    gateway: GatewayFactory, http: aiohttp.ClientSession, origin: str
) -> None:
    # app.example.com is allowed by the gateway, not by the backend: the
    # backend's "no" stands, on preflights and on responses.
    base = await gateway(allowed_origins=("https://app.example.com",))
    async with http.options(
        base + "/api/activities/home", headers=_preflight(origin, "POST", "content-type")
    ) as resp:
        for name in CORS_NAMES:
            assert name not in resp.headers
    async with http.get(base + "/api/activities/home", headers={"Origin": origin}) as resp:
        assert resp.status == 200
        for name in CORS_NAMES:
            assert name not in resp.headers


async def test_exposure_added_only_where_the_backend_granted(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    async with http.get(base + "/api/activities/home", headers={"Origin": DEMO}) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == DEMO  # the backend's own
        assert "Access-Control-Allow-Credentials" not in resp.headers
        assert _list(resp.headers["Access-Control-Expose-Headers"]) == [
            "location",
            "link",
            "server-timing",
            "x-gateway-clock",
        ]
        assert resp.headers["Timing-Allow-Origin"] == DEMO
        assert [v.lower() for v in resp.headers.getall("Vary")].count("origin") == 1


@pytest.mark.parametrize(
    ("backend_headers", "expected"),
    [
        # "*" grants every origin without credentials: our additions follow,
        # Allow-Origin stays "*" and no Allow-Credentials appears.
        (
            b"Access-Control-Allow-Origin: *\r\nAccess-Control-Expose-Headers: X-Own\r\n",
            {
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Expose-Headers": "X-Own, Server-Timing, X-Gateway-Clock",
                "Timing-Allow-Origin": DEMO,
            },
        ),
        # Credentials granted by the backend stay exactly as they were.
        (
            b"Access-Control-Allow-Origin: http://localhost:3000\r\n"
            b"Access-Control-Allow-Credentials: true\r\n",
            {
                "Access-Control-Allow-Origin": DEMO,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Expose-Headers": "Server-Timing, X-Gateway-Clock",
                "Timing-Allow-Origin": DEMO,
            },
        ),
        # Another origin granted, or none: nothing of ours is added.
        (
            b"Access-Control-Allow-Origin: https://other.example\r\n",
            {"Access-Control-Allow-Origin": "https://other.example"},
        ),
        (b"", {}),
    ],
)
async def test_proxied_responses_keep_the_backends_allow_origin_and_credentials(
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    backend_headers: bytes,
    expected: dict[str, str],
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + backend_headers + b"\r\nok"
    async with ScriptedUpstream({"/x": fixed(answer)}) as up:
        base = await gateway(upstream=up.url)
        async with http.get(base + "/x", headers={"Origin": DEMO}) as resp:
            assert resp.status == 200
            got = {name: resp.headers[name] for name in CORS_NAMES if name in resp.headers}
    assert got == expected


@pytest.mark.parametrize(
    ("allow_headers", "expected"),
    [
        (b"Access-Control-Allow-Headers: *\r\n", "*"),
        (
            b"Access-Control-Allow-Headers: X-Own, traceparent\r\n",
            "X-Own, traceparent, " + ", ".join(OURS[1:]),
        ),
    ],
)
async def test_backend_preflight_grant_is_merged_not_replaced(
    gateway: GatewayFactory, http: aiohttp.ClientSession, allow_headers: bytes, expected: str
) -> None:
    answer = (
        b"HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: *\r\n"
        b"Access-Control-Allow-Methods: PUT\r\n" + allow_headers + b"\r\n"
    )
    async with ScriptedUpstream({"/x": fixed(answer)}) as up:
        base = await gateway(upstream=up.url)
        async with http.options(base + "/x", headers=_preflight(DEMO, "PUT", "x-own")) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert resp.headers["Access-Control-Allow-Methods"] == "PUT"
            assert resp.headers["Access-Control-Allow-Headers"] == expected
            assert "Access-Control-Allow-Credentials" not in resp.headers
    assert len(up.requests) == 1


@pytest.mark.parametrize(
    ("origin", "matches"),
    [
        ("https://app.example.com", True),
        ("https://a-1.example.com", True),
        ("https://xn--bcher-kva.example.com", True),
        ("https://example.com", False),
        ("https://evilexample.com", False),
        ("https://a.b.example.com", False),
        ("https://.example.com", False),
        ("https://app.example.com.evil.example", False),
        ("http://app.example.com", False),  # the scheme must match
        ("https://app.example.com:8443", False),  # and the port
        ("https://-a.example.com", False),
        ("https://app.example.com/", False),
    ],
)
async def test_origin_patterns_stand_for_one_dns_label(
    gateway: GatewayFactory, http: aiohttp.ClientSession, origin: str, matches: bool
) -> None:
    # As TLS wildcards (RFC 6125 §6.4.3): "*" is exactly one whole label.
    base = await gateway(allowed_origins=("https://*.example.com", "http://*.test.example:8080"))
    async with http.options(
        base + "/api/echo", headers=_preflight(origin, "GET", "traceparent")
    ) as resp:
        answered_by_gateway = resp.status == 204
        assert (resp.headers.get("Access-Control-Allow-Origin") == origin) is matches
    assert answered_by_gateway is matches
    async with http.get(base + "/__gateway/clock", headers={"Origin": origin}) as resp:
        assert (resp.headers.get("Access-Control-Allow-Origin") == origin) is matches


async def test_pattern_port_must_match(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway(allowed_origins=("http://*.test.example:8080",))
    for origin, matches in (
        ("http://a.test.example:8080", True),
        ("http://a.test.example", False),
        ("http://a.test.example:80800", False),
    ):
        async with http.get(base + "/__gateway/clock", headers={"Origin": origin}) as resp:
            assert (resp.headers.get("Access-Control-Allow-Origin") == origin) is matches, origin


async def test_empty_allow_list_grants_no_cross_origin_page(
    gateway: GatewayFactory, http: aiohttp.ClientSession, backend: BackendThread
) -> None:
    base = await gateway(allowed_origins=())
    # Our headers' preflight goes to the backend, which grants its own list
    # only: nothing of ours is merged in.
    async with http.options(
        base + "/api/activities/home", headers=_preflight(DEMO, "GET", "traceparent")
    ) as resp:
        assert resp.status == 200
        assert "Access-Control-Allow-Headers" not in resp.headers
    async with http.get(base + "/api/activities/home", headers={"Origin": DEMO}) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == DEMO  # the backend's
        assert _list(resp.headers["Access-Control-Expose-Headers"]) == ["location", "link"]
        assert "Timing-Allow-Origin" not in resp.headers
    async with http.get(base + "/__gateway/clock", headers={"Origin": DEMO}) as resp:
        assert resp.status == 204
        for name in CORS_NAMES:
            assert name not in resp.headers


async def test_own_endpoints_are_granted_without_credentials(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    async with http.get(base + "/__gateway/clock", headers={"Origin": DEMO}) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == DEMO
        assert "X-Gateway-Clock" in resp.headers["Access-Control-Expose-Headers"]
        assert "Access-Control-Allow-Credentials" not in resp.headers
    async with http.options(
        base + "/__gateway/beacon", headers=_preflight(DEMO, "POST", "content-type")
    ) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == DEMO
        assert "Access-Control-Allow-Credentials" not in resp.headers


async def test_unknown_method_is_other_in_the_span(
    gateway: GatewayFactory, gateway_spans: Traced
) -> None:
    base = await gateway(spans=("server", "client"))
    data = await _raw(base, b"PROPFIND /api/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert parse_head(data)[0] == 200
    server = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    client = next(s for s in gateway_spans.spans() if s.kind.name == "CLIENT")
    # HTTP semantic conventions: span name "HTTP" when the method is _OTHER.
    assert server.name == "HTTP"
    assert client.name == "HTTP"
    assert (client.attributes or {})["http.request.method"] == "_OTHER"
    assert (server.attributes or {})["http.request.method"] == "_OTHER"
    assert (server.attributes or {})["http.request.method_original"] == "PROPFIND"


# -- protocol edges, answered as nginx answers them ----------------------------------


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
async def test_unsupported_http_version_is_505_and_not_forwarded(
    gateway: GatewayFactory, version: bytes
) -> None:
    # RFC 9110 §15.6.6: 505 for a major version the server does not support.
    # aiohttp's parser hands these request lines over (HTTP/3.0 and HTTP/1.2 it
    # refuses itself with a 400).
    async with ScriptedUpstream({}) as up:
        base = await gateway(upstream=up.url)
        data = await _raw(base, b"GET /x " + version + b"\r\nHost: x\r\n\r\n", until_close=True)
        status, _, body = parse_head(data)
        assert status == 505
        assert "not supported" in json.loads(body)["error"]
        assert up.requests == []


async def test_trace_is_405_with_allow_and_never_forwarded(
    gateway: GatewayFactory, gateway_spans: Traced
) -> None:
    # RFC 9110 §9.3.8: TRACE reflects the request (cookies, credentials); a
    # proxy may refuse it, nginx answers 405. RFC 9110 §15.5.6: a 405 carries
    # Allow.
    async with ScriptedUpstream({}) as up:
        base = await gateway(upstream=up.url)
        data = await _raw(base, b"TRACE /x HTTP/1.1\r\nHost: x\r\nCookie: secret=1\r\n\r\n")
        status, headers, body = parse_head(data)
        assert status == 405
        allow = dict(headers)["Allow"]
        assert "GET" in allow
        assert "TRACE" not in allow
        assert b"secret" not in body
        assert up.requests == []
    server = next(s for s in gateway_spans.spans() if s.kind.name == "SERVER")
    assert (server.attributes or {})["http.response.status_code"] == 405
    assert not [s for s in gateway_spans.spans() if s.kind.name == "CLIENT"]


async def test_expect_continue_with_oversized_body_is_413_without_100(
    gateway: GatewayFactory, backend: BackendThread
) -> None:
    # RFC 9110 §10.1.1: a server that will refuse the request from its head
    # may answer at once instead of inviting the body with 100 (Continue).
    base = await gateway(max_body_bytes=1000)
    head = (
        b"PUT /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    )
    data = await _raw(base, head)
    assert not data.startswith(b"HTTP/1.1 100"), data
    status, _, _ = parse_head(data)
    assert status == 413
    assert backend.traced.spans() == []


async def test_expect_continue_within_limits_gets_100_then_the_answer(
    gateway: GatewayFactory,
) -> None:
    base = await gateway(max_body_bytes=1000)
    head = b"PUT /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    port = _port(base)

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head)
            interim = sock.recv(65536)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"hello")
            out = b""
            while b'"body_bytes"' not in out:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
            return out

    data = await asyncio.to_thread(exchange)
    status, _, body = parse_head(data)
    assert status == 200
    assert b'"body_bytes":5' in body


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nX-A: foo\rInjected: bar\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: foo\r\n Injected: bar\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["bare-cr", "obs-fold"],
)
async def test_upstream_header_with_cr_or_lf_never_becomes_a_header_of_its_own(
    gateway: GatewayFactory, response: bytes
) -> None:
    # RFC 9110 §5.5 (no CR/LF in a value), RFC 9112 §5.2 (obs-fold becomes SP):
    # either the value stays one field, or the answer is a 502.
    async with ScriptedUpstream({"/h": fixed(response)}) as up:
        base = await gateway(upstream=up.url)
        data = await _raw(base, b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, _ = parse_head(data)
    assert status in (200, 502)
    assert "injected" not in {name.lower() for name, _ in headers}
    head = data.partition(b"\r\n\r\n")[0]
    for split in (b"\rInjected", b"\nInjected", b"\n Injected"):
        assert split not in head


def test_response_headers_refuse_values_with_cr_or_lf() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    from gateway import proxy

    for value in ("a\r\nInjected: 1", "a\rb", "a\nb"):
        upstream = CIMultiDictProxy(CIMultiDict([("X-A", value)]))
        with pytest.raises(proxy.BadUpstreamHeader) as caught:
            proxy.response_headers(upstream)
        assert str(caught.value) == "upstream sent header 'X-A' that holds CR or LF"


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"TRACE", b"PATCH"]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.0"]),
    expect=st.one_of(
        st.none(),
        st.just(b"100-continue"),
        st.binary(max_size=24).filter(lambda b: not set(b) & set(b"\r\n\x00")),
    ),
    length=st.integers(min_value=0, max_value=3000),
)
async def test_request_line_and_expect_fuzz_never_500(
    gateway: GatewayFactory, method: bytes, version: bytes, expect: bytes | None, length: int
) -> None:
    """Fuzz the new protocol edges over a real socket: any method, version,
    Expect value and declared size gets an HTTP answer, never a 500."""
    base = await gateway(max_body_bytes=1000)
    head = b"%s /api/echo %s\r\nHost: x\r\nConnection: close\r\n" % (method, version)
    head += b"Content-Length: %d\r\n" % length
    if expect is not None:
        head += b"Expect: " + expect + b"\r\n"
    data = await _raw(base, head + b"\r\n" + b"x" * length, until_close=True)
    if data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
        data = data[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
    status, _, _ = parse_head(data)
    assert status < 500 or status == 505, data[:200]


async def test_the_gateways_own_error_is_readable_by_an_allowed_page(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway(upstream="http://127.0.0.1:9")  # nothing listens there
    origin = "http://localhost:3000"
    async with http.get(base + "/api/x", headers={"Origin": origin}) as resp:
        assert resp.status == 502
        body = await resp.json()
        # The page can read the gateway's own JSON (and its trace id)…
        assert resp.headers["Access-Control-Allow-Origin"] == origin
        assert "Server-Timing" in resp.headers["Access-Control-Expose-Headers"]
        # …but no credentials: those are the backend's to grant.
        assert "Access-Control-Allow-Credentials" not in resp.headers
    assert body["error"] == "upstream unreachable"
    async with http.get(base + "/api/x", headers={"Origin": "http://evil.example"}) as resp:
        assert resp.status == 502
        assert "Access-Control-Allow-Origin" not in resp.headers


# -- the pure helpers at their exact bounds (each found by `make mutate`) ---------------
# A stand-in carries only what each helper reads from a request: a real aiohttp
# request cannot hold the odd bytes and sizes these cases need.


def _head(target: bytes = b"/", fields: list[tuple[bytes, bytes]] | None = None) -> Any:
    return SimpleNamespace(raw_path=target.decode("latin-1"), raw_headers=tuple(fields or []))


def _field_of(size: int, name: bytes = b"X-Pad") -> tuple[bytes, bytes]:
    """A field line of ``size`` bytes as nginx counts it: name, ": ", value, CRLF."""
    return name, b"v" * (size - len(name) - 4)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        # RFC 9110 §15.5.15: 414 past the 8 KiB target; the bound itself is allowed.
        (_head(b"/" + b"a" * (proxy.MAX_TARGET_BYTES - 1)), None),
        (
            _head(b"/" + b"a" * proxy.MAX_TARGET_BYTES),
            (414, "request target longer than 8192 bytes"),
        ),
        # RFC 6585 §5: 431 for one field over 8 KiB, for over 100 fields, for over 32 KiB.
        (_head(fields=[_field_of(proxy.MAX_FIELD_BYTES)]), None),
        (
            _head(fields=[_field_of(proxy.MAX_FIELD_BYTES + 1)]),
            (431, "header field 'X-Pad' is larger than 8 KiB"),
        ),
        (_head(fields=[(b"X-A", b"1")] * proxy.MAX_HEADER_COUNT), None),
        (
            _head(fields=[(b"X-A", b"1")] * (proxy.MAX_HEADER_COUNT + 1)),
            (431, "more than 100 header fields"),
        ),
        (_head(fields=[_field_of(proxy.MAX_HEADER_BYTES // 4)] * 4), None),
        (
            _head(fields=[_field_of(proxy.MAX_HEADER_BYTES // 4)] * 4 + [(b"X", b"")]),
            (431, "header section larger than 32 KiB"),
        ),
        (
            _head(fields=[(b"N" * 100, b"\xff")]),
            (400, f"header field {'N' * 64!r} is not valid UTF-8"),
        ),
        (
            _head(fields=[_field_of(proxy.MAX_FIELD_BYTES + 1, b"L" * 100)]),
            (431, f"header field {'L' * 64!r} is larger than 8 KiB"),
        ),
        (_head(fields=[(b"X-Name", "naïve".encode())]), None),
    ],
)
def test_header_limits_are_inclusive_and_name_the_field(
    head: Any, expected: tuple[int, str] | None
) -> None:
    assert proxy.header_limit_error(head) == expected


def _client(headers: list[tuple[str, str]] | None = None, remote: str | None = "10.0.0.9") -> Any:
    return SimpleNamespace(
        remote=remote, scheme="http", headers=CIMultiDictProxy(CIMultiDict(headers or []))
    )


@pytest.mark.parametrize(
    ("headers", "trusted", "expected"),
    [
        # werkzeug ProxyFix: the N-th entry from the right is the client.
        ([], 1, proxy.Forwarding("10.0.0.9", "10.0.0.9", None, "http")),
        (
            [("X-Forwarded-For", "1.1.1.1,2.2.2.2,3.3.3.3")],
            1,
            proxy.Forwarding("3.3.3.3", "3.3.3.3, 10.0.0.9", None, "http"),
        ),
        (
            [("X-Forwarded-For", "2.2.2.2, 3.3.3.3")],
            2,
            proxy.Forwarding("2.2.2.2", "2.2.2.2, 3.3.3.3, 10.0.0.9", None, "http"),
        ),
        # Fewer entries than trusted proxies: the chain is not the client's.
        (
            [("X-Forwarded-For", "3.3.3.3")],
            2,
            proxy.Forwarding("10.0.0.9", "3.3.3.3, 10.0.0.9", None, "http"),
        ),
        (
            [
                ("Host", "gw.example"),
                ("X-Forwarded-Host", "evil.example,app.example"),
                ("X-Forwarded-Proto", "https"),
            ],
            1,
            proxy.Forwarding("10.0.0.9", "10.0.0.9", "app.example", "https"),
        ),
        (
            [("Host", "gw.example"), ("X-Forwarded-Host", "app.example")],
            2,
            proxy.Forwarding("10.0.0.9", "10.0.0.9", "gw.example", "http"),
        ),
    ],
)
def test_forwarding_trusts_exactly_the_configured_proxies(
    headers: list[tuple[str, str]], trusted: int, expected: proxy.Forwarding
) -> None:
    assert proxy.forwarding(_client(headers), trusted) == expected


def test_a_peer_without_an_address_is_forwarded_as_empty() -> None:
    # A UNIX socket peer has no address: nothing is made up for it.
    assert proxy.forwarding(_client(remote=None), 1) == proxy.Forwarding("", "", None, "http")


def test_every_inbound_x_forwarded_header_is_dropped() -> None:
    request = _client([("X-Forwarded-Prefix", "/evil"), ("X-Forwarded-Port", "1"), ("A", "1")])
    fwd = proxy.forwarding(request, 0)
    out = proxy.upstream_request_headers(request, fwd)
    assert list(out.items()) == [
        ("A", "1"),
        ("X-Forwarded-For", "10.0.0.9"),
        ("X-Forwarded-Proto", "http"),
    ]


def test_a_non_utf8_upstream_header_is_named_in_the_error() -> None:
    upstream = CIMultiDictProxy(CIMultiDict([("X-Ok", "1"), ("X-Bad", "\udcff")]))
    with pytest.raises(proxy.BadUpstreamHeader) as caught:
        proxy.response_headers(upstream)
    assert "'X-Bad'" in str(caught.value)
    assert caught.value.name == "X-Bad"


def test_a_long_upstream_header_name_is_cut_to_64_characters_in_the_error() -> None:
    name = "X-" + "n" * 98
    upstream = CIMultiDictProxy(CIMultiDict([(name, "\udcff")]))
    with pytest.raises(proxy.BadUpstreamHeader) as caught:
        proxy.response_headers(upstream)
    assert str(caught.value) == f"upstream sent header {name[:64]!r} that is not UTF-8"


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        (["app.example:8443"], "app.example:8443"),
        (["[::1]:8080"], "[::1]:8080"),
        ([], None),  # the upstream's own
        (["a.example", "b.example"], None),  # RFC 9112 §3.2: several Host lines
        (["app.example/evil"], None),  # only a whole uri-host[:port] counts
        (["app.example:123456"], None),
        (["app example"], None),
    ],
)
def test_preserve_host_passes_on_only_one_well_formed_host(
    hosts: list[str], expected: str | None
) -> None:
    request = _client([("Host", h) for h in hosts])
    fwd = proxy.forwarding(request, 0)
    assert proxy.preserved_host(request) == expected
    out = proxy.upstream_request_headers(request, fwd, preserve_host=True)
    assert out.get("Host") == expected
    assert "Host" not in proxy.upstream_request_headers(request, fwd)
