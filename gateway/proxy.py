"""Forwarding: which headers cross the gateway, and how bodies stream through it.

What it is for: the transparent part of the proxy (README "What the proxy
does (and does not) change"). The backend sees what the browser sent and the
browser gets what the backend answered, except for what the functions here
change: hop-by-hop headers, Host and
``X-Forwarded-*``, propagation headers. Bodies move as streams in both
directions, so memory stays constant whatever their size — except request
bodies up to ``GATEWAY_BUFFER_BODY_BYTES``, read completely before the
upstream call so that a slow sender never holds a backend thread;
compressed bytes are never touched.

Not for: spans, trace context or CORS (``app.py``, ``context.py``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Final, TypeVar

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.context import PROPAGATION_HEADERS

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

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._pending_since: float | None = None
        self._task: asyncio.Task[object] | None = None
        self._fired = False

    async def wait(self, awaitable: Awaitable[_T]) -> _T:
        task = asyncio.current_task()
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


class BodyReader:
    """The client's request body, read with a stall timeout and a size limit.

    Every read waits at most ``stall_timeout_s`` for the next bytes (nginx's
    ``client_body_timeout``: the time between two reads, not for the whole
    body), so a sender that stops never holds the gateway — nor, once the
    upstream call has started, a backend thread — for longer than that.
    What went wrong stays readable on the reader (``stalled``,
    ``received_bytes``), as aiohttp's client wraps whatever a body iterator
    raises.
    """

    __slots__ = ("_content", "_max_bytes", "_timer", "received_bytes", "stalled")

    def __init__(self, request: web.BaseRequest, *, max_bytes: int, stall_timeout_s: float):
        self._content = request.content
        self._max_bytes = max_bytes
        self._timer = StallTimer(stall_timeout_s)
        self.received_bytes = 0
        self.stalled = False

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
        :class:`BodyTooLarge` or aiohttp's ``ClientPayloadError`` (the client
        disconnected or lied about its length) while buffering.
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
