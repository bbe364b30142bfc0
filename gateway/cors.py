"""CORS that adds only what the gateway owns and never widens the backend's policy.

What it is for: deciding, per request, which CORS headers the gateway may
write (Fetch standard, §3.2 "CORS protocol"), for the browser origins in
``GATEWAY_ALLOWED_ORIGINS`` (exact origins or ``https://*.example.com``
patterns):

* a preflight caused by our headers alone (a CORS-safelisted method, every
  requested name one of ``OUR_HEADERS``) is answered here;
* every other preflight goes to the backend; when the backend granted the
  origin, our header names are merged into its ``Access-Control-Allow-Headers``;
* on a proxied response the gateway adds ``Access-Control-Expose-Headers``
  for its own headers and ``Timing-Allow-Origin``, only when the backend
  granted the origin, and never touches ``Access-Control-Allow-Origin`` or
  ``-Credentials`` there;
* the gateway's own endpoints under ``/__gateway/`` are granted here, without
  credentials.

Not for: the backend's own CORS (``backend/app.py``), or parsing the rest of
the configuration (``config.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

#: The request headers the snippet adds: the trace context (W3C Trace Context
#: §3.2, §3.3) and the X-Client-* timing headers. The gateway consumes them
#: (X-Client-* are dropped, traceparent/tracestate replaced by its own), so
#: granting them never lets anything new reach the backend.
OUR_HEADERS: Final = (
    "traceparent",
    "tracestate",
    "x-client-timestamp",
    "x-client-clock",
    "x-client-prev",
)
_OUR_HEADER_SET: Final = frozenset(OUR_HEADERS)
ALLOW_HEADERS: Final = ", ".join(OUR_HEADERS)
#: Response headers a page needs to read: Server-Timing for its trace id and
#: the gateway's figures, X-Gateway-Clock for the clock sync.
EXPOSE_HEADERS: Final = ("Server-Timing", "X-Gateway-Clock")
#: Fetch standard §2.2.1 (Methods), "CORS-safelisted method": a request with one of these
#: and no unsafe header needs no preflight at all.
SAFELISTED_METHODS: Final = frozenset({"GET", "HEAD", "POST"})
#: How long a browser may cache our preflight answer (Chromium caps it at 2 h).
MAX_AGE_S: Final = 600
_PREFLIGHT_VARY: Final = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
#: One DNS label as a browser serialises it in an Origin (lower case, IDNs
#: in punycode): RFC 1035 §2.3.1 letters, digits and inner hyphens, 63 at most.
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ENTRY_HELP: Final = (
    "GATEWAY_ALLOWED_ORIGINS entries must be origins like http://localhost:3000 "
    "or patterns like https://*.example.com"
)


@dataclass(frozen=True, slots=True)
class OriginPattern:
    """``scheme://*.rest[:port]``: ``*`` stands for exactly one DNS label."""

    prefix: str  # "https://"
    suffix: str  # ".example.com" or ".example.com:8443"

    def matches(self, origin: str) -> bool:
        # As TLS wildcards (RFC 6125 §6.4.3): the wildcard is one whole label,
        # so https://a.b.example.com and https://evilexample.com do not match
        # https://*.example.com, nor does https://example.com itself.
        if not (origin.startswith(self.prefix) and origin.endswith(self.suffix)):
            return False
        label = origin[len(self.prefix) : len(origin) - len(self.suffix)]
        return _LABEL.fullmatch(label) is not None


