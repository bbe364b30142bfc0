"""The gateway's aiohttp application: routes, spans, CORS and Server-Timing.

What it is for: putting the pieces together for each request. ``create_app``
builds an ``aiohttp.web.Application`` with its upstream ``ClientSession``
(opened and closed in ``cleanup_ctx``), the reserved ``/__gateway/`` routes,
and the proxy handler that traces every forwarded request: one SERVER span
("the request as the gateway saw it", the upstream call's timing and address
recorded on it) → whatever the backend records under the context we inject.
``GATEWAY_SPANS=server,client`` puts a CLIENT span for the upstream call
between the two, as earlier versions did.

Not for: header rules (``proxy.py``), context trust (``context.py``) or
process management (``cli.py``).

Hot path rules: nothing here blocks the event loop, compiles a regex or logs
at INFO per request; bodies are never buffered beyond
``GATEWAY_BUFFER_BODY_BYTES`` (``proxy.BodyReader``).

Slow or silent clients: every wait on the client is bounded by
``GATEWAY_CLIENT_TIMEOUT_S`` — aiohttp's keep-alive timer (idle connections
and unfinished request heads), ``proxy.BodyReader`` (a body that stalls) and
``_to_client`` (a client that stops reading the response).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.trace import (
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    get_tracer_provider,
    set_span_in_context,
)
from opentelemetry.trace import (
    TracerProvider as ApiTracerProvider,
)
from yarl import URL

from gateway import __version__, context, measure, proxy, timing
from gateway.config import GatewayConfig
from gateway.cors import Cors
from gateway.http import json_error, method_attribute, ms, span_name
from gateway.reserved import Reserved
from latency_common import attributes as attr
from latency_common.redact import QueryRedactor
from latency_common.telemetry import Telemetry

log = logging.getLogger("gateway")
#: 502/504 lines: a down backend makes one per request, so the CLI rate-limits
#: this logger (``latency_common.logs.RateLimitFilter``).
upstream_log = logging.getLogger("gateway.upstream")

#: What a TRACE request is answered with instead (RFC 9110 §9.3.8: TRACE
#: reflects the request, credentials included; a proxy may refuse it, and nginx
#: answers 405). ``Allow`` must list the supported methods (RFC 9110 §15.5.6).
ALLOWED_METHODS: Final = "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"

#: Reserved prefix, never forwarded (ARCHITECTURE.md §3).
RESERVED_PREFIX: Final = "/__gateway/"

#: aiohttp's application keys.
CONFIG_KEY: Final = web.AppKey("config", GatewayConfig)
SESSION_KEY: Final = web.AppKey("session", aiohttp.ClientSession)
RESERVED_KEY: Final = web.AppKey("reserved", Reserved)


class _ProxyResponse(web.StreamResponse):
    """A StreamResponse that adds no Content-Type and no Server of its own.

    aiohttp fills in ``Content-Type: application/octet-stream`` and its own
    ``Server`` when a response lacks them; a transparent proxy must pass the
    upstream's absence on (ARCHITECTURE.md §3: "adds no default Content-Type").
    ``Date`` is still added when missing, as RFC 9110 §6.6.1 asks of a
    recipient with a clock.
    """

    __slots__ = ("_keep",)

    def __init__(self, *, status: int, reason: str | None, keep: frozenset[str]) -> None:
        super().__init__(status=status, reason=reason)
        self._keep = keep

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        if "content-type" not in self._keep:
            self._headers.popall("Content-Type", None)
        if "server" not in self._keep:
            self._headers.popall("Server", None)


class Gateway:
    """Per-process gateway state: configuration, tracer, upstream session."""

    def __init__(self, config: GatewayConfig, tracer: Tracer) -> None:
        self.config = config
        self.tracer = tracer
        self.upstream = config.upstream_url
        self.cors = Cors(config.allowed_origins)
        self.measurement = measure.Measurement(config)
        # Built once per process: every url.full / url.query this gateway
        # exports goes through it.
        self.redactor = QueryRedactor(config.redact_query_params)
        self.session: aiohttp.ClientSession | None = None
        self._server_port = self.upstream.port or 80
        self._upstream_host = self.upstream.host or ""
        self._client_span = config.client_span
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_s,
            sock_read=config.read_timeout_s,
        )

    # -- lifecycle -------------------------------------------------------

    async def session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections,
            limit_per_host=0,
            ttl_dns_cache=60,
            enable_cleanup_closed=False,
        )
        # ARCHITECTURE.md §3: no shared cookie jar, no proxy variables from the
        # environment, no automatic decompression, no added default headers.
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=self._timeout,
            read_bufsize=proxy.CHUNK_BYTES,
        )
        app[SESSION_KEY] = self.session
        try:
            yield
        finally:
            await self.session.close()

    async def expect(self, request: web.Request) -> None:
        """``Expect: 100-continue``: say 100 only to a request we will forward.

        RFC 9110 §10.1.1: a server that will refuse the request from its head
        alone may answer at once, without 100 (Continue), and the client then
        sends no body. aiohttp's default would say 100 before the handler
        runs, inviting a body we are about to refuse with 413 (or 405, 505,
        431); the handler answers those. Other expectations get 417, as
        aiohttp's default does.
        """
        if request.version != aiohttp.HttpVersion11:
            return
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="only 100-continue is supported")
        declared = request.content_length
        if (
            request.method == "TRACE"
            or (declared is not None and declared > self.config.max_body_bytes)
            or proxy.header_limit_error(request) is not None
        ):
            return
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The interim response is not part of the final one's size.
        request.writer.output_size = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t1_ns = time.time_ns()
        t1_perf = time.perf_counter_ns()
        method = request.method
        origin = self.cors.origin(request)
        preflight = self.cors.is_preflight(request)
        if origin is not None and preflight and self.cors.caused_by_us(request):
            # Only the preflights our headers caused; any other goes to the
            # backend, whose policy it is (see gateway/cors.py).
            return self.cors.preflight(request, origin)

        too_big = proxy.header_limit_error(request)
        if too_big is not None:
            return json_error(*too_big)

        inbound = context.extract(request.headers, self.config.trust_context)
        known = method_attribute(method)
        fwd = proxy.forwarding(request, self.config.trusted_proxies)
        attributes: dict[str, Any] = {
            "http.request.method": known,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "client.address": fwd.client_address,
            "network.peer.address": request.remote or "",
            "network.protocol.version": f"{request.version.major}.{request.version.minor}",
            "gateway.context.source": inbound.source,
            # HTTP semconv: on a SERVER span server.address/server.port name
            # the host the client addressed, so the upstream this gateway
            # forwards to has names of its own (README, "A traced request").
            attr.UPSTREAM_ADDRESS: self._upstream_host,
            attr.UPSTREAM_PORT: self._server_port,
        }
        if known == "_OTHER":
            attributes["http.request.method_original"] = method[:64]
        raw_query = request.rel_url.raw_query_string
        if raw_query:
            # HTTP semconv: url.query is recommended on server spans, and
            # "sensitive content provided in query string SHOULD be scrubbed".
            attributes["url.query"] = self.redactor.query(raw_query)
        host = request.host
        if host:
            attributes["server.address"] = host.rsplit(":", 1)[0] if host[-1:] != "]" else host
        user_agent = request.headers.get("user-agent")
        if user_agent is not None:
            attributes["user_agent.original"] = user_agent
        server_span = self.tracer.start_span(
            span_name(known),
            context=inbound.parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            links=inbound.links,
            start_time=t1_ns,
        )
        verdict = self.measurement.evaluate(request.headers, fwd.client_address, t1_ns / 1e6)
        measure.record(server_span, verdict)
        exchange = _Exchange(server_span, origin, preflight, t1_ns, t1_perf, verdict)
        exchange.inbound = measure.inbound_span_context(inbound)
        try:
            return await self._forward(request, exchange, fwd)
        except BaseException as exc:
            server_span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            server_span.set_attribute("error.type", type(exc).__qualname__)
            raise
        finally:
            server_span.end()

    async def _forward(
        self, request: web.Request, exchange: _Exchange, fwd: proxy.Forwarding
    ) -> web.StreamResponse:
        server_span = exchange.server_span
        server_ctx = server_span.get_span_context()
        trace_id = f"{server_ctx.trace_id:032x}"
        config = self.config

        def fail(status: int, message: str, error_type: str) -> web.Response:
            server_span.set_attribute("http.response.status_code", status)
            server_span.set_attribute("error.type", error_type)
            if status >= 500:
                server_span.set_status(Status(StatusCode.ERROR, message))
            response = json_error(status, message, trace_id)
            self._finish_headers(response.headers, exchange, None)
            if exchange.origin is not None and not exchange.preflight:
                # The gateway's own answer (the backend said nothing): its body
                # is ours to open, like /__gateway/, so an allowed page can read
                # the error and its trace id. No credentials: that is the
                # backend's to grant.
                self.cors.grant_own(response.headers, exchange.origin)
            return response

        if request.version.major != 1:
            # RFC 9110 §15.6.6: 505 for a major version we do not support.
            # aiohttp's parser passes "HTTP/0.9" and "HTTP/2.0" request lines on
            # (it refuses other versions itself with a 400).
            return fail(505, f"HTTP/{request.version.major} is not supported here", "505")
        if request.method == "TRACE":
            refusal = fail(405, "TRACE is not forwarded", "405")
            refusal.headers["Allow"] = ALLOWED_METHODS
            return refusal
        declared = request.content_length
        if declared is not None and declared > config.max_body_bytes:
            # The unread body is discarded by aiohttp's lingering read after the
            # answer (closing at once would reset the connection and lose the 413).
            return fail(413, f"request body larger than {config.max_body_bytes} bytes", "413")
        reader: proxy.BodyReader | None = None
        body: bytes | AsyncIterator[bytes] | None = None
        if proxy.request_has_body(request):
            reader = proxy.BodyReader(
                request, max_bytes=config.max_body_bytes, stall_timeout_s=config.client_timeout_s
            )
            try:
                body = await reader.read(config.buffer_body_bytes, declared)
            except proxy.ClientStalled:
                return await _cut_client(request, fail(408, "request body stalled", "408"))
            except proxy.BodyTooLarge:
                return fail(413, "request body too large", "413")
            except (aiohttp.ClientPayloadError, ConnectionError) as exc:
                return fail(400, "request body incomplete", type(exc).__qualname__)

        raw_target = request.raw_path
        if not raw_target.startswith("/"):
            # Absolute-form (RFC 9112 §3.2.2): only its path and query go on;
            # the authority in it never chooses where we connect (no open proxy).
            url = URL(raw_target)
            if not url.absolute or url.scheme not in ("http", "https"):
                return fail(400, "request target must be a path or an http(s) URL", "400")
            raw_target = url.raw_path_qs or "/"
        path, _, query = raw_target.partition("?")
        # Byte for byte: encoded=True keeps %2F as %2F and adds no quoting;
        # scheme and authority come from GATEWAY_UPSTREAM alone.
        target = URL.build(
            scheme=self.upstream.scheme,
            authority=self.upstream.raw_authority,
            path=path,
            query_string=query,
            encoded=True,
        )

        headers = proxy.upstream_request_headers(request, fwd)
        client_span: Span | None = None
        if self._client_span:
            known = method_attribute(request.method)
            client_span = self.tracer.start_span(
                span_name(known),
                context=set_span_in_context(server_span),
                kind=SpanKind.CLIENT,
                attributes={
                    "http.request.method": known,
                    "url.full": self.redactor.url(str(target)),
                    "server.address": self._upstream_host,
                    "server.port": self._server_port,
                },
            )
            # W3C Trace Context §3.2: parent-id is the span of the outgoing call.
            context.inject(headers, client_span.get_span_context())
        else:
            context.inject(headers, server_ctx)

        assert self.session is not None
        sent_perf = time.perf_counter_ns()
        try:
            upstream = await self.session.request(
                request.method,
                target,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
                chunked=None,
            )
        except BaseException as exc:
            status, message, error_type = _classify(exc, reader)
            if client_span is not None:
                client_span.set_attribute("error.type", error_type)
                client_span.set_status(Status(StatusCode.ERROR, message))
                client_span.end()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if status >= 500:
                upstream_log.warning(
                    "upstream %s %s: %s (%s)", request.method, path, message, error_type
                )
            if status == 408:
                return await _cut_client(request, fail(status, message, error_type))
            return fail(status, message, error_type)

        upstream_ns = time.perf_counter_ns() - sent_perf
        status = upstream.status
        if client_span is not None:
            client_span.set_attribute("http.response.status_code", status)
            if status >= 400:
                client_span.set_attribute("error.type", str(status))
                client_span.set_status(Status(StatusCode.ERROR))
        server_span.set_attribute("http.response.status_code", status)
        if status >= 500:
            server_span.set_attribute("error.type", str(status))
            server_span.set_status(Status(StatusCode.ERROR))

        try:
            out_headers = proxy.response_headers(upstream.headers)
        except proxy.BadUpstreamHeader as exc:
            upstream.close()
            if client_span is not None:
                client_span.end()
            upstream_log.warning("%s", exc)
            return fail(502, str(exc), "header")
        keep = frozenset(k.lower() for k in ("Content-Type", "Server") if k in out_headers)
        response = _ProxyResponse(status=status, reason=upstream.reason, keep=keep)
        response.headers.extend(out_headers)
        completed = False
        to_client = _ClientWrites(config.client_timeout_s)
        try:
            self._finish_headers(response.headers, exchange, upstream_ns)
            await to_client.send(response.prepare(request))
            if request.method != "HEAD" and status not in (204, 304):
                # Errors reading the upstream raise from the iterator itself;
                # errors writing to the client come wrapped as _ClientGone.
                async for chunk in upstream.content.iter_any():
                    await to_client.send(response.write(chunk))
            await to_client.send(response.write_eof())
            completed = True
        except _ClientGone as gone:
            if gone.timed_out:
                # It stopped reading: drop it with whatever it did not take.
                server_span.set_attribute("error.type", "client_timeout")
                _abort(request)
            else:
                server_span.set_attribute("error.type", "client_disconnected")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # The upstream died or stalled mid-body: cut the client's response
            # (never complete it with a wrong length) and mark the spans.
            error_type = "timeout" if isinstance(exc, TimeoutError) else type(exc).__qualname__
            for span in (server_span,) if client_span is None else (client_span, server_span):
                span.set_attribute("error.type", error_type)
                span.set_status(Status(StatusCode.ERROR, "upstream response cut short"))
            upstream_log.warning(
                "upstream %s %s died mid-body: %s", request.method, path, error_type
            )
            _abort(request)
        finally:
            to_client.stop()
            if client_span is not None:
                client_span.end()
            # A fully read response goes back to the pool; anything else gives
            # its connection up (unread bytes would poison the next request).
            if completed:
                upstream.release()
            else:
                upstream.close()
        return response

    def _finish_headers(
        self, headers: CIMultiDict[str], exchange: _Exchange, upstream_ns: int | None
    ) -> None:
        """Server-Timing, X-Gateway-Clock and CORS, just before the headers go
        out: this is t2 (ARCHITECTURE.md §3, §6)."""
        span = exchange.server_span
        gw_ns = time.perf_counter_ns() - exchange.t1_perf
        # W3C Server Timing: gw is t2 − t1 (receipt to response headers, the
        # upstream wait included), upstream the part spent waiting for the
        # upstream's headers (ARCHITECTURE.md §3).
        timing_value = f"gw;dur={ms(gw_ns)}"
        if upstream_ns is not None:
            timing_value += f", upstream;dur={ms(upstream_ns)}"
            span.set_attribute(attr.UPSTREAM_MS, ms(upstream_ns))
        span.set_attribute(attr.GATEWAY_MS, ms(gw_ns))
        uplink = measure.server_timing(exchange.verdict)
        if uplink is not None:
            timing_value += ", " + uplink
        traceparent = context.format_traceparent(span.get_span_context())
        timing_value += f', traceparent;desc="{traceparent}"'
        headers.add("Server-Timing", timing_value)
        # t2 on the epoch clock, derived from the same monotonic interval as
        # gw;dur so that t2 − t1 in the header equals the gateway's time.
        t1_ms = exchange.t1_ns / 1e6
        t2_ms = t1_ms + gw_ns / 1e6
        headers["X-Gateway-Clock"] = self.measurement.clock_header(
            t1_ms, t2_ms, exchange.verdict, exchange.inbound
        )
        if exchange.origin is not None:
            if exchange.preflight:
                self.cors.merge_preflight(headers, exchange.origin)
            else:
                self.cors.expose(headers, exchange.origin)


class _ClientGone(Exception):
    """Writing to the client failed: it disconnected, or stopped reading."""

    def __init__(self, *, timed_out: bool) -> None:
        super().__init__("client stopped reading" if timed_out else "client disconnected")
        self.timed_out = timed_out


class _ClientWrites:
    """Writes of one response to the client, each bounded by ``timeout_s``
    (nginx's ``send_timeout``: a client that does not read holds nothing)."""

    __slots__ = ("_timer",)

    def __init__(self, timeout_s: float) -> None:
        self._timer = proxy.StallTimer(timeout_s)

    async def send(self, write: Awaitable[object]) -> None:
        try:
            await self._timer.wait(write)
        except TimeoutError as exc:
            raise _ClientGone(timed_out=True) from exc
        except OSError as exc:  # incl. aiohttp's ClientConnectionResetError
            raise _ClientGone(timed_out=False) from exc

    def stop(self) -> None:
        self._timer.stop()


#: How long the answer to a client that stalled may take to go out (it is
#: small: it fits in the socket buffer unless the client is gone).
_LAST_WORDS_TIMEOUT_S: Final = 1.0


async def _cut_client(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` and close the connection: the client's body was not
    read to its end, so nothing after it can be parsed, and a client that
    stalled once gets no lingering read (nginx closes after its 408 too)."""
    response.force_close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(_LAST_WORDS_TIMEOUT_S):
            await response.prepare(request)
            await response.write_eof()
    request.protocol.force_close()
    return response


class _Exchange:
    """What one proxied request carries from receipt to response headers."""

    __slots__ = ("inbound", "origin", "preflight", "server_span", "t1_ns", "t1_perf", "verdict")

    def __init__(
        self,
        server_span: Span,
        origin: str | None,
        preflight: bool,
        t1_ns: int,
        t1_perf: int,
        verdict: timing.Verdict,
    ) -> None:
        self.server_span = server_span
        self.origin = origin
        self.preflight = preflight
        self.t1_ns = t1_ns
        self.t1_perf = t1_perf
        self.verdict = verdict
        # The span context the client sent, which X-Gateway-Clock's bind names.
        self.inbound: SpanContext | None = None


def _classify(exc: BaseException, reader: proxy.BodyReader | None) -> tuple[int, str, str]:
    """(status, message, error.type) for a failure before the upstream answered.

    aiohttp's client wraps what the body iterator raised, so the reader says
    whether the client's body was the cause.
    """
    if reader is not None and reader.too_large:
        return 413, "request body too large", "413"
    if reader is not None and reader.stalled:
        return 408, "request body stalled", "408"
    if isinstance(exc, TimeoutError):
        return 504, "upstream timed out", "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return 502, "upstream unreachable", type(exc).__qualname__
    if isinstance(exc, aiohttp.ClientPayloadError):
        # The client's own body failed mid-upload (it disconnected or lied
        # about its length).
        return 400, "request body incomplete", type(exc).__qualname__
    # Anything else (a reset, a malformed answer, …) is the upstream failing.
    return 502, "upstream failed", type(exc).__qualname__


def _abort(request: web.BaseRequest) -> None:
    """Drop the client connection without ending the response properly.

    ``abort()`` (not ``close()``) discards buffered bytes, so aiohttp's later
    attempt to finish the response (a terminating chunk) cannot reach the
    client either: what the client sees is a truncated message.
    """
    transport = request.transport
    if transport is not None:
        transport.abort()


def mark_stopping(app: web.Application) -> None:
    """``/__gateway/ready`` answers 503 from now on.

    The app's shutdown does this too, but aiohttp runs ``on_shutdown`` after
    the listener has closed; a stop sequence that wants load balancers to see
    the 503 calls this first, then keeps serving for a health-check interval.
    """
    app[RESERVED_KEY].stopping = True


def create_app(
    config: GatewayConfig,
    *,
    tracer_provider: ApiTracerProvider | None = None,
    telemetry: Telemetry | None = None,
) -> web.Application:
    """The gateway as an aiohttp application (no sockets, no global state).

    ``telemetry`` (what ``build_telemetry`` returns) gives the provider, the
    span processor browser spans go to and the exporter's counters;
    ``tracer_provider`` alone (tests, embedding) gives spans but no browser
    spans. Neither: the global provider.
    """
    if telemetry is not None:
        provider: ApiTracerProvider = telemetry.provider
    else:
        provider = tracer_provider if tracer_provider is not None else get_tracer_provider()
    tracer = provider.get_tracer("gateway", __version__)
    gateway = Gateway(config, tracer)
    reserved = Reserved(config, gateway.cors, gateway.measurement, provider, telemetry)
    # aiohttp's keep-alive timer starts when a connection opens and again after
    # each response, and closes the connection if no complete request head has
    # arrived by then: it cuts idle connections and slow request heads alike
    # (tests/test_connections.py fails if a new aiohttp stops doing that).
    app = web.Application(
        handler_args={**proxy.PARSER_LIMITS, "keepalive_timeout": config.client_timeout_s}
    )
    app[CONFIG_KEY] = config
    app.cleanup_ctx.append(gateway.session_ctx)
    app[RESERVED_KEY] = reserved
    app.on_shutdown.append(reserved.mark_stopping)
    reserved.add_routes(app.router, RESERVED_PREFIX)
    app.router.add_route("*", "/{tail:.*}", gateway.handle, expect_handler=gateway.expect)
    return app
