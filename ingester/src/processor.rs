//! From a consumed message to a row in the batch: the `process` span (a
//! child of the gateway's `write_kafka` span, through the message's
//! `traceparent`), the row mapping, the dead-letter path for poison, and
//! flushing the batch to the writer at its limits.
//!
//! The `process` span is made with the OpenTelemetry API, not `tracing`: it
//! is one span per message, nothing logs inside it, and going through
//! `tracing-opentelemetry` cost a registry entry, an attribute visitor and a
//! `String` per attribute, for every message (about a quarter of the
//! processor's time; docs/BENCHMARKS.md).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _};
use opentelemetry::{KeyValue, StringValue};
use opentelemetry_sdk::trace::SdkTracer;
use tokio::sync::{mpsc, watch};

use crate::batch::{Batch, Rows};
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
    pub writer: mpsc::Sender<Rows>,
    pub dead_letters: DeadLetters,
    pub offsets: Arc<Offsets>,
    pub tracer: SdkTracer,
    pub attributes: SpanAttributes,
    pub cancel: watch::Receiver<bool>,
    /// The table's layout: rows are written the way the table stores them,
    /// so none is written before the writers have read it.
    pub layout: watch::Receiver<Option<row::Layout>>,
}

/// Partition numbers whose text [`SpanAttributes`] keeps.
const MAX_CACHED_PARTITIONS: usize = 4096;

/// The attribute values every `process` span shares, made once.
pub struct SpanAttributes {
    group: StringValue,
    /// `messaging.destination.partition.id` is a string; these are the
    /// partitions' numbers as text, made on first use.
    partitions: Vec<StringValue>,
}

impl SpanAttributes {
    pub fn new(group_id: &str) -> Self {
        Self {
            group: StringValue::from(Arc::<str>::from(group_id)),
            partitions: Vec::new(),
        }
    }

    fn partition(&mut self, partition: i32) -> StringValue {
        let Ok(index) = usize::try_from(partition) else {
            return partition.to_string().into();
        };
        // Topics have tens of partitions, not thousands: beyond that, text
        // is made per span rather than kept.
        if index >= MAX_CACHED_PARTITIONS {
            return partition.to_string().into();
        }
        while self.partitions.len() <= index {
            let next = self.partitions.len().to_string();
            self.partitions.push(next.into());
        }
        self.partitions[index].clone()
    }
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

    /// The table's layout, waiting for the schema if need be; `None` when
    /// cancelled first (the end of the shutdown grace).
    async fn layout(&mut self) -> Option<row::Layout> {
        if let Some(layout) = *self.layout.borrow() {
            return Some(layout);
        }
        tokio::select! {
            layout = self.layout.wait_for(Option::is_some) => layout.ok().and_then(|l| *l),
            _ = self.cancel.wait_for(|c| *c) => None,
        }
    }

    async fn process(&mut self, record: Record) {
        let Some(layout) = self.layout().await else {
            // Given up at shutdown: read again by the next instance.
            self.offsets.abandon();
            return;
        };
        let parent = venus_shared::telemetry::extract_with(&RecordHeaders(&record));
        let source = &record.source;
        let attributes = vec![
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.operation.name", "process"),
            KeyValue::new(
                "messaging.destination.name",
                StringValue::from(source.topic.clone()),
            ),
            KeyValue::new(
                "messaging.destination.partition.id",
                self.attributes.partition(source.partition),
            ),
            KeyValue::new("messaging.kafka.offset", source.offset),
            KeyValue::new(
                "messaging.consumer.group.name",
                self.attributes.group.clone(),
            ),
            KeyValue::new(
                "request_id",
                record.header("request_id").unwrap_or("").to_owned(),
            ),
        ];
        let mut span = self
            .tracer
            .span_builder("process")
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        let link = span.span_context().clone();
        let now = now_seconds();
        let pushed = self.batch.push_with(record, link, |out, record| {
            row::write_row(out, record, now, layout)
        });
        match pushed {
            Ok(full) => {
                span.end();
                if full {
                    self.flush().await;
                }
            }
            Err((record, poison)) => {
                let reason = poison.to_string();
                span.set_status(Status::error(reason.clone()));
                let sent = self
                    .dead_letters
                    .send(&record, &reason, "decode", &mut self.cancel)
                    .await;
                span.end();
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
            self.offsets.abandon_many(rows.len());
        }
    }
}
