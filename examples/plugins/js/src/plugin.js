// The component's entry point: the `plugin` world of wit/plugin.wit (weir:plugin@0.1.0).
// componentize-qjs maps the WIT names to JavaScript: the import `host` is the module
// "weir:plugin/host@0.1.0" (log, config, counterAdd), the export `process` is the
// function of that name, records have camelCase fields and variants are `{ tag, val }`.

import host from "weir:plugin/host@0.1.0";
import { enrich, loadConfig } from "./enrich.js";

// Read once per instance, at the first batch (host imports are not callable while the
// component is being built). Constant for the instance's life, like the Rust SDK's.
let loaded;

export function process(events) {
  loaded ??= loadConfig(host.config());
  const { config, error } = loaded;
  if (error !== undefined) return events.map(() => ({ tag: "reject", val: error }));
  const counterAdd = (name, delta) => host.counterAdd(name, delta);
  return events.map((event) => enrich(event, config, counterAdd));
}
