"""How users start the stack: ``make run`` (tested end to end) and
``docker-compose.yml`` (Docker cannot run here, so it is parsed and checked)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import yaml

from tests.servers import ROOT, free_port


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_runs_backend_and_gateway_wired_together() -> None:
    services = _compose()["services"]
    assert {"backend", "gateway"} <= set(services)
    gateway, backend = services["gateway"], services["backend"]
    assert "8080:8080" in gateway["ports"]
    assert "4567:4567" in backend["ports"]
    env = gateway["environment"]
    assert env["GATEWAY_UPSTREAM"] == "http://backend:4567"
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    # Replicas must share the clock key: compose refuses to start without it.
    assert ":?" in env["GATEWAY_CLOCK_KEY"]
    assert gateway["depends_on"]["backend"]["condition"] == "service_healthy"
    for service in (gateway, backend):
        assert service["environment"]["OTEL_SERVICE_NAME"] in ("gateway", "backend")
        assert "healthcheck" in service


def test_compose_references_existing_files_and_modules() -> None:
    services = _compose()["services"]
    for service in services.values():
        build = service["build"]
        context = ROOT / (build if isinstance(build, str) else build["context"])
        dockerfile = context / (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert dockerfile.is_file()
    dockerfile = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+) ", dockerfile, re.MULTILINE):
        assert (ROOT / src).exists(), src
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM python:\d+\.\d+\.\d+-", dockerfile, re.MULTILINE), "pin the base"
    command = services["backend"]["command"]
    assert command[-1] == "backend.wsgi:app"
    assert (ROOT / "backend" / "wsgi.py").is_file()
    assert (ROOT / ".env.example").is_file()
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_make_run_starts_the_stack_and_ctrl_c_stops_it() -> None:
    backend_port, gateway_port, demo_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "scripts/run_stack.py",
            "--backend-port",
            str(backend_port),
            "--gateway-port",
            str(gateway_port),
            "--demo-port",
            str(demo_port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        output = b""
        deadline = time.monotonic() + 60
        while b"Ready." not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
        assert b"Ready." in output, output.decode(errors="replace")
        assert f"http://127.0.0.1:{gateway_port}".encode() in output
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway_port}/api/activities/home",
            headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
            assert "0af7651916cd43dd8448eb211c80319c" in resp.headers["Server-Timing"]
        with urllib.request.urlopen(f"http://127.0.0.1:{demo_port}/", timeout=10) as resp:
            page = resp.read().decode()
            assert f"http://127.0.0.1:{gateway_port}/__gateway/snippet.js" in page
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert b"make run: stopped." in rest
        assert b"Traceback" not in output + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
