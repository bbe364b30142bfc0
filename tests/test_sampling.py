"""The bound of the gateway's trace-id ratio sampler, as the snippet gets it
(``gateway/sampling.py``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)

from gateway.sampling import ratio_bound, snippet_bound


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(min_value=0.0, max_value=1.0))
def test_the_bound_is_the_sdks_for_both_ratio_samplers(rate: float) -> None:
    expected = TraceIdRatioBased(rate).bound
    assert ratio_bound(TraceIdRatioBased(rate)) == expected
    assert ratio_bound(ParentBasedTraceIdRatio(rate)) == expected


@pytest.mark.parametrize(
    ("rate", "written"),
    [
        (0.0, "0000000000000000"),
        (2**-64, "0000000000000001"),
        (0.25, "4000000000000000"),
        (0.5, "8000000000000000"),
        (1 - 2**-53, "fffffffffffff800"),
        (1.0, None),  # 2**64: every id is below it, no 16-digit form needed
    ],
)
def test_the_snippet_gets_16_hex_digits_or_null(rate: float, written: str | None) -> None:
    assert snippet_bound(TraceIdRatioBased(rate)) == written
    assert snippet_bound(ParentBasedTraceIdRatio(rate)) == written


@pytest.mark.parametrize(
    "sampler",
    [None, ALWAYS_ON, ALWAYS_OFF, DEFAULT_ON, ParentBased(ALWAYS_OFF)],
    ids=["none", "always_on", "always_off", "parentbased_always_on", "parentbased_always_off"],
)
def test_other_samplers_give_no_bound(sampler: Sampler | None) -> None:
    assert ratio_bound(sampler) is None
    assert snippet_bound(sampler) is None
