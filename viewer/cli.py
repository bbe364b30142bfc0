"""``python -m viewer``: serve the viewer, or print the latency report.

What it is for: flags and environment (flag > ``VIEWER_*`` variable >
default, a bad value is one line on stderr and exit code 2),
opening the store, running the aiohttp server until SIGTERM/SIGINT, and the
``report`` subcommand that prints the per-route table from the database
without a server.

Not for: anything a request touches (``app.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from aiohttp import web

from latency_common.logs import BadRequestLogFilter
from viewer import otlp
from viewer.app import create_app
from viewer.report import format_table
from viewer.store import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_MAX_DB_BYTES,
    DEFAULT_MAX_SPANS,
    MIN_DB_BYTES,
    Store,
    StoreError,
)

log = logging.getLogger("viewer")

T = TypeVar("T")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4318  # the OTLP/HTTP port, so exporters find it with no configuration
DEFAULT_DB = Path(".viewer") / "traces.db"
#: Grace for in-flight requests on SIGTERM before the store closes.
SHUTDOWN_TIMEOUT_S = 5.0

ENV = {
    "host": "VIEWER_HOST",
    "port": "VIEWER_PORT",
    "db": "VIEWER_DB",
    "max_spans": "VIEWER_MAX_SPANS",
    "max_age_hours": "VIEWER_MAX_AGE_HOURS",
    "max_db_bytes": "VIEWER_MAX_DB_BYTES",
    "max_attribute_chars": "VIEWER_MAX_ATTRIBUTE_CHARS",
    "max_span_attributes": "VIEWER_MAX_SPAN_ATTRIBUTES",
    "max_span_events": "VIEWER_MAX_SPAN_EVENTS",
    "allowed_hosts": "VIEWER_ALLOWED_HOSTS",
    "since_minutes": "VIEWER_SINCE_MINUTES",
}


class UsageError(Exception):
    """A bad flag or variable value; the message names which and why."""


class _Parser(argparse.ArgumentParser):
    """argparse, but every error is one line, ``viewer: error: …``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"viewer: error: {message} (see --help)\n")


@dataclass(frozen=True)
class ServeConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    db: Path = DEFAULT_DB
    max_spans: int = DEFAULT_MAX_SPANS
    max_age_s: float = DEFAULT_MAX_AGE_S
    max_db_bytes: int = DEFAULT_MAX_DB_BYTES
    limits: otlp.Limits = field(default_factory=otlp.Limits)
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReportConfig:
    db: Path = DEFAULT_DB
    since_minutes: float | None = None


