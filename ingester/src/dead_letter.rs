//! The dead-letter topic: messages that can never be inserted (not JSON,
//! wrong shape, rejected by ClickHouse as a permanent error) are copied
//! there with their key, value and headers, plus headers saying why and
//! where they came from; then they count as processed. A send is retried
//! until Kafka takes it: a poison message is never dropped silently.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::record::Record;

/// Headers added to a dead letter.
pub const REASON: &str = "dead_letter.reason";
pub const STAGE: &str = "dead_letter.stage";
pub const TOPIC: &str = "dead_letter.topic";
pub const PARTITION: &str = "dead_letter.partition";
pub const OFFSET: &str = "dead_letter.offset";
pub const GROUP: &str = "dead_letter.consumer_group";

#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    group: String,
    metrics: Metrics,
}

impl DeadLetters {
    pub fn new(brokers: &str, topic: &str, group: &str, metrics: Metrics) -> anyhow::Result<Self> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "10000")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            group: group.to_owned(),
            metrics,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes `record` to the dead-letter topic, retrying until Kafka
    /// acknowledges it; `false` only when `cancel` turned true first (at
    /// the end of the shutdown grace), and then the message stays
    /// uncommitted and is read again after a restart.
    pub async fn send(
        &self,
        record: &Record,
        reason: &str,
        stage: &'static str,
        cancel: &mut watch::Receiver<bool>,
    ) -> bool {
        let partition = record.source.partition.to_string();
        let offset = record.source.offset.to_string();
        let mut headers = OwnedHeaders::new();
        for (key, value) in record.headers() {
            headers = headers.insert(Header { key, value });
        }
        for (key, value) in [
            (REASON, reason),
            (STAGE, stage),
            (TOPIC, &*record.source.topic),
            (PARTITION, partition.as_str()),
            (OFFSET, offset.as_str()),
            (GROUP, self.group.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut wait = Duration::from_millis(100);
        loop {
            let mut message = FutureRecord::to(&self.topic)
                .payload(record.payload())
                .headers(headers.clone());
            if let Some(key) = record.key() {
                message = message.key(key);
            }
            match self.producer.send(message, Timeout::Never).await {
                Ok(_) => {
                    self.metrics.dead_letter(stage);
                    tracing::warn!(
                        topic = %record.source.topic,
                        partition = record.source.partition,
                        offset = record.source.offset,
                        reason,
                        "message sent to the dead-letter topic"
                    );
                    return true;
                }
                Err((error, _)) => {
                    tracing::warn!(%error, topic = %self.topic, "dead-letter send failed; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.wait_for(|c| *c) => return false,
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}
