//! Traces, logs and the plumbing of metrics.
//!
//! * Tracing: `tracing` spans bridged to OpenTelemetry by
//!   `tracing-opentelemetry`, sampled parent-based, exported over OTLP/HTTP
//!   through a bounded batch queue when an endpoint is configured. Export never
//!   blocks an upload; spans whose export failed are counted.
//! * Propagation: W3C `traceparent`/`tracestate` and `baggage`, read from the
//!   request and written into every Kafka message.
//! * Logs: `tracing-subscriber`, JSON or pretty; lines inside a request carry
//!   the `trace_id` and `span_id` of the span they were logged in
//!   ([`log_lines`]).
//! * Metrics: a meter provider per application, read by the Prometheus
//!   registry behind `/metrics` and, with an endpoint, pushed over OTLP.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::baggage::BaggageExt;
use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{LogFormat, TelemetrySettings};

mod log_lines;

use log_lines::{DispatchHandle, IdsAt, LogSpanFields, WithTraceIds};

/// Spans lost on the way to the collector, since the process started.
static DROPPED_SPANS: AtomicU64 = AtomicU64::new(0);

pub fn dropped_spans() -> u64 {
    DROPPED_SPANS.load(Ordering::Relaxed)
}

/// W3C trace context plus W3C baggage.
fn propagator() -> &'static TextMapCompositePropagator {
    static PROPAGATOR: OnceLock<TextMapCompositePropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(|| {
        TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ])
    })
}

/// Largest incoming `tracestate` and `baggage` carried on. Both are copied
/// into the headers of every event's Kafka message, so a caller could
/// otherwise multiply a few KB of headers by a thousand events. The bounds
/// are W3C's: a `tracestate` of up to 512 characters must be propagated (it
/// may be dropped beyond), `baggage` is limited to 8192 bytes.
pub const MAX_TRACESTATE_BYTES: usize = 512;
pub const MAX_BAGGAGE_BYTES: usize = 8192;

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let limit = match key {
            "tracestate" => MAX_TRACESTATE_BYTES,
            "baggage" => MAX_BAGGAGE_BYTES,
            _ => usize::MAX,
        };
        self.0
            .get(key)
            .filter(|v| v.len() <= limit)
            .and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The trace context (and baggage) a request carries; empty when none.
pub fn extract_parent(headers: &HeaderMap) -> Context {
    propagator().extract(&HeaderExtractor(headers))
}

/// The trace context (and baggage) found by any extractor, e.g. the headers
/// of a Kafka message read by the ingester.
///
/// The ingester calls this for every message, and nearly every message
/// carries only a `traceparent` in the canonical form its gateway wrote:
/// that case is parsed here directly, to the same context the propagators
/// give, without their splitting, allocating and three header lookups.
/// Anything else (other versions, `tracestate`, `baggage`, upper case,
/// whitespace) goes through the propagators.
pub fn extract_with(extractor: &dyn Extractor) -> Context {
    if extractor.get("tracestate").is_none() && extractor.get("baggage").is_none() {
        if let Some(span) = extractor.get("traceparent").and_then(canonical_traceparent) {
            return Context::current().with_remote_span_context(span);
        }
    }
    propagator().extract(extractor)
}

/// A `traceparent` of version `00` in lower-case hex with non-zero ids, as
/// a remote span context (the sampled flag kept, other flags cleared, as the
/// W3C propagator does); `None` for anything else.
fn canonical_traceparent(value: &str) -> Option<SpanContext> {
    let bytes = value.as_bytes();
    let lower_hex = |part: &[u8]| part.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if bytes.len() != 55
        || !bytes.starts_with(b"00-")
        || bytes[35] != b'-'
        || bytes[52] != b'-'
        || !lower_hex(&bytes[3..35])
        || !lower_hex(&bytes[36..52])
        || !lower_hex(&bytes[53..55])
    {
        return None;
    }
    let trace_id = TraceId::from_hex(&value[3..35]).ok()?;
    let span_id = SpanId::from_hex(&value[36..52]).ok()?;
    let flags = u8::from_str_radix(&value[53..55], 16).ok()?;
    let span = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    span.is_valid().then_some(span)
}

struct VecInjector(Vec<(&'static str, String)>);

impl Injector for VecInjector {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            // The propagator writes an empty `tracestate` when there is none.
            return;
        }
        let key = match key {
            "traceparent" => "traceparent",
            "tracestate" => "tracestate",
            "baggage" => "baggage",
            _ => return,
        };
        self.0.push((key, value));
    }
}

