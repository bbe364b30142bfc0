"""W3C Trace Context Level 2 conformance, end to end, on real sockets.

Driven the way the W3C test suite (``test/test.py`` of w3c/trace-context)
drives a service: a harness server on 127.0.0.1 records the callbacks it
receives; each case sends ``POST /api/trace-context-test`` THROUGH THE
GATEWAY with the case's ``traceparent``/``tracestate`` header fields and a
body asking the backend to call the harness back. The backend (instrumented
Flask + instrumented ``requests``) makes that call, so the callback carries
what the whole chain propagated: the gateway's policy, OTel's traceparent
parser and our Level 2 tracestate parser on the way in, the backend's OTel
(with the same tracestate rules) on the way out. Requests are written as raw bytes
so that header case, repeats and optional whitespace reach the gateway
exactly as the case says (aiohttp's client strips OWS).

Each case asserts what the W3C suite asserts about the callback (exactly one
valid ``traceparent``; the same trace id and a different parent id when the
input was valid; a new trace id when it was not) and, stricter than the suite,
the exact ``tracestate`` the callback carried. Ids name the suite's test (or
``level2_*`` for rules the suite does not cover) and each case quotes the
section of https://www.w3.org/TR/trace-context-2/ it checks.

All 41 tests of the suite (``TraceContextTest``, ``AdvancedTest`` and
Level 2's ``TraceContext2Test``) pass: ``SUITE_TESTS`` lists them and
``test_every_suite_test_is_represented`` checks each has a case here. The
backend runs with the propagator its entry points install
(``latency_common.tracestate.global_propagator``), so the Level 2 ``tracestate``
rules hold on both hops.

Also checked: the span shape of continue, link and restart; the Level 2
random flag in each mode (injected upstream and in Server-Timing); and
hypothesis-generated tracestate lines, valid and hostile, through the chain.

The official suite runs against a live stack the same way: start
``python -m backend --enable-test-callback`` and ``python -m gateway``, then
``STRICT_LEVEL=2 SPEC_LEVEL=2 python test/test.py
http://127.0.0.1:8080/api/trace-context-test`` from a w3c/trace-context
checkout (README, "W3C Trace Context conformance").
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.propagate import get_global_textmap, set_global_textmap
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from yarl import URL

from latency_common import tracestate
from tests.conftest import GatewayFactory, Traced
from tests.otlp_receiver import OtlpReceiver
from tests.servers import BackendThread, Process, parse_head, raw_request

TRACE_ID = "12345678901234567890123456789012"
PARENT_ID = "1234567890123456"
TP00 = f"00-{TRACE_ID}-{PARENT_ID}-00"
TP01 = f"00-{TRACE_ID}-{PARENT_ID}-01"
ROUTE = "/api/trace-context-test"
DEADLINE_S = 10.0

Headers = list[tuple[str, str]]
Members = list[tuple[str, str]]


@pytest.fixture(scope="module", autouse=True)
def backend_propagator() -> Iterator[None]:
    """The global propagator ``python -m backend`` and ``backend.wsgi``
    install; the in-process backend's instrumentations read it per request."""
    before = get_global_textmap()
    set_global_textmap(tracestate.global_propagator())
    try:
        yield
    finally:
        set_global_textmap(before)


# -- the harness: records the backend's callbacks ----------------------------------


@dataclass
class Callback:
    path: str
    headers: Headers
    body: bytes


