"""The snippet next to a page SDK that owns trace context, in real Chromium.

Pages that send traces to Honeycomb mostly run the OpenTelemetry web SDK or
Honeycomb's web instrumentation already; both wrap ``fetch`` and write
``traceparent``, as the snippet does. Here the real SDKs (npm, pinned in
tests/pages/package-lock.json, bundled by esbuild for the test, never
committed) run with the snippet, each loaded before and after it. For every
request: one trace, the SDK's fetch span is the parent of the gateway SERVER
span, the gateway span carries our latency figures, one valid traceparent
reached the gateway, and no span is orphaned. The SDKs' spans are collected
in the page (their exporters would send the same spans).

Gateway and backend run as processes of their own; the page is served from
its own origin (cross-origin to the gateway, as in production).
"""

from __future__ import annotations

import asyncio
import html
import json
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, send_from_directory
from playwright.async_api import Browser

from tests.browser import WsgiThread, chromium
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.servers import ROOT, Process, free_port

PAGES = ROOT / "tests" / "pages"
SDKS = ("otel-web", "honeycomb")
SERVER = 2  # OTLP span kind
REQUESTS = 3


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page SDKs bundled by the pinned esbuild (``make`` installs it)."""
    esbuild = PAGES / "node_modules" / ".bin" / "esbuild"
    assert esbuild.exists(), "tests/pages has no node_modules: run `make unit` (npm ci there)"
    out = tmp_path_factory.mktemp("bundles")
    for sdk in SDKS:
        subprocess.run(
            [str(esbuild), f"{sdk}.js", "--bundle", "--format=iife", "--log-level=warning",
             f"--outfile={out / (sdk + '.js')}"],
            cwd=PAGES, check=True, timeout=120,
        )  # fmt: skip
    return out


class PageServer(WsgiThread):
    """The test pages on a loopback port: /<sdk>/<order>?mode=... loads the
    SDK bundle and the gateway's snippet in that order, then fetches."""

    def __init__(self, gateway_url: str, bundles: Path, port: int) -> None:
        app = Flask(__name__, static_folder=None)
        gateway = html.escape(gateway_url, quote=True)

        @app.get("/<sdk>/<order>/<mode>")
        def page(sdk: str, order: str, mode: str) -> Response:
            name = html.escape(f"{sdk}-{order}-{mode}")
            sdk_tags = (
                f'<script src="/bundles/{html.escape(sdk)}.js"></script>'
                f'<script>startPageSdk("{gateway}")</script>'
            )
            data_mode = "" if mode == "auto" else f' data-mode="{html.escape(mode)}"'
            snippet_tag = f'<script src="{gateway}/__gateway/snippet.js"{data_mode}></script>'
            first, second = (
                (sdk_tags, snippet_tag) if order == "sdk-first" else (snippet_tag, sdk_tags)
            )
            body = f"""<!doctype html><html><head><meta charset="utf-8">
{first}
{second}
<script>
  if (document.querySelector("[data-mode]"))
    LatencyGateway.init({{ traceContext: document.querySelector("[data-mode]").dataset.mode }});
  // The page's first action is its requests, as a feed page does on load.
  const synced = async () => {{
    for (let n = 0; n < 500 && !(LatencyGateway.clock() || {{}}).best; n++)
      await new Promise((r) => setTimeout(r, 20));
  }};
  window.pageDone = (async () => {{
    for (let i = 0; i < {REQUESTS}; i++) {{
      // The last one once the snippet's burst is over: it carries the offset.
      if (i == {REQUESTS} - 1) await synced();
      await fetch("{gateway}/api/echo/{name}-" + i).then((r) => r.text());
    }}
  }})();
</script></head><body></body></html>"""
            return Response(body, mimetype="text/html", headers={"Cache-Control": "no-store"})

        @app.get("/bundles/<name>")
        def bundle(name: str) -> Response:
            return send_from_directory(bundles, name, max_age=0)

        super().__init__(app, port)


@pytest.fixture(scope="module")
def page_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(
    receiver: OtlpReceiver, page_port: int, bundles: Path
) -> Iterator[tuple[str, PageServer]]:
    origin = f"http://127.0.0.1:{page_port}"
    backend_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "FRONTEND_URL": origin,
    }
    gateway_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "GATEWAY_CLOCK_KEY": "coexistence-test-clock-key",
    }
    with ExitStack() as running:
        backend = running.enter_context(Process("backend", ["--port", "0"], backend_env))
        args = ["--upstream", backend.url, "--port", "0", "--workers", "1", "--allowed-origins"]
        gateway = running.enter_context(Process("gateway", [*args, origin], gateway_env))
        pages = running.enter_context(PageServer(gateway.url, bundles, page_port))
        yield gateway.url, pages


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


