"use strict";
// The snippet's pure helpers, for node --test.
//
// The shipped file exports nothing (every byte counts against its size
// budget), so this runs it in this realm with one line added at the end of
// its closure: the tests reach the very functions a browser runs. Loading it
// also defines globalThis.LatencyGateway, as a plain <script> would.
const fs = require("node:fs");
const path = require("node:path");
const vm = require("node:vm");

const FILE = path.join(__dirname, "..", "snippet.js");
const NAMES = [
  "hex", "traceparent", "timestampHeader", "clockHeader", "prevHeader", "sample", "addSample", "best",
  "parseServerTiming", "parseGatewayClock", "target", "take", "allows",
];
const END = /\}\)\(\);\s*$/;

// Under Stryker (make mutate) the closure's body is wrapped in one more block,
// `{ if (stryMutAct_9fa48("0")) {} else { … } }`: the exports go inside it.
const INSTRUMENTED_END = /\}\s*\}\)\(\);\s*$/;

const source = fs.readFileSync(FILE, "utf8");
if (!END.test(source)) throw new Error("snippet.js must end with the end of its closure, })();");
const exportsLine = `module.exports = { ${NAMES.join(", ")} };\n`;
const withExports = source.includes("stryMutAct_9fa48(")
  ? source.replace(INSTRUMENTED_END, `${exportsLine}}\n})();\n`)
  : source.replace(END, `${exportsLine}})();\n`);
const helpers = { exports: {} };
vm.runInThisContext(`(function (module) {${withExports}})`, { filename: FILE })(helpers);
module.exports = helpers.exports;
