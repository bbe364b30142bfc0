"""The gateway's trace-id ratio, told to the snippet it serves (README,
"Add it to your frontend" and "Scaling out", rule 5).

What it is for: with ``OTEL_TRACES_SAMPLER=traceidratio`` or
``parentbased_traceidratio`` the gateway keeps a trace when the lower 64 bits
of its trace id are below a bound (OpenTelemetry's ``TraceIdRatioBased``:
``round(ratio * 2**64)``). Written as 16 lowercase hex digits into the
snippet served at ``/__gateway/snippet.js?sampled=gateway``, that bound lets
the snippet set the ``sampled`` flag of its ``traceparent`` to the decision
the gateway will make: hex strings of one length compare as the numbers do,
so the snippet needs no 64-bit arithmetic.

Not for: sampling anything (the SDK's sampler decides, this only reads it),
nor serving the snippet (``reserved.py``).
"""

from __future__ import annotations

from typing import Final

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)

#: The samplers ``traceidratio`` and ``parentbased_traceidratio`` build.
RATIO_SAMPLERS: Final = (TraceIdRatioBased, ParentBasedTraceIdRatio)
#: TraceIdRatioBased decides on the trace id's lower 64 bits.
LOW_BITS: Final = 64


def ratio_bound(sampler: Sampler | None) -> int | None:
    """The bound a ratio sampler compares a root trace id's lower 64 bits
    with (sampled iff below it), or None for any other sampler.

    ParentBasedTraceIdRatio keeps its ratio sampler private, so the bound is
    found by asking the sampler itself (its public ``should_sample``) about
    root spans: the least lower half it drops, by bisection over 2**64
    (65 questions, once at start-up). For a root span both samplers ask
    their TraceIdRatioBased, whose decision is a threshold on that half."""
    if not isinstance(sampler, RATIO_SAMPLERS):
        return None
    # An empty context: no parent, so ParentBased asks its root sampler.
    root = Context()

    def sampled(low: int) -> bool:
        # Any upper half: only the lower one is read. A non-zero one keeps
        # the id valid (W3C Trace Context §3.2.2.3: all zeros is invalid).
        trace_id = (1 << LOW_BITS) | low
        result = sampler.should_sample(root, trace_id, "sampled flag")
        return result.decision == Decision.RECORD_AND_SAMPLE

    # Invariant: every lower half below `low` is sampled, none from `high` on.
    low, high = 0, 1 << LOW_BITS
    while low < high:
        middle = (low + high) // 2
        if sampled(middle):
            low = middle + 1
        else:
            high = middle
    return low


def snippet_bound(sampler: Sampler | None) -> str | None:
    """The value the snippet's sample-bound marker gets: the bound as 16
    lowercase hex digits, or None (the snippet then flags every trace
    sampled) when the sampler is no ratio sampler or keeps every trace (a
    ratio of 1: the bound 2**64 has no 16-digit form, and needs none)."""
    bound = ratio_bound(sampler)
    if bound is None or bound >= 1 << LOW_BITS:
        return None
    return f"{bound:016x}"
