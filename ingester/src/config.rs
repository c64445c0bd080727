//! The ingester's settings: the shared `kafka` and `telemetry` sections of
//! `config.yaml` plus its own `ingester:` section.
//!
//! Loaded by the same layered loader as the gateway
//! ([`venus_shared::config::load_layered`]): the file, then
//! `VENUS__SECTION__KEY` variables (`VENUS__INGESTER__BATCH_ROWS`,
//! `VENUS__INGESTER__CLICKHOUSE__URL`). The gateway-only sections (`server`,
//! `geoip`, `categories`) are ignored here; unknown keys inside `ingester:`
//! are errors, and an invalid value names its key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use venus_shared::config::{ConfigError, KafkaSettings, TelemetrySettings};
use venus_shared::secret::Secret;

/// Consumer keys the ingester's promise rests on (a row is committed only
/// once it is in ClickHouse or the dead-letter topic, and no message is
/// skipped): offsets are stored by the ingester alone and committed
/// automatically, a new group starts at the earliest message, and the group
/// and brokers come from their own settings.
pub const FORBIDDEN_CONSUMER_KEYS: &[&str] = &[
    "enable.auto.offset.store",
    "enable.auto.commit",
    "auto.offset.reset",
    "group.id",
    "bootstrap.servers",
    "partition.assignment.strategy",
    "enable.partition.eof",
];

