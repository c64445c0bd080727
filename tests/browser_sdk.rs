//! The browser SDK (`sdk/js`, its script-tag build) in headless Chromium,
//! against the real gateway and a real broker: events queued when the tab
//! is closed arrive by `sendBeacon`; a stored queue is sent after a reload, once;
//! an invalid event is one request and a warning, never retried. (1,000
//! events through a broker pause, counted in ClickHouse, are the ingester's
//! `browser_sdk.rs`.)

mod support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::browser::{page, report, setup, strings, Browser, KEY};
use support::Broker;

/// How many messages of `topic` carry each event id.
fn ids_in_kafka(broker: &Broker, topic: &str, expected: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for message in broker.read(topic, expected, Duration::from_secs(20)) {
        *counts.entry(support::event_id(&message)).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_queued_when_the_tab_is_closed_arrive_by_send_beacon() {
    let broker = support::shared_broker();
    let (category, topic) = support::fresh_topic("sdk_beacon").await;
    let (pages, origin, app, mut results) = setup(broker, &[]).await;
    let upload = app.url("/api/v1/upload");
    {
        let mut html = pages.html.lock().unwrap();
        // Nothing would go for a minute: only the page going sends them.
        // The page waits until the test has put a blank tab in front of it,
        // so it is hidden before it tracks anything: hiding it cannot be
        // what sends them.
        html.insert(
            "/".into(),
            page(
                &upload,
                &category,
                KEY,
                "{flushIntervalMs: 60000}",
                r#"
            while ((await (await realFetch("/go")).text()) !== "1") await sleep(100);
            const ids = [0, 1, 2, 3, 4].map((n) => venus.track({n}));
            // From here on only sendBeacon can carry them.
            stats.fetchOff = true;
            await report({ids, uploads: stats.uploads, visibility: document.visibilityState});
            "#,
            ),
        );
    }
    let browser = Browser::open(&format!("{origin}/"));
    browser.open_blank_tab().await;
    pages.go.store(true, Ordering::Relaxed);
    let seen = report(&mut results, Duration::from_secs(60)).await;
    assert_eq!(seen["uploads"], 0, "{seen}");
    assert_eq!(seen["visibility"], "hidden", "{seen}");
    let ids = strings(&seen["ids"]);
    assert!(
        broker.read(&topic, 1, Duration::from_secs(2)).is_empty(),
        "nothing is sent before the tab closes"
    );
    // The tab is closed, as a user closes it; the browser stays.
    browser.close_tab(&format!("{origin}/")).await;
    let found = ids_in_kafka(broker, &topic, 5);
    assert_eq!(browser.tabs().await, 1, "only the blank tab is left");
    drop(browser);
    let mut got: Vec<&String> = found.keys().collect();
    got.sort();
    let mut want: Vec<&String> = ids.iter().collect();
    want.sort();
    assert_eq!(got, want);
    // One beacon: each event once (pagehide and the hidden page both fire).
    assert!(found.values().all(|n| *n == 1), "{found:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_queue_is_sent_after_a_reload_once() {
    let broker = support::shared_broker();
    let (category, topic) = support::fresh_topic("sdk_reload").await;
    let (pages, origin, app, mut results) = setup(broker, &[]).await;
    let upload = app.url("/api/v1/upload");
    // The first load has a key the gateway refuses (401): the SDK stops and
    // keeps its queue stored (and sends no beacon). The page after the
    // reload has the right key.
    pages.html.lock().unwrap().insert(
        "/".into(),
        page(
            &upload,
            &category,
            KEY,
            &format!("{{flushIntervalMs: 100, key: sessionStorage.getItem('reloaded') ? {KEY:?} : 'wrong-key'}}"),
            r#"
            if (!sessionStorage.getItem("reloaded")) {
              const ids = [0, 1, 2].map((n) => venus.track({n}));
              while (stats.statuses.length === 0) await sleep(50);
              await report({stage: 1, ids});
              sessionStorage.setItem("reloaded", "1");
              location.reload();
            } else {
              while (client.queue.length > 0) await sleep(100);
              await sleep(500);
              await report({stage: 2});
            }
            "#,
        ),
    );
    let browser = Browser::open(&format!("{origin}/"));
    let first = report(&mut results, Duration::from_secs(60)).await;
    assert_eq!(first["stage"], 1, "{first}");
    assert_eq!(first["stats"]["statuses"].to_string(), "[401]", "{first}");
    let ids = strings(&first["ids"]);
    let second = report(&mut results, Duration::from_secs(60)).await;
    drop(browser);
    assert_eq!(second["stage"], 2, "{second}");
    // After the reload: one upload, accepted, and each event once.
    assert_eq!(second["stats"]["uploads"], 1, "{second}");
    assert_eq!(second["stats"]["statuses"].to_string(), "[200]", "{second}");
    let found = ids_in_kafka(broker, &topic, 3);
    for id in &ids {
        assert_eq!(found.get(id), Some(&1), "{id}: {found:?}");
    }
    assert_eq!(found.len(), 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_event_is_one_request_and_a_warning() {
    let broker = support::shared_broker();
    let (category, topic) = support::fresh_topic("sdk_invalid").await;
    let (pages, origin, app, mut results) = setup(broker, &[]).await;
    let upload = app.url("/api/v1/upload");
    pages.html.lock().unwrap().insert(
        "/".into(),
        page(
            &upload,
            &category,
            KEY,
            "{flushIntervalMs: 100, maxRetryDelayMs: 200}",
            r#"
            venus.track({timestamp: "yesterday"});
            await sleep(3000);
            await report({queued: client.queue.length});
            "#,
        ),
    );
    let browser = Browser::open(&format!("{origin}/"));
    let seen = report(&mut results, Duration::from_secs(60)).await;
    drop(browser);
    assert_eq!(seen["stats"]["uploads"], 1, "{seen}");
    assert_eq!(seen["stats"]["statuses"].to_string(), "[400]", "{seen}");
    assert_eq!(seen["queued"], 0, "{seen}");
    // What the upload carried: gzip, a new trace, the key.
    let headers = &seen["stats"]["headers"];
    assert_eq!(headers["Content-Encoding"], "gzip", "{headers}");
    assert_eq!(headers["X-Venus-Key"], KEY, "{headers}");
    let traceparent = headers["traceparent"].as_str().unwrap();
    assert!(
        traceparent.len() == 55 && traceparent.starts_with("00-") && traceparent.ends_with("-01"),
        "{traceparent}"
    );
    let warnings = strings(&seen["stats"]["warnings"]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("1001"), "{warnings:?}");
    assert!(broker.read(&topic, 1, Duration::from_secs(2)).is_empty());
    app.stop().await;
}
