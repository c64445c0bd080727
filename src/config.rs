//! Layered configuration: `config.yaml` first, then the environment.
//!
//! Every key can be overridden as `VENUS__<SECTION>__<KEY>`, for example
//! `VENUS__KAFKA__BROKERS=kafka:9092`. Lists (`categories`) take a
//! comma-separated value. The file at the repository root documents every key.
//!
//! Loading checks more than types: [`Settings::load`] rejects values that
//! would only fail later (an unparseable listen address, a zero limit, a
//! topic template without `{category}`), and the error names the key.
//!
//! The loader, the error and the sections the ingester reads too (`kafka`,
//! `telemetry`) are `venus_shared::config`'s, re-exported here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::apps::settings::{AccessPolicy, AppSettings, AuthSettings, RateLimitSettings};

pub use venus_shared::config::{
    librdkafka_overrides, load_layered, ConfigError, KafkaSettings, LogFormat, MessageKey,
    TelemetrySettings,
};

/// An invalid value of `key` ([`ConfigError::invalid`]).
fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, message)
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
    /// gateway accepts it so that one file configures both binaries, and
    /// reads its dead-letter topic, which no upload may write to.
    #[serde(default)]
    pub ingester: IngesterView,
    /// Who may upload: `auth.mode`.
    #[serde(default)]
    pub auth: AuthSettings,
    /// The apps the gateway knows: keys, categories, limits. File only (a
    /// list of objects has no environment form); reloaded on SIGHUP.
    #[serde(default)]
    pub apps: Vec<AppSettings>,
    /// Per-app token buckets for apps without limits of their own.
    #[serde(default)]
    pub rate_limits: RateLimitSettings,
    /// What personal data reaches Kafka, for apps without rules of their
    /// own: the IP mode and field rules (see `privacy`). Reloaded on SIGHUP.
    #[serde(default)]
    pub privacy: crate::privacy::PrivacySettings,
    /// The local spool for events Kafka is not taking (off by default).
    #[serde(default)]
    pub spool: SpoolSettings,
    /// Where these settings were read from, so that SIGHUP can read them
    /// again.
    #[serde(skip)]
    pub origin: Option<ConfigOrigin>,
}

/// `spool`: where events go while Kafka is not taking them (see
/// `crate::spool`). Off by default: the default promise stays "200 means
/// Kafka acknowledged".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolSettings {
    /// Spool events Kafka is not taking, and answer them 0 (`spooled`)
    /// once fsynced, instead of 1004.
    #[serde(default)]
    pub enabled: bool,
    /// The spool's directory (created when missing); one per gateway
    /// process, on a disk that survives a restart.
    #[serde(default = "defaults::spool_path")]
    pub path: PathBuf,
    /// Most bytes of segment files on disk; past it, events Kafka is not
    /// taking are answered 1004 (HTTP 503 with `Retry-After`) as without a
    /// spool.
    #[serde(default = "defaults::spool_max_bytes")]
    pub max_bytes: u64,
    /// Free bytes the spool always leaves on its file system.
    #[serde(default = "defaults::spool_min_free_bytes")]
    pub min_free_bytes: u64,
    /// A segment file is closed (and may be replayed) at this size, or one
    /// second after it was opened.
    #[serde(default = "defaults::spool_segment_bytes")]
    pub segment_bytes: u64,
    /// Most spooled events replayed to Kafka per second, leaving room for
    /// live traffic.
    #[serde(default = "defaults::spool_replay_events_per_sec")]
    pub replay_events_per_sec: u32,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            path: defaults::spool_path(),
            max_bytes: defaults::spool_max_bytes(),
            min_free_bytes: defaults::spool_min_free_bytes(),
            segment_bytes: defaults::spool_segment_bytes(),
            replay_events_per_sec: defaults::spool_replay_events_per_sec(),
        }
    }
}

/// What the gateway reads of the `ingester` section: only the name of the
/// dead-letter topic (every other key is the ingester's to check).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct IngesterView {
    /// `ingester.dead_letter_topic`; absent: the ingester's default.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
}

/// The file and environment a [`Settings`] was loaded from.
#[derive(Clone)]
pub struct ConfigOrigin {
    pub path: PathBuf,
    /// `None`: the process environment.
    pub env: Option<std::collections::HashMap<String, String>>,
}