/// The propagation headers for a message produced inside the current span:
/// `traceparent` naming the current span, `tracestate` when the trace has
/// one, and `baggage` only when the caller sent baggage of its own (then
/// with `request_id` added to it).
///
/// Why not always `baggage`: librdkafka allocates and frees every header of
/// every message on its own, so a header per message that says nothing new
/// (the request id has a header of its own) costs about 4% of the gateway's
/// CPU per event (docs/BENCHMARKS.md, issue 12).
pub fn propagation_headers(request_id: &str) -> Vec<(&'static str, String)> {
    let context = tracing::Span::current().context();
    let mut baggage: Vec<KeyValue> = context
        .baggage()
        .iter()
        .filter(|(key, _)| key.as_str() != "request_id")
        .map(|(key, (value, _))| KeyValue::new(key.clone(), value.clone()))
        .collect();
    let mut injector = VecInjector(Vec::with_capacity(3));
    if baggage.is_empty() {
        if context.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&context, &mut injector);
        }
        return injector.0;
    }
    baggage.push(KeyValue::new("request_id", request_id.to_owned()));
    let context = context.with_baggage(baggage);
    if context.span().span_context().is_valid() {
        propagator().inject_context(&context, &mut injector);
    } else {
        // No trace (tracing not initialised): still hand on the baggage.
        BaggagePropagator::new().inject_context(&context, &mut injector);
    }
    injector.0
}

/// One export-failure line a second at most.
static EXPORT_ERROR_LOG: RateLimitedLog = RateLimitedLog::new();

/// The OTLP exporters' HTTP client: reqwest's, plus a log line with the
/// whole cause of a failed request (a certificate that does not verify, a
/// refused connection), which the exporter itself reduces to "network
/// error". Once a second at most.
#[derive(Debug)]
struct OtlpHttpClient(reqwest_otlp::blocking::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let uri = request.uri().to_string();
        let result = self.0.send_bytes(request).await;
        if let Err(error) = &result {
            if EXPORT_ERROR_LOG.allow().is_some() {
                let mut cause = error.to_string();
                let mut source = error.source();
                while let Some(next) = source {
                    cause.push_str(": ");
                    cause.push_str(&next.to_string());
                    source = next.source();
                }
                let (cause, uri) = (
                    crate::secret::redact_urls(&cause),
                    crate::secret::redact_urls(&uri),
                );
                tracing::warn!(error = %cause, %uri, "OTLP export failed; what it carried is dropped");
            }
        }
        result
    }
}

/// An exporter that counts the spans of every batch it failed to deliver.
#[derive(Debug)]
struct CountingExporter<E>(E);

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let count = batch.len() as u64;
        let result = self.0.export(batch).await;
        if result.is_err() {
            DROPPED_SPANS.fetch_add(count, Ordering::Relaxed);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource)
    }
}

/// The OTLP base URL: the configured one, else `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub fn otlp_endpoint(settings: &TelemetrySettings) -> Option<String> {
    let configured = settings.otlp_endpoint.trim();
    let endpoint = if configured.is_empty() {
        std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default()
    } else {
        configured.to_owned()
    };
    let endpoint = endpoint.trim().trim_end_matches('/').to_owned();
    (!endpoint.is_empty()).then_some(endpoint)
}

/// `service.name`: the configured one, else `OTEL_SERVICE_NAME`, else `venus`.
pub fn service_name(settings: &TelemetrySettings) -> String {
    [
        settings.service_name.clone(),
        std::env::var("OTEL_SERVICE_NAME").unwrap_or_default(),
    ]
    .into_iter()
    .map(|name| name.trim().to_owned())
    .find(|name| !name.is_empty())
    .unwrap_or_else(|| "venus".to_owned())
}

pub fn resource(settings: &TelemetrySettings) -> Resource {
    Resource::builder()
        .with_service_name(service_name(settings))
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("deployment.environment", settings.environment.clone()),
            KeyValue::new("deployment.environment.name", settings.environment.clone()),
        ])
        .build()
}

