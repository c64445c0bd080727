//! Last handler: one Kafka message per valid event, and wait for the acks.
//!
//! Every pending event is serialized and handed to the producer at once, then
//! the handler waits for all acknowledgements, bounded by the delivery
//! timeout. An event becomes `Accepted` only when its acknowledgement arrived;
//! anything else (queue full, broker error, timeout) fails it with code 1004.
//! An event too large for a message fails with code 1003 and is not sent.
//!
//! With the spool on (`spool.enabled`), events Kafka is not taking go to the
//! spool instead of failing: all of a batch at once when deliveries are
//! failing with no acknowledgement or the topic is missing, and after an
//! attempt the events it failed or timed out (not a slow acknowledgement
//! within the timeout). Written and fsynced there, they are `Spooled`
//! (answered 0, "spooled"); a full spool leaves them failed with 1004.
//!
//! Message value (built from slices of the request, nothing is re-parsed):
//! `{"backend_id","upload_time","ip","country","region","city","meta","data"}`
//! with `meta` and `data` exactly as the client sent them, or as the app's
//! privacy rules left them (`apply_privacy`), and `ip` as the app's
//! `privacy.ip` stores it.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use opentelemetry::KeyValue;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::BaseRecord;

use crate::config::MessageKey;
use crate::drain::Drain;
use crate::kafka::acks::BatchAcks;
use crate::kafka::topics::TopicState;
use crate::kafka::KafkaSink;
use crate::metrics::Metrics;
use crate::pipeline::context::{Batch, Enrichment, EventStatus};
use crate::pipeline::{cpu_heavy, Handler, Outcome, SpanKind, UploadContext};
use crate::privacy::{write_ip, StoredIp};
use crate::spool::record::SpoolRecord;
use crate::spool::Spool;
use crate::telemetry;
use crate::wire::PartCode;
use rdkafka::types::RDKafkaErrorCode;

pub struct WriteKafka {
    sink: Arc<KafkaSink>,
    metrics: Metrics,
    /// Ends the wait for acknowledgements when the shutdown grace runs out.
    drain: Drain,
    /// Where events Kafka is not taking go, when enabled.
    spool: Option<Spool>,
}

impl WriteKafka {
    pub fn new(sink: Arc<KafkaSink>, metrics: Metrics, drain: Drain, spool: Option<Spool>) -> Self {
        Self {
            sink,
            metrics,
            drain,
            spool,
        }
    }
}

impl Handler for WriteKafka {
    fn name(&self) -> &'static str {
        "write_kafka"
    }

    fn span_kind(&self) -> SpanKind {
        SpanKind::Producer
    }

    fn handle<'a>(&'a self, ctx: &'a mut UploadContext) -> BoxFuture<'a, Outcome> {
        Box::pin(self.run(ctx))
    }
}

/// Appends `text` to `out` as a JSON string.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = sonic_rs::to_writer(&mut *out, text);
}

/// Writes the Kafka message value of one event into `out` (cleared first),
/// so one buffer serves a whole batch: librdkafka copies each payload.
pub fn write_message_value(
    out: &mut Vec<u8>,
    batch: &Batch,
    enrichment: &Enrichment,
    event: &[u8],
) {
    let location = &enrichment.location;
    out.clear();
    out.extend_from_slice(b"{\"backend_id\":\"");
    let mut uuid = uuid::Uuid::encode_buffer();
    out.extend_from_slice(
        enrichment
            .backend_id
            .hyphenated()
            .encode_lower(&mut uuid)
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"upload_time\":");
    out.extend_from_slice(
        itoa::Buffer::new()
            .format(enrichment.upload_time_ms)
            .as_bytes(),
    );
    out.extend_from_slice(b",\"ip\":\"");
    match &enrichment.ip {
        StoredIp::Address(ip) => write_ip(out, *ip),
        // An address's text or hex digits: nothing to escape.
        StoredIp::Truncated(text) | StoredIp::Hashed(text) => {
            out.extend_from_slice(text.as_bytes())
        }
        StoredIp::Dropped => {}
    }
    out.extend_from_slice(b"\",\"country\":");
    push_json_str(out, &location.country);
    out.extend_from_slice(b",\"region\":");
    push_json_str(out, &location.region);
    out.extend_from_slice(b",\"city\":");
    push_json_str(out, &location.city);
    out.extend_from_slice(b",\"meta\":");
    out.extend_from_slice(&batch.meta);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(event);
    out.push(b'}');
}

