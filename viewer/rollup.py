"""Per-route latency from SQL: one row of figures per trace, kept on write.

What it is for: ``/latency`` and ``report`` at the retention limit. Reading
every SERVER span into Python and decoding its attributes took seconds and
hundreds of MB with 100 000 spans; instead the store keeps a
``trace_figures`` row per trace (route, rtt, uplink, gateway, backend ms,
computed by ``report.trace_figures`` from the trace's SERVER spans, so the
route and figure rules live in one place) and refreshes it in the same
transaction as any insert or deletion touching those spans. Per-route
counts, nearest-rank percentiles and the uplink histogram are then read
from an index per figure, ``(route, figure, start_ns)``: a percentile is
the row at its rank in that index (``LIMIT 1 OFFSET rank - 1``), so no
query sorts, and nothing but the answers leaves SQLite.

Not for: connections, transactions or retention (``store.py``); the rules
themselves (``report.py``, ``spans.py``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Final

from viewer.report import (
    HISTOGRAM_EDGES_MS,
    METRICS,
    PERCENTILES,
    Bin,
    RouteStats,
    Summary,
    trace_figures,
)
from viewer.spans import KIND_SERVER, SpanRecord

SCHEMA: Final = """
-- One row per trace that has a route. start_ns: its first SERVER span's
-- start, what the --since window filters on.
CREATE TABLE IF NOT EXISTS trace_figures (
    trace_id   TEXT    PRIMARY KEY,
    start_ns   INTEGER NOT NULL,
    route      TEXT    NOT NULL,
    rtt_ms     REAL,
    uplink_ms  REAL,
    gateway_ms REAL,
    backend_ms REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS trace_figures_by_start ON trace_figures (start_ns);
-- One index per figure, in the order the percentiles read it: a route's
-- values sorted, start_ns alongside so the --since window filters without
-- leaving the index.
CREATE INDEX IF NOT EXISTS trace_figures_rtt ON trace_figures (route, rtt_ms, start_ns);
CREATE INDEX IF NOT EXISTS trace_figures_uplink ON trace_figures (route, uplink_ms, start_ns);
CREATE INDEX IF NOT EXISTS trace_figures_gateway ON trace_figures (route, gateway_ms, start_ns);
CREATE INDEX IF NOT EXISTS trace_figures_backend ON trace_figures (route, backend_ms, start_ns);
"""

#: Column of each metric (constants spliced into queries; values are bound).
_COLUMN: Final = {"rtt": "rtt_ms", "uplink": "uplink_ms", "gateway": "gateway_ms",
                  "backend": "backend_ms"}  # fmt: skip
#: SQLite's limit on bound parameters is 32 766 since 3.32; stay well under.
_INDEX: Final = {metric: f"trace_figures_{metric}" for metric in _COLUMN}
_CHUNK: Final = 500
_MIN_NS: Final = -(2**63)


def refresh(conn: sqlite3.Connection, trace_ids: Iterable[str]) -> None:
    """Recompute the rows of ``trace_ids`` from their SERVER spans as stored
    now (inside the caller's transaction)."""
    ids = sorted(set(trace_ids))
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        servers: dict[str, list[SpanRecord]] = {}
        query = (
            "SELECT trace_id, span_id, service, name, start_ns, end_ns, attributes "  # noqa: S608
            f"FROM spans WHERE trace_id IN ({marks}) AND kind = {KIND_SERVER}"
        )
        for trace_id, span_id, service, name, start_ns, end_ns, attributes in conn.execute(
            query, chunk
        ):
            span = SpanRecord(
                trace_id=trace_id,
                span_id=span_id,
                parent_span_id="",  # the rules below do not look at parentage
                service=service,
                name=name,
                kind=KIND_SERVER,
                start_ns=start_ns,
                end_ns=end_ns,
                status_code=0,
                status_message="",
                attributes=json.loads(attributes),
                events=[],
            )
            servers.setdefault(trace_id, []).append(span)
        conn.execute(f"DELETE FROM trace_figures WHERE trace_id IN ({marks})", chunk)  # noqa: S608
        rows = []
        for trace_id, spans in servers.items():
            f = trace_figures(spans)
            if f is not None:
                start_ns = min(s.start_ns for s in spans)
                rows.append((trace_id, start_ns, f.route, f.rtt_ms, f.uplink_ms, f.gateway_ms,
                             f.backend_ms))  # fmt: skip
        conn.executemany("INSERT INTO trace_figures VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


def rebuild(conn: sqlite3.Connection) -> None:
    """Rows for every stored trace (a store written before the table existed)."""
    trace_ids = [
        t
        for (t,) in conn.execute(f"SELECT DISTINCT trace_id FROM spans WHERE kind = {KIND_SERVER}")  # noqa: S608
    ]
    refresh(conn, trace_ids)


def route_stats(conn: sqlite3.Connection, since_ns: int | None = None) -> list[RouteStats]:
    """What ``report.route_stats`` gives for the same traces, from SQL: one
    row per route, the busiest first. ``since_ns``: traces whose first
    SERVER span started at or after it."""
    since = _MIN_NS if since_ns is None else since_ns
    counts = dict(
        conn.execute(
            "SELECT route, COUNT(*) FROM trace_figures WHERE start_ns >= ? GROUP BY route",
            (since,),
        ).fetchall()
    )
    summaries = {metric: _percentiles(conn, metric, since, counts) for metric in METRICS}
    histograms = _uplink_histograms(conn, since)
    empty = Summary(0, None, None, None)
    rows = [
        RouteStats(
            route=name,
            count=count,
            rtt_ms=summaries["rtt"].get(name, empty),
            uplink_ms=summaries["uplink"].get(name, empty),
            gateway_ms=summaries["gateway"].get(name, empty),
            backend_ms=summaries["backend"].get(name, empty),
            uplink_histogram=histograms.get(name, _bins([0] * (len(HISTOGRAM_EDGES_MS) + 1))),
        )
        for name, count in counts.items()
    ]
    return sorted(rows, key=lambda r: (-r.count, r.route))


def _percentiles(
    conn: sqlite3.Connection, metric: str, since: int, routes: Iterable[str]
) -> dict[str, Summary]:
    column, index = _COLUMN[metric], _INDEX[metric]
    # INDEXED BY: the plan is the point (an ordered walk of a covering
    # index); it fails loudly rather than silently sorting if it is gone.
    where = (
        f"FROM trace_figures INDEXED BY {index} "
        f"WHERE route = ? AND {column} IS NOT NULL AND start_ns >= ?"
    )
    count_sql = f"SELECT COUNT(*) {where}"
    value_sql = f"SELECT {column} {where} ORDER BY {column} LIMIT 1 OFFSET ?"
    result = {}
    for route in routes:
        (n,) = conn.execute(count_sql, (route, since)).fetchone()
        if not n:
            continue
        values = []
        for p in PERCENTILES:
            # Nearest rank, ceil(p/100 * n) as report.percentile computes it,
            # in integers so no float rounding can move it.
            rank = max(1, (p * n + 99) // 100)
            (value,) = conn.execute(value_sql, (route, since, rank - 1)).fetchone()
            values.append(value)
        result[route] = Summary(n, *values)
    return result


def _uplink_histograms(conn: sqlite3.Connection, since: int) -> dict[str, tuple[Bin, ...]]:
    # The bin of a value: the first edge it is below (report.histogram).
    cases = " ".join(
        f"WHEN uplink_ms < {edge!r} THEN {i}" for i, edge in enumerate(HISTOGRAM_EDGES_MS)
    )
    query = f"""
        SELECT route, CASE {cases} ELSE {len(HISTOGRAM_EDGES_MS)} END AS bin, COUNT(*)
        FROM trace_figures INDEXED BY trace_figures_uplink
        WHERE uplink_ms IS NOT NULL AND start_ns >= ?
        GROUP BY route, bin
    """  # noqa: S608
    counts: dict[str, list[int]] = {}
    for route, index, count in conn.execute(query, (since,)):
        counts.setdefault(route, [0] * (len(HISTOGRAM_EDGES_MS) + 1))[index] = count
    return {route: _bins(c) for route, c in counts.items()}


def _bins(counts: list[int]) -> tuple[Bin, ...]:
    bounds: list[float | None] = [None, *HISTOGRAM_EDGES_MS, None]
    return tuple(Bin(bounds[i], bounds[i + 1], n) for i, n in enumerate(counts))
