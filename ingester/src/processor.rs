//! From a consumed message to a row in the batch: the `process` span (a
//! child of the gateway's `write_kafka` span, through the message's
//! `traceparent`), the row mapping, the dead-letter path for poison, and
//! flushing the batch to the writer at its limits.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::TraceContextExt;
use tokio::sync::{mpsc, watch};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::batch::{Batch, PendingRow};
use crate::dead_letter::DeadLetters;
use crate::offsets::Offsets;
use crate::record::{Record, RecordHeaders};
use crate::row;

pub fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub struct Processor {
    pub batch: Batch,
    pub writer: mpsc::Sender<Vec<PendingRow>>,
    pub dead_letters: DeadLetters,
    pub offsets: Arc<Offsets>,
    pub group_id: String,
    pub cancel: watch::Receiver<bool>,
}

impl Processor {
    /// Runs until `records` closes (shutdown), then flushes what is left.
    pub async fn run(mut self, mut records: mpsc::UnboundedReceiver<Record>) {
        loop {
            let deadline = self.batch.deadline();
            tokio::select! {
                record = records.recv() => match record {
                    Some(record) => self.process(record).await,
                    None => break,
                },
                _ = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                } => self.flush().await,
            }
        }
        self.flush().await;
    }

    async fn process(&mut self, record: Record) {
        let parent = venus::telemetry::extract_with(&RecordHeaders(&record));
        let span = tracing::info_span!(
            "process",
            otel.kind = "consumer",
            otel.status_code = tracing::field::Empty,
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %record.source.topic,
            messaging.destination.partition.id = %record.source.partition,
            messaging.kafka.offset = record.source.offset,
            messaging.consumer.group.name = %self.group_id,
            request_id = record.header("request_id").unwrap_or(""),
        );
        let _ = span.set_parent(parent);
        let link = span.context().span().span_context().clone();
        let mut line = Vec::new();
        let mapped = span.in_scope(|| row::write_row(&mut line, &record, now_seconds()));
        match mapped {
            Ok(()) => {
                drop(span);
                let full = self.batch.push(PendingRow {
                    line,
                    record,
                    span: link,
                });
                if full {
                    self.flush().await;
                }
            }
            Err(poison) => {
                span.record("otel.status_code", "ERROR");
                let reason = poison.to_string();
                let sent = async {
                    self.dead_letters
                        .send(&record, &reason, "decode", &mut self.cancel)
                        .await
                };
                let sent = tracing::Instrument::instrument(sent, span).await;
                if sent {
                    self.offsets.done(&record.source);
                } else {
                    self.offsets.abandon();
                }
            }
        }
    }

    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let rows = self.batch.take();
        if let Err(mpsc::error::SendError(rows)) = self.writer.send(rows).await {
            // The writer is gone (shutdown past its grace): these stay
            // uncommitted and are read again after a restart.
            for _ in rows {
                self.offsets.abandon();
            }
        }
    }
}
