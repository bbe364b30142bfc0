"""The viewer's span store: one SQLite file, bounded in size and age.

What it is for: keeping received spans so the UI and ``report`` can read
them, with several writers at once (threads of one viewer, or several viewer
processes pointed at the same file): WAL mode so readers never block the
writer, a connection per thread, short ``BEGIN IMMEDIATE`` transactions and
a bounded retry when another writer holds the lock.

Retention keeps the newest spans of the last ``max_age_s`` seconds, at most
``max_spans`` of them and at most ``max_db_bytes`` of database pages, and
runs in every insert's transaction: the store is within its caps at every
commit. Per-route latency reads ``rollup.py``'s per-trace rows, kept in the
same transactions.

Not for: the event loop. Every method blocks (disk, locks, retries); async
callers run them with ``asyncio.to_thread``. Not a general trace database
either.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from viewer import rollup
from viewer.report import RouteStats
from viewer.spans import KIND_SERVER, SpanRecord, TraceSummary, summarize

T = TypeVar("T")

DEFAULT_MAX_SPANS: Final = 200_000
DEFAULT_MAX_AGE_S: Final = 24 * 3600.0
DEFAULT_MAX_DB_BYTES: Final = 512 * 1024 * 1024
#: Below this a store cannot hold its own schema and a batch.
MIN_DB_BYTES: Final = 256 * 1024
#: 2: adds rollup.py's trace_figures (a version 1 file is upgraded on open).
SCHEMA_VERSION: Final = 2

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id       TEXT    NOT NULL,
    span_id        TEXT    NOT NULL,
    parent_span_id TEXT    NOT NULL,
    service        TEXT    NOT NULL,
    name           TEXT    NOT NULL,
    kind           INTEGER NOT NULL,
    start_ns       INTEGER NOT NULL,
    end_ns         INTEGER NOT NULL,
    status_code    INTEGER NOT NULL,
    status_message TEXT    NOT NULL,
    attributes     TEXT    NOT NULL,
    events         TEXT    NOT NULL,
    -- A re-sent batch (an exporter retrying after a timeout) must not
    -- duplicate spans: INSERT OR IGNORE on this key. Its index, led by
    -- trace_id, is also the index for loading one trace.
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spans_by_start ON spans (start_ns);
-- The row count, kept by triggers, so the retention check on every insert
-- is one row read instead of a COUNT(*) over the whole table.
CREATE TABLE IF NOT EXISTS span_count (id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL);
INSERT OR IGNORE INTO span_count (id, n) SELECT 0, COUNT(*) FROM spans;
CREATE TRIGGER IF NOT EXISTS spans_count_insert AFTER INSERT ON spans
    BEGIN UPDATE span_count SET n = n + 1 WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS spans_count_delete AFTER DELETE ON spans
    BEGIN UPDATE span_count SET n = n - 1 WHERE id = 0; END;
"""

# Queries below are f-strings only to splice in these constant column lists
# (or "?" placeholders); every value is a bound parameter (hence the S608 noqa).
_COLUMNS: Final = (
    "trace_id, span_id, parent_span_id, service, name, kind, start_ns, end_ns, "
    "status_code, status_message, attributes, events"
)


class StoreError(Exception):
    """The store cannot be used (not a SQLite file, another schema, closed)."""


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "database is locked" in text or "database is busy" in text


