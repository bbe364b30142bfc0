"""How users start the stack: ``make run`` (tested end to end) and
``docker-compose.yml`` (Docker cannot run here, so it is parsed and checked)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import typing
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import timing
from latency_common.redact import DEFAULT_SENSITIVE_QUERY_KEYS
from tests.browser import chromium
from tests.servers import ROOT, free_port


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_wires_the_stack_together() -> None:
    services = _compose()["services"]
    assert set(services) == {
        "backend",
        "gateway",
        "lb",
        "demo",
        "otel-collector",
        "collector-queue-owner",
        "viewer",
    }
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
    assert viewer_command[0] == "latency-viewer"  # the console script the image installs
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


def _collector_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    return data


def _compose_interpolate(text: str, env: dict[str, str]) -> str:
    """docker compose's ${VAR:+text}: text when VAR is set and not empty."""
    return re.sub(r"\$\{(\w+):\+([^}]*)\}", lambda m: m[2] if env.get(m[1]) else "", text)


def _merged(config: dict[str, Any], args: list[str]) -> dict[str, Any]:
    """The collector's view of --config=yaml:a::b::c: value overrides given
    after the file: maps are merged, a list or scalar is replaced."""
    merged = copy.deepcopy(config)
    for arg in args[1:]:
        assert arg.startswith("--config=yaml:"), arg
        path, value = arg.removeprefix("--config=yaml:").split(": ", 1)
        *parents, leaf = path.split("::")
        node = merged
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(value)
    return merged


def _check_pipelines(config: dict[str, Any]) -> None:
    service = config["service"]
    for extension in service["extensions"]:
        assert extension in config["extensions"], extension
    for name, pipeline in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            assert pipeline[kind], f"{name} has no {kind}"
            for component in pipeline[kind]:
                assert component in config[kind], f"{name}: {component} is not defined"
    for name, exporter in config["exporters"].items():
        storage = exporter.get("sending_queue", {}).get("storage")
        if storage is not None:
            assert storage in service["extensions"], f"{name}: {storage} is not enabled"


