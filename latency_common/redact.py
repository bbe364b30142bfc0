"""Secrets out of spans: query values of sensitive keys, and URL credentials.

What it is for: every ``url.full`` and ``url.query`` the gateway exports (its
own spans and the browser spans it builds from beacons) goes through
:class:`QueryRedactor` first. HTTP semantic conventions (``url.query``,
``url.full``): "sensitive content provided in query string SHOULD be
scrubbed", the value replaced by ``REDACTED`` and the key kept, and
credentials in the URL replaced the same way.

Also :meth:`QueryRedactor.span_overrides`, for spans an instrumentation
library records (the demo backend's Flask and requests spans): the URL
attributes above plus any captured ``Authorization``, ``Cookie``,
``Set-Cookie`` or ``Proxy-Authorization`` header, whatever the
``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*`` variables ask.

Not for: bodies (never recorded). The gateway records no header but
``User-Agent`` at all.

Hot path: a query without ``=`` is returned as is, any other costs one split
and a set lookup per parameter, no regex; the key set is built once per
process (``Gateway`` holds the redactor).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final
from urllib.parse import unquote

REDACTED: Final = "REDACTED"

#: Query keys whose values are credentials in common APIs: OAuth 2.0 (RFC 6749
#: §4.1.2 ``code``, RFC 6750 §2.3 ``access_token``), signed URLs (AWS SigV2/V4
#: ``AWSAccessKeyId``/``Signature``/``X-Amz-Signature``/``X-Amz-Credential``,
#: Google ``X-Goog-Signature``, Azure SAS ``sig``) and the usual hand-rolled
#: names. Semantic conventions list ``AWSAccessKeyId``, ``Signature``, ``sig``
#: and ``X-Goog-Signature`` as the minimum. Compared case-insensitively, after
#: percent-decoding, so ``Access%5FToken`` is caught too.
DEFAULT_SENSITIVE_QUERY_KEYS: Final = (
    "access_token",
    "refresh_token",
    "id_token",
    "token",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "key",
    "code",
    "sig",
    "signature",
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "AWSAccessKeyId",
    "X-Goog-Signature",
    "X-Goog-Credential",
)


#: Attributes holding a URL or a request target (HTTP semconv ``url.full``; the
#: older ``http.url`` and ``http.target`` that instrumentations still emit by
#: default) and the query alone (``url.query``).
_URL_ATTRIBUTES: Final = ("url.full", "http.url", "http.target")
_QUERY_ATTRIBUTE: Final = "url.query"

#: Captured header attributes (HTTP semconv ``http.request.header.<key>``,
#: ``http.response.header.<key>``, key lowercased with ``-`` as ``_`` by the
#: Python instrumentations) whose values are credentials: RFC 9110 §11.6.2
#: Authorization, §11.7.2 Proxy-Authorization, RFC 6265 §5.4 Cookie, §4.1
#: Set-Cookie.
SECRET_HEADER_ATTRIBUTES: Final = frozenset(
    f"http.{direction}.header.{name}"
    for direction in ("request", "response")
    for name in ("authorization", "proxy_authorization", "cookie", "set_cookie")
)


class QueryRedactor:
    """Replaces the values of sensitive query keys with ``REDACTED``.

    ``extra_keys`` adds to the default list (``GATEWAY_REDACT_QUERY_PARAMS``).
    The rest of the query is kept byte for byte: same order, same encoding,
    same separators, so a redacted ``url.full`` still reads like the request.
    """

    __slots__ = ("keys",)

    def __init__(self, extra_keys: Iterable[str] = ()) -> None:
        self.keys: frozenset[str] = frozenset(
            key.strip().lower() for key in (*DEFAULT_SENSITIVE_QUERY_KEYS, *extra_keys)
        )

    def query(self, raw_query: str) -> str:
        """A raw query string (no ``?``) with sensitive values redacted."""
        if not raw_query or "=" not in raw_query:
            return raw_query
        parts = raw_query.split("&")
        changed = False
        for i, part in enumerate(parts):
            name, eq, _value = part.partition("=")
            if eq and self._sensitive(name):
                parts[i] = f"{name}={REDACTED}"
                changed = True
        return "&".join(parts) if changed else raw_query

    def url(self, url: str) -> str:
        """A URL string with credentials and sensitive query values redacted,
        and without its fragment: a fragment never reaches a server, and in
        the OAuth 2.0 implicit flow it holds the access token itself (RFC 6749
        §4.2.2)."""
        head = url.partition("#")[0]
        base, question, raw_query = head.partition("?")
        base = _without_credentials(base)
        if question:
            base += "?" + self.query(raw_query)
        return base

    def span_overrides(self, attributes: Mapping[str, object]) -> dict[str, str | tuple[str, ...]]:
        """The attributes of a recorded span that carry a secret, with the
        values to overwrite them with (empty when nothing needs it)."""
        overrides: dict[str, str | tuple[str, ...]] = {}
        for key in _URL_ATTRIBUTES:
            value = attributes.get(key)
            if isinstance(value, str) and (redacted := self.url(value)) != value:
                overrides[key] = redacted
        query = attributes.get(_QUERY_ATTRIBUTE)
        if isinstance(query, str) and (redacted := self.query(query)) != query:
            overrides[_QUERY_ATTRIBUTE] = redacted
        for key in SECRET_HEADER_ATTRIBUTES.intersection(attributes):
            overrides[key] = (REDACTED,)
        return overrides

    def _sensitive(self, name: str) -> bool:
        key = name.lower()
        if "%" in key or "+" in key:
            key = unquote(key.replace("+", " "))
        return key in self.keys


def _without_credentials(base: str) -> str:
    """``scheme://user:pass@host/path`` → ``scheme://REDACTED:REDACTED@host/path``."""
    scheme_end = base.find("://")
    if scheme_end < 0:
        return base
    authority_start = scheme_end + 3
    authority_end = base.find("/", authority_start)
    if authority_end < 0:
        authority_end = len(base)
    at = base.rfind("@", authority_start, authority_end)
    if at < 0:
        return base
    userinfo = base[authority_start:at]
    redacted = f"{REDACTED}:{REDACTED}" if ":" in userinfo else REDACTED
    return base[:authority_start] + redacted + base[at:]
