"""The viewer's aiohttp application: the OTLP/HTTP receiver and the web UI.

What it is for: HTTP. ``POST /v1/traces`` reads the body with a hard cap,
answers per the OTLP/HTTP spec (200 / 400 / 413 / 415 / 503) and hands
decoding and storing to a worker thread; the GET routes render ``pages.py``
or the same data as JSON. ``create_app(store)`` does no work until the app
runs, and the caller owns (and closes) the store.

Not for: decoding (``otlp.py``), SQL (``store.py``) or markup (``pages.py``).
The event loop never touches SQLite or inflates a body: both go through
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from aiohttp import web

from viewer import hosts, otlp, pages
from viewer.report import RouteStats
from viewer.spans import SpanRecord, gateway_span, latency_attributes, waterfall
from viewer.store import Store, StoreError

log = logging.getLogger("viewer")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TRACE_ID: Final = re.compile(r"[0-9a-fA-F]{32}")
#: The pages carry no script and only inline styles; span data is escaped,
#: and this makes a slip in that escaping harmless.
_HTML_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
DEFAULT_TRACE_LIMIT: Final = 50
MAX_TRACE_LIMIT: Final = 500


class Viewer:
    def __init__(
        self,
        store: Store,
        max_body_bytes: int,
        limits: otlp.Limits,
        allowed_hosts: frozenset[str],
    ) -> None:
        self.store = store
        self.max_body_bytes = max_body_bytes
        self.limits = limits
        self.allowed_hosts = allowed_hosts

    @web.middleware
    async def check_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """DNS rebinding (``hosts.py``): a request whose Host does not name
        the viewer is refused before any route runs, the receiver included.
        421 Misdirected Request (RFC 9110 §15.5.20): this server will not
        answer for that host name."""
        host = request.headers.get("Host")
        if hosts.is_allowed(host, self.allowed_hosts):
            return await handler(request)
        message = (
            f"Host {host!r} is not a name of this viewer: open it as localhost or "
            "127.0.0.1, or start it with --allowed-hosts NAME (VIEWER_ALLOWED_HOSTS) "
            "to answer for that name"
        )
        if request.path.startswith(("/api/", "/v1/")):
            return web.json_response({"error": message}, status=421)
        return web.Response(status=421, text=message + "\n", headers={"Cache-Control": "no-store"})

    # -- OTLP/HTTP receiver ---------------------------------------------

    async def ingest(self, request: web.Request) -> web.Response:
        encoding = otlp.CONTENT_TYPES.get(request.content_type)
        if encoding is None:
            # The client's encoding is unknown, so the Status goes as JSON,
            # the one a person with curl can read.
            return _status(
                415,
                "json",
                otlp.INVALID_ARGUMENT,
                f"Content-Type {request.content_type!r} is not supported: send "
                f"{otlp.PROTOBUF_TYPE} or {otlp.JSON_TYPE} (OTLP/HTTP)",
                headers={"Accept-Post": f"{otlp.PROTOBUF_TYPE}, {otlp.JSON_TYPE}"},
            )
        content_encoding = request.headers.get("Content-Encoding", "")
        if not otlp.content_encoding_supported(content_encoding):
            # RFC 9110 §15.5.16: 415 also covers an unsupported content coding.
            return _status(
                415,
                encoding,
                otlp.INVALID_ARGUMENT,
                f"Content-Encoding {content_encoding!r} is not supported: send gzip or none",
                headers={"Accept-Encoding": "gzip"},
            )
        try:
            body = await self._read_body(request)
            decoded = await asyncio.to_thread(
                otlp.decode, body, encoding, content_encoding, self.max_body_bytes, self.limits
            )
        except otlp.PayloadTooLarge as exc:
            return _status(413, encoding, otlp.RESOURCE_EXHAUSTED, str(exc))
        except otlp.PayloadError as exc:
            log.info("rejected an OTLP export from %s: %s", request.remote, exc)
            return _status(400, encoding, otlp.INVALID_ARGUMENT, str(exc))
        try:
            await asyncio.to_thread(self.store.insert, decoded.spans)
        except (sqlite3.Error, StoreError) as exc:
            # 503 is retryable in OTLP/HTTP: the exporter sends the batch again.
            log.error("could not store %d spans: %s", len(decoded.spans), exc)
            return _status(
                503, encoding, otlp.UNAVAILABLE, "span store unavailable", {"Retry-After": "1"}
            )
        return web.Response(
            body=otlp.success_body(encoding, decoded), content_type=otlp.media_type(encoding)
        )

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, refusing it as soon as it passes the cap (a declared
        Content-Length over it is refused before reading a byte)."""
        limit = self.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise otlp.PayloadTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
        received = bytearray()
        async for chunk in request.content.iter_any():
            received += chunk
            if len(received) > limit:
                raise otlp.PayloadTooLarge(f"body is over the {limit}-byte limit")
        return bytes(received)

    # -- web UI and JSON API --------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        traces = await asyncio.to_thread(self.store.recent_traces, _limit(request))
        endpoint = f"{request.scheme}://{request.host}/v1/traces"
        return _html(pages.index_page(traces, endpoint))

    async def api_traces(self, request: web.Request) -> web.Response:
        traces = await asyncio.to_thread(self.store.recent_traces, _limit(request))
        return web.json_response({"traces": [t.to_json() for t in traces]})

    async def trace(self, request: web.Request) -> web.Response:
        trace_id = request.match_info["trace_id"]
        spans = await self._spans(trace_id)
        if not spans:
            return _html(pages.not_found_page(f"No trace {trace_id!r} is stored."), status=404)
        return _html(pages.trace_page(waterfall(trace_id.lower(), spans)))

    async def api_trace(self, request: web.Request) -> web.Response:
        trace_id = request.match_info["trace_id"]
        spans = await self._spans(trace_id)
        if not spans:
            return web.json_response({"error": f"no trace {trace_id!r} is stored"}, status=404)
        shape = waterfall(trace_id.lower(), spans)
        gateway = gateway_span(spans)
        document: dict[str, Any] = {
            "trace_id": shape.trace_id,
            "start_ns": shape.start_ns,
            "duration_ms": round(shape.duration_ns / 1e6, 3),
            "spans": [
                {
                    **row.span.to_json(),
                    "depth": row.depth,
                    "offset_pct": row.offset_pct,
                    "width_pct": row.width_pct,
                    # [offset, width] in % of the span's bar, or null.
                    "upstream_wait_pct": list(row.wait) if row.wait else None,
                }
                for row in shape.rows
            ],
            "gateway": None
            if gateway is None
            else {"span_id": gateway.span_id, "latency": latency_attributes(gateway)},
        }
        return web.json_response(document)

    async def _spans(self, trace_id: str) -> list[SpanRecord]:
        # W3C Trace Context §3.2.2.3: 32 hex digits, all zeros is invalid.
        if not _TRACE_ID.fullmatch(trace_id) or not trace_id.strip("0"):
            return []
        return await asyncio.to_thread(self.store.trace, trace_id)

    async def latency(self, request: web.Request) -> web.Response:
        since_minutes = _since_minutes(request)
        stats = await self._route_stats(since_minutes)
        return _html(pages.latency_page(stats, since_minutes))

    async def api_latency(self, request: web.Request) -> web.Response:
        since_minutes = _since_minutes(request)
        stats = await self._route_stats(since_minutes)
        return web.json_response(
            {"since_minutes": since_minutes, "routes": [s.to_json() for s in stats]}
        )

    async def _route_stats(self, since_minutes: float | None) -> list[RouteStats]:
        since_ns = None
        if since_minutes is not None:
            since_ns = time.time_ns() - int(since_minutes * 60e9)

        return await asyncio.to_thread(self.store.route_stats, since_ns)


