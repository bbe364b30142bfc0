"""Secrets and privacy in spans, and the public health and readiness answers.

Sensitive query values become ``REDACTED`` in every ``url.full`` / ``url.query``
(and the older ``http.target`` / ``http.url``) the gateway and the demo
backend export (HTTP semantic conventions, ``url.query``: "sensitive content
provided in query string SHOULD be scrubbed"); ``Authorization``, ``Cookie``
and ``Set-Cookie`` values reach no span, even when the backend is told to
capture every header. ``/__gateway/health`` is liveness, small for the
public; ``/__gateway/ready`` is readiness. Real servers on loopback throughout.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import aiohttp
import pytest
import requests
import yaml
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from yarl import URL

from gateway.app import create_app, mark_stopping
from gateway.config import ConfigError, GatewayConfig
from gateway.reserved import is_loopback
from latency_common.redact import REDACTED
from tests.conftest import GatewayFactory, Traced, make_traced
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.servers import ROOT, BackendThread, Process, free_port

#: Unique values, so finding one anywhere in a span is a leak, not a coincidence.
TOKEN = "tok-7f3a9c1e5b"
EXTRA = "extra-2d8e4b6a0c"
BEARER = "bearer-91c5e7a3f0"
COOKIE = "cookie-4b0d2f8e6a"
SET_COOKIE = "setcookie-c3a1e9d7b5"
SECRETS = (TOKEN, EXTRA, BEARER, COOKIE, SET_COOKIE)
#: Part of the Set-Cookie values the backend's /api/cookies answers with.
BACKEND_SET_COOKIE = "21 Oct 2055 07:28:00"

QUERY = f"a=1&access_token={TOKEN}&mytoken={EXTRA}&b=%2F"
REDACTED_QUERY = f"a=1&access_token={REDACTED}&mytoken={REDACTED}&b=%2F"
SECRET_HEADERS = {
    "Authorization": f"Bearer {BEARER}",
    "Cookie": f"session={COOKIE}",
    # Not a request header, but nothing stops a client sending it.
    "Set-Cookie": f"x={SET_COOKIE}",
    # Captured and harmless: proves header capture was on.
    "X-Probe": "visible",
}
CAPTURE_ALL = {
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST": ".*",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE": ".*",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST": ".*",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE": ".*",
    # An empty sanitize list: the backend must not depend on it.
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS": "",
}


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _leaks(attribute_sets: Iterable[Mapping[str, Any]], needles: Iterable[str]) -> list[str]:
    found = []
    for attributes in attribute_sets:
        for key, value in attributes.items():
            text = repr(value)
            found += [f"{key}={text}" for needle in needles if needle in text]
    return found


def _kind(spans: list[ReadableSpan], kind: str) -> list[ReadableSpan]:
    return [s for s in spans if s.kind.name == kind]


async def _gateway_pair(
    traced: Traced, *, client: bool = False
) -> tuple[ReadableSpan, ReadableSpan | None]:
    """The gateway's SERVER span and, with ``client`` (``GATEWAY_SPANS=server,client``),
    its CLIENT span, once they have ended (the SERVER span ends just after
    the last byte leaves, so poll)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        servers, clients = _kind(traced.spans(), "SERVER"), _kind(traced.spans(), "CLIENT")
        if servers and (clients or not client):
            [server] = servers
            if client:
                [client_span] = clients
                return server, client_span
            assert clients == []
            return server, None
        await asyncio.sleep(0.01)
    raise AssertionError(f"no SERVER (and CLIENT) span: {traced.spans()}")


# -- query redaction ---------------------------------------------------------------


async def test_sensitive_query_values_are_redacted_in_the_gateway_spans(
    gateway: GatewayFactory, http: aiohttp.ClientSession, gateway_spans: Traced
) -> None:
    base = await gateway(redact_query_params=("mytoken",), spans=("server", "client"))
    async with http.get(URL(base + "/api/echo?" + QUERY, encoded=True)) as resp:
        assert resp.status == 200
        # Redaction is for spans only: the backend gets the query unchanged.
        assert (await resp.json())["raw_uri"] == "/api/echo?" + QUERY
    server, client = await _gateway_pair(gateway_spans, client=True)
    assert client is not None
    assert _attrs(server)["url.query"] == REDACTED_QUERY
    assert _attrs(client)["url.full"].endswith("/api/echo?" + REDACTED_QUERY)
    assert _leaks(map(_attrs, gateway_spans.spans()), SECRETS) == []


