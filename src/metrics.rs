//! The gateway's counters and histograms, on the OpenTelemetry meter API.
//!
//! The same instruments are read two ways (see `telemetry`): scraped as
//! Prometheus text at `GET /metrics`, and pushed over OTLP when an endpoint is
//! configured. Names follow OpenTelemetry; Prometheus sees them with dots as
//! underscores and unit/`_total` suffixes (`venus.uploads` is
//! `venus_uploads_total`).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider, UpDownCounter};
use opentelemetry::KeyValue;

use axum::http::StatusCode;

use crate::wire::{PartCode, Reply};

/// `type` values of `venus.uploads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadType {
    /// Every upload request.
    All,
    /// Rejected for its meta or body (malformed, too large, wrong type).
    WrongMeta,
    /// At least one event failed validation.
    WrongData,
    /// Every event accepted.
    Success,
    /// Some events accepted, some not.
    Partial,
    /// At least one event was not acknowledged by Kafka.
    KafkaError,
    /// Shed at once: the gateway was at `server.max_in_flight_requests`.
    Overloaded,
    /// Refused for its key or app (401, 403).
    Unauthorized,
    /// Refused 429: an app's or a client address's rate limit, or the
    /// client address's share of the body memory.
    RateLimited,
}

impl UploadType {
    pub const ALL: [UploadType; 9] = [
        Self::All,
        Self::WrongMeta,
        Self::WrongData,
        Self::Success,
        Self::Partial,
        Self::KafkaError,
        Self::Overloaded,
        Self::Unauthorized,
        Self::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all_upload",
            Self::WrongMeta => "wrong_meta",
            Self::WrongData => "wrong_data",
            Self::Success => "success_upload",
            Self::Partial => "partial_upload",
            Self::KafkaError => "kafka_error",
            Self::Overloaded => "overloaded",
            Self::Unauthorized => "unauthorized",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// `result` values of `venus.events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventResult {
    Accepted,
    Invalid,
    Failed,
}

impl EventResult {
    const ALL: [EventResult; 3] = [Self::Accepted, Self::Invalid, Self::Failed];

    fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Invalid => "invalid",
            Self::Failed => "failed",
        }
    }
}

/// Keeps the `category` label bounded: configured categories are always
/// their own label; otherwise the first `cap` distinct categories are, and
/// any later one is counted as `other`.
struct CategoryLabels {
    allowed: HashSet<String>,
    seen: RwLock<HashSet<String>>,
    cap: usize,
}

impl CategoryLabels {
    const OTHER: &'static str = "other";

    fn label(&self, category: &str) -> String {
        if !self.allowed.is_empty() {
            return if self.allowed.contains(category) {
                category.to_owned()
            } else {
                Self::OTHER.to_owned()
            };
        }
        if self
            .seen
            .read()
            .map(|seen| seen.contains(category))
            .unwrap_or(false)
        {
            return category.to_owned();
        }
        let Ok(mut seen) = self.seen.write() else {
            return Self::OTHER.to_owned();
        };
        if seen.contains(category) || seen.len() < self.cap {
            seen.insert(category.to_owned());
            category.to_owned()
        } else {
            Self::OTHER.to_owned()
        }
    }
}

struct Instruments {
    uploads: Counter<u64>,
    events: Counter<u64>,
    request_duration: Histogram<f64>,
    produce_duration: Histogram<f64>,
    active_requests: UpDownCounter<i64>,
    geoip_lookups: Counter<u64>,
    geoip_cache: Counter<u64>,
    delivery_errors: Counter<u64>,
    panics: Counter<u64>,
    producer_restarts: Counter<u64>,
    missing_topic: Counter<u64>,
    geoip_reloads: Counter<u64>,
    auth_checks: Counter<u64>,
    rate_limited: Counter<u64>,
    config_reloads: Counter<u64>,
    connections_refused: Counter<u64>,
    body_stalls: Counter<u64>,
    categories: CategoryLabels,
}

/// A cheap, cloneable handle on the instruments.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Instruments>,
}

