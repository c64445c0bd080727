//! The HTTP side: routes, per-request middleware, and the application's
//! life from bind to graceful drain.
//!
//! Routes:
//! * `POST /api/v1/upload`: read the body (`upload_body`), run the pipeline
//!   chain, answer with a part per event;
//! * `GET /healthz`: 200 while the process serves (liveness);
//! * `GET /readyz`: 200 when the gateway can deliver (recent deliveries did
//!   not keep failing, Kafka answers a metadata request) and is not shutting
//!   down, else 503 with the reason;
//! * `GET /metrics`: Prometheus text.
//!
//! Shutdown follows mini-redis, in the phases of [`crate::drain`]: on the
//! signal `/readyz` turns 503 for `server.shutdown_delay_ms`, then the accept
//! loop stops and every connection is told to finish (requests in flight run
//! to completion, Kafka acknowledgements included); shortly before
//! `server.shutdown_grace_ms` runs out, whatever is still in flight is
//! answered at once; then the producer is flushed.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt};
use tower_http::catch_panic::{CatchPanicLayer, ResponseForPanic};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::{field, Instrument};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::admission::{Account, MemoryBudget, MeteredBody, Refused};
use crate::apps::Apps;
use crate::client_ip::ClientIpResolver;
use crate::config::{CorsSettings, Settings};
use crate::connection::{self, Activity, Timeouts, WatchedIo};
use crate::drain::{Drain, DrainControl, Phase};
use crate::geoip::GeoIp;
use crate::kafka::{KafkaSink, ProducerStatistics};
use crate::metrics::{Metrics, UploadType};
use crate::peers::ConnectionShares;
use crate::pipeline::apply_privacy::ApplyPrivacy;
use crate::pipeline::authorize::{refusal_reply, Authorize};
use crate::pipeline::ip_enrich::IpEnrich;
use crate::pipeline::split_and_validate::{BatchLimits, SplitAndValidate};
use crate::pipeline::write_kafka::WriteKafka;
use crate::pipeline::{Chain, UploadContext, UploadRequest};
use crate::privacy::{AppPrivacy, Privacy, StoredIp};
use crate::telemetry::{self, Metering};
use crate::upload_body::read_document;
use crate::wire::Reply;

pub const UPLOAD_ROUTE: &str = "/api/v1/upload";
pub const OPENAPI_ROUTE: &str = "/api/v1/openapi.yaml";

/// The HTTP contract, machine-readable (OpenAPI 3.1), served as built in.
pub const OPENAPI: &str = include_str!("../docs/openapi.yaml");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every request handler shares, behind one `Arc`.
///
/// axum clones the state for each extractor and layer that takes it, four
/// times per upload, and drops each clone again. As a struct of a dozen
/// `Arc`s that was two dozen atomic operations per clone, on counters that
/// both workers write, so most of them missed the cache
/// (docs/BENCHMARKS.md). Behind one `Arc` a clone is one.
#[derive(Clone)]
struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Its fields need no `Arc` of their own unless something outside the
/// state holds them too (the producer, the GeoIP data, the semaphore whose
/// permits outlive a borrow).
struct Shared {
    chain: Chain,
    sink: Arc<KafkaSink>,
    geoip: Arc<GeoIp>,
    metrics: Metrics,
    metering: Metering,
    in_flight: Arc<Semaphore>,
    budget: MemoryBudget,
    max_body_bytes: usize,
    body_timeout: Duration,
    min_body_rate: u64,
    body_rate_grace: Duration,
    body_stall: Duration,
    client_ip: ClientIpResolver,
    readiness: ReadinessCache,
    drain: Drain,
    apps: Apps,
    /// The local spool, when `spool.enabled`.
    spool: Option<crate::spool::Spool>,
    /// Keeps the observable instruments (and their callbacks) alive.
    _gauges: Gauges,
}

/// The request id of a request: its `X-Request-ID`, or a generated one.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// A bound, ready-to-run gateway.
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    drain_control: DrainControl,
    shutdown_delay: Duration,
    shutdown_grace: Duration,
    connections: ConnectionLimits,
}

