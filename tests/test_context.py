"""Unit tests for ``gateway/context.py``: the trust policy on top of the OTel
propagators. Pure: headers in, ``InboundContext`` out; no servers, no clock.

Every rule is one parametrized case whose id names the section of W3C Trace
Context Level 2 (https://www.w3.org/TR/trace-context-2/) it checks, so a
failing id says which rule broke. The same rules are checked end to end
(gateway → backend → callback) in ``test_w3c_conformance.py``; the
``tracestate`` grammar on its own in ``test_tracestate.py``.
"""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanContext, TraceFlags, TraceState

from gateway import context
from gateway.config import TrustMode
from gateway.context import InboundContext
from latency_common import tracestate

TRACE_ID = "12345678901234567890123456789012"
PARENT_ID = "1234567890123456"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"
B3_TRACE_ID = "80f198ee56343ba864fe8b2a57d3eff7"
B3_SPAN_ID = "e457b5a2e4d86bd1"
B3_SINGLE = f"{B3_TRACE_ID}-{B3_SPAN_ID}-1"


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    """Request headers as aiohttp hands them to the gateway (repeats kept)."""
    return CIMultiDictProxy(CIMultiDict(list(pairs)))


def parent_of(inbound: InboundContext) -> SpanContext:
    return trace.get_current_span(inbound.parent).get_span_context()


def extract(*pairs: tuple[str, str], mode: TrustMode = "continue") -> InboundContext:
    return context.extract(headers(*pairs), mode)


def assert_restarted(inbound: InboundContext, source: str) -> None:
    """An empty parent (the SERVER span starts a new trace) and no links."""
    assert inbound.source == source
    assert not parent_of(inbound).is_valid
    assert inbound.links == ()


def header_len(state: TraceState) -> int:
    """Length of the header ``state`` serialises to (commas included)."""
    return len(",".join(f"{k}={v}" for k, v in state.items()))


# -- traceparent: accepted ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "flags"),
    [
        pytest.param(VALID, 0x01, id="3.2.2 version 00, sampled"),
        # The sampled flag is the caller's recommendation (§3.2.2.5.1); the
        # gateway's sampler decides (README "Trace context"), so 00 is still a parent.
        pytest.param(f"00-{TRACE_ID}-{PARENT_ID}-00", 0x00, id="3.2.2.5.1 sampled flag 00"),
        pytest.param(f"00-{TRACE_ID}-{PARENT_ID}-02", 0x02, id="3.2.2.5.2 random-trace-id flag"),
        pytest.param(f"00-{TRACE_ID}-{PARENT_ID}-03", 0x03, id="3.2.2.5.2 random and sampled"),
        # §3.2.4: a higher version is parsed with the version-00 rules.
        pytest.param(f"cc-{TRACE_ID}-{PARENT_ID}-01", 0x01, id="3.2.4 future version cc"),
        pytest.param(
            f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-will-be-like",
            0x01,
            id="3.2.4 future version with extra fields",
        ),
        # W3C test suite test_traceparent_ows_handling: OWS around the value.
        pytest.param(f"\t {VALID} \t", 0x01, id="RFC 9110 5.5 OWS around traceparent"),
    ],
)
def test_valid_traceparent_becomes_the_remote_parent(value: str, flags: int) -> None:
    inbound = extract(("traceparent", value))
    parent = parent_of(inbound)
    assert inbound.source == "traceparent"
    assert inbound.links == ()
    assert parent.is_valid
    assert parent.is_remote
    assert f"{parent.trace_id:032x}" == TRACE_ID
    assert f"{parent.span_id:016x}" == PARENT_ID
    assert int(parent.trace_flags) == flags


@pytest.mark.parametrize("name", ["TraceParent", "TrAcEpArEnT", "TRACEPARENT"])
def test_traceparent_header_name_in_any_case(name: str) -> None:
    # §3.2.1: vendors MUST expect the header name in any case.
    inbound = extract((name, VALID))
    assert inbound.source == "traceparent"
    assert f"{parent_of(inbound).trace_id:032x}" == TRACE_ID