/// Bucket bounds in seconds for request and produce latency: fine-grained
/// where a gateway lives (1 ms to 1 s), coarse up to the delivery timeout.
const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new(provider: &dyn MeterProviderRef, categories: &[String], cap: usize) -> Self {
        let meter = provider.venus_meter();
        Self::from_meter(&meter, categories, cap)
    }

    /// Instruments that record nowhere, for unit tests of single handlers.
    pub fn noop() -> Self {
        let meter = opentelemetry::metrics::noop::NoopMeterProvider::new().meter("venus");
        Self::from_meter(&meter, &[], 0)
    }

    fn from_meter(meter: &Meter, categories: &[String], cap: usize) -> Self {
        let inner = Instruments {
            uploads: meter
                .u64_counter("venus.uploads")
                .with_description("Upload requests by outcome type")
                .build(),
            events: meter
                .u64_counter("venus.events")
                .with_description("Events by category and result")
                .build(),
            request_duration: meter
                .f64_histogram("http.server.request.duration")
                .with_unit("s")
                .with_description("Duration of HTTP server requests")
                .with_boundaries(LATENCY_BOUNDS.to_vec())
                .build(),
            produce_duration: meter
                .f64_histogram("venus.kafka.produce.duration")
                .with_unit("s")
                .with_description(
                    "Time from producing a batch's events to Kafka's last acknowledgement",
                )
                .with_boundaries(LATENCY_BOUNDS.to_vec())
                .build(),
            active_requests: meter
                .i64_up_down_counter("http.server.active_requests")
                .with_description("Upload requests in flight")
                .build(),
            geoip_lookups: meter
                .u64_counter("venus.geoip.lookups")
                .with_description("GeoIP lookups by result: hit, miss, invalid")
                .build(),
            geoip_cache: meter
                .u64_counter("venus.geoip.cache")
                .with_description(
                    "GeoIP lookups answered from the cache of recent ones (hit) or the files (miss)",
                )
                .build(),
            delivery_errors: meter
                .u64_counter("venus.kafka.delivery.errors")
                .with_description("Events Kafka did not acknowledge")
                .build(),
            panics: meter
                .u64_counter("venus.panics")
                .with_description("Requests whose handler panicked (answered 500; a bug)")
                .build(),
            producer_restarts: meter
                .u64_counter("venus.kafka.producer.restarts")
                .with_description(
                    "Kafka producers replaced because they could no longer deliver, by reason",
                )
                .build(),
            missing_topic: meter
                .u64_counter("venus.kafka.missing_topic")
                .with_description(
                    "Uploads refused at once because their Kafka topic does not exist",
                )
                .build(),
            geoip_reloads: meter
                .u64_counter("venus.geoip.reloads")
                .with_description("GeoIP reload attempts by result: loaded, rejected (the old data keeps serving)")
                .build(),
            auth_checks: meter
                .u64_counter("venus.auth.checks")
                .with_description("Uploads checked against the app policy, by result: ok, missing_key, wrong_key, unknown_app, category_not_allowed, rate_limited, client_rate_limited")
                .build(),
            rate_limited: meter
                .u64_counter("venus.rate_limited")
                .with_description("Uploads refused 429 by a rate limit, by app (listed apps by id, others as `unlisted`) and limit (the app's requests, events; the client address's client_requests, client_events)")
                .build(),
            connections_refused: meter
                .u64_counter("venus.connections.refused")
                .with_description("Connections closed as soon as accepted, by limit: max_connections (all open), max_connections_per_peer (the peer holds its share)")
                .build(),
            body_stalls: meter
                .u64_counter("venus.upload.body_stalls")
                .with_description("Uploads answered 408 because no body byte arrived for server.body_stall_timeout_ms")
                .build(),
            config_reloads: meter
                .u64_counter("venus.config.reloads")
                .with_description("SIGHUP reloads of auth, apps, rate_limits and privacy, by result: loaded, rejected (the old policy stays)")
                .build(),
            categories: CategoryLabels {
                allowed: categories.iter().cloned().collect(),
                seen: RwLock::new(HashSet::new()),
                cap,
            },
        };
        let metrics = Self {
            inner: Arc::new(inner),
        };
        metrics.start_at_zero();
        metrics
    }

    /// Records 0 on every counter for every label value known up front: a
    /// counter that has not counted yet would otherwise be absent from
    /// `/metrics`, so dashboards say "No data" and `rate()` has no series
    /// until the first error of its kind.
    fn start_at_zero(&self) {
        let inner = &self.inner;
        for kind in UploadType::ALL {
            inner
                .uploads
                .add(0, &[KeyValue::new("type", kind.as_str())]);
        }
        for category in &inner.categories.allowed {
            for result in EventResult::ALL {
                inner.events.add(
                    0,
                    &[
                        KeyValue::new("category", category.clone()),
                        KeyValue::new("result", result.as_str()),
                    ],
                );
            }
        }
        for result in ["hit", "miss"] {
            inner.geoip_cache.add(0, &[KeyValue::new("result", result)]);
        }
        for result in ["hit", "miss", "invalid"] {
            inner
                .geoip_lookups
                .add(0, &[KeyValue::new("result", result)]);
        }
        for reason in crate::kafka::RestartReason::ALL {
            inner
                .producer_restarts
                .add(0, &[KeyValue::new("reason", reason.as_str())]);
        }
        inner.delivery_errors.add(0, &[]);
        inner.panics.add(0, &[]);
        inner.body_stalls.add(0, &[]);
        for limit in ["max_connections", "max_connections_per_peer"] {
            inner
                .connections_refused
                .add(0, &[KeyValue::new("limit", limit)]);
        }
        inner.missing_topic.add(0, &[]);
        for result in ["loaded", "rejected"] {
            inner
                .geoip_reloads
                .add(0, &[KeyValue::new("result", result)]);
            inner
                .config_reloads
                .add(0, &[KeyValue::new("result", result)]);
        }
        for result in [
            "ok",
            "missing_key",
            "wrong_key",
            "unknown_app",
            "category_not_allowed",
            "rate_limited",
            "client_rate_limited",
        ] {
            inner.auth_checks.add(0, &[KeyValue::new("result", result)]);
        }
        self.seed_rate_limited([crate::apps::UNLISTED_LABEL]);
    }

    /// Starts `venus.rate_limited` at 0 for these apps (the listed ones).
    pub fn seed_rate_limited<'a>(&self, apps: impl IntoIterator<Item = &'a str>) {
        for app in apps {
            for kind in crate::apps::limits::LimitKind::ALL {
                self.inner.rate_limited.add(
                    0,
                    &[
                        KeyValue::new("app", app.to_owned()),
                        KeyValue::new("limit", kind.as_str()),
                    ],
                );
            }
        }
    }

    pub fn auth_check(&self, result: &'static str) {
        self.inner
            .auth_checks
            .add(1, &[KeyValue::new("result", result)]);
    }

    /// `app` must be a bounded label: a listed app id or `unlisted`.
    pub fn rate_limited(&self, app: &str, kind: crate::apps::limits::LimitKind) {
        self.inner.rate_limited.add(
            1,
            &[
                KeyValue::new("app", app.to_owned()),
                KeyValue::new("limit", kind.as_str()),
            ],
        );
    }

    /// A connection closed at once, for `limit`.
    pub fn connection_refused(&self, limit: &'static str) {
        self.inner
            .connections_refused
            .add(1, &[KeyValue::new("limit", limit)]);
    }

    pub fn body_stall(&self) {
        self.inner.body_stalls.add(1, &[]);
    }

    pub fn config_reload(&self, result: &'static str) {
        self.inner
            .config_reloads
            .add(1, &[KeyValue::new("result", result)]);
    }

    pub fn upload(&self, kind: UploadType) {
        self.inner
            .uploads
            .add(1, &[KeyValue::new("type", kind.as_str())]);
    }

    pub fn request_duration(&self, seconds: f64, method: &str, route: &str, status: u16) {
        self.inner.request_duration.record(
            seconds,
            &[
                KeyValue::new("http.request.method", method.to_owned()),
                KeyValue::new("http.route", route.to_owned()),
                KeyValue::new("http.response.status_code", i64::from(status)),
            ],
        );
    }

    pub fn produce_duration(&self, seconds: f64) {
        self.inner.produce_duration.record(seconds, &[]);
    }

    pub fn request_started(&self) {
        self.inner.active_requests.add(1, &[]);
    }

    pub fn request_finished(&self) {
        self.inner.active_requests.add(-1, &[]);
    }

    /// `count` lookups with `result` (hit, miss, invalid); nothing for 0.
    pub fn geoip_lookups(&self, result: &'static str, count: u64) {
        if count > 0 {
            self.inner
                .geoip_lookups
                .add(count, &[KeyValue::new("result", result)]);
        }
    }

    /// `count` lookups answered from the cache of recent ones (`hit`) or
    /// from the files (`miss`); nothing for 0.
    pub fn geoip_cache(&self, result: &'static str, count: u64) {
        if count > 0 {
            self.inner
                .geoip_cache
                .add(count, &[KeyValue::new("result", result)]);
        }
    }

    pub fn delivery_errors(&self, count: u64) {
        if count > 0 {
            self.inner.delivery_errors.add(count, &[]);
        }
    }

    pub fn producer_restart(&self, reason: crate::kafka::RestartReason) {
        self.inner
            .producer_restarts
            .add(1, &[KeyValue::new("reason", reason.as_str())]);
    }

    pub fn geoip_reload(&self, result: &'static str) {
        self.inner
            .geoip_reloads
            .add(1, &[KeyValue::new("result", result)]);
    }

    pub fn missing_topic(&self) {
        self.inner.missing_topic.add(1, &[]);
    }

    pub fn panic(&self) {
        self.inner.panics.add(1, &[]);
    }

    /// Counts a finished upload by its reply: the `type`s it falls under and
    /// its events by result. `category` is absent when the request was
    /// rejected before its meta was understood.
    pub fn record_upload(&self, category: Option<&str>, reply: &Reply) {
        if reply.body.parts.is_empty() {
            // Rejected as a whole: for who sent it, how fast, or its body,
            // type, encoding, JSON or meta.
            match reply.status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    self.upload(UploadType::Unauthorized)
                }
                StatusCode::TOO_MANY_REQUESTS => self.upload(UploadType::RateLimited),
                status if status.is_client_error() => self.upload(UploadType::WrongMeta),
                _ => {}
            }
            return;
        }
        let (mut accepted, mut invalid, mut failed, mut kafka) = (0u64, 0u64, 0u64, 0u64);
        for part in &reply.body.parts {
            match part.code {
                PartCode::Accepted => accepted += 1,
                PartCode::Validation | PartCode::InvalidIp => invalid += 1,
                PartCode::Serialization => failed += 1,
                PartCode::KafkaDelivery => {
                    failed += 1;
                    kafka += 1;
                }
            }
        }
        let total = reply.body.parts.len() as u64;
        if invalid > 0 {
            self.upload(UploadType::WrongData);
        }
        if kafka > 0 {
            self.upload(UploadType::KafkaError);
        }
        if accepted == total {
            self.upload(UploadType::Success);
        } else if accepted > 0 {
            self.upload(UploadType::Partial);
        }
        let label = self
            .inner
            .categories
            .label(category.unwrap_or(CategoryLabels::OTHER));
        for (result, count) in [
            (EventResult::Accepted, accepted),
            (EventResult::Invalid, invalid),
            (EventResult::Failed, failed),
        ] {
            if count > 0 {
                self.inner.events.add(
                    count,
                    &[
                        KeyValue::new("category", label.clone()),
                        KeyValue::new("result", result.as_str()),
                    ],
                );
            }
        }
    }
}

/// Anything that can hand out the gateway's meter (the SDK provider in the
/// app, a test provider in tests).
pub trait MeterProviderRef {
    fn venus_meter(&self) -> Meter;
}

impl<P: MeterProvider> MeterProviderRef for P {
    fn venus_meter(&self) -> Meter {
        self.meter("venus")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(allowed: &[&str], cap: usize) -> CategoryLabels {
        CategoryLabels {
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
            seen: RwLock::new(HashSet::new()),
            cap,
        }
    }

    #[test]
    fn an_allow_list_bounds_the_category_label() {
        let labels = labels(&["click"], 0);
        assert_eq!(labels.label("click"), "click");
        assert_eq!(labels.label("view"), "other");
    }

    #[test]
    fn without_an_allow_list_the_first_categories_up_to_the_cap_keep_their_name() {
        let labels = labels(&[], 2);
        assert_eq!(labels.label("a"), "a");
        assert_eq!(labels.label("b"), "b");
        assert_eq!(labels.label("c"), "other");
        assert_eq!(labels.label("a"), "a");
    }
}
