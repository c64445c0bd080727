//! The per-request state the handlers share.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::apps::keys::KeyDigest;
use crate::domain::{AppId, Category};
use crate::geoip::Location;
use crate::pipeline::HandlerError;
use crate::privacy::{AppPrivacy, Privacy, StoredIp};
use crate::wire::{Part, PartCode, Reply};

/// What the HTTP layer hands to the pipeline.
#[derive(Debug, Clone)]
pub struct UploadRequest {
    /// `X-Request-ID` of the request, or the one generated for it.
    pub request_id: String,
    /// The client's address (TCP peer, or the configured proxy header).
    pub client_ip: IpAddr,
    /// The batch document, decompressed.
    pub document: Bytes,
    /// The digest of the write key the request presented, if any (the key
    /// itself is never kept).
    pub key: Option<KeyDigest>,
    /// The request asked for no address to be stored (`X-Venus-Anonymous`).
    pub anonymous: bool,
}

/// The batch-level fields, parsed from `meta`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub app_id: AppId,
    pub category: Category,
    /// `meta` exactly as sent (a slice of the document, not a copy), or as
    /// the app's privacy rules left it.
    pub meta: Bytes,
    /// `meta.anonymous` is `true`: no address is stored.
    pub anonymous: bool,
}

/// The `ip` field of an event as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SentIp {
    /// No `ip` field: the client's address is used.
    Absent,
    Text(String),
}

/// Server-side facts added to an accepted event by `ip_enrich`.
#[derive(Debug, Clone)]
pub struct Enrichment {
    pub backend_id: Uuid,
    /// Milliseconds since the epoch at which the batch was received.
    pub upload_time_ms: u64,
    /// What is stored of the address used for the lookup (the app's
    /// `privacy.ip`).
    pub ip: StoredIp,
    /// Shared by every event of the batch with the same address.
    pub location: Arc<Location>,
}

/// Where an event stands. Only `write_kafka` sets [`EventStatus::Accepted`],
/// and only on Kafka's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventStatus {
    /// Valid so far, waiting for the next handler.
    Pending,
    Accepted,
    /// Kafka was not taking events: written and fsynced to the local spool
    /// (`spool.enabled`), replayed to Kafka later. Answered 0 like
    /// `Accepted`, with `data` "spooled".
    Spooled,
    Failed {
        code: PartCode,
        reason: String,
    },
}

/// One event of the batch.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event object exactly as sent (a slice of the document), or as
    /// the app's privacy rules left it.
    pub raw: Bytes,
    /// `id` as sent, when it was a string (even an invalid one, so the
    /// client can match the part to its event).
    pub id: Option<String>,
    pub ip: SentIp,
    pub enrichment: Option<Enrichment>,
    pub status: EventStatus,
}

impl Event {
    pub fn is_pending(&self) -> bool {
        self.status == EventStatus::Pending
    }

    pub fn fail(&mut self, code: PartCode, reason: impl Into<String>) {
        self.status = EventStatus::Failed {
            code,
            reason: reason.into(),
        };
    }

    fn part(&self) -> Part {
        let (code, data) = match &self.status {
            EventStatus::Accepted => (PartCode::Accepted, Cow::Borrowed("accepted")),
            EventStatus::Spooled => (PartCode::Accepted, Cow::Borrowed("spooled")),
            EventStatus::Failed { code, reason } => (*code, Cow::Owned(reason.clone())),
            // A chain that ends with an event still pending never reached
            // Kafka with it: it must not be reported accepted.
            EventStatus::Pending => (
                PartCode::KafkaDelivery,
                Cow::Borrowed("not delivered to Kafka"),
            ),
        };
        Part {
            id: self.id.clone(),
            backend_id: self.enrichment.as_ref().map(|e| e.backend_id),
            code,
            data,
        }
    }
}

/// One upload on its way through the chain.
#[derive(Debug)]
pub struct UploadContext {
    pub request: UploadRequest,
    /// Set by `split_and_validate` once `meta` is valid.
    pub batch: Option<Batch>,
    /// Every event of `data`, in request order.
    pub events: Vec<Event>,
    /// Errors the handlers reported, in order, with the handler's name.
    pub errors: Vec<(&'static str, HandlerError)>,
    /// The app's privacy rules, set by `authorize` once the app is known.
    pub privacy: Option<Arc<AppPrivacy>>,
}

impl UploadContext {
    pub fn new(request: UploadRequest) -> Self {
        Self {
            request,
            batch: None,
            events: Vec::new(),
            errors: Vec::new(),
            privacy: None,
        }
    }

    /// Whether the request or its `meta` asked for no address to be stored.
    pub fn anonymous(&self) -> bool {
        self.request.anonymous || self.batch.as_ref().is_some_and(|b| b.anonymous)
    }

    /// The privacy rules for this batch (keep everything until `authorize`
    /// has found the app's).
    pub fn privacy_rules(&self) -> &Privacy {
        match &self.privacy {
            Some(app) => app.rules(self.anonymous()),
            None => AppPrivacy::shared_keep_all().rules(self.anonymous()),
        }
    }

    pub fn pending(&self) -> usize {
        self.events.iter().filter(|e| e.is_pending()).count()
    }

    pub fn failed(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e.status, EventStatus::Failed { .. }))
            .count()
    }

    /// The reply for the batch as it stands: a part per event.
    pub fn reply(&self) -> Reply {
        Reply::from_parts(self.events.iter().map(Event::part).collect())
    }
}
