//! Back to Kafka: the spool's records, oldest segment first and in order
//! within it, each with its original topic, key, headers (`traceparent`,
//! `request_id`) and value (`backend_id`, `upload_time`).
//!
//! Records go in chunks of a tenth of `spool.replay_events_per_sec`, at
//! most ten chunks a second, so that live traffic keeps room. A chunk's
//! records are removed (the segment's cursor moves past them; a finished
//! segment is deleted) only once Kafka acknowledged every one of them; a
//! chunk with a failure is sent again after a pause, so an event can reach
//! Kafka twice (same `backend_id`) but is never dropped. While deliveries
//! are failing, one record at a time probes Kafka; its acknowledgement tells
//! `write_kafka` (through the delivery health) that Kafka takes events again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;

use super::record::{next_frame, Frame, SpoolRecord};
use super::{segment, Spool};
use crate::drain::{Drain, Phase};
use crate::kafka::acks::BatchAcks;
use crate::kafka::topics::TopicState;
use crate::kafka::KafkaSink;

/// The pause after a chunk Kafka did not take, doubling up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Starts the replay task.
pub fn spawn(spool: Spool, sink: Arc<KafkaSink>, drain: Drain) {
    tokio::spawn(run(spool, sink, drain));
}

/// One record read back, with the offset just past it.
struct Pending {
    record: SpoolRecord,
    end: u64,
}

/// What [`read_from`] found.
struct Read {
    records: Vec<Pending>,
    /// A frame before `limit` that does not read back (damage since
    /// start-up): the segment goes to quarantine once the records before
    /// it are sent.
    damaged: bool,
}

/// Reads segment `id` from `offset` up to `limit` (what the writer
/// fsynced and accounted for; anything after is not the spool's).
fn read_from(spool: &Spool, id: u64, offset: u64, limit: u64) -> std::io::Result<Read> {
    let bytes = std::fs::read(segment::segment_path(spool.path(), id))?;
    let end = (limit as usize).min(bytes.len());
    let mut records = Vec::new();
    let mut at = offset as usize;
    let mut damaged = false;
    while at < end {
        match next_frame(&bytes[at..end]) {
            Frame::Whole { payload, size } => match SpoolRecord::decode(payload) {
                Ok(record) => {
                    at += size;
                    records.push(Pending {
                        record,
                        end: at as u64,
                    });
                }
                Err(_) => {
                    damaged = true;
                    break;
                }
            },
            Frame::End => break,
            Frame::Torn | Frame::Corrupt => {
                damaged = true;
                break;
            }
        }
    }
    // A file shorter than what was written to it is damage too.
    if at >= end && end < limit as usize {
        damaged = true;
    }
    Ok(Read { records, damaged })
}

/// Runs blocking spool work off the runtime.
async fn off_runtime(spool: &Spool, work: impl FnOnce(&Spool) + Send + 'static) {
    let spool = spool.clone();
    let _ = tokio::task::spawn_blocking(move || work(&spool)).await;
}

