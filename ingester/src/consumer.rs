//! The Kafka side: one thread that polls the group consumer without pause
//! (so `max.poll.interval.ms` never expires, whatever ClickHouse does; the
//! one wait is a revoke's, for the revoked partitions' messages in flight,
//! at most `ingester.revoke_wait_ms`),
//! hands messages on, pauses and resumes the assignment by how much is
//! buffered, stores the offsets the markers allow, and commits on revoke and
//! at shutdown.
//!
//! Subscription is by regex over the topics `kafka.topic_template` can
//! produce, refreshed every `ingester.topic_refresh_ms`, so a new category
//! is picked up without a restart; assignment is cooperative-sticky.
//! Offsets are committed by librdkafka every second from what the thread
//! stored (`enable.auto.offset.store=false`), and synchronously on revoke
//! and shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::Settings;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::offsets::Offsets;
use crate::record::{HeldBytes, Record};

/// How often the poll thread stores offsets and updates gauges.
const STORE_INTERVAL: Duration = Duration::from_millis(200);

/// Escapes the regex metacharacters of a literal part of the template.
fn escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The subscription regex of a topic template: `{category}` stands for any
/// category the gateway accepts (`[A-Za-z0-9_]{1,64}`) except those starting
/// with `__`, which are reserved (the dead-letter topic is one).
pub fn subscription_pattern(template: &str) -> String {
    const CATEGORY: &str = "(_?[A-Za-z0-9][A-Za-z0-9_]*|_)";
    let parts: Vec<String> = template.split("{category}").map(escape).collect();
    format!("^{}$", parts.join(CATEGORY))
}

/// The consumer's context: the rebalance hooks and librdkafka statistics.
pub struct Context {
    offsets: Arc<Offsets>,
    /// `ingester.revoke_wait_ms`.
    revoke_wait: Duration,
    /// Set when fetching stops for shutdown: the final revoke (when the
    /// consumer closes) does not wait, the drain did.
    stopping: Arc<AtomicBool>,
    metrics: Metrics,
    paused: Arc<AtomicBool>,
    health: Arc<Health>,
}

/// The `/readyz` part of the consumer's connection to Kafka.
const KAFKA_PART: &str = "kafka";

