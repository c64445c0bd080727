//! Who may write, end to end against a real broker: every `auth.mode` with
//! right, wrong, missing and revoked keys, categories per app, rate limits,
//! CORS, sendBeacon's body forms, and where a key must never show up.

mod support;

use std::time::Duration;

use rdkafka::Message;
use reqwest::header::HeaderMap;
use serde_json::Value;

use support::gateway::Gateway;
use support::{shared_broker, TestApp};

const IDLE: Duration = Duration::from_secs(3);

/// `sha256("shop-key-1")`, `sha256("shop-key-2")`, `sha256("blog-key")`.
const SHOP_KEY_1: &str = "shop-key-1";
const SHOP_KEY_2: &str = "shop-key-2";
const BLOG_KEY: &str = "blog-key";

fn digest(key: &str) -> String {
    venus::apps::keys::KeyDigest::of(key).to_hex()
}

/// `apps` with shop (keys 1 and `shop_keys`, any category) and blog (its
/// key, only `page_view`).
fn apps_yaml(mode: &str, shop_keys: &[&str], extra: &str) -> String {
    let shop = shop_keys
        .iter()
        .map(|k| format!("\"{}\"", digest(k)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "auth:\n  mode: {mode}\napps:\n  - app_id: shop\n    keys: [{shop}]\n  - app_id: blog\n    keys: [\"{}\"]\n    categories: [page_view]\n{extra}",
        digest(BLOG_KEY)
    )
}

fn batch(app: &str, category: &str, events: usize) -> String {
    let data: Vec<String> = (0..events)
        .map(|i| format!(r#"{{"id":"e{i}","ip":"81.2.69.142"}}"#))
        .collect();
    format!(
        r#"{{"meta":{{"app_id":"{app}","category":"{category}"}},"data":[{}]}}"#,
        data.join(",")
    )
}

/// How a key is sent.
#[derive(Clone, Copy, Debug)]
enum Via {
    Bearer,
    Header,
    Query,
}

async fn upload(
    app: &TestApp,
    document: &str,
    key: Option<(&str, Via)>,
) -> (u16, HeaderMap, Value) {
    let mut url = app.url("/api/v1/upload");
    let mut request = app.client.post(&url);
    match key {
        Some((key, Via::Bearer)) => request = request.bearer_auth(key),
        Some((key, Via::Header)) => request = request.header("x-venus-key", key),
        Some((key, Via::Query)) => {
            url.push_str(&format!("?key={key}"));
            request = app.client.post(&url);
        }
        None => {}
    }
    let response = request
        .header("content-type", "application/json")
        .body(document.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body: Value = response.json().await.expect("a JSON body");
    (status, headers, body)
}

async fn spawn(extra_yaml: &str, overrides: &[(&str, &str)]) -> (TestApp, tempfile::NamedTempFile) {
    let file = support::config_file(extra_yaml);
    let settings = support::settings_from(file.path(), &shared_broker().address(), overrides);
    (TestApp::spawn(settings).await, file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_mode_needs_the_apps_own_key_in_any_of_the_three_places() {
    let (category, topic) = support::fresh_topic("keys").await;
    let (app, _config) = spawn(&apps_yaml("keys", &[SHOP_KEY_1], ""), &[]).await;
    let shop = batch("shop", &category, 2);

    let mut accepted = 0;
    for via in [Via::Bearer, Via::Header, Via::Query] {
        let (status, _, body) = upload(&app, &shop, Some((SHOP_KEY_1, via))).await;
        assert_eq!(status, 200, "{via:?}: {body}");
        accepted += 2;
    }

    // Missing: refused before the body is read, 401 with the challenge.
    let (status, headers, body) = upload(&app, &shop, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(headers["www-authenticate"], "Bearer realm=\"venus\"");
    assert!(
        body["data"].as_str().unwrap().contains("key is required"),
        "{body}"
    );
    assert_eq!(body["code"], 2);
    assert_eq!(body["parts"], Value::Array(vec![]));

    // A key nobody holds: 401 before the body.
    let (status, headers, body) = upload(&app, &shop, Some(("guess", Via::Bearer))).await;
    assert_eq!(status, 401, "{body}");
    assert!(headers.contains_key("www-authenticate"));

    // Another app's key: 401 naming the app, once meta is read.
    let (status, _, body) = upload(&app, &shop, Some((BLOG_KEY, Via::Header))).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["data"].as_str().unwrap().contains("\"shop\""),
        "{body}"
    );

    // Not listed: 403, even with a valid key of a listed app.
    let (status, _, body) = upload(
        &app,
        &batch("stranger", &category, 1),
        Some((SHOP_KEY_1, Via::Query)),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["data"].as_str().unwrap().contains("\"stranger\""),
        "{body}"
    );

    // Nothing refused reached Kafka: exactly the accepted events did.
    let messages = shared_broker().read(&topic, accepted + 1, IDLE);
    assert_eq!(messages.len(), accepted);
    for message in &messages {
        assert_eq!(support::value_json(message)["meta"]["app_id"], "shop");
    }

    let metrics = app.metrics().await;
    assert_eq!(
        support::metric(&metrics, "venus_auth_checks_total", "result=\"ok\""),
        3.0
    );
    assert_eq!(
        support::metric(
            &metrics,
            "venus_auth_checks_total",
            "result=\"missing_key\""
        ),
        1.0
    );
    assert_eq!(
        support::metric(&metrics, "venus_auth_checks_total", "result=\"wrong_key\""),
        2.0
    );
    assert_eq!(
        support::metric(
            &metrics,
            "venus_auth_checks_total",
            "result=\"unknown_app\""
        ),
        1.0
    );
    assert_eq!(
        support::metric(&metrics, "venus_uploads_total", "type=\"unauthorized\""),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_apps_mode_refuses_unlisted_apps_and_needs_no_key() {
    let (category, topic) = support::fresh_topic("known").await;
    let (app, _config) = spawn(&apps_yaml("known_apps", &[SHOP_KEY_1], ""), &[]).await;
    let (status, _, body) = upload(&app, &batch("shop", &category, 1), None).await;
    assert_eq!(status, 200, "{body}");
    // A wrong key is ignored in this mode: the app is what counts.
    let (status, _, body) = upload(
        &app,
        &batch("shop", &category, 1),
        Some(("nonsense", Via::Bearer)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, headers, body) = upload(&app, &batch("stranger", &category, 1), None).await;
    assert_eq!(status, 403, "{body}");
    assert!(!headers.contains_key("www-authenticate"));
    assert_eq!(shared_broker().read(&topic, 3, IDLE).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_mode_takes_any_app_but_keeps_listed_apps_to_their_categories() {
    let (category, topic) = support::fresh_topic("off").await;
    let (app, _config) = spawn(&apps_yaml("off", &[SHOP_KEY_1], ""), &[]).await;
    for app_id in ["stranger", "shop"] {
        let (status, _, body) = upload(&app, &batch(app_id, &category, 1), None).await;
        assert_eq!(status, 200, "{app_id}: {body}");
    }
    // blog may only send page_view.
    let (status, _, body) = upload(&app, &batch("blog", &category, 1), None).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["data"]
            .as_str()
            .unwrap()
            .contains(&format!("category \"{category}\"")),
        "{body}"
    );
    assert_eq!(shared_broker().read(&topic, 3, IDLE).len(), 2);
    let metrics = app.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "venus_auth_checks_total",
            "result=\"category_not_allowed\""
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_category_not_allowed_for_the_app_is_403_in_keys_mode_too() {
    let (category, topic) = support::fresh_topic("blogcat").await;
    let (app, _config) = spawn(&apps_yaml("keys", &[SHOP_KEY_1], ""), &[]).await;
    let (status, _, body) = upload(
        &app,
        &batch("blog", &category, 1),
        Some((BLOG_KEY, Via::Bearer)),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(shared_broker().read(&topic, 1, IDLE).is_empty());
}

/// Uploads one event to `category` as an app of its own (its own bucket),
/// so that a rate-limit test's timed uploads after it do not include the
/// first upload to a fresh topic: that one waits for librdkafka to learn the
/// topic, which on a loaded machine took over a second, long enough for a
/// bucket to refill between two uploads that must meet it empty.
async fn warm_up(app: &TestApp, category: &str) {
    let (status, _, body) = upload(app, &batch("warm_up", category, 1), None).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_is_429_with_retry_after_and_passes_again_after_it() {
    let (category, topic) = support::fresh_topic("limited").await;
    let limits = "rate_limits:\n  default:\n    events_per_sec: 10\n    events_burst: 10\n";
    let (app, _config) = spawn(
        &apps_yaml("off", &[SHOP_KEY_1], limits),
        &[("VENUS__SERVER__MAX_EVENTS_PER_BATCH", "10")],
    )
    .await;
    warm_up(&app, &category).await;
    let full = batch("shop", &category, 10);
    let (status, _, body) = upload(&app, &full, None).await;
    assert_eq!(status, 200, "{body}");
    // The bucket is empty: the next full batch must wait about a second.
    let (status, headers, body) = upload(&app, &full, None).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], 2);
    assert!(
        body["data"].as_str().unwrap().contains("events per second"),
        "{body}"
    );
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "Retry-After: {wait}");
    // Another app has its own bucket.
    let (status, _, body) = upload(&app, &batch("other", &category, 10), None).await;
    assert_eq!(status, 200, "{body}");

    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (status, _, body) = upload(&app, &full, None).await;
    assert_eq!(status, 200, "after Retry-After: {body}");

    assert_eq!(shared_broker().read(&topic, 32, IDLE).len(), 31);
    let metrics = app.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "venus_rate_limited_total",
            "app=\"shop\",limit=\"events\""
        ),
        1.0
    );
    assert_eq!(
        support::metric(&metrics, "venus_uploads_total", "type=\"rate_limited\""),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_limit_counts_requests_not_events() {
    let (category, _topic) = support::fresh_topic("reqlimit").await;
    let limits = "    limits:\n      requests_per_sec: 1\n      requests_burst: 2\n";
    // The limit is shop's own (appended to its entry in `apps`).
    let yaml = format!("auth:\n  mode: off\napps:\n  - app_id: shop\n{limits}");
    let (app, _config) = spawn(&yaml, &[]).await;
    warm_up(&app, &category).await;
    let one = batch("shop", &category, 1);
    assert_eq!(upload(&app, &one, None).await.0, 200);
    assert_eq!(upload(&app, &one, None).await.0, 200);
    let (status, headers, body) = upload(&app, &one, None).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["data"]
            .as_str()
            .unwrap()
            .contains("requests per second"),
        "{body}"
    );
    assert_eq!(headers["retry-after"], "1");
    let metrics = app.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "venus_rate_limited_total",
            "app=\"shop\",limit=\"requests\""
        ),
        1.0
    );
}

/// Many made-up app ids through the gateway: the buckets kept stay at the
/// cap, and the gauge says so. (`apps::limits` pushes 100,000 ids through
/// the same code without HTTP.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_app_ids_keep_the_tracked_buckets_at_the_cap() {
    // A topic that does not exist: uploads pass the limiter, then fail fast
    // at Kafka (1004) without producing anything.
    let category = support::unique_category("nowhere");
    let limits = "rate_limits:\n  default:\n    requests_per_sec: 1000\n  max_tracked_apps: 200\n";
    let (app, _config) = spawn(&apps_yaml("off", &[SHOP_KEY_1], limits), &[]).await;
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let app = app.clone();
        let category = category.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                let id = format!("made-up-{worker}-{i}-{}", uuid::Uuid::new_v4().simple());
                let (status, _, _) = upload(&app, &batch(&id, &category, 1), None).await;
                assert!(status == 503 || status == 429, "{status}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let metrics = app.metrics().await;
    assert_eq!(
        support::metric(&metrics, "venus_rate_limit_tracked_apps", ""),
        200.0
    );
    assert_eq!(
        support::metric(&metrics, "venus_auth_checks_total", "result=\"ok\""),
        4000.0
            - support::metric(
                &metrics,
                "venus_auth_checks_total",
                "result=\"rate_limited\""
            )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_allows_the_listed_origin_and_the_sdk_headers_only() {
    let (app, _config) = spawn(
        "",
        &[
            (
                "VENUS__SERVER__CORS__ALLOWED_ORIGINS",
                "https://shop.example.com,http://127.0.0.1:9999",
            ),
            ("VENUS__SERVER__CORS__MAX_AGE_SECS", "1234"),
        ],
    )
    .await;
    let preflight = |origin: &str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/api/v1/upload"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,x-venus-key,authorization,traceparent,content-encoding,x-request-id",
            )
            .send()
    };
    let allowed = preflight("https://shop.example.com").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let headers = allowed.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example.com"
    );
    assert_eq!(headers["access-control-max-age"], "1234");
    let allow_headers = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for wanted in [
        "content-type",
        "x-venus-key",
        "authorization",
        "traceparent",
        "tracestate",
        "baggage",
        "content-encoding",
        "x-request-id",
    ] {
        assert!(
            allow_headers.contains(wanted),
            "{wanted} not in {allow_headers}"
        );
    }
    assert!(headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));

    let refused = preflight("https://evil.example.net").await.unwrap();
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin"),
        "{:?}",
        refused.headers()
    );

    // The upload itself carries the origin and the exposed headers.
    let (category, _) = support::fresh_topic("cors").await;
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("origin", "https://shop.example.com")
        .header("content-type", "application/json")
        .body(batch("shop", &category, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("retry-after"),
        "{exposed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_allowed_origins_there_are_no_cors_headers() {
    let (app, _config) = spawn("", &[]).await;
    let response = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/api/v1/upload"))
        .header("origin", "https://shop.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert!(!response
        .headers()
        .contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_beacon_body_is_accepted_as_text_and_as_a_form() {
    let (category, topic) = support::fresh_topic("beacon").await;
    let (app, _config) = spawn(&apps_yaml("keys", &[SHOP_KEY_1], ""), &[]).await;
    // sendBeacon(url, string): text/plain;charset=UTF-8, the key in the URL.
    let response = app
        .client
        .post(app.url(&format!("/api/v1/upload?key={SHOP_KEY_1}")))
        .header("content-type", "text/plain;charset=UTF-8")
        .body(batch("shop", &category, 2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    // sendBeacon(url, formData): multipart with a `batch` field.
    let form = reqwest::multipart::Form::new().text("batch", batch("shop", &category, 1));
    let response = app
        .client
        .post(app.url(&format!("/api/v1/upload?key={SHOP_KEY_1}")))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    // Same limits and errors as any body: bad JSON in text/plain is 400.
    let response = app
        .client
        .post(app.url(&format!("/api/v1/upload?key={SHOP_KEY_1}")))
        .header("content-type", "text/plain;charset=UTF-8")
        .body("{\"meta\":")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(shared_broker().read(&topic, 4, IDLE).len(), 3);
}

/// SIGHUP revokes a key without a restart; a broken configuration is
/// refused and the old keys stay in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_in_the_file_is_refused_after_sighup() {
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("revoke").await;
    let config = support::config_file(&apps_yaml("keys", &[SHOP_KEY_1], ""));
    let gateway = Gateway::start_with(config.path(), &broker.address(), &[]);
    let client = reqwest::Client::new();
    let send = |key: &'static str| {
        client
            .post(gateway.url("/api/v1/upload"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(batch("shop", &category, 1))
            .send()
    };
    assert_eq!(send(SHOP_KEY_1).await.unwrap().status(), 200);
    assert_eq!(send(SHOP_KEY_2).await.unwrap().status(), 401);

    // Rotate: key 2 in, key 1 out.
    support::write_config(config.path(), &apps_yaml("keys", &[SHOP_KEY_2], ""));
    signal(&gateway, libc::SIGHUP);
    gateway.wait_for_line(
        |l| l["message"] == "auth, apps, rate_limits and privacy reloaded",
        Duration::from_secs(10),
    );
    assert_eq!(send(SHOP_KEY_1).await.unwrap().status(), 401, "revoked");
    assert_eq!(send(SHOP_KEY_2).await.unwrap().status(), 200);

    // A file with a key in clear instead of a digest is refused whole.
    support::write_config(
        config.path(),
        "auth:\n  mode: keys\napps:\n  - app_id: shop\n    keys: [\"shop-key-1\"]\n",
    );
    signal(&gateway, libc::SIGHUP);
    let refused = gateway.wait_for_line(
        |l| l["message"] == "configuration reload refused; the old app policy stays in force",
        Duration::from_secs(10),
    );
    assert!(
        refused["error"].as_str().unwrap().contains("keys[0]"),
        "{refused}"
    );
    assert!(!refused.to_string().contains("shop-key-1\"]"), "{refused}");
    assert_eq!(send(SHOP_KEY_1).await.unwrap().status(), 401);
    assert_eq!(send(SHOP_KEY_2).await.unwrap().status(), 200);

    let metrics = gateway.metrics().await;
    assert_eq!(
        support::metric(&metrics, "venus_config_reloads_total", "result=\"loaded\""),
        1.0
    );
    assert_eq!(
        support::metric(
            &metrics,
            "venus_config_reloads_total",
            "result=\"rejected\""
        ),
        1.0
    );
    assert_eq!(broker.read(&topic, 4, IDLE).len(), 3);
}

fn signal(gateway: &Gateway, signal: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(gateway.child.id() as i32, signal);
    }
}

/// A key in the header, the bearer token or the URL never shows up in the
/// log (debug level), the spans, the metrics or Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_never_appears_in_logs_spans_metrics_or_kafka() {
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("secret").await;
    let (endpoint, received) = support::otlp::start();
    let secret = "s3cr3t-Key-that-must-not-leak";
    let wrong = "wr0ng-Key-that-must-not-leak";
    let config = support::config_file(&format!(
        "auth:\n  mode: keys\napps:\n  - app_id: shop\n    keys: [\"{}\"]\n",
        digest(secret)
    ));
    let mut gateway = Gateway::start_with(
        config.path(),
        &broker.address(),
        &[
            ("VENUS__TELEMETRY__OTLP_ENDPOINT", endpoint.clone()),
            ("VENUS__TELEMETRY__OTLP_METRICS", "true".into()),
            ("VENUS__TELEMETRY__METRICS_INTERVAL_MS", "500".into()),
            // Everything venus logs; the HTTP and OTLP clients' chatter
            // would only crowd out the lines that matter in the lossy writer.
            (
                "VENUS__TELEMETRY__LOG_LEVEL",
                "trace,rdkafka=off,librdkafka=off,hyper_util=off,reqwest=off,opentelemetry_sdk=off,opentelemetry_http=off,opentelemetry_otlp=off".into(),
            ),
        ],
    );
    let client = reqwest::Client::new();
    let url = gateway.url("/api/v1/upload");
    let document = batch("shop", &category, 1);
    let requests = [
        client.post(&url).bearer_auth(secret),
        client.post(&url).header("x-venus-key", secret),
        client.post(format!("{url}?key={secret}")),
        client.post(&url).bearer_auth(wrong),
        client.post(format!("{url}?key={wrong}")),
    ];
    let stranger = client.post(&url).bearer_auth(secret);
    let mut statuses = Vec::new();
    for request in requests {
        let response = request
            .header("content-type", "application/json")
            .body(document.clone())
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        let body = response.text().await.unwrap();
        assert!(!body.contains(secret) && !body.contains(wrong), "{body}");
    }
    // A valid key for an app it does not belong to: refused in the pipeline.
    let response = stranger
        .header("content-type", "application/json")
        .body(batch("stranger", &category, 1))
        .send()
        .await
        .unwrap();
    statuses.push(response.status().as_u16());
    assert_eq!(statuses, [200, 200, 200, 401, 401, 403]);
    let metrics = gateway.metrics().await;

    // Spans: wait for the six server spans.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while received
        .spans()
        .iter()
        .filter(|s| s.name.starts_with("POST"))
        .count()
        < 6
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the spans did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Stop the gateway so that every log line is out.
    signal(&gateway, libc::SIGTERM);
    let _ = gateway.child.wait();
    let log = gateway.rest_of_log(Duration::from_secs(5)).join("\n");
    let mut stderr = String::new();
    if let Some(mut pipe) = gateway.child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }

    let messages = broker.read(&topic, 4, IDLE);
    assert_eq!(messages.len(), 3);
    let mut kafka = String::new();
    for message in &messages {
        kafka.push_str(&String::from_utf8_lossy(
            message.payload().unwrap_or_default(),
        ));
        if let Some(headers) = message.headers() {
            use rdkafka::message::Headers;
            for header in headers.iter() {
                kafka.push_str(header.key);
                kafka.push_str(&String::from_utf8_lossy(header.value.unwrap_or_default()));
            }
        }
        kafka.push_str(&String::from_utf8_lossy(message.key().unwrap_or_default()));
    }
    let spans = format!("{:?}", received.spans());
    // The log did record these uploads, so its silence about the key means
    // something.
    assert!(
        log.contains("the key is not a valid write key")
            && log.contains("\"stranger\\\" is not allowed"),
        "the refusals are logged: {log}"
    );
    for (place, text) in [
        ("log", &log),
        ("metrics", &metrics),
        ("spans", &spans),
        ("stderr", &stderr),
        ("kafka", &kafka),
    ] {
        for key in [secret, wrong] {
            assert!(!text.contains(key), "the key is in the {place}");
            assert!(
                !text.contains(&digest(key)),
                "the key's digest is in the {place}"
            );
        }
    }
    assert!(
        spans.contains("authorize"),
        "the authorize spans were exported"
    );
}
