"""The gateway's own endpoints under ``/__gateway/``, never forwarded (README
"What the proxy does (and does not) change").

What it is for: ``clock`` (the snippet's sync burst), ``snippet.js`` /
``snippet.mjs`` (the snippet, cacheable, with this deployment's allow-list,
and with ``?sampled=gateway`` its sampler's trace-id ratio too, see
``sampling.py``) and ``snippet-<version>.js`` / ``.mjs`` (the same for every
deployment, immutable, for Subresource Integrity), all of them without
comment lines and gzipped when the request accepts it, both done once at
start-up (``snippet.py``), ``beacon`` (browser timings →
browser spans, see ``beacon.py``), ``health`` (liveness, with detail for
operators only) and ``ready`` (readiness, for load balancers), CORS
preflights for these, and a JSON 404 for anything else under the prefix.

Not for: proxying (``app.py``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
from collections import Counter
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from aiohttp import HttpVersion11, web
from multidict import CIMultiDict
from opentelemetry.trace import TracerProvider as ApiTracerProvider

from gateway import __version__, beacon, measure, proxy, sampling, snippet, timing
from gateway.config import GatewayConfig
from gateway.cors import Cors
from gateway.http import JSON, accepts_gzip, json_error, ms, none_match
from latency_common.redact import QueryRedactor

if TYPE_CHECKING:
    from latency_common.telemetry import Telemetry

log = logging.getLogger(__name__)


def snippet_path(packaged: Traversable, checkout: Path) -> Traversable:
    """Where the snippet is read from: the copy inside the installed package
    (the wheel ships ``frontend-snippet/snippet.js`` as ``gateway/snippet.js``),
    else, in a source checkout, the one in ``frontend-snippet/``."""
    return packaged if packaged.is_file() else checkout


#: The snippet file, served at /__gateway/snippet.js (classic script) and
#: /__gateway/snippet.mjs (the same file with an ES module footer).
SNIPPET_PATH: Final = snippet_path(
    resources.files("gateway") / "snippet.js",
    Path(__file__).resolve().parent.parent / "frontend-snippet" / "snippet.js",
)
#: Where the served snippet receives the allow-list (a JSON string, or null).
ALLOWED_ORIGINS_MARKER: Final = b"/*@gateway-allowed-origins*/ null"
#: Where the snippet served at ?sampled=gateway receives the bound of the
#: gateway's trace-id ratio sampler (a JSON string of 16 hex digits, or null).
SAMPLE_BOUND_MARKER: Final = b"/*@gateway-sample-bound*/ null"
#: The query a page adds to the snippet's URL to get that bound. A URL of
#: its own, so each variant has its own cache entry (RFC 9111 §2: the cache
#: key is the target URI, query included) and its own ETag.
SAMPLED_QUERY: Final = ("sampled", "gateway")
#: Importing the module initialises nothing; its init() also gets the
#: allow-list of the gateway it came from (import.meta.url), so requests to
#: that gateway are tagged from the first one, as with the classic script.
SNIPPET_MODULE_FOOTER: Final = (
    b"\nconst api = globalThis.LatencyGateway;"
    b"\nconst allowedOrigins = { [new URL(import.meta.url).origin]: "
    + ALLOWED_ORIGINS_MARKER
    + b" };"
    b"\nexport const init = (options) => api.init(Object.assign({ allowedOrigins }, options));"
    b"\nexport default Object.assign({}, api, { init });\n"
)
#: Browsers may reuse the snippet for 5 minutes, then revalidate by ETag.
SNIPPET_MAX_AGE_S: Final = 300
#: The versioned URLs: one name per release, so their bytes never change.
VERSIONED_SNIPPET: Final = f"snippet-{__version__}"
#: A versioned snippet never changes under its name (RFC 8246: immutable).
VERSIONED_CACHE_CONTROL: Final = "public, max-age=31536000, immutable"
#: Beacons per client: the snippet sends one every 5 s, or per 20 requests.
BEACON_RATE_PER_S: Final = 2.0
BEACON_BURST: Final = 20

#: How long one upstream reachability probe answers /__gateway/health.
HEALTH_CACHE_S: Final = 1.0


class Reserved:
    """Handlers for the reserved prefix, with the state they need."""

    def __init__(
        self,
        config: GatewayConfig,
        cors: Cors,
        measurement: measure.Measurement,
        provider: ApiTracerProvider,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self.cors = cors
        self.measurement = measurement
        self.provider = provider
        self.upstream = config.upstream_url
        self.beacon_limiter = timing.RateLimiter(BEACON_RATE_PER_S, BEACON_BURST)
        self.browser_resource = beacon.browser_resource(config.browser_service_name)
        self.beacon_counts: Counter[str] = Counter()
        self.beacon_keys = beacon.Keys(config.clock_key, config.clock_previous_keys)
        self.redactor = QueryRedactor(config.redact_query_params)
        self.telemetry = telemetry
        self._health: tuple[float, dict[str, Any]] | None = None
        #: Set once the application shuts down (SIGTERM): readiness turns 503
        #: so a load balancer stops sending before the connections close.
        self.stopping = False
        # Browser spans are built from beacons, not started by a tracer (their
        # span ids are the browser's), so they go straight to the span
        # processor the process built: the same batch processor and exporter
        # as the gateway's own spans. Without one, beacons are checked and
        # counted but make no span.
        self.span_processor = telemetry.processor if telemetry is not None else None
        # The gateway's own sampler: browser spans follow its decision for the
        # same trace (see beacon.ingest).
        self.sampler = telemetry.provider.sampler if telemetry is not None else None
        #: (classic, module) bodies, identity and gzip, with their ETags;
        #: start-up work (stripping, compressing), before the loop serves
        #: anything, so no request compresses.
        self.snippet: tuple[snippet.Encoded, snippet.Encoded] | None = None
        #: The same with the sampler's bound written in (?sampled=gateway):
        #: the same bytes when the sampler is no trace-id ratio.
        self.sampled_snippet: tuple[snippet.Encoded, snippet.Encoded] | None = None
        #: The same for the versioned URLs: the marker left as it is (null).
        self.versioned_snippet: tuple[snippet.Encoded, snippet.Encoded] | None = None
        if SNIPPET_PATH.is_file():
            source = served_source(SNIPPET_PATH.read_bytes())
            allowed = cors.browser_pattern()
            classic = with_marker(source, ALLOWED_ORIGINS_MARKER, allowed)
            module = with_marker(source + SNIPPET_MODULE_FOOTER, ALLOWED_ORIGINS_MARKER, allowed)
            self.snippet = (snippet.Encoded.of(classic), snippet.Encoded.of(module))
            bound = sampling.snippet_bound(self.sampler)
            classic = with_marker(classic, SAMPLE_BOUND_MARKER, bound)
            module = with_marker(module, SAMPLE_BOUND_MARKER, bound)
            self.sampled_snippet = (snippet.Encoded.of(classic), snippet.Encoded.of(module))
            module = source + SNIPPET_MODULE_FOOTER
            self.versioned_snippet = (snippet.Encoded.of(source), snippet.Encoded.of(module))

    def add_routes(self, router: web.UrlDispatcher, prefix: str) -> None:
        expect = self.expect
        router.add_get(prefix + "health", self.health, allow_head=True, expect_handler=expect)
        router.add_get(prefix + "ready", self.ready, allow_head=True, expect_handler=expect)
        router.add_get(prefix + "clock", self.clock, allow_head=True, expect_handler=expect)
        router.add_get(
            prefix + "snippet.js", self.snippet_file, allow_head=True, expect_handler=expect
        )
        router.add_get(
            prefix + "snippet.mjs", self.snippet_file, allow_head=True, expect_handler=expect
        )
        for suffix in (".js", ".mjs"):
            path = prefix + VERSIONED_SNIPPET + suffix
            router.add_get(
                path, self.versioned_snippet_file, allow_head=True, expect_handler=expect
            )
        router.add_post(prefix + "beacon", self.beacon, expect_handler=expect)
        router.add_route(
            "OPTIONS", prefix + "{tail:.*}", self.reserved_preflight, expect_handler=expect
        )
        router.add_route("*", prefix + "{tail:.*}", self.reserved_not_found, expect_handler=expect)

    async def expect(self, request: web.Request) -> None:
        """``Expect`` on our own endpoints: 100 (Continue) only for a beacon
        small enough to take (RFC 9110 §10.1.1: a server that refuses from the
        head may answer at once); any other expectation is 417 with a fixed
        text. aiohttp's default echoes the header's value into its answer and
        raised on a value it could not encode: a 500 and a traceback for any
        client (found by tests/test_reserved_fuzz.py)."""
        if request.version != HttpVersion11:
            return
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="only 100-continue is supported")
        declared = request.content_length
        if request.method != "POST" or (
            declared is not None and declared > beacon.MAX_BEACON_BYTES
        ):
            return
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The interim response is not part of the final one's size.
        request.writer.output_size = 0

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: 200 while this process serves, whatever the upstream does.

        Anyone gets ``{"status": "ok"}``; the detail (version, pid, upstream
        reachability, exporter queue, beacon counters) only goes to an
        operator (see :meth:`sees_detail`): it tells an attacker what runs
        here and lets anyone on the internet trigger upstream probes."""
        body: dict[str, Any] = {"status": "ok"}
        if self.sees_detail(request):
            body.update(
                version=__version__,
                pid=os.getpid(),
                upstream=await self._upstream_health(),
                exporter=exporter_status(self.telemetry),
                beacon=dict(self.beacon_counts),
            )
        return web.Response(
            text=json.dumps(body), content_type=JSON, headers={"Cache-Control": "no-store"}
        )

    async def ready(self, request: web.Request) -> web.Response:
        """Readiness, for a load balancer: 200 while serving, 503 once the
        gateway is stopping. Never 503 because the upstream is down: every
        replica shares the upstream, so pulling them all would turn the
        clients' clear 502 answers into connection errors."""
        stopping = self.stopping
        return web.Response(
            status=503 if stopping else 200,
            text=json.dumps({"status": "stopping" if stopping else "ready"}),
            content_type=JSON,
            headers={"Cache-Control": "no-store"},
        )

    async def mark_stopping(self, app: web.Application) -> None:
        """``on_shutdown`` callback: readiness answers 503 from now on."""
        self.stopping = True

    def sees_detail(self, request: web.BaseRequest) -> bool:
        """Whether this request may see the health detail.

        Yes for a client on loopback (as ``GATEWAY_TRUSTED_PROXIES`` resolves
        the client, so a loopback proxy forwarding a public client does not
        count), and for the trusted proxy itself: with
        ``GATEWAY_TRUSTED_PROXIES`` > 0 the operator says the peer is that
        proxy, and a request without ``X-Forwarded-For`` is the proxy's own
        (its health check), not a client's it forwards.
        """
        trusted = self.config.trusted_proxies
        if trusted > 0 and "x-forwarded-for" not in request.headers:
            return True
        return is_loopback(proxy.forwarding(request, trusted).client_address)

    async def _upstream_health(self) -> dict[str, Any]:
        # One probe per HEALTH_CACHE_S at most: a burst of detailed health
        # checks must not become a burst of connections to the backend.
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < HEALTH_CACHE_S:
            return self._health[1]
        started = time.perf_counter_ns()
        result: dict[str, Any] = {
            "url": str(self.upstream.origin()),
            "reachable": True,
            "error": None,
        }
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.upstream.host, self.upstream.port),
                timeout=min(2.0, self.config.connect_timeout_s),
            )
            writer.close()
            result["connect_ms"] = ms(time.perf_counter_ns() - started)
        except (OSError, TimeoutError) as exc:
            result["reachable"] = False
            result["error"] = type(exc).__name__
        self._health = (now, result)
        return result

    async def snippet_file(self, request: web.Request) -> web.Response:
        """The snippet, cacheable, with an ETag (a classic script needs no CORS;
        the module variant does, for allowed origins).

        The body carries the whole allow-list, never a verdict for the
        requesting page: a classic ``<script src>`` sends no Origin to judge,
        and CDNs commonly ignore ``Vary: Origin``, so a verdict cached for one
        page would reach another (one not enabled would then send headers
        that need a preflight the gateway refuses). The same bytes for every
        page are safe in any cache; the snippet checks its own origin.

        With ``?sampled=gateway`` the page asks for the bound of the
        gateway's trace-id ratio sampler too (``sampling.py``), so that its
        ``traceparent`` flags say what the gateway will decide. Any other
        query is no request for it: the plain variant."""
        if self.snippet is None or self.sampled_snippet is None:
            return json_error(404, f"snippet not found at {SNIPPET_PATH}")
        module = request.path.endswith(".mjs")
        asked = SAMPLED_QUERY in request.query.items()
        encoded = (self.sampled_snippet if asked else self.snippet)[module]
        headers = CIMultiDict(
            {
                "Cache-Control": f"public, max-age={SNIPPET_MAX_AGE_S}",
                "Vary": "Origin, Accept-Encoding",
            }
        )
        origin = self.cors.origin(request)
        if module and origin is not None:
            self.cors.grant_own(headers, origin)
        return snippet_response(request, encoded, headers)

    async def versioned_snippet_file(self, request: web.Request) -> web.Response:
        """``snippet-<version>.js`` / ``.mjs``: the bytes of this release,
        the same from every gateway, so a page can pin them with Subresource
        Integrity (W3C SRI) and cache them for a year.

        No allow-list is written in (it is per deployment and would change
        the hash): a cross-origin gateway is enabled by its first sync answer,
        as for a copy served from anywhere else. ``integrity`` makes the
        browser fetch even a classic script in CORS mode (the ``crossorigin``
        attribute, HTML "fetch a classic script"), and a module always is: the
        public, credential-free bytes are granted to any origin with ``*``
        (Fetch standard, CORS protocol), which, unlike a per-origin grant, is
        the same answer for every page and so safe in any shared cache."""
        if self.versioned_snippet is None:
            return json_error(404, f"snippet not found at {SNIPPET_PATH}")
        encoded = self.versioned_snippet[request.path.endswith(".mjs")]
        headers = CIMultiDict(
            {
                "Cache-Control": VERSIONED_CACHE_CONTROL,
                "Access-Control-Allow-Origin": "*",
                "Vary": "Accept-Encoding",
            }
        )
        return snippet_response(request, encoded, headers)

    async def beacon(self, request: web.Request) -> web.Response:
        """``POST /__gateway/beacon``: browser timings → browser CLIENT spans.

        Size-, rate- and origin-limited; bad entries are counted and dropped,
        and no input gets a 500."""
        origin = self.cors.origin(request)
        if origin is None:
            return json_error(403, "beacon from an origin not in GATEWAY_ALLOWED_ORIGINS")
        peer = proxy.forwarding(request, self.config.trusted_proxies).client_address
        if not self.beacon_limiter.allow(peer, time.monotonic()):
            self.beacon_counts["rate_limited"] += 1
            response = json_error(429, "too many beacons; slow down")
            self.cors.grant_own(response.headers, origin)
            return response
        declared = request.content_length
        if declared is not None and declared > beacon.MAX_BEACON_BYTES:
            return json_error(413, f"beacon larger than {beacon.MAX_BEACON_BYTES} bytes")
        body = await request.content.read(beacon.MAX_BEACON_BYTES + 1)
        if len(body) > beacon.MAX_BEACON_BYTES:
            return json_error(413, f"beacon larger than {beacon.MAX_BEACON_BYTES} bytes")
        try:
            payload = json.loads(body)
            result = beacon.ingest(
                payload,
                keys=self.beacon_keys,
                now_ms=time.time_ns() / 1e6,
                resource=self.browser_resource,
                processor=self.span_processor,
                redactor=self.redactor,
                sampler=self.sampler,
            )
        except (ValueError, RecursionError) as exc:  # JSON errors and BeaconError
            self.beacon_counts["bad_beacon"] += 1
            response = json_error(400, f"beacon is not usable: {str(exc)[:200]}")
            self.cors.grant_own(response.headers, origin)
            return response
        self.beacon_counts["accepted"] += result.accepted
        for reason, count in result.dropped.items():
            self.beacon_counts[f"dropped_{reason}"] += count
        response = web.Response(
            status=202,
            text=json.dumps({"accepted": result.accepted, "dropped": dict(result.dropped)}),
            content_type=JSON,
        )
        self.cors.grant_own(response.headers, origin)
        return response

    async def reserved_not_found(self, request: web.Request) -> web.Response:
        return json_error(404, f"no such gateway endpoint: {request.path}")

    async def clock(self, request: web.Request) -> web.Response:
        """``GET /__gateway/clock``: 204 with ``X-Gateway-Clock``, for the
        snippet's start-up sync burst. No upstream call, no span, no body."""
        t1_ns = time.time_ns()
        t1_perf = time.perf_counter_ns()
        response = web.Response(status=204, headers={"Cache-Control": "no-store"})
        origin = self.cors.origin(request)
        if origin is not None:
            self.cors.grant_own(response.headers, origin)
        t1_ms = t1_ns / 1e6
        t2_ms = t1_ms + (time.perf_counter_ns() - t1_perf) / 1e6
        response.headers["X-Gateway-Clock"] = self.measurement.clock_header(t1_ms, t2_ms, None)
        return response

    async def reserved_preflight(self, request: web.Request) -> web.Response:
        origin = self.cors.origin(request)
        if origin is not None and self.cors.is_preflight(request):
            return self.cors.own_preflight(origin)
        return await self.reserved_not_found(request)

    # -- the proxy -------------------------------------------------------


