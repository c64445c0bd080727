//! The ingester's instruments, on the OpenTelemetry meter API; scraped at
//! `/metrics` (Prometheus names: dots as underscores, `_total` on counters,
//! `_seconds` on durations) and pushed over OTLP when configured.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use opentelemetry::metrics::{Counter, Gauge, Histogram, MeterProvider, ObservableGauge};
use opentelemetry::KeyValue;

/// Consumer lag by (topic, partition), of the partitions assigned now.
type LagTable = Arc<Mutex<BTreeMap<(String, i32), i64>>>;

/// A cheap, cloneable handle on the instruments.
#[derive(Clone)]
pub struct Metrics {
    consumed: Counter<u64>,
    inserted: Counter<u64>,
    insert_duration: Histogram<f64>,
    batch_rows: Histogram<u64>,
    retries: Counter<u64>,
    dead_letters: Counter<u64>,
    dead_letter_failures: Counter<u64>,
    deduplicated: Counter<u64>,
    /// Read by the lag gauge's callback at each collection: a partition
    /// removed from it (revoked in a rebalance) leaves the exported series,
    /// so the sum of lags over the group returns to 0 after a scale-out.
    lags: LagTable,
    _lag: Arc<ObservableGauge<i64>>,
    buffered: Gauge<i64>,
    paused: Gauge<i64>,
    offset_gaps: Counter<u64>,
}

impl Metrics {
    pub fn new(provider: &impl MeterProvider) -> Self {
        let meter = provider.meter("venus-ingester");
        let lags = LagTable::default();
        let observed = lags.clone();
        let lag = meter
            .i64_observable_gauge("venus_ingester.consumer.lag")
            .with_description(
                "Messages behind the partition's end (from librdkafka statistics), for the partitions assigned to this instance",
            )
            .with_callback(move |observer| {
                let lags = observed.lock().unwrap_or_else(|e| e.into_inner());
                for ((topic, partition), lag) in lags.iter() {
                    observer.observe(
                        *lag,
                        &[
                            KeyValue::new("topic", topic.clone()),
                            KeyValue::new("partition", i64::from(*partition)),
                        ],
                    );
                }
            })
            .build();
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
            deduplicated: meter
                .u64_counter("venus_ingester.rows.deduplicated")
                .with_description(
                    "Rows read again that ClickHouse had already (after a crash, a rebalance or a lost answer), not inserted twice",
                )
                .build(),
            dead_letter_failures: meter
                .u64_counter("venus_ingester.dead_letter.failures")
                .with_description("Dead-letter sends Kafka did not take (each is retried)")
                .build(),
            lags,
            _lag: Arc::new(lag),
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
        metrics.dead_letter_failures.add(0, &[]);
        metrics.deduplicated.add(0, &[]);
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

    pub fn deduplicated(&self, rows: u64) {
        self.deduplicated.add(rows, &[]);
    }

    pub fn dead_letter_failed(&self) {
        self.dead_letter_failures.add(1, &[]);
    }

    /// The lag of an assigned partition.
    pub fn lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((topic.to_owned(), partition), lag);
    }

    /// A partition was revoked: its lag is another instance's now.
    pub fn forget_lag(&self, topic: &str, partition: i32) {
        self.lags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(topic.to_owned(), partition));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lag_lines(metering: &venus_shared::telemetry::Metering) -> Vec<String> {
        metering
            .render()
            .lines()
            .filter(|line| line.starts_with("venus_ingester_consumer_lag{"))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_revoked_partition_leaves_the_lag_gauge() {
        let metering = venus_shared::telemetry::Metering::new(
            &venus_shared::config::TelemetrySettings::default(),
        )
        .unwrap();
        let metrics = Metrics::new(&metering.provider);
        metrics.lag("t", 0, 5);
        metrics.lag("t", 1, 7);
        let lines = lag_lines(&metering);
        assert_eq!(lines.len(), 2, "{lines:?}");
        metrics.forget_lag("t", 1);
        let lines = lag_lines(&metering);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("partition=\"0\"") && lines[0].ends_with(" 5"),
            "{lines:?}"
        );
    }
}
