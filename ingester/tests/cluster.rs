//! Cluster mode on a real cluster: two `clickhouse-server` processes
//! (Debian's 18.16) as two replicas of one shard over a real ZooKeeper
//! (Debian's package). The ingester makes its tables `ON CLUSTER`
//! (replicated, plus the Distributed `<table>_all`); one replica is killed
//! with -9 while events stream in; ingestion goes on on the other; when the
//! killed one is back, both hold every event, once.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::time::Duration;

use common::{eventually, ingester_env, upload_events, IngesterProcess, Namespace};
use support::clickhouse::{ClickHouseCluster, ClickHouseServer};
use support::shared_broker;

/// (rows, distinct event ids, rows with `FINAL`) of `category` on one
/// replica; zeros while the table is not there (or the replica is down).
async fn counts(replica: &ClickHouseServer, ns: &Namespace, category: &str) -> (u64, u64, u64) {
    let table = ns.qualified_table();
    let answer = reqwest::Client::new()
        .post(format!("{}/", replica.url()))
        .timeout(Duration::from_secs(10))
        .body(format!(
            "SELECT (SELECT count() FROM {table} WHERE category = '{category}'), \
             (SELECT uniqExact(event_id) FROM {table} WHERE category = '{category}'), \
             (SELECT count() FROM {table} FINAL WHERE category = '{category}') FORMAT TSV"
        ))
        .send()
        .await;
    let Ok(response) = answer else {
        return (0, 0, 0);
    };
    if !response.status().is_success() {
        return (0, 0, 0);
    }
    let text = response.text().await.unwrap_or_default();
    let numbers: Vec<u64> = text
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    match numbers[..] {
        [rows, ids, fin] => (rows, ids, fin),
        _ => (0, 0, 0),
    }
}

/// The events whose id starts with `prefix` on one replica.
async fn with_prefix(replica: &ClickHouseServer, ns: &Namespace, prefix: &str) -> u64 {
    replica
        .count(&format!(
            "SELECT count() FROM {} WHERE startsWith(event_id, '{prefix}-')",
            ns.qualified_table()
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_loses_nothing_and_doubles_nothing() {
    let broker = shared_broker();
    let mut cluster = ClickHouseCluster::start(2);
    let ns = Namespace::new("cluster");
    let category = "stream";
    broker.create_topic(&ns.topic(category)).await;
    let mut env = ingester_env(
        broker,
        &cluster.replicas[0].url(),
        &ns,
        IngesterProcess::free_port(),
    );
    env.insert(
        "VENUS__INGESTER__CLICKHOUSE__CLUSTER".into(),
        ClickHouseCluster::NAME.into(),
    );
    env.insert(
        "VENUS__INGESTER__CLICKHOUSE__REPLICA_URLS".into(),
        cluster.replicas[1].url(),
    );
    env.insert("VENUS__INGESTER__BATCH_ROWS".into(), "20".into());
    env.insert(
        "VENUS__INGESTER__CLICKHOUSE__TIMEOUT_MS".into(),
        "4000".into(),
    );
    let mut ingester = IngesterProcess::start(&env);
    ingester.wait_assigned();
    let app = common::gateway(broker, &ns).await;

    // The tables, made ON CLUSTER: replicated on both replicas, and the
    // Distributed one for queries.
    upload_events(&app, category, 100, 20, "a").await;
    for replica in &cluster.replicas {
        eventually(
            Duration::from_secs(60),
            "the first 100 on a replica",
            || async { (counts(replica, &ns, category).await == (100, 100, 100)).then_some(()) },
        )
        .await;
        let engines = replica
            .query(&format!(
                "SELECT name, engine FROM system.tables WHERE database = 'venus' AND name LIKE '{}%' ORDER BY name FORMAT TSV",
                ns.table()
            ))
            .await;
        let table = ns.table();
        assert_eq!(
            engines,
            format!("{table}\tReplicatedReplacingMergeTree\n{table}_all\tDistributed\n{table}_marks\tReplicatedReplacingMergeTree\n")
        );
        assert_eq!(
            replica
                .count(&format!(
                    "SELECT count() FROM {}_all FINAL WHERE category = '{category}'",
                    ns.qualified_table()
                ))
                .await,
            100
        );
    }

    // A stream of events; the replica in use is killed in its middle.
    let streaming = {
        let app = common::gateway(broker, &ns).await;
        tokio::spawn(async move {
            for wave in 0..20 {
                upload_events(&app, category, 20, 20, &format!("b{wave}")).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let failover = "ClickHouse replica failed; the next one takes over";
    let said = |ingester: &IngesterProcess, message: &str| {
        ingester
            .logs()
            .iter()
            .any(|line| line["message"] == message)
    };
    assert!(!said(&ingester, failover), "a failover before the kill");
    // Mid-stream: part of the stream is in, part is not.
    let before_kill = counts(&cluster.replicas[0], &ns, category).await.0;
    assert!(
        (100..500).contains(&before_kill),
        "{before_kill} rows at the kill"
    );
    cluster.replicas[0].kill();
    streaming.await.unwrap();
    ingester.wait_for_log(
        "ClickHouse replica failed; the next one takes over",
        Duration::from_secs(30),
    );

    // Events sent while it is down reach the other replica.
    upload_events(&app, category, 200, 20, "c").await;
    eventually(
        Duration::from_secs(60),
        "the events sent after the kill on the live replica",
        || async { (with_prefix(&cluster.replicas[1], &ns, "c").await == 200).then_some(()) },
    )
    .await;
    let (status, body) = ingester.get("/readyz").await;
    assert_eq!(status, 200, "{body}");

    // An ingester killed and started again while the first replica is
    // still down: it moves on to the live one at start, needs no DDL there
    // (ON CLUSTER would wait for the dead replica), and goes on.
    ingester.kill();
    drop(ingester);
    // tansu gives a member that joins before the killed one's session
    // ended no partitions (as in crash.rs).
    tokio::time::sleep(Duration::from_secs(8)).await;
    env.insert(
        "VENUS__INGESTER__LISTEN".into(),
        format!("127.0.0.1:{}", IngesterProcess::free_port()),
    );
    let ingester = IngesterProcess::start(&env);
    ingester.wait_assigned();
    upload_events(&app, category, 100, 20, "d").await;
    eventually(
        Duration::from_secs(60),
        "the events sent to the restarted ingester on the live replica",
        || async { (with_prefix(&cluster.replicas[1], &ns, "d").await == 100).then_some(()) },
    )
    .await;
    let (status, body) = ingester.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !said(
            &ingester,
            "a ClickHouse replica has not run the DDL yet; it will when it is back"
        ),
        "the restarted ingester ran ON CLUSTER DDL"
    );

    // The killed replica comes back: both hold every event, once (rows,
    // distinct ids and FINAL agree: nothing was inserted twice).
    cluster.replicas[0].restart();
    let total = 100 + 400 + 200 + 100;
    for replica in &cluster.replicas {
        eventually(
            Duration::from_secs(120),
            "every event on both replicas",
            || async {
                let counts = counts(replica, &ns, category).await;
                (counts == (total, total, total)).then_some(())
            },
        )
        .await;
    }
}
