//! An in-process OTLP/HTTP receiver: decodes `ExportTraceServiceRequest`
//! bodies posted to `/v1/traces` and keeps the spans, and
//! `ExportMetricsServiceRequest` bodies posted to `/v1/metrics` and keeps the
//! metric names with their resources' `service.name`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

#[derive(Clone, Default)]
pub struct Received {
    spans: Arc<Mutex<Vec<Span>>>,
    metric_names: Arc<Mutex<Vec<String>>>,
}

impl Received {
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Names of every metric received so far.
    pub fn metric_names(&self) -> Vec<String> {
        self.metric_names.lock().unwrap().clone()
    }

    /// The received spans of one trace.
    pub fn trace(&self, trace_id: &[u8]) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}

async fn traces(State(received): State<Received>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
    let mut spans = received.spans.lock().unwrap();
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            spans.extend(scope.spans);
        }
    }
    ExportTraceServiceResponse::default().encode_to_vec()
}

async fn metrics(State(received): State<Received>, body: Bytes) -> Vec<u8> {
    let request = ExportMetricsServiceRequest::decode(body).expect("an OTLP metrics export");
    let mut names = received.metric_names.lock().unwrap();
    for resource in request.resource_metrics {
        for scope in resource.scope_metrics {
            names.extend(scope.metrics.into_iter().map(|m| m.name));
        }
    }
    ExportMetricsServiceResponse::default().encode_to_vec()
}

/// The receiver over HTTPS with `pki`'s server certificate (rustls, the
/// same crate the exporters use); returns its `https://` base URL.
pub fn start_https(pki: &super::tls::Pki) -> (String, Received) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certificates: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(pki.server_certificate())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.server_key()).unwrap();
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let (address, received) = serve(move |listener, app| async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate ends the
                // handshake: nothing to serve.
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(
                    hyper_util::rt::TokioIo::new(tls),
                    hyper_util::service::TowerToHyperService::new(app),
                )
                .await;
            });
        }
    });
    (format!("https://{address}"), received)
}

/// Runs `serve_with` on the receiver's routes and a listener of its own,
/// on a thread and runtime of its own (tests each have their own runtime,
/// which ends with the test).
fn serve<F, Fut>(serve_with: F) -> (SocketAddr, Received)
where
    F: FnOnce(tokio::net::TcpListener, Router) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let received = Received::default();
    let state = received.clone();
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let app = Router::new()
                .route("/v1/traces", post(traces))
                .route("/v1/metrics", post(metrics))
                .with_state(state);
            serve_with(listener, app).await;
        });
    });
    (rx.recv().unwrap(), received)
}

/// Starts the receiver on its own thread and runtime; returns its base URL.
pub fn start() -> (String, Received) {
    let (address, received) = serve(|listener, app| async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{address}"), received)
}

pub fn attribute(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