def test_random_flag_is_kept_in_the_parsed_context() -> None:
    # §3.2.2.5.2: the flag belongs to the trace-id; the SDK copies it from
    # this parent to the gateway's spans only if the parsed context keeps it.
    parent = parent_of(extract(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-02")))
    assert parent.trace_flags.random_trace_id
    assert not parent.trace_flags.sampled


def test_future_version_may_be_as_long_as_the_gateway_allows() -> None:
    # §3.2.4: "only disallow prohibitively large headers": up to the limit it parses.
    head = f"cc-{TRACE_ID}-{PARENT_ID}-01-"
    value = head + "x" * (context.MAX_TRACEPARENT_CHARS - len(head))
    assert len(value) == context.MAX_TRACEPARENT_CHARS
    assert extract(("traceparent", value)).source == "traceparent"
    assert_restarted(extract(("traceparent", value + "x")), "invalid")


# -- traceparent: refused (the trace restarts) -------------------------------


TRACE_ID_UPPER = TRACE_ID[:-1] + "A"
PARENT_ID_UPPER = PARENT_ID[:-1] + "A"


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([f"AA-{TRACE_ID}-{PARENT_ID}-01"], id="3.2.2.1 version uppercase hex"),
        pytest.param([f"ff-{TRACE_ID}-{PARENT_ID}-01"], id="3.2.2.1 version ff is invalid"),
        pytest.param([f"000-{TRACE_ID}-{PARENT_ID}-01"], id="3.2.4 version too long"),
        pytest.param([f"0-{TRACE_ID}-{PARENT_ID}-01"], id="3.2.4 version too short"),
        pytest.param([f".0-{TRACE_ID}-{PARENT_ID}-01"], id="3.2.4 version illegal character"),
        pytest.param([f"00-{TRACE_ID_UPPER}-{PARENT_ID}-01"], id="3.2.2.3 trace-id uppercase hex"),
        pytest.param([f"00-{'0' * 32}-{PARENT_ID}-01"], id="3.2.2.3 trace-id all zeros"),
        pytest.param([f"00-{TRACE_ID}3-{PARENT_ID}-01"], id="3.2.2.3 trace-id too long"),
        pytest.param([f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01"], id="3.2.2.3 trace-id too short"),
        pytest.param([f"00-.{TRACE_ID[1:]}-{PARENT_ID}-01"], id="3.2.2.3 trace-id illegal char"),
        pytest.param([f"00-{TRACE_ID}-{PARENT_ID_UPPER}-01"], id="3.2.2.4 parent-id uppercase hex"),
        pytest.param([f"00-{TRACE_ID}-{'0' * 16}-01"], id="3.2.2.4 parent-id all zeros"),
        pytest.param([f"00-{TRACE_ID}-{PARENT_ID}7-01"], id="3.2.2.4 parent-id too long"),
        pytest.param([f"00-{TRACE_ID}-{PARENT_ID[:-1]}-01"], id="3.2.2.4 parent-id too short"),
        pytest.param([f"00-{TRACE_ID}-{PARENT_ID[:-1]}.-01"], id="3.2.2.4 parent-id illegal char"),
        pytest.param([f"00-{TRACE_ID}-{PARENT_ID}-0A"], id="3.2.2.5 trace-flags uppercase hex"),
        pytest.param([f"00-{TRACE_ID}-{PARENT_ID}-001"], id="3.2.2.5 trace-flags too long"),
        pytest.param([f"00-{TRACE_ID}-{PARENT_ID}-1"], id="3.2.2.5 trace-flags too short"),
        pytest.param([f"00-{TRACE_ID}-{PARENT_ID}-.0"], id="3.2.2.5 trace-flags illegal char"),
        # Version 00 is exactly four fields (§3.2.2.2 version-format).
        pytest.param([f"{VALID}-what-the-future-will-be-like"], id="3.2.2.2 extra field after 00"),
        pytest.param([f"{VALID}."], id="3.2.2.2 trailing character after 00"),
        # §3.2.4: the flags of a higher version must end the value or be
        # followed by a dash.
        pytest.param(
            [f"cc-{TRACE_ID}-{PARENT_ID}-01.what"], id="3.2.4 future flags not dash-ended"
        ),
        pytest.param([""], id="3.2.2 empty value"),
        # Two fields cannot be told apart: RFC 9110 §5.3 would combine them
        # into one value that is no traceparent (W3C suite
        # test_traceparent_duplicated expects a new trace).
        pytest.param([VALID, f"00-{TRACE_ID[:-1]}1-{PARENT_ID}-01"], id="3.2 duplicated header"),
        pytest.param([VALID, VALID], id="3.2 duplicated header, same value"),
        pytest.param(["x" * (context.MAX_TRACEPARENT_CHARS + 1)], id="3.2.4 prohibitively large"),
    ],
)
def test_invalid_traceparent_restarts_the_trace(values: list[str]) -> None:
    inbound = extract(*[("traceparent", v) for v in values])
    assert_restarted(inbound, "invalid")


def test_duplicated_traceparent_in_different_case_is_still_duplicated() -> None:
    inbound = extract(("traceparent", VALID), ("TraceParent", VALID))
    assert_restarted(inbound, "invalid")


@pytest.mark.parametrize(
    "value",
    ["\u00e9" * 60, "00-" + "\x00" * 52, "\r\n" * 30, "-" * 55, "00--" + "-" * 51],
    ids=["non-ascii", "nul bytes", "crlf", "dashes", "empty fields"],
)
def test_malformed_traceparent_is_a_verdict_not_an_exception(value: str) -> None:
    # STYLE: malformed input from the outside world is a verdict.
    assert_restarted(extract(("traceparent", value), ("tracestate", value)), "invalid")


def test_invalid_traceparent_does_not_fall_back_to_b3() -> None:
    # The client spoke W3C; a broken traceparent restarts the trace (§4.3)
    # rather than letting a second header format choose the trace.
    single = extract(("traceparent", f"ff-{TRACE_ID}-{PARENT_ID}-01"), ("b3", B3_SINGLE))
    multi = extract(
        ("traceparent", f"ff-{TRACE_ID}-{PARENT_ID}-01"),
        ("x-b3-traceid", B3_TRACE_ID),
        ("x-b3-spanid", B3_SPAN_ID),
        ("x-b3-sampled", "1"),
    )
    assert_restarted(single, "invalid")
    assert_restarted(multi, "invalid")


def test_invalid_traceparent_means_tracestate_is_not_parsed() -> None:
    # §3.3: if the vendor failed to parse traceparent, it MUST NOT parse tracestate.
    inbound = extract(("traceparent", f"00-{'0' * 32}-{PARENT_ID}-01"), ("tracestate", "foo=1"))
    assert_restarted(inbound, "invalid")
    assert len(parent_of(inbound).trace_state) == 0


# -- tracestate ---------------------------------------------------------------
#
# The grammar itself (one case per Level 2 rule) is tested on
# ``latency_common.tracestate.parse`` in test_tracestate.py; these check that
# extract applies it, and when.


def members(items: list[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in items)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param(
            ["foo=1,bar=2"], [("foo", "1"), ("bar", "2")], id="3.3.2.1 list kept in order"
        ),
        pytest.param(
            ["foo=1", "", "rojo=1, congo=2"],
            [("foo", "1"), ("rojo", "1"), ("congo", "2")],
            id="3.3.2 several field lines combined in order (RFC 9110 5.3)",
        ),
        # Level 2 keys OTel's Level 1 TraceState would drop, whole list with them.
        pytest.param(["foo@=1,bar=2"], [("foo@", "1"), ("bar", "2")], id="3.3.2.2.1 trailing @"),
        pytest.param(["1vendor=x"], [("1vendor", "x")], id="3.3.2.2.1 key starts with a digit"),
        pytest.param(
            ["t" * 242 + "@v=1"], [("t" * 242 + "@v", "1")], id="3.3.2.2.1 256 chars in total"
        ),
        # §3.5: vendors MAY discard duplicate keys not generated by them; the
        # list is inherited (W3C suite test_tracestate_duplicated_keys).
        pytest.param(["foo=1,foo=2"], [("foo", "1")], id="3.5 duplicate key: first kept"),
        pytest.param(["foo=2", "foo=1"], [("foo", "2")], id="3.5 duplicate over two lines"),
    ],
)
def test_tracestate_is_parsed_by_level_2_rules(
    values: list[str], expected: list[tuple[str, str]]
) -> None:
    inbound = extract(("traceparent", VALID), *[("tracestate", v) for v in values])
    assert inbound.source == "traceparent"
    assert list(parent_of(inbound).trace_state.items()) == expected


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(["foo=1,FOO=1"], id="3.3.2.2.1 uppercase key"),
        pytest.param(["@foo=1,bar=2"], id="3.3.2.2.1 key starts with @"),
        pytest.param(["foo=,bar=3"], id="3.3.2.2.2 empty value"),
        pytest.param([members([(f"bar{i:02d}", "1") for i in range(33)])], id="3.3.2.1 33 members"),
        pytest.param(
            ["foo=1", "a" * (context.MAX_TRACESTATE_HEADER_CHARS + 1)],
            id="gateway memory bound",
        ),
    ],
)
def test_invalid_tracestate_is_dropped_and_traceparent_still_used(values: list[str]) -> None:
    # §3.3: failure to parse tracestate MUST NOT affect traceparent; the
    # whole list is discarded, as the W3C suite expects of an invalid member.
    inbound = extract(("traceparent", VALID), *[("tracestate", v) for v in values])
    assert inbound.source == "traceparent"
    assert f"{parent_of(inbound).trace_id:032x}" == TRACE_ID
    assert len(parent_of(inbound).trace_state) == 0


