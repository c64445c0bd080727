//! Which topics exist, and creating the ones operators asked for.
//!
//! A broker that does not create topics on first use (tansu, and many
//! production clusters) leaves a message for a missing topic in librdkafka's
//! queue until its timeout: the upload would wait the whole delivery timeout
//! for a 503 that names no cause. So before a batch is produced its topic is
//! looked up (a metadata request for that one topic, which with
//! `allow.auto.create.topics=false` creates nothing), and the answer is
//! cached: "exists" until a delivery says otherwise, "missing" for
//! [`MISSING_TTL`], so that a topic created a moment later is used soon.
//!
//! Reads are lock-free (an immutable map behind `ArcSwap`, replaced on the
//! rare change); lookups are few at a time ([`MAX_LOOKUPS`]) and the cache
//! has a size cap, so clients making up categories cannot make the gateway
//! hold or ask without bound.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Semaphore;

use super::producer::ProducerHandle;

/// How long "this topic does not exist" is believed.
pub const MISSING_TTL: Duration = Duration::from_secs(5);

/// Metadata lookups of topics at once.
const MAX_LOOKUPS: usize = 4;

/// Topics remembered at most; past it, only existing ones are added. Kept
/// small because a change copies the map (reads stay lock-free): real
/// topics are few, and made-up categories are what fills it.
const MAX_REMEMBERED: usize = 1_000;

/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicState {
    Exists,
    Missing,
    /// The broker did not say (unreachable, slow): produce and see.
    Unknown,
}

#[derive(Clone, Copy)]
enum Known {
    Exists,
    Missing { until: Instant },
}

pub struct Topics {
    known: ArcSwap<HashMap<String, Known>>,
    lookups: Semaphore,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            known: ArcSwap::from_pointee(HashMap::new()),
            lookups: Semaphore::new(MAX_LOOKUPS),
        }
    }
}

impl Topics {
    fn cached(&self, topic: &str) -> Option<TopicState> {
        match self.known.load().get(topic)? {
            Known::Exists => Some(TopicState::Exists),
            Known::Missing { until } if Instant::now() < *until => Some(TopicState::Missing),
            Known::Missing { .. } => None,
        }
    }

    /// Whether `topic` exists, from the cache or asked of the cluster
    /// through `producer`.
    pub async fn check(&self, producer: &Arc<ProducerHandle>, topic: &str) -> TopicState {
        if let Some(state) = self.cached(topic) {
            return state;
        }
        let Ok(Ok(_permit)) = tokio::time::timeout(LOOKUP_TIMEOUT, self.lookups.acquire()).await
        else {
            return TopicState::Unknown;
        };
        // Another request may have looked it up while this one waited.
        if let Some(state) = self.cached(topic) {
            return state;
        }
        let asked = producer.clone();
        let name = topic.to_owned();
        let state = tokio::task::spawn_blocking(move || lookup(&asked, &name))
            .await
            .unwrap_or(TopicState::Unknown);
        self.remember(topic, state);
        state
    }

    fn remember(&self, topic: &str, state: TopicState) {
        let known = match state {
            TopicState::Exists => Known::Exists,
            TopicState::Missing => Known::Missing {
                until: Instant::now() + MISSING_TTL,
            },
            TopicState::Unknown => return,
        };
        self.known.rcu(|current| {
            let mut next = HashMap::clone(current);
            if next.len() >= MAX_REMEMBERED {
                let now = Instant::now();
                next.retain(|_, k| !matches!(k, Known::Missing { until } if *until <= now));
            }
            if next.len() < MAX_REMEMBERED || matches!(known, Known::Exists) {
                next.insert(topic.to_owned(), known);
            }
            next
        });
    }

    /// A delivery said the topic does not exist (deleted since): ask again
    /// next time.
    pub fn forget(&self, topic: &str) {
        if self.known.load().contains_key(topic) {
            self.known.rcu(|current| {
                let mut next = HashMap::clone(current);
                next.remove(topic);
                next
            });
        }
    }

    /// Topics remembered now.
    pub fn remembered(&self) -> usize {
        self.known.load().len()
    }
}

/// One metadata request for `topic`. Blocking.
fn lookup(producer: &ProducerHandle, topic: &str) -> TopicState {
    use rdkafka::producer::Producer;
    let Ok(metadata) = producer
        .producer
        .client()
        .fetch_metadata(Some(topic), LOOKUP_TIMEOUT)
    else {
        return TopicState::Unknown;
    };
    match metadata.topics().iter().find(|t| t.name() == topic) {
        None => TopicState::Missing,
        Some(entry) => match entry.error().map(RDKafkaErrorCode::from) {
            None if !entry.partitions().is_empty() => TopicState::Exists,
            None => TopicState::Missing,
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                TopicState::Missing
            }
            Some(_) => TopicState::Unknown,
        },
    }
}

/// Creates `topics` that do not exist yet (`kafka.create_topics`), with
/// `kafka.topic_partitions` and `kafka.topic_replication` (-1: the broker's
/// default). Topics that exist already are fine. The admin client gets the
/// operator's `kafka.security` and `kafka.producer` settings.
pub async fn create(
    settings: &crate::config::KafkaSettings,
    topics: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut config = settings.client_config();
    for (key, value) in &settings.producer {
        config.set(key, value);
    }
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let (partitions, replication) = (settings.topic_partitions, settings.topic_replication);
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin.create_topics(&new, &options).await?;
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, "created Kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => failures.push(format!("{topic}: {code}")),
        }
    }
    anyhow::ensure!(
        failures.is_empty(),
        "cannot create Kafka topics: {}",
        failures.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_topics_cannot_grow_the_cache_past_its_cap() {
        let topics = Topics::default();
        for i in 0..MAX_REMEMBERED + 50 {
            topics.remember(&format!("made_up_{i}"), TopicState::Missing);
        }
        assert_eq!(topics.remembered(), MAX_REMEMBERED);
        // A topic that exists is still remembered when the cache is full.
        topics.remember("real", TopicState::Exists);
        assert_eq!(topics.cached("real"), Some(TopicState::Exists));
        // Unknown answers are not remembered at all.
        topics.remember("unknown", TopicState::Unknown);
        assert_eq!(topics.cached("unknown"), None);
        // Forgetting makes room.
        topics.forget("real");
        assert_eq!(topics.cached("real"), None);
    }
}
