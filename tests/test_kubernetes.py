"""The Kubernetes manifests (``deploy/kubernetes/``), checked offline.

Each manifest file is validated against the Kubernetes 1.37 OpenAPI schema
that ships inside ``kubernetes-validate`` (strict: an unknown or misspelt
field fails), and cross-checked against what the code really reads: the
``GATEWAY_*`` settings of ``gateway/config.py``, the routes the gateway
registers, the backend's ``BACKEND_*`` variables, the images and ports
``docker-compose.yml`` and the Dockerfiles use. No cluster is needed.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from aiohttp import ClientSession

from gateway import __version__
from gateway.app import create_app
from gateway.config import GatewayConfig
from latency_common import telemetry
from scripts import sync_collector_config
from tests.conftest import GatewayFactory, make_traced
from tests.servers import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"
#: The schema the manifests are written against (the newest the pinned
#: kubernetes-validate ships).
KUBERNETES_VERSION = "1.37.0"
MANIFESTS = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
#: Settings the manifests use that arrive with work merged in parallel
#: (key rotation, the bounded shutdown): checked once config.py reads them.
ARRIVING = {"GATEWAY_CLOCK_PREVIOUS_KEYS"}
#: The gateway's drain after SIGTERM when GATEWAY_SHUTDOWN_TIMEOUT_S is unset.
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]


def _all() -> list[dict[str, Any]]:
    return [doc for name in MANIFESTS for doc in _documents(name)]


def _find(kind: str, name: str) -> dict[str, Any]:
    for doc in _all():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in {KUBERNETES}")


def _container(deployment: str) -> dict[str, Any]:
    containers = _find("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _env(deployment: str) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in _container(deployment)["env"]}


def _gateway_setting_names() -> set[str]:
    """Every GATEWAY_* variable GatewayConfig.from_env reads."""
    return set(re.findall(r'"(GATEWAY_[A-Z0-9_]+)"', inspect.getsource(GatewayConfig.from_env)))


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_the_kubernetes_schema(name: str) -> None:
    documents = _documents(name)
    assert documents, name
    for doc in documents:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc}"
            ) from None


def test_strict_validation_refuses_a_misspelt_field() -> None:
    """The schema check above can fail: strict mode rejects unknown fields."""
    deployment = _find("Deployment", "gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFileSystem"
    ] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(set(MANIFESTS) - {"secrets.example.yaml"})
    images = {i["name"]: i["newTag"] for i in kustomization["images"]}
    assert images == {"latency-gateway": __version__, "latency-backend": __version__}


def test_images_are_the_ones_compose_builds_and_runs() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert _container("gateway")["image"] == f"latency-gateway:{__version__}"
    assert compose["gateway"]["build"]["dockerfile"] == "deploy/gateway.Dockerfile"
    assert _container("backend")["image"] == f"latency-backend:{__version__}"
    assert compose["backend"]["build"]["dockerfile"] == "deploy/backend.Dockerfile"
    # The same pinned collector image as the compose stack.
    assert _container("otel-collector")["image"] == compose["otel-collector"]["image"]
    # The backend runs the Dockerfile's own command.
    dockerfile = (ROOT / "deploy" / "backend.Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert cmd is not None
    assert _container("backend")["command"] == yaml.safe_load(cmd.group(1))


def test_gateway_env_names_are_settings_the_gateway_reads() -> None:
    read = _gateway_setting_names()
    assert {"GATEWAY_PORT", "GATEWAY_CLOCK_KEY", "GATEWAY_UPSTREAM"} <= read
    used = {name for name in _env("gateway") if name.startswith("GATEWAY_")}
    unknown = used - read - ARRIVING
    assert not unknown, f"gateway.yaml sets variables gateway/config.py never reads: {unknown}"


@pytest.mark.parametrize("name", sorted(ARRIVING))
def test_gateway_env_names_arriving_with_the_merge(name: str) -> None:
    if name not in _gateway_setting_names():
        pytest.skip(f"{name} is not read by gateway/config.py on this branch yet")
    assert name in _env("gateway")


def test_gateway_env_values_are_a_valid_configuration() -> None:
    """The manifest's values, as the gateway parses them: listens on the
    container port, proxies to the backend Service, trusts one proxy."""
    env = _env("gateway")
    secret = {d["metadata"]["name"]: d["stringData"] for d in _documents("secrets.example.yaml")}
    environ = {name: e["value"] for name, e in env.items() if "value" in e}
    key_ref = env["GATEWAY_CLOCK_KEY"]["valueFrom"]["secretKeyRef"]
    environ["GATEWAY_CLOCK_KEY"] = secret[key_ref["name"]][key_ref["key"]]
    workers = env["GATEWAY_WORKERS"]["valueFrom"]["resourceFieldRef"]
    assert workers == {
        "containerName": "gateway",
        "resource": "limits.cpu",
        "divisor": "1",
    }
    # What the downward API gives for a limit of "2" with divisor 1.
    cpu_limit = _container("gateway")["resources"]["limits"]["cpu"]
    environ["GATEWAY_WORKERS"] = cpu_limit
    config = GatewayConfig.from_env(environ=environ)
    assert config.workers == 2
    assert config.clock_key_generated is False
    assert config.trusted_proxies == 1
    assert config.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in _container("gateway")["ports"]}
    assert config.port == ports["http"]
    backend = _find("Service", "backend")
    assert config.upstream_url.host == backend["metadata"]["name"]
    assert config.upstream_url.port == backend["spec"]["ports"][0]["port"]


def _routes() -> set[str]:
    app = create_app(
        GatewayConfig(clock_key=b"k" * 32, workers=1),
        tracer_provider=make_traced().provider,
    )
    return {r.canonical for r in app.router.resources()}


def _probe_path(probe: str) -> str:
    path: str = _container("gateway")[probe]["httpGet"]["path"]
    assert _container("gateway")[probe]["httpGet"]["port"] == "http"
    return path


async def test_liveness_probe_is_a_gateway_route_answering_200(
    gateway: GatewayFactory, http: ClientSession
) -> None:
    path = _probe_path("livenessProbe")
    assert path == "/__gateway/health"
    assert path in _routes()
    base = await gateway()
    async with http.get(base + path) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"


async def test_readiness_probe_is_a_gateway_route_answering_200(
    gateway: GatewayFactory, http: ClientSession
) -> None:
    path = _probe_path("readinessProbe")
    assert path == "/__gateway/ready"
    if path not in _routes():
        pytest.skip(f"{path} is not registered by gateway/reserved.py on this branch yet")
    base = await gateway()
    async with http.get(base + path) as resp:
        assert resp.status == 200


def test_shutdown_fits_in_the_grace_period() -> None:
    """preStop sleep, then SIGTERM, the gateway's drain and its last span
    flush: all of it must end before the kubelet's SIGKILL."""
    spec = _find("Deployment", "gateway")["spec"]["template"]["spec"]
    command = _container("gateway")["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    sleep_s = float(command[1])
    assert sleep_s >= 5, "endpoints need a few seconds to drop the pod"
    fields = {f.name: f for f in GatewayConfig.__dataclass_fields__.values()}
    shutdown = fields.get("shutdown_timeout_s")
    shutdown_s = (
        float(shutdown.default)  # type: ignore[arg-type]
        if shutdown is not None
        else DEFAULT_SHUTDOWN_TIMEOUT_S
    )
    env = _env("gateway")
    if "GATEWAY_SHUTDOWN_TIMEOUT_S" in env:
        shutdown_s = float(env["GATEWAY_SHUTDOWN_TIMEOUT_S"]["value"])
    needed_s = sleep_s + shutdown_s + telemetry.SHUTDOWN_FLUSH_TIMEOUT_S
    assert spec["terminationGracePeriodSeconds"] >= needed_s + 1


def test_services_target_ports_their_pods_expose() -> None:
    for service in (d for d in _all() if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matching = [
            d
            for d in _all()
            if d["kind"] == "Deployment"
            and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, service["metadata"]["name"]
        container = matching[0]["spec"]["template"]["spec"]["containers"][0]
        by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in by_name or target in by_name.values(), (service, target)
            assert by_name.get(target, target) == port["port"]
    gateway_dockerfile = (ROOT / "deploy" / "gateway.Dockerfile").read_text()
    assert "EXPOSE 8080" in gateway_dockerfile
    assert {p["containerPort"] for p in _container("gateway")["ports"]} == {8080}


def test_workloads_send_spans_to_the_collector_service() -> None:
    collector = _find("Service", "otel-collector")
    http_port = next(p["port"] for p in collector["spec"]["ports"] if p["name"] == "otlp-http")
    for name in ("gateway", "backend"):
        env = _env(name)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == (
            f"http://{collector['metadata']['name']}:{http_port}"
        )
        assert env["OTEL_SERVICE_NAME"]["value"] == name


def test_backend_runs_16_threads_with_settings_it_reads() -> None:
    source = "".join(p.read_text() for p in (ROOT / "backend").glob("*.py"))
    read = set(re.findall(r'"(BACKEND_[A-Z0-9_]+)"', source))
    env = _env("backend")
    used = {name for name in env if name.startswith("BACKEND_")}
    assert used <= read, used - read
    assert int(env["BACKEND_WORKERS"]["value"]) * int(env["BACKEND_THREADS"]["value"]) == 16
    assert env["BACKEND_BIND"]["value"].endswith(":4567")
    assert _container("backend")["readinessProbe"]["httpGet"]["path"] == "/api/health"


def test_every_container_is_non_root_read_only_and_bounded() -> None:
    for deployment in (d for d in _all() if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][kind].keys()
            assert "livenessProbe" in container
            assert "readinessProbe" in container


def test_secrets_come_from_secret_objects_and_the_template_is_fake() -> None:
    template = {d["metadata"]["name"]: d for d in _documents("secrets.example.yaml")}
    refs = [
        (deployment, e["valueFrom"]["secretKeyRef"])
        for deployment in ("gateway", "otel-collector")
        for e in _container(deployment)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    names = {(d, r["key"]) for d, r in refs}
    assert {
        ("gateway", "GATEWAY_CLOCK_KEY"),
        ("gateway", "GATEWAY_CLOCK_PREVIOUS_KEYS"),
        ("otel-collector", "HONEYCOMB_API_KEY"),
    } == names
    for _, ref in refs:
        assert ref["name"] in template
        if ref.get("optional") is not True:
            value = template[ref["name"]]["stringData"][ref["key"]]
            assert "CHANGE-ME" in value, "the template must not look like a real secret"
    assert _env("gateway")["GATEWAY_CLOCK_PREVIOUS_KEYS"]["valueFrom"]["secretKeyRef"]["optional"]
    text = (KUBERNETES / "secrets.example.yaml").read_text()
    assert "kubectl create secret generic gateway-clock" in text


def test_collector_config_map_is_deploy_otel_collector_yaml() -> None:
    source = sync_collector_config.SOURCE.read_text()
    config_map = _find("ConfigMap", "otel-collector-config")
    assert config_map["data"]["config.yaml"] == source
    assert sync_collector_config.CONFIG_MAP.read_text() == sync_collector_config.render(source), (
        "run .venv/bin/python scripts/sync_collector_config.py"
    )


def test_collector_pod_mounts_its_config_and_its_queue() -> None:
    config = yaml.safe_load(sync_collector_config.SOURCE.read_text())
    container = _container("otel-collector")
    pod = _find("Deployment", "otel-collector")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_path = Path(container["args"][0].removeprefix("--config="))
    assert volumes[mounts[str(config_path.parent)]]["configMap"]["name"] == (
        "otel-collector-config"
    )
    assert config_path.name == "config.yaml"
    queue_dir = config["extensions"]["file_storage"]["directory"]
    claim = volumes[mounts[queue_dir]]["persistentVolumeClaim"]["claimName"]
    assert _find("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    # One replica: tail sampling needs a whole trace in one collector.
    deployment = _find("Deployment", "otel-collector")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    # Every ${env:NAME} the config reads is set.
    env = _env("otel-collector")
    needed = set(re.findall(r"\$\{env:(\w+)\}", sync_collector_config.SOURCE.read_text()))
    assert needed <= env.keys()
    assert env["COLLECTOR_SAMPLE_PERCENT"]["value"] == "10"
