//! The gateway through broker trouble, as an operator would see it: the
//! real binary, eight clients uploading in a loop, and a broker of the
//! test's own that is paused (SIGSTOP) and resumed (SIGCONT).

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::gateway::Gateway;
use support::{Broker, TestApp};

/// One answered upload.
#[derive(Debug, Clone)]
struct Upload {
    sent: Instant,
    answered: Instant,
    status: u16,
    /// Event ids answered 0.
    accepted: Vec<String>,
}

/// Clients uploading 20-event batches in a loop until `stop`.
fn load(
    gateway: &Gateway,
    category: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<Upload>>>, Vec<tokio::task::JoinHandle<()>>) {
    let uploads = Arc::new(Mutex::new(Vec::new()));
    let url = gateway.url("/api/v1/upload");
    let tasks = (0..clients)
        .map(|client| {
            let (uploads, url, stop) = (uploads.clone(), url.clone(), stop.clone());
            let category = category.to_owned();
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let ids: Vec<String> = (0..20)
                        .map(|i| format!("c{client}-r{round}-e{i}"))
                        .collect();
                    let data: Vec<Value> = ids.iter().map(|id| json!({"id": id})).collect();
                    let body =
                        json!({"meta": {"app_id": "load", "category": category}, "data": data});
                    let sent = Instant::now();
                    let Ok(response) = http.post(&url).json(&body).send().await else {
                        panic!("an upload got no answer");
                    };
                    let status = response.status().as_u16();
                    let reply: Value = response.json().await.expect("a JSON reply");
                    let accepted = reply["parts"]
                        .as_array()
                        .map(|parts| {
                            parts
                                .iter()
                                .zip(&ids)
                                .filter(|(part, _)| part["code"] == 0)
                                .map(|(_, id)| id.clone())
                                .collect()
                        })
                        .unwrap_or_default();
                    uploads.lock().unwrap().push(Upload {
                        sent,
                        answered: Instant::now(),
                        status,
                        accepted,
                    });
                    if status != 200 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            })
        })
        .collect();
    (uploads, tasks)
}

/// `/readyz` answers: when each was taken and its status.
type Readiness = Arc<Mutex<Vec<(Instant, u16)>>>;

