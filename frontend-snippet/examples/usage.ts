// A typed use of latency-gateway-snippet: checked with `tsc --noEmit -p examples`
// (npm run typecheck; tests/test_snippet_package.py runs it). Not for running.
import LatencyGateway, { init, type LatencyGatewayDetail } from "latency-gateway-snippet";

const api = init({
  gatewayOrigins: ["https://gw.example"],
  beacon: true,
  syncSamples: 5,
  flushMs: 5000,
  traceContext: "auto",
});

// The event's detail is typed through WindowEventMap.
window.addEventListener("latency-gateway", (event) => {
  const detail: LatencyGatewayDetail = event.detail;
  if (detail.uplink !== null) console.log(`${detail.method} ${detail.url}: uplink ${detail.uplink.toFixed(1)} ms (${detail.verdict})`);
});

const clock = api.clock("https://gw.example");
const offsetMs: number | undefined = clock?.best?.off;
const nowMs: number = LatencyGateway.now();
// The same API as the global a classic <script> defines.
const sameApi: typeof api = globalThis.LatencyGateway;
sameApi.flush();
console.log(offsetMs, nowMs, api.requests.length);
