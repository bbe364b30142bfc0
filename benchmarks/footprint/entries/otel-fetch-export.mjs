// As otel-fetch.mjs, plus what it takes to send the spans somewhere (the
// snippet's counterpart is its sendBeacon report): a BatchSpanProcessor and
// the OTLP/HTTP (JSON) exporter.
import { WebTracerProvider } from "@opentelemetry/sdk-trace-web";
import { BatchSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { registerInstrumentations } from "@opentelemetry/instrumentation";
import { FetchInstrumentation } from "@opentelemetry/instrumentation-fetch";

const provider = new WebTracerProvider({
  spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter({ url: "/v1/traces" }))],
});
provider.register();
registerInstrumentations({ instrumentations: [new FetchInstrumentation()] });
