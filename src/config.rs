//! Layered configuration: `config.yaml` first, then the environment.
//!
//! Every key can be overridden as `VENUS__<SECTION>__<KEY>`, for example
//! `VENUS__KAFKA__BROKERS=kafka:9092`. Lists (`categories`) take a
//! comma-separated value. The file at the repository root documents every key.
//!
//! Loading checks more than types: [`Settings::load`] rejects values that
//! would only fail later (an unparseable listen address, a zero limit, a
//! topic template without `{category}`), and the error names the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
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
    let environment = config::Environment::with_prefix("VENUS")
        .prefix_separator("__")
        .separator("__")
        .list_separator(",")
        .with_list_parse_key("categories")
        .try_parsing(true)
        .source(env.map(|map| map.into_iter().collect()));
    Ok(config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Yaml))
        .add_source(environment)
        .build()?
        .try_deserialize()?)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    /// Categories a batch may use. Empty means any category that matches
    /// `^[A-Za-z0-9_]{1,64}$`.
    #[serde(default)]
    pub categories: Vec<String>,
    pub kafka: KafkaSettings,
    pub geoip: GeoIpSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// The ingester's section (`venus-ingester` reads and checks it); the
    /// gateway accepts it so that one file configures both binaries.
    #[serde(default)]
    pub ingester: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address and port the HTTP server binds, e.g. `0.0.0.0:8080`.
    pub listen: String,
    /// Largest request body accepted, counted after gzip decompression.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// Most events one batch may carry.
    #[serde(default = "defaults::max_events_per_batch")]
    pub max_events_per_batch: usize,
    /// Uploads processed at once; beyond this the gateway answers 503 at
    /// once instead of queueing, which keeps memory bounded.
    #[serde(default = "defaults::max_in_flight_requests")]
    pub max_in_flight_requests: usize,
    /// Open connections at most; more are closed as soon as accepted, so
    /// file descriptors and buffers stay bounded.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// How long a client has to send its whole body.
    #[serde(default = "defaults::body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// How long a client has to send a request's headers (HTTP/1); the
    /// connection is closed after that.
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Header holding the original client address when the gateway runs
    /// behind a proxy (e.g. `X-Forwarded-For`; its last address, the one the
    /// proxy appended, is used). Empty means the TCP peer address.
    #[serde(default)]
    pub client_ip_header: String,
    /// How long a shutdown waits for in-flight uploads and Kafka deliveries.
    #[serde(default = "defaults::shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

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
    fn parse(value: &str) -> Result<Self, ConfigError> {
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
    /// Any other librdkafka producer setting, passed through as is (these
    /// win over the keys above).
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
}

impl KafkaSettings {
    pub fn key(&self) -> MessageKey {
        self.key.clone().unwrap_or(MessageKey::None)
    }

