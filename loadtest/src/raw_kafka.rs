//! The raw Kafka target: the gateway's Kafka writes without the gateway.
//!
//! Each request takes the same generated batch as the HTTP target and, for
//! every event the gateway would accept, builds the message the gateway
//! writes: the value `{"backend_id","upload_time","ip","country","region",
//! "city","meta","data"}` (a fresh UUIDv7, empty location fields) and the
//! gateway's headers (`traceparent` and `request_id`: what it writes for an
//! upload without `tracestate` or `baggage`, docs/API.md 3.4). It hands
//! them all to a `FutureProducer` configured like
//! the gateway's (acks=all, idempotence, lz4, linger.ms=5) and waits for
//! every acknowledgement. The latency is the batch's, like one upload's
//! Kafka step. What this reaches is the ceiling broker and client give on
//! this machine.
//!
//! One untimed warm-up batch goes first, so the producer's start-up (the
//! idempotent producer's id request) does not land in the percentiles.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::Config;
use crate::generate::{Batch, Generator};
use crate::load::Target;
use crate::report::Outcome;

/// The raw Kafka target's own figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawKafkaReport {
    /// Bootstrap servers produced to.
    pub brokers: String,
    /// Messages acknowledged by Kafka.
    pub acked: u64,
    /// Messages that failed (enqueue or delivery).
    pub failed: u64,
    /// Acknowledged messages per second.
    pub acked_per_sec: f64,
    /// Message value megabytes (10^6) per second, acknowledged or not.
    pub mb_per_sec: f64,
    /// Time the untimed warm-up batch took (producer start-up).
    pub warmup_secs: f64,
    /// The librdkafka producer settings used (bootstrap.servers left out).
    pub producer: BTreeMap<String, String>,
}

impl fmt::Display for RawKafkaReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  raw kafka         {} acked ({:.1}/s)   {} failed   {:.2} MB/s of values   warm-up {:.2} s",
            self.acked, self.acked_per_sec, self.failed, self.mb_per_sec, self.warmup_secs
        )?;
        let settings: Vec<String> = self
            .producer
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        writeln!(f, "  {:<18}{}", "producer", settings.join(" "))
    }
}