/// Only the path: the environment may hold secrets.
impl std::fmt::Debug for ConfigOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigOrigin")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// `server.cors`: which web pages may call the upload route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSettings {
    /// Origins (`https://shop.example.com`) whose pages may upload, or
    /// `["*"]` for any. Empty (the default): no CORS headers at all, so
    /// browsers refuse cross-origin uploads.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight answer, in seconds.
    #[serde(default = "defaults::cors_max_age_secs")]
    pub max_age_secs: u64,
}

impl Default for CorsSettings {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_age_secs: defaults::cors_max_age_secs(),
        }
    }
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
    /// Most bytes of a batch's `meta`, which is copied into every event's
    /// Kafka message (400 beyond).
    #[serde(default = "defaults::max_meta_bytes")]
    pub max_meta_bytes: usize,
    /// Uploads processed at once once their body has arrived (parsing and
    /// waiting for Kafka); beyond this the gateway answers 503 at once
    /// instead of queueing. A body still arriving holds no such slot, so slow
    /// clients cannot take them from fast ones.
    #[serde(default = "defaults::max_in_flight_requests")]
    pub max_in_flight_requests: usize,
    /// Memory budget for request bodies, in bytes: what has arrived on the
    /// wire plus the inflated document, held until the upload is answered.
    /// An upload that would pass it is answered 503 at once. With the
    /// producer's queue (256 MiB) and `max_connections` x
    /// (`max_header_bytes` + 8 KiB) of connection buffers, this bounds the
    /// gateway's memory.
    #[serde(default = "defaults::max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// Open connections at most; more are closed as soon as accepted, so
    /// file descriptors and buffers stay bounded.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Open connections one TCP peer (an IPv4 address, an IPv6 /64) may
    /// hold; more from it are closed as soon as accepted, so that one peer
    /// cannot take every connection. Behind a load balancer the balancer is
    /// the peer: raise this to `max_connections` or set 0 (no per-peer
    /// limit) and let the balancer limit its clients.
    #[serde(default = "defaults::max_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// Bytes of `max_in_flight_bytes` one client address (resolved behind
    /// `trusted_proxies`; an IPv6 /64) may hold; its uploads past it are
    /// answered 429. At least twice `max_body_bytes` plus 64 KiB; 0 or a
    /// value at or above `max_in_flight_bytes`: no share per client.
    #[serde(default = "defaults::max_in_flight_bytes_per_client")]
    pub max_in_flight_bytes_per_client: usize,
    /// How long a client has to send its whole body.
    #[serde(default = "defaults::body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// Slowest average body rate accepted, in bytes per second, once
    /// `body_rate_grace_ms` has passed (408 below it); 0 turns the check off.
    /// Frees the connection of a client that trickles its body.
    #[serde(default = "defaults::min_body_rate_bytes_per_sec")]
    pub min_body_rate_bytes_per_sec: u64,
    /// How long a body may arrive at any rate before the minimum applies.
    #[serde(default = "defaults::body_rate_grace_ms")]
    pub body_rate_grace_ms: u64,
    /// How long a body may make no progress at all (not one byte) before it
    /// is answered 408 and its share of the memory budget given back,
    /// whatever its average rate so far.
    #[serde(default = "defaults::body_stall_timeout_ms")]
    pub body_stall_timeout_ms: u64,
    /// How long a client has to send a request's headers (HTTP/1), from the
    /// first byte of the request; the connection is closed after that.
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// How long a keep-alive connection may sit idle between requests before
    /// the gateway closes it. Longer than load balancers keep idle upstream
    /// connections (AWS ALB 60 s, nginx 60 s), so that the balancer, not the
    /// gateway, closes first and never sends a request into a closing socket.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Largest request head (request line plus headers); 431 beyond.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
    /// Proxies (CIDRs or addresses) whose forwarding headers are believed:
    /// from them the client address is found by walking `Forwarded` /
    /// `X-Forwarded-For` from the right past trusted hops (see `client_ip`).
    /// Empty: only the TCP peer counts and forwarding headers are ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The forwarding header the trusted proxies write, and the only one
    /// walked: `x-forwarded-for` (nginx, AWS ALB, HAProxy, Envoy) or
    /// `forwarded` (RFC 7239). A client's own copy of the other is ignored.
    #[serde(default = "defaults::forwarding_header")]
    pub forwarding_header: String,
    /// A header a trusted CDN sets to the client's address (e.g.
    /// `CF-Connecting-IP`, `True-Client-IP`); honoured only from trusted
    /// proxies, before the walk. Empty: none.
    #[serde(default)]
    pub client_ip_header: String,
    /// On SIGTERM, how long `/readyz` answers 503 while the gateway still
    /// serves, before the listener closes: time for a load balancer to take
    /// it out of rotation (set it above the balancer's probe interval).
    #[serde(default)]
    pub shutdown_delay_ms: u64,
    /// After the listener closed, how long in-flight uploads and Kafka
    /// deliveries may take. Shortly before it runs out every upload still in
    /// flight is answered (503, events not acknowledged by then 1004), so no
    /// client is left without a reply.
    #[serde(default = "defaults::shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Cross-origin uploads from web pages.
    #[serde(default)]
    pub cors: CorsSettings,
}

