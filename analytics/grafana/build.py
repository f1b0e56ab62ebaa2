#!/usr/bin/env python3
"""Writes weir-engagement.json, the Grafana dashboard of the analyst kit, from
analytics/queries/*.sql: one table panel per query, with the query's time range and
app replaced by Grafana's (the grafana-clickhouse-datasource plugin's $__fromTime and
$__toTime, and the dashboard's app variable).

Usage: python3 analytics/grafana/build.py   (tests/analytics.rs checks the result)
"""

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
QUERIES = HERE.parent / "queries"
DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": "${datasource}"}
# The kit's literals and what the dashboard runs in their place.
GRAFANA = [
    ("toDateTime('2026-11-01 00:00:00', 'UTC')", "$__fromTime"),
    ("toDateTime('2026-12-01 00:00:00', 'UTC')", "$__toTime"),
    ("'shop'", "${app:sqlstring}"),
]
TITLES = {
    "funnel_dropoff": "Signup funnel: people per step",
    "conversion_over_time": "Signup conversion per day",
    "funnel_by_variant": "Signup funnel by variant (A/B)",
    "retention": "Retention by first day",
    "top_profiles_viewed": "Profiles viewed most",
    "event_volume": "Events per app and day",
}


def description(sql: str) -> str:
    lines = [l[3:] for l in sql.splitlines() if l.startswith("-- ")]
    return " ".join(lines)


def main() -> None:
    panels = []
    for n, name in enumerate(TITLES):
        sql = (QUERIES / f"{name}.sql").read_text()
        raw = sql
        for literal, macro in GRAFANA:
            raw = raw.replace(literal, macro)
        panels.append(
            {
                "id": n + 1,
                "type": "table",
                "title": TITLES[name],
                "description": description(sql),
                "datasource": DATASOURCE,
                "gridPos": {"x": (n % 2) * 12, "y": (n // 2) * 8, "w": 12, "h": 8},
                "targets": [
                    {
                        "refId": "A",
                        "datasource": DATASOURCE,
                        "editorType": "sql",
                        "format": 1,
                        "queryType": "table",
                        "rawSql": raw,
                    }
                ],
            }
        )
    dashboard = {
        "title": "weir: engagement",
        "uid": "weir-engagement",
        "description": "The analyst kit of weir (analytics/queries) on weir's ClickHouse tables",
        "schemaVersion": 39,
        "editable": True,
        "time": {"from": "now-30d", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "ClickHouse",
                    "type": "datasource",
                    "query": "grafana-clickhouse-datasource",
                },
                {
                    "name": "app",
                    "label": "App",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": "SELECT DISTINCT app FROM weir.events ORDER BY app",
                    "refresh": 1,
                },
            ]
        },
        "panels": panels,
    }
    (HERE / "weir-engagement.json").write_text(json.dumps(dashboard, indent=2) + "\n")


if __name__ == "__main__":
    main()