def _status(
    status: int,
    encoding: otlp.Encoding,
    code: int,
    message: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=otlp.status_body(encoding, code, message),
        content_type=otlp.media_type(encoding),
        headers=headers,
    )


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text, status=status, content_type="text/html", charset="utf-8", headers=_HTML_HEADERS
    )


def _limit(request: web.Request) -> int:
    try:
        value = int(request.query.get("limit", DEFAULT_TRACE_LIMIT))
    except ValueError:
        raise web.HTTPBadRequest(text="limit must be a whole number") from None
    return min(max(value, 1), MAX_TRACE_LIMIT)


def _since_minutes(request: web.Request) -> float | None:
    raw = request.query.get("since_minutes", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="since_minutes must be a number of minutes") from None
    if not 0 < value < 1e9:
        raise web.HTTPBadRequest(text="since_minutes must be positive")
    return value


def create_app(
    store: Store,
    *,
    max_body_bytes: int = otlp.MAX_BODY_BYTES,
    limits: otlp.Limits | None = None,
    bind_host: str = "127.0.0.1",
    allowed_hosts: Iterable[str] = (),
) -> web.Application:
    """``bind_host``: the address the server listens on, a name it answers
    to; ``allowed_hosts``: more such names (``hosts.py``)."""
    allowed = hosts.allowed_names(bind_host, allowed_hosts)
    viewer = Viewer(store, max_body_bytes, limits or otlp.Limits(), allowed)
    app = web.Application(
        middlewares=[viewer.check_host],
        # client_max_size caps request.read()/post(), which no route uses; set
        # it anyway so a future route cannot read an unbounded body by accident.
        client_max_size=max_body_bytes,
        # aiohttp would inflate gzip (and deflate, br) request bodies itself,
        # on the event loop: we inflate in a worker thread instead, with our
        # own cap on the inflated size, and refuse codings OTLP does not name.
        handler_args={"auto_decompress": False},
    )
    app.router.add_post("/v1/traces", viewer.ingest)
    app.router.add_get("/", viewer.index)
    app.router.add_get("/traces/{trace_id}", viewer.trace)
    app.router.add_get("/latency", viewer.latency)
    app.router.add_get("/api/traces", viewer.api_traces)
    app.router.add_get("/api/traces/{trace_id}", viewer.api_trace)
    app.router.add_get("/api/latency", viewer.api_latency)
    return app
