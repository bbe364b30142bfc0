"""A fleet, as users run one: three independent `latency-gateway` processes behind
Debian's nginx as a round-robin load balancer, the example backend under
gunicorn, the demo page in real Chromium, spans through a real OTLP
receiver.

The replicas share nothing but ``GATEWAY_CLOCK_KEY`` (separate starts,
separate ports, separate exporters), so a token minted by one is checked by
another on the very next request. Proven here:

* every request after the sync burst is ``ok`` and ``server_bounded``,
  whichever replica answers it and whichever minted its token;
* a replica stopped mid-run (SIGTERM, as an orchestrator stops a pod) and
  started again: the page sees no failed request (nginx retries idempotent
  requests on another replica), no ``token_invalid``, and every completed
  request's gateway span is exported;
* a clock-key rotation rolled over the three replicas one by one, in the two
  phases the README gives: no ``token_invalid``.

`make test` installs nginx (Debian's ``nginx-light``) when it is missing;
this test fails, never skips, without it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page

from tests.browser import DemoThread, chromium
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.servers import ROOT, Process, free_port

pytestmark = pytest.mark.slow

SERVER = 2
#: A bound on the page's request loop, far above what the steps need.
MAX_REQUESTS = 3_000
OLD_KEY = "replica-test-clock-key-old-0123456789"
NEW_KEY = "replica-test-clock-key-new-9876543210"

_NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream gateways {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        location / {{
            proxy_pass http://gateways;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            # A replica that refuses or drops the connection: try the next
            # one. nginx does so for idempotent methods only, which is right.
            proxy_next_upstream error timeout http_502;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
        }}
    }}
}}
"""


@dataclass
class Replica:
    name: str
    port: int
    env: dict[str, str]
    args: list[str]
    process: Process | None = None

    def start(self) -> None:
        # The console script users install (`make test` installs the project
        # into its venv), not `python -m gateway`.
        script = Path(sys.executable).parent / "latency-gateway"
        assert script.exists(), f"{script} is missing: run make test (it installs the project)"
        self.process = Process("gateway", self.args, self.env, command=[str(script)])

    def stop(self) -> tuple[int, str]:
        assert self.process is not None
        code, err = self.process.terminate()
        self.process.__exit__(None, None, None)
        self.process = None
        return code, err


@dataclass
class Fleet:
    replicas: list[Replica]
    lb_url: str
    receiver: OtlpReceiver
    stderr: list[str] = field(default_factory=list)

    def restart(self, replica: Replica, **env: str) -> None:
        code, err = replica.stop()
        self.stderr.append(err)
        assert code == 0, err
        replica.env.update(env)
        replica.start()


class Nginx:
    def __init__(self, workdir: Path, port: int, upstream_ports: list[int]) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        servers = "\n".join(
            f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstream_ports
        )
        conf = workdir / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(dir=workdir, servers=servers, port=port))
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        import socket

        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr and self.proc.stderr.read()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def gunicorn_backend(receiver: OtlpReceiver, demo_origin: str) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "BACKEND_BIND": f"127.0.0.1:{port}",
        "BACKEND_WORKERS": "1",
        "BACKEND_THREADS": "16",
        "FRONTEND_URL": demo_origin,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "backend/gunicorn_conf.py", "backend.wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, "gunicorn exited"
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def demo_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def demo_origin(demo_port: int) -> str:
    return f"http://127.0.0.1:{demo_port}"


@pytest.fixture
def fleet(
    tmp_path: Path, receiver: OtlpReceiver, gunicorn_backend: str, demo_origin: str
) -> Iterator[Fleet]:
    ports = [free_port() for _ in range(3)]
    replicas = []
    for i, port in enumerate(ports, 1):
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_RESOURCE_ATTRIBUTES": f"service.instance.id=replica-{i}",
            "GATEWAY_CLOCK_KEY": OLD_KEY,
            "GATEWAY_CLOCK_PREVIOUS_KEYS": "",
            "GATEWAY_TRUSTED_PROXIES": "1",
            "GATEWAY_ALLOWED_ORIGINS": demo_origin,
        }
        args = ["--upstream", gunicorn_backend, "--port", str(port), "--workers", "1"]
        replicas.append(Replica(f"replica-{i}", port, env, args))
    with ExitStack() as stack:
        for replica in replicas:
            replica.start()
            stack.callback(lambda r=replica: r.process and r.process.__exit__(None, None, None))
        nginx = Nginx(tmp_path, free_port(), ports)
        stack.callback(nginx.stop)
        yield Fleet(replicas, nginx.url, receiver)


@pytest.fixture
async def page(fleet: Fleet, demo_port: int) -> AsyncIterator[Page]:
    async with chromium() as browser:
        with DemoThread(fleet.lb_url, port=demo_port) as demo:
            context = await browser.new_context()
            page = await context.new_page()
            await page.goto(demo.url)
            await page.wait_for_function(
                "LatencyGateway.clock() && LatencyGateway.clock().best != null",
                timeout=20_000,
                polling=50,
            )
            await page.evaluate("window.demoReady")
            yield page
            await context.close()


