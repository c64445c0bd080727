//! The first mile to the last: a page in headless Chromium tracks 1,000
//! events with the browser SDK (`sdk/js`) while the broker is paused for
//! 10 s (the gateway answers 503, the SDK backs off and sends again with
//! the same ids); then the ingester puts them into ClickHouse, where each
//! id is one row with `FINAL`, however many times Kafka has it.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{eventually, ingester_env, IngesterProcess, Namespace};
use support::browser::{page, report, setup, strings, Browser, KEY};
use support::clickhouse::ClickHouseServer;
use support::Broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_through_a_10_s_broker_pause_are_each_one_row() {
    let broker = Broker::start();
    let ns = Namespace::new("sdk");
    let category = "clicks";
    broker.create_topic(&ns.topic(category)).await;
    let template = ns.template();
    let (pages, origin, app, mut results) = setup(
        &broker,
        &[("VENUS__KAFKA__TOPIC_TEMPLATE", template.as_str())],
    )
    .await;
    let upload = app.url("/api/v1/upload");
    pages.html.lock().unwrap().insert(
        "/".into(),
        page(
            &upload,
            category,
            KEY,
            "{flushIntervalMs: 200, maxRetryDelayMs: 4000}",
            r#"
            await report({ready: true});
            while ((await (await realFetch("/go")).text()) !== "1") await sleep(100);
            const ids = [];
            for (let i = 0; i < 1000; i++) {
              ids.push(venus.track({n: i}));
              if (i % 100 === 99) await sleep(100);
            }
            while (client.queue.length > 0) await sleep(200);
            await report({ids});
            "#,
        ),
    );
    let browser = Browser::open(&format!("{origin}/"));
    report(&mut results, Duration::from_secs(60)).await;
    // The broker stops before the first event is tracked.
    broker.pause();
    pages.go.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.resume();
    let done = report(&mut results, Duration::from_secs(120)).await;
    drop(browser);
    let ids = strings(&done["ids"]);
    assert_eq!(ids.len(), 1000);
    let statuses = done["stats"]["statuses"].to_string();
    assert!(statuses.contains("503"), "the pause was seen: {statuses}");

    // Kafka has every id, some perhaps twice (an upload answered 503 whose
    // messages the frozen broker still took, sent again by the SDK).
    let mut in_kafka: HashMap<String, usize> = HashMap::new();
    for message in broker.read(&ns.topic(category), 1000, Duration::from_secs(10)) {
        *in_kafka.entry(support::event_id(&message)).or_insert(0) += 1;
    }
    let missing = ids.iter().filter(|id| !in_kafka.contains_key(*id)).count();
    assert_eq!(missing, 0, "ids not in Kafka");
    let copies: usize = in_kafka.values().sum();

    // The ingester starts after the pause (tansu may never give a consumer
    // whose session expired in a pause its partitions again).
    let ch = ClickHouseServer::start();
    let ingester = IngesterProcess::start(&ingester_env(
        &broker,
        &ch.url(),
        &ns,
        IngesterProcess::free_port(),
    ));
    ingester.wait_assigned();
    let table = ns.qualified_table();
    eventually(
        Duration::from_secs(60),
        "every copy in ClickHouse",
        || async {
            let tables = ch
                .count(&format!(
                    "SELECT count() FROM system.tables WHERE database = 'venus' AND name = '{}'",
                    ns.table()
                ))
                .await;
            (tables == 1
                && ch
                    .count(&format!(
                        "SELECT count() FROM {table} WHERE category = '{category}'"
                    ))
                    .await
                    >= 1000)
                .then_some(())
        },
    )
    .await;
    let rows = ch
        .rows(&format!(
            "SELECT event_id, count() AS n FROM {table} FINAL WHERE category = '{category}' GROUP BY event_id"
        ))
        .await;
    let once: HashMap<String, u64> = rows
        .iter()
        .map(|row| {
            (
                row["event_id"].as_str().unwrap().to_owned(),
                row["n"]
                    .as_str()
                    .map_or_else(|| row["n"].as_u64().unwrap(), |n| n.parse().unwrap()),
            )
        })
        .collect();
    assert_eq!(once.len(), 1000);
    for id in &ids {
        assert_eq!(once.get(id), Some(&1), "{id}");
    }
    println!("1,000 events through a pause: {copies} messages in Kafka, 1,000 rows with FINAL");
    app.stop().await;
}
