//! What recent deliveries say about the producer: whether it delivers, since
//! when it has not, and whether its errors say it can never again.
//!
//! A metadata request answering is not enough to call the gateway ready: an
//! idempotent producer can be left fenced after a broker outage while the
//! cluster answers metadata perfectly well (see docs/RELIABILITY.md). So
//! every batch reports how its deliveries went, and readiness and the healer
//! read these few atomics. Outcomes of a replaced producer are ignored: they
//! say nothing about the current one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// How long deliveries must have been failing, without a success, before
/// readiness says so (a single failed batch is not an outage).
const NOT_READY_AFTER: Duration = Duration::from_secs(1);

/// A failure older than this no longer counts against readiness: with the
/// gateway out of rotation no traffic comes to prove it healthy again, so
/// readiness falls back to the metadata check and traffic finds out.
const FAILURE_MEMORY: Duration = Duration::from_secs(10);

pub struct DeliveryHealth {
    epoch: Instant,
    /// The generation of the current producer.
    generation: AtomicU64,
    /// When the current failing streak began, in ms since `epoch` plus one
    /// (0: not failing).
    failing_since: AtomicU64,
    /// When a delivery last failed, in ms since `epoch` plus one (0: never).
    last_failure: AtomicU64,
    /// Whether the current producer reported an error after which an
    /// idempotent producer never delivers again.
    fenced: AtomicBool,
    /// Whether the current producer has had an event acknowledged.
    delivered: AtomicBool,
    /// The last failure's text (written on the failure path only).
    last_error: Mutex<String>,
}

impl Default for DeliveryHealth {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            generation: AtomicU64::new(0),
            failing_since: AtomicU64::new(0),
            last_failure: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            delivered: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
        }
    }
}

impl DeliveryHealth {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// How one batch of producer `generation` went: how many of its events
    /// were acknowledged, and the first error if any failed.
    pub fn record(&self, generation: u64, acknowledged: usize, error: Option<&KafkaError>) {
        if generation != self.generation.load(Ordering::Acquire) {
            return;
        }
        if acknowledged > 0 {
            self.failing_since.store(0, Ordering::Release);
            self.delivered.store(true, Ordering::Release);
        }
        // Only what says something about the producer or the cluster counts:
        // a topic's authorization or size limit is one client's problem, and
        // must not make every replica unready or restart the producer.
        let Some(error) = error.filter(|e| is_about_the_producer(e)) else {
            return;
        };
        let now = self.now();
        self.last_failure.store(now, Ordering::Release);
        if acknowledged == 0 {
            let _ =
                self.failing_since
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
        }
        if is_unrecoverable(error) {
            self.fenced.store(true, Ordering::Release);
        }
        if let Ok(mut last) = self.last_error.lock() {
            *last = error.to_string();
        }
    }

    /// A new producer (of `generation`) replaced the old one: start afresh.
    pub fn replaced(&self, generation: u64) {
        self.generation.store(generation, Ordering::Release);
        self.failing_since.store(0, Ordering::Release);
        self.fenced.store(false, Ordering::Release);
        self.delivered.store(false, Ordering::Release);
    }

    /// Whether the current producer has delivered since it was put in place
    /// (the healer's back-off starts over only then).
    pub fn delivered(&self) -> bool {
        self.delivered.load(Ordering::Acquire)
    }

    /// Whether the current producer reported an unrecoverable error.
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// How long deliveries have been failing without a success.
    pub fn failing_for(&self) -> Option<Duration> {
        match self.failing_since.load(Ordering::Acquire) {
            0 => None,
            since => Some(Duration::from_millis(self.now().saturating_sub(since))),
        }
    }