def test_tracestate_without_traceparent_is_discarded() -> None:
    # §4.2 (W3C suite test_tracestate_included_traceparent_missing).
    inbound = extract(("tracestate", "foo=1,bar=2"))
    assert_restarted(inbound, "none")


def test_long_tracestate_is_trimmed_on_extract() -> None:
    # §3.3.3.1: the gateway propagates 512 characters, trimmed by whole entries.
    state = [(f"k{i:02d}", "v" * 15) for i in range(32)]
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-03"
    inbound = extract(("traceparent", traceparent), ("tracestate", members(state)))
    parent = parent_of(inbound)
    # Trimming rebuilds the span context: nothing but the tracestate changes.
    assert (f"{parent.trace_id:032x}", f"{parent.span_id:016x}") == (TRACE_ID, PARENT_ID)
    assert (int(parent.trace_flags), parent.is_remote) == (0x03, True)
    kept = parent.trace_state
    assert header_len(kept) <= tracestate.PROPAGATE_CHARS
    assert list(kept.items()) == state[: len(kept)]
    assert len(kept) == 25  # 25 members of 19 chars + 24 commas = 499; 26 would be 519


def test_tracestate_over_8192_characters_in_several_lines_is_trimmed_not_lost() -> None:
    # §3.3.3.1: a valid list too long to propagate is cut by whole entries.
    # OTel's propagator discards any tracestate over 8 192 characters; the
    # gateway's parser does not (its bound fits every valid 32-member list).
    long_members = [(f"m{i:02d}" + "x" * 200, "v" * 256) for i in range(31)]
    fields = ["foo=1", *(members(long_members[i : i + 8]) for i in range(0, 31, 8))]
    assert sum(map(len, fields)) + len(fields) - 1 > 8192
    inbound = extract(("traceparent", VALID), *[("tracestate", f) for f in fields])
    assert list(parent_of(inbound).trace_state.items()) == [("foo", "1")]