/// Loads the GeoIP files off the async threads: reading them into compact
/// tables (the default residency) walks every network, seconds for the
/// DB-IP pair.
async fn load_geoip(settings: &crate::config::GeoIpSettings) -> anyhow::Result<GeoIp> {
    let (paths, entries, residency) = (
        settings.database.clone(),
        settings.cache_entries,
        settings.residency,
    );
    let started = Instant::now();
    let geoip =
        tokio::task::spawn_blocking(move || GeoIp::open_with(&paths, entries, residency)).await??;
    let database = geoip.current();
    let files: Vec<&str> = database.files().map(|f| f.path.as_str()).collect();
    let compact_bytes: usize = database.files().filter_map(|f| f.compact_bytes).sum();
    tracing::info!(
        residency = residency.as_str(),
        files = %files.join(","),
        compact_bytes,
        took_ms = started.elapsed().as_millis() as u64,
        "GeoIP database loaded"
    );
    Ok(geoip)
}

/// What every connection is held to.
#[derive(Clone, Copy)]
struct ConnectionLimits {
    max_connections: usize,
    max_connections_per_peer: usize,
    timeouts: Timeouts,
    max_header_bytes: usize,
}

impl Application {
    /// Opens the GeoIP database, creates the producer and binds the listener.
    /// Kafka need not be up: readiness says so until it is.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Before the GeoIP load, which takes seconds: a SIGHUP from then on
        // is a reload once the reloaders run, not the end of the process.
        let (geoip_hangups, apps_hangups) = (crate::hangup::listen(), crate::hangup::listen());
        let geoip = Arc::new(load_geoip(&settings.geoip).await?);
        let metering = Metering::new(&settings.telemetry)?;
        let metrics = Metrics::new(
            &metering.provider,
            &settings.categories,
            settings.telemetry.max_metric_categories,
        );
        crate::geoip::reload::spawn(
            geoip.clone(),
            Duration::from_millis(settings.geoip.reload_interval_ms),
            metrics.clone(),
            geoip_hangups,
        );
        let sink = Arc::new(KafkaSink::new(&settings.kafka, metrics.clone())?);
        sink.start_healer();
        if settings.kafka.create_topics {
            create_topics(&settings).await;
        }
        let apps = Apps::new(settings.access_policy()?);
        metrics.seed_rate_limited(apps.load().listed());
        apps.spawn_housekeeping();
        if let Some(origin) = settings.origin.clone() {
            let loader: crate::apps::reload::Loader = Arc::new(move || {
                Settings::load_with_env(&origin.path, origin.env.clone())?.access_policy()
            });
            crate::apps::reload::spawn(apps.clone(), loader, metrics.clone(), apps_hangups);
        }
        let budget = MemoryBudget::new(
            settings.server.max_in_flight_bytes,
            settings.server.max_in_flight_bytes_per_client,
        );
        let spool = if settings.spool.enabled {
            Some(crate::spool::Spool::open(&settings.spool)?)
        } else {
            None
        };
        let gauges = register_gauges(&metering, &sink, &budget, &geoip, &apps, spool.as_ref());

