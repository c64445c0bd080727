//! venus: an HTTP gateway that takes event batches from apps and writes
//! every event to Kafka, traced end to end.
//!
//! Where a byte of a request goes:
//! * `server`: routes, request id, server span, the accept loop, shutdown;
//! * `connection`: one connection's idle and request-head timers;
//! * `client_ip`: the client's address behind trusted proxies;
//! * `peers`: fair shares per client address (connections per peer);
//! * `admission`: the memory budget in bytes (and each client's share of
//!   it), body rate, processing slots;
//! * `apps`: who may write and how fast (app keys, categories, rate limits);
//! * `drain`: the phases of a shutdown that handlers listen to;
//! * `upload_body`: multipart / JSON / gzip into the batch document;
//! * `json_scan`: nesting depth and string escapes, checked before parsing
//!   (from `venus_shared`);
//! * `pipeline`: the handler chain, `split_and_validate` -> `authorize` ->
//!   `ip_enrich` -> `write_kafka`, each behind the `TraceWrapper`;
//! * `privacy`: what personal data reaches Kafka (IP modes, field rules);
//! * `wire`: the response body and codes;
//! * `domain`: the validated client values;
//! * `kafka`, `geoip`, `metrics`, `config`: one concern each;
//! * `allocator`: no transparent huge pages (the gateway, first thing).
//!
//! What the ingester needs as well lives in the `venus_shared` crate and is
//! re-exported here under its old paths: `json_scan`, `secret` (a value that
//! never prints), `telemetry` (traces, logs, the plumbing of metrics) and
//! `tls` (rustls client configuration); `config` and `kafka` re-export their
//! shared parts.

pub mod admission;
pub mod allocator;
pub mod apps;
pub mod client_ip;
pub mod config;
pub mod connection;
pub mod domain;
pub mod drain;
pub mod geoip;
pub mod hangup;
pub mod kafka;
pub mod metrics;
pub mod peers;
pub mod pipeline;
pub mod privacy;
pub mod server;
pub mod spool;
pub mod upload_body;
pub mod wire;

pub use venus_shared::{json_scan, secret, telemetry, tls};

/// A seeded xorshift64 sequence for tests that generate many inputs: the
/// same inputs on every run, so a failure names a case that can be rerun.
#[cfg(test)]
pub(crate) fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

pub use server::Application;
