//! The one place where handlers meet tracing.
//!
//! For every handler call, [`TraceWrapper`] opens a child span of the current
//! (request) span, named after the handler, with the handler's span kind. It
//! counts the events the handler received and failed, adds the attributes the
//! handler returned, and, when the handler reports an error, marks the span
//! `Error` with the message and adds an `exception` event, whether or not the
//! chain goes on. The handler runs inside the span, so anything it propagates
//! (the Kafka `traceparent`) names this span.

use opentelemetry::trace::Status;
use opentelemetry::KeyValue;
use tracing::{field, Instrument};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::pipeline::{Handler, Outcome, UploadContext};

pub struct TraceWrapper<H> {
    inner: H,
}

impl<H: Handler> TraceWrapper<H> {
    pub fn new(inner: H) -> Self {
        Self { inner }
    }

    pub fn name(&self) -> &'static str {
        self.inner.name()
    }

    pub async fn call(&self, ctx: &mut UploadContext) -> Outcome {
        let name = self.inner.name();
        let events_in = ctx.pending();
        let failed_before = ctx.failed();
        let span = tracing::info_span!(
            target: "venus::pipeline",
            "handler",
            otel.name = name,
            otel.kind = self.inner.span_kind().as_str(),
            handler = name,
            venus.events.in = events_in,
            venus.events.failed = field::Empty,
        );
        let outcome = self.inner.handle(ctx).instrument(span.clone()).await;

        let failed = ctx.failed().saturating_sub(failed_before);
        span.record("venus.events.failed", failed);
        for attribute in &outcome.attributes {
            span.set_attribute(attribute.key.clone(), attribute.value.clone());
        }
        if let Some(error) = &outcome.error {
            span.set_status(Status::error(error.0.clone()));
            span.add_event(
                "exception",
                vec![
                    KeyValue::new("exception.type", name),
                    KeyValue::new("exception.message", error.0.clone()),
                ],
            );
            tracing::warn!(parent: &span, handler = name, error = %error, "handler reported an error");
        }
        outcome
    }
}
