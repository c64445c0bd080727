//! A dead letter Kafka cannot take: the broker frozen (SIGSTOP) while the
//! ingester holds a poison message. `/readyz` says so after
//! `dead_letter_alarm_ms`, nothing is committed past the poison message, an
//! ingester killed with -9 in that state loses nothing, and once the broker
//! is back the poison message is a dead letter and the rest are rows.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use common::{
    count_final_sql, eventually, ingester_env, metric, upload_events, IngesterProcess, Namespace,
};
use support::clickhouse::ClickHouseServer;
use support::Broker;

async fn final_count(ch: &ClickHouseServer, ns: &Namespace, category: &str) -> u64 {
    ch.count(&count_final_sql(&ns.qualified_table(), category))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_broker_cannot_take_stops_the_partition_and_shows_in_readyz() {
    let broker = Broker::start();
    let ch = ClickHouseServer::start();
    let ns = Namespace::new("dlstall");
    let category = "stall";
    let topic = ns.topic(category);
    broker.create_topic(&topic).await;
    let mut env = ingester_env(&broker, &ch.url(), &ns, IngesterProcess::free_port());
    for (key, value) in [
        ("VENUS__INGESTER__DEAD_LETTER_ALARM_MS", "1000"),
        // One row per batch and one insert at a time: with ClickHouse
        // hanging, the processor stops after a few messages and the rest
        // wait, read, in its channel.
        ("VENUS__INGESTER__BATCH_ROWS", "1"),
        ("VENUS__INGESTER__INSERT_CONCURRENCY", "1"),
    ] {
        env.insert(key.into(), value.into());
    }
    let mut ingester = IngesterProcess::start(&env);
    ingester.wait_assigned();
    ingester.wait_for_log("dead-letter topic created", Duration::from_secs(30));
    let app = common::gateway(&broker, &ns).await;
    upload_events(&app, category, 2, 1, "first").await;
    eventually(Duration::from_secs(60), "2 rows", || async {
        (final_count(&ch, &ns, category).await == 2).then_some(())
    })
    .await;

    // ClickHouse hangs: three events queue behind the stuck insert, then
    // the poison message (offset 5) and two more events are read and wait.
    ch.pause();
    upload_events(&app, category, 3, 1, "before").await;
    let producer: FutureProducer = broker.client_config().create().unwrap();
    let poison_offset = producer
        .send(
            FutureRecord::<(), _>::to(&topic).payload("poison: not JSON"),
            Duration::from_secs(10),
        )
        .await
        .unwrap()
        .offset;
    assert_eq!(poison_offset, 5);
    upload_events(&app, category, 2, 1, "after").await;
    eventually(Duration::from_secs(30), "all 8 messages read", || async {
        let (_, text) = ingester.get("/metrics").await;
        (metric(&text, "venus_ingester_messages_consumed_total", &[]) >= 8.0).then_some(())
    })
    .await;

    // The broker freezes; ClickHouse comes back: the three rows go in, and
    // the processor reaches the poison message, which Kafka cannot take.
    broker.pause();
    ch.resume();
    let body = eventually(
        Duration::from_secs(60),
        "/readyz 503 for dead letters",
        || async {
            let (status, body) = ingester.get("/readyz").await;
            (status == 503 && body.contains("dead letter has not reached")).then_some(body)
        },
    )
    .await;
    assert!(body.contains(&ns.dead_letter_topic()), "{body}");
    eventually(
        Duration::from_secs(30),
        "the three rows before it",
        || async { (final_count(&ch, &ns, category).await == 5).then_some(()) },
    )
    .await;
    let (_, text) = ingester.get("/metrics").await;
    assert!(
        metric(&text, "venus_ingester_dead_letter_failures_total", &[]) >= 1.0,
        "failures are counted"
    );

    // Killed in that state, then the broker returns: nothing was committed
    // past the poison message.
    ingester.kill();
    broker.resume();
    let offset = common::committed(&broker, &ns.group(), &topic);
    assert!(
        offset.is_none_or(|o| o <= poison_offset),
        "committed {offset:?} past the poison message at {poison_offset}"
    );

    // The next instance sends it to the dead-letter topic and the rest in;
    // started once the group let the dead member go (session.timeout.ms
    // 6000): tansu may leave a member that joins before then without
    // partitions (docs/INGESTER.md).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let ingester = IngesterProcess::start(&env);
    eventually(Duration::from_secs(90), "7 rows", || async {
        (final_count(&ch, &ns, category).await == 7).then_some(())
    })
    .await;
    // At least once: the frozen broker may have held the first instance's
    // request, and written it when it woke, after the instance was gone.
    // Every copy names its source, by which the copies are one.
    let dead = broker.read(&ns.dead_letter_topic(), 2, Duration::from_secs(5));
    assert!(!dead.is_empty(), "the poison message is a dead letter");
    for letter in &dead {
        assert_eq!(
            rdkafka::Message::payload(letter),
            Some(&b"poison: not JSON"[..])
        );
        assert_eq!(
            support::header(letter, "dead_letter.offset").as_deref(),
            Some("5")
        );
        assert_eq!(
            support::header(letter, "dead_letter.topic").as_deref(),
            Some(topic.as_str())
        );
    }
    eventually(Duration::from_secs(30), "/readyz 200", || async {
        (ingester.get("/readyz").await.0 == 200).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "the commit past it", || async {
        (common::committed(&broker, &ns.group(), &topic) == Some(8)).then_some(())
    })
    .await;
}