def test_a_request_without_tracestate_never_reaches_its_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hot path: most requests carry a traceparent and no tracestate.
    def refuse(fields: object) -> None:
        raise AssertionError(f"tracestate parser called with {fields!r}")

    monkeypatch.setattr(tracestate, "parse", refuse)
    inbound = extract(("traceparent", VALID))
    assert inbound.source == "traceparent"
    assert len(parent_of(inbound).trace_state) == 0


# -- trust modes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "source", "trace_id", "span_id"),
    [
        ([("traceparent", VALID), ("tracestate", "foo=1")], "traceparent", TRACE_ID, PARENT_ID),
        ([("b3", B3_SINGLE)], "b3", B3_TRACE_ID, B3_SPAN_ID),
    ],
    ids=["traceparent", "b3"],
)
def test_link_mode_starts_a_new_trace_linked_to_the_inbound_one(
    pairs: list[tuple[str, str]], source: str, trace_id: str, span_id: str
) -> None:
    inbound = extract(*pairs, mode="link")
    assert inbound.source == source
    assert not parent_of(inbound).is_valid
    assert inbound.parent == Context()
    (link,) = inbound.links
    assert f"{link.context.trace_id:032x}" == trace_id
    assert f"{link.context.span_id:016x}" == span_id
    assert link.context.is_remote


