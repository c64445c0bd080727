//! The read-back check: is every accepted event in Kafka, exactly once?
//!
//! After the load, a `BaseConsumer` is `assign`ed every partition of the
//! topics that should hold accepted events, from the beginning (no
//! `subscribe`: no consumer-group join, which is slow on the test broker,
//! and no committed offsets). It reads until every expected backend_id was
//! seen and the topics went quiet, or until nothing at all arrived for
//! `verify_idle`. High watermarks are not trusted to say where the end is.
//!
//! Every message value's `backend_id` is matched against the ids the
//! gateway answered with code 0: one never seen is *missing*, one seen more
//! than once is a *duplicate*. Events answered 1004 that show up anyway are
//! counted too (the gateway said they failed).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::ProgressBar;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// After every expected event was seen, how long the topics must stay
/// quiet before reading stops (to catch late duplicates).
const QUIET_AFTER_ALL_FOUND: Duration = Duration::from_millis(500);

/// How long a metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The result of the read-back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Accepted events looked for.
    pub checked: u64,
    /// Of those, found in Kafka.
    pub found: u64,
    /// Accepted but not found. Must be 0.
    pub missing: u64,
    /// Extra copies of accepted events (an event found 3 times counts 2).
    pub duplicates: u64,
    /// Messages of this run whose event id (`data.id`) an earlier message of
    /// the same topic had: the same event written twice under two
    /// backend_ids (a retry inside the gateway would show here, not in
    /// `duplicates`).
    #[serde(default)]
    pub duplicate_event_ids: u64,
    /// Events answered 1004 (not delivered) that are in Kafka anyway.
    pub failed_but_delivered: u64,
    /// Messages read in all.
    pub messages_read: u64,
    /// Messages of other runs (a backend_id this run did not get).
    pub other_messages: u64,
    /// Messages whose value has no readable backend_id.
    pub unreadable: u64,
    /// Partitions read.
    pub partitions: usize,
    /// Time spent reading.
    pub elapsed_secs: f64,
    /// Why reading stopped: `all_found`, `idle` or `timeout`.
    pub stopped_by: String,
    /// Up to 10 missing events as `topic/backend_id`.
    pub missing_sample: Vec<String>,
    /// Topics that could not be read (their events count as missing).
    #[serde(default)]
    pub topic_errors: Vec<String>,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  verify            {} accepted events checked in {} partitions, {:.1} s ({})",
            self.checked, self.partitions, self.elapsed_secs, self.stopped_by
        )?;
        writeln!(
            f,
            "  {:<18}found {}   missing {}   duplicates {} (by event id {})   failed-but-delivered {}",
            "",
            self.found,
            self.missing,
            self.duplicates,
            self.duplicate_event_ids,
            self.failed_but_delivered
        )?;
        writeln!(
            f,
            "  {:<18}messages read {}   of other runs {}   unreadable {}",
            "", self.messages_read, self.other_messages, self.unreadable
        )?;
        for error in &self.topic_errors {
            writeln!(f, "  {:<18}error: {error}", "")?;
        }
        for sample in &self.missing_sample {
            writeln!(f, "  {:<18}missing {sample}", "")?;
        }
        Ok(())
    }
}

/// What to look for in one topic.
#[derive(Debug, Clone, Default)]
pub(crate) struct TopicIds {
    pub topic: String,
    /// backend_ids answered 0.
    pub accepted: Vec<u128>,
    /// backend_ids answered 1004.
    pub failed: Vec<u128>,
}

/// Settings of the read-back.
#[derive(Debug, Clone)]
pub(crate) struct VerifySettings {
    pub brokers: String,
    pub idle: Duration,
    pub timeout: Duration,
}

/// A consumer that reads without joining a group.
fn consumer(brokers: &str) -> anyhow::Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("venus-loadtest-verify-{}", Uuid::new_v4()),
        )
        .set("session.timeout.ms", "6000")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .create()
        .context("cannot create the Kafka consumer")
}

