"""W3C Trace Context Level 2 ``tracestate``: parse it, trim it, write it.

What it is for: turning the ``tracestate`` field lines of a request into the
list of members the gateway sends on, by the rules of W3C Trace Context
Level 2 (https://www.w3.org/TR/trace-context-2/, section 3.3 "Tracestate
Header") rather than the Level 1 grammar OpenTelemetry's ``TraceState``
enforces. :class:`Level2TraceState` is an OTel ``TraceState``, so a parsed list
rides in a ``SpanContext`` through the SDK (the samplers hand the parent's
object to the child) and out of ``TraceContextTextMapPropagator.inject``
unchanged. :data:`PROPAGATOR` is the OTel W3C propagator with this parser, and
:func:`global_propagator` the global one to install in services whose
instrumentations propagate through it (the example backend).

Not for: ``traceparent`` (the OTel propagator parses it) or the trust policy
(``context.py``). Pure: no I/O, no logging (a bad list from a browser is a
verdict, not an event worth a log line).
"""

from __future__ import annotations

import re
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Sequence, ValuesView
from typing import Final

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import CarrierT, Getter, TextMapPropagator, default_getter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

#: §3.3.2.1 (list): "There can be a maximum of 32 list-members in a list".
MAX_MEMBERS: Final = 32
#: §3.3.2.2.1 (key): ``key = ( lcalpha / DIGIT ) 0*255 ( keychar )``, so 256
#: characters in total, wherever its ``@`` signs are.
MAX_KEY_CHARS: Final = 256
#: §3.3.2.2.2 (value): ``value = 0*255(chr) nblk-chr``.
MAX_VALUE_CHARS: Final = 256
#: §3.3.3.1 (tracestate limits): vendors SHOULD propagate at least 512
#: characters of the combined header; when truncating, entries longer than
#: 128 characters go first, then entries from the end.
PROPAGATE_CHARS: Final = 512
LONG_MEMBER_CHARS: Final = 128
#: The only size guard before parsing, a memory bound: the longest valid list
#: (32 members of key, ``=`` and value at their maximum) joined with the
#: separator §3.3.2 lets a caller generate (``OWS "," OWS``, OWS "SHOULD" be
#: a single space). Larger cannot be a valid list written the way the spec
#: asks; it is discarded, the traceparent still holds.
MAX_HEADER_CHARS: Final = MAX_MEMBERS * (MAX_KEY_CHARS + 1 + MAX_VALUE_CHARS) + (
    MAX_MEMBERS - 1
) * len(" , ")

# §3.3.2.2.1: a key begins with a lowercase letter or a digit; "@" is an
# ordinary keychar (Level 2 dropped Level 1's tenant@system split).
_KEY: Final = r"[a-z0-9][a-z0-9_\-*/@]{0,255}"
# §3.3.2.2.2: printable ASCII but "," and "=", the last one not a space.
_VALUE: Final = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER: Final = re.compile(f"({_KEY})=({_VALUE})")
_KEY_RE: Final = re.compile(_KEY)
_VALUE_RE: Final = re.compile(_VALUE)
# §3.3.2: "Spaces and horizontal tabs surrounding list-members are ignored"
# (OWS, RFC 9110 §5.6.3).
_OWS: Final = " \t"