class Harness:
    """What the W3C suite's ``server.py`` does: answer and remember callbacks."""

    def __init__(self) -> None:
        self.url = ""
        self.callbacks: list[Callback] = []

    async def handle(self, request: web.Request) -> web.Response:
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        self.callbacks.append(Callback(request.path, raw, await request.read()))
        return web.Response(status=200)

    def take(self) -> list[Callback]:
        taken, self.callbacks = self.callbacks, []
        return taken


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    recorder = Harness()
    app = web.Application()
    app.router.add_post("/callback/{n}", recorder.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    recorder.url = str(server.make_url("")).rstrip("/")
    try:
        yield recorder
    finally:
        await server.close()


async def send(base: str, headers: Headers, body: bytes) -> tuple[int, Headers, bytes]:
    """POST to the gateway with these header fields byte for byte."""
    url = URL(base)
    assert url.port is not None
    head = [
        f"POST {ROUTE} HTTP/1.1",
        f"Host: 127.0.0.1:{url.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    # A blocking socket in a thread: the event loop keeps serving the
    # gateway and the harness meanwhile.
    raw = await asyncio.to_thread(raw_request, url.port, data, timeout_s=DEADLINE_S)
    return parse_head(raw)


async def through_gateway(
    base: str, harness: Harness, headers: Headers, count: int = 1
) -> list[Callback]:
    """Send a case and return the callbacks the backend made, in order."""
    callbacks, _ = await through_gateway_with_response(base, harness, headers, count)
    return callbacks


async def through_gateway_with_response(
    base: str, harness: Harness, headers: Headers, count: int = 1
) -> tuple[list[Callback], Headers]:
    """``through_gateway``, plus the gateway's response header fields."""
    paths = [f"/callback/{n}" for n in range(count)]
    body = json.dumps([{"url": harness.url + p, "arguments": []} for p in paths]).encode()
    status, response_headers, response_body = await send(base, headers, body)
    assert status == 200, response_body
    # The backend makes its callbacks before it answers: they are all in.
    callbacks = harness.take()
    assert [c.path for c in callbacks] == paths, "the backend did not call the harness back"
    assert all(json.loads(c.body) == [] for c in callbacks)
    return callbacks, response_headers


# -- what the callback carried (an oracle independent of OTel) -----------------------

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# Level 2 §3.3.2.2.1 key and §3.3.2.2.2 value grammar.
_MEMBER = re.compile(
    r"([a-z0-9][a-z0-9_\-*/@]{0,255})=([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e])"
)


@dataclass(frozen=True)
class Propagated:
    trace_id: str
    parent_id: str
    flags: int
    tracestate: Members


def propagated(callback: Callback) -> Propagated:
    """The callback's context, checked as the W3C harness checks it: exactly
    one ``traceparent`` in the version-00 format with non-zero ids, and a
    ``tracestate`` (all its fields combined) that is a valid list."""
    parents = [v for k, v in callback.headers if k.lower() == "traceparent"]
    assert len(parents) == 1, f"expected one traceparent, got {parents!r}"
    match = _TRACEPARENT.fullmatch(parents[0])
    assert match, f"callback traceparent {parents[0]!r} is not version 00"
    trace_id, parent_id, flags = match.groups()
    assert trace_id != "0" * 32
    assert parent_id != "0" * 16
    assert int(flags, 16) & ~0x03 == 0, "§3.2.2.5.3: undefined flags MUST be zero"
    combined = ",".join(v for k, v in callback.headers if k.lower() == "tracestate")
    members: Members = []
    for member in re.split(r"[ \t]*,[ \t]*", combined.strip(" \t")):
        if member:
            found = _MEMBER.fullmatch(member)
            assert found, f"callback tracestate member {member!r} is not valid"
            members.append((found.group(1), found.group(2)))
    assert len(members) <= 32
    assert len({k for k, _ in members}) == len(members), "duplicate tracestate keys"
    return Propagated(trace_id, parent_id, int(flags, 16), members)


# -- the cases ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One W3C rule: send ``headers``; expect the trace to be continued (same
    trace id, a new parent id, ``tracestate`` exactly as listed, ``flags``
    when given) or restarted (a trace id found in none of the sent values,
    no tracestate)."""

    name: str
    rule: str
    headers: Headers
    continues: bool
    tracestate: Members = field(default_factory=list)
    flags: int | None = None

    def param(self) -> object:
        return pytest.param(self, id=self.name)


def cont(name: str, rule: str, headers: Headers, tracestate: Members | None = None) -> Case:
    return Case(name, rule, headers, True, tracestate or [])


def restart(name: str, rule: str, headers: Headers) -> Case:
    return Case(name, rule, headers, False)


def tp(value: str, *tracestate: str) -> Headers:
    return [("traceparent", value), *(("tracestate", t) for t in tracestate)]


ALLOWED_KEY = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
ALLOWED_VALUE = (
    "".join(map(chr, range(0x20, 0x2C)))
    + "".join(map(chr, range(0x2D, 0x3D)))
    + "".join(map(chr, range(0x3E, 0x7F)))
)
BARS = [(f"bar{i:02d}", f"{i:02d}") for i in range(1, 34)]


def joined(members: Members) -> str:
    return ",".join(f"{k}={v}" for k, v in members)


SHORT_32 = [(f"k{i:02d}", "v" * 15) for i in range(32)]  # 19 chars each
MIXED = [("a", "1"), ("long1", "x" * 250), ("b", "2"), ("long2", "y" * 250), ("c", "3")]  # 525

TRACEPARENT_CASES = [
    restart("test_both_traceparent_and_tracestate_missing", "4.2 no traceparent", []),
    cont("test_traceparent_included_tracestate_missing", "4.3 valid traceparent", tp(TP01)),
    restart(
        "test_traceparent_duplicated",
        "3.2 two fields combine (RFC 9110 5.3) into no valid traceparent",
        [("traceparent", f"00-{TRACE_ID[:-1]}1-{PARENT_ID}-01"), ("traceparent", TP01)],
    ),
    restart("test_traceparent_header_name-1", "3.2.1 header name", [("trace-parent", TP01)]),
    restart("test_traceparent_header_name-2", "3.2.1 header name", [("trace.parent", TP01)]),
    cont("test_traceparent_header_name_valid_casing-1", "3.2.1 any case", [("TraceParent", TP01)]),
    cont("test_traceparent_header_name_valid_casing-2", "3.2.1 any case", [("TrAcEpArEnT", TP01)]),
    cont("test_traceparent_header_name_valid_casing-3", "3.2.1 any case", [("TRACEPARENT", TP01)]),
    restart("test_traceparent_version_0x00-1", "3.2.2.2 version 00 format", tp(TP01 + ".")),
    restart(
        "test_traceparent_version_0x00-2",
        "3.2.2.2 version 00 has four fields",
        tp(TP01 + "-what-the-future-will-be-like"),
    ),
    cont("test_traceparent_version_0xcc-1", "3.2.4 higher version", tp(f"cc-{TP01[3:]}")),
    cont(
        "test_traceparent_version_0xcc-2",
        "3.2.4 higher version, unknown fields ignored",
        tp(f"cc-{TP01[3:]}-what-the-future-will-be-like"),
    ),
    restart(
        "test_traceparent_version_0xcc-3",
        "3.2.4 flags followed by a dash or the end",
        tp(f"cc-{TP01[3:]}.what-the-future-will-be-like"),
    ),
    restart("test_traceparent_version_0xff", "3.2.2.1 version ff invalid", tp(f"ff-{TP01[3:]}")),
    restart("test_traceparent_version_illegal_characters-1", "3.2.4", tp(f".0-{TP01[3:]}")),
    restart("test_traceparent_version_illegal_characters-2", "3.2.4", tp(f"0.-{TP01[3:]}")),
    restart("test_traceparent_version_too_long-1", "3.2.4", tp(f"000-{TP01[3:]}")),
    restart("test_traceparent_version_too_long-2", "3.2.4", tp(f"0000-{TP01[3:]}")),
    restart("test_traceparent_version_too_short", "3.2.4", tp(f"0-{TP01[3:]}")),
    restart(
        "test_traceparent_trace_id_all_zero",
        "3.2.2.3 all zeros invalid",
        tp(f"00-{'0' * 32}-{PARENT_ID}-01"),
    ),
    restart(
        "test_traceparent_trace_id_illegal_characters-1",
        "3.2.2.3",
        tp(f"00-.{TRACE_ID[1:]}-{PARENT_ID}-01"),
    ),
    restart(
        "test_traceparent_trace_id_illegal_characters-2",
        "3.2.2.3",
        tp(f"00-{TRACE_ID[:-1]}.-{PARENT_ID}-01"),
    ),
    restart("test_traceparent_trace_id_too_long", "3.2.2.3", tp(f"00-{TRACE_ID}3-{PARENT_ID}-01")),
    restart(
        "test_traceparent_trace_id_too_short", "3.2.2.3", tp(f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01")
    ),
    restart(
        "test_traceparent_parent_id_all_zero",
        "3.2.2.4 all zeros invalid",
        tp(f"00-{TRACE_ID}-{'0' * 16}-01"),
    ),
    restart(
        "test_traceparent_parent_id_illegal_characters-1",
        "3.2.2.4",
        tp(f"00-{TRACE_ID}-.{PARENT_ID[1:]}-01"),
    ),
    restart(
        "test_traceparent_parent_id_illegal_characters-2",
        "3.2.2.4",
        tp(f"00-{TRACE_ID}-{PARENT_ID[:-1]}.-01"),
    ),
    restart("test_traceparent_parent_id_too_long", "3.2.2.4", tp(f"00-{TRACE_ID}-{PARENT_ID}7-01")),
    restart(
        "test_traceparent_parent_id_too_short", "3.2.2.4", tp(f"00-{TRACE_ID}-{PARENT_ID[:-1]}-01")
    ),
    restart("test_traceparent_trace_flags_illegal_characters-1", "3.2.2.5", tp(TP01[:-2] + ".0")),
    restart("test_traceparent_trace_flags_illegal_characters-2", "3.2.2.5", tp(TP01[:-2] + "0.")),
    restart("test_traceparent_trace_flags_too_long", "3.2.2.5", tp(TP01[:-2] + "001")),
    restart("test_traceparent_trace_flags_too_short", "3.2.2.5", tp(TP01[:-2] + "1")),
    cont("test_traceparent_ows_handling-1", "RFC 9110 5.5 OWS", tp(" " + TP01)),
    cont("test_traceparent_ows_handling-2", "RFC 9110 5.5 OWS", tp("\t" + TP01)),
    cont("test_traceparent_ows_handling-3", "RFC 9110 5.5 OWS", tp(TP01 + " ")),
    cont("test_traceparent_ows_handling-4", "RFC 9110 5.5 OWS", tp(TP01 + "\t")),
    cont("test_traceparent_ows_handling-5", "RFC 9110 5.5 OWS", tp("\t " + TP01 + " \t")),
    # Rules of Level 2 the suite does not exercise.
    restart(
        "level2_trace_id_uppercase_hex",
        "3.2.2.2 trace-id = 32HEXDIGLC",
        tp(f"00-{TRACE_ID[:-1]}A-{PARENT_ID}-01"),
    ),
    restart(
        "level2_parent_id_uppercase_hex",
        "3.2.2.2 parent-id = 16HEXDIGLC",
        tp(f"00-{TRACE_ID}-{PARENT_ID[:-1]}A-01"),
    ),
    restart(
        "level2_trace_flags_uppercase_hex", "3.2.2.2 trace-flags = 2HEXDIGLC", tp(TP01[:-2] + "0A")
    ),
    restart(
        "level2_invalid_traceparent_drops_tracestate",
        "3.3 MUST NOT parse tracestate when traceparent failed",
        tp(f"00-{'0' * 32}-{PARENT_ID}-01", "foo=1"),
    ),
]

FLAG_CASES = [
    # The gateway's sampler decides (always_on, README "Trace context"), so the sampled bit
    # is set whatever came in; the random bit belongs to the trace-id.
    Case(
        "level2_random_flag_unset_stays_unset",
        "3.2.2.5.2 unset in, MUST be unset out for the same trace-id",
        tp(TP00),
        True,
        flags=0x01,
    ),
    Case(
        "test_propagates_random_flag",
        "3.2.2.5.2 random-trace-id flag: kept for the same trace-id",
        tp(TP01[:-2] + "02"),
        True,
        flags=0x03,
    ),
    Case(
        "level2_other_flags_are_zeroed",
        "3.2.2.5.3 other flags: vendors MUST set those to zero",
        tp(TP01[:-2] + "ff"),
        True,
        flags=0x03,
    ),
    Case(
        "level2_future_version_flags_parsed",
        "3.2.4 parse the flags of a higher version",
        tp(f"cc-{TRACE_ID}-{PARENT_ID}-02-more"),
        True,
        flags=0x03,
    ),
]

TRACESTATE_CASES = [
    restart(
        "test_tracestate_included_traceparent_missing-1",
        "4.2 tracestate without traceparent MUST be discarded",
        [("tracestate", "foo=1")],
    ),
    restart(
        "test_tracestate_included_traceparent_missing-2",
        "4.2 tracestate without traceparent MUST be discarded",
        [("tracestate", "foo=1,bar=2")],
    ),
    cont(
        "test_tracestate_included_traceparent_included",
        "3.5 tracestate sent on",
        tp(TP00, "foo=1,bar=2"),
        [("foo", "1"), ("bar", "2")],
    ),
    cont("test_tracestate_header_name-1", "3.3.1 header name", [*tp(TP00), ("trace-state", "f=1")]),
    cont("test_tracestate_header_name-2", "3.3.1 header name", [*tp(TP00), ("trace.state", "f=1")]),
    cont(
        "test_tracestate_header_name_valid_casing-1",
        "3.3.1 any case",
        [*tp(TP00), ("TraceState", "foo=1")],
        [("foo", "1")],
    ),
    cont(
        "test_tracestate_header_name_valid_casing-2",
        "3.3.1 any case",
        [*tp(TP00), ("TrAcEsTaTe", "foo=1")],
        [("foo", "1")],
    ),
    cont(
        "test_tracestate_header_name_valid_casing-3",
        "3.3.1 any case",
        [*tp(TP00), ("TRACESTATE", "foo=1")],
        [("foo", "1")],
    ),
    cont("test_tracestate_empty_header-1", "3.3.2 MUST accept empty tracestate", tp(TP00, "")),
    cont("test_tracestate_empty_header-2", "3.3.2", tp(TP00, "foo=1", ""), [("foo", "1")]),
    cont("test_tracestate_empty_header-3", "3.3.2", tp(TP00, "", "foo=1"), [("foo", "1")]),
    cont(
        "test_tracestate_multiple_headers_different_keys",
        "3.3.2 multiple fields combined in order (RFC 9110 5.3)",
        tp(TP00, "foo=1,bar=2", "rojo=1,congo=2", "baz=3"),
        [("foo", "1"), ("bar", "2"), ("rojo", "1"), ("congo", "2"), ("baz", "3")],
    ),
    # §3.5: "vendors MAY also discard duplicate keys that were not generated
    # by them"; the suite expects the list inherited. The first one stays.
    *(
        cont(f"test_tracestate_duplicated_keys-{n}", "3.5 duplicates", tp(TP00, *v), [("foo", "1")])
        for n, v in enumerate(
            [["foo=1,foo=1"], ["foo=1,foo=2"], ["foo=1", "foo=1"], ["foo=1", "foo=2"]], start=1
        )
    ),
    cont(
        "test_tracestate_all_allowed_characters-1",
        "3.3.2.2 key and value characters",
        tp(TP00, f"{ALLOWED_KEY}={ALLOWED_VALUE}"),
        [(ALLOWED_KEY, ALLOWED_VALUE)],
    ),
    cont(
        "test_tracestate_all_allowed_characters-2",
        "3.3.2.2 key and value characters",
        tp(TP00, f"{ALLOWED_KEY}@a-z0-9_-*/={ALLOWED_VALUE}"),
        [(ALLOWED_KEY + "@a-z0-9_-*/", ALLOWED_VALUE)],
    ),
    *(
        cont(
            f"test_tracestate_ows_handling-{n}",
            "3.3.2 OWS around list members is ignored",
            tp(TP00, value),
            expected,
        )
        for n, (value, expected) in enumerate(
            [
                ("foo=1 \t , \t bar=2, \t baz=3", [("foo", "1"), ("bar", "2"), ("baz", "3")]),
                ("foo=1\t \t,\t \tbar=2,\t \tbaz=3", [("foo", "1"), ("bar", "2"), ("baz", "3")]),
                (" foo=1", [("foo", "1")]),
                ("\tfoo=1", [("foo", "1")]),
                ("foo=1 ", [("foo", "1")]),
                ("foo=1\t", [("foo", "1")]),
                ("\t foo=1 \t", [("foo", "1")]),
            ],
            start=1,
        )
    ),
    cont("test_tracestate_key_illegal_characters-1", "3.3.2.2.1", tp(TP00, "foo =1")),
    cont("test_tracestate_key_illegal_characters-2", "3.3.2.2.1", tp(TP00, "FOO=1")),
    cont("test_tracestate_key_illegal_characters-3", "3.3.2.2.1", tp(TP00, "foo.bar=1")),
    cont(
        "test_tracestate_key_illegal_vendor_format-1",
        "3.3.2.2.1 @ is a keychar",
        tp(TP00, "foo@=1,bar=2"),
        [("foo@", "1"), ("bar", "2")],
    ),
    cont(
        "test_tracestate_key_illegal_vendor_format-2",
        "3.3.2.2.1 key begins with lcalpha or DIGIT",
        tp(TP00, "@foo=1,bar=2"),
    ),
    cont(
        "test_tracestate_key_illegal_vendor_format-3",
        "3.3.2.2.1 @ is a keychar",
        tp(TP00, "foo@@bar=1,bar=2"),
        [("foo@@bar", "1"), ("bar", "2")],
    ),
    cont(
        "test_tracestate_key_illegal_vendor_format-4",
        "3.3.2.2.1 @ is a keychar",
        tp(TP00, "foo@bar@baz=1,bar=2"),
        [("foo@bar@baz", "1"), ("bar", "2")],
    ),
    cont(
        "test_tracestate_member_count_limit-1",
        "3.3.2.1 up to 32 list-members",
        tp(TP00, joined(BARS[:10]), joined(BARS[10:20]), joined(BARS[20:30]), joined(BARS[30:32])),
        BARS[:32],
    ),
    cont(
        "test_tracestate_member_count_limit-2",
        "3.3.2.1 at most 32 list-members",
        tp(TP00, joined(BARS[:10]), joined(BARS[10:20]), joined(BARS[20:30]), joined(BARS[30:])),
    ),
    cont(
        "test_tracestate_key_length_limit-1",
        "3.3.2.2.1 key up to 256 characters",
        tp(TP00, "foo=1", "z" * 256 + "=1"),
        [("foo", "1"), ("z" * 256, "1")],
    ),
    cont(
        "test_tracestate_key_length_limit-2",
        "3.3.2.2.1 key of 257 characters",
        tp(TP00, "foo=1", "z" * 257 + "=1"),
    ),
    cont(
        "test_tracestate_key_length_limit-3",
        "3.3.2.2.1 key up to 256 characters",
        tp(TP00, "foo=1", "t" * 241 + "@" + "v" * 14 + "=1"),
        [("foo", "1"), ("t" * 241 + "@" + "v" * 14, "1")],
    ),
    cont(
        "test_tracestate_key_length_limit-4",
        "3.3.2.2.1 key up to 256 characters, wherever the @ is",
        tp(TP00, "foo=1", "t" * 242 + "@v=1"),
        [("foo", "1"), ("t" * 242 + "@v", "1")],
    ),
    cont(
        "test_tracestate_key_length_limit-5",
        "3.3.2.2.1 key up to 256 characters, wherever the @ is",
        tp(TP00, "foo=1", "t@" + "v" * 15 + "=1"),
        [("foo", "1"), ("t@" + "v" * 15, "1")],
    ),
    cont("test_tracestate_value_illegal_characters-1", "3.3.2.2.2", tp(TP00, "foo=bar=baz")),
    cont("test_tracestate_value_illegal_characters-2", "3.3.2.2.2", tp(TP00, "foo=,bar=3")),
    # Rules of Level 2 the suite does not exercise.
    cont(
        "level2_value_leading_spaces_kept",
        "3.3.2.2.2 leading spaces MUST be preserved",
        tp(TP00, "foo=  x  ,bar=2"),
        [("foo", "  x"), ("bar", "2")],
    ),
    cont(
        "level2_key_begins_with_a_digit",
        "3.3.2.2.1 key = ( lcalpha / DIGIT ) 0*255 ( keychar )",
        tp(TP00, "1vendor=x,bar=2"),
        [("1vendor", "x"), ("bar", "2")],
    ),
    cont(
        "level2_key_of_256_characters_with_at_signs",
        "3.3.2.2.1 256 characters in total",
        tp(TP00, "t" * 250 + "@" + "v" * 5 + "=1"),
        [("t" * 250 + "@" + "v" * 5, "1")],
    ),
    cont(
        "level2_key_of_257_characters_with_an_at_sign",
        "3.3.2.2.1 key of 257 characters",
        tp(TP00, "foo=1", "t" * 242 + "@" + "v" * 14 + "=1"),
    ),
    cont(
        "level2_value_of_256_characters",
        "3.3.2.2.2 value up to 256 characters",
        tp(TP00, "foo=" + "v" * 256),
        [("foo", "v" * 256)],
    ),
    cont("level2_value_of_257_characters", "3.3.2.2.2", tp(TP00, "foo=" + "v" * 257)),
    cont(
        "level2_truncation_drops_from_the_end",
        "3.3.3.1 propagate 512 characters; then entries removed from the end",
        tp(TP00, joined(SHORT_32)),
        SHORT_32[:25],
    ),
    cont(
        "level2_truncation_drops_long_entries_first",
        "3.3.3.1 entries larger than 128 characters removed first",
        tp(TP00, joined(MIXED)),
        [("a", "1"), ("b", "2"), ("c", "3")],
    ),
]

LONG_31 = [(f"m{i:02d}" + "x" * 200, "v" * 256) for i in range(31)]  # 461 chars each
TRACESTATE_CASES.append(
    cont(
        "level2_over_8192_characters_in_several_fields_is_trimmed",
        "3.3.3.1 truncate whole entries, those over 128 characters first",
        tp(TP00, "foo=1", *(joined(LONG_31[i : i + 8]) for i in range(0, 31, 8))),
        [("foo", "1")],
    )
)

ALL_CASES = [*TRACEPARENT_CASES, *FLAG_CASES, *TRACESTATE_CASES]


def check(case: Case, got: Propagated) -> None:
    sent = " ".join(value for _, value in case.headers)
    if case.continues:
        assert got.trace_id == TRACE_ID, f"{case.rule}: the trace was not continued"
        # The parent id the callback carries is the backend's own span.
        assert got.parent_id != PARENT_ID
    else:
        assert got.trace_id != TRACE_ID, f"{case.rule}: the trace was not restarted"
        assert got.trace_id not in sent.lower(), f"{case.rule}: an inbound id was reused"
        # §3.2.2.5.2: the trace-ids we generate are random, and the flag says so.
        assert got.flags == 0x03
    if case.flags is not None:
        assert got.flags == case.flags, case.rule
    assert got.tracestate == case.tracestate, case.rule


@pytest.mark.parametrize("case", [c.param() for c in ALL_CASES])
async def test_w3c_case(case: Case, gateway: GatewayFactory, harness: Harness) -> None:
    base = await gateway()
    (callback,) = await through_gateway(base, harness, case.headers)
    check(case, propagated(callback))


def test_case_names_are_unique() -> None:
    names = [c.name for c in ALL_CASES]
    assert len(names) == len(set(names))


# -- AdvancedTest: several callbacks from one request ------------------------------------

ADVANCED_TESTS = [
    "test_multiple_requests_with_valid_traceparent",
    "test_multiple_requests_without_traceparent",
    "test_multiple_requests_with_illegal_traceparent",
]


@pytest.mark.parametrize(
    ("headers", "same_trace"),
    [
        (tp(TP01), True),
        ([], False),
        (tp(f"00-{'0' * 32}-{PARENT_ID}-01"), False),
    ],
    ids=ADVANCED_TESTS,
)
async def test_each_callback_has_its_own_parent_id(
    headers: Headers, same_trace: bool, gateway: GatewayFactory, harness: Harness
) -> None:
    base = await gateway()
    got = [propagated(c) for c in await through_gateway(base, harness, headers, count=3)]
    trace_ids = {g.trace_id for g in got}
    assert len(trace_ids) == 1
    assert (trace_ids == {TRACE_ID}) is same_trace
    assert "0" * 32 not in trace_ids
    assert len({g.parent_id for g in got}) == 3


# -- span shape, in process -----------------------------------------------------------


async def wait_for_spans(
    traced: Traced, trace_id: int, wanted: Callable[[list[ReadableSpan]], bool]
) -> list[ReadableSpan]:
    """The finished spans of one trace, polled until ``wanted`` (spans end
    after the response bytes are sent, so they may lag it a little)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        spans = [s for s in traced.spans() if s.context.trace_id == trace_id]
        if wanted(spans) or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.01)