/// The partitions of `topic`, or an error naming why there are none.
fn partitions_of(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .with_context(|| format!("topic {topic}: cannot fetch its metadata"))?;
    let Some(entry) = metadata.topics().iter().find(|t| t.name() == topic) else {
        anyhow::bail!("topic {topic} does not exist");
    };
    if let Some(error) = entry.error() {
        anyhow::bail!(
            "topic {topic}: {}",
            rdkafka::error::RDKafkaErrorCode::from(error)
        );
    }
    let partitions: Vec<i32> = entry.partitions().iter().map(|p| p.id()).collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic} has no partitions");
    Ok(partitions)
}

/// Checks the brokers answer and every topic of `topics` exists. Blocking.
pub(crate) fn check_topics(brokers: &str, topics: &[String]) -> anyhow::Result<()> {
    let consumer = consumer(brokers)?;
    for topic in topics {
        partitions_of(&consumer, topic)
            .with_context(|| format!("Kafka at {brokers}: the topics must exist before the run"))?;
    }
    Ok(())
}

/// Checks the brokers answer a metadata request. Blocking.
pub(crate) fn check_brokers(brokers: &str) -> anyhow::Result<()> {
    consumer(brokers)?
        .fetch_metadata(None, METADATA_TIMEOUT)
        .with_context(|| format!("Kafka at {brokers} does not answer"))?;
    Ok(())
}

/// The backend_id in a message value. The gateway writes it first, so the
/// fast path reads it at a fixed place; anything else is parsed as JSON.
pub(crate) fn backend_id_of(value: &[u8]) -> Option<u128> {
    const PREFIX: &[u8] = b"{\"backend_id\":\"";
    if let Some(rest) = value.strip_prefix(PREFIX) {
        if let Some(id) = rest.get(..36).and_then(|t| Uuid::try_parse_ascii(t).ok()) {
            return Some(id.as_u128());
        }
    }
    #[derive(Deserialize)]
    struct Value<'a> {
        #[serde(borrow)]
        backend_id: std::borrow::Cow<'a, str>,
    }
    let parsed: Value = serde_json::from_slice(value).ok()?;
    Uuid::try_parse(&parsed.backend_id)
        .ok()
        .map(|u| u.as_u128())
}

/// The event id (`data.id`) in a message value, when it is a string.
pub(crate) fn event_id_of(value: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Data {
        id: String,
    }
    #[derive(Deserialize)]
    struct Value {
        data: Data,
    }
    serde_json::from_slice::<Value>(value)
        .ok()
        .map(|v| v.data.id)
}