class Level2TraceState(TraceState):
    """An OTel ``TraceState`` whose members follow the Level 2 grammar.

    OTel's constructor drops, with a warning, every key its Level 1 pattern
    rejects (``foo@``, ``1vendor``, a 242-character tenant), so the members
    live here and the ``Mapping`` interface and ``to_header`` read them; the
    base class's own store stays empty. Every public method of the base class
    is overridden (a test checks it, so a new OTel method that would read the
    empty store fails loudly). Build it with :func:`parse`; the mutators
    validate as :func:`parse` does and return a new object.
    """

    def __init__(self, members: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__()
        self._members: dict[str, str] = dict(members)

    def __contains__(self, item: object) -> bool:
        return item in self._members

    def __getitem__(self, key: str) -> str:
        return self._members[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def keys(self) -> KeysView[str]:
        return self._members.keys()

    def items(self) -> ItemsView[str, str]:
        return self._members.items()

    def values(self) -> ValuesView[str]:
        return self._members.values()

    def __repr__(self) -> str:
        return f"Level2TraceState({list(self._members.items())!r})"

    def to_header(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self._members.items())

    def add(self, key: str, value: str) -> TraceState:
        # §3.5 (mutating the tracestate field): a new pair goes to the left;
        # it MUST NOT make a key appear twice; the list stays within 32.
        if key in self._members or len(self._members) >= MAX_MEMBERS or not _valid(key, value):
            return self
        return Level2TraceState([(key, value), *self._members.items()])

    def update(self, key: str, value: str) -> TraceState:
        # §3.5: a modified key moves to the beginning (left) of the list. An
        # absent key is added, within 32 members, as OTel's ``update`` does.
        if not _valid(key, value):
            return self
        if key not in self._members and len(self._members) >= MAX_MEMBERS:
            return self
        rest = [(k, v) for k, v in self._members.items() if k != key]
        return Level2TraceState([(key, value), *rest])

    def delete(self, key: str) -> TraceState:
        if key not in self._members:
            return self
        return Level2TraceState((k, v) for k, v in self._members.items() if k != key)

    @classmethod
    def from_header(cls, header_list: list[str]) -> TraceState:
        return parse(header_list)


EMPTY: Final = Level2TraceState()


def _valid(key: str, value: str) -> bool:
    return _KEY_RE.fullmatch(key) is not None and _VALUE_RE.fullmatch(value) is not None


def parse(fields: Sequence[str]) -> Level2TraceState:
    """The list the ``tracestate`` field lines make, or :data:`EMPTY` when
    they are not a valid Level 2 list (the whole list is discarded then, as
    the W3C suite expects of an invalid member; the traceparent still holds,
    §3.3: "failure to parse tracestate MUST NOT affect the parsing of
    traceparent")."""
    # §3.3.2 / RFC 9110 §5.3: several field lines combine, in order, joined by ",".
    if sum(map(len, fields)) + len(fields) - 1 > MAX_HEADER_CHARS:
        return EMPTY
    members: dict[str, str] = {}
    count = 0
    for field in fields:
        for raw in field.split(","):
            member = raw.strip(_OWS)
            if not member:
                # §3.3.2: "Empty and whitespace-only list members are allowed".
                continue
            match = _MEMBER.fullmatch(member)
            if match is None:
                return EMPTY
            count += 1
            if count > MAX_MEMBERS:
                return EMPTY
            key, value = match.groups()
            # §3.5 (mutating the tracestate field): "vendors MAY also discard
            # duplicate keys that were not generated by them"; the left-most
            # is the most recent position (§3.3.3), so the first one stays.
            # The list stays valid: the W3C suite's
            # test_tracestate_duplicated_keys expects it inherited.
            members.setdefault(key, value)
    return Level2TraceState(members.items()) if members else EMPTY


def header_chars(members: Iterable[tuple[str, str]]) -> int:
    """The length of ``members`` written as one header (commas included)."""
    lengths = [len(key) + 1 + len(value) for key, value in members]
    return sum(lengths) + max(0, len(lengths) - 1)


def trim(state: TraceState, limit_chars: int = PROPAGATE_CHARS) -> TraceState:
    """``state`` cut to ``limit_chars`` by whole entries, as §3.3.3.1 says:
    entries longer than 128 characters are removed first, then entries from
    the end (the right-most are the oldest positions, §3.3.3). Returns the
    same object when it already fits."""
    items = list(state.items())
    if header_chars(items) <= limit_chars:
        return state
    items = [kv for kv in items if len(kv[0]) + 1 + len(kv[1]) <= LONG_MEMBER_CHARS]
    while items and header_chars(items) > limit_chars:
        items.pop()
    return Level2TraceState(items)


class _WithoutTracestate(Getter[CarrierT]):
    """A getter that hides ``tracestate`` from OTel's parser (this module
    parses it) and passes everything else through."""

    def __init__(self, inner: Getter[CarrierT]) -> None:
        self._inner = inner

    def get(self, carrier: CarrierT, key: str) -> list[str] | None:
        return None if key == "tracestate" else self._inner.get(carrier, key)

    def keys(self, carrier: CarrierT) -> list[str]:
        return self._inner.keys(carrier)


class Level2TraceContextPropagator(TraceContextTextMapPropagator):
    """OTel's W3C propagator with this module's ``tracestate`` rules:
    ``traceparent`` is parsed by OTel; ``tracestate`` (only once that
    succeeded, §3.3) by :func:`parse`, then trimmed by :func:`trim`.
    ``inject`` is OTel's: it writes ``trace_state.to_header()``."""

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        extracted = super().extract(carrier, context, _WithoutTracestate(getter))
        span_context = trace.get_current_span(extracted).get_span_context()
        if extracted is context or not span_context.is_valid:
            return extracted
        fields = getter.get(carrier, "tracestate")
        if not fields:
            return extracted
        return trace.set_span_in_context(
            NonRecordingSpan(with_trace_state(span_context, trim(parse(fields)))), extracted
        )


def with_trace_state(span_context: SpanContext, state: TraceState) -> SpanContext:
    """``span_context`` with ``state`` as its tracestate, nothing else changed."""
    if state is span_context.trace_state:
        return span_context
    return SpanContext(
        span_context.trace_id,
        span_context.span_id,
        is_remote=span_context.is_remote,
        trace_flags=span_context.trace_flags,
        trace_state=state,
    )


#: The W3C propagator with Level 2 ``tracestate`` rules, stateless and shared.
PROPAGATOR: Final = Level2TraceContextPropagator()


def global_propagator() -> TextMapPropagator:
    """OTel's default global propagator (``tracecontext,baggage``) with this
    module's ``tracestate`` rules, for a service's entry point to pass to
    ``opentelemetry.propagate.set_global_textmap`` (the example backend's
    ``cli`` and ``wsgi`` do: its Flask and ``requests`` instrumentations
    extract and inject through the global propagator)."""
    return CompositePropagator([PROPAGATOR, W3CBaggagePropagator()])
