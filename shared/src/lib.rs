//! venus-shared: what the two binaries of venus share, the gateway (`venus`,
//! HTTP uploads into Kafka) and the ingester (`venus-ingester`, Kafka into
//! ClickHouse).
//!
//! Both read the one `config.yaml`, trace, log and meter the same way,
//! connect to Kafka and over HTTPS with the same settings, and agree on the
//! Kafka message one writes and the other reads. That common part lives
//! here, so that each binary depends on this crate and neither reaches into
//! the other.
//!
//! * `config`: layered loading (file, then `VENUS__*` variables), the key
//!   naming error, and the `kafka` and `telemetry` sections;
//! * `kafka_security`: `kafka.security`, how every Kafka client connects
//!   (TLS, SASL);
//! * `message`: the Kafka message contract (its limits, the dead-letter
//!   topic);
//! * `json_scan`: nesting depth and string escapes, checked before parsing;
//! * `telemetry`: traces, logs, propagation and the plumbing of metrics;
//! * `tls`: rustls client configuration (system roots plus a CA file);
//! * `secret`: a configuration value that never prints;
//! * `shutdown`: the signals that start a shutdown.

pub mod config;
pub mod json_scan;
pub mod kafka_security;
pub mod message;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