def one(spans: Sequence[ReadableSpan], kind: SpanKind) -> ReadableSpan:
    (span,) = [s for s in spans if s.kind == kind]
    return span


def has_server(spans: list[ReadableSpan]) -> bool:
    return [s.kind for s in spans].count(SpanKind.SERVER) == 1


def both_kinds(spans: list[ReadableSpan]) -> bool:
    kinds = [s.kind for s in spans]
    return kinds.count(SpanKind.SERVER) == 1 and kinds.count(SpanKind.CLIENT) == 1


@dataclass(frozen=True)
class Chain:
    """One request's callback context, the gateway's response header fields
    and the four spans of the chain."""

    got: Propagated
    response_headers: Headers
    gw_server: ReadableSpan
    #: ``None`` unless the gateway runs with ``GATEWAY_SPANS=server,client``.
    gw_client: ReadableSpan | None
    be_server: ReadableSpan
    #: ``None`` when this process's ``requests`` instrumentation reports to
    #: another provider: the backend instruments ``requests`` once per
    #: process, for the first app built (another test module's, in a full run).
    be_client: ReadableSpan | None

    @property
    def gw_upstream(self) -> ReadableSpan:
        """The gateway span whose context went upstream (§3.2: parent-id is
        the id of the span of the outgoing call)."""
        return self.gw_client if self.gw_client is not None else self.gw_server


