-- Event volume per app and day (UTC): events, distinct people, and the events weir
-- dead-lettered for the app that day (refused by a schema or a plugin, or by a sink).
SELECT app, day, events, people, dead_letters
FROM (
    WITH toDateTime('2026-11-01 00:00:00', 'UTC') AS since,
         toDateTime('2026-12-01 00:00:00', 'UTC') AS until
    SELECT app, toDate(timestamp, 'UTC') AS day, count() AS events, uniqExact(user_id) AS people
    FROM weir.events
    WHERE timestamp >= since AND timestamp < until
    GROUP BY app, day
) AS e
ANY LEFT JOIN (
    WITH toDateTime('2026-11-01 00:00:00', 'UTC') AS since,
         toDateTime('2026-12-01 00:00:00', 'UTC') AS until
    SELECT app, toDate(failed_at, 'UTC') AS day, count() AS dead_letters
    FROM weir.dead_letters
    WHERE failed_at >= since AND failed_at < until
    GROUP BY app, day
) AS d USING (app, day)
ORDER BY app, day
