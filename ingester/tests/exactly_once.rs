//! Every event once, counted without `FINAL`: merges are stopped (`SYSTEM
//! STOP MERGES`) wherever a count without `FINAL` is checked, so that no
//! merge can hide a duplicate. Real tansu, real ClickHouse 18.16, the real
//! gateway and the `venus-ingester` binary.
//!
//! * five kill -9 of the ingester during a stream of 100,000 events;
//! * an insert whose answer is lost (a proxy drops ClickHouse's answers
//!   while the insert goes in);
//! * a rebalance while the first instance has rows in flight;
//! * a client that sends the same batch three times, once after a 1004.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{eventually, ingester_env, metric, upload_events, IngesterProcess, Namespace};
use support::clickhouse::ClickHouseServer;
use support::proxy::AnswerLosingProxy;
use support::{shared_broker, Broker};

/// `count()` of `category`, without `FINAL` (0 before the table exists).
async fn raw_count(ch: &ClickHouseServer, ns: &Namespace, category: &str) -> u64 {
    if !table_exists(ch, ns).await {
        return 0;
    }
    ch.count(&format!(
        "SELECT count() FROM {} WHERE category = '{category}'",
        ns.qualified_table()
    ))
    .await
}

async fn table_exists(ch: &ClickHouseServer, ns: &Namespace) -> bool {
    ch.count(&format!(
        "SELECT count() FROM system.tables WHERE database = 'venus' AND name = '{}'",
        ns.table()
    ))
    .await
        > 0
}

/// Waits for the ingester to create the table, then stops its merges.
async fn stop_merges(ch: &ClickHouseServer, ns: &Namespace) {
    eventually(Duration::from_secs(60), "the table", || async {
        table_exists(ch, ns).await.then_some(())
    })
    .await;
    ch.query(&format!("SYSTEM STOP MERGES {}", ns.qualified_table()))
        .await;
}

/// Distinct (app_id, event_id) of `category`.
async fn distinct_events(ch: &ClickHouseServer, ns: &Namespace, category: &str) -> u64 {
    ch.count(&format!(
        "SELECT uniqExact(app_id, event_id) FROM {} WHERE category = '{category}'",
        ns.qualified_table()
    ))
    .await
}

