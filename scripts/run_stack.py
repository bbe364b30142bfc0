"""``make run``: start the backend, the gateway and the demo frontend, print
where to point a browser or curl, stop them all cleanly on Ctrl-C (or SIGTERM).

Each component runs as its own process (``python -m backend``,
``python -m gateway``, ``frontend-snippet/demo/server.py``) with its output
prefixed by its name. When one of them
exits on its own, the other is stopped too and this script exits non-zero.
Configuration reaches the components through their usual ``GATEWAY_*``,
``BACKEND_*`` and ``OTEL_*`` variables.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 15.0


def _pump(name: str, stream: IO[bytes]) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"{name:>8} | {line.decode(errors='replace')}")
        sys.stdout.flush()


def _start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", *args]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # Own process group: the terminal's Ctrl-C reaches us, and we decide
        # the order in which the components stop.
        start_new_session=True,
    )
    assert proc.stdout is not None
    threading.Thread(target=_pump, args=(name, proc.stdout), daemon=True).start()
    return proc


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    # The gateway first (it stops taking requests and flushes its spans),
    # then the backend.
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make run",
        description="Start backend, gateway and demo frontend; Ctrl-C stops them all.",
    )
    parser.add_argument("--backend-port", type=int, default=4567)
    parser.add_argument("--gateway-port", type=int, default=8080)
    parser.add_argument("--demo-port", type=int, default=3000)
    parser.add_argument("--viewer-port", type=int, default=4318)
    args = parser.parse_args(argv)
    backend_url = f"http://127.0.0.1:{args.backend_port}"
    gateway_url = f"http://127.0.0.1:{args.gateway_port}"
    demo_url = f"http://127.0.0.1:{args.demo_port}"

    # With neither an OTLP endpoint nor a Honeycomb key, spans go to the local
    # viewer's default address: start it, so traces are visible with no setup.
    with_viewer = not any(
        os.environ.get(name, "").strip()
        for name in (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "HONEYCOMB_API_KEY",
        )
    )
    viewer_url = f"http://127.0.0.1:{args.viewer_port}"
    if with_viewer and args.viewer_port != 4318:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = viewer_url

    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    # The demo page is another origin: both the backend (its own CORS) and the
    # gateway (the snippet's headers) must allow it, in both spellings of
    # localhost. The gateway allows no origin unless told to.
    demo_origins = f"http://localhost:{args.demo_port},http://127.0.0.1:{args.demo_port}"
    origins = os.environ.get("GATEWAY_ALLOWED_ORIGINS", demo_origins)
    frontend_url = os.environ.get("FRONTEND_URL", demo_origins)
    # In start order, each with the URL that says it is up.
    components = [
        ("viewer", ["viewer", "--port", str(args.viewer_port)], viewer_url + "/"),
        (
            "backend",
            ["backend", "--port", str(args.backend_port), "--frontend-url", frontend_url],
            backend_url + "/api/health",
        ),
        (
            "gateway",
            [
                "gateway",
                "--upstream",
                backend_url,
                "--port",
                str(args.gateway_port),
                "--allowed-origins",
                origins,
            ],
            gateway_url + "/__gateway/health",
        ),
        (
            "demo",
            [
                "frontend-snippet/demo/server.py",
                "--port",
                str(args.demo_port),
                "--gateway",
                gateway_url,
            ],
            demo_url + "/",
        ),
    ]
    procs: list[subprocess.Popen[bytes]] = []  # newest first: the stop order
    for name, command, health_url in components:
        if name == "viewer" and not with_viewer:
            continue
        proc = _start(name, command)
        procs.insert(0, proc)
        if not _wait_healthy(health_url, proc):
            print(f"make run: the {name} did not start (see its output above)", file=sys.stderr)
            _stop(procs)
            return 1

    spans_line = (
        f"Traces: {viewer_url}  (the local viewer: recent traces, waterfalls, /latency)"
        if with_viewer
        else "Spans go to "
        + (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or "Honeycomb (HONEYCOMB_API_KEY is set)"
        )
    )
    print(
        f"""
  Ready.
    demo     {demo_url}   (open in a browser: the Cruddur feed, measured)
    gateway  {gateway_url}   (every request is traced and forwarded to the backend)
    backend  {backend_url}

  Try:
    curl -i -H 'traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01' \\
         {gateway_url}/api/activities/home
    curl {gateway_url}/__gateway/health

  {spans_line}
  Ctrl-C stops everything.
""",
        flush=True,
    )
    exit_code = 0
    while not stopping.is_set():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            print(f"make run: {dead[0].args[2]} exited with {dead[0].returncode}; stopping")
            exit_code = 1
            break
        stopping.wait(0.5)
    print("make run: stopping …", flush=True)
    _stop(procs)
    print("make run: stopped.", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
