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
 *
 * Reading it: the minifier shortens every local name, never a property name,
 * and the whole file must stay under 3 KB minified + gzipped
 * (scripts/size.mjs). So locals are spelled out, while the properties of the
 * few internal records are short and documented where the record is made:
 * GatewayState (per origin, see stateOf) and RequestRecord (per request, see
 * tagRequest). Property names a page sees (the event detail, clock(), the
 * beacon entries the gateway parses) are part of the contract.
 */
(() => {
  // -- environment ---------------------------------------------------------------------

  const globalScope = typeof globalThis == "object" ? globalThis : self;
  const perf = globalScope.performance, doc = globalScope.document;
  // Read now: currentScript is set only while a classic script first runs; it
  // is null in modules, so an import never initialises by itself.
  const ownScript = doc && doc.currentScript;
  const RESERVED_PREFIX = "/__gateway/";
  const CLOCK_JUMP_MS = 1e3;
  // The gateway that serves this file writes here the page origins it grants
  // CORS (GATEWAY_ALLOWED_ORIGINS) as one anchored pattern, as a JSON string;
  // null in a copy served from anywhere else (a versioned URL, npm).
  const SERVED_ALLOW_LIST = /*@gateway-allowed-origins*/ null;
  // Served as /__gateway/snippet.js?sampled=gateway by a gateway whose
  // sampler is a trace-id ratio: its bound (see traceparent), else null.
  const SAMPLE_BOUND = /*@gateway-sample-bound*/ null;
  const noop = () => {};
  /** f(), or undefined when it throws: the page must never see our errors. */
  const safely = (f) => {
    try {
      return f();
    } catch (e) {}
  };

  // -- pure helpers (test/helpers.js reaches them for node --test) --------------------

  /** Milliseconds as the gateway parses them: 3 decimals. */
  const timestampHeader = (ms) => ms.toFixed(3);
  const DECIMAL = /^-?\d{1,16}(\.\d{1,9})?$/; // a finite decimal, as the gateway writes them
  const round3 = (ms) => Math.round(ms * 1e3) / 1e3;

  /** byteCount random bytes as lowercase hex, never all zeros (W3C Trace
   * Context §3.2.2.3-4: an all-zero trace or span id is invalid). */
  const hex = (byteCount, random = crypto) => {
    const digits = random
      .getRandomValues(new Uint8Array(byteCount))
      .reduce((text, byte) => text + (byte | 256).toString(16).slice(1), "");
    return /[^0]/.test(digits) ? digits : hex(byteCount, random);
  };
  /** Flags: Trace Context Level 2's random-trace-id bit (02), as the ids come
   * from crypto.getRandomValues, plus sampled (01) when the gateway's sampler
   * will keep the trace: below sampleBound, the bound of its trace-id ratio
   * sampler (OpenTelemetry TraceIdRatioBased: the id's lower 64 bits < bound)
   * as 16 lowercase hex digits, which compare as strings exactly as the
   * numbers do. No bound (null): every trace is sampled. */
  const traceparent = (traceIdHex, spanIdHex, sampleBound = SAMPLE_BOUND) =>
    `00-${traceIdHex}-${spanIdHex}-0${!sampleBound || traceIdHex.slice(16) < sampleBound ? 3 : 2}`;

  /** X-Client-Clock: the best sample, its age at `now` and the latest token. */
  const clockHeader = (bestSample, token, now) =>
    // age is clamped: the gateway refuses a negative one (clock_range).
    `off=${timestampHeader(bestSample.off)}, d=${timestampHeader(bestSample.d)}, age=${timestampHeader(Math.max(0, now - bestSample.at))}` +
    (token ? `, tok="${token}"` : "");
  /** X-Client-Prev: the previous request's clock-free round trip. */
  const prevHeader = (spanId, rttMs, preMs) => `span=${spanId}, rtt=${timestampHeader(rttMs)}, pre=${timestampHeader(preMs)}`;

  /** One NTP exchange (RFC 5905 §8): t0/t3 client send/receive, t1/t2 gateway
   * receive/send → {off: server − client, d: delay, at: t3}, all in ms. */
  const sample = (t0, t1, t2, t3) => ({ off: (t1 - t0 + (t2 - t3)) / 2, d: t3 - t0 - (t2 - t1), at: t3 });
  /** Keep the last 8. A negative delay is physically impossible (the
   * gateway's own time cannot exceed the round trip): a clock stepped
   * mid-exchange, so the sample is discarded. */
  const addSample = (samples, newSample) => (newSample.d >= 0 && samples.push(newSample) > 8 && samples.shift(), samples);
  /** The minimum-delay sample (NTP's clock filter, RFC 5905 §10): the least
   * delayed exchange leaves the least room for path asymmetry, the offset's
   * only error. On a tie the newer one: less drift since. */
  const best = (samples) => samples.reduce((kept, s) => (kept && kept.d < s.d ? kept : s), null);

  /** `a;k=v;k2="v 2", b` → [[[a, ""], [k, v], [k2, "v 2"]], [[b, ""]]]: one
   * pass over the keys, each with the separator before it; values unquoted
   * (RFC 9110 §5.6.4 quoted-string); anything else is skipped. */
  const listItems = (header) => {
    const list = [];
    let current;
    String(header || "").replace(/([,;]?)\s*([^\s,;="]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^\s,;"]*))?/g, (_, separator, key, value = "") => {
      if (separator != ";" || !current) list.push((current = []));
      current.push([key, value[0] == '"' ? value.slice(1, -1).replace(/\\(.)/g, "$1") : value]);
    });
    return list;
  };

  /** Server-Timing (W3C Server Timing §3) → {name: {dur, desc}}: params in
   * any order, desc quoted or a token, junk skipped. A repeated param: the
   * first counts (the spec's rule); a repeated metric: the last counts, as
   * the gateway appends its metrics after the backend's. */
  const parseServerTiming = (header) => {
    const metrics = {};
    for (const [[name], ...params] of listItems(header)) {
      // Junk names are harmless: nobody asks for them.
      const metric = (metrics[name] = { dur: null, desc: "" });
      for (const [key, value] of params.reverse()) {
        if (key == "dur") metric.dur = DECIMAL.test(value) ? +value : null;
        if (key == "desc") metric.desc = value;
      }
    }
    return metrics;
  };

  /** `X-Gateway-Clock: t1=<ms>, t2=<ms>, tok="<token>", bind="<mac>"` →
   * {t1, t2, tok, b} or null. We echo the token in X-Client-Clock, so only
   * the gateway's own alphabet is kept: anything else would make our next
   * header invalid. bind (b) ties the token to this request's traceparent; it
   * only goes back in a beacon entry (JSON), which the gateway checks. */
  const parseGatewayClock = (header) => {
    const fields = {};
    for (const [[key, value]] of listItems(header)) fields[key] = value;
    return DECIMAL.test(fields.t1) && DECIMAL.test(fields.t2)
      ? { t1: +fields.t1, t2: +fields.t2, tok: /^[\w.-]{1,256}$/.test(fields.tok || "") ? fields.tok : null, b: fields.bind }
      : null;
  };

  /** The URL (resolved against base) when a request to it gets our headers:
   * its origin is enabled (isEnabled(origin): the page's own, or a gateway
   * that granted CORS) and its path is not the gateway's reserved /__gateway/.
   * Else null, never a throw. */
  const target = (url, base, isEnabled) =>
    safely(() => {
      const parsed = new URL(url, base);
      return !parsed.pathname.startsWith(RESERVED_PREFIX) && isEnabled(parsed.origin) ? parsed : null;
    }) || null;

  /** Whether a gateway's allow-list pattern (SERVED_ALLOW_LIST) matches origin. */
  const allows = (pattern, pageOrigin) => !!pattern && RegExp(pattern).test(pageOrigin);

  /** Add the sample and keep the token of a gateway answer to a request sent
   * at timestamp (none for the burst), unless the answer is stale: false
   * then. A copy from the HTTP cache (RFC 9111) or a CDN repeats an old
   * X-Gateway-Clock, whose token carries that request's X-Client-Timestamp
   * as TS (its third dot-separated field, whole ms). Its sample would look
   * fast, win the min-delay filter and bring a stale offset; its token and
   * Server-Timing belong to someone else. */
  const take = (state, answer, t0, t3, timestamp) => {
    const tokenTimestamp = (answer.tok + "").split(".")[2];
    if (timestamp && DECIMAL.test(tokenTimestamp) && Math.abs(tokenTimestamp - timestamp) > 1) return false;
    addSample(state.s, sample(t0, answer.t1, answer.t2, t3));
    if (answer.tok) state.k = answer.tok;
    return true;
  };

  // -- the clock C -------------------------------------------------------------------

  // C = Date.now() at the anchor + performance.now() since: epoch ms that do
  // not step when NTP or the user sets the system clock.
  let anchorDateMs = 0, anchorPerfMs = 0;
  /** A performance timestamp on C; 0 stays 0 (a Resource Timing mark the
   * browser withheld). */
  const toClock = (perfMs) => (perfMs > 0 ? round3(anchorDateMs + (perfMs - anchorPerfMs)) : 0);
  const clockNow = () => toClock(perf.now());

  /** origin → GatewayState. The page's own origin is one too (no CORS to ask). */
  const gateways = new Map();

  /** Re-anchor C on Date.now() when the two are more than a second apart;
   * returns by how much C moved (0: it did not).
   * performance.now() stalls while the machine sleeps in some browsers
   * (w3c/hr-time#115) and Date.now() steps when the system clock is set. Past
   * a second apart we cannot tell which one moved, so the offsets measured
   * against the old C are unknown: the samples go, and each gateway whose
   * burst is over gets a fresh one. Closer than that, C stays as it is: a
   * small re-anchor would shift every offset measured against it. */
  const reanchor = () => {
    const jumpMs = Date.now() - clockNow();
    if (Math.abs(jumpMs) <= CLOCK_JUMP_MS) return 0;
    anchorDateMs = Date.now();
    anchorPerfMs = perf.now();
    for (const [origin, state] of gateways) (state.s.length = 0), state.b && state.y && syncBurst(origin, state);
    return jumpMs;
  };

  // -- per-origin state and the sync burst ---------------------------------------------

  // The fetch we wrapped (set once, by the first init), the first gateway
  // origin, the beacon timer, and a copy of the options of the last init(),
  // read where they apply.
  let pageFetch, firstGateway, flushTimer, settings;
  const MARK = Symbol(); // our mark on XHRs and matched entries
  const recentResults = []; // the last 50 request results (event details), newest last
  const awaitingEntry = []; // RequestRecords waiting for their Resource Timing entry

  /** GatewayState of an origin, made on first use:
   *   s  samples: the last 8 NTP samples against this origin ({off, d, at})
   *   k  the latest clock token it signed (echoed in X-Client-Clock)
   *   q  queued beacon entries, sent to this origin's /__gateway/beacon
   *   on enabled: requests there get our headers (1/0; unset = not yet)
   *   y  synced: no burst in flight, so its best sample may be sent
   *   b  a burst was begun once (a re-anchor restarts only those)
   *   p  the X-Client-Prev value waiting for the next request, or 0 */
  const stateOf = (origin) => gateways.get(origin) || gateways.set(origin, { s: [], q: [], y: 1 }).get(origin);
  const eligibleUrl = (url) => target(url, doc.baseURI, (origin) => (gateways.get(origin) || {}).on);

  // A listener's exception is reported by the browser, never thrown here.
  const emit = (detail) => dispatchEvent(new CustomEvent("latency-gateway", { detail: Object.assign({}, detail) }));

  /** The sync burst against one gateway origin, with the page's own fetch.
   * The first answer also proves the gateway grants this page CORS. Until
   * then requests to that origin get none of our headers, so they stay
   * simple requests with no preflight, unless the allow-list the gateway
   * served already names the page. Without that first answer, requests there
   * are never tagged: a cached copy of the snippet may carry a stale list. */
  const syncBurst = async (origin, state) => {
    let answered = (state.y = 0);
    try {
      for (; answered < (settings.syncSamples || 5); answered++) {
        const url = origin + RESERVED_PREFIX + "clock?n=" + answered;
        // mode "cors" is fetch()'s default (Fetch standard, Request constructor).
        let t0 = clockNow(), response = await pageFetch(url, { cache: "no-store", credentials: "omit" }), t3 = clockNow();
        const answer = parseGatewayClock(response.headers.get("x-gateway-clock"));
        if (!answer) break;
        await response.arrayBuffer(); // its Resource Timing entry is complete with the body
        // Resource Timing brackets the exchange tighter than JS can (no task queueing).
        const entry = perf.getEntriesByName(url).pop();
        if (entry && entry.requestStart > 0 && entry.responseStart > 0)
          (t0 = toClock(entry.requestStart)), (t3 = toClock(entry.responseStart));
        take(state, answer, t0, t3);
        state.on = 1;
      }
    } catch (e) {} // a CORS refusal or a network error ends the burst
    if (!answered) state.on = 0;
    state.y = 1;
  };

  // -- tagging requests ----------------------------------------------------------------


  /** Whether a page SDK owns trace context: init's traceContext "page", or
   * "auto" (the default) once the OpenTelemetry JS API has a global tracer
   * provider (@opentelemetry/api registers it under this symbol, whichever
   * SDK set it up). Then we leave traceparent to it: two writers would orphan
   * one of the spans. */
  const pageOwnsTraceContext = () =>
    settings.traceContext == "page" ||
    (settings.traceContext != "snippet" && !!(globalScope[Symbol.for("opentelemetry.js.api.1")] || {}).trace);

  /** Our headers into headers (anything with get/set) when the URL is
   * eligible; returns the request's RequestRecord, else undefined.
   * perfStart = performance.now() read first thing in the wrapper.
   * RequestRecord:
   *   o    the GatewayState of the request's origin
   *   p    perfStart, to claim only a Resource Timing entry started after it
   *   c0   X-Client-Timestamp, on C
   *   own  the traceparent is not ours (the page's, or a page SDK's): truthy
   *   tp   the traceparent sent (ours or the page's), for the beacon
   *   d    the event detail a page sees (see the types file)
   *   k    the gateway's parsed X-Gateway-Clock, once a fresh one came back
   *   g    the gateway's traceparent from Server-Timing, to match the entry */
  const tagRequest = (headers, method, url, perfStart) => {
    const eligible = eligibleUrl(url);
    if (!eligible) return;
    // The page's own trace context wins (its ids still describe the request);
    // a page SDK may also add it after us, when it wrapped fetch first: own is
    // then true, and the ids are not ours to know.
    const state = gateways.get(eligible.origin),
      own = headers.get("traceparent") || pageOwnsTraceContext(),
      sentTraceparent = own || traceparent(hex(16), hex(8));
    const timestamp = toClock(perfStart) + reanchor();
    if (!own) headers.set("traceparent", sentTraceparent);
    const [, traceId, spanId] = (sentTraceparent + "").split("-");
    const record = {
      o: state,
      p: perfStart,
      c0: timestamp,
      own,
      tp: sentTraceparent,
      d: { traceId, spanId, url: eligible.href, method, gw: null, uplink: null, verdict: null, rtt: null, pre: null },
    };
    headers.set("x-client-timestamp", timestampHeader(timestamp));
    // Not before the burst is over: its first samples are its worst.
    const bestSample = state.y && best(state.s);
    if (bestSample) headers.set("x-client-clock", clockHeader(bestSample, state.k, timestamp));
    // Sent once, so that each measured round trip lands on one gateway span
    // and aggregates such as P95(latency.rtt_ms) count it once.
    if (state.p) headers.set("x-client-prev", state.p), (state.p = 0);
    return record;
  };

  /** A response arrived; header(name) reads its headers. */
  const responded = (record, header, status) =>
    safely(() => {
      const detail = record.d, answer = parseGatewayClock(header("x-gateway-clock"));
      if (answer && take(record.o, answer, record.c0, clockNow(), record.c0)) record.k = answer;
      // A stale answer's Server-Timing is someone else's: ignore it too.
      const serverTiming = answer && !record.k ? {} : parseServerTiming(header("server-timing"));
      detail.status = status;
      if (serverTiming.gw) detail.gw = serverTiming.gw.dur;
      if (serverTiming.uplink) (detail.uplink = serverTiming.uplink.dur), (detail.verdict = serverTiming.uplink.desc);
      record.g = (serverTiming.traceparent || {}).desc;
      recentResults.push(detail) > 50 && recentResults.shift();
      emit(detail);
      awaitingEntry.push(record) > 50 && awaitingEntry.shift();
      // In case the entry is in the buffer already: the observer's callback
      // came first, with nothing to match yet.
      perf.getEntriesByName(detail.url).forEach(matchEntry);
    });

  // -- matching Resource Timing ----------------------------------------------------------

  const MARK_NAMES = "startTime fetchStart domainLookupStart domainLookupEnd connectStart connectEnd requestStart responseStart responseEnd".split(" ");
  /** A Resource Timing entry: find its request by the gateway's traceparent
   * in Server-Timing, unique even with identical URLs in flight (the whole
   * value, not just our trace id: in its link and restart modes the
   * gateway's trace is not ours). Without serverTiming (insecure contexts)
   * fall back to the URL, claiming only an entry started after the request. */
  const matchEntry = (entry) => {
    if (entry[MARK]) return;
    const gatewayTraceparents = (entry.serverTiming || []).filter((metric) => metric.name == "traceparent");
    const index = awaitingEntry.findIndex((record) =>
      gatewayTraceparents.length
        ? gatewayTraceparents.some((metric) => metric.description == record.g)
        : entry.name == record.d.url && entry.startTime >= record.p
    );
    if (index < 0) return;
    entry[MARK] = 1;
    const [record] = awaitingEntry.splice(index, 1), detail = record.d, state = record.o,
      requestStart = entry.requestStart, responseStart = entry.responseStart;
    // Zeros without Timing-Allow-Origin (W3C Resource Timing, cross-origin resources).
    if (requestStart > 0 && responseStart > 0 && detail.gw != null) {
      // The clock-free round trip: the browser's wait less the gateway's own time.
      detail.rtt = round3(Math.max(0, responseStart - requestStart - detail.gw));
      detail.pre = round3(Math.max(0, requestStart - entry.startTime));
      // Not for a page-made traceparent: it may be junk, and the gateway
      // would reject a bad span id.
      if (!record.own) state.p = prevHeader(detail.spanId, detail.rtt, detail.pre);
    }
    emit(detail);
    // A page-made traceparent names the page's span, not ours to report; and
    // without a token and its bind the gateway would drop the entry anyway.
    if (settings.beacon != false && record.k && record.k.b && !record.own) {
      // A beacon entry, in the shape the gateway's beacon.py parses: tp, m
      // (method), u (url), tok and b (the token and its bind), off, and the
      // entry's marks on C. Sent within flushMs, or at once from the 20th.
      const marks = {};
      for (const name of MARK_NAMES) marks[name] = toClock(entry[name]);
      // off: today's best offset. The gateway uses it only for a request
      // sent unsynced (e.g. the first of a page load, before the burst's
      // answers); a synced one is placed by its token alone.
      const queued = state.q.push({
        tp: record.tp,
        m: detail.method,
        u: detail.url,
        tok: record.k.tok,
        b: record.k.b,
        off: round3((best(state.s) || {}).off),
        marks,
      });
      queued < 20 ? flushTimer || (flushTimer = setTimeout(flush, settings.flushMs || 5e3)) : flush();
    }
  };

  // -- beacon ------------------------------------------------------------------------

  /** POST entries as text/plain, CORS-safelisted, so no preflight: a string
   * body goes as text/plain;charset=UTF-8 (Fetch standard, "extract a
   * body"), and the gateway grants CORS to the origins it enables. At most
   * 60 KB a body (keepalive requests share a 64 KiB quota, Fetch §4.1):
   * a bigger batch goes as two halves. */
  const sendBeacon = (url, entries) => {
    const body = JSON.stringify({ v: 1, e: entries }), half = entries.length >> 1;
    if (body.length > 6e4) return half && (sendBeacon(url, entries.slice(0, half)), sendBeacon(url, entries.slice(half)));
    safely(() => navigator.sendBeacon(url, body)) ||
      safely(() => pageFetch(url, { method: "POST", body, keepalive: true }).catch(noop));
  };
  const flush = () => {
    clearTimeout(flushTimer);
    flushTimer = 0;
    for (const [origin, state] of gateways) if (state.q.length) sendBeacon(origin + RESERVED_PREFIX + "beacon", state.q.splice(0));
  };

  // -- wrapping fetch and XMLHttpRequest ------------------------------------------------

  const wrapFetch = () => {
    globalScope.fetch = function (input, init) {
      const perfStart = perf.now();
      let args = arguments, record;
      safely(() => {
        // A Request (from any realm) has a url; anything else is a URL string.
        if (!eligibleUrl((input && input.url) || input)) return;
        // Never touch the caller's objects: a new Request, a copy of its headers.
        const request = new Request(input, init);
        args = [request]; // from here on, request is the page's request exactly
        const headers = new Headers(request.headers),
          tagged = tagRequest(headers, request.method, request.url, perfStart);
        if (tagged) (args = [new Request(request, { headers })]), (record = tagged);
      });
      const result = pageFetch.apply(this, args);
      if (record) safely(() => result.then((response) => responded(record, (name) => response.headers.get(name), response.status), noop));
      return result;
    };
  };

  /** object[name] runs before(...its arguments) first, guarded, then the
   * original with the same this and arguments, and returns what it returns. */
  const wrapMethod = (object, name, before) => {
    const original = object[name];
    object[name] = function () {
      safely(() => before.apply(this, arguments));
      return original.apply(this, arguments);
    };
  };

  const wrapXHR = (proto) => {
    const setRequestHeader = proto.setRequestHeader;
    // this[MARK] = {m: method, u: url, tp: a traceparent the page set}.
    wrapMethod(proto, "open", function (method, url) {
      this[MARK] = { m: (method + "").toUpperCase(), u: url };
    });
    wrapMethod(proto, "setRequestHeader", function (name, value) {
      /^traceparent$/i.test(name) && (this[MARK].tp = value);
    });
    wrapMethod(proto, "send", function () {
      const perfStart = perf.now(), opened = this[MARK];
      // tagRequest() asks only for the traceparent, and sets with the real setRequestHeader.
      const headers = { get: () => opened.tp, set: (name, value) => setRequestHeader.call(this, name, value) };
      const record = tagRequest(headers, opened.m, opened.u, perfStart);
      // A later open() starts another request: only this one's loadend counts.
      if (record)
        this.addEventListener("loadend", () => this[MARK] == opened && responded(record, (name) => this.getResponseHeader(name), this.status), {
          once: true,
        });
    });
  };

  // -- init and configuration ------------------------------------------------------------

  /** init({gatewayOrigins, beacon = true, syncSamples = 5, flushMs = 5000,
   * traceContext = "auto" | "page" | "snippet", allowedOrigins}). Origins
   * are absolute URLs ("https://gw.example"). allowedOrigins maps a gateway
   * origin to the allow-list it serves (the gateway fills it in when it
   * serves the snippet): a gateway whose list names the page's origin gets
   * our headers from the first request, while the sync burst runs. Calling
   * init again wraps nothing twice: it adds origins and sets the options anew. */
  const init = (options = {}) => {
    safely(() => {
      if (!doc || !globalScope.fetch) return;
      settings = Object.assign({}, options);
      // Wrap once: fetch, XHR, history.pushState, and the listeners.
      if (!pageFetch) {
        pageFetch = globalScope.fetch;
        reanchor();
        // Coming back to a tab is when a stalled clock shows: re-anchor before
        // its first request. Leaving may be the last chance to report, and
        // hidden is the last event Safari and mobile Chrome reliably fire
        // before discarding a page (pagehide may never come).
        doc.addEventListener("visibilitychange", () => (doc.hidden ? flush() : reanchor()));
        addEventListener("pagehide", flush);
        // A single-page app's navigation (history.pushState, back/forward):
        // the same check, so a fresh sync only when the clock jumped.
        addEventListener("popstate", reanchor);
        safely(() =>
          new PerformanceObserver((list) => safely(() => list.getEntries().forEach(matchEntry))).observe({ type: "resource", buffered: true })
        );
        stateOf(location.origin).on = 1; // same-origin: no CORS to ask for
        wrapFetch();
        wrapXHR(XMLHttpRequest.prototype);
        safely(() => wrapMethod(history, "pushState", reanchor));
      }
      for (const gatewayUrl of options.gatewayOrigins || [])
        safely(() => {
          const origin = new URL(gatewayUrl).origin, state = stateOf(origin);
          firstGateway = firstGateway || origin;
          if (allows((options.allowedOrigins || {})[origin], location.origin)) state.on = 1;
          if (!state.b) (state.b = 1), syncBurst(origin, state);
        });
    });
    return api;
  };

  // -- the page API ------------------------------------------------------------------

  // A second copy on the page (two script tags) reuses the first one's API.
  const api =
    globalScope.LatencyGateway ||
    (globalScope.LatencyGateway = {
      init,
      now: clockNow,
      /** An origin's clock (default: the first gateway origin): {best, tok, on}.
       * best is the sample X-Client-Clock now carries ({off, d, at}; null
       * until the sync burst is over), tok the latest token, on whether
       * requests there get our headers. Null for an origin never seen. */
      clock: (origin = firstGateway) => {
        const state = gateways.get(origin);
        return state ? { best: state.y ? best(state.s) : null, tok: state.k || null, on: !!state.on } : null;
      },
      requests: recentResults,
      flush,
    });

  // A classic <script src>: the origin it came from is a gateway.
  if (ownScript)
    safely(() =>
      api.init({
        gatewayOrigins: [ownScript.src, ...(ownScript.dataset.gatewayOrigins || "").split(",")],
        beacon: ownScript.dataset.beacon != "off",
        allowedOrigins: { [new URL(ownScript.src).origin]: SERVED_ALLOW_LIST },
      })
    );
})();
