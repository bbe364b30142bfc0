"""Small HTTP helpers shared by the proxy and the reserved endpoints."""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import web

JSON: Final = "application/json"

#: RFC 9110 §9: methods with a standard meaning. Anything else is reported as
#: ``_OTHER`` (HTTP semantic conventions, ``http.request.method``) so a client
#: inventing methods cannot blow up span-name cardinality.
KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def method_attribute(method: str) -> str:
    """``http.request.method``: the method, or ``_OTHER`` for unknown ones."""
    return method if method in KNOWN_METHODS else "_OTHER"


def span_name(method_attr: str) -> str:
    """A span's name from its ``http.request.method`` (``HTTP`` for ``_OTHER``)."""
    return "HTTP" if method_attr == "_OTHER" else method_attr


def ms(ns: int) -> float:
    """Nanoseconds to milliseconds, 3 decimals (what Server-Timing and spans show)."""
    return round(ns / 1e6, 3)


def json_error(status: int, message: str, trace_id: str | None = None) -> web.Response:
    """The gateway's own error answers: ``{"error": …, "trace_id": …}``."""
    body: dict[str, Any] = {"error": message}
    if trace_id is not None:
        body["trace_id"] = trace_id
    return web.Response(status=status, text=json.dumps(body), content_type=JSON)