def test_link_mode_with_an_invalid_traceparent_has_no_link() -> None:
    assert_restarted(extract(("traceparent", "garbage"), mode="link"), "invalid")


@pytest.mark.parametrize(
    "pairs",
    [
        [("traceparent", VALID), ("tracestate", "foo=1")],
        [("b3", B3_SINGLE)],
        [("traceparent", "garbage")],
        [],
    ],
    ids=["traceparent", "b3", "invalid", "nothing"],
)
def test_restart_mode_ignores_everything(pairs: list[tuple[str, str]]) -> None:
    assert_restarted(extract(*pairs, mode="restart"), "none")


def test_no_trace_headers_is_none() -> None:
    assert_restarted(extract(("accept", "*/*")), "none")


# -- B3 (only without traceparent) ----------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "source", "sampled"),
    [
        ([("b3", B3_SINGLE)], "b3", True),
        # The sampled flag decides nothing here (README "Trace context"): still a parent.
        ([("b3", f"{B3_TRACE_ID}-{B3_SPAN_ID}-0")], "b3", False),
        (
            [("x-b3-traceid", B3_TRACE_ID), ("x-b3-spanid", B3_SPAN_ID), ("x-b3-sampled", "1")],
            "b3multi",
            True,
        ),
        (
            [("X-B3-TraceId", B3_TRACE_ID), ("X-B3-SpanId", B3_SPAN_ID), ("X-B3-Sampled", "0")],
            "b3multi",
            False,
        ),
    ],
    ids=["single", "single not sampled", "multi", "multi not sampled, mixed case"],
)
def test_b3_is_used_when_there_is_no_traceparent(
    pairs: list[tuple[str, str]], source: str, sampled: bool
) -> None:
    inbound = extract(*pairs)
    parent = parent_of(inbound)
    assert inbound.source == source
    assert parent.is_remote
    assert f"{parent.trace_id:032x}" == B3_TRACE_ID
    assert f"{parent.span_id:016x}" == B3_SPAN_ID
    assert parent.trace_flags.sampled is sampled


def test_traceparent_wins_over_b3() -> None:
    inbound = extract(
        ("b3", B3_SINGLE),
        ("x-b3-traceid", B3_TRACE_ID),
        ("x-b3-spanid", B3_SPAN_ID),
        ("traceparent", VALID),
    )
    assert inbound.source == "traceparent"
    assert f"{parent_of(inbound).trace_id:032x}" == TRACE_ID


def test_b3_single_wins_over_b3_multi() -> None:
    other = "a" * 32
    inbound = extract(("x-b3-traceid", other), ("x-b3-spanid", "b" * 16), ("b3", B3_SINGLE))
    assert inbound.source == "b3"
    assert f"{parent_of(inbound).trace_id:032x}" == B3_TRACE_ID


@pytest.mark.parametrize(
    "pairs",
    [
        [("b3", B3_SINGLE), ("b3", B3_SINGLE)],
        [("b3", B3_SINGLE + "-" + "0" * context.MAX_B3_CHARS)],
        [("b3", "not-a-b3-header")],
        [("b3", f"{'0' * 32}-{B3_SPAN_ID}-1")],
        [("x-b3-traceid", "zz"), ("x-b3-spanid", B3_SPAN_ID)],
        [("x-b3-traceid", B3_TRACE_ID), ("x-b3-spanid", "1" * (context.MAX_B3_CHARS + 1))],
    ],
    ids=[
        "b3 duplicated",
        "b3 oversized",
        "b3 malformed",
        "b3 zero trace id",
        "b3multi malformed",
        "b3multi oversized",
    ],
)
def test_bad_b3_restarts_the_trace(pairs: list[tuple[str, str]]) -> None:
    assert_restarted(extract(*pairs), "invalid")


# -- inject / format_traceparent ----------------------------------------------------


