// Types of latency-gateway-snippet (README, "Add it to your frontend"), written by hand.
//
// What it is for: the ES module's init() and default export, the
// LatencyGateway global a classic <script> defines, and the detail of the
// "latency-gateway" event on window. Not for: the internals of snippet.js
// (its per-origin and per-request records are private and may change).

/** Options of init(). Every one is optional. */
export interface InitOptions {
  /** Gateway origins, as absolute URLs ("https://gw.example"): each gets a
   * clock-sync burst, and its requests get the headers once it answers with
   * CORS. The page's own origin is always enabled. */
  gatewayOrigins?: readonly string[];
  /** Report each matched Resource Timing entry to the gateway's
   * /__gateway/beacon. Default true. */
  beacon?: boolean;
  /** Requests in each gateway's start-up sync burst. Default 5. */
  syncSamples?: number;
  /** How long beacon entries wait before they are sent, in ms (sent at once
   * from the 20th, and when the page is hidden). Default 5000. */
  flushMs?: number;
  /** Who writes `traceparent`: "snippet" (always the snippet), "page" (a page
   * SDK; the snippet adds only its X-Client-* headers) or "auto" (the
   * default: "page" once an OpenTelemetry tracer provider is registered). */
  traceContext?: "auto" | "page" | "snippet";
  /** Gateway origin → the allow-list pattern that gateway serves (a
   * JavaScript regular expression source, or null). A gateway whose pattern
   * matches the page's origin gets the headers from the first request. The
   * gateway's /__gateway/snippet.mjs fills this in for itself. */
  allowedOrigins?: Readonly<Record<string, string | null>>;
}

/** One NTP-style clock sample against a gateway, in ms on the snippet's clock. */
export interface ClockSample {
  /** Gateway clock − snippet clock. */
  off: number;
  /** Round-trip delay less the gateway's own time. */
  d: number;
  /** When the sample was taken (epoch ms on the snippet's clock). */
  at: number;
}

/** LatencyGateway.clock(): the state of one origin's clock. */
export interface ClockState {
  /** The sample X-Client-Clock carries now; null until the sync burst is over. */
  best: ClockSample | null;
  /** The latest clock token the gateway signed, or null. */
  tok: string | null;
  /** Whether requests to this origin get the snippet's headers. */
  on: boolean;
}

/** The detail of a "latency-gateway" event, and an entry of
 * LatencyGateway.requests. The event fires twice per request: when the
 * response arrives (rtt and pre still null) and when its Resource Timing
 * entry is matched. */
export interface LatencyGatewayDetail {
  /** Trace and span id of the request's traceparent (the page's own when it set one).
   * The snippet's own traceparent has flags 03 (sampled), or, when it was
   * loaded from a gateway as /__gateway/snippet.js?sampled=gateway (or
   * .mjs?sampled=gateway) and that gateway samples by trace-id ratio, 03 or
   * 02 as the gateway will decide for this trace id (README, "The sampled
   * flag, as the gateway will decide it"). */
  traceId: string;
  spanId: string;
  /** The absolute URL and the method, upper case. */
  url: string;
  method: string;
  /** The HTTP status; 0 for a network error seen by XMLHttpRequest. */
  status?: number;
  /** Server-Timing "gw": the gateway's own time for this request, in ms. */
  gw: number | null;
  /** Server-Timing "uplink": the measured uplink latency in ms, and its verdict. */
  uplink: number | null;
  verdict: string | null;
  /** The clock-free round trip (the browser's wait less gw) and the time
   * before the request started (queueing, DNS, connect), in ms; null until
   * matched, and without Timing-Allow-Origin. */
  rtt: number | null;
  pre: number | null;
}

/** The page API: the LatencyGateway global, and the module's default export. */
export interface LatencyGatewayApi {
  /** Set up (wraps fetch and XMLHttpRequest once), or add origins and set the
   * options anew. Returns the API. */
  init(options?: InitOptions): LatencyGatewayApi;
  /** The snippet's clock C: epoch ms that do not step with the system clock. */
  now(): number;
  /** An origin's clock (default: the first gateway origin); null for an
   * origin never seen. */
  clock(origin?: string): ClockState | null;
  /** The last 50 request results, newest last. */
  readonly requests: readonly LatencyGatewayDetail[];
  /** Send the queued beacon entries now. */
  flush(): void;
}

/** init() of the ES module build: the same as LatencyGateway.init. */
export declare const init: (options?: InitOptions) => LatencyGatewayApi;
declare const api: LatencyGatewayApi;
export default api;

declare global {
  /** Defined by the snippet, loaded as a classic script or a module. */
  var LatencyGateway: LatencyGatewayApi;
  interface WindowEventMap {
    "latency-gateway": CustomEvent<LatencyGatewayDetail>;
  }
}