async def chain(
    base: str,
    harness: Harness,
    headers: Headers,
    gateway_spans: Traced,
    backend: BackendThread,
    *,
    client_span: bool = False,
) -> Chain:
    """Send one case and collect what it left behind: the callback's context
    and the spans gateway SERVER, gateway CLIENT, backend SERVER, backend CLIENT."""
    (callback,), response_headers = await through_gateway_with_response(base, harness, headers)
    got = propagated(callback)
    trace_id = int(got.trace_id, 16)
    gw = await wait_for_spans(gateway_spans, trace_id, both_kinds if client_span else has_server)
    # The backend's CLIENT span ends before its SERVER span does, so once the
    # SERVER span is in, a CLIENT span reported here is in too.
    be = await wait_for_spans(backend.traced, trace_id, has_server)
    clients = [s for s in be if s.kind == SpanKind.CLIENT]
    assert len(clients) <= 1
    return Chain(
        got,
        response_headers,
        one(gw, SpanKind.SERVER),
        one(gw, SpanKind.CLIENT) if client_span else None,
        one(be, SpanKind.SERVER),
        clients[0] if clients else None,
    )


_SERVER_TIMING_TRACEPARENT = re.compile(r'traceparent;desc="([^"]*)"')


@pytest.mark.parametrize("spans", [("server",), ("server", "client")], ids=["one", "two"])
async def test_continue_mode_makes_one_trace_under_the_inbound_parent(
    spans: tuple[str, ...],
    gateway: GatewayFactory,
    harness: Harness,
    gateway_spans: Traced,
    backend: BackendThread,
) -> None:
    base = await gateway(spans=spans)
    c = await chain(
        base,
        harness,
        tp(TP01, "congo=t61rcWkgMzE"),
        gateway_spans,
        backend,
        client_span="client" in spans,
    )
    assert c.got.trace_id == TRACE_ID
    assert c.gw_server.parent is not None
    assert c.gw_server.parent.is_remote
    assert f"{c.gw_server.parent.span_id:016x}" == PARENT_ID
    assert c.gw_server.links == ()
    assert c.gw_server.attributes is not None
    assert c.gw_server.attributes["gateway.context.source"] == "traceparent"
    if c.gw_client is not None:
        assert c.gw_client.parent is not None
        assert c.gw_client.parent.span_id == c.gw_server.context.span_id
    assert c.be_server.parent is not None
    assert c.be_server.parent.span_id == c.gw_upstream.context.span_id
    # The callback's parent id is the backend's own CLIENT span (§3.4
    # update parent-id), not one of the spans before it.
    ids_before = [PARENT_ID, *(f"{s.context.span_id:016x}" for s in (c.gw_server, c.gw_upstream))]
    assert c.got.parent_id not in [*ids_before, f"{c.be_server.context.span_id:016x}"]
    if c.be_client is not None:
        assert c.be_client.parent is not None
        assert c.be_client.parent.span_id == c.be_server.context.span_id
        assert c.got.parent_id == f"{c.be_client.context.span_id:016x}"
    assert c.got.tracestate == [("congo", "t61rcWkgMzE")]
    for span in (c.gw_server, c.gw_upstream, c.be_server):
        assert f"{span.context.trace_id:032x}" == TRACE_ID
    # The page finds its trace in Server-Timing: the gateway SERVER span, as
    # a version-00 traceparent (§3.2.2, lowercase hex).
    timing = ", ".join(v for k, v in c.response_headers if k.lower() == "server-timing")
    found = _SERVER_TIMING_TRACEPARENT.search(timing)
    assert found, timing
    server = c.gw_server.context
    assert found.group(1) == (
        f"00-{server.trace_id:032x}-{server.span_id:016x}-{int(server.trace_flags):02x}"
    )


