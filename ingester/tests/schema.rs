//! The table over time: a column a later version added appears at start on
//! a table an earlier version made, and a retention the server cannot keep
//! (`ttl_days` on 18.16, which has no `TTL`) is named in `/readyz` instead
//! of failing in silence. (A table without a column the writer needs, with
//! `manage_schema: false`, is `secure.rs`'s.)

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::time::Duration;

use common::{
    count_final_sql, eventually, ingester_env, upload_events, IngesterProcess, Namespace,
};
use support::clickhouse::ClickHouseServer;
use support::shared_broker;
use venus_ingester::row::Layout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_a_later_version_added_appears_on_an_older_table() {
    let broker = shared_broker();
    let ch = ClickHouseServer::start();
    let ns = Namespace::new("evolve");
    let category = "evolving";
    broker.create_topic(&ns.topic(category)).await;
    // The table as an earlier version made it: without `trace_id`.
    ch.query("CREATE DATABASE IF NOT EXISTS venus").await;
    let ddl = venus_ingester::schema::Schema::single("venus", &ns.table())
        .create_table(Layout::Classic, 0);
    let older = ddl.replace("    trace_id String,\n", "");
    assert_ne!(older, ddl);
    ch.query(&older).await;
    let ingester = IngesterProcess::start(&ingester_env(
        broker,
        &ch.url(),
        &ns,
        IngesterProcess::free_port(),
    ));
    let added = ingester.wait_for_log("column added", Duration::from_secs(60));
    assert_eq!(added["column"], "trace_id", "{added}");
    ingester.wait_assigned();
    let app = common::gateway(broker, &ns).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .body(format!(
            r#"{{"meta":{{"app_id":"a","category":"{category}"}},"data":[{{"id":"x1"}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    upload_events(&app, category, 4, 4, "more").await;
    let sql = count_final_sql(&ns.qualified_table(), category);
    eventually(Duration::from_secs(60), "5 rows", || async {
        (ch.count(&sql).await == 5).then_some(())
    })
    .await;
    let rows = ch
        .rows(&format!(
            "SELECT trace_id FROM {} WHERE event_id = 'x1'",
            ns.qualified_table()
        ))
        .await;
    assert_eq!(rows[0]["trace_id"], trace_id, "the added column is filled");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_18_16_cannot_keep_is_named_in_readyz() {
    let broker = shared_broker();
    let ch = ClickHouseServer::start();
    let ns = Namespace::new("ttl");
    let mut env = ingester_env(broker, &ch.url(), &ns, IngesterProcess::free_port());
    env.insert("VENUS__INGESTER__CLICKHOUSE__TTL_DAYS".into(), "30".into());
    let ingester = IngesterProcess::start(&env);
    let body = eventually(
        Duration::from_secs(60),
        "/readyz naming ttl_days",
        || async {
            let (status, body) = ingester.get("/readyz").await;
            (status == 503 && body.contains("ttl_days needs ClickHouse 19.6")).then_some(body)
        },
    )
    .await;
    assert!(body.contains("DROP PARTITION"), "{body}");
}
