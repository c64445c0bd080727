//! Results: what each request produced (`Outcome`), their running totals
//! (`Stats`, with the HDR latency histogram) and the final [`Report`],
//! printed as a table or as one JSON object.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::load::ScheduleFigures;
use crate::raw_kafka::RawKafkaReport;
use crate::verify::VerifyReport;

/// What one request (one batch) produced, as its target reports it. The
/// latency is measured by the load driver around it.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// Events in the batch.
    pub events: u32,
    /// Bytes sent (HTTP body, or Kafka message values).
    pub bytes: u64,
    /// The HTTP status, when a response came.
    pub status: Option<u16>,
    /// Part codes of the response, as (code, count).
    pub codes: Vec<(u16, u32)>,
    /// Events accepted (part code 0) or acknowledged by Kafka.
    pub accepted: u32,
    /// Errors by kind: a failed HTTP request counts 1, a failed Kafka
    /// delivery counts 1 per event.
    pub errors: Vec<(String, u32)>,
    /// Whether the latency of this request belongs in the histogram (not for
    /// a request that got no response at all).
    pub record_latency: bool,
    /// The response body was not the expected JSON, or its parts did not
    /// match the events sent.
    pub bad_response: bool,
    /// Parts whose code is not what the generated event calls for.
    pub unexpected_codes: u32,
    /// The batch's category (index into the generator's categories).
    pub category: usize,
    /// backend_id of every accepted event.
    pub accepted_ids: Vec<u128>,
    /// backend_id of every event that failed on Kafka's side (code 1004).
    pub failed_ids: Vec<u128>,
}

impl Outcome {
    /// Adds one part code to `codes`.
    pub fn count_code(&mut self, code: u16) {
        match self.codes.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => self.codes.push((code, 1)),
        }
    }

    /// Adds `n` errors of `kind`.
    pub fn count_error(&mut self, kind: &str, n: u32) {
        match self.errors.iter_mut().find(|(k, _)| k == kind) {
            Some((_, total)) => *total += n,
            None => self.errors.push((kind.to_owned(), n)),
        }
    }
}

/// Running totals of a run.
#[derive(Debug)]
pub(crate) struct Stats {
    histogram: Histogram<u64>,
    /// Open loop: how late each request task started (see `load`).
    start_lag: Histogram<u64>,
    pub requests: u64,
    pub events: u64,
    pub accepted: u64,
    pub bytes: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub codes: BTreeMap<u16, u64>,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub bad_responses: u64,
    pub unexpected_codes: u64,
    /// backend_ids of accepted events, by category index.
    pub accepted_ids: Vec<Vec<u128>>,
    /// backend_ids of events failed on Kafka's side, by category index.
    pub failed_ids: Vec<Vec<u128>>,
}

impl Stats {
    /// Empty totals for `categories` categories.
    pub fn new(categories: usize) -> Self {
        Self {
            histogram: micros_histogram(),
            start_lag: micros_histogram(),
            requests: 0,
            events: 0,
            accepted: 0,
            bytes: 0,
            statuses: BTreeMap::new(),
            codes: BTreeMap::new(),
            errors: 0,
            error_kinds: BTreeMap::new(),
            bad_responses: 0,
            unexpected_codes: 0,
            accepted_ids: vec![Vec::new(); categories],
            failed_ids: vec![Vec::new(); categories],
        }
    }

    /// Adds a latency sample, in microsecond resolution.
    pub fn record_latency(&mut self, latency: Duration) {
        record_micros(&mut self.histogram, latency);
    }

    /// Adds an open-loop request's start lag, in microsecond resolution.
    pub fn record_start_lag(&mut self, lag: Duration) {
        record_micros(&mut self.start_lag, lag);
    }

    /// Adds one finished request.
    pub fn record(&mut self, latency: Duration, outcome: Outcome) {
        self.requests += 1;
        if outcome.record_latency {
            self.record_latency(latency);
        }
        self.events += u64::from(outcome.events);
        self.accepted += u64::from(outcome.accepted);
        self.bytes += outcome.bytes;
        if let Some(status) = outcome.status {
            *self.statuses.entry(status).or_default() += 1;
        }
        for (code, n) in outcome.codes {
            *self.codes.entry(code).or_default() += u64::from(n);
        }
        for (kind, n) in outcome.errors {
            self.errors += u64::from(n);
            *self.error_kinds.entry(kind).or_default() += u64::from(n);
        }
        self.bad_responses += u64::from(outcome.bad_response);
        self.unexpected_codes += u64::from(outcome.unexpected_codes);
        if let Some(ids) = self.accepted_ids.get_mut(outcome.category) {
            ids.extend(outcome.accepted_ids);
        }
        if let Some(ids) = self.failed_ids.get_mut(outcome.category) {
            ids.extend(outcome.failed_ids);
        }
    }

