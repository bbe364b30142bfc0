"use strict";
// A stale answer is one whose token names another request's timestamp: only
// the whole-millisecond rounding of TS (at most 1 ms) is forgiven. Gaps of
// 2 ms and 900 ms are as stale as one of seconds (a CDN copy of a response
// to a request sent a moment earlier).
const test = require("node:test");
const assert = require("node:assert/strict");

const S = require("./helpers.js");

const answer = (ts) => ({ t1: 5010, t2: 5012, tok: `5012.5010.${ts}.9.2.bm9uY2U.bWFj` });

for (const [gap, fresh] of [[0, true], [0.6, true], [1, true], [2, false], [-2, false], [900, false], [-900, false]]) {
  test(`an answer whose token TS is ${gap} ms from our timestamp is ${fresh ? "ours" : "stale"}`, () => {
    const origin = { s: [] };
    const sent = 5000;
    assert.equal(S.take(origin, answer(sent + gap), sent, sent + 22, sent), fresh);
    assert.equal(origin.s.length, fresh ? 1 : 0, "a stale answer gives no sample");
    assert.equal(origin.k, fresh ? answer(sent + gap).tok : undefined, "nor its token");
  });
}
