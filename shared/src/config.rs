//! The configuration both binaries read: one `config.yaml`, then the
//! environment ([`load_layered`]), each binary into its own settings type.
//!
//! Here are the parts both types hold (`kafka`, with its `security`, and
//! `telemetry`), the error that names a key, and the pass-through maps of
//! librdkafka settings ([`librdkafka_overrides`]). The gateway's `Settings`
//! and the ingester's are each in their own crate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why the configuration could not be loaded; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Source(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl ConfigError {
    /// An invalid value of `key` (for settings checked outside this module,
    /// such as the ingester's).
    pub fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        invalid(key, message)
    }
}

/// Reads `path` as YAML, then applies `VENUS__SECTION__KEY` variables from
/// `env` (`None`: the process environment), into any settings type. Both
/// binaries load the one `config.yaml` through this, each into its own type.
pub fn load_layered<T: serde::de::DeserializeOwned>(
    path: &Path,
    env: Option<std::collections::HashMap<String, String>>,
) -> Result<T, ConfigError> {
    if !path.exists() {
        return Err(invalid(
            "--config",
            format!("file {} does not exist", path.display()),
        ));
    }
    // Values stay the text they were given: a number field still reads
    // "5000" as 5000, but a password, key or group id "0123" stays "0123"
    // (parsing first would make it 123, and "1e3" 1000).
    let environment = config::Environment::with_prefix("VENUS")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(false)
        .source(env.clone().map(|map| map.into_iter().collect()));
    let mut builder = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Yaml))
        .add_source(environment);
    // The list keys take a comma-separated value (the configuration crate
    // splits lists only when it also parses numbers).
    let variables: Vec<(String, String)> = match env {
        Some(map) => map.into_iter().collect(),
        None => std::env::vars().collect(),
    };
    for key in LIST_KEYS {
        let name = format!("VENUS__{}", key.replace('.', "__").to_ascii_uppercase());
        if let Some((_, value)) = variables.iter().find(|(k, _)| *k == name) {
            let items: Vec<String> = value
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect();
            builder = builder.set_override(key, items)?;
        }
    }
    Ok(builder.build()?.try_deserialize()?)
}

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: [&str; 4] = [
    "categories",
    "ingester.clickhouse.replica_urls",
    "server.trusted_proxies",
    "server.cors.allowed_origins",
];

/// What a Kafka message key is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageKey {
    /// No key: the partitioner spreads events.
    None,
    /// The event's server-assigned `backend_id`.
    BackendId,
    /// A field of the batch meta (all events of a batch share a partition).
    MetaField(String),
}