    /// The latency percentiles so far.
    pub fn latency(&self) -> LatencyMs {
        LatencyMs::from_histogram(&self.histogram)
    }

    /// The start-lag percentiles so far (`None` without open-loop samples).
    pub fn start_lag(&self) -> Option<LatencyMs> {
        (!self.start_lag.is_empty()).then(|| LatencyMs::from_histogram(&self.start_lag))
    }
}

/// 1 µs to 1 hour at 3 significant digits; grows if needed.
fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn record_micros(histogram: &mut Histogram<u64>, duration: Duration) {
    let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}

/// Latency percentiles in milliseconds (microsecond resolution).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
    /// Samples in the histogram (requests that got a response).
    pub samples: u64,
}

impl LatencyMs {
    fn from_histogram(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
            samples: histogram.len(),
        }
    }
}

/// What kind of run a report is about.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunShape<'a> {
    pub target: &'a str,
    pub mode: &'a str,
    pub connections: usize,
    pub rate: Option<f64>,
}

/// The result of a run. Field names are stable: scripts read the JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `http` or `raw_kafka`.
    pub target: String,
    /// `closed` (N workers back to back) or `open` (fixed request rate).
    pub mode: String,
    /// Closed loop: concurrent workers.
    pub connections: usize,
    /// Open loop: the target rate in requests per second.
    pub rate: Option<f64>,
    /// Wall time from the first request to the last response.
    pub duration_secs: f64,
    /// Requests (batches) finished, with or without a response.
    pub requests: u64,
    pub requests_per_sec: f64,
    /// Events sent.
    pub events: u64,
    /// Events accepted by the gateway (part code 0) or acknowledged by Kafka.
    pub events_accepted: u64,
    /// Accepted events per second.
    pub events_per_sec: f64,
    /// Sent events per second.
    pub events_sent_per_sec: f64,
    /// Bytes sent (request bodies, or Kafka message values).
    pub bytes_sent: u64,
    /// Latency of requests that got a response; measured from the intended
    /// send time in open loop.
    pub latency_ms: LatencyMs,
    /// Responses by HTTP status.
    pub status_counts: BTreeMap<String, u64>,
    /// Events by part code.
    pub part_codes: BTreeMap<String, u64>,
    /// HTTP requests without a response (connection, timeout), or Kafka
    /// deliveries that failed in the raw Kafka target.
    pub errors: u64,
    /// `errors` by kind.
    pub error_kinds: BTreeMap<String, u64>,
    /// Responses that were not the expected JSON or whose parts did not
    /// match the events sent.
    pub bad_responses: u64,
    /// Parts whose code contradicts the generated event (e.g. 1001 for a
    /// valid event, 0 for an invalid ip).
    pub unexpected_codes: u64,
    /// Open loop: times the schedule had to wait for `max_in_flight`.
    pub in_flight_waits: u64,
    /// Open loop: requests due before the end that never started because
    /// `max_in_flight` requests were outstanding (the server fell behind).
    pub behind_schedule: u64,
    /// Open loop: how late request tasks started against their schedule,
    /// the load generator's own delay (already inside `latency_ms`). A p99
    /// near the latency's says the load generator, not the server, was slow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_lag_ms: Option<LatencyMs>,
    /// The read-back check, when `verify` was on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyReport>,
    /// The raw Kafka target's own figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_kafka: Option<RawKafkaReport>,
    /// Whose `malloc` C code (librdkafka) had in this process: `mimalloc`
    /// in the `venus-loadtest` binary, `libc` elsewhere (crate::c_malloc).
    #[serde(default)]
    pub c_malloc: String,
}