/// The key of a batch's messages when it does not depend on the event.
fn batch_key(key: &MessageKey, batch: &Batch) -> Option<Vec<u8>> {
    let MessageKey::MetaField(field) = key else {
        return None;
    };
    let value = sonic_rs::get_from_slice(&batch.meta, &[field.as_str()]).ok()?;
    Some(match sonic_rs::JsonValueTrait::as_str(&value) {
        Some(text) => text.as_bytes().to_vec(),
        None => value.as_raw_str().as_bytes().to_vec(),
    })
}

/// Whether an event Kafka failed with `error` should wait in the spool: the
/// cluster could not take it now (timeouts, transport, leaders, a fenced
/// producer), or its topic is missing (a broker started again empty gets
/// its topics back). Not what Kafka refuses for good: too large, not
/// authorized, an invalid record.
fn worth_spooling(error: &rdkafka::error::KafkaError) -> bool {
    crate::kafka::health::is_about_the_producer(error)
        || matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
        )
}

/// The OpenTelemetry messaging attributes every outcome of this handler
/// carries.
fn messaging(outcome: Outcome, topic: String) -> Outcome {
    outcome
        .with_attribute(KeyValue::new("messaging.system", "kafka"))
        .with_attribute(KeyValue::new("messaging.destination.name", topic))
        .with_attribute(KeyValue::new("messaging.operation.type", "send"))
}

/// Lets go of the request's bytes (see `run`).
fn release_bytes(ctx: &mut UploadContext) {
    for event in ctx.events.iter_mut() {
        event.raw = bytes::Bytes::new();
    }
    if let Some(batch) = ctx.batch.as_mut() {
        batch.meta = bytes::Bytes::copy_from_slice(&batch.meta);
    }
    ctx.request.document = bytes::Bytes::new();
}

/// The key of one event's message.
fn event_key<'k>(
    key: &MessageKey,
    key_of_batch: Option<&'k [u8]>,
    backend_id: &uuid::Uuid,
    buffer: &'k mut [u8],
) -> Option<&'k [u8]> {
    match key {
        MessageKey::None => None,
        MessageKey::BackendId => Some(backend_id.hyphenated().encode_lower(buffer).as_bytes()),
        MessageKey::MetaField(_) => key_of_batch,
    }
}

impl WriteKafka {
    /// Writes the events `select` picks to the spool, each as the message
    /// Kafka would have got, and marks them `Spooled` once fsynced. When
    /// the spool refuses them (full, or failing), they keep (or get) a
    /// 1004 naming why. Returns how many were spooled.
    async fn spool(
        &self,
        spool: &Spool,
        ctx: &mut UploadContext,
        topic: &str,
        headers: &[(String, Vec<u8>)],
        why: &str,
        select: impl Fn(usize, &crate::pipeline::context::Event) -> bool,
    ) -> usize {
        let Some(batch) = ctx.batch.as_ref() else {
            return 0;
        };
        let key_of_batch = batch_key(self.sink.key(), batch);
        let now = crate::spool::now_ms();
        let max_bytes = self.sink.max_message_bytes();
        let header_bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        let mut records = Vec::new();
        let mut chosen = Vec::new();
        let mut too_large = Vec::new();
        let mut value = Vec::with_capacity(4096);
        for (index, event) in ctx.events.iter().enumerate() {
            if !select(index, event) || event.raw.is_empty() {
                continue;
            }
            let Some(enrichment) = event.enrichment.as_ref() else {
                continue;
            };
            write_message_value(&mut value, batch, enrichment, &event.raw);
            let mut buffer = uuid::Uuid::encode_buffer();
            let key = event_key(
                self.sink.key(),
                key_of_batch.as_deref(),
                &enrichment.backend_id,
                &mut buffer,
            );
            // As on the way to Kafka: a message Kafka could never take is
            // the client's problem, not the spool's.
            let size = value.len() + header_bytes + key.map_or(0, <[u8]>::len);
            if size > max_bytes {
                too_large.push((
                    index,
                    format!(
                        "event is {size} bytes as a Kafka message (value, key and headers); \
                         at most {max_bytes} are allowed"
                    ),
                ));
                continue;
            }
            records.push(SpoolRecord {
                topic: topic.to_owned(),
                key: key.map(<[u8]>::to_vec),
                headers: headers.to_vec(),
                value: value.clone(),
                spooled_at_ms: now,
            });
            chosen.push(index);
        }
        for (index, reason) in too_large {
            ctx.events[index].fail(PartCode::Serialization, reason);
        }
        if records.is_empty() {
            return 0;
        }
        match spool.append(&records).await {
            Ok(()) => {
                for index in &chosen {
                    ctx.events[*index].status = EventStatus::Spooled;
                }
                chosen.len()
            }
            Err(error) => {
                for index in chosen {
                    ctx.events[index].fail(
                        PartCode::KafkaDelivery,
                        format!("{why}, and {error}; retry"),
                    );
                }
                0
            }
        }
    }