/// Waits until `count()` reaches `expected`, then a little longer for
/// stragglers, and returns the count then.
async fn settled_count(
    ch: &ClickHouseServer,
    ns: &Namespace,
    category: &str,
    expected: u64,
) -> u64 {
    eventually(
        Duration::from_secs(300),
        &format!("{expected} rows"),
        || async { (raw_count(ch, ns, category).await >= expected).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    raw_count(ch, ns, category).await
}

fn env(
    broker: &Broker,
    clickhouse_url: &str,
    ns: &Namespace,
    extra: &[(&str, &str)],
) -> HashMap<String, String> {
    let mut env = ingester_env(broker, clickhouse_url, ns, IngesterProcess::free_port());
    for (key, value) in extra {
        env.insert((*key).into(), (*value).into());
    }
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_kill_9s_during_a_stream_of_100_000_events_leave_each_event_once_without_final() {
    const EVENTS: usize = 100_000;
    let broker = shared_broker();
    let ch = ClickHouseServer::start();
    let ns = Namespace::new("once");
    let category = "stream";
    broker.create_topic(&ns.topic(category)).await;
    let settings = env(
        broker,
        &ch.url(),
        &ns,
        &[
            ("VENUS__INGESTER__BATCH_ROWS", "2000"),
            ("VENUS__INGESTER__FLUSH_INTERVAL_MS", "100"),
        ],
    );
    let mut ingester = IngesterProcess::start(&settings);
    ingester.wait_assigned();
    stop_merges(&ch, &ns).await;
    let app = common::gateway(broker, &ns).await;

    let uploads = {
        let url = app.url("/api/v1/upload");
        let client = app.client.clone();
        tokio::spawn(async move {
            let mut accepted = 0;
            for start in (0..EVENTS).step_by(500) {
                let batch: Vec<serde_json::Value> = (start..start + 500)
                    .map(|i| serde_json::json!({"id": format!("o-{i}")}))
                    .collect();
                let response = client
                    .post(&url)
                    .json(&serde_json::json!({"meta": {"app_id": "a", "category": "stream"}, "data": batch}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                accepted += 500;
            }
            accepted
        })
    };
    for kill in 1..=5u64 {
        // Each kill once another part of the stream is in.
        eventually(Duration::from_secs(120), "more rows", || async {
            (raw_count(&ch, &ns, category).await >= kill * 12_000).then_some(())
        })
        .await;
        ingester.kill();
        // The group lets the dead member go after session.timeout.ms (6 s);
        // tansu may leave a member that joins before then without
        // partitions (docs/INGESTER.md).
        tokio::time::sleep(Duration::from_secs(7)).await;
        ingester = IngesterProcess::start(&settings);
    }
    let accepted = uploads.await.unwrap() as u64;
    assert_eq!(accepted, EVENTS as u64);
    let count = settled_count(&ch, &ns, category, accepted).await;
    assert_eq!(
        count, accepted,
        "count() without FINAL equals the accepted events"
    );
    assert_eq!(
        distinct_events(&ch, &ns, category).await,
        accepted,
        "every event is there"
    );
    let (_, text) = ingester.get("/metrics").await;
    eprintln!(
        "rows not inserted twice by the last instance: {}",
        metric(&text, "venus_ingester_rows_deduplicated_total", &[])
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_whose_answer_is_lost_is_not_a_second_row() {
    let broker = shared_broker();
    let ch = ClickHouseServer::start();
    let proxy = AnswerLosingProxy::start(ch.http_port);
    let ns = Namespace::new("lost");
    let category = "answers";
    broker.create_topic(&ns.topic(category)).await;
    let ingester = IngesterProcess::start(&env(
        broker,
        &proxy.url(),
        &ns,
        &[("VENUS__INGESTER__CLICKHOUSE__TIMEOUT_MS", "2000")],
    ));
    ingester.wait_assigned();
    stop_merges(&ch, &ns).await;
    let app = common::gateway(broker, &ns).await;
    upload_events(&app, category, 50, 50, "before").await;
    assert_eq!(settled_count(&ch, &ns, category, 50).await, 50);

    // ClickHouse takes the next rows, the ingester never hears so.
    proxy.swallow(true);
    upload_events(&app, category, 100, 50, "lost").await;
    eventually(
        Duration::from_secs(60),
        "the rows written unanswered",
        || async { (raw_count(&ch, &ns, category).await >= 150).then_some(()) },
    )
    .await;
    eventually(Duration::from_secs(30), "a failed attempt", || async {
        let (_, text) = ingester.get("/metrics").await;
        (metric(&text, "venus_ingester_insert_retries_total", &[]) >= 1.0).then_some(())
    })
    .await;
    proxy.swallow(false);
    eventually(
        Duration::from_secs(60),
        "the rows found, not inserted again",
        || async {
            let (_, text) = ingester.get("/metrics").await;
            (metric(&text, "venus_ingester_rows_deduplicated_total", &[]) >= 100.0).then_some(())
        },
    )
    .await;
    upload_events(&app, category, 10, 10, "after").await;
    assert_eq!(settled_count(&ch, &ns, category, 160).await, 160);
    assert_eq!(distinct_events(&ch, &ns, category).await, 160);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_with_rows_in_flight_loses_nothing_and_doubles_nothing() {
    let broker = shared_broker();
    let ch = ClickHouseServer::start();
    let ns = Namespace::new("rebal");
    let category = "moving";
    broker
        .create_topic_with_partitions(&ns.topic(category), 2)
        .await;
    // Rows wait in the batch for 3 s: at any moment some are in flight.
    let settings = env(
        broker,
        &ch.url(),
        &ns,
        &[("VENUS__INGESTER__FLUSH_INTERVAL_MS", "3000")],
    );
    let first = IngesterProcess::start(&settings);
    first.wait_assigned();
    stop_merges(&ch, &ns).await;
    let app = common::gateway(broker, &ns).await;
    let mut settings = settings;
    settings.insert(
        "VENUS__INGESTER__LISTEN".into(),
        format!("127.0.0.1:{}", IngesterProcess::free_port()),
    );
    let uploads = {
        let url = app.url("/api/v1/upload");
        let client = app.client.clone();
        tokio::spawn(async move {
            for round in 0..60 {
                let batch: Vec<serde_json::Value> = (0..20)
                    .map(|i| serde_json::json!({"id": format!("r-{round}-{i}")}))
                    .collect();
                let response = client
                    .post(&url)
                    .json(&serde_json::json!({"meta": {"app_id": "a", "category": "moving"}, "data": batch}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A second instance joins mid-stream: the first gives up a partition
    // with rows of it in its batch.
    let second = IngesterProcess::start(&settings);
    second.wait_assigned();
    let revoked = first.wait_for_log("partitions revoked", Duration::from_secs(60));
    assert!(
        revoked["in_flight"].as_u64().unwrap_or(0) > 0,
        "the revoke happened with rows in flight: {revoked}"
    );
    uploads.await.unwrap();
    assert_eq!(settled_count(&ch, &ns, category, 1200).await, 1200);
    assert_eq!(distinct_events(&ch, &ns, category).await, 1200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_three_times_once_after_a_1004_is_one_row_per_event() {
    // A broker of its own: it is paused.
    let broker = Broker::start();
    let ch = ClickHouseServer::start();
    let ns = Namespace::new("retry");
    let category = "retried";
    broker.create_topic(&ns.topic(category)).await;
    // The table as the ingester makes it, its merges stopped before any row.
    ch.query("CREATE DATABASE IF NOT EXISTS venus").await;
    ch.query(
        &venus_ingester::schema::Schema::single("venus", &ns.table())
            .create_table(venus_ingester::row::Layout::Classic, 0),
    )
    .await;
    ch.query(&format!("SYSTEM STOP MERGES {}", ns.qualified_table()))
        .await;
    let app = common::gateway(&broker, &ns).await;
    let document = serde_json::json!({
        "meta": {"app_id": "shop", "category": category},
        "data": (0..20).map(|i| serde_json::json!({"id": format!("t-{i}")})).collect::<Vec<_>>(),
    })
    .to_string();

    // 1. The broker does not answer: 1004 for every event (not confirmed;
    // some may be written all the same).
    broker.pause();
    let response = app.upload_json(&document).await;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body["parts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["code"] == 1004),
        "{body}"
    );
    broker.resume();
    // 2. and 3. The client sends it again, twice.
    for _ in 0..2 {
        let response = eventually(Duration::from_secs(30), "an accepted retry", || async {
            let response = app.upload_json(&document).await;
            (response.status() == 200).then_some(response)
        })
        .await;
        assert_eq!(response.status(), 200);
    }
    // The ingester starts after the broker's pause: tansu gives a member
    // that lost its session in a pause no partitions again
    // (docs/INGESTER.md), and the test is about the client's copies.
    let _ingester = IngesterProcess::start(&env(&broker, &ch.url(), &ns, &[]));
    eventually(
        Duration::from_secs(60),
        "the copies in the table",
        || async {
            let count = raw_count(&ch, &ns, category).await;
            (count >= 40).then_some(())
        },
    )
    .await;
    let table = ns.qualified_table();
    let with_final = ch
        .count(&format!(
            "SELECT count() FROM {table} FINAL WHERE category = '{category}'"
        ))
        .await;
    assert_eq!(with_final, 20, "one row per event with FINAL");
    ch.query(&format!("SYSTEM START MERGES {table}")).await;
    ch.query(&format!("OPTIMIZE TABLE {table} FINAL")).await;
    assert_eq!(
        raw_count(&ch, &ns, category).await,
        20,
        "and after the merge, without it"
    );
    app.stop().await;
}