        let (drain_control, drain) = DrainControl::new();
        if let Some(spool) = &spool {
            crate::spool::replay::spawn(spool.clone(), sink.clone(), drain.clone());
        }
        let limits = BatchLimits {
            max_events: settings.server.max_events_per_batch,
            max_meta_bytes: settings.server.max_meta_bytes,
        };
        let chain = Chain::new(vec![
            Box::new(SplitAndValidate::new(
                limits,
                &settings.categories,
                settings.reserved_category(),
            )),
            Box::new(Authorize::new(apps.clone(), metrics.clone())),
            Box::new(IpEnrich::new(geoip.clone(), metrics.clone())),
            Box::new(ApplyPrivacy),
            Box::new(WriteKafka::new(
                sink.clone(),
                metrics.clone(),
                drain.clone(),
                spool.clone(),
            )),
        ]);
        let client_ip = ClientIpResolver::new(
            &settings.server.trusted_proxies,
            &settings.server.client_ip_header,
            &settings.server.forwarding_header,
        )
        .map_err(|e| anyhow::anyhow!("configuration key `server.trusted_proxies`: {e}"))?;
        let state = AppState(Arc::new(Shared {
            chain,
            sink,
            geoip,
            metrics,
            metering,
            in_flight: Arc::new(Semaphore::new(settings.server.max_in_flight_requests)),
            budget,
            max_body_bytes: settings.server.max_body_bytes,
            body_timeout: Duration::from_millis(settings.server.body_timeout_ms),
            min_body_rate: settings.server.min_body_rate_bytes_per_sec,
            body_rate_grace: Duration::from_millis(settings.server.body_rate_grace_ms),
            body_stall: Duration::from_millis(settings.server.body_stall_timeout_ms),
            client_ip,
            readiness: ReadinessCache::default(),
            drain,
            apps,
            spool,
            _gauges: gauges,
        }));
        let cors = cors_layer(&settings.server.cors);
        let router = router(state.clone(), settings.server.max_body_bytes, cors);
        let listener = listen(settings.listen_addr())?;
        Ok(Self {
            listener,
            router,
            state,
            drain_control,
            shutdown_delay: Duration::from_millis(settings.server.shutdown_delay_ms),
            shutdown_grace: Duration::from_millis(settings.server.shutdown_grace_ms),
            connections: ConnectionLimits {
                max_connections: settings.server.max_connections,
                max_connections_per_peer: settings.server.max_connections_per_peer,
                timeouts: Timeouts {
                    idle: Duration::from_millis(settings.server.idle_timeout_ms),
                    head: Duration::from_millis(settings.server.header_read_timeout_ms),
                },
                max_header_bytes: settings.server.max_header_bytes,
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes, then drains (see the module doc):
    /// readiness first, then connections, then the producer.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let Self {
            listener,
            router,
            state,
            drain_control,
            shutdown_delay,
            shutdown_grace,
            connections: limits,
        } = self;
        let connections = GracefulShutdown::new();
        let stop_accepting = async {
            shutdown.await;
            drain_control.enter(Phase::Draining);
            tracing::info!(
                delay_ms = shutdown_delay.as_millis() as u64,
                "shutdown requested: /readyz answers 503 until the listener closes"
            );
            tokio::time::sleep(shutdown_delay).await;
        };
        let metrics = state.metrics.clone();
        accept_until(
            listener,
            router,
            limits,
            &metrics,
            &connections,
            stop_accepting,
        )
        .await;

        // One deadline for the whole drain. Shortly before it, whatever is
        // still in flight is answered, so that no client loses its reply.
        tracing::info!("listener closed: draining in-flight uploads");
        let deadline = tokio::time::Instant::now() + shutdown_grace;
        let answer_margin = (shutdown_grace / 4).min(Duration::from_secs(1));
        let finished = connections.shutdown();
        tokio::pin!(finished);
        let answered = tokio::select! {
            _ = &mut finished => true,
            _ = tokio::time::sleep_until(deadline - answer_margin) => false,
        };
        if !answered {
            tracing::warn!(
                "uploads still in flight as the shutdown grace ends: answering them now"
            );
            drain_control.enter(Phase::AnswerNow);
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                tracing::warn!("connections still open at the end of the shutdown grace");
            }
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
/// task with the timers of [`connection`].
async fn accept_until(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    metrics: &Metrics,
    connections: &GracefulShutdown,
    shutdown: impl Future<Output = ()>,
) {
    let mut make_service = router.into_make_service_with_connect_info::<SocketAddr>();
    // HTTP/1 only: SDKs upload over HTTP/1.1. hyper's own header timer is
    // off: it would also cut idle keep-alive connections (see `connection`).
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_header_size(limits.max_header_bytes)
        // The read buffer holds at most a head; body bytes go on to the
        // handler (and the memory budget) as they come.
        .max_buf_size(limits.max_header_bytes + 8 * 1024);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let shares = ConnectionShares::new(limits.max_connections_per_peer);
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
        // Past the peer's share, close at once: one peer cannot hold every
        // connection (the share is taken first, so that a peer at its share
        // takes no place of the global limit either).
        let Some(share) = shares.open(peer.ip()) else {
            // The address is not logged: the app, and so its privacy rules,
            // are not known on a connection.
            tracing::debug!("a peer holds its share of connections, closing a new one");
            metrics.connection_refused("max_connections_per_peer");
            continue;
        };
        // Past the connection limit, close at once: file descriptors and
        // per-connection buffers stay bounded.
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::debug!("connection limit reached, closing a new connection");
            metrics.connection_refused("max_connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let Ok(service) = make_service.call(peer).await;
        let started = activity.clone();
        let answered = activity.clone();
        let service = TowerToHyperService::new(
            service
                .map_request(move |request: Request<Incoming>| {
                    started.request_started();
                    request.map(axum::body::Body::new)
                })
                .map_response(move |response| {
                    answered.response_ready();
                    response
                }),
        );
        let io = TokioIo::new(WatchedIo::new(stream, activity.clone()));
        let connection = connections.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            connection::serve(connection, activity, limits.timeouts).await;
            drop((permit, share));
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

/// CORS for the upload route, or none when no origin is allowed (then a
/// browser refuses every cross-origin upload, as before).
fn cors_layer(settings: &CorsSettings) -> Option<CorsLayer> {
    if settings.allowed_origins.is_empty() {
        return None;
    }
    let origins = if settings.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Checked at load: every entry is a valid header value.
        AllowOrigin::list(
            settings
                .allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
                header::AUTHORIZATION,
                X_REQUEST_ID.clone(),
                crate::apps::keys::X_VENUS_KEY.clone(),
                HeaderName::from_static(crate::privacy::ANONYMOUS_HEADER),
                HeaderName::from_static("traceparent"),
                HeaderName::from_static("tracestate"),
                HeaderName::from_static("baggage"),
            ])
            // What a page may read of the answer besides the safelisted
            // headers: the request id to report, when to retry, why a 401.
            .expose_headers([
                X_REQUEST_ID.clone(),
                header::RETRY_AFTER,
                header::WWW_AUTHENTICATE,
            ])
            .max_age(Duration::from_secs(settings.max_age_secs)),
    )
}

fn router(state: AppState, max_body_bytes: usize, cors: Option<CorsLayer>) -> Router {
    // Multipart framing adds a little around the batch part; the document
    // itself is held to `max_body_bytes` by `upload_body`.
    let wire_limit = max_body_bytes.saturating_add(64 * 1024);
    // A panic becomes a 500 inside the server span, so that it is in the
    // span, the request metrics and a log line with the request id.
    let upload = upload_routes()
        .route_layer(CatchPanicLayer::custom(PanicReply(state.metrics.clone())))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            http_server_span,
        ));
    // Outside the server span: a preflight is answered by the CORS layer
    // and is no upload.
    let upload = match cors {
        Some(cors) => upload.route_layer(cors),
        None => upload,
    };
    Router::new()
        .merge(upload)
        .route(OPENAPI_ROUTE, get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(wire_limit))
        .layer(CatchPanicLayer::custom(PanicReply(state.metrics.clone())))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

fn upload_routes() -> Router<AppState> {
    // The route's own 405 fallback, so that it runs inside the route's
    // layers: the CORS layer must see (and answer) a preflight OPTIONS, which
    // the router-wide fallback would take before any route layer.
    let routes = Router::new().route(UPLOAD_ROUTE, post(upload).fallback(method_not_allowed));
    // A route that panics, for the tests of what a caught panic leaves
    // behind; built only into test binaries.
    #[cfg(feature = "test-support")]
    let routes = routes.route("/api/v1/test-panic", post(test_panic));
    routes
}

#[cfg(feature = "test-support")]
async fn test_panic() -> StatusCode {
    panic!("test-support panic route")
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
        network.peer.address = field::Empty,
        network.peer.port = field::Empty,
        http.request.body.size = field::Empty,
        http.response.status_code = field::Empty,
        request_id = %request_id,
    );
    // The client's address as resolved behind trusted proxies, and the TCP
    // peer it came through; the upload uses the former.
    let mut request = request;
    // The addresses themselves are recorded by the upload handler, as the
    // app's privacy rules store them.
    if let Some(peer) = peer {
        let client = state.client_ip.resolve(request.headers(), peer.ip());
        span.record("network.peer.port", i64::from(peer.port()));
        request.extensions_mut().insert(ClientAddress(client));
    }
    if let Some(size) = body_size {
        span.record("http.request.body.size", size);
    }
    let _ = span.set_parent(telemetry::extract_parent(request.headers()));

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

/// The client's address of a request, resolved once by the server span.
#[derive(Clone, Copy, Debug)]
struct ClientAddress(IpAddr);

async fn upload(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    request: Request,
) -> Response {
    state.metrics.upload(UploadType::All);
    let client_ip = request
        .extensions()
        .get::<ClientAddress>()
        .map_or(peer.ip(), |client| client.0);
    let anonymous = crate::privacy::anonymous_requested(request.headers());
    let (reply, privacy, anonymous) =
        answer_upload(&state, client_ip, request_id, anonymous, request).await;
    // The addresses go into the server span only now that the app, and so
    // its privacy rules, are known: as the app's `privacy.ip` stores them.
    let privacy = privacy.unwrap_or_else(|| state.apps.load().policy().default_privacy.clone());
    record_addresses(
        &tracing::Span::current(),
        privacy.rules(anonymous),
        client_ip,
        peer.ip(),
    );
    reply.into_response()
}

/// The server span's `client.address` and `network.peer.address`, as the
/// privacy rules store addresses (none at all when they drop them).
fn record_addresses(span: &tracing::Span, rules: &Privacy, client: IpAddr, peer: IpAddr) {
    for (field, address) in [("client.address", client), ("network.peer.address", peer)] {
        match rules.store_ip(address.to_canonical()) {
            StoredIp::Dropped => {}
            stored => {
                span.record(field, field::display(stored));
            }
        }
    }
}

/// The reply to an upload, the privacy rules of its app once known, and
/// whether the batch was marked anonymous (by the request or its `meta`).
async fn answer_upload(
    state: &AppState,
    client_ip: IpAddr,
    request_id: String,
    anonymous: bool,
    request: Request,
) -> (Reply, Option<Arc<AppPrivacy>>, bool) {
    // The key is hashed here and only its digest goes on. In `keys` mode a
    // request without a key that any app holds is refused before its body
    // is read.
    let key = crate::apps::keys::presented(request.headers(), request.uri());
    if let Err(refusal) = state.apps.load().check_key(key.as_ref()) {
        // Like the pipeline's client errors: debug, so that clients with a
        // bad key cannot flood the log. It never names the key.
        tracing::debug!(
            result = refusal.result(),
            "upload refused: {}",
            refusal.message()
        );
        state.metrics.auth_check(refusal.result());
        let reply = refusal_reply(&refusal);
        state.metrics.record_upload(None, &reply);
        return (reply, None, anonymous);
    }
    // Bytes are charged to the memory budget as they arrive; the charge is
    // held (with `account`) until the reply is built.
    let account = state.budget.account(client_ip);
    let request = request.map(|body| MeteredBody::wrap(body, account.clone()));
    let document = match receive(state, &account, request).await {
        Ok(document) => document,
        Err(reply) => {
            state.metrics.record_upload(None, &reply);
            return (reply, None, anonymous);
        }
    };
    // Only now does the upload take a processing slot, so a slow body never
    // holds one. (Every copy of the body was charged as it was made.)
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        return (
            overloaded(state, "limit of uploads in flight"),
            None,
            anonymous,
        );
    };
    let mut ctx = UploadContext::new(UploadRequest {
        request_id,
        client_ip,
        document,
        key,
        anonymous,
    });
    let reply = state.chain.run(&mut ctx).await;
    let category = ctx.batch.as_ref().map(|b| b.category.as_str());
    state.metrics.record_upload(category, &reply);
    let anonymous = ctx.anonymous();
    (reply, ctx.privacy, anonymous)
}

/// The 503 of load shedding (it carries Retry-After), counted apart.
fn overloaded(state: &AppState, what: &str) -> Reply {
    state.metrics.upload(UploadType::Overloaded);
    Reply::error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the gateway is at its {what}; retry later"),
    )
}

