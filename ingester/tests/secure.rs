//! The ingester where people run it: every Kafka client (consumer, admin,
//! dead-letter producer) over TLS to a real TLS endpoint (stunnel in front
//! of tansu) with a CA file the test made with openssl, ClickHouse 18.16
//! over HTTPS with a self-signed CA, wrong CAs named in `/readyz`, and a
//! ClickHouse user that may not run DDL (`manage_schema: false`).

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use common::{count_final_sql, eventually, ingester_env, IngesterProcess, Namespace};
use support::clickhouse::ClickHouseServer;
use support::tls::Pki;
use support::{header, shared_broker, Broker};

/// Waits until `/readyz` answers `status` with a reason containing every
/// one of `words`; returns the reason.
async fn readyz_says(ingester: &IngesterProcess, status: u16, words: &[&str]) -> String {
    eventually(
        Duration::from_secs(60),
        &format!("/readyz {status} with {words:?}"),
        || async move {
            let (code, body) = ingester.get("/readyz").await;
            (code == status && words.iter().all(|w| body.contains(w))).then_some(body)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_and_dead_letters_travel_over_tls_kafka_and_https_clickhouse() {
    let pki = Pki::new("venus");
    let broker = Broker::start_tls(&pki);
    let ch = ClickHouseServer::start_https(&pki);
    let ns = Namespace::new("tls");
    let category = "secure";
    broker.create_topic(&ns.topic(category)).await;
    let mut env = ingester_env(&broker, &ch.https_url(), &ns, IngesterProcess::free_port());
    env.insert(
        "VENUS__INGESTER__CLICKHOUSE__CA_FILE".into(),
        pki.ca().display().to_string(),
    );
    let ingester = IngesterProcess::start(&env);
    ingester.wait_assigned();
    let app = common::gateway(&broker, &ns).await;
    common::upload_events(&app, category, 10, 5, "tls").await;
    eventually(Duration::from_secs(60), "10 rows over HTTPS", || async {
        (ch.count(&count_final_sql(&ns.qualified_table(), category))
            .await
            == 10)
            .then_some(())
    })
    .await;

    // A poison message: the dead-letter producer (and the admin client that
    // created its topic) speak TLS too.
    let producer: FutureProducer = broker.client_config().create().unwrap();
    producer
        .send(
            FutureRecord::<(), _>::to(&ns.topic(category)).payload("this is not JSON"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let dead = broker.read(&ns.dead_letter_topic(), 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1, "the poison message is a dead letter");
    assert_eq!(
        rdkafka::Message::payload(&dead[0]),
        Some(&b"this is not JSON"[..])
    );
    assert!(header(&dead[0], "dead_letter.reason").is_some());
    let (status, body) = ingester.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_ca_that_did_not_sign_the_brokers_certificate_is_named_in_readyz() {
    let pki = Pki::new("venus");
    let other = Pki::new("other");
    let broker = Broker::start_tls(&pki);
    let ch = ClickHouseServer::start();
    let ns = Namespace::new("wrongca");
    let mut env = ingester_env(&broker, &ch.url(), &ns, IngesterProcess::free_port());
    env.insert(
        "VENUS__KAFKA__SECURITY__CA_FILE".into(),
        other.ca().display().to_string(),
    );
    let ingester = IngesterProcess::start(&env);
    let body = readyz_says(&ingester, 503, &["certificate", &broker.address()]).await;
    assert!(body.contains("Kafka consumer"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_clickhouse_whose_ca_is_unknown_is_named_in_readyz() {
    let pki = Pki::new("clickhouse");
    let broker = shared_broker();
    let ch = ClickHouseServer::start_https(&pki);
    let ns = Namespace::new("chca");
    // No CA file: the system's roots do not know the test's CA.
    let env = ingester_env(broker, &ch.https_url(), &ns, IngesterProcess::free_port());
    let ingester = IngesterProcess::start(&env);
    let body = readyz_says(&ingester, 503, &["ClickHouse ping failed", "certificate"]).await;
    assert!(body.contains("UnknownIssuer"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_that_may_only_insert_works_with_manage_schema_off() {
    let broker = shared_broker();
    let ch = ClickHouseServer::start_with_inserter("inserter", "0123e4");
    let ns = Namespace::new("noddl");
    let category = "least";
    broker.create_topic(&ns.topic(category)).await;
    let port = IngesterProcess::free_port();
    let mut env = ingester_env(broker, &ch.url(), &ns, port);
    for (key, value) in [
        ("VENUS__INGESTER__CLICKHOUSE__USER", "inserter"),
        // From the environment, a password stays the text it is.
        ("VENUS__INGESTER__CLICKHOUSE__PASSWORD", "0123e4"),
    ] {
        env.insert(key.into(), value.into());
    }

    // With the schema managed, this user's CREATE is refused, and /readyz
    // says so (the switch is what such a user needs).
    let managed = IngesterProcess::start(&env);
    readyz_says(&managed, 503, &["DDL queries are prohibited"]).await;
    drop(managed);

    env.insert(
        "VENUS__INGESTER__CLICKHOUSE__MANAGE_SCHEMA".into(),
        "false".into(),
    );
    let ingester = IngesterProcess::start(&env);
    // No table yet: named, never created by the ingester.
    readyz_says(&ingester, 503, &["does not exist"]).await;
    // The operator creates it, first without a column the rows need.
    ch.query("CREATE DATABASE IF NOT EXISTS venus").await;
    let ddl = venus_ingester::schema::Schema::single("venus", &ns.table())
        .create_table(venus_ingester::row::Layout::Classic, 0);
    let without = ddl.replace("    request_id String,\n", "");
    assert_ne!(without, ddl, "the DDL has request_id");
    ch.query(&without).await;
    readyz_says(&ingester, 503, &["lacks the columns request_id"]).await;
    ch.query(&format!(
        "ALTER TABLE {} ADD COLUMN request_id String",
        ns.qualified_table()
    ))
    .await;
    // And the marks table beside it.
    readyz_says(&ingester, 503, &["_marks does not exist"]).await;
    ch.query(&venus_ingester::schema::Schema::single("venus", &ns.table()).create_marks())
        .await;
    readyz_says(&ingester, 200, &["ready"]).await;

    let app = common::gateway(broker, &ns).await;
    common::upload_events(&app, category, 6, 3, "least").await;
    eventually(
        Duration::from_secs(60),
        "6 rows by the inserter",
        || async {
            (ch.count(&count_final_sql(&ns.qualified_table(), category))
                .await
                == 6)
                .then_some(())
        },
    )
    .await;
    let logs = ingester.logs();
    assert!(
        logs.iter().all(|line| !line.to_string().contains("0123e4")),
        "the password is never logged"
    );
}