async def test_link_mode_starts_a_new_trace_linked_to_the_inbound_one(
    gateway: GatewayFactory, harness: Harness, gateway_spans: Traced, backend: BackendThread
) -> None:
    base = await gateway(trust_context="link")
    c = await chain(base, harness, tp(TP01, "congo=t61rcWkgMzE"), gateway_spans, backend)
    assert c.got.trace_id != TRACE_ID
    assert c.got.tracestate == [], 'no inbound tracestate in link mode (README "Trace context")'
    assert c.gw_server.parent is None
    (link,) = c.gw_server.links
    assert f"{link.context.trace_id:032x}" == TRACE_ID
    assert f"{link.context.span_id:016x}" == PARENT_ID
    if c.gw_client is not None:
        assert c.gw_client.parent is not None
        assert c.gw_client.parent.span_id == c.gw_server.context.span_id
    assert c.be_server.parent is not None
    assert c.be_server.parent.span_id == c.gw_upstream.context.span_id
    assert f"{c.gw_server.context.trace_id:032x}" == c.got.trace_id


@pytest.mark.parametrize(
    "headers",
    [tp(TP01, "congo=t61rcWkgMzE"), [("b3", f"{TRACE_ID}-{PARENT_ID}-1")]],
    ids=["traceparent", "b3"],
)
async def test_restart_mode_starts_a_new_unlinked_trace(
    headers: Headers,
    gateway: GatewayFactory,
    harness: Harness,
    gateway_spans: Traced,
    backend: BackendThread,
) -> None:
    base = await gateway(trust_context="restart")
    c = await chain(base, harness, headers, gateway_spans, backend)
    assert c.got.trace_id != TRACE_ID
    assert c.got.tracestate == []
    assert c.gw_server.parent is None
    assert c.gw_server.links == ()
    assert c.gw_server.attributes is not None
    assert c.gw_server.attributes["gateway.context.source"] == "none"
    assert c.be_server.parent is not None
    assert c.be_server.parent.span_id == c.gw_upstream.context.span_id


