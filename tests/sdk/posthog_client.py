"""Sends capture, set and alias calls with PostHog's Python SDK (`posthog`), unchanged.

Usage: posthog_client.py HOST PROJECT_API_KEY RUN_ID

Used by tests/sdks.rs: HOST is weir's ingest port (behind a proxy that drops the first
answer, so that the SDK retries). The SDK wants UUIDs as event ids: they are derived
from RUN_ID-posthog-<n> (uuid5) and printed, one line `ids: <uuid> ...`, in the order
sent. Exits 1 if the SDK reported an error.
"""

import sys
import time
import uuid

from posthog import Posthog

host, key, run = sys.argv[1:4]
errors = []
client = Posthog(
    key,
    host=host,
    gzip=True,
    max_retries=5,
    on_error=lambda e, batch: errors.append(repr(e)),
    enable_local_evaluation=False,
)


def uid(n):
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run}-posthog-{n}"))


# First a visitor not yet signed in (anon-2), who signs in as user-1 later (alias).
client.capture("$pageview", distinct_id="anon-2", properties={"run": run, "$current_url": "https://x/"}, uuid=uid(11))
time.sleep(0.01)
for n in range(1, 11):
    client.capture(
        "user signed up",
        distinct_id="user-1",
        properties={"total": n, "run": run},
        uuid=uid(n),
    )
client.set(distinct_id="user-1", properties={"plan": "pro"}, uuid=uid(12))
client.alias(previous_id="anon-2", distinct_id="user-1", uuid=uid(13))
client.flush()
client.shutdown()
if errors:
    sys.exit(f"posthog: {errors}")
print("posthog: sent 13 events")
print("ids: " + " ".join(uid(n) for n in range(1, 14)))
