//! The `venus` binary as operators run it: start-up errors, JSON logs that
//! carry the trace, and a graceful stop on SIGTERM.

mod support;

use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::json;

use support::gateway::{command, Gateway};
use support::{free_port, shared_broker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_runs_without_transparent_huge_pages() {
    let broker = shared_broker();
    let gateway = Gateway::start(&broker.address(), &[]);
    // Linux 5.0 and later say it in /proc/PID/status (this machine's does).
    let on = venus::allocator::transparent_huge_pages_enabled(gateway.child.id());
    assert_ne!(on, Some(true), "PR_SET_THP_DISABLE at the start of main");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_inside_a_request_carry_its_trace_and_span_ids() {
    let broker = shared_broker();
    let (category, _) = support::fresh_topic("logs").await;
    let gateway = Gateway::start(&broker.address(), &[]);
    let trace_id = "11112222333344445555666677778888";
    let response = reqwest::Client::new()
        .post(gateway.url("/api/v1/upload"))
        .header("traceparent", format!("00-{trace_id}-1234567812345678-01"))
        .json(&json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": 1}, {"id": "ok"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 206);
    let line = gateway.wait_for_line(
        |l| l["message"] == "handler reported an error",
        Duration::from_secs(10),
    );
    assert_eq!(
        line["level"], "DEBUG",
        "a client's bad event is not a warning"
    );
    assert_eq!(line["handler"], "split_and_validate");
    assert_eq!(line["span"]["trace_id"], trace_id, "{line}");
    let span_id = line["span"]["span_id"].as_str().unwrap();
    assert_eq!(span_id.len(), 16);
    assert_ne!(span_id, "1234567812345678", "the handler's own span");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_upload_in_flight_finish_then_exits_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("drain").await;
    let mut gateway = Gateway::start(&broker.address(), &[]);
    let body =
        json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": "in-flight"}]})
            .to_string();
    let (first, rest) = body.split_at(body.len() / 2);

    // Half a body on the wire, then SIGTERM, then the other half.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", gateway.port))
        .await
        .unwrap();
    let head = format!(
        "POST /api/v1/upload HTTP/1.1\r\nHost: venus\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    unsafe {
        libc::kill(gateway.child.id() as i32, libc::SIGTERM);
    }
    gateway.wait_for_line(
        |l| l["message"] == "listener closed: draining in-flight uploads",
        Duration::from_secs(5),
    );
    // Draining: new connections are refused, the one in flight goes on.
    assert!(std::net::TcpStream::connect(("127.0.0.1", gateway.port)).is_err());
    stream.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer))
        .await
        .expect("the in-flight upload was answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = gateway.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "venus did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    gateway.wait_for_line(|l| l["message"] == "stopped", Duration::from_secs(2));
    let messages = broker.read(&topic, 1, Duration::from_secs(3));
    assert_eq!(messages.len(), 1);
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) on a pid we own.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

fn wait_for_exit(child: &mut Child, patience: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "venus did not exit in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_a_slow_body_and_a_kafka_wait_before_the_grace_runs_out() {
    use tokio::io::AsyncWriteExt;

    // A broker of its own: it is paused.
    let broker = support::Broker::start();
    let category = support::unique_category("grace");
    broker.create_topic(&support::topic_of(&category)).await;
    let mut gateway = Gateway::start(
        &broker.address(),
        &[
            ("VENUS__SERVER__SHUTDOWN_GRACE_MS", "3000".into()),
            ("VENUS__SERVER__BODY_TIMEOUT_MS", "60000".into()),
            ("VENUS__SERVER__MIN_BODY_RATE_BYTES_PER_SEC", "0".into()),
            ("VENUS__KAFKA__DELIVERY_TIMEOUT_MS", "30000".into()),
        ],
    );
    let client = reqwest::Client::new();
    let body =
        |id: &str| json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": id}]});
    let warm = client
        .post(gateway.url("/api/v1/upload"))
        .json(&body("warm"))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);

    // A Kafka wait: the broker stops answering.
    broker.pause();
    let waiting = tokio::spawn({
        let request = client
            .post(gateway.url("/api/v1/upload"))
            .json(&body("waiting"));
        async move { request.send().await }
    });
    // A slow body: half of it sent.
    let text = body("slow").to_string();
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", gateway.port))
        .await
        .unwrap();
    let head = format!(
        "POST /api/v1/upload HTTP/1.1\r\nHost: venus\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        text.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&text.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let signalled = Instant::now();
    sigterm(&gateway.child);
    let answer = support::read_to_close(&mut slow, Duration::from_secs(6)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("shutting down"), "{answer}");
    let waited = tokio::time::timeout(Duration::from_secs(6), waiting)
        .await
        .expect("the Kafka wait was answered")
        .unwrap()
        .expect("an answer, not a reset");
    assert_eq!(waited.status(), 503);
    let reply: serde_json::Value = waited.json().await.unwrap();
    assert_eq!(reply["parts"][0]["code"], 1004, "{reply}");
    assert!(
        reply["parts"][0]["data"]
            .as_str()
            .unwrap()
            .contains("shut down before Kafka acknowledged"),
        "{reply}"
    );
    let status = wait_for_exit(&mut gateway.child, Duration::from_secs(6));
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() < Duration::from_millis(3000 + 1500),
        "within the grace: {:?}",
        signalled.elapsed()
    );
    broker.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_readiness_fails_first_while_uploads_are_still_served() {
    let broker = shared_broker();
    let (category, _) = support::fresh_topic("delay").await;
    let mut gateway = Gateway::start(
        &broker.address(),
        &[("VENUS__SERVER__SHUTDOWN_DELAY_MS", "2000".into())],
    );
    let client = reqwest::Client::new();
    assert_eq!(
        client
            .get(gateway.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sigterm(&gateway.child);
    gateway.wait_for_line(
        |l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("shutdown requested")
        },
        Duration::from_secs(5),
    );
    let ready = client.get(gateway.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["reason"], "the gateway is shutting down");
    // Still serving during the delay.
    let upload = client
        .post(gateway.url("/api/v1/upload"))
        .json(&json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": "late"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    let status = wait_for_exit(&mut gateway.child, Duration::from_secs(10));
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_panic_is_counted_and_logged_with_its_request_id() {
    let broker = shared_broker();
    let gateway = Gateway::start(&broker.address(), &[]);
    let client = reqwest::Client::new();
    let response = client
        .post(gateway.url("/api/v1/test-panic"))
        .header("x-request-id", "panic-request-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    let reply: serde_json::Value = response.json().await.unwrap();
    assert!(reply["data"].as_str().unwrap().contains("internal error"));
    let line = gateway.wait_for_line(
        |l| l["message"] == "a request handler panicked",
        Duration::from_secs(5),
    );
    assert_eq!(line["level"], "ERROR");
    assert_eq!(line["panic"], "test-support panic route");
    assert_eq!(line["span"]["request_id"], "panic-request-1", "{line}");
    let metrics = gateway.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("venus_panics_total") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(
            |l| l.starts_with("http_server_request_duration_seconds_count")
                && l.contains("http_response_status_code=\"500\"")
        ),
        "the panic is in the request metrics: {metrics}"
    );
    // The process goes on.
    let health = client.get(gateway.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_security_from_the_environment_starts_the_gateway_and_never_logs_the_password() {
    let broker = shared_broker();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "from-a-file-s3cret\n").unwrap();
    let gateway = Gateway::start(
        &broker.address(),
        &[
            ("VENUS__KAFKA__SECURITY__PROTOCOL", "SASL_PLAINTEXT".into()),
            ("VENUS__KAFKA__SECURITY__SASL_MECHANISM", "PLAIN".into()),
            ("VENUS__KAFKA__SECURITY__USERNAME", "venus".into()),
            (
                "VENUS__KAFKA__SECURITY__PASSWORD_FILE",
                secret.path().display().to_string(),
            ),
        ],
    );
    let health = reqwest::get(gateway.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200, "started with the SASL settings");
    // The plaintext broker refuses the SASL handshake: the gateway says so
    // in its log and /readyz, never with the password.
    let ready = reqwest::get(gateway.url("/readyz")).await.unwrap();
    let body = ready.text().await.unwrap();
    let log = gateway.rest_of_log(Duration::from_secs(3));
    assert!(!log.is_empty());
    for line in log.iter().chain([&body]) {
        assert!(!line.contains("s3cret"), "the password leaked: {line}");
    }
}

fn start_failure(env: &[(&str, String)]) -> (i32, String) {
    let output = command(env).output().expect("run venus");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn an_invalid_configuration_stops_start_up_naming_the_key() {
    let (code, stderr) = start_failure(&[("VENUS__SERVER__LISTEN", "not-an-address".into())]);
    assert_eq!(code, 2);
    assert!(stderr.contains("server.listen"), "{stderr}");

    let (code, stderr) = start_failure(&[("VENUS__KAFKA__COMPRESSION", "brotli".into())]);
    assert_eq!(code, 2);
    assert!(stderr.contains("kafka.compression"), "{stderr}");

    // The settings behind the delivery promise cannot be loosened.
    for (key, dotted) in [
        ("VENUS__KAFKA__PRODUCER__ACKS", "acks"),
        (
            "VENUS__KAFKA__PRODUCER__ENABLE_IDEMPOTENCE",
            "enable.idempotence",
        ),
        (
            "VENUS__KAFKA__PRODUCER__MESSAGE_TIMEOUT_MS",
            "message.timeout.ms",
        ),
    ] {
        let (code, stderr) = start_failure(&[(key, "1".into())]);
        assert_eq!(code, 2, "{key}");
        assert!(
            stderr.contains(&format!("{dotted} cannot be overridden")),
            "{stderr}"
        );
    }
}

#[test]
fn a_missing_geoip_database_is_named_at_start_up() {
    let (code, stderr) = start_failure(&[
        (
            "VENUS__SERVER__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
        ("VENUS__GEOIP__DATABASE", "/nonexistent/City.mmdb".into()),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/City.mmdb"), "{stderr}");
    assert!(stderr.contains("geoip/fetch.sh"), "{stderr}");
}

#[test]
fn a_log_filter_for_librdkafka_hides_no_other_line() {
    // librdkafka's log records went through the `log` bridge; one that every
    // layer's filter refused left per-layer filter state behind, and the next
    // line of that thread ("listening") vanished. `Gateway::start` waits for
    // that line.
    let broker = shared_broker();
    let gateway = Gateway::start(
        &broker.address(),
        &[(
            "VENUS__TELEMETRY__LOG_LEVEL",
            "info,librdkafka=warn".to_owned(),
        )],
    );
    assert!(gateway.child.id() > 0);
}
