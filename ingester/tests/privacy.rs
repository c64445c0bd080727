//! Privacy rules as far as the analyst's table: for each IP mode the
//! gateway stores the client's address and an event's own `ip` as the mode
//! says and hashes, masks and removes fields by rule; the ingester inserts
//! the rows, and no column of them holds what was sent, while the location
//! columns are filled. (Kafka, logs, spans and `/metrics`: the gateway's
//! `tests/privacy.rs`.)

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

/// The in-process gateway of `ns` with `privacy.ip: mode` and three field
/// rules, trusting the test as its proxy.
async fn gateway(ns: &Namespace, mode: &str) -> (TestApp, tempfile::NamedTempFile) {
    let config = support::config_file(&format!(
        "privacy:\n  ip: {mode}\n  fields:\n    - {{path: data.email, action: hash}}\n    - {{path: data.card, action: remove}}\n    - {{path: data.phone, action: mask}}\n"
    ));
    let template = ns.template();
    let mut settings = support::settings_from(
        config.path(),
        &shared_broker().address(),
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
    (TestApp::spawn(settings).await, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_hold_the_stored_address_and_the_rewritten_fields_only() {
    let broker = shared_broker();
    let ch = ClickHouseServer::start();
    let ns = Namespace::new("privacy");
    let modes = ["truncate", "hash", "drop"];
    for mode in modes {
        broker.create_topic(&ns.topic(mode)).await;
    }
    let ingester = IngesterProcess::start(&ingester_env(
        broker,
        &ch.url(),
        &ns,
        IngesterProcess::free_port(),
    ));
    ingester.wait_assigned();

    let key = venus::privacy::HashKey::new(KEY.as_bytes()).unwrap();
    let table = ns.qualified_table();
    for mode in modes {
        let (app, _config) = gateway(&ns, mode).await;
        let body = format!(
            r#"{{"meta":{{"app_id":"shop","category":"{mode}"}},"data":[{{"id":"c","email":"jane@example.com","card":"4111111111111111","phone":"+44 20 7946 0958","n":1.50}},{{"id":"o","ip":"{OWN}"}}]}}"#
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
        assert_eq!(response.status(), 200, "{mode}");
        let sql = count_final_sql(&table, mode);
        eventually(
            Duration::from_secs(60),
            &format!("2 rows of {mode}"),
            || {
                let sql = sql.clone();
                let ch = &ch;
                async move { (ch.count(&sql).await >= 2).then_some(()) }
            },
        )
        .await;
        let text = ch
            .query(&format!(
                "SELECT * FROM {table} FINAL WHERE category = '{mode}' FORMAT JSONEachRow"
            ))
            .await;
        for sent in [
            CLIENT,
            OWN,
            "jane@example.com",
            "4111111111111111",
            "7946 0958",
        ] {
            assert!(!text.contains(sent), "{mode}: {sent} is in a row: {text}");
        }
        let rows = ch
            .rows(&format!(
                "SELECT event_id, ip, country, city, data FROM {table} FINAL WHERE category = '{mode}' ORDER BY event_id"
            ))
            .await;
        let (client_ip, own_ip) = match mode {
            "truncate" => ("81.2.69.0".to_owned(), "89.160.20.0".to_owned()),
            "hash" => (key.hash(CLIENT.as_bytes()), key.hash(OWN.as_bytes())),
            _ => (String::new(), String::new()),
        };
        assert_eq!(rows[0]["event_id"], "c");
        assert_eq!(rows[0]["ip"], client_ip, "{mode}");
        assert_eq!(
            rows[0]["city"], "London",
            "{mode}: located before it was reduced"
        );
        assert_eq!(
            rows[0]["data"],
            format!(
                r#"{{"id":"c","email":"{}","phone":"{}","n":1.50}}"#,
                key.hash(b"jane@example.com"),
                "*".repeat(16)
            ),
            "{mode}"
        );
        assert_eq!(rows[1]["event_id"], "o");
        assert_eq!(rows[1]["ip"], own_ip, "{mode}");
        assert_eq!(rows[1]["country"], "SE", "{mode}");
        let own_in_data = match mode {
            "drop" => r#"{"id":"o"}"#.to_owned(),
            _ => format!(r#"{{"id":"o","ip":"{own_ip}"}}"#),
        };
        assert_eq!(rows[1]["data"], own_in_data, "{mode}");
        app.stop().await;
    }
    drop(ingester);
}
