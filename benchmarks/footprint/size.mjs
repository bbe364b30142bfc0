// Bundle sizes of the OpenTelemetry web SDK, measured the way the snippet is
// (frontend-snippet/scripts/size.mjs): minified, then gzip level 9.
//
// What it is for: the footprint table of `make bench`. Each entries/*.mjs is
// bundled by esbuild for the browser (ES2017, minified, tree-shaken) and the
// result gzipped at level 9. Prints one JSON object: {name: {min, gz}}.
// Not for: shipping a build.
import { readdir } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { gzipSync, constants } from "node:zlib";
import { build } from "esbuild";

const dir = fileURLToPath(new URL("./entries/", import.meta.url));
const out = {};
for (const file of (await readdir(dir)).filter((f) => f.endsWith(".mjs")).sort()) {
  const result = await build({
    entryPoints: [dir + file],
    bundle: true,
    minify: true,
    format: "iife",
    platform: "browser",
    target: "es2017",
    write: false,
    logLevel: "error",
  });
  const code = result.outputFiles[0].contents;
  out[file.replace(/\.mjs$/, "")] = {
    min: code.length,
    gz: gzipSync(code, { level: constants.Z_BEST_COMPRESSION }).length,
  };
}
console.log(JSON.stringify(out));