def parse_entry(entry: str) -> str | OriginPattern:
    """An allow-list entry as the browser would serialise it (RFC 6454 §6.1:
    lower-case scheme and host, no default port), or a pattern.

    Raises ValueError with a message naming what would be accepted.
    """
    try:
        url = URL(entry)
    except ValueError:
        raise ValueError(f"{_ENTRY_HELP}, got {entry!r}") from None
    scheme = url.scheme
    if (
        scheme not in _DEFAULT_PORTS
        or not url.host
        or url.raw_path not in ("", "/")
        or entry.endswith("/")
        or url.raw_query_string
        or url.raw_fragment
        or url.user is not None
    ):
        raise ValueError(f"{_ENTRY_HELP}, got {entry!r}")
    port = url.explicit_port
    port_text = f":{port}" if port is not None and port != _DEFAULT_PORTS[scheme] else ""
    if "*" not in entry:
        return f"{scheme}://{url.host_subcomponent}{port_text}"
    host = url.raw_host or ""
    first, _, rest = host.partition(".")
    # "*" alone (any origin) stays refused, as does "*.com": the wildcard is
    # the whole left-most label and at least two labels follow it.
    if first != "*" or "*" in rest or rest.count(".") < 1:
        raise ValueError(
            f"GATEWAY_ALLOWED_ORIGINS patterns need '*' as the whole first label of a "
            f"domain with at least two more labels (https://*.example.com), got {entry!r}"
        )
    if not all(_LABEL.fullmatch(label) for label in rest.split(".")):
        raise ValueError(f"{_ENTRY_HELP}, got {entry!r}")
    return OriginPattern(prefix=f"{scheme}://", suffix=f".{rest}{port_text}")


def _tokens(values: list[str]) -> list[str]:
    """The names of comma-separated header lists (RFC 9110 §5.6.1)."""
    return [name for value in values for name in (t.strip() for t in value.split(",")) if name]


def _merge(headers: CIMultiDict[str], name: str, extra: tuple[str, ...]) -> None:
    """Append ``extra`` to the list header ``name``, without duplicates."""
    existing = _tokens(headers.popall(name, []))
    seen = {token.lower() for token in existing}
    headers[name] = ", ".join(existing + [t for t in extra if t.lower() not in seen])


def _add_vary_origin(headers: CIMultiDict[str]) -> None:
    # RFC 9110 §12.5.5: what we added depends on Origin, so caches must key on it.
    if "origin" not in {t.lower() for t in _tokens(headers.getall("Vary", []))}:
        headers.add("Vary", "Origin")


