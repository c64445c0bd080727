//! Where an event comes from, through real uploads into Kafka: both database
//! layouts in one or two files, reloads (rename + SIGHUP, the periodic look)
//! under load, bad files refused while the old data serves, and the client
//! address behind trusted proxies.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::gateway::Gateway;
use support::{shared_broker, TestApp};
use venus::geoip::test_support;

/// A fresh directory for one test's database files.
fn dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("venus-geoip")
        .tempdir()
        .unwrap()
}

/// Writes `bytes` beside `path`, then renames over it: the safe update.
fn install(path: &Path, bytes: &[u8]) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// Uploads one event per address to `category`, returns the messages' values
/// by event id.
async fn locate(
    app_url: &str,
    client: &reqwest::Client,
    category: &str,
    topic: &str,
    ips: &[&str],
) -> Vec<Value> {
    let data: Vec<Value> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| json!({"id": format!("{i}-{}", uuid::Uuid::new_v4()), "ip": ip}))
        .collect();
    let body = json!({"meta": {"app_id": "a", "category": category}, "data": data});
    let response = client.post(app_url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let ids: Vec<String> = data
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    let messages = shared_broker().read(topic, usize::MAX, Duration::from_millis(1500));
    ids.iter()
        .map(|id| {
            messages
                .iter()
                .map(support::value_json)
                .find(|v| v["data"]["id"] == *id)
                .unwrap_or_else(|| panic!("event {id} not in Kafka"))
        })
        .collect()
}

fn place(value: &Value) -> (String, String, String) {
    let text = |k: &str| value[k].as_str().unwrap().to_owned();
    (text("country"), text("region"), text("city"))
}

fn triple(country: &str, region: &str, city: &str) -> (String, String, String) {
    (country.into(), region.into(), city.into())
}

