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

/// Reads segment `id` from `offset`: the records up to the first frame
/// that is not whole (recovery cut those at start-up; a sealed segment has
/// none after).
fn read_from(spool: &Spool, id: u64, offset: u64) -> std::io::Result<Vec<Pending>> {
    let bytes = std::fs::read(segment::segment_path(spool.path(), id))?;
    let mut records = Vec::new();
    let mut at = offset as usize;
    while let Frame::Whole { payload, size } = next_frame(bytes.get(at..).unwrap_or_default()) {
        at += size;
        match SpoolRecord::decode(payload) {
            Ok(record) => records.push(Pending {
                record,
                end: at as u64,
            }),
            Err(error) => {
                tracing::error!(%error, segment = id, "an unreadable spool record is skipped");
            }
        }
    }
    Ok(records)
}

async fn run(spool: Spool, sink: Arc<KafkaSink>, drain: Drain) {
    let rate = spool.shared.settings.replay_events_per_sec.max(1) as usize;
    let chunk = (rate / 10).max(1);
    let mut backoff = FIRST_BACKOFF;
    loop {
        if drain.phase() != Phase::Serving {
            return;
        }
        let Some((id, offset)) = spool.oldest_sealed() else {
            tokio::select! {
                _ = spool.shared.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        };
        let reading = {
            let spool = spool.clone();
            tokio::task::spawn_blocking(move || read_from(&spool, id, offset)).await
        };
        let records = match reading {
            Ok(Ok(records)) => records,
            Ok(Err(error)) => {
                tracing::error!(%error, segment = id, "cannot read a spool segment; retrying");
                tokio::time::sleep(MAX_BACKOFF).await;
                continue;
            }
            Err(_) => return,
        };
        if records.is_empty() {
            // Nothing readable left in it.
            spool.replayed(id, u64::MAX, 0, None);
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
            let Some(acked) = send(&sink, &records[next..end], &drain).await else {
                return;
            };
            if acked {
                let last = &records[end - 1];
                let following = records.get(end).map(|p| p.record.spooled_at_ms);
                spool.replayed(id, last.end, (end - next) as u64, following);
                next = end;
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
    }
}

/// Produces `records` and waits for their acknowledgements (at most the
/// delivery timeout). `Some(true)`: every one acknowledged; `None`: the
/// gateway is shutting down.
async fn send(sink: &Arc<KafkaSink>, records: &[Pending], drain: &Drain) -> Option<bool> {
    let producer = sink.producer();
    let acks = BatchAcks::new(records.len());
    let mut sent = 0usize;
    for (index, pending) in records.iter().enumerate() {
        let record = &pending.record;
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
        match producer.producer.send(message) {
            Ok(()) => sent += 1,
            Err(_) => acks.not_sent(),
        }
    }
    acks.all_sent();
    let deadline = tokio::time::sleep(sink.delivery_timeout());
    tokio::select! {
        _ = acks.all_answered() => {}
        _ = deadline => {}
        _ = drain.answer_now() => return None,
    }
    let outcomes = acks.take();
    let acknowledged = outcomes
        .iter()
        .filter(|o| matches!(o, Some(Ok(()))))
        .count();
    let first_error = outcomes.iter().find_map(|o| match o {
        Some(Err(error)) => Some(error.clone()),
        _ => None,
    });
    let all = acknowledged == records.len() && sent == records.len();
    let timeout = rdkafka::error::KafkaError::MessageProduction(
        rdkafka::types::RDKafkaErrorCode::MessageTimedOut,
    );
    let error = first_error.or_else(|| (!all).then_some(timeout));
    // What readiness and `write_kafka` judge Kafka by.
    sink.report(producer.generation, acknowledged, error.as_ref());
    Some(all)
}
