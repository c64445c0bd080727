//! What the ingester's integration tests share, on top of the gateway's
//! test support (`tests/support`, included by path): the `venus-ingester`
//! binary run as a real process against a real broker and ClickHouse, a
//! test-private topic namespace, and uploads through the real gateway.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{self, free_port, Broker, TestApp};

/// One test's namespace: its own topic template, dead-letter topic, consumer
/// group and table, so tests of one binary never see each other's events.
#[derive(Clone)]
pub struct Namespace {
    pub id: String,
}

impl Namespace {
    pub fn new(prefix: &str) -> Self {
        Self {
            id: format!(
                "{prefix}_{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            ),
        }
    }

    pub fn template(&self) -> String {
        format!("{}.{{category}}", self.id)
    }

    pub fn topic(&self, category: &str) -> String {
        format!("{}.{category}", self.id)
    }

    pub fn dead_letter_topic(&self) -> String {
        format!("{}.__dead_letter", self.id)
    }

    pub fn table(&self) -> String {
        format!("events_{}", self.id)
    }

    /// `venus.<table>`.
    pub fn qualified_table(&self) -> String {
        format!("venus.{}", self.table())
    }

    pub fn group(&self) -> String {
        format!("group_{}", self.id)
    }
}

/// The in-process gateway writing into `namespace`'s topics.
///
/// Its producer puts one message in each record batch: tansu 0.6.0 answers
/// a fetch that starts inside a record batch with the next batch, skipping
/// records (docs/INGESTER.md), and a restarted or resumed consumer starts
/// wherever its last commit or message was. With one record per batch every
/// offset is a batch boundary, so the tests see the ingester, not that bug.
pub async fn gateway(broker: &Broker, namespace: &Namespace) -> TestApp {
    let template = namespace.template();
    let security = broker.security_env();
    let mut overrides: Vec<(&str, &str)> = vec![("VENUS__KAFKA__TOPIC_TEMPLATE", &template)];
    overrides.extend(security.iter().map(|(k, v)| (*k, v.as_str())));
    let mut settings = support::settings(&broker.address(), &overrides);
    settings
        .kafka
        .producer
        .insert("batch.num.messages".into(), "1".into());
    TestApp::spawn(settings).await
}

/// A running `venus-ingester` process; killed on drop.
pub struct IngesterProcess {
    child: Child,
    pub port: u16,
    lines: Arc<Mutex<Vec<Value>>>,
    new_lines: Receiver<Value>,
}

/// The environment of an ingester in `namespace`.
pub fn ingester_env(
    broker: &Broker,
    clickhouse_url: &str,
    namespace: &Namespace,
    port: u16,
) -> HashMap<String, String> {
    [
        ("VENUS__INGESTER__LISTEN", format!("127.0.0.1:{port}")),
        ("VENUS__KAFKA__BROKERS", broker.address()),
        ("VENUS__KAFKA__TOPIC_TEMPLATE", namespace.template()),
        ("VENUS__INGESTER__GROUP_ID", namespace.group()),
        (
            "VENUS__INGESTER__DEAD_LETTER_TOPIC",
            namespace.dead_letter_topic(),
        ),
        (
            "VENUS__INGESTER__CLICKHOUSE__URL",
            clickhouse_url.to_owned(),
        ),
        ("VENUS__INGESTER__CLICKHOUSE__TABLE", namespace.table()),
        ("VENUS__INGESTER__FLUSH_INTERVAL_MS", "200".into()),
        ("VENUS__INGESTER__TOPIC_REFRESH_MS", "1000".into()),
        ("VENUS__INGESTER__SESSION_TIMEOUT_MS", "6000".into()),
        ("VENUS__INGESTER__RETRY_INITIAL_MS", "50".into()),
        ("VENUS__INGESTER__RETRY_MAX_MS", "400".into()),
        ("VENUS__INGESTER__CLICKHOUSE__TIMEOUT_MS", "3000".into()),
        ("VENUS__INGESTER__CLICKHOUSE__PING_TIMEOUT_MS", "500".into()),
        (
            "VENUS__TELEMETRY__LOG_LEVEL",
            "info,rdkafka=off,librdkafka=off".into(),
        ),
    ]
    .into_iter()
    .chain(broker.security_env())
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

impl IngesterProcess {
    /// Starts the binary with `env` and waits until it listens.
    pub fn start(env: &HashMap<String, String>) -> Self {
        let port: u16 = env["VENUS__INGESTER__LISTEN"]
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_venus-ingester"));
        command
            .args([
                "--config",
                &support::repo_root()
                    .join("config.yaml")
                    .display()
                    .to_string(),
            ])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("start venus-ingester");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, new_lines) = channel();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    eprintln!("ingester: {line}");
                    continue;
                };
                kept.lock().unwrap().push(value.clone());
                let _ = tx.send(value);
            }
        });
        let process = Self {
            child,
            port,
            lines,
            new_lines,
        };
        process.wait_for_log("listening", Duration::from_secs(20));
        process
    }

    /// A fresh free port for an ingester.
    pub fn free_port() -> u16 {
        free_port()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for a log line whose `message` is `message`.
    pub fn wait_for_log(&self, message: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        if let Some(line) = self
            .lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l["message"] == message)
        {
            return line.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.new_lines.recv_timeout(left) {
                Ok(line) if line["message"] == message => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line {message:?} within {timeout:?}"),
            }
        }
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until the consumer group gave this instance partitions.
    pub fn wait_assigned(&self) {
        self.wait_for_log("partitions assigned", Duration::from_secs(60));
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::Client::new()
            .get(self.url(path))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("ingester HTTP");
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// SIGTERM, then the exit code (within `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {timeout:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for IngesterProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of a Prometheus sample of `name` whose labels include `labels`
/// (summed over the rest).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// Polls `probe` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Uploads `count` events of `category` in batches of `per_batch`; returns
/// the event ids.
pub async fn upload_events(
    app: &TestApp,
    category: &str,
    count: usize,
    per_batch: usize,
    prefix: &str,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut n = 0;
    while n < count {
        let batch: Vec<Value> = (n..(n + per_batch).min(count))
            .map(|i| serde_json::json!({"id": format!("{prefix}-{i}"), "n": i}))
            .collect();
        ids.extend(batch.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        n += batch.len();
        let document = serde_json::json!({
            "meta": {"app_id": "test-app", "category": category},
            "data": batch,
        });
        let response = app.upload_json(&document.to_string()).await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    ids
}

/// `SELECT count() ... FINAL`: the documented way to count events.
pub fn count_final_sql(table: &str, category: &str) -> String {
    format!("SELECT count() FROM {table} FINAL WHERE category = '{category}'")
}

/// The group's committed offset of partition 0 of `topic` (`None`: none).
pub fn committed(broker: &Broker, group: &str, topic: &str) -> Option<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topic, 0);
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    match committed.find_partition(topic, 0)?.offset() {
        rdkafka::Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}