async fn run(spool: Spool, sink: Arc<KafkaSink>, drain: Drain) {
    let rate = spool.shared.settings.replay_events_per_sec.max(1) as usize;
    let chunk = (rate / 10).max(1);
    let mut backoff = FIRST_BACKOFF;
    loop {
        if drain.phase() != Phase::Serving {
            return;
        }
        let Some((id, offset, limit)) = spool.oldest_sealed() else {
            tokio::select! {
                _ = spool.shared.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        };
        let reading = {
            let spool = spool.clone();
            tokio::task::spawn_blocking(move || read_from(&spool, id, offset, limit)).await
        };
        let Read { records, damaged } = match reading {
            Ok(Ok(read)) => read,
            Ok(Err(error)) => {
                tracing::error!(%error, segment = id, "cannot read a spool segment; retrying");
                tokio::time::sleep(MAX_BACKOFF).await;
                continue;
            }
            Err(_) => return,
        };
        if records.is_empty() {
            if damaged {
                off_runtime(&spool, move |spool| spool.quarantine(id, offset)).await;
            } else {
                // Everything written was sent.
                off_runtime(&spool, move |spool| spool.replayed(id, limit, 0, 0, None)).await;
            }
            continue;
        }
        let mut next = 0;
        while next < records.len() {
            if drain.phase() != Phase::Serving {
                return;
            }
            // While deliveries fail, one record probes.
            let size = if sink.health().failing_for().is_some() {
                1
            } else {
                chunk
            };
            let end = (next + size).min(records.len());
            let started = Instant::now();
            let sent = match send(&sink, &records[next..end], &drain).await {
                Sent::Shutdown => return,
                sent => sent,
            };
            let requeue: Vec<SpoolRecord> = match &sent {
                Sent::All => Vec::new(),
                Sent::Refused(acked) => records[next..end]
                    .iter()
                    .zip(acked)
                    .filter(|(_, acked)| !**acked)
                    .map(|(pending, _)| pending.record.clone())
                    .collect(),
                Sent::Retry | Sent::Shutdown => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            // A record Kafka refuses for its topic (missing, not authorized)
            // goes to the spool's end first, so that the other topics go
            // on; it stays in the spool until Kafka takes it.
            let acked = ((end - next) - requeue.len()) as u64;
            if !requeue.is_empty() {
                let topic = requeue[0].topic.clone();
                if let Err(error) = spool.append(&requeue).await {
                    tracing::warn!(%error, %topic, "cannot requeue refused spool records; retrying");
                    tokio::time::sleep(MAX_BACKOFF).await;
                    continue;
                }
                spool
                    .shared
                    .counters
                    .requeued
                    .fetch_add(requeue.len() as u64, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    %topic,
                    records = requeue.len(),
                    "Kafka refused spooled records for their topic: moved to the spool's end"
                );
            }
            let last = records[end - 1].end;
            let following = records.get(end).map(|p| p.record.spooled_at_ms);
            let done = (end - next) as u64;
            off_runtime(&spool, move |spool| {
                spool.replayed(id, last, done, acked, following)
            })
            .await;
            next = end;
            if requeue.is_empty() {
                backoff = FIRST_BACKOFF;
                // At most `rate` records a second.
                let budget = Duration::from_secs_f64(size as f64 / rate as f64);
                if let Some(rest) = budget.checked_sub(started.elapsed()) {
                    tokio::time::sleep(rest).await;
                }
            } else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        if damaged {
            // The records before the damage are sent; the next read finds
            // nothing whole and moves the segment aside.
            continue;
        }
    }
}

/// How a chunk went.
enum Sent {
    /// Every record acknowledged.
    All,
    /// Kafka could not take them now (down, timed out, the producer's
    /// queue full): send the chunk again later.
    Retry,
    /// Kafka refused some for their topic (missing, not authorized, too
    /// large): which were acknowledged.
    Refused(Vec<bool>),
    /// The gateway is shutting down.
    Shutdown,
}

/// Produces `records` and waits for their acknowledgements (at most the
/// delivery timeout). A record whose topic the broker says is missing is
/// not produced (librdkafka would hold it until it times out, and every
/// topic behind it would wait): it counts as refused.
async fn send(sink: &Arc<KafkaSink>, records: &[Pending], drain: &Drain) -> Sent {
    let producer = sink.producer();
    let mut missing: Vec<&str> = Vec::new();
    for pending in records {
        let topic = pending.record.topic.as_str();
        if !missing.contains(&topic)
            && sink.topics().check(&producer, topic).await == TopicState::Missing
        {
            missing.push(topic);
        }
    }

    let acks = BatchAcks::new(records.len());
    for (index, pending) in records.iter().enumerate() {
        let record = &pending.record;
        if missing.contains(&record.topic.as_str()) {
            continue;
        }
        let mut headers = OwnedHeaders::new();
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_slice()),
            });
        }
        let mut message = BaseRecord::with_opaque_to(&record.topic, acks.delivery(index))
            .payload(&record.value)
            .headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key);
        }
        acks.sent();
        if producer.producer.send(message).is_err() {
            // The producer's queue is full (live traffic first): later.
            acks.not_sent();
        }
    }
    acks.all_sent();
    let deadline = tokio::time::sleep(sink.delivery_timeout());
    let timed_out = tokio::select! {
        _ = acks.all_answered() => false,
        _ = deadline => true,
        _ = drain.answer_now() => return Sent::Shutdown,
    };
    let outcomes = acks.take();
    let acked: Vec<bool> = outcomes.iter().map(|o| matches!(o, Some(Ok(())))).collect();
    let acknowledged = acked.iter().filter(|a| **a).count();
    let first_error = outcomes.iter().find_map(|o| match o {
        Some(Err(error)) => Some(error.clone()),
        _ => None,
    });
    // What readiness and `write_kafka` judge Kafka by: the real error, or a
    // timeout when the deadline passed; nothing for a queue that was full.
    let timeout = rdkafka::error::KafkaError::MessageProduction(
        rdkafka::types::RDKafkaErrorCode::MessageTimedOut,
    );
    let reported = first_error.clone().or_else(|| timed_out.then_some(timeout));
    if acknowledged > 0 || reported.is_some() {
        sink.report(producer.generation, acknowledged, reported.as_ref());
    }
    if acknowledged == records.len() {
        return Sent::All;
    }
    let produced = records.len()
        - records
            .iter()
            .filter(|p| missing.contains(&p.record.topic.as_str()))
            .count();
    match first_error {
        Some(error) if !crate::kafka::health::is_about_the_producer(&error) => Sent::Refused(acked),
        // Only the missing topics' records were not taken.
        None if !missing.is_empty() && acknowledged == produced => Sent::Refused(acked),
        _ => Sent::Retry,
    }
}