/// Everything the ingester reads from `config.yaml`.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// The gateway's Kafka section: `brokers` and `topic_template` say where
    /// the events are.
    pub kafka: KafkaSettings,
    /// Logs, traces and metrics export, as for the gateway.
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// The ingester's own keys.
    pub ingester: IngesterSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngesterSettings {
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[serde(default = "defaults::listen")]
    pub listen: String,
    /// Kafka consumer group; instances of one group share the partitions.
    #[serde(default = "defaults::group_id")]
    pub group_id: String,
    /// A batch is inserted when it holds this many rows...
    #[serde(default = "defaults::batch_rows")]
    pub batch_rows: usize,
    /// ...or this many bytes of rows (in `RowBinary`)...
    #[serde(default = "defaults::batch_bytes")]
    pub batch_bytes: usize,
    /// ...or when its first row has waited this long, whichever comes first.
    #[serde(default = "defaults::flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Inserts in flight at once. ClickHouse works an insert mostly on one
    /// core, and while one batch is in ClickHouse the next is being filled:
    /// two let both go on at full speed. More only helps a ClickHouse with
    /// cores to spare; each insert makes a part, and too many small parts
    /// make ClickHouse merge more.
    #[serde(default = "defaults::insert_concurrency")]
    pub insert_concurrency: usize,
    /// Messages read but not yet in ClickHouse (or the dead-letter topic)
    /// beyond which fetching pauses; it resumes below half of this.
    #[serde(default = "defaults::max_buffered_rows")]
    pub max_buffered_rows: usize,
    /// The same bound in bytes: fetching pauses when the messages held
    /// (counted twice: each message is kept for the dead-letter path and
    /// copied into its row) reach this, and resumes below half of it. With
    /// ClickHouse away and messages near `kafka.max_message_bytes`, this,
    /// not `max_buffered_rows`, is what keeps the process in its memory
    /// limit; leave it well below the container's limit (librdkafka's
    /// prefetch queue is sized from it too).
    #[serde(default = "defaults::max_buffered_bytes")]
    pub max_buffered_bytes: usize,
    /// Before each insert, ask ClickHouse which of the batch's messages it
    /// has already and insert only the others, so that a message read again
    /// (after a crash, a rebalance, an insert whose answer was lost) is
    /// never a second row, with or without `FINAL`. One small query per
    /// insert (docs/BENCHMARKS.md has its cost); `false` leaves the copies
    /// to `FINAL` and merges.
    #[serde(default = "defaults::deduplicate")]
    pub deduplicate: bool,
    /// When partitions are revoked in a rebalance, wait this long at most
    /// for their messages in flight to be finished before handing them
    /// over, so that their next owner does not insert them a second time.
    #[serde(default = "defaults::revoke_wait_ms")]
    pub revoke_wait_ms: u64,
    /// Topic for messages that can never be inserted.
    #[serde(default = "defaults::dead_letter_topic")]
    pub dead_letter_topic: String,
    /// A dead letter that Kafka has not taken for this long (the topic
    /// cannot be created or written) makes `/readyz` 503 with the reason.
    /// The message is retried meanwhile and never committed past.
    #[serde(default = "defaults::dead_letter_alarm_ms")]
    pub dead_letter_alarm_ms: u64,
    /// On SIGTERM: how long to flush, store and commit before exiting.
    #[serde(default = "defaults::shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// First wait before retrying a failed insert; doubles per attempt.
    #[serde(default = "defaults::retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest wait between two attempts; retries never stop.
    #[serde(default = "defaults::retry_max_ms")]
    pub retry_max_ms: u64,
    /// How often the topic list is refreshed, so that a new category's topic
    /// is consumed without a restart (`topic.metadata.refresh.interval.ms`).
    #[serde(default = "defaults::topic_refresh_ms")]
    pub topic_refresh_ms: u64,
    /// How long the group waits for a silent member (a crashed instance)
    /// before giving its partitions to others (`session.timeout.ms`).
    #[serde(default = "defaults::session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Any other librdkafka consumer setting (fetch sizes, client id),
    /// passed through; from the environment `_` stands for `.`
    /// (`VENUS__INGESTER__CONSUMER__CLIENT_ID`). The keys the at-least-once
    /// design rests on ([`FORBIDDEN_CONSUMER_KEYS`]) cannot be set: start-up
    /// fails, naming the key. TLS and SASL are `kafka.security`'s, which
    /// every Kafka client of both binaries uses.
    #[serde(default)]
    pub consumer: std::collections::BTreeMap<String, String>,
    /// Consumer settings whose value is read from a file at start-up (a
    /// mounted file); merged into `consumer` after loading.
    #[serde(default)]
    pub consumer_files: std::collections::BTreeMap<String, std::path::PathBuf>,
    /// Where the rows go.
    pub clickhouse: ClickHouseSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseSettings {
    /// HTTP interface base URL, e.g. `http://127.0.0.1:8123`.
    #[serde(default = "defaults::clickhouse_url")]
    pub url: String,
    /// Other replicas of the same shard as `url` (cluster mode): when the
    /// server in use fails, the next one in this list takes over, and stays
    /// in use while it answers. Give every ingester of a group the same
    /// order, so that they all write to the same replica while it is up
    /// (docs/INGESTER.md, "Cluster mode"). From the environment, a
    /// comma-separated list.
    #[serde(default)]
    pub replica_urls: Vec<String>,
    /// A cluster of the servers' `remote_servers` (one shard's replicas,
    /// or more shards): the tables are made `ON CLUSTER`, replicated
    /// (`ReplicatedReplacingMergeTree`, with the servers' `{shard}` and
    /// `{replica}` macros), with a `Distributed` table `<table>_all` over
    /// them for queries. Rows are inserted into the replicated table of
    /// `url`'s shard. Unset: one server, no ZooKeeper.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Database, created on start when missing.
    #[serde(default = "defaults::database")]
    pub database: String,
    /// Table, created on start when missing.
    #[serde(default = "defaults::table")]
    pub table: String,
    /// User (HTTP basic authentication).
    #[serde(default = "defaults::user")]
    pub user: String,
    /// Password of `user`; empty for none. Never logged.
    #[serde(default)]
    pub password: Secret,
    /// A file holding the password instead (a mounted secret); a trailing
    /// newline is dropped.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// PEM file of certificate authorities an `https://` URL's certificate
    /// may chain to, besides the system's roots (`SSL_CERT_FILE`,
    /// `SSL_CERT_DIR`); for a private CA or a self-signed server.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Create the database and table at start (and again if they vanish).
    /// `false` for a user that may only insert: the table must then exist
    /// with every column the ingester writes, or `/readyz` says which are
    /// missing.
    #[serde(default = "defaults::manage_schema")]
    pub manage_schema: bool,
    /// Keep rows this many days after their `upload_time`; 0: forever.
    /// A `TTL` on the table (set at start with `manage_schema`, also on a
    /// table made earlier); ClickHouse deletes older rows as it merges.
    /// Needs a server with `TTL` (19.6 and later); on 18.16 `/readyz` says
    /// so: drop old monthly partitions there instead.
    #[serde(default)]
    pub ttl_days: u32,
    /// Timeout of every ClickHouse request (inserts, DDL).
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Timeout of the readiness probe's ping, short so that a hanging
    /// server turns `/readyz` 503 within seconds.
    #[serde(default = "defaults::ping_timeout_ms")]
    pub ping_timeout_ms: u64,
}

/// The longest wait for a revoke's messages in flight.
pub const MAX_REVOKE_WAIT_MS: u64 = 60_000;

/// The longest retention: beyond, `DateTime` arithmetic wraps around.
pub const MAX_TTL_DAYS: u32 = 10_000;

/// More concurrent inserts than this only make parts for ClickHouse to
/// merge.
pub const MAX_INSERT_CONCURRENCY: usize = 16;

mod defaults {
    pub fn listen() -> String {
        "127.0.0.1:8081".into()
    }
    pub fn group_id() -> String {
        "venus-ingester".into()
    }
    pub fn batch_rows() -> usize {
        10_000
    }
    pub fn batch_bytes() -> usize {
        8 * 1024 * 1024
    }
    pub fn flush_interval_ms() -> u64 {
        1_000
    }
    pub fn insert_concurrency() -> usize {
        2
    }
    pub fn max_buffered_rows() -> usize {
        100_000
    }
    pub fn max_buffered_bytes() -> usize {
        256 * 1024 * 1024
    }
    pub fn deduplicate() -> bool {
        true
    }
    pub fn revoke_wait_ms() -> u64 {
        10_000
    }
    pub fn dead_letter_alarm_ms() -> u64 {
        10_000
    }
    pub fn manage_schema() -> bool {
        true
    }
    pub fn dead_letter_topic() -> String {
        venus_shared::message::DEFAULT_DEAD_LETTER_TOPIC.into()
    }
    pub fn shutdown_grace_ms() -> u64 {
        30_000
    }
    pub fn retry_initial_ms() -> u64 {
        100
    }
    pub fn retry_max_ms() -> u64 {
        10_000
    }
    pub fn topic_refresh_ms() -> u64 {
        10_000
    }
    pub fn session_timeout_ms() -> u64 {
        10_000
    }
    pub fn clickhouse_url() -> String {
        "http://127.0.0.1:8123".into()
    }
    pub fn database() -> String {
        "venus".into()
    }
    pub fn table() -> String {
        "events".into()
    }
    pub fn user() -> String {
        "default".into()
    }
    pub fn timeout_ms() -> u64 {
        30_000
    }
    pub fn ping_timeout_ms() -> u64 {
        1_000
    }
}

fn positive(key: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "must be greater than 0"));
    }
    Ok(())
}