impl Report {
    /// The report of `stats` gathered over `elapsed`.
    pub(crate) fn from_stats(
        stats: &Stats,
        elapsed: Duration,
        shape: &RunShape<'_>,
        schedule: ScheduleFigures,
    ) -> Self {
        let secs = elapsed.as_secs_f64();
        let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        Self {
            target: shape.target.to_owned(),
            mode: shape.mode.to_owned(),
            connections: shape.connections,
            rate: shape.rate,
            duration_secs: secs,
            requests: stats.requests,
            requests_per_sec: per_sec(stats.requests),
            events: stats.events,
            events_accepted: stats.accepted,
            events_per_sec: per_sec(stats.accepted),
            events_sent_per_sec: per_sec(stats.events),
            bytes_sent: stats.bytes,
            latency_ms: stats.latency(),
            status_counts: stats
                .statuses
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            part_codes: stats
                .codes
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            errors: stats.errors,
            error_kinds: stats.error_kinds.clone(),
            bad_responses: stats.bad_responses,
            unexpected_codes: stats.unexpected_codes,
            in_flight_waits: schedule.in_flight_waits,
            behind_schedule: schedule.behind_schedule,
            start_lag_ms: stats.start_lag(),
            verify: None,
            raw_kafka: None,
            c_malloc: crate::c_malloc::c_malloc().to_owned(),
        }
    }

    /// Whether the verification found accepted events missing from Kafka.
    pub fn has_missing_events(&self) -> bool {
        self.verify.as_ref().is_some_and(|v| v.missing > 0)
    }
}