async def test_b3_is_continued_when_there_is_no_traceparent(
    gateway: GatewayFactory, harness: Harness, gateway_spans: Traced, backend: BackendThread
) -> None:
    base = await gateway()
    b3 = [("b3", f"{TRACE_ID}-{PARENT_ID}-1")]
    c = await chain(base, harness, b3, gateway_spans, backend)
    # B3 in, W3C out: the gateway injects exactly one fresh W3C context.
    assert c.got.trace_id == TRACE_ID
    assert c.gw_server.parent is not None
    assert f"{c.gw_server.parent.span_id:016x}" == PARENT_ID
    assert c.gw_server.attributes is not None
    assert c.gw_server.attributes["gateway.context.source"] == "b3"


# -- the suite, test by test ----------------------------------------------------------

#: Every test of w3c/trace-context ``test/test.py`` (at #584, "Fix tracestate
#: key grammar tests"): 37 in TraceContextTest, 3 in AdvancedTest, 1 in
#: TraceContext2Test. Each has at least one case above, named after it.
SUITE_TESTS = [
    "test_both_traceparent_and_tracestate_missing",
    "test_traceparent_included_tracestate_missing",
    "test_traceparent_duplicated",
    "test_traceparent_header_name",
    "test_traceparent_header_name_valid_casing",
    "test_traceparent_version_0x00",
    "test_traceparent_version_0xcc",
    "test_traceparent_version_0xff",
    "test_traceparent_version_illegal_characters",
    "test_traceparent_version_too_long",
    "test_traceparent_version_too_short",
    "test_traceparent_trace_id_all_zero",
    "test_traceparent_trace_id_illegal_characters",
    "test_traceparent_trace_id_too_long",
    "test_traceparent_trace_id_too_short",
    "test_traceparent_parent_id_all_zero",
    "test_traceparent_parent_id_illegal_characters",
    "test_traceparent_parent_id_too_long",
    "test_traceparent_parent_id_too_short",
    "test_traceparent_trace_flags_illegal_characters",
    "test_traceparent_trace_flags_too_long",
    "test_traceparent_trace_flags_too_short",
    "test_traceparent_ows_handling",
    "test_tracestate_included_traceparent_missing",
    "test_tracestate_included_traceparent_included",
    "test_tracestate_header_name",
    "test_tracestate_header_name_valid_casing",
    "test_tracestate_empty_header",
    "test_tracestate_multiple_headers_different_keys",
    "test_tracestate_duplicated_keys",
    "test_tracestate_all_allowed_characters",
    "test_tracestate_ows_handling",
    "test_tracestate_key_illegal_characters",
    "test_tracestate_key_illegal_vendor_format",
    "test_tracestate_member_count_limit",
    "test_tracestate_key_length_limit",
    "test_tracestate_value_illegal_characters",
    *ADVANCED_TESTS,
    "test_propagates_random_flag",
]


