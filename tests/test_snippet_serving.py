"""The snippet served by the gateway: /__gateway/snippet.js and .mjs, with
the allow-list the snippet needs to tag the first request of a page, and
/__gateway/snippet-<version>.js and .mjs, the same bytes for every
deployment, whose Subresource Integrity hashes the README prints."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import random
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from gateway import __version__
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.cors import Cors
from gateway.reserved import ALLOWED_ORIGINS_MARKER, SAMPLE_BOUND_MARKER, SNIPPET_PATH
from gateway.snippet import stripped
from latency_common.telemetry import Telemetry
from tests.browser import chromium
from tests.conftest import GatewayFactory, make_traced
from tests.servers import Process, free_port, parse_head, raw_request
from tests.test_browser import OnePage

ORIGIN = {"Origin": "http://localhost:3000"}
ALLOWED = ("http://localhost:3000", "https://*.example.com")


async def decoded(resp: aiohttp.ClientResponse) -> bytes:
    """The body as the page's script gets it: gunzipped when the gateway
    sent gzip (the ``http`` fixture asks for it, as aiohttp does by default,
    and does not decompress)."""
    body = await resp.read()
    coding = resp.headers.get("Content-Encoding")
    assert coding in (None, "gzip")
    return gzip.decompress(body) if coding == "gzip" else body


def marker_value(body: bytes, marker: bytes) -> str | None:
    """The value the gateway wrote at one of the snippet's markers (JSON), parsed."""
    marker = marker.removesuffix(b"null")
    start = body.index(marker) + len(marker)
    value, _ = json.JSONDecoder().raw_decode(body[start:].decode())
    assert value is None or isinstance(value, str)
    return value


def allow_list_in(body: bytes) -> str | None:
    return marker_value(body, ALLOWED_ORIGINS_MARKER)


def sample_bound_in(body: bytes) -> str | None:
    return marker_value(body, SAMPLE_BOUND_MARKER)