impl MessageKey {
    /// `kafka.key` as configured: `none` (or empty), `backend_id` or
    /// `meta.<field>`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        match value {
            "" | "none" => Ok(Self::None),
            "backend_id" => Ok(Self::BackendId),
            other => match other.strip_prefix("meta.") {
                Some(field) if !field.is_empty() => Ok(Self::MetaField(field.to_owned())),
                _ => Err(invalid(
                    "kafka.key",
                    format!("{other:?} is not one of: none, backend_id, meta.<field>"),
                )),
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap brokers, comma-separated `host:port`.
    pub brokers: String,
    /// Topic per batch; `{category}` is replaced by the batch's category.
    #[serde(default = "defaults::topic_template")]
    pub topic_template: String,
    /// Message key: `none`, `backend_id` or `meta.<field>`.
    #[serde(default, rename = "key")]
    pub key_spec: String,
    #[serde(skip)]
    pub key: Option<MessageKey>,
    /// Longest time an upload waits for Kafka's acknowledgement. The
    /// producer's `message.timeout.ms` is set a little shorter, so librdkafka
    /// gives up on a message before the response reports it failed.
    #[serde(default = "defaults::delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// `compression.type`: none, gzip, snappy, lz4 or zstd.
    #[serde(default = "defaults::compression")]
    pub compression: String,
    /// `linger.ms`: how long the producer waits to fill a batch.
    #[serde(default = "defaults::linger_ms")]
    pub linger_ms: u64,
    /// Largest message (event plus enrichment) the gateway produces; larger
    /// events are answered with code 1003 instead of being sent.
    #[serde(default = "defaults::max_message_bytes")]
    pub max_message_bytes: usize,
    /// Deliveries failing without a success for this long, while a metadata
    /// request succeeds, make venus replace its producer (a fenced or fatal
    /// producer is replaced at once). See the gateway's `kafka::healer`.
    #[serde(default = "defaults::rebuild_after_failing_ms")]
    pub rebuild_after_failing_ms: u64,
    /// Create the topics of `categories` that do not exist yet, at start-up
    /// (needs `categories`; venus never causes a topic to be created
    /// otherwise).
    #[serde(default)]
    pub create_topics: bool,
    /// Partitions of a topic venus creates; -1: the broker's default.
    #[serde(default = "defaults::broker_default")]
    pub topic_partitions: i32,
    /// Replication factor of a topic venus creates; -1: the broker's default.
    #[serde(default = "defaults::broker_default")]
    pub topic_replication: i32,
    /// How every Kafka client of both binaries connects: TLS, SASL,
    /// certificates ([`crate::kafka_security`]).
    #[serde(default)]
    pub security: crate::kafka_security::KafkaSecurity,
    /// Any other librdkafka producer setting, passed through (these win
    /// over the keys above; the security keys belong in `security`, and are
    /// refused here). An `_` in a key is read as `.` (no settable librdkafka
    /// key but `log_level` and `enabled_events` has one), so
    /// `VENUS__KAFKA__PRODUCER__CLIENT_ID=...` sets `client.id`. The keys
    /// venus's guarantees rest on (the gateway's
    /// `config::FORBIDDEN_PRODUCER_KEYS`) cannot be set.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// Producer settings whose value is read from a file at start-up (a
    /// mounted file): `client.id: /etc/venus/client-id`, or
    /// `VENUS__KAFKA__PRODUCER_FILES__CLIENT_ID=/etc/venus/client-id`. Keys
    /// are spelled as in `producer`; a trailing newline of the file is
    /// dropped. After loading, the values are merged into `producer`.
    /// (Passwords belong in `security`.)
    #[serde(default)]
    pub producer_files: BTreeMap<String, PathBuf>,
}

/// librdkafka keys that really have an underscore.
const UNDERSCORE_PRODUCER_KEYS: &[&str] = &["log_level", "enabled_events"];

/// A `kafka.producer` key as librdkafka spells it.
fn librdkafka_key(key: &str) -> String {
    let key = key.trim().to_ascii_lowercase();
    if UNDERSCORE_PRODUCER_KEYS.contains(&key.as_str()) {
        key
    } else {
        key.replace('_', ".")
    }
}

/// A pass-through map of librdkafka settings (`kafka.producer`,
/// `ingester.consumer`) with the values of its `_files` twin read in, keys
/// spelled as librdkafka spells them (`_` from the environment becomes
/// `.`), and none of `forbidden`: the error names the key.
pub fn librdkafka_overrides(
    (section, files_section): (&'static str, &'static str),
    values: &BTreeMap<String, String>,
    files: &BTreeMap<String, PathBuf>,
    forbidden: &[&str],
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut resolved = BTreeMap::new();
    let from_files = files.iter().map(|(key, path)| {
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(
                files_section,
                format!("{key}: cannot read {}: {e}", path.display()),
            )
        })?;
        // Secret files usually end with a newline that is no part of the
        // secret.
        Ok::<_, ConfigError>((key, text.trim_end_matches(['\r', '\n']).to_owned()))
    });
    let inline = values.iter().map(|(key, value)| Ok((key, value.clone())));
    for entry in inline.chain(from_files) {
        let (key, value) = entry?;
        let key = librdkafka_key(key);
        // librdkafka also takes topic-level keys with a `topic.` prefix.
        let bare = key.strip_prefix("topic.").unwrap_or(&key);
        if crate::kafka_security::SECURITY_KEYS.contains(&bare) {
            return Err(invalid(
                section,
                format!(
                    "{key} belongs in kafka.security, which every Kafka client of both binaries uses"
                ),
            ));
        }
        if forbidden.contains(&bare) {
            return Err(invalid(
                section,
                format!(
                    "{key} cannot be overridden: venus sets it to keep its delivery guarantees"
                ),
            ));
        }
        if resolved.insert(key.clone(), value).is_some() {
            return Err(invalid(
                section,
                format!(
                    "{key} is set twice (in {section} and {files_section}, or in two spellings)"
                ),
            ));
        }
    }
    Ok(resolved)
}

