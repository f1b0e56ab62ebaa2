// Sends screen, identify, track, page and alias calls with @segment/analytics-node, unchanged.
//
// Usage: node node_client.mjs HOST WRITE_KEY RUN_ID   (from a directory where the
// package is installed: NODE_PATH is not read by ES modules, so tests/sdks.rs copies
// this file there). Message ids are RUN_ID-node-<n>. Exits 1 on an SDK error.
import { Analytics } from "@segment/analytics-node";

const [host, writeKey, run] = process.argv.slice(2);
const analytics = new Analytics({ writeKey, host, flushAt: 5, maxRetries: 5 });
const errors = [];
analytics.on("error", (e) => errors.push(String(e?.reason ?? e?.message ?? e)));
const prefix = `${run}-node`;
// First a visitor not yet signed in (anon-2), who signs in as user-1 later (alias).
analytics.screen({ anonymousId: "anon-2", name: "Feed", properties: {}, messageId: `${prefix}-13` });
await new Promise((resolve) => setTimeout(resolve, 10));
analytics.identify({ userId: "user-1", anonymousId: "anon-1", traits: { plan: "pro" }, messageId: `${prefix}-1` });
for (let n = 2; n < 12; n++) {
  analytics.track({
    userId: "user-1",
    event: "Order Completed",
    properties: { total: n, currency: "EUR" },
    messageId: `${prefix}-${n}`,
  });
}
analytics.page({ userId: "user-1", category: "Docs", name: "Home", properties: { path: "/" }, messageId: `${prefix}-12` });
analytics.alias({ previousId: "anon-2", userId: "user-1", messageId: `${prefix}-14` });
await analytics.closeAndFlush({ timeout: 30000 });
if (errors.length) {
  console.error(`node: ${errors.join("; ")}`);
  process.exit(1);
}
console.log("node: sent 14 messages");
