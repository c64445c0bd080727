//! A current ClickHouse, next to the 18.16 the other tests run: PyPI's
//! `chdb` (the ClickHouse 26.x engine in process, `ingester/tests/
//! current_clickhouse.py`) runs what the ingester generates for a current
//! server: the DDL of the current layout (`DateTime64`, `LowCardinality`)
//! and of the marks table, rows written by the ingester's own row writer in
//! `RowBinary` and read back column by column, the deduplication lookup and
//! the marks, and every query of README.md and the docs. The same queries
//! run on 18.16 against the classic layout. docs/INGESTER.md says what this
//! does and does not prove.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::Path;

use opentelemetry::trace::SpanContext;
use serde_json::Value;

use support::clickhouse::ClickHouseServer;
use venus_ingester::batch::{Batch, Limits, Rows};
use venus_ingester::record::{Record, Source};
use venus_ingester::row::Layout;

/// Every `SELECT` in a fenced code block of README.md, docs/INGESTER.md,
/// docs/PRIVACY.md and compose/README.md: in SQL blocks up to the `;` or
/// the block's end, in shell blocks up to the closing quote. A `FORMAT`
/// clause is left out (each engine is asked for its own).
fn documented_queries() -> Vec<(String, String)> {
    let root = support::repo_root();
    let mut queries = Vec::new();
    for file in [
        "README.md",
        "docs/INGESTER.md",
        "docs/PRIVACY.md",
        "compose/README.md",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut in_block = false;
        let mut block = String::new();
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                if in_block {
                    queries.extend(selects(&block).into_iter().map(|q| (file.to_owned(), q)));
                    block.clear();
                }
                in_block = !in_block;
                continue;
            }
            if in_block {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    queries
}

fn selects(block: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = block;
    while let Some(at) = rest.find("SELECT ") {
        let tail = &rest[at..];
        let end = tail.find([';', '"']).unwrap_or(tail.len());
        let mut query = tail[..end].trim().to_owned();
        if let Some(format) = query.find(" FORMAT ") {
            query.truncate(format);
        }
        let query = query.split_whitespace().collect::<Vec<_>>().join(" ");
        // `(...)` and `…` stand for what a reader fills in.
        if !query.contains("...") && !query.contains('…') {
            found.push(query);
        }
        rest = &tail[end.min(tail.len())..];
        if rest.is_empty() {
            break;
        }
        rest = &rest[1.min(rest.len())..];
    }
    found
}

const MESSAGES: [&str; 3] = [
    r#"{"backend_id":"0190a0e0-0000-7000-8000-000000000001","upload_time":1700000005678,"ip":"81.2.69.142","country":"GB","region":"ENG","city":"London","meta":{"app_id":"shop","category":"page_view","v":1.50},"data":{"id":"e1","timestamp":1700000000123,"n":1.50}}"#,
    r#"{"backend_id":"0190a0e0-0000-7000-8000-000000000002","upload_time":1700000006000,"ip":"","meta":{"app_id":"shop","category":"page_view"},"data":{"id":7}}"#,
    r#"{"backend_id":"0190a0e0-0000-7000-8000-000000000003","upload_time":1700086400000,"ip":"::1","meta":{"app_id":"other","category":"click"},"data":{"id":"e\u00e9"}}"#,
];

/// The ingester's rows of [`MESSAGES`] in `layout`.
fn rows(layout: Layout) -> Rows {
    let mut batch = Batch::new(Limits {
        rows: 100,
        bytes: 1 << 20,
        interval: std::time::Duration::from_secs(1),
    });
    for (offset, message) in MESSAGES.iter().enumerate() {
        let source = Source {
            topic: "to_analyzer__0.page_view".into(),
            partition: 2,
            offset: offset as i64 + 40,
            epoch: 1,
        };
        let traceparent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".as_slice();
        let record = Record::new(
            source,
            message.as_bytes(),
            None,
            [
                ("request_id", Some(b"req-1".as_slice())),
                ("traceparent", Some(traceparent)),
            ],
        );
        batch
            .push_with(record, SpanContext::empty_context(), |out, record| {
                venus_ingester::row::write_row(out, record, 1_700_000_100, layout)
            })
            .unwrap();
    }
    batch.take()
}

fn structure(layout: Layout) -> String {
    layout
        .columns()
        .iter()
        .map(|(name, kind)| format!("{name} {kind}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn a_current_clickhouse_takes_the_schema_the_rows_and_every_documented_query() {
    let queries = documented_queries();
    assert!(queries.len() >= 5, "{queries:?}");
    let layout = Layout::Current;
    let rows = rows(layout);
    let dir = tempfile::tempdir().unwrap();
    let rows_file = dir.path().join("rows.bin");
    std::fs::write(&rows_file, rows.body()).unwrap();
    let all = vec![true; rows.len()];
    let spec = serde_json::json!({
        "ddl": [
            "CREATE DATABASE IF NOT EXISTS venus",
            // With a retention (ten years: the rows are from 2023).
            venus_ingester::schema::Schema::single("venus", "events").create_table(layout, 3_650),
            venus_ingester::schema::Schema::single("venus", "events").create_marks(),
        ],
        "structure": structure(layout),
        "rows": rows_file.display().to_string(),
        "presence": venus_ingester::dedup::presence_sql("venus", "events", &rows, &all, layout)[0],
        "marks_write": venus_ingester::clickhouse::marks_write_sql("venus", "events", "g", &[("t", 2, 140)]),
        "marks_read": venus_ingester::clickhouse::marks_read_sql("venus", "events", "g", "t", 2),
        "queries": queries.iter().map(|(_, q)| q).collect::<Vec<_>>(),
    });
    let input = dir.path().join("input.json");
    std::fs::write(&input, spec.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/current_clickhouse.py");
    let output = std::process::Command::new("python3")
        .arg(&script)
        .arg(&input)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "chdb (pip install chdb; scripts/install-deps installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let version = report["version"].as_str().unwrap();
    let major: u32 = version.split('.').next().unwrap().parse().unwrap();
    assert!(major >= 24, "a current engine: {version}");
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");

    // The rows, column by column.
    let got = report["rows"].as_array().unwrap();
    assert_eq!(got.len(), 3, "{report}");
    let first = &got[0];
    for (column, wanted) in [
        (
            "backend_id_text",
            serde_json::json!("0190a0e0-0000-7000-8000-000000000001"),
        ),
        ("app_id", serde_json::json!("shop")),
        ("category", serde_json::json!("page_view")),
        ("event_id", serde_json::json!("e1")),
        ("upload_ms", serde_json::json!(1_700_000_005_678i64)),
        ("upload_time", serde_json::json!("2023-11-14 22:13:25.678")),
        ("client_time", serde_json::json!("2023-11-14 22:13:20.123")),
        ("ip", serde_json::json!("81.2.69.142")),
        ("country", serde_json::json!("GB")),
        ("region", serde_json::json!("ENG")),
        ("city", serde_json::json!("London")),
        (
            "meta",
            serde_json::json!(r#"{"app_id":"shop","category":"page_view","v":1.50}"#),
        ),
        (
            "data",
            serde_json::json!(r#"{"id":"e1","timestamp":1700000000123,"n":1.50}"#),
        ),
        ("request_id", serde_json::json!("req-1")),
        (
            "trace_id",
            serde_json::json!("4bf92f3577b34da6a3ce929d0e0e4736"),
        ),
        ("kafka_topic", serde_json::json!("to_analyzer__0.page_view")),
        ("kafka_partition", serde_json::json!(2)),
        ("ingested_at", serde_json::json!("2023-11-14 22:15:00")),
    ] {
        // Numbers may come as text (64-bit integers are quoted).
        let value = &first[column];
        let same = value == &wanted || value.as_str() == Some(wanted.to_string().as_str());
        assert!(same, "{column}: {value} (wanted {wanted}) in {first}");
    }
    assert_eq!(got[1]["event_id"], "7", "a numeric id as its text");
    assert!(got[1]["client_time"].is_null());
    assert_eq!(got[2]["event_id"], "eé");
    // The deduplication lookup finds every row it asks for, by identity.
    let presence = report["presence"].as_array().unwrap();
    assert_eq!(presence.len(), 3, "{report}");
    assert!(presence
        .iter()
        .any(|p| p["day"] == "2023-11-15" && p["event_id"] == "eé"));
    assert_eq!(report["marks"].as_str().unwrap(), "140\t1");
    for query in report["queries"].as_array().unwrap() {
        assert_eq!(query["ok"], true, "{query}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_18_16_takes_every_documented_query_too() {
    let queries = documented_queries();
    let ch = ClickHouseServer::start();
    let layout = Layout::Classic;
    ch.query("CREATE DATABASE IF NOT EXISTS venus").await;
    ch.query(&venus_ingester::schema::Schema::single("venus", "events").create_table(layout, 0))
        .await;
    let rows = rows(layout);
    let response = reqwest::Client::new()
        .post(format!(
            "{}/?query={}",
            ch.url(),
            "INSERT%20INTO%20venus.events%20FORMAT%20RowBinary"
        ))
        .body(rows.body())
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
    assert_eq!(ch.count("SELECT count() FROM venus.events").await, 3);
    for (file, query) in &queries {
        let response = reqwest::Client::new()
            .post(format!("{}/", ch.url()))
            .body(query.clone())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(status.is_success(), "{file}: {query}: {body}");
    }
}
