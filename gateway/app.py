"""The gateway's aiohttp application: routes, spans, measurement, Server-Timing.

What it is for: the request's path through the gateway, read top to bottom in
``Gateway.handle`` and ``Gateway._forward``. ``create_app`` builds an
``aiohttp.web.Application`` whose upstream ``ClientSession`` (built by
``proxy.build_session``) is opened and closed in ``cleanup_ctx``, with the
reserved ``/__gateway/`` routes and the proxy handler that traces every
forwarded request: one SERVER span ("the request as the gateway saw it", the
upstream call's timing and address recorded on it) → whatever the backend
records under the context we inject (``GATEWAY_SPANS=server,client`` puts a
CLIENT span for the upstream call between the two). Each step of the
exchange is one call into ``proxy.Upstream``; what it returns becomes span
attributes and, on failure, the gateway's own answer here. The latency
measurement (``measure.py``), Server-Timing, X-Gateway-Clock and the CORS
decisions are added here, just before the response head goes out.

Not for: the upstream exchange itself — URL, call, error mapping, response
headers, streaming and aborts (``proxy.py``) —, context trust
(``context.py``) or process management (``cli.py``).

Hot path rules: nothing here blocks the event loop, compiles a regex or logs
at INFO per request; bodies are never buffered beyond
``GATEWAY_BUFFER_BODY_BYTES`` (``proxy.BodyReader``).

Slow or silent clients: every wait on the client is bounded by
``GATEWAY_CLIENT_TIMEOUT_S`` — aiohttp's keep-alive timer (idle connections
and unfinished request heads), ``proxy.BodyReader`` (a body that stalls) and
``proxy.Upstream.relay`` (a client that stops reading the response).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.trace import (
    NoOpTracer,
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

from gateway import __version__, context, measure, proxy, spans, timing
from gateway.config import GatewayConfig
from gateway.cors import Cors
from gateway.http import json_error, method_attribute, ms, span_name
from gateway.reserved import Reserved
from latency_common import attributes as attr
from latency_common.redact import QueryRedactor
from latency_common.telemetry import Telemetry

log = logging.getLogger("gateway")

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
        # The exchange with the upstream, once cleanup_ctx opened its session.
        self.proxy: proxy.Upstream | None = None
        self._server_port = self.upstream.port or 80
        self._upstream_host = self.upstream.host or ""
        self._client_span = config.client_span
        # OTEL_SDK_DISABLED=true gives a tracer whose spans record nothing:
        # their attributes are not even built then. (A sampler's dropped span
        # still gets them: samplers may read the attributes given at start.)
        self._traced = not isinstance(tracer, NoOpTracer)

    # -- lifecycle -------------------------------------------------------

    async def session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        session = proxy.build_session(self.config)
        app[SESSION_KEY] = session
        self.proxy = proxy.Upstream(self.upstream, session, self.config.client_timeout_s)
        try:
            yield
        finally:
            await session.close()

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
        attributes = self._server_attributes(request, known, fwd, inbound) if self._traced else None
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

    def _server_attributes(
        self,
        request: web.Request,
        known: str,
        fwd: proxy.Forwarding,
        inbound: context.InboundContext,
    ) -> dict[str, Any]:
        """The SERVER span's attributes known at receipt (HTTP semconv)."""
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
            attributes["http.request.method_original"] = request.method[:64]
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
        return attributes

    async def _forward(
        self, request: web.Request, exchange: _Exchange, fwd: proxy.Forwarding
    ) -> web.StreamResponse:
        server_span = exchange.server_span
        config = self.config

        def fail(status: int, message: str, error_type: str) -> web.Response:
            trace_id = f"{server_span.get_span_context().trace_id:032x}"
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

        async def refuse(failure: proxy.Failure) -> web.Response:
            response = fail(failure.status, failure.message, failure.error_type)
            if failure.cut_client:
                return await proxy.cut_client(request, response)
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
        upstream = self.proxy
        assert upstream is not None, "session_ctx opens the upstream session"
        body = await proxy.read_body(request, config)
        if isinstance(body, proxy.Failure):
            return await refuse(body)
        target = upstream.target(request.raw_path)
        if isinstance(target, proxy.Failure):
            return await refuse(target)

        headers = proxy.upstream_request_headers(
            request, fwd, preserve_host=self.config.preserve_host
        )
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
            context.inject(headers, server_span.get_span_context())

        sent_perf = time.perf_counter_ns()
        try:
            answer = await upstream.call(request.method, target, headers, body)
        except BaseException as exc:  # cancelled (shutdown): the span still ends
            _end_failed(client_span, proxy.classify(exc, body.reader))
            raise
        if isinstance(answer, proxy.Failure):
            _end_failed(client_span, answer)
            return await refuse(answer)

        upstream_ns = time.perf_counter_ns() - sent_perf
        status = answer.status
        if client_span is not None:
            client_span.set_attribute("http.response.status_code", status)
            if status >= 400:
                client_span.set_attribute("error.type", str(status))
                client_span.set_status(Status(StatusCode.ERROR))
        server_span.set_attribute("http.response.status_code", status)
        if status >= 500:
            server_span.set_attribute("error.type", str(status))
            server_span.set_status(Status(StatusCode.ERROR))

        response = upstream.response(answer)
        if isinstance(response, proxy.Failure):
            if client_span is not None:
                client_span.end()
            return await refuse(response)
        try:
            self._finish_headers(response.headers, exchange, upstream_ns)
            relayed = await upstream.relay(request, answer, response)
            if relayed.client_error is not None:
                server_span.set_attribute("error.type", relayed.client_error)
            elif relayed.upstream_error is not None:
                # The upstream died or stalled mid-body: the client's response
                # was cut (never completed with a wrong length).
                for span in (server_span,) if client_span is None else (client_span, server_span):
                    span.set_attribute("error.type", relayed.upstream_error)
                    span.set_status(Status(StatusCode.ERROR, "upstream response cut short"))
        finally:
            if client_span is not None:
                client_span.end()
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


def _end_failed(client_span: Span | None, failure: proxy.Failure) -> None:
    if client_span is None:
        return
    client_span.set_attribute("error.type", failure.error_type)
    client_span.set_status(Status(StatusCode.ERROR, failure.message))
    client_span.end()


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
    tracer = spans.gateway_tracer(provider, telemetry, "gateway", __version__)
    gateway = Gateway(config, tracer)
    reserved = Reserved(config, gateway.cors, gateway.measurement, provider, telemetry)
    # aiohttp's keep-alive timer starts when a connection opens and again after
    # each response, and closes the connection if no complete request head has
    # arrived by then: it cuts idle connections and slow request heads alike
    # (tests/test_connections.py fails if a new aiohttp stops doing that).
    # auto_decompress=False: aiohttp's server would otherwise decode a request
    # body's Content-Encoding and the backend get plain bytes still labelled
    # gzip; compressed bytes pass untouched, as in responses.
    app = web.Application(
        handler_args={
            **proxy.PARSER_LIMITS,
            "keepalive_timeout": config.client_timeout_s,
            "auto_decompress": False,
        }
    )
    app[CONFIG_KEY] = config
    app.cleanup_ctx.append(gateway.session_ctx)
    app.on_response_prepare.append(proxy.drop_default_headers)
    app[RESERVED_KEY] = reserved
    app.on_shutdown.append(reserved.mark_stopping)
    reserved.add_routes(app.router, RESERVED_PREFIX)
    app.router.add_route("*", "/{tail:.*}", gateway.handle, expect_handler=gateway.expect)
    return app
