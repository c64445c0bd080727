//! Gateway -> Kafka (tansu) -> venus-ingester -> ClickHouse, all real
//! processes: every column of the rows checked against the upload for
//! several categories (one created after the ingester started), and a
//! poison message sent to the dead-letter topic without stalling its
//! partition.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde_json::Value;

use common::{count_final_sql, eventually, ingester_env, IngesterProcess, Namespace};
use support::clickhouse::ClickHouseServer;
use support::{header, shared_broker};

fn clickhouse() -> &'static ClickHouseServer {
    static SERVER: OnceLock<ClickHouseServer> = OnceLock::new();
    SERVER.get_or_init(ClickHouseServer::start)
}

async fn wait_for_rows(ns: &Namespace, category: &str, expected: u64) {
    let sql = count_final_sql(&ns.qualified_table(), category);
    eventually(
        Duration::from_secs(60),
        &format!("{expected} rows of {category}"),
        || {
            let sql = sql.clone();
            async move {
                let ch = clickhouse();
                let exists = ch
                    .count(&format!(
                    "SELECT count() FROM system.tables WHERE database = 'venus' AND name = '{}'",
                    ns.table()
                ))
                    .await;
                if exists == 0 {
                    return None;
                }
                (ch.count(&sql).await >= expected).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_of_every_category_lands_in_clickhouse() {
    let broker = shared_broker();
    let ch = clickhouse();
    let ns = Namespace::new("cols");
    for category in ["page_view", "click"] {
        broker.create_topic(&ns.topic(category)).await;
    }
    let ingester = IngesterProcess::start(&ingester_env(
        broker,
        &ch.url(),
        &ns,
        IngesterProcess::free_port(),
    ));
    let assigned = ingester.wait_for_log("partitions assigned", Duration::from_secs(60));
    assert_eq!(
        assigned["protocol"], "cooperative",
        "cooperative-sticky: {assigned}"
    );
    let app = common::gateway(broker, &ns).await;

    // Exact texts: spaces and 1.50 must survive into the meta and data
    // columns.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut uploads: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut upload = |category: &str, events: Vec<String>| {
        let meta = format!(r#"{{"app_id": "shop", "category":"{category}", "v": 1.50}}"#);
        uploads.push((category.to_owned(), meta, events));
    };
    upload(
        "page_view",
        vec![
            r#"{"id":"pv-1","timestamp":1700000000123,"ip":"81.2.69.142","x":{"y":[1, 2]}}"#.into(),
            r#"{"id": "pv-2", "n": 1.50}"#.into(),
        ],
    );
    upload("click", vec![r#"{"id":"c-1","ip":"81.2.69.142"}"#.into()]);
    // A category whose topic appears only now: picked up without a restart.
    let late = "late_category";
    broker.create_topic(&ns.topic(late)).await;
    upload(
        late,
        vec![r#"{"id":"late-1","timestamp":1700000009999}"#.into()],
    );

    for (category, meta, events) in &uploads {
        let document = format!(r#"{{"meta":{meta},"data":[{}]}}"#, events.join(","));
        let response = app
            .client
            .post(app.url("/api/v1/upload"))
            .header("content-type", "application/json")
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .body(document)
            .send()
            .await
            .unwrap();
        let status = response.status();
        assert_eq!(
            status,
            200,
            "{category}: {}",
            response.text().await.unwrap()
        );
    }
    for (category, _, events) in &uploads {
        wait_for_rows(&ns, category, events.len() as u64).await;
    }

    for (category, meta, events) in &uploads {
        let topic = ns.topic(category);
        let messages = broker.read(&topic, events.len(), Duration::from_secs(10));
        assert_eq!(messages.len(), events.len(), "{topic}");
        let rows = ch
            .rows(&format!(
                "SELECT *, toString(backend_id) AS backend_id_text, toUnixTimestamp(upload_time) AS upload_s, \
                 toUnixTimestamp(ingested_at) AS ingested_s \
                 FROM {} FINAL WHERE category = '{category}' ORDER BY kafka_offset",
                ns.qualified_table()
            ))
            .await;
        assert_eq!(rows.len(), events.len(), "{category}: one row per event");
        for ((row, message), event) in rows.iter().zip(&messages).zip(events) {
            let value = support::value_json(message);
            let sent: Value = serde_json::from_str(event).unwrap();
            assert_eq!(row["backend_id_text"], value["backend_id"]);
            assert_eq!(row["app_id"], "shop");
            assert_eq!(row["category"], category.as_str());
            let expected_id = match &sent["id"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(row["event_id"], expected_id);
            let upload_ms = value["upload_time"].as_u64().unwrap();
            assert_eq!(row["upload_time_ms"], upload_ms.to_string());
            assert_eq!(row["upload_s"], upload_ms / 1000);
            match sent["timestamp"].as_u64() {
                Some(ms) => {
                    assert_eq!(row["client_time_ms"], ms.to_string());
                    assert!(!row["client_time"].is_null());
                }
                None => {
                    assert!(row["client_time"].is_null(), "{row}");
                    assert!(row["client_time_ms"].is_null(), "{row}");
                }
            }
            for column in ["ip", "country", "region", "city"] {
                assert_eq!(row[column], value[column], "{column}");
            }
            if sent.get("ip").is_some() {
                assert_eq!(row["ip"], "81.2.69.142");
                assert_ne!(row["country"], "", "the GeoIP enrichment is kept");
            }
            assert_eq!(row["meta"], meta.as_str(), "meta exactly as sent");
            assert_eq!(row["data"], event.as_str(), "data exactly as sent");
            assert_eq!(row["request_id"], header(message, "request_id").unwrap());
            assert_eq!(row["trace_id"], trace_id);
            assert_eq!(row["kafka_topic"], topic);
            assert_eq!(row["kafka_partition"], 0);
            assert_eq!(row["kafka_offset"], message.offset().to_string());
            let ingested = row["ingested_s"].as_u64().unwrap();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            assert!(
                ingested <= now && ingested + 300 > now,
                "ingested_at {ingested}"
            );
        }
    }

    // /metrics counts what happened.
    let (status, text) = ingester.get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        common::metric(&text, "venus_ingester_rows_inserted_total", &[]),
        4.0,
        "{text}"
    );
    assert_eq!(
        common::metric(&text, "venus_ingester_messages_consumed_total", &[]),
        4.0
    );
    assert!(common::metric(&text, "venus_ingester_insert_duration_seconds_count", &[]) >= 1.0);
    assert!(common::metric(&text, "venus_ingester_batch_rows_count", &[]) >= 1.0);
    assert!(text.contains("venus_ingester_buffered_rows"));
    assert!(text.contains("venus_ingester_insert_retries_total"));
    assert!(text.contains("venus_ingester_dead_letters_total"));
    let (status, body) = ingester.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = ingester.get("/healthz").await;
    assert_eq!(status, 200);
    app.stop().await;
}

/// A gateway-shaped message value with `id` as its event id.
fn valid_message(category: &str, id: &str) -> String {
    format!(
        r#"{{"backend_id":"{}","upload_time":1700000000000,"ip":"127.0.0.1","country":"","region":"","city":"","meta":{{"app_id":"a","category":"{category}"}},"data":{{"id":"{id}"}}}}"#,
        uuid::Uuid::new_v4()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_goes_to_the_dead_letter_topic_and_the_partition_goes_on() {
    let broker = shared_broker();
    let ch = clickhouse();
    let ns = Namespace::new("poison");
    let category = "orders";
    let topic = ns.topic(category);
    broker.create_topic(&topic).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .create()
        .unwrap();
    let values = vec![
        valid_message(category, "before"),
        "this is not JSON".to_owned(),
        valid_message(category, "after-1"),
        r#"{"backend_id":"x","meta":1}"#.to_owned(),
        valid_message(category, "after-2"),
    ];
    for value in &values {
        producer
            .send(
                FutureRecord::<(), _>::to(&topic).payload(value).headers(
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: "request_id",
                        value: Some("req-poison"),
                    }),
                ),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let ingester = IngesterProcess::start(&ingester_env(
        broker,
        &ch.url(),
        &ns,
        IngesterProcess::free_port(),
    ));
    wait_for_rows(&ns, category, 3).await;
    let ids: Vec<String> = ch
        .rows(&format!(
            "SELECT event_id FROM {} FINAL WHERE category = '{category}' ORDER BY kafka_offset",
            ns.qualified_table()
        ))
        .await
        .into_iter()
        .map(|r| r["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, vec!["before", "after-1", "after-2"]);

    let dead = broker.read(&ns.dead_letter_topic(), 2, Duration::from_secs(20));
    assert_eq!(dead.len(), 2, "both poison messages, once each");
    let by_offset: HashMap<String, _> = dead
        .iter()
        .map(|m| (header(m, "dead_letter.offset").unwrap(), m))
        .collect();
    let first = by_offset["1"];
    assert_eq!(first.payload().unwrap(), b"this is not JSON");
    assert!(
        header(first, "dead_letter.reason")
            .unwrap()
            .contains("not JSON"),
        "{:?}",
        header(first, "dead_letter.reason")
    );
    assert_eq!(header(first, "dead_letter.topic").unwrap(), topic);
    assert_eq!(header(first, "dead_letter.partition").unwrap(), "0");
    assert_eq!(header(first, "dead_letter.stage").unwrap(), "decode");
    assert_eq!(
        header(first, "dead_letter.consumer_group").unwrap(),
        ns.group()
    );
    assert_eq!(
        header(first, "request_id").unwrap(),
        "req-poison",
        "original headers kept"
    );
    assert!(by_offset.contains_key("3"));

    let (_, text) = ingester.get("/metrics").await;
    assert_eq!(
        common::metric(
            &text,
            "venus_ingester_dead_letters_total",
            &[("stage", "decode")]
        ),
        2.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ingester_metric_the_dashboard_queries_is_exported() {
    let dashboard = support::dashboard::dashboard();
    let used: Vec<String> = support::dashboard::dashboard_metric_names(&dashboard)
        .into_iter()
        .filter(|name| support::dashboard::is_ingester_metric(name))
        .collect();
    for wanted in ["lag", "rows_inserted", "insert_duration", "dead_letters"] {
        assert!(
            used.iter().any(|name| name.contains(wanted)),
            "the ingester row shows {wanted}: {used:?}"
        );
    }
    // A real ingester with traffic, so that histograms have samples.
    let broker = shared_broker();
    let ch = clickhouse();
    let ns = Namespace::new("dash");
    broker.create_topic(&ns.topic("m")).await;
    let ingester = IngesterProcess::start(&ingester_env(
        broker,
        &ch.url(),
        &ns,
        IngesterProcess::free_port(),
    ));
    ingester.wait_assigned();
    let app = common::gateway(broker, &ns).await;
    common::upload_events(&app, "m", 3, 3, "d").await;
    wait_for_rows(&ns, "m", 3).await;
    // The lag gauge comes with librdkafka's statistics (every 2 s).
    let text = eventually(Duration::from_secs(20), "the lag gauge", || async {
        let (_, text) = ingester.get("/metrics").await;
        text.contains("venus_ingester_consumer_lag").then_some(text)
    })
    .await;
    let exported = support::dashboard::exported_names(&text);
    for name in &used {
        assert!(
            exported.contains(name.as_str()),
            "the dashboard uses {name}, which the ingester's /metrics lacks"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_of_a_group_share_the_partitions_and_count_each_event_once() {
    let broker = shared_broker();
    let ch = clickhouse();
    let ns = Namespace::new("scale");
    let category = "shared";
    broker
        .create_topic_with_partitions(&ns.topic(category), 2)
        .await;
    let first = IngesterProcess::start(&ingester_env(
        broker,
        &ch.url(),
        &ns,
        IngesterProcess::free_port(),
    ));
    first.wait_assigned();
    let app = common::gateway(broker, &ns).await;
    let lags = |text: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter(|line| line.starts_with("venus_ingester_consumer_lag{"))
            .filter_map(|line| {
                let partition = line.split("partition=\"").nth(1)?.split('"').next()?;
                let value = line.rsplit_once(' ')?.1.parse().ok()?;
                Some((partition.to_owned(), value))
            })
            .collect()
    };
    // The first instance alone reads both partitions and reports both lags.
    for round in 0..10 {
        common::upload_events(&app, category, 10, 10, &format!("a{round}")).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait_for_rows(&ns, category, 100).await;
    eventually(Duration::from_secs(20), "two lag series", || async {
        let (_, text) = first.get("/metrics").await;
        (lags(&text).len() == 2).then_some(())
    })
    .await;
    let second = IngesterProcess::start(&ingester_env(
        broker,
        &ch.url(),
        &ns,
        IngesterProcess::free_port(),
    ));
    second.wait_assigned();
    for round in 0..10 {
        common::upload_events(&app, category, 10, 10, &format!("b{round}")).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait_for_rows(&ns, category, 200).await;
    let partitions = ch
        .count(&format!(
            "SELECT uniqExact(kafka_partition) FROM {} WHERE category = '{category}'",
            ns.qualified_table()
        ))
        .await;
    assert_eq!(partitions, 2, "the gateway wrote to both partitions");
    // A consumer adds to its counter every STORE_INTERVAL (200 ms), so the
    // last rows can be in ClickHouse before their messages are counted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut total = 0.0;
    for (name, instance) in [("first", &first), ("second", &second)] {
        let (_, text) = instance.get("/metrics").await;
        let consumed = common::metric(&text, "venus_ingester_messages_consumed_total", &[]);
        assert!(consumed > 0.0, "the {name} instance consumed nothing");
        total += consumed;
    }
    assert_eq!(total, 200.0, "each message read by one instance only");
    assert_eq!(
        ch.count(&count_final_sql(&ns.qualified_table(), category))
            .await,
        200
    );
    assert_eq!(
        ch.count(&format!(
            "SELECT count() FROM {} WHERE category = '{category}'",
            ns.qualified_table()
        ))
        .await,
        200,
        "and inserted once"
    );

    // Each instance's lag gauge covers its own partition only: the first
    // one's partition revoked when the second joined is gone from it.
    let mut owned = Vec::new();
    for instance in [&first, &second] {
        let partitions = eventually(Duration::from_secs(20), "one lag series", || async {
            let (_, text) = instance.get("/metrics").await;
            let series = lags(&text);
            (series.len() == 1).then_some(series)
        })
        .await;
        owned.push(partitions[0].0.clone());
    }
    assert_ne!(
        owned[0], owned[1],
        "each reports its own partition: {owned:?}"
    );

    // The second leaves: the first takes both, and its lag returns to 0.
    let mut second = second;
    assert_eq!(second.terminate(Duration::from_secs(40)), Some(0));
    common::upload_events(&app, category, 20, 10, "after").await;
    wait_for_rows(&ns, category, 220).await;
    eventually(
        Duration::from_secs(60),
        "both partitions at lag 0",
        || async {
            let (_, text) = first.get("/metrics").await;
            let series = lags(&text);
            (series.len() == 2 && series.iter().all(|(_, lag)| *lag == 0.0)).then_some(())
        },
    )
    .await;
    app.stop().await;
}
