"""The snippet served by the gateway: /__gateway/snippet.js and .mjs."""

from __future__ import annotations

import aiohttp

from tests.conftest import GatewayFactory

ORIGIN = {"Origin": "http://localhost:3000"}


async def test_snippet_is_served_cacheable_with_etag(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    from gateway.reserved import SNIPPET_PATH

    base = await gateway()
    async with http.get(base + "/__gateway/snippet.js") as resp:
        assert resp.status == 200
        body = await resp.read()
        etag = resp.headers["ETag"]
        assert resp.headers["Content-Type"].startswith("text/javascript")
        assert "max-age=" in resp.headers["Cache-Control"]
    assert body == SNIPPET_PATH.read_bytes()
    async with http.get(base + "/__gateway/snippet.js", headers={"If-None-Match": etag}) as r:
        assert r.status == 304
        assert await r.read() == b""
    async with http.get(base + "/__gateway/snippet.mjs", headers=ORIGIN) as resp:
        module = await resp.read()
        assert module.startswith(body)
        assert b"export default" in module
        assert resp.headers["ETag"] != etag
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN["Origin"]
