"use strict";
// node --test frontend-snippet/test/
//
// The snippet's pure helpers, and its wrappers in a simulated page (node:vm
// with a scripted gateway, a controllable clock and fake Resource Timing).
// Real-browser behaviour (CORS, real Resource Timing, sendBeacon) is tested
// with Chromium by the Python suite.
const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const vm = require("node:vm");
const { spawnSync } = require("node:child_process");

const DIR = path.join(__dirname, "..");
const FILE = path.join(DIR, "snippet.js");
const SRC = fs.readFileSync(FILE, "utf8");
// As gateway/reserved.py appends it for /__gateway/snippet.mjs (with its marker).
const FOOTER =
  "\nconst api = globalThis.LatencyGateway;" +
  "\nconst allowedOrigins = { [new URL(import.meta.url).origin]: /*@gateway-allowed-origins*/ null };" +
  "\nexport const init = (options) => api.init(Object.assign({ allowedOrigins }, options));" +
  "\nexport default Object.assign({}, api, { init });\n";
const MARKER = "/*@gateway-allowed-origins*/ null";
// Stryker's instrumenter (make mutate) prints the marker without the space.
const MARKER_IN_SRC = /\/\*@gateway-allowed-origins\*\/\s*null/g;
// Where a gateway with a trace-id ratio sampler writes its bound (?sampled=gateway).
const SAMPLE_MARKER_IN_SRC = /\/\*@gateway-sample-bound\*\/\s*null/g;
const fetchBeforeLoad = globalThis.fetch;
const S = require("./helpers.js");

const TRACEPARENT = /^00-[0-9a-f]{32}-[0-9a-f]{16}-03$/;
const THREE_DECIMALS = /^-?\d+\.\d{3}$/;

// -- loading -----------------------------------------------------------------------------

test("loading in Node neither throws nor initialises", () => {
  assert.equal(globalThis.fetch, fetchBeforeLoad, "fetch must not be wrapped");
  const api = globalThis.LatencyGateway;
  assert.deepEqual(Object.keys(api).sort(), ["clock", "flush", "init", "now", "requests"]);
  assert.deepEqual(api.requests, []);
  assert.equal(api.clock(), null);
  // No document: init() is a no-op that still returns the API.
  assert.equal(api.init({ gatewayOrigins: ["http://gw.test"] }), api);
  assert.equal(globalThis.fetch, fetchBeforeLoad);
  for (const name of ["hex", "traceparent", "timestampHeader", "clockHeader", "prevHeader", "sample", "addSample", "best", "parseServerTiming", "parseGatewayClock", "target", "take", "allows"])
    assert.equal(typeof S[name], "function", name);
});

test("the file is plain ES2017, as a classic script and as the .mjs the gateway serves", () => {
  const acorn = require("acorn");
  acorn.parse(SRC, { ecmaVersion: 2017, sourceType: "script" });
  // The module footer reads import.meta (ES2020): browsers with modules have it.
  acorn.parse(SRC + FOOTER, { ecmaVersion: 2020, sourceType: "module" });
  // Where the gateway writes its allow-list: once in the file, once in the footer.
  assert.equal(SRC.match(MARKER_IN_SRC).length, 1);
  assert.equal(FOOTER.split(MARKER).length, 2);
  assert.equal(SRC.match(SAMPLE_MARKER_IN_SRC).length, 1);
  // The check bites: optional catch binding is ES2019.
  assert.throws(() => acorn.parse("try {} catch {}", { ecmaVersion: 2017 }));
});

// Under Stryker (make mutate) snippet.js is instrumented with every mutant at once,
// so its size says nothing about the real file: stryker.conf.json sets this variable.
const MUTATION_RUN = process.env.SNIPPET_MUTATION_RUN === "1";

test("size budget: scripts/size.mjs passes, and fails over a smaller budget", { skip: MUTATION_RUN && "instrumented by Stryker" }, () => {
  const script = path.join(DIR, "scripts", "size.mjs");
  const ok = spawnSync(process.execPath, [script], { encoding: "utf8" });
  assert.equal(ok.status, 0, ok.stderr);
  const m = /^snippet\.js: (\d+) B raw, (\d+) B minified, (\d+) B minified\+gzip$/m.exec(ok.stdout);
  assert.ok(m, ok.stdout);
  assert.ok(+m[3] <= 3072 && +m[3] < +m[2] && +m[2] < +m[1], ok.stdout);
  const over = spawnSync(process.execPath, [script, "--max", "1000"], { encoding: "utf8" });
  assert.equal(over.status, 1);
  assert.match(over.stderr, /over the 1000 B budget/);
});

// -- pure helpers ------------------------------------------------------------------------

test("traceparent: version 00, 32 + 16 lowercase hex, flags 03, fresh each time", () => {
  const seen = new Set();
  for (let i = 0; i < 200; i++) {
    const tp = S.traceparent(S.hex(16), S.hex(8));
    assert.match(tp, TRACEPARENT);
    seen.add(tp);
  }
  assert.equal(seen.size, 200);
});

/** What OpenTelemetry's TraceIdRatioBased decides for a trace id: sampled
 * iff its lower 64 bits are below the bound (BigInt, as Python's ints). */
const ratioSampled = (traceIdHex, boundHex) => BigInt("0x" + traceIdHex.slice(16)) < BigInt("0x" + boundHex);
const flagsOf = (tp) => tp.split("-")[3];

test("traceparent flags: 03 below the gateway's ratio bound, 02 from it on, 03 with no bound", () => {
  const bounds = ["0000000000000000", "0000000000000001", "7fffffffffffffff", "8000000000000000", "8000000000000001", "fffffffffffffffe", "ffffffffffffffff"];
  for (let i = 0; i < 20; i++) bounds.push(S.hex(8));
  const upper = "0af7651916cd43dd8448eb211c80319c".slice(0, 16);
  for (const bound of bounds) {
    const value = BigInt("0x" + bound);
    // The lower halves at and around the bound, and the extremes.
    const lows = [0n, 1n, value - 1n, value, value + 1n, 2n ** 64n - 1n].filter((v) => v >= 0n && v < 2n ** 64n);
    const ids = lows.map((v) => upper + v.toString(16).padStart(16, "0"));
    for (let i = 0; i < 50; i++) ids.push(S.hex(16));
    for (const id of ids) {
      const tp = S.traceparent(id, "b7ad6b7169203331", bound);
      assert.equal(flagsOf(tp), ratioSampled(id, bound) ? "03" : "02", `${id} against ${bound}`);
      assert.equal(tp, `00-${id}-b7ad6b7169203331-${flagsOf(tp)}`);
    }
  }
  // At the bound itself: not sampled (strictly below), as in the SDK.
  assert.equal(flagsOf(S.traceparent("f".repeat(16) + "8000000000000000", "1".repeat(16), "8000000000000000")), "02");
  assert.equal(flagsOf(S.traceparent("0".repeat(16) + "7fffffffffffffff", "1".repeat(16), "8000000000000000")), "03");
  // Ratio 0: nothing, not even the lowest id.
  assert.equal(flagsOf(S.traceparent("1".repeat(16) + "0".repeat(16), "1".repeat(16), "0000000000000000")), "02");
  // No bound (a copy not served with one, or a ratio of 1): every trace.
  for (const none of [null, undefined]) assert.equal(flagsOf(S.traceparent("f".repeat(32), "1".repeat(16), none)), "03");
});

test("trace and span ids are never all zeros (W3C Trace Context §3.2.2.3-4)", () => {
  let calls = 0;
  const rnd = { getRandomValues: (a) => (calls++ ? a.fill(0xab) : a.fill(0)) };
  assert.equal(S.hex(8, rnd), "abababababababab");
  assert.equal(calls, 2, "the all-zero draw must be thrown away");
});

test("X-Client-Timestamp: epoch ms with 3 decimals", () => {
  assert.equal(S.timestampHeader(1700000000123.4567), "1700000000123.457");
  assert.equal(S.timestampHeader(1700000000000), "1700000000000.000");
});

