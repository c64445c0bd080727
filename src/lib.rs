//! venus: an HTTP gateway that takes event batches from apps and writes
//! every event to Kafka, traced end to end.
//!
//! Where a byte of a request goes:
//! * `server`: routes, request id, server span, load shedding, drain;
//! * `upload_body`: multipart / JSON / gzip into the batch document;
//! * `pipeline`: the handler chain, `split_and_validate` -> `ip_enrich` ->
//!   `write_kafka`, each behind the `TraceWrapper`;
//! * `wire`: the response body and codes;
//! * `domain`: the validated client values;
//! * `kafka`, `geoip`, `telemetry`, `metrics`, `config`: one concern each.

pub mod config;
pub mod domain;
pub mod geoip;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod server;
pub mod telemetry;
pub mod upload_body;
pub mod wire;

pub use server::Application;