    /// The outcome of a batch some of whose events were spooled: what
    /// still failed is reported as without a spool.
    fn spooled_outcome(
        &self,
        ctx: &mut UploadContext,
        topic: String,
        spooled: usize,
        sent: usize,
    ) -> Outcome {
        release_bytes(ctx);
        let mut failed = 0usize;
        let mut first_reason = "";
        for event in &ctx.events {
            if let EventStatus::Failed {
                code: PartCode::KafkaDelivery | PartCode::Serialization,
                reason,
            } = &event.status
            {
                failed += 1;
                if first_reason.is_empty() {
                    first_reason = reason;
                }
            }
        }
        let not_delivered = ctx
            .events
            .iter()
            .filter(|e| {
                matches!(
                    e.status,
                    EventStatus::Failed {
                        code: PartCode::KafkaDelivery,
                        ..
                    }
                )
            })
            .count();
        self.metrics.delivery_errors(not_delivered as u64);
        let outcome = if not_delivered > 0 {
            Outcome::server_error(format!(
                "{failed} events not written to Kafka or the spool; first: {first_reason}"
            ))
        } else if failed > 0 {
            Outcome::error(format!(
                "{failed} events not written to Kafka; first: {first_reason}"
            ))
        } else {
            Outcome::proceed()
        };
        messaging(outcome, topic)
            .with_attribute(KeyValue::new("messaging.batch.message_count", sent as i64))
            .with_attribute(KeyValue::new("venus.spooled", spooled as i64))
    }

    /// Fails the batch's pending events at once (1004) without producing:
    /// its topic does not exist (producing would only wait the delivery
    /// timeout for the same answer), or the gateway is shutting down.
    fn not_written(&self, ctx: &mut UploadContext, topic: String, reason: String) -> Outcome {
        let mut failed = 0u64;
        for event in ctx.events.iter_mut().filter(|e| e.is_pending()) {
            event.fail(PartCode::KafkaDelivery, reason.clone());
            failed += 1;
        }
        self.metrics.delivery_errors(failed);
        messaging(
            Outcome::server_error(format!("{failed} events not written to Kafka: {reason}")),
            topic,
        )
    }

