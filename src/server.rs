//! The HTTP side: routes, per-request middleware, and the application's
//! life from bind to graceful drain.
//!
//! Routes:
//! * `POST /api/v1/upload`: read the body (`upload_body`), run the pipeline
//!   chain, answer with a part per event;
//! * `GET /healthz`: 200 while the process runs;
//! * `GET /readyz`: 200 when Kafka answers a metadata request and the GeoIP
//!   database is loaded, else 503 with the reason;
//! * `GET /metrics`: Prometheus text.
//!
//! Shutdown follows mini-redis: a signal stops the accept loop, every
//! connection is told to finish (requests in flight run to completion, Kafka
//! acknowledgements included), then the producer is flushed, all within
//! `server.shutdown_grace_ms`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder as HttpBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tracing::{field, Instrument};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::Settings;
use crate::geoip::GeoIp;
use crate::kafka::{KafkaSink, ProducerStatistics};
use crate::metrics::{Metrics, UploadType};
use crate::pipeline::ip_enrich::IpEnrich;
use crate::pipeline::split_and_validate::SplitAndValidate;
use crate::pipeline::write_kafka::WriteKafka;
use crate::pipeline::{Chain, UploadContext, UploadRequest};
use crate::telemetry::{self, Metering};
use crate::upload_body::read_document;
use crate::wire::Reply;

pub const UPLOAD_ROUTE: &str = "/api/v1/upload";
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every request handler shares.
#[derive(Clone)]
struct AppState {
    chain: Arc<Chain>,
    sink: Arc<KafkaSink>,
    geoip: Arc<GeoIp>,
    metrics: Metrics,
    metering: Arc<Metering>,
    in_flight: Arc<Semaphore>,
    max_body_bytes: usize,
    body_timeout: Duration,
    client_ip_header: Option<HeaderName>,
    readiness: Arc<ReadinessCache>,
    /// Keeps the observable instruments (and their callbacks) alive.
    _gauges: Arc<Gauges>,
}

/// The request id of a request: its `X-Request-ID`, or a generated one.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// A bound, ready-to-run gateway.
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    shutdown_grace: Duration,
    header_read_timeout: Duration,
    max_connections: usize,
}

impl Application {
    /// Opens the GeoIP database, creates the producer and binds the listener.
    /// Kafka need not be up: readiness says so until it is.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let geoip = Arc::new(GeoIp::open(&settings.geoip.database)?);
        let sink = Arc::new(KafkaSink::new(&settings.kafka)?);
        let metering = Arc::new(Metering::new(&settings.telemetry)?);
        let metrics = Metrics::new(
            &metering.provider,
            &settings.categories,
            settings.telemetry.max_metric_categories,
        );
        let gauges = Arc::new(register_gauges(&metering, &sink));

        let chain = Chain::new(vec![
            Box::new(SplitAndValidate::new(
                settings.server.max_events_per_batch,
                &settings.categories,
            )),
            Box::new(IpEnrich::new(geoip.clone(), metrics.clone())),
            Box::new(WriteKafka::new(sink.clone(), metrics.clone())),
        ]);
        let client_ip_header = match settings.server.client_ip_header.trim() {
            "" => None,
            name => Some(HeaderName::try_from(name).map_err(|e| {
                anyhow::anyhow!("configuration key `server.client_ip_header`: {e}")
            })?),
        };
        let state = AppState {
            chain: Arc::new(chain),
            sink,
            geoip,
            metrics,
            metering,
            in_flight: Arc::new(Semaphore::new(settings.server.max_in_flight_requests)),
            max_body_bytes: settings.server.max_body_bytes,
            body_timeout: Duration::from_millis(settings.server.body_timeout_ms),
            client_ip_header,
            readiness: Arc::new(ReadinessCache::default()),
            _gauges: gauges,
        };
        let router = router(state.clone(), settings.server.max_body_bytes);
        let listener = listen(settings.listen_addr())?;
        Ok(Self {
            listener,
            router,
            state,
            shutdown_grace: Duration::from_millis(settings.server.shutdown_grace_ms),
            header_read_timeout: Duration::from_millis(settings.server.header_read_timeout_ms),
            max_connections: settings.server.max_connections,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes, then drains: in-flight requests
    /// finish, queued Kafka messages are flushed.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let Self {
            listener,
            router,
            state,
            shutdown_grace,
            header_read_timeout,
            max_connections,
        } = self;
        let connections = GracefulShutdown::new();
        accept_until(
            listener,
            router,
            header_read_timeout,
            max_connections,
            &connections,
            shutdown,
        )
        .await;

        // One deadline for the whole drain: connections, then the producer.
        tracing::info!("shutdown requested: draining in-flight uploads");
        let deadline = tokio::time::Instant::now() + shutdown_grace;
        if tokio::time::timeout_at(deadline, connections.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("in-flight uploads did not finish within the shutdown grace");
        }
        let sink = state.sink.clone();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let flushed = tokio::task::spawn_blocking(move || sink.flush(left)).await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "Kafka producer did not flush every message");
        }
        tracing::info!("stopped");
    }
}

