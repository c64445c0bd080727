//! The contract between the binaries: the Kafka message the gateway's
//! `pipeline::write_kafka` writes, one per event, and the ingester's `row`
//! reads into a ClickHouse row.
//!
//! The value is one JSON object, `{"backend_id","upload_time","ip",
//! "country","region","city","meta","data"}`, with `meta` and `data` as the
//! client sent them (or as the app's privacy rules left them), nesting no
//! deeper than [`MAX_NESTING`]. The headers are `request_id` and the trace
//! context (`traceparent`, `tracestate` when the trace has one, `baggage`
//! when the caller sent some; see `telemetry::propagation_headers`), which
//! the ingester continues (`telemetry::extract_with`).
//!
//! A message the ingester cannot turn into a row goes to the dead-letter
//! topic, [`DEFAULT_DEAD_LETTER_TOPIC`] unless `ingester.dead_letter_topic`
//! names another; the gateway never lets an upload write there.

/// The dead-letter topic of the ingester when `ingester.dead_letter_topic`
/// is not set. Both binaries need it: the ingester writes there, and the
/// gateway must never let a client name it.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "to_analyzer__0.__dead_letter";

/// Deepest nesting of arrays and objects a batch may have, counting the
/// document itself, `data` and the event: an event's own values may nest 29
/// levels. sonic-rs recurses once per level when it skips a value, with no
/// limit of its own, so this bound is what keeps a request from overflowing
/// a thread's stack (and aborting the process).
pub const MAX_NESTING: usize = 32;