/// A ClickHouse identifier we put into DDL and queries unquoted.
fn identifier(key: &'static str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !value.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("{value:?} must match ^[A-Za-z_][A-Za-z0-9_]{{0,63}}$"),
        ))
    }
}

impl Settings {
    /// Reads `path`, then `VENUS__*` variables of the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// Like [`Settings::load`] with an explicit environment (`None`: the
    /// process environment).
    pub fn load_with_env(
        path: &Path,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let settings: Settings = venus_shared::config::load_layered(path, env)?;
        settings.validated()
    }

    fn validated(mut self) -> Result<Self, ConfigError> {
        self.ingester.consumer = venus_shared::config::librdkafka_overrides(
            ("ingester.consumer", "ingester.consumer_files"),
            &self.ingester.consumer,
            &self.ingester.consumer_files,
            FORBIDDEN_CONSUMER_KEYS,
        )?;
        self.ingester.consumer_files.clear();
        self.kafka.security.resolve()?;
        // The revoke's wait holds the poll thread: well below librdkafka's
        // max.poll.interval.ms (300 s), past which the group drops us.
        if self.ingester.revoke_wait_ms > MAX_REVOKE_WAIT_MS {
            return Err(ConfigError::invalid(
                "ingester.revoke_wait_ms",
                format!("must be at most {MAX_REVOKE_WAIT_MS} (the poll thread waits that long in a rebalance)"),
            ));
        }
        let clickhouse = &mut self.ingester.clickhouse;
        if let Some(path) = clickhouse.password_file.take() {
            if !clickhouse.password.is_empty() {
                return Err(ConfigError::invalid(
                    "ingester.clickhouse.password_file",
                    "password and password_file are both set",
                ));
            }
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::invalid(
                    "ingester.clickhouse.password_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            clickhouse.password = Secret::new(text.trim_end_matches(['\r', '\n']));
        }
        let urls = std::iter::once(("ingester.clickhouse.url", &clickhouse.url)).chain(
            clickhouse
                .replica_urls
                .iter()
                .map(|url| ("ingester.clickhouse.replica_urls", url)),
        );
        for (key, url) in urls {
            match url.split_once("://") {
                Some(("http" | "https", rest)) if !rest.is_empty() => {}
                _ => {
                    return Err(ConfigError::invalid(
                        key,
                        format!(
                            "{:?} is not an http:// or https:// URL",
                            venus_shared::secret::redact_urls(url)
                        ),
                    ))
                }
            }
        }
        if let Some(cluster) = &clickhouse.cluster {
            // It goes into DDL as it is.
            if cluster.is_empty()
                || cluster.starts_with(|c: char| c.is_ascii_digit())
                || !cluster
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(ConfigError::invalid(
                    "ingester.clickhouse.cluster",
                    format!("{cluster:?} must be a cluster name of letters, digits and _, not starting with a digit"),
                ));
            }
            // ON CLUSTER DDL waits half of it for the other replicas: the
            // answer must come before the request gives up.
            if clickhouse.timeout_ms < 4_000 {
                return Err(ConfigError::invalid(
                    "ingester.clickhouse.timeout_ms",
                    "must be at least 4000 in cluster mode (ON CLUSTER DDL waits half of it)",
                ));
            }
            if clickhouse.replica_urls.contains(&clickhouse.url) {
                return Err(ConfigError::invalid(
                    "ingester.clickhouse.replica_urls",
                    "lists ingester.clickhouse.url itself",
                ));
            }
        } else if !clickhouse.replica_urls.is_empty() {
            // Failing over between servers that do not replicate each other
            // would split the table (and the marks) in two.
            return Err(ConfigError::invalid(
                "ingester.clickhouse.replica_urls",
                "needs ingester.clickhouse.cluster: replicas of a Replicated table",
            ));
        }
        // `toDateTime(upload_time) + INTERVAL n DAY` past 2106 wraps around
        // in ClickHouse, and every row would be expired at once.
        if clickhouse.ttl_days > MAX_TTL_DAYS {
            return Err(ConfigError::invalid(
                "ingester.clickhouse.ttl_days",
                format!("must be at most {MAX_TTL_DAYS} (ClickHouse's DateTime ends in 2106)"),
            ));
        }
        // A CA file that cannot be used stops start-up, naming the key.
        venus_shared::tls::client_config(
            "ingester.clickhouse.ca_file",
            clickhouse.ca_file.as_deref(),
        )
        .map_err(|e| ConfigError::invalid("ingester.clickhouse.ca_file", e.to_string()))?;
        let ingester = &self.ingester;
        ingester.listen.parse::<SocketAddr>().map_err(|e| {
            ConfigError::invalid("ingester.listen", format!("{:?}: {e}", ingester.listen))
        })?;
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::invalid(
                "kafka.brokers",
                "must name at least one broker",
            ));
        }
        if !self.kafka.topic_template.contains("{category}") {
            return Err(ConfigError::invalid(
                "kafka.topic_template",
                format!("{:?} must contain {{category}}", self.kafka.topic_template),
            ));
        }
        if ingester.group_id.trim().is_empty() {
            return Err(ConfigError::invalid(
                "ingester.group_id",
                "must not be empty",
            ));
        }
        if ingester.dead_letter_topic.trim().is_empty() {
            return Err(ConfigError::invalid(
                "ingester.dead_letter_topic",
                "must not be empty",
            ));
        }
        for (key, value) in [
            ("ingester.batch_rows", ingester.batch_rows as u64),
            ("ingester.batch_bytes", ingester.batch_bytes as u64),
            ("ingester.flush_interval_ms", ingester.flush_interval_ms),
            (
                "ingester.insert_concurrency",
                ingester.insert_concurrency as u64,
            ),
            (
                "ingester.max_buffered_rows",
                ingester.max_buffered_rows as u64,
            ),
            (
                "ingester.max_buffered_bytes",
                ingester.max_buffered_bytes as u64,
            ),
            (
                "ingester.dead_letter_alarm_ms",
                ingester.dead_letter_alarm_ms,
            ),
            ("ingester.shutdown_grace_ms", ingester.shutdown_grace_ms),
            ("ingester.retry_initial_ms", ingester.retry_initial_ms),
            ("ingester.retry_max_ms", ingester.retry_max_ms),
            ("ingester.topic_refresh_ms", ingester.topic_refresh_ms),
            ("ingester.session_timeout_ms", ingester.session_timeout_ms),
            (
                "ingester.clickhouse.timeout_ms",
                ingester.clickhouse.timeout_ms,
            ),
            (
                "ingester.clickhouse.ping_timeout_ms",
                ingester.clickhouse.ping_timeout_ms,
            ),
        ] {
            positive(key, value)?;
        }
        if ingester.insert_concurrency > MAX_INSERT_CONCURRENCY {
            return Err(ConfigError::invalid(
                "ingester.insert_concurrency",
                format!("must be at most {MAX_INSERT_CONCURRENCY}"),
            ));
        }
        if ingester.retry_max_ms < ingester.retry_initial_ms {
            return Err(ConfigError::invalid(
                "ingester.retry_max_ms",
                "must be at least ingester.retry_initial_ms",
            ));
        }
        let url = &ingester.clickhouse.url;
        if !(url.starts_with("http://") || url.starts_with("https://"))
            || reqwest::Url::parse(url).is_err()
        {
            return Err(ConfigError::invalid(
                "ingester.clickhouse.url",
                format!("{url:?} is not an http:// or https:// URL"),
            ));
        }
        identifier(
            "ingester.clickhouse.database",
            &ingester.clickhouse.database,
        )?;
        identifier("ingester.clickhouse.table", &ingester.clickhouse.table)?;
        Ok(self)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.ingester
            .listen
            .parse()
            .expect("ingester.listen was validated at load")
    }
}

