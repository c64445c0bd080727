//! The upload pipeline: a chain of handlers over one request's context.
//!
//! ```text
//! body ─▶ split_and_validate ─▶ authorize ─▶ ip_enrich ─▶ apply_privacy ─▶ write_kafka ─▶ reply (a part per event)
//! ```
//!
//! Each handler ([`Handler`]) reads and updates the [`UploadContext`] and
//! returns an [`Outcome`]: an optional error and an optional responder.
//!
//! | error | responder | what the chain does                       |
//! |-------|-----------|-------------------------------------------|
//! | yes   | yes       | records the error, sends the response now |
//! | yes   | no        | records the error, goes on                |
//! | no    | yes       | sends the response now                    |
//! | no    | no        | goes on                                   |
//!
//! When no handler responds, the reply is built from the per-event results.
//! The [`Chain`] wraps every handler in a [`TraceWrapper`] in one place, so no
//! handler opens spans or records its own errors. A handler with nothing to
//! do for an upload ([`Handler::applies`]) is skipped, span and all.

pub mod apply_privacy;
pub mod authorize;
mod chain;
pub mod context;
pub mod ip_enrich;
pub mod split_and_validate;
mod trace_wrapper;
pub mod write_kafka;

use futures::future::BoxFuture;
use opentelemetry::KeyValue;

use crate::wire::Reply;

pub use chain::Chain;
pub use context::{Event, EventStatus, UploadContext, UploadRequest};
pub use trace_wrapper::TraceWrapper;

/// Documents from this size on are parsed and serialized with the worker
/// thread handed over to blocking work (about 1 ms of CPU and more).
pub const LARGE_DOCUMENT_BYTES: usize = 256 * 1024;

/// Runs CPU-heavy `work` for a document of `bytes`: inline when it is small;
/// when it is large, after telling tokio that this worker blocks
/// (`block_in_place`), so that the worker's other tasks (health probes,
/// small uploads) move to another thread instead of waiting behind a
/// 10 MiB document.
pub fn cpu_heavy<R>(bytes: usize, work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let can_hand_over = Handle::try_current()
        .is_ok_and(|runtime| runtime.runtime_flavor() == RuntimeFlavor::MultiThread);
    if bytes >= LARGE_DOCUMENT_BYTES && can_hand_over {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// What went wrong in a handler, for the span, the log and the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
    /// Whose fault: a client's bad input is logged at debug (a broken SDK
    /// must not flood the logs), the gateway's or Kafka's trouble at warn.
    pub origin: ErrorOrigin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorOrigin {
    Client,
    Server,
}

/// A handler's verdict: see the module documentation for the four cases.
#[derive(Debug, Default)]
pub struct Outcome {
    pub error: Option<HandlerError>,
    pub responder: Option<Reply>,
    /// Extra attributes for the handler's span (e.g. the Kafka topic).
    pub attributes: Vec<KeyValue>,
}

impl Outcome {
    /// Neither error nor responder: go on.
    pub fn proceed() -> Self {
        Self::default()
    }

    /// An error caused by the client's input, and the chain goes on.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            error: Some(HandlerError {
                message: message.into(),
                origin: ErrorOrigin::Client,
            }),
            ..Self::default()
        }
    }

    /// An error on the gateway's or Kafka's side, and the chain goes on.
    pub fn server_error(message: impl Into<String>) -> Self {
        Self {
            error: Some(HandlerError {
                message: message.into(),
                origin: ErrorOrigin::Server,
            }),
            ..Self::default()
        }
    }

    /// Respond now.
    pub fn respond(reply: Reply) -> Self {
        Self {
            responder: Some(reply),
            ..Self::default()
        }
    }

    /// An error caused by the client's input, and respond now.
    pub fn fail(message: impl Into<String>, reply: Reply) -> Self {
        Self {
            responder: Some(reply),
            ..Self::error(message)
        }
    }

    pub fn with_attribute(mut self, attribute: KeyValue) -> Self {
        self.attributes.push(attribute);
        self
    }
}

/// The span kind a handler's span gets (OpenTelemetry names, as
/// `tracing-opentelemetry` reads them from the `otel.kind` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal,
    Producer,
}

impl SpanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::Producer => "producer",
        }
    }
}

/// One step of the pipeline.
pub trait Handler: Send + Sync {
    /// The handler's name: its span's name and its label in logs.
    fn name(&self) -> &'static str;

    fn span_kind(&self) -> SpanKind {
        SpanKind::Internal
    }

    /// Whether the handler has anything to do for this upload; when not,
    /// the chain skips it without a span (`apply_privacy` for an app without
    /// rules).
    fn applies(&self, _ctx: &UploadContext) -> bool {
        true
    }

    fn handle<'a>(&'a self, ctx: &'a mut UploadContext) -> BoxFuture<'a, Outcome>;
}

impl<H: Handler + ?Sized> Handler for Box<H> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn span_kind(&self) -> SpanKind {
        (**self).span_kind()
    }

    fn applies(&self, ctx: &UploadContext) -> bool {
        (**self).applies(ctx)
    }

    fn handle<'a>(&'a self, ctx: &'a mut UploadContext) -> BoxFuture<'a, Outcome> {
        (**self).handle(ctx)
    }
}
