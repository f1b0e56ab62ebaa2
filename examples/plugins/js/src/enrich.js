// `enrich`, in JavaScript: the same plugin as plugins/enrich/src/lib.rs, with the same
// outcomes, reasons and output bytes (properties are edited in place, as the Rust SDK
// does: see json-object.js). Pure functions: plugin.js wires them to weir.
//
// For engagement events it
// - drops test traffic (an event whose `properties.<drop_flag>` is `true`);
// - rejects events that need a user (`require_user`) but have no `user_id`;
// - rejects a `profile_viewed` without a string `properties.profile_id`, and marks
//   the others with `self_view` (did the user look at their own profile?);
// - stamps every kept event with `properties.enriched_by = "enrich"`.
//
// Configuration (JSON, from the pipeline), every key optional:
// `{"require_user": ["profile_viewed", "post_liked"], "drop_flag": "is_test"}`.

import { JsonObject } from "./json-object.js";
import { SerdeNumber, parseExact } from "./serde-json-compat.js";

export const DEFAULT_CONFIG = Object.freeze({
  requireUser: Object.freeze(["profile_viewed", "post_liked"]),
  dropFlag: "is_test",
});

const FIELDS = ["require_user", "drop_flag"];

/**
 * Reads the plugin's configuration JSON with the Rust plugin's rules (every key
 * optional, no unknown keys). Returns `{ config }` or `{ error }`, the reason every
 * event is rejected with when the configuration is invalid.
 */
export function loadConfig(text) {
  try {
    return { config: readConfig(text) };
  } catch (e) {
    return { error: `invalid plugin config: ${e.message}` };
  }
}

function readConfig(text) {
  const value = parseExact(text, {
    onDuplicateTopLevelKey: (key) => {
      if (FIELDS.includes(key)) throw new Error(`duplicate field \`${key}\``);
    },
  });
  let requireUser = DEFAULT_CONFIG.requireUser;
  let dropFlag = DEFAULT_CONFIG.dropFlag;
  if (Array.isArray(value)) {
    // serde also accepts a struct as an array of its fields, in order.
    if (value.length > FIELDS.length) throw new Error("trailing characters");
    if (value.length > 0) requireUser = stringList(value[0]);
    if (value.length > 1) dropFlag = string(value[1]);
  } else if (value !== null && typeof value === "object" && !(value instanceof SerdeNumber)) {
    for (const key of Object.keys(value)) {
      if (!FIELDS.includes(key)) throw new Error(`unknown field \`${key}\`, expected \`require_user\` or \`drop_flag\``);
    }
    if (Object.hasOwn(value, "require_user")) requireUser = stringList(value.require_user);
    if (Object.hasOwn(value, "drop_flag")) dropFlag = string(value.drop_flag);
  } else {
    throw new Error(`invalid type: ${describe(value)}, expected struct Config`);
  }
  return { requireUser, dropFlag };
}

function stringList(value) {
  if (!Array.isArray(value)) throw new Error(`invalid type: ${describe(value)}, expected a sequence`);
  return value.map((item) => string(item));
}

function string(value) {
  if (typeof value !== "string") throw new Error(`invalid type: ${describe(value)}, expected a string`);
  return value;
}

// As serde describes an unexpected value.
function describe(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "sequence";
  if (value instanceof SerdeNumber) return `${/[.eE]/.test(value.text) ? "floating point" : "integer"} \`${value.text}\``;
  if (typeof value === "object") return "map";
  if (typeof value === "string") return `string ${JSON.stringify(value)}`;
  return `boolean \`${value}\``;
}

/**
 * Decides one event. `event` is the WIT record as componentize-qjs passes it
 * (camelCase fields, `userId` null when absent); returns the WIT outcome variant.
 * `counterAdd(name, delta)` is the host's counter import.
 */
export function enrich(event, config, counterAdd) {
  const properties = new JsonObject(event.properties);
  if (properties.get(config.dropFlag) === true) {
    counterAdd("dropped_test_traffic", 1);
    return { tag: "drop", val: "test traffic" };
  }
  if (event.userId == null && config.requireUser.includes(event.name)) {
    return { tag: "reject", val: `${event.name} requires a user_id` };
  }
  if (event.name === "profile_viewed") {
    const profile = properties.get("profile_id");
    if (typeof profile !== "string") {
      return { tag: "reject", val: "profile_viewed needs a string properties.profile_id" };
    }
    properties.set("self_view", event.userId === profile);
  }
  properties.set("enriched_by", "enrich");
  return { tag: "keep", val: { ...event, properties: properties.text } };
}
