//! Privacy at the edge, on the real binary: for each IP mode the address as
//! sent appears in no Kafka value or header, no log line, no exported span
//! and not in `/metrics`, while the location is still found; a batch marked
//! anonymous stores no address; field rules rewrite only their fields, and a
//! SIGHUP changes them for the next batch. (ClickHouse rows: the ingester's
//! `tests/privacy.rs`.)

mod support;

use std::time::{Duration, Instant};

use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use serde_json::{json, Value};

use support::gateway::Gateway;
use support::otlp::{self, Received};
use support::shared_broker;

/// The client, seen behind the test as a trusted proxy (London in the test
/// GeoIP data), and an address one event sends as its own (Linköping).
const CLIENT: &str = "81.2.69.142";
const OWN: &str = "89.160.20.112";
const KEY: &str = "a privacy test key, 32 bytes....";

/// Everything a message carries, as text: its value and its headers.
fn message_text(message: &OwnedMessage) -> String {
    let mut text = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            text.push_str(header.key);
            text.push_str(&String::from_utf8_lossy(header.value.unwrap_or_default()));
        }
    }
    text
}

/// The spans of `trace_id` (hex), once its server span (which ends last)
/// and at least `count` spans came.
fn spans_of(received: &Received, trace_id: &str, count: usize) -> String {
    let id: Vec<u8> = (0..trace_id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&trace_id[i..i + 2], 16).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = received.trace(&id);
        if spans.len() >= count && spans.iter().any(|s| s.name == "POST /api/v1/upload") {
            return format!("{spans:?}");
        }
        assert!(
            Instant::now() < deadline,
            "{} spans of {trace_id}",
            spans.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The gateway binary with `privacy` (YAML of the section) and `apps`,
/// trusting the test as its proxy and exporting spans to `collector`.
fn gateway(config: &tempfile::NamedTempFile, collector: &str) -> Gateway {
    Gateway::start_with(
        config.path(),
        &shared_broker().address(),
        &[
            ("VENUS__SERVER__TRUSTED_PROXIES", "127.0.0.1".into()),
            ("VENUS__TELEMETRY__OTLP_ENDPOINT", collector.to_owned()),
            ("VENUS__TELEMETRY__OTLP_METRICS", "false".into()),
            ("VENUS__PRIVACY__HASH_KEY", KEY.into()),
        ],
    )
}

/// Uploads `events` from `CLIENT` in a trace of its own; returns the trace
/// id and the reply.
async fn upload(
    gateway: &Gateway,
    category: &str,
    meta: Value,
    events: Value,
    anonymous_header: bool,
) -> (String, Value) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let mut meta = meta;
    meta["category"] = json!(category);
    let mut request = reqwest::Client::new()
        .post(gateway.url("/api/v1/upload"))
        .header("x-forwarded-for", CLIENT)
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .header("content-type", "application/json")
        .body(json!({"meta": meta, "data": events}).to_string());
    if anonymous_header {
        request = request.header("x-venus-anonymous", "1");
    }
    let response = request.send().await.unwrap();
    assert!([200, 206].contains(&response.status().as_u16()));
    (trace_id, response.json().await.unwrap())
}

fn hmac(input: &str) -> String {
    venus::privacy::HashKey::new(KEY.as_bytes())
        .unwrap()
        .hash(input.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_ip_mode_keeps_the_address_as_sent_out_of_kafka_logs_spans_and_metrics() {
    let broker = shared_broker();
    let (collector, received) = otlp::start();
    // keep is the control: there the addresses are everywhere the test looks,
    // so the test can see them when they leak.
    for (mode, client_stored, own_stored) in [
        ("keep", CLIENT.to_owned(), Some(OWN.to_owned())),
        (
            "truncate",
            "81.2.69.0".to_owned(),
            Some("89.160.20.0".to_owned()),
        ),
        ("hash", hmac(CLIENT), Some(hmac(OWN))),
        ("drop", String::new(), None),
    ] {
        let (category, topic) = support::fresh_topic(&format!("ip_{mode}")).await;
        let config = support::config_file(&format!("privacy:\n  ip: {mode}\n"));
        let gateway = gateway(&config, &collector);
        let (trace_id, reply) = upload(
            &gateway,
            &category,
            json!({"app_id": "a"}),
            // The third event's error (1002) is logged inside the request.
            json!([{"id": "client"}, {"id": "own", "ip": OWN}, {"id": "bad", "ip": "nowhere"}]),
            false,
        )
        .await;
        assert_eq!(reply["code"], 1, "{reply}");
        assert_eq!(reply["parts"][2]["code"], 1002, "{reply}");
        let messages = broker.read(&topic, 2, Duration::from_secs(3));
        assert_eq!(messages.len(), 2, "{mode}");
        let spans = spans_of(&received, &trace_id, 5);
        let metrics = gateway.metrics().await;
        let log = gateway_log(gateway);
        drop(config);
        for message in &messages {
            let value = support::value_json(message);
            let id = value["data"]["id"].as_str().unwrap().to_owned();
            let (stored, country) = if id == "client" {
                (client_stored.clone(), "GB")
            } else {
                (own_stored.clone().unwrap_or_default(), "SE")
            };
            assert_eq!(value["ip"], stored, "{mode} {id}: {value}");
            assert_eq!(value["country"], country, "{mode} {id}: located first");
            if id == "own" {
                assert_eq!(
                    value["data"].get("ip").and_then(Value::as_str),
                    own_stored.as_deref(),
                    "{mode}: the event's own ip member"
                );
            }
        }
        let kafka: String = messages.iter().map(message_text).collect();
        for (place, text) in [
            ("Kafka", &kafka),
            ("spans", &spans),
            ("metrics", &metrics),
            ("log", &log),
        ] {
            for address in [CLIENT, OWN] {
                let leaked = text.contains(address);
                if mode == "keep" {
                    if place == "Kafka" || (place == "spans" && address == CLIENT) {
                        assert!(leaked, "keep: {address} is in the {place}");
                    }
                } else {
                    assert!(!leaked, "{mode}: {address} in the {place}");
                }
            }
        }
        if mode == "truncate" {
            assert!(
                spans.contains("81.2.69.0"),
                "the span shows the stored address"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_batch_stores_no_address_in_any_mode() {
    let broker = shared_broker();
    let (collector, received) = otlp::start();
    let (category, topic) = support::fresh_topic("anonymous").await;
    let config = support::config_file("privacy:\n  ip: keep\n");
    let gateway = gateway(&config, &collector);
    let by_header = upload(
        &gateway,
        &category,
        json!({"app_id": "a"}),
        json!([{"id": "header"}, {"id": "header-own", "ip": OWN}]),
        true,
    )
    .await;
    let by_meta = upload(
        &gateway,
        &category,
        json!({"app_id": "a", "anonymous": true}),
        json!([{"id": "meta"}, {"id": "meta-own", "ip": OWN}]),
        false,
    )
    .await;
    let messages = broker.read(&topic, 4, Duration::from_secs(3));
    assert_eq!(messages.len(), 4);
    for message in &messages {
        let value = support::value_json(message);
        assert_eq!(value["ip"], "", "{value}");
        assert!(value["data"].get("ip").is_none(), "{value}");
        assert!(!message_text(message).contains(CLIENT));
        assert!(!message_text(message).contains(OWN));
        assert!(
            value["country"] == "GB" || value["country"] == "SE",
            "{value}"
        );
    }
    for (trace_id, _) in [&by_header, &by_meta] {
        let spans = spans_of(&received, trace_id, 5);
        assert!(!spans.contains(CLIENT) && !spans.contains(OWN), "{spans}");
    }
    let log = gateway_log(gateway);
    assert!(!log.contains(CLIENT) && !log.contains(OWN), "{log}");
    drop(config);
}

/// Stops the gateway and returns every log line it wrote.
fn gateway_log(mut gateway: Gateway) -> String {
    let _ = gateway.child.kill();
    let _ = gateway.child.wait();
    gateway.rest_of_log(Duration::from_secs(2)).join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_rules_rewrite_only_their_fields_and_a_sighup_changes_them() {
    let broker = shared_broker();
    let (collector, _received) = otlp::start();
    let (category, topic) = support::fresh_topic("fields").await;
    let rules = |email_action: &str| {
        format!(
            "privacy:\n  fields:\n    - {{path: data.email, action: {email_action}}}\n    - {{path: \"data.items[*].card\", action: remove}}\n    - {{path: meta.user, action: mask}}\n    - {{path: data.note, action: scrub}}\napps:\n  - app_id: special\n    privacy:\n      ip: drop\n      fields:\n        - {{path: data.secret, action: remove}}\n"
        )
    };
    let config = support::config_file(&rules("hash"));
    let gateway = gateway(&config, &collector);
    // The event as sent, compact, with values whose exact bytes must stay.
    let event = r#"{"id":"e1","email":"jane@example.com","n":1.50,"s":"caf\u00e9","nested":{"a": [1, 2 ,3]},"items":[{"sku":"x","card":"4111111111111111"},{"sku":"y"}],"note":"write to jane@example.com or call +44 20 7946 0958","secret":"kept"}"#;
    let send = |app_id: &str, id: &str| {
        let body = format!(
            r#"{{"meta":{{"app_id":"{app_id}","category":"{category}","user":"jane"}},"data":[{}]}}"#,
            event.replace("\"e1\"", &format!("\"{id}\""))
        );
        let url = gateway.url("/api/v1/upload");
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    };
    send("a", "first").await;
    send("special", "special").await;
    let messages = broker.read(&topic, 2, Duration::from_secs(3));
    assert_eq!(messages.len(), 2);
    let first = String::from_utf8_lossy(messages[0].payload().unwrap()).into_owned();
    let value: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(value["data"]["email"], hmac("jane@example.com"), "{first}");
    assert_eq!(value["data"]["items"], json!([{"sku": "x"}, {"sku": "y"}]));
    assert_eq!(value["meta"]["user"], "****");
    assert_eq!(value["meta"]["app_id"], "a");
    assert_eq!(value["data"]["note"], "write to [email] or call [phone]");
    assert_eq!(
        value["data"]["secret"], "kept",
        "the default rules do not name it"
    );
    // Members no rule names keep their bytes as sent.
    for untouched in [
        r#""id":"first""#,
        r#""n":1.50"#,
        r#""s":"caf\u00e9""#,
        r#""nested":{"a": [1, 2 ,3]}"#,
        r#""secret":"kept""#,
    ] {
        assert!(first.contains(untouched), "{untouched} in {first}");
    }
    assert!(!first.contains("jane@example.com") && !first.contains("4111111111111111"));
    // The app with rules of its own: only its rule, and no address.
    let special: Value = support::value_json(&messages[1]);
    assert!(special["data"].get("secret").is_none(), "{special}");
    assert_eq!(special["data"]["email"], "jane@example.com", "{special}");
    assert_eq!(special["meta"]["user"], "jane");
    assert_eq!(special["ip"], "");

    // A new rule by SIGHUP, for the next batch.
    support::write_config(config.path(), &rules("remove"));
    unsafe {
        libc::kill(gateway.child.id() as i32, libc::SIGHUP);
    }
    // (GeoIP reloads on the same signal, with a line of its own.)
    gateway.wait_for_line(
        |l| l["message"] == "auth, apps, rate_limits and privacy reloaded",
        Duration::from_secs(10),
    );
    send("a", "after").await;
    let messages = broker.read(&topic, 3, Duration::from_secs(3));
    let after: Value = support::value_json(&messages[2]);
    assert_eq!(after["data"]["id"], "after");
    assert!(after["data"].get("email").is_none(), "{after}");
    drop(gateway);
}
