// The OpenTelemetry web SDK as its getting-started guide sets it up: a
// WebTracerProvider with the zone context manager and fetch instrumentation.
import { ZoneContextManager } from "@opentelemetry/context-zone";
import { registerInstrumentations } from "@opentelemetry/instrumentation";
import { FetchInstrumentation } from "@opentelemetry/instrumentation-fetch";
import { WebTracerProvider } from "@opentelemetry/sdk-trace-web";
import { fetchConfig, processor } from "./collect.js";

window.startPageSdk = (gatewayOrigin) => {
  const provider = new WebTracerProvider({ spanProcessors: [processor] });
  provider.register({ contextManager: new ZoneContextManager() });
  registerInstrumentations({ instrumentations: [new FetchInstrumentation(fetchConfig(gatewayOrigin))] });
};
