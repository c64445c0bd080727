//! One librdkafka producer: how it is configured and what it reports.
//!
//! It is configured for durability first (`acks=all`, idempotence on); its
//! message timeout is a little shorter than the delivery timeout, so
//! librdkafka itself gives up on a message before the request that carries
//! it answers. [`super::KafkaSink`] may replace a producer with a new one
//! (see `healer`); each has a generation number so that late outcomes of a
//! replaced producer are not mistaken for the new one's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;

use super::acks::Delivery;

use crate::config::KafkaSettings;
use crate::domain::Category;

/// Totals from librdkafka's statistics callback (every
/// `statistics.interval.ms`), summed over brokers, over every producer this
/// process had: a replaced producer's last totals are carried over, so the
/// counters never go backwards.
#[derive(Debug, Default)]
pub struct ProducerStatistics {
    /// Requests to brokers that failed to transmit.
    pub tx_errors: AtomicU64,
    /// Requests to brokers that were retried.
    pub tx_retries: AtomicU64,
}

/// The producer's context: hands each delivery report to its batch (see
/// `acks`), keeps librdkafka's statistics for the metrics and leaves logging
/// as rdkafka does it (into `tracing` via `log`).
pub struct StatisticsContext {
    /// The process-wide totals.
    totals: Arc<ProducerStatistics>,
    /// This producer's own last totals, added to `totals` as they grow.
    own_errors: AtomicU64,
    own_retries: AtomicU64,
    /// librdkafka's last client-level error (a TLS handshake or SASL
    /// failure names the broker and the cause): `/readyz` shows it.
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for StatisticsContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka client error");
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        // "1/1 brokers are down" follows the reason they are (a failed TLS
        // handshake): keep the reason.
        if last.is_none() || !crate::kafka::all_brokers_down(&error) {
            *last = Some(reason.to_owned());
        }
    }

    fn stats(&self, statistics: Statistics) {
        let (errors, retries) = statistics
            .brokers
            .values()
            .fold((0, 0), |(e, r), b| (e + b.txerrs, r + b.txretries));
        // Totals over the brokers librdkafka knows now: one that leaves takes
        // its share along. Only growth is added, so the counters never go
        // backwards (Prometheus would read that as a reset).
        let before = self.own_errors.fetch_max(errors, Ordering::Relaxed);
        self.totals
            .tx_errors
            .fetch_add(errors.saturating_sub(before), Ordering::Relaxed);
        let before = self.own_retries.fetch_max(retries, Ordering::Relaxed);
        self.totals
            .tx_retries
            .fetch_add(retries.saturating_sub(before), Ordering::Relaxed);
    }
}

impl ProducerContext for StatisticsContext {
    type DeliveryOpaque = Box<Delivery>;

    /// On the producer's polling thread, once per message: acknowledged,
    /// refused, timed out, or purged when the producer is dropped.
    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<Delivery>) {
        delivery.report(match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(error.clone()),
        });
    }
}

/// A producer and its generation (0 for the first of the process).
pub struct ProducerHandle {
    /// librdkafka with a thread of its own that serves delivery reports.
    pub producer: ThreadedProducer<StatisticsContext>,
    pub generation: u64,
}

impl ProducerHandle {
    pub fn build(
        settings: &KafkaSettings,
        generation: u64,
        totals: Arc<ProducerStatistics>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let producer = producer_config(settings).create_with_context(StatisticsContext {
            totals,
            own_errors: AtomicU64::new(0),
            own_retries: AtomicU64::new(0),
            last_error: Default::default(),
        })?;
        Ok(Self {
            producer,
            generation,
        })
    }
}

/// The librdkafka configuration: our defaults, then the pass-through map.
pub fn producer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = settings.client_config();
    config
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", &settings.compression)
        .set("linger.ms", settings.linger_ms.to_string())
        .set(
            "message.timeout.ms",
            librdkafka_message_timeout_ms(settings.delivery_timeout_ms).to_string(),
        )
        .set("statistics.interval.ms", "5000")
        // Topics are the operator's to create (or `kafka.create_topics`'s):
        // otherwise every category a client makes up would create one on a
        // broker that auto-creates. librdkafka's producer default is true.
        .set("allow.auto.create.topics", "false")
        // Bound the producer's memory (librdkafka's default is 1 GiB); past
        // it events fail with 1004 at once instead of queueing.
        .set("queue.buffering.max.kbytes", "262144")
        // The size check of the gateway is on the value; leave room for the
        // key, headers and record overhead.
        .set(
            "message.max.bytes",
            (settings.max_message_bytes + 64 * 1024).to_string(),
        );
    // Keys spelled as librdkafka wants them, none of the forbidden ones:
    // checked when the configuration was loaded.
    for (key, value) in &settings.producer {
        config.set(key, value);
    }
    config
}