def _port(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise UsageError(f"{name} must be a whole number from 0 to 65535, got {text!r}")
    return value


def _count(text: str, name: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{name} must be a whole number of at least 1, got {text!r}")
    return value


def _db_bytes(text: str, name: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < MIN_DB_BYTES:
        raise UsageError(
            f"{name} must be a whole number of bytes, at least {MIN_DB_BYTES}, got {text!r}"
        )
    return value


def _hosts(text: str, name: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for host in names:
        if any(c in host for c in "/ @:") and not host.startswith("["):
            raise UsageError(
                f"{name} must be host names separated by commas (no port or scheme), got {host!r}"
            )
    return names


def _positive(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e9:  # also refuses NaN and infinity
        raise UsageError(f"{name} must be a positive number, got {text!r}")
    return value


def _text(text: str, name: str) -> str:
    if not text.strip():
        raise UsageError(f"{name} must not be empty")
    return text.strip()


def _pick(
    args: Mapping[str, Any],
    env: Mapping[str, str],
    key: str,
    parse: Callable[[str, str], T],
    default: T,
) -> T:
    flag = args.get(key)
    if flag is not None:
        return parse(str(flag), "--" + key.replace("_", "-"))
    raw = env.get(ENV[key], "")
    if raw != "":
        return parse(raw, ENV[key])
    return default


def serve_config(args: Mapping[str, Any], env: Mapping[str, str]) -> ServeConfig:
    max_age_hours = _pick(args, env, "max_age_hours", _positive, DEFAULT_MAX_AGE_S / 3600)
    return ServeConfig(
        host=_pick(args, env, "host", _text, DEFAULT_HOST),
        port=_pick(args, env, "port", _port, DEFAULT_PORT),
        db=Path(_pick(args, env, "db", _text, str(DEFAULT_DB))),
        max_spans=_pick(args, env, "max_spans", _count, DEFAULT_MAX_SPANS),
        max_age_s=max_age_hours * 3600,
        max_db_bytes=_pick(args, env, "max_db_bytes", _db_bytes, DEFAULT_MAX_DB_BYTES),
        limits=otlp.Limits(
            attribute_chars=_pick(
                args, env, "max_attribute_chars", _count, otlp.DEFAULT_ATTRIBUTE_CHARS
            ),
            attributes=_pick(
                args, env, "max_span_attributes", _count, otlp.DEFAULT_ATTRIBUTES_PER_SPAN
            ),
            events=_pick(args, env, "max_span_events", _count, otlp.DEFAULT_EVENTS_PER_SPAN),
        ),
        allowed_hosts=_pick(args, env, "allowed_hosts", _hosts, ()),
    )


def report_config(args: Mapping[str, Any], env: Mapping[str, str]) -> ReportConfig:
    return ReportConfig(
        db=Path(_pick(args, env, "db", _text, str(DEFAULT_DB))),
        since_minutes=_pick(args, env, "since_minutes", _positive, None),
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m viewer",
        description=(
            "Local trace viewer: an OTLP/HTTP receiver (POST /v1/traces, protobuf or JSON, "
            "gzip allowed) storing spans in SQLite, and a web UI: / recent traces, "
            "/traces/<trace id> waterfall, /latency per-route latency. Every flag has an "
            "environment variable (in brackets); a flag wins over the variable, the variable "
            "over the default."
        ),
        epilog="`python -m viewer report --help`: the per-route table in the terminal.",
    )
    p.add_argument("--host", help=f"listen address [VIEWER_HOST] (default {DEFAULT_HOST})")
    p.add_argument(
        "--port", help=f"listen port, 0 = any free port [VIEWER_PORT] (default {DEFAULT_PORT})"
    )
    p.add_argument(
        "--db", help=f"SQLite file, created with its folders [VIEWER_DB] (default {DEFAULT_DB})"
    )
    p.add_argument(
        "--max-spans",
        help=f"keep at most this many spans, oldest dropped first [VIEWER_MAX_SPANS] "
        f"(default {DEFAULT_MAX_SPANS})",
    )
    p.add_argument(
        "--max-age-hours",
        help=f"drop spans older than this [VIEWER_MAX_AGE_HOURS] "
        f"(default {DEFAULT_MAX_AGE_S / 3600:g})",
    )
    p.add_argument(
        "--max-db-bytes",
        help=f"keep the database's pages under this many bytes, oldest spans dropped first "
        f"[VIEWER_MAX_DB_BYTES] (default {DEFAULT_MAX_DB_BYTES}, at least {MIN_DB_BYTES})",
    )
    p.add_argument(
        "--max-attribute-chars",
        help="cut each string attribute value (and each string in an array) to this many "
        f"characters, as OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT does [VIEWER_MAX_ATTRIBUTE_CHARS] "
        f"(default {otlp.DEFAULT_ATTRIBUTE_CHARS})",
    )
    p.add_argument(
        "--max-span-attributes",
        help="keep the first N attributes of a span or event [VIEWER_MAX_SPAN_ATTRIBUTES] "
        f"(default {otlp.DEFAULT_ATTRIBUTES_PER_SPAN})",
    )
    p.add_argument(
        "--max-span-events",
        help="keep the first N events of a span [VIEWER_MAX_SPAN_EVENTS] "
        f"(default {otlp.DEFAULT_EVENTS_PER_SPAN})",
    )
    p.add_argument(
        "--allowed-hosts",
        help="more names, comma-separated, that requests' Host header may carry (the --host "
        "address, localhost and loopback addresses always may; anything else gets 421, "
        "against DNS rebinding) [VIEWER_ALLOWED_HOSTS] (default none)",
    )
    return p


def build_report_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m viewer report",
        description=(
            "Print the per-route latency table (count, p50/p95/p99 of latency.rtt_ms, "
            "latency.uplink_ms for ok verdicts, latency.gateway_ms and the backend SERVER "
            "span's duration) from the viewer's database; no server needed."
        ),
    )
    p.add_argument("--db", help=f"SQLite file [VIEWER_DB] (default {DEFAULT_DB})")
    p.add_argument(
        "--since-minutes",
        help="only traces from the last N minutes [VIEWER_SINCE_MINUTES] (default: all stored)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["report"]:
            sys.exit(run_report(args[1:]))
        sys.exit(run_server(args))
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        sys.exit(0)


def _fail(message: str) -> NoReturn:
    print(f"viewer: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_report(argv: Sequence[str]) -> int:
    parser = build_report_parser()
    try:
        config = report_config(vars(parser.parse_args(argv)), os.environ)
    except UsageError as exc:
        parser.error(str(exc))
    if not config.db.is_file():
        _fail(f"no span store at {config.db}: start the viewer first, or pass --db")
    try:
        with Store(config.db) as store:
            since_ns = None
            if config.since_minutes is not None:
                since_ns = time.time_ns() - int(config.since_minutes * 60e9)
            stats = store.route_stats(since_ns)
    except (StoreError, sqlite3.Error) as exc:
        _fail(f"cannot read {config.db}: {exc}")
    window = (
        f"traces from the last {config.since_minutes:g} minutes"
        if config.since_minutes
        else "all stored traces"
    )
    if not stats:
        print(f"no traces in {config.db} ({window})")
        return 0
    print(f"latency by route in ms, nearest-rank percentiles ({config.db}, {window})")
    sys.stdout.write(format_table(stats))
    sys.stdout.flush()
    return 0


def run_server(argv: Sequence[str]) -> int:
    parser = build_parser()
    try:
        config = serve_config(vars(parser.parse_args(argv)), os.environ)
    except UsageError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # aiohttp's access log is a line per export: noise for a local tool.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # A malformed request (a fuzzer, a port scanner) is answered 400 by
    # aiohttp's parser, which logs a traceback for each: the gateway's filter
    # turns them into one summary line a minute.
    logging.getLogger("aiohttp.server").addFilter(BadRequestLogFilter(60.0))
    try:
        store = Store(
            config.db,
            max_spans=config.max_spans,
            max_age_s=config.max_age_s,
            max_db_bytes=config.max_db_bytes,
        )
    except (StoreError, sqlite3.Error, OSError) as exc:
        _fail(f"cannot open --db {config.db}: {exc}")
    log.info(
        "storing spans in %s (at most %d spans, %d bytes, %g hours)",
        config.db.resolve(),
        config.max_spans,
        config.max_db_bytes,
        config.max_age_s / 3600,
    )
    try:
        asyncio.run(_serve(config, store))
    except _BindError as exc:
        _fail(str(exc))
    finally:
        store.close()
    return 0


class _BindError(Exception):
    pass


async def _serve(config: ServeConfig, store: Store) -> None:
    app = create_app(
        store, limits=config.limits, bind_host=config.host, allowed_hosts=config.allowed_hosts
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise _BindError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from None
        port = runner.addresses[0][1]
        host = f"[{config.host}]" if ":" in config.host else config.host
        print(f"viewer listening on http://{host}:{port} (OTLP/HTTP: POST /v1/traces)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
