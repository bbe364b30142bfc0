// The page SDK's finished spans, as plain objects the test reads with
// page.evaluate: what its exporter would send, without a network hop.
import { InMemorySpanExporter, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";

export const exporter = new InMemorySpanExporter();
export const processor = new SimpleSpanProcessor(exporter);

window.pageSpans = () =>
  exporter.getFinishedSpans().map((span) => ({
    name: span.name,
    kind: span.kind,
    traceId: span.spanContext().traceId,
    spanId: span.spanContext().spanId,
    parentSpanId: span.parentSpanContext ? span.parentSpanContext.spanId : null,
    url: span.attributes["http.url"] || span.attributes["url.full"] || null,
  }));

/** Trace context for the gateway's origin too: fetch instrumentation sends it
 * same-origin only unless told (propagateTraceHeaderCorsUrls). */
export const fetchConfig = (gatewayOrigin) => ({
  propagateTraceHeaderCorsUrls: [new RegExp("^" + gatewayOrigin.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&") + "/")],
});
