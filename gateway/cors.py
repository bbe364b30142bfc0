"""CORS for the browser origins the operator allowed, and only for them.

What it is for: the gateway is the CORS authority for ``GATEWAY_ALLOWED_ORIGINS``
(Fetch standard, "CORS protocol"): it answers their preflights itself and
grants them the headers a page needs to read its trace id and the clock
(``Server-Timing``, ``X-Gateway-Clock``) and detailed Resource Timing.
Every other origin is left to the backend: its preflights are forwarded
untouched and its responses get nothing added, so the gateway never widens
the backend's own policy.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web
from multidict import CIMultiDict

#: Request headers a page may send cross-origin: the trace context and ours.
ALLOW_HEADERS: Final = "traceparent, tracestate, x-client-timestamp, x-client-clock, x-client-prev"
#: Response headers a page needs to read: Server-Timing for its trace id and
#: the gateway's figures, X-Gateway-Clock for the clock sync.
EXPOSE_HEADERS: Final = "Server-Timing, X-Gateway-Clock"
#: How long a browser may cache our preflight answer (Chromium caps it at 2 h).
MAX_AGE_S: Final = 600


class Cors:
    def __init__(self, allowed_origins: tuple[str, ...]) -> None:
        self.allowed = frozenset(allowed_origins)

    def origin(self, request: web.BaseRequest) -> str | None:
        """The request's Origin when it is allowed, else None."""
        origin = request.headers.get("origin")
        return origin if origin is not None and origin in self.allowed else None

    @staticmethod
    def is_preflight(request: web.BaseRequest) -> bool:
        return request.method == "OPTIONS" and "access-control-request-method" in request.headers

    @staticmethod
    def preflight(request: web.BaseRequest, origin: str) -> web.Response:
        """Answer a CORS preflight from an allowed origin (Fetch standard,
        "CORS-preflight fetch"): 204, the grant, no upstream call, no span."""
        requested = request.headers.get("access-control-request-headers", "").strip()
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Allow-Methods": request.headers["access-control-request-method"],
                "Access-Control-Allow-Headers": ALLOW_HEADERS
                + (", " + requested if requested else ""),
                "Access-Control-Max-Age": str(MAX_AGE_S),
                "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            },
        )

    @staticmethod
    def grant(headers: CIMultiDict[str], origin: str) -> None:
        """Add the grant for an allowed origin to response headers.

        The gateway's grant replaces whatever the backend said for this
        origin; other origins never reach this function.
        """
        for name in ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials"):
            headers.popall(name, None)
        expose = [EXPOSE_HEADERS, *headers.popall("Access-Control-Expose-Headers", ())]
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Allow-Credentials"] = "true"
        headers["Access-Control-Expose-Headers"] = ", ".join(expose)
        # Resource Timing hides detailed timings cross-origin unless
        # Timing-Allow-Origin names the page's origin (W3C Resource Timing,
        # "Cross-origin resources").
        headers["Timing-Allow-Origin"] = origin
        headers.add("Vary", "Origin")
