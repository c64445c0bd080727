//! Kafka, as the gateway uses it: one producer shared by all requests, kept
//! able to deliver.
//!
//! * `security`: how every client connects (TLS, SASL), shared with the
//!   ingester (`venus_shared::kafka_security`, re-exported);
//! * `producer`: how a librdkafka producer is configured, and its statistics;
//! * `acks`: one batch's delivery reports, gathered for its request;
//! * `health`: what recent deliveries say about it;
//! * `healer`: replaces it when it can no longer deliver;
//! * `topics`: which topics exist (fail fast for a missing one), and
//!   creating the configured ones.
//!
//! The current producer sits behind an `ArcSwap`: a batch takes it with one
//! atomic load and keeps it until its acknowledgements are in, so a swap
//! never touches a batch in flight and the hot path takes no lock.

pub mod acks;
pub mod healer;
pub mod health;
pub mod producer;
pub use venus_shared::kafka_security as security;
pub mod topics;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;

use crate::config::{KafkaSettings, MessageKey};
use crate::domain::Category;
use crate::metrics::Metrics;

pub use healer::RestartReason;
use health::DeliveryHealth;
pub use producer::{
    category_of_topic, librdkafka_message_timeout_ms, producer_config, render_topic,
    ProducerHandle, ProducerStatistics,
};
use topics::Topics;
pub use venus_shared::kafka_security::all_brokers_down;
pub use venus_shared::message::DEFAULT_DEAD_LETTER_TOPIC;

#[derive(Debug, thiserror::Error)]
#[error("cannot create the Kafka producer: {0}")]
pub struct KafkaSetupError(#[from] KafkaError);

/// The producer plus the settings that shape each message.
pub struct KafkaSink {
    settings: KafkaSettings,
    current: ArcSwap<ProducerHandle>,
    statistics: Arc<ProducerStatistics>,
    health: DeliveryHealth,
    topics: Topics,
    metrics: Metrics,
    key: MessageKey,
}

impl KafkaSink {
    pub fn new(settings: &KafkaSettings, metrics: Metrics) -> Result<Self, KafkaSetupError> {
        let statistics = Arc::new(ProducerStatistics::default());
        let producer = ProducerHandle::build(settings, 0, statistics.clone())?;
        Ok(Self {
            settings: settings.clone(),
            current: ArcSwap::from_pointee(producer),
            statistics,
            health: DeliveryHealth::default(),
            topics: Topics::default(),
            metrics,
            key: settings.key(),
        })
    }

    /// Starts the task that replaces a producer that can no longer deliver;
    /// it ends when the sink is dropped.
    pub fn start_healer(self: &Arc<Self>) {
        let stuck_after = Duration::from_millis(self.settings.rebuild_after_failing_ms);
        tokio::spawn(healer::run(Arc::downgrade(self), stuck_after));
    }

    /// The current producer; hold it for the whole batch.
    pub fn producer(&self) -> Arc<ProducerHandle> {
        self.current.load_full()
    }

    /// How a batch's deliveries went, from the producer that sent them.
    pub fn report(&self, generation: u64, acknowledged: usize, error: Option<&KafkaError>) {
        self.health.record(generation, acknowledged, error);
    }

    pub fn health(&self) -> &DeliveryHealth {
        &self.health
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    pub fn statistics(&self) -> &ProducerStatistics {
        &self.statistics
    }

    pub fn key(&self) -> &MessageKey {
        &self.key
    }

    pub fn delivery_timeout(&self) -> Duration {
        self.settings.delivery_timeout()
    }

    pub fn max_message_bytes(&self) -> usize {
        self.settings.max_message_bytes
    }

    /// The topic of a batch of `category`.
    pub fn topic_for(&self, category: &Category) -> String {
        render_topic(&self.settings.topic_template, category)
    }

    /// Messages handed to the current producer and not yet acknowledged or
    /// failed.
    pub fn queue_depth(&self) -> i64 {
        i64::from(self.current.load().producer.in_flight_count())
    }

    /// Asks a broker for cluster metadata; `Ok` means Kafka is reachable.
    /// Blocks up to `timeout`: call it from a blocking thread.
    pub fn check_reachable(&self, timeout: Duration) -> Result<(), String> {
        let handle = self.producer();
        let client = handle.producer.client();
        let last_error = &client.context().last_error;
        match client.fetch_metadata(None, timeout) {
            Ok(_) => {
                *last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(())
            }
            Err(e) => {
                // librdkafka's own reason says which broker and why (a
                // certificate that does not verify, a failed SASL login).
                let cause = last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .map(|reason| format!("; last client error: {reason}"))
                    .unwrap_or_default();
                Err(format!("Kafka metadata not reachable: {e}{cause}"))
            }
        }
    }

    /// The current producer's fatal error, if it had one (the healer then
    /// replaces it).
    pub fn fatal_error(&self) -> Option<String> {
        self.current
            .load()
            .producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("Kafka producer failed for good: {code}: {reason}"))
    }

    /// Why the gateway cannot deliver right now, from what deliveries
    /// reported (readiness adds the metadata check).
    pub fn delivery_problem(&self) -> Option<String> {
        self.fatal_error().or_else(|| self.health.problem())
    }

    /// Waits for every message queued on the current producer to be
    /// acknowledged or to fail.
    pub fn flush(&self, timeout: Duration) -> Result<(), String> {
        self.producer()
            .producer
            .flush(timeout)
            .map_err(|e| e.to_string())
    }

    /// Builds a new producer and puts it in place of the current one. The
    /// old one keeps serving the batches that hold it; it is flushed and
    /// dropped on a blocking thread. Returns the new generation.
    pub fn rebuild(&self, reason: RestartReason) -> Result<u64, KafkaError> {
        let generation = self.current.load().generation + 1;
        let fresh = ProducerHandle::build(&self.settings, generation, self.statistics.clone())?;
        let old = self.current.swap(Arc::new(fresh));
        self.health.replaced(generation);
        self.metrics.producer_restart(reason);
        let grace = self.delivery_timeout();
        tokio::task::spawn_blocking(move || {
            let _ = old.producer.flush(grace);
            // Batches hold the old producer until their acknowledgements are
            // in (at most the delivery timeout). Wait for them, so that the
            // last reference (whose drop purges, flushes and joins
            // librdkafka's threads) goes here, not on an async worker.
            let deadline = std::time::Instant::now() + grace;
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(old);
        });
        Ok(generation)
    }
}
