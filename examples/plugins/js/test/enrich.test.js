// Unit tests of the plugin's logic, run natively by node: `npm test`.
import assert from "node:assert/strict";
import { test } from "node:test";

import { DEFAULT_CONFIG, enrich, loadConfig } from "../src/enrich.js";
import { parseObject, stringify } from "../src/serde-json-compat.js";

function event(name, { userId = null, properties = "{}" } = {}) {
  return { eventId: "e1", app: "demo", name, userId, timestampMs: 1700000000000, properties, context: '{"x":  1}' };
}

function run(e, config = DEFAULT_CONFIG) {
  const counters = {};
  const outcome = enrich(e, config, (name, delta) => (counters[name] = (counters[name] ?? 0) + delta));
  return { outcome, counters };
}

test("stamps kept events, leaves the rest of the event alone", () => {
  const { outcome } = run(event("app_opened", { properties: '{"b":2,"a":1}' }));
  assert.deepEqual(outcome, {
    tag: "keep",
    val: { ...event("app_opened"), properties: '{"a":1,"b":2,"enriched_by":"enrich"}' },
  });
});

test("profile views need a user and a profile", () => {
  assert.deepEqual(run(event("profile_viewed")).outcome, { tag: "reject", val: "profile_viewed requires a user_id" });
  assert.deepEqual(run(event("post_liked")).outcome, { tag: "reject", val: "post_liked requires a user_id" });
  const noProfile = event("profile_viewed", { userId: "u1", properties: '{"profile_id":7}' });
  assert.deepEqual(run(noProfile).outcome, { tag: "reject", val: "profile_viewed needs a string properties.profile_id" });
  const own = event("profile_viewed", { userId: "u1", properties: '{"profile_id":"u1"}' });
  assert.equal(run(own).outcome.val.properties, '{"enriched_by":"enrich","profile_id":"u1","self_view":true}');
  const other = event("profile_viewed", { userId: "u1", properties: '{"profile_id":"u2"}' });
  assert.equal(run(other).outcome.val.properties, '{"enriched_by":"enrich","profile_id":"u2","self_view":false}');
});

test("drops test traffic and counts it", () => {
  const { outcome, counters } = run(event("app_opened", { properties: '{"is_test": true}' }));
  assert.deepEqual(outcome, { tag: "drop", val: "test traffic" });
  assert.deepEqual(counters, { dropped_test_traffic: 1 });
  assert.equal(run(event("app_opened", { properties: '{"is_test":"true"}' })).outcome.tag, "keep");
});

test("properties that are not a JSON object read as {}", () => {
  // The last one: serde_json fails on the lone surrogate even though a repeated key
  // replaces the string that holds it.
  const texts = ["", "[]", "null", '{"a":1,}', '{"a":NaN}', '{"a":1e400}', '{"a":"\\ud800"}', '{"x":{"\\ud8000":1},"x":2}'];
  for (const text of texts) {
    assert.equal(run(event("app_opened", { properties: text })).outcome.val.properties, '{"enriched_by":"enrich"}', text);
  }
});

test("configuration: defaults, custom values, invalid text", () => {
  assert.deepEqual(loadConfig("{}").config, { requireUser: ["profile_viewed", "post_liked"], dropFlag: "is_test" });
  const { config } = loadConfig('{"require_user":["app_opened"],"drop_flag":"qa"}');
  assert.deepEqual(config, { requireUser: ["app_opened"], dropFlag: "qa" });
  assert.equal(run(event("app_opened"), config).outcome.val, "app_opened requires a user_id");
  assert.equal(run(event("x", { properties: '{"qa":true}' }), config).outcome.tag, "drop");
  for (const text of ["", "null", '{"drop_flag":1}', '{"other":1}', '{"drop_flag":"a","drop_flag":"b"}', '{"require_user":"x"}']) {
    assert.match(loadConfig(text).error, /^invalid plugin config: /, text);
  }
});

test("JSON is read and written as serde_json does", () => {
  const cases = [
    ['{"b":1,"a":{"d":[1.0,-0,2e20],"c":1E-7}}', '{"a":{"c":1e-7,"d":[1.0,-0.0,2e+20]},"b":1}'],
    ['{"x":0.00001,"y":1e15,"z":1e16}', '{"x":0.00001,"y":1000000000000000.0,"z":1e+16}'],
    ['{"big":18446744073709551615,"bigger":18446744073709551616,"neg":-9223372036854775809}',
      '{"big":18446744073709551615,"bigger":1.8446744073709552e+19,"neg":-9.223372036854776e+18}'],
    // Code point order, not UTF-16 order: U+E000 sorts before U+1F600.
    ['{"s":"\\u00e9\\ud83d\\ude00\\/\\u0001\\n","\\ud83d\\ude00":2,"\\uE000":1}', '{"s":"é😀/\\u0001\\n","\uE000":1,"😀":2}'],
  ];
  for (const [input, output] of cases) assert.equal(stringify(parseObject(input)), output, input);
  assert.throws(() => parseObject(`{"a":${"[".repeat(127)}${"]".repeat(127)}}`));
  assert.doesNotThrow(() => parseObject(`{"a":${"[".repeat(126)}${"]".repeat(126)}}`));
});