test("X-Client-Clock: off, d, age with 3 decimals and the token", () => {
  const best = { off: -3600000.12345, d: 2.5, at: 1700000000000 };
  assert.equal(
    S.clockHeader(best, "1700000000000.1.-.-.-.bm9uY2U.bWFj", 1700000000500.0004),
    'off=-3600000.123, d=2.500, age=500.000, tok="1700000000000.1.-.-.-.bm9uY2U.bWFj"'
  );
  // No token: no tok member. A sample a hair in the future: age 0, never negative.
  assert.equal(S.clockHeader({ off: 1, d: 2, at: 10 }, null, 9.5), "off=1.000, d=2.000, age=0.000");
});

test("X-Client-Prev: span, rtt, pre with 3 decimals", () => {
  assert.equal(S.prevHeader("00f067aa0ba902b7", 12.3456, 0), "span=00f067aa0ba902b7, rtt=12.346, pre=0.000");
});

test("NTP sample: offset and delay (RFC 5905 §8)", () => {
  // Client 500 ms behind the server, 10 ms each way, 2 ms in the gateway.
  const s = S.sample(1000, 1510, 1512, 1022);
  assert.deepEqual(s, { off: 500, d: 20, at: 1022 });
  // An asymmetric path (15 ms up, 5 down) moves the offset by half the asymmetry.
  assert.deepEqual(S.sample(1000, 1515, 1517, 1022), { off: 505, d: 20, at: 1022 });
});

test("clock filter: the minimum-delay sample of the last 8, negative delays discarded", () => {
  const list = [];
  assert.equal(S.best(list), null);
  S.addSample(list, { off: 1, d: 0.5, at: 1 }); // the best, until it is pushed out
  for (let i = 0; i < 8; i++) S.addSample(list, { off: 10 + i, d: 9 - i, at: 2 + i });
  assert.equal(list.length, 8);
  assert.deepEqual(S.best(list), { off: 17, d: 2, at: 9 });
  S.addSample(list, { off: 99, d: -0.001, at: 20 });
  assert.equal(list.length, 8, "a negative delay is impossible: discarded");
  assert.equal(S.best(list).off, 17);
  S.addSample(list, { off: 3, d: 0, at: 21 });
  assert.equal(S.best(list).off, 3, "a zero delay is fine");
  S.addSample(list, { off: 4, d: 0, at: 22 });
  assert.equal(S.best(list).off, 4, "on a tie, the newer sample");
});