def _collector_runs() -> dict[str, dict[str, Any]]:
    """The merged configuration each deployment really runs."""
    config = _collector_config()
    command = _compose()["services"]["otel-collector"]["command"]
    kubernetes = yaml.safe_load_all((ROOT / "deploy/kubernetes/collector.yaml").read_text())
    deployment = next(d for d in kubernetes if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    key = {"HONEYCOMB_API_KEY": "hcaik_test"}
    return {
        "compose, no key": _merged(config, [_compose_interpolate(a, {}) for a in command]),
        "compose, key": _merged(config, [_compose_interpolate(a, key) for a in command]),
        "kubernetes": _merged(config, args),
    }


def test_collector_sends_to_honeycomb_only_when_a_key_is_set() -> None:
    config = _collector_config()
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"] == "0.0.0.0:4318"
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    honeycomb = config["exporters"]["otlphttp/honeycomb"]
    assert honeycomb["endpoint"] == "https://api.honeycomb.io"
    assert honeycomb["headers"]["x-honeycomb-team"] == "${env:HONEYCOMB_API_KEY}"
    assert config["exporters"]["otlphttp/viewer"]["endpoint"] == "http://viewer:4318"
    runs = _collector_runs()
    exporters = {
        name: run["service"]["pipelines"]["traces"]["exporters"] for name, run in runs.items()
    }
    assert exporters == {
        "compose, no key": ["otlphttp/viewer"],
        "compose, key": ["otlphttp/viewer", "otlphttp/honeycomb"],
        "kubernetes": ["otlphttp/honeycomb"],
    }
    for run in runs.values():
        _check_pipelines(run)
        assert run["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]


def test_collector_pipeline_check_catches_an_undefined_component() -> None:
    """The structure check above can fail."""
    config = _collector_config()
    config["service"]["pipelines"]["traces"]["processors"].append("filter/missing")
    with pytest.raises(AssertionError, match="filter/missing is not defined"):
        _check_pipelines(config)


def test_collector_processors_run_in_a_safe_order() -> None:
    processors = _collector_config()["service"]["pipelines"]["traces"]["processors"]
    # memory_limiter first (refuse before buffering), redaction before any
    # exporter can see a value, sampling on whole traces, batch last.
    assert processors == ["memory_limiter", "redaction", "tail_sampling", "batch"]
    text = (ROOT / "deploy" / "otel-collector.yaml").read_text()
    for name in processors:
        comment = re.search(rf"((?:^  #.*\n)+)  {re.escape(name)}:", text, re.MULTILINE)
        assert comment is not None, f"say what {name} is for"


def _redaction_pattern() -> re.Pattern[str]:
    redaction = _collector_config()["processors"]["redaction"]
    assert redaction["allow_all_keys"] is True, "otherwise every attribute is deleted"
    (pattern,) = redaction["blocked_values"]
    return re.compile(pattern)


def test_collector_redacts_the_query_keys_the_gateway_redacts() -> None:
    pattern = _redaction_pattern()
    keys = re.search(r"\(\?:([^()]*)\)=", pattern.pattern)
    assert keys is not None
    assert set(keys[1].split("|")) == set(DEFAULT_SENSITIVE_QUERY_KEYS)
    for key in DEFAULT_SENSITIVE_QUERY_KEYS:
        for value in (f"/p?a=1&{key}=s3cret&b=2", f"{key.upper()}=s3cret&b=2"):
            redacted = pattern.sub("****", value)
            assert "s3cret" not in redacted, value
            assert redacted.endswith("&b=2"), value
    # Keys that only contain a sensitive key are left alone.
    for value in ("/p?monkey=1&keyboard=2", "/p?encode=x&token_type=bearer"):
        assert pattern.sub("****", value) == value


def test_collector_tail_sampling_keeps_what_someone_will_look_at() -> None:
    sampling = _collector_config()["processors"]["tail_sampling"]
    policies = {p["name"]: p for p in sampling["policies"]}
    by_type = {p["type"]: p for p in policies.values()}
    assert set(by_type) == {"string_attribute", "status_code", "latency", "probabilistic"}
    status = by_type["string_attribute"]["string_attribute"]
    assert status["key"] == "latency.status"
    # Every verdict but "ok", as gateway/timing.py defines them (no
    # invert_match: an inverted match vetoes the other policies).
    assert set(status["values"]) == set(typing.get_args(timing.Status)) - {"ok"}
    assert "invert_match" not in status
    assert by_type["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert by_type["latency"]["latency"]["threshold_ms"] == 1000
    share = by_type["probabilistic"]["probabilistic"]["sampling_percentage"]
    assert share == "${env:COLLECTOR_SAMPLE_PERCENT}"
    compose_env = _compose()["services"]["otel-collector"]["environment"]
    assert compose_env["COLLECTOR_SAMPLE_PERCENT"] == "100"


def test_collector_queues_honeycomb_spans_on_disk() -> None:
    config = _collector_config()
    honeycomb = config["exporters"]["otlphttp/honeycomb"]
    queue = honeycomb["sending_queue"]
    assert queue["enabled"] is True
    assert queue["storage"] == "file_storage"
    assert queue["queue_size"] == 2000
    assert config["processors"]["batch"]["send_batch_max_size"] == 1024
    # Retry a queued batch for as long as it is on disk (default: 5 min).
    assert honeycomb["retry_on_failure"]["max_elapsed_time"] == "0s"
    directory = config["extensions"]["file_storage"]["directory"]
    services = _compose()["services"]
    volume = f"collector-queue:{directory}"
    assert volume in services["otel-collector"]["volumes"]
    owner = services["collector-queue-owner"]
    assert volume in owner["volumes"]
    assert owner["command"] == ["chown", "10001:10001", directory]
    needed = set(re.findall(r"\$\{env:(\w+)\}", (ROOT / "deploy/otel-collector.yaml").read_text()))
    assert needed <= services["otel-collector"]["environment"].keys()


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
