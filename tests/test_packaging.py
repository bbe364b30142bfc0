"""What a user installs: the wheel and sdist (``python -m build``), the
wheel installed into a fresh virtualenv outside the checkout, its two console
scripts serving real traffic on loopback ports, and the gateway image's
Dockerfile (Docker cannot run here, so it is parsed and checked).

The wheel is built once per module (sdist first, the wheel from the sdist,
as ``python -m build`` does) and installed with ``requirements.txt`` as
constraints, so it gets the versions CI pins and nothing else.
"""

from __future__ import annotations

import email
import json
import re
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway import __version__
from gateway.reserved import snippet_path
from gateway.snippet import stripped
from tests.servers import ROOT, Process

SNIPPET = ROOT / "frontend-snippet" / "snippet.js"
PACKAGES = {"gateway", "viewer", "latency_common"}
#: The example backend's dependencies: never in the package or its venv.
BACKEND_ONLY = {"flask", "werkzeug", "gunicorn", "jinja2", "itsdangerous", "blinker", "click"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


@dataclass(frozen=True)
class Installed:
    venv: Path
    bin: Path
    home: Path  # an empty working directory outside the checkout


def _run(cmd: list[str], *, timeout_s: float, cwd: Path = ROOT) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], timeout_s=180)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return Dist(wheel, sdist)


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(venv)], timeout_s=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    constraints = str(ROOT / "requirements.txt")
    _run([*pip, "install", "-c", constraints, str(dist.wheel)], timeout_s=300)
    return Installed(venv, venv / "bin", tmp_path_factory.mktemp("home"))


def _wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name))


# -- the wheel and the sdist --------------------------------------------------------------