/// The 429 of a client address that holds its share of the memory budget
/// (`server.max_in_flight_bytes_per_client`): its own uploads wait, the
/// others' go on. Counted as `rate_limited`, like every 429.
fn over_client_share(state: &AppState) -> Reply {
    let mut reply = Reply::error(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "this client address holds its share of the gateway's memory for uploads ({} bytes of request bodies in flight); retry when its other uploads are answered",
            state.budget.per_client()
        ),
    );
    reply.retry_after = Some(1);
    reply
}

/// Reads the body into the batch document, within the body timeout, at the
/// minimum rate, never stalled longer than the stall timeout, within the
/// memory budget, and no longer than the drain allows.
async fn receive(
    state: &AppState,
    account: &Arc<Account>,
    request: Request,
) -> Result<Bytes, Reply> {
    let started = tokio::time::Instant::now();
    let deadline = started + state.body_timeout;
    let read = read_document(request, state.max_body_bytes, account);
    tokio::pin!(read);
    let answer_now = state.drain.answer_now();
    tokio::pin!(answer_now);
    // Progress: the bytes seen at the last check and when they last grew.
    // A stall is measured between checks, so it is noticed within a check
    // interval of the stall timeout.
    let mut progress = (account.received(), started);
    let interval = Duration::from_secs(1)
        .min(state.body_stall / 2)
        .max(Duration::from_millis(10));
    // One timer: every check interval, never past the deadline.
    let check = tokio::time::sleep_until(deadline.min(started + interval));
    tokio::pin!(check);
    loop {
        tokio::select! {
            read = &mut read => {
                return read.map_err(|reply| match account.refusal() {
                    Some(Refused::Budget) => overloaded(state, "memory budget for uploads"),
                    Some(Refused::ClientShare) => over_client_share(state),
                    None => reply,
                });
            }
            _ = &mut answer_now => {
                return Err(Reply::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the gateway is shutting down and the body had not arrived; retry",
                ));
            }
            _ = &mut check => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(Reply::error(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the body did not arrive within {} ms",
                            state.body_timeout.as_millis()
                        ),
                    ));
                }
                let received = account.received();
                if received != progress.0 {
                    progress = (received, now);
                } else if now - progress.1 >= state.body_stall {
                    state.metrics.body_stall();
                    return Err(Reply::error(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the body made no progress for {} ms (server.body_stall_timeout_ms)",
                            state.body_stall.as_millis()
                        ),
                    ));
                }
                let elapsed = now - started;
                let rate = received as f64 / elapsed.as_secs_f64();
                if state.min_body_rate > 0
                    && elapsed >= state.body_rate_grace
                    && rate < state.min_body_rate as f64
                {
                    return Err(Reply::error(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the body arrived at {rate:.0} bytes/s, slower than the minimum of {} bytes/s",
                            state.min_body_rate
                        ),
                    ));
                }
                check.as_mut().reset(deadline.min(now + interval));
            }
        }
    }
}

