//! The ingest port against clients that hold resources on purpose: headers trickled
//! (slowloris), connections opened and left idle, a body trickled, and more
//! connections than the limit, and a plugin upload trickled to the admin port. Each is cut off at its documented bound, and an
//! ordinary client is served meanwhile and afterwards.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::{Tansu, WRITE_KEY, Weir};

const TOPIC: &str = "weir.events";

fn config(tansu: &Tansu, extra: &str) -> String {
    format!(
        r#"
[ingest]
listen = "{{ingest}}"
{extra}
[[app]]
name = "test"
write_keys = ["{WRITE_KEY}"]
[kafka]
brokers = "{}"
topic = "{TOPIC}"
[processor]
enabled = false
[admin]
listen = "{{admin}}"
tokens = ["at_test_1234567890abcdef"]
"#,
        tansu.bootstrap()
    )
}

/// Reads until the server closes the connection or `within` passes; what it sent,
/// and when it closed (None: still open).
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (String, Option<Instant>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), None),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&got).into_owned(),
                    Some(Instant::now()),
                );
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A metric of the ingest server, read from the admin port (the ingest port may be
/// full).
fn ingest_metric(weir: &Weir, name: &str) -> f64 {
    weir_tests::http_get(weir.admin, "/metrics").map_or(0.0, |text| {
        weir_tests::metric(&text, name, &[("server", "ingest")])
    })
}

/// Sends `head`, then its body 10 bytes every 200 ms (for at most 5 s) until the
/// server answers or closes; the answer and how long it took.
async fn trickle_body(addr: std::net::SocketAddr, head: &str) -> Result<(String, Duration)> {
    let mut trickle = TcpStream::connect(addr).await?;
    let started = Instant::now();
    trickle.write_all(head.as_bytes()).await?;
    let mut answer = String::new();
    for _ in 0..25 {
        if trickle.write_all(b"          ").await.is_err() {
            break;
        }
        let (text, closed) = read_until_closed(&mut trickle, Duration::from_millis(200)).await;
        answer.push_str(&text);
        if !answer.is_empty() || closed.is_some() {
            break;
        }
    }
    Ok((answer, started.elapsed()))
}

async fn post_one(weir: &Weir, id: &str) -> Result<u16> {
    let resp = reqwest::Client::new()
        .post(weir.events_url())
        .bearer_auth(WRITE_KEY)
        .json(&json!({"name": "app_opened", "event_id": id}))
        .send()
        .await?;
    Ok(resp.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off_at_their_deadlines() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic(TOPIC, 1)?;
    let weir = Weir::start(&config(
        &tansu,
        "header_timeout_ms = 600\nbody_timeout_ms = 1000",
    ))?;
    assert_eq!(post_one(&weir, "before").await?, 202);

    // Slowloris: a header line every 200 ms, never the end of the headers.
    let mut slow = TcpStream::connect(weir.ingest).await?;
    let started = Instant::now();
    slow.write_all(b"POST /v1/events HTTP/1.1\r\nhost: x\r\n")
        .await?;
    let mut cut_after = None;
    for i in 0..25 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let line = format!("x-trickle-{i}: y\r\n");
        if slow.write_all(line.as_bytes()).await.is_err() {
            cut_after = Some(started.elapsed());
            break;
        }
        let (_, closed) = read_until_closed(&mut slow, Duration::from_millis(1)).await;
        if closed.is_some() {
            cut_after = Some(started.elapsed());
            break;
        }
    }
    let Some(cut_after) = cut_after else {
        bail!("a client trickling its headers for 5 s was never cut off");
    };
    assert!(
        cut_after >= Duration::from_millis(500) && cut_after < Duration::from_secs(3),
        "headers trickled: cut off after {cut_after:?}, header_timeout_ms is 600"
    );

    // A connection opened and left idle, and one left idle after a request.
    let mut idle = TcpStream::connect(weir.ingest).await?;
    let opened = Instant::now();
    let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    let closed = closed.expect("an idle connection is closed");
    assert!(
        closed - opened < Duration::from_secs(3),
        "{:?}",
        closed - opened
    );
    let mut kept = TcpStream::connect(weir.ingest).await?;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await?;
    let (text, closed) = read_until_closed(&mut kept, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        closed.is_some(),
        "a kept-alive connection left idle is closed"
    );

    // A body trickled: 10 bytes every 200 ms of a declared 1,000: 408 at 1 s.
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {WRITE_KEY}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
    );
    let (answer, took) = trickle_body(weir.ingest, &head).await?;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    // Meanwhile and afterwards, an ordinary client is served.
    assert_eq!(post_one(&weir, "after").await?, 202);
    Ok(())
}