    /// Why the gateway cannot deliver now, if recent deliveries say so.
    pub fn problem(&self) -> Option<String> {
        let failing_for = self.failing_for()?;
        let last_failure = self.last_failure.load(Ordering::Acquire);
        let since_last = Duration::from_millis(self.now().saturating_sub(last_failure));
        if failing_for < NOT_READY_AFTER || since_last > FAILURE_MEMORY {
            return None;
        }
        let last = self
            .last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        Some(format!(
            "Kafka deliveries failing for {} s without a success; last error: {last}",
            failing_for.as_secs()
        ))
    }
}

/// Errors that say the producer or the cluster cannot deliver (timeouts,
/// transport, leaders, replicas), as opposed to a message or a topic being
/// refused (too large, not authorized, unknown topic, invalid record).
pub fn is_about_the_producer(error: &KafkaError) -> bool {
    is_unrecoverable(error)
        || matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::MessageTimedOut
                    | RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::Resolve
                    | RDKafkaErrorCode::NetworkException
                    | RDKafkaErrorCode::BrokerNotAvailable
                    | RDKafkaErrorCode::LeaderNotAvailable
                    | RDKafkaErrorCode::NotLeaderForPartition
                    | RDKafkaErrorCode::NotEnoughReplicas
                    | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                    | RDKafkaErrorCode::KafkaStorageError
            )
        )
}

/// Errors after which an idempotent producer does not deliver again: its
/// producer id or epoch is no longer valid (a newer producer with the same
/// id exists, the broker forgot it, its sequence numbers broke), or
/// librdkafka raised a fatal error. A new producer, with a new producer id,
/// is the way out.
pub fn is_unrecoverable(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::InvalidProducerIdMapping
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::Fatal
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn a_success_ends_a_failing_streak() {
        let health = DeliveryHealth::default();
        health.record(0, 0, Some(&error(RDKafkaErrorCode::MessageTimedOut)));
        assert!(health.failing_for().is_some());
        assert!(!health.fenced(), "a timeout is not fencing");
        health.record(0, 3, None);
        assert_eq!(health.failing_for(), None);
        assert_eq!(health.problem(), None);
    }

    #[test]
    fn a_batch_with_some_acknowledged_is_not_a_failing_streak() {
        let health = DeliveryHealth::default();
        health.record(0, 2, Some(&error(RDKafkaErrorCode::MessageTimedOut)));
        assert_eq!(health.failing_for(), None);
    }

    #[test]
    fn failing_for_a_while_is_a_readiness_problem_with_the_last_error() {
        let health = DeliveryHealth::default();
        health.record(0, 0, Some(&error(RDKafkaErrorCode::MessageTimedOut)));
        assert_eq!(health.problem(), None, "not after one failure");
        std::thread::sleep(NOT_READY_AFTER + Duration::from_millis(50));
        health.record(0, 0, Some(&error(RDKafkaErrorCode::ProducerFenced)));
        let problem = health.problem().expect("a problem");
        assert!(problem.contains("failing for 1 s"), "{problem}");
        assert!(problem.contains("fences"), "{problem}");
        assert!(health.fenced());
    }

    #[test]
    fn a_message_or_topic_refused_says_nothing_about_the_producer() {
        let health = DeliveryHealth::default();
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            health.record(0, 0, Some(&error(code)));
        }
        assert_eq!(health.failing_for(), None);
        assert!(!health.fenced());
    }

    #[test]
    fn delivered_is_per_producer() {
        let health = DeliveryHealth::default();
        assert!(!health.delivered());
        health.record(0, 1, None);
        assert!(health.delivered());
        health.replaced(1);
        assert!(!health.delivered());
    }

    #[test]
    fn outcomes_of_a_replaced_producer_are_ignored() {
        let health = DeliveryHealth::default();
        health.replaced(1);
        health.record(0, 0, Some(&error(RDKafkaErrorCode::ProducerFenced)));
        assert!(!health.fenced());
        assert_eq!(health.failing_for(), None);
        health.record(1, 0, Some(&error(RDKafkaErrorCode::ProducerFenced)));
        assert!(health.fenced());
        health.replaced(2);
        assert!(!health.fenced());
        assert_eq!(health.failing_for(), None);
    }
}
