"""Forwarding: the upstream exchange, and which headers cross the gateway.

What it is for: the transparent part of the proxy (README "What the proxy
does (and does not) change") and the exchange with the upstream, step by
step: the client's body (``read_body``), the upstream URL (``Upstream.target``:
absolute-form reduced, path and query byte for byte), the call
(``Upstream.call``, failures mapped to 502/504/413/408/400), the response head
(``Upstream.response``: hop-by-hop headers stripped, no default Content-Type
or Server added) and the body streamed to the client (``Upstream.relay``,
with the cuts and aborts when either side fails). The backend sees what the
browser sent and the browser gets what the backend answered, except for what
the functions here change: hop-by-hop headers, Host and ``X-Forwarded-*``,
propagation headers. Bodies move as streams in both directions, so memory
stays constant whatever their size — except request bodies up to
``GATEWAY_BUFFER_BODY_BYTES``, read completely before the upstream call so
that a slow sender never holds a backend thread; compressed bytes are never
touched.

Every step returns a small result (a value, a :class:`Failure`, a
:class:`Relayed`); none takes a span. ``app.py`` turns them into span
attributes and answers.

Not for: spans, measurement, Server-Timing, trace context or CORS
(``app.py``, ``measure.py``, ``context.py``, ``cors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Final, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.config import GatewayConfig
from gateway.context import PROPAGATION_HEADERS

#: 502/504 lines: a down backend makes one per request, so the CLI rate-limits
#: this logger (``latency_common.logs.RateLimitFilter``).
upstream_log = logging.getLogger("gateway.upstream")

#: RFC 9110 §7.6.1: hop-by-hop fields a proxy removes before forwarding, in
#: either direction, plus every field named in ``Connection``. Proxy-Authorization
#: and Proxy-Authenticate belong to the hop as well (RFC 9110 §11.7.1–§11.7.2:
#: consumed by the proxy they are meant for), so credentials meant for us never
#: leak to the backend.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)

#: Dropped from requests besides the hop-by-hop set: the gateway writes its own
#: Host (the upstream's, as nginx's ``proxy_set_header Host $proxy_host``) and
#: forwarding headers; ``Expect: 100-continue`` was already answered by the
#: gateway's own server (RFC 9110 §10.1.1), so the backend must not answer it
#: again; the ``X-Client-*`` timing headers are for the gateway alone.
_REQUEST_DROP: Final = HOP_BY_HOP | PROPAGATION_HEADERS | {"host", "expect", "forwarded"}

#: Limits a client can hit before anything is forwarded. nginx's default
#: ``large_client_header_buffers`` is 4 × 8 KiB: one field line (name and
#: value) may have 8 KiB, the request line too; the whole header section 32 KiB.
MAX_FIELD_BYTES: Final = 8 * 1024
MAX_HEADER_BYTES: Final = 32 * 1024
MAX_HEADER_COUNT: Final = 100
MAX_TARGET_BYTES: Final = 8 * 1024

#: aiohttp's own parser answers 400 past these; they sit above our limits so
#: that our 431/414 answer first (ARCHITECTURE.md §3).
PARSER_LIMITS: Final = {
    "max_line_size": 2 * MAX_TARGET_BYTES,
    "max_field_size": 2 * MAX_FIELD_BYTES,
    "max_headers": 2 * MAX_HEADER_COUNT,
}

_T = TypeVar("_T")

#: Read size for streamed bodies (aiohttp's default buffer is 64 KiB).
CHUNK_BYTES: Final = 64 * 1024


class BodyTooLarge(Exception):
    """The request body passed ``GATEWAY_MAX_BODY_BYTES`` while streaming."""


@dataclass(frozen=True, slots=True)
class Forwarding:
    """Who the client is, as the gateway's trust configuration sees it."""

    client_address: str
    x_forwarded_for: str
    x_forwarded_host: str | None
    x_forwarded_proto: str


def connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Field names listed in ``Connection`` (RFC 9110 §7.6.1), lowercased."""
    values = headers.getall("connection", ())
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )


def header_limit_error(request: web.BaseRequest) -> tuple[int, str] | None:
    """``(status, message)`` when the request's head is over our limits, else None.

    RFC 6585 §5: 431 for header fields that are too large, individually or
    together; RFC 9110 §15.5.15: 414 for a target longer than we will handle.
    """
    if len(request.raw_path) > MAX_TARGET_BYTES:
        return 414, f"request target longer than {MAX_TARGET_BYTES} bytes"
    raw = request.raw_headers
    if len(raw) > MAX_HEADER_COUNT:
        return 431, f"more than {MAX_HEADER_COUNT} header fields"
    total = 0
    for name, value in raw:
        size = len(name) + len(value) + 4
        if size > MAX_FIELD_BYTES:
            return 431, f"header field {name[:64].decode('latin-1')!r} is larger than 8 KiB"
        total += size
        if not value.isascii() and not _is_utf8(value):
            # RFC 9110 §5.5 allows obs-text octets, but the upstream client
            # can only send UTF-8: refuse rather than forward altered bytes.
            return 400, f"header field {name[:64].decode('latin-1')!r} is not valid UTF-8"
    if total > MAX_HEADER_BYTES:
        return 431, f"header section larger than {MAX_HEADER_BYTES // 1024} KiB"
    return None


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def forwarding(request: web.BaseRequest, trusted_proxies: int) -> Forwarding:
    """X-Forwarded-* for the upstream and the client address, werkzeug
    ``ProxyFix`` style: trust is explicit configuration.

    With ``trusted_proxies = N`` the last N entries of the inbound
    X-Forwarded-For chain are kept and the peer appended; the client is the
    N-th entry from the right (the address the outermost trusted proxy saw).
    With N = 0 the inbound chain is dropped, as any client can write it.
    """
    peer = request.remote or ""
    proto = request.scheme
    host = request.headers.get("host")
    if trusted_proxies <= 0:
        return Forwarding(peer, peer, host, proto)
    chain = [
        item.strip()
        for value in request.headers.getall("x-forwarded-for", ())
        for item in value.split(",")
        if item.strip()
    ]
    kept = chain[-trusted_proxies:]
    client = kept[0] if len(chain) >= trusted_proxies else peer
    forwarded_host = _trusted_last(request, "x-forwarded-host", trusted_proxies) or host
    forwarded_proto = _trusted_last(request, "x-forwarded-proto", trusted_proxies) or proto
    return Forwarding(client, ", ".join([*kept, peer]), forwarded_host, forwarded_proto)


def _trusted_last(request: web.BaseRequest, name: str, trusted: int) -> str | None:
    # ProxyFix: the value N entries from the right was set by the outermost
    # trusted proxy; with fewer entries than N the header is not trusted.
    items = [i.strip() for v in request.headers.getall(name, ()) for i in v.split(",")]
    return items[-trusted] if len(items) >= trusted and items[-trusted] else None


#: RFC 9110 §7.2 / RFC 3986 §3.2.2-3.2.3: Host = uri-host [ ":" port ], where
#: uri-host is an IP-literal in brackets or a reg-name / IPv4 address
#: (unreserved, pct-encoded and sub-delims characters). Compiled once.
_HOST_RE: Final = re.compile(
    r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9\-._~!$&'()*+,;=%]{1,253})(?::[0-9]{1,5})?"
)


def preserved_host(request: web.BaseRequest) -> str | None:
    """The browser's ``Host``, when it is one well-formed field line (RFC 9112
    §3.2: a request with several, or an invalid one, is not to be trusted),
    else None (the upstream then gets its own ``host:port``)."""
    values = request.headers.getall("host", ())
    if len(values) != 1 or not _HOST_RE.fullmatch(values[0]):
        return None
    return values[0]


def upstream_request_headers(
    request: web.BaseRequest, fwd: Forwarding, *, preserve_host: bool = False
) -> CIMultiDict[str]:
    """The request headers to send upstream: the client's, in order, minus the
    dropped set and every ``Connection`` token, plus our forwarding headers.

    ``Host`` is the upstream's own (set by the client session from
    ``GATEWAY_UPSTREAM``), unless ``preserve_host`` (``GATEWAY_PRESERVE_HOST``)
    asks to pass on a well-formed browser ``Host``, for backends that build
    URLs or pick a virtual host from it."""
    drop = connection_tokens(request.headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lname = name.lower()
        if (
            lname in _REQUEST_DROP
            or lname in drop
            or lname.startswith("x-forwarded-")
            or lname.startswith("x-client-")
        ):
            continue
        out.add(name, value)
    out["X-Forwarded-For"] = fwd.x_forwarded_for
    if fwd.x_forwarded_host:
        out["X-Forwarded-Host"] = fwd.x_forwarded_host
    out["X-Forwarded-Proto"] = fwd.x_forwarded_proto
    if preserve_host:
        host = preserved_host(request)
        if host is not None:
            out["Host"] = host
    return out


class BadUpstreamHeader(Exception):
    """The upstream sent a header value we cannot pass on unchanged."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"upstream sent header {name[:64]!r} that {problem}")
        self.name = name


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers minus hop-by-hop ones, order and
    repetition kept (every ``Set-Cookie`` stays its own field, RFC 6265 §3).

    Raises :class:`BadUpstreamHeader` for a value that is not UTF-8 (aiohttp
    hands it over with surrogate escapes, and could not write it back as it
    came) or that holds CR or LF: the client gets a clear 502, not silently
    altered bytes, and never a header line the upstream did not send as one
    (response splitting). RFC 9110 §5.5: CR and LF are not allowed in a field
    value; RFC 9112 §5.2: obs-fold is replaced by SP before forwarding
    (aiohttp's parser does that, and refuses a bare CR itself, but the check
    does not depend on which of its parsers is in use).
    """
    drop = connection_tokens(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in drop:
            continue
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BadUpstreamHeader(name, "is not UTF-8") from None
        if "\r" in value or "\n" in value:
            raise BadUpstreamHeader(name, "holds CR or LF")
        out.add(name, value)
    return out


def request_has_body(request: web.BaseRequest) -> bool:
    # RFC 9112 §6.3: a request has a body only when it says so with
    # Content-Length or Transfer-Encoding.
    return request.body_exists


class ClientStalled(Exception):
    """The client sent no body byte for ``GATEWAY_CLIENT_TIMEOUT_S``."""


class StallTimer:
    """Bounds each of many awaits by ``timeout_s``, with one timer for all.

    ``asyncio.timeout`` around every chunk cost 4–6 µs an await under uvloop
    here (30–40 µs on a loaded machine), this 0.5 µs: a timestamp per await
    and one timer that only runs
    while an await is pending (it re-arms at most once per ``timeout_s`` and
    dies when nothing is pending). An await pending for ``timeout_s`` is
    cancelled the way ``asyncio.timeout`` does it (``cancel`` then
    ``uncancel``) and raises ``TimeoutError``; a real cancellation of the
    task still propagates.
    """

    __slots__ = ("_fired", "_handle", "_loop", "_pending_since", "_task", "_timeout_s")

    def __init__(self, timeout_s: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._timeout_s = timeout_s
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._pending_since: float | None = None
        self._task: asyncio.Task[object] | None = None
        self._fired = False

    async def wait(self, awaitable: Awaitable[_T]) -> _T:
        # With the loop given, current_task skips get_running_loop (on 3.11
        # a getpid() system call).
        task = asyncio.current_task(self._loop)
        now = self._loop.time()
        self._task, self._pending_since, self._fired = task, now, False
        if self._handle is None:
            self._handle = self._loop.call_at(now + self._timeout_s, self._check)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._fired and task is not None and task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            self._pending_since = None
            self._task = None

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        since, task = self._pending_since, self._task
        if since is None or task is None:
            return  # nothing pending: the next wait re-arms
        if self._loop.time() - since >= self._timeout_s:
            self._fired = True
            task.cancel()
            return
        self._handle = self._loop.call_at(since + self._timeout_s, self._check)


#: What aiohttp's server raises from a request body the client did not finish:
#: ``ConnectionResetError`` when the connection was lost (or half-closed:
#: aiohttp closes on EOF), ``RequestPayloadError`` when its parser refused the
#: body's bytes (bad chunk framing in its pure-Python parser; a Content-Encoding
#: that does not decode, where a server decodes bodies, which ours does not).
_BODY_ERRORS: Final = (web.RequestPayloadError, ConnectionError)


class BodyReader:
    """The client's request body, read with a stall timeout and a size limit.

    Every read waits at most ``stall_timeout_s`` for the next bytes (nginx's
    ``client_body_timeout``: the time between two reads, not for the whole
    body), so a sender that stops never holds the gateway — nor, once the
    upstream call has started, a backend thread — for longer than that.
    What went wrong stays readable on the reader (``stalled``,
    ``received_bytes``, ``incomplete``), as aiohttp's client wraps whatever a
    body iterator raises in its own errors (a client that disconnects
    mid-upload reaches the upstream call as ``ClientOSError``, indistinguishable
    from an upstream reset).
    """

    __slots__ = ("_content", "_max_bytes", "_timer", "incomplete", "received_bytes", "stalled")

    def __init__(self, request: web.BaseRequest, *, max_bytes: int, stall_timeout_s: float):
        self._content = request.content
        self._max_bytes = max_bytes
        self._timer = StallTimer(stall_timeout_s)
        self.received_bytes = 0
        self.stalled = False
        #: The name of the error that ended the client's body before its end
        #: (it disconnected, or closed its side, RFC 9112 §6.3), else None.
        self.incomplete: str | None = None

    @property
    def too_large(self) -> bool:
        return self.received_bytes > self._max_bytes

    async def _read(self) -> bytes:
        """The next bytes the client sent; ``b""`` at the end of the body."""
        try:
            chunk = await self._timer.wait(self._content.readany())
        except TimeoutError:
            self.stalled = True
            raise ClientStalled from None
        except _BODY_ERRORS as exc:
            self.incomplete = type(exc).__qualname__
            raise
        self.received_bytes += len(chunk)
        if self.received_bytes > self._max_bytes:
            raise BodyTooLarge(self.received_bytes)
        return chunk

    async def read(
        self, buffer_bytes: int, declared_bytes: int | None
    ) -> bytes | AsyncIterator[bytes]:
        """The whole body as bytes when it ends within ``buffer_bytes``, else a
        stream of it (what was read already first).

        A declared Content-Length above ``buffer_bytes`` streams at once,
        without buffering anything. Raises :class:`ClientStalled`,
        :class:`BodyTooLarge` or one of ``_BODY_ERRORS`` (the client
        disconnected, or sent bytes aiohttp's parser refused) while buffering.
        """
        if declared_bytes is not None and declared_bytes > buffer_bytes:
            return self._stream([])
        head: list[bytes] = []
        size = 0
        try:
            while size <= buffer_bytes:
                chunk = await self._read()
                if not chunk:
                    self._timer.stop()
                    return b"".join(head)
                head.append(chunk)
                size += len(chunk)
        except BaseException:
            self._timer.stop()
            raise
        return self._stream(head)

    async def _stream(self, head: list[bytes]) -> AsyncIterator[bytes]:
        try:
            for chunk in head:
                yield chunk
            head.clear()
            while chunk := await self._read():
                yield chunk
        finally:
            self._timer.stop()


# -- the exchange ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """The exchange failed before the upstream's answer could be passed on:
    the gateway answers ``status`` itself, with ``message`` and, for spans,
    ``error_type``. ``cut_client``: close the connection after the answer (the
    client's body was not read to its end, so nothing after it can be parsed).
    """

    status: int
    message: str
    error_type: str
    cut_client: bool = False


@dataclass(frozen=True, slots=True)
class RequestBody:
    """The client's body as the upstream call sends it; ``reader`` is kept to
    tell, after a failed call, whether the client's body was the cause."""

    data: bytes | AsyncIterator[bytes] | None
    reader: BodyReader | None


NO_BODY: Final = RequestBody(None, None)


async def read_body(request: web.BaseRequest, config: GatewayConfig) -> RequestBody | Failure:
    """The request's body, buffered up to ``GATEWAY_BUFFER_BODY_BYTES``, else
    a stream of it; a :class:`Failure` when the client failed while buffering."""
    if not request_has_body(request):
        return NO_BODY
    reader = BodyReader(
        request, max_bytes=config.max_body_bytes, stall_timeout_s=config.client_timeout_s
    )
    try:
        data = await reader.read(config.buffer_body_bytes, request.content_length)
    except ClientStalled:
        return Failure(408, "request body stalled", "408", cut_client=True)
    except BodyTooLarge:
        return Failure(413, "request body too large", "413")
    except _BODY_ERRORS as exc:
        return Failure(400, "request body incomplete", type(exc).__qualname__, cut_client=True)
    return RequestBody(data, reader)


def classify(exc: BaseException, reader: BodyReader | None) -> Failure:
    """The answer to a failure before the upstream answered.

    aiohttp's client wraps what the body iterator raised (a client gone
    mid-upload comes as ``ClientOSError``, or as ``ServerDisconnectedError``
    when the upstream hung up first), so the reader, not ``exc``, says whether
    the client's body was the cause: the upstream is never blamed for it.
    """
    if reader is not None:
        if reader.too_large:
            return Failure(413, "request body too large", "413")
        if reader.stalled:
            return Failure(408, "request body stalled", "408", cut_client=True)
        if reader.incomplete is not None:
            return Failure(400, "request body incomplete", reader.incomplete, cut_client=True)
    if isinstance(exc, TimeoutError):
        return Failure(504, "upstream timed out", "timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Failure(502, "upstream unreachable", type(exc).__qualname__)
    # Anything else (a reset, a malformed answer, …) is the upstream failing.
    return Failure(502, "upstream failed", type(exc).__qualname__)


@dataclass(frozen=True, slots=True)
class Relayed:
    """How streaming the upstream's answer to the client ended: completely
    (both None), or cut by the client (``client_error``: ``client_timeout``,
    ``client_disconnected``) or by the upstream (``upstream_error``: its
    exception's name, or ``timeout``)."""

    client_error: str | None = None
    upstream_error: str | None = None


COMPLETE: Final = Relayed()
_CLIENT_TIMEOUT: Final = Relayed(client_error="client_timeout")
_CLIENT_DISCONNECTED: Final = Relayed(client_error="client_disconnected")


class ProxyResponse(web.StreamResponse):
    """A StreamResponse that adds no Content-Type and no Server of its own.

    aiohttp fills in ``Content-Type: application/octet-stream`` and its own
    ``Server`` when a response lacks them; a transparent proxy must pass the
    upstream's absence on (README "What the proxy does (and does not)
    change"). ``Date`` is still added when missing, as RFC 9110 §6.6.1 asks of
    a recipient with a clock. The defaults are taken out again by
    :func:`drop_default_headers`, on aiohttp's public ``on_response_prepare``
    signal (which fires after the defaults are set, before the head is
    written), so no private method is overridden.
    """

    __slots__ = ("keep",)

    #: aiohttp's StreamResponse sends its head on ``prepare`` (its own
    #: ``web.Response`` does not): holding it back lets ``Upstream.relay`` send
    #: the head and an already arrived body in one write (one send instead of
    #: two per response), and flush it early for a streamed body. aiohttp has
    #: no public switch for this; tests/test_proxy.py checks the attribute
    #: still exists and what the client receives.
    _send_headers_immediately = False

    def __init__(self, *, status: int, reason: str | None, keep: frozenset[str]) -> None:
        super().__init__(status=status, reason=reason)
        #: Which of ``content-type`` and ``server`` the upstream sent.
        self.keep = keep


async def drop_default_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` handler: undo aiohttp's default Content-Type and
    Server on a :class:`ProxyResponse` whose upstream sent none."""
    if isinstance(response, ProxyResponse):
        if "content-type" not in response.keep:
            response.headers.popall("Content-Type", None)
        if "server" not in response.keep:
            response.headers.popall("Server", None)


def build_session(config: GatewayConfig) -> aiohttp.ClientSession:
    """The process's pooled upstream session (open it in a running loop, in
    the application's ``cleanup_ctx``; close it there)."""
    connector = aiohttp.TCPConnector(
        limit=config.max_connections,
        limit_per_host=0,
        ttl_dns_cache=60,
        enable_cleanup_closed=False,
    )
    # A transparent proxy: no shared cookie jar, no proxy variables from the
    # environment, no automatic decompression, no added default headers.
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        timeout=aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout_s, sock_read=config.read_timeout_s
        ),
        read_bufsize=CHUNK_BYTES,
    )


_BAD_TARGET: Final = Failure(400, "request target must be a path or an http(s) URL", "400")


class Upstream:
    """The exchange with one upstream over one pooled ``session``.

    ``base_url`` gives the scheme and authority of every call (never the
    client); ``client_timeout_s`` bounds each write of a response to a client
    that stops reading. The session is the caller's: it is not closed here.
    """

    __slots__ = ("_authority", "_client_timeout_s", "_loop", "_scheme", "_session")

    def __init__(
        self, base_url: URL, session: aiohttp.ClientSession, client_timeout_s: float
    ) -> None:
        self._scheme = base_url.scheme
        self._authority = base_url.raw_authority
        self._session = session
        self._client_timeout_s = client_timeout_s
        # The session's loop, known at the first relay: asking for the running
        # loop costs a getpid() system call per request on Python 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    def target(self, raw_target: str) -> URL | Failure:
        """The upstream URL for a request target, path and query byte for byte."""
        if not raw_target.startswith("/"):
            # Absolute-form (RFC 9112 §3.2.2): only its path and query go on;
            # the authority in it never chooses where we connect (no open proxy).
            try:
                url = URL(raw_target)
            except ValueError:  # aiohttp's parser refuses these first; never a 500
                return _BAD_TARGET
            if not url.absolute or url.scheme not in ("http", "https"):
                return _BAD_TARGET
            raw_target = url.raw_path_qs or "/"
        path, _, query = raw_target.partition("?")
        # Byte for byte: encoded=True keeps %2F as %2F and adds no quoting;
        # scheme and authority come from GATEWAY_UPSTREAM alone.
        return URL.build(
            scheme=self._scheme,
            authority=self._authority,
            path=path,
            query_string=query,
            encoded=True,
        )

    async def call(
        self, method: str, target: URL, headers: CIMultiDict[str], body: RequestBody
    ) -> aiohttp.ClientResponse | Failure:
        """Send the request; the upstream's response once its head arrived, or
        the :class:`Failure` to answer instead. A cancellation propagates."""
        try:
            return await self._session.request(
                method,
                target,
                headers=headers,
                data=body.data,
                allow_redirects=False,
                compress=None,
                chunked=None,
            )
        except Exception as exc:  # CancelledError is a BaseException: it propagates
            failure = classify(exc, body.reader)
        if failure.status >= 500:
            upstream_log.warning(
                "upstream %s %s: %s (%s)",
                method,
                target.raw_path,
                failure.message,
                failure.error_type,
            )
        return failure

    def response(self, answer: aiohttp.ClientResponse) -> ProxyResponse | Failure:
        """The client's response head from the upstream's: hop-by-hop headers
        dropped; a 502 :class:`Failure` (and the upstream connection closed)
        for a header that cannot be passed on unchanged."""
        try:
            out_headers = response_headers(answer.headers)
        except BadUpstreamHeader as exc:
            answer.close()
            upstream_log.warning("%s", exc)
            return Failure(502, str(exc), "header")
        keep = frozenset(k.lower() for k in ("Content-Type", "Server") if k in out_headers)
        response = ProxyResponse(status=answer.status, reason=answer.reason, keep=keep)
        response.headers.extend(out_headers)
        return response

    async def relay(
        self, request: web.Request, answer: aiohttp.ClientResponse, response: ProxyResponse
    ) -> Relayed:
        """Send ``response``'s head, then the upstream's body as it arrives.

        The upstream dying or stalling mid-body cuts the client's response
        (never completed with a wrong length); a client that stops reading for
        ``client_timeout_s`` is dropped. A fully read answer's connection goes
        back to the pool; any other is closed (unread bytes would poison the
        next request on it).
        """
        completed = False
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        to_client = _ClientWrites(self._client_timeout_s, loop)
        try:
            # ProxyResponse holds its head back until the first body bytes,
            # so that head and body leave in one send.
            await to_client.send(response.prepare(request))
            last = b""
            if request.method != "HEAD" and answer.status not in (204, 304):
                # Errors reading the upstream raise from its stream itself;
                # errors writing to the client come wrapped as _ClientGone.
                content = answer.content
                last = content.read_nowait()  # what already arrived
                if not content.at_eof():
                    # More to come: the head goes now, with what arrived (a
                    # client of a stream sees the head before the upstream's
                    # next byte), then the rest as it arrives.
                    await to_client.send(response.write(last))
                    async for chunk in content.iter_any():
                        await to_client.send(response.write(chunk))
                    last = b""
            # A body that had all arrived goes out with the head and the end.
            await to_client.send(response.write_eof(last))
            completed = True
            return COMPLETE
        except _ClientGone as gone:
            if gone.timed_out:
                # It stopped reading: drop it with whatever it did not take.
                abort(request)
                return _CLIENT_TIMEOUT
            return _CLIENT_DISCONNECTED
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error_type = "timeout" if isinstance(exc, TimeoutError) else type(exc).__qualname__
            upstream_log.warning(
                "upstream %s %s died mid-body: %s", request.method, answer.url.raw_path, error_type
            )
            abort(request)
            return Relayed(upstream_error=error_type)
        finally:
            to_client.stop()
            if completed:
                answer.release()
            else:
                answer.close()


class _ClientGone(Exception):
    """Writing to the client failed: it disconnected, or stopped reading."""

    def __init__(self, *, timed_out: bool) -> None:
        super().__init__("client stopped reading" if timed_out else "client disconnected")
        self.timed_out = timed_out


class _ClientWrites:
    """Writes of one response to the client, each bounded by ``timeout_s``
    (nginx's ``send_timeout``: a client that does not read holds nothing)."""

    __slots__ = ("_timer",)

    def __init__(self, timeout_s: float, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = StallTimer(timeout_s, loop)

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


async def cut_client(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` and close the connection: the client's body was not
    read to its end, so nothing after it can be parsed, and a client that
    stalled once gets no lingering read (nginx closes after its 408 too)."""
    response.force_close()
    # A client that is gone (ClientConnectionResetError) or that does not take
    # the answer in time (TimeoutError): both are OSErrors, and both just close.
    with contextlib.suppress(OSError):
        async with asyncio.timeout(_LAST_WORDS_TIMEOUT_S):
            await response.prepare(request)
            await response.write_eof()
    request.protocol.force_close()
    return response


def abort(request: web.BaseRequest) -> None:
    """Drop the client connection without ending the response properly.

    ``abort()`` (not ``close()``) discards buffered bytes, so aiohttp's later
    attempt to finish the response (a terminating chunk) cannot reach the
    client either: what the client sees is a truncated message.
    """
    transport = request.transport
    if transport is not None:
        transport.abort()
