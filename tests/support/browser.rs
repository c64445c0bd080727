//! The browser SDK's test harness, shared by the gateway's and the
//! ingester's browser tests: the SDK's script-tag build (built with npm when
//! missing), a page server on its own origin whose pages load it, count its
//! uploads and warnings and report to the test, and headless Chromium.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Broker, TestApp};

pub const KEY: &str = "sdk-key-5d2a";

/// `sdk/js/dist/venus.iife.js`, built first when missing (`npm ci` and
/// `npm run build`; scripts/test builds it before the tests).
pub fn sdk() -> String {
    let dir = super::repo_root().join("sdk/js");
    let built: PathBuf = dir.join("dist/venus.iife.js");
    if !built.exists() {
        for args in [&["ci"][..], &["run", "build"][..]] {
            let status = Command::new("npm")
                .args(args)
                .current_dir(&dir)
                .status()
                .expect("npm (scripts/install-deps installs it)");
            assert!(status.success(), "npm {args:?} in sdk/js failed");
        }
    }
    std::fs::read_to_string(built).unwrap()
}

/// What the page server shares with the test.
#[derive(Clone)]
pub struct Pages {
    /// Path → HTML.
    pub html: Arc<Mutex<HashMap<String, String>>>,
    pub results: mpsc::UnboundedSender<Value>,
    /// What `GET /go` answers: "1" once the test lets the page go on.
    pub go: Arc<AtomicBool>,
}

/// The page server (the pages' origin); returns its origin.
pub async fn serve(pages: Pages) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let script = sdk();
    let router = axum::Router::new()
        .route(
            "/venus.js",
            get(move || async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "text/javascript")],
                    script,
                )
                    .into_response()
            }),
        )
        .route(
            "/go",
            get(|State(pages): State<Pages>| async move {
                if pages.go.load(Ordering::Relaxed) {
                    "1"
                } else {
                    "0"
                }
            }),
        )
        .route(
            "/result",
            post(|State(pages): State<Pages>, body: String| async move {
                let _ = pages
                    .results
                    .send(serde_json::from_str(&body).unwrap_or(Value::Null));
            }),
        )
        .fallback(
            |State(pages): State<Pages>, uri: axum::http::Uri| async move {
                let html = pages.html.lock().unwrap();
                Html(html.get(uri.path()).cloned().unwrap_or_default())
            },
        )
        .with_state(pages);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    origin
}

/// A page that loads the SDK, counts its uploads and warnings, then runs
/// `body` (with `venus`, `upload`, `report(obj)` and `stats` in scope).
/// The SDK takes the page's `fetch` when it starts: setting
/// `stats.fetchOff` makes every upload by `fetch` fail from then on.
pub fn page(upload: &str, category: &str, key: &str, options: &str, body: &str) -> String {
    format!(
        r#"<!doctype html><meta charset="utf-8"><title>venus sdk test</title>
<script src="/venus.js"></script>
<script>
const upload = {upload:?};
const stats = {{uploads: 0, statuses: [], warnings: [], headers: null, fetchOff: false}};
const realFetch = window.fetch.bind(window);
window.fetch = async (url, init) => {{
  if (String(url).startsWith(upload)) {{
    if (stats.fetchOff) throw new TypeError("fetch is off in this test");
    stats.uploads += 1;
    if (!stats.headers) stats.headers = Object.assign({{}}, init.headers);
    const response = await realFetch(url, init);
    stats.statuses.push(response.status);
    return response;
  }}
  return realFetch(url, init);
}};
const warn = console.warn.bind(console);
console.warn = (...args) => {{ stats.warnings.push(args.join(" ")); warn(...args); }};
const report = (obj) => realFetch("/result", {{method: "POST", body: JSON.stringify(Object.assign({{stats}}, obj))}});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const client = venus.init(Object.assign({{endpoint: upload, appId: "web", category: {category:?}, key: {key:?}}}, {options}));
(async () => {{ {body} }})().catch((e) => report({{error: String(e)}}));
</script>"#
    )
}

/// Headless Chromium on `url`, until dropped.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn open(url: &str) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let binary = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .expect("no Chromium: run scripts/install-deps (Debian package `chromium`)");
        let mut command = Command::new(binary);
        command
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
            ])
            // DevTools on a port of its own choosing, written to
            // `DevToolsActivePort` in the profile: how a test closes a tab.
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Self {
            child: super::spawn_tied_to_tests(command),
            _profile: profile,
        }
    }
}

