"""The CORS decisions of ``gateway/cors.py`` as pure functions: which origins
are allowed, which preflights the gateway answers itself, and which headers it
adds to a backend's answer (Fetch standard §3.2 "CORS protocol"). The same
rules over real sockets live in test_proxy.py and test_hardening.py; these run
in milliseconds, so ``make mutate`` can afford them for every mutant."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.cors import ALLOW_HEADERS, MAX_AGE_S, Cors, OriginPattern, parse_entry

PAGE = "https://app.example.com"
PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


def _request(method: str = "GET", headers: list[tuple[str, str]] | None = None) -> web.Request:
    return make_mocked_request(method, "/api/x", headers=CIMultiDict(headers or []))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        # RFC 6454 §6.1: the browser serialises scheme and host in lower case,
        # without the default port.
        ("http://localhost:3000", "http://localhost:3000"),
        ("https://App.Example.com", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://app.example.com:80", "http://app.example.com"),
        ("http://app.example.com:443", "http://app.example.com:443"),
        ("https://app.example.com/", None),
        ("https://app.example.com/path", None),
        ("https://app.example.com?q=1", None),
        ("https://app.example.com#f", None),
        ("https://user@app.example.com", None),
        ("ftp://app.example.com", None),
        ("app.example.com", None),
        ("http://[::1", None),
        ("https://", None),
    ],
)
def test_entries_are_origins_as_a_browser_sends_them(entry: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="must be origins like http://localhost:3000"):
            parse_entry(entry)
    else:
        assert parse_entry(entry) == expected


def test_an_ipv6_origin_keeps_its_brackets() -> None:
    assert parse_entry("http://[::1]:8080") == "http://[::1]:8080"


@pytest.mark.parametrize(
    ("entry", "prefix", "suffix"),
    [
        ("https://*.example.com", "https://", ".example.com"),
        ("https://*.example.com:8443", "https://", ".example.com:8443"),
        ("https://*.example.com:443", "https://", ".example.com"),
        ("http://*.a.b.example.com", "http://", ".a.b.example.com"),
    ],
)
def test_patterns_keep_their_scheme_and_port(entry: str, prefix: str, suffix: str) -> None:
    assert parse_entry(entry) == OriginPattern(prefix=prefix, suffix=suffix)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("https://*.com", "at least two more labels"),
        ("https://a.*.example.com", "'*' as the whole first label"),
        ("https://*x.example.com", "'*' as the whole first label"),
        ("https://*.*.example.com", "'*' as the whole first label"),
        ("https://*.exa_mple.com", "must be origins like"),
        ("https://*.-example.com", "must be origins like"),
    ],
)
def test_bad_patterns_are_refused_with_what_would_be_accepted(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_entry(entry)
    assert repr(entry) in str(caught.value)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://a.example.com", True),
        ("https://a-b.example.com", True),
        ("https://" + "a" * 63 + ".example.com", True),
        ("https://" + "a" * 64 + ".example.com", False),
        ("https://example.com", False),
        ("https://.example.com", False),
        ("https://a.b.example.com", False),
        ("https://evilexample.com", False),
        ("https://-a.example.com", False),
        ("https://a-.example.com", False),
        ("https://A.example.com", False),  # browsers send lower case
        ("http://a.example.com", False),
        ("https://a.example.com:8443", False),
        ("https://a.example.com.evil", False),
    ],
)
def test_a_pattern_stands_for_exactly_one_label(origin: str, allowed: bool) -> None:
    # RFC 6125 §6.4.3: the wildcard is one whole label, as TLS wildcards are.
    cors = Cors(("https://*.example.com",))
    request = _request(headers=[("Origin", origin)])
    assert cors.origin(request) == (origin if allowed else None)


def test_exact_origins_and_patterns_are_both_honoured() -> None:
    cors = Cors(("http://localhost:3000", "https://*.example.com"))
    assert cors.exact == frozenset({"http://localhost:3000"})
    for origin, expected in [
        ("http://localhost:3000", "http://localhost:3000"),
        ("https://x.example.com", "https://x.example.com"),
        ("http://localhost:3001", None),
    ]:
        assert cors.origin(_request(headers=[("Origin", origin)])) == expected
    assert cors.origin(_request()) is None


def test_describe_lists_what_the_start_up_log_shows() -> None:
    assert Cors(()).describe() == "none: same-origin pages only"
    cors = Cors(("https://b.example", "http://a.example", "https://*.example.com"))
    assert cors.describe() == "http://a.example, https://b.example, https://*.example.com"
    assert Cors(("https://*.example.com",)).describe() == "https://*.example.com"


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        # Fetch standard §3.2.2: OPTIONS with Access-Control-Request-Method.
        ("OPTIONS", [("Access-Control-Request-Method", "GET")], True),
        ("OPTIONS", [], False),
        ("GET", [("Access-Control-Request-Method", "GET")], False),
    ],
)
def test_a_preflight_is_options_with_a_request_method(
    method: str, headers: list[tuple[str, str]], expected: bool
) -> None:
    assert Cors.is_preflight(_request(method, headers)) is expected


@pytest.mark.parametrize(
    ("method", "requested", "ours"),
    [
        ("GET", ["traceparent"], True),
        ("POST", ["traceparent, X-Client-Timestamp", "x-client-clock,x-client-prev"], True),
        ("HEAD", ["tracestate"], True),
        ("PUT", ["traceparent"], False),  # not safelisted: the backend must consent
        ("GET", [], False),
        ("GET", [" , "], False),
        ("GET", ["traceparent, content-type"], False),  # safelisted name, unsafe value
        ("GET", ["traceparent", "x-custom"], False),
    ],
)
def test_only_preflights_our_headers_alone_caused_are_ours(
    method: str, requested: list[str], ours: bool
) -> None:
    headers = [("Access-Control-Request-Method", method)]
    headers += [("Access-Control-Request-Headers", value) for value in requested]
    assert Cors.caused_by_us(_request("OPTIONS", headers)) is ours


def test_our_preflight_answer_grants_our_headers_for_ten_minutes() -> None:
    request = _request(
        "OPTIONS",
        [
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "tracestate"),
        ],
    )
    response = Cors.preflight(request, PAGE)
    assert response.status == 204
    assert dict(response.headers) | {"Content-Type": ""} == {
        "Access-Control-Allow-Origin": PAGE,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Methods": "POST",
        "Access-Control-Allow-Headers": (
            "traceparent, tracestate, x-client-timestamp, x-client-clock, x-client-prev"
        ),
        "Access-Control-Max-Age": "600",
        "Vary": PREFLIGHT_VARY,
        "Content-Type": "",
    }
    assert MAX_AGE_S == 600
    assert response.headers["Access-Control-Allow-Headers"] == ALLOW_HEADERS


def test_own_preflight_grants_no_credentials() -> None:
    response = Cors.own_preflight(PAGE)
    assert response.status == 204
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert response.headers["Access-Control-Allow-Methods"] == "GET, HEAD, POST"
    assert response.headers["Access-Control-Allow-Headers"] == ALLOW_HEADERS
    assert response.headers["Access-Control-Max-Age"] == "600"
    assert response.headers["Vary"] == PREFLIGHT_VARY


def test_grant_own_exposes_our_headers_and_timing_and_varies_on_origin() -> None:
    headers = CIMultiDict([("Access-Control-Expose-Headers", "X-Own, server-timing")])
    Cors.grant_own(headers, PAGE)
    assert headers.getall("Access-Control-Allow-Origin") == [PAGE]
    assert headers.getall("Access-Control-Expose-Headers") == [
        "X-Own, server-timing, X-Gateway-Clock"
    ]
    assert headers.getall("Timing-Allow-Origin") == [PAGE]
    assert headers.getall("Vary") == ["Origin"]


@pytest.mark.parametrize(
    ("vary", "expected"),
    [
        # RFC 9110 §12.5.5: caches must key on Origin, once.
        ([], ["Origin"]),
        (["Accept-Encoding"], ["Accept-Encoding", "Origin"]),
        (["accept-encoding, origin"], ["accept-encoding, origin"]),
        (["Accept", "ORIGIN"], ["Accept", "ORIGIN"]),
    ],
)
def test_vary_names_origin_exactly_once(vary: list[str], expected: list[str]) -> None:
    headers = CIMultiDict([("Access-Control-Allow-Origin", PAGE)] + [("Vary", v) for v in vary])
    Cors.expose(headers, PAGE)
    assert headers.getall("Vary") == expected


@pytest.mark.parametrize(
    ("granted", "expected"),
    [
        # Fetch standard, "CORS check": exactly one Allow-Origin, the origin or "*".
        ([PAGE], True),
        ([f" {PAGE} "], True),
        (["*"], True),
        ([], False),
        ([PAGE, PAGE], False),
        (["https://other.example.com"], False),
        ([PAGE + "/"], False),
    ],
)
def test_backend_granted_follows_the_cors_check(granted: list[str], expected: bool) -> None:
    headers = CIMultiDict([("Access-Control-Allow-Origin", value) for value in granted])
    assert Cors.backend_granted(headers, PAGE) is expected


def test_expose_leaves_a_response_the_backend_did_not_grant_untouched() -> None:
    headers = CIMultiDict([("Access-Control-Allow-Origin", "https://other.example.com")])
    Cors.expose(headers, PAGE)
    assert list(headers.items()) == [("Access-Control-Allow-Origin", "https://other.example.com")]


def test_expose_adds_our_headers_and_timing_but_never_credentials() -> None:
    headers = CIMultiDict(
        [
            ("Access-Control-Allow-Origin", PAGE),
            ("Access-Control-Expose-Headers", "X-Total, x-gateway-clock"),
            ("Access-Control-Expose-Headers", "ETag"),
        ]
    )
    Cors.expose(headers, PAGE)
    assert headers.getall("Access-Control-Allow-Origin") == [PAGE]
    assert "Access-Control-Allow-Credentials" not in headers
    assert headers.getall("Access-Control-Expose-Headers") == [
        "X-Total, x-gateway-clock, ETag, Server-Timing"
    ]
    # W3C Resource Timing §4.5: the page's origin must be named to see timings.
    assert headers.getall("Timing-Allow-Origin") == [PAGE]


def test_expose_appends_the_origin_to_the_backends_timing_allow_origin() -> None:
    headers = CIMultiDict(
        [("Access-Control-Allow-Origin", "*"), ("Timing-Allow-Origin", "https://cdn.example")]
    )
    Cors.expose(headers, PAGE)
    assert headers.getall("Timing-Allow-Origin") == [f"https://cdn.example, {PAGE}"]
    headers = CIMultiDict([("Access-Control-Allow-Origin", "*"), ("Timing-Allow-Origin", PAGE)])
    Cors.expose(headers, PAGE)
    assert headers.getall("Timing-Allow-Origin") == [PAGE]


def test_merge_preflight_adds_our_names_to_a_granted_answer_only() -> None:
    headers = CIMultiDict(
        [
            ("Access-Control-Allow-Origin", PAGE),
            ("Access-Control-Allow-Headers", "Content-Type, TRACEPARENT"),
        ]
    )
    Cors.merge_preflight(headers, PAGE)
    assert headers.getall("Access-Control-Allow-Headers") == [
        "Content-Type, TRACEPARENT, tracestate, x-client-timestamp, x-client-clock, x-client-prev"
    ]
    refused = CIMultiDict([("Access-Control-Allow-Headers", "Content-Type")])
    Cors.merge_preflight(refused, PAGE)
    assert list(refused.items()) == [("Access-Control-Allow-Headers", "Content-Type")]


def test_merge_preflight_leaves_a_wildcard_grant_alone() -> None:
    # Fetch standard: "*" in Allow-Headers already grants every name (without credentials).
    headers = CIMultiDict(
        [("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Headers", "x-a, *")]
    )
    Cors.merge_preflight(headers, PAGE)
    assert headers.getall("Access-Control-Allow-Headers") == ["x-a, *"]


def test_the_browser_pattern_gives_the_same_verdicts_as_the_gateway() -> None:
    """The allow-list the gateway writes into the snippet it serves: one
    anchored pattern, exact origins escaped, ``*`` one DNS label."""
    import re

    cors = Cors(("https://b.example", "http://a.example:8080", "https://*.example.com"))
    pattern = cors.browser_pattern()
    assert pattern is not None
    assert pattern.startswith("^(?:http://a\\.example:8080|https://b\\.example|https://")
    assert pattern.endswith("\\.example\\.com)$")
    for origin in [
        "https://b.example",
        "http://a.example:8080",
        "https://app.example.com",
        "https://x.example",
        "http://a.example",
        "https://a.b.example.com",
        "https://.example.com",
        "https://b.example.evil",
        "xhttps://b.example",
        "https://bxexample",
    ]:
        assert bool(re.fullmatch(pattern, origin)) == bool(re.search(pattern, origin))
        request = make_mocked_request("GET", "/", headers={"Origin": origin})
        assert bool(re.search(pattern, origin)) == (cors.origin(request) is not None), origin
    assert Cors(()).browser_pattern() is None
    assert Cors(("https://*.example.com",)).browser_pattern() is not None
