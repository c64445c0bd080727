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

use crate::pipeline::{ErrorOrigin, Handler, Outcome, UploadContext};
use crate::telemetry::RateLimitedLog;

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
        if !self.inner.applies(ctx) {
            return Outcome::proceed();
        }
        let name = self.inner.name();
        let split_here = ctx.events.is_empty();
        let pending_before = ctx.pending();
        let failed_before = ctx.failed();
        let span = tracing::info_span!(
            target: "venus::pipeline",
            "handler",
            otel.name = name,
            otel.kind = self.inner.span_kind().as_str(),
            handler = name,
            venus.events.in = field::Empty,
            venus.events.failed = field::Empty,
        );
        let outcome = self.inner.handle(ctx).instrument(span.clone()).await;

        // The first handler creates the events: what it received is what it
        // split out of the body.
        let events_in = if split_here {
            ctx.events.len()
        } else {
            pending_before
        };
        // As i64: OpenTelemetry has no unsigned attribute type.
        span.record("venus.events.in", events_in as i64);
        span.record(
            "venus.events.failed",
            ctx.failed().saturating_sub(failed_before) as i64,
        );
        for attribute in &outcome.attributes {
            span.set_attribute(attribute.key.clone(), attribute.value.clone());
        }
        if let Some(error) = &outcome.error {
            span.set_status(Status::error(error.message.clone()));
            span.add_event(
                "exception",
                vec![
                    KeyValue::new("exception.type", name),
                    KeyValue::new("exception.message", error.message.clone()),
                ],
            );
            match error.origin {
                ErrorOrigin::Client => {
                    tracing::debug!(parent: &span, handler = name, error = %error, "handler reported an error")
                }
                ErrorOrigin::Server => {
                    // Kafka trouble fails every upload at once: one line a
                    // second says so, the rest go to debug.
                    static SERVER_ERRORS: RateLimitedLog = RateLimitedLog::new();
                    match SERVER_ERRORS.allow() {
                        Some(held_back) => tracing::warn!(
                            parent: &span,
                            handler = name,
                            error = %error,
                            similar_lines_held_back = held_back,
                            "handler reported an error"
                        ),
                        None => {
                            tracing::debug!(parent: &span, handler = name, error = %error, "handler reported an error")
                        }
                    }
                }
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use bytes::Bytes;
    use futures::future::BoxFuture;
    use opentelemetry::trace::{SpanId, SpanKind as OtelKind, Status, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing::Instrument;
    use tracing_subscriber::layer::SubscriberExt;

    use crate::pipeline::context::{Event, EventStatus, SentIp};
    use crate::pipeline::{Chain, Handler, Outcome, SpanKind, UploadContext, UploadRequest};
    use crate::wire::{PartCode, Reply};

    /// A handler that does what the test tells it and counts its calls.
    struct Scripted {
        name: &'static str,
        kind: SpanKind,
        error: bool,
        respond: bool,
        fail_one: bool,
        calls: Arc<AtomicUsize>,
    }

    impl Handler for Scripted {
        fn name(&self) -> &'static str {
            self.name
        }

        fn span_kind(&self) -> SpanKind {
            self.kind
        }

        fn handle<'a>(&'a self, ctx: &'a mut UploadContext) -> BoxFuture<'a, Outcome> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if self.fail_one {
                    if let Some(event) = ctx.events.iter_mut().find(|e| e.is_pending()) {
                        event.fail(PartCode::Validation, "scripted");
                    }
                }
                let reply = Reply::error(axum::http::StatusCode::IM_A_TEAPOT, "scripted reply");
                let mut outcome = match (self.error, self.respond) {
                    (true, true) => Outcome::fail(format!("{} failed", self.name), reply),
                    (true, false) => Outcome::error(format!("{} failed", self.name)),
                    (false, true) => Outcome::respond(reply),
                    (false, false) => Outcome::proceed(),
                };
                outcome =
                    outcome.with_attribute(opentelemetry::KeyValue::new("test.handler", self.name));
                outcome
            })
        }
    }

    fn scripted(
        name: &'static str,
        error: bool,
        respond: bool,
    ) -> (Box<dyn Handler>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let handler = Scripted {
            name,
            kind: if name == "last" {
                SpanKind::Producer
            } else {
                SpanKind::Internal
            },
            error,
            respond,
            fail_one: error,
            calls: calls.clone(),
        };
        (Box::new(handler), calls)
    }

    fn context() -> UploadContext {
        let mut ctx = UploadContext::new(UploadRequest {
            anonymous: false,
            key: None,
            request_id: "req".into(),
            client_ip: "127.0.0.1".parse().unwrap(),
            document: Bytes::new(),
        });
        for id in ["a", "b", "c"] {
            ctx.events.push(Event {
                raw: Bytes::from_static(b"{}"),
                id: Some(id.into()),
                ip: SentIp::Absent,
                enrichment: None,
                status: EventStatus::Pending,
            });
        }
        ctx
    }

    struct Run {
        spans: Vec<SpanData>,
        calls: Vec<usize>,
        reply: Reply,
        ctx: UploadContext,
    }

    /// Runs `first` then a plain `last` handler inside a "request" span,
    /// collecting every finished span.
    async fn run_chain(error: bool, respond: bool) -> Run {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _guard = tracing::subscriber::set_default(subscriber);

        let (first, first_calls) = scripted("first", error, respond);
        let (last, last_calls) = scripted("last", false, false);
        let chain = Chain::new(vec![first, last]);
        let mut ctx = context();
        let request = tracing::info_span!("request");
        let reply = chain.run(&mut ctx).instrument(request).await;
        provider.force_flush().unwrap();
        Run {
            spans: exporter.get_finished_spans().unwrap(),
            calls: vec![
                first_calls.load(Ordering::SeqCst),
                last_calls.load(Ordering::SeqCst),
            ],
            reply,
            ctx,
        }
    }

    fn span<'a>(run: &'a Run, name: &str) -> Option<&'a SpanData> {
        run.spans.iter().find(|s| s.name == name)
    }

    fn attribute(span: &SpanData, key: &str) -> Option<opentelemetry::Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.clone())
    }

    fn assert_child_of_request(run: &Run, name: &str) {
        let request = span(run, "request").expect("request span");
        let child = span(run, name).expect("handler span");
        assert_eq!(child.parent_span_id, request.span_context.span_id());
        assert_ne!(child.parent_span_id, SpanId::INVALID);
        assert_eq!(
            child.span_context.trace_id(),
            request.span_context.trace_id()
        );
    }

    fn assert_error_recorded(span: &SpanData, message: &str) {
        assert_eq!(span.status, Status::error(message.to_owned()));
        let exception = span
            .events
            .iter()
            .find(|e| e.name == "exception")
            .expect("an exception event");
        assert!(exception
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "exception.message" && kv.value.as_str() == message));
    }

    #[tokio::test]
    async fn error_and_responder_records_the_error_and_stops_the_chain() {
        let run = run_chain(true, true).await;
        assert_eq!(run.calls, vec![1, 0]);
        assert_child_of_request(&run, "first");
        assert!(span(&run, "last").is_none());
        let first = span(&run, "first").unwrap();
        assert_error_recorded(first, "first failed");
        assert_eq!(attribute(first, "venus.events.in"), Some(3i64.into()));
        assert_eq!(attribute(first, "venus.events.failed"), Some(1i64.into()));
        assert_eq!(attribute(first, "test.handler"), Some("first".into()));
        assert_eq!(run.reply.status, axum::http::StatusCode::IM_A_TEAPOT);
        assert_eq!(run.ctx.errors.len(), 1);
        assert_eq!(run.ctx.errors[0].0, "first");
    }

    #[tokio::test]
    async fn error_without_responder_records_the_error_and_goes_on() {
        let run = run_chain(true, false).await;
        assert_eq!(run.calls, vec![1, 1]);
        assert_child_of_request(&run, "first");
        assert_child_of_request(&run, "last");
        assert_error_recorded(span(&run, "first").unwrap(), "first failed");
        let last = span(&run, "last").unwrap();
        assert_eq!(last.status, Status::Unset);
        assert_eq!(last.span_kind, OtelKind::Producer);
        assert_eq!(attribute(last, "venus.events.in"), Some(2i64.into()));
        assert_eq!(attribute(last, "venus.events.failed"), Some(0i64.into()));
        // No handler responded: the reply is built from the events.
        assert_eq!(run.reply.body.parts.len(), 3);
        assert_eq!(run.ctx.errors.len(), 1);
    }

    #[tokio::test]
    async fn responder_without_error_stops_the_chain_and_leaves_the_status_unset() {
        let run = run_chain(false, true).await;
        assert_eq!(run.calls, vec![1, 0]);
        assert_child_of_request(&run, "first");
        let first = span(&run, "first").unwrap();
        assert_eq!(first.status, Status::Unset);
        assert!(first.events.iter().all(|e| e.name != "exception"));
        assert_eq!(first.span_kind, OtelKind::Internal);
        assert!(span(&run, "last").is_none());
        assert_eq!(run.reply.status, axum::http::StatusCode::IM_A_TEAPOT);
        assert!(run.ctx.errors.is_empty());
    }

    #[tokio::test]
    async fn neither_goes_on_with_clean_spans() {
        let run = run_chain(false, false).await;
        assert_eq!(run.calls, vec![1, 1]);
        assert_child_of_request(&run, "first");
        assert_child_of_request(&run, "last");
        for name in ["first", "last"] {
            assert_eq!(span(&run, name).unwrap().status, Status::Unset);
        }
        assert!(run.ctx.errors.is_empty());
        assert_eq!(run.ctx.pending(), 3);
    }
}