impl ClientContext for Context {
    /// librdkafka's client-level errors (a TLS handshake or SASL failure,
    /// every broker down) name the broker and the cause: `/readyz` says
    /// them until a broker is up again.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "Kafka client error");
        // "1/1 brokers are down" follows the reason they are (a failed TLS
        // handshake): keep the reason.
        if venus_shared::kafka_security::all_brokers_down(&error) && self.health.has(KAFKA_PART) {
            return;
        }
        self.health
            .fail(KAFKA_PART, format!("Kafka consumer: {reason}"));
    }

    fn stats(&self, statistics: Statistics) {
        if statistics.brokers.values().any(|b| b.state == "UP") {
            self.health.ok(KAFKA_PART);
        }
        for (name, topic) in &statistics.topics {
            for (id, partition) in &topic.partitions {
                // Statistics keep partitions this instance no longer owns;
                // their lag is their new owner's to report.
                if *id >= 0 && partition.consumer_lag >= 0 && self.offsets.is_assigned(name, *id) {
                    self.metrics.lag(name, *id, partition.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        // Let the messages of the revoked partitions in flight finish (the
        // processor and writers go on meanwhile), within the bound: their
        // next owner then finds them committed, not to be inserted again.
        // Rows still unfinished at the bound are dropped by the writer
        // before its next attempt (their epoch is gone).
        let started = Instant::now();
        let wait = if self.stopping.load(Ordering::Relaxed) {
            Duration::ZERO
        } else {
            self.revoke_wait
        };
        let deadline = started + wait;
        let pending = || {
            revoked
                .elements()
                .iter()
                .map(|e| self.offsets.pending(e.topic(), e.partition()))
                .sum::<usize>()
        };
        let in_flight = pending();
        let mut left = in_flight;
        while left > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            left = pending();
        }
        if left > 0 {
            tracing::warn!(
                messages = left,
                "revoked partitions handed over with messages in flight; their next owner reads them again"
            );
        }
        // Commit what is done of the revoked partitions before their next
        // owner starts.
        let mut commit = TopicPartitionList::new();
        for element in revoked.elements() {
            self.metrics
                .forget_lag(element.topic(), element.partition());
            if let Some(next) = self.offsets.revoke(element.topic(), element.partition()) {
                let _ = commit.add_partition_offset(
                    element.topic(),
                    element.partition(),
                    Offset::Offset(next),
                );
            }
        }
        tracing::info!(
            partitions = revoked.count(),
            in_flight,
            waited_ms = started.elapsed().as_millis() as u64,
            "partitions revoked"
        );
        if commit.count() > 0 {
            if let Err(error) = consumer.commit(&commit, CommitMode::Sync) {
                tracing::warn!(%error, "commit on revoke failed");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(assigned) = rebalance else {
            return;
        };
        for element in assigned.elements() {
            self.offsets.assign(element.topic(), element.partition());
        }
        let protocol = match consumer.rebalance_protocol() {
            rdkafka::consumer::RebalanceProtocol::Cooperative => "cooperative",
            rdkafka::consumer::RebalanceProtocol::Eager => "eager",
            rdkafka::consumer::RebalanceProtocol::None => "none",
        };
        let list: Vec<String> = assigned
            .elements()
            .iter()
            .map(|e| format!("{}/{}", e.topic(), e.partition()))
            .collect();
        tracing::info!(
            partitions = assigned.count(),
            assigned = list.join(","),
            protocol,
            "partitions assigned"
        );
        if self.paused.load(Ordering::Relaxed) {
            let _ = consumer.pause(assigned);
        }
    }
}

/// The librdkafka consumer configuration: our settings, then the
/// pass-through map.
pub fn consumer_config(settings: &Settings) -> ClientConfig {
    let ingester = &settings.ingester;
    let mut config = settings.kafka.client_config();
    // librdkafka's prefetch queue holds fetched messages outside the
    // buffer's count; keep it a quarter of the byte bound (at most
    // librdkafka's default of 64 MiB, at least 1 MiB).
    let prefetch_kib = (ingester.max_buffered_bytes / 4 / 1024).clamp(1024, 65_536);
    config
        .set("queued.max.messages.kbytes", prefetch_kib.to_string())
        .set("group.id", &ingester.group_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set(
            "session.timeout.ms",
            ingester.session_timeout_ms.to_string(),
        )
        .set(
            "topic.metadata.refresh.interval.ms",
            ingester.topic_refresh_ms.to_string(),
        )
        .set("statistics.interval.ms", "2000");
    for (key, value) in &ingester.consumer {
        config.set(key, value);
    }
    config
}

/// The running poll thread.
pub struct PollThread {
    stop: Arc<AtomicBool>,
    drained: std::sync::mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl PollThread {
    /// Subscribes and starts polling; messages go to `records`.
    pub fn start(
        settings: &Settings,
        offsets: Arc<Offsets>,
        metrics: Metrics,
        records: UnboundedSender<Record>,
        held: HeldBytes,
        health: Arc<Health>,
        grace: Duration,
    ) -> anyhow::Result<Self> {
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let consumer: BaseConsumer<Context> =
            consumer_config(settings).create_with_context(Context {
                offsets: offsets.clone(),
                revoke_wait: Duration::from_millis(settings.ingester.revoke_wait_ms),
                stopping: stop.clone(),
                metrics: metrics.clone(),
                paused: paused.clone(),
                health: health.clone(),
            })?;
        let pattern = subscription_pattern(&settings.kafka.topic_template);
        consumer.subscribe(&[pattern.as_str()])?;
        tracing::info!(%pattern, group = %settings.ingester.group_id, "subscribed");
        let (drained, drained_rx) = std::sync::mpsc::channel();
        let poller = Poller {
            consumer,
            offsets,
            metrics,
            paused,
            records,
            max_buffered: settings.ingester.max_buffered_rows as i64,
            held,
            max_held_bytes: settings.ingester.max_buffered_bytes as i64,
            dead_letter_topic: settings.ingester.dead_letter_topic.clone(),
            stop: stop.clone(),
            drained: drained_rx,
            grace,
        };
        let thread = std::thread::Builder::new()
            .name("kafka-poll".into())
            .spawn(move || {
                // However the thread ends (a panic included), `/readyz`
                // says so: nothing is read any more.
                let _alarm = Alarm(health);
                poller.run()
            })?;
        Ok(Self {
            stop,
            drained,
            thread: Some(thread),
        })
    }

    /// Stops fetching; the thread then waits for [`PollThread::drained`]
    /// (or the grace) before its final store and commit.
    pub fn stop_fetching(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Everything read is finished (or given up): store, commit, leave.
    pub fn drained(&self) {
        let _ = self.drained.send(());
    }

    /// Waits for the thread (on a blocking thread; it commits synchronously).
    pub async fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Reports the poll thread's end to `/readyz` when dropped.
struct Alarm(Arc<Health>);

impl Drop for Alarm {
    fn drop(&mut self) {
        self.0
            .fail("kafka poll thread", "the Kafka poll thread stopped");
    }
}

struct Poller {
    consumer: BaseConsumer<Context>,
    offsets: Arc<Offsets>,
    metrics: Metrics,
    paused: Arc<AtomicBool>,
    records: UnboundedSender<Record>,
    max_buffered: i64,
    held: HeldBytes,
    max_held_bytes: i64,
    dead_letter_topic: String,
    stop: Arc<AtomicBool>,
    drained: std::sync::mpsc::Receiver<()>,
    grace: Duration,
}

impl Poller {
    fn run(self) {
        let mut last_store = Instant::now();
        // The topic of the previous message: records of one topic share its
        // name, and the consumed counter is added per topic at each store.
        let mut topic: Option<Arc<str>> = None;
        let mut consumed: Vec<(Arc<str>, u64)> = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            self.backpressure();
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    use rdkafka::Message;
                    if message.topic() == self.dead_letter_topic {
                        // Never ingest our own dead letters (the pattern
                        // already excludes the default topic).
                        continue;
                    }
                    let (epoch, gap) =
                        self.offsets
                            .track(message.topic(), message.partition(), message.offset());
                    if gap > 0 {
                        // Never expected on our topics (no compaction, no
                        // transactions): a broker that skipped records.
                        tracing::warn!(
                            topic = message.topic(),
                            partition = message.partition(),
                            offset = message.offset(),
                            skipped = gap,
                            "offsets skipped since the previous message of the partition"
                        );
                        self.metrics.offset_gap(message.topic(), gap);
                    }
                    let name = match &topic {
                        Some(name) if **name == *message.topic() => name.clone(),
                        _ => topic.insert(Arc::from(message.topic())).clone(),
                    };
                    match consumed.iter_mut().find(|(t, _)| Arc::ptr_eq(t, &name)) {
                        Some((_, count)) => *count += 1,
                        None => consumed.push((name.clone(), 1)),
                    }
                    if self
                        .records
                        .send(Record::from_message(&message, name, epoch).charged(&self.held))
                        .is_err()
                    {
                        self.offsets.abandon();
                        break;
                    }
                }
                Some(Err(error)) => tracing::warn!(%error, "Kafka consumer error"),
                None => {}
            }
            if last_store.elapsed() >= STORE_INTERVAL {
                for (topic, count) in consumed.drain(..) {
                    self.metrics.consumed(&topic, count);
                }
                self.store();
                last_store = Instant::now();
            }
        }
        for (topic, count) in consumed.drain(..) {
            self.metrics.consumed(&topic, count);
        }
        let Poller {
            consumer,
            offsets,
            records,
            drained,
            grace,
            metrics,
            ..
        } = self;
        // No more messages: the processor flushes what it has and the
        // writer finishes; then what is done is committed.
        drop(records);
        let _ = drained.recv_timeout(grace);
        store(&consumer, &offsets);
        metrics.buffered(offsets.in_flight());
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("offsets committed"),
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => tracing::info!("offsets committed (already, by the periodic commit)"),
            Err(error) => tracing::warn!(%error, "final commit failed"),
        }
        consumer.unsubscribe();
        drop(consumer);
    }

    fn store(&self) {
        store(&self.consumer, &self.offsets);
        self.metrics.buffered(self.offsets.in_flight());
    }

    /// Pauses the whole assignment while too much is buffered (rows or
    /// bytes), resumes below half of both. The thread keeps polling either
    /// way.
    fn backpressure(&self) {
        let buffered = self.offsets.in_flight();
        let held = self.held.get();
        let paused = self.paused.load(Ordering::Relaxed);
        let change = if !paused && (buffered >= self.max_buffered || held >= self.max_held_bytes) {
            Some(true)
        } else if paused && buffered <= self.max_buffered / 2 && held <= self.max_held_bytes / 2 {
            Some(false)
        } else {
            None
        };
        let Some(pause) = change else {
            return;
        };
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        match result {
            Ok(()) => {
                self.paused.store(pause, Ordering::Relaxed);
                self.metrics.paused(pause);
                tracing::info!(
                    buffered,
                    held_bytes = held,
                    paused = pause,
                    "fetching paused or resumed"
                );
            }
            Err(error) => tracing::warn!(%error, "pause/resume failed"),
        }
    }
}

/// Hands the markers' committable offsets to librdkafka, which commits them.
fn store(consumer: &BaseConsumer<Context>, offsets: &Offsets) {
    let positions = offsets.to_store();
    if positions.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for (topic, partition, next) in &positions {
        // `store_offsets` stores the offsets as given: the next one to read.
        let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*next));
    }
    if let Err(error) = consumer.store_offsets(&list) {
        tracing::debug!(%error, "storing offsets");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_matches_every_category_topic_and_not_reserved_ones() {
        let pattern =
            regex::Regex::new(&subscription_pattern("to_analyzer__0.{category}")).unwrap();
        for topic in [
            "to_analyzer__0.page_view",
            "to_analyzer__0.a",
            "to_analyzer__0._private",
            "to_analyzer__0._",
            "to_analyzer__0.9",
        ] {
            assert!(pattern.is_match(topic), "{topic}");
        }
        for topic in [
            "to_analyzer__0.__dead_letter",
            "to_analyzer__0.",
            "to_analyzer__0xpage",
            "other.page_view",
            "to_analyzer__0.a.b",
            "to_analyzer__0.a-b",
        ] {
            assert!(!pattern.is_match(topic), "{topic}");
        }
    }

    #[test]
    fn the_poll_threads_end_shows_in_readyz_even_by_a_panic() {
        let health = Arc::new(Health::default());
        let alarm = Alarm(health.clone());
        let thread = std::thread::spawn(move || {
            let _alarm = alarm;
            panic!("the poll thread dies");
        });
        assert!(thread.join().is_err());
        let reason = health.readiness().unwrap_err();
        assert!(reason.contains("poll thread stopped"), "{reason}");
    }

    #[test]
    fn literal_parts_of_the_template_are_escaped() {
        assert_eq!(
            subscription_pattern("a.b+{category}$"),
            "^a\\.b\\+(_?[A-Za-z0-9][A-Za-z0-9_]*|_)\\$$"
        );
    }
}
