//! With the trace collector unreachable, uploads go on as if nothing
//! happened, and the spans lost on the way are counted.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;

use support::{free_port, shared_broker, TestApp};

fn dropped_spans(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("venus_telemetry_dropped_spans_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_succeed_while_the_collector_is_down_and_lost_spans_are_counted() {
    // Nothing listens there.
    let provider = support::init_tracing_exporting_to(&format!("http://127.0.0.1:{}", free_port()));
    let broker = shared_broker();
    let (category, _) = support::fresh_topic("nocollector").await;
    let app = TestApp::spawn(support::settings(&broker.address(), &[])).await;

    for i in 0..20 {
        let document =
            json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": i.to_string()}]});
        let started = Instant::now();
        let response = app.upload_json(&document.to_string()).await;
        assert_eq!(response.status(), 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "upload {i} took {:?}",
            started.elapsed()
        );
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut dropped = 0.0;
    while dropped == 0.0 && Instant::now() < deadline {
        let provider = provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        let metrics = app
            .client
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        dropped = dropped_spans(&metrics);
    }
    assert!(dropped >= 1.0, "the lost spans are counted");
    app.stop().await;
}
