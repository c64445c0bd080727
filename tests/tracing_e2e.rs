//! Traces end to end: an upload with a known incoming trace context, spans
//! received by an in-process OTLP/HTTP collector, and the trace context that
//! reached Kafka.

mod support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;

use support::otlp::{self, attribute, hex, Received};
use support::{header, shared_broker, TestApp};

/// The collector, started once; tracing exports to it.
fn collector() -> &'static (String, Received) {
    static COLLECTOR: OnceLock<(String, Received)> = OnceLock::new();
    COLLECTOR.get_or_init(|| {
        let (url, received) = otlp::start();
        support::init_tracing_exporting_to(&url);
        (url, received)
    })
}

/// Flushes the span queue and waits until `count` spans of `trace_id` came.
fn spans_of(trace_id: &str, count: usize) -> Vec<Span> {
    let id = (0..trace_id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&trace_id[i..i + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = support::init_tracing().force_flush();
        let spans = collector().1.trace(&id);
        if spans.len() >= count || Instant::now() > deadline {
            return spans;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
        panic!(
            "no span {name} among {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        )
    })
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(AnyValue::IntValue(v)) => v,
        other => panic!("{}: {key} = {other:?}", span.name),
    }
}

fn text(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        Some(AnyValue::StringValue(v)) => v,
        other => panic!("{}: {key} = {other:?}", span.name),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_one_trace_from_the_caller_through_every_handler_into_kafka() {
    collector();
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("traced").await;
    let app = TestApp::spawn(support::settings(&broker.address(), &[])).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let document = json!({
        "meta": {"app_id": "a", "category": category},
        "data": [{"id": "1", "ip": "81.2.69.142"}, {"id": 2}, {"id": "3"}]
    });
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .header("tracestate", "vendor=opaque")
        .header("baggage", "tenant=acme")
        .header("x-request-id", "trace-req-1")
        .json(&document)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 206);

    let spans = spans_of(trace_id, 5);
    assert_eq!(spans.len(), 5, "server span and four handler spans");
    let server = named(&spans, "POST /api/v1/upload");
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(hex(&server.parent_span_id), caller_span);
    assert_eq!(text(server, "http.request.method"), "POST");
    assert_eq!(text(server, "http.route"), "/api/v1/upload");
    assert_eq!(int(server, "http.response.status_code"), 206);
    assert_eq!(text(server, "client.address"), "127.0.0.1");
    assert_eq!(text(server, "network.peer.address"), "127.0.0.1");
    assert!(int(server, "network.peer.port") > 0);
    assert!(int(server, "http.request.body.size") > 0);

    let split = named(&spans, "split_and_validate");
    let authorize = named(&spans, "authorize");
    let enrich = named(&spans, "ip_enrich");
    let write = named(&spans, "write_kafka");
    for handler in [split, authorize, enrich, write] {
        assert_eq!(hex(&handler.trace_id), trace_id);
        assert_eq!(handler.parent_span_id, server.span_id, "{}", handler.name);
    }
    // Only attributes that say something about the upload: none of the
    // per-span extras tracing-opentelemetry adds by default (source
    // location, thread, target, busy/idle time), which cost per event.
    for span in [server, split, authorize, enrich, write] {
        for key in [
            "code.filepath",
            "code.lineno",
            "code.namespace",
            "thread.id",
            "thread.name",
            "target",
            "busy_ns",
            "idle_ns",
        ] {
            assert_eq!(attribute(span, key), None, "{}: {key}", span.name);
        }
    }
    // The batch has an invalid event: split_and_validate is marked failed,
    // and the chain went on.
    let status = split.status.clone().unwrap();
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(
        status.message.contains("1 of 3 events failed validation"),
        "{}",
        status.message
    );
    assert!(split.events.iter().any(|e| e.name == "exception"));
    assert_eq!(int(split, "venus.events.in"), 3);
    assert_eq!(int(split, "venus.events.failed"), 1);
    assert_ne!(
        enrich.status.clone().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );

    assert_eq!(write.kind, SpanKind::Producer as i32);
    assert_eq!(text(write, "messaging.system"), "kafka");
    assert_eq!(text(write, "messaging.destination.name"), topic);
    assert_eq!(int(write, "messaging.batch.message_count"), 2);

    let messages = broker.read(&topic, 2, Duration::from_secs(3));
    assert_eq!(messages.len(), 2);
    for message in &messages {
        assert_eq!(
            header(message, "traceparent").unwrap(),
            format!("00-{trace_id}-{}-01", hex(&write.span_id))
        );
        assert_eq!(
            header(message, "tracestate").as_deref(),
            Some("vendor=opaque")
        );
        let baggage = header(message, "baggage").unwrap();
        assert!(baggage.contains("tenant=acme"), "{baggage}");
        assert!(baggage.contains("request_id=trace-req-1"), "{baggage}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_incoming_context_a_new_trace_still_reaches_kafka() {
    collector();
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("root").await;
    let app = TestApp::spawn(support::settings(&broker.address(), &[])).await;
    let document = json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": "1"}]});
    assert_eq!(app.upload_json(&document.to_string()).await.status(), 200);

    let messages = broker.read(&topic, 1, Duration::from_secs(3));
    let traceparent = header(&messages[0], "traceparent").unwrap();
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields[0], "00");
    assert_eq!(fields[3], "01", "sampled at the default ratio of 1.0");
    let spans = spans_of(fields[1], 5);
    let write = named(&spans, "write_kafka");
    assert_eq!(hex(&write.span_id), fields[2]);
    let server = named(&spans, "POST /api/v1/upload");
    assert!(server.parent_span_id.is_empty(), "a root span");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_caller_gets_no_spans_but_a_valid_unsampled_traceparent() {
    collector();
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("unsampled").await;
    let app = TestApp::spawn(support::settings(&broker.address(), &[])).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let document = json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": "1"}]});
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-00"))
        .json(&document)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let messages = broker.read(&topic, 1, Duration::from_secs(3));
    let traceparent = header(&messages[0], "traceparent").unwrap();
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields[1], trace_id);
    assert_eq!(fields[3], "00");
    assert_ne!(fields[2], "b7ad6b7169203331", "a span of the gateway's own");
    assert_ne!(fields[2], "0000000000000000");
    // A sampled upload after it: once its spans have reached the collector,
    // any span of the unsampled one would have too (spans leave in order).
    let sampled = "0af7651916cd43dd8448eb211c80319d";
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("traceparent", format!("00-{sampled}-b7ad6b7169203331-01"))
        .json(&document)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(spans_of(sampled, 5).len(), 5, "the sampled upload's spans");
    assert!(
        spans_of(trace_id, 0).is_empty(),
        "unsampled spans are not exported"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_pushed_over_otlp_when_an_endpoint_is_set() {
    let (url, received) = collector();
    let broker = shared_broker();
    let (category, _) = support::fresh_topic("pushed").await;
    let app = TestApp::spawn(support::settings(
        &broker.address(),
        &[
            ("VENUS__TELEMETRY__OTLP_ENDPOINT", url.as_str()),
            ("VENUS__TELEMETRY__METRICS_INTERVAL_MS", "200"),
        ],
    ))
    .await;
    let document = json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": "1"}]});
    assert_eq!(app.upload_json(&document.to_string()).await.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    let wanted = [
        "venus.uploads",
        "venus.events",
        "http.server.request.duration",
    ];
    loop {
        let names = received.metric_names();
        if wanted.iter().all(|w| names.iter().any(|n| n == w)) {
            break;
        }
        assert!(Instant::now() < deadline, "metrics pushed: {names:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_span_has_the_client_and_the_peer_apart() {
    collector();
    let broker = shared_broker();
    let (category, _) = support::fresh_topic("proxied_span").await;
    let app = TestApp::spawn(support::settings(
        &broker.address(),
        &[
            ("VENUS__SERVER__TRUSTED_PROXIES", "127.0.0.0/8"),
            ("VENUS__SERVER__FORWARDING_HEADER", "forwarded"),
        ],
    ))
    .await;
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b8-01"))
        .header("forwarded", r#"for="[2a02:d280::7]:4711", for=127.0.0.9"#)
        .json(&json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": "1"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let spans = spans_of(trace_id, 5);
    let server = named(&spans, "POST /api/v1/upload");
    assert_eq!(text(server, "client.address"), "2a02:d280::7");
    assert_eq!(text(server, "network.peer.address"), "127.0.0.1");
    app.stop().await;
}
