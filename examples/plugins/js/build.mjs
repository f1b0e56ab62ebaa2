// Builds the plugin into a WebAssembly component of weir's `plugin` world.
// Usage: node build.mjs [OUTPUT]   (default: dist/js_enrich.wasm)
//
// componentize-qjs embeds QuickJS and snapshots the initialised module (Wizer).
// `sync`: weir's host does not enable the component-model async ABI, which the
// default runtime of componentize-qjs needs. Not `optSize`: its QuickJS build makes a
// 1.2 MB component instead of 1.7 MB, but runs this plugin about 1.7 times slower.
import { mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { componentize } from "componentize-qjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const entry = path.join(here, "src", "plugin.js");
const output = path.resolve(process.argv[2] ?? path.join(here, "dist", "js_enrich.wasm"));

const started = performance.now();
const { component } = await componentize({
  witPath: path.join(here, "..", "..", "..", "wit"),
  world: "plugin",
  jsSource: await readFile(entry, "utf8"),
  jsPath: entry,
  moduleRoot: path.join(here, "src"),
  sync: true,
});
await mkdir(path.dirname(output), { recursive: true });
await writeFile(output, component);
const seconds = ((performance.now() - started) / 1000).toFixed(1);
console.log(`${output}: ${component.length} bytes in ${seconds} s`);