/// The producer settings: the gateway's, then the pass-through ones.
pub(crate) fn producer_settings(config: &Config) -> BTreeMap<String, String> {
    let mut settings: BTreeMap<String, String> = [
        ("acks", "all".to_owned()),
        ("enable.idempotence", "true".to_owned()),
        ("compression.type", "lz4".to_owned()),
        ("linger.ms", "5".to_owned()),
        (
            "message.timeout.ms",
            config.timeout.as_millis().max(1).to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (key, value) in &config.producer {
        settings.insert(key.clone(), value.clone());
    }
    settings
}

/// Produces batches straight to Kafka.
pub(crate) struct RawKafkaTarget {
    producer: FutureProducer,
    generator: Arc<Generator>,
    /// Topic of each category, by category index.
    topics: Vec<String>,
    /// Keep the backend_ids of what was produced (for `--verify`).
    keep_ids: bool,
}

impl RawKafkaTarget {
    /// A producer with `settings` for `brokers`.
    pub fn new(
        brokers: &str,
        settings: &BTreeMap<String, String>,
        generator: Arc<Generator>,
        topics: Vec<String>,
        keep_ids: bool,
    ) -> anyhow::Result<Self> {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", brokers);
        for (key, value) in settings {
            client.set(key, value);
        }
        let producer: FutureProducer = client
            .create()
            .context("cannot create the Kafka producer")?;
        Ok(Self {
            producer,
            generator,
            topics,
            keep_ids,
        })
    }

    /// Sends one untimed batch (request number `u64::MAX`, so its ids clash
    /// with no timed request) and fails when Kafka acknowledges none of it.
    pub async fn warm_up(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let outcome = self.send(u64::MAX).await;
        if outcome.accepted == 0 && outcome.events > 0 {
            let errors: Vec<String> = outcome
                .errors
                .iter()
                .map(|(kind, n)| format!("{kind} x{n}"))
                .collect();
            anyhow::bail!(
                "Kafka acknowledged none of the warm-up batch: {}",
                errors.join(", ")
            );
        }
        Ok(started.elapsed())
    }

    /// Waits for anything still queued (normally nothing: every batch
    /// awaited its acknowledgements).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A short name for a Kafka error: its code when it has one.
fn error_kind(error: &KafkaError) -> String {
    match error.rdkafka_error_code() {
        Some(code) => format!("kafka: {code:?}"),
        None => format!("kafka: {error}"),
    }
}

/// The value the gateway writes for event `index` of `batch`.
pub fn message_value(
    batch: &Batch<'_>,
    index: usize,
    ip: &str,
    backend_id: Uuid,
    upload_time_ms: u64,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"{\"backend_id\":\"");
    out.extend_from_slice(
        backend_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"upload_time\":");
    out.extend_from_slice(itoa::Buffer::new().format(upload_time_ms).as_bytes());
    out.extend_from_slice(b",\"ip\":\"");
    // A canonical address needs no escaping.
    out.extend_from_slice(ip.as_bytes());
    out.extend_from_slice(b"\",\"country\":\"\",\"region\":\"\",\"city\":\"\",\"meta\":");
    out.extend_from_slice(batch.meta());
    out.extend_from_slice(b",\"data\":");
    batch.write_event(index, out);
    out.push(b'}');
}

impl Target for RawKafkaTarget {
    async fn send(&self, request: u64) -> Outcome {
        let batch = self.generator.batch(request);
        let topic = &self.topics[batch.category_index()];
        let upload_time = now_ms();
        // The headers the gateway sets for an upload that brings no
        // tracestate or baggage: the trace context and the request id.
        let request_id = format!("{:032x}", Uuid::now_v7().as_u128());
        let trace = Uuid::new_v4().as_u128();
        let traceparent = format!("00-{trace:032x}-{:016x}-01", trace as u64 ^ request);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "traceparent",
                value: Some(traceparent.as_bytes()),
            })
            .insert(Header {
                key: "request_id",
                value: Some(request_id.as_bytes()),
            });
        let mut outcome = Outcome {
            category: batch.category_index(),
            record_latency: true,
            ..Outcome::default()
        };
        let mut deliveries = Vec::with_capacity(batch.len());
        let mut value = Vec::with_capacity(1024);
        for (index, ip) in batch.accepted_events() {
            let backend_id = Uuid::now_v7();
            value.clear();
            message_value(&batch, index, ip, backend_id, upload_time, &mut value);
            outcome.events += 1;
            outcome.bytes += value.len() as u64;
            let record = FutureRecord::<(), [u8]>::to(topic)
                .payload(value.as_slice())
                .headers(headers.clone());
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push((backend_id, delivery)),
                Err((error, _)) => outcome.count_error(&error_kind(&error), 1),
            }
        }
        if self.keep_ids {
            outcome.accepted_ids.reserve(deliveries.len());
        }
        for (backend_id, delivery) in deliveries {
            let failed = match delivery.await {
                Ok(Ok(_)) => {
                    outcome.accepted += 1;
                    if self.keep_ids {
                        outcome.accepted_ids.push(backend_id.as_u128());
                    }
                    continue;
                }
                Ok(Err((error, _))) => error_kind(&error),
                Err(_) => "kafka: delivery canceled".to_owned(),
            };
            outcome.count_error(&failed, 1);
            if self.keep_ids {
                outcome.failed_ids.push(backend_id.as_u128());
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GenConfig;

    #[test]
    fn the_value_has_the_gateway_shape() {
        let generator = Generator::new(&GenConfig::default(), 1_790_000_000_000);
        let batch = generator.batch(5);
        let (index, ip) = batch.accepted_events().next().expect("a valid event");
        let backend_id = Uuid::now_v7();
        let mut value = Vec::new();
        message_value(&batch, index, ip, backend_id, 42, &mut value);
        let parsed: serde_json::Value = serde_json::from_slice(&value).unwrap();
        let keys: Vec<&str> = parsed
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "backend_id",
            "upload_time",
            "ip",
            "country",
            "region",
            "city",
            "meta",
            "data",
        ];
        expected.sort_unstable();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(parsed["backend_id"], backend_id.to_string());
        assert_eq!(parsed["upload_time"], 42);
        assert_eq!(parsed["meta"]["category"], batch.category());
        assert_eq!(parsed["data"]["id"], batch.event_id(index));
        assert_eq!(
            crate::verify::backend_id_of(&value),
            Some(backend_id.as_u128())
        );
    }

    #[test]
    fn pass_through_settings_win() {
        let config = Config {
            producer: vec![("linger.ms".into(), "20".into())],
            ..Config::default()
        };
        let settings = producer_settings(&config);
        assert_eq!(settings["acks"], "all");
        assert_eq!(settings["enable.idempotence"], "true");
        assert_eq!(settings["compression.type"], "lz4");
        assert_eq!(settings["linger.ms"], "20");
    }
}
