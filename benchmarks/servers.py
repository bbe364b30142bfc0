"""The servers of ``make bench``, each started as a process of its own.

What it is for: one function per kind of server (static nginx, nginx proxy,
OTLP sink, the gateway, the bare aiohttp proxy, the Flask + requests proxy,
the real backend), each returning a :class:`Server` once it answers on its
loopback port. All of them are :class:`harness.Procs` members, so the bench's
``finally`` stops every one.

Not for: load or measurement (``harness.py``, ``run.py``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness import BENCH, Proc, Procs, free_port, python, wait_http

#: A ~1 KB JSON body shaped like the backend's home feed (no quotes that
#: nginx's single-quoted string would need escaped, no "$").
FEED = [
    {
        "uuid": f"68f126b0-1ceb-4a33-88be-d90fa7109ee{i}",
        "handle": handle,
        "display_name": name,
        "message": message,
        "created_at": "2026-11-28T10:00:0{i}+00:00",
        "expires_at": "2026-12-05T10:00:0{i}+00:00",
        "likes_count": 5 + i,
        "replies_count": i,
        "reposts_count": 0,
    }
    for i, (handle, name, message) in enumerate(
        [
            ("andrewbrown", "Andrew Brown", "Cloud is fun!"),
            ("worf", "Worf", "This post has no honor!"),
            ("garek", "Garek", "My dear doctor, I am just a simple tailor."),
            ("odo", "Odo", "Changelings have no use for latency."),
        ]
    )
]
FEED_BODY = json.dumps(FEED, separators=(",", ":"))

#: Every benchmarked process writes its logs here at debug-free levels.
QUIET_ENV = {"GATEWAY_LOG_LEVEL": "warning"}


@dataclass
class Server:
    name: str
    url: str
    proc: Proc

    def pids(self) -> list[int]:
        return self.proc.tree()


def _fill(template: str, **values: object) -> str:
    text = (BENCH / "nginx" / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key.upper()}@", str(value))
    return text


def _nginx(procs: Procs, name: str, conf: str, workdir: Path) -> Proc:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    path = workdir / f"{name}.conf"
    path.write_text(conf)
    check = subprocess.run(
        [
            nginx,
            "-t",
            "-q",
            "-p",
            str(workdir),
            "-e",
            str(workdir / "startup.log"),
            "-c",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        raise RuntimeError(f"nginx config {path} is invalid: {check.stderr}")
    return procs.start(
        name, [nginx, "-p", str(workdir), "-e", str(workdir / "startup.log"), "-c", str(path)]
    )


def nginx_static(procs: Procs, workdir: Path) -> Server:
    assert "'" not in FEED_BODY  # it sits in a single-quoted nginx string
    assert "$" not in FEED_BODY  # which would expand variables
    port = free_port()
    proc = _nginx(
        procs,
        "nginx-upstream",
        _fill("upstream.conf", dir=workdir, port=port, body=FEED_BODY),
        workdir,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/", proc)
    return Server("nginx-upstream", url, proc)


def nginx_proxy(procs: Procs, workdir: Path, upstream_port: int) -> Server:
    port = free_port()
    conf = _fill("proxy.conf", dir=workdir, port=port, upstream_port=upstream_port)
    proc = _nginx(procs, "nginx-proxy", conf, workdir)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/", proc)
    return Server("nginx-proxy", url, proc)


def sink(procs: Procs, name: str = "sink", *, keep: bool = False) -> Server:
    port = free_port()
    argv = [python(), str(BENCH / "otlp_sink.py"), "--port", str(port)]
    proc = procs.start(name, [*argv, "--keep"] if keep else argv)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/stats", proc)
    return Server(name, url, proc)


def gateway(
    procs: Procs,
    name: str,
    upstream: str,
    *,
    workers: int,
    otlp_endpoint: str,
    env: Mapping[str, str] | None = None,
    allowed_origins: str = "http://127.0.0.1:3000",
    source: Path = BENCH.parent,
) -> Server:
    """``python -m gateway`` as production runs it (N SO_REUSEPORT workers),
    imported from ``source`` (the checkout under test, or an older one)."""
    port = free_port()
    full_env = {
        **QUIET_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
        # A fixed key: the bench mints tokens with one worker and sends them
        # to all (as replicas sharing GATEWAY_CLOCK_KEY would).
        "GATEWAY_CLOCK_KEY": "bench-clock-key-0123456789abcdef",
        # wrk is one client address standing for many users: without this
        # the per-client limit (20/s, burst 100) would skip the latency
        # checks after the first 100 requests, and the bench would measure
        # the cheap rate_limited path instead of the checks.
        "GATEWAY_TIMING_RATE": "1000000/s, burst 1000000",
        **(env or {}),
    }
    proc = procs.start(
        name,
        [
            python(),
            "-m",
            "gateway",
            "--upstream",
            upstream,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--allowed-origins",
            allowed_origins,
        ],
        env=full_env,
        cwd=source,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/__gateway/clock", proc)
    _wait_workers(proc, workers)
    return Server(name, url, proc)


def _wait_workers(proc: Proc, workers: int) -> None:
    """With N > 1 the parent forks N workers: wait until all of them listen,
    so the first load does not meet a half-started pool."""
    import time

    if workers == 1:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(proc.tree()) >= workers + 1 and proc.log_path.exists():
            listening = proc.log_path.read_text(errors="replace").count("listening on")
            if listening >= workers:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name}: not all {workers} workers started\n{proc.tail()}")


def bare_aiohttp(procs: Procs, upstream: str, *, workers: int) -> Server:
    port = free_port()
    proc = procs.start(
        "bare-aiohttp",
        [
            python(),
            str(BENCH / "proxies" / "bare_aiohttp.py"),
            "--upstream",
            upstream,
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/", proc)
    _wait_workers(proc, workers)
    return Server("bare-aiohttp", url, proc)


#: gunicorn gthread as ARCHITECTURE.md §2 measured it (and as the backend is deployed):
#: 2 worker processes × 8 threads.
GUNICORN_WORKERS = 2
GUNICORN_THREADS = 8


def _gunicorn(
    procs: Procs, name: str, app: str, chdir: Path, env: Mapping[str, str]
) -> tuple[Proc, str]:
    port = free_port()
    proc = procs.start(
        name,
        [
            python(),
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--worker-class",
            "gthread",
            "--workers",
            str(GUNICORN_WORKERS),
            "--threads",
            str(GUNICORN_THREADS),
            "--backlog",
            "1024",
            "--log-level",
            "warning",
            "--chdir",
            str(chdir),
            app,
        ],
        env=env,
    )
    return proc, f"http://127.0.0.1:{port}"


def flask_requests(procs: Procs, upstream: str, *, otel: bool, otlp_endpoint: str) -> Server:
    name = "flask-requests-otel" if otel else "flask-requests"
    env = {
        "BENCH_UPSTREAM": upstream,
        "BENCH_OTEL": "1" if otel else "0",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
    }
    proc, url = _gunicorn(procs, name, "flask_requests:app", BENCH / "proxies", env)
    wait_http(url + "/", proc)
    return Server(name, url, proc)


def backend(procs: Procs, otlp_endpoint: str) -> Server:
    """The real instrumented backend under gunicorn, as docker-compose runs it."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint, "OTEL_SERVICE_NAME": "backend"}
    proc, url = _gunicorn(procs, "backend", "backend.wsgi:app", BENCH.parent, env)
    wait_http(url + "/api/activities/home", proc)
    return Server("backend", url, proc)