class Cors:
    """The allow-list, compiled once at start-up, and the grants it allows."""

    def __init__(self, allowed_origins: tuple[str, ...]) -> None:
        exact: set[str] = set()
        patterns: list[OriginPattern] = []
        for entry in allowed_origins:
            parsed = parse_entry(entry)
            if isinstance(parsed, OriginPattern):
                patterns.append(parsed)
            else:
                exact.add(parsed)
        self.exact = frozenset(exact)
        self.patterns = tuple(patterns)

    def browser_pattern(self) -> str | None:
        """The allow-list as one anchored regular expression, for the snippet
        the gateway serves (``reserved.py``): the same verdicts as
        :meth:`origin`, in the syntax JavaScript's ``RegExp`` and Python's
        ``re`` share (escaped literals, a class, a bounded repeat). None when
        no cross-origin page is allowed."""
        label = _LABEL.pattern
        choices = sorted(re.escape(origin) for origin in self.exact) + [
            re.escape(p.prefix) + label + re.escape(p.suffix) for p in self.patterns
        ]
        return "^(?:" + "|".join(choices) + ")$" if choices else None

    def describe(self) -> str:
        """For the start-up log line: which origins may call cross-origin."""
        if not self.exact and not self.patterns:
            return "none: same-origin pages only"
        shown = sorted(self.exact) + [p.prefix + "*" + p.suffix for p in self.patterns]
        return ", ".join(shown)

    def origin(self, request: web.BaseRequest) -> str | None:
        """The request's Origin when it is allowed, else None (a set lookup
        first; patterns only for origins not listed exactly)."""
        origin = request.headers.get("origin")
        if origin is None:
            return None
        if origin in self.exact:
            return origin
        for pattern in self.patterns:
            if pattern.matches(origin):
                return origin
        return None

    @staticmethod
    def is_preflight(request: web.BaseRequest) -> bool:
        # Fetch standard §3.2.2: a CORS-preflight request is an OPTIONS
        # request with Access-Control-Request-Method.
        return request.method == "OPTIONS" and "access-control-request-method" in request.headers

    @staticmethod
    def caused_by_us(request: web.BaseRequest) -> bool:
        """Whether this preflight exists only because of our headers: a
        safelisted method and every requested name one of ``OUR_HEADERS``.

        A CORS-safelisted name such as content-type is NOT ours to grant: a
        browser lists it in Access-Control-Request-Headers only when its value
        is not safelisted (Fetch standard §2.2.2 Headers, "CORS-unsafe request-header
        names"), so the request needs the backend's consent: forwarded.
        """
        if request.headers.get("access-control-request-method") not in SAFELISTED_METHODS:
            return False
        requested = _tokens(request.headers.getall("access-control-request-headers", []))
        return bool(requested) and all(name.lower() in _OUR_HEADER_SET for name in requested)

    @staticmethod
    def preflight(request: web.BaseRequest, origin: str) -> web.Response:
        """Answer a preflight our headers caused (``caused_by_us``): 204, no
        upstream call, no span (Fetch standard §3.2.3, "HTTP responses").

        Allow-Credentials is safe here: without our headers the same request
        (a safelisted method, no unsafe header) would have gone without any
        preflight, credentials included, and its response is still judged by
        the backend's own Access-Control-Allow-Origin/-Credentials.

        Allow-Headers names all of ours, not only the requested ones: the
        snippet's set grows after the first request (X-Client-Prev), and a
        cached answer covers a request only if it lists every name (Fetch
        standard, "CORS-preflight cache"), so listing the requested subset
        would cost a second preflight. Every name listed is still ours.
        """
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Allow-Methods": request.headers["access-control-request-method"],
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": str(MAX_AGE_S),
                "Vary": _PREFLIGHT_VARY,
            },
        )

    @staticmethod
    def own_preflight(origin: str) -> web.Response:
        """A preflight for the gateway's own endpoints: no credentials (the
        snippet's clock fetch uses ``credentials: "omit"``)."""
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, HEAD, POST",
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": str(MAX_AGE_S),
                "Vary": _PREFLIGHT_VARY,
            },
        )

    @staticmethod
    def grant_own(headers: CIMultiDict[str], origin: str) -> None:
        """The grant on the gateway's own endpoints (clock, beacon, snippet):
        these are ours to open, without credentials."""
        headers["Access-Control-Allow-Origin"] = origin
        _merge(headers, "Access-Control-Expose-Headers", EXPOSE_HEADERS)
        headers["Timing-Allow-Origin"] = origin
        _add_vary_origin(headers)

    @staticmethod
    def backend_granted(headers: CIMultiDict[str], origin: str) -> bool:
        # Fetch standard, "CORS check" (main fetch): the response is readable when its
        # only Access-Control-Allow-Origin is the origin or "*".
        granted = headers.getall("Access-Control-Allow-Origin", [])
        return len(granted) == 1 and granted[0].strip() in (origin, "*")

    @classmethod
    def merge_preflight(cls, headers: CIMultiDict[str], origin: str) -> None:
        """On the backend's answer to a forwarded preflight: add our header
        names when the backend granted the origin; else leave it untouched."""
        if not cls.backend_granted(headers, origin):
            return
        allowed = _tokens(headers.getall("Access-Control-Allow-Headers", []))
        if "*" in allowed:
            return
        _merge(headers, "Access-Control-Allow-Headers", OUR_HEADERS)

    @classmethod
    def expose(cls, headers: CIMultiDict[str], origin: str) -> None:
        """On a proxied response: expose our headers and timing to an origin
        the backend granted. Allow-Origin and -Credentials stay the backend's."""
        if not cls.backend_granted(headers, origin):
            return
        _merge(headers, "Access-Control-Expose-Headers", EXPOSE_HEADERS)
        # Resource Timing hides detailed timings cross-origin unless
        # Timing-Allow-Origin names the page's origin (W3C Resource Timing,
        # §4.5 "Cross-origin resources").
        if "Timing-Allow-Origin" in headers:
            _merge(headers, "Timing-Allow-Origin", (origin,))
        else:
            headers["Timing-Allow-Origin"] = origin
        _add_vary_origin(headers)