/// `counts` as `key: n  key: n`, or `-` when empty.
fn counts_line(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "-".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("   ")
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = match self.rate {
            Some(rate) => format!("open loop at {rate} req/s"),
            None => format!("closed loop, {} connections", self.connections),
        };
        writeln!(
            f,
            "venus-loadtest: {}, {load}, {:.2} s, C malloc: {}",
            self.target, self.duration_secs, self.c_malloc
        )?;
        writeln!(f)?;
        let unit = if self.target == "http" {
            "requests"
        } else {
            "batches"
        };
        writeln!(f, "  {:<18}{:>14}{:>14}", "", "total", "per second")?;
        writeln!(
            f,
            "  {unit:<18}{:>14}{:>14.1}",
            self.requests, self.requests_per_sec
        )?;
        writeln!(
            f,
            "  {:<18}{:>14}{:>14.1}",
            "events sent", self.events, self.events_sent_per_sec
        )?;
        writeln!(
            f,
            "  {:<18}{:>14}{:>14.1}",
            "events accepted", self.events_accepted, self.events_per_sec
        )?;
        writeln!(
            f,
            "  {:<18}{:>14.1}{:>14.1}",
            "MB sent",
            self.bytes_sent as f64 / 1e6,
            if self.duration_secs > 0.0 {
                self.bytes_sent as f64 / 1e6 / self.duration_secs
            } else {
                0.0
            }
        )?;
        writeln!(f)?;
        let l = &self.latency_ms;
        if l.samples == 0 {
            writeln!(f, "  latency (ms)      no responses")?;
        } else {
            writeln!(
                f,
                "  latency (ms){:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
                "p50", "p90", "p99", "p99.9", "max", "mean"
            )?;
            writeln!(
                f,
                "  {:<12}{:>10.3}{:>10.3}{:>10.3}{:>10.3}{:>10.3}{:>10.3}",
                "", l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            )?;
        }
        writeln!(f)?;
        if self.target == "http" {
            writeln!(
                f,
                "  {:<18}{}",
                "HTTP status",
                counts_line(&self.status_counts)
            )?;
            writeln!(f, "  {:<18}{}", "part codes", counts_line(&self.part_codes))?;
        }
        writeln!(f, "  {:<18}{}", "errors", self.errors)?;
        if !self.error_kinds.is_empty() {
            writeln!(
                f,
                "  {:<18}{}",
                "error kinds",
                counts_line(&self.error_kinds)
            )?;
        }
        if self.target == "http" {
            writeln!(
                f,
                "  {:<18}{}   unexpected part codes: {}",
                "bad responses", self.bad_responses, self.unexpected_codes
            )?;
        }
        if self.rate.is_some() {
            writeln!(
                f,
                "  {:<18}{}   requests behind schedule (never sent): {}",
                "in-flight waits", self.in_flight_waits, self.behind_schedule
            )?;
        }
        if let Some(lag) = &self.start_lag_ms {
            writeln!(
                f,
                "  {:<18}p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms (the load generator's own delay)",
                "start lag", lag.p50, lag.p99, lag.max
            )?;
        }
        if let Some(raw) = &self.raw_kafka {
            writeln!(f)?;
            write!(f, "{raw}")?;
        }
        if let Some(verify) = &self.verify {
            writeln!(f)?;
            write!(f, "{verify}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64) -> bool {
        // HDR at 3 significant digits: within 0.1 %.
        (actual - expected).abs() <= expected * 0.001 + 1e-9
    }

    #[test]
    fn percentiles_of_known_latencies() {
        let mut stats = Stats::new(1);
        // 1 ms, 2 ms, ... 1000 ms, in shuffled order.
        for i in 0..1000u64 {
            let ms = (i * 617) % 1000 + 1;
            stats.record(
                Duration::from_millis(ms),
                Outcome {
                    events: 10,
                    accepted: 9,
                    record_latency: true,
                    ..Outcome::default()
                },
            );
        }
        let latency = stats.latency();
        assert!(close(latency.p50, 500.0), "{latency:?}");
        assert!(close(latency.p90, 900.0), "{latency:?}");
        assert!(close(latency.p99, 990.0), "{latency:?}");
        assert!(close(latency.p999, 999.0), "{latency:?}");
        assert!(close(latency.max, 1000.0), "{latency:?}");
        assert!(close(latency.mean, 500.5), "{latency:?}");
        assert_eq!(latency.samples, 1000);
        assert_eq!(stats.events, 10_000);
        assert_eq!(stats.accepted, 9_000);
    }

    #[test]
    fn microsecond_resolution_and_a_long_tail() {
        let mut stats = Stats::new(1);
        for _ in 0..9_990 {
            stats.record_latency(Duration::from_micros(250));
        }
        for _ in 0..10 {
            stats.record_latency(Duration::from_secs(2));
        }
        let latency = stats.latency();
        assert!(close(latency.p50, 0.25), "{latency:?}");
        assert!(close(latency.p99, 0.25), "{latency:?}");
        assert!(close(latency.p999, 0.25), "{latency:?}");
        assert!(close(latency.max, 2000.0), "{latency:?}");
    }

    #[test]
    fn requests_without_response_are_counted_not_timed() {
        let shape = RunShape {
            target: "http",
            mode: "closed",
            connections: 4,
            rate: None,
        };
        let mut stats = Stats::new(2);
        let mut ok = Outcome {
            events: 3,
            accepted: 2,
            status: Some(206),
            record_latency: true,
            category: 1,
            accepted_ids: vec![1, 2],
            ..Outcome::default()
        };
        ok.count_code(0);
        ok.count_code(0);
        ok.count_code(1002);
        stats.record(Duration::from_millis(5), ok);
        let mut failed = Outcome {
            events: 3,
            ..Outcome::default()
        };
        failed.count_error("timeout", 1);
        stats.record(Duration::from_secs(30), failed);

        let report = Report::from_stats(
            &stats,
            Duration::from_secs(2),
            &shape,
            ScheduleFigures::default(),
        );
        assert_eq!(report.requests, 2);
        assert_eq!(report.requests_per_sec, 1.0);
        assert_eq!(report.events, 6);
        assert_eq!(report.events_accepted, 2);
        assert_eq!(report.events_per_sec, 1.0);
        assert_eq!(report.errors, 1);
        assert_eq!(report.latency_ms.samples, 1);
        assert!(close(report.latency_ms.max, 5.0));
        assert_eq!(report.status_counts["206"], 1);
        assert_eq!(report.part_codes["0"], 2);
        assert_eq!(report.part_codes["1002"], 1);
        assert_eq!(report.error_kinds["timeout"], 1);
        assert_eq!(stats.accepted_ids[1], vec![1, 2]);

        let json = serde_json::to_value(&report).unwrap();
        for field in [
            "requests",
            "requests_per_sec",
            "events",
            "events_accepted",
            "events_per_sec",
            "latency_ms",
            "status_counts",
            "part_codes",
            "errors",
            "duration_secs",
            "mode",
        ] {
            assert!(json.get(field).is_some(), "{field} missing from {json}");
        }
        for field in ["p50", "p90", "p99", "p999", "max"] {
            assert!(
                json["latency_ms"].get(field).is_some(),
                "latency_ms.{field}"
            );
        }
        assert!(json.get("verify").is_none());
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
        // The table renders.
        assert!(report.to_string().contains("part codes"));
    }
}