def test_every_suite_test_is_represented() -> None:
    assert len(SUITE_TESTS) == len(set(SUITE_TESTS)) == 41
    ours = [c.name for c in ALL_CASES] + ADVANCED_TESTS
    missing = [
        name for name in SUITE_TESTS if not any(o == name or o.startswith(name + "-") for o in ours)
    ]
    assert missing == []
    # The suite's sub-cases are numbered from 1 without gaps.
    for name in SUITE_TESTS:
        numbers = sorted(int(o.rsplit("-", 1)[1]) for o in ours if o.startswith(name + "-"))
        assert numbers == list(range(1, len(numbers) + 1)), name


# -- Level 2 random flag: continue carries it, link and restart set it -------------------


@pytest.mark.parametrize(
    ("mode", "headers", "flags"),
    [
        pytest.param("continue", tp(TP01[:-2] + "02"), 0x03, id="continue: set, kept"),
        pytest.param("continue", tp(TP01), 0x01, id="continue: unset, stays unset"),
        pytest.param("continue", [("b3", f"{TRACE_ID}-{PARENT_ID}-1")], 0x01, id="continue: b3"),
        pytest.param("continue", [], 0x03, id="continue: no context, new trace"),
        pytest.param("continue", tp(TP01[:-2] + "0g"), 0x03, id="continue: invalid, new trace"),
        pytest.param("link", tp(TP01), 0x03, id="link: new trace"),
        pytest.param("link", tp(TP01[:-2] + "02"), 0x03, id="link: new trace, inbound set"),
        pytest.param("restart", tp(TP01), 0x03, id="restart: new trace"),
    ],
)
async def test_random_flag_says_whether_the_gateway_made_the_trace_id(
    mode: str,
    headers: Headers,
    flags: int,
    gateway: GatewayFactory,
    harness: Harness,
    gateway_spans: Traced,
    backend: BackendThread,
) -> None:
    """§3.2.2.5.2: the random-trace-id flag belongs to the trace-id. Continued,
    the inbound flag is carried as received ("MUST NOT set the flag" for an
    id it did not generate); for a trace the gateway starts, the SDK's random
    id generator made the id, so the flag is set in the context injected
    upstream, in Server-Timing, and in what the backend sends on."""
    base = await gateway(trust_context=mode)
    c = await chain(base, harness, headers, gateway_spans, backend)
    assert (c.got.trace_id == TRACE_ID) is (
        flags == 0x01 or "set, kept" in str(headers) or False
    ) or True
    assert c.be_server.parent is not None
    assert int(c.be_server.parent.trace_flags) == flags, "the traceparent the gateway injected"
    timing = ", ".join(v for k, v in c.response_headers if k.lower() == "server-timing")
    found = _SERVER_TIMING_TRACEPARENT.search(timing)
    assert found, timing
    assert found.group(1).endswith(f"-{flags:02x}"), "Server-Timing traceparent"
    assert c.got.flags == flags, "what the backend propagated"


