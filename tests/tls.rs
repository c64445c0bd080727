//! TLS on the gateway's outgoing connections, with the real binary: Kafka
//! behind a real TLS endpoint (stunnel in front of tansu) with a CA file
//! the test made with openssl, a wrong CA named in `/readyz`, and spans to
//! an HTTPS OTLP collector (rustls) with and without its CA.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::gateway::Gateway;
use support::otlp;
use support::tls::Pki;
use support::{shared_broker, Broker};

async fn upload(gateway: &Gateway, category: &str, trace_id: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(gateway.url("/api/v1/upload"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .header("content-type", "application/json")
        .body(
            json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": "e1"}]})
                .to_string(),
        )
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap()
}

async fn readyz(gateway: &Gateway) -> (u16, Value) {
    let response = reqwest::get(gateway.url("/readyz")).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_produces_over_tls_and_a_wrong_ca_is_named_in_readyz() {
    let pki = Pki::new("kafka");
    let broker = Broker::start_tls(&pki);
    let category = support::unique_category("tls");
    let topic = support::topic_of(&category);
    let mut env = broker.security_env();
    env.extend([
        ("VENUS__KAFKA__CREATE_TOPICS", "true".to_owned()),
        ("VENUS__CATEGORIES", category.clone()),
    ]);
    // The gateway creates its topic and produces, both over TLS.
    let gateway = Gateway::start(&broker.address(), &env);
    let (status, body) = readyz(&gateway).await;
    assert_eq!(status, 200, "{body}");
    let response = upload(
        &gateway,
        &category,
        &uuid::Uuid::new_v4().simple().to_string(),
    )
    .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let messages = broker.read(&topic, 1, Duration::from_secs(10));
    assert_eq!(messages.len(), 1);
    assert_eq!(support::value_json(&messages[0])["data"]["id"], "e1");

    // The same broker with a CA that did not sign its certificate.
    let other = Pki::new("other");
    let wrong = Gateway::start(
        &broker.address(),
        &[
            ("VENUS__KAFKA__SECURITY__PROTOCOL", "ssl".into()),
            (
                "VENUS__KAFKA__SECURITY__CA_FILE",
                other.ca().display().to_string(),
            ),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let reason = loop {
        let (status, body) = readyz(&wrong).await;
        let reason = body["reason"].as_str().unwrap_or_default().to_owned();
        if status == 503 && reason.contains("certificate") {
            break reason;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        reason.contains(&broker.address()),
        "names the broker: {reason}"
    );
    let response = upload(
        &wrong,
        &category,
        &uuid::Uuid::new_v4().simple().to_string(),
    )
    .await;
    assert_ne!(
        response.status(),
        200,
        "nothing is accepted that cannot be sent"
    );
}

/// Spans of `trace_id` received so far, waiting up to `timeout` for one
/// named `POST /api/v1/upload`.
fn wait_for_spans(received: &otlp::Received, trace_id: &str, timeout: Duration) -> Vec<String> {
    let id: Vec<u8> = (0..trace_id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&trace_id[i..i + 2], 16).unwrap())
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        let names: Vec<String> = received.trace(&id).into_iter().map(|s| s.name).collect();
        if names.iter().any(|n| n == "POST /api/v1/upload") || Instant::now() > deadline {
            return names;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_collector_that_the_ca_file_vouches_for() {
    let broker = shared_broker();
    let (category, _topic) = support::fresh_topic("otlps").await;
    let pki = Pki::new("collector");
    let (collector, received) = otlp::start_https(&pki);
    assert!(collector.starts_with("https://"));
    let telemetry = |ca: Option<&Pki>| {
        let mut env = vec![
            ("VENUS__TELEMETRY__OTLP_ENDPOINT", collector.clone()),
            ("VENUS__TELEMETRY__OTLP_METRICS", "false".to_owned()),
        ];
        if let Some(pki) = ca {
            env.push((
                "VENUS__TELEMETRY__OTLP_CA_FILE",
                pki.ca().display().to_string(),
            ));
        }
        env
    };

    let gateway = Gateway::start(&broker.address(), &telemetry(Some(&pki)));
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    assert_eq!(upload(&gateway, &category, &trace_id).await.status(), 200);
    let names = wait_for_spans(&received, &trace_id, Duration::from_secs(20));
    for wanted in ["POST /api/v1/upload", "split_and_validate", "write_kafka"] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} in {names:?}");
    }

    // Without the CA file the collector's certificate does not verify:
    // nothing arrives, and the log says why.
    let untrusting = Gateway::start(&broker.address(), &telemetry(None));
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    assert_eq!(
        upload(&untrusting, &category, &trace_id).await.status(),
        200
    );
    let line = untrusting.wait_for_line(
        |line| line["message"] == "OTLP export failed; what it carried is dropped",
        Duration::from_secs(20),
    );
    let error = line["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("certificate") || error.contains("UnknownIssuer"),
        "{line}"
    );
    assert!(wait_for_spans(&received, &trace_id, Duration::from_secs(2)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sasl_login_the_broker_refuses_is_named_in_readyz_without_the_password() {
    // tansu --authentication speaks SASL SCRAM; it knows no user here
    // (docs/INGESTER.md says why), so the login is refused: what matters is
    // that the gateway's client logs in with SCRAM and says why it failed.
    let broker = Broker::start_authenticating();
    let gateway = Gateway::start(
        &broker.address(),
        &[
            ("VENUS__KAFKA__SECURITY__PROTOCOL", "sasl_plaintext".into()),
            (
                "VENUS__KAFKA__SECURITY__SASL_MECHANISM",
                "SCRAM-SHA-256".into(),
            ),
            ("VENUS__KAFKA__SECURITY__USERNAME", "venus".into()),
            ("VENUS__KAFKA__SECURITY__PASSWORD", "pw-0123e4".into()),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = readyz(&gateway).await;
        let reason = body["reason"].as_str().unwrap_or_default();
        if status == 503 && reason.contains("SASL") {
            break body;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains("SCRAM") && reason.contains(&broker.address()),
        "{reason}"
    );
    let log = gateway.rest_of_log(Duration::from_secs(2));
    for line in log.iter().chain([&body.to_string()]) {
        assert!(!line.contains("pw-0123e4"), "the password leaked: {line}");
    }
}
