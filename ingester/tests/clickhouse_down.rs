//! ClickHouse away for longer than a few retries in the middle of a stream,
//! first hanging (SIGSTOP: connections accepted, nothing answered), then
//! dead (kill -9) and started again: `/readyz` turns 503 meanwhile, retries
//! are counted, fetching pauses at `max_buffered_rows` (the consumer keeps
//! polling), and when ClickHouse is back every event is in, once.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::time::Duration;

use common::{
    count_final_sql, eventually, ingester_env, metric, upload_events, IngesterProcess, Namespace,
};
use support::clickhouse::ClickHouseServer;
use support::shared_broker;

async fn final_count(ch: &ClickHouseServer, ns: &Namespace, category: &str) -> u64 {
    let tables = ch
        .count(&format!(
            "SELECT count() FROM system.tables WHERE database='venus' AND name='{}'",
            ns.table()
        ))
        .await;
    if tables == 0 {
        return 0;
    }
    ch.count(&count_final_sql(&ns.qualified_table(), category))
        .await
}

async fn retries(ingester: &IngesterProcess) -> f64 {
    let (_, text) = ingester.get("/metrics").await;
    metric(&text, "venus_ingester_insert_retries_total", &[])
}

/// Waits for `/readyz` to answer `status`; returns the body.
async fn readyz(ingester: &IngesterProcess, status: u16, within: Duration) -> String {
    eventually(within, &format!("/readyz {status}"), || async {
        let (got, body) = ingester.get("/readyz").await;
        (got == status).then_some(body)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_hanging_then_dead_then_back_loses_nothing() {
    let broker = shared_broker();
    let mut ch = ClickHouseServer::start();
    let ns = Namespace::new("down");
    let category = "stream";
    broker.create_topic(&ns.topic(category)).await;
    let mut env = ingester_env(broker, &ch.url(), &ns, IngesterProcess::free_port());
    env.insert("VENUS__INGESTER__BATCH_ROWS".into(), "50".into());
    // Small, so that the outage fills it: fetching must pause, not block.
    env.insert("VENUS__INGESTER__MAX_BUFFERED_ROWS".into(), "100".into());
    let ingester = IngesterProcess::start(&env);
    ingester.wait_assigned();
    let app = common::gateway(broker, &ns).await;

    upload_events(&app, category, 200, 50, "a").await;
    eventually(Duration::from_secs(60), "the first 200", || async {
        (final_count(&ch, &ns, category).await == 200).then_some(())
    })
    .await;
    readyz(&ingester, 200, Duration::from_secs(10)).await;

    // 1. A hanging ClickHouse: only timeouts tell.
    ch.pause();
    upload_events(&app, category, 300, 50, "b").await;
    let body = readyz(&ingester, 503, Duration::from_secs(5)).await;
    assert!(body.contains("ClickHouse"), "{body}");
    let before = retries(&ingester).await;
    eventually(Duration::from_secs(60), "a few retries", || async {
        (retries(&ingester).await >= before + 3.0).then_some(())
    })
    .await;
    ch.resume();
    eventually(
        Duration::from_secs(60),
        "500 events after the hang",
        || async { (final_count(&ch, &ns, category).await == 500).then_some(()) },
    )
    .await;
    readyz(&ingester, 200, Duration::from_secs(10)).await;
    // The poll thread resumes on its next turn once the buffer drained.
    eventually(Duration::from_secs(5), "fetching resumed", || async {
        let (_, text) = ingester.get("/metrics").await;
        (metric(&text, "venus_ingester_consumer_paused", &[]) == 0.0).then_some(())
    })
    .await;

    // 2. A dead ClickHouse (connections refused), started again.
    ch.kill();
    upload_events(&app, category, 300, 50, "c").await;
    let body = readyz(&ingester, 503, Duration::from_secs(5)).await;
    assert!(body.contains("ClickHouse"), "{body}");
    let before = retries(&ingester).await;
    eventually(Duration::from_secs(60), "a few retries", || async {
        (retries(&ingester).await >= before + 3.0).then_some(())
    })
    .await;
    ch.restart();
    eventually(Duration::from_secs(90), "all 800 events", || async {
        (final_count(&ch, &ns, category).await == 800).then_some(())
    })
    .await;
    readyz(&ingester, 200, Duration::from_secs(10)).await;
    let distinct = ch
        .count(&format!(
            "SELECT uniqExact(event_id) FROM {} WHERE category = '{category}'",
            ns.qualified_table()
        ))
        .await;
    assert_eq!(distinct, 800);
    let (_, text) = ingester.get("/metrics").await;
    assert_eq!(
        metric(&text, "venus_ingester_dead_letters_total", &[]),
        0.0,
        "nothing given up"
    );
    assert_eq!(
        metric(&text, "venus_ingester_offset_gap_messages_total", &[]),
        0.0,
        "no record skipped"
    );
    app.stop().await;
}

/// The resident memory of process `pid`, in bytes (file-backed pages
/// included, as a container's limit counts them).
fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_with_clickhouse_stopped_stay_within_max_buffered_bytes() {
    const MAX_BUFFERED_BYTES: u64 = 16 * 1024 * 1024;
    /// What the process may hold besides the buffer: its own baseline is
    /// measured; this covers librdkafka's prefetch queue (a quarter of the
    /// bound), a fetch in flight, and the allocator's slack.
    const OVERHEAD: u64 = 48 * 1024 * 1024;
    let broker = shared_broker();
    let ch = ClickHouseServer::start();
    let ns = Namespace::new("bytes");
    let category = "large";
    broker.create_topic(&ns.topic(category)).await;
    let mut env = ingester_env(broker, &ch.url(), &ns, IngesterProcess::free_port());
    env.insert(
        "VENUS__INGESTER__MAX_BUFFERED_BYTES".into(),
        MAX_BUFFERED_BYTES.to_string(),
    );
    let ingester = IngesterProcess::start(&env);
    ingester.wait_assigned();
    let app = common::gateway(broker, &ns).await;
    upload_events(&app, category, 2, 2, "small").await;
    eventually(Duration::from_secs(60), "the first rows", || async {
        (final_count(&ch, &ns, category).await == 2).then_some(())
    })
    .await;
    let baseline = rss_bytes(ingester.pid());
    assert!(baseline > 0);

    // ClickHouse hangs; 100 events of 700 KB arrive: 70 MB of messages,
    // held twice (message and row) they would be 140 MB.
    ch.pause();
    let blob = "x".repeat(700_000);
    for batch in 0..20 {
        let events: Vec<serde_json::Value> = (0..5)
            .map(|i| serde_json::json!({"id": format!("big-{batch}-{i}"), "blob": blob}))
            .collect();
        let document = serde_json::json!({
            "meta": {"app_id": "test-app", "category": category},
            "data": events,
        });
        let response = app.upload_json(&document.to_string()).await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    let paused = ingester.wait_for_log("fetching paused or resumed", Duration::from_secs(60));
    assert_eq!(paused["paused"], true, "{paused}");
    let mut peak = 0;
    for _ in 0..40 {
        peak = peak.max(rss_bytes(ingester.pid()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, metrics) = ingester.get("/metrics").await;
    let buffered = metric(&metrics, "venus_ingester_buffered_rows", &[]);
    assert!(
        buffered < 100.0,
        "fetching paused before all were read: {buffered} buffered"
    );
    assert!(
        peak < baseline + MAX_BUFFERED_BYTES + OVERHEAD,
        "RSS {} MiB, baseline {} MiB: more than the bound ({} MiB) and the overhead ({} MiB)",
        peak >> 20,
        baseline >> 20,
        MAX_BUFFERED_BYTES >> 20,
        OVERHEAD >> 20
    );
    eprintln!(
        "RSS peak {} MiB over a baseline of {} MiB with {buffered} messages held",
        peak >> 20,
        baseline >> 20
    );

    ch.resume();
    eventually(Duration::from_secs(120), "every large event", || async {
        (final_count(&ch, &ns, category).await == 102).then_some(())
    })
    .await;
}
