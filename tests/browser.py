"""Real Chromium for tests: Debian's package driven by Playwright, never a
downloaded browser; the demo page served on a loopback port; a page clock
skewed by an init script."""

from __future__ import annotations

import importlib.util
import shutil
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any, Self

from playwright.async_api import Browser, async_playwright
from werkzeug.serving import BaseWSGIServer, make_server

from tests.servers import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: As the machine's own probe runs it: no sandbox (we are root), and none of
#: the background traffic this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Fails (never skips) when Chromium cannot start: `make test` installs it."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


def skew_script(skew_ms: float) -> str:
    """Shift the page's wall clock by ``skew_ms``: Date (constructor and
    now()) and performance.timeOrigin, as a machine with a wrong clock would
    show them. performance.now() is a duration and stays as it is."""
    return f"""
(() => {{
  const S = {skew_ms!r};
  const RealDate = Date;
  const realNow = RealDate.now.bind(RealDate);
  function FakeDate(...args) {{
    if (!new.target) return new RealDate(realNow() + S).toString();
    return args.length ? new RealDate(...args) : new RealDate(realNow() + S);
  }}
  FakeDate.prototype = RealDate.prototype;
  FakeDate.now = () => realNow() + S;
  FakeDate.UTC = RealDate.UTC;
  FakeDate.parse = RealDate.parse;
  globalThis.Date = FakeDate;
  const origin = performance.timeOrigin;
  Object.defineProperty(performance, "timeOrigin", {{ get: () => origin + S }});
}})();
"""


def _demo_module() -> ModuleType:
    path = ROOT / "frontend-snippet" / "demo" / "server.py"
    spec = importlib.util.spec_from_file_location("demo_server", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WsgiThread:
    """A WSGI app on a loopback port, served by werkzeug's threaded server in
    a thread of the test process (a real server: Chromium keeps pages it did
    not get from the network out of the loopback address space)."""

    def __init__(self, app: Any, port: int = 0) -> None:
        self._server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True)
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class DemoThread(WsgiThread):
    """The demo frontend (Flask) on a loopback port, in a thread."""

    def __init__(self, gateway_url: str, port: int = 0) -> None:
        super().__init__(_demo_module().create_app(gateway_url), port)