def test_wheel_holds_the_three_packages_and_the_snippet_only(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as zf:
        names = zf.namelist()
        packaged_snippet = zf.read("gateway/snippet.js")
    tops = {n.split("/")[0] for n in names}
    assert tops == PACKAGES | {f"latency_gateway-{__version__}.dist-info"}
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names
    assert packaged_snippet == SNIPPET.read_bytes()
    # Nothing of the checkout's other folders, not even nested.
    assert not [n for n in names if re.search(r"(^|/)(backend|tests|benchmarks)/", n)]
    assert not [n for n in names if n.endswith((".pyc", ".db"))]


def test_sdist_holds_the_sources_not_the_tests_or_the_backend(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"} <= names
    assert "frontend-snippet/snippet.js" in names  # the wheel built from it needs it
    assert {n.split("/")[0] for n in names if "/" in n} == PACKAGES | {"frontend-snippet"}


def test_metadata_version_license_and_entry_points(dist: Dist) -> None:
    meta = _wheel_metadata(dist.wheel)
    # One source of truth: hatch reads gateway/__init__.py's __version__.
    assert meta["Version"] == __version__ == "0.2.0"
    assert meta["Name"] == "latency-gateway"
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "## Put it in front of your API" in meta.get_payload()
    with zipfile.ZipFile(dist.wheel) as zf:
        info = f"latency_gateway-{__version__}.dist-info/"
        entry_points = zf.read(info + "entry_points.txt").decode()
        assert zf.read(info + "licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    assert "latency-gateway = gateway.cli:main" in entry_points
    assert "latency-viewer = viewer.cli:main" in entry_points
    requires = {canonicalize_name(Requirement(r).name) for r in meta.get_all("Requires-Dist", [])}
    assert not requires & (BACKEND_ONLY | {"requests"})
    assert not [r for r in requires if "instrumentation" in r]


def test_pyproject_ranges_admit_the_pinned_versions() -> None:
    """The ranges users get and the pins CI tests must not drift apart."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a dependency but not pinned in requirements.txt"
        assert requirement.specifier.contains(pins[name]), (text, pins[name])


def test_license_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text


# -- the installed wheel, outside the checkout -------------------------------------------


def _installed_names(installed: Installed) -> dict[str, list[str]]:
    """Each distribution installed in the venv → the names it requires
    (extras left out), as that venv's own importlib.metadata lists them."""
    script = (
        "import json, importlib.metadata as m\n"
        "print(json.dumps({d.metadata['Name']: d.requires or [] for d in m.distributions()}))\n"
    )
    python = str(installed.bin / "python")
    loaded: dict[str, list[str]] = json.loads(
        _run([python, "-c", script], timeout_s=60, cwd=installed.home)
    )
    out: dict[str, list[str]] = {}
    for name, requires in loaded.items():
        needed = [Requirement(r) for r in requires]
        out[canonicalize_name(name)] = [
            canonicalize_name(r.name)
            for r in needed
            if r.marker is None or "extra" not in str(r.marker)
        ]
    return out


def test_installed_venv_has_none_of_the_example_backends_packages(installed: Installed) -> None:
    names = _installed_names(installed)
    assert "latency-gateway" in names
    assert not BACKEND_ONLY & names.keys()
    assert not [n for n in names if n.startswith("opentelemetry-instrumentation")]
    # requests is there only because the official OTLP/HTTP exporter requires
    # it; nothing of ours does.
    needs_requests = {name for name, required in names.items() if "requests" in required}
    assert "opentelemetry-exporter-otlp-proto-http" in needs_requests
    assert needs_requests <= {
        "opentelemetry-exporter-otlp-proto-http",
        "opentelemetry-exporter-http-transport",
    }


def test_console_scripts_answer_help_and_version_outside_the_checkout(
    installed: Installed,
) -> None:
    gateway_help = _run([str(installed.bin / "latency-gateway"), "--help"], timeout_s=60)
    assert "--upstream" in gateway_help
    assert "cgroup CPU quota" in gateway_help
    version = _run(
        [str(installed.bin / "latency-gateway"), "--version"], timeout_s=60, cwd=installed.home
    )
    assert version.strip() == f"gateway {__version__}"
    viewer_help = _run(
        [str(installed.bin / "latency-viewer"), "--help"], timeout_s=60, cwd=installed.home
    )
    assert "POST /v1/traces" in viewer_help
    # The installed copy runs, not the checkout's.
    where = _run(
        [str(installed.bin / "python"), "-c", "import gateway, viewer; print(gateway.__file__)"],
        timeout_s=60,
        cwd=installed.home,
    )
    assert Path(where.strip()).is_relative_to(installed.venv)


def _fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, dict(resp.headers), resp.read()


def _poll_trace(viewer_url: str, trace_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            listed = json.loads(_fetch(f"{viewer_url}/api/traces")[2])
            if any(t["trace_id"] == trace_id for t in listed["traces"]):
                last = json.loads(_fetch(f"{viewer_url}/api/traces/{trace_id}")[2])
                services = {s["service"] for s in last["spans"]}
                if {"gateway", "backend"} <= services:
                    return dict(last)
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"trace {trace_id} not complete in the viewer: {last}")


@pytest.fixture
def stack(installed: Installed) -> Iterator[tuple[Process, Process]]:
    """latency-viewer and latency-gateway from the installed wheel, in front
    of the example backend (``python -m backend`` from the checkout)."""
    clean = {"PYTHONPATH": "", "PYTHONSAFEPATH": "1", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    db = installed.home / "traces.db"
    with Process(
        "viewer",
        ["--port", "0", "--db", str(db)],
        clean,
        command=[str(installed.bin / "latency-viewer")],
        cwd=installed.home,
    ) as viewer:
        exporting = {**clean, "OTEL_EXPORTER_OTLP_ENDPOINT": viewer.url}
        backend_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": viewer.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with (
            Process("backend", ["--port", "0"], backend_env) as backend,
            Process(
                "gateway",
                ["--upstream", backend.url, "--port", "0", "--workers", "1"],
                exporting,
                command=[str(installed.bin / "latency-gateway")],
                cwd=installed.home,
            ) as gateway,
        ):
            yield gateway, viewer


@pytest.mark.slow
def test_installed_gateway_serves_the_snippet_and_traces_into_the_installed_viewer(
    stack: tuple[Process, Process],
) -> None:
    gateway, viewer = stack
    status, headers, body = _fetch(f"{gateway.url}/__gateway/snippet.js")
    assert status == 200
    assert "javascript" in headers["Content-Type"]
    # As in the source tree, without comment lines and indentation.
    assert body == stripped(SNIPPET.read_bytes())

    status, headers, body = _fetch(
        f"{gateway.url}/api/activities/home",
        {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    )
    assert status == 200
    assert json.loads(body)
    assert "Server-Timing" in headers

    trace = _poll_trace(viewer.url, TRACE_ID)
    by_service: dict[str, list[dict[str, Any]]] = {}
    for span in trace["spans"]:
        by_service.setdefault(span["service"], []).append(span)
    (server,) = [s for s in by_service["gateway"] if s["kind"] == "server"]
    # The browser's traceparent is continued: the gateway's span is its child.
    assert server["parent_span_id"] == PARENT_ID
    assert server["attributes"]["http.response.status_code"] == 200
    assert any(s["kind"] == "server" for s in by_service["backend"])


def test_snippet_is_read_from_the_package_first(tmp_path: Path) -> None:
    packaged = tmp_path / "package" / "snippet.js"
    checkout = tmp_path / "checkout" / "snippet.js"
    checkout.parent.mkdir()
    checkout.write_text("checkout")
    assert snippet_path(packaged, checkout) == checkout  # a source checkout
    packaged.parent.mkdir()
    packaged.write_text("packaged")
    assert snippet_path(packaged, checkout) == packaged  # an installed wheel


# -- the image ----------------------------------------------------------------------------


def _stages(dockerfile: str) -> list[str]:
    text = re.sub(r"\\\n", " ", dockerfile)  # join continued lines
    return re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]


def test_gateway_image_installs_the_wheel_with_pinned_constraints_only() -> None:
    dockerfile = (ROOT / "deploy" / "gateway.Dockerfile").read_text()
    builder, final = _stages(dockerfile)
    # Stage 1 builds the wheel with the pinned `build`.
    dev_pins = (ROOT / "requirements-dev.txt").read_text()
    build_pin = re.search(r"^build==(\S+)$", dev_pins, re.MULTILINE)
    assert build_pin is not None
    assert f'pip install "build=={build_pin.group(1)}"' in builder
    assert "python -m build --wheel" in builder
    assert re.search(r"^COPY frontend-snippet/snippet\.js ", builder, re.MULTILINE)
    # Stage 2 installs that wheel, with requirements.txt as constraints, and
    # never the full requirements (which carry Flask and gunicorn).
    install = [line for line in final.splitlines() if "pip install" in line]
    assert len(install) == 1
    assert re.search(r"pip install -c \S*requirements\.txt \S+\.whl$", install[0].strip())
    assert "from=wheel" in install[0]
    assert not re.search(r"(-r|COPY) \S*requirements", final)
    assert not re.search(r"^COPY (backend|gateway|viewer|latency_common)/", final, re.MULTILINE)
    # Non-root, and the console script as the command.
    users = re.findall(r"^USER (\S+)", final, re.MULTILINE)
    assert users
    assert users[-1] not in {"root", "0"}
    cmd = re.search(r"^CMD (\[.*\])$", final, re.MULTILINE)
    assert cmd is not None
    assert json.loads(cmd.group(1))[0] == "latency-gateway"


def test_compose_runs_the_viewer_with_its_console_script() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    viewer = services["viewer"]
    assert viewer["build"]["dockerfile"] == "deploy/gateway.Dockerfile"
    assert viewer["command"][0] == "latency-viewer"
    assert "command" not in services["gateway"]  # the image's CMD: latency-gateway
