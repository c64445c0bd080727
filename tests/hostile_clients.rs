//! One client must never hurt the others: crafted bodies, slow bodies,
//! amplification and made-up categories, each next to a normal client that
//! must still get its 200. The gateway runs in-process on a real broker.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{shared_broker, TestApp};

async fn app_with(overrides: &[(&str, &str)]) -> TestApp {
    TestApp::spawn(support::settings(&shared_broker().address(), overrides)).await
}

fn batch(category: &str, ids: &[&str]) -> String {
    let data: Vec<Value> = ids.iter().map(|id| json!({"id": id})).collect();
    json!({"meta": {"app_id": "a", "category": category}, "data": data}).to_string()
}

async fn reply(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON reply"))
}

/// Sends `head` plus `body_start` on a raw connection and leaves it open.
async fn start_slow_upload(app: &TestApp, content_length: usize, body_start: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST /api/v1/upload HTTP/1.1\r\nHost: venus\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body_start).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_490_byte_stack_overflow_request_is_a_400_and_the_gateway_lives_on() {
    let (category, topic) = support::fresh_topic("crash").await;
    let app = app_with(&[]).await;
    // The reviewer's document: an escape that sonic-rs reads as `\u` plus
    // four bytes and the old nesting scan as two, then 200,000 brackets.
    let document = format!(
        r#"{{"meta":{{"app_id":"a","category":"{category}"}},"data":[{{"id":"x"}}],"s":"\u"abc","y":{}"#,
        "[".repeat(200_000)
    );
    let body = support::gzip(document.as_bytes());
    assert!(
        body.len() < 1024,
        "the attack is tiny: {} bytes",
        body.len()
    );
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, body) = reply(response).await;
    assert_eq!(status, 400, "{body}");
    let message = body["data"].as_str().unwrap();
    assert!(message.contains("invalid escape"), "{message}");
    assert!(message.contains(r#"\\u\"abc"#), "{message}");

    // Same process, next request.
    let (status, _) = reply(app.upload_json(&batch(&category, &["after"])).await).await;
    assert_eq!(status, 200);
    let messages = shared_broker().read(&topic, 1, Duration::from_secs(3));
    assert_eq!(messages.len(), 1, "only the normal upload reached Kafka");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_escapes_never_reach_kafka() {
    let (category, topic) = support::fresh_topic("escapes").await;
    let app = app_with(&[]).await;
    // \uZZZZ in meta, in an event's value, in an event's key: the batch is
    // not JSON, 400, nothing written.
    for document in [
        format!(
            r#"{{"meta":{{"app_id":"a","category":"{category}","x":"\uZZZZ"}},"data":[{{"id":"1"}}]}}"#
        ),
        format!(
            r#"{{"meta":{{"app_id":"a","category":"{category}"}},"data":[{{"id":"2"}},{{"id":"3","x":"\u12G4"}}]}}"#
        ),
        format!(
            r#"{{"meta":{{"app_id":"a","category":"{category}"}},"data":[{{"id":"4","\x":1}}]}}"#
        ),
    ] {
        let (status, body) = reply(app.upload_json(&document).await).await;
        assert_eq!(status, 400, "{document}: {body}");
        assert!(
            body["data"].as_str().unwrap().contains("invalid escape"),
            "{body}"
        );
    }
    // An unpaired surrogate is valid grammar: only its event fails (1001).
    let document = format!(
        r#"{{"meta":{{"app_id":"a","category":"{category}"}},"data":[{{"id":"lone","t":"\ud800"}},{{"id":"pair","t":"\ud83d\ude00"}}]}}"#
    );
    let (status, body) = reply(app.upload_json(&document).await).await;
    assert_eq!(status, 206, "{body}");
    assert_eq!(body["parts"][0]["code"], 1001);
    assert!(body["parts"][0]["data"]
        .as_str()
        .unwrap()
        .contains("unpaired UTF-16 surrogate"));
    assert_eq!(body["parts"][1]["code"], 0);

    let messages = shared_broker().read(&topic, 2, Duration::from_secs(3));
    assert_eq!(messages.len(), 1, "only the event with a proper pair");
    let value: Value = support::value_json(&messages[0]);
    assert_eq!(value["data"]["id"], "pair");
    assert_eq!(value["data"]["t"], "\u{1F600}", "standard parsers read it");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_too_many_events_is_refused_and_nothing_is_written() {
    let (category, topic) = support::fresh_topic("too_many").await;
    let app = app_with(&[]).await;
    let data = vec![json!({"id": "e"}); 100_001];
    let document = json!({"meta": {"app_id": "a", "category": category}, "data": data});
    let (status, body) = reply(app.upload_json(&document.to_string()).await).await;
    assert_eq!(status, 400);
    assert!(
        body["data"]
            .as_str()
            .unwrap()
            .contains("100001 events; at most 1000"),
        "{body}"
    );
    assert_eq!(body["parts"], json!([]));
    assert!(shared_broker()
        .read(&topic, 1, Duration::from_secs(2))
        .is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_cannot_take_the_upload_slots_of_a_normal_client() {
    let (category, topic) = support::fresh_topic("slow").await;
    let app = app_with(&[
        ("VENUS__SERVER__MAX_IN_FLIGHT_REQUESTS", "4"),
        ("VENUS__SERVER__BODY_RATE_GRACE_MS", "1500"),
        ("VENUS__SERVER__MIN_BODY_RATE_BYTES_PER_SEC", "1024"),
    ])
    .await;
    // Eight clients that send their headers and one byte of body.
    let mut slow = Vec::new();
    for _ in 0..8 {
        slow.push(start_slow_upload(&app, 1000, b"{").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The normal client gets its slot.
    let (status, body) = reply(app.upload_json(&batch(&category, &["fast"])).await).await;
    assert_eq!(status, 200, "{}", body["data"]);
    // The slow ones are let go after the grace, for their rate.
    for stream in &mut slow {
        let answer = support::read_to_close(stream, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.contains("slower than the minimum of 1024 bytes/s"),
            "{answer}"
        );
    }
    assert_eq!(
        shared_broker()
            .read(&topic, 1, Duration::from_secs(3))
            .len(),
        1
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_memory_is_a_budget_in_bytes() {
    let (category, _) = support::fresh_topic("budget").await;
    let app = app_with(&[
        ("VENUS__SERVER__MAX_BODY_BYTES", "50000"),
        ("VENUS__SERVER__MAX_IN_FLIGHT_BYTES", "170000"),
        ("VENUS__SERVER__MIN_BODY_RATE_BYTES_PER_SEC", "0"),
    ])
    .await;
    // Three uploads hold 45,000 bytes each of their bodies.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut body = b"{\"pad\":\"".to_vec();
        body.resize(45_000, b'x');
        held.push(start_slow_upload(&app, 49_000, &body).await);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = support::metric(&app.metrics().await, "venus_upload_memory_bytes", "");
        if used == 135_000.0 {
            break;
        }
        assert!(Instant::now() < deadline, "budget in use: {used:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One that needs more than the 35,000 bytes left (its body twice: as
    // received and as parsed): 503 at once.
    let ids: Vec<String> = (0..160)
        .map(|i| format!("{i}-{}", "i".repeat(100)))
        .collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let big = batch(&category, &ids);
    assert!(big.len() > 17_500, "{}", big.len());
    let (status, body) = reply(app.upload_json(&big).await).await;
    assert_eq!(status, 503, "{}", body["data"]);
    assert!(
        body["data"].as_str().unwrap().contains("memory budget"),
        "{body}"
    );
    // The held bodies go away: their bytes come back.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if support::metric(&app.metrics().await, "venus_upload_memory_bytes", "") == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the budget was not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = reply(app.upload_json(&big).await).await;
    assert_eq!(status, 200, "{}", body["data"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amplification_batch_is_refused_while_a_normal_client_goes_on() {
    let (category, topic) = support::fresh_topic("amplify").await;
    let app = app_with(&[]).await;
    // 990 KB of meta copied into 1,000 tiny events would ask the producer
    // for about 1 GB; gzip makes it a small body.
    let ids: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    let data: Vec<Value> = ids.iter().map(|id| json!({"id": id})).collect();
    let document = json!({
        "meta": {"app_id": "a", "category": category, "pad": "m".repeat(990_000)},
        "data": data,
    })
    .to_string();
    let body = support::gzip(document.as_bytes());
    assert!(body.len() < 10_000, "{}", body.len());
    let amplifier = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(body)
        .send();
    let normal_batch = batch(&category, &["normal"]);
    let normal = app.upload_json(&normal_batch);
    let (amplifier, normal) = tokio::join!(amplifier, normal);
    let (status, body) = reply(amplifier.unwrap()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["data"].as_str().unwrap().contains("meta is 990"),
        "{body}"
    );
    let (status, _) = reply(normal).await;
    assert_eq!(status, 200);
    let messages = shared_broker().read(&topic, 2, Duration::from_secs(3));
    assert_eq!(messages.len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_trace_headers_are_bounded_before_they_are_copied_into_every_message() {
    let (category, topic) = support::fresh_topic("headers").await;
    let app = app_with(&[]).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let huge_state = format!("v={}", "s".repeat(30_000));
    let fine_state = "vendor=abc";
    for (state, kept) in [(huge_state.as_str(), false), (fine_state, true)] {
        let response = app
            .client
            .post(app.url("/api/v1/upload"))
            .header("traceparent", traceparent)
            .header("tracestate", state)
            .header("content-type", "application/json")
            .body(batch(&category, &["1", "2", "3"]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let messages = shared_broker().read(&topic, 3, Duration::from_secs(3));
        let last = messages.last().unwrap();
        assert_eq!(
            support::header(last, "tracestate").as_deref(),
            kept.then_some(fine_state),
            "tracestate of {} bytes",
            state.len()
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_categories_create_no_topic() {
    // tansu never creates topics on first use, so this guards against the
    // gateway creating them itself; the producer's
    // `allow.auto.create.topics=false` (what stops a broker that would) is
    // checked in kafka::tests and cannot be overridden (config::tests).
    let broker = shared_broker();
    let app = app_with(&[("VENUS__KAFKA__DELIVERY_TIMEOUT_MS", "1500")]).await;
    let prefix = format!("madeup{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let uploads = (0..500).map(|i| {
        let category = format!("{prefix}_{i}");
        let app = &app;
        async move { app.upload_json(&batch(&category, &["x"])).await.status() }
    });
    let statuses = futures::future::join_all(uploads).await;
    assert!(statuses.iter().all(|s| s.as_u16() == 503), "{statuses:?}");
    let admin: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .create()
        .unwrap();
    let metadata =
        rdkafka::consumer::Consumer::fetch_metadata(&admin, None, Duration::from_secs(10)).unwrap();
    let created: Vec<&str> = metadata
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|name| name.contains(&prefix))
        .collect();
    assert!(created.is_empty(), "{created:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_idle_15_s_is_still_there_for_the_next_request() {
    // The defaults: a 10 s head timeout, a 75 s idle timeout. A balancer
    // that keeps idle connections 60 s must not find them closed.
    let app = app_with(&[]).await;
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: venus\r\n\r\n";
    let mut buffer = vec![0u8; 4096];
    for round in 0..2 {
        stream.write_all(request).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("an answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&buffer[..n]);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "round {round}: {answer}"
        );
        if round == 0 {
            tokio::time::sleep(Duration::from_secs(15)).await;
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_431_and_32_kib_of_headers_work() {
    let (category, _) = support::fresh_topic("heads").await;
    let app = app_with(&[]).await;
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("x-padding", "p".repeat(32 * 1024))
        .header("content-type", "application/json")
        .body(batch(&category, &["1"]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST /api/v1/upload HTTP/1.1\r\nHost: venus\r\nX-Padding: {}\r\nContent-Length: 0\r\n\r\n",
        "p".repeat(200 * 1024)
    );
    // The gateway may answer and close before it has read all of it.
    let _ = stream.write_all(head.as_bytes()).await;
    let answer = support::read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_count_in_the_size_of_a_message() {
    let (category, topic) = support::fresh_topic("sized").await;
    let app = app_with(&[("VENUS__KAFKA__MAX_MESSAGE_BYTES", "3000")]).await;
    // An event whose message value is about 2,500 bytes: it fits alone, but
    // not with 1,000 bytes of the caller's baggage in the headers.
    let event = json!({"id": "big", "pad": "p".repeat(2100)});
    let body = json!({"meta": {"app_id": "a", "category": category}, "data": [event]}).to_string();
    let baggage = format!("note={}", "b".repeat(1000));
    for (with_baggage, code) in [(false, 0), (true, 1003)] {
        let mut request = app
            .client
            .post(app.url("/api/v1/upload"))
            .header("content-type", "application/json")
            .body(body.clone());
        if with_baggage {
            request = request.header("baggage", &baggage);
        }
        let (_, reply) = reply(request.send().await.unwrap()).await;
        assert_eq!(reply["parts"][0]["code"], code, "{reply}");
        if code == 1003 {
            let reason = reply["parts"][0]["data"].as_str().unwrap();
            assert!(reason.contains("(value, key and headers)"), "{reason}");
        }
    }
    assert_eq!(
        shared_broker()
            .read(&topic, 2, Duration::from_secs(3))
            .len(),
        1
    );
    app.stop().await;
}