test("Server-Timing: the gateway's header", () => {
  const st = S.parseServerTiming(
    'gw;dur=12.345, upstream;dur=10.001, uplink;dur=25.500;desc="ok", traceparent;desc="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"'
  );
  assert.deepEqual(st, {
    gw: { dur: 12.345, desc: "" },
    upstream: { dur: 10.001, desc: "" },
    uplink: { dur: 25.5, desc: "ok" },
    traceparent: { dur: null, desc: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" },
  });
});

test("Server-Timing: params in any order, quoted or token desc, no dur", () => {
  assert.deepEqual(S.parseServerTiming('uplink;desc="ok";dur=3').uplink, { dur: 3, desc: "ok" });
  assert.deepEqual(S.parseServerTiming("uplink ; desc=implausible ; dur = 4.5").uplink, { dur: 4.5, desc: "implausible" });
  assert.deepEqual(S.parseServerTiming('uplink;desc="unsynced"').uplink, { dur: null, desc: "unsynced" });
  // Commas, semicolons and escaped quotes inside a quoted desc (RFC 9110 §5.6.4).
  const st = S.parseServerTiming('db;desc="a, b; \\"c\\"";dur=1, gw;dur=2');
  assert.deepEqual(st, { db: { dur: 1, desc: 'a, b; "c"' }, gw: { dur: 2, desc: "" } });
});

test("Server-Timing: repeated params and metrics", () => {
  assert.equal(S.parseServerTiming("gw;dur=1;dur=2").gw.dur, 1, "first param wins (Server Timing §3)");
  // The backend's metrics come first, the gateway appends its own.
  assert.equal(S.parseServerTiming("gw;dur=1, gw;dur=2").gw.dur, 2);
});

test("Server-Timing: junk is tolerated", () => {
  for (const junk of [null, undefined, "", ",,,", ";;", ";x", "; dur=1, gw;dur=2", '"', "=", "gw;dur", "\u00ff\u0000"])
    assert.doesNotThrow(() => S.parseServerTiming(junk), String(junk));
  const st = S.parseServerTiming(', ;; =x, gw;dur=abc, cache;dur=1.5 ;desc = hit, "unterminated');
  assert.equal(st.gw.dur, null, "a dur that is not a number");
  assert.deepEqual(st.cache, { dur: 1.5, desc: "hit" });
});

test("X-Gateway-Clock: t1, t2 and the token", () => {
  const tok = "1700000000125.1700000000123.-.-.-.AAAAAAAAAAA.bWFjbWFjbWFjbWFjbWFj";
  assert.deepEqual(S.parseGatewayClock(`t1=1700000000123.456, t2=1700000000125.001, tok="${tok}"`), {
    t1: 1700000000123.456,
    t2: 1700000000125.001,
    tok,
    b: undefined,
  });
  // Spacing and order are free; tok is optional.
  assert.deepEqual(S.parseGatewayClock('tok="a.b" ,t2=2,t1=1'), { t1: 1, t2: 2, tok: "a.b", b: undefined });
  assert.deepEqual(S.parseGatewayClock("t1=1, t2=2"), { t1: 1, t2: 2, tok: null, b: undefined });
  // bind (a proxied answer to a request with our traceparent) is kept for the beacon.
  assert.deepEqual(S.parseGatewayClock('t1=1, t2=2, tok="a.b", bind="YmluZC1tYWM"'), { t1: 1, t2: 2, tok: "a.b", b: "YmluZC1tYWM" });
});

test("X-Gateway-Clock: what the gateway would never send is refused", () => {
  for (const bad of [null, "", "t1=1", "t1=1, t2=x", "t1=1e3, t2=2", "t1=Infinity, t2=1", "t1=, t2=1", `t1=${"9".repeat(400)}, t2=1`])
    assert.equal(S.parseGatewayClock(bad), null, String(bad));
  // A token outside the gateway's alphabet is dropped: echoing it in
  // X-Client-Clock would make that header invalid.
  assert.equal(S.parseGatewayClock('t1=1, t2=2, tok="a b"').tok, null);
  assert.equal(S.parseGatewayClock('t1=1, t2=2, tok="x\\"y"').tok, null);
  assert.equal(S.parseGatewayClock(`t1=1, t2=2, tok="${"a".repeat(257)}"`).tok, null);
});

test("eligibility: same origin and enabled gateway origins, never /__gateway/", () => {
  const on = new Set(["http://page.test", "http://gw.test:8080"]);
  const isOn = (g) => on.has(g);
  const base = "http://page.test/app/index.html";
  const href = (u) => (S.target(u, base, isOn) || {}).href || null;
  assert.equal(href("/api/x?q=1"), "http://page.test/api/x?q=1");
  assert.equal(href("api/x"), "http://page.test/app/api/x");
  assert.equal(href("http://gw.test:8080/api/activities/home"), "http://gw.test:8080/api/activities/home");
  assert.equal(href(new URL("http://gw.test:8080/a")), "http://gw.test:8080/a");
  assert.equal(href("/api/__gateway/x"), "http://page.test/api/__gateway/x", "only the prefix is reserved");
  for (const refused of [
    "/__gateway/clock",
    "http://gw.test:8080/__gateway/beacon",
    "/a/../__gateway/health", // normalised by the URL parser
    "http://other.test/api",
    "https://page.test/api", // another scheme is another origin
    "http://page.test:81/api",
    "http://gw.test/api", // another port
  ])
    assert.equal(href(refused), null, refused);
});

test("eligibility: malformed input is refused without a throw", () => {
  const isOn = () => true;
  for (const bad of ["http://[::1", "http://exa mple.com/", "http://", { toString: () => { throw new Error("x"); } }])
    assert.equal(S.target(bad, "http://page.test/", isOn), null, String(bad.toString === Object.prototype.toString ? bad : "obj"));
  assert.equal(S.target("relative", undefined, isOn), null, "no base");
  assert.equal(S.target("/x", "http://page.test/", () => { throw new Error("x"); }), null);
});

test("a stale answer (HTTP cache, CDN) gives no sample and no token", () => {
  const o = { s: [] };
  const k = (ts) => ({ t1: 1010, t2: 1012, tok: `1012.1010.${ts}.9.2.bm9uY2U.bWFj` });
  assert.equal(S.take(o, k(1000), 1000, 1022, 1000.4), true, "TS is our timestamp, rounded");
  assert.equal(o.s.length, 1);
  assert.equal(o.k, "1012.1010.1000.9.2.bm9uY2U.bWFj");
  assert.equal(S.take(o, k(400), 5000, 5022, 5000), false, "TS of another request");
  assert.equal(o.s.length, 1);
  assert.equal(o.k, "1012.1010.1000.9.2.bm9uY2U.bWFj", "the stale token is not kept");
  assert.equal(S.take(o, k("-"), 6000, 6022, 6000), true, "no TS (clock endpoint, rate limited): nothing to compare");
  assert.equal(S.take(o, k(1), 7000, 7022), true, "the burst has no timestamp to compare");
  assert.equal(o.s.length, 3);
});

// -- a simulated page ----------------------------------------------------------------------
//
// A vm context with the browser globals the snippet uses. Its clock is ours:
// performance.now() and Date.now() only move when the scripted network says
// so, so every figure the snippet computes is exact.

const EPOCH = 1700000000000;
const OFFSET = 4321.5; // gateway clock − page clock
const PAGE = "http://page.test";
const GW = "http://gw.test:8080";

// clockEntry(entry): the Resource Timing entry of a clock request as the
// browser gives it; buffered: a request's entry is in the buffer before its
// response is handled; noFetch / noDocument: a page without them.
function page({ script = null, refuse = [], rt = true, hold = false, src = SRC, clockEntry = (e) => e, buffered = false, noFetch = false, noDocument = false } = {}) {
  const held = []; // with hold, clock answers wait here until released
  const clk = { perf: 1000, jump: 0 };
  const calls = []; // what reached the page's original fetch
  const events = []; // latency-gateway event details (snapshots)
  const beacons = [];
  const entries = []; // the Resource Timing buffer
  const xhrs = [];
  const gw = { tsOverride: null, traceId: null, spanSeq: 0 };
  let observer = null;
  const observed = [];
  const et = new EventTarget();
  et.addEventListener("latency-gateway", (e) => events.push(e.detail));

  const now = () => EPOCH + clk.perf; // true page time (without a jump)
  // The scripted gateway: 10 ms up, 2 ms inside, 10 ms down.
  const exchange = (url, headers) => {
    const start = clk.perf;
    clk.perf += 10;
    const t1 = now() + OFFSET;
    clk.perf += 2;
    const t2 = now() + OFFSET;
    clk.perf += 10;
    const ts = headers.get("x-client-timestamp");
    const TS = gw.tsOverride != null ? gw.tsOverride : ts ? Math.floor(+ts + 0.5) : "-";
    const tok = `${Math.floor(t2)}.${Math.round(t1)}.${TS}.-.-.bm9uY2U.bWFj`;
    const out = { "x-gateway-clock": `t1=${t1.toFixed(3)}, t2=${t2.toFixed(3)}, tok="${tok}"` };
    let gwTp = null;
    if (!url.includes("/__gateway/")) {
      // Like the gateway: a bind for a request with a traceparent, never on /__gateway/clock.
      if (headers.get("traceparent") && !gw.noBind) out["x-gateway-clock"] += `, bind="bind${gw.spanSeq + 1}"`;
      const tp = (headers.get("traceparent") || "").split("-");
      gwTp = `00-${gw.traceId || tp[1] || "ab".repeat(16)}-${(++gw.spanSeq).toString(16).padStart(16, "0")}-01`;
      out["server-timing"] = `gw;dur=2.000, upstream;dur=1.000, uplink;dur=10.000;desc="ok", traceparent;desc="${gwTp}"`;
    }
    // Resource Timing: requestStart 1 ms after fetch(), symmetric 9 ms legs.
    const entry = {
      name: url, startTime: start, fetchStart: start, domainLookupStart: 0, domainLookupEnd: 0,
      connectStart: 0, connectEnd: 0, requestStart: start + 1, responseStart: start + 21, responseEnd: start + 22,
      serverTiming: gwTp ? [{ name: "gw", duration: 2, description: "" }, { name: "traceparent", duration: 0, description: gwTp }] : [],
    };
    return { out, entry, tok };
  };

  const fakeFetch = async function (input, init) {
    calls.push({ input, init, self: this });
    const req = typeof input == "string" ? new Request(new URL(input, PAGE + "/app/"), init) : input.clone();
    const origin = new URL(req.url).origin;
    if (refuse.includes(origin)) throw new TypeError("Failed to fetch"); // CORS refusal
    if (origin == "http://other.test") return new Response("{}");
    if (hold && req.url.includes("/__gateway/clock")) await new Promise((r) => held.push(r));
    const { out, entry } = exchange(req.url, req.headers);
    if (!req.url.includes("/__gateway/")) last.entry = entry;
    if (buffered && !req.url.includes("/__gateway/")) entries.push(entry);
    const res = new Response(req.url.includes("/__gateway/") ? null : "{}", { status: req.url.includes("/__gateway/") ? 204 : 200, headers: out });
    // As in Chromium, the entry is in the buffer once the body has been read.
    const read = res.arrayBuffer.bind(res);
    res.arrayBuffer = () => read().then((b) => (rt && req.url.includes("/__gateway/clock") && entries.push(clockEntry(entry)), b));
    return res;
  };
  const last = { entry: null };

  class XHR {
    constructor() { this.listeners = []; } // kept across open(), as in a browser
    open(m, u) { Object.assign(this, { method: m, url: u, sent: [] }); }
    setRequestHeader(k, v) { this.sent.push([k.toLowerCase(), v]); }
    addEventListener(type, f, opt) { this.listeners.push({ type, f, once: opt && opt.once }); }
    send() { xhrs.push(this); }
    respond() {
      const h = new Headers(this.sent);
      const { out, entry } = exchange(new URL(this.url, PAGE + "/app/").href, h);
      last.entry = entry;
      this.status = 200;
      this.out = out;
      for (const l of this.listeners.filter((l) => l.type == "loadend")) l.f.call(this);
      this.listeners = this.listeners.filter((l) => !(l.type == "loadend" && l.once));
    }
    getResponseHeader(n) { return this.out[n.toLowerCase()] || null; }
  }

  const document = Object.assign(new EventTarget(), { currentScript: script, baseURI: PAGE + "/app/", hidden: false });
  const pushed = []; // what reached the page's history.pushState: [this, args]
  const ctx = {
    document: noDocument ? undefined : document,
    history: { pushState(...args) { pushed.push([this, args]); } },
    location: { origin: PAGE, href: PAGE + "/app/" },
    navigator: { sendBeacon: (u, blob) => (beacons.push({ u, blob }), !beacons.refuse) },
    performance: { now: () => clk.perf, getEntriesByName: (n) => entries.filter((e) => e.name == n) },
    PerformanceObserver: class {
      constructor(cb) { observer = cb; }
      observe(opt) { observed.push(plain(opt)); }
    },
    Date: { now: () => now() + clk.jump },
    fetch: noFetch ? undefined : fakeFetch,
    XMLHttpRequest: XHR,
    // A page's Request resolves relative URLs against its base URL; Node's has none.
    Request: class extends Request {
      constructor(input, init) {
        super(typeof input == "string" ? new URL(input, PAGE + "/app/").href : input, init);
      }
    },
    Headers, Response, URL, Blob, CustomEvent, crypto,
    addEventListener: et.addEventListener.bind(et),
    dispatchEvent: et.dispatchEvent.bind(et),
    setTimeout: (f, ms) => setTimeout(f, ms).unref(),
    clearTimeout,
  };
  ctx.window = ctx;
  // Under Stryker the snippet's mutant switch lives on the test's global
  // (set from the environment when snippet.js was required above): the page
  // shares it, so a mutant is active in the simulated page too.
  if (MUTATION_RUN) ctx.__stryker__ = globalThis.__stryker__;
  vm.createContext(ctx);
  vm.runInContext(src, ctx, { filename: FILE });
  return {
    ctx, clk, calls, events, beacons, entries, xhrs, gw, fakeFetch, observed, held, pushed,
    api: ctx.LatencyGateway,
    // Deliver the last request's Resource Timing entry, as the browser does.
    observe: (entry = last.entry) => observer({ getEntries: () => [entry] }),
    lastEntry: () => last.entry,
  };
}

const settle = () => new Promise((r) => setImmediate(r));
async function until(cond, what) {
  for (let i = 0; i < 200; i++) {
    if (cond()) return;
    await settle();
  }
  assert.fail("timed out waiting for " + what);
}
// Objects from the page's realm, compared by value.
const plain = (o) => JSON.parse(JSON.stringify(o));
const sent = (call) => Object.fromEntries(call.input.headers); // headers of the Request we sent

async function synced(p, origin = GW, options = {}) {
  p.api.init(Object.assign({ gatewayOrigins: [origin], flushMs: 60000 }, options));
  await until(() => p.calls.filter((c) => String(c.input).startsWith(origin + "/__gateway/clock")).length == 5, "the burst");
  await settle();
  p.calls.length = 0;
}

test("a module import (no currentScript) does not initialise", () => {
  const p = page();
  assert.equal(p.ctx.fetch, p.fakeFetch);
  assert.equal(p.calls.length, 0);
  assert.equal(typeof p.api.init, "function");
});

test("a classic script initialises itself: its own origin plus data-gateway-origins", async () => {
  const p = page({ script: { src: GW + "/__gateway/snippet.js", dataset: { gatewayOrigins: " http://b.test , bad origin", beacon: "off" } } });
  assert.notEqual(p.ctx.fetch, p.fakeFetch, "fetch is wrapped");
  await until(() => p.calls.length == 10, "two bursts of 5");
  const urls = p.calls.map((c) => c.input).sort();
  assert.deepEqual(urls, [0, 1, 2, 3, 4].flatMap((i) => [`${GW}/__gateway/clock?n=${i}`, `http://b.test/__gateway/clock?n=${i}`]).sort());
  for (const c of p.calls) assert.deepEqual(plain(c.init), { cache: "no-store", credentials: "omit" });
  assert.equal(p.api.clock().on, true);
  assert.equal(p.api.clock("http://b.test").on, true);
  assert.deepEqual(p.observed, [{ type: "resource", buffered: true }]);
});

test("sync burst: sequential, Resource Timing preferred, min-delay offset", async () => {
  const p = page();
  p.api.init({ gatewayOrigins: [GW] });
  await until(() => p.calls.length == 5, "the burst");
  await settle();
  // requestStart → responseStart is 20 ms with 2 ms in the gateway: d = 18,
  // where JS times around fetch() would give 22 − 2 = 20.
  assert.deepEqual(plain(p.api.clock()), { best: { off: OFFSET, d: 18, at: EPOCH + 1000 + 4 * 22 + 21 }, tok: p.api.clock().tok, on: true });
  assert.match(p.api.clock().tok, /^\d+\.\d+\.-\.-\.-\./);
  assert.ok(Math.abs(p.api.now() - (EPOCH + p.clk.perf)) < 1e-6, "C = Date.now() at the anchor + performance.now() since");
});

test("until the burst is over: traceparent and X-Client-Timestamp, no X-Client-Clock", async () => {
  const p = page({ hold: true });
  p.api.init({ gatewayOrigins: [PAGE] }); // the page's own origin is a gateway too
  for (let i = 0; i < 2; i++) {
    await until(() => p.held.length, "a clock request");
    p.held.shift()();
  }
  await until(() => p.calls.length == 3, "two samples taken");
  assert.equal(p.api.clock().best, null, "best is what X-Client-Clock would carry: nothing yet");
  await p.ctx.fetch("/api/x");
  const h = sent(p.calls.find((c) => typeof c.input != "string"));
  assert.match(h.traceparent, TRACEPARENT);
  assert.match(h["x-client-timestamp"], THREE_DECIMALS);
  assert.equal(h["x-client-clock"], undefined);
  while (p.calls.filter((c) => typeof c.input == "string").length < 5 || p.held.length) {
    await until(() => p.held.length, "a clock request");
    p.held.shift()();
    await settle();
  }
  await settle();
  assert.notEqual(p.api.clock().best, null);
  p.calls.length = 0;
  await p.ctx.fetch("/api/y");
  assert.match(sent(p.calls[0])["x-client-clock"], /^off=4321\.500, d=18\.000, /);
});

test("without Resource Timing the burst uses JS times", async () => {
  const p = page({ rt: false });
  await synced(p);
  assert.equal(p.api.clock().best.d, 20);
  assert.equal(p.api.clock().best.off, OFFSET);
});

test("a gateway that refuses CORS is never enabled: its requests stay untouched", async () => {
  const p = page({ refuse: [GW] });
  p.api.init({ gatewayOrigins: [GW] });
  await until(() => p.calls.length == 1, "the first clock request");
  await settle();
  assert.equal(p.calls.length, 1, "the burst stops at the first refusal");
  assert.equal(p.api.clock().on, false);
  const init = { method: "POST", body: "x" };
  await p.ctx.fetch(GW + "/api/x", init).catch(() => {});
  assert.equal(p.calls[1].input, GW + "/api/x");
  assert.equal(p.calls[1].init, init, "the page's own arguments, untouched");
});

test("eligible fetch: fresh traceparent and X-Client-* headers, caller's objects untouched", async () => {
  const p = page();
  await synced(p);
  const headers = new p.ctx.Headers({ "x-page": "1" });
  const init = { method: "POST", headers, body: "hello" };
  const res = await p.ctx.fetch("/api/echo", init);
  assert.equal(await res.text(), "{}");
  assert.deepEqual([...headers], [["x-page", "1"]], "the caller's Headers object is not mutated");
  assert.deepEqual(Object.keys(init), ["method", "headers", "body"]);
  assert.equal(p.calls.length, 1, "the original fetch is called once");
  const req = p.calls[0].input;
  assert.equal(req.url, PAGE + "/api/echo");
  assert.equal(req.method, "POST");
  assert.equal(await req.text(), "hello");
  const h = sent(p.calls[0]);
  assert.equal(h["x-page"], "1");
  assert.match(h.traceparent, TRACEPARENT);
  assert.match(h["x-client-timestamp"], THREE_DECIMALS);
  assert.equal(+h["x-client-timestamp"], EPOCH + p.clk.perf - 22, "C read on entering fetch()");
  // The page origin had no burst: no sample yet, so no X-Client-Clock.
  assert.equal(h["x-client-clock"], undefined);
  assert.equal(h["x-client-prev"], undefined);

  const { best, tok } = p.api.clock(); // the gateway origin's, from its burst
  const g = await p.ctx.fetch(GW + "/api/x");
  const gh = sent(p.calls[1]);
  const age = +gh["x-client-timestamp"] - best.at;
  assert.ok(age > 0);
  assert.equal(gh["x-client-clock"], `off=4321.500, d=18.000, age=${age.toFixed(3)}, tok="${tok}"`);
  assert.equal(g.status, 200);
  assert.notEqual(gh.traceparent, h.traceparent);
});

test("the page's own traceparent is kept, and not doubled", async () => {
  const p = page();
  await synced(p);
  const own = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  await p.ctx.fetch(GW + "/api/x", { headers: { traceparent: own } });
  assert.equal(sent(p.calls[0]).traceparent, own);
  assert.match(sent(p.calls[0])["x-client-timestamp"], THREE_DECIMALS);
  await settle();
  assert.equal(p.events[0].traceId, "4bf92f3577b34da6a3ce929d0e0e4736");
  assert.equal(p.events[0].spanId, "00f067aa0ba902b7");
  p.observe();
  assert.equal(p.events[1].rtt, 18);
  // Its span is the page's: not reported in X-Client-Prev (nor beaconed).
  await p.ctx.fetch(GW + "/api/y");
  assert.equal(sent(p.calls[1])["x-client-prev"], undefined);
});

test("ineligible requests reach the page's fetch exactly as made", async () => {
  const p = page();
  await synced(p);
  for (const url of ["http://other.test/x", "/__gateway/health", GW + "/__gateway/health"]) {
    const init = { headers: { a: "b" } };
    p.calls.length = 0;
    await p.ctx.fetch(url, init).catch(() => {});
    assert.equal(p.calls.length, 1);
    assert.equal(p.calls[0].input, url);
    assert.equal(p.calls[0].init, init);
  }
  const req = new p.ctx.Request("http://other.test/x", { method: "POST", body: "x" });
  p.calls.length = 0;
  await p.ctx.fetch(req);
  assert.equal(p.calls[0].input, req, "the page's own Request object");
  assert.equal(req.bodyUsed, false, "its body untouched by the snippet");
});

test("a Request object to an eligible URL is tagged like a URL", async () => {
  const p = page();
  await synced(p);
  await p.ctx.fetch(new p.ctx.Request(GW + "/api/x", { headers: { a: "b" } }));
  const h = sent(p.calls[0]);
  assert.equal(h.a, "b");
  assert.match(h.traceparent, TRACEPARENT);
});

test("a failure inside the snippet leaves the request as the page made it", async () => {
  const p = page();
  await synced(p);
  const init = { method: "PUT", body: "x", headers: { a: "b" } };
  // Before the Request is built: the page's own arguments.
  const saved = p.ctx.Request;
  p.ctx.Request = function () { throw new Error("boom"); };
  await p.ctx.fetch("/api/x", init).catch(() => {});
  assert.equal(p.calls.length, 1);
  assert.equal(p.calls[0].input, "/api/x");
  assert.equal(p.calls[0].init, init);
  // After it (its body may be a consumed stream now): that same request.
  p.ctx.Request = saved;
  p.ctx.Headers = function () { throw new Error("boom"); };
  await p.ctx.fetch("/api/y", init);
  assert.equal(p.calls.length, 2);
  const req = p.calls[1].input;
  assert.equal(req.url, PAGE + "/api/y");
  assert.equal(req.method, "PUT");
  assert.deepEqual([...req.headers], [["a", "b"], ["content-type", "text/plain;charset=UTF-8"]]);
});

test("init twice does not wrap twice", async () => {
  const p = page();
  await synced(p);
  const wrapped = p.ctx.fetch;
  p.api.init({ gatewayOrigins: [GW] });
  p.api.init({ gatewayOrigins: [GW, "http://b.test"] });
  assert.equal(p.ctx.fetch, wrapped);
  await until(() => p.calls.length == 5, "one new burst, for the new origin only");
  await settle();
  assert.ok(p.calls.every((c) => c.input.startsWith("http://b.test/__gateway/clock")));
  p.calls.length = 0;
  await p.ctx.fetch("/api/x");
  assert.match(sent(p.calls[0]).traceparent, TRACEPARENT, "one traceparent, not two joined");
});

test("a response: event, LatencyGateway.requests, then rtt/pre from Resource Timing", async () => {
  const p = page();
  await synced(p);
  await p.ctx.fetch(GW + "/api/x?a=1");
  await settle();
  const tp = sent(p.calls[0]).traceparent.split("-");
  const first = { traceId: tp[1], spanId: tp[2], url: GW + "/api/x?a=1", method: "GET", status: 200, gw: 2, uplink: 10, verdict: "ok", rtt: null, pre: null };
  assert.deepEqual(plain(p.events), [first]);
  assert.deepEqual(plain(p.api.requests), [first]);
  const entry = p.lastEntry();
  p.observe(entry);
  // Round trip 20 ms (requestStart → responseStart) less 2 ms in the gateway; 1 ms before the request left.
  assert.deepEqual(plain(p.events[1]), { ...first, rtt: 18, pre: 1 });
  assert.deepEqual(plain(p.events[0]), first, "each event carries a snapshot");
  assert.equal(p.api.requests[0].rtt, 18);
  // The next request reports it, once.
  await p.ctx.fetch(GW + "/api/y");
  assert.equal(sent(p.calls[1])["x-client-prev"], `span=${tp[2]}, rtt=18.000, pre=1.000`);
  await p.ctx.fetch(GW + "/api/z");
  assert.equal(sent(p.calls[2])["x-client-prev"], undefined);
  p.observe(entry); // an entry seen twice is matched once
  assert.equal(p.events.filter((e) => e.rtt != null).length, 1);
});

test("matching uses the gateway's traceparent, so identical URLs in flight and other trace ids work", async () => {
  const p = page();
  await synced(p);
  p.gw.traceId = "cd".repeat(16); // the gateway's link/restart modes: not our trace
  const a = p.ctx.fetch(GW + "/same");
  const ea = p.lastEntry();
  const b = p.ctx.fetch(GW + "/same");
  const eb = p.lastEntry();
  await Promise.all([a, b]);
  await settle();
  p.observe(eb);
  p.observe(ea);
  const spans = p.calls.map((c) => sent(c).traceparent.split("-")[2]);
  const matched = p.events.filter((e) => e.rtt != null).map((e) => e.spanId);
  assert.deepEqual(matched, [spans[1], spans[0]]);
});

test("without serverTiming an entry is matched by URL, never to an earlier request", async () => {
  const p = page();
  await synced(p);
  await p.ctx.fetch(GW + "/u");
  await settle();
  const entry = { ...p.lastEntry(), serverTiming: [] };
  p.observe({ ...entry, startTime: entry.startTime - 5 }); // started before the request: not its entry
  assert.equal(p.events.length, 1);
  p.observe(entry);
  assert.equal(p.events[1].rtt, 18);
});

test("an entry is claimed once, even when it could fit two requests", async () => {
  const p = page();
  await synced(p);
  // Both requests entered fetch() before either left: one entry fits both.
  const a = p.ctx.fetch(GW + "/v");
  const b = p.ctx.fetch(GW + "/v");
  await Promise.all([a, b]);
  await settle();
  const entry = { ...p.lastEntry(), startTime: p.clk.perf, serverTiming: [] };
  p.observe(entry);
  p.observe(entry); // the fallback look-up finds it again
  assert.equal(p.events.filter((e) => e.rtt != null).length, 1);
});

test("a stale (cached) response gives no sample, no token, no gateway figures", async () => {
  const p = page();
  await synced(p);
  const before = p.api.clock();
  p.gw.tsOverride = 1234;
  await p.ctx.fetch(GW + "/api/cached");
  await settle();
  assert.equal(p.api.clock().tok, before.tok);
  assert.equal(p.events[0].gw, null);
  assert.equal(p.events[0].verdict, null);
});

test("a clock jump re-anchors C and drops the samples", async () => {
  const p = page();
  await synced(p);
  p.clk.jump = 3600e3; // the OS clock was set an hour ahead
  const before = p.clk.perf;
  await p.ctx.fetch(GW + "/api/x");
  const h = sent(p.calls.find((c) => typeof c.input != "string"));
  assert.equal(+h["x-client-timestamp"], EPOCH + before + 3600e3);
  assert.equal(h["x-client-clock"], undefined, "the old offset is unknown now");
  // A fresh burst, against the new C.
  await until(() => p.calls.filter((c) => String(c.input).includes("/__gateway/clock")).length == 5, "a fresh burst");
  await settle();
  assert.equal(p.api.clock().best.off, OFFSET - 3600e3);
  assert.equal(p.api.clock().best.d, 18);
});

test("XMLHttpRequest: headers through the real setRequestHeader, the page's traceparent kept", async () => {
  const p = page();
  await synced(p);
  const x = new p.ctx.XMLHttpRequest();
  x.open("get", "/api/x");
  x.setRequestHeader("X-Page", "1");
  x.send();
  const names = x.sent.map(([k]) => k);
  assert.deepEqual(names.slice(0, 1), ["x-page"]);
  assert.ok(names.includes("traceparent") && names.includes("x-client-timestamp"));
  assert.match(Object.fromEntries(x.sent).traceparent, TRACEPARENT);
  x.respond();
  assert.equal(p.events.length, 1);
  assert.equal(p.events[0].method, "GET");
  assert.equal(p.events[0].url, PAGE + "/api/x");
  assert.equal(p.events[0].gw, 2);

  const y = new p.ctx.XMLHttpRequest();
  const own = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  y.open("POST", GW + "/api/y");
  y.setRequestHeader("traceparent", own);
  y.send("body");
  assert.deepEqual(y.sent.filter(([k]) => k == "traceparent"), [["traceparent", own]]);

  const z = new p.ctx.XMLHttpRequest();
  z.open("GET", "http://other.test/x");
  z.send();
  assert.deepEqual(z.sent, [], "ineligible: nothing added");
});

test("XMLHttpRequest reopened before its answer: only the live request is reported", async () => {
  const p = page();
  await synced(p);
  const x = new p.ctx.XMLHttpRequest();
  x.open("GET", "/api/1");
  x.send();
  x.open("GET", "/api/2"); // aborts the first
  x.send();
  x.respond();
  assert.deepEqual(p.events.map((e) => e.url), [PAGE + "/api/2"]);
});

test("beacon: entry shape, marks on the client clock, one body per gateway origin", async () => {
  const p = page();
  await synced(p);
  await p.ctx.fetch(GW + "/api/x");
  await settle();
  const entry = p.lastEntry();
  p.observe();
  const tp = sent(p.calls[0]).traceparent;
  const tok = p.calls[0] && p.api.clock().tok; // this response's token is the latest
  const b = "bind" + p.gw.spanSeq; // the bind the gateway sent with it
  p.api.flush();
  assert.equal(p.beacons.length, 1);
  assert.equal(p.beacons[0].u, GW + "/__gateway/beacon");
  // A string: sent as text/plain;charset=UTF-8, CORS-safelisted.
  assert.equal(typeof p.beacons[0].blob, "string");
  const body = JSON.parse(p.beacons[0].blob);
  const c = (t) => EPOCH + t; // C of a performance time (anchored at Date.now() = EPOCH + perf)
  assert.deepEqual(body, {
    v: 1,
    e: [{
      tp, m: "GET", u: GW + "/api/x", tok, b, off: OFFSET,
      marks: {
        startTime: c(entry.startTime), fetchStart: c(entry.fetchStart), domainLookupStart: 0, domainLookupEnd: 0,
        connectStart: 0, connectEnd: 0, requestStart: c(entry.requestStart), responseStart: c(entry.responseStart), responseEnd: c(entry.responseEnd),
      },
    }],
  });
  p.api.flush();
  assert.equal(p.beacons.length, 1, "nothing left to send");
});

test("beacon: no entry for an answer without bind (the gateway would drop it)", async () => {
  const p = page();
  await synced(p);
  p.gw.noBind = true; // e.g. GATEWAY_TRUST_CONTEXT=restart: the token names no trace
  await p.ctx.fetch(GW + "/api/x");
  await settle();
  p.observe();
  p.api.flush();
  assert.equal(p.beacons.length, 0);
});

test("beacon: fetch keepalive when sendBeacon refuses, a flush at 20 entries, bodies ≤ 60 KB", async () => {
  const p = page();
  await synced(p);
  p.beacons.refuse = true;
  const long = "/api/" + "x".repeat(4000);
  for (let i = 0; i < 20; i++) {
    await p.ctx.fetch(GW + long + "?" + i);
    await settle();
    p.observe();
  }
  // The 20th entry flushed by itself; 20 × 4 KB goes out as two bodies.
  const posts = p.calls.filter((c) => String(c.input).endsWith("/__gateway/beacon"));
  assert.equal(p.beacons.length, 2, "sendBeacon was tried first");
  assert.equal(posts.length, 2);
  let n = 0;
  for (const post of posts) {
    assert.deepEqual(plain({ ...post.init, body: 0 }), { method: "POST", body: 0, keepalive: true });
    assert.ok(post.init.body.length <= 60000);
    n += JSON.parse(post.init.body).e.length;
  }
  assert.equal(n, 20);
});

test("beacon: off when asked, and never for a page-made traceparent", async () => {
  const p = page();
  p.api.init({ gatewayOrigins: [GW], beacon: false });
  await until(() => p.calls.length == 5, "the burst");
  await settle();
  await p.ctx.fetch(GW + "/api/x");
  await settle();
  p.observe();
  p.api.flush();
  assert.equal(p.beacons.length, 0);

  const q = page();
  await synced(q);
  await q.ctx.fetch(GW + "/api/x", { headers: { traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" } });
  await settle();
  q.observe();
  q.api.flush();
  assert.equal(q.beacons.length, 0);
});

// -- the sampled flag: the bound the gateway serves at ?sampled=gateway --------------------

/** snippet.js as a gateway with a trace-id ratio sampler serves it at ?sampled=gateway. */
const servedWithBound = (bound) => SRC.replace(SAMPLE_MARKER_IN_SRC, `/*@gateway-sample-bound*/ ${JSON.stringify(bound)}`);

test("served with a bound: each request's flags are the gateway's decision for its trace id", async () => {
  for (const bound of ["8000000000000000", "0000000000000000", null]) {
    const p = page({ src: bound ? servedWithBound(bound) : SRC });
    await synced(p);
    const flags = new Set();
    for (let i = 0; i < 40; i++) {
      await p.ctx.fetch(GW + "/api/x");
      const xhr = new p.ctx.XMLHttpRequest();
      xhr.open("GET", "/api/y");
      xhr.send();
      const fetched = sent(p.calls.at(-1)).traceparent;
      const posted = new Map(xhr.sent).get("traceparent");
      for (const tp of [fetched, posted]) {
        const traceId = tp.split("-")[1];
        assert.equal(flagsOf(tp), !bound || ratioSampled(traceId, bound) ? "03" : "02", `${tp} against ${bound}`);
        flags.add(flagsOf(tp));
      }
      // The event detail names the same trace.
      assert.equal(p.api.requests.at(-1).traceId, fetched.split("-")[1]);
    }
    // 80 draws at 1/2: both decisions show (a miss is 2^-79).
    assert.deepEqual([...flags].sort(), { "8000000000000000": ["02", "03"], "0000000000000000": ["02"], null: ["03"] }[bound]);
  }
});

test("a page's own traceparent keeps its flags, whatever the served bound", async () => {
  const p = page({ src: servedWithBound("0000000000000000") });
  await synced(p);
  const own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  await p.ctx.fetch(GW + "/api/x", { headers: { traceparent: own } });
  assert.equal(sent(p.calls[0]).traceparent, own);
});

// -- the first request: the allow-list the gateway serves ---------------------------------

/** snippet.js as the gateway serves it, with this allow-list pattern. */
const served = (pattern) => SRC.replace(MARKER_IN_SRC, MARKER.replace("null", JSON.stringify(pattern)));
const CLASSIC = { src: GW + "/__gateway/snippet.js", dataset: {} };
const pageCalls = (p) => p.calls.filter((c) => !String(c.input).includes("/__gateway/"));

test("allow-list patterns: exact origins and one DNS label for *, as the gateway's CORS", () => {
  // The pattern gateway/cors.py builds for http://page.test and https://*.example.com.
  const pattern = "^(?:http://page\\.test|https://[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\\.example\\.com)$";
  for (const origin of ["http://page.test", "https://app.example.com", "https://a-1.example.com"])
    assert.equal(S.allows(pattern, origin), true, origin);
  for (const origin of ["https://page.test", "http://page.test:81", "https://a.b.example.com", "https://example.com", "https://evilexample.com", "https://-a.example.com", "null", ""])
    assert.equal(S.allows(pattern, origin), false, origin);
  for (const none of [null, undefined, ""]) assert.equal(S.allows(none, "http://page.test"), false, String(none));
});

test("a served allow-list naming the page: the first request is tagged at once, unsynced, while the burst runs", async () => {
  const p = page({ hold: true, script: CLASSIC, src: served("^(?:http://page\\.test)$") });
  await until(() => p.held.length, "the first clock request, unanswered");
  assert.equal(p.api.clock().on, true, "enabled before any answer");
  await p.ctx.fetch(GW + "/api/first");
  const [first] = pageCalls(p);
  const h = sent(first);
  assert.match(h.traceparent, TRACEPARENT);
  assert.match(h["x-client-timestamp"], THREE_DECIMALS);
  assert.equal(h["x-client-clock"], undefined, "no sample yet: the gateway says unsynced");
  await settle();
  assert.equal(p.api.requests[0].url, GW + "/api/first");
});

test("a served allow-list not naming the page, or none: the first request goes as the page made it", async () => {
  for (const src of [served("^(?:http://other\\.test)$"), served(null), SRC]) {
    const p = page({ hold: true, script: CLASSIC, src });
    await until(() => p.held.length, "the first clock request");
    assert.equal(p.api.clock().on, false);
    const init = { method: "POST", body: "x" };
    await p.ctx.fetch(GW + "/api/first", init);
    const [first] = pageCalls(p);
    assert.equal(first.input, GW + "/api/first");
    assert.equal(first.init, init, "the page's own arguments: no headers, so no preflight");
  }
});

test("a stale served allow-list: once the gateway refuses the burst, requests go untouched", async () => {
  const p = page({ refuse: [GW], script: CLASSIC, src: served("^(?:http://page\\.test)$") });
  await until(() => p.calls.length == 1, "the refused clock request");
  await settle();
  assert.equal(p.api.clock().on, false);
  await p.ctx.fetch(GW + "/api/x").catch(() => {});
  assert.equal(pageCalls(p)[0].input, GW + "/api/x");
});

test("init's allowedOrigins is keyed by gateway origin: another gateway's list enables nothing here", async () => {
  const p = page({ hold: true });
  p.api.init({ gatewayOrigins: [GW, "http://b.test"], allowedOrigins: { "http://b.test": "^(?:http://page\\.test)$" } });
  await until(() => p.held.length == 2, "both first clock requests");
  assert.equal(p.api.clock(GW).on, false);
  assert.equal(p.api.clock("http://b.test").on, true);
});

// -- trace context owned by a page SDK ---------------------------------------------------------

const OTEL = Symbol.for("opentelemetry.js.api.1");

test("traceContext auto: an OpenTelemetry tracer provider owns traceparent; we add only X-Client-*", async () => {
  const p = page();
  await synced(p);
  p.ctx[OTEL] = { version: "1.9.1", trace: {} }; // what @opentelemetry/api registers
  await p.ctx.fetch(GW + "/api/x");
  await settle();
  const h = sent(p.calls[0]);
  assert.equal(h.traceparent, undefined, "the page SDK's instrumentation adds its own after us");
  assert.match(h["x-client-timestamp"], THREE_DECIMALS);
  assert.match(h["x-client-clock"], /^off=4321\.500, /);
  p.observe();
  await p.ctx.fetch(GW + "/api/y");
  assert.equal(sent(p.calls[1])["x-client-prev"], undefined, "no span of ours to report on");
  p.api.flush();
  assert.equal(p.beacons.length, 0, "nor a browser span: the page SDK has its own");
});

test("traceContext auto without a tracer provider, and traceContext snippet: traceparent is ours", async () => {
  const p = page();
  await synced(p);
  p.ctx[OTEL] = { version: "1.9.1", diag: {} }; // the API in use, no tracer provider
  await p.ctx.fetch(GW + "/api/x");
  assert.match(sent(p.calls[0]).traceparent, TRACEPARENT);

  const q = page();
  await synced(q, GW, { traceContext: "snippet" });
  q.ctx[OTEL] = { version: "1.9.1", trace: {} };
  await q.ctx.fetch(GW + "/api/x");
  assert.match(sent(q.calls[0]).traceparent, TRACEPARENT);
});

test("traceContext page: no traceparent even without OpenTelemetry; the page's own is kept", async () => {
  const p = page();
  await synced(p, GW, { traceContext: "page" });
  await p.ctx.fetch(GW + "/api/x");
  const h = sent(p.calls[0]);
  assert.equal(h.traceparent, undefined);
  assert.match(h["x-client-timestamp"], THREE_DECIMALS);
  const own = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  await p.ctx.fetch(GW + "/api/y", { headers: { traceparent: own } });
  assert.equal(sent(p.calls[1]).traceparent, own);
});

// -- single-page apps ------------------------------------------------------------------------

const clockCalls = (p) => p.calls.filter((c) => String(c.input).includes("/__gateway/clock")).length;

test("history.pushState: the page's call goes through; a fresh sync only when the clock jumped", async () => {
  const p = page();
  await synced(p);
  const best = p.api.clock().best;
  p.ctx.history.pushState({ a: 1 }, "", "/next");
  assert.deepEqual(p.pushed, [[p.ctx.history, [{ a: 1 }, "", "/next"]]]);
  await settle();
  assert.equal(clockCalls(p), 0, "no jump: no sync");
  assert.deepEqual(p.api.clock().best, best, "and the samples stay");
  p.clk.jump = -5000; // the system clock was set back 5 s
  p.ctx.history.pushState(null, "", "/later");
  assert.equal(p.pushed.length, 2);
  await until(() => clockCalls(p) == 5, "a fresh burst");
  await settle();
  assert.equal(p.api.clock().best.off, OFFSET + 5000, "measured against the re-anchored clock");
});

test("popstate (back/forward): a fresh sync only when the clock jumped", async () => {
  const p = page();
  await synced(p);
  p.ctx.dispatchEvent(new Event("popstate"));
  await settle();
  assert.equal(clockCalls(p), 0);
  p.clk.jump = 2000;
  p.ctx.dispatchEvent(new Event("popstate"));
  await until(() => clockCalls(p) == 5, "a fresh burst");
});

test("beacon: flushed when the page is hidden (Safari and mobile Chrome may never fire pagehide)", async () => {
  const p = page();
  await synced(p);
  await p.ctx.fetch(GW + "/api/x");
  await settle();
  p.observe();
  p.ctx.document.dispatchEvent(new Event("visibilitychange")); // shown again: nothing to send
  assert.equal(p.beacons.length, 0);
  p.ctx.document.hidden = true;
  p.ctx.document.dispatchEvent(new Event("visibilitychange"));
  assert.equal(p.beacons.length, 1);
  assert.equal(JSON.parse(p.beacons[0].blob).e.length, 1);
});

test("beacon: flushed on pagehide", async () => {
  const p = page();
  await synced(p);
  await p.ctx.fetch(GW + "/api/x");
  await settle();
  p.observe();
  p.ctx.dispatchEvent(new Event("pagehide"));
  assert.equal(p.beacons.length, 1);
});

test("beacon: a request sent unsynced carries the offset known when it is reported", async () => {
  const p = page({ hold: true, script: CLASSIC, src: served("^(?:http://page\\.test)$") });
  await until(() => p.held.length, "the first clock request");
  await p.ctx.fetch(GW + "/api/first"); // no X-Client-Clock: the gateway's token has no uplink
  await settle();
  const entry = p.lastEntry();
  while (clockCalls(p) < 5 || p.held.length) {
    await until(() => p.held.length, "a clock request");
    p.held.shift()();
    await settle();
  }
  p.observe(entry);
  p.api.flush();
  const [e] = JSON.parse(p.beacons[0].blob).e;
  assert.equal(e.u, GW + "/api/first");
  assert.equal(e.off, OFFSET, "the burst's best offset places its marks");
});

// -- cases `make mutate` found unguarded ----------------------------------------------------

test("best: the least delayed sample wherever it sits in the list", () => {
  assert.deepEqual(S.best([{ off: 1, d: 1, at: 1 }, { off: 5, d: 5, at: 2 }, { off: 3, d: 3, at: 3 }]), { off: 1, d: 1, at: 1 });
});

test("Server-Timing: no header is no metrics; a param without a value is empty", () => {
  assert.deepEqual(S.parseServerTiming(null), {});
  assert.deepEqual(S.parseServerTiming(undefined), {});
  assert.deepEqual(S.parseServerTiming("uplink;desc"), { uplink: { dur: null, desc: "" } });
});

test("take: a burst answer (no timestamp sent) is never stale; no token keeps the last one", () => {
  const o = { s: [] };
  const tok = "5012.5010.9999.9.2.bm9uY2U.bWFj"; // its TS is far from anything we sent
  assert.equal(S.take(o, { t1: 5010, t2: 5012, tok }, 5000, 5022, 0), true);
  assert.equal(o.k, tok);
  assert.equal(S.take(o, { t1: 5030, t2: 5032, tok: null }, 5020, 5042, 0), true);
  assert.equal(o.k, tok, "an answer without a token keeps the previous one");
  assert.equal(o.s.length, 2);
});

test("XMLHttpRequest: only a header named exactly traceparent is the page's own", async () => {
  const p = page();
  await synced(p);
  const x = new p.ctx.XMLHttpRequest();
  x.open("GET", "/api/x");
  x.setRequestHeader("X-Traceparent", "a");
  x.setRequestHeader("Traceparent-Old", "b");
  x.send();
  assert.match(Object.fromEntries(x.sent).traceparent, TRACEPARENT);
});

test("LatencyGateway.requests keeps the last 50", async () => {
  const p = page();
  await synced(p);
  for (let i = 0; i < 51; i++) await (await p.ctx.fetch(`/api/x?n=${i}`)).arrayBuffer();
  await until(() => p.api.requests.length >= 50 && p.events.length == 51, "51 answers");
  assert.equal(p.api.requests.length, 50);
  assert.equal(p.api.requests[0].url, PAGE + "/api/x?n=1");
  assert.equal(p.api.requests[49].url, PAGE + "/api/x?n=50");
});

// -- cases the second `make mutate` found unguarded -----------------------------------------

/** Poll cond until it holds, with a real-time deadline (for the snippet's own timers). */
async function within(ms, cond, what) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) assert.fail("timed out waiting for " + what);
    await new Promise((r) => setTimeout(r, 5));
  }
}
const clockRequests = (p) => p.calls.filter((c) => String(c.input).includes("/__gateway/clock")).length;

test("sync burst: a Resource Timing mark the browser withheld (0) means JS times, not a 0 on C", async () => {
  for (const withheld of [{ requestStart: 0, responseStart: 0 }, { requestStart: 0 }, { responseStart: 0 }]) {
    const p = page({ clockEntry: (e) => ({ ...e, ...withheld }) });
    await synced(p);
    assert.deepEqual(plain(p.api.clock().best), { off: OFFSET, d: 20, at: EPOCH + 1000 + 5 * 22 }, JSON.stringify(withheld));
  }
});

test("a clock jump of exactly one second keeps C and its samples; past one second, either way, re-anchors", async () => {
  for (const [jump, reanchored] of [[1000, false], [-1000, false], [1000.5, true], [-1000.5, true]]) {
    const p = page();
    await synced(p);
    p.clk.jump = jump;
    const perfAtSend = p.clk.perf;
    await p.ctx.fetch(GW + "/api/x");
    const h = sent(p.calls.find((c) => typeof c.input != "string"));
    assert.equal(+h["x-client-timestamp"], EPOCH + perfAtSend + (reanchored ? jump : 0), String(jump));
    assert.equal(h["x-client-clock"] === undefined, reanchored, String(jump));
    await settle();
    await settle();
    assert.equal(clockRequests(p) > 0, reanchored, `a fresh burst after a jump of ${jump} ms`);
  }
});

test("a response whose entry is already in the buffer is matched at once (no observer call)", async () => {
  const p = page({ buffered: true });
  await synced(p);
  await p.ctx.fetch(GW + "/api/x");
  await settle();
  assert.deepEqual(p.events.map((e) => e.rtt), [null, 18]);
});

test("the last 50 requests wait for their Resource Timing entry", async () => {
  const p = page();
  await synced(p);
  const entries = [];
  for (let i = 0; i < 51; i++) {
    await p.ctx.fetch(GW + "/api/x?n=" + i);
    entries.push(p.lastEntry());
  }
  await settle();
  p.observe(entries[0]); // the 51st pushed the first one out
  assert.equal(p.events.filter((e) => e.rtt != null).length, 0);
  p.observe(entries[1]); // the oldest one still waiting
  assert.deepEqual(p.events.filter((e) => e.rtt != null).map((e) => e.url), [GW + "/api/x?n=1"]);
});

test("Server-Timing without a traceparent metric: the entry is matched by URL", async () => {
  const p = page();
  await synced(p);
  await p.ctx.fetch(GW + "/u");
  await settle();
  p.observe({ ...p.lastEntry(), serverTiming: [{ name: "gw", duration: 2, description: "" }] });
  assert.equal(p.events[1].rtt, 18);
});

test("Server-Timing with two traceparent metrics (the backend's, the gateway's): either one matches", async () => {
  const p = page();
  await synced(p);
  await p.ctx.fetch(GW + "/u");
  await settle();
  const entry = p.lastEntry();
  const backend = { name: "traceparent", duration: 0, description: "00-" + "12".repeat(16) + "-" + "34".repeat(8) + "-01" };
  p.observe({ ...entry, serverTiming: [backend, ...entry.serverTiming] });
  assert.equal(p.events[1].rtt, 18);
});

test("zero timings without Timing-Allow-Origin: no rtt, no pre, no X-Client-Prev", async () => {
  for (const zero of [{ requestStart: 0, responseStart: 0 }, { requestStart: 0 }, { responseStart: 0 }]) {
    const p = page();
    await synced(p);
    await p.ctx.fetch(GW + "/api/x");
    await settle();
    p.observe({ ...p.lastEntry(), ...zero });
    assert.equal(p.events.length, 2, "the entry is matched");
    assert.deepEqual([p.events[1].rtt, p.events[1].pre], [null, null], JSON.stringify(zero));
    await p.ctx.fetch(GW + "/api/y");
    assert.equal(sent(p.calls[1])["x-client-prev"], undefined, JSON.stringify(zero));
  }
});

test("without the gateway's own time (a stale answer), an entry gives no rtt", async () => {
  const p = page();
  await synced(p);
  p.gw.tsOverride = 1234;
  await p.ctx.fetch(GW + "/api/cached");
  await settle();
  p.observe({ ...p.lastEntry(), serverTiming: [] });
  assert.equal(p.events.length, 2, "the entry is matched by URL");
  assert.deepEqual([p.events[1].gw, p.events[1].rtt, p.events[1].pre], [null, null, null]);
});

test("beacon: entries go together after flushMs, on one timer", async () => {
  const p = page();
  await synced(p, GW, { flushMs: 40 });
  for (const path of ["/api/a", "/api/b"]) {
    await p.ctx.fetch(GW + path);
    await settle();
    p.observe();
  }
  assert.equal(p.beacons.length, 0, "not before flushMs");
  await within(2000, () => p.beacons.length > 0, "the flush timer");
  assert.deepEqual(JSON.parse(p.beacons[0].blob).e.map((e) => e.u), [GW + "/api/a", GW + "/api/b"]);
  await new Promise((r) => setTimeout(r, 80));
  assert.equal(p.beacons.length, 1, "one timer, one body");
});

test("beacon: a body of exactly 60 KB goes; one byte more, a single entry is dropped", async () => {
  const bodies = async (pad) => {
    const p = page();
    await synced(p);
    await p.ctx.fetch(GW + "/api/" + "x".repeat(pad));
    await settle();
    p.observe();
    p.api.flush();
    return p.beacons.map((b) => b.blob.length);
  };
  const [small] = await bodies(100); // the body grows by one byte a URL character
  const pad = 100 + 60000 - small;
  assert.deepEqual(await bodies(pad), [60000]);
  assert.deepEqual(await bodies(pad + 1), [], "a single entry over 60 KB cannot be halved");
});

test("a page without fetch is left alone: nothing wrapped, no burst", async () => {
  const p = page({ noFetch: true });
  const open = p.ctx.XMLHttpRequest.prototype.open;
  p.api.init({ gatewayOrigins: [GW] });
  p.api.init({ gatewayOrigins: [GW] });
  await settle();
  assert.equal(p.ctx.fetch, undefined);
  assert.equal(p.ctx.XMLHttpRequest.prototype.open, open);
  assert.equal(p.api.clock(GW), null);
});

test("without a document (a worker) init does nothing, even when called twice", async () => {
  const p = page({ noDocument: true });
  p.api.init({ gatewayOrigins: [GW] });
  p.api.init({ gatewayOrigins: [GW] });
  await settle();
  assert.equal(p.ctx.fetch, p.fakeFetch);
  assert.equal(p.calls.length, 0);
  assert.equal(p.api.clock(GW), null);
});

test("a classic script: the beacon is on by default, data-beacon=\"off\" turns it off", async () => {
  for (const [dataset, expected] of [[{}, 1], [{ beacon: "off" }, 0], [{ beacon: "" }, 1]]) {
    const p = page({ script: { src: GW + "/__gateway/snippet.js", dataset } });
    await until(() => clockRequests(p) == 5, "the burst");
    await settle();
    p.calls.length = 0;
    await p.ctx.fetch(GW + "/api/x");
    await settle();
    p.observe();
    p.api.flush();
    assert.equal(p.beacons.length, expected, JSON.stringify(dataset));
  }
});

test("without serverTiming an entry goes to the request with its URL, not to the oldest one waiting", async () => {
  const p = page();
  await synced(p);
  await p.ctx.fetch(GW + "/a");
  await p.ctx.fetch(GW + "/b");
  const entryB = { ...p.lastEntry(), serverTiming: [] };
  await settle();
  p.observe(entryB);
  assert.deepEqual(p.events.filter((e) => e.rtt != null).map((e) => e.url), [GW + "/b"]);
});
