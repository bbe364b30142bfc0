"""The exporter's keep-alive transport (latency_common/otlp_transport.py) over
real loopback receivers: one connection for many batches, a receiver that
closes between batches, 503 then 200, gzip, TLS with a self-signed CA, and
the proxy case still on the requests session."""

from __future__ import annotations

import dataclasses
import gzip
import http.server
import os
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext

from latency_common import otlp_transport, telemetry


def _span(name: str, span_id: int) -> ReadableSpan:
    start_ns = time.time_ns()
    return ReadableSpan(
        name=name,
        context=SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id, is_remote=False),
        resource=Resource.create({"service.name": "gateway"}),
        start_time=start_ns,
        end_time=start_ns + 1_000,
    )


@dataclasses.dataclass
class Behaviour:
    """What the receiver does: answer 503 to the first ``fail_first`` posts,
    close each connection after answering (without saying so) when
    ``close_after_answer``."""

    fail_first: int = 0
    close_after_answer: bool = False


class Receiver:
    """A real HTTP/1.1 OTLP receiver on a thread (http.server, keep-alive),
    optionally TLS: records span names, request headers, and how many TCP
    connections carried the posts."""

    def __init__(self, behaviour: Behaviour, tls: ssl.SSLContext | None = None) -> None:
        self.names: list[str] = []
        # http.server's messages: case-insensitive, as HTTP header names are.
        self.headers: list[Any] = []
        self.connections = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with receiver.lock:
                    receiver.connections += 1

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    if behaviour.fail_first > 0:
                        behaviour.fail_first -= 1
                        self.send_response(503)
                        self.send_header("Retry-After", "0")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    receiver.headers.append(self.headers)
                    if self.headers.get("Content-Encoding") == "gzip":
                        body = gzip.decompress(body)
                    message = ExportTraceServiceRequest.FromString(body)
                    receiver.names += [
                        span.name
                        for resource in message.resource_spans
                        for scope in resource.scope_spans
                        for span in scope.spans
                    ]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()
                if behaviour.close_after_answer:
                    # Closed with no "Connection: close": the client learns it
                    # only from the socket.
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def endpoint(self, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.server.server_address[1]}/v1/traces"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        for spelled in (name, name.lower()):
            monkeypatch.delenv(spelled, raising=False)


def _export_batches(
    receiver: Receiver, batches: int, environ: dict[str, str] | None = None
) -> list[SpanExportResult]:
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint(), **(environ or {})}
    exporter = telemetry.build_exporter(env)
    try:
        return [
            exporter.export([_span(f"GET {b}.{i}", b * 10 + i + 1) for i in range(3)])
            for b in range(batches)
        ]
    finally:
        exporter.shutdown()


def test_the_sdk_still_offers_the_transport_interface_the_exporter_plugs_into() -> None:
    """latency_common/otlp_transport.py implements the SDK's private
    ``BaseHTTPTransport`` and passes it as ``OTLPSpanExporter(_transport=)``.
    When a new SDK moves or changes them this fails (and the exporter falls
    back to the requests session meanwhile): re-read
    opentelemetry/exporter/http/transport/_base.py and the SDK's
    _OTLPHTTPClient._submit/export, and adapt otlp_transport.py."""
    api = otlp_transport.sdk_transport_api()
    assert api is not None, (
        f"{otlp_transport.SDK_TRANSPORT_MODULE} or OTLPSpanExporter("
        f"{otlp_transport.SDK_TRANSPORT_KEYWORD}=) is gone: the exporter uses requests again"
    )
    result, transport = api
    assert transport.__abstractmethods__ == {"request", "close", "is_connection_error"}, (
        "BaseHTTPTransport's abstract methods changed"
    )
    assert {f.name for f in dataclasses.fields(result)} == {"status_code", "reason", "error"}, (
        "BaseHTTPResult's fields (what the SDK's retry loop reads) changed"
    )
    assert result.__abstractmethods__ == {"content", "headers"}
    built = otlp_transport.build_keep_alive_transport(
        "http://127.0.0.1:4318/v1/traces", verify=True, cert=None
    )
    assert isinstance(built, transport)
    OTLPSpanExporter(endpoint="http://127.0.0.1:4318/v1/traces", _transport=built).shutdown()


def test_several_batches_travel_on_one_kept_alive_connection() -> None:
    with Receiver(Behaviour()) as receiver:
        results = _export_batches(receiver, 4)
    assert results == [SpanExportResult.SUCCESS] * 4
    assert len(receiver.names) == 12
    assert receiver.connections == 1
    # What the SDK sets, and none of what requests adds (Accept: */*).
    assert receiver.headers[0]["Content-Type"] == "application/x-protobuf"
    assert receiver.headers[0]["User-Agent"].startswith("OTel-OTLP-Exporter-Python/")
    assert "Accept" not in receiver.headers[0]


