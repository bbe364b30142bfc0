"""Per-route latency statistics and their text table (``python -m
viewer report``).

What it is for: from the SERVER spans of each trace, the route (the
backend span's ``http.route``, else the gateway span's name) and the
figures users compare across routes: the clock-free round trip
``latency.rtt_ms``, the uplink ``latency.uplink_ms`` (only where the
gateway's verdict was ``ok``: other verdicts are claims it did not accept),
the gateway's own time ``latency.gateway_ms`` and the backend SERVER span's
duration; nearest-rank percentiles and an uplink histogram. Pure: spans in,
dataclasses and text out (the store computes the same from SQL, ``rollup.py``).

Not for: reading the database (``store.py``) or HTML (``pages.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from latency_common import attributes as attr
from viewer.spans import SpanRecord, backend_span, gateway_span, number, route

#: Upper edges (ms) of the uplink histogram's bins; a last bin takes the rest.
#: Roughly logarithmic: loopback, LAN, same region, far away, mobile, broken.
HISTOGRAM_EDGES_MS: Final = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
PERCENTILES: Final = (50, 95, 99)
METRICS: Final = ("rtt", "uplink", "gateway", "backend")


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p % of the
    values at or below it (no interpolation, so it is always a value that
    was measured)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class Summary:
    count: int
    p50: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        ordered = sorted(values)
        return cls(
            len(ordered), percentile(ordered, 50), percentile(ordered, 95), percentile(ordered, 99)
        )

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "p50": self.p50, "p95": self.p95, "p99": self.p99}


@dataclass(frozen=True, slots=True)
class Bin:
    lo_ms: float | None  # None: open below
    hi_ms: float | None  # None: open above
    count: int

    @property
    def label(self) -> str:
        if self.lo_ms is None:
            return f"< {self.hi_ms:g}"
        if self.hi_ms is None:
            return f"≥ {self.lo_ms:g}"
        return f"{self.lo_ms:g}–{self.hi_ms:g}"


def histogram(values: Iterable[float], edges: Sequence[float] = HISTOGRAM_EDGES_MS) -> list[Bin]:
    counts = [0] * (len(edges) + 1)
    for value in values:
        index = next((i for i, edge in enumerate(edges) if value < edge), len(edges))
        counts[index] += 1
    bounds: list[float | None] = [None, *edges, None]
    return [Bin(bounds[i], bounds[i + 1], n) for i, n in enumerate(counts)]


@dataclass(frozen=True, slots=True)
class RouteStats:
    route: str
    count: int
    rtt_ms: Summary
    uplink_ms: Summary
    gateway_ms: Summary
    backend_ms: Summary
    uplink_histogram: tuple[Bin, ...]

    def metric(self, name: str) -> Summary:
        return {
            "rtt": self.rtt_ms,
            "uplink": self.uplink_ms,
            "gateway": self.gateway_ms,
            "backend": self.backend_ms,
        }[name]

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "count": self.count,
            "rtt_ms": self.rtt_ms.to_json(),
            "uplink_ms": self.uplink_ms.to_json(),
            "gateway_ms": self.gateway_ms.to_json(),
            "backend_ms": self.backend_ms.to_json(),
            "uplink_histogram": [
                {"lo_ms": b.lo_ms, "hi_ms": b.hi_ms, "count": b.count}
                for b in self.uplink_histogram
            ],
        }


@dataclass(frozen=True, slots=True)
class TraceFigures:
    """What one trace adds to its route's row: the route and each figure it
    has (None where it has none). The store keeps one of these per trace,
    refreshed whenever the trace's SERVER spans change."""

    route: str
    rtt_ms: float | None
    uplink_ms: float | None
    gateway_ms: float | None
    backend_ms: float | None

    def metric(self, name: str) -> float | None:
        return {
            "rtt": self.rtt_ms,
            "uplink": self.uplink_ms,
            "gateway": self.gateway_ms,
            "backend": self.backend_ms,
        }[name]


def trace_figures(spans: Sequence[SpanRecord]) -> TraceFigures | None:
    """The figures of one trace from its SERVER spans (other spans are
    ignored); None when it has no route (no gateway or backend span)."""
    name = route(spans)
    if name is None:
        return None
    rtt = gateway_ms = uplink = backend_ms = None
    gateway = gateway_span(spans)
    if gateway is not None:
        attrs = gateway.attributes
        rtt = number(attrs.get(attr.RTT_MS))
        gateway_ms = number(attrs.get(attr.GATEWAY_MS))
        if attrs.get(attr.STATUS) == "ok":
            uplink = number(attrs.get(attr.UPLINK_MS))
    backend = backend_span(spans)
    if backend is not None:
        backend_ms = round(backend.duration_ns / 1e6, 3)
    return TraceFigures(name, rtt, uplink, gateway_ms, backend_ms)


def route_stats(traces: Iterable[Sequence[SpanRecord]]) -> list[RouteStats]:
    """One row per route, the busiest first. ``traces``: the SERVER spans of
    each trace (other spans are ignored). The reference computation, in
    memory; the viewer reads the same rows from SQL (``rollup.py``)."""
    by_route: dict[str, list[TraceFigures]] = {}
    for spans in traces:
        figures = trace_figures(spans)
        if figures is not None:
            by_route.setdefault(figures.route, []).append(figures)
    rows = []
    for name, members in by_route.items():
        values = {
            metric: [v for f in members if (v := f.metric(metric)) is not None]
            for metric in METRICS
        }
        rows.append(
            RouteStats(
                route=name,
                count=len(members),
                rtt_ms=Summary.of(values["rtt"]),
                uplink_ms=Summary.of(values["uplink"]),
                gateway_ms=Summary.of(values["gateway"]),
                backend_ms=Summary.of(values["backend"]),
                uplink_histogram=tuple(histogram(values["uplink"])),
            )
        )
    return sorted(rows, key=lambda r: (-r.count, r.route))


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    # Sub-millisecond figures (a loopback backend) would all read "0.0".
    return f"{value:.1f}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"


def _triple(summary: Summary) -> str:
    return " / ".join(fmt_ms(getattr(summary, f"p{p}")) for p in PERCENTILES)


def format_table(stats: Sequence[RouteStats]) -> str:
    """An aligned text table: route, traces, then p50 / p95 / p99 in ms of
    each figure (``-`` where there is no sample; ``n`` counts uplink
    samples, which only ``ok`` verdicts give)."""
    header = [
        "route",
        "traces",
        "rtt_ms p50/p95/p99",
        "uplink n",
        "uplink_ms p50/p95/p99",
        "gateway_ms p50/p95/p99",
        "backend_ms p50/p95/p99",
    ]
    rows = [
        [
            r.route,
            str(r.count),
            _triple(r.rtt_ms),
            str(r.uplink_ms.count),
            _triple(r.uplink_ms),
            _triple(r.gateway_ms),
            _triple(r.backend_ms),
        ]
        for r in stats
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Route left-aligned, numbers right-aligned so decimals line up.
        parts = [cells[0].ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)]) + "\n"