def span_context(flags: int = 0x01, state: TraceState | None = None) -> SpanContext:
    return SpanContext(
        int(TRACE_ID, 16),
        int(PARENT_ID, 16),
        is_remote=False,
        trace_flags=TraceFlags(flags),
        trace_state=state,
    )


def test_inject_writes_exactly_one_fresh_context() -> None:
    out: CIMultiDict[str] = CIMultiDict(
        [("TraceParent", "00-stale"), ("traceparent", "00-stale-too"), ("accept", "*/*")]
    )
    context.inject(out, span_context(0x03, TraceState([("foo", "1"), ("bar", "2")])))
    assert out.getall("traceparent") == [f"00-{TRACE_ID}-{PARENT_ID}-03"]
    assert out.getall("tracestate") == ["foo=1,bar=2"]
    assert out["accept"] == "*/*"


def test_inject_writes_no_tracestate_when_it_is_empty() -> None:
    out: CIMultiDict[str] = CIMultiDict()
    context.inject(out, span_context(0x00))
    assert out.getall("traceparent") == [f"00-{TRACE_ID}-{PARENT_ID}-00"]
    assert "tracestate" not in out


def test_inject_then_extract_round_trips() -> None:
    sent = span_context(0x02, TraceState([("congo", "t61rcWkgMzE")]))
    out: CIMultiDict[str] = CIMultiDict()
    context.inject(out, sent)
    got = parent_of(context.extract(CIMultiDictProxy(out), "continue"))
    assert (got.trace_id, got.span_id, got.trace_flags) == (
        sent.trace_id,
        sent.span_id,
        sent.trace_flags,
    )
    assert list(got.trace_state.items()) == [("congo", "t61rcWkgMzE")]


@pytest.mark.parametrize(
    ("trace_id", "span_id", "flags", "expected"),
    [
        (1, 1, 0, f"00-{'0' * 31}1-{'0' * 15}1-00"),
        (int(TRACE_ID, 16), int(PARENT_ID, 16), 0x03, f"00-{TRACE_ID}-{PARENT_ID}-03"),
        (2**128 - 1, 2**64 - 1, 0x01, f"00-{'f' * 32}-{'f' * 16}-01"),
    ],
    ids=["zero padded", "random and sampled", "lowercase hex"],
)
def test_format_traceparent(trace_id: int, span_id: int, flags: int, expected: str) -> None:
    # §3.2.2: lowercase hex (HEXDIGLC), fixed widths, version 00.
    ctx = SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(flags))
    assert context.format_traceparent(ctx) == expected


def test_propagation_headers_are_the_ones_the_gateway_replaces() -> None:
    assert {
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
    } == context.PROPAGATION_HEADERS


def test_limits_leave_room_for_every_valid_header() -> None:
    # 32 members of a 256-char key, "=", a 256-char value, and 31 commas
    # (§3.3.2.1, §3.3.2.2): nothing valid may be refused for size alone.
    assert context.MAX_TRACESTATE_HEADER_CHARS >= 32 * (256 + 1 + 256) + 31
    assert context.MAX_TRACEPARENT_CHARS >= 55


# -- exact bounds (each found by `make mutate`) ----------------------------------------


@pytest.mark.parametrize(
    ("size", "source"), [(context.MAX_B3_CHARS, "b3multi"), (context.MAX_B3_CHARS + 1, "invalid")]
)
def test_every_x_b3_header_counts_towards_the_size_bound(size: int, source: str) -> None:
    # OTel ignores X-B3-ParentSpanId, but an oversized one still refuses the
    # context: the bound is on every x-b3-* header the client sent, in any case.
    inbound = extract(
        ("X-B3-TraceId", B3_TRACE_ID),
        ("X-B3-SpanId", B3_SPAN_ID),
        ("X-B3-ParentSpanId", "1" * size),
    )
    assert inbound.source == source


def test_opentelemetry_never_sees_the_tracestate(caplog: pytest.LogCaptureFixture) -> None:
    # Level 2 keys OTel's Level 1 parser would drop with a warning: parsed here instead.
    with caplog.at_level("DEBUG"):
        inbound = extract(("traceparent", VALID), ("tracestate", "1foo@=1,bar=2"))
    assert list(parent_of(inbound).trace_state.items()) == [("1foo@", "1"), ("bar", "2")]
    assert caplog.records == []