def test_a_receiver_closing_the_connection_between_batches_loses_no_span() -> None:
    with Receiver(Behaviour(close_after_answer=True)) as receiver:
        results = []
        env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint()}
        exporter = telemetry.build_exporter(env)
        for b in range(4):
            # Some batches right after the close, some once the FIN is in.
            results.append(exporter.export([_span(f"GET {b}", b + 1)]))
            if b % 2:
                deadline = time.monotonic() + 5
                while receiver.connections < b + 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
        exporter.shutdown()
    assert results == [SpanExportResult.SUCCESS] * 4
    assert receiver.names == ["GET 0", "GET 1", "GET 2", "GET 3"]
    assert receiver.connections >= 4


def test_a_503_is_retried_and_gzip_and_headers_are_the_sdks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SDK reads these from the process environment itself.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-team=edge")
    with Receiver(Behaviour(fail_first=1)) as receiver:
        results = _export_batches(receiver, 2)
    assert results == [SpanExportResult.SUCCESS] * 2
    assert receiver.names == ["GET 0.0", "GET 0.1", "GET 0.2", "GET 1.0", "GET 1.1", "GET 1.2"]
    assert receiver.headers[0]["Content-Encoding"] == "gzip"
    assert receiver.headers[0]["x-team"] == "edge"
    assert receiver.connections == 1


def test_a_refused_connection_fails_the_batch_as_a_connection_error() -> None:
    with Receiver(Behaviour()) as receiver:
        endpoint = receiver.endpoint()
    transport = otlp_transport.build_keep_alive_transport(endpoint, verify=True, cert=None)
    assert transport is not None
    result = transport.request("POST", endpoint, headers={}, timeout=2.0, data=b"")
    assert result.status_code is None
    assert transport.is_connection_error(result.error)
    transport.close()


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a certificate for localhost/127.0.0.1 it signed (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test CA"),
    )
    openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key"),
        *("-out", "server.csr", "-subj", "/CN=localhost"),
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        *("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "san.ext"),
    )
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


def _server_tls(files: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files["cert"], files["key"])
    return context


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "OTEL_EXPORTER_OTLP_CERTIFICATE"])
def test_tls_to_a_receiver_signed_by_the_configured_ca(
    self_signed: dict[str, Path], variable: str
) -> None:
    with Receiver(Behaviour(), tls=_server_tls(self_signed)) as receiver:
        results = _export_batches(receiver, 2, {variable: str(self_signed["ca"])})
    assert results == [SpanExportResult.SUCCESS] * 2
    assert len(receiver.names) == 6
    assert receiver.connections == 1


def test_tls_refuses_a_receiver_the_ca_bundle_does_not_vouch_for(
    self_signed: dict[str, Path],
) -> None:
    with Receiver(Behaviour(), tls=_server_tls(self_signed)) as receiver:
        endpoint = receiver.endpoint()
        transport = otlp_transport.build_keep_alive_transport(endpoint, verify=True, cert=None)
        assert transport is not None
        result = transport.request("POST", endpoint, headers={}, timeout=5.0, data=b"")
        transport.close()
    assert isinstance(result.error, ssl.SSLCertVerificationError)
    assert receiver.names == []


def test_a_proxy_or_a_credential_plugin_keeps_the_requests_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = "http://collector.example:4318/v1/traces"
    assert telemetry.export_transport(endpoint, {}) is not None
    plugin = {"OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER": "x"}
    assert telemetry.export_transport(endpoint, plugin) is None
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    assert telemetry.export_transport(endpoint, {}) is None
    monkeypatch.setenv("NO_PROXY", "collector.example")
    assert telemetry.export_transport(endpoint, {}) is not None


def test_an_endpoint_the_transport_cannot_parse_is_left_to_requests() -> None:
    for endpoint in ("http://127.0.0.1:99999/v1/traces", "ftp://127.0.0.1/v1/traces"):
        assert telemetry.export_transport(endpoint, {}) is None
        telemetry.build_exporter({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint}).shutdown()


def test_a_missing_sdk_interface_falls_back_to_the_requests_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pure logic: when a new SDK has moved the interface, build_exporter
    still builds a working exporter (on requests)."""
    monkeypatch.setattr(otlp_transport, "sdk_transport_api", lambda: None)
    with Receiver(Behaviour()) as receiver:
        assert telemetry.export_transport(receiver.endpoint(), {}) is None
        results = _export_batches(receiver, 1)
    assert results == [SpanExportResult.SUCCESS]
    assert receiver.headers[0]["Accept"] == "*/*"  # requests' default


def test_an_idle_connection_is_checked_at_any_descriptor_number() -> None:
    """A gateway with many clients hands the exporter descriptors past
    select()'s 1024: an open, idle connection is still seen as open (not
    reopened for every batch), and a closed one as closed."""
    import resource
    import socket

    high_fd = 1500
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= high_fd:
        pytest.skip("descriptor limit below 1500")
    ours, peer = socket.socketpair()
    high = socket.socket(fileno=os.dup2(ours.fileno(), high_fd))
    ours.close()
    try:
        assert not otlp_transport._idle_connection_dropped(high)
        peer.close()
        assert otlp_transport._idle_connection_dropped(high)
    finally:
        high.close()
        peer.close()
