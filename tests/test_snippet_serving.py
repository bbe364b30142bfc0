"""The snippet served by the gateway: /__gateway/snippet.js and .mjs, with
the allow-list the snippet needs to tag the first request of a page, and
/__gateway/snippet-<version>.js and .mjs, the same bytes for every
deployment, whose Subresource Integrity hashes the README prints."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import __version__
from gateway.cors import Cors
from gateway.reserved import ALLOWED_ORIGINS_MARKER, SNIPPET_PATH
from tests.browser import chromium
from tests.conftest import GatewayFactory
from tests.servers import free_port
from tests.test_browser import OnePage

ORIGIN = {"Origin": "http://localhost:3000"}
ALLOWED = ("http://localhost:3000", "https://*.example.com")


def allow_list_in(body: bytes) -> str | None:
    """The value the gateway wrote at the snippet's marker (JSON), parsed."""
    marker = ALLOWED_ORIGINS_MARKER.removesuffix(b"null")
    start = body.index(marker) + len(marker)
    value, _ = json.JSONDecoder().raw_decode(body[start:].decode())
    assert value is None or isinstance(value, str)
    return value


async def test_snippet_is_served_cacheable_with_etag(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    async with http.get(base + "/__gateway/snippet.js") as resp:
        assert resp.status == 200
        body = await resp.read()
        etag = resp.headers["ETag"]
        assert resp.headers["Content-Type"].startswith("text/javascript")
        assert "max-age=" in resp.headers["Cache-Control"]
    source = SNIPPET_PATH.read_bytes()
    # The file as it is, but for the allow-list at its marker.
    assert body.count(b"/*@gateway-allowed-origins*/ ") == 1
    assert (
        re.sub(rb"/\*@gateway-allowed-origins\*/ \"[^\"]*\"", ALLOWED_ORIGINS_MARKER, body)
        == source
    )
    async with http.get(base + "/__gateway/snippet.js", headers={"If-None-Match": etag}) as r:
        assert r.status == 304
        assert await r.read() == b""
    async with http.get(base + "/__gateway/snippet.mjs", headers=ORIGIN) as resp:
        module = await resp.read()
        assert module.startswith(body)
        assert b"export default" in module
        assert resp.headers["ETag"] != etag
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN["Origin"]


async def test_the_served_allow_list_matches_what_cors_grants(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway(allowed_origins=ALLOWED)
    for path in ("/__gateway/snippet.js", "/__gateway/snippet.mjs"):
        async with http.get(base + path) as resp:
            body = await resp.read()
        pattern = allow_list_in(body)
        assert pattern is not None
        # Python's re and JavaScript's RegExp read this pattern alike.
        for origin in ("http://localhost:3000", "https://app.example.com"):
            assert re.fullmatch(pattern, origin), origin
        for origin in ("http://localhost:3001", "https://a.b.example.com", "https://example.com"):
            assert not re.fullmatch(pattern, origin), origin
    # The module carries it twice: in the file and in its init().
    assert body.count(json.dumps(pattern).encode()) == 2


async def test_the_snippet_is_the_same_bytes_for_every_page(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """Cache-safe: a CDN that ignores Vary: Origin (many do) can serve one
    page's copy to any other, so the body holds the allow-list itself, never
    a verdict about the page that asked."""
    base = await gateway(allowed_origins=ALLOWED)
    bodies = set()
    for headers in ({}, ORIGIN, {"Origin": "https://evil.test"}, {"Origin": "null"}):
        async with http.get(base + "/__gateway/snippet.js", headers=headers) as resp:
            bodies.add((await resp.read(), resp.headers["ETag"]))
    assert len(bodies) == 1


async def test_no_cross_origin_page_allowed_serves_null(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway(allowed_origins=())
    for path in ("/__gateway/snippet.js", "/__gateway/snippet.mjs"):
        async with http.get(base + path) as resp:
            assert allow_list_in(await resp.read()) is None


LABEL = st.from_regex(r"[a-z0-9-]{0,64}", fullmatch=True)
ORIGINS = st.one_of(
    st.sampled_from(["http://localhost:3000", "https://example.com", "null", ""]),
    st.builds(lambda a, b: f"https://{a}.{b}.example.com", LABEL, LABEL),
    st.builds(lambda a: f"https://{a}.example.com", LABEL),
    st.builds(lambda a: f"https://{a}.example.com:8443", LABEL),
    st.builds(lambda a: f"http://{a}.example.com", LABEL),
    st.text(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(origin=ORIGINS)
def test_browser_pattern_gives_the_same_verdict_as_cors(origin: str) -> None:
    cors = Cors(("http://localhost:3000", "https://*.example.com", "https://*.example.com:8443"))
    pattern = cors.browser_pattern()
    assert pattern is not None
    granted = origin in cors.exact or any(p.matches(origin) for p in cors.patterns)
    assert bool(re.fullmatch(pattern, origin)) == granted


# -- the versioned URLs: the same bytes from every gateway, for SRI -------------------

VERSIONED = (
    f"/__gateway/snippet-{__version__}.js",
    f"/__gateway/snippet-{__version__}.mjs",
)
README = Path(__file__).resolve().parent.parent / "README.md"


def sri_sha384(body: bytes) -> str:
    """The integrity value of these bytes (W3C Subresource Integrity §3.3)."""
    return "sha384-" + base64.b64encode(hashlib.sha384(body).digest()).decode()


async def test_versioned_snippet_is_immutable_and_the_same_for_every_deployment(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    narrow = await gateway(allowed_origins=())
    wide = await gateway(allowed_origins=ALLOWED)
    source = SNIPPET_PATH.read_bytes()
    for path in VERSIONED:
        bodies = set()
        for base in (narrow, wide):
            for headers in ({}, ORIGIN, {"Origin": "https://evil.test"}):
                async with http.get(base + path, headers=headers) as resp:
                    assert resp.status == 200
                    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
                    assert resp.headers["Content-Type"].startswith("text/javascript")
                    # integrity makes the browser fetch in CORS mode; the public
                    # bytes go to any origin, with no per-origin answer to cache.
                    assert resp.headers["Access-Control-Allow-Origin"] == "*"
                    assert "Vary" not in resp.headers
                    body = await resp.read()
                    bodies.add(body)
                    etag = resp.headers["ETag"]
        assert len(bodies) == 1, "a per-deployment byte would break the integrity hash"
        # No allow-list written in: the marker keeps its null.
        assert allow_list_in(body) is None
        assert body.startswith(source)
        async with http.get(narrow + path, headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
    async with http.get(narrow + "/__gateway/snippet-0.0.1.js") as resp:
        assert resp.status == 404


async def test_readme_prints_the_integrity_of_the_versioned_snippet(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """Fails when snippet.js or the version changed and README's tags were
    not refreshed (README, "Add it to your frontend", says how)."""
    base = await gateway()
    readme = README.read_text()
    for path in VERSIONED:
        async with http.get(base + path) as resp:
            integrity = sri_sha384(await resp.read())
        tag = re.search(rf'src="[^"]*{re.escape(path)}"\s+integrity="([^"]+)"', readme)
        assert tag is not None, f"README has no <script src=…{path} integrity=…> tag"
        assert tag.group(1) == integrity, (
            f"README's integrity for {path} is out of date: it is {integrity}"
        )


@pytest.mark.parametrize("suffix", [".js", ".mjs"])
async def test_chromium_runs_the_pinned_snippet_and_refuses_altered_bytes(
    gateway: GatewayFactory, http: aiohttp.ClientSession, suffix: str
) -> None:
    """A real browser checks the integrity of what the gateway serves: with
    README's tag the snippet runs and syncs against a gateway on another
    origin (CORS for the load comes from ``*``); with any other hash it
    never runs."""
    page_port = free_port()
    page_origin = f"http://127.0.0.1:{page_port}"
    base = await gateway(allowed_origins=(page_origin,))
    path = f"/__gateway/snippet-{__version__}{suffix}"
    async with http.get(base + path) as resp:
        integrity = sri_sha384(await resp.read())
    kind = ' type="module"' if suffix == ".mjs" else ""
    # The module imported as a script initialises nothing: init it by hand.
    start = (
        f'<script type="module">LatencyGateway.init({{gatewayOrigins: ["{base}"]}});</script>'
        if suffix == ".mjs"
        else ""
    )
    tampered = "sha384-" + base64.b64encode(bytes(48)).decode()
    outcomes = []
    async with chromium() as browser:
        for value in (integrity, tampered):
            html = (
                f'<!doctype html><script{kind} src="{base}{path}" integrity="{value}"'
                f' crossorigin="anonymous"></script>{start}'
            )
            with OnePage(html, page_port) as page_server:
                context = await browser.new_context()
                page = await context.new_page()
                await page.goto(page_server.url, wait_until="load")
                if value == integrity:
                    await page.wait_for_function(
                        "LatencyGateway.clock() && LatencyGateway.clock().best != null",
                        timeout=20_000,
                        polling=50,
                    )
                    outcomes.append(await page.evaluate("LatencyGateway.clock().on"))
                else:
                    outcomes.append(await page.evaluate("typeof window.LatencyGateway"))
                await context.close()
    assert outcomes == [True, "undefined"]
