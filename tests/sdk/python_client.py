"""Sends screen, identify, track, page and alias calls with a real tracking SDK, unchanged.

Usage: python_client.py segment|rudder HOST WRITE_KEY RUN_ID

Used by tests/sdks.rs: HOST is weir's ingest port (perhaps behind a proxy that drops
answers, so that the SDK retries). Message ids are RUN_ID-<sdk>-<n>, so the test knows
every event it must find once. Exits 1 if the SDK reported an error.
"""

import sys
import time

sdk, host, write_key, run = sys.argv[1:5]
if sdk == "segment":
    from segment.analytics import Client
elif sdk == "rudder":
    from rudderstack.analytics import Client
else:
    sys.exit(f"unknown sdk {sdk!r}")

errors = []
client = Client(
    write_key,
    host=host,
    gzip=True,
    max_retries=5,
    on_error=lambda e, batch: errors.append(repr(e)),
)
prefix = f"{run}-{sdk}"
# First a visitor not yet signed in (anon-2), who signs in as user-1 later (alias).
client.screen(name="Feed", properties={}, anonymous_id="anon-2", message_id=f"{prefix}-13")
time.sleep(0.01)
client.identify("user-1", {"plan": "pro"}, anonymous_id="anon-1", message_id=f"{prefix}-1")
for n in range(2, 12):
    client.track(
        "user-1",
        "Order Completed",
        {"total": n, "currency": "EUR"},
        message_id=f"{prefix}-{n}",
    )
client.page("user-1", "Docs", "Home", {"path": "/"}, message_id=f"{prefix}-12")
client.alias("anon-2", "user-1", message_id=f"{prefix}-14")
client.flush()
client.join()
if errors:
    sys.exit(f"{sdk}: {errors}")
print(f"{sdk}: sent 14 messages")