async def test_snippet_is_served_cacheable_with_etag(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway()
    async with http.get(base + "/__gateway/snippet.js") as resp:
        assert resp.status == 200
        body = await decoded(resp)
        etag = resp.headers["ETag"]
        assert resp.headers["Content-Type"].startswith("text/javascript")
        assert "max-age=" in resp.headers["Cache-Control"]
    source = stripped(SNIPPET_PATH.read_bytes())
    # The file without comment lines and indentation, but for the allow-list
    # at its marker.
    assert body.count(b"/*@gateway-allowed-origins*/ ") == 1
    assert (
        re.sub(rb"/\*@gateway-allowed-origins\*/ \"[^\"]*\"", ALLOWED_ORIGINS_MARKER, body)
        == source
    )
    async with http.get(base + "/__gateway/snippet.js", headers={"If-None-Match": etag}) as r:
        assert r.status == 304
        assert await r.read() == b""
    async with http.get(base + "/__gateway/snippet.mjs", headers=ORIGIN) as resp:
        module = await decoded(resp)
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
            body = await decoded(resp)
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
            bodies.add((await decoded(resp), resp.headers["ETag"]))
    assert len(bodies) == 1


async def test_no_cross_origin_page_allowed_serves_null(
    gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    base = await gateway(allowed_origins=())
    for path in ("/__gateway/snippet.js", "/__gateway/snippet.mjs"):
        async with http.get(base + path) as resp:
            assert allow_list_in(await decoded(resp)) is None


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


# -- ?sampled=gateway: the bound of the gateway's trace-id ratio sampler -----------------

SAMPLED = "?sampled=gateway"


@pytest.fixture
async def sampler_gateway(backend: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """``await sampler_gateway(name, arg)`` → a gateway whose sampler the SDK
    built from ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``, as in
    production (``arg`` None: unset)."""
    servers: list[TestServer] = []

    async def start(name: str, arg: str | None) -> str:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
        if arg is None:
            monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
        else:
            monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
        traced = make_traced(sampler=None, service="gateway")  # None: from the environment
        config = GatewayConfig().replace(upstream=backend.url, workers=1, clock_key=b"k" * 32)
        server = TestServer(
            create_app(config, telemetry=Telemetry(traced.provider, traced.processor))
        )
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


@pytest.mark.parametrize(
    ("name", "arg", "bound"),
    [
        ("traceidratio", "0.5", "8000000000000000"),
        ("parentbased_traceidratio", "0.25", "4000000000000000"),
        ("parentbased_traceidratio", "0.001", f"{round(0.001 * 2**64):016x}"),
        ("traceidratio", "0", "0000000000000000"),  # nothing sampled
        ("parentbased_traceidratio", "1", None),  # everything: no bound needed
        ("always_on", None, None),
        ("parentbased_always_on", None, None),
        ("always_off", None, None),
    ],
)
async def test_the_sampled_variant_carries_the_bound_of_a_ratio_sampler(
    sampler_gateway: Any, http: aiohttp.ClientSession, name: str, arg: str | None, bound: str | None
) -> None:
    base = await sampler_gateway(name, arg)
    for path in ("/__gateway/snippet.js", "/__gateway/snippet.mjs"):
        async with http.get(base + path) as resp:
            plain, plain_etag = await decoded(resp), resp.headers["ETag"]
        async with http.get(base + path + SAMPLED) as resp:
            assert resp.status == 200
            assert resp.headers["Cache-Control"] == "public, max-age=300"
            sampled, etag = await decoded(resp), resp.headers["ETag"]
        # Not asked: null, whatever the sampler (the page keeps flags 03).
        assert sample_bound_in(plain) is None
        assert sample_bound_in(sampled) == bound
        # The only difference is the bound: one entity tag per body.
        assert (
            sampled.replace(
                b"/*@gateway-sample-bound*/ " + json.dumps(bound).encode(), SAMPLE_BOUND_MARKER
            )
            == plain
        )
        assert (etag == plain_etag) == (bound is None)
        async with http.get(base + path + SAMPLED, headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
        if bound is not None:
            # RFC 9110 §13.1.2: the plain variant's tag does not match this body.
            async with http.get(
                base + path + SAMPLED, headers={"If-None-Match": plain_etag}
            ) as resp:
                assert resp.status == 200
    # The versioned URLs keep their bytes (and integrity hash): no bound.
    async with http.get(f"{base}/__gateway/snippet-{__version__}.js{SAMPLED}") as resp:
        assert sample_bound_in(await decoded(resp)) is None


@pytest.fixture(scope="module")
def ratio_gateway() -> Iterator[Process]:
    """``python -m gateway`` with ``traceidratio`` 0.5 from its environment."""
    env = {
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.5",
        "GATEWAY_CLOCK_KEY": "sampled-flag-test-clock-key",
    }
    args = ["--upstream", "http://127.0.0.1:9", "--port", "0", "--workers", "1"]
    with Process("gateway", args, env) as gateway:
        yield gateway
        _, stderr = gateway.terminate()
    assert "Traceback" not in stderr


@settings(max_examples=300, deadline=None)
@given(
    query=st.one_of(
        st.binary(max_size=80),
        st.from_regex(rb"[a-z=&]{0,30}", fullmatch=True),
        st.builds(
            lambda before, after: before + b"sampled=gateway" + after,
            st.sampled_from([b"", b"x=1&", b"sampled=no&", b"&&"]),
            st.binary(max_size=20),
        ),
    )
)
def test_any_query_gets_one_of_the_two_variants_never_an_error(
    ratio_gateway: Process, query: bytes
) -> None:
    """Hostile query bytes, raw on the socket: the plain variant, unless the
    query holds the pair sampled=gateway; at worst a 400 from the HTTP
    parser for bytes a request target may not hold (RFC 9112 §3.2)."""
    response = raw_request(
        ratio_gateway.port,
        b"GET /__gateway/snippet.js?"
        + query
        + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    status = int(response.split(b" ", 2)[1])
    if status == 400:
        assert re.search(rb"[\x00-\x20\x7f-\xff#]", query)
        return
    assert status == 200
    body = response.partition(b"\r\n\r\n")[2]
    bound = sample_bound_in(body)
    assert bound in (None, "8000000000000000")
    # Where no parser can read the query another way (no escapes, spaces,
    # "+", "#"), exactly the pair sampled=gateway asks.
    if re.fullmatch(rb"[A-Za-z0-9=&._~-]*", query):
        asked = ("sampled", "gateway") in parse_qsl(query.decode())
        assert (bound is not None) == asked


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
    source = stripped(SNIPPET_PATH.read_bytes())
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
                    # Not per origin; per coding (RFC 9110 §12.5.5).
                    assert resp.headers["Vary"] == "Accept-Encoding"
                    body = await decoded(resp)
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
            integrity = sri_sha384(await decoded(resp))
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
        integrity = sri_sha384(await decoded(resp))
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


#: Runs a served snippet in Node (as helpers.js does for the tests there: the
#: closure gets one export line) and prints the flags of traceparent(id, …)
#: for each trace id, with the bound the gateway wrote in.
NODE_FLAGS = r"""
const vm = require("node:vm");
const input = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
const source = input.body.replace(/\}\)\(\);\s*$/, "module.exports = { traceparent };\n})();\n");
const helpers = { exports: {} };
vm.runInThisContext(`(function (module) {${source}})`)(helpers);
const traceparent = (id) => helpers.exports.traceparent(id, "b7ad6b7169203331");
const flags = input.ids.map((id) => traceparent(id).split("-")[3]);
process.stdout.write(JSON.stringify(flags));
"""


def node_flags(body: bytes, trace_ids: list[str]) -> list[str]:
    node = shutil.which("node")
    assert node, "node is not installed (Debian: apt-get install nodejs)"
    done = subprocess.run(
        [node, "-e", NODE_FLAGS],
        input=json.dumps({"body": body.decode(), "ids": trace_ids}),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    flags: list[str] = json.loads(done.stdout)
    return flags


@pytest.mark.parametrize(
    ("name", "rate"),
    [
        ("traceidratio", 0.5),
        ("parentbased_traceidratio", 1 / 3),
        ("traceidratio", 0.001),
        ("parentbased_traceidratio", 0.999),
        ("traceidratio", 1e-19),
        ("traceidratio", 0.0),
        ("traceidratio", 1.0),
    ],
)
async def test_the_served_snippet_decides_as_the_sdks_ratio_sampler(
    sampler_gateway: Any, http: aiohttp.ClientSession, name: str, rate: float
) -> None:
    """The snippet the gateway serves at ?sampled=gateway, run by Node, flags
    a trace sampled (03) exactly when Python's TraceIdRatioBased with the
    gateway's ratio samples it, else 02, for random ids and the ids at the
    bound."""
    base = await sampler_gateway(name, repr(rate))
    async with http.get(base + "/__gateway/snippet.js" + SAMPLED) as resp:
        body = await decoded(resp)
    reference = TraceIdRatioBased(rate)
    rng = random.Random(f"{name} {rate}")
    lows = [0, 1, 2**63, 2**64 - 1]
    lows += [
        b for b in (reference.bound - 1, reference.bound, reference.bound + 1) if 0 <= b < 2**64
    ]
    trace_ids = [f"{rng.getrandbits(64) | 1:016x}{low:016x}" for low in lows]
    trace_ids += [f"{rng.getrandbits(128) | 1:032x}" for _ in range(2000)]
    expected = [
        "03" if reference.should_sample(None, int(t, 16), "x").decision.is_sampled() else "02"
        for t in trace_ids
    ]
    flags = node_flags(body, trace_ids)
    assert flags == expected
    # And the gateway, asked with the snippet's traceparent as the remote
    # parent (a parent-based sampler follows its flag), decides the same.
    gateway_sampler = (
        ParentBasedTraceIdRatio if name.startswith("parentbased") else TraceIdRatioBased
    )(rate)
    for trace_id, flag in zip(trace_ids, flags, strict=True):
        parent = SpanContext(
            int(trace_id, 16),
            0xB7AD6B7169203331,
            is_remote=True,
            trace_flags=TraceFlags(int(flag, 16)),
        )
        context = set_span_in_context(NonRecordingSpan(parent))
        decision = gateway_sampler.should_sample(context, int(trace_id, 16), "GET").decision
        assert decision.is_sampled() == (flag == "03"), trace_id
    if 0.1 < rate < 0.9:
        assert {"02", "03"} <= set(flags)


# -- what goes on the wire: gzip when the request accepts it, identity else -------------

#: Every URL the snippet is served at.
SERVED = (
    "/__gateway/snippet.js",
    "/__gateway/snippet.mjs",
    "/__gateway/snippet.js?sampled=gateway",
    *VERSIONED,
)


def fetch_raw(
    port: int, path: str, fields: list[tuple[str, str]], method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these header fields, raw on the socket."""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in fields)
    response = raw_request(port, head.encode("latin-1") + b"\r\n", until_close=method == "HEAD")
    status, headers, body = parse_head(response)
    return status, {name.lower(): value for name, value in headers}, body


def identity_body(port: int, path: str) -> tuple[bytes, str]:
    status, headers, body = fetch_raw(port, path, [])
    assert status == 200
    assert "content-encoding" not in headers
    return body, headers["etag"]


@pytest.mark.parametrize(
    ("fields", "gzipped"),
    [
        ([], False),  # said nothing: identity (any coding would be allowed)
        ([("Accept-Encoding", "gzip, deflate, br, zstd")], True),  # Chromium's
        ([("Accept-Encoding", "gzip")], True),
        ([("Accept-Encoding", "GZIP;Q=0.5")], True),  # case-insensitive (§12.5.3, §12.4.2)
        ([("Accept-Encoding", "x-gzip")], True),  # RFC 9110 §8.4.1.3
        ([("Accept-Encoding", "*")], True),
        ([("Accept-Encoding", "*;q=0, gzip")], True),
        ([("Accept-Encoding", "br"), ("Accept-Encoding", "gzip")], True),  # §5.3: one list
        ([("Accept-Encoding", "")], False),  # §12.5.3: empty = no coding wanted
        ([("Accept-Encoding", "gzip;q=0")], False),  # §12.5.3: q=0 = not acceptable
        ([("Accept-Encoding", "gzip;q=0.000, identity")], False),
        ([("Accept-Encoding", "*;q=0")], False),  # identity refused too: still identity
        ([("Accept-Encoding", "identity")], False),
        ([("Accept-Encoding", "br, deflate")], False),
        ([("Accept-Encoding", "gzip;q=0.5, identity;q=1")], False),  # the client prefers identity
        ([("Accept-Encoding", "gzip;q=2")], False),  # malformed weight: asks nothing
        ([("Accept-Encoding", "gzip;q=0.0001")], False),
        ([("Accept-Encoding", "gzip;level=9")], False),
        ([("Accept-Encoding", "gz ip, ;;, ,")], False),
    ],
)
def test_the_snippet_is_gzipped_exactly_when_accept_encoding_allows_it(
    ratio_gateway: Process, fields: list[tuple[str, str]], gzipped: bool
) -> None:
    """RFC 9110 §12.5.3, over a real socket to ``python -m gateway``, at
    every URL the snippet has: the gzip bytes decode to the identity bytes,
    each representation has its own ETag, and Vary names Accept-Encoding."""
    for path in SERVED:
        identity, identity_etag = identity_body(ratio_gateway.port, path)
        status, headers, body = fetch_raw(ratio_gateway.port, path, fields)
        assert status == 200
        assert headers.get("content-encoding") == ("gzip" if gzipped else None)
        assert int(headers["content-length"]) == len(body)
        assert "Accept-Encoding" in [v.strip() for v in headers["vary"].split(",")]
        if gzipped:
            assert gzip.decompress(body) == identity
            assert len(body) < len(identity) / 2
            assert headers["etag"] == identity_etag[:-1] + '-gzip"'
        else:
            assert body == identity
            assert headers["etag"] == identity_etag


def test_each_representation_revalidates_with_its_own_etag(ratio_gateway: Process) -> None:
    """RFC 9110 §13.1.2: 304 when If-None-Match holds the tag of the
    representation this request would get (weak comparison: a W/ a cache
    added still matches), 200 for the other coding's tag; the 304 carries
    the ETag and Vary a 200 would (§15.4.5). HEAD answers GET's headers."""
    gzip_ok = ("Accept-Encoding", "gzip")
    for path in SERVED:
        _, identity_etag = identity_body(ratio_gateway.port, path)
        _, headers, _ = fetch_raw(ratio_gateway.port, path, [gzip_ok])
        gzip_etag = headers["etag"]
        assert gzip_etag != identity_etag
        for fields, etag in ([[gzip_ok], gzip_etag], [[], identity_etag]):
            for match in (etag, "W/" + etag, f'"other", {etag}', "*"):
                status, headers, body = fetch_raw(
                    ratio_gateway.port, path, [*fields, ("If-None-Match", match)]
                )
                assert (status, body, headers["etag"]) == (304, b"", etag), match
                assert "Accept-Encoding" in headers["vary"]
            other = identity_etag if etag == gzip_etag else gzip_etag
            status, headers, _ = fetch_raw(
                ratio_gateway.port, path, [*fields, ("If-None-Match", other)]
            )
            assert (status, headers["etag"]) == (200, etag)
            # HEAD: the same headers, Content-Length of that coding, no body.
            _, got, _ = fetch_raw(ratio_gateway.port, path, fields)
            status, head, body = fetch_raw(ratio_gateway.port, path, fields, method="HEAD")
            assert (status, body) == (200, b"")
            for name in ("etag", "vary", "content-length", "content-type", "cache-control"):
                assert head[name] == got[name], name
            assert head.get("content-encoding") == got.get("content-encoding")


CODINGS = st.sampled_from(
    ["gzip", "GZip", "x-gzip", "identity", "*", "br", "deflate", "zstd", "", " ", "q=1", "gzip "]
)
WEIGHTS = st.one_of(
    st.just(""),
    st.from_regex(r";\s?[qQ]=[0-9.]{0,6}", fullmatch=True),
    st.text(alphabet=';=q. \t0123456789abz"', max_size=8),
)
ACCEPT_ENCODING = st.one_of(
    st.binary(max_size=60),
    st.lists(st.builds(lambda c, w: (c + w).encode(), CODINGS, WEIGHTS), max_size=5).map(b",".join),
)


@settings(max_examples=300, deadline=None)
@given(value=ACCEPT_ENCODING, path=st.sampled_from(SERVED))
def test_any_accept_encoding_gets_a_body_that_decodes_to_the_snippet(
    ratio_gateway: Process, value: bytes, path: str
) -> None:
    """Hostile Accept-Encoding bytes, raw on the socket: never a 500; gzip
    or identity, and either way the snippet's bytes once decoded; at worst a
    400 from the HTTP parser for bytes a field value may not hold (RFC 9112
    §5, RFC 9110 §5.5). The fixture checks the log has no traceback."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAccept-Encoding: ".encode()
        + value
        + b"\r\n\r\n"
    )
    status, headers, body = parse_head(raw_request(ratio_gateway.port, request))
    if status == 400:
        assert re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value)
        return
    assert status == 200
    coding = dict((k.lower(), v) for k, v in headers).get("content-encoding")
    assert coding in (None, "gzip")
    decoded_body = gzip.decompress(body) if coding == "gzip" else body
    assert decoded_body == identity_body(ratio_gateway.port, path)[0]
