-- An A/B comparison of the signup funnel: the same funnel as funnel_dropoff.sql per
-- variant of the experiment (`properties.variant` of each person's step 1), and the
-- share of each variant's starters that completed it.
SELECT
    variant,
    countIf(level >= 1) AS step_1,
    countIf(level >= 2) AS step_2,
    countIf(level >= 3) AS step_3,
    round(step_3 / step_1 * 100, 1) AS completed_pct
FROM (
    SELECT
        user_id,
        anyIf(variant, step = 1) AS variant,
        windowFunnel(86400)(timestamp, step = 1, step = 2, step = 3) AS level
    FROM (
        WITH 'shop' AS the_app,
             toDateTime('2026-11-01 00:00:00', 'UTC') AS since,
             toDateTime('2026-12-01 00:00:00', 'UTC') AS until
        SELECT user_id, timestamp,
               visitParamExtractInt(properties, 'step') AS step,
               visitParamExtractString(properties, 'variant') AS variant
        FROM weir.events
        WHERE app = the_app AND name = 'signup_step_completed'
            AND timestamp >= since AND timestamp < until AND isNotNull(user_id)
    )
    GROUP BY user_id
)
WHERE level >= 1
GROUP BY variant
ORDER BY variant
