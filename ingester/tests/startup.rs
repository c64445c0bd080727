//! The ingester binary refuses, at start-up, a configuration that would
//! break its promise, and says which key: a consumer setting that would let
//! offsets be committed before the rows are in ClickHouse.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo_config() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.yaml")
}

#[test]
fn a_forbidden_consumer_key_fails_start_up_naming_it() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_venus-ingester"))
        .arg("--config")
        .arg(repo_config())
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env(
            "VENUS__INGESTER__CONSUMER__ENABLE_AUTO_OFFSET_STORE",
            "true",
        )
        .env("VENUS__INGESTER__LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start venus-ingester");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the ingester started with enable.auto.offset.store set");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!status.success(), "{said}");
    assert!(
        said.contains("ingester.consumer") && said.contains("enable.auto.offset.store"),
        "{said}"
    );
}

#[test]
fn print_schema_prints_the_statements_and_connects_to_nothing() {
    for (layout, wanted) in [
        ("current", "upload_time DateTime64(3, 'UTC')"),
        ("classic", "upload_time DateTime,"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_venus-ingester"))
            .arg("--config")
            .arg(repo_config())
            .args(["--print-schema", layout])
            // Nothing listens there: printing must not need it.
            .env("VENUS__KAFKA__BROKERS", "127.0.0.1:1")
            .env("VENUS__INGESTER__CLICKHOUSE__URL", "http://127.0.0.1:1")
            .env("VENUS__INGESTER__CLICKHOUSE__TABLE", "mine")
            .output()
            .expect("run venus-ingester");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{text}");
        assert!(
            text.contains("CREATE DATABASE IF NOT EXISTS venus;"),
            "{text}"
        );
        assert!(
            text.contains("CREATE TABLE IF NOT EXISTS venus.mine ("),
            "{text}"
        );
        assert!(text.contains(wanted), "{layout}: {text}");
        assert!(
            text.contains("CREATE TABLE IF NOT EXISTS venus.mine_marks ("),
            "{text}"
        );
        assert!(!text.contains("ON CLUSTER"), "{text}");
    }
    // Cluster mode: the same, replicated ON CLUSTER, and the Distributed
    // table.
    let output = Command::new(env!("CARGO_BIN_EXE_venus-ingester"))
        .arg("--config")
        .arg(repo_config())
        .args(["--print-schema", "current"])
        .env("VENUS__KAFKA__BROKERS", "127.0.0.1:1")
        .env("VENUS__INGESTER__CLICKHOUSE__URL", "http://127.0.0.1:1")
        .env(
            "VENUS__INGESTER__CLICKHOUSE__REPLICA_URLS",
            "http://127.0.0.1:2",
        )
        .env("VENUS__INGESTER__CLICKHOUSE__CLUSTER", "analytics")
        .env("VENUS__INGESTER__CLICKHOUSE__TABLE", "mine")
        .output()
        .expect("run venus-ingester");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    for wanted in [
        "CREATE DATABASE IF NOT EXISTS venus ON CLUSTER analytics;",
        "CREATE TABLE IF NOT EXISTS venus.mine ON CLUSTER analytics (",
        "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/venus/mine', '{replica}', ingested_at)",
        "CREATE TABLE IF NOT EXISTS venus.mine_marks ON CLUSTER analytics (",
        "CREATE TABLE IF NOT EXISTS venus.mine_all ON CLUSTER analytics AS venus.mine ENGINE = Distributed(analytics, venus, mine);",
    ] {
        assert!(text.contains(wanted), "{wanted}: {text}");
    }
}
