//! Privacy rules as far as the analyst's table: the gateway hashes the
//! client's address and an e-mail field and removes a card number, the
//! ingester inserts the rows, and no column of them holds what was sent,
//! while the location columns are filled. (Kafka, logs, spans and
//! `/metrics`: the gateway's `tests/privacy.rs`.)

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::time::Duration;

use common::{count_final_sql, eventually, ingester_env, IngesterProcess, Namespace};
use support::clickhouse::ClickHouseServer;
use support::{shared_broker, TestApp};

const CLIENT: &str = "81.2.69.142";
const OWN: &str = "89.160.20.112";
const KEY: &str = "an ingester test key of 32 bytes";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_hold_the_stored_address_and_the_rewritten_fields_only() {
    let broker = shared_broker();
    let ch = ClickHouseServer::start();
    let ns = Namespace::new("privacy");
    let category = "private";
    broker.create_topic(&ns.topic(category)).await;
    let ingester = IngesterProcess::start(&ingester_env(
        broker,
        &ch.url(),
        &ns,
        IngesterProcess::free_port(),
    ));
    ingester.wait_assigned();

    let config = support::config_file(
        "privacy:\n  ip: hash\n  fields:\n    - {path: data.email, action: hash}\n    - {path: data.card, action: remove}\n",
    );
    let template = ns.template();
    let mut settings = support::settings_from(
        config.path(),
        &broker.address(),
        &[
            ("VENUS__KAFKA__TOPIC_TEMPLATE", &template),
            ("VENUS__SERVER__TRUSTED_PROXIES", "127.0.0.1"),
            ("VENUS__PRIVACY__HASH_KEY", KEY),
        ],
    );
    settings
        .kafka
        .producer
        .insert("batch.num.messages".into(), "1".into());
    let app = TestApp::spawn(settings).await;
    let body = format!(
        r#"{{"meta":{{"app_id":"shop","category":"{category}"}},"data":[{{"id":"c","email":"jane@example.com","card":"4111111111111111","n":1.50}},{{"id":"o","ip":"{OWN}"}}]}}"#
    );
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("x-forwarded-for", CLIENT)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let sql = count_final_sql(&ns.qualified_table(), category);
    eventually(Duration::from_secs(60), "2 rows", || {
        let sql = sql.clone();
        let ch = &ch;
        async move { (ch.count(&sql).await >= 2).then_some(()) }
    })
    .await;
    let table = ns.qualified_table();
    let text = ch
        .query(&format!(
            "SELECT * FROM {table} FINAL ORDER BY event_id FORMAT JSONEachRow"
        ))
        .await;
    for sent in [CLIENT, OWN, "jane@example.com", "4111111111111111"] {
        assert!(!text.contains(sent), "{sent} is in a row: {text}");
    }
    let rows = ch
        .rows(&format!(
            "SELECT event_id, ip, country, city, data FROM {table} FINAL ORDER BY event_id"
        ))
        .await;
    let key = venus::privacy::HashKey::new(KEY.as_bytes()).unwrap();
    assert_eq!(rows[0]["event_id"], "c");
    assert_eq!(rows[0]["ip"], key.hash(CLIENT.as_bytes()));
    assert_eq!(rows[0]["city"], "London");
    assert_eq!(
        rows[0]["data"],
        format!(
            r#"{{"id":"c","email":"{}","n":1.50}}"#,
            key.hash(b"jane@example.com")
        )
    );
    assert_eq!(rows[1]["event_id"], "o");
    assert_eq!(rows[1]["ip"], key.hash(OWN.as_bytes()));
    assert_eq!(rows[1]["country"], "SE");
    app.stop().await;
    drop(ingester);
}
