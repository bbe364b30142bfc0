// Honeycomb's web instrumentation as its README sets it up: HoneycombWebSDK
// with the web auto-instrumentations; here its Honeycomb exporters are off
// (a closed network) and spans are collected in the page instead.
import { HoneycombWebSDK } from "@honeycombio/opentelemetry-web";
import { getWebAutoInstrumentations } from "@opentelemetry/auto-instrumentations-web";
import { fetchConfig, processor } from "./collect.js";

window.startPageSdk = (gatewayOrigin) => {
  new HoneycombWebSDK({
    serviceName: "coexistence-page",
    skipOptionsValidation: true,
    disableDefaultTraceExporter: true,
    disableDefaultMetricExporter: true,
    disableDefaultLogExporter: true,
    spanProcessors: [processor],
    instrumentations: [
      getWebAutoInstrumentations({
        "@opentelemetry/instrumentation-fetch": fetchConfig(gatewayOrigin),
        "@opentelemetry/instrumentation-xml-http-request": { enabled: false },
        "@opentelemetry/instrumentation-document-load": { enabled: false },
        "@opentelemetry/instrumentation-user-interaction": { enabled: false },
      }),
    ],
  }).start();
};
