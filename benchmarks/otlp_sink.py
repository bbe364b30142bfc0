"""A real OTLP/HTTP receiver for the benchmarks, in a process of its own.

What it is for: the endpoint the traced cases export to. It decodes every
``ExportTraceServiceRequest`` (protobuf, as a collector would), counts spans,
tallies the gateway SERVER spans' ``latency.status`` (proof that the latency
checks ran under load) and, with ``--keep``, remembers the ``latency.*``
attributes of SERVER spans by trace id for the accuracy runs.

Not for: storing traces (``viewer`` is that) or tests
(``tests/otlp_receiver.py``).

    python benchmarks/otlp_sink.py --port P [--keep]
    GET /stats        {"spans", "posts", "bytes", "status": {"ok": n, ...}}
    GET /trace/<id>   latency.* attributes of that trace's SERVER spans (--keep),
                      and ``sink.received_ms``: when their export reached us (epoch)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections import Counter
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER
KEEP_MAX = 100_000


class Sink:
    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.spans = 0
        self.posts = 0
        self.bytes = 0
        self.status: Counter[str] = Counter()
        self.by_trace: dict[str, list[dict[str, Any]]] = {}
        self.reply = ExportTraceServiceResponse().SerializeToString()

    async def traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.posts += 1
        self.bytes += len(body)
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans += len(scope_spans.spans)
                for span in scope_spans.spans:
                    if span.kind == SERVER_KIND:
                        self._server_span(span, time.time_ns() / 1e6)
        return web.Response(body=self.reply, content_type="application/x-protobuf")

    def _server_span(self, span: Any, received_ms: float) -> None:
        attrs: dict[str, Any] = {}
        for attr in span.attributes:
            if attr.key.startswith("latency."):
                kind = attr.value.WhichOneof("value")
                attrs[attr.key] = getattr(attr.value, kind) if kind else None
        status = attrs.get("latency.status")
        if status is None:
            return
        self.status[str(status)] += 1
        if self.keep and len(self.by_trace) < KEEP_MAX:
            attrs["sink.received_ms"] = received_ms
            self.by_trace.setdefault(span.trace_id.hex(), []).append(attrs)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "spans": self.spans,
                "posts": self.posts,
                "bytes": self.bytes,
                "status": dict(self.status),
            }
        )

    async def trace(self, request: web.Request) -> web.Response:
        return web.json_response(self.by_trace.get(request.match_info["trace_id"], []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keep", action="store_true", help="keep latency.* by trace id")
    args = parser.parse_args()
    sink = Sink(args.keep)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", sink.traces)
    app.router.add_get("/stats", sink.stats)
    app.router.add_get("/trace/{trace_id}", sink.trace)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        print(f"sink listening on http://{args.host}:{args.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