async def test_server_span_has_no_url_query_without_a_query(
    gateway: GatewayFactory, http: aiohttp.ClientSession, gateway_spans: Traced
) -> None:
    base = await gateway()
    async with http.get(base + "/api/health") as resp:
        assert resp.status == 200
    server, _ = await _gateway_pair(gateway_spans)
    assert "url.query" not in _attrs(server)


async def test_extra_keys_are_not_redacted_unless_configured(
    gateway: GatewayFactory, http: aiohttp.ClientSession, gateway_spans: Traced
) -> None:
    base = await gateway()
    async with http.get(URL(base + "/api/health?" + QUERY, encoded=True)) as resp:
        assert resp.status == 200
    server, _ = await _gateway_pair(gateway_spans)
    assert _attrs(server)["url.query"] == f"a=1&access_token={REDACTED}&mytoken={EXTRA}&b=%2F"


def test_redact_query_params_setting() -> None:
    config = GatewayConfig.from_env({}, {"GATEWAY_REDACT_QUERY_PARAMS": " mytoken , X-Session ,"})
    assert config.redact_query_params == ("mytoken", "X-Session")
    assert GatewayConfig.from_env({}, {}).redact_query_params == ()
    with pytest.raises(ConfigError, match="GATEWAY_REDACT_QUERY_PARAMS"):
        GatewayConfig.from_env({}, {"GATEWAY_REDACT_QUERY_PARAMS": "a=b"})


_QUERY_CHARS = st.text(
    alphabet=st.sampled_from("abcXYZ019-._~%+=&;:@/?!$'()*,"), max_size=40
).filter(lambda q: "#" not in q)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(before=_QUERY_CHARS, after=_QUERY_CHARS, key=st.sampled_from(["access_token", "Sig"]))
async def test_any_query_around_a_secret_keeps_it_out_of_the_exported_spans(
    gateway: GatewayFactory,
    gateway_spans: Traced,
    http: aiohttp.ClientSession,
    before: str,
    after: str,
    key: str,
) -> None:
    gateway_spans.exporter.clear()
    # Two spans: the CLIENT span's url.full must not leak either.
    base = await gateway(spans=("server", "client"))
    query = f"{before}&{key}={TOKEN}&{after}"
    url = URL(base + "/api/health?" + query, encoded=True)
    async with http.get(url) as resp:
        assert resp.status < 500
    await _gateway_pair(gateway_spans, client=True)
    spans = gateway_spans.spans()
    assert _leaks(map(_attrs, spans), [TOKEN]) == []
    # What an OTLP exporter would send: it must encode (no stray surrogates).
    assert TOKEN.encode() not in encode_spans(spans).SerializeToString()


# -- the demo backend, in this process --------------------------------------------


