-- Step-to-step conversion over time: per day (UTC) on which people completed signup
-- step 1, how many started, how many reached step 2 and step 3 within 24 hours, and
-- the share that completed the signup.
SELECT
    toDate(started_at, 'UTC') AS day,
    count() AS started,
    countIf(level >= 2) AS reached_step_2,
    countIf(level >= 3) AS completed,
    round(completed / started * 100, 1) AS completed_pct
FROM (
    SELECT
        user_id,
        minIf(timestamp, step = 1) AS started_at,
        windowFunnel(86400)(timestamp, step = 1, step = 2, step = 3) AS level
    FROM (
        WITH 'shop' AS the_app,
             toDateTime('2026-11-01 00:00:00', 'UTC') AS since,
             toDateTime('2026-12-01 00:00:00', 'UTC') AS until
        SELECT user_id, timestamp, visitParamExtractInt(properties, 'step') AS step
        FROM weir.events
        WHERE app = the_app AND name = 'signup_step_completed'
            AND timestamp >= since AND timestamp < until AND isNotNull(user_id)
    )
    GROUP BY user_id
)
WHERE level >= 1
GROUP BY day
ORDER BY day