#: Sequential fetches through the load balancer, as a page makes them; the
#: page records each outcome so the test can act while they run.
_DRIVE = """
async ([base, maxCount, pauseMs]) => {
  window.driven = [];
  window.stopDriving = false;
  for (let i = 0; i < maxCount && !window.stopDriving; i++) {
    let record;
    try {
      const response = await fetch(base + "/api/activities/home?i=" + i);
      await response.arrayBuffer();
      const timing = response.headers.get("server-timing") || "";
      const uplink = /uplink(?:;dur=[0-9.]+)?;desc="([a-z_]+)"/.exec(timing);
      const tp = /traceparent;desc="00-([0-9a-f]{32})-/.exec(timing);
      record = {i, status: response.status, verdict: uplink && uplink[1], traceId: tp && tp[1]};
    } catch (error) {
      record = {i, status: 0, error: String(error)};
    }
    window.driven.push(record);
    await new Promise((resolve) => setTimeout(resolve, pauseMs));
  }
  return window.driven;
}
"""


async def _drive(page: Page, fleet: Fleet, steps: list[tuple[str, Any]]) -> list[Any]:
    """Send requests until every step has run (in a thread: it stops and
    starts processes), at most ``MAX_REQUESTS``. After a step, the next waits
    until the replica it touched has served requests again, so every phase
    of a rolling change carries traffic across replicas."""
    task = asyncio.ensure_future(page.evaluate(_DRIVE, [fleet.lb_url, MAX_REQUESTS, 30]))
    for name, step in steps:
        started_ns = time.time_ns()
        replica = await asyncio.to_thread(step)
        deadline = time.monotonic() + 60
        while (
            sum(
                1
                for s in fleet.receiver.spans
                if s.service == "gateway"
                and s.start_ns > started_ns
                and s.resource.get("service.instance.id") == replica.name
            )
            < 3
        ):
            assert not task.done(), f"the page finished before {name} carried traffic"
            assert time.monotonic() < deadline, f"{replica.name} serves nothing after {name}"
            await asyncio.sleep(0.05)
    done = await page.evaluate("window.driven.length")
    # Some more requests after the last step, then the page stops.
    await page.wait_for_function(f"window.driven.length >= {done + 20}", polling=50, timeout=60_000)
    await page.evaluate("window.stopDriving = true")
    records: list[Any] = await asyncio.wait_for(task, timeout=60)
    return records


def _gateway_spans(fleet: Fleet, trace_ids: set[str]) -> dict[str, ReceivedSpan]:
    spans = fleet.receiver.wait_for(
        lambda spans: (
            trace_ids <= {s.trace_id for s in spans if s.service == "gateway" and s.kind == SERVER}
        ),
        timeout_s=30,
    )
    return {
        s.trace_id: s
        for s in spans
        if s.trace_id in trace_ids and s.service == "gateway" and s.kind == SERVER
    }


def _report(title: str, records: list[Any], spans: dict[str, ReceivedSpan]) -> str:
    verdicts: dict[str, int] = {}
    replicas: dict[str, int] = {}
    for span in spans.values():
        key = f"{span.attributes.get('latency.status')}/{span.attributes.get('latency.trust')}"
        verdicts[key] = verdicts.get(key, 0) + 1
        instance = str(span.resource.get("service.instance.id"))
        replicas[instance] = replicas.get(instance, 0) + 1
    failed = sum(1 for r in records if r["status"] != 200)
    return (
        f"{title}: {len(records)} requests, {failed} failed, {len(spans)} gateway spans "
        f"exported, verdicts {dict(sorted(verdicts.items()))}, per replica "
        f"{dict(sorted(replicas.items()))}"
    )


async def test_three_replicas_a_restart_and_a_key_rotation(page: Page, fleet: Fleet) -> None:
    r1, r2, r3 = fleet.replicas

    def stop_and_start(replica: Replica) -> Replica:
        fleet.restart(replica)
        return replica

    def rotate(replica: Replica, key: str, previous: str) -> Replica:
        fleet.restart(replica, GATEWAY_CLOCK_KEY=key, GATEWAY_CLOCK_PREVIOUS_KEYS=previous)
        return replica

    steps: list[tuple[str, Any]] = [
        # A replica stopped mid-run (nginx sends its requests elsewhere) and
        # started again.
        ("restart", lambda: stop_and_start(r2)),
        # Key rotation, phase 1: every replica learns the new key (verifies
        # with it) while still signing with the old one…
        *[(f"phase 1 {r.name}", lambda r=r: rotate(r, OLD_KEY, NEW_KEY)) for r in (r1, r2, r3)],
        # …phase 2: each signs with the new key, still verifying the old.
        *[(f"phase 2 {r.name}", lambda r=r: rotate(r, NEW_KEY, OLD_KEY)) for r in (r1, r2, r3)],
    ]
    records = await _drive(page, fleet, steps)
    # The page saw no failed request: nginx retried on another replica.
    assert [r for r in records if r["status"] != 200] == []
    trace_ids = {r["traceId"] for r in records}
    assert None not in trace_ids
    spans = _gateway_spans(fleet, trace_ids)
    print("\n" + _report("three replicas", records, spans))
    # Every completed request's gateway span was exported, once.
    assert set(spans) == trace_ids
    # Served by all three replicas, round robin.
    assert {s.resource.get("service.instance.id") for s in spans.values()} == {
        "replica-1",
        "replica-2",
        "replica-3",
    }
    for record in records:
        attrs = spans[record["traceId"]].attributes
        # No token from another replica, the restarted one or either key was
        # ever refused.
        assert attrs.get("latency.reason") != "token_invalid", (record, attrs)
        assert attrs["latency.status"] == "ok", (record, attrs)
        assert attrs["latency.trust"] == "server_bounded", (record, attrs)
        assert record["verdict"] == "ok"
    assert all("Traceback" not in err for err in fleet.stderr)
