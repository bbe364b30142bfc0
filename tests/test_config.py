"""Configuration: flag > environment > default, clear errors, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.config import ConfigError, GatewayConfig, TimingRate
from tests.servers import ROOT


def test_defaults_match_the_design_table() -> None:
    config = GatewayConfig.from_env({}, {})
    assert config.upstream == "http://127.0.0.1:4567"
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    # No cross-origin page unless named: the snippet served by the gateway
    # itself (same origin) is all that works out of the box.
    assert config.allowed_origins == ()
    assert config.trust_context == "continue"
    assert config.clock_key_generated
    assert len(config.clock_key) == 32
    assert (config.connect_timeout_s, config.read_timeout_s) == (5.0, 30.0)
    assert config.max_body_bytes == 10 * 1024 * 1024
    assert config.client_timeout_s == 60.0
    assert config.buffer_body_bytes == 1024 * 1024
    assert config.shutdown_timeout_s == 10.0
    assert config.trusted_proxies == 0
    assert config.max_connections == 1024
    assert config.timing_rate == TimingRate(20.0, 100)
    assert config.workers >= 1


def test_flag_beats_environment_beats_default() -> None:
    env = {"GATEWAY_PORT": "9000", "GATEWAY_HOST": "0.0.0.0"}
    config = GatewayConfig.from_env({"port": "9100"}, env)
    assert config.port == 9100  # flag
    assert config.host == "0.0.0.0"  # environment
    assert config.upstream == "http://127.0.0.1:4567"  # default


def test_environment_values_are_parsed() -> None:
    config = GatewayConfig.from_env(
        {},
        {
            "GATEWAY_ALLOWED_ORIGINS": " https://app.example.com , http://localhost:5173 ",
            "GATEWAY_CLOCK_KEY": "a-shared-secret-of-some-length",
            "GATEWAY_MAX_BODY_BYTES": "1MiB",
            "GATEWAY_TIMING_RATE": "5/s, burst 10",
            "GATEWAY_TRUST_CONTEXT": "LINK",
            "GATEWAY_READ_TIMEOUT_S": "2.5",
            "GATEWAY_CLIENT_TIMEOUT_S": "15",
            "GATEWAY_BUFFER_BODY_BYTES": "64KiB",
            "GATEWAY_SHUTDOWN_TIMEOUT_S": "4.5",
        },
    )
    assert (config.client_timeout_s, config.shutdown_timeout_s) == (15.0, 4.5)
    assert config.buffer_body_bytes == 64 * 1024
    assert config.allowed_origins == ("https://app.example.com", "http://localhost:5173")
    assert config.clock_key == b"a-shared-secret-of-some-length"
    assert not config.clock_key_generated
    assert config.max_body_bytes == 1024 * 1024
    assert config.timing_rate == TimingRate(5.0, 10)
    assert config.trust_context == "link"
    assert config.read_timeout_s == 2.5


def test_origin_patterns_are_accepted() -> None:
    raw = "https://*.example.com, http://*.dev.example:8080, http://localhost:5173"
    config = GatewayConfig.from_env({}, {"GATEWAY_ALLOWED_ORIGINS": raw})
    assert config.allowed_origins == (
        "https://*.example.com",
        "http://*.dev.example:8080",
        "http://localhost:5173",
    )


def test_clock_key_never_in_repr() -> None:
    config = GatewayConfig.from_env({}, {"GATEWAY_CLOCK_KEY": "super-secret-clock-key"})
    assert "super-secret" not in repr(config)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GATEWAY_PORT": "eighty"}, "GATEWAY_PORT must be a whole number"),
        ({"GATEWAY_PORT": "70000"}, "GATEWAY_PORT must be a port number"),
        ({"GATEWAY_WORKERS": "0"}, "GATEWAY_WORKERS must be at least 1"),
        ({"GATEWAY_UPSTREAM": "ftp://x"}, "GATEWAY_UPSTREAM must be http"),
        ({"GATEWAY_UPSTREAM": "http://h:1/api"}, "must not have a path"),
        ({"GATEWAY_UPSTREAM": "http://u:p@h:1"}, "must not carry credentials"),
        ({"GATEWAY_TRUST_CONTEXT": "maybe"}, "GATEWAY_TRUST_CONTEXT must be one of"),
        ({"GATEWAY_ALLOWED_ORIGINS": "*"}, "must be origins like"),
        ({"GATEWAY_ALLOWED_ORIGINS": "http://a.com/path"}, "must be origins like"),
        ({"GATEWAY_ALLOWED_ORIGINS": "https://*"}, "patterns need"),
        ({"GATEWAY_ALLOWED_ORIGINS": "https://*.com"}, "patterns need"),
        ({"GATEWAY_ALLOWED_ORIGINS": "https://a.*.example.com"}, "patterns need"),
        ({"GATEWAY_ALLOWED_ORIGINS": "https://*a.example.com"}, "patterns need"),
        ({"GATEWAY_ALLOWED_ORIGINS": "https://*.*.example.com"}, "patterns need"),
        ({"GATEWAY_ALLOWED_ORIGINS": "*.example.com"}, "must be origins like"),
        ({"GATEWAY_ALLOWED_ORIGINS": "https://*.example.com/"}, "must be origins like"),
        ({"GATEWAY_CLOCK_KEY": "short"}, "at least 16 bytes"),
        ({"GATEWAY_CONNECT_TIMEOUT_S": "-1"}, "positive number of seconds"),
        ({"GATEWAY_READ_TIMEOUT_S": "nan"}, "finite number"),
        ({"GATEWAY_MAX_BODY_BYTES": "10 parsecs"}, "must be a size"),
        ({"GATEWAY_CLIENT_TIMEOUT_S": "0"}, "GATEWAY_CLIENT_TIMEOUT_S must be a positive"),
        ({"GATEWAY_SHUTDOWN_TIMEOUT_S": "-3"}, "GATEWAY_SHUTDOWN_TIMEOUT_S must be a positive"),
        ({"GATEWAY_BUFFER_BODY_BYTES": "lots"}, "GATEWAY_BUFFER_BODY_BYTES must be a size"),
        ({"GATEWAY_TRUSTED_PROXIES": "-2"}, "must not be negative"),
        ({"GATEWAY_MAX_CONNECTIONS": "0"}, "at least 1"),
        ({"GATEWAY_TIMING_RATE": "fast"}, "must look like '20/s, burst 100'"),
    ],
)
def test_bad_values_are_one_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        GatewayConfig.from_env({}, env)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_bad_value_is_one_line_and_exit_2() -> None:
    result = _cli("--port", "abc")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gateway: error: --port must be a whole number, got 'abc' (see --help)"
    ]
    assert "Traceback" not in result.stderr


def test_cli_bad_environment_value_names_the_variable() -> None:
    result = _cli(env={"GATEWAY_UPSTREAM": "not a url"})
    assert result.returncode == 2
    assert "GATEWAY_UPSTREAM" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_port_in_use_is_a_clear_error() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _cli("--port", str(port), "--workers", "1")
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_lists_every_flag_with_its_variable() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    for flag, var in [
        ("--upstream", "GATEWAY_UPSTREAM"),
        ("--port", "GATEWAY_PORT"),
        ("--workers", "GATEWAY_WORKERS"),
        ("--allowed-origins", "GATEWAY_ALLOWED_ORIGINS"),
        ("--trust-context", "GATEWAY_TRUST_CONTEXT"),
        ("--clock-key", "GATEWAY_CLOCK_KEY"),
    ]:
        assert flag in result.stdout
        assert var in result.stdout


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        ({}, "CORS origins enabled: none: same-origin pages only"),
        (
            {"GATEWAY_ALLOWED_ORIGINS": "https://*.example.com,HTTPS://App.Example.org:443"},
            "CORS origins enabled: https://app.example.org, https://*.example.com",
        ),
    ],
)
def test_first_log_line_says_which_origins_are_enabled(env: dict[str, str], enabled: str) -> None:
    from tests.servers import Process

    with Process("gateway", ["--port", "0", "--workers", "1"], env) as proc:
        _, stderr = proc.terminate()
    first = stderr.splitlines()[0]
    assert first.endswith(enabled), stderr


def test_clock_previous_keys_are_parsed_checked_and_never_shown() -> None:
    env = {"GATEWAY_CLOCK_PREVIOUS_KEYS": " old-key-number-one-1234 , old-key-number-two-5678 "}
    config = GatewayConfig.from_env({}, env)
    assert config.clock_previous_keys == (b"old-key-number-one-1234", b"old-key-number-two-5678")
    assert "old-key" not in repr(config)
    with pytest.raises(ConfigError) as err:
        GatewayConfig.from_env({}, {"GATEWAY_CLOCK_PREVIOUS_KEYS": "long-enough-key-0001,short"})
    assert str(err.value) == "GATEWAY_CLOCK_PREVIOUS_KEYS: key 2 must be at least 16 bytes long"
    result = _cli("--port", "0", env={"GATEWAY_CLOCK_PREVIOUS_KEYS": "shortsecret"})
    assert result.returncode == 2
    assert "shortsecret" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("raw", "spans"),
    [
        ("server", ("server",)),
        ("server,client", ("server", "client")),
        (" SERVER , Client ", ("server", "client")),
        ("client,server", ("client", "server")),
    ],
)
def test_gateway_spans_chooses_one_or_two_spans(raw: str, spans: tuple[str, ...]) -> None:
    config = GatewayConfig.from_env({}, {"GATEWAY_SPANS": raw})
    assert config.spans == spans
    assert config.client_span == ("client" in spans)
    assert GatewayConfig.from_env({}, {}).spans == ("server",)


@pytest.mark.parametrize("raw", ["client", "server,internal", "server,,span"])
def test_gateway_spans_refuses_other_values(raw: str) -> None:
    with pytest.raises(ConfigError, match="GATEWAY_SPANS must be 'server' or 'server,client'"):
        GatewayConfig.from_env({}, {"GATEWAY_SPANS": raw})
