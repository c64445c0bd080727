//! venus-ingester: consumes the topics the venus gateway writes and inserts
//! one ClickHouse row per event, once, continuing each event's
//! trace.
//!
//! Modelled on Jaeger's ingester, one concern per module:
//! * `consumer`: the poll thread (regex subscription, cooperative-sticky
//!   group, pause/resume, offset store and commit);
//! * `offset_marker`, `offsets`: what may be committed (the contiguous
//!   prefix of finished messages, per partition);
//! * `processor`: message -> `process` span -> row or dead letter -> batch;
//! * `batch`: the flush limits; `row`: the column mapping;
//! * `writer`: inserts with retry, bisecting rejected batches;
//! * `marks`, `dedup`: which messages may be in ClickHouse already (the
//!   partition's mark, written before the inserts it covers) and which of
//!   those are (a message read again is never a second row);
//! * `schema`: the tables' DDL, on one server or a cluster;
//! * `clickhouse`: the HTTP client (replicas in turn); `dead_letter`: the DLQ producer;
//! * `health`, `server`, `metrics`: `/readyz`, `/healthz`, `/metrics`;
//! * `config`: the `ingester:` section; `app`: the wiring and the drain.

pub mod app;
pub mod batch;
pub mod clickhouse;
pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod dedup;
pub mod health;
pub mod marks;
pub mod metrics;
pub mod offset_marker;
pub mod offsets;
pub mod processor;
pub mod record;
pub mod row;
pub mod schema;
pub mod server;
pub mod writer;

pub use app::Ingester;