impl IngesterSettings {
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    fn repo_config() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.yaml")
    }

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn the_kubernetes_config_map_loads() {
        let manifest = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/config.yaml"),
        )
        .unwrap();
        let text = manifest
            .lines()
            .skip_while(|line| line.trim() != "config.yaml: |")
            .skip(1)
            .map(|line| line.strip_prefix("    ").unwrap_or(line.trim_start()))
            .collect::<Vec<_>>()
            .join("\n");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        let settings = Settings::load_with_env(file.path(), env(&[])).unwrap();
        assert_eq!(settings.ingester.listen, "0.0.0.0:8081");
        // The pod's terminationGracePeriodSeconds (45) is longer.
        assert!(settings.ingester.shutdown_grace_ms <= 40_000);
    }

    #[test]
    fn consumer_keys_behind_the_offset_design_cannot_be_overridden() {
        for (variable, key) in [
            (
                "VENUS__INGESTER__CONSUMER__ENABLE_AUTO_OFFSET_STORE",
                "enable.auto.offset.store",
            ),
            (
                "VENUS__INGESTER__CONSUMER__ENABLE_AUTO_COMMIT",
                "enable.auto.commit",
            ),
            (
                "VENUS__INGESTER__CONSUMER__AUTO_OFFSET_RESET",
                "auto.offset.reset",
            ),
            ("VENUS__INGESTER__CONSUMER__GROUP_ID", "group.id"),
        ] {
            let error = Settings::load_with_env(&repo_config(), env(&[(variable, "true")]))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("ingester.consumer") && error.contains(key),
                "{variable}: {error}"
            );
        }
    }

    #[test]
    fn consumer_settings_and_secrets_come_from_the_environment_or_files_as_text() {
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "0123\n").unwrap();
        let clickhouse_secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(clickhouse_secret.path(), "0789\n").unwrap();
        let settings = Settings::load_with_env(
            &repo_config(),
            env(&[
                ("VENUS__INGESTER__CONSUMER__CLIENT_ID", "0123"),
                (
                    "VENUS__INGESTER__CONSUMER_FILES__SSL_KEYSTORE_PASSWORD",
                    secret.path().to_str().unwrap(),
                ),
                ("VENUS__INGESTER__GROUP_ID", "007"),
                ("VENUS__KAFKA__SECURITY__PROTOCOL", "SASL_PLAINTEXT"),
                ("VENUS__KAFKA__SECURITY__SASL_MECHANISM", "SCRAM-SHA-256"),
                ("VENUS__KAFKA__SECURITY__USERNAME", "1e3"),
                ("VENUS__KAFKA__SECURITY__PASSWORD", "0456"),
                (
                    "VENUS__INGESTER__CLICKHOUSE__PASSWORD_FILE",
                    clickhouse_secret.path().to_str().unwrap(),
                ),
            ]),
        )
        .unwrap();
        let consumer = &settings.ingester.consumer;
        assert_eq!(consumer.get("client.id").map(String::as_str), Some("0123"));
        assert_eq!(
            consumer.get("ssl.keystore.password").map(String::as_str),
            Some("0123")
        );
        assert_eq!(settings.ingester.group_id, "007");
        assert!(settings.ingester.consumer_files.is_empty());
        // The consumer gets the shared security section.
        let config = crate::consumer::consumer_config(&settings);
        assert_eq!(config.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(config.get("sasl.username"), Some("1e3"));
        assert_eq!(config.get("sasl.password"), Some("0456"));
        assert_eq!(settings.ingester.clickhouse.password.expose(), "0789");
        let debug = format!("{settings:?}");
        for secret in ["0456", "0789"] {
            assert!(!debug.contains(secret), "a secret in Debug: {debug}");
        }
    }

    #[test]
    fn a_retention_past_2106_is_refused() {
        let error = Settings::load_with_env(
            &repo_config(),
            env(&[("VENUS__INGESTER__CLICKHOUSE__TTL_DAYS", "36500")]),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("ingester.clickhouse.ttl_days"), "{error}");
        let settings = Settings::load_with_env(
            &repo_config(),
            env(&[("VENUS__INGESTER__CLICKHOUSE__TTL_DAYS", "400")]),
        )
        .unwrap();
        assert_eq!(settings.ingester.clickhouse.ttl_days, 400);
    }

    #[test]
    fn replicas_need_a_cluster_and_come_from_the_environment_as_a_list() {
        let error = Settings::load_with_env(
            &repo_config(),
            env(&[("VENUS__INGESTER__CLICKHOUSE__REPLICA_URLS", "http://b:8123")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("ingester.clickhouse.replica_urls")
                && error.contains("ingester.clickhouse.cluster"),
            "{error}"
        );
        let error = Settings::load_with_env(
            &repo_config(),
            env(&[("VENUS__INGESTER__CLICKHOUSE__CLUSTER", "a; DROP TABLE x")]),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("ingester.clickhouse.cluster"), "{error}");
        let error = Settings::load_with_env(
            &repo_config(),
            env(&[
                ("VENUS__INGESTER__CLICKHOUSE__CLUSTER", "venus"),
                (
                    "VENUS__INGESTER__CLICKHOUSE__REPLICA_URLS",
                    "http://b:8123, ftp://c",
                ),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("ingester.clickhouse.replica_urls") && error.contains("ftp://c"),
            "{error}"
        );
        let settings = Settings::load_with_env(
            &repo_config(),
            env(&[
                ("VENUS__INGESTER__CLICKHOUSE__CLUSTER", "venus_2"),
                (
                    "VENUS__INGESTER__CLICKHOUSE__REPLICA_URLS",
                    "http://b:8123, https://c:8443",
                ),
            ]),
        )
        .unwrap();
        let clickhouse = &settings.ingester.clickhouse;
        assert_eq!(clickhouse.cluster.as_deref(), Some("venus_2"));
        assert_eq!(
            clickhouse.replica_urls,
            vec!["http://b:8123".to_owned(), "https://c:8443".to_owned()]
        );
    }

    #[test]
    fn security_keys_in_the_consumer_map_point_to_kafka_security() {
        let error = Settings::load_with_env(
            &repo_config(),
            env(&[("VENUS__INGESTER__CONSUMER__SASL_PASSWORD", "x")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("sasl.password belongs in kafka.security"),
            "{error}"
        );
    }

    #[test]
    fn the_repository_config_file_loads_with_the_documented_defaults() {
        let settings = Settings::load_with_env(&repo_config(), env(&[])).unwrap();
        let ingester = &settings.ingester;
        assert_eq!(ingester.group_id, "venus-ingester");
        assert_eq!(ingester.dead_letter_topic, "to_analyzer__0.__dead_letter");
        assert_eq!(ingester.clickhouse.database, "venus");
        assert_eq!(ingester.clickhouse.table, "events");
        assert_eq!(settings.kafka.topic_template, "to_analyzer__0.{category}");
    }

    #[test]
    fn environment_overrides_every_kind_of_key() {
        let settings = Settings::load_with_env(
            &repo_config(),
            env(&[
                ("VENUS__INGESTER__LISTEN", "0.0.0.0:9999"),
                ("VENUS__INGESTER__GROUP_ID", "g2"),
                ("VENUS__INGESTER__BATCH_ROWS", "7"),
                ("VENUS__INGESTER__BATCH_BYTES", "1234"),
                ("VENUS__INGESTER__FLUSH_INTERVAL_MS", "50"),
                ("VENUS__INGESTER__INSERT_CONCURRENCY", "3"),
                ("VENUS__INGESTER__DEAD_LETTER_TOPIC", "dlq"),
                ("VENUS__INGESTER__SHUTDOWN_GRACE_MS", "777"),
                ("VENUS__INGESTER__CLICKHOUSE__URL", "http://ch:8123"),
                ("VENUS__INGESTER__CLICKHOUSE__DATABASE", "db2"),
                ("VENUS__INGESTER__CLICKHOUSE__TABLE", "t2"),
                ("VENUS__INGESTER__CLICKHOUSE__USER", "u"),
                ("VENUS__INGESTER__CLICKHOUSE__PASSWORD", "123"),
                ("VENUS__KAFKA__BROKERS", "k:1"),
            ]),
        )
        .unwrap();
        let i = &settings.ingester;
        assert_eq!(i.listen, "0.0.0.0:9999");
        assert_eq!(i.group_id, "g2");
        assert_eq!(i.batch_rows, 7);
        assert_eq!(i.batch_bytes, 1234);
        assert_eq!(i.flush_interval_ms, 50);
        assert_eq!(i.insert_concurrency, 3);
        assert_eq!(i.dead_letter_topic, "dlq");
        assert_eq!(i.shutdown_grace_ms, 777);
        assert_eq!(i.clickhouse.url, "http://ch:8123");
        assert_eq!(i.clickhouse.database, "db2");
        assert_eq!(i.clickhouse.table, "t2");
        assert_eq!(i.clickhouse.user, "u");
        assert_eq!(i.clickhouse.password.expose(), "123");
        assert_eq!(settings.kafka.brokers, "k:1");
    }

    #[test]
    fn invalid_values_name_their_key() {
        for (var, value, key) in [
            ("VENUS__INGESTER__LISTEN", "nope", "ingester.listen"),
            ("VENUS__INGESTER__BATCH_ROWS", "0", "ingester.batch_rows"),
            (
                "VENUS__INGESTER__INSERT_CONCURRENCY",
                "0",
                "ingester.insert_concurrency",
            ),
            (
                "VENUS__INGESTER__INSERT_CONCURRENCY",
                "17",
                "ingester.insert_concurrency",
            ),
            ("VENUS__INGESTER__BATCH_ROWS", "many", "batch_rows"),
            (
                "VENUS__INGESTER__FLUSH_INTERVAL_MS",
                "0",
                "ingester.flush_interval_ms",
            ),
            ("VENUS__INGESTER__GROUP_ID", " ", "ingester.group_id"),
            (
                "VENUS__INGESTER__CLICKHOUSE__URL",
                "ch:8123",
                "ingester.clickhouse.url",
            ),
            (
                "VENUS__INGESTER__CLICKHOUSE__TABLE",
                "a;drop",
                "ingester.clickhouse.table",
            ),
            (
                "VENUS__INGESTER__RETRY_MAX_MS",
                "1",
                "ingester.retry_max_ms",
            ),
        ] {
            let err = Settings::load_with_env(&repo_config(), env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn gateway_sections_are_ignored_but_unknown_ingester_keys_are_errors() {
        let mut file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        file.write_all(
            b"server:\n  whatever: 1\nkafka:\n  brokers: b:1\ningester:\n  nope: 1\n  clickhouse: {}\n",
        )
        .unwrap();
        let err = Settings::load_with_env(file.path(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }
}
