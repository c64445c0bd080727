//! The local spool (`spool.enabled`) with the real binary and a real tansu
//! broker of each test's own: a broker frozen for 30 s, and one killed and
//! started again empty, under eight uploading clients (every upload
//! answered 0, every accepted event in Kafka afterwards); the gateway
//! killed with -9 while spooling and while replaying; a torn tail and a
//! flipped byte at start-up; a full spool.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::gateway::Gateway;
use support::Broker;
use venus::spool::record::SpoolRecord;
use venus::spool::segment;

/// One answered upload.
#[derive(Debug, Clone)]
struct Upload {
    status: u16,
    retry_after: Option<String>,
    /// (backend_id, `data`) of every event answered 0.
    accepted: Vec<(String, String)>,
}

/// Clients uploading 10-event batches in a loop until `stop`.
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
                    let data: Vec<Value> = (0..10)
                        .map(|i| json!({"id": format!("c{client}-r{round}-e{i}")}))
                        .collect();
                    let body =
                        json!({"meta": {"app_id": "load", "category": category}, "data": data});
                    let Ok(response) = http.post(&url).json(&body).send().await else {
                        // No answer (the gateway was killed under us):
                        // recorded, so that a test expecting answers sees it.
                        uploads.lock().unwrap().push(Upload {
                            status: 0,
                            retry_after: None,
                            accepted: Vec::new(),
                        });
                        break;
                    };
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let Ok(reply) = response.json::<Value>().await else {
                        break;
                    };
                    let accepted = reply["parts"]
                        .as_array()
                        .map(|parts| {
                            parts
                                .iter()
                                .filter(|part| part["code"] == 0)
                                .map(|part| {
                                    (
                                        part["backend_id"].as_str().unwrap().to_owned(),
                                        part["data"].as_str().unwrap().to_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    uploads.lock().unwrap().push(Upload {
                        status,
                        retry_after,
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

/// The gateway with the spool on in `dir`.
fn gateway(broker: &Broker, dir: &Path, extra: &[(&str, String)]) -> Gateway {
    let mut env = vec![
        ("VENUS__SPOOL__ENABLED", "true".to_owned()),
        ("VENUS__SPOOL__PATH", dir.display().to_string()),
        ("VENUS__KAFKA__DELIVERY_TIMEOUT_MS", "3000".to_owned()),
        (
            "VENUS__TELEMETRY__LOG_LEVEL",
            "info,rdkafka=off,librdkafka=off".to_owned(),
        ),
    ];
    env.extend(extra.iter().cloned());
    Gateway::start(&broker.address(), &env)
}

/// backend_id → how many messages of `topic` carry it, read until `want`
/// distinct ones are there or nothing new comes for a while.
fn backend_ids(broker: &Broker, topic: &str, want: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        counts.clear();
        for message in broker.read(topic, usize::MAX, Duration::from_secs(3)) {
            let value = support::value_json(&message);
            let id = value["backend_id"].as_str().unwrap().to_owned();
            *counts.entry(id).or_insert(0) += 1;
        }
        if counts.len() >= want || Instant::now() > deadline {
            return counts;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Every event answered 0 is in Kafka; returns (exactly once, more than
/// once) among them.
fn assert_accepted_in_kafka(broker: &Broker, topic: &str, uploads: &[Upload]) -> (usize, usize) {
    let accepted: HashSet<&str> = uploads
        .iter()
        .flat_map(|u| u.accepted.iter().map(|(id, _)| id.as_str()))
        .collect();
    assert!(!accepted.is_empty());
    let found = backend_ids(broker, topic, accepted.len());
    let missing: Vec<&&str> = accepted
        .iter()
        .filter(|id| !found.contains_key(**id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events answered 0 are not in Kafka, e.g. {:?}",
        missing.len(),
        accepted.len(),
        &missing[..missing.len().min(5)]
    );
    let twice = accepted.iter().filter(|id| found[**id] > 1).count();
    (accepted.len() - twice, twice)
}

async fn metric(gateway: &Gateway, name: &str) -> f64 {
    support::metric(&gateway.metrics().await, name, "")
}

/// Waits until the spool has given everything back to Kafka.
async fn drained(gateway: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(gateway, "venus_spool_records").await > 0.0 {
        assert!(Instant::now() < deadline, "the spool did not drain");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The broker trouble of [`through_an_outage`].
enum Outage {
    /// SIGSTOP, then SIGCONT.
    Freeze,
    /// kill -9, then an empty broker on the same port with this topic
    /// created again.
    RestartEmpty(String),
}

/// Eight clients uploading through 30 s of `outage`; the uploads, and
/// `/readyz` (status, body) 20 s into the outage.
async fn through_an_outage(
    broker: &mut Broker,
    gateway: &Gateway,
    category: &str,
    outage: Outage,
) -> (Vec<Upload>, (u16, String)) {
    let stop = Arc::new(AtomicBool::new(false));
    let (uploads, clients) = load(gateway, category, 8, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    match &outage {
        Outage::Freeze => broker.pause(),
        Outage::RestartEmpty(_) => broker.stop(),
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    let response = reqwest::get(gateway.url("/readyz")).await.unwrap();
    let readyz = (
        response.status().as_u16(),
        response.text().await.unwrap_or_default(),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    match &outage {
        Outage::Freeze => broker.resume(),
        Outage::RestartEmpty(topic) => {
            broker.restart_empty();
            broker.create_topic(topic).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    for task in clients {
        task.await.unwrap();
    }
    let uploads = uploads.lock().unwrap().clone();
    (uploads, readyz)
}

/// While the spool takes events, the gateway stays ready and says why.
fn assert_ready_and_spooling((status, body): &(u16, String)) {
    assert_eq!(*status, 200, "{body}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["spool"]["state"], "in use", "{body}");
    assert!(body["spool"]["records"].as_u64().unwrap() > 0, "{body}");
    assert_ne!(body["kafka"], "reachable", "{body}");
}

fn assert_all_answered_0(uploads: &[Upload]) -> usize {
    assert!(uploads.len() > 20, "{} uploads", uploads.len());
    for upload in uploads {
        assert_eq!(upload.status, 200, "{upload:?}");
        assert_eq!(upload.accepted.len(), 10, "{upload:?}");
    }
    let spooled = uploads
        .iter()
        .flat_map(|u| &u.accepted)
        .filter(|(_, data)| data == "spooled")
        .count();
    assert!(spooled > 0, "nothing was spooled");
    spooled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_frozen_for_30_s_costs_no_upload_and_no_event() {
    let mut broker = Broker::start();
    let category = support::unique_category("spool_pause");
    let topic = support::topic_of(&category);
    broker.create_topic(&topic).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(&broker, dir.path(), &[]);
    let (uploads, readyz) =
        through_an_outage(&mut broker, &gateway, &category, Outage::Freeze).await;
    assert_ready_and_spooling(&readyz);
    let spooled = assert_all_answered_0(&uploads);
    drained(&gateway).await;
    let (once, twice) = assert_accepted_in_kafka(&broker, &topic, &uploads);
    println!("frozen broker: {spooled} spooled; in Kafka once {once}, more than once {twice}");
    assert!(metric(&gateway, "venus_spool_replayed_total").await >= spooled as f64);
    // The dashboard's spool panel queries what this gateway exports.
    let text = gateway.metrics().await;
    let exported = support::dashboard::exported_names(&text);
    let used: Vec<String> =
        support::dashboard::dashboard_metric_names(&support::dashboard::dashboard())
            .into_iter()
            .filter(|name| support::dashboard::is_spool_metric(name))
            .collect();
    assert!(used.len() >= 5, "{used:?}");
    for name in &used {
        assert!(exported.contains(name.as_str()), "{name} is not exported");
    }
    // A replayed message keeps its trace: traceparent and request_id.
    let messages = broker.read(&topic, usize::MAX, Duration::from_secs(3));
    let spooled_ids: HashSet<&str> = uploads
        .iter()
        .flat_map(|u| &u.accepted)
        .filter(|(_, data)| data == "spooled")
        .map(|(id, _)| id.as_str())
        .collect();
    let replayed = messages
        .iter()
        .find(|m| spooled_ids.contains(support::value_json(m)["backend_id"].as_str().unwrap()))
        .expect("a replayed message");
    let headers = support::header_names(replayed);
    assert!(headers.contains(&"traceparent".to_owned()), "{headers:?}");
    assert!(headers.contains(&"request_id".to_owned()), "{headers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_empty_costs_no_upload_and_no_event() {
    let mut broker = Broker::start();
    let category = support::unique_category("spool_restart");
    let topic = support::topic_of(&category);
    broker.create_topic(&topic).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(&broker, dir.path(), &[]);
    let (uploads, readyz) = through_an_outage(
        &mut broker,
        &gateway,
        &category,
        Outage::RestartEmpty(topic.clone()),
    )
    .await;
    assert_ready_and_spooling(&readyz);
    let spooled = assert_all_answered_0(&uploads);
    drained(&gateway).await;
    // What Kafka acknowledged before the broker died is gone with it (an
    // in-memory broker); everything spooled must be there.
    let spooled_only: Vec<Upload> = uploads
        .iter()
        .map(|u| Upload {
            accepted: u
                .accepted
                .iter()
                .filter(|(_, data)| data == "spooled")
                .cloned()
                .collect(),
            ..u.clone()
        })
        .collect();
    let (once, twice) = assert_accepted_in_kafka(&broker, &topic, &spooled_only);
    println!("restarted broker: {spooled} spooled; in Kafka once {once}, more than once {twice}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_spooling_and_while_replaying_loses_no_event_answered_0() {
    let broker = Broker::start();
    let category = support::unique_category("spool_kill");
    let topic = support::topic_of(&category);
    broker.create_topic(&topic).await;
    let dir = tempfile::tempdir().unwrap();
    // Slow replay, so that a kill finds it mid-way.
    let slow = [("VENUS__SPOOL__REPLAY_EVENTS_PER_SEC", "100".to_owned())];
    let mut first = gateway(&broker, dir.path(), &slow);
    let stop = Arc::new(AtomicBool::new(false));
    let (uploads, clients) = load(&first, &category, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.pause();
    tokio::time::sleep(Duration::from_secs(8)).await;
    // 1. kill -9 while spooling.
    let _ = first.child.kill();
    let _ = first.child.wait();
    stop.store(true, Ordering::Relaxed);
    for task in clients {
        task.await.unwrap();
    }
    broker.resume();
    let spooled_before = uploads
        .lock()
        .unwrap()
        .iter()
        .flat_map(|u| &u.accepted)
        .filter(|(_, data)| data == "spooled")
        .count();
    assert!(spooled_before > 100, "{spooled_before} spooled");

    // 2. Started again: it replays; kill -9 in the middle of that.
    let second = gateway(&broker, dir.path(), &slow);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&second, "venus_spool_replayed_total").await < 50.0 {
        assert!(Instant::now() < deadline, "no replay");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metric(&second, "venus_spool_records").await > 0.0);
    let mut second = second;
    let _ = second.child.kill();
    let _ = second.child.wait();

    // 3. A third one finishes the replay.
    let third = gateway(&broker, dir.path(), &[]);
    drained(&third).await;
    let uploads = uploads.lock().unwrap().clone();
    let (once, twice) = assert_accepted_in_kafka(&broker, &topic, &uploads);
    println!("kill -9 twice: in Kafka once {once}, more than once {twice}");
}

/// A record for `topic` as the gateway would spool it.
fn record(topic: &str, n: usize) -> SpoolRecord {
    let backend_id = uuid::Uuid::now_v7().to_string();
    SpoolRecord {
        topic: topic.to_owned(),
        key: None,
        headers: vec![("request_id".into(), format!("r{n}").into_bytes())],
        value: json!({"backend_id": backend_id, "upload_time": 0, "ip": "", "country": "",
            "region": "", "city": "", "meta": {}, "data": {"id": format!("e{n}")}})
        .to_string()
        .into_bytes(),
        spooled_at_ms: venus::spool::now_ms(),
    }
}

fn verify(dir: &Path) -> (bool, String) {
    let Some(binary) = option_env!("CARGO_BIN_EXE_venus") else {
        panic!("the venus binary");
    };
    let output = std::process::Command::new(binary)
        .args(["spool", "verify"])
        .arg(dir)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_and_a_flipped_byte_are_cut_quarantined_counted_and_the_gateway_serves() {
    let broker = Broker::start();
    let category = support::unique_category("spool_damage");
    let topic = support::topic_of(&category);
    broker.create_topic(&topic).await;
    let dir = tempfile::tempdir().unwrap();
    // Segment 1: whole. Segment 2: its last record cut short. Segment 3: a
    // flipped byte in its fourth record.
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for segment in 0..3 {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for n in 0..10 {
            starts.push(bytes.len());
            record(&topic, segment * 10 + n).write_frame(&mut bytes);
        }
        match segment {
            1 => bytes.truncate(bytes.len() - 5),
            2 => bytes[starts[3] + 20] ^= 0x10,
            _ => {}
        }
        frames.push(bytes);
    }
    for (i, bytes) in frames.iter().enumerate() {
        std::fs::write(segment::segment_path(dir.path(), i as u64 + 1), bytes).unwrap();
    }
    let (ok, said) = verify(dir.path());
    assert!(!ok, "{said}");
    assert!(
        said.contains("TORN TAIL") && said.contains("CORRUPT after 3 records"),
        "{said}"
    );

    let gateway = gateway(&broker, dir.path(), &[]);
    assert_eq!(metric(&gateway, "venus_spool_torn_tails_total").await, 1.0);
    assert_eq!(metric(&gateway, "venus_spool_quarantined_total").await, 1.0);
    // It serves: an upload is accepted.
    let response = reqwest::Client::new()
        .post(gateway.url("/api/v1/upload"))
        .json(&json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": "live"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Everything whole reaches Kafka: 10 + 9 + 3 records, and the live one;
    // nothing past the flipped byte.
    drained(&gateway).await;
    let messages = broker.read(&topic, 24, Duration::from_secs(5));
    let mut ids: Vec<String> = messages.iter().map(support::event_id).collect();
    ids.sort();
    let mut wanted: Vec<String> = (0..10)
        .chain(10..19)
        .chain(20..23)
        .map(|n| format!("e{n}"))
        .chain(std::iter::once("live".to_owned()))
        .collect();
    wanted.sort();
    assert_eq!(ids, wanted);
    let (ok, said) = verify(dir.path());
    assert!(ok, "{said}");
    assert!(said.contains("1 in quarantine"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_503_with_retry_after_and_loses_nothing_it_took() {
    let broker = Broker::start();
    let category = support::unique_category("spool_full");
    let topic = support::topic_of(&category);
    broker.create_topic(&topic).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(
        &broker,
        dir.path(),
        &[
            ("VENUS__SPOOL__MAX_BYTES", "200000".to_owned()),
            ("VENUS__SPOOL__SEGMENT_BYTES", "20000".to_owned()),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (uploads, clients) = load(&gateway, &category, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.pause();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !uploads.lock().unwrap().iter().any(|u| u.status == 503) {
        assert!(Instant::now() < deadline, "the spool never filled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = {
        let response = reqwest::get(gateway.url("/readyz")).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    assert!(body.contains("\"full\""), "{status} {body}");
    assert_eq!(status, 503, "{body}");
    assert!(metric(&gateway, "venus_spool_size_bytes").await <= 200_000.0);
    stop.store(true, Ordering::Relaxed);
    for task in clients {
        task.await.unwrap();
    }
    broker.resume();
    let uploads = uploads.lock().unwrap().clone();
    let full = uploads.iter().find(|u| u.status == 503).unwrap();
    assert!(full.retry_after.is_some(), "{full:?}");
    assert!(metric(&gateway, "venus_spool_refused_total").await > 0.0);
    assert!(metric(&gateway, "venus_spool_size_bytes").await <= 200_000.0);
    drained(&gateway).await;
    let (once, twice) = assert_accepted_in_kafka(&broker, &topic, &uploads);
    println!("full spool: in Kafka once {once}, more than once {twice}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_spooling_exits_0_and_leaves_a_whole_spool_the_next_gateway_replays() {
    let broker = Broker::start();
    let category = support::unique_category("spool_sigterm");
    let topic = support::topic_of(&category);
    broker.create_topic(&topic).await;
    let dir = tempfile::tempdir().unwrap();
    let quick = [("VENUS__SERVER__SHUTDOWN_DELAY_MS", "200".to_owned())];
    let mut first = gateway(&broker, dir.path(), &quick);
    let stop = Arc::new(AtomicBool::new(false));
    let (uploads, clients) = load(&first, &category, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.pause();
    tokio::time::sleep(Duration::from_secs(8)).await;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = first.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    stop.store(true, Ordering::Relaxed);
    for task in clients {
        task.await.unwrap();
    }
    // Closed cleanly: no torn tail, records waiting.
    let (ok, said) = verify(dir.path());
    assert!(ok, "{said}");
    assert!(!said.contains(" 0 records pending"), "{said}");
    broker.resume();
    let second = gateway(&broker, dir.path(), &[]);
    drained(&second).await;
    assert_eq!(metric(&second, "venus_spool_torn_tails_total").await, 0.0);
    let uploads = uploads.lock().unwrap().clone();
    let (once, twice) = assert_accepted_in_kafka(&broker, &topic, &uploads);
    println!("SIGTERM: in Kafka once {once}, more than once {twice}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_for_a_missing_topic_wait_at_the_end_and_the_other_topics_go_on() {
    let broker = Broker::start();
    let present = support::topic_of(&support::unique_category("spool_present"));
    let absent = support::topic_of(&support::unique_category("spool_absent"));
    broker.create_topic(&present).await;
    let dir = tempfile::tempdir().unwrap();
    // One segment: two records for a topic that does not exist, first,
    // then five for one that does.
    let mut bytes = Vec::new();
    for n in 0..2 {
        record(&absent, n).write_frame(&mut bytes);
    }
    for n in 2..7 {
        record(&present, n).write_frame(&mut bytes);
    }
    std::fs::write(segment::segment_path(dir.path(), 1), &bytes).unwrap();
    let gateway = gateway(&broker, dir.path(), &[]);
    // The present topic's records are not held up behind the others.
    let messages = broker.read(&present, 5, Duration::from_secs(20));
    assert_eq!(messages.len(), 5);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&gateway, "venus_spool_requeued_total").await < 2.0 {
        assert!(Instant::now() < deadline, "nothing requeued");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(metric(&gateway, "venus_spool_records").await, 2.0);
    // Once the topic exists, they go too.
    broker.create_topic(&absent).await;
    drained(&gateway).await;
    assert_eq!(broker.read(&absent, 2, Duration::from_secs(10)).len(), 2);
}