/// Creates the topics of the allowed categories (`kafka.create_topics`).
/// Kafka may not be up yet: then it is tried again in the background, and
/// uploads to a missing topic fail fast meanwhile (1004 naming the topic).
async fn create_topics(settings: &Settings) {
    let kafka = settings.kafka.clone();
    let topics: Vec<String> = settings
        .categories
        .iter()
        .filter_map(|c| crate::domain::Category::parse(c).ok())
        .map(|c| crate::kafka::render_topic(&kafka.topic_template, &c))
        .collect();
    let attempt = move || {
        let (kafka, topics) = (kafka.clone(), topics.clone());
        async move { crate::kafka::topics::create(&kafka, &topics, Duration::from_secs(10)).await }
    };
    let Err(error) = attempt().await else {
        return;
    };
    tracing::warn!(%error, "cannot create the Kafka topics now; trying again in the background");
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(1);
        loop {
            tokio::time::sleep(wait).await;
            match attempt().await {
                Ok(()) => return tracing::info!("created the Kafka topics"),
                Err(error) => tracing::warn!(%error, "cannot create the Kafka topics"),
            }
            wait = (wait * 2).min(Duration::from_secs(60));
        }
    });
}

/// 200 while the process serves HTTP: a liveness probe. Kafka trouble is
/// readiness's business (and the producer heals itself), so restarting the
/// process for it would only lose what is in flight.
/// The OpenAPI document of this gateway's HTTP contract.
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}

