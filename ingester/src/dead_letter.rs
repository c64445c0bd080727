//! The dead-letter topic: messages that can never be inserted (not JSON,
//! wrong shape, rejected by ClickHouse as a permanent error) are copied
//! there with their key, value and headers, plus headers saying why and
//! where they came from; then they count as processed. A send is retried
//! until Kafka takes it: a poison message is never dropped silently, and
//! never committed past before Kafka has it.
//!
//! The producer and the admin client that creates the topic use
//! `kafka.security` like every other Kafka client. A send that has failed
//! for `ingester.dead_letter_alarm_ms` puts the reason in `/readyz`; the
//! topic is created in the background, retried until it exists.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use tokio::sync::watch;

use crate::config::Settings;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::record::Record;

/// The `/readyz` part of dead-letter sends, one per sender (the processor,
/// each writer): one sender's success does not clear another's alarm.
const SEND_PART: &str = "dead letters";
/// The `/readyz` part of the topic's creation.
const TOPIC_PART: &str = "dead-letter topic";

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
    health: Arc<Health>,
    alarm_after: Duration,
    /// This sender's `/readyz` part.
    part: String,
}

impl DeadLetters {
    pub fn new(settings: &Settings, metrics: Metrics, health: Arc<Health>) -> anyhow::Result<Self> {
        let ingester = &settings.ingester;
        let alarm_after = Duration::from_millis(ingester.dead_letter_alarm_ms);
        let producer = settings
            .kafka
            .client_config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // A failed send is known (and retried, and alarmed) within the
            // alarm's time, at most 10 s.
            .set(
                "message.timeout.ms",
                alarm_after.as_millis().clamp(1_000, 10_000).to_string(),
            )
            // The largest message the gateway writes, and the headers a dead
            // letter adds.
            .set(
                "message.max.bytes",
                (settings.kafka.max_message_bytes + 64 * 1024 + 16 * 1024).to_string(),
            )
            .create()?;
        Ok(Self {
            producer,
            topic: ingester.dead_letter_topic.clone(),
            group: ingester.group_id.clone(),
            metrics,
            health,
            alarm_after,
            part: SEND_PART.to_owned(),
        })
    }

    /// The same producer, reporting to `/readyz` as `sender`'s part.
    pub fn for_sender(&self, sender: &str) -> Self {
        Self {
            part: format!("{SEND_PART} ({sender})"),
            ..self.clone()
        }
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
        let started = Instant::now();
        loop {
            let mut message = FutureRecord::to(&self.topic)
                .payload(record.payload())
                .headers(headers.clone());
            if let Some(key) = record.key() {
                message = message.key(key);
            }
            match self.producer.send(message, Timeout::Never).await {
                Ok(_) => {
                    self.health.ok(&self.part);
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
                    self.metrics.dead_letter_failed();
                    tracing::warn!(%error, topic = %self.topic, "dead-letter send failed; retrying");
                    if started.elapsed() >= self.alarm_after {
                        self.health.fail(
                            self.part.clone(),
                            format!(
                                "a dead letter has not reached {} for {} s: {error}",
                                self.topic,
                                started.elapsed().as_secs()
                            ),
                        );
                    }
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

/// Creates the dead-letter topic when missing (brokers that do not create
/// topics on first use, like tansu, need it) with one partition and
/// replication 1, retrying until it exists; create it yourself, with the
/// replication you want, for production. `/readyz` says so while it is
/// neither created nor found.
pub async fn create_topic(settings: Settings, health: Arc<Health>) {
    let topic = settings.ingester.dead_letter_topic.clone();
    let mut wait = Duration::from_millis(200);
    loop {
        match try_create_topic(&settings, &topic).await {
            Ok(created) => {
                if created {
                    tracing::info!(%topic, "dead-letter topic created");
                }
                health.ok(TOPIC_PART);
                return;
            }
            Err(error) => {
                tracing::warn!(%topic, %error, retry_in_ms = wait.as_millis() as u64, "cannot create the dead-letter topic; retrying");
                health.fail(
                    TOPIC_PART,
                    format!("the dead-letter topic {topic} cannot be created: {error}"),
                );
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// `Ok(true)` when created, `Ok(false)` when it was there already.
async fn try_create_topic(settings: &Settings, topic: &str) -> anyhow::Result<bool> {
    let admin: AdminClient<DefaultClientContext> = settings.kafka.client_config().create()?;
    let timeout = Duration::from_secs(10);
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new()
                .operation_timeout(Some(timeout))
                .request_timeout(Some(timeout)),
        )
        .await?;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(true),
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
        Some(Err((_, code))) => anyhow::bail!("{code}"),
        None => anyhow::bail!("no answer for the topic"),
    }
}