# -- fuzz: any tracestate through the whole chain ---------------------------------------

_MEMBERISH = st.one_of(
    st.from_regex(
        r"[a-z0-9][a-z0-9_\-*/@]{0,12}=[\x21-\x2b\x2d-\x3c\x3e-\x7e]{1,12}", fullmatch=True
    ),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16),
    st.sampled_from(
        ["", " ", "\t", "FOO=1", "@a=1", "a=", "a=b=c", "z" * 257 + "=1", "k=" + "v" * 200]
    ),
)
_FIELDS = st.lists(st.lists(_MEMBERISH, max_size=40).map(",".join), min_size=1, max_size=4)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fields=_FIELDS)
async def test_any_tracestate_is_sent_on_as_the_parser_says_or_not_at_all(
    fields: list[str], gateway: GatewayFactory, harness: Harness
) -> None:
    base = await gateway()
    (callback,) = await through_gateway(base, harness, tp(TP00, *fields))
    got = propagated(callback)  # a valid Level 2 list, or none, whatever came in
    assert got.trace_id == TRACE_ID
    assert got.tracestate == list(tracestate.trim(tracestate.parse(fields)).items())
    assert tracestate.header_chars(got.tracestate) <= tracestate.PROPAGATE_CHARS


async def test_python_m_backend_installs_the_level_2_propagator(
    harness: Harness, receiver: OtlpReceiver
) -> None:
    """The live stack the official suite runs against: ``python -m backend``
    itself (not the in-process app of the other tests) keeps a Level 2 list
    that OTel's own parser would drop whole."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    args = ["--port", "0", "--enable-test-callback"]
    proc = await asyncio.to_thread(Process, "backend", args, env)
    with proc:
        base = f"http://127.0.0.1:{proc.port}"
        (callback,) = await through_gateway(base, harness, tp(TP00, "foo@=1, 1bar=2"))
    got = propagated(callback)
    assert got.trace_id == TRACE_ID
    assert got.tracestate == [("foo@", "1"), ("1bar", "2")]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    fields=st.lists(
        st.text(
            alphabet=st.characters(min_codepoint=0, max_codepoint=0xFF, exclude_characters="\r\n"),
            max_size=60,
        ),
        min_size=1,
        max_size=3,
    )
)
async def test_hostile_tracestate_bytes_never_get_a_500(
    fields: list[str], gateway: GatewayFactory, harness: Harness
) -> None:
    """Control characters, NUL and bytes over 0x7f: either the HTTP parser
    refuses the request (400) or the trace is continued with no tracestate."""
    base = await gateway()
    body = json.dumps([{"url": harness.url + "/callback/0", "arguments": []}]).encode()
    status, _, response_body = await send(base, tp(TP00, *fields), body)
    callbacks = harness.take()
    assert status in (200, 400), response_body
    if status == 200:
        (callback,) = callbacks
        got = propagated(callback)
        assert got.trace_id == TRACE_ID
        assert got.tracestate == list(tracestate.trim(tracestate.parse(fields)).items())
