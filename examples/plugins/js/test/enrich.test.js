// Unit tests of the plugin's logic, run natively by node: `npm test`.
import assert from "node:assert/strict";
import { test } from "node:test";

import { DEFAULT_CONFIG, enrich, loadConfig } from "../src/enrich.js";
import { JsonObject } from "../src/json-object.js";
import { parseExact } from "../src/serde-json-compat.js";

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
    val: { ...event("app_opened"), properties: '{"b":2,"a":1,"enriched_by":"enrich"}' },
  });
});

test("profile views need a user and a profile", () => {
  assert.deepEqual(run(event("profile_viewed")).outcome, { tag: "reject", val: "profile_viewed requires a user_id" });
  assert.deepEqual(run(event("post_liked")).outcome, { tag: "reject", val: "post_liked requires a user_id" });
  const noProfile = event("profile_viewed", { userId: "u1", properties: '{"profile_id":7}' });
  assert.deepEqual(run(noProfile).outcome, { tag: "reject", val: "profile_viewed needs a string properties.profile_id" });
  const own = event("profile_viewed", { userId: "u1", properties: '{"profile_id":"u1"}' });
  assert.equal(run(own).outcome.val.properties, '{"profile_id":"u1","self_view":true,"enriched_by":"enrich"}');
  const other = event("profile_viewed", { userId: "u1", properties: '{"profile_id":"u2"}' });
  assert.equal(run(other).outcome.val.properties, '{"profile_id":"u2","self_view":false,"enriched_by":"enrich"}');
});

test("drops test traffic and counts it", () => {
  const { outcome, counters } = run(event("app_opened", { properties: '{"is_test": true}' }));
  assert.deepEqual(outcome, { tag: "drop", val: "test traffic" });
  assert.deepEqual(counters, { dropped_test_traffic: 1 });
  assert.equal(run(event("app_opened", { properties: '{"is_test":"true"}' })).outcome.tag, "keep");
});

test("properties that are not a JSON object read as {} and are replaced by one", () => {
  for (const text of ["", "[]", "null", '{"a":1,}', '{"a" 1}', '{"a":1', "{} x"]) {
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

test("properties are edited in place, as the Rust SDK does", () => {
  // The same cases as sdk-guest/src/lib.rs's tests.
  const o = new JsonObject('{ "n": 18446744073709551616, "f": 1.0, "s": "a}\\"b", "o": {"x": [1, "]"]}, "t": false }');
  assert.equal(o.get("t"), false);
  assert.deepEqual(o.get("o"), { x: [1, "]"] });
  assert.equal(o.get("s"), 'a}"b');
  o.set("t", "yes");
  o.set("added", { k: [true] });
  o.set("f", 2);
  assert.equal(o.get("added").k[0], true);
  assert.equal(o.text, '{ "n": 18446744073709551616, "f": 2, "s": "a}\\"b", "o": {"x": [1, "]"]}, "t": "yes","added":{"k":[true]} }');

  const dup = new JsonObject('{"a":1,"\\u0061":2,"b\\"":3}');
  assert.equal(dup.get("a"), 2);
  assert.equal(dup.get('b"'), 3);
  dup.set("a", 9);
  dup.set('q"', 1);
  assert.equal(dup.text, '{"a":1,"\\u0061":9,"b\\"":3,"q\\"":1}');

  const empty = new JsonObject(" { } ");
  empty.set("k", 1);
  assert.equal(empty.text, ' { "k":1} ');
});

test("the configuration is read as serde_json reads it", () => {
  assert.equal(parseExact('{"a":[1.0,-0,2e20,1E-7,18446744073709551616]}').a.map((n) => n.text).join(" "), "1.0 -0.0 2e+20 1e-7 1.8446744073709552e+19");
  assert.throws(() => parseExact(`${"[".repeat(128)}${"]".repeat(128)}`));
  assert.doesNotThrow(() => parseExact(`${"[".repeat(127)}${"]".repeat(127)}`));
});