impl Browser {
    /// The DevTools HTTP endpoint (`http://127.0.0.1:<port>`), once Chromium
    /// has written its port.
    async fn devtools(&self) -> String {
        let file = self._profile.path().join("DevToolsActivePort");
        for _ in 0..100 {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Some(port) = text.lines().next().filter(|p| !p.is_empty()) {
                    return format!("http://127.0.0.1:{port}");
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("Chromium wrote no DevToolsActivePort");
    }

    /// Opens a blank tab in front: the browser then outlives a tab the
    /// test closes, and the pages behind it are hidden from then on.
    pub async fn open_blank_tab(&self) {
        let devtools = self.devtools().await;
        let blank = reqwest::Client::new()
            .put(format!("{devtools}/json/new?about:blank"))
            .send()
            .await
            .expect("DevTools answers");
        assert!(blank.status().is_success(), "new tab: {}", blank.status());
    }

    /// Closes the tab whose URL starts with `url`, as a user closing it
    /// does (DevTools' close: the page's unload runs, `pagehide` fires).
    pub async fn close_tab(&self, url: &str) {
        let devtools = self.devtools().await;
        let targets = self.targets().await;
        let id = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url)))
            .and_then(|t| t["id"].as_str())
            .unwrap_or_else(|| panic!("no tab on {url}: {targets}"))
            .to_owned();
        let closed = reqwest::Client::new()
            .get(format!("{devtools}/json/close/{id}"))
            .send()
            .await
            .unwrap();
        assert!(closed.status().is_success(), "close: {}", closed.status());
    }

    /// What DevTools lists: the tabs (`"type": "page"`) and workers.
    async fn targets(&self) -> Value {
        let devtools = self.devtools().await;
        let list = reqwest::get(format!("{devtools}/json/list"))
            .await
            .expect("DevTools answers");
        list.json()
            .await
            .expect("DevTools lists its targets as JSON")
    }

    /// How many page tabs are open.
    pub async fn tabs(&self) -> usize {
        self.targets()
            .await
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["type"] == "page")
            .count()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn report(results: &mut mpsc::UnboundedReceiver<Value>, within: Duration) -> Value {
    let value = tokio::time::timeout(within, results.recv())
        .await
        .expect("the page did not report in time")
        .expect("a report");
    assert!(value.get("error").is_none(), "the page failed: {value}");
    value
}

/// A gateway with keys on (the app `web` with [`KEY`]), CORS for `origin`,
/// a 3 s delivery timeout, and `extra` on top.
pub async fn gateway(broker: &Broker, origin: &str, extra: &[(&str, &str)]) -> TestApp {
    let digest = venus::apps::keys::KeyDigest::of(KEY).to_hex();
    let config = super::config_file(&format!(
        "auth:\n  mode: keys\napps:\n  - app_id: web\n    keys: [\"{digest}\"]\n"
    ));
    let mut overrides = vec![
        ("VENUS__SERVER__CORS__ALLOWED_ORIGINS", origin),
        ("VENUS__KAFKA__DELIVERY_TIMEOUT_MS", "3000"),
    ];
    overrides.extend_from_slice(extra);
    let mut settings = super::settings_from(config.path(), &broker.address(), &overrides);
    // One message per record batch: tansu skips the rest of a batch when a
    // consumer's fetch starts inside one (docs/INGESTER.md).
    settings
        .kafka
        .producer
        .insert("batch.num.messages".into(), "1".into());
    TestApp::spawn(settings).await
}

/// The test's page server, a gateway for it (with `extra`), and the
/// channel of reports.
pub async fn setup(
    broker: &Broker,
    extra: &[(&str, &str)],
) -> (Pages, String, TestApp, mpsc::UnboundedReceiver<Value>) {
    let (results, receiver) = mpsc::unbounded_channel();
    let pages = Pages {
        html: Arc::default(),
        results,
        go: Arc::default(),
    };
    let origin = serve(pages.clone()).await;
    let app = gateway(broker, &origin, extra).await;
    (pages, origin, app, receiver)
}

/// A JSON array of strings.
pub fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}
