//! The ingester's instruments, on the OpenTelemetry meter API; scraped at
//! `/metrics` (Prometheus names: dots as underscores, `_total` on counters,
//! `_seconds` on durations) and pushed over OTLP when configured.

use opentelemetry::metrics::{Counter, Gauge, Histogram, MeterProvider};
use opentelemetry::KeyValue;

/// A cheap, cloneable handle on the instruments.
#[derive(Clone)]
pub struct Metrics {
    consumed: Counter<u64>,
    inserted: Counter<u64>,
    insert_duration: Histogram<f64>,
    batch_rows: Histogram<u64>,
    retries: Counter<u64>,
    dead_letters: Counter<u64>,
    lag: Gauge<i64>,
    buffered: Gauge<i64>,
    paused: Gauge<i64>,
    offset_gaps: Counter<u64>,
}

impl Metrics {
    pub fn new(provider: &impl MeterProvider) -> Self {
        let meter = provider.meter("venus-ingester");
        let metrics = Self {
            consumed: meter
                .u64_counter("venus_ingester.messages.consumed")
                .with_description("Kafka messages read")
                .build(),
            inserted: meter
                .u64_counter("venus_ingester.rows.inserted")
                .with_description("Rows inserted into ClickHouse")
                .build(),
            insert_duration: meter
                .f64_histogram("venus_ingester.insert.duration")
                .with_unit("s")
                .with_description("Duration of one ClickHouse insert request")
                .with_boundaries(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
                .build(),
            batch_rows: meter
                .u64_histogram("venus_ingester.batch.rows")
                .with_description("Rows per insert")
                .with_boundaries(vec![
                    1.0, 10.0, 100.0, 1000.0, 5000.0, 10000.0, 50000.0, 100000.0,
                ])
                .build(),
            retries: meter
                .u64_counter("venus_ingester.insert.retries")
                .with_description("Insert attempts that failed and will be retried")
                .build(),
            dead_letters: meter
                .u64_counter("venus_ingester.dead_letters")
                .with_description("Messages written to the dead-letter topic")
                .build(),
            lag: meter
                .i64_gauge("venus_ingester.consumer.lag")
                .with_description(
                    "Messages behind the partition's end (from librdkafka statistics)",
                )
                .build(),
            buffered: meter
                .i64_gauge("venus_ingester.buffered.rows")
                .with_description(
                    "Messages read and not yet in ClickHouse or the dead-letter topic",
                )
                .build(),
            paused: meter
                .i64_gauge("venus_ingester.consumer.paused")
                .with_description("1 while fetching is paused because too much is buffered")
                .build(),
            offset_gaps: meter
                .u64_counter("venus_ingester.offset_gap.messages")
                .with_description(
                    "Offsets skipped between two messages read from one partition (0 unless the broker skipped records)",
                )
                .build(),
        };
        // Counters exist from the start (at 0), so dashboards and alerts
        // see them before the first event.
        metrics.inserted.add(0, &[]);
        metrics.retries.add(0, &[]);
        metrics.offset_gaps.add(0, &[]);
        for stage in ["decode", "clickhouse"] {
            metrics
                .dead_letters
                .add(0, &[KeyValue::new("stage", stage)]);
        }
        metrics.buffered(0);
        metrics.paused(false);
        metrics
    }

    pub fn consumed(&self, topic: &str, messages: u64) {
        self.consumed
            .add(messages, &[KeyValue::new("topic", topic.to_owned())]);
    }

    pub fn inserted(&self, rows: u64, seconds: f64) {
        self.inserted.add(rows, &[]);
        self.batch_rows.record(rows, &[]);
        self.insert_duration
            .record(seconds, &[KeyValue::new("result", "ok")]);
    }

    pub fn insert_failed(&self, seconds: f64) {
        self.retries.add(1, &[]);
        self.insert_duration
            .record(seconds, &[KeyValue::new("result", "error")]);
    }

    pub fn dead_letter(&self, stage: &'static str) {
        self.dead_letters.add(1, &[KeyValue::new("stage", stage)]);
    }

    pub fn lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag.record(
            lag,
            &[
                KeyValue::new("topic", topic.to_owned()),
                KeyValue::new("partition", i64::from(partition)),
            ],
        );
    }

    pub fn offset_gap(&self, topic: &str, skipped: i64) {
        self.offset_gaps.add(
            skipped.max(0) as u64,
            &[KeyValue::new("topic", topic.to_owned())],
        );
    }

    pub fn buffered(&self, rows: i64) {
        self.buffered.record(rows, &[]);
    }

    pub fn paused(&self, paused: bool) {
        self.paused.record(i64::from(paused), &[]);
    }
}
