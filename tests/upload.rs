//! The upload path end to end against a real broker: what the client gets
//! back and what lands in Kafka.

mod support;

use std::time::{Duration, Instant};

use rdkafka::message::Headers;
use rdkafka::Message;
use serde_json::{json, Value};

use support::{header, shared_broker, topic_of, unique_category, value_json, Broker, TestApp};

const IDLE: Duration = Duration::from_secs(3);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn app_on_shared_broker() -> TestApp {
    TestApp::spawn(support::settings(&shared_broker().address(), &[])).await
}

async fn body(response: reqwest::Response) -> Value {
    response.json().await.expect("a JSON body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_valid_batch_is_200_and_every_event_reaches_kafka_with_its_enrichment() {
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("valid").await;
    let app = app_on_shared_broker().await;

    // Raw event texts, kept byte for byte (spacing, number forms, key order).
    let events = [
        r#"{"id":"v4","ip":"81.2.69.142","n":1.50,"tags":["a","b"],"z":null}"#,
        r#"{"id":"v6","ip":"2a02:d280::7","timestamp":1700000000000}"#,
        r#"{ "id" : "private", "ip" : "10.1.2.3" }"#,
        r#"{"id":"mapped","ip":"::ffff:81.2.69.1"}"#,
        r#"{"id":"client"}"#,
    ];
    let meta = r#"{"app_id":"com.example.app","category":"CATEGORY","sdk":{"name":"ios","v":3}}"#
        .replace("CATEGORY", &category);
    let document = format!(r#"{{"meta":{meta},"data":[{}]}}"#, events.join(","));

    let before = now_ms();
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("x-request-id", "req-all-valid-1")
        .multipart(reqwest::multipart::Form::new().part(
            "batch",
            reqwest::multipart::Part::bytes(document.clone().into_bytes()).file_name("b.json"),
        ))
        .send()
        .await
        .unwrap();
    let after = now_ms();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-all-valid-1");
    assert_eq!(response.headers()["content-type"], "application/json");
    let reply = body(response).await;
    assert_eq!(reply["code"], 0);
    let parts = reply["parts"].as_array().unwrap();
    assert_eq!(parts.len(), events.len());
    let ids: Vec<&str> = parts.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["v4", "v6", "private", "mapped", "client"]);
    let mut backend_ids = Vec::new();
    for part in parts {
        assert_eq!(part["code"], 0, "{part}");
        let backend_id = uuid::Uuid::parse_str(part["backend_id"].as_str().unwrap()).unwrap();
        assert_eq!(backend_id.get_version_num(), 7);
        backend_ids.push(backend_id);
    }
    assert!(
        backend_ids.windows(2).all(|pair| pair[0] < pair[1]),
        "ordered within the batch: {backend_ids:?}"
    );

    let messages = broker.read(&topic, events.len(), IDLE);
    assert_eq!(
        messages.len(),
        events.len(),
        "exactly one message per event"
    );
    let expected_geo = [
        ("81.2.69.142", "GB", "England", "London"),
        ("2a02:d280::7", "CZ", "Hlavni mesto Praha", "Prague"),
        ("10.1.2.3", "", "", ""),
        ("81.2.69.1", "GB", "England", "London"),
        ("127.0.0.1", "", "", ""),
    ];
    for (index, message) in messages.iter().enumerate() {
        let value = value_json(message);
        let raw = std::str::from_utf8(message.payload().unwrap()).unwrap();
        let (ip, country, region, city) = expected_geo[index];
        assert_eq!(value["backend_id"], parts[index]["backend_id"]);
        let upload_time = value["upload_time"].as_u64().unwrap();
        assert!(
            before <= upload_time && upload_time <= after,
            "{upload_time}"
        );
        let (seconds, nanos) = backend_ids[index].get_timestamp().unwrap().to_unix();
        assert_eq!(
            seconds * 1000 + u64::from(nanos) / 1_000_000,
            upload_time,
            "the id's time is the upload time"
        );
        assert_eq!(value["ip"], ip);
        assert_eq!(value["country"], country);
        assert_eq!(value["region"], region);
        assert_eq!(value["city"], city);
        assert_eq!(value["meta"], serde_json::from_str::<Value>(&meta).unwrap());
        assert!(
            raw.contains(&format!(r#""meta":{meta}"#)),
            "meta as sent: {raw}"
        );
        assert!(
            raw.ends_with(&format!(r#""data":{}}}"#, events[index])),
            "event exactly as sent: {raw}"
        );
        assert_eq!(message.key(), None, "no key by default");

        let traceparent = header(message, "traceparent").expect("traceparent");
        let fields: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(fields.len(), 4, "{traceparent}");
        assert_eq!(fields[0], "00");
        assert_eq!(fields[1].len(), 32);
        assert_ne!(fields[1], "0".repeat(32));
        assert_eq!(fields[2].len(), 16);
        assert_eq!(
            header(message, "request_id").as_deref(),
            Some("req-all-valid-1")
        );
        assert_eq!(header(message, "tracestate"), None, "the caller sent none");
        assert_eq!(header(message, "baggage"), None, "the caller sent none");
        let names: Vec<&str> = message
            .headers()
            .map(|h| h.iter().map(|h| h.key).collect())
            .unwrap_or_default();
        assert_eq!(
            names,
            ["traceparent", "request_id"],
            "nothing else per message"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_is_206_and_only_valid_events_reach_kafka() {
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("mixed").await;
    let app = app_on_shared_broker().await;
    let document = json!({
        "meta": {"app_id": "a", "category": category},
        "data": [
            {"id": "ok-1", "ip": "81.2.69.142"},
            {"id": "bad-ip", "ip": "999.1.1.1"},
            {"no_id": true},
            {"id": "ok-2"},
            {"id": "ok-1"},
            {"id": "bad-ts", "timestamp": "yesterday"},
        ]
    })
    .to_string();
    let response = app.upload_multipart(&document).await;
    assert_eq!(response.status(), 206);
    assert!(response.headers().get("retry-after").is_none());
    let reply = body(response).await;
    assert_eq!(reply["code"], 1);
    let codes: Vec<i64> = reply["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [0, 1002, 1001, 0, 1001, 1001]);
    let parts = reply["parts"].as_array().unwrap();
    assert!(parts[1]["data"].as_str().unwrap().contains("999.1.1.1"));
    assert!(parts[2]["data"]
        .as_str()
        .unwrap()
        .contains("id is required"));
    assert!(parts[2]["id"].is_null() && parts[2]["backend_id"].is_null());
    assert!(parts[4]["data"]
        .as_str()
        .unwrap()
        .contains("more than once"));
    assert!(parts[5]["data"].as_str().unwrap().contains("timestamp"));

    let messages = broker.read(&topic, 2, IDLE);
    let ids: Vec<String> = messages.iter().map(support::event_id).collect();
    assert_eq!(ids, ["ok-1", "ok-2"]);
    let backend_ids: Vec<Value> = messages
        .iter()
        .map(|m| value_json(m)["backend_id"].clone())
        .collect();
    assert_eq!(
        backend_ids,
        [
            parts[0]["backend_id"].clone(),
            parts[3]["backend_id"].clone()
        ]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_invalid_batch_is_400_and_nothing_reaches_kafka() {
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("invalid").await;
    let app = app_on_shared_broker().await;
    let document = json!({
        "meta": {"app_id": "a", "category": category},
        "data": [{"id": 1}, {"id": "x", "ip": "not-an-ip"}, "text"]
    })
    .to_string();
    let response = app.upload_json(&document).await;
    assert_eq!(response.status(), 400);
    let reply = body(response).await;
    assert_eq!(reply["code"], 2);
    let codes: Vec<i64> = reply["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [1001, 1002, 1001]);
    assert!(broker.read(&topic, 1, IDLE).is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_part_gzip_body_and_json_body_are_accepted() {
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("gzip").await;
    let app = app_on_shared_broker().await;
    let document = |id: &str| {
        json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": id}]}).to_string()
    };

    // A gzip file part, marked by its content type.
    let part = reqwest::multipart::Part::bytes(support::gzip(document("gz-part").as_bytes()))
        .file_name("batch.json.gz")
        .mime_str("application/gzip")
        .unwrap();
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .multipart(reqwest::multipart::Form::new().part("batch", part))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A gzip part marked by its Content-Encoding header.
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("content-encoding", "gzip".parse().unwrap());
    let part = reqwest::multipart::Part::bytes(support::gzip(document("gz-encoded").as_bytes()))
        .file_name("batch.json")
        .headers(headers);
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .multipart(reqwest::multipart::Form::new().part("batch", part))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A plain JSON body, and a gzip JSON body.
    assert_eq!(app.upload_json(&document("json")).await.status(), 200);
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(support::gzip(document("json-gz").as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let mut ids: Vec<String> = broker
        .read(&topic, 4, IDLE)
        .iter()
        .map(support::event_id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["gz-encoded", "gz-part", "json", "json-gz"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_clear_json_error() {
    let app = TestApp::spawn(support::settings(
        &shared_broker().address(),
        &[("VENUS__SERVER__MAX_BODY_BYTES", "2000")],
    ))
    .await;

    async fn check(response: reqwest::Response, status: u16, needle: &str) {
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["content-type"], "application/json");
        let reply: Value = response.json().await.unwrap();
        assert_eq!(reply["code"], 2);
        assert_eq!(reply["parts"], json!([]));
        let message = reply["data"].as_str().unwrap();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }

    // 413: too large on the wire, and too large once inflated.
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(5000));
    check(app.upload_json(&big).await, 413, "larger than 2000 bytes").await;
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(support::gzip(big.as_bytes()))
        .send()
        .await
        .unwrap();
    check(response, 413, "after decompression").await;
    check(app.upload_multipart(&big).await, 413, "larger than").await;

    // 415: neither multipart nor JSON (nor text/plain, which sendBeacon sends).
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("content-type", "text/csv")
        .body("hello")
        .send()
        .await
        .unwrap();
    check(response, 415, "Content-Type").await;

    // 400: invalid JSON, missing part, bad meta, empty data.
    check(app.upload_json("{\"meta\": {").await, 400, "not valid JSON").await;
    check(app.upload_multipart("{oops").await, 400, "JSON").await;
    let form = reqwest::multipart::Form::new().text("other", "{}");
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    check(response, 400, "no part named \"batch\"").await;
    check(
        app.upload_json(r#"{"meta":{"app_id":"a"},"data":[{"id":"1"}]}"#)
            .await,
        400,
        "meta.category is required",
    )
    .await;
    check(
        app.upload_json(r#"{"meta":{"app_id":"a","category":"c"},"data":[]}"#)
            .await,
        400,
        "at least one event",
    )
    .await;
    check(
        app.upload_json(r#"{"meta":{"app_id":"a","category":"c"},"data":"x"}"#)
            .await,
        400,
        "data must be an array",
    )
    .await;

    // Nesting deep enough to overflow a recursive parser: a 400, and the
    // gateway lives on to answer the next request.
    let deep = format!(
        r#"{{"meta":{{"app_id":"a","category":"c"}},"data":[{}{}]}}"#,
        "[".repeat(300),
        "]".repeat(300)
    );
    check(
        app.upload_json(&deep).await,
        400,
        "more than 32 levels deep",
    )
    .await;

    // Invalid UTF-8 inside an event: a clear 400, not a dropped connection.
    let mut bytes =
        br#"{"meta":{"app_id":"a","category":"c"},"data":[{"id":"x","note":"?"}]}"#.to_vec();
    let at = bytes.iter().position(|b| *b == b'?').unwrap();
    bytes[at] = 0xc3;
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("content-type", "application/json")
        .body(bytes)
        .send()
        .await
        .unwrap();
    check(response, 400, "not valid UTF-8").await;

    // Unknown routes and methods answer in the same shape.
    let response = app.client.get(app.url("/nope")).send().await.unwrap();
    check(response, 404, "/api/v1/upload").await;
    let response = app
        .client
        .get(app.url("/api/v1/upload"))
        .send()
        .await
        .unwrap();
    check(response, 405, "POST /api/v1/upload").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let app = app_on_shared_broker().await;
    let response = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let ready: Value = response.json().await.unwrap();
    assert_eq!(ready["geoip"], "Venus-Test-City");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_key_can_be_the_backend_id_or_a_meta_field() {
    let broker = shared_broker();
    for (key, expected) in [("backend_id", None), ("meta.app_id", Some("keyed-app"))] {
        let category = unique_category("key");
        let topic = topic_of(&category);
        broker.create_topic(&topic).await;
        let app = TestApp::spawn(support::settings(
            &broker.address(),
            &[("VENUS__KAFKA__KEY", key)],
        ))
        .await;
        let document = json!({
            "meta": {"app_id": "keyed-app", "category": category},
            "data": [{"id": "k"}]
        })
        .to_string();
        let reply = body(app.upload_json(&document).await).await;
        assert_eq!(reply["code"], 0);
        let messages = broker.read(&topic, 1, IDLE);
        assert_eq!(messages.len(), 1);
        let got = std::str::from_utf8(messages[0].key().unwrap()).unwrap();
        let want = expected.unwrap_or_else(|| reply["parts"][0]["backend_id"].as_str().unwrap());
        assert_eq!(got, want, "key {key}");
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_stopped_uploads_get_503_with_retry_after_within_the_delivery_timeout() {
    let mut broker = Broker::start();
    let category = unique_category("down");
    broker.create_topic(&topic_of(&category)).await;
    let app = TestApp::spawn(support::settings(
        &broker.address(),
        &[("VENUS__KAFKA__DELIVERY_TIMEOUT_MS", "3000")],
    ))
    .await;
    let document = json!({
        "meta": {"app_id": "a", "category": category},
        "data": [{"id": "1"}, {"id": "2"}]
    })
    .to_string();
    // Warm up: the producer's first contact with a new broker is not what
    // this test measures.
    let warm_until = Instant::now() + Duration::from_secs(20);
    while app.upload_json(&document).await.status() != 200 {
        assert!(Instant::now() < warm_until, "the broker never acknowledged");
    }

    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 200, "ready while the broker runs");

    broker.stop();
    let started = Instant::now();
    let response = app.upload_json(&document).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    assert!(
        elapsed < Duration::from_millis(3000 + 500),
        "answered after {elapsed:?}"
    );
    let reply = body(response).await;
    assert_eq!(reply["code"], 2);
    for part in reply["parts"].as_array().unwrap() {
        assert_eq!(part["code"], 1004, "{part}");
    }

    // The cached "ready" (one second) has expired by now.
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let ready: Value = response.json().await.unwrap();
    assert!(
        ready["reason"].as_str().unwrap().contains("Kafka"),
        "{ready}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_for_a_kafka_message_gets_1003_and_is_not_sent() {
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("toolarge").await;
    let app = TestApp::spawn(support::settings(
        &broker.address(),
        &[("VENUS__KAFKA__MAX_MESSAGE_BYTES", "600")],
    ))
    .await;
    let document = json!({
        "meta": {"app_id": "a", "category": category},
        "data": [{"id": "small"}, {"id": "big", "pad": "x".repeat(1000)}]
    })
    .to_string();
    let response = app.upload_json(&document).await;
    assert_eq!(response.status(), 206);
    let reply = body(response).await;
    let parts = reply["parts"].as_array().unwrap();
    assert_eq!(parts[0]["code"], 0);
    assert_eq!(parts[1]["code"], 1003);
    assert!(
        parts[1]["data"].as_str().unwrap().contains("at most 600"),
        "{}",
        parts[1]["data"]
    );
    let messages = broker.read(&topic, 2, IDLE);
    assert_eq!(messages.len(), 1, "only the small event is in Kafka");
    assert_eq!(value_json(&messages[0])["data"]["id"], "small");
    app.stop().await;
}

/// Sends `head` (and no more) on a raw connection and returns what the
/// gateway answered before closing, or panics if it kept the connection
/// open for `patience`.
async fn stalled_request(app: &TestApp, head: &str, patience: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(patience, stream.read_to_end(&mut answer))
        .await
        .expect("the gateway held a stalled connection open")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_are_cut_off_by_the_idle_header_and_body_timeouts() {
    let app = TestApp::spawn(support::settings(
        &shared_broker().address(),
        &[
            ("VENUS__SERVER__IDLE_TIMEOUT_MS", "2500"),
            ("VENUS__SERVER__HEADER_READ_TIMEOUT_MS", "500"),
            ("VENUS__SERVER__BODY_TIMEOUT_MS", "500"),
        ],
    ))
    .await;
    // A new connection that says nothing at all: closed when its first
    // head has not come within the head timeout, not the idle timeout.
    let started = Instant::now();
    stalled_request(&app, "", Duration::from_secs(6)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );

    // A keep-alive connection left idle after a request: the same.
    let started = Instant::now();
    let answer = stalled_request(
        &app,
        "GET /healthz HTTP/1.1\r\nHost: venus\r\n\r\n",
        Duration::from_secs(6),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );

    // Headers that never end: the head timer, from their first byte.
    let started = Instant::now();
    stalled_request(
        &app,
        "POST /api/v1/upload HTTP/1.1\r\nHost: venus\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(started.elapsed() < Duration::from_millis(1500));

    // A body that never comes: 408 in the usual JSON shape.
    let answer = stalled_request(
        &app,
        "POST /api/v1/upload HTTP/1.1\r\nHost: venus\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"meta\":",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":2"#), "{answer}");
    assert!(answer.contains("did not arrive within 500 ms"), "{answer}");
    app.stop().await;
}
