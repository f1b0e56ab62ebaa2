-- The profiles viewed most: views and distinct viewers per profile
-- (`profile_viewed`, `properties.profile_id`), people looking at their own profile
-- left out. With the demo's route plugin the typed `profile_viewed` table answers the
-- same without JSON (README, "What lands in ClickHouse").
SELECT profile_id, count() AS views, uniqExact(user_id) AS viewers
FROM (
    WITH 'shop' AS the_app,
         toDateTime('2026-11-01 00:00:00', 'UTC') AS since,
         toDateTime('2026-12-01 00:00:00', 'UTC') AS until
    SELECT user_id, visitParamExtractString(properties, 'profile_id') AS profile_id
    FROM weir.events
    WHERE app = the_app AND name = 'profile_viewed'
        AND timestamp >= since AND timestamp < until
)
WHERE profile_id != '' AND profile_id != ifNull(user_id, '')
GROUP BY profile_id
ORDER BY views DESC, profile_id
LIMIT 10
