//! A real browser as a client: headless Chromium loads a page from another
//! origin on the loopback, which uploads a batch with `fetch` (a key header,
//! so the browser sends a CORS preflight first) and one with
//! `navigator.sendBeacon` (the key in the query). Both batches are read back
//! from Kafka. The same page served from an origin that is not allowed has
//! its `fetch` refused by the browser, and nothing of it reaches Kafka.

mod support;

use std::time::Duration;

use axum::extract::State;
use axum::response::Html;
use axum::routing::{get, post};
use serde_json::Value;
use tokio::sync::mpsc;

use support::browser::Browser;
use support::{shared_broker, TestApp};

const KEY: &str = "browser-key-7c1f";

/// The page: upload with fetch, then with sendBeacon (unless `beacon` is
/// false), then report what the browser saw to `/result` on its own origin.
fn page(upload_url: &str, category: &str, label: &str, beacon: bool) -> String {
    format!(
        r#"<!doctype html><meta charset="utf-8"><title>venus browser test</title>
<script>
const upload = {upload:?};
const key = {KEY:?};
function batch(id) {{
  return JSON.stringify({{meta: {{app_id: "web", category: {category:?}}}, data: [{{id: id, page: location.href}}]}});
}}
async function run() {{
  const report = {{label: {label:?}}};
  try {{
    const response = await fetch(upload, {{
      method: "POST",
      headers: {{"Content-Type": "application/json", "X-Venus-Key": key, "X-Request-ID": {label:?} + "-fetch"}},
      body: batch({label:?} + "-fetch"),
    }});
    report.status = response.status;
    report.request_id = response.headers.get("X-Request-ID");
    report.body = await response.json();
  }} catch (error) {{
    report.error = String(error);
  }}
  if ({beacon}) {{
    report.beacon_queued = navigator.sendBeacon(upload + "?key=" + encodeURIComponent(key), batch({label:?} + "-beacon"));
  }}
  await fetch("/result", {{method: "POST", body: JSON.stringify(report)}});
}}
run();
</script>"#,
        upload = upload_url,
    )
}

async fn report(results: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(60), results.recv())
        .await
        .expect("the page did not report within 60 s")
        .expect("a report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_uploads_with_fetch_and_sendbeacon() {
    let broker = shared_broker();
    let (category, topic) = support::fresh_topic("browser").await;

    // Two page servers: the allowed origin and one that is not.
    let (allowed_tx, mut allowed_results) = mpsc::unbounded_channel();
    let (refused_tx, mut refused_results) = mpsc::unbounded_channel();
    // The gateway must know the allowed origin before it starts, and the
    // page must know the gateway's address: bind the page servers first
    // with placeholder pages, then fill them in through a shared cell.
    let pages = std::sync::Arc::new(std::sync::Mutex::new((String::new(), String::new())));
    let allowed_origin = serve_dynamic(pages.clone(), 0, allowed_tx).await;
    let refused_origin = serve_dynamic(pages.clone(), 1, refused_tx).await;

    let digest = venus::apps::keys::KeyDigest::of(KEY).to_hex();
    let config = support::config_file(&format!(
        "auth:\n  mode: keys\napps:\n  - app_id: web\n    keys: [\"{digest}\"]\n"
    ));
    let settings = support::settings_from(
        config.path(),
        &broker.address(),
        &[(
            "VENUS__SERVER__CORS__ALLOWED_ORIGINS",
            allowed_origin.as_str(),
        )],
    );
    let app = TestApp::spawn(settings).await;
    let upload_url = app.url("/api/v1/upload");
    {
        let mut pages = pages.lock().unwrap();
        pages.0 = page(&upload_url, &category, "allowed", true);
        pages.1 = page(&upload_url, &category, "refused", false);
    }

    let browser = Browser::open(&format!("{allowed_origin}/"));
    let seen = report(&mut allowed_results).await;
    assert_eq!(seen["status"], 200, "{seen}");
    assert_eq!(seen["body"]["code"], 0, "{seen}");
    assert_eq!(
        seen["request_id"], "allowed-fetch",
        "X-Request-ID is exposed: {seen}"
    );
    assert_eq!(seen["beacon_queued"], true, "{seen}");
    // The browser sends a queued beacon when it gets to it: keep it open
    // until both uploads are in Kafka.
    let messages = broker.read(&topic, 2, Duration::from_secs(20));
    let mut ids: Vec<String> = messages.iter().map(support::event_id).collect();
    ids.sort();
    assert_eq!(ids, ["allowed-beacon", "allowed-fetch"]);
    drop(browser);

    let browser = Browser::open(&format!("{refused_origin}/"));
    let seen = report(&mut refused_results).await;
    assert!(
        seen["error"]
            .as_str()
            .is_some_and(|e| e.contains("Failed to fetch")),
        "the browser must refuse the upload from an origin not allowed: {seen}"
    );
    assert!(seen.get("status").is_none(), "{seen}");
    drop(browser);

    // Kafka still has the fetch and the beacon of the allowed page only.
    let messages = broker.read(&topic, 3, Duration::from_secs(5));
    let mut ids: Vec<String> = messages.iter().map(support::event_id).collect();
    ids.sort();
    assert_eq!(ids, ["allowed-beacon", "allowed-fetch"]);
}

/// A page server whose page is read from `pages` (slot 0 or 1) per request.
async fn serve_dynamic(
    pages: std::sync::Arc<std::sync::Mutex<(String, String)>>,
    slot: usize,
    results: mpsc::UnboundedSender<Value>,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let router = axum::Router::new()
        .route(
            "/",
            get(move || async move {
                let pages = pages.lock().unwrap();
                Html(if slot == 0 {
                    pages.0.clone()
                } else {
                    pages.1.clone()
                })
            }),
        )
        .route(
            "/result",
            post(
                |State(results): State<mpsc::UnboundedSender<Value>>, body: String| async move {
                    let _ = results.send(serde_json::from_str(&body).unwrap_or(Value::Null));
                },
            ),
        )
        .with_state(results);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    origin
}
