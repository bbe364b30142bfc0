"""How users start the stack: ``make run`` (tested end to end) and
``docker-compose.yml`` (Docker cannot run here, so it is parsed and checked)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.browser import chromium
from tests.servers import ROOT, free_port


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_wires_the_stack_together() -> None:
    services = _compose()["services"]
    assert set(services) == {"backend", "gateway", "lb", "demo", "otel-collector", "viewer"}
    gateway = services["gateway"]
    env = gateway["environment"]
    assert gateway["deploy"]["replicas"] == 2
    assert env["GATEWAY_UPSTREAM"] == "http://backend:4567"
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    # Replicas must share the clock key: compose refuses to start without it.
    assert env["GATEWAY_CLOCK_KEY"].startswith("${GATEWAY_CLOCK_KEY:?")
    # One proxy (the load balancer) in front may set X-Forwarded-For.
    assert env["GATEWAY_TRUSTED_PROXIES"] == "1"
    for name in ("gateway", "backend"):
        assert services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
            "http://otel-collector:4318"
        )
        assert services[name]["environment"]["OTEL_SERVICE_NAME"] == name
    assert "127.0.0.1:8080:8080" in services["lb"]["ports"]
    assert "127.0.0.1:3000:3000" in services["demo"]["ports"]
    assert "--gateway" in services["demo"]["command"]
    collector = services["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector")
    assert collector["image"].split(":")[1][0].isdigit(), "pin the image"
    assert collector["environment"]["HONEYCOMB_API_KEY"].startswith("${HONEYCOMB_API_KEY")
    viewer_command = services["viewer"]["command"]
    assert viewer_command[:3] == ["python", "-m", "gateway.viewer"]
    # The collector posts to http://viewer:4318: that Host must pass the
    # viewer's DNS-rebinding check.
    assert viewer_command[viewer_command.index("--allowed-hosts") + 1] == "viewer"


def test_compose_publishes_ports_on_loopback_only() -> None:
    # A bare "HOST:CONTAINER" mapping listens on every interface: the viewer
    # and the collector have no authentication, so only this machine may reach them.
    services = _compose()["services"]
    published = {name: s.get("ports", []) for name, s in services.items()}
    assert published["viewer"] == ["127.0.0.1:16686:4318"]
    assert published["otel-collector"] == ["127.0.0.1:4318:4318"]
    assert published["lb"] == ["127.0.0.1:8080:8080"]
    assert published["demo"] == ["127.0.0.1:3000:3000"]
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_collector_sends_to_honeycomb_and_the_viewer() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"] == "0.0.0.0:4318"
    honeycomb = config["exporters"]["otlphttp/honeycomb"]
    assert honeycomb["endpoint"] == "https://api.honeycomb.io"
    assert honeycomb["headers"]["x-honeycomb-team"] == "${env:HONEYCOMB_API_KEY}"
    assert config["exporters"]["otlphttp/viewer"]["endpoint"] == "http://viewer:4318"
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    assert set(pipeline["exporters"]) == {"otlphttp/honeycomb", "otlphttp/viewer"}
    assert "batch" in pipeline["processors"]


def test_compose_references_existing_files() -> None:
    services = _compose()["services"]
    dockerfiles = set()
    for service in services.values():
        build = service.get("build")
        if build is not None:
            dockerfile = ROOT / build["context"] / build["dockerfile"]
            assert dockerfile.is_file(), dockerfile
            dockerfiles.add(dockerfile)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
        if "image" in service:
            assert re.match(r"^[\w./-]+:\d", service["image"]), "pin the image"
    assert len(dockerfiles) == 2
    for dockerfile in dockerfiles:
        text = dockerfile.read_text()
        for src in re.findall(r"^COPY (\S+) ", text, re.MULTILINE):
            assert (ROOT / src).exists(), src
        assert re.search(r"^USER (?!root)\S+", text, re.MULTILINE)
        assert re.search(r"^FROM python:\d+\.\d+\.\d+-", text, re.MULTILINE), "pin the base"
        assert "HEALTHCHECK" in text
    command = (ROOT / "deploy" / "backend.Dockerfile").read_text()
    assert "backend.wsgi:app" in command
    assert "backend/gunicorn_conf.py" in command
    assert (ROOT / ".env.example").is_file()
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _poll(fetch: Any, check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        try:
            value = fetch()
            if check(value):
                return value
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"never true; last value {value!r}")


async def test_make_run_shows_a_demo_click_in_the_viewer_and_ctrl_c_stops_it(
    tmp_path: Path,
) -> None:
    """The README's first promise: `make run`, open the demo, click, see the
    trace (browser → gateway → backend) in the local viewer."""
    ports = {name: free_port() for name in ("backend", "gateway", "demo", "viewer")}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_EXPORTER_OTLP", "HONEYCOMB_"))
    }
    env["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    env["VIEWER_DB"] = str(tmp_path / "traces.db")
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    viewer = f"http://127.0.0.1:{ports['viewer']}"
    proc, output = await asyncio.to_thread(_start_stack, ports, env)
    try:
        for url in (gateway, viewer, f"http://127.0.0.1:{ports['demo']}"):
            assert url.encode() in output
        await asyncio.to_thread(_curl_traced, gateway)
        # A click in the demo, in real Chromium.
        async with chromium() as browser:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{ports['demo']}/")
            await page.wait_for_function(
                "window.LatencyGateway && LatencyGateway.clock().best != null", timeout=20_000
            )
            await page.click("#reload")
            await page.wait_for_function(
                "LatencyGateway.requests.filter(r => r.pre != null).length >= 1", timeout=20_000
            )
            trace_id = await page.evaluate("LatencyGateway.requests.slice(-1)[0].traceId")
            await page.evaluate("window.dispatchEvent(new Event('pagehide'))")
            row = await page.wait_for_selector(f"tr[data-trace-id='{trace_id}']")
            assert row is not None
            await page.close()
        trace = await asyncio.to_thread(
            _poll,
            lambda: _get_json(f"{viewer}/api/traces/{trace_id}"),
            lambda t: {s["service"] for s in t["spans"]} == {"browser", "gateway", "backend"},
        )
        assert trace["gateway"]["latency"]["latency.status"] in ("ok", "unsynced")
        rest = await asyncio.to_thread(_interrupt, proc)
        assert proc.returncode == 0
        assert b"make run: stopped." in rest
        assert b"Traceback" not in output + rest
    finally:
        if proc.poll() is None:
            # SIGTERM first: the script stops its children (they run in
            # sessions of their own, so a SIGKILL to it alone would orphan them).
            proc.terminate()
            try:
                await asyncio.to_thread(proc.communicate, timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.communicate, timeout=10)


def _start_stack(ports: dict[str, int], env: dict[str, str]) -> tuple[Any, bytes]:
    """`make run`'s script with these ports; returns once it says Ready."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "scripts/run_stack.py",
            *(arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
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
    if b"Ready." not in output:
        proc.terminate()  # lets the script stop whatever it had started
        proc.communicate(timeout=30)
        raise AssertionError(output.decode(errors="replace"))
    return proc, output


def _curl_traced(gateway: str) -> None:
    """The README's curl example."""
    request = urllib.request.Request(
        gateway + "/api/activities/home",
        headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
        assert "0af7651916cd43dd8448eb211c80319c" in resp.headers["Server-Timing"]


def _interrupt(proc: Any) -> bytes:
    """Ctrl-C, as a terminal would send it."""
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    return bytes(rest)