/// Producer keys that carry venus's promises ("0 means acknowledged by all
/// in-sync replicas within the delivery timeout", no implicit topics), so
/// they cannot be overridden through `kafka.producer`.
pub const FORBIDDEN_PRODUCER_KEYS: &[&str] = &[
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "allow.auto.create.topics",
    "transactional.id",
    "enable.gapless.guarantee",
];

/// `kafka.producer` and `kafka.producer_files` as one map of librdkafka
/// settings, or the key that cannot be used.
fn producer_overrides(
    values: &BTreeMap<String, String>,
    files: &BTreeMap<String, PathBuf>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    librdkafka_overrides(
        ("kafka.producer", "kafka.producer_files"),
        values,
        files,
        FORBIDDEN_PRODUCER_KEYS,
    )
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoIpSettings {
    /// The city database: one `.mmdb` file, or an IPv4 and an IPv6 file (a
    /// list, or comma-separated from the environment). GeoIP2/GeoLite2-City
    /// and the flat ip-location-db / DB-IP layout are both read; which one a
    /// file has is found from its records.
    #[serde(deserialize_with = "one_or_many_paths")]
    pub database: Vec<PathBuf>,
    /// How often the files are looked at, in milliseconds; a changed file is
    /// loaded and, if it answers a probe lookup, replaces the old data. 0
    /// turns the look off (SIGHUP still reloads).
    #[serde(default = "defaults::geoip_reload_interval_ms")]
    pub reload_interval_ms: u64,
    /// Slots of the cache of recent lookups (rounded up to a power of two,
    /// in sets of four, the least recently used of a set replaced first; 0:
    /// no cache). Each holds one address and its location, about 130
    /// bytes when taken; a reload starts an empty cache with the new data.
    #[serde(default = "defaults::geoip_cache_entries")]
    pub cache_entries: usize,
    /// How the files are held in memory: `compact` (the default: read
    /// once at load into a compact table of ranges in the heap, the same
    /// memory whatever addresses come, seconds of load for large files),
    /// `cached` (mapped, the whole copy in the page cache, lookups never
    /// wait for the disk, most of the files resident under varied traffic)
    /// or `touched` (mapped, only the pages lookups read: a read from disk
    /// on the serving thread for a lookup into a part of a file not read
    /// before). See `geoip::database::Residency`.
    #[serde(default)]
    pub residency: crate::geoip::Residency,
}

/// A path, a list of paths, or comma-separated paths in one string.
fn one_or_many_paths<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Paths {
        One(String),
        Many(Vec<String>),
    }
    let listed = match Paths::deserialize(deserializer)? {
        Paths::One(text) => text.split(',').map(str::to_owned).collect(),
        Paths::Many(list) => list,
    };
    Ok(listed
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect())
}