/// librdkafka's own message timeout: shorter than the response deadline
/// (by up to a second, its timeout scan interval) so that librdkafka gives up
/// on a message, and says so, before the response reports it failed. Then a
/// message answered 1004 is not delivered afterwards in the common case.
pub fn librdkafka_message_timeout_ms(delivery_timeout_ms: u64) -> u64 {
    delivery_timeout_ms
        .saturating_sub(1000)
        .max(delivery_timeout_ms / 2)
        .max(1)
}

/// `template` with `{category}` replaced.
pub fn render_topic(template: &str, category: &Category) -> String {
    template.replace("{category}", category.as_str())
}

/// The category whose events `template` would send to `topic`, if there is
/// one: the gateway refuses it, so that no upload can write into a topic
/// the system keeps for itself (such as a dead-letter topic named like an
/// event topic).
pub fn category_of_topic(template: &str, topic: &str) -> Option<Category> {
    let start = template.find("{category}")?;
    // A category is at most 64 characters: try each length where the
    // template's text before the first `{category}` ends.
    let prefix = &template[..start];
    let rest = topic.strip_prefix(prefix)?;
    (1..=Category::MAX_LEN.min(rest.len()))
        .filter(|&len| rest.is_char_boundary(len))
        .filter_map(|len| Category::parse_unreserved(&rest[..len]).ok())
        .find(|category| render_topic(template, category) == topic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use venus_shared::message::DEFAULT_DEAD_LETTER_TOPIC;

    #[test]
    fn the_category_of_a_topic_is_found_wherever_the_template_puts_it() {
        let found = |template: &str, topic: &str| {
            category_of_topic(template, topic).map(|c| c.as_str().to_owned())
        };
        assert_eq!(
            found("to_analyzer__0.{category}", DEFAULT_DEAD_LETTER_TOPIC).as_deref(),
            Some("__dead_letter")
        );
        assert_eq!(
            found("events.{category}.v1", "events.dlq.v1").as_deref(),
            Some("dlq")
        );
        assert_eq!(
            found("{category}-{category}", "ab-ab").as_deref(),
            Some("ab")
        );
        assert_eq!(found("events.{category}", "other.dlq"), None);
        assert_eq!(found("events.{category}", "events.a-b"), None);
        assert_eq!(found("events.{category}.v1", "events.dlq.v2"), None);
    }

    #[test]
    fn the_default_template_gives_the_analyzer_topic() {
        let category = Category::parse("page_view").unwrap();
        assert_eq!(
            render_topic("to_analyzer__0.{category}", &category),
            "to_analyzer__0.page_view"
        );
    }

    #[test]
    fn the_category_can_stand_anywhere_and_more_than_once() {
        let category = Category::parse("click").unwrap();
        assert_eq!(
            render_topic("{category}-events-{category}", &category),
            "click-events-click"
        );
    }

    #[test]
    fn librdkafka_gives_up_before_the_response_deadline() {
        assert_eq!(librdkafka_message_timeout_ms(10_000), 9_000);
        assert_eq!(librdkafka_message_timeout_ms(1_500), 750);
        assert_eq!(librdkafka_message_timeout_ms(1), 1);
    }

    #[test]
    fn pass_through_settings_win_over_the_defaults() {
        let settings = KafkaSettings {
            brokers: "b:9092".into(),
            topic_template: "t.{category}".into(),
            key_spec: String::new(),
            key: None,
            delivery_timeout_ms: 1234,
            compression: "zstd".into(),
            linger_ms: 7,
            max_message_bytes: 1000,
            producer: [("linger.ms".to_string(), "50".to_string())].into(),
            producer_files: Default::default(),
            security: Default::default(),
            rebuild_after_failing_ms: 5000,
            create_topics: false,
            topic_partitions: -1,
            topic_replication: -1,
        };
        let config = producer_config(&settings);
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("compression.type"), Some("zstd"));
        assert_eq!(config.get("message.timeout.ms"), Some("617"));
        assert_eq!(config.get("linger.ms"), Some("50"));
        assert_eq!(config.get("allow.auto.create.topics"), Some("false"));
    }
}
