//! A few seconds of load through the gateway with `venus-loadtest`, then
//! every event it reported accepted is looked up in Kafka: none may be
//! missing. Also the raw-Kafka mode the benchmark compares against.

mod support;

use std::time::Duration;

use venus_loadtest::{run, Config, GenConfig, Target};

use support::{shared_broker, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_every_accepted_event_is_in_kafka_exactly_once() {
    let broker = shared_broker();
    let (first, _) = support::fresh_topic("smoke_a").await;
    let (second, _) = support::fresh_topic("smoke_b").await;
    let app = TestApp::spawn(support::settings(&broker.address(), &[])).await;
    let ids = tempfile::NamedTempFile::new().unwrap();
    let report = run(Config {
        url: app.url("/api/v1/upload"),
        connections: 4,
        duration: Some(Duration::from_secs(3)),
        generator: GenConfig {
            categories: vec![first, second],
            invalid_fraction: 0.05,
            ..GenConfig::default()
        },
        verify: true,
        accepted_ids: Some(ids.path().to_owned()),
        brokers: Some(broker.address()),
        verify_idle: Duration::from_secs(3),
        ..Config::default()
    })
    .await
    .unwrap();
    let verify = report.verify.as_ref().expect("a verify section");
    assert!(report.requests > 10, "{report}");
    assert!(report.events_accepted > 0, "{report}");
    assert_eq!(report.errors, 0, "{report}");
    assert_eq!(report.bad_responses, 0, "{report}");
    assert_eq!(report.unexpected_codes, 0, "{report}");
    assert_eq!(verify.checked, report.events_accepted);
    assert_eq!(verify.missing, 0, "{report}");
    assert_eq!(verify.duplicates, 0, "{report}");
    assert_eq!(verify.duplicate_event_ids, 0, "{report}");
    // Nothing was answered 1004, so nothing can have been delivered anyway.
    assert_eq!(verify.failed_but_delivered, 0, "{report}");
    assert_eq!(verify.unreadable, 0, "{report}");
    // Every message read is one this run accepted.
    assert_eq!(verify.messages_read, verify.found, "{report}");
    // --accepted-ids: every accepted event's backend_id, once.
    let written = std::fs::read_to_string(ids.path()).unwrap();
    let ids: std::collections::HashSet<uuid::Uuid> = written
        .lines()
        .map(|line| line.parse().expect("a UUID a line"))
        .collect();
    assert_eq!(written.lines().count() as u64, report.events_accepted);
    assert_eq!(ids.len() as u64, report.events_accepted);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_kafka_mode_produces_readable_acknowledged_events() {
    let broker = shared_broker();
    let (category, _) = support::fresh_topic("smoke_raw").await;
    let report = run(Config {
        target: Target::RawKafka,
        connections: 2,
        requests: Some(20),
        generator: GenConfig {
            categories: vec![category.clone()],
            ..GenConfig::default()
        },
        verify: true,
        brokers: Some(broker.address()),
        verify_idle: Duration::from_secs(3),
        ..Config::default()
    })
    .await
    .unwrap();
    let raw = report.raw_kafka.as_ref().expect("a raw_kafka section");
    assert_eq!(raw.failed, 0, "{report}");
    assert_eq!(raw.acked, report.events);
    assert_eq!(report.verify.as_ref().unwrap().missing, 0, "{report}");
    // The ceiling is only a ceiling for the same messages: the headers the
    // gateway writes (tests/upload.rs checks the gateway's side).
    let messages = broker.read(&support::topic_of(&category), 1, Duration::from_secs(3));
    let message = messages.first().expect("a message");
    use rdkafka::message::{Headers, Message};
    let names: Vec<&str> = message
        .headers()
        .map(|h| h.iter().map(|h| h.key).collect())
        .unwrap_or_default();
    assert_eq!(names, ["traceparent", "request_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fixed_body_for_wrk_is_an_upload_the_gateway_takes_as_counted() {
    let broker = shared_broker();
    let (category, _) = support::fresh_topic("smoke_body").await;
    let app = TestApp::spawn(support::settings(&broker.address(), &[])).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("body");
    let summary = venus_loadtest::write_body(
        &Config {
            generator: GenConfig {
                categories: vec![category],
                ..GenConfig::default()
            },
            ..Config::default()
        },
        &path,
    )
    .unwrap();
    assert_eq!(summary.events, GenConfig::default().events_per_batch);
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("content-type", summary.content_type)
        .body(std::fs::read(&path).unwrap())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let body: serde_json::Value = response.json().await.unwrap();
    let parts = body["parts"].as_array().expect("a part per event");
    assert_eq!(parts.len(), summary.events, "{body}");
    let accepted = parts.iter().filter(|p| p["code"] == 0).count();
    assert_eq!(accepted, summary.accepted_events, "{body}");
    app.stop().await;
}
