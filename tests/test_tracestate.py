"""Unit tests for ``latency_common/tracestate.py``: the W3C Trace Context Level 2
``tracestate`` rules. Pure: field lines in, members out; no servers.

Every rule is one parametrized case whose id names the section of
https://www.w3.org/TR/trace-context-2/ it checks; negative cases quote it.
End to end (gateway → backend → callback) the same rules run in
``test_w3c_conformance.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import baggage, trace
from opentelemetry.context import create_key, set_value
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from latency_common import tracestate
from latency_common.tracestate import Level2TraceState, parse, trim

Members = list[tuple[str, str]]

TRACE_ID = "12345678901234567890123456789012"
PARENT_ID = "1234567890123456"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"
ALLOWED_KEY = "abcdefghijklmnopqrstuvwxyz0123456789_-*/@"
ALLOWED_VALUE = (
    "".join(map(chr, range(0x20, 0x2C)))
    + "".join(map(chr, range(0x2D, 0x3D)))
    + "".join(map(chr, range(0x3E, 0x7F)))
)
BARS = [(f"bar{i:02d}", f"{i:02d}") for i in range(1, 34)]


def joined(members: Members, sep: str = ",") -> str:
    return sep.join(f"{k}={v}" for k, v in members)


def header_len(state: TraceState) -> int:
    return len(",".join(f"{k}={v}" for k, v in state.items()))


# -- parse: valid lists ------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(["foo=1,bar=2"], [("foo", "1"), ("bar", "2")], id="3.3.2.1 list in order"),
        pytest.param([joined(BARS[:32])], BARS[:32], id="3.3.2.1 32 members"),
        pytest.param(
            [joined(BARS[:10]), joined(BARS[10:20]), joined(BARS[20:32])],
            BARS[:32],
            id="3.3.2 field lines combined in order (RFC 9110 5.3)",
        ),
        pytest.param([""], [], id="3.3.2 MUST accept empty tracestate"),
        pytest.param(["", "foo=1", ""], [("foo", "1")], id="3.3.2 empty field lines"),
        pytest.param(
            [",foo=1,, ,\t,bar=2,"], [("foo", "1"), ("bar", "2")], id="3.3.2 empty members"
        ),
        pytest.param(
            ["foo=1 \t , \t bar=2,\t \tbaz=3"],
            [("foo", "1"), ("bar", "2"), ("baz", "3")],
            id="3.3.2 OWS around members ignored",
        ),
        pytest.param(["\t foo=1 \t"], [("foo", "1")], id="3.3.2 OWS around the field"),
        pytest.param(["z" * 256 + "=1"], [("z" * 256, "1")], id="3.3.2.2.1 key of 256"),
        pytest.param(["1vendor=x"], [("1vendor", "x")], id="3.3.2.2.1 key begins with a digit"),
        pytest.param(["foo@=1"], [("foo@", "1")], id="3.3.2.2.1 @ last"),
        pytest.param(["foo@@bar=1"], [("foo@@bar", "1")], id="3.3.2.2.1 @@"),
        pytest.param(["foo@bar@baz=1"], [("foo@bar@baz", "1")], id="3.3.2.2.1 two @"),
        pytest.param(["t" * 242 + "@v=1"], [("t" * 242 + "@v", "1")], id="3.3.2.2.1 long tenant"),
        pytest.param(
            ["t@" + "v" * 15 + "=1"], [("t@" + "v" * 15, "1")], id="3.3.2.2.1 long system"
        ),
        pytest.param(
            ["t" * 250 + "@" + "v" * 5 + "=1"],
            [("t" * 250 + "@" + "v" * 5, "1")],
            id="3.3.2.2.1 256 in total with @",
        ),
        pytest.param(
            [f"{ALLOWED_KEY}={ALLOWED_VALUE}"],
            [(ALLOWED_KEY, ALLOWED_VALUE)],
            id="3.3.2.2 every allowed character",
        ),
        pytest.param(["foo=  x  "], [("foo", "  x")], id="3.3.2.2.2 leading spaces MUST be kept"),
        pytest.param(["foo=" + "v" * 256], [("foo", "v" * 256)], id="3.3.2.2.2 value of 256"),
        pytest.param(["foo=1,foo=2"], [("foo", "1")], id="3.5 duplicate key: the first stays"),
        pytest.param(["foo=2", "foo=1"], [("foo", "2")], id="3.5 duplicate over two lines"),
    ],
)
def test_valid_list_is_kept(fields: list[str], expected: Members) -> None:
    state = parse(fields)
    assert isinstance(state, Level2TraceState)
    assert list(state.items()) == expected
    assert state.to_header() == joined(expected)


# -- parse: invalid lists are discarded whole ----------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        # §3.3.2.1: "There can be a maximum of 32 list-members in a list."
        pytest.param([joined(BARS)], id="3.3.2.1 33 members"),
        pytest.param([joined(BARS[:32]), "bar33=33"], id="3.3.2.1 33 over two lines"),
        pytest.param([joined(BARS[:32]), "bar01=1"], id="3.3.2.1 33 members, one a duplicate"),
        # §3.3.2.2.1: "A key MUST begin with a lowercase letter or a digit and
        # contain up to 256 characters including lowercase letters (a-z),
        # digits (0-9), underscores (_), dashes (-), asterisks (*), forward
        # slashes (/), and at signs (@)."
        pytest.param(["foo=1", "z" * 257 + "=1"], id="3.3.2.2.1 key of 257"),
        pytest.param(["t" * 242 + "@" + "v" * 14 + "=1"], id="3.3.2.2.1 key of 257 with @"),
        pytest.param(["foo=1,FOO=1"], id="3.3.2.2.1 uppercase key"),
        pytest.param(["foo =1"], id="3.3.2.2.1 space inside key"),
        pytest.param(["foo.bar=1"], id="3.3.2.2.1 dot in key"),
        pytest.param(["@foo=1,bar=2"], id="3.3.2.2.1 key begins with @"),
        pytest.param(["_foo=1"], id="3.3.2.2.1 key begins with _"),
        pytest.param(["=1"], id="3.3.2.2.1 empty key"),
        pytest.param(["foo"], id="3.3.2.2 member without ="),
        # §3.3.2.2.2: "up to 256 printable ASCII characters (i.e., the range
        # 0x20 to 0x7E) except comma (,) and (=) ... must end with a
        # character which is not a space".
        pytest.param(["foo=bar=baz"], id="3.3.2.2.2 = in value"),
        pytest.param(["foo=,bar=3"], id="3.3.2.2.2 empty value"),
        pytest.param(["foo=   "], id="3.3.2.2.2 spaces-only value"),
        pytest.param(["foo=" + "v" * 257], id="3.3.2.2.2 value of 257"),
        pytest.param(["foo=a\tb"], id="3.3.2.2.2 tab inside value"),
        pytest.param(["foo=a\x7fb"], id="3.3.2.2.2 DEL in value"),
        pytest.param(["foo=caf\u00e9"], id="3.3.2.2.2 non-ASCII value"),
        pytest.param(["foo=1\r\nbar=2"], id="3.3.2.2.2 CRLF in value"),
        # The memory bound: larger than any list written as §3.3.2 asks.
        pytest.param(
            ["foo=1" + " " * tracestate.MAX_HEADER_CHARS], id="over the gateway memory bound"
        ),
    ],
)
def test_invalid_list_is_discarded_whole(fields: list[str]) -> None:
    state = parse(fields)
    assert len(state) == 0
    assert state.to_header() == ""


def test_memory_bound_fits_every_valid_32_member_list() -> None:
    # 32 members of a 256-char key and a 256-char value (§3.3.2.1, §3.3.2.2),
    # even written with a single space around every comma (§3.3.2: OWS SHOULD
    # be a single space), across 32 field lines.
    biggest = [(f"{i:02d}" + "k" * 254, "v" * 256) for i in range(32)]
    for fields in ([joined(biggest, " , ")], [joined([m]) for m in biggest]):
        assert list(parse(fields).items()) == biggest
    assert len(joined(biggest, " , ")) == tracestate.MAX_HEADER_CHARS


# -- trim: §3.3.3.1 -------------------------------------------------------------------


def test_trim_returns_the_same_object_when_it_fits() -> None:
    state = parse(["foo=1,bar=2"])
    assert trim(state) is state
    assert trim(tracestate.EMPTY) is tracestate.EMPTY


def test_trim_boundary_is_512_characters() -> None:
    fits = parse(["a=" + "x" * 126, "b=" + "x" * 126, "c=" + "x" * 126, "d=" + "x" * 123])
    assert header_len(fits) == tracestate.PROPAGATE_CHARS == 512
    assert trim(fits) is fits
    over = Level2TraceState([*list(fits.items())[:3], ("d", "x" * 124)])
    assert header_len(over) == 513
    assert list(trim(over).keys()) == ["a", "b", "c"]


def test_trim_drops_members_longer_than_128_first() -> None:
    # §3.3.3.1: "Entries larger than 128 characters long SHOULD be removed first."
    state = Level2TraceState(
        [("short1", "1"), ("long1", "x" * 200), ("edge", "x" * 123), ("long2", "y" * 250)]
    )
    assert len("edge=" + "x" * 123) == tracestate.LONG_MEMBER_CHARS
    assert list(trim(state).items()) == [("short1", "1"), ("edge", "x" * 123)]


def test_trim_then_drops_members_from_the_end() -> None:
    # §3.3.3.1: "Then entries SHOULD be removed starting from the end."
    state = Level2TraceState([(f"k{i:02d}", "v" * 100) for i in range(6)])  # 629 chars
    trimmed = trim(state)
    assert list(trimmed.keys()) == ["k00", "k01", "k02", "k03"]
    assert header_len(trimmed) == 4 * 104 + 3


def test_trim_drops_long_members_before_any_from_the_end() -> None:
    state = Level2TraceState([("first", "x" * 300), *[(f"k{i}", "v" * 50) for i in range(6)]])
    assert list(trim(state).keys()) == [f"k{i}" for i in range(6)]


def test_trim_honours_a_custom_limit_and_keeps_level_2_keys() -> None:
    state = parse(["1a@=1,b=2,c=3"])
    assert list(trim(state, limit_chars=9).items()) == [("1a@", "1"), ("b", "2")]
    assert trim(state, limit_chars=13) is state


# -- Level2TraceState: an OTel TraceState ------------------------------------------------


def test_every_public_method_of_otel_tracestate_is_overridden() -> None:
    # The base class keeps its members in a private store our class leaves
    # empty: a method OTel adds later would read that empty store. This
    # fails then, naming it, so it gets overridden too.
    # Mapping's mixins (get, __eq__) go through the overridden methods;
    # get_default is ``cls()``, an empty Level2TraceState.
    defined = {
        name
        for name, member in vars(TraceState).items()
        if callable(member) or isinstance(member, classmethod)
    } - {"__init__", "get_default"}
    missing = sorted(n for n in defined if n not in vars(Level2TraceState))
    assert missing == [], f"Level2TraceState must override {missing}"
    assert isinstance(Level2TraceState.get_default(), Level2TraceState)


def test_mutators_follow_level_2_and_return_new_objects() -> None:
    # §3.5 (mutating the tracestate field): new and updated keys go left.
    state = parse(["1a=1,b=2"])
    added = state.add("x@", "9")
    assert list(added.items()) == [("x@", "9"), ("1a", "1"), ("b", "2")]
    assert list(state.items()) == [("1a", "1"), ("b", "2")]
    assert list(added.update("b", "3").items()) == [("b", "3"), ("x@", "9"), ("1a", "1")]
    assert list(added.delete("1a").items()) == [("x@", "9"), ("b", "2")]
    # Invalid pairs, duplicates and a 33rd member leave the state as it was.
    assert state.add("Bad", "1") is state
    assert state.add("b", "5") is state
    assert state.update("b", "") is state
    assert state.delete("zz") is state
    full = parse([joined(BARS[:32])])
    assert full.add("new", "1") is full
    assert full.update("new", "1") is full
    assert isinstance(Level2TraceState.from_header(["1a=1"]), Level2TraceState)


def test_sdk_carries_the_level_2_state_to_child_spans() -> None:
    # The samplers hand the parent's trace_state to the child as is; this
    # fails if a new SDK rebuilds it through TraceState's Level 1 grammar.
    state = parse(["1vendor@=x,bar=2"])
    parent = SpanContext(
        int(TRACE_ID, 16),
        int(PARENT_ID, 16),
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=state,
    )
    tracer = TracerProvider().get_tracer("test")
    span = tracer.start_span("s", context=trace.set_span_in_context(NonRecordingSpan(parent)))
    span.end()
    assert span.get_span_context().trace_state.to_header() == "1vendor@=x,bar=2"


# -- the propagator ----------------------------------------------------------------------


def test_propagator_extracts_level_2_tracestate_and_injects_it() -> None:
    carrier = {"traceparent": VALID, "tracestate": "foo@=1, 1bar=2"}
    ctx = tracestate.PROPAGATOR.extract(carrier)
    got = trace.get_current_span(ctx).get_span_context()
    assert f"{got.trace_id:032x}" == TRACE_ID
    assert list(got.trace_state.items()) == [("foo@", "1"), ("1bar", "2")]
    out: dict[str, str] = {}
    tracestate.PROPAGATOR.inject(out, ctx)
    assert out == {"traceparent": VALID, "tracestate": "foo@=1,1bar=2"}


def test_propagator_trims_to_512_characters() -> None:
    members = [(f"k{i:02d}", "v" * 100) for i in range(6)]
    ctx = tracestate.PROPAGATOR.extract({"traceparent": VALID, "tracestate": joined(members)})
    got = trace.get_current_span(ctx).get_span_context()
    assert list(got.trace_state.keys()) == ["k00", "k01", "k02", "k03"]


@pytest.mark.parametrize(
    "traceparent", [f"00-{'0' * 32}-{PARENT_ID}-01", "garbage"], ids=["all-zero id", "garbage"]
)
def test_propagator_does_not_parse_tracestate_when_traceparent_failed(traceparent: str) -> None:
    # §3.3: "If the vendor failed to parse traceparent, it MUST NOT attempt
    # to parse tracestate."
    ctx = tracestate.PROPAGATOR.extract({"traceparent": traceparent, "tracestate": "foo=1"})
    assert not trace.get_current_span(ctx).get_span_context().is_valid


# -- fuzz ------------------------------------------------------------------------------------

_PRINTABLE = st.characters(min_codepoint=0x09, max_codepoint=0x7F)


@given(st.lists(st.text(alphabet=_PRINTABLE, max_size=300), max_size=6))
def test_any_input_gives_a_valid_list_or_nothing(fields: list[str]) -> None:
    state = parse(fields)
    header = state.to_header()
    # What comes out re-parses to itself: every member is valid Level 2.
    assert list(parse([header]).items()) == list(state.items())
    assert len(state) <= tracestate.MAX_MEMBERS
    assert header_len(trim(state)) <= tracestate.PROPAGATE_CHARS


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z0-9][a-z0-9_\-*/@]{0,20}", fullmatch=True),
            st.from_regex(
                r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,30}[\x21-\x2b\x2d-\x3c\x3e-\x7e]", fullmatch=True
            ),
        ),
        max_size=32,
        unique_by=lambda kv: kv[0],
    ),
    st.sampled_from([",", " , ", "\t,", ",,"]),
)
def test_any_valid_list_is_kept_whole_and_in_order(members: Members, sep: str) -> None:
    assert list(parse([joined(members, sep)]).items()) == members


# -- exact bounds and the rest of the interface (each found by `make mutate`) ------------


def test_a_member_of_129_characters_is_long() -> None:
    # §3.3.3.1: "larger than 128 characters" is 129 and up.
    state = Level2TraceState([("edge", "x" * 123), ("over", "x" * 124), ("z", "z" * 400)])
    assert list(trim(state).keys()) == ["edge"]


def test_a_single_member_exactly_at_the_limit_fits() -> None:
    state = parse(["a=12345678"])
    assert trim(state, limit_chars=10) is state
    assert list(trim(state, limit_chars=9).items()) == []


@pytest.mark.parametrize("lines", [1, 2, 32])
def test_the_list_may_be_exactly_the_largest_valid_one(lines: int) -> None:
    # The bound counts the commas that join field lines (RFC 9110 §5.3):
    # MAX_HEADER_CHARS is the longest valid list; one more character is not.
    biggest = [(f"{i:02d}" + "k" * 254, "v" * 256) for i in range(32)]
    size = 32 // lines
    fields = [joined(biggest[i : i + size]) for i in range(0, 32, size)]
    # Filled up with the optional white space a member may carry (§3.3.2).
    fields[-1] += " " * (tracestate.MAX_HEADER_CHARS - sum(map(len, fields)) - len(fields) + 1)
    assert sum(map(len, fields)) + len(fields) - 1 == tracestate.MAX_HEADER_CHARS
    assert list(parse(fields).items()) == biggest
    fields[-1] += " "
    assert len(parse(fields)) == 0


@pytest.mark.parametrize("space", ["\n", "\r", "\x0b", "\x0c", "\u00a0"])
def test_only_spaces_and_tabs_surround_a_member(space: str) -> None:
    # §3.3.2: OWS (RFC 9110 §5.6.3) is SP / HTAB, nothing else.
    assert len(parse([f"a=1,{space}b=2"])) == 0
    assert list(parse(["a=1,\t b=2 \t"]).items()) == [("a", "1"), ("b", "2")]


def test_the_state_reads_as_a_mapping() -> None:
    state = parse(["foo@=1,bar=2"])
    assert "foo@" in state
    assert "baz" not in state
    assert list(state) == ["foo@", "bar"]
    assert repr(state) == "Level2TraceState([('foo@', '1'), ('bar', '2')])"


def test_update_of_a_present_key_in_a_full_list_moves_it_left() -> None:
    # §3.5: a modified key moves to the left; the list stays at 32.
    full = Level2TraceState([(f"k{i:02d}", "v") for i in range(32)])
    updated = full.update("k31", "new")
    assert list(updated.items())[:2] == [("k31", "new"), ("k00", "v")]
    assert len(updated) == 32
    assert full.update("k32", "v") is full


def test_the_propagator_keeps_the_callers_context() -> None:
    marker = create_key("caller")
    base = set_value(marker, "kept")
    for carrier in (
        {"traceparent": VALID, "tracestate": "foo@=1"},
        {"traceparent": VALID},
        {"traceparent": "garbage", "tracestate": "foo=1"},
        {},
    ):
        ctx = tracestate.PROPAGATOR.extract(carrier, base)
        assert ctx.get(marker) == "kept", carrier


def test_no_tracestate_without_a_valid_traceparent() -> None:
    # §3.3: "If the vendor failed to parse traceparent, it MUST NOT attempt
    # to parse tracestate": nothing is set in the context at all.
    ctx = tracestate.PROPAGATOR.extract({"traceparent": "garbage", "tracestate": "foo=1"})
    assert trace.get_current_span(ctx) is trace.INVALID_SPAN


def test_the_propagator_reads_through_the_callers_getter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class PairsGetter:
        def get(self, carrier: list[tuple[str, str]], key: str) -> list[str] | None:
            found = [v for k, v in carrier if k == key]
            return found or None

        def keys(self, carrier: list[tuple[str, str]]) -> list[str]:
            return [k for k, _ in carrier]

    carrier = [("traceparent", VALID), ("tracestate", "1foo@=1")]
    with caplog.at_level("DEBUG"):
        ctx = tracestate.PROPAGATOR.extract(carrier, getter=PairsGetter())  # type: ignore[arg-type]
    got = trace.get_current_span(ctx).get_span_context()
    assert f"{got.trace_id:032x}" == TRACE_ID
    assert list(got.trace_state.items()) == [("1foo@", "1")]
    # OTel's Level 1 parser never saw the tracestate: it would warn about "1foo@".
    assert caplog.records == []


def test_global_propagator_reads_tracecontext_level_2_and_baggage() -> None:
    ctx = tracestate.global_propagator().extract(
        {"traceparent": VALID, "tracestate": "1foo@=1", "baggage": "user=42"}
    )
    got = trace.get_current_span(ctx).get_span_context()
    assert list(got.trace_state.items()) == [("1foo@", "1")]
    assert baggage.get_baggage("user", ctx) == "42"