/// The admin port has a body deadline of its own (`admin.body_timeout_ms`): a plugin
/// upload trickled past it is answered 408 and nothing is stored; the admin API goes
/// on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_trickled_to_the_admin_port_is_cut_off_at_its_deadline() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic(TOPIC, 1)?;
    let weir = Weir::start(&(config(&tansu, "") + "body_timeout_ms = 1000\n"))?;
    let head = "PUT /admin/v1/plugins/slow HTTP/1.1\r\nhost: x\r\nauthorization: Bearer at_test_1234567890abcdef\r\ncontent-type: application/wasm\r\ncontent-length: 100000\r\n\r\n";
    let (answer, took) = trickle_body(weir.admin, head).await?;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let plugins = reqwest::Client::new()
        .get(format!("http://{}/admin/v1/plugins", weir.admin))
        .bearer_auth("at_test_1234567890abcdef")
        .send()
        .await?;
    assert_eq!(plugins.status(), 200);
    let listed = plugins.text().await?;
    assert!(!listed.contains("slow"), "nothing was stored: {listed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_503_at_once_and_the_rest_are_served() -> Result<()> {
    let tansu = Tansu::start()?;
    tansu.create_topic(TOPIC, 1)?;
    let weir = Weir::start(&config(
        &tansu,
        "max_connections = 8\nheader_timeout_ms = 30000",
    ))?;
    // Eight connections held open by clients that send nothing.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(weir.ingest).await?);
    }
    // The server counts them once it accepted them.
    weir_tests::wait_until("8 open connections", Duration::from_secs(10), || {
        ingest_metric(&weir, "weir_http_connections") >= 8.0
    })?;
    for _ in 0..3 {
        let mut extra = TcpStream::connect(weir.ingest).await?;
        let (text, closed) = read_until_closed(&mut extra, Duration::from_secs(2)).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
        assert!(text.contains("retry-after: 1"), "{text}");
        assert!(text.contains("too_many_connections"), "{text}");
        assert!(closed.is_some(), "the connection over the limit is closed");
    }
    assert_eq!(
        ingest_metric(&weir, "weir_http_connections_shed_total"),
        3.0
    );
    // Once the idle clients leave, their connections are free again.
    drop(held);
    let mut status = 0;
    for _ in 0..50 {
        status = post_one(&weir, "served").await.unwrap_or_default();
        if status == 202 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 202);
    Ok(())
}

/// A process's resident memory (`VmRSS` of `/proc/PID/status`), in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Raises this process's open-files limit to `want` (up to the hard limit): 2,000
/// connections need more than the common default of 1,024.
fn raise_open_files(want: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                bail!("setrlimit: {}", std::io::Error::last_os_error());
            }
        }
    }
    if lim.rlim_cur < want {
        bail!(
            "the open-files limit is {} (hard), this test needs {want}",
            lim.rlim_max
        );
    }
    Ok(())
}

/// 2,000 connections opened and left idle, a cheap flood from one machine: weir holds
/// them in little memory, serves an ordinary client meanwhile, and closes every one at
/// the header deadline, after which it holds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_are_held_cheaply_and_all_closed_at_the_deadline()
-> Result<()> {
    const IDLE: usize = 2000;
    raise_open_files(IDLE as u64 + 512)?;
    let tansu = Tansu::start()?;
    tansu.create_topic(TOPIC, 1)?;
    let weir = Weir::start(&config(&tansu, "header_timeout_ms = 3000"))?;
    let pid = weir.pid().expect("weir runs");
    assert_eq!(post_one(&weir, "before").await?, 202);
    let before = rss_kib(pid).unwrap_or_default();
    let opened = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(weir.ingest).await?);
    }
    weir_tests::wait_until("2,000 open connections", Duration::from_secs(10), || {
        ingest_metric(&weir, "weir_http_connections") >= IDLE as f64
    })?;
    let held = rss_kib(pid).unwrap_or_default();
    // An ordinary client is served while they are held.
    assert_eq!(post_one(&weir, "meanwhile").await?, 202);
    let per_connection = held.saturating_sub(before) as f64 * 1024.0 / IDLE as f64;
    eprintln!(
        "weir's RSS: {before} KiB before, {held} KiB holding {IDLE} idle connections \
         ({per_connection:.0} bytes each), opened in {:?}",
        opened.elapsed()
    );
    assert!(
        held.saturating_sub(before) < 64 * 1024,
        "{IDLE} idle connections cost {} KiB",
        held.saturating_sub(before)
    );
    // Every one is closed by the server at the deadline (3 s), none long after.
    let closes = futures::future::join_all(
        idle.iter_mut()
            .map(|s| read_until_closed(s, Duration::from_secs(15))),
    )
    .await;
    let open = closes.iter().filter(|(_, closed)| closed.is_none()).count();
    assert_eq!(open, 0, "{open} idle connections still open after 15 s");
    let last = closes
        .iter()
        .filter_map(|(_, closed)| *closed)
        .max()
        .expect("closed");
    let took = last.duration_since(opened);
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(12),
        "the last idle connection closed {took:?} after the first was opened"
    );
    weir_tests::wait_until("no connection held", Duration::from_secs(5), || {
        ingest_metric(&weir, "weir_http_connections") == 0.0
    })?;
    assert_eq!(post_one(&weir, "after").await?, 202);
    Ok(())
}