async fn healthz() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
        .into_response()
}

/// The body of `/readyz`.
#[derive(serde::Serialize)]
struct Readiness<'a> {
    status: &'static str,
    kafka: &'static str,
    /// The loaded database's type, e.g. `GeoLite2-City`.
    geoip: &'a str,
    /// Every GeoIP file in use: path, type, layout, address family, build
    /// time; a reload shows here at once.
    geoip_files: Vec<crate::geoip::FileInfo>,
    /// With `spool.enabled`: what the spool holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    spool: Option<SpoolReadiness>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a String>,
}

/// The spool's part of `/readyz`.
#[derive(serde::Serialize)]
struct SpoolReadiness {
    /// `empty`, `in use` (records wait for Kafka), or `full` (no room for
    /// another segment: events Kafka does not take are answered 1004).
    state: &'static str,
    records: u64,
    bytes: u64,
    oldest_age_seconds: f64,
}

/// How long a Kafka readiness answer is reused: probes in a burst share one
/// metadata request (and one blocking thread) instead of one each.
const READINESS_TTL: Duration = Duration::from_secs(1);

/// The last Kafka readiness answer and when it was taken.
type ReadinessCache = tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>;

/// Whether a metadata request answers (cached for [`READINESS_TTL`]).
async fn kafka_reachable(state: &AppState) -> Result<(), String> {
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
    // Ready when serving, when recent deliveries do not say the producer
    // cannot deliver, and when a metadata request answers.
    let kafka = if state.drain.phase() != Phase::Serving {
        Err(("draining", "the gateway is shutting down".to_owned()))
    } else if let Some(reason) = state.sink.delivery_problem() {
        Err(("not delivering", reason))
    } else {
        kafka_reachable(&state)
            .await
            .map_err(|reason| ("unreachable", reason))
    };
    let database = state.geoip.current();
    let geoip = database.database_type();
    let geoip_files: Vec<crate::geoip::FileInfo> = database.files().cloned().collect();
    let spool = state.spool.as_ref().map(|spool| {
        let depth = spool.depth();
        let room = spool.has_room();
        SpoolReadiness {
            state: if !room {
                "full"
            } else if depth.records > 0 {
                "in use"
            } else {
                "empty"
            },
            records: depth.records,
            bytes: depth.bytes,
            oldest_age_seconds: depth.oldest_age.map_or(0.0, |age| age.as_secs_f64()),
        }
    });
    // With room in the spool, a Kafka that does not deliver does not stop
    // the gateway from answering 0: it stays in rotation (not while
    // draining).
    let spooling =
        spool.as_ref().is_some_and(|s| s.state != "full") && state.drain.phase() == Phase::Serving;
    let (status, body) = match &kafka {
        Ok(()) => (
            StatusCode::OK,
            Readiness {
                status: "ready",
                kafka: "reachable",
                geoip,
                geoip_files,
                spool,
                reason: None,
            },
        ),
        Err((kafka, reason)) => (
            if spooling {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            Readiness {
                status: if spooling { "ready" } else { "not ready" },
                kafka,
                geoip,
                geoip_files,
                spool,
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

/// A bug must cost one request a 500, not its connection (or the process),
/// and must not go unnoticed: it is counted and logged (inside the server
/// span, so the log line carries the request id and trace id).
#[derive(Clone)]
struct PanicReply(Metrics);

impl ResponseForPanic for PanicReply {
    type ResponseBody = axum::body::Body;

    fn response_for_panic(
        &mut self,
        panic: Box<dyn std::any::Any + Send + 'static>,
    ) -> axum::http::Response<Self::ResponseBody> {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        self.0.panic();
        tracing::error!(panic = %message, "a request handler panicked");
        Reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; the gateway's log has the details",
        )
        .into_response()
    }
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
    _budget: opentelemetry::metrics::ObservableGauge<u64>,
    _geoip: opentelemetry::metrics::ObservableGauge<u64>,
    _tracked_apps: opentelemetry::metrics::ObservableGauge<u64>,
    _spool: Vec<SpoolInstrument>,
}

/// One of the spool's observable instruments.
#[allow(dead_code)]
enum SpoolInstrument {
    Gauge(opentelemetry::metrics::ObservableGauge<u64>),
    FloatGauge(opentelemetry::metrics::ObservableGauge<f64>),
    Counter(opentelemetry::metrics::ObservableCounter<u64>),
}

/// The spool's depth, bytes, oldest record's age, and its counters
/// (spooled, replayed, refused for room, torn tails, quarantined segments,
/// fsyncs).
fn spool_instruments(
    meter: &opentelemetry::metrics::Meter,
    spool: &crate::spool::Spool,
) -> Vec<SpoolInstrument> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut instruments = Vec::new();
    let depth = spool.clone();
    instruments.push(SpoolInstrument::Gauge(
        meter
            .u64_observable_gauge("venus.spool.records")
            .with_description("Spooled events not yet acknowledged by Kafka")
            .with_callback(move |o| o.observe(depth.depth().records, &[]))
            .build(),
    ));
    let bytes = spool.clone();
    instruments.push(SpoolInstrument::Gauge(
        meter
            .u64_observable_gauge("venus.spool.size")
            .with_unit("By")
            .with_description("Bytes of spool segment files on disk")
            .with_callback(move |o| o.observe(bytes.depth().bytes, &[]))
            .build(),
    ));
    let age = spool.clone();
    instruments.push(SpoolInstrument::FloatGauge(
        meter
            .f64_observable_gauge("venus.spool.oldest_age")
            .with_unit("s")
            .with_description(
                "Age of the oldest spooled event not yet acknowledged by Kafka (0: none)",
            )
            .with_callback(move |o| {
                o.observe(age.depth().oldest_age.map_or(0.0, |a| a.as_secs_f64()), &[])
            })
            .build(),
    ));
    type Pick = fn(&crate::spool::Counters) -> &std::sync::atomic::AtomicU64;
    let counters: [(&'static str, &'static str, Pick); 7] = [
        ("venus.spool.requeued", "Spooled events Kafka refused for their topic (missing, not authorized), moved to the spool's end", |c| &c.requeued),
        ("venus.spool.spooled", "Events written and fsynced to the spool (answered 0, spooled)", |c| &c.spooled),
        ("venus.spool.replayed", "Spooled events Kafka acknowledged on replay", |c| &c.replayed),
        ("venus.spool.refused", "Events the spool had no room for (spool.max_bytes or spool.min_free_bytes; answered 1004)", |c| &c.refused_full),
        ("venus.spool.torn_tails", "Segments whose last record was cut short by a crash, cut at start-up", |c| &c.torn_tails),
        ("venus.spool.quarantined", "Segments with a corrupt record, moved to quarantine/ at start-up", |c| &c.quarantined),
        ("venus.spool.fsyncs", "fdatasync calls of the spool (one per group of appends)", |c| &c.fsyncs),
    ];
    for (name, description, pick) in counters {
        let spool = spool.clone();
        instruments.push(SpoolInstrument::Counter(
            meter
                .u64_observable_counter(name)
                .with_description(description)
                .with_callback(move |o| o.observe(pick(spool.counters()).load(Relaxed), &[]))
                .build(),
        ));
    }
    instruments
}

/// The producer's queue depth, librdkafka's transmission errors and
/// retries, and the spans lost on export.
fn register_gauges(
    metering: &Metering,
    sink: &Arc<KafkaSink>,
    budget: &MemoryBudget,
    geoip: &Arc<GeoIp>,
    apps: &Apps,
    spool: Option<&crate::spool::Spool>,
) -> Gauges {
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
    let budget = budget.clone();
    let budget = meter
        .u64_observable_gauge("venus.upload.memory")
        .with_unit("By")
        .with_description("Bytes of the request-body memory budget held by uploads in flight")
        .with_callback(move |observer| observer.observe(budget.in_use() as u64, &[]))
        .build();
    let geoip = Arc::downgrade(geoip);
    let geoip = meter
        .u64_observable_gauge("venus.geoip.database")
        .with_description(
            "The GeoIP files in use, one series each: the value is when the data was built (seconds since the epoch)",
        )
        .with_callback(move |observer| {
            if let Some(geoip) = geoip.upgrade() {
                for file in geoip.current().files() {
                    observer.observe(
                        file.build_epoch,
                        &[
                            opentelemetry::KeyValue::new("type", file.database_type.clone()),
                            opentelemetry::KeyValue::new("layout", file.layout),
                            opentelemetry::KeyValue::new("path", file.path.clone()),
                            opentelemetry::KeyValue::new("ip_version", i64::from(file.ip_version)),
                        ],
                    );
                }
            }
        })
        .build();
    let apps = apps.clone();
    let tracked = meter
        .u64_observable_gauge("venus.rate_limit.tracked_apps")
        .with_description(
            "Unlisted apps with rate-limit buckets of their own (at most rate_limits.max_tracked_apps)",
        )
        .with_callback(move |observer| observer.observe(apps.load().tracked_unlisted() as u64, &[]))
        .build();
    Gauges {
        _spool: spool
            .map(|spool| spool_instruments(&meter, spool))
            .unwrap_or_default(),
        _tracked_apps: tracked,
        _geoip: geoip,
        _budget: budget,
        _queue: gauge,
        _tx_errors: tx_errors,
        _tx_retries: tx_retries,
        _dropped_spans: dropped,
    }
}
