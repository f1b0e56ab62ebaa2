//! The ingest endpoint against a real broker: bad input is refused with its documented
//! status and JSON error and never reaches Kafka; a broker outage answers 503 promptly
//! and ingest accepts again once the broker is back.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};
use weir_tests::{Tansu, WRITE_KEY, Weir};

const TOPIC: &str = "weir.events";

fn ingest_only_config(tansu: &Tansu, produce_timeout_ms: u64) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
[[app]]
name = "test"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
topic = "{TOPIC}"
produce_timeout_ms = {produce_timeout_ms}
[processor]
enabled = false
"#,
        tansu.bootstrap()
    )
}

struct Resp {
    status: u16,
    body: Value,
    retry_after: Option<String>,
}

async fn post(url: &str, key: Option<&str>, content_type: Option<&str>, body: Vec<u8>) -> Resp {
    let client = reqwest::Client::new();
    let mut req = client.post(url).body(body);
    if let Some(key) = key {
        req = req.header("Authorization", format!("Bearer {key}"));
    }
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    let resp = req.send().await.expect("ingest answers");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {text:?}"));
    Resp {
        status,
        body,
        retry_after,
    }
}

/// The payloads of the events topic, from the start.
async fn read_topic(bootstrap: &str) -> Result<Vec<Vec<u8>>> {
    let records = weir_tests::read_topic(bootstrap, TOPIC).await?;
    Ok(records.into_iter().map(|(_, payload)| payload).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_its_documented_error_and_never_reaches_kafka() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic(TOPIC, 2)?;
    let weir = Weir::start(&ingest_only_config(&tansu, 5000))?;
    let url = weir.events_url();
    let json = Some("application/json");
    let key = Some(WRITE_KEY);

    let deep = format!(
        r#"{{"name":"a","properties":{}1{}}}"#,
        "[".repeat(40),
        "]".repeat(40)
    );
    let big_event = format!(
        r#"{{"name":"a","properties":{{"s":"{}"}}}}"#,
        "x".repeat(40 * 1024)
    );
    let big_body = format!(
        "[{}]",
        vec![
            format!(
                r#"{{"name":"a","properties":{{"s":"{}"}}}}"#,
                "y".repeat(20_000)
            );
            60
        ]
        .join(",")
    );
    // (what, key, content type, body, status, code, field, index)
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        Vec<u8>,
        u16,
        &'a str,
        Option<&'a str>,
        Option<u64>,
    );
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            key,
            json,
            br#"{"name": "a",,}"#.to_vec(),
            400,
            "malformed_json",
            None,
            None,
        ),
        (
            "invalid UTF-8",
            key,
            json,
            b"{\"name\":\"caf\xe9\"}".to_vec(),
            400,
            "invalid_utf8",
            None,
            None,
        ),
        (
            "a key twice in properties (a schema would see the last copy, ClickHouse the first)",
            key,
            json,
            br#"[{"name":"ok"},{"name":"a","properties":{"plan":"free","plan":"pro"}}]"#.to_vec(),
            400,
            "duplicate_key",
            Some("properties"),
            Some(1),
        ),
        (
            "a number beyond a double",
            key,
            json,
            br#"{"name":"a","context":{"n":1e400}}"#.to_vec(),
            400,
            "invalid_field",
            Some("context"),
            Some(0),
        ),
        (
            "missing name",
            key,
            json,
            br#"[{"name":"ok"},{"user_id":"u"}]"#.to_vec(),
            400,
            "missing_field",
            Some("name"),
            Some(1),
        ),
        (
            "ill-typed name",
            key,
            json,
            br#"{"name":42}"#.to_vec(),
            400,
            "invalid_field",
            Some("name"),
            Some(0),
        ),
        (
            "bad name",
            key,
            json,
            br#"{"name":"no spaces allowed"}"#.to_vec(),
            400,
            "invalid_field",
            Some("name"),
            Some(0),
        ),
        (
            "unknown field",
            key,
            json,
            br#"{"name":"a","colour":"red"}"#.to_vec(),
            400,
            "unknown_field",
            Some("colour"),
            Some(0),
        ),
        (
            "ill-typed timestamp",
            key,
            json,
            br#"{"name":"a","timestamp":true}"#.to_vec(),
            400,
            "invalid_field",
            Some("timestamp"),
            Some(0),
        ),
        (
            "over-deep event",
            key,
            json,
            deep.into_bytes(),
            400,
            "too_deep",
            None,
            Some(0),
        ),
        (
            "oversize event",
            key,
            json,
            big_event.into_bytes(),
            400,
            "event_too_large",
            None,
            Some(0),
        ),
        (
            "oversize body",
            key,
            json,
            big_body.into_bytes(),
            413,
            "body_too_large",
            None,
            None,
        ),
        (
            "bad NDJSON line",
            key,
            Some("application/x-ndjson"),
            b"{\"name\":\"a\"}\nnot json\n".to_vec(),
            400,
            "malformed_json",
            None,
            Some(1),
        ),
        (
            "missing key",
            None,
            json,
            br#"{"name":"a"}"#.to_vec(),
            401,
            "unauthorized",
            None,
            None,
        ),
        (
            "wrong key",
            Some("wk_not_a_real_key_000"),
            json,
            br#"{"name":"a"}"#.to_vec(),
            401,
            "unauthorized",
            None,
            None,
        ),
        (
            "wrong content type",
            key,
            Some("application/xml"),
            br#"{"name":"a"}"#.to_vec(),
            415,
            "unsupported_media_type",
            None,
            None,
        ),
        (
            "missing content type",
            key,
            None,
            br#"{"name":"a"}"#.to_vec(),
            415,
            "unsupported_media_type",
            None,
            None,
        ),
    ];
    let mut statuses: std::collections::BTreeMap<u16, f64> = Default::default();
    for (what, key, ct, body, status, code, field, index) in cases {
        *statuses.entry(status).or_default() += 1.0;
        let r = post(&url, key, ct, body).await;
        assert_eq!(r.status, status, "{what}: {}", r.body);
        let err = &r.body["error"];
        assert_eq!(err["code"], code, "{what}: {}", r.body);
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no message: {}",
            r.body
        );
        if let Some(field) = field {
            assert_eq!(err["field"], field, "{what}: {}", r.body);
        }
        if let Some(index) = index {
            assert_eq!(err["index"], index, "{what}: {}", r.body);
        }
    }

    // One good request, so we know what reached Kafka is only that.
    let good = post(
        &url,
        key,
        json,
        br#"{"name":"app_opened","event_id":"the-good-one"}"#.to_vec(),
    )
    .await;
    assert_eq!(good.status, 202, "{}", good.body);
    assert_eq!(
        good.body,
        json!({"accepted": 1, "event_ids": ["the-good-one"]})
    );

    // The metrics count every answer by status, and the accepted events by app.
    let metrics = reqwest::get(format!("http://{}/metrics", weir.ingest))
        .await?
        .text()
        .await?;
    for (status, n) in statuses {
        let status = status.to_string();
        let seen = weir_tests::metric(
            &metrics,
            "weir_ingest_requests_total",
            &[("status", &status)],
        );
        assert_eq!(seen, n, "requests answered {status}");
    }
    assert_eq!(
        weir_tests::metric(&metrics, "weir_ingest_requests_total", &[("status", "202")]),
        1.0
    );
    assert_eq!(
        weir_tests::metric(&metrics, "weir_ingest_events_total", &[("app", "test")]),
        1.0
    );

    let records = read_topic(&tansu.bootstrap()).await?;
    assert_eq!(records.len(), 1, "only the good request may reach Kafka");
    let record: Value = serde_json::from_slice(&records[0])?;
    assert_eq!(record["events"][0]["event_id"], "the-good-one");
    assert_eq!(record["app"], "test");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_answers_503_promptly_and_recovers() -> Result<()> {
    let mut tansu = Tansu::start()?;
    tansu.create_topic(TOPIC, 2)?;
    let produce_timeout = Duration::from_millis(2000);
    let weir = Weir::start(&ingest_only_config(
        &tansu,
        produce_timeout.as_millis() as u64,
    ))?;
    let url = weir.events_url();
    let body = |id: &str| format!(r#"{{"name":"app_opened","event_id":"{id}"}}"#).into_bytes();
    let json = Some("application/json");

    let r = post(&url, Some(WRITE_KEY), json, body("before")).await;
    assert_eq!(r.status, 202, "{}", r.body);

    tansu.stop();
    let started = Instant::now();
    let r = post(&url, Some(WRITE_KEY), json, body("during")).await;
    let took = started.elapsed();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "kafka_unavailable");
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    assert!(r.body.get("accepted").is_none());
    assert!(
        took < produce_timeout + Duration::from_secs(2),
        "503 took {took:?}; the produce timeout is {produce_timeout:?}"
    );

    // The broker comes back (memory storage: empty, so the operator recreates the topic).
    tansu.restart()?;
    tansu.create_topic(TOPIC, 2)?;
    let back = Instant::now();
    loop {
        let r = post(&url, Some(WRITE_KEY), json, body("after")).await;
        if r.status == 202 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "ingest did not recover: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "ingest accepted again {:?} after the broker came back",
        back.elapsed()
    );
    Ok(())
}