async fn app_on(databases: &[&Path], extra: &[(&str, &str)]) -> TestApp {
    let list = databases
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut overrides = vec![("VENUS__GEOIP__DATABASE", list.as_str())];
    overrides.extend_from_slice(extra);
    TestApp::spawn(support::settings(&shared_broker().address(), &overrides)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_layouts_in_one_or_two_files_locate_v4_and_v6_events() {
    let (category, topic) = support::fresh_topic("layouts").await;
    let files = dir();
    let geoip2 = files.path().join("city.mmdb");
    install(&geoip2, &test_support::city_database());
    let (v4, v6) = test_support::flat_databases();
    let (flat4, flat6) = (
        files.path().join("flat-v4.mmdb"),
        files.path().join("flat-v6.mmdb"),
    );
    install(&flat4, &v4);
    install(&flat6, &v6);

    let layouts = [
        (
            vec![geoip2.as_path()],
            triple("GB", "England", "London"),
            triple("CZ", "Hlavni mesto Praha", "Prague"),
            "geoip2",
        ),
        (
            vec![flat4.as_path(), flat6.as_path()],
            triple("GB", "England", "Bracknell"),
            triple("CZ", "South Moravian", "Brno"),
            "flat",
        ),
    ];
    // Each layout read into compact tables, with the mapped files cached
    // whole, and with only the pages lookups read resident
    // (`geoip.residency`): the same answers.
    let runs = ["compact", "cached", "touched"]
        .into_iter()
        .flat_map(|residency| {
            layouts
                .clone()
                .into_iter()
                .map(move |layout| (layout, residency))
        });
    for ((databases, v4_place, v6_place, layout), residency) in runs {
        let app = app_on(&databases, &[("VENUS__GEOIP__RESIDENCY", residency)]).await;
        let url = app.url("/api/v1/upload");
        let values = locate(
            &url,
            &app.client,
            &category,
            &topic,
            &[
                "81.2.69.142",
                "2a02:d280::7",
                "::ffff:81.2.69.142",
                "10.1.1.1",
            ],
        )
        .await;
        assert_eq!(place(&values[0]), v4_place, "{layout} {residency} v4");
        assert_eq!(place(&values[1]), v6_place, "{layout} {residency} v6");
        assert_eq!(
            place(&values[2]),
            v4_place,
            "{layout} {residency} v4-mapped"
        );
        assert_eq!(values[2]["ip"], "81.2.69.142");
        assert_eq!(
            place(&values[3]),
            triple("", "", ""),
            "{layout} {residency} private"
        );
        // /readyz names what is in use.
        let ready: Value = app
            .client
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let used: Vec<&str> = ready["geoip_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["layout"].as_str().unwrap())
            .collect();
        assert_eq!(used, vec![layout; databases.len()], "{ready}");
        // A compact table says how much memory it takes; a mapped file not.
        for file in ready["geoip_files"].as_array().unwrap() {
            let bytes = file.get("compact_bytes").and_then(Value::as_u64);
            assert_eq!(
                bytes.is_some_and(|b| b > 0),
                residency == "compact",
                "{residency}: {file}"
            );
        }
        let metrics = app.metrics().await;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("venus_geoip_database")
                    && l.contains(&format!("layout=\"{layout}\""))),
            "{metrics}"
        );
        app.stop().await;
    }
}

/// Uploads in a loop from `clients` tasks until `stop`; returns every status.
fn keep_uploading(
    url: String,
    category: String,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    (0..clients)
        .map(|c| {
            let (url, category, stop) = (url.clone(), category.clone(), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut statuses = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": format!("{c}-{n}"), "ip": "81.2.69.142"}]});
                    statuses.push(client.post(&url).json(&body).send().await.unwrap().status().as_u16());
                }
                statuses
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_look_reloads_a_renamed_file_under_load_and_refuses_bad_ones() {
    let (category, topic) = support::fresh_topic("reload").await;
    let files = dir();
    let path = files.path().join("city.mmdb");
    install(&path, &test_support::city_database());
    // Reloaded files with only the pages lookups read resident: each
    // reload drops its fresh copy from the page cache.
    let app = app_on(
        &[path.as_path()],
        &[
            ("VENUS__GEOIP__RELOAD_INTERVAL_MS", "200"),
            ("VENUS__GEOIP__RESIDENCY", "touched"),
        ],
    )
    .await;
    let url = app.url("/api/v1/upload");
    // The load goes to a topic of its own: `locate` reads its topic until
    // it is idle.
    let (load_category, _) = support::fresh_topic("reload_load").await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = keep_uploading(url.clone(), load_category, 4, stop.clone());

    // A new file renamed over the old one: picked up by the periodic look.
    let moved = [("81.2.69.0/24", "GB", "Scotland", "Edinburgh")];
    install(
        &path,
        &test_support::geoip2_database("Venus-Test-City-2", &moved),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let values = locate(&url, &app.client, &category, &topic, &["81.2.69.142"]).await;
        if place(&values[0]) == triple("GB", "Scotland", "Edinburgh") {
            break;
        }
        assert!(Instant::now() < deadline, "the new file was not loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Truncated, corrupt, deleted: each refused, the last good data serves.
    let good = test_support::geoip2_database("Venus-Test-City-2", &moved);
    for (what, bad) in [
        ("truncated", Some(good[..good.len() / 2].to_vec())),
        ("corrupt", Some(b"not a database at all".to_vec())),
        ("deleted", None),
    ] {
        let rejected_before = reloads(&app, "rejected").await;
        let loaded_before = reloads(&app, "loaded").await;
        match bad {
            Some(bytes) => install(&path, &bytes),
            None => std::fs::remove_file(&path).unwrap(),
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while reloads(&app, "rejected").await <= rejected_before {
            assert!(Instant::now() < deadline, "{what}: not looked at");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let values = locate(&url, &app.client, &category, &topic, &["81.2.69.142"]).await;
        assert_eq!(
            place(&values[0]),
            triple("GB", "Scotland", "Edinburgh"),
            "{what}"
        );
        // Tried once, not at every look: the file has not changed since.
        assert_eq!(
            reloads(&app, "rejected").await,
            rejected_before + 1.0,
            "{what}"
        );
        let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200, "{what}: readiness stays");
        // Back to a good file before the next bad one.
        install(&path, &good);
        let deadline = Instant::now() + Duration::from_secs(5);
        while reloads(&app, "loaded").await <= loaded_before {
            assert!(Instant::now() < deadline, "{what}: the good file again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    stop.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for task in load {
        statuses.extend(task.await.unwrap());
    }
    assert!(statuses.len() > 20, "{}", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "an upload failed during a reload: {statuses:?}"
    );
    app.stop().await;
}

async fn reloads(app: &TestApp, result: &str) -> f64 {
    support::metric(
        &app.metrics().await,
        "venus_geoip_reloads_total",
        &format!("result=\"{result}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_overwrite_of_a_mapped_file_does_not_crash_the_gateway() {
    let (category, topic) = support::fresh_topic("inplace").await;
    let files = dir();
    let path = files.path().join("city.mmdb");
    install(&path, &test_support::city_database());
    // The periodic look is off: nothing but the mapping sees the file
    // (mapped: `cached`; the default, `compact`, keeps nothing of it).
    let app = app_on(
        &[path.as_path()],
        &[
            ("VENUS__GEOIP__RELOAD_INTERVAL_MS", "0"),
            ("VENUS__GEOIP__RESIDENCY", "cached"),
        ],
    )
    .await;
    let url = app.url("/api/v1/upload");
    // Overwrite the same inode: truncate to nothing, then write garbage.
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(&vec![0xAB; 4096]).unwrap();
        file.sync_all().unwrap();
    }
    // Lookups touch pages all over the old data; the process must live.
    for _ in 0..5 {
        let values = locate(
            &url,
            &app.client,
            &category,
            &topic,
            &["81.2.69.142", "2a02:d280::7", "89.160.20.1"],
        )
        .await;
        assert_eq!(place(&values[0]), triple("GB", "England", "London"));
        assert_eq!(values[1]["city"], "Prague");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_renamed_file_without_a_restart() {
    let (category, topic) = support::fresh_topic("sighup").await;
    let files = dir();
    let path = files.path().join("city.mmdb");
    install(&path, &test_support::city_database());
    let gateway = Gateway::start(
        &shared_broker().address(),
        &[
            ("VENUS__GEOIP__DATABASE", path.display().to_string()),
            ("VENUS__GEOIP__RELOAD_INTERVAL_MS", "0".into()),
        ],
    );
    let client = reqwest::Client::new();
    let url = gateway.url("/api/v1/upload");
    let values = locate(&url, &client, &category, &topic, &["81.2.69.142"]).await;
    assert_eq!(place(&values[0]), triple("GB", "England", "London"));

    // New data of the other layout renamed into place: nothing changes until
    // the signal (the periodic look is off).
    let (v4, _) = test_support::flat_databases();
    install(&path, &v4);
    let values = locate(&url, &client, &category, &topic, &["81.2.69.142"]).await;
    assert_eq!(place(&values[0]), triple("GB", "England", "London"));
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(gateway.child.id() as i32, libc::SIGHUP);
    }
    gateway.wait_for_line(
        |l| l["message"] == "GeoIP database reloaded",
        Duration::from_secs(5),
    );
    let values = locate(
        &url,
        &client,
        &category,
        &topic,
        &["81.2.69.142", "2a02:d280::7"],
    )
    .await;
    assert_eq!(place(&values[0]), triple("GB", "England", "Bracknell"));
    assert_eq!(
        place(&values[1]),
        triple("", "", ""),
        "an IPv4 file answers no IPv6 lookup"
    );

    // A corrupt file and SIGHUP: refused, the flat data serves on.
    install(&path, b"garbage");
    // SAFETY: as above.
    unsafe {
        libc::kill(gateway.child.id() as i32, libc::SIGHUP);
    }
    let line = gateway.wait_for_line(
        |l| l["message"] == "GeoIP reload refused; the old database keeps serving",
        Duration::from_secs(5),
    );
    assert_eq!(line["level"], "WARN");
    let values = locate(&url, &client, &category, &topic, &["81.2.69.142"]).await;
    assert_eq!(place(&values[0]), triple("GB", "England", "Bracknell"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_trusted_proxies_the_real_client_is_located_and_spoofing_is_not() {
    let (category, topic) = support::fresh_topic("proxies").await;
    // The test connects from 127.0.0.1: that is the proxy.
    let trusted = TestApp::spawn(support::settings(
        &shared_broker().address(),
        &[("VENUS__SERVER__TRUSTED_PROXIES", "127.0.0.1,10.0.0.0/8")],
    ))
    .await;
    let untrusted = TestApp::spawn(support::settings(&shared_broker().address(), &[])).await;
    let body =
        |id: &str| json!({"meta": {"app_id": "a", "category": category}, "data": [{"id": id}]});
    for (app, id, expected) in [
        (&trusted, "via-proxies", "London"),
        (&untrusted, "spoofed", ""),
    ] {
        let response = app
            .client
            .post(app.url("/api/v1/upload"))
            .header("x-forwarded-for", "6.6.6.6, 81.2.69.142, 10.1.0.5")
            .json(&body(id))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let messages = shared_broker().read(&topic, usize::MAX, Duration::from_millis(1500));
        let value = messages
            .iter()
            .map(support::value_json)
            .find(|v| v["data"]["id"] == id)
            .unwrap();
        assert_eq!(value["city"], expected, "{id}: {value}");
        let ip = if expected.is_empty() {
            "127.0.0.1"
        } else {
            "81.2.69.142"
        };
        assert_eq!(value["ip"], ip, "{id}");
    }
    trusted.stop().await;
    untrusted.stop().await;
}
