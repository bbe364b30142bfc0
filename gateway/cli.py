"""``python -m gateway``: parse flags, build the config, serve with N processes.

What it is for: process management. With ``--workers N`` the parent forks N
worker processes before it creates any thread, event loop or tracer; each
worker binds its own ``SO_REUSEPORT`` socket on the same address, so the
kernel spreads incoming connections across them (gunicorn's aiohttp worker
shares one accept queue, which put all 16 of a benchmark's connections on one
of two workers here, README "Workers"). The parent forwards SIGTERM/SIGINT, waits
for every worker to flush its spans and exit, and exits itself. A worker that
dies on its own is logged and restarted; only a crash loop (MAX_CRASHES
within CRASH_WINDOW_S) makes the parent give up. On SIGTERM each worker
drains in-flight requests for ``GATEWAY_SHUTDOWN_TIMEOUT_S``, then flushes
its spans (bounded), and the parent SIGKILLs only after both could finish.

Not for: anything a request touches (``app.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import Any, Final, NoReturn

from aiohttp import web

from gateway import __version__
from gateway.config import LOG_LEVELS, TRUST_MODES, ConfigError, GatewayConfig
from gateway.cors import Cors
from latency_common.logs import BadRequestLogFilter, RateLimitFilter

log = logging.getLogger("gateway")

#: Parse errors and 502/504 lines: at most one log line per this interval.
LOG_INTERVAL_S = 60.0
#: The supervisor gives up when workers crash MAX_CRASHES times within
#: CRASH_WINDOW_S (a crash loop); fewer, however many over days, are restarted.
MAX_CRASHES = 5
CRASH_WINDOW_S = 60.0
#: What the parent allows on top of a worker's drain and flush before SIGKILL.
KILL_MARGIN_S = 2.0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad value is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gateway",
        description=(
            "Latency tracing reverse proxy: forwards every request to one fixed upstream, "
            "traces it with OpenTelemetry and measures the browser's network latency. "
            "Every flag has an environment variable (in brackets); a flag wins over the "
            "variable, the variable over the default. Spans are exported per the standard "
            "OTEL_* variables (default endpoint http://127.0.0.1:4318)."
        ),
    )
    p.add_argument(
        "--upstream",
        help="the only URL requests go to [GATEWAY_UPSTREAM] (default http://127.0.0.1:4567)",
    )
    p.add_argument("--host", help="listen address [GATEWAY_HOST] (default 127.0.0.1)")
    p.add_argument("--port", help="listen port [GATEWAY_PORT] (default 8080)")
    p.add_argument(
        "--workers",
        help="processes sharing the port via SO_REUSEPORT [GATEWAY_WORKERS] (default: "
        "the CPUs this process may use: the cgroup CPU quota rounded up, or the "
        "affinity mask, not the host's core count)",
    )
    p.add_argument(
        "--allowed-origins",
        help="comma-separated browser origins (or https://*.example.com patterns) whose "
        "pages may send the snippet's headers cross-origin; default none "
        "[GATEWAY_ALLOWED_ORIGINS]",
    )
    p.add_argument(
        "--trust-context",
        choices=TRUST_MODES,
        help="what to do with the "
        "browser's trace context [GATEWAY_TRUST_CONTEXT] (default continue)",
    )
    p.add_argument(
        "--clock-key",
        help="HMAC key for clock tokens, shared by replicas "
        "[GATEWAY_CLOCK_KEY] (default: random per start)",
    )
    p.add_argument(
        "--client-timeout-s",
        help="cut a client idle, sending its request, or not reading the response for this "
        "long [GATEWAY_CLIENT_TIMEOUT_S] (default 60)",
    )
    p.add_argument(
        "--shutdown-timeout-s",
        help="on SIGTERM, let in-flight requests finish for this long "
        "[GATEWAY_SHUTDOWN_TIMEOUT_S] (default 10)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, help="[GATEWAY_LOG_LEVEL] (default info)")
    p.add_argument("--version", action="version", version=f"gateway {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = GatewayConfig.from_env(vars(args))
    except ConfigError as exc:
        parser.error(str(exc))
    if config.workers > 1 and config.port == 0:
        parser.error("--port 0 (any free port) works with --workers 1 only")
    _setup_logging(config.log_level)
    log.info("CORS origins enabled: %s", Cors(config.allowed_origins).describe())
    if config.clock_key_generated:
        log.warning(
            "GATEWAY_CLOCK_KEY is not set: using a random clock key for this start "
            "(tokens do not survive a restart and other replicas cannot check them)"
        )
    try:
        _check_bindable(config.host, config.port)
    except OSError as exc:
        print(
            f"gateway: error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        sys.exit(2)
    if config.workers == 1:
        sys.exit(run_worker(config))
    sys.exit(_supervise(config))


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )
    # aiohttp's access log is a line per request at INFO: spans are our access
    # log, and the hot path logs nothing per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Malformed requests are answered 400 by aiohttp's parser, which also logs
    # each one at ERROR with a traceback: a client could flood the log (and
    # block the loop on a slow log sink). One summary line a minute instead.
    logging.getLogger("aiohttp.server").addFilter(BadRequestLogFilter(LOG_INTERVAL_S))
    # A down backend makes a 502/504 line per request: one a minute, counted.
    logging.getLogger("gateway.upstream").addFilter(RateLimitFilter(LOG_INTERVAL_S))


def _check_bindable(host: str, port: int) -> None:
    """Fail early and clearly when the address is taken.

    Binding without SO_REUSEPORT also refuses a port that another process
    (say, a gateway still running) holds *with* SO_REUSEPORT, which the
    workers' own binds would silently share.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: connections of a gateway that just stopped linger in
        # TIME_WAIT (RFC 9293 §3.6.1) and must not block its restart; a
        # socket still listening on the port still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