/// Accepts connections until `shutdown` completes, serving each on its own
/// task. hyper's HTTP/1 header timeout needs a timer, which `axum::serve`
/// does not give it: without one a client that never finishes its request
/// headers holds a connection for ever.
async fn accept_until(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    max_connections: usize,
    connections: &GracefulShutdown,
    shutdown: impl Future<Output = ()>,
) {
    let mut make_service = router.into_make_service_with_connect_info::<SocketAddr>();
    // HTTP/1 only: SDKs upload over HTTP/1.1, and with only one protocol the
    // header timer runs from the first byte (detecting the version first
    // would wait on a silent client for ever).
    let mut http = HttpBuilder::new(TokioExecutor::new()).http1_only();
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let open = Arc::new(Semaphore::new(max_connections));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_resource_exhaustion(&error) => {
                    // Out of file descriptors or memory: wait, don't spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                // Aborted or reset before we accepted it: nothing to do.
                Err(_) => continue,
            },
            _ = &mut shutdown => return,
        };
        // Past the connection limit, close at once: file descriptors and
        // per-connection buffers stay bounded.
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection limit reached, closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok(service) = make_service.call(peer).await;
        let service = TowerToHyperService::new(
            service.map_request(|request: Request<Incoming>| request.map(axum::body::Body::new)),
        );
        let connection = http
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

fn is_resource_exhaustion(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Connections the kernel queues before the gateway accepts them. The
/// default of `TcpListener::bind` (128) overflows under a burst of new
/// connections, which clients then see as seconds of SYN retries instead of a
/// quick answer (a 503 from load shedding, if it comes to that).
const LISTEN_BACKLOG: u32 = 4096;

fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

fn router(state: AppState, max_body_bytes: usize) -> Router {
    // Multipart framing adds a little around the batch part; the document
    // itself is held to `max_body_bytes` by `upload_body`.
    let wire_limit = max_body_bytes.saturating_add(64 * 1024);
    let upload = Router::new().route(UPLOAD_ROUTE, post(upload)).route_layer(
        middleware::from_fn_with_state(state.clone(), http_server_span),
    );
    Router::new()
        .merge(upload)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(wire_limit))
        .layer(CatchPanicLayer::custom(panic_reply))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Takes `X-Request-ID` (when it is sane) or makes one, and echoes it.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    response
}

/// Decrements the in-flight gauge however the request ends (a client that
/// disconnects drops the future).
struct ActiveRequest(Metrics);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// The server span of a request, child of the caller's trace context, with
/// the HTTP semantic-convention attributes; and the request metrics.
async fn http_server_span(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| request.uri().path().to_owned());
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let body_size = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let span = tracing::info_span!(
        target: "venus::http",
        "request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = field::Empty,
        http.request.method = %method,
        http.route = %route,
        url.path = %request.uri().path(),
        url.scheme = "http",
        client.address = field::Empty,
        client.port = field::Empty,
        http.request.body.size = field::Empty,
        http.response.status_code = field::Empty,
        request_id = %request_id,
        trace_id = field::Empty,
        span_id = field::Empty,
    );
    if let Some(peer) = peer {
        span.record("client.address", field::display(peer.ip()));
        span.record("client.port", i64::from(peer.port()));
    }
    if let Some(size) = body_size {
        span.record("http.request.body.size", size);
    }
    let _ = span.set_parent(telemetry::extract_parent(request.headers()));
    telemetry::record_ids(&span);

    state.metrics.request_started();
    let _active = ActiveRequest(state.metrics.clone());
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    state.metrics.request_duration(
        started.elapsed().as_secs_f64(),
        &method,
        &route,
        status.as_u16(),
    );
    response
}