    async fn run(&self, ctx: &mut UploadContext) -> Outcome {
        let Some(batch) = ctx.batch.as_ref() else {
            // Unreachable through the chain (split_and_validate responds
            // first), but never answer 200 for events not written.
            return Outcome {
                responder: Some(crate::wire::Reply::error(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error: no validated batch to write",
                )),
                ..Outcome::server_error("no validated batch to write")
            };
        };
        let topic = self.sink.topic_for(&batch.category);
        // One producer for the whole batch, even if the healer replaces it
        // meanwhile: its acknowledgements come from the one that sent.
        let producer = self.sink.producer();
        // A lookup can take seconds against a slow broker; a shutdown whose
        // grace runs out must not wait for it.
        let state = tokio::select! {
            state = self.sink.topics().check(&producer, &topic) => state,
            _ = self.drain.answer_now() => {
                let reason = "the gateway shut down before the events were written; retry";
                return self.not_written(ctx, topic, reason.to_owned());
            }
        };
        let headers_list: Vec<(String, Vec<u8>)> = self
            .spool
            .as_ref()
            .map(|_| {
                telemetry::propagation_headers(&ctx.request.request_id)
                    .into_iter()
                    .map(|(name, value)| (name.to_owned(), value.as_bytes().to_vec()))
                    .chain(std::iter::once((
                        "request_id".to_owned(),
                        ctx.request.request_id.as_bytes().to_vec(),
                    )))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(spool) = &self.spool {
            // Kafka is not taking events: straight to the spool, without
            // waiting a delivery timeout per upload.
            let why = if state == TopicState::Missing {
                self.metrics.missing_topic();
                Some(format!("Kafka topic {topic} does not exist"))
            } else if self.sink.health().failing_for().is_some() && spool.depth().records > 0 {
                // Only while the replay is there to find out when Kafka is
                // back (its acknowledgements end the failing streak); with
                // an empty spool, live traffic tries Kafka first. The
                // streak is checked first: an atomic load, where the
                // spool's depth takes its lock (not on every healthy upload).
                Some("Kafka is not acknowledging events".to_owned())
            } else {
                None
            };
            if let Some(why) = why {
                let spooled = self
                    .spool(spool, ctx, &topic, &headers_list, &why, |_, e| {
                        e.is_pending()
                    })
                    .await;
                return self.spooled_outcome(ctx, topic, spooled, 0);
            }
        }
        if state == TopicState::Missing {
            let reason = format!(
                "Kafka topic {topic} does not exist; the operator must create it \
                 (or set kafka.create_topics with this category in categories)"
            );
            self.metrics.missing_topic();
            return self.not_written(ctx, topic, reason);
        }
        let mut headers = OwnedHeaders::new();
        for (name, value) in telemetry::propagation_headers(&ctx.request.request_id) {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        // No `content-type`: every value is JSON (docs/API.md 3.2), and
        // librdkafka copies each header into each message (see
        // `telemetry::propagation_headers`).
        headers = headers.insert(Header {
            key: "request_id",
            value: Some(ctx.request.request_id.as_bytes()),
        });
        let key_of_batch = batch_key(self.sink.key(), batch);
        let max_bytes = self.sink.max_message_bytes();
        // What every message of the batch carries besides its value: counted
        // in its size, so a caller's headers cannot inflate what the
        // producer is asked to hold.
        let header_bytes: usize = headers
            .iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
            .sum();

        let started = Instant::now();
        let acks = BatchAcks::new(ctx.events.len());
        // Serializing and handing over a large batch is milliseconds of CPU:
        // done off the async workers' queue (see `cpu_heavy`).
        let events = &mut ctx.events;
        let sent = cpu_heavy(ctx.request.document.len(), || {
            let mut sent = 0usize;
            let mut value = Vec::with_capacity(4096);
            for (index, event) in events.iter_mut().enumerate() {
                if !event.is_pending() {
                    continue;
                }
                let Some(enrichment) = event.enrichment.as_ref() else {
                    event.fail(PartCode::Serialization, "event was not enriched");
                    continue;
                };
                write_message_value(&mut value, batch, enrichment, &event.raw);
                let mut backend_key = uuid::Uuid::encode_buffer();
                let key: Option<&[u8]> = match self.sink.key() {
                    MessageKey::None => None,
                    MessageKey::BackendId => Some(
                        enrichment
                            .backend_id
                            .hyphenated()
                            .encode_lower(&mut backend_key)
                            .as_bytes(),
                    ),
                    MessageKey::MetaField(_) => key_of_batch.as_deref(),
                };
                let size = value.len() + header_bytes + key.map_or(0, <[u8]>::len);
                if size > max_bytes {
                    let reason = format!(
                        "event is {size} bytes as a Kafka message (value, key and headers); \
                         at most {max_bytes} are allowed"
                    );
                    event.fail(PartCode::Serialization, reason);
                    continue;
                }
                let mut record = BaseRecord::with_opaque_to(&topic, acks.delivery(index))
                    .payload(&value)
                    .headers(headers.clone());
                if let Some(key) = key {
                    record = record.key(key);
                }
                // Counted before the producer can report it.
                acks.sent();
                match producer.producer.send(record) {
                    Ok(()) => sent += 1,
                    Err((error, _)) => {
                        acks.not_sent();
                        event.fail(
                            PartCode::KafkaDelivery,
                            format!("Kafka producer did not take the event: {error}"),
                        );
                    }
                }
            }
            sent
        });
        acks.all_sent();
        // The reply needs only what the events own (ids, statuses, backend
        // ids); the document and every slice of it can go before the wait for
        // Kafka, the longest part of an upload, so that uploads in flight
        // hold their events' outcomes and not their bytes. With the spool
        // on, they are kept until the answer: a failed event is spooled.
        if self.spool.is_none() {
            release_bytes(ctx);
        }

        // The response never waits past the delivery timeout; librdkafka's
        // own message timeout is shorter, so it normally fails a message
        // itself before this deadline (see `kafka::producer_config`). One
        // timer for the batch, not one per message.
        let deadline = tokio::time::sleep_until(
            tokio::time::Instant::from_std(started) + self.sink.delivery_timeout(),
        );
        // A shutdown whose grace runs out ends the wait too: the client gets
        // its reply (1004 for what is not acknowledged yet) before the
        // connection goes.
        let cut_short = tokio::select! {
            _ = acks.all_answered() => false,
            _ = deadline => false,
            _ = self.drain.answer_now() => true,
        };
        let mut acknowledged = 0usize;
        let mut first_error: Option<rdkafka::error::KafkaError> = None;
        // Events Kafka refused for good (too large, not authorized, an
        // invalid record): the spool would only hold them for ever.
        let mut refused = vec![false; ctx.events.len()];
        for ((event, outcome), refused) in ctx.events.iter_mut().zip(acks.take()).zip(&mut refused)
        {
            match outcome {
                Some(Ok(())) => {
                    acknowledged += 1;
                    event.status = EventStatus::Accepted;
                }
                Some(Err(error)) => {
                    event.fail(
                        PartCode::KafkaDelivery,
                        format!("Kafka did not acknowledge the event: {error}"),
                    );
                    *refused = !worth_spooling(&error);
                    first_error.get_or_insert(error);
                }
                // Not sent, or no answer yet: the status says which.
                None => {}
            }
        }
        if matches!(
            first_error.as_ref().and_then(|e| e.rdkafka_error_code()),
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
        ) {
            self.sink.topics().forget(&topic);
        }
        // What the healer and readiness judge the producer by. A batch cut
        // short by the shutdown says nothing about the producer.
        let timed_out = ctx.events.iter().any(|e| e.is_pending());
        if !cut_short {
            let timeout =
                rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
            let error = first_error.as_ref().or(timed_out.then_some(&timeout));
            self.sink.report(producer.generation, acknowledged, error);
        }
        // Whatever is still pending had no answer before the deadline.
        let timeout_ms = self.sink.delivery_timeout().as_millis();
        let unanswered = if cut_short {
            "the gateway shut down before Kafka acknowledged the event (it may still arrive)"
                .to_owned()
        } else {
            format!("no acknowledgement from Kafka within {timeout_ms} ms")
        };
        for event in ctx.events.iter_mut().filter(|e| e.is_pending()) {
            event.fail(PartCode::KafkaDelivery, unanswered.clone());
        }
        if sent > 0 {
            self.metrics
                .produce_duration(started.elapsed().as_secs_f64());
        }
        if let Some(spool) = &self.spool {
            let spooled = self
                .spool(
                    spool,
                    ctx,
                    &topic,
                    &headers_list,
                    "Kafka did not acknowledge the event",
                    |index, e| {
                        !refused[index]
                            && matches!(
                                e.status,
                                EventStatus::Failed {
                                    code: PartCode::KafkaDelivery,
                                    ..
                                }
                            )
                    },
                )
                .await;
            release_bytes(ctx);
            if spooled > 0 {
                return self.spooled_outcome(ctx, topic, spooled, sent);
            }
        }

        let mut too_large = 0usize;
        let mut not_acknowledged = 0usize;
        let mut first_reason = "";
        for event in &ctx.events {
            if let EventStatus::Failed { code, reason } = &event.status {
                match code {
                    PartCode::Serialization => too_large += 1,
                    PartCode::KafkaDelivery => not_acknowledged += 1,
                    _ => continue,
                }
                if first_reason.is_empty() {
                    first_reason = reason;
                }
            }
        }
        self.metrics.delivery_errors(not_acknowledged as u64);

        let message = format!(
            "{} events not written to Kafka; first: {first_reason}",
            too_large + not_acknowledged
        );
        // Kafka trouble is the gateway's to report; an event too large for a
        // message is the client's.
        let outcome = if not_acknowledged > 0 {
            Outcome::server_error(message)
        } else if too_large > 0 {
            Outcome::error(message)
        } else {
            Outcome::proceed()
        };
        messaging(outcome, topic)
            .with_attribute(KeyValue::new("messaging.batch.message_count", sent as i64))
    }
}