    pub fn delivery_timeout(&self) -> Duration {
        Duration::from_millis(self.delivery_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoIpSettings {
    /// Path of a GeoIP2/GeoLite2-City `.mmdb` file.
    pub database: PathBuf,
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

    pub fn max_body_bytes() -> usize {
        10 * 1024 * 1024
    }
    pub fn max_events_per_batch() -> usize {
        1000
    }
    pub fn max_in_flight_requests() -> usize {
        1024
    }
    pub fn max_connections() -> usize {
        4096
    }
    pub fn body_timeout_ms() -> u64 {
        30_000
    }
    pub fn header_read_timeout_ms() -> u64 {
        10_000
    }
    pub fn shutdown_grace_ms() -> u64 {
        30_000
    }
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

impl Settings {
    /// Reads `path`, then applies `VENUS__*` variables from the process
    /// environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// Like [`Settings::load`] with an explicit environment (for tests);
    /// `None` reads the process environment.
    pub fn load_with_env(
        path: &Path,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let settings: Settings = load_layered(path, env)?;
        settings.validated()
    }

    fn validated(mut self) -> Result<Self, ConfigError> {
        self.server
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| invalid("server.listen", format!("{:?}: {e}", self.server.listen)))?;
        for (key, value) in [
            ("server.max_body_bytes", self.server.max_body_bytes),
            (
                "server.max_events_per_batch",
                self.server.max_events_per_batch,
            ),
            (
                "server.max_in_flight_requests",
                self.server.max_in_flight_requests,
            ),
            ("server.max_connections", self.server.max_connections),
            ("kafka.max_message_bytes", self.kafka.max_message_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.server.body_timeout_ms == 0 {
            return Err(invalid("server.body_timeout_ms", "must be greater than 0"));
        }
        if self.server.header_read_timeout_ms == 0 {
            return Err(invalid(
                "server.header_read_timeout_ms",
                "must be greater than 0",
            ));
        }
        if self.kafka.delivery_timeout_ms == 0 {
            return Err(invalid(
                "kafka.delivery_timeout_ms",
                "must be greater than 0",
            ));
        }
        for category in &self.categories {
            crate::domain::Category::parse(category)
                .map_err(|e| invalid("categories", format!("{category:?}: {e}")))?;
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one broker"));
        }
        if !self.kafka.topic_template.contains("{category}") {
            return Err(invalid(
                "kafka.topic_template",
                format!("{:?} must contain {{category}}", self.kafka.topic_template),
            ));
        }
        if !matches!(
            self.kafka.compression.as_str(),
            "none" | "gzip" | "snappy" | "lz4" | "zstd"
        ) {
            return Err(invalid(
                "kafka.compression",
                format!(
                    "{:?} is not one of none, gzip, snappy, lz4, zstd",
                    self.kafka.compression
                ),
            ));
        }
        self.kafka.key = Some(MessageKey::parse(&self.kafka.key_spec)?);
        if !(0.0..=1.0).contains(&self.telemetry.sampling_ratio) {
            return Err(invalid(
                "telemetry.sampling_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.telemetry.span_queue_size == 0 {
            return Err(invalid(
                "telemetry.span_queue_size",
                "must be greater than 0",
            ));
        }
        if self.telemetry.metrics_interval_ms == 0 {
            return Err(invalid(
                "telemetry.metrics_interval_ms",
                "must be greater than 0",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level)
            .map_err(|e| invalid("telemetry.log_level", e.to_string()))?;
        Ok(self)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        // Checked in `validated`.
        self.server
            .listen
            .parse()
            .expect("server.listen was validated at load")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        file.write_all(contents.as_bytes()).unwrap();
        file
    }

    const MINIMAL: &str = r#"
server:
  listen: "127.0.0.1:8080"
kafka:
  brokers: "localhost:9092"
geoip:
  database: "geoip/GeoLite2-City.mmdb"
"#;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn the_repository_config_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml");
        let settings = Settings::load_with_env(&path, env(&[])).unwrap();
        assert_eq!(settings.kafka.topic_template, "to_analyzer__0.{category}");
        assert_eq!(settings.kafka.key(), MessageKey::None);
        assert_eq!(settings.server.max_events_per_batch, 1000);
        assert_eq!(settings.server.max_body_bytes, 10 * 1024 * 1024);
    }

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        let f = file(MINIMAL);
        let settings = Settings::load_with_env(f.path(), env(&[])).unwrap();
        assert_eq!(settings.kafka.compression, "lz4");
        assert_eq!(settings.kafka.linger_ms, 5);
        assert_eq!(settings.telemetry.service_name, "");
        assert!(settings.categories.is_empty());
    }

    #[test]
    fn environment_overrides_the_file() {
        let f = file(MINIMAL);
        let settings = Settings::load_with_env(
            f.path(),
            env(&[
                ("VENUS__SERVER__LISTEN", "0.0.0.0:9999"),
                ("VENUS__KAFKA__BROKERS", "a:1,b:2"),
                ("VENUS__GEOIP__DATABASE", "/data/city.mmdb"),
                ("VENUS__SERVER__MAX_EVENTS_PER_BATCH", "50"),
                ("VENUS__KAFKA__KEY", "meta.app_id"),
                ("VENUS__CATEGORIES", "page_view,click"),
                ("VENUS__TELEMETRY__LOG_FORMAT", "pretty"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.server.listen, "0.0.0.0:9999");
        assert_eq!(settings.kafka.brokers, "a:1,b:2");
        assert_eq!(settings.geoip.database, PathBuf::from("/data/city.mmdb"));
        assert_eq!(settings.server.max_events_per_batch, 50);
        assert_eq!(settings.kafka.key(), MessageKey::MetaField("app_id".into()));
        assert_eq!(settings.categories, vec!["page_view", "click"]);
        assert_eq!(settings.telemetry.log_format, LogFormat::Pretty);
    }

    fn load_error(extra_env: &[(&str, &str)]) -> String {
        let f = file(MINIMAL);
        Settings::load_with_env(f.path(), env(extra_env))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn invalid_values_name_their_key() {
        for (var, value, key) in [
            ("VENUS__SERVER__LISTEN", "not an address", "server.listen"),
            (
                "VENUS__SERVER__MAX_BODY_BYTES",
                "0",
                "server.max_body_bytes",
            ),
            (
                "VENUS__KAFKA__TOPIC_TEMPLATE",
                "fixed",
                "kafka.topic_template",
            ),
            ("VENUS__KAFKA__KEY", "random", "kafka.key"),
            ("VENUS__KAFKA__COMPRESSION", "brotli", "kafka.compression"),
            ("VENUS__CATEGORIES", "ok,not-ok", "categories"),
            (
                "VENUS__TELEMETRY__SAMPLING_RATIO",
                "2",
                "telemetry.sampling_ratio",
            ),
        ] {
            let err = load_error(&[(var, value)]);
            assert!(err.contains(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let err = load_error(&[("VENUS__SERVER__MAX_BODY_BYTES", "lots")]);
        assert!(err.contains("max_body_bytes"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_an_error() {
        let f = file(&format!("{MINIMAL}\nserver2:\n  x: 1\n"));
        let err = Settings::load_with_env(f.path(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("server2"), "{err}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = Settings::load_with_env(Path::new("/nonexistent/venus.yaml"), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/venus.yaml"), "{err}");
    }
}
