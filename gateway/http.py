"""Small HTTP helpers shared by the proxy and the reserved endpoints."""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import web

JSON: Final = "application/json"


def ms(ns: int) -> float:
    """Nanoseconds to milliseconds, 3 decimals (what Server-Timing and spans show)."""
    return round(ns / 1e6, 3)


def json_error(status: int, message: str, trace_id: str | None = None) -> web.Response:
    """The gateway's own error answers: ``{"error": …, "trace_id": …}``."""
    body: dict[str, Any] = {"error": message}
    if trace_id is not None:
        body["trace_id"] = trace_id
    return web.Response(status=status, text=json.dumps(body), content_type=JSON)
