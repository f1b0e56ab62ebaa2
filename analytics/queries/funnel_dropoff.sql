-- Signup funnel: how many people completed step 1, 2 and 3 of the signup
-- (`signup_step_completed` with `properties.step`), each step within 24 hours of
-- their step 1 and in order, and the share that went on at each step (drop-off is
-- 100 minus it).
SELECT
    countIf(level >= 1) AS step_1,
    countIf(level >= 2) AS step_2,
    countIf(level >= 3) AS step_3,
    round(step_2 / step_1 * 100, 1) AS step_1_to_2_pct,
    round(step_3 / step_2 * 100, 1) AS step_2_to_3_pct
FROM (
    SELECT user_id, windowFunnel(86400)(timestamp, step = 1, step = 2, step = 3) AS level
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
