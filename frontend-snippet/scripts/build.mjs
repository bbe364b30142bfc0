// The npm package's builds (README, "Add it to your frontend"): dist/snippet.js and dist/snippet.mjs.
//
// What it is for: `npm run build` (and `npm pack`, through prepack) minifies
// snippet.js with terser, as scripts/size.mjs measures it, into
//   dist/snippet.js   the classic script, for <script src> (it initialises
//                     itself from its data-* attributes, as the gateway's copy)
//   dist/snippet.mjs  the ES module: `import { init } from "latency-gateway-snippet"`
// and copies the repository's LICENSE next to them. Not for: what the gateway
// serves (it serves snippet.js as it is, plus its own module footer), nor for
// the size budget (scripts/size.mjs). dist/ is generated: never committed.
import { copyFile, mkdir, readFile, writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { minify } from "terser";

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const pkg = JSON.parse(await readFile(here("../package.json"), "utf8"));
const source = await readFile(here("../snippet.js"), "utf8");
const banner = `/*! ${pkg.name} ${pkg.version} | ${pkg.license} */`;

// Importing the module runs the snippet, which defines the LatencyGateway
// global and, having no currentScript, initialises nothing: init() does.
// No allow-list here (it is per gateway): a cross-origin gateway is enabled
// by its first sync answer.
const moduleFooter = `
const api = globalThis.LatencyGateway;
export const init = (options) => api.init(options);
export default api;
`;

// ecma 2017: the file promises to run as ES2017 (as in scripts/size.mjs).
const options = { ecma: 2017, compress: { passes: 2 }, mangle: true, format: { preamble: banner } };
const classic = await minify(source, options);
const module = await minify(source + moduleFooter, { ...options, module: true });

await mkdir(here("../dist"), { recursive: true });
await writeFile(here("../dist/snippet.js"), classic.code + "\n");
await writeFile(here("../dist/snippet.mjs"), module.code + "\n");
// Apache-2.0 §4(a): a copy of the licence goes with every redistribution.
await copyFile(here("../../LICENSE"), here("../LICENSE"));
console.log(`dist/snippet.js ${Buffer.byteLength(classic.code)} B, dist/snippet.mjs ${Buffer.byteLength(module.code)} B`);
