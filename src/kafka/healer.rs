//! Replaces a producer that can no longer deliver although the cluster is
//! reachable.
//!
//! After a broker outage longer than the message timeout, librdkafka's
//! idempotent producer bumps its epoch; against some brokers it then gets
//! `ProducerFenced` for every message, for ever, while metadata requests
//! answer fine (docs/RELIABILITY.md has the details). Only a new producer,
//! with a new producer id, delivers again. This task looks every
//! [`CHECK_EVERY`] at what deliveries reported (`health`) and rebuilds the
//! producer when:
//!
//! * librdkafka raised a fatal error (`fatal`);
//! * a delivery failed with an error after which an idempotent producer
//!   never delivers again (`fenced`);
//! * deliveries have failed without a success for
//!   `kafka.rebuild_after_failing_ms` while a metadata request succeeds
//!   (`stuck`): the cluster is there, the producer is not getting through.
//!
//! Rebuilds are spaced by a back-off that doubles up to [`MAX_BACKOFF`]
//! (and starts over once a producer delivered), so a cluster that stays
//! broken cannot make the gateway spin.

use std::sync::Weak;
use std::time::Duration;

use tokio::time::Instant;

use super::KafkaSink;

/// How often the producer's health is looked at.
pub const CHECK_EVERY: Duration = Duration::from_millis(200);

/// The first wait between two rebuilds, and the longest.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Why a producer was replaced (the `reason` label of
/// `venus_kafka_producer_restarts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    Fatal,
    Fenced,
    Stuck,
}

impl RestartReason {
    pub const ALL: [RestartReason; 3] = [Self::Fatal, Self::Fenced, Self::Stuck];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fatal => "fatal",
            Self::Fenced => "fenced",
            Self::Stuck => "stuck",
        }
    }
}

/// Runs until the sink is dropped.
pub async fn run(sink: Weak<KafkaSink>, stuck_after: Duration) {
    let mut backoff = FIRST_BACKOFF;
    let mut not_before = Instant::now();
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(sink) = sink.upgrade() else {
            return;
        };
        if sink.health().delivered() {
            // This producer delivered: the next trouble starts over. (Not
            // "no failures": right after a rebuild there are none yet, and a
            // cluster that fences every new producer must not make the
            // gateway rebuild every second.)
            backoff = FIRST_BACKOFF;
        }
        let Some(reason) = diagnose(&sink, stuck_after).await else {
            continue;
        };
        if Instant::now() < not_before {
            continue;
        }
        match sink.rebuild(reason) {
            Ok(generation) => tracing::warn!(
                reason = reason.as_str(),
                generation,
                next_rebuild_not_before_s = backoff.as_secs(),
                "replaced the Kafka producer: it could no longer deliver"
            ),
            Err(error) => {
                tracing::warn!(reason = reason.as_str(), %error, "cannot build a new Kafka producer")
            }
        }
        not_before = Instant::now() + backoff;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Why the current producer should be replaced, if it should.
async fn diagnose(
    sink: &std::sync::Arc<KafkaSink>,
    stuck_after: Duration,
) -> Option<RestartReason> {
    if sink.fatal_error().is_some() {
        return Some(RestartReason::Fatal);
    }
    if sink.health().fenced() {
        return Some(RestartReason::Fenced);
    }
    if sink.health().failing_for()? < stuck_after {
        return None;
    }
    // Failing for long: only a reachable cluster makes it the producer's
    // fault (during an outage a new producer would not help).
    let asked = sink.clone();
    let reachable =
        tokio::task::spawn_blocking(move || asked.check_reachable(Duration::from_secs(2)).is_ok())
            .await
            .unwrap_or(false);
    reachable.then_some(RestartReason::Stuck)
}