/// The client's address: the last entry of the configured header (the one
/// the gateway's own proxy appended; earlier entries are whatever the client
/// sent, so trusting them would let it pick its location), else the peer.
fn client_ip(headers: &HeaderMap, peer: IpAddr, header: Option<&HeaderName>) -> IpAddr {
    header
        .and_then(|name| headers.get_all(name).iter().next_back())
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|last| last.trim().parse::<IpAddr>().ok())
        .unwrap_or(peer)
}

async fn upload(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    request: Request,
) -> Response {
    state.metrics.upload(UploadType::All);
    // Shed load instead of queueing: a bounded number of bodies in memory.
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        state.metrics.upload(UploadType::Overloaded);
        // A 503 reply carries Retry-After.
        return Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is at its limit of uploads in flight; retry later",
        )
        .into_response();
    };
    let client_ip = client_ip(
        request.headers(),
        peer.ip(),
        state.client_ip_header.as_ref(),
    );
    let read = tokio::time::timeout(
        state.body_timeout,
        read_document(request, state.max_body_bytes),
    )
    .await
    .unwrap_or_else(|_| {
        Err(Reply::error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {} ms",
                state.body_timeout.as_millis()
            ),
        ))
    });
    let document = match read {
        Ok(document) => document,
        Err(reply) => {
            state.metrics.record_upload(None, &reply);
            return reply.into_response();
        }
    };
    let mut ctx = UploadContext::new(UploadRequest {
        request_id,
        client_ip,
        document,
    });
    let reply = state.chain.run(&mut ctx).await;
    let category = ctx.batch.as_ref().map(|b| b.category.as_str());
    state.metrics.record_upload(category, &reply);
    reply.into_response()
}

/// 200 while the process can do its job; 503 once the producer hit a fatal
/// error (an idempotent producer can, and then fails every message until
/// the process restarts: a liveness probe should restart it).
async fn healthz(State(state): State<AppState>) -> Response {
    match state.sink.fatal_error() {
        None => (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"status":"ok"}"#,
        )
            .into_response(),
        Some(reason) => {
            let body = sonic_rs::json!({"status": "failed", "reason": reason}).to_string();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
    }
}

/// The body of `/readyz`.
#[derive(serde::Serialize)]
struct Readiness<'a> {
    status: &'static str,
    kafka: &'static str,
    /// The loaded database's type, e.g. `GeoLite2-City`.
    geoip: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a String>,
}

/// How long a Kafka readiness answer is reused: probes in a burst share one
/// metadata request (and one blocking thread) instead of one each.
const READINESS_TTL: Duration = Duration::from_secs(1);

/// The last Kafka readiness answer and when it was taken.
type ReadinessCache = tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>;

async fn kafka_readiness(state: &AppState) -> Result<(), String> {
    if let Some(reason) = state.sink.fatal_error() {
        return Err(reason);
    }
    // Held across the check: concurrent probes wait for the one in flight.
    let mut cached = state.readiness.lock().await;
    if let Some((taken, answer)) = cached.as_ref() {
        if taken.elapsed() < READINESS_TTL {
            return answer.clone();
        }
    }
    let sink = state.sink.clone();
    let answer = tokio::task::spawn_blocking(move || sink.check_reachable(Duration::from_secs(2)))
        .await
        .unwrap_or_else(|e| Err(format!("readiness check failed: {e}")));
    *cached = Some((Instant::now(), answer.clone()));
    answer
}

async fn readyz(State(state): State<AppState>) -> Response {
    let kafka = kafka_readiness(&state).await;
    let geoip = state.geoip.database_type();
    let (status, body) = match &kafka {
        Ok(()) => (
            StatusCode::OK,
            Readiness {
                status: "ready",
                kafka: "reachable",
                geoip,
                reason: None,
            },
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Readiness {
                status: "not ready",
                kafka: "unreachable",
                geoip,
                reason: Some(reason),
            },
        ),
    };
    let body = sonic_rs::to_string(&body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metering.render(),
    )
        .into_response()
}

