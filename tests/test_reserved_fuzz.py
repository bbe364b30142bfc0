"""Fuzz every ``/__gateway/`` endpoint of a real gateway process over raw sockets.

No input (clock, beacon, snippet.js/.mjs and their versioned URLs, health,
unknown paths; any method, any headers, any body) may get a 5xx or put a traceback in the log. The
process runs with ``GATEWAY_LOG_LEVEL=debug`` so that nothing is hidden.
Beacon bodies are built around a real token and bind, so the fuzzer reaches
past the signature checks into the number, string and window checks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import __version__
from tests.servers import BackendThread, Process, parse_head, raw_request

KEY = "fuzz-clock-key-0123456789abcdef"
ORIGIN = "http://localhost:3000"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

PATHS = [
    "clock",
    "beacon",
    "snippet.js",
    "snippet.mjs",
    f"snippet-{__version__}.js",
    f"snippet-{__version__}.mjs",
    "snippet-0.0.0.js",
    "health",
    "nope",
    "",
    "beacon/x",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "BREW", "get"]
# RFC 9110 §5.6.2 tchar: any of these makes a valid field name or method.
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# RFC 9110 §5.5 field-vchar and obs-text, and inner spaces.
FIELD_VALUE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=80,
).map(str.strip)
HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            "Origin",
            "Content-Type",
            "traceparent",
            "X-Client-Timestamp",
            "X-Client-Clock",
            "X-Client-Prev",
            "If-None-Match",
            "Access-Control-Request-Method",
            "Access-Control-Request-Headers",
            "X-Forwarded-For",
            "Transfer-Encoding",
        ]
    ),
    st.text(alphabet=TCHAR, min_size=1, max_size=20),
)
HOSTILE: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e20, 1e303, 10**400, -1.0, 0, 2**63, 1.7e12, "1.7e12", "", "\u00e9"]),
    st.text(max_size=40),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@pytest.fixture(scope="module")
def gateway_proc(backend: BackendThread) -> Iterator[Process]:
    env = {
        "GATEWAY_CLOCK_KEY": KEY,
        "GATEWAY_LOG_LEVEL": "debug",
        # Each example comes from its own X-Forwarded-For client, so the
        # per-client beacon rate limit does not stop the fuzzer at 20.
        "GATEWAY_TRUSTED_PROXIES": "1",
        "GATEWAY_ALLOWED_ORIGINS": ORIGIN,
    }
    args = ["--upstream", backend.url, "--port", "0", "--workers", "1"]
    with Process("gateway", args, env) as proc:
        yield proc
        _, stderr = proc.terminate()
    assert "Traceback" not in stderr, stderr[-4000:]


@pytest.fixture(scope="module")
def bound_entry(gateway_proc: Process) -> dict[str, Any]:
    """A beacon entry with a real token and bind from a proxied response."""
    head = (
        f"GET /api/activities/home HTTP/1.1\r\nHost: x\r\ntraceparent: {TRACEPARENT}\r\n"
        "X-Client-Timestamp: 1764000000000\r\nConnection: close\r\n\r\n"
    )
    status, headers, _ = parse_head(raw_request(gateway_proc.port, head.encode()))
    assert status == 200
    clock = dict(headers)["X-Gateway-Clock"]
    tok = re.search(r'tok="([^"]+)"', clock)
    bind = re.search(r'bind="([^"]+)"', clock)
    assert tok is not None, clock
    assert bind is not None, clock
    return {
        "tp": TRACEPARENT,
        "m": "GET",
        "u": "http://127.0.0.1/api/activities/home",
        "tok": tok.group(1),
        "b": bind.group(1),
        "off": 0,
        "marks": {"startTime": 1764000000000, "responseEnd": 1764000000050},
    }


@st.composite
def beacon_bodies(draw: st.DrawFn, entry: dict[str, Any]) -> bytes:
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        value = draw(
            st.recursive(
                HOSTILE,
                lambda c: (
                    st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=4)
                ),
                max_leaves=12,
            )
        )
        return json.dumps(value).encode()
    mutated = json.loads(json.dumps(entry))
    marks = ["startTime", "requestStart", "responseStart", "responseEnd"]
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from([*entry, "marks", "all_marks", "tok_char"]))
        if field == "marks":
            mutated["marks"][draw(st.sampled_from(marks))] = draw(HOSTILE)
        elif field == "all_marks":  # in order, so only the values are wrong
            value = draw(HOSTILE)
            mutated["marks"] = dict.fromkeys(marks, value)
        elif field == "tok_char":  # a real token with one character changed
            # An earlier draw may have made tok "" or a non-string: change the real one then.
            tok = (
                mutated["tok"]
                if isinstance(mutated["tok"], str) and mutated["tok"]
                else entry["tok"]
            )
            i = draw(st.integers(0, len(tok) - 1))
            mutated["tok"] = tok[:i] + draw(st.characters()) + tok[i + 1 :]
        else:
            mutated[field] = draw(HOSTILE)
    count = draw(st.integers(1, 3))
    return json.dumps({"v": 1, "e": [mutated] * count}).encode()


@st.composite
def requests(draw: st.DrawFn, entry: dict[str, Any]) -> bytes:
    method = draw(
        st.one_of(st.sampled_from(METHODS), st.text(alphabet=TCHAR, min_size=1, max_size=12))
    )
    path = "/__gateway/" + draw(
        st.one_of(st.sampled_from(PATHS), st.text(alphabet=TCHAR.replace("#", ""), max_size=20))
    )
    if draw(st.booleans()):
        path += "?" + draw(st.text(alphabet=TCHAR.replace("#", "") + "=&", max_size=30))
    headers = draw(st.lists(st.tuples(HEADER_NAMES, FIELD_VALUE), max_size=6))
    headers = [
        (k, v)
        for k, v in headers
        if k.lower() not in ("transfer-encoding", "content-length", "host", "connection")
    ]
    if draw(st.booleans()):
        headers.append(("Origin", ORIGIN))
    client = draw(st.integers(0, 2**32 - 1))
    headers.append(
        ("X-Forwarded-For", f"10.{client >> 16 & 255}.{client >> 8 & 255}.{client & 255}")
    )
    body = draw(beacon_bodies(entry)) if draw(st.booleans()) else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: gw.test\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode("latin-1") + body


@given(data=st.data())
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_no_input_to_the_reserved_prefix_gets_a_5xx_or_a_traceback(
    gateway_proc: Process, bound_entry: dict[str, Any], data: st.DataObject
) -> None:
    request = data.draw(requests(bound_entry))
    response = raw_request(gateway_proc.port, request, timeout_s=10)
    assert response, request[:300]
    status, _, _ = parse_head(response)
    assert status < 500, (status, request[:300], response[:300])
    assert "Traceback" not in gateway_proc.stderr_text(), gateway_proc.stderr_text()[-4000:]


@given(data=st.data())
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_no_beacon_body_gets_a_5xx_or_a_traceback(
    gateway_proc: Process, bound_entry: dict[str, Any], data: st.DataObject
) -> None:
    """The beacon is where hostile values go deepest: every example is an
    allowed-origin POST, most of them around the real token and bind."""
    body = data.draw(beacon_bodies(bound_entry))
    client = data.draw(st.integers(0, 2**24 - 1))
    head = (
        f"POST /__gateway/beacon HTTP/1.1\r\nHost: x\r\nOrigin: {ORIGIN}\r\n"
        f"X-Forwarded-For: 11.{client >> 16 & 255}.{client >> 8 & 255}.{client & 255}\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    response = raw_request(gateway_proc.port, head.encode() + body, timeout_s=10)
    status, _, payload = parse_head(response)
    assert status in (202, 400, 413, 429), (status, body[:300], payload[:300])
    assert "Traceback" not in gateway_proc.stderr_text(), gateway_proc.stderr_text()[-4000:]


def test_the_bound_entry_itself_reaches_the_window_check(
    gateway_proc: Process, bound_entry: dict[str, Any]
) -> None:
    """The fuzzer's seed passes every signature check: its drops are about
    the values, so the fuzzer does reach the number and window checks."""
    body = json.dumps({"v": 1, "e": [bound_entry]}).encode()
    head = (
        f"POST /__gateway/beacon HTTP/1.1\r\nHost: x\r\nOrigin: {ORIGIN}\r\n"
        f"X-Forwarded-For: 10.255.255.254\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    status, _, payload = parse_head(raw_request(gateway_proc.port, head.encode() + body))
    assert status == 202
    assert json.loads(payload) == {"accepted": 0, "dropped": {"window": 1}}


@pytest.mark.parametrize(
    "expect", [b"100-continue", b"x\x80\xff", b"bogus", b"\xed\xa0\x80-continue"]
)
def test_any_expect_on_the_reserved_prefix_is_answered_without_a_traceback(
    gateway_proc: Process, expect: bytes
) -> None:
    for path in (b"/__gateway/health", b"/__gateway/beacon", b"/__gateway/nope"):
        request = (
            b"POST "
            + path
            + b" HTTP/1.1\r\nHost: x\r\nExpect: "
            + expect
            + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        data = raw_request(gateway_proc.port, request)
        status = int(data.split(b" ", 2)[1]) if data else 0
        assert 0 < status < 500, data[:300]
