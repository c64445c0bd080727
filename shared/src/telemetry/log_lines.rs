//! What a log line says about the request it was logged in.
//!
//! A line logged inside a request carries, under `span`, the `request_id`,
//! the `handler` that logged (inside one), and the `trace_id` and `span_id`
//! of the span it was logged in, so that an operator goes from a line to its
//! trace. The other fields of the gateway's spans (method, route, addresses,
//! sizes, event counts) are attributes of the spans in the trace, not in the
//! log.
//!
//! Both halves are built for a gateway that logs little and opens five spans
//! per upload:
//!
//! * The log layer formats the fields of every span when the span is made
//!   and again at every `record`, whether or not a line is ever logged in it.
//!   [`LogSpanFields`] keeps only the two fields above; tracing-subscriber's
//!   `JsonFields` re-parsed and re-wrote the whole object at every `record`,
//!   and at the default level (`info`) that cost 16% more gateway CPU per
//!   event than at `warn` (docs/BENCHMARKS.md).
//! * The ids are not span fields at all: [`WithTraceIds`] reads them from the
//!   span's OpenTelemetry context when a line is written. Recording them as
//!   fields of every span formatted 96 hex digits per span for the log layer
//!   and again as OpenTelemetry attributes, about 3% of the gateway's CPU at
//!   peak (docs/BENCHMARKS.md, change 20).

use std::cell::Cell;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::TraceContextExt;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The span fields a log line carries, besides the ids.
const LOG_SPAN_FIELDS: [&str; 2] = ["request_id", "handler"];

/// Formats a span's fields for the JSON log lines, keeping only
/// [`LOG_SPAN_FIELDS`]. Writes a JSON object, as the JSON event format
/// expects.
pub struct LogSpanFields;

/// The picked fields of one `new_span` or `record`, as JSON members.
#[derive(Default)]
struct PickedFields(String);

impl tracing::field::Visit for PickedFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if LOG_SPAN_FIELDS.contains(&field.name()) {
            self.push(field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        // Formatted only when picked.
        if LOG_SPAN_FIELDS.contains(&field.name()) {
            self.push(field.name(), &format!("{value:?}"));
        }
    }
}

impl PickedFields {
    fn push(&mut self, name: &'static str, value: &str) {
        if !self.0.is_empty() {
            self.0.push(',');
        }
        push_member(&mut self.0, name, value);
    }
}

/// Appends `"name":value` with `value` as a JSON string.
fn push_member(out: &mut String, name: &str, value: &str) {
    out.push('"');
    out.push_str(name);
    out.push_str("\":");
    // A string always serializes; the request id is the client's.
    out.push_str(&sonic_rs::to_string(value).unwrap_or_else(|_| "\"\"".into()));
}

impl<'writer> FormatFields<'writer> for LogSpanFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut picked = PickedFields::default();
        fields.record(&mut picked);
        write!(writer, "{{{}}}", picked.0)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        let mut picked = PickedFields::default();
        fields.record(&mut picked);
        if picked.0.is_empty() {
            return Ok(());
        }
        // `current` is the object `format_fields` wrote (the log layer
        // makes it so before any `record`): open it at its end.
        let text = &mut current.fields;
        debug_assert!(text.starts_with('{') && text.ends_with('}'), "{text}");
        text.pop();
        if text.len() > 1 {
            text.push(',');
        }
        text.push_str(&picked.0);
        text.push('}');
        Ok(())
    }
}

/// How [`WithTraceIds`] adds the ids to a line its inner format writes.
#[derive(Clone, Copy, Debug)]
pub enum IdsAt {
    /// As the first members of the line's `span` object (JSON lines).
    SpanObject,
    /// As `trace_id=… span_id=…` before the line (pretty lines). Not at its
    /// end: the line would have to be written into a buffer first, and a
    /// buffer's `Writer` has no colours.
    LineStart,
}

/// The subscriber the log layer is part of, for [`WithTraceIds`] to reach
/// the OpenTelemetry layer's data. Not `dispatcher::get_default`: inside an
/// event's dispatch that gives the no-op dispatcher whenever a scoped one
/// (a test's) exists anywhere in the process. A layer of its own learns the
/// subscriber when it is registered; held weakly, as the subscriber owns the
/// log layer.
#[derive(Clone, Default)]
pub struct DispatchHandle(Arc<OnceLock<WeakDispatch>>);

