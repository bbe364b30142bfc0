"""``GATEWAY_PRESERVE_HOST``: the browser's ``Host`` upstream instead of the
upstream's own, over real sockets to the real backend's ``/api/echo``.

Off by default (nginx's ``proxy_set_header Host $proxy_host``); on, only a
single well-formed ``Host`` (RFC 9110 §7.2, RFC 3986 §3.2.2-3.2.3) passes,
anything else falls back to the upstream's own ``host:port`` (RFC 9112 §3.2:
several or invalid Host field lines are not to be trusted). Fuzzed: no Host
value gets a 5xx.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, GatewayConfig
from tests.servers import BackendThread, Process, parse_head, raw_request


def _gateway(backend: BackendThread, preserve: str | None) -> Process:
    env = {"GATEWAY_CLOCK_KEY": "preserve-host-key-0123456789", "OTEL_TRACES_EXPORTER": "none"}
    if preserve is not None:
        env["GATEWAY_PRESERVE_HOST"] = preserve
    return Process("gateway", ["--upstream", backend.url, "--port", "0", "--workers", "1"], env)


@pytest.fixture(scope="module")
def preserving(backend: BackendThread) -> Iterator[Process]:
    with _gateway(backend, "1") as proc:
        yield proc


def _hosts_seen(port: int, host_lines: list[str]) -> tuple[int, list[str]]:
    head = "".join(f"Host: {h}\r\n" for h in host_lines)
    request = f"GET /api/echo HTTP/1.1\r\n{head}Connection: close\r\n\r\n"
    status, _, body = parse_head(raw_request(port, request.encode("latin-1")))
    if status != 200:
        return status, []
    echoed = json.loads(body)["headers"]
    return status, [value for name, value in echoed if name.lower() == "host"]


@pytest.mark.parametrize(
    "host",
    ["shop.example", "shop.example:8443", "127.0.0.1:8080", "[::1]:443", "xn--bcher-kva.example"],
)
def test_preserved_host_reaches_the_backend(preserving: Process, host: str) -> None:
    status, seen = _hosts_seen(preserving.port, [host])
    assert status == 200
    assert seen == [host]


def test_default_sends_the_upstreams_own_host(backend: BackendThread) -> None:
    with _gateway(backend, None) as gateway:
        status, seen = _hosts_seen(gateway.port, ["shop.example:8443"])
    assert status == 200
    assert seen == [f"127.0.0.1:{backend.port}"]


@pytest.mark.parametrize(
    "hosts",
    [
        ["shop.example", "evil.example"],  # RFC 9112 §3.2: more than one Host line
        ["shop.example/path"],  # not a uri-host
        ["user@shop.example"],  # userinfo is not part of Host (RFC 9110 §7.2)
        ["shop example"],
        ["shop.example:port"],
    ],
)
def test_a_malformed_host_is_not_passed_on(
    preserving: Process, backend: BackendThread, hosts: list[str]
) -> None:
    status, seen = _hosts_seen(preserving.port, hosts)
    assert status < 500
    if status == 200:
        assert seen == [f"127.0.0.1:{backend.port}"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    host=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f"),
        min_size=1,
        max_size=60,
    )
)
def test_fuzzed_host_values_never_get_a_5xx(
    preserving: Process, backend: BackendThread, host: str
) -> None:
    status, seen = _hosts_seen(preserving.port, [host])
    assert status < 500
    if status == 200:
        assert seen in ([host], [f"127.0.0.1:{backend.port}"])
    assert "Traceback" not in preserving.stderr_text()


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False)]
)
def test_preserve_host_setting(raw: str, expected: bool) -> None:
    config = GatewayConfig.from_env({}, environ={"GATEWAY_PRESERVE_HOST": raw})
    assert config.preserve_host is expected
    assert GatewayConfig.from_env({}, environ={}).preserve_host is False


def test_a_bad_preserve_host_value_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^GATEWAY_PRESERVE_HOST must be one of .*'maybe'$"):
        GatewayConfig.from_env({}, environ={"GATEWAY_PRESERVE_HOST": "maybe"})