@pytest.fixture
def backend_with_extra_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[BackendThread]:
    monkeypatch.setenv("BACKEND_REDACT_QUERY_PARAMS", "mytoken")
    server = BackendThread(make_traced(service="backend"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_backend_server_span_redacts_the_target(backend_with_extra_key: BackendThread) -> None:
    backend = backend_with_extra_key
    response = requests.get(backend.url + "/api/echo?" + QUERY, timeout=10)
    assert response.json()["raw_uri"] == "/api/echo?" + QUERY
    [server] = _kind(backend.traced.spans(), "SERVER")
    # Default semantic conventions: the target with its query in http.target.
    assert _attrs(server)["http.target"] == "/api/echo?" + REDACTED_QUERY
    assert _leaks(map(_attrs, backend.traced.spans()), SECRETS) == []


async def test_captured_secret_headers_reach_no_span(
    gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    gateway_spans: Traced,
    backend: BackendThread,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in CAPTURE_ALL.items():
        monkeypatch.setenv(name, value)
    base = await gateway()
    async with http.get(base + "/api/cookies", headers=SECRET_HEADERS) as resp:
        assert resp.status == 200
        assert len(resp.headers.getall("Set-Cookie")) == 2
    await _gateway_pair(gateway_spans)
    [backend_server] = _kind(backend.traced.spans(), "SERVER")
    attrs = _attrs(backend_server)
    assert attrs["http.request.header.x_probe"] == ("visible",)
    assert attrs["http.request.header.authorization"] == (REDACTED,)
    assert attrs["http.request.header.cookie"] == (REDACTED,)
    assert attrs["http.response.header.set_cookie"] == (REDACTED,)
    all_attrs = [*map(_attrs, gateway_spans.spans()), *map(_attrs, backend.traced.spans())]
    assert _leaks(all_attrs, [*SECRETS, BACKEND_SET_COOKIE]) == []


def test_backend_client_spans_redact_the_url(backend: BackendThread) -> None:
    backend.reset()
    callback = f"{backend.url}/api/echo?access_token={TOKEN}"
    response = requests.post(
        backend.url + "/api/trace-context-test",
        json=[{"url": callback, "arguments": []}],
        timeout=10,
    )
    assert response.status_code == 200
    # The test's own requests.post is traced too; the backend's call is the
    # one to the callback URL.
    [client] = [
        s for s in _kind(backend.traced.spans(), "CLIENT") if "/api/echo" in _attrs(s)["http.url"]
    ]
    assert _attrs(client)["http.url"] == f"{backend.url}/api/echo?access_token={REDACTED}"
    assert _leaks(map(_attrs, backend.traced.spans()), [TOKEN]) == []


# -- both processes, spans through a real OTLP receiver -----------------------------


@pytest.mark.slow
def test_no_secret_reaches_the_collector_from_gateway_or_backend(
    receiver: OtlpReceiver,
) -> None:
    otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    backend_env = {
        **otlp,
        **CAPTURE_ALL,
        "BACKEND_REDACT_QUERY_PARAMS": "mytoken",
        # Old and new HTTP semantic conventions at once: http.target and url.query.
        "OTEL_SEMCONV_STABILITY_OPT_IN": "http/dup",
    }
    # Two gateway spans, so the CLIENT span's url.full is checked too.
    gateway_env = {
        **otlp,
        "GATEWAY_REDACT_QUERY_PARAMS": "mytoken",
        "GATEWAY_SPANS": "server,client",
    }
    with Process("backend", ["--port", "0"], backend_env) as backend_proc:
        args = ["--upstream", backend_proc.url, "--port", "0", "--workers", "1"]
        with Process("gateway", args, gateway_env) as gateway_proc:
            response = requests.get(
                f"{gateway_proc.url}/api/cookies?{QUERY}", headers=SECRET_HEADERS, timeout=10
            )
            assert response.status_code == 200
            trace_id = response.headers["Server-Timing"].split('traceparent;desc="00-')[1][:32]

            def complete(spans: list[ReceivedSpan]) -> bool:
                mine = [s for s in spans if s.trace_id == trace_id]
                return {(s.service, s.kind) for s in mine} >= {
                    ("gateway", 2),
                    ("gateway", 3),
                    ("backend", 2),
                }

            spans = [s for s in receiver.wait_for(complete) if s.trace_id == trace_id]
    by = {(s.service, s.kind): s.attributes for s in spans}
    assert by["gateway", 2]["url.query"] == REDACTED_QUERY
    assert by["gateway", 3]["url.full"].endswith("/api/cookies?" + REDACTED_QUERY)
    backend_server = by["backend", 2]
    assert backend_server["url.query"] == REDACTED_QUERY
    assert backend_server["http.target"] == "/api/cookies?" + REDACTED_QUERY
    assert "http.request.header.x_probe" in backend_server
    assert _leaks([s.attributes for s in spans], [*SECRETS, BACKEND_SET_COOKIE]) == []


# -- health: liveness, small for the public ------------------------------------------

DETAIL = {"status", "version", "pid", "upstream", "exporter", "beacon"}


async def _health(http: aiohttp.ClientSession, base: str, **headers: str) -> dict[str, Any]:
    async with http.get(base + "/__gateway/health", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        body: dict[str, Any] = await resp.json()
        return body


async def test_health_detail_for_a_client_on_loopback(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    body = await _health(http, base)
    assert set(body) == DETAIL
    assert body["upstream"]["reachable"] is True
    # Without trusted proxies, X-Forwarded-For is anyone's to write: ignored.
    assert set(await _health(http, base, **{"X-Forwarded-For": "203.0.113.9"})) == DETAIL


async def test_health_is_small_for_a_public_client_behind_the_proxy(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway(trusted_proxies=1)
    public = await _health(http, base, **{"X-Forwarded-For": "203.0.113.9"})
    assert public == {"status": "ok"}
    # A spoofed loopback entry before the one the proxy appended changes nothing.
    spoofed = await _health(http, base, **{"X-Forwarded-For": "127.0.0.1, 203.0.113.9"})
    assert spoofed == {"status": "ok"}
    # The proxy's own health check carries no X-Forwarded-For: detail.
    assert set(await _health(http, base)) == DETAIL
    # A client on the proxy's own machine.
    assert set(await _health(http, base, **{"X-Forwarded-For": "::1"})) == DETAIL


async def test_health_stays_200_when_the_upstream_is_down(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    down = await gateway(upstream=f"http://127.0.0.1:{free_port()}")
    body = await _health(http, down)
    assert body["status"] == "ok"
    assert body["upstream"]["reachable"] is False
    async with http.get(down + "/__gateway/ready") as resp:
        assert resp.status == 200
    # Requests still get the clear 502, not a connection error.
    async with http.get(down + "/api/health") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"] == "upstream unreachable"


_XFF = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60
) | st.sampled_from(["127.0.0.1", "::ffff:127.0.0.1", "127.0.0.1:80", "[::1]", "unknown", ""])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(xff=_XFF)
async def test_any_forwarded_for_gets_a_200_and_detail_only_for_loopback(
    gateway: GatewayFactory, http: aiohttp.ClientSession, xff: str
) -> None:
    base = await gateway(trusted_proxies=1)
    async with http.get(base + "/__gateway/health", headers={"X-Forwarded-For": xff}) as resp:
        assert resp.status == 200
        body = await resp.json()
    entries = [item.strip() for item in xff.split(",") if item.strip()]
    expect_detail = is_loopback(entries[-1]) if entries else True
    assert ("pid" in body) is expect_detail, body
    assert body["status"] == "ok"


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("203.0.113.9", False),
        ("::ffff:203.0.113.9", False),
        ("localhost", False),  # a name is not an address anyone vouched for
        ("", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_docker_healthcheck_probes_readiness_and_compose_shares_the_redact_list() -> None:
    dockerfile = (ROOT / "deploy" / "gateway.Dockerfile").read_text()
    [healthcheck] = re.findall(r"^HEALTHCHECK .*\n.*$", dockerfile, re.MULTILINE)
    assert "/__gateway/ready" in healthcheck
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    shared = services["gateway"]["environment"]["GATEWAY_REDACT_QUERY_PARAMS"]
    assert services["backend"]["environment"]["BACKEND_REDACT_QUERY_PARAMS"] == shared


# -- readiness -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["on_shutdown", "mark_stopping"])
async def test_ready_turns_503_once_the_gateway_is_stopping(
    http: aiohttp.ClientSession, backend: BackendThread, how: str
) -> None:
    config = GatewayConfig().replace(upstream=backend.url, workers=1, clock_key=b"k" * 32)
    app = create_app(config, tracer_provider=make_traced().provider)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    try:
        async with http.get(base + "/__gateway/ready") as resp:
            assert resp.status == 200
            assert resp.headers["Cache-Control"] == "no-store"
            assert await resp.json() == {"status": "ready"}
        if how == "on_shutdown":
            # What AppRunner.cleanup() runs on SIGTERM (after the listener closes).
            await app.shutdown()
        else:
            # What a stop sequence with a grace period calls first.
            mark_stopping(app)
        async with http.get(base + "/__gateway/ready") as resp:
            assert resp.status == 503
            assert await resp.json() == {"status": "stopping"}
        # Liveness is unaffected: the process still serves.
        async with http.get(base + "/__gateway/health") as resp:
            assert resp.status == 200
        async with http.head(base + "/__gateway/ready") as resp:
            assert resp.status == 503
    finally:
        await server.close()
