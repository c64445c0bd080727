//! One client must never hurt the others: crafted bodies, slow bodies,
//! stalled bodies, silent sockets, floods, amplification and made-up or
//! reserved categories, each next to a normal client that must still get
//! its 200. The gateway runs in-process on a real broker, or as the real
//! binary where sockets of several client addresses are involved (all of
//! 127.0.0.0/8 reaches this machine, so a test binds 127.0.0.2 to be
//! another client).

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use support::gateway::Gateway;
use support::{shared_broker, TestApp};

/// A client address of its own on this machine.
fn address(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A TCP connection to `to` from client address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// An HTTP client whose connections come from `from`.
fn client_from(from: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from)
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Whether the server closed `stream` (EOF or reset) within `patience`.
async fn closed_within(stream: &mut TcpStream, patience: Duration) -> bool {
    let mut buffer = [0u8; 1024];
    match tokio::time::timeout(patience, stream.read(&mut buffer)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => panic!("the server sent bytes to a silent socket"),
        Err(_) => false,
    }
}

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
    // Sixty-four clients, sixteen times the upload slots, that send their
    // headers and then a byte every 200 ms until the grace is nearly over:
    // never stalled, always too slow.
    let mut slow = Vec::new();
    for _ in 0..64 {
        slow.push(start_slow_upload(&app, 1000, b"{").await);
    }
    let trickling = tokio::spawn(async move {
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            for stream in &mut slow {
                let _ = stream.write_all(b" ").await;
            }
        }
        slow
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The normal client gets its slot, more than once.
    for id in ["fast-1", "fast-2", "fast-3"] {
        let (status, body) = reply(app.upload_json(&batch(&category, &[id])).await).await;
        assert_eq!(status, 200, "{}", body["data"]);
    }
    // The slow ones are let go after the grace, for their rate.
    let mut slow = trickling.await.unwrap();
    for stream in &mut slow {
        let answer = answer_of(stream, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.contains("slower than the minimum of 1024 bytes/s"),
            "{answer}"
        );
    }
    assert_eq!(
        shared_broker()
            .read(&topic, 3, Duration::from_secs(3))
            .len(),
        3
    );
    app.stop().await;
}

/// Like [`start_slow_upload`], from client address `from`.
async fn start_slow_upload_from(
    app: &TestApp,
    from: IpAddr,
    content_length: usize,
    body_start: &[u8],
) -> TcpStream {
    let mut stream = connect_from(from, app.address).await.unwrap();
    let head = format!(
        "POST /api/v1/upload HTTP/1.1\r\nHost: venus\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body_start).await.unwrap();
    stream
}

/// Waits until the budget gauge reads `bytes`.
async fn budget_reaches(app: &TestApp, bytes: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = support::metric(&app.metrics().await, "venus_upload_memory_bytes", "");
        if used == bytes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "budget in use: {used}, not {bytes}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_memory_is_a_budget_in_bytes_with_a_share_per_client_address() {
    let (category, _) = support::fresh_topic("budget").await;
    let app = app_with(&[
        ("VENUS__SERVER__MAX_BODY_BYTES", "50000"),
        ("VENUS__SERVER__MAX_IN_FLIGHT_BYTES", "300000"),
        ("VENUS__SERVER__MAX_IN_FLIGHT_BYTES_PER_CLIENT", "170000"),
        ("VENUS__SERVER__MIN_BODY_RATE_BYTES_PER_SEC", "0"),
    ])
    .await;
    let pad = |n: usize| {
        let mut body = b"{\"pad\":\"".to_vec();
        body.resize(n, b'x');
        body
    };
    // One address holds three bodies of 45,000 bytes.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(start_slow_upload_from(&app, address(1), 49_000, &pad(45_000)).await);
    }
    budget_reaches(&app, 135_000.0).await;
    // An upload that needs more than the 35,000 bytes left of its share (its
    // body twice: as received and as parsed).
    let ids: Vec<String> = (0..160)
        .map(|i| format!("{i}-{}", "i".repeat(100)))
        .collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let big = batch(&category, &ids);
    assert!(big.len() > 17_500, "{}", big.len());
    let upload_from = |from: IpAddr| {
        client_from(from)
            .post(app.url("/api/v1/upload"))
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
    };
    // From the same address: 429, its share is spent.
    let (status, body) = reply(upload_from(address(1)).await.unwrap()).await;
    assert_eq!(status, 429, "{}", body["data"]);
    assert!(
        body["data"].as_str().unwrap().contains("its share"),
        "{body}"
    );
    // From another address: 200, the budget has room.
    let (status, body) = reply(upload_from(address(2)).await.unwrap()).await;
    assert_eq!(status, 200, "{}", body["data"]);
    // A second address holds three more: 270,000 of 300,000 in use, and
    // the whole budget, not a share, is what refuses now (503).
    for _ in 0..3 {
        held.push(start_slow_upload_from(&app, address(3), 49_000, &pad(45_000)).await);
    }
    budget_reaches(&app, 270_000.0).await;
    let (status, body) = reply(upload_from(address(2)).await.unwrap()).await;
    assert_eq!(status, 503, "{}", body["data"]);
    assert!(
        body["data"].as_str().unwrap().contains("memory budget"),
        "{body}"
    );
    // The held bodies go away: their bytes come back.
    drop(held);
    budget_reaches(&app, 0.0).await;
    let (status, body) = reply(upload_from(address(1)).await.unwrap()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_categories_are_refused_and_nothing_reaches_any_topic() {
    let broker = shared_broker();
    // The topics a write would land in exist, so that only the gateway's
    // refusal can keep them empty.
    let dead_letters = "to_analyzer__0.__dead_letter";
    let anything = format!(
        "__anything_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let configured = format!("dlq_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    for topic in [
        dead_letters.to_owned(),
        support::topic_of(&anything),
        support::topic_of(&configured),
    ] {
        broker.create_topic(&topic).await;
    }
    let (normal, normal_topic) = support::fresh_topic("beside_reserved").await;
    // An ingester whose dead-letter topic is named like an event topic.
    let configured_topic = support::topic_of(&configured);
    let app = app_with(&[("VENUS__INGESTER__DEAD_LETTER_TOPIC", &configured_topic)]).await;
    for (category, why) in [
        ("__dead_letter", "reserved for the system's own topics"),
        (anything.as_str(), "reserved for the system's own topics"),
        (configured.as_str(), "names the dead-letter topic"),
    ] {
        let (status, body) = reply(app.upload_json(&batch(category, &["1", "2"])).await).await;
        assert_eq!(status, 400, "{category}: {body}");
        assert!(
            body["data"].as_str().unwrap().contains(why),
            "{category}: {body}"
        );
        assert_eq!(body["parts"], json!([]), "{category}");
    }
    let (status, body) = reply(app.upload_json(&batch(&normal, &["ok"])).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        broker.read(&normal_topic, 1, Duration::from_secs(3)).len(),
        1
    );
    for topic in [
        dead_letters.to_owned(),
        support::topic_of(&anything),
        configured_topic,
    ] {
        let written = broker.read(&topic, 1, Duration::from_secs(2));
        let ours: Vec<_> = written
            .iter()
            .filter(|m| support::value_json(m)["meta"]["app_id"] == "a")
            .collect();
        assert!(ours.is_empty(), "{topic} holds {} of ours", ours.len());
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_of_one_peer_take_only_its_share_and_close_at_the_head_timeout() {
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("silent").await;
    let gateway = Gateway::start(
        &broker.address(),
        &[
            ("VENUS__SERVER__MAX_CONNECTIONS", "8".into()),
            ("VENUS__SERVER__MAX_CONNECTIONS_PER_PEER", "4".into()),
            ("VENUS__SERVER__HEADER_READ_TIMEOUT_MS", "2000".into()),
        ],
    );
    let target: SocketAddr = ([127, 0, 0, 1], gateway.port).into();
    let attacker = address(1);
    // As many silent sockets as max_connections, from one address.
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(connect_from(attacker, target).await.unwrap());
    }
    // Past its share of 4 the peer's connections are closed at once.
    let closed = futures::future::join_all(
        silent
            .iter_mut()
            .map(|stream| closed_within(stream, Duration::from_millis(400))),
    )
    .await;
    let refused = closed.iter().filter(|closed| **closed).count();
    assert_eq!(refused, 4, "connections past the peer's share: {closed:?}");
    // Another address gets its 200 at once.
    let started = Instant::now();
    let response = client_from(address(2))
        .post(gateway.url("/api/v1/upload"))
        .header("content-type", "application/json")
        .body(batch(&category, &["other-peer"]))
        .send()
        .await
        .expect("another peer is served");
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The same address is at its share until the silent ones are closed...
    let same = client_from(attacker)
        .post(gateway.url("/api/v1/upload"))
        .header("content-type", "application/json")
        .body(batch(&category, &["too-early"]))
        .send()
        .await;
    assert!(same.is_err(), "the peer is at its share: {same:?}");
    // ...which is at the head timeout (2 s), not the idle timeout (75 s).
    for stream in &mut silent {
        assert!(
            closed_within(stream, Duration::from_secs(5)).await,
            "a silent socket outlived the head timeout"
        );
    }
    let lived = opened.elapsed();
    assert!(
        lived >= Duration::from_millis(1500) && lived < Duration::from_secs(6),
        "closed after {lived:?}"
    );
    let response = client_from(attacker)
        .post(gateway.url("/api/v1/upload"))
        .header("content-type", "application/json")
        .body(batch(&category, &["same-peer-later"]))
        .send()
        .await
        .expect("the peer is served again");
    assert_eq!(response.status(), 200);
    let ids: Vec<String> = broker
        .read(&topic, 2, Duration::from_secs(3))
        .iter()
        .map(support::event_id)
        .collect();
    assert_eq!(ids, ["other-peer", "same-peer-later"]);
    let metrics = gateway.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "venus_connections_refused_total",
            r#"limit="max_connections_per_peer""#
        ),
        5.0,
        "four silent sockets and the early upload"
    );
}

/// What the server sent on `stream` until it closed it. A server that
/// answers before it has read the whole body closes with unread bytes, which
/// the kernel turns into a reset after the answer: the answer counts.
async fn answer_of(stream: &mut TcpStream, patience: Duration) -> String {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buffer[..n]),
            Err(_) => panic!("the server kept the connection open past {patience:?}"),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Opens an upload of `length` bytes from `from` and sends all of it but
/// its last 1,000 bytes, then stops.
async fn stalled_upload(from: IpAddr, to: SocketAddr, length: usize) -> TcpStream {
    let mut stream = connect_from(from, to).await.unwrap();
    let head = format!(
        "POST /api/v1/upload HTTP/1.1\r\nHost: venus\r\nContent-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut body = b"{\"pad\":\"".to_vec();
    body.resize(length - 1000, b'x');
    // The gateway may answer (429) and close before it has read it all.
    let _ = stream.write_all(&body).await;
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_large_bodies_of_one_address_hold_only_its_share_and_get_408_at_the_stall_time() {
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("stalled").await;
    // Nine stalled bodies of ~1 MB would hold more than the whole 8 MB
    // budget; one address may hold 3 MB of it.
    let gateway = Gateway::start(
        &broker.address(),
        &[
            ("VENUS__SERVER__MAX_BODY_BYTES", "1000000".into()),
            ("VENUS__SERVER__MAX_IN_FLIGHT_BYTES", "8000000".into()),
            (
                "VENUS__SERVER__MAX_IN_FLIGHT_BYTES_PER_CLIENT",
                "3000000".into(),
            ),
            ("VENUS__SERVER__BODY_STALL_TIMEOUT_MS", "2000".into()),
        ],
    );
    let target: SocketAddr = ([127, 0, 0, 1], gateway.port).into();
    let stalled_at = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..9 {
        stalled.push(stalled_upload(address(1), target, 1_000_000).await);
    }
    // Until the gateway has read what they sent: the budget in use stops
    // growing (without a share it would be the whole 8 MB).
    let mut last = -1.0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = support::metric(&gateway.metrics().await, "venus_upload_memory_bytes", "");
        if held == last && held > 0.0 {
            break;
        }
        assert!(
            stalled_at.elapsed() < Duration::from_millis(1500),
            "still reading"
        );
        last = held;
    }
    // The victim, from another address, with a body of 400 KB.
    let data: Vec<Value> = (0..1000)
        .map(|i| json!({"id": i.to_string(), "pad": "v".repeat(400)}))
        .collect();
    let big = json!({"meta": {"app_id": "a", "category": category}, "data": data}).to_string();
    assert!(big.len() > 400_000, "{}", big.len());
    let response = client_from(address(2))
        .post(gateway.url("/api/v1/upload"))
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{}", body["data"]);
    // While stalled, the address holds no more than its share.
    let held = support::metric(&gateway.metrics().await, "venus_upload_memory_bytes", "");
    assert!(held > 0.0 && held <= 3_000_000.0, "held {held}");
    // Each stalled body is answered: 429 at once past the share, 408 at the
    // stall time for those within it, long before the 30 s body timeout.
    let mut answers = Vec::new();
    for stream in &mut stalled {
        answers.push(answer_of(stream, Duration::from_secs(8)).await);
    }
    let waited = stalled_at.elapsed();
    let stalls = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 408"))
        .count();
    let over_share = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 429"))
        .count();
    assert_eq!(stalls + over_share, 9, "{answers:?}");
    assert!(
        (1..=3).contains(&stalls),
        "{stalls} within the share: {answers:?}"
    );
    for answer in answers.iter().filter(|a| a.starts_with("HTTP/1.1 408")) {
        assert!(answer.contains("made no progress for 2000 ms"), "{answer}");
    }
    for answer in answers.iter().filter(|a| a.starts_with("HTTP/1.1 429")) {
        assert!(
            answer.contains("its share of the gateway's memory"),
            "{answer}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
    }
    assert!(waited >= Duration::from_millis(1900), "{waited:?}");
    assert!(waited < Duration::from_secs(8), "{waited:?}");
    // Every byte of the budget comes back.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = gateway.metrics().await;
        if support::metric(&metrics, "venus_upload_memory_bytes", "") == 0.0 {
            assert_eq!(
                support::metric(&metrics, "venus_upload_body_stalls_total", ""),
                stalls as f64
            );
            break;
        }
        assert!(Instant::now() < deadline, "the budget was not given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        broker.read(&topic, 1001, Duration::from_secs(3)).len(),
        1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_known_apps_mode_a_flood_from_one_address_cannot_drain_a_listed_apps_limit() {
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("flood").await;
    let config = support::config_file(
        "auth:\n  mode: known_apps\napps:\n  - app_id: a\n    limits: {requests_per_sec: 20, requests_burst: 20}\nrate_limits:\n  per_client: {requests_per_sec: 3, requests_burst: 3}\n",
    );
    let app = TestApp::spawn(support::settings_from(
        config.path(),
        &broker.address(),
        &[],
    ))
    .await;
    let upload = |client: reqwest::Client, id: String| {
        let url = app.url("/api/v1/upload");
        let body = batch(&category, &[&id]);
        async move {
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").cloned();
            let body: Value = response.json().await.unwrap();
            (status, retry_after, body)
        }
    };
    // A stranger who knows the public app_id floods from one address.
    let stranger = client_from(address(2));
    let mut passed = 0;
    for i in 0..60 {
        let (status, retry_after, body) = upload(stranger.clone(), format!("flood-{i}")).await;
        match status {
            200 => passed += 1,
            429 => {
                assert!(
                    body["data"]
                        .as_str()
                        .unwrap()
                        .contains("this client address is over its limit"),
                    "{body}"
                );
                assert!(retry_after.is_some());
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!((3..=5).contains(&passed), "{passed} of the flood passed");
    // The app's own users, from another address, are not affected.
    let user = client_from(address(3));
    for i in 0..3 {
        let (status, _, body) = upload(user.clone(), format!("user-{i}")).await;
        assert_eq!(status, 200, "{body}");
    }
    let metrics = app.metrics().await;
    assert!(
        support::metric(
            &metrics,
            "venus_rate_limited_total",
            r#"limit="client_requests""#
        ) >= 55.0,
        "{metrics}"
    );
    assert_eq!(
        support::metric(&metrics, "venus_rate_limited_total", r#"limit="requests""#),
        0.0
    );
    let written = broker.read(&topic, passed + 3, Duration::from_secs(3));
    assert_eq!(written.len(), passed + 3);
    app.stop().await;
}