/// The OTLP exporters' HTTP client, with the TLS of [`crate::tls`] (the
/// system's roots plus `telemetry.otlp_ca_file`). A blocking client, as the
/// exporters run on their own threads; built on a thread of its own, since
/// it runs a runtime inside and must not be made or dropped on a Tokio
/// worker.
fn otlp_http_client(settings: &TelemetrySettings) -> anyhow::Result<OtlpHttpClient> {
    let tls =
        crate::tls::client_config("telemetry.otlp_ca_file", settings.otlp_ca_file.as_deref())?;
    let client = std::thread::spawn(move || {
        reqwest_otlp::blocking::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(10))
            .build()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("building the OTLP HTTP client panicked"))??;
    Ok(OtlpHttpClient(client))
}

/// Builds the tracer provider: parent-based sampling, and an OTLP/HTTP batch
/// exporter when an endpoint is configured.
pub fn tracer_provider(settings: &TelemetrySettings) -> anyhow::Result<SdkTracerProvider> {
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource(settings))
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sampling_ratio,
        ))));
    if let Some(endpoint) = otlp_endpoint(settings) {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(otlp_http_client(settings)?)
            .with_endpoint(format!("{endpoint}/v1/traces"))
            .with_timeout(Duration::from_secs(5))
            .with_headers(HashMap::new())
            .build()?;
        let processor = BatchSpanProcessor::builder(CountingExporter(exporter))
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(settings.span_queue_size)
                    .with_scheduled_delay(Duration::from_secs(1))
                    .build(),
            )
            .build();
        builder = builder.with_span_processor(processor);
    }
    Ok(builder.build())
}

/// Owns the tracer provider and the log writer; [`TracingGuard::shutdown`]
/// flushes what is queued of both.
pub struct TracingGuard {
    provider: SdkTracerProvider,
    _logs: LogGuard,
}

