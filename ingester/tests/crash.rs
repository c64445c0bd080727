//! Stopping the ingester mid-stream loses nothing and counts nothing twice:
//! `kill -9` then a restart (every event present, each counted once by the
//! documented `FINAL` query), and SIGTERM (exit 0, offsets of every inserted
//! row committed, a restarted ingester inserts no row a second time).

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{
    count_final_sql, eventually, ingester_env, upload_events, IngesterProcess, Namespace,
};
use support::clickhouse::ClickHouseServer;
use support::shared_broker;

fn clickhouse() -> &'static ClickHouseServer {
    static SERVER: OnceLock<ClickHouseServer> = OnceLock::new();
    SERVER.get_or_init(ClickHouseServer::start)
}

const EVENTS: usize = 3000;

/// Rows of the table for `category`, without FINAL (copies included).
async fn raw_count(ns: &Namespace, category: &str) -> u64 {
    let ch = clickhouse();
    let tables = ch
        .count(&format!(
            "SELECT count() FROM system.tables WHERE database='venus' AND name='{}'",
            ns.table()
        ))
        .await;
    if tables == 0 {
        return 0;
    }
    ch.count(&format!(
        "SELECT count() FROM {} WHERE category = '{category}'",
        ns.qualified_table()
    ))
    .await
}

async fn wait_final_count(
    ns: &Namespace,
    category: &str,
    expected: u64,
    ingester: &IngesterProcess,
) {
    let sql = count_final_sql(&ns.qualified_table(), category);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let got = if raw_count(ns, category).await == 0 {
            0
        } else {
            clickhouse().count(&sql).await
        };
        if got == expected {
            return;
        }
        if std::time::Instant::now() > deadline {
            let (_, text) = ingester.get("/metrics").await;
            let interesting: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("venus_ingester_") && !l.contains("_bucket"))
                .collect();
            panic!(
                "{got} of {expected} events counted; raw {}; ingester metrics:\n{}\nlogs: {:?}",
                raw_count(ns, category).await,
                interesting.join("\n"),
                ingester
                    .logs()
                    .iter()
                    .filter(|l| l["level"] != "INFO" || l["message"] == "partitions assigned")
                    .take(20)
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A small-batch ingester, so that a stream spans many inserts.
fn small_batches(ns: &Namespace) -> std::collections::HashMap<String, String> {
    let mut env = ingester_env(
        shared_broker(),
        &clickhouse().url(),
        ns,
        IngesterProcess::free_port(),
    );
    env.insert("VENUS__INGESTER__BATCH_ROWS".into(), "100".into());
    env.insert("VENUS__INGESTER__FLUSH_INTERVAL_MS".into(), "50".into());
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_loses_nothing_and_counts_once() {
    let broker = shared_broker();
    let ns = Namespace::new("kill");
    let category = "stream";
    broker.create_topic(&ns.topic(category)).await;
    let mut first = IngesterProcess::start(&small_batches(&ns));
    first.wait_assigned();
    let app = common::gateway(broker, &ns).await;

    let uploads = {
        let app_url = app.url("/api/v1/upload");
        let client = app.client.clone();
        tokio::spawn(async move {
            // upload_events needs a TestApp; do the same with its client.
            let mut n = 0;
            while n < EVENTS {
                let batch: Vec<serde_json::Value> = (n..n + 100)
                    .map(|i| serde_json::json!({"id": format!("k-{i}")}))
                    .collect();
                n += 100;
                let response = client
                    .post(&app_url)
                    .json(&serde_json::json!({"meta": {"app_id": "a", "category": "stream"}, "data": batch}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Kill it once part of the stream is in.
    eventually(Duration::from_secs(60), "the first rows", || async {
        (raw_count(&ns, category).await >= 300).then_some(())
    })
    .await;
    first.kill();
    let killed_at = raw_count(&ns, category).await;
    assert!(killed_at < EVENTS as u64, "killed mid-stream ({killed_at})");
    // Started again while the stream goes on, once the group let the dead
    // member go (session.timeout.ms 6000): tansu sometimes leaves a member
    // that joins before then without partitions (docs/INGESTER.md).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let second = IngesterProcess::start(&small_batches(&ns));
    uploads.await.unwrap();

    wait_final_count(&ns, category, EVENTS as u64, &second).await;
    let ch = clickhouse();
    let distinct = ch
        .count(&format!(
            "SELECT uniqExact(event_id) FROM {} WHERE category = '{category}'",
            ns.qualified_table()
        ))
        .await;
    assert_eq!(distinct, EVENTS as u64, "every event is there");
    let (_, text) = second.get("/metrics").await;
    assert_eq!(
        common::metric(&text, "venus_ingester_offset_gap_messages_total", &[]),
        0.0
    );
    // Nothing beyond the stream, after a moment for stragglers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ch.count(&count_final_sql(&ns.qualified_table(), category))
            .await,
        EVENTS as u64,
        "each event counted once with FINAL"
    );
    drop(second);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_exits_0_commits_and_nothing_is_inserted_twice() {
    let broker = shared_broker();
    let ns = Namespace::new("term");
    let category = "stream";
    let topic = ns.topic(category);
    broker.create_topic(&topic).await;
    let mut first = IngesterProcess::start(&small_batches(&ns));
    first.wait_assigned();
    let app = common::gateway(broker, &ns).await;

    let streaming = async {
        upload_events(&app, category, EVENTS, 100, "t").await;
    };
    let stopping = async {
        eventually(Duration::from_secs(60), "the first rows", || async {
            (raw_count(&ns, category).await >= 300).then_some(())
        })
        .await;
        tokio::task::block_in_place(|| first.terminate(Duration::from_secs(30)))
    };
    let ((), code) = tokio::join!(streaming, stopping);
    assert_eq!(code, Some(0), "SIGTERM exits 0");
    let logs = first.logs();
    assert!(
        logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("offsets committed"))),
        "{logs:?}"
    );

    // Every row inserted before the stop is committed, and nothing more.
    let inserted = raw_count(&ns, category).await;
    assert!(inserted < EVENTS as u64, "stopped mid-stream ({inserted})");
    assert_eq!(
        common::committed(broker, &ns.group(), &topic),
        Some(inserted as i64),
        "the committed offset is the next message after the inserted rows"
    );

    let second = IngesterProcess::start(&small_batches(&ns));
    wait_final_count(&ns, category, EVENTS as u64, &second).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        raw_count(&ns, category).await,
        EVENTS as u64,
        "no row inserted twice, even without FINAL"
    );
    let (_, text) = second.get("/metrics").await;
    assert_eq!(
        common::metric(&text, "venus_ingester_offset_gap_messages_total", &[]),
        0.0,
        "the restart read on from the committed offset without skipping"
    );
    assert_eq!(
        common::metric(&text, "venus_ingester_rows_inserted_total", &[]),
        (EVENTS as u64 - inserted) as f64,
        "the restarted ingester inserted only the rest"
    );
    app.stop().await;
}
