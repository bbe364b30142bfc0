// Size budget of snippet.js: ≤ 3 KB minified + gzipped (README, "Add it to your frontend").
//
// What it is for: measuring the file as a page would get it from a
// minifying CDN or build, terser then gzip level 9, and failing (exit 1)
// over budget. Not for: producing a build; the gateway serves snippet.js as is.
//
//   node scripts/size.mjs [--max BYTES]     (default 3072)
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { gzipSync, constants } from "node:zlib";
import { minify } from "terser";

const file = fileURLToPath(new URL("../snippet.js", import.meta.url));
const i = process.argv.indexOf("--max");
const max = i > 0 ? Number(process.argv[i + 1]) : 3072;
if (!Number.isInteger(max) || max <= 0) {
  console.error("size.mjs: --max must be a whole number of bytes, e.g. --max 3072");
  process.exit(2);
}

const source = await readFile(file, "utf8");
// ecma 2017: the file promises to run as ES2017, so terser must not emit
// newer syntax (e.g. optional catch binding) to save bytes.
const { code } = await minify(source, { ecma: 2017, compress: { passes: 2 }, mangle: true });
const gz = gzipSync(code, { level: constants.Z_BEST_COMPRESSION }).length;
const raw = Buffer.byteLength(source), min = Buffer.byteLength(code);
console.log(`snippet.js: ${raw} B raw, ${min} B minified, ${gz} B minified+gzip`);
if (gz > max) {
  console.error(`snippet.js is ${gz - max} B over the ${max} B budget (minified+gzip): make it smaller`);
  process.exit(1);
}