/// `/readyz` statuses every 200 ms until `stop`.
fn watch_readiness(
    gateway: &Gateway,
    stop: Arc<AtomicBool>,
) -> (Readiness, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let url = gateway.url("/readyz");
    let task = tokio::spawn({
        let seen = seen.clone();
        async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(response) = http.get(&url).send().await {
                    seen.lock()
                        .unwrap()
                        .push((Instant::now(), response.status().as_u16()));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    (seen, task)
}

async fn restarts(gateway: &Gateway) -> f64 {
    support::metric(
        &gateway.metrics().await,
        "venus_kafka_producer_restarts_total",
        "",
    )
}

/// Every event answered 0 is in the topic.
fn assert_all_accepted_are_in_kafka(broker: &Broker, topic: &str, uploads: &[Upload]) {
    let accepted: HashSet<&str> = uploads
        .iter()
        .flat_map(|u| u.accepted.iter().map(String::as_str))
        .collect();
    assert!(!accepted.is_empty());
    let messages = broker.read(topic, accepted.len(), Duration::from_secs(10));
    let found: HashSet<String> = messages.iter().map(support::event_id).collect();
    let missing: Vec<&&str> = accepted
        .iter()
        .filter(|id| !found.contains(**id))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} accepted events are not in Kafka, e.g. {missing:?}",
        accepted.iter().filter(|id| !found.contains(**id)).count(),
        accepted.len()
    );
}

async fn start(broker: &Broker, category: &str) -> Gateway {
    broker.create_topic(&support::topic_of(category)).await;
    Gateway::start(
        &broker.address(),
        &[
            ("VENUS__KAFKA__DELIVERY_TIMEOUT_MS", "5000".into()),
            (
                "VENUS__TELEMETRY__LOG_LEVEL",
                "info,rdkafka=off,librdkafka=off".into(),
            ),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_pause_longer_than_the_delivery_timeout_uploads_recover_within_5_s() {
    let broker = Broker::start();
    let category = support::unique_category("pause_long");
    let topic = support::topic_of(&category);
    let gateway = start(&broker, &category).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (uploads, clients) = load(&gateway, &category, 8, stop.clone());
    let (readiness, watcher) = watch_readiness(&gateway, stop.clone());

    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.pause();
    let paused = Instant::now();
    tokio::time::sleep(Duration::from_secs(14)).await;
    broker.resume();
    let resumed = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    for task in clients {
        task.await.unwrap();
    }
    watcher.await.unwrap();

    let uploads = uploads.lock().unwrap().clone();
    let before: Vec<&Upload> = uploads.iter().filter(|u| u.answered < paused).collect();
    assert!(!before.is_empty() && before.iter().all(|u| u.status == 200));
    // During the pause: failures, answered within the delivery timeout.
    let during: Vec<&Upload> = uploads
        .iter()
        .filter(|u| u.sent > paused + Duration::from_secs(1) && u.sent < resumed)
        .collect();
    assert!(
        during.iter().any(|u| u.status == 503),
        "no failure during the pause?"
    );
    for upload in &during {
        assert!(upload.answered - upload.sent < Duration::from_millis(6500));
    }
    // After: every upload sent from 5 s after the resume on is accepted.
    let late: Vec<&Upload> = uploads
        .iter()
        .filter(|u| u.sent >= resumed + Duration::from_secs(5))
        .collect();
    assert!(
        late.len() > 8,
        "too few uploads after the resume: {}",
        late.len()
    );
    let failed_late: Vec<u16> = late
        .iter()
        .filter(|u| u.status != 200)
        .map(|u| u.status)
        .collect();
    assert!(
        failed_late.is_empty(),
        "{} of {} uploads sent 5 s after the resume failed",
        failed_late.len(),
        late.len()
    );
    let first_ok = uploads
        .iter()
        .filter(|u| u.sent >= resumed && u.status == 200)
        .map(|u| u.answered)
        .min()
        .expect("an accepted upload after the resume");
    assert!(
        first_ok - resumed < Duration::from_secs(5),
        "accepted again {:?} after the resume",
        first_ok - resumed
    );

    // Readiness told the truth: 503 while it could not deliver, 200 after.
    let readiness = readiness.lock().unwrap().clone();
    assert!(
        readiness
            .iter()
            .any(|(at, status)| *at > paused && *at < resumed && *status == 503),
        "/readyz never said 503 during the outage"
    );
    let last = readiness.last().unwrap();
    assert_eq!(last.1, 200, "/readyz after the recovery");

    assert!(
        restarts(&gateway).await >= 1.0,
        "the producer was not replaced"
    );
    assert_all_accepted_are_in_kafka(&broker, &topic, &uploads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_pause_shorter_than_the_delivery_timeout_fails_no_upload() {
    let broker = Broker::start();
    let category = support::unique_category("pause_short");
    let topic = support::topic_of(&category);
    let gateway = start(&broker, &category).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (uploads, clients) = load(&gateway, &category, 8, stop.clone());

    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.pause();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.resume();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for task in clients {
        task.await.unwrap();
    }

    let uploads = uploads.lock().unwrap().clone();
    assert!(uploads.len() > 16, "{}", uploads.len());
    let failed: Vec<u16> = uploads
        .iter()
        .filter(|u| u.status != 200)
        .map(|u| u.status)
        .collect();
    assert!(
        failed.is_empty(),
        "{} uploads failed: {failed:?}",
        failed.len()
    );
    assert_eq!(
        restarts(&gateway).await,
        0.0,
        "no reason to replace the producer"
    );
    assert_all_accepted_are_in_kafka(&broker, &topic, &uploads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_to_a_missing_topic_fails_fast_naming_the_topic() {
    let broker = support::shared_broker();
    let app = TestApp::spawn(support::settings(&broker.address(), &[])).await;
    let category = support::unique_category("nowhere");
    let body =
        json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": "1"}, {"id": "2"}]})
            .to_string();
    for attempt in 0..2 {
        let started = Instant::now();
        let response = app.upload_json(&body).await;
        let took = started.elapsed();
        assert_eq!(response.status(), 503);
        let reply: Value = response.json().await.unwrap();
        let reason = reply["parts"][0]["data"].as_str().unwrap();
        assert_eq!(reply["parts"][0]["code"], 1004);
        assert!(
            reason.contains(&format!(
                "topic {} does not exist",
                support::topic_of(&category)
            )),
            "{reason}"
        );
        assert!(
            took < Duration::from_secs(1),
            "attempt {attempt} took {took:?}"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_topics_creates_the_allowed_topics_and_the_first_upload_is_200() {
    let broker = support::shared_broker();
    let first = support::unique_category("made");
    let second = support::unique_category("made");
    let categories = format!("{first},{second}");
    let app = TestApp::spawn(support::settings(
        &broker.address(),
        &[
            ("VENUS__CATEGORIES", categories.as_str()),
            ("VENUS__KAFKA__CREATE_TOPICS", "true"),
        ],
    ))
    .await;
    for category in [&first, &second] {
        let body = json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": "1"}]});
        let response = app.upload_json(&body.to_string()).await;
        assert_eq!(response.status(), 200, "{category}");
        let messages = broker.read(&support::topic_of(category), 1, Duration::from_secs(3));
        assert_eq!(messages.len(), 1);
    }
    app.stop().await;
}