impl DispatchHandle {
    fn get(&self) -> Option<Dispatch> {
        self.0.get().and_then(WeakDispatch::upgrade)
    }
}

impl<S: Subscriber> Layer<S> for DispatchHandle {
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        let _ = self.0.set(subscriber.downgrade());
    }
}

/// An event format that writes the line with `inner`, then adds the
/// `trace_id` and `span_id` of the span the event was logged in, read from
/// that span's OpenTelemetry context at that moment. Lines outside any span,
/// or in a span without a valid context, are left as `inner` wrote them.
pub struct WithTraceIds<F> {
    inner: F,
    at: IdsAt,
    subscriber: DispatchHandle,
}

impl<F> WithTraceIds<F> {
    /// `subscriber` must be a layer of the same subscriber.
    pub fn new(inner: F, at: IdsAt, subscriber: DispatchHandle) -> Self {
        Self {
            inner,
            at,
            subscriber,
        }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        // The span the line is logged in, as the JSON format picks it: the
        // event's explicit parent, else the current span.
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        // The OpenTelemetry SDK may log while tracing-opentelemetry holds a
        // span's lock (when it starts the span), and so may anything this
        // lookup calls: reading the ids then would take that lock again.
        // Such lines go out without ids.
        let own_event = event.metadata().target().starts_with("opentelemetry");
        let ids = span
            .zip(self.subscriber.get())
            .filter(|_| !own_event)
            .and_then(|(span, subscriber)| span_ids(&span.id(), &subscriber));
        let Some(ids) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        match self.at {
            IdsAt::LineStart => {
                let [trace_id, span_id] = &ids;
                write!(writer, "trace_id={trace_id} span_id={span_id} ")?;
                self.inner.format_event(ctx, writer, event)
            }
            IdsAt::SpanObject => {
                let mut line = String::new();
                self.inner
                    .format_event(ctx, Writer::new(&mut line), event)?;
                writer.write_str(&in_span_object(&line, &ids))
            }
        }
    }
}

thread_local! {
    /// Set while this thread looks up a span's OpenTelemetry context for a
    /// line, so that a line logged meanwhile does not look up again.
    static IN_LOOKUP: Cell<bool> = const { Cell::new(false) };
}

/// The trace and span ids of span `id`, as hex, when its context is valid;
/// `None` for a line logged while this thread is already looking them up.
fn span_ids(id: &tracing::span::Id, subscriber: &Dispatch) -> Option<[String; 2]> {
    if IN_LOOKUP.with(|busy| busy.replace(true)) {
        return None;
    }
    let context = tracing_opentelemetry::get_otel_context(id, subscriber);
    IN_LOOKUP.with(|busy| busy.set(false));
    let context = context?;
    let span = context.span();
    let ids = span.span_context();
    ids.is_valid()
        .then(|| [ids.trace_id().to_string(), ids.span_id().to_string()])
}

