"""A lean HTTP transport for the SDK's OTLP exporter: one kept-alive connection.

What it is for: the export thread posts one batch after another to the same
endpoint. ``requests`` spends most of a post's CPU in its session machinery
(merging settings, hooks, adapters) and urllib3 in its pool; this transport
is :mod:`http.client` on one persistent connection, about a fifth of the
``requests`` session's CPU per post and less than half of urllib3's
(benchmarks/loop_lag.py measures the export thread). It plugs into
opentelemetry-exporter-otlp-proto-http's transport interface, so the SDK
keeps the endpoint, headers, compression, retries and timeouts: this module
only moves bytes and reports status, reason and connection errors.

Not for: proxies (``latency_common/telemetry.py`` keeps a ``requests``
session when one applies to the endpoint) or any endpoint but the one it is
built for.

How: a connection the receiver closed while idle is noticed before the next
post (the socket reads as ready with nothing due) and reopened; one that
breaks during a post is closed and reported as a connection error, which the
SDK retries at once on a new connection. TLS verifies against the system's
CAs, or the CA bundle given, with the optional client certificate, as the
SDK's ``requests`` transport does.

The transport interface lives in private SDK modules
(``opentelemetry.exporter.http.transport._base``); :func:`sdk_transport_api`
returns None when a new SDK moves it, and the caller then falls back to the
``requests`` session. tests/test_otlp_transport.py fails when that happens.
"""

from __future__ import annotations

import http.client
import inspect
import os
import select
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

if TYPE_CHECKING:
    from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport

#: The SDK module holding the transport interface, and the exporter's keyword
#: taking a transport: both private, both checked before use.
SDK_TRANSPORT_MODULE: Final = "opentelemetry.exporter.http.transport._base"
SDK_TRANSPORT_KEYWORD: Final = "_transport"


def sdk_transport_api() -> tuple[type[BaseHTTPResult], type[BaseHTTPTransport]] | None:
    """The SDK's ``(BaseHTTPResult, BaseHTTPTransport)``, or None when this SDK
    has no such interface or its exporter takes no ``_transport``."""
    try:
        from opentelemetry.exporter.http.transport._base import (
            BaseHTTPResult,
            BaseHTTPTransport,
        )
    except ImportError:
        return None
    parameters = inspect.signature(OTLPSpanExporter.__init__).parameters
    if SDK_TRANSPORT_KEYWORD not in parameters:
        return None
    return BaseHTTPResult, BaseHTTPTransport


def _idle_connection_dropped(sock: socket.socket) -> bool:
    """A kept-alive socket with something to read before any request was sent
    has been closed (or reset) by the peer: it cannot carry the next post."""
    # poll, not select: a busy gateway's sockets go past select's FD_SETSIZE.
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def build_keep_alive_transport(
    endpoint: str,
    *,
    verify: bool | str,
    cert: str | tuple[str, str] | None,
) -> BaseHTTPTransport | None:
    """A :class:`BaseHTTPTransport` posting to ``endpoint`` on one kept-alive
    connection, or None when the SDK lacks the interface (see module doc)."""
    api = sdk_transport_api()
    if api is None:
        return None
    base_result, base_transport = api
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:  # not a port: requests reports it at the first post, as before
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None

    @dataclass(frozen=True, slots=True)
    class KeepAliveResult(base_result):  # type: ignore[valid-type,misc]
        body: bytes = b""
        # http.client's headers: case-insensitive, as the interface asks.
        response_headers: http.client.HTTPMessage | None = None

        def content(self) -> bytes:
            return self.body

        def headers(self) -> Mapping[str, str]:
            if self.response_headers is None:
                return {}
            # A Message is no Mapping, but has the get/[]/in the SDK reads.
            return cast(Mapping[str, str], self.response_headers)

    class KeepAliveHTTPTransport(base_transport):  # type: ignore[valid-type,misc]
        def __init__(self) -> None:
            self._url = endpoint
            self._target = parts.path or "/"
            if parts.query:
                self._target += "?" + parts.query
            self._host = parts.hostname or ""
            self._port = port
            self._tls: ssl.SSLContext | None = None
            if parts.scheme == "https":
                self._tls = _tls_context(verify, cert)
            self._connection: http.client.HTTPConnection | None = None

        def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
            connection = self._connection
            if connection is not None and connection.sock is not None:
                if _idle_connection_dropped(connection.sock):
                    connection.close()
                else:
                    connection.sock.settimeout(timeout)
                    return connection
            if connection is None:
                if self._tls is not None:
                    connection = http.client.HTTPSConnection(
                        self._host, self._port, timeout=timeout, context=self._tls
                    )
                else:
                    connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
                self._connection = connection
            connection.timeout = timeout
            return connection

        def request(
            self,
            method: str,
            url: str,
            *,
            headers: dict[str, str] | None = None,
            timeout: float | None = None,
            data: bytes | None = None,
        ) -> BaseHTTPResult:
            if url != self._url:
                return KeepAliveResult(error=ValueError(f"built for {self._url}, not {url}"))
            try:
                connection = self._connect(timeout)
                connection.request(method, self._target, body=data, headers=headers or {})
                response = connection.getresponse()
                body = response.read()
            except Exception as error:  # reported to the SDK's retry loop
                self._drop()
                return KeepAliveResult(error=error)
            if response.will_close:
                self._drop()
            return KeepAliveResult(
                status_code=response.status,
                reason=response.reason,
                body=body,
                response_headers=response.headers,
            )

        def _drop(self) -> None:
            if self._connection is not None:
                self._connection.close()

        def is_connection_error(self, exception: Exception | None) -> bool:
            # Refused, reset, closed mid-answer, timed out, TLS failure: what
            # the requests transport reports as ConnectionError/Timeout/SSLError.
            return isinstance(exception, (OSError, http.client.HTTPException))

        def close(self) -> None:
            self._drop()
            self._connection = None

    return KeepAliveHTTPTransport()


def _tls_context(verify: bool | str, cert: str | tuple[str, str] | None) -> ssl.SSLContext:
    """What ``requests`` does with ``verify`` and ``cert``: the system's CAs
    (or the bundle named by ``verify``), hostname checked; none when False."""
    bundle = verify if isinstance(verify, str) else None
    if bundle is not None and os.path.isdir(bundle):
        context = ssl.create_default_context(capath=bundle)
    else:
        context = ssl.create_default_context(cafile=bundle)
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if isinstance(cert, tuple):
        context.load_cert_chain(cert[0], cert[1])
    elif cert:
        context.load_cert_chain(cert)
    return context


__all__ = ["build_keep_alive_transport", "sdk_transport_api"]
