// The least a page needs to trace its fetch() calls with the OpenTelemetry
// web SDK: a WebTracerProvider (its default StackContextManager) and the
// fetch instrumentation. It records spans but sends them nowhere.
import { WebTracerProvider } from "@opentelemetry/sdk-trace-web";
import { registerInstrumentations } from "@opentelemetry/instrumentation";
import { FetchInstrumentation } from "@opentelemetry/instrumentation-fetch";

const provider = new WebTracerProvider();
provider.register();
registerInstrumentations({ instrumentations: [new FetchInstrumentation()] });
