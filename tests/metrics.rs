//! Upload counters as operators see them: `/metrics` after a scripted set of
//! uploads, a real Prometheus scraping the gateway, and the compose stack's
//! dashboard checked against the metrics the gateway really exports.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::dashboard::{dashboard_metric_names, is_ingester_metric, is_spool_metric};
use support::{free_port, shared_broker, unique_category, TestApp};

/// `name{labels} value` lines of the Prometheus text, by name and labels.
fn samples(text: &str, name: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((metric, labels)) => (metric, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name).then(|| (labels.to_owned(), value.parse().unwrap()))
        })
        .collect()
}

/// The value of `name` whose labels include every `label="value"` given.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .into_iter()
        .filter(|(series, _)| {
            labels
                .iter()
                .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn metrics_text(app: &TestApp) -> String {
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    response.text().await.unwrap()
}

/// Valid, partial, invalid, bad-meta and Kafka-failing uploads; returns the
/// app and the category the valid events used.
async fn scripted_uploads() -> (TestApp, String) {
    let broker = shared_broker();
    let (category, _) = support::fresh_topic("metrics").await;
    // No topic for this one: tansu does not create it; the gateway finds out
    // and fails the upload at once, without producing.
    let missing = unique_category("missing");
    let app = TestApp::spawn(support::settings(
        &broker.address(),
        &[("VENUS__KAFKA__DELIVERY_TIMEOUT_MS", "4000")],
    ))
    .await;
    let upload = |category: &str, data: Value| {
        json!({"meta": {"app_id": "a", "category": category}, "data": data}).to_string()
    };
    let valid = upload(
        &category,
        json!([{"id": "1", "ip": "81.2.69.142"}, {"id": "2", "ip": "10.0.0.1"}]),
    );
    assert_eq!(app.upload_json(&valid).await.status(), 200);
    let partial = upload(&category, json!([{"id": "1"}, {"id": "2", "ip": "x"}]));
    assert_eq!(app.upload_json(&partial).await.status(), 206);
    let invalid = upload(&category, json!([{"id": 1}, {"no": "id"}]));
    assert_eq!(app.upload_json(&invalid).await.status(), 400);
    let bad_meta = r#"{"meta":{"app_id":"a"},"data":[{"id":"1"}]}"#;
    assert_eq!(app.upload_json(bad_meta).await.status(), 400);
    let to_missing_topic = upload(&missing, json!([{"id": "1"}]));
    assert_eq!(app.upload_json(&to_missing_topic).await.status(), 503);
    (app, category)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_uploads_by_type_and_events_by_result() {
    let (app, category) = scripted_uploads().await;
    let text = metrics_text(&app).await;

    let uploads = |kind: &str| value(&text, "venus_uploads_total", &[("type", kind)]);
    assert_eq!(uploads("all_upload"), 5.0, "{text}");
    assert_eq!(uploads("success_upload"), 1.0);
    assert_eq!(uploads("partial_upload"), 1.0);
    assert_eq!(uploads("wrong_data"), 2.0);
    assert_eq!(uploads("wrong_meta"), 1.0);
    assert_eq!(uploads("kafka_error"), 1.0);

    let events = |result: &str| {
        value(
            &text,
            "venus_events_total",
            &[("category", &category), ("result", result)],
        )
    };
    assert_eq!(events("accepted"), 3.0);
    assert_eq!(events("invalid"), 3.0);
    assert_eq!(events("failed"), 0.0);
    assert_eq!(
        value(&text, "venus_events_total", &[("result", "failed")]),
        1.0
    );

    assert_eq!(
        value(&text, "venus_geoip_lookups_total", &[("result", "hit")]),
        1.0
    );
    assert_eq!(
        value(&text, "venus_geoip_lookups_total", &[("result", "invalid")]),
        1.0
    );
    // 10.0.0.1, and the client address (127.0.0.1) of two uploads.
    assert_eq!(
        value(&text, "venus_geoip_lookups_total", &[("result", "miss")]),
        3.0
    );
    // Of those four lookups the second of 127.0.0.1 was answered from the
    // cache of recent ones.
    let cache = |result: &str| value(&text, "venus_geoip_cache_total", &[("result", result)]);
    assert_eq!((cache("hit"), cache("miss")), (1.0, 3.0), "{text}");
    assert_eq!(value(&text, "venus_kafka_delivery_errors_total", &[]), 1.0);
    assert_eq!(
        value(
            &text,
            "http_server_request_duration_seconds_count",
            &[
                ("http_route", "/api/v1/upload"),
                ("http_response_status_code", "206")
            ]
        ),
        1.0
    );
    // Valid and partial were produced; the missing topic's upload was not.
    assert_eq!(
        value(&text, "venus_kafka_produce_duration_seconds_count", &[]),
        2.0
    );
    assert_eq!(value(&text, "venus_kafka_missing_topic_total", &[]), 1.0);
    assert_eq!(value(&text, "http_server_active_requests", &[]), 0.0);
    assert!(text.contains("venus_kafka_producer_queue_messages"));
    assert!(text.contains("venus_kafka_broker_tx_errors_total"));
    assert!(text.contains("venus_kafka_broker_tx_retries_total"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn category_labels_are_capped() {
    let broker = shared_broker();
    let app = TestApp::spawn(support::settings(
        &broker.address(),
        &[("VENUS__TELEMETRY__MAX_METRIC_CATEGORIES", "2")],
    ))
    .await;
    for category in ["c_one", "c_two", "c_three", "c_four"] {
        let bad = json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": 1}]});
        assert_eq!(app.upload_json(&bad.to_string()).await.status(), 400);
    }
    let text = metrics_text(&app).await;
    let categories: HashSet<String> = samples(&text, "venus_events_total")
        .keys()
        .filter_map(|labels| {
            let start = labels.find("category=\"")? + 10;
            Some(labels[start..start + labels[start..].find('"')?].to_owned())
        })
        .collect();
    assert_eq!(
        categories,
        HashSet::from(["c_one".into(), "c_two".into(), "other".into()])
    );
    assert_eq!(
        value(&text, "venus_events_total", &[("category", "other")]),
        2.0
    );
    app.stop().await;
}

/// A Prometheus server with its own storage, scraping one target.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: venus\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is not installed: run scripts/install-deps");
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// The answer to an instant query; `Null` while Prometheus is starting.
    async fn query(&self, query: &str) -> Value {
        let response = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query(&[("query", query)])
            .send()
            .await;
        match response {
            Ok(response) => response.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_gateway() {
    let (app, _) = scripted_uploads().await;
    let prometheus = Prometheus::start(&app.address.to_string());
    let query = "sum by (type) (venus_uploads_total)";
    let deadline = Instant::now() + Duration::from_secs(60);
    let by_type = loop {
        let answer = prometheus.query(query).await;
        let results = answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if results.len() >= 6 || Instant::now() > deadline {
            break results
                .iter()
                .map(|r| {
                    (
                        r["metric"]["type"].as_str().unwrap().to_owned(),
                        r["value"][1].as_str().unwrap().parse::<f64>().unwrap(),
                    )
                })
                .collect::<BTreeMap<String, f64>>();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let expected: BTreeMap<String, f64> = [
        ("all_upload", 5.0),
        ("kafka_error", 1.0),
        // Exported at 0 from start-up, like every counter.
        ("overloaded", 0.0),
        ("partial_upload", 1.0),
        ("rate_limited", 0.0),
        ("success_upload", 1.0),
        ("unauthorized", 0.0),
        ("wrong_data", 2.0),
        ("wrong_meta", 1.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(by_type, expected);
    app.stop().await;
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &Path) -> yaml_rust2::Yaml {
    let text = std::fs::read_to_string(path).unwrap();
    let mut docs = yaml_rust2::YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{}", path.display());
    docs.remove(0)
}

#[test]
fn the_compose_stack_is_pinned_and_mounts_only_what_the_repo_has() {
    let compose_dir = repo().join("compose");
    let compose = yaml(&compose_dir.join("docker-compose.yml"));
    let services = compose["services"].as_hash().expect("services");
    let names: HashSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for wanted in ["kafka", "venus", "jaeger", "prometheus", "grafana"] {
        assert!(names.contains(wanted), "service {wanted}");
    }
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if let Some(image) = service["image"].as_str() {
            let tag = image.rsplit_once(':').map(|(_, t)| t);
            let built_here = !service["build"].is_badvalue();
            assert!(
                built_here
                    || matches!(tag, Some(t) if t != "latest" && t.chars().any(|c| c.is_ascii_digit())),
                "{name}: image {image} is not pinned"
            );
        } else {
            assert!(
                !service["build"].is_badvalue(),
                "{name}: no image, no build"
            );
        }
        if let Some(build) = service["build"]["context"].as_str() {
            let context = compose_dir.join(build);
            let dockerfile = service["build"]["dockerfile"]
                .as_str()
                .unwrap_or("Dockerfile");
            assert!(context.join(dockerfile).is_file(), "{name}: {dockerfile}");
        }
        for volume in service["volumes"].as_vec().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') || source.starts_with('/') {
                assert!(
                    compose_dir.join(source).exists(),
                    "{name}: mounted path {source} is not in the repo"
                );
            }
        }
    }
    // The configuration files the stack mounts parse.
    yaml(&compose_dir.join("prometheus/prometheus.yml"));
    for entry in std::fs::read_dir(compose_dir.join("grafana/provisioning/datasources")).unwrap() {
        yaml(&entry.unwrap().path());
    }
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(":nonroot") || dockerfile.contains("USER "),
        "non-root runtime"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported_by_the_gateway() {
    let path = repo().join("compose/grafana/dashboards/venus-uploads.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .expect("the dashboard is valid JSON");
    assert_eq!(dashboard["title"], "Venus uploads");
    let links = dashboard["links"].to_string();
    assert!(
        links.contains("16686/search?service=venus"),
        "a link to Jaeger: {links}"
    );

    // The ingester's panels are checked against its own /metrics
    // (ingester/tests/ingest.rs).
    let used: HashSet<String> = dashboard_metric_names(&dashboard)
        .into_iter()
        .filter(|name| !is_ingester_metric(name) && !is_spool_metric(name))
        .collect();
    assert!(used.len() >= 8, "{used:?}");
    let (app, _) = scripted_uploads().await;
    let text = metrics_text(&app).await;
    let exported = support::dashboard::exported_names(&text);
    for name in &used {
        assert!(
            exported.contains(name.as_str()),
            "the dashboard uses {name}, which /metrics lacks"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_after_start_up_every_counter_the_dashboard_queries_is_there_at_0() {
    let counters: Vec<String> = dashboard_metric_names(&support::dashboard::dashboard())
        .into_iter()
        .filter(|name| {
            name.ends_with("_total") && !is_ingester_metric(name) && !is_spool_metric(name)
        })
        .collect();
    assert!(counters.len() >= 6, "{counters:?}");
    // With an allow-list the category labels are known up front too.
    let app = TestApp::spawn(support::settings(
        &shared_broker().address(),
        &[("VENUS__CATEGORIES", "page_view,click")],
    ))
    .await;
    let text = metrics_text(&app).await;
    for name in &counters {
        let found = samples(&text, name);
        assert!(!found.is_empty(), "{name} is missing right after start-up");
        assert!(
            found.values().all(|v| *v == 0.0),
            "{name} is not 0: {found:?}"
        );
    }
    for (labels, what) in [
        (r#"type="kafka_error""#, "venus_uploads_total"),
        (r#"reason="fenced""#, "venus_kafka_producer_restarts_total"),
        (r#"category="click",result="failed""#, "venus_events_total"),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(what) && l.contains(labels)),
            "{what}{{{labels}}} is missing: {text}"
        );
    }
    app.stop().await;
}