class Store:
    def __init__(
        self,
        path: str | Path,
        *,
        max_spans: int = DEFAULT_MAX_SPANS,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        max_db_bytes: int = DEFAULT_MAX_DB_BYTES,
        busy_timeout_s: float = 5.0,
        retry_for_s: float = 30.0,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if max_spans < 1:
            raise ValueError("max_spans must be at least 1")
        if max_age_s <= 0:
            raise ValueError("max_age_s must be positive")
        if max_db_bytes < MIN_DB_BYTES:
            raise ValueError(f"max_db_bytes must be at least {MIN_DB_BYTES}")
        self.path = Path(path)
        self.max_spans = max_spans
        self.max_age_s = max_age_s
        self.max_db_bytes = max_db_bytes
        self._busy_timeout_s = busy_timeout_s
        self._retry_for_s = retry_for_s
        self._clock_ns = clock_ns
        # Prune a little below the cap, so a busy store deletes in chunks
        # rather than a few rows on every insert.
        self._prune_to = max_spans - max_spans // 20
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write(self._create_schema)

    # -- connections and transactions ------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and not self._closed:
            return conn
        with self._lock:
            if self._closed:
                raise StoreError("the span store is closed")
            # check_same_thread=False only so close() can close every
            # thread's connection; each connection is used by its own thread.
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,  # explicit BEGIN/COMMIT below
                check_same_thread=False,
            )
            self._connections.append(conn)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            # WAL: readers see a snapshot and never block the one writer.
            # synchronous=NORMAL is durable across a process crash (not a
            # power cut), plenty for a local viewer, and much faster.
            self._retry(lambda: conn.execute("PRAGMA journal_mode = WAL"))
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as exc:
            with self._lock:
                self._connections.remove(conn)
            conn.close()
            raise StoreError(f"{self.path} is not a usable SQLite database: {exc}") from None
        self._local.conn = conn
        return conn

    def _retry(self, action: Callable[[], T]) -> T:
        """Run ``action``, retrying while another connection holds the lock.

        busy_timeout already waits inside SQLite; some paths return "database
        is locked" without consulting it (changing the journal mode, a WAL
        being recovered), so retry on top, with jitter, up to a deadline."""
        deadline = time.monotonic() + self._retry_for_s
        delay_s = 0.005
        while True:
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(delay_s * (0.5 + random.random()))  # noqa: S311 - jitter, not security
            delay_s = min(delay_s * 2, 0.2)

    def _transaction(self, body: Callable[[sqlite3.Connection], T], begin: str) -> T:
        conn = self._connection()

        def attempt() -> T:
            conn.execute(begin)
            try:
                result = body(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return self._retry(attempt)

    def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        # IMMEDIATE takes the write lock up front: a deferred transaction
        # that reads first and upgrades later can fail with SQLITE_BUSY
        # without waiting at all.
        return self._transaction(body, "BEGIN IMMEDIATE")

    def _read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        # One read transaction, so queries made of several statements see
        # one consistent snapshot.
        return self._transaction(body, "BEGIN")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version not in (0, 1, SCHEMA_VERSION):
            raise StoreError(
                f"{self.path} has span store schema version {version}, this viewer "
                f"understands {SCHEMA_VERSION}: use another --db file"
            )
        # Not executescript(): it COMMITs first, outside our transaction.
        for statement in _split(_SCHEMA) + _split(rollup.SCHEMA):
            conn.execute(statement)
        if version == 1:
            rollup.rebuild(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- writing ----------------------------------------------------------

    def insert(self, spans: Sequence[SpanRecord]) -> int:
        """Store ``spans`` (ignoring ones already stored) and enforce
        retention, in one transaction. Returns how many were new."""
        rows = [
            (
                s.trace_id,
                s.span_id,
                s.parent_span_id,
                s.service,
                s.name,
                s.kind,
                s.start_ns,
                s.end_ns,
                s.status_code,
                s.status_message,
                json.dumps(s.attributes, separators=(",", ":")),
                json.dumps(s.events, separators=(",", ":")),
            )
            for s in spans
        ]

        # Only SERVER spans change a trace's per-route figures.
        touched = {s.trace_id for s in spans if s.kind == KIND_SERVER}

        def write(conn: sqlite3.Connection) -> int:
            cursor = conn.executemany(
                f"INSERT OR IGNORE INTO spans ({_COLUMNS}) VALUES ({', '.join('?' * 12)})",  # noqa: S608
                rows,
            )
            inserted = max(cursor.rowcount, 0)
            rollup.refresh(conn, touched)
            self._prune(conn)
            return inserted

        return self._write(write) if rows else 0

    def prune(self) -> int:
        """Apply retention now; returns how many spans were deleted."""
        return self._write(self._prune)

    def _prune(self, conn: sqlite3.Connection) -> int:
        # Every check is an index lookup (start_ns index, the counter row,
        # two header fields), so they run on every insert: the store never
        # exceeds its caps at a commit, whatever the batch sizes.
        touched: set[str] = set()

        def delete(sql: str, params: tuple[int, ...]) -> int:
            # RETURNING: the traces whose SERVER spans go, to refresh their figures.
            rows = conn.execute(sql + " RETURNING trace_id, kind", params).fetchall()
            touched.update(trace_id for trace_id, kind in rows if kind == KIND_SERVER)
            return len(rows)

        def delete_oldest(n: int) -> int:
            return delete(
                "DELETE FROM spans WHERE rowid IN "
                "(SELECT rowid FROM spans ORDER BY start_ns, rowid LIMIT ?)",
                (n,),
            )

        cutoff_ns = self._clock_ns() - int(self.max_age_s * 1e9)
        deleted = delete("DELETE FROM spans WHERE start_ns < ?", (cutoff_ns,))
        count = _span_count(conn)
        if count > self.max_spans:
            deleted += delete_oldest(count - self._prune_to)
        # The size cap. Rows differ in size, and deleting rows frees whole
        # pages only where the rows were neighbours (the table and the
        # start_ns index, not the trace_id index): delete a share of the
        # spans proportional to the excess plus 5 %, measure again, a
        # bounded number of times.
        for _ in range(_SIZE_PRUNE_ROUNDS):
            used = _used_bytes(conn)
            count = _span_count(conn)
            if used <= self.max_db_bytes or count == 0:
                break
            share = (used - self.max_db_bytes) / used + 0.05
            deleted += delete_oldest(max(1, math.ceil(count * min(share, 1.0))))
        if touched:
            rollup.refresh(conn, touched)
        return deleted

    def used_bytes(self) -> int:
        """Bytes of database pages in use (not the free list): what
        ``max_db_bytes`` caps. The file keeps its high-water size; freed
        pages are reused by later inserts."""
        return self._read(_used_bytes)

    def route_stats(self, since_ns: int | None = None) -> list[RouteStats]:
        """Per-route latency (``rollup.py``) of the traces whose first SERVER
        span started at or after ``since_ns``."""
        return self._read(lambda conn: rollup.route_stats(conn, since_ns))

    # -- reading ----------------------------------------------------------

    def count(self) -> int:
        return int(self._read(lambda c: c.execute("SELECT n FROM span_count").fetchone()[0]))

    def trace(self, trace_id: str) -> list[SpanRecord]:
        return self._read(
            lambda c: [
                _record(row)
                for row in c.execute(
                    f"SELECT {_COLUMNS} FROM spans WHERE trace_id = ?",  # noqa: S608
                    (trace_id.lower(),),
                )
            ]
        )

    def recent_traces(self, limit: int = 50) -> list[TraceSummary]:
        """The ``limit`` traces with the newest spans, newest first."""

        def read(conn: sqlite3.Connection) -> list[TraceSummary]:
            trace_ids: list[str] = []
            seen: set[str] = set()
            # Walk the start_ns index from the newest span and stop once
            # enough distinct traces are seen: no scan of the whole table.
            cursor = conn.execute("SELECT trace_id FROM spans ORDER BY start_ns DESC")
            try:
                for (trace_id,) in cursor:
                    if trace_id not in seen:
                        seen.add(trace_id)
                        trace_ids.append(trace_id)
                        if len(trace_ids) >= limit:
                            break
            finally:
                cursor.close()
            spans = _by_trace(_summary_spans(conn, trace_ids))
            summaries = [summarize(t, spans.get(t, [])) for t in trace_ids]
            return sorted(summaries, key=lambda s: s.start_ns, reverse=True)

        return self._read(read) if limit > 0 else []

    def server_spans(self, since_ns: int | None = None) -> dict[str, list[SpanRecord]]:
        """SERVER spans by trace id (the gateway's and the backend's), for
        spans starting at or after ``since_ns``. Loads every match into
        memory: the reference input of ``report.route_stats`` for tests and
        small stores; the pages use ``route_stats`` instead."""
        return self._read(
            lambda conn: _by_trace(
                _record(row)
                for row in conn.execute(
                    f"SELECT {_COLUMNS} FROM spans WHERE kind = ? AND start_ns >= ?",  # noqa: S608
                    (KIND_SERVER, since_ns if since_ns is not None else -(2**63)),
                )
            )
        )


#: How many times one prune measures the size and deletes again.
_SIZE_PRUNE_ROUNDS: Final = 4


def _span_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT n FROM span_count WHERE id = 0").fetchone()[0])


def _used_bytes(conn: sqlite3.Connection) -> int:
    # Both are read from the database header: no scan.
    (page_count,) = conn.execute("PRAGMA page_count").fetchone()
    (free_pages,) = conn.execute("PRAGMA freelist_count").fetchone()
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    return int((page_count - free_pages) * page_size)


def _split(script: str) -> list[str]:
    """Statements of ``_SCHEMA``; triggers contain ``;`` inside BEGIN…END."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines():
        if line.strip().startswith("--") or not line.strip():
            continue
        buffer += line + "\n"
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return statements


#: For trace summaries only SERVER spans' attributes matter (the gateway's
#: ``latency.*``): skip reading and decoding everyone else's.
_SUMMARY_COLUMNS: Final = _COLUMNS.replace(
    "attributes, events", f"CASE WHEN kind = {KIND_SERVER} THEN attributes ELSE '{{}}' END, '[]'"
)


def _summary_spans(conn: sqlite3.Connection, trace_ids: list[str]) -> list[SpanRecord]:
    if not trace_ids:
        return []
    marks = ", ".join("?" * len(trace_ids))
    query = f"SELECT {_SUMMARY_COLUMNS} FROM spans WHERE trace_id IN ({marks})"  # noqa: S608
    return [_record(row) for row in conn.execute(query, trace_ids)]


def _by_trace(records: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    grouped: dict[str, list[SpanRecord]] = {}
    for record in records:
        grouped.setdefault(record.trace_id, []).append(record)
    return grouped


def _record(row: tuple[Any, ...]) -> SpanRecord:
    return SpanRecord(
        trace_id=row[0],
        span_id=row[1],
        parent_span_id=row[2],
        service=row[3],
        name=row[4],
        kind=row[5],
        start_ns=row[6],
        end_ns=row[7],
        status_code=row[8],
        status_message=row[9],
        attributes=json.loads(row[10]),
        events=json.loads(row[11]),
    )
