"""Small HTTP helpers shared by the proxy and the reserved endpoints."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
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


#: RFC 9110 §5.6.2: a token (a content coding, ``identity`` or ``*``).
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: RFC 9110 §12.4.2: ``weight = OWS ";" OWS "q=" qvalue``, the ``q`` in any case.
_WEIGHT: Final = re.compile(r"[qQ]=(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)")


def accepts_gzip(fields: Iterable[str]) -> bool:
    """Whether to send the gzip coding to a request with these
    ``Accept-Encoding`` field lines (RFC 9110 §12.5.3), rather than identity.

    Yes when ``gzip`` (or ``x-gzip``, RFC 9110 §8.4.1.3), else ``*``, has a
    weight above 0 and at least that of ``identity`` (else ``*``). No header
    at all: identity, though the RFC lets any coding go, as the client said
    nothing about what it decodes. A malformed member is ignored, never an
    error: ``gzip;q=2`` or ``gzip;foo`` asks nothing. ``identity;q=0`` with
    gzip refused too gets identity anyway (RFC 9110 §12.1: a server may send
    a representation that does not conform rather than a 406)."""
    weights: dict[str, float] = {}
    for line in fields:
        for member in line.split(","):
            coding, *params = member.split(";")
            coding = coding.strip(" \t").lower()
            if not _TOKEN.fullmatch(coding) or len(params) > 1:
                continue  # empty list members are allowed (RFC 9110 §5.6.1)
            weight = 1.0
            if params:
                match = _WEIGHT.fullmatch(params[0].strip(" \t"))
                if match is None:
                    continue
                weight = float(match.group(1))
            weights.setdefault("gzip" if coding == "x-gzip" else coding, weight)
    gzip_q = weights.get("gzip", weights.get("*", 0.0))
    identity_q = weights.get("identity", weights.get("*", 0.0))
    return gzip_q > 0 and gzip_q >= identity_q


def none_match(field: str, etag: str) -> bool:
    """Whether ``If-None-Match`` holds ``etag`` (RFC 9110 §13.1.2): ``*``,
    or a listed tag equal by the weak comparison (``W/`` ignored, §8.8.3.2),
    which caches that weaken a tag when they recompress rely on."""
    for tag in field.split(","):
        tag = tag.strip(" \t")
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False