impl KafkaSettings {
    /// The base of every Kafka client: the brokers and `security`.
    pub fn client_config(&self) -> rdkafka::config::ClientConfig {
        let mut config = rdkafka::config::ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        self.security.apply(&mut config);
        config
    }

    pub fn key(&self) -> MessageKey {
        self.key.clone().unwrap_or(MessageKey::None)
    }

    pub fn delivery_timeout(&self) -> Duration {
        Duration::from_millis(self.delivery_timeout_ms)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `service.name` of traces and metrics. Empty: `OTEL_SERVICE_NAME`,
    /// else `venus`.
    #[serde(default)]
    pub service_name: String,
    /// `deployment.environment` of traces and metrics.
    #[serde(default = "defaults::environment")]
    pub environment: String,
    /// OTLP/HTTP base URL (like `OTEL_EXPORTER_OTLP_ENDPOINT`); traces go to
    /// `<endpoint>/v1/traces`, metrics to `<endpoint>/v1/metrics`. Empty
    /// means no export (trace context is still propagated to Kafka).
    #[serde(default)]
    pub otlp_endpoint: String,
    /// PEM file of certificate authorities an `https://` endpoint may chain
    /// to, besides the system's roots (`SSL_CERT_FILE`, `SSL_CERT_DIR`).
    #[serde(default)]
    pub otlp_ca_file: Option<PathBuf>,
    /// Push metrics to `<endpoint>/v1/metrics` as well (turn off when the
    /// endpoint only takes traces, as Jaeger's does; `/metrics` is always on).
    #[serde(default = "defaults::otlp_metrics")]
    pub otlp_metrics: bool,
    /// Share of new traces that are sampled (0.0..=1.0); a request that
    /// carries a `traceparent` follows its parent's decision.
    #[serde(default = "defaults::sampling_ratio")]
    pub sampling_ratio: f64,
    /// Spans kept in memory while the collector is slow or away; beyond
    /// that spans are dropped (and counted), uploads never wait.
    #[serde(default = "defaults::span_queue_size")]
    pub span_queue_size: usize,
    /// How often metrics are pushed over OTLP.
    #[serde(default = "defaults::metrics_interval_ms")]
    pub metrics_interval_ms: u64,
    /// Distinct categories given their own metric label; later ones are
    /// counted as `other`, so clients cannot blow up cardinality.
    #[serde(default = "defaults::max_metric_categories")]
    pub max_metric_categories: usize,
    /// `json` or `pretty`.
    #[serde(default = "defaults::log_format")]
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `venus=debug,rdkafka=warn`.
    #[serde(default = "defaults::log_level")]
    pub log_level: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            service_name: String::new(),
            environment: defaults::environment(),
            otlp_endpoint: String::new(),
            otlp_ca_file: None,
            otlp_metrics: defaults::otlp_metrics(),
            sampling_ratio: defaults::sampling_ratio(),
            span_queue_size: defaults::span_queue_size(),
            metrics_interval_ms: defaults::metrics_interval_ms(),
            max_metric_categories: defaults::max_metric_categories(),
            log_format: defaults::log_format(),
            log_level: defaults::log_level(),
        }
    }
}

mod defaults {
    use super::LogFormat;

    pub fn topic_template() -> String {
        "to_analyzer__0.{category}".into()
    }
    pub fn delivery_timeout_ms() -> u64 {
        10_000
    }
    pub fn compression() -> String {
        "lz4".into()
    }
    pub fn linger_ms() -> u64 {
        5
    }
    pub fn max_message_bytes() -> usize {
        1_000_000
    }
    pub fn rebuild_after_failing_ms() -> u64 {
        5_000
    }
    pub fn broker_default() -> i32 {
        -1
    }
    pub fn environment() -> String {
        "development".into()
    }
    pub fn otlp_metrics() -> bool {
        true
    }
    pub fn sampling_ratio() -> f64 {
        1.0
    }
    pub fn span_queue_size() -> usize {
        4096
    }
    pub fn metrics_interval_ms() -> u64 {
        10_000
    }
    pub fn max_metric_categories() -> usize {
        100
    }
    pub fn log_format() -> LogFormat {
        LogFormat::Json
    }
    pub fn log_level() -> String {
        "info".into()
    }
}