/// A JSON `line` with the ids as the first members of its `span` object;
/// unchanged if it has none.
fn in_span_object(line: &str, [trace_id, span_id]: &[String; 2]) -> String {
    // `"span":{` can only be the key of the span object: inside a JSON
    // string every quote is escaped, so no string holds a quote right after
    // `span`. The span object is the line's last object (no span list),
    // hence the last match.
    const KEY: &str = "\"span\":{";
    let Some(at) = line.rfind(KEY).map(|at| at + KEY.len()) else {
        return line.to_owned();
    };
    let mut ids = String::new();
    push_member(&mut ids, "trace_id", trace_id);
    ids.push(',');
    push_member(&mut ids, "span_id", span_id);
    // The object is never empty: the JSON format adds the span's name after
    // its fields.
    ids.push(',');
    format!("{}{ids}{}", &line[..at], &line[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn json(&self) -> Vec<serde_json::Value> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
                .collect()
        }
    }

    /// The gateway's JSON log layer and its OpenTelemetry layer, writing to
    /// `lines`, with the spans' contexts from a provider without exporter.
    fn logging_to(lines: &Lines) -> impl Subscriber + Send + Sync {
        let writer = lines.clone();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = DispatchHandle::default();
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(subscriber.clone())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || writer.clone())
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .fmt_fields(LogSpanFields)
                    .map_event_format(|json| {
                        WithTraceIds::new(json, IdsAt::SpanObject, subscriber)
                    }),
            )
    }

    #[test]
    fn json_lines_carry_the_picked_fields_and_the_ids_of_their_span() {
        let lines = Lines::default();
        let (mut request_ids, mut handler_ids) = (None, None);
        tracing::subscriber::with_default(logging_to(&lines), || {
            let request = tracing::info_span!(
                "request",
                http.route = "/api",
                request_id = "a \"span\":{ \\ id\n",
                size = tracing::field::Empty,
            );
            // Not picked: leaves the object as it was.
            request.record("size", 42);
            request.in_scope(|| tracing::info!(note = "\"span\":{x}", "inside"));
            let handler = tracing::info_span!(parent: &request, "handler", handler = "ip_enrich");
            // Logged from outside the span, naming it: its ids, not the
            // current span's.
            tracing::warn!(parent: &handler, "named parent");
            let bare = tracing::info_span!("bare", count = 3);
            bare.record("count", 4);
            bare.in_scope(|| tracing::info!("in a span without picked fields"));
            tracing::info!("outside any span");
            for (span, ids) in [(&request, &mut request_ids), (&handler, &mut handler_ids)] {
                let context = tracing_opentelemetry::OpenTelemetrySpanExt::context(span);
                let span = context.span();
                let context = span.span_context();
                *ids = Some((
                    context.trace_id().to_string(),
                    context.span_id().to_string(),
                ));
            }
        });
        let (request_trace, request_span) = request_ids.unwrap();
        let (handler_trace, handler_span) = handler_ids.unwrap();
        assert_eq!(request_trace, handler_trace, "one trace");
        assert_ne!(request_span, handler_span);

        let lines = lines.json();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(
            lines[0]["span"],
            serde_json::json!({
                "trace_id": request_trace,
                "span_id": request_span,
                "request_id": "a \"span\":{ \\ id\n",
                "name": "request",
            }),
        );
        assert_eq!(lines[0]["note"], "\"span\":{x}");
        assert_eq!(
            lines[1]["span"],
            serde_json::json!({
                "trace_id": handler_trace,
                "span_id": handler_span,
                "handler": "ip_enrich",
                "name": "handler",
            }),
        );
        assert_eq!(lines[2]["span"]["name"], "bare");
        assert_eq!(
            lines[2]["span"].as_object().unwrap().len(),
            3,
            "ids and name"
        );
        assert_eq!(lines[3]["message"], "outside any span");
        assert!(lines[3].get("span").is_none());
    }

    #[test]
    fn a_json_line_without_a_span_object_is_left_alone() {
        let ids = [
            "0af7651916cd43dd8448eb211c80319c".to_owned(),
            "b7ad6b7169203331".to_owned(),
        ];
        assert_eq!(
            in_span_object("{\"message\":\"no span\"}\n", &ids),
            "{\"message\":\"no span\"}\n"
        );
    }

    /// Pretty lines start with the ids and keep their colours; the SDK's own
    /// events get no ids.
    #[test]
    fn pretty_lines_start_with_the_ids_in_colour() {
        let lines = Lines::default();
        let writer = lines.clone();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = DispatchHandle::default();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(subscriber.clone())
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || writer.clone())
                    .with_ansi(true)
                    .map_event_format(|pretty| {
                        WithTraceIds::new(pretty, IdsAt::LineStart, subscriber)
                    }),
            );
        let mut ids = String::new();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request");
            span.in_scope(|| {
                tracing::info!("inside");
                tracing::info!(target: "opentelemetry_sdk", "the SDK's own");
            });
            let context = tracing_opentelemetry::OpenTelemetrySpanExt::context(&span);
            let span = context.span();
            let context = span.span_context();
            ids = format!(
                "trace_id={} span_id={} ",
                context.trace_id(),
                context.span_id()
            );
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with(&ids), "{text}");
        assert!(lines[0].contains('\x1b'), "colours kept: {text:?}");
        assert!(!lines[1].contains("trace_id="), "{text}");
        assert!(lines[1].contains("the SDK's own"), "{text}");
    }
}