/// A bug must cost one request a 500, not its connection (or the process).
fn panic_reply(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    Reply::error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; the gateway's log has the details",
    )
    .into_response()
}

async fn method_not_allowed() -> Response {
    Reply::error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; uploads go to POST {UPLOAD_ROUTE}"),
    )
    .into_response()
}

async fn not_found() -> Response {
    Reply::error(
        StatusCode::NOT_FOUND,
        format!("no such route; uploads go to POST {UPLOAD_ROUTE}"),
    )
    .into_response()
}

/// A counter that reads one of librdkafka's statistics totals.
fn statistics_counter(
    meter: &opentelemetry::metrics::Meter,
    sink: &Arc<KafkaSink>,
    name: &'static str,
    description: &'static str,
    pick: fn(&ProducerStatistics) -> &AtomicU64,
) -> opentelemetry::metrics::ObservableCounter<u64> {
    let sink = Arc::downgrade(sink);
    meter
        .u64_observable_counter(name)
        .with_description(description)
        .with_callback(move |observer| {
            if let Some(sink) = sink.upgrade() {
                observer.observe(pick(sink.statistics()).load(Ordering::Relaxed), &[]);
            }
        })
        .build()
}

/// Instruments read at collection time.
struct Gauges {
    _queue: opentelemetry::metrics::ObservableGauge<i64>,
    _tx_errors: opentelemetry::metrics::ObservableCounter<u64>,
    _tx_retries: opentelemetry::metrics::ObservableCounter<u64>,
    _dropped_spans: opentelemetry::metrics::ObservableCounter<u64>,
}

/// The producer's queue depth, librdkafka's transmission errors and
/// retries, and the spans lost on export.
fn register_gauges(metering: &Metering, sink: &Arc<KafkaSink>) -> Gauges {
    use opentelemetry::metrics::MeterProvider;
    let meter = metering.provider.meter("venus");
    let queue_sink = Arc::downgrade(sink);
    let gauge = meter
        .i64_observable_gauge("venus.kafka.producer.queue.messages")
        .with_description("Messages in the producer's queue, not yet acknowledged")
        .with_callback(move |observer| {
            if let Some(sink) = queue_sink.upgrade() {
                observer.observe(sink.queue_depth(), &[]);
            }
        })
        .build();
    let tx_errors = statistics_counter(
        &meter,
        sink,
        "venus.kafka.broker.tx_errors",
        "Broker requests that failed to transmit (librdkafka statistics)",
        |statistics| &statistics.tx_errors,
    );
    let tx_retries = statistics_counter(
        &meter,
        sink,
        "venus.kafka.broker.tx_retries",
        "Broker requests that were retried (librdkafka statistics)",
        |statistics| &statistics.tx_retries,
    );
    let dropped = meter
        .u64_observable_counter("venus.telemetry.dropped_spans")
        .with_description("Spans lost because their export to the collector failed")
        .with_callback(|observer| observer.observe(telemetry::dropped_spans(), &[]))
        .build();
    Gauges {
        _queue: gauge,
        _tx_errors: tx_errors,
        _tx_retries: tx_retries,
        _dropped_spans: dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_address_is_the_last_one_the_proxy_appended() {
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        let name = HeaderName::from_static("x-forwarded-for");
        let mut headers = HeaderMap::new();
        headers.insert(&name, HeaderValue::from_static("1.2.3.4, 81.2.69.142"));
        assert_eq!(
            client_ip(&headers, peer, Some(&name)),
            "81.2.69.142".parse::<IpAddr>().unwrap()
        );
        // Not configured: the peer, whatever the header says.
        assert_eq!(client_ip(&headers, peer, None), peer);
        // Garbage in the header: the peer.
        headers.insert(&name, HeaderValue::from_static("1.2.3.4, nonsense"));
        assert_eq!(client_ip(&headers, peer, Some(&name)), peer);
    }
}