def served_source(source: bytes) -> bytes:
    """The snippet's source without its comment-only lines and indentation
    (``snippet.strip_source``), or as it is when that pass cannot read it
    with certainty (a warning: the program is the same, only larger)."""
    try:
        return snippet.stripped(source)
    except (snippet.Unstrippable, UnicodeDecodeError) as exc:
        log.warning("serving %s unstripped: %s", SNIPPET_PATH, exc)
        return source


def with_marker(body: bytes, marker: bytes, value: str | None) -> bytes:
    """The snippet with ``value`` written at ``marker`` (one of the
    ``*_MARKER`` constants, which end in ``null``) as a JSON string (valid
    JavaScript; U+2028/2029 arrive escaped), or left null for None."""
    return body.replace(marker, marker.removesuffix(b"null") + json.dumps(value).encode())


def snippet_response(
    request: web.Request, encoded: snippet.Encoded, headers: CIMultiDict[str]
) -> web.Response:
    """200 with the snippet in the coding the request accepts (gzip, else
    identity; ``http.accepts_gzip``), or 304 when the browser's copy of that
    representation is current. ``headers`` has the caller's ``Vary``, which
    names ``Accept-Encoding`` (RFC 9110 §12.5.5)."""
    gzipped = accepts_gzip(request.headers.getall("Accept-Encoding", ()))
    body, etag = (encoded.gzip, encoded.gzip_etag) if gzipped else (encoded.identity, encoded.etag)
    headers["ETag"] = etag
    # RFC 9110 §13.1.2: If-None-Match with a matching entity tag → 304,
    # with the ETag, Vary and Cache-Control a 200 would have (§15.4.5).
    if none_match(request.headers.get("If-None-Match", ""), etag):
        return web.Response(status=304, headers=headers)
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers, content_type="text/javascript", charset="utf-8")


def is_loopback(address: str) -> bool:
    """Loopback: 127.0.0.0/8 (RFC 6890 §2.2.2), ::1 (RFC 4291 §2.5.3) or
    127.x written IPv4-mapped (RFC 4291 §2.5.5.2). Anything unparsable (a
    name, a port, a hostile X-Forwarded-For entry) is not."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def exporter_status(telemetry: Telemetry | None) -> dict[str, Any]:
    """Queue size of the batch span processor and spans the exporter dropped
    as unencodable, when the process built them (``build_telemetry``)."""
    if telemetry is None:
        return {"queued_spans": None}
    return telemetry.exporter_status()
