/* latency-gateway snippet: the browser half of the latency tracing gateway (README, "Add it to your frontend").
 *
 * What it is for: give each fetch()/XMLHttpRequest to the page's own origin
 * or to an enabled gateway origin a fresh `traceparent` and the X-Client-*
 * timing headers, keep a clock synced against the gateway (NTP-style), match
 * each response to its Resource Timing entry and report the entry with
 * sendBeacon. Not for: deciding anything. The gateway checks every figure
 * sent from here (README, "How the latency is measured and why you can trust it").
 *
 * Plain ES2017, no dependencies. As a classic script it initialises itself:
 * the origin it was loaded from is a gateway, data-gateway-origins="a,b" adds
 * more, data-beacon="off" turns the beacon off. As an ES module
 * (/__gateway/snippet.mjs, this file plus an export footer) call init({...}).
 * A page SDK that owns trace context (OpenTelemetry web, Honeycomb) keeps it:
 * then only the X-Client-* headers are ours (init's traceContext).
 * Every risky call is guarded: a failure in here leaves the page's request
 * exactly as the page made it.
 */
(() => {
  const G = typeof globalThis == "object" ? globalThis : self;
  const P = G.performance, D = G.document;
  // Read now: currentScript is set only while a classic script first runs; it
  // is null in modules, so an import never initialises by itself.
  const CS = D && D.currentScript;
  const PFX = "/__gateway/";
  const JUMP_MS = 1e3;
  // The gateway that serves this file writes here the page origins it grants
  // CORS (GATEWAY_ALLOWED_ORIGINS) as one anchored pattern, as a JSON string;
  // null in a copy served from anywhere else.
  const ALLOWED = /*@gateway-allowed-origins*/ null;
  const noop = () => {};
  const safe = (f) => {
    try {
      return f();
    } catch (e) {}
  };

  // -- pure helpers (test/helpers.js reaches them for node --test) --------------------

  const f3 = (v) => v.toFixed(3);
  const NUM = /^-?\d{1,16}(\.\d{1,9})?$/; // a finite decimal, as the gateway writes them
  const r3 = (v) => Math.round(v * 1e3) / 1e3;

  /** n random bytes as lowercase hex, never all zeros (W3C Trace Context
   * §3.2.2.3-4: an all-zero trace or span id is invalid). */
  const hex = (n, rnd = crypto) => {
    const h = rnd.getRandomValues(new Uint8Array(n)).reduce((h, b) => h + (b | 256).toString(16).slice(1), "");
    return /[^0]/.test(h) ? h : hex(n, rnd);
  };
  // Flags 03 = sampled + Trace Context Level 2's random-trace-id bit: the ids
  // come from crypto.getRandomValues.
  const traceparent = (t, s) => `00-${t}-${s}-03`;

  const clockHeader = (b, tok, now) =>
    // age is clamped: the gateway refuses a negative one (clock_range).
    `off=${f3(b.off)}, d=${f3(b.d)}, age=${f3(Math.max(0, now - b.at))}` + (tok ? `, tok="${tok}"` : "");
  const prevHeader = (span, rtt, pre) => `span=${span}, rtt=${f3(rtt)}, pre=${f3(pre)}`;

  /** One NTP exchange (RFC 5905 §8): t0/t3 client send/receive, t1/t2 gateway
   * receive/send; off = server − client. */
  const sample = (t0, t1, t2, t3) => ({ off: (t1 - t0 + (t2 - t3)) / 2, d: t3 - t0 - (t2 - t1), at: t3 });
  /** Keep the last 8. A negative delay is physically impossible (the
   * gateway's own time cannot exceed the round trip): a clock stepped
   * mid-exchange, so the sample is discarded. */
  const addSample = (list, s) => (s.d >= 0 && list.push(s) > 8 && list.shift(), list);
  /** The minimum-delay sample (NTP's clock filter, RFC 5905 §10): the least
   * delayed exchange leaves the least room for path asymmetry, the offset's
   * only error. On a tie the newer one: less drift since. */
  const best = (list) => list.reduce((b, s) => (b && b.d < s.d ? b : s), null);

  /** `a;k=v;k2="v 2", b` → [[[a, ""], [k, v], [k2, "v 2"]], [[b, ""]]]: one
   * pass over the keys, each with the separator before it; values unquoted
   * (RFC 9110 §5.6.4 quoted-string); anything else is skipped. */
  const items = (s) => {
    const r = [];
    let cur;
    String(s || "").replace(/([,;]?)\s*([^\s,;="]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^\s,;"]*))?/g, (_, sep, k, v = "") => {
      if (sep != ";" || !cur) r.push((cur = []));
      cur.push([k, v[0] == '"' ? v.slice(1, -1).replace(/\\(.)/g, "$1") : v]);
    });
    return r;
  };

  /** Server-Timing (W3C Server Timing §3) → {name: {dur, desc}}: params in
   * any order, desc quoted or a token, junk skipped. A repeated param: the
   * first counts (the spec's rule); a repeated metric: the last counts, as
   * the gateway appends its metrics after the backend's. */
  const parseServerTiming = (s) => {
    const r = {};
    for (const [[name], ...ps] of items(s)) {
      // Junk names are harmless: nobody asks for them.
      const e = (r[name] = { dur: null, desc: "" });
      for (const [k, v] of ps.reverse()) {
        if (k == "dur") e.dur = NUM.test(v) ? +v : null;
        if (k == "desc") e.desc = v;
      }
    }
    return r;
  };

  /** `X-Gateway-Clock: t1=<ms>, t2=<ms>, tok="<token>", bind="<mac>"` →
   * {t1, t2, tok, b} or null. We echo the token in X-Client-Clock, so only
   * the gateway's own alphabet is kept: anything else would make our next
   * header invalid. bind ties the token to this request's traceparent; it
   * only goes back in a beacon entry (JSON), which the gateway checks. */
  const parseGatewayClock = (s) => {
    const o = {};
    for (const [[k, v]] of items(s)) o[k] = v;
    return NUM.test(o.t1) && NUM.test(o.t2)
      ? { t1: +o.t1, t2: +o.t2, tok: /^[\w.-]{1,256}$/.test(o.tok || "") ? o.tok : null, b: o.bind }
      : null;
  };

  /** The URL (resolved against base) when a request to it gets our headers:
   * its origin is enabled (isOn(origin): the page's own, or a gateway that
   * granted CORS) and its path is not the gateway's reserved /__gateway/.
   * Else null, never a throw. */
  const target = (url, base, isOn) =>
    safe(() => {
      const u = new URL(url, base);
      return !u.pathname.startsWith(PFX) && isOn(u.origin) ? u : null;
    }) || null;

  /** Whether a gateway's allow-list pattern (ALLOWED) matches origin. */
  const allows = (pattern, origin) => !!pattern && RegExp(pattern).test(origin);

  /** Add the sample and keep the token of a gateway answer (k) to a request
   * sent at c0 (none for the burst), unless the answer is stale: false then.
   * A copy from the HTTP cache (RFC 9111) or a CDN repeats an old
   * X-Gateway-Clock, whose token carries that request's X-Client-Timestamp
   * as TS (whole ms). Its sample would look fast, win the
   * min-delay filter and bring a stale offset; its token and Server-Timing
   * belong to someone else. */
  const take = (o, k, t0, t3, c0) => {
    const ts = (k.tok + "").split(".")[2];
    if (c0 && NUM.test(ts) && Math.abs(ts - c0) > 1) return false;
    addSample(o.s, sample(t0, k.t1, k.t2, t3));
    if (k.tok) o.k = k.tok;
    return true;
  };

  // -- the clock C -------------------------------------------------------------------

  // C = Date.now() at the anchor + performance.now() since: epoch ms that do
  // not step when NTP or the user sets the system clock.
  let aD = 0, aP = 0;
  const toC = (p) => (p > 0 ? r3(aD + (p - aP)) : 0); // a performance time; 0 = mark unavailable
  const C = () => toC(P.now());
  const S = new Map(); // origin → {s: samples, k: token, q: beacons, on: enabled, y: synced, b: burst begun, p: prev}
  /** Re-anchor C on Date.now() when the two are more than a second apart;
   * returns by how much C moved (0: it did not).
   * performance.now() stalls while the machine sleeps in some browsers
   * (w3c/hr-time#115) and Date.now() steps when the system clock is set. Past
   * a second apart we cannot tell which one moved, so the offsets measured
   * against the old C are unknown: the samples go, and each gateway whose
   * burst is over gets a fresh one. Closer than that, C stays as it is: a
   * small re-anchor would shift every offset measured against it. */
  const anchor = () => {
    const j = Date.now() - C();
    if (Math.abs(j) <= JUMP_MS) return 0;
    aD = Date.now();
    aP = P.now();
    for (const [g, o] of S) (o.s.length = 0), o.b && o.y && burst(g, o);
    return j;
  };

  // -- requests ------------------------------------------------------------------------

  let F, first, tm, B, N, FM, TC;
  const K = Symbol(); // our mark on XHRs and matched entries
  const R = []; // the last 50 request results, newest last
  const pend = []; // records waiting for their Resource Timing entry
  const state = (g) => S.get(g) || S.set(g, { s: [], q: [], y: 1 }).get(g);
  const ok = (url) => target(url, D.baseURI, (g) => (S.get(g) || {}).on);
  // A listener's exception is reported by the browser, never thrown here.
  const emit = (d) => dispatchEvent(new CustomEvent("latency-gateway", { detail: Object.assign({}, d) }));

  /** The sync burst against one gateway origin, with the page's own fetch.
   * The first answer also proves the gateway grants this page CORS. Until
   * then requests to that origin get none of our headers, so they stay
   * simple requests with no preflight, unless the allow-list the gateway
   * served already names the page. Without that first answer, requests there
   * are never tagged: a cached copy of the snippet may carry a stale list. */
  const burst = async (g, o) => {
    let i = (o.y = 0);
    try {
      for (; i < N; i++) {
        const u = g + PFX + "clock?n=" + i;
        // mode "cors" is fetch()'s default (Fetch standard, Request constructor).
        let t0 = C(), r = await F(u, { cache: "no-store", credentials: "omit" }), t3 = C();
        const k = parseGatewayClock(r.headers.get("x-gateway-clock"));
        if (!k) break;
        await r.arrayBuffer(); // its Resource Timing entry is complete with the body
        // Resource Timing brackets the exchange tighter than JS can (no task queueing).
        const e = P.getEntriesByName(u).pop();
        if (e && e.requestStart > 0 && e.responseStart > 0) (t0 = toC(e.requestStart)), (t3 = toC(e.responseStart));
        take(o, k, t0, t3);
        o.on = 1;
      }
    } catch (e) {} // a CORS refusal or a network error ends the burst
    if (!i) o.on = 0;
    o.y = 1;
  };

  /** Whether a page SDK owns trace context: init's traceContext "page", or
   * "auto" (the default) once the OpenTelemetry JS API has a global tracer
   * provider (@opentelemetry/api registers it under this symbol, whichever
   * SDK set it up). Then we leave traceparent to it: two writers would orphan
   * one of the spans. */
  const pageOwns = () => TC == "page" || (TC != "snippet" && !!(G[Symbol.for("opentelemetry.js.api.1")] || {}).trace);

  /** Our headers into h when the URL is eligible; returns the request's
   * record. p = performance.now() read first thing in the wrapper. */
  const tag = (h, method, url, p) => {
    const u = ok(url);
    if (!u) return;
    // The page's own trace context wins (its ids still describe the request);
    // a page SDK may also add it after us, when it wrapped fetch first: own is
    // then true, and the ids are not ours to know.
    const o = S.get(u.origin), own = h.get("traceparent") || pageOwns(), tp = own || traceparent(hex(16), hex(8));
    let c0 = toC(p);
    c0 += anchor();
    if (!own) h.set("traceparent", tp);
    const [, traceId, spanId] = (tp + "").split("-");
    const x = { o, p, c0, own, tp, d: { traceId, spanId, url: u.href, method, gw: null, uplink: null, verdict: null, rtt: null, pre: null } };
    h.set("x-client-timestamp", f3(c0));
    // Not before the burst is over: its first samples are its worst.
    const b = o.y && best(o.s);
    if (b) h.set("x-client-clock", clockHeader(b, o.k, c0));
    // Sent once, so that each measured round trip lands on one gateway span
    // and aggregates such as P95(latency.rtt_ms) count it once.
    if (o.p) h.set("x-client-prev", o.p), (o.p = 0);
    return x;
  };

  /** A response arrived; get(name) reads its headers. */
  const done = (x, get, status) =>
    safe(() => {
      const d = x.d, k = parseGatewayClock(get("x-gateway-clock"));
      if (k && take(x.o, k, x.c0, C(), x.c0)) x.k = k;
      const st = k && !x.k ? {} : parseServerTiming(get("server-timing"));
      d.status = status;
      if (st.gw) d.gw = st.gw.dur;
      if (st.uplink) (d.uplink = st.uplink.dur), (d.verdict = st.uplink.desc);
      x.g = (st.traceparent || {}).desc;
      R.push(d) > 50 && R.shift();
      emit(d);
      pend.push(x) > 50 && pend.shift();
      // In case the entry is in the buffer already: the observer's callback
      // came first, with nothing to match yet.
      P.getEntriesByName(d.url).forEach(match);
    });

  const MARKS = "startTime fetchStart domainLookupStart domainLookupEnd connectStart connectEnd requestStart responseStart responseEnd".split(" ");
  /** A Resource Timing entry: find its request by the gateway's traceparent
   * in Server-Timing, unique even with identical URLs in flight (the whole
   * value, not just our trace id: in its link and restart modes the
   * gateway's trace is not ours). Without serverTiming (insecure contexts)
   * fall back to the URL, claiming only an entry started after the request. */
  const match = (e) => {
    if (e[K]) return;
    const tps = (e.serverTiming || []).filter((m) => m.name == "traceparent");
    const i = pend.findIndex((x) => (tps.length ? tps.some((m) => m.description == x.g) : e.name == x.d.url && e.startTime >= x.p));
    if (i < 0) return;
    e[K] = 1;
    const [x] = pend.splice(i, 1), d = x.d, o = x.o, rs = e.requestStart, rp = e.responseStart;
    // Zeros without Timing-Allow-Origin (W3C Resource Timing, cross-origin resources).
    if (rs > 0 && rp > 0) {
      if (d.gw != null) {
        // The clock-free round trip: the browser's wait less the gateway's own time.
        d.rtt = r3(Math.max(0, rp - rs - d.gw));
        d.pre = r3(Math.max(0, rs - e.startTime));
        // Not for a page-made traceparent: it may be junk, and the gateway
        // would reject a bad span id.
        if (!x.own) o.p = prevHeader(d.spanId, d.rtt, d.pre);
      }
    }
    emit(d);
    // A page-made traceparent names the page's span, not ours to report; and
    // without a token and its bind the gateway would drop the entry anyway.
    if (B && x.k && x.k.b && !x.own) {
      const marks = {};
      for (const n of MARKS) marks[n] = toC(e[n]);
      // off: today's best offset. The gateway uses it only for a request
      // sent unsynced (e.g. the first of a page load, before the burst's
      // answers); a synced one is placed by its token alone.
      o.q.push({ tp: x.tp, m: d.method, u: d.url, tok: x.k.tok, b: x.k.b, off: r3((best(o.s) || {}).off), marks }) < 20
        ? tm || (tm = setTimeout(flush, FM))
        : flush();
    }
  };

  // -- beacon ------------------------------------------------------------------------

  /** POST entries as text/plain, CORS-safelisted, so no preflight: a string
   * body goes as text/plain;charset=UTF-8 (Fetch standard, "extract a
   * body"), and the gateway grants CORS to the origins it enables. At most
   * 60 KB a body (keepalive requests share a 64 KiB quota, Fetch §4.1). */
  const send = (u, e) => {
    const b = JSON.stringify({ v: 1, e }), h = e.length >> 1;
    if (b.length > 6e4) return h && (send(u, e.slice(0, h)), send(u, e.slice(h)));
    safe(() => navigator.sendBeacon(u, b)) ||
      safe(() => F(u, { method: "POST", body: b, keepalive: true }).catch(noop));
  };
  const flush = () => {
    clearTimeout(tm);
    tm = 0;
    for (const [g, o] of S) if (o.q.length) send(g + PFX + "beacon", o.q.splice(0));
  };

  // -- wrapping fetch and XMLHttpRequest ------------------------------------------------

  const wrapFetch = () => {
    G.fetch = function (input, init) {
      const p = P.now();
      let a = arguments, x;
      safe(() => {
        // A Request (from any realm) has a url; anything else is a URL string.
        if (!ok((input && input.url) || input)) return;
        // Never touch the caller's objects: a new Request, a copy of its headers.
        const q = new Request(input, init);
        a = [q]; // from here on, q is the page's request exactly
        const h = new Headers(q.headers), y = tag(h, q.method, q.url, p);
        if (y) (a = [new Request(q, { headers: h })]), (x = y);
      });
      const r = F.apply(this, a);
      if (x) safe(() => r.then((res) => done(x, (n) => res.headers.get(n), res.status), noop));
      return r;
    };
  };

  const wrapXHR = (X) => {
    const { open, send: xsend, setRequestHeader: set } = X;
    X.open = function (m, u) {
      safe(() => (this[K] = { m: (m + "").toUpperCase(), u }));
      return open.apply(this, arguments);
    };
    X.setRequestHeader = function (k, v) {
      safe(() => /^traceparent$/i.test(k) && (this[K].tp = v));
      return set.apply(this, arguments);
    };
    X.send = function () {
      const p = P.now(), s = this[K];
      safe(() => {
        // tag() asks only for the traceparent, and sets with the real setRequestHeader.
        const x = tag({ get: () => s.tp, set: (k, v) => set.call(this, k, v) }, s.m, s.u, p);
        // A later open() starts another request: only this one's loadend counts.
        if (x) this.addEventListener("loadend", () => this[K] == s && done(x, (n) => this.getResponseHeader(n), this.status), { once: true });
      });
      return xsend.apply(this, arguments);
    };
  };

  // -- init --------------------------------------------------------------------------

  /** init({gatewayOrigins, beacon = true, syncSamples = 5, flushMs = 5000,
   * traceContext = "auto" | "page" | "snippet", allowedOrigins}). Origins
   * are absolute URLs ("https://gw.example"). allowedOrigins maps a gateway
   * origin to the allow-list it serves (the gateway fills it in when it
   * serves the snippet): a gateway whose list names the page's origin gets
   * our headers from the first request, while the sync burst runs. Calling
   * init again wraps nothing twice: it adds origins and sets the options anew. */
  const init = (opt = {}) => {
    safe(() => {
      if (!D || !G.fetch) return;
      B = opt.beacon != false;
      N = opt.syncSamples || 5;
      FM = opt.flushMs || 5e3;
      TC = opt.traceContext;
      if (!F) {
        F = G.fetch;
        anchor();
        // Coming back to a tab is when a stalled clock shows: re-anchor before
        // its first request. Leaving may be the last chance to report, and
        // hidden is the last event Safari and mobile Chrome reliably fire
        // before discarding a page (pagehide may never come).
        D.addEventListener("visibilitychange", () => (D.hidden ? flush() : anchor()));
        addEventListener("pagehide", flush);
        // A single-page app's navigation (history.pushState, back/forward):
        // the same check, so a fresh sync only when the clock jumped.
        addEventListener("popstate", anchor);
        safe(() => new PerformanceObserver((l) => safe(() => l.getEntries().forEach(match))).observe({ type: "resource", buffered: true }));
        state(location.origin).on = 1; // same-origin: no CORS to ask for
        wrapFetch();
        wrapXHR(XMLHttpRequest.prototype);
        safe(() => {
          const h = history, push = h.pushState;
          h.pushState = function () {
            anchor();
            return push.apply(this, arguments);
          };
        });
      }
      for (const s of opt.gatewayOrigins || [])
        safe(() => {
          const g = new URL(s).origin, o = state(g);
          first = first || g;
          if (allows((opt.allowedOrigins || {})[g], location.origin)) o.on = 1;
          if (!o.b) (o.b = 1), burst(g, o);
        });
    });
    return api;
  };

  const api = G.LatencyGateway || (G.LatencyGateway = {
    init,
    now: C,
    /** An origin's clock (default: the first gateway origin): {best, tok, on}.
     * best is the sample X-Client-Clock now carries ({off, d, at}; null
     * until the sync burst is over), tok the latest token, on whether
     * requests there get our headers. Null for an origin never seen. */
    clock: (g = first) => {
      const o = S.get(g);
      return o ? { best: o.y ? best(o.s) : null, tok: o.k || null, on: !!o.on } : null;
    },
    requests: R,
    flush,
  });

  if (CS)
    safe(() =>
      api.init({
        gatewayOrigins: [CS.src, ...(CS.dataset.gatewayOrigins || "").split(",")],
        beacon: CS.dataset.beacon != "off",
        allowedOrigins: { [new URL(CS.src).origin]: ALLOWED },
      })
    );
})();