/// Reads the topics back and matches what it finds. Blocking: run it on a
/// blocking thread.
pub(crate) fn verify(
    settings: &VerifySettings,
    topics: &[TopicIds],
    progress: &ProgressBar,
) -> anyhow::Result<VerifyReport> {
    let started = Instant::now();
    // backend_id -> times seen.
    let mut expected: HashMap<u128, u32> = HashMap::new();
    let mut topic_of: HashMap<u128, &str> = HashMap::new();
    let mut failed: HashSet<u128> = HashSet::new();
    let mut failed_seen: HashSet<u128> = HashSet::new();
    for entry in topics {
        expected.extend(entry.accepted.iter().map(|id| (*id, 0)));
        topic_of.extend(entry.accepted.iter().map(|id| (*id, entry.topic.as_str())));
        failed.extend(&entry.failed);
    }
    let mut report = VerifyReport {
        checked: expected.len() as u64,
        ..VerifyReport::default()
    };

    let consumer = consumer(&settings.brokers)?;
    let mut assignment = TopicPartitionList::new();
    for entry in topics {
        if entry.accepted.is_empty() && entry.failed.is_empty() {
            continue;
        }
        // A topic that cannot be read leaves its events missing.
        let partitions = match partitions_of(&consumer, &entry.topic) {
            Ok(partitions) => partitions,
            Err(error) => {
                report.topic_errors.push(format!("{error:#}"));
                continue;
            }
        };
        for partition in partitions {
            assignment
                .add_partition_offset(&entry.topic, partition, Offset::Beginning)
                .context("cannot build the partition assignment")?;
        }
    }
    report.partitions = assignment.count();
    if report.partitions > 0 {
        consumer
            .assign(&assignment)
            .context("cannot assign the partitions")?;
    }

    let mut found = 0u64;
    // (topic, data.id) of this run's messages seen so far.
    let mut event_ids: HashSet<(String, String)> = HashSet::new();
    let mut last_message = Instant::now();
    let mut last_progress = Instant::now();
    let stopped_by = loop {
        let quiet = last_message.elapsed();
        if found == report.checked && quiet >= QUIET_AFTER_ALL_FOUND.min(settings.idle) {
            break "all_found";
        }
        if quiet >= settings.idle || report.partitions == 0 {
            break "idle";
        }
        if started.elapsed() >= settings.timeout {
            break "timeout";
        }
        if last_progress.elapsed() >= Duration::from_millis(250) {
            last_progress = Instant::now();
            progress.set_message(format!(
                "verifying: {found} of {} found, {} messages read",
                report.checked, report.messages_read
            ));
        }
        let message = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            // Transient fetch errors are retried by librdkafka itself.
            Some(Err(_)) => continue,
            Some(Ok(message)) => message,
        };
        last_message = Instant::now();
        report.messages_read += 1;
        let Some(id) = message.payload().and_then(backend_id_of) else {
            report.unreadable += 1;
            continue;
        };
        if expected.contains_key(&id) || failed.contains(&id) {
            if let Some(event_id) = message.payload().and_then(event_id_of) {
                if !event_ids.insert((message.topic().to_owned(), event_id)) {
                    report.duplicate_event_ids += 1;
                }
            }
        }
        match expected.get_mut(&id) {
            Some(seen) => {
                *seen += 1;
                if *seen == 1 {
                    found += 1;
                } else {
                    report.duplicates += 1;
                }
            }
            None if failed.contains(&id) => {
                if failed_seen.insert(id) {
                    report.failed_but_delivered += 1;
                } else {
                    report.duplicates += 1;
                }
            }
            None => report.other_messages += 1,
        }
    };
    report.found = found;
    report.missing = report.checked - found;
    report.missing_sample = expected
        .iter()
        .filter(|(_, seen)| **seen == 0)
        .take(10)
        .map(|(id, _)| format!("{}/{}", topic_of[id], Uuid::from_u128(*id)))
        .collect();
    report.elapsed_secs = started.elapsed().as_secs_f64();
    report.stopped_by = stopped_by.to_owned();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_id_is_read_from_the_gateway_shape_and_from_any_json() {
        let id = Uuid::now_v7();
        let gateway = format!(
            r#"{{"backend_id":"{id}","upload_time":1,"ip":"1.2.3.4","country":"","region":"","city":"","meta":{{}},"data":{{}}}}"#
        );
        assert_eq!(backend_id_of(gateway.as_bytes()), Some(id.as_u128()));
        let reordered = format!(r#"{{"upload_time":1, "backend_id" : "{id}"}}"#);
        assert_eq!(backend_id_of(reordered.as_bytes()), Some(id.as_u128()));
        assert_eq!(backend_id_of(b"{\"backend_id\":\"nope\"}"), None);
        assert_eq!(backend_id_of(b"not json"), None);
    }

    #[test]
    fn the_event_id_is_data_id() {
        assert_eq!(
            event_id_of(br#"{"backend_id":"x","data":{"id":"7-1-3","n":1}}"#).as_deref(),
            Some("7-1-3")
        );
        assert_eq!(event_id_of(br#"{"data":{"id":5}}"#), None);
        assert_eq!(event_id_of(b"nope"), None);
    }
}
