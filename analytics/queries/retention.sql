-- Retention by cohort: people grouped by the day (UTC) of their first event in the
-- range, and how many of them were active again (any event) one day and seven days
-- later.
SELECT
    first_day AS cohort,
    count() AS people,
    countIf(has(days, first_day + 1)) AS day_1,
    countIf(has(days, first_day + 7)) AS day_7,
    round(day_1 / people * 100, 1) AS day_1_pct,
    round(day_7 / people * 100, 1) AS day_7_pct
FROM (
    SELECT user_id, min(day) AS first_day, groupUniqArray(day) AS days
    FROM (
        WITH 'shop' AS the_app,
             toDateTime('2026-11-01 00:00:00', 'UTC') AS since,
             toDateTime('2026-12-01 00:00:00', 'UTC') AS until
        SELECT user_id, toDate(timestamp, 'UTC') AS day
        FROM weir.events
        WHERE app = the_app AND timestamp >= since AND timestamp < until
            AND isNotNull(user_id)
    )
    GROUP BY user_id
)
GROUP BY cohort
ORDER BY cohort