#: ``sys.setswitchinterval`` in each worker (see ``run_worker``).
GIL_SWITCH_INTERVAL_S: Final = 0.0005


def run_worker(config: GatewayConfig) -> int:
    """Serve until SIGTERM/SIGINT in this process; return the exit code."""
    from gateway.app import create_app
    from latency_common.telemetry import ALWAYS_ON, build_telemetry, shutdown_tracer_provider

    # The span exporter's thread and the event loop share the GIL: a thread
    # that wants it waits up to the switch interval (5 ms by default) for a
    # thread computing in Python to give it up. 0.5 ms bounds how long one
    # export batch can stall the loop at a time (benchmarks/loop_lag.py).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    telemetry = build_telemetry("gateway", default_sampler=ALWAYS_ON)
    provider = telemetry.provider
    app = create_app(config, telemetry=telemetry)

    async def serve() -> None:
        sock = _listen_socket(config.host, config.port)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.shutdown_timeout_s)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        # What start-up allocated (modules, the app, the OTel SDK) lives as
        # long as the process: out of the collector's generations, the full
        # collections that requests' garbage triggers no longer walk it
        # (CPython's gc.freeze documentation suggests this for pre-fork servers).
        gc.freeze()
        host, port = sock.getsockname()[:2]
        print(
            f"gateway listening on http://{_url_host(host)}:{port} -> {config.upstream}", flush=True
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("shutting down: draining connections")
            await runner.cleanup()

    try:
        _run_loop(serve())
    finally:
        shutdown_tracer_provider(provider)  # flushes queued spans, bounded
    return 0


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed (it is in requirements.txt), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
    else:
        uvloop.run(main)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def kill_deadline_s(config: GatewayConfig) -> float:
    """How long the parent waits for its workers after SIGTERM before SIGKILL.

    A worker drains for ``shutdown_timeout_s`` (aiohttp rounds that up to the
    next whole second), then flushes spans for at most
    ``SHUTDOWN_FLUSH_TIMEOUT_S``; the parent's deadline covers both.
    """
    from latency_common.telemetry import SHUTDOWN_FLUSH_TIMEOUT_S

    return config.shutdown_timeout_s + 1.0 + SHUTDOWN_FLUSH_TIMEOUT_S + KILL_MARGIN_S


class CrashWindow:
    """Worker crashes in a sliding window: pure, the times are passed in.

    ``record(now)`` counts a crash and says whether there have been
    ``max_crashes`` within the last ``window_s`` seconds (time to give up):
    a worker crashing now and then over days is restarted every time, a
    crash loop is not restarted for ever.
    """

    def __init__(self, max_crashes: int = MAX_CRASHES, window_s: float = CRASH_WINDOW_S) -> None:
        self.max_crashes = max_crashes
        self.window_s = window_s
        self._times: deque[float] = deque()

    def record(self, now: float) -> bool:
        self._times.append(now)
        while self._times[0] <= now - self.window_s:
            self._times.popleft()
        return len(self._times) >= self.max_crashes


def _supervise(config: GatewayConfig) -> int:
    """Fork the workers, forward signals, restart crashed ones, wait for all."""
    children: set[int] = set()
    stopping = False
    crashes = CrashWindow()

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 1
            try:
                code = run_worker(config)
            except Exception:
                log.exception("worker failed")
            finally:
                os._exit(code)
        children.add(pid)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("starting %d worker processes on %s:%d", config.workers, config.host, config.port)
    for _ in range(config.workers):
        spawn()
    deadline: float | None = None
    exit_code = 0
    while children:
        if stopping and deadline is None:
            deadline = time.monotonic() + kill_deadline_s(config)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if deadline is not None and time.monotonic() > deadline:
                for child in list(children):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
            time.sleep(0.1)
            continue
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        if crashes.record(time.monotonic()):
            log.error(
                "worker %d exited with %s: %d crashes within %.0f s, giving up",
                pid,
                code,
                crashes.max_crashes,
                crashes.window_s,
            )
            exit_code = 1
            forward(signal.SIGTERM, None)
            continue
        log.error("worker %d exited with %s; restarting it", pid, code)
        spawn()
    return exit_code