/// Keeps the log writer's thread alive; dropping it writes out what is
/// buffered.
pub struct LogGuard(#[allow(dead_code)] tracing_appender::non_blocking::WorkerGuard);

/// Log lines buffered for the writer thread; beyond this, lines are dropped
/// rather than making a request wait on a slow stdout (a full pipe to a
/// stalled log collector would otherwise block tokio's workers).
const LOG_BUFFER_LINES: usize = 64 * 1024;

impl TracingGuard {
    /// A tracer of the installed provider, for spans made with the
    /// OpenTelemetry API directly (the ingester's span per message) rather
    /// than through `tracing`.
    pub fn tracer(&self, name: &'static str) -> opentelemetry_sdk::trace::SdkTracer {
        self.provider.tracer(name)
    }

    pub fn shutdown(self) {
        let _ = self.provider.shutdown();
    }
}

/// Installs the global `tracing` subscriber: the log layer filtered by
/// `log_level`, and the OpenTelemetry layer, which sees the gateway's own
/// spans whatever the log level.
pub fn init_tracing(settings: &TelemetrySettings) -> anyhow::Result<TracingGuard> {
    let provider = tracer_provider(settings)?;
    let logs = install_subscriber(settings, &provider)?;
    Ok(TracingGuard {
        provider,
        _logs: logs,
    })
}

/// Installs the subscriber around an existing provider (tests bring their
/// own, with an in-memory exporter). Log lines are written to stdout by a
/// thread of their own, never by the task that logs.
pub fn install_subscriber(
    settings: &TelemetrySettings,
    provider: &SdkTracerProvider,
) -> anyhow::Result<LogGuard> {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("venus-log")
        .finish(std::io::stdout());
    let tracer = provider.tracer("venus");
    // tracing-opentelemetry adds, by default, eight attributes to every
    // span: `code.filepath`, `code.namespace`, `code.lineno`, `thread.id`,
    // `thread.name`, `target`, `busy_ns`, `idle_ns`. For async handler spans
    // the thread is whichever worker polled first, and the span's name
    // already says which handler it is; the busy/idle times cost two clock
    // reads on every poll. Left out: recording and exporting them was a good
    // part of what OTLP export costs per event (docs/BENCHMARKS.md).
    //
    // Nor does it make each span OpenTelemetry's current context while the
    // span is entered: that attached and detached a context at every poll
    // of every instrumented future, two spans deep in a handler. Nothing
    // here reads `opentelemetry::Context::current()` for a span; parents
    // come from the `tracing` span tree and `propagation_headers` asks the
    // `tracing` span (docs/BENCHMARKS.md, change 22).
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(Targets::new().with_target("venus", tracing::Level::INFO));
    let filter = EnvFilter::try_new(&settings.log_level)?;
    let subscriber = DispatchHandle::default();
    let logs = match settings.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(LogSpanFields)
            .map_event_format(|json| WithTraceIds::new(json, IdsAt::SpanObject, subscriber.clone()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .map_event_format(|pretty| {
                WithTraceIds::new(pretty, IdsAt::LineStart, subscriber.clone())
            })
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(otel)
        .with(subscriber)
        .with(logs)
        .try_init()?;
    Ok(LogGuard(guard))
}

/// At most one line a second for a warning that can repeat per request
/// (Kafka trouble fails every upload at once): the first of each second is
/// logged with how many were held back since, the rest are not. Lock-free.
pub struct RateLimitedLog {
    /// The second (since the process started) of the last line let through.
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    pub const fn new() -> Self {
        Self {
            last_second: AtomicU64::new(u64::MAX),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last line)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        let second = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs();
        let last = self.last_second.load(Ordering::Relaxed);
        if last != second
            && self
                .last_second
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-application metrics plumbing: the SDK provider and the Prometheus
/// registry it fills.
pub struct Metering {
    pub provider: SdkMeterProvider,
    pub registry: prometheus::Registry,
}

impl Metering {
    pub fn new(settings: &TelemetrySettings) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let prometheus_reader = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .build()?;
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource(settings))
            .with_reader(prometheus_reader);
        if settings.otlp_metrics {
            if let Some(endpoint) = otlp_endpoint(settings) {
                use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
                let exporter = opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_http_client(otlp_http_client(settings)?)
                    .with_endpoint(format!("{endpoint}/v1/metrics"))
                    .with_timeout(Duration::from_secs(5))
                    .build()?;
                let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
                    .with_interval(Duration::from_millis(settings.metrics_interval_ms))
                    .build();
                builder = builder.with_reader(reader);
            }
        }
        Ok(Self {
            provider: builder.build(),
            registry,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# error encoding metrics: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limited_log_lets_one_line_through_a_second() {
        let log = RateLimitedLog::new();
        assert_eq!(log.allow(), Some(0));
        for _ in 0..99 {
            assert_eq!(log.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(log.allow(), Some(99), "the held-back lines are counted");
        assert_eq!(log.allow(), None);
    }

    struct Pairs<'a>(&'a [(&'a str, &'a str)]);

    impl Extractor for Pairs<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
        }

        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| *k).collect()
        }
    }

    #[test]
    fn the_fast_traceparent_path_extracts_what_the_propagators_do() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let span = "00f067aa0ba902b7";
        let zeros32 = "0".repeat(32);
        let zeros16 = "0".repeat(16);
        let values = [
            format!("00-{trace}-{span}-01"),
            format!("00-{trace}-{span}-00"),
            format!("00-{trace}-{span}-ff"),
            format!("00-{trace}-{span}-03"),
            format!("00-{}-{span}-01", trace.to_uppercase()),
            format!("00-{trace}-{}-01", span.to_uppercase()),
            format!("00-{zeros32}-{span}-01"),
            format!("00-{trace}-{zeros16}-01"),
            format!("01-{trace}-{span}-01"),
            format!("01-{trace}-{span}-01-extra"),
            format!("00-{trace}-{span}-01-extra"),
            format!(" 00-{trace}-{span}-01"),
            format!("00-{trace}-{span}-0g"),
            format!("00_{trace}-{span}-01"),
            format!("00-{trace}x{span}-01"),
            "garbage".to_owned(),
            String::new(),
        ];
        for value in &values {
            for extra in [
                None,
                Some(("tracestate", "vendor=value")),
                Some(("baggage", "k=v")),
            ] {
                let mut headers = vec![("traceparent", value.as_str())];
                headers.extend(extra);
                let fast = extract_with(&Pairs(&headers));
                let slow = propagator().extract(&Pairs(&headers));
                assert_eq!(
                    fast.span().span_context(),
                    slow.span().span_context(),
                    "{headers:?}"
                );
                assert_eq!(fast.baggage().len(), slow.baggage().len(), "{headers:?}");
            }
        }
        let valid = extract_with(&Pairs(&[("traceparent", &values[0])]));
        let context = valid.span().span_context().clone();
        assert!(context.is_valid() && context.is_remote() && context.is_sampled());
        assert_eq!(context.trace_id().to_string(), trace);
        assert!(!extract_with(&Pairs(&[])).span().span_context().is_valid());
    }
}