mod defaults {
    pub fn spool_path() -> std::path::PathBuf {
        "spool".into()
    }
    pub fn spool_max_bytes() -> u64 {
        1 << 30
    }
    pub fn spool_min_free_bytes() -> u64 {
        256 << 20
    }
    pub fn spool_segment_bytes() -> u64 {
        16 << 20
    }
    pub fn spool_replay_events_per_sec() -> u32 {
        20_000
    }
    pub fn max_body_bytes() -> usize {
        10 * 1024 * 1024
    }
    pub fn max_events_per_batch() -> usize {
        1000
    }
    pub fn max_in_flight_requests() -> usize {
        1024
    }
    pub fn max_meta_bytes() -> usize {
        16 * 1024
    }
    pub fn max_in_flight_bytes() -> usize {
        256 * 1024 * 1024
    }
    pub fn min_body_rate_bytes_per_sec() -> u64 {
        1024
    }
    pub fn body_rate_grace_ms() -> u64 {
        5_000
    }
    pub fn idle_timeout_ms() -> u64 {
        75_000
    }
    pub fn max_header_bytes() -> usize {
        64 * 1024
    }
    pub fn max_connections_per_peer() -> usize {
        512
    }
    pub fn max_in_flight_bytes_per_client() -> usize {
        64 * 1024 * 1024
    }
    pub fn body_stall_timeout_ms() -> u64 {
        10_000
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
    pub fn cors_max_age_secs() -> u64 {
        600
    }
    pub fn shutdown_grace_ms() -> u64 {
        30_000
    }
    pub fn forwarding_header() -> String {
        "x-forwarded-for".into()
    }
    pub fn geoip_cache_entries() -> usize {
        crate::geoip::DEFAULT_CACHE_ENTRIES
    }

    pub fn geoip_reload_interval_ms() -> u64 {
        60_000
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
        let mut settings: Settings = load_layered(path, env.clone())?;
        settings.origin = Some(ConfigOrigin {
            path: path.to_owned(),
            env,
        });
        settings.validated()
    }

    fn validated(mut self) -> Result<Self, ConfigError> {
        if self.spool.enabled {
            for (key, value) in [
                ("spool.max_bytes", self.spool.max_bytes),
                ("spool.segment_bytes", self.spool.segment_bytes),
                (
                    "spool.replay_events_per_sec",
                    u64::from(self.spool.replay_events_per_sec),
                ),
            ] {
                if value == 0 {
                    return Err(invalid(key, "must be greater than 0"));
                }
            }
            // A segment is read whole when it is replayed.
            if self.spool.segment_bytes > 256 << 20
                || self.spool.segment_bytes > self.spool.max_bytes
            {
                return Err(invalid(
                    "spool.segment_bytes",
                    "must be at most 268435456 (256 MiB) and at most spool.max_bytes",
                ));
            }
            if self.spool.path.as_os_str().is_empty() {
                return Err(invalid("spool.path", "must name a directory"));
            }
        }
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
            ("server.max_meta_bytes", self.server.max_meta_bytes),
            (
                "server.max_in_flight_bytes",
                self.server.max_in_flight_bytes,
            ),
            ("kafka.max_message_bytes", self.kafka.max_message_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.server.body_timeout_ms == 0 {
            return Err(invalid("server.body_timeout_ms", "must be greater than 0"));
        }
        // A body is held as it arrived and as the decoded document, and a
        // multipart body may be 64 KiB larger on the wire.
        let one_upload = self
            .server
            .max_body_bytes
            .saturating_mul(2)
            .saturating_add(64 * 1024);
        if self.server.max_in_flight_bytes < one_upload {
            return Err(invalid(
                "server.max_in_flight_bytes",
                format!(
                    "must be at least {one_upload} (twice server.max_body_bytes plus 64 KiB), or the largest upload could never be taken"
                ),
            ));
        }
        let per_client = self.server.max_in_flight_bytes_per_client;
        if per_client != 0 && per_client < one_upload {
            return Err(invalid(
                "server.max_in_flight_bytes_per_client",
                format!(
                    "must be 0 (no share per client) or at least {one_upload} (twice server.max_body_bytes plus 64 KiB), or the largest upload could never be taken"
                ),
            ));
        }
        if self.server.body_stall_timeout_ms == 0 {
            return Err(invalid(
                "server.body_stall_timeout_ms",
                "must be greater than 0",
            ));
        }
        if self.server.max_header_bytes < 1024 {
            return Err(invalid("server.max_header_bytes", "must be at least 1024"));
        }
        if self.server.idle_timeout_ms == 0 {
            return Err(invalid("server.idle_timeout_ms", "must be greater than 0"));
        }
        if self.server.header_read_timeout_ms == 0 {
            return Err(invalid(
                "server.header_read_timeout_ms",
                "must be greater than 0",
            ));
        }
        crate::client_ip::ClientIpResolver::new(
            &self.server.trusted_proxies,
            &self.server.client_ip_header,
            &self.server.forwarding_header,
        )
        .map_err(|e| {
            invalid(
                "server.trusted_proxies / client_ip_header / forwarding_header",
                e,
            )
        })?;
        match self.geoip.database.len() {
            1 | 2 => {}
            n => {
                return Err(invalid(
                    "geoip.database",
                    format!("names {n} files; give one, or an IPv4 and an IPv6 file"),
                ))
            }
        }
        if self.kafka.create_topics && self.categories.is_empty() {
            return Err(invalid(
                "kafka.create_topics",
                "needs `categories`: venus creates the topics of the allowed categories only",
            ));
        }
        for (key, value) in [
            ("kafka.topic_partitions", self.kafka.topic_partitions),
            ("kafka.topic_replication", self.kafka.topic_replication),
        ] {
            if value == 0 || value < -1 {
                return Err(invalid(
                    key,
                    "must be -1 (the broker's default) or at least 1",
                ));
            }
        }
        if self.kafka.rebuild_after_failing_ms == 0 {
            return Err(invalid(
                "kafka.rebuild_after_failing_ms",
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
        self.kafka.producer = producer_overrides(&self.kafka.producer, &self.kafka.producer_files)?;
        self.kafka.producer_files.clear();
        self.kafka.security.resolve()?;
        if !(0.0..=1.0).contains(&self.telemetry.sampling_ratio) {
            return Err(invalid(
                "telemetry.sampling_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.geoip.cache_entries > MAX_GEOIP_CACHE_ENTRIES {
            return Err(invalid(
                "geoip.cache_entries",
                format!("must be at most {MAX_GEOIP_CACHE_ENTRIES} (about 130 bytes each)"),
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
        let policy = self.access_policy()?;
        if let Some(reserved) = self.reserved_category() {
            let named = self.categories.iter().any(|c| c == reserved.as_str())
                || policy
                    .apps
                    .iter()
                    .any(|app| app.categories.contains(reserved.as_str()));
            if named {
                return Err(invalid(
                    "categories",
                    format!(
                        "{:?} would write into the dead-letter topic {:?} (ingester.dead_letter_topic); choose another category or topic",
                        reserved.as_str(),
                        self.dead_letter_topic()
                    ),
                ));
            }
        }
        check_origins(&self.server.cors.allowed_origins)?;
        Ok(self)
    }

    /// The ingester's dead-letter topic, as configured or by default.
    pub fn dead_letter_topic(&self) -> &str {
        self.ingester
            .dead_letter_topic
            .as_deref()
            .unwrap_or(crate::kafka::DEFAULT_DEAD_LETTER_TOPIC)
    }

    /// The category (outside the reserved `__` names) whose topic would be
    /// the dead-letter topic, if `kafka.topic_template` makes one: uploads
    /// of it are refused like those of reserved names.
    pub fn reserved_category(&self) -> Option<crate::domain::Category> {
        crate::kafka::category_of_topic(&self.kafka.topic_template, self.dead_letter_topic())
            .filter(|c| {
                !c.as_str()
                    .starts_with(crate::domain::Category::RESERVED_PREFIX)
            })
    }

    /// `auth`, `apps` and `rate_limits`, parsed.
    pub fn access_policy(&self) -> Result<AccessPolicy, ConfigError> {
        AccessPolicy::parse(
            &self.auth,
            &self.apps,
            &self.rate_limits,
            &self.privacy,
            self.server.max_events_per_batch,
        )
    }

    pub fn listen_addr(&self) -> SocketAddr {
        // Checked in `validated`.
        self.server
            .listen
            .parse()
            .expect("server.listen was validated at load")
    }
}

/// `server.cors.allowed_origins`: `*` alone, or origins as browsers send
/// them (`scheme://host[:port]`, no path, no trailing slash).
/// More slots than this would hold more memory than the database itself.
const MAX_GEOIP_CACHE_ENTRIES: usize = 1 << 20;

fn check_origins(origins: &[String]) -> Result<(), ConfigError> {
    const KEY: &str = "server.cors.allowed_origins";
    if origins.iter().any(|o| o == "*") {
        if origins.len() > 1 {
            return Err(invalid(KEY, "\"*\" allows every origin; list it alone"));
        }
        return Ok(());
    }
    for origin in origins {
        let Some((scheme, rest)) = origin.split_once("://") else {
            return Err(invalid(
                KEY,
                format!("{origin:?} is not an origin like https://shop.example.com"),
            ));
        };
        let host_ok = !rest.is_empty()
            && !rest.contains('/')
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        if !matches!(scheme, "http" | "https") || !host_ok {
            return Err(invalid(
                KEY,
                format!("{origin:?} is not an origin like https://shop.example.com (scheme, host, optional port; no path)"),
            ));
        }
    }
    Ok(())
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

    /// The configuration text of the ConfigMap in deploy/kubernetes.
    fn kubernetes_config_text() -> String {
        let manifest = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/config.yaml"),
        )
        .unwrap();
        manifest
            .lines()
            .skip_while(|line| line.trim() != "config.yaml: |")
            .skip(1)
            .map(|line| line.strip_prefix("    ").unwrap_or(line.trim_start()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_kubernetes_config_map_loads() {
        let f = file(&kubernetes_config_text());
        let settings = Settings::load_with_env(f.path(), env(&[])).unwrap();
        assert_eq!(settings.server.listen, "0.0.0.0:8080");
        assert_eq!(settings.server.max_connections_per_peer, 0);
        assert!(settings.server.shutdown_delay_ms + settings.server.shutdown_grace_ms <= 40_000);
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
    fn the_gateway_still_loads_the_file_with_an_ingester_section() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml");
        Settings::load_with_env(&path, env(&[])).unwrap();
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
        assert_eq!(
            settings.geoip.database,
            vec![PathBuf::from("/data/city.mmdb")]
        );
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
            (
                "VENUS__GEOIP__CACHE_ENTRIES",
                "1048577",
                "geoip.cache_entries",
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

    #[test]
    fn environment_values_are_text_unless_the_field_is_a_number() {
        let f = file(MINIMAL);
        let settings = Settings::load_with_env(
            f.path(),
            env(&[
                ("VENUS__KAFKA__SECURITY__PROTOCOL", "sasl_ssl"),
                ("VENUS__KAFKA__SECURITY__SASL_MECHANISM", "PLAIN"),
                ("VENUS__KAFKA__SECURITY__PASSWORD", "0123"),
                ("VENUS__KAFKA__SECURITY__USERNAME", "1e3"),
                ("VENUS__KAFKA__SECURITY__VERIFY_HOSTNAME", "false"),
                ("VENUS__KAFKA__PRODUCER__CLIENT_ID", "007"),
                ("VENUS__PRIVACY__HASH_KEY", "00012345678901234567"),
                ("VENUS__SERVER__MAX_EVENTS_PER_BATCH", "0050"),
                ("VENUS__KAFKA__CREATE_TOPICS", "false"),
                ("VENUS__TELEMETRY__SAMPLING_RATIO", "0.5"),
            ]),
        )
        .unwrap();
        let security = &settings.kafka.security;
        assert_eq!(security.password.expose(), "0123");
        assert_eq!(security.username, "1e3");
        assert!(!security.verify_hostname);
        assert_eq!(
            settings.kafka.producer.get("client.id").map(String::as_str),
            Some("007")
        );
        assert_eq!(settings.privacy.hash_key.expose(), "00012345678901234567");
        assert_eq!(settings.server.max_events_per_batch, 50);
        assert!(!settings.kafka.create_topics);
        assert_eq!(settings.telemetry.sampling_ratio, 0.5);
        // Every Kafka client of the gateway gets the section.
        let producer = crate::kafka::producer_config(&settings.kafka);
        assert_eq!(producer.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(producer.get("sasl.password"), Some("0123"));
        assert_eq!(
            producer.get("ssl.endpoint.identification.algorithm"),
            Some("none")
        );
        assert_eq!(
            settings.kafka.client_config().get("sasl.username"),
            Some("1e3")
        );
        let debug = format!("{settings:?}");
        assert!(!debug.contains("0123\""), "a secret in Debug: {debug}");
    }

    #[test]
    fn producer_settings_come_from_the_environment_and_files() {
        let secret = file("s3cret\n");
        let password = file("hunter2\n");
        let f = file(MINIMAL);
        let settings = Settings::load_with_env(
            f.path(),
            env(&[
                ("VENUS__KAFKA__PRODUCER__LOG_LEVEL", "3"),
                (
                    "VENUS__KAFKA__PRODUCER_FILES__SSL_KEYSTORE_PASSWORD",
                    secret.path().to_str().unwrap(),
                ),
                ("VENUS__KAFKA__SECURITY__PROTOCOL", "SASL_PLAINTEXT"),
                ("VENUS__KAFKA__SECURITY__SASL_MECHANISM", "scram-sha-512"),
                ("VENUS__KAFKA__SECURITY__USERNAME", "venus"),
                (
                    "VENUS__KAFKA__SECURITY__PASSWORD_FILE",
                    password.path().to_str().unwrap(),
                ),
            ]),
        )
        .unwrap();
        let producer = &settings.kafka.producer;
        assert_eq!(producer.get("log_level").map(String::as_str), Some("3"));
        assert_eq!(
            producer.get("ssl.keystore.password").map(String::as_str),
            Some("s3cret")
        );
        assert!(settings.kafka.producer_files.is_empty());
        assert_eq!(settings.kafka.security.password.expose(), "hunter2");
    }

    #[test]
    fn security_keys_in_the_producer_map_point_to_kafka_security() {
        for key in ["SASL_PASSWORD", "SECURITY_PROTOCOL", "SSL_CA_LOCATION"] {
            let err = load_error(&[(&format!("VENUS__KAFKA__PRODUCER__{key}"), "x")]);
            let dotted = key.to_ascii_lowercase().replace('_', ".");
            assert!(
                err.contains(&format!("{dotted} belongs in kafka.security")),
                "{key}: {err}"
            );
        }
        let err = load_error(&[("VENUS__KAFKA__SECURITY__PROTOCOL", "sasl_ssl")]);
        assert!(
            err.contains("kafka.security") && err.contains("sasl_mechanism"),
            "{err}"
        );
    }

    #[test]
    fn the_keys_behind_the_guarantees_cannot_be_overridden() {
        for key in [
            "ACKS",
            "ENABLE_IDEMPOTENCE",
            "MESSAGE_TIMEOUT_MS",
            "DELIVERY_TIMEOUT_MS",
            "ALLOW_AUTO_CREATE_TOPICS",
            "TOPIC_ACKS",
            "TOPIC_REQUEST_REQUIRED_ACKS",
            "TOPIC_MESSAGE_TIMEOUT_MS",
        ] {
            let err = load_error(&[(&format!("VENUS__KAFKA__PRODUCER__{key}"), "1")]);
            let dotted = key.to_ascii_lowercase().replace('_', ".");
            assert!(err.contains("kafka.producer"), "{err}");
            assert!(err.contains(&dotted), "{key}: {err}");
        }
        // The same from the file.
        let f = file(&MINIMAL.replace(
            "kafka:\n",
            "kafka:\n  producer:\n    request.required.acks: \"1\"\n",
        ));
        let err = Settings::load_with_env(f.path(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("request.required.acks cannot be overridden"),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_secret_file_names_its_key() {
        let err = load_error(&[("VENUS__KAFKA__PRODUCER_FILES__CLIENT_ID", "/nonexistent/s")]);
        assert!(err.contains("kafka.producer_files"), "{err}");
        assert!(err.contains("/nonexistent/s"), "{err}");
    }

    #[test]
    fn the_geoip_database_may_be_two_files() {
        let f = file(&MINIMAL.replace(
            "  database: \"geoip/GeoLite2-City.mmdb\"",
            "  database: [\"a/v4.mmdb\", \"a/v6.mmdb\"]",
        ));
        let settings = Settings::load_with_env(f.path(), env(&[])).unwrap();
        assert_eq!(
            settings.geoip.database,
            vec![PathBuf::from("a/v4.mmdb"), PathBuf::from("a/v6.mmdb")]
        );
        let f = file(MINIMAL);
        let settings = Settings::load_with_env(
            f.path(),
            env(&[("VENUS__GEOIP__DATABASE", "/d/v4.mmdb, /d/v6.mmdb")]),
        )
        .unwrap();
        assert_eq!(
            settings.geoip.database,
            vec![PathBuf::from("/d/v4.mmdb"), PathBuf::from("/d/v6.mmdb")]
        );
        let err = load_error(&[("VENUS__GEOIP__DATABASE", "a,b,c")]);
        assert!(err.contains("geoip.database"), "{err}");
    }

    fn apps_error(yaml: &str) -> String {
        let f = file(&format!("{MINIMAL}{yaml}"));
        Settings::load_with_env(f.path(), env(&[]))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn apps_load_with_digests_categories_and_limits() {
        let digest = crate::apps::keys::KeyDigest::of("k").to_hex();
        let f = file(&format!(
            "{MINIMAL}auth:\n  mode: keys\napps:\n  - app_id: shop\n    keys: [\"{digest}\"]\n    categories: [page_view]\n    limits: {{events_per_sec: 5000}}\n"
        ));
        let policy = Settings::load_with_env(f.path(), env(&[]))
            .unwrap()
            .access_policy()
            .unwrap();
        assert_eq!(policy.mode, crate::apps::settings::AuthMode::Keys);
        assert_eq!(policy.apps[0].limits.events_per_sec, 5000);
        // The burst holds at least a full batch.
        assert_eq!(policy.apps[0].limits.events_burst, 5000);
    }

    #[test]
    fn bad_apps_entries_name_the_entry_and_the_rule() {
        let err = apps_error("apps:\n  - app_id: shop\n    keys: [\"my-secret\"]\n");
        assert!(
            err.contains("apps[0]") && err.contains("keys[0]") && err.contains("hash-key"),
            "{err}"
        );
        assert!(
            !err.contains("my-secret"),
            "the error must not repeat a key in clear: {err}"
        );
        let err = apps_error("apps:\n  - app_id: shop\n  - app_id: shop\n");
        assert!(err.contains("listed twice"), "{err}");
        let err = apps_error("apps:\n  - app_id: \"bad id\"\n");
        assert!(err.contains("apps[0]"), "{err}");
        let err = apps_error("auth:\n  mode: keys\napps:\n  - app_id: shop\n");
        assert!(err.contains("auth.mode"), "{err}");
        let err = apps_error("auth:\n  mode: sometimes\n");
        assert!(err.contains("mode"), "{err}");
        let err =
            apps_error("rate_limits:\n  default:\n    events_per_sec: 10\n    events_burst: 10\n");
        assert!(
            err.contains("rate_limits.default") && err.contains("max_events_per_batch"),
            "{err}"
        );
    }

    #[test]
    fn cors_origins_are_checked() {
        let err = load_error(&[("VENUS__SERVER__CORS__ALLOWED_ORIGINS", "shop.example.com")]);
        assert!(err.contains("server.cors.allowed_origins"), "{err}");
        let err = load_error(&[(
            "VENUS__SERVER__CORS__ALLOWED_ORIGINS",
            "https://a.example/path",
        )]);
        assert!(err.contains("server.cors.allowed_origins"), "{err}");
        let err = load_error(&[(
            "VENUS__SERVER__CORS__ALLOWED_ORIGINS",
            "*,https://a.example",
        )]);
        assert!(err.contains("alone"), "{err}");
        let f = file(MINIMAL);
        let settings = Settings::load_with_env(
            f.path(),
            env(&[(
                "VENUS__SERVER__CORS__ALLOWED_ORIGINS",
                "https://a.example,http://127.0.0.1:8000",
            )]),
        )
        .unwrap();
        assert_eq!(
            settings.server.cors.allowed_origins,
            vec!["https://a.example", "http://127.0.0.1:8000"]
        );
    }
}
