"""Shared fixtures: real servers on ephemeral loopback ports, in-memory spans.

* ``backend``: the real Flask backend on werkzeug's threaded server, in a
  thread of the test process, with its own in-memory span exporter.
* ``gateway``: a factory for the real gateway app (``create_app``) on a real
  loopback socket, in the test's event loop, with an in-memory exporter.
* ``GatewayProcess`` (in ``tests/servers.py``): ``python -m gateway`` as a
  subprocess, for memory, signals and multi-process tests.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from backend.app import instrument_requests
from gateway.app import create_app
from gateway.config import GatewayConfig
from latency_common.telemetry import Telemetry
from tests.otlp_receiver import OtlpReceiver
from tests.servers import BackendThread, Process

# No test may export to a real endpoint: anything that builds an exporter from
# the environment posts to a closed loopback port.
os.environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "200")


@dataclass
class Traced:
    provider: TracerProvider
    exporter: InMemorySpanExporter
    processor: SimpleSpanProcessor | None = None

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def by_name(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name]


def make_traced(sampler: Any = ALWAYS_ON, service: str = "test") -> Traced:
    from opentelemetry.sdk.resources import Resource

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler, resource=Resource.create({"service.name": service}))
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return Traced(provider, exporter, processor)


# The backend's outgoing ``requests`` calls are instrumented once per process,
# for the first tracer provider that asks (backend.app.create_app). Claim that
# for the session backend's provider before any test builds another app, so
# its callback CLIENT spans land in ``backend.traced``.
_BACKEND_TRACED = make_traced(sampler=None, service="backend")
instrument_requests(_BACKEND_TRACED.provider)


@pytest.fixture(scope="session")
def backend() -> Iterator[BackendThread]:
    """The real backend on a real socket, shared by the session (its spans are
    collected in ``backend.traced``; clear them per test with ``backend.reset()``)."""
    server = BackendThread(_BACKEND_TRACED)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP receiver for the processes a module starts."""
    with OtlpReceiver() as rec:
        yield rec


@pytest.fixture(scope="module")
def backend_proc(receiver: OtlpReceiver) -> Iterator[Process]:
    """``python -m backend`` as a process, exporting to ``receiver``."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with Process("backend", ["--port", "0"], env) as proc:
        yield proc


@pytest.fixture
def gateway_spans() -> Traced:
    return make_traced(service="gateway")


GatewayFactory = Callable[..., Awaitable[str]]

#: The demo page's origins: granted by the backend by default (FRONTEND_URL).
DEMO_ORIGINS = ("http://localhost:3000", "http://127.0.0.1:3000")


@pytest.fixture
async def gateway(gateway_spans: Traced, backend: BackendThread) -> AsyncIterator[GatewayFactory]:
    """``await gateway(**config_changes)`` → base URL of a gateway on a real
    loopback port, proxying to the real backend unless ``upstream`` is given.
    It allows the demo's origins (``DEMO_ORIGINS``, which the backend grants
    too) unless ``allowed_origins`` is given."""
    servers: list[TestServer] = []
    backend.reset()

    async def start(**changes: Any) -> str:
        changes.setdefault("upstream", backend.url)
        changes.setdefault("workers", 1)
        changes.setdefault("clock_key", b"k" * 32)
        changes.setdefault("allowed_origins", DEMO_ORIGINS)
        config = GatewayConfig().replace(**changes)
        telemetry = Telemetry(gateway_spans.provider, gateway_spans.processor)
        app = create_app(config, telemetry=telemetry)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client: no decompression, no cookie jar, no auto headers."""
    async with aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:
        yield session


async def start_upstream(app: web.Application) -> tuple[TestServer, str]:
    """A scripted upstream (aiohttp) on a real loopback port, for faults the
    real backend cannot produce on demand."""
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server, str(server.make_url("")).rstrip("/")