async def run_page(
    browser: Browser, pages: PageServer, sdk: str, order: str, mode: str
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    context = await browser.new_context()
    # What the snippet reports: every beacon body it hands to the browser.
    await context.add_init_script(
        "window.beacons = []; const send = navigator.sendBeacon.bind(navigator);"
        "navigator.sendBeacon = (u, b) => (window.beacons.push(String(b)), send(u, b));"
    )
    console: list[str] = []
    page = await context.new_page()
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    await page.goto(f"{pages.url}/{sdk}/{order}/{mode}")
    await page.evaluate("window.pageDone")
    handle = await page.wait_for_function(
        "window.pageSpans().filter(s => s.url && s.url.includes('/api/echo/')).length"
        f" >= {REQUESTS} && window.pageSpans()",
        timeout=20_000,
        polling=50,
    )
    spans: list[dict[str, Any]] = await handle.json_value()
    # As on leaving the page: whatever the snippet would report goes now.
    await page.evaluate("window.dispatchEvent(new Event('pagehide'))")
    beacons: list[str] = await page.evaluate("window.beacons")
    await context.close()
    return spans, beacons, console


def gateway_servers(receiver: OtlpReceiver, prefix: str) -> dict[str, ReceivedSpan]:
    """The gateway SERVER span of each request, by url.path (waits for export)."""

    def servers(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
        return {
            str(s.attributes["url.path"]): s
            for s in spans
            if s.service == "gateway"
            and s.kind == SERVER
            and str(s.attributes.get("url.path", "")).startswith(prefix)
        }

    return servers(receiver.wait_for(lambda spans: len(servers(spans)) == REQUESTS))


@pytest.mark.parametrize("order", ["sdk-first", "snippet-first"])
@pytest.mark.parametrize("sdk", SDKS)
async def test_a_page_sdk_owns_the_trace_and_the_gateway_span_gets_our_timing(
    browser: Browser,
    stack: tuple[str, PageServer],
    receiver: OtlpReceiver,
    sdk: str,
    order: str,
) -> None:
    _, pages = stack
    page_spans, beacons, console = await run_page(browser, pages, sdk, order, "auto")
    assert not console, console
    # The SDK reports the browser side: the snippet sends no entry the
    # gateway would have to refuse (a span id that never reached it).
    assert beacons == []
    prefix = f"/api/echo/{sdk}-{order}-auto-"
    servers = gateway_servers(receiver, prefix)
    fetch_spans = {
        s["url"].split("127.0.0.1", 1)[1].split("/", 1)[1]: s
        for s in page_spans
        if s["url"] and "/api/echo/" in s["url"]
    }
    for i in range(REQUESTS):
        path = f"{prefix}{i}"
        server, client = servers[path], fetch_spans[path.lstrip("/")]
        # One valid traceparent reached the gateway (two would be "invalid"),
        # the SDK's, and its fetch span is the gateway span's parent.
        assert server.attributes["gateway.context.source"] == "traceparent"
        assert server.trace_id == client["traceId"]
        assert server.parent_span_id == client["spanId"]
        # Our figures on that span: the first request may leave unsynced
        # (before the burst's answers), never absent.
        assert server.attributes["latency.status"] in {"ok", "unsynced"}, server.attributes
        assert "latency.uplink_ms" in server.attributes or i == 0
        # One trace, no orphan: every span of it has its parent in it (or is
        # the SDK's root), and none is a browser span of ours.
        trace = [s for s in receiver.spans if s.trace_id == server.trace_id]
        known = {s.span_id for s in trace} | {s["spanId"] for s in page_spans}
        assert all(s.parent_span_id in known for s in trace), trace
        assert {s.service for s in trace} == {"gateway", "backend"}
    # Later requests are synced: the burst ran alongside the first.
    assert servers[f"{prefix}{REQUESTS - 1}"].attributes["latency.status"] == "ok"


def beacon_counts(gateway: str) -> dict[str, int]:
    """The gateway's beacon counters (health detail: the test is on loopback)."""
    with urllib.request.urlopen(gateway + "/__gateway/health", timeout=10) as resp:
        counts: dict[str, int] = json.loads(resp.read())["beacon"]
        return counts


async def test_snippet_mode_next_to_an_sdk_loaded_first_loses_only_our_browser_spans(
    browser: Browser, stack: tuple[str, PageServer], receiver: OtlpReceiver
) -> None:
    """What happens without the page mode (the snippet as it was): the SDK's
    fetch wrapper runs inside ours and overwrites our traceparent. The trace
    stays whole (the SDK's span is the parent), but each of our beacon
    entries names a span the gateway never saw, so the gateway refuses it
    (bind_invalid): no orphan, and no browser span of ours either."""
    gateway, pages = stack
    before = beacon_counts(gateway).get("dropped_bind_invalid", 0)
    page_spans, _, _ = await run_page(browser, pages, "otel-web", "sdk-first", "snippet")
    servers = gateway_servers(receiver, "/api/echo/otel-web-sdk-first-snippet-")
    fetch_span_ids = {s["spanId"] for s in page_spans}
    assert all(server.parent_span_id in fetch_span_ids for server in servers.values())
    deadline = time.monotonic() + 20
    while beacon_counts(gateway).get("dropped_bind_invalid", 0) < before + REQUESTS:
        assert time.monotonic() < deadline, beacon_counts(gateway)
        await asyncio.sleep(0.05)
    for server in servers.values():
        services = {s.service for s in receiver.spans if s.trace_id == server.trace_id}
        assert services == {"gateway", "backend"}
