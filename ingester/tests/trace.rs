//! One upload is one trace from the client through the gateway into the
//! ingester: the ingester's `process` span has the upload's trace id and the
//! gateway's `write_kafka` span as its parent; the insert span is a client
//! span of ClickHouse linked to it. Spans of both are received by an
//! in-process OTLP/HTTP collector.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;

use common::{count_final_sql, eventually, ingester_env, IngesterProcess, Namespace};
use support::clickhouse::ClickHouseServer;
use support::otlp::{self, attribute, hex};
use support::shared_broker;

fn text(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        Some(AnyValue::StringValue(v)) => v,
        Some(AnyValue::IntValue(v)) => v.to_string(),
        other => panic!("{}: {key} = {other:?}", span.name),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_span_continues_the_uploads_trace_under_write_kafka() {
    let (collector_url, received) = otlp::start();
    support::init_tracing_exporting_to(&collector_url);
    let broker = shared_broker();
    let ch = ClickHouseServer::start();
    let ns = Namespace::new("trace");
    let category = "traced";
    broker.create_topic(&ns.topic(category)).await;
    let mut env = ingester_env(broker, &ch.url(), &ns, IngesterProcess::free_port());
    env.insert(
        "VENUS__TELEMETRY__OTLP_ENDPOINT".into(),
        collector_url.clone(),
    );
    env.insert("VENUS__TELEMETRY__OTLP_METRICS".into(), "false".into());
    let ingester = IngesterProcess::start(&env);
    ingester.wait_assigned();
    let app = common::gateway(broker, &ns).await;

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let response = app
        .client
        .post(app.url("/api/v1/upload"))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .body(format!(
            r#"{{"meta":{{"app_id":"a","category":"{category}"}},"data":[{{"id":"t1"}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sql = count_final_sql(&ns.qualified_table(), category);
    let table = ns.table();
    eventually(Duration::from_secs(60), "the row", || {
        let sql = sql.clone();
        let table = table.clone();
        let ch = &ch;
        async move {
            let tables = ch
                .count(&format!(
                    "SELECT count() FROM system.tables WHERE database='venus' AND name='{table}'"
                ))
                .await;
            (tables == 1 && ch.count(&sql).await == 1).then_some(())
        }
    })
    .await;

    // Both processes export in the background; wait for the spans.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (write_kafka, process, insert) = loop {
        let _ = support::init_tracing().force_flush();
        let spans = received.spans();
        let of_trace: Vec<&Span> = spans
            .iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .collect();
        let write_kafka = of_trace.iter().find(|s| s.name == "write_kafka").cloned();
        let process = of_trace.iter().find(|s| s.name == "process").cloned();
        let insert = spans
            .iter()
            .find(|s| s.name == format!("INSERT {}", ns.qualified_table()))
            .cloned();
        if let (Some(w), Some(p), Some(i)) = (write_kafka, process, insert.clone()) {
            break (w.clone(), p.clone(), i);
        }
        assert!(
            Instant::now() < deadline,
            "spans missing; got {:?}",
            spans
                .iter()
                .map(|s| (&s.name, hex(&s.trace_id)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        process.parent_span_id, write_kafka.span_id,
        "process is a child of write_kafka"
    );
    assert_eq!(process.kind, SpanKind::Consumer as i32);
    assert_eq!(text(&process, "messaging.system"), "kafka");
    assert_eq!(
        text(&process, "messaging.destination.name"),
        ns.topic(category)
    );
    assert_eq!(text(&process, "messaging.destination.partition.id"), "0");
    assert_eq!(text(&process, "messaging.kafka.offset"), "0");
    assert_eq!(text(&process, "messaging.consumer.group.name"), ns.group());

    assert_eq!(insert.kind, SpanKind::Client as i32);
    assert_eq!(text(&insert, "db.system"), "clickhouse");
    assert_eq!(text(&insert, "db.operation.batch.size"), "1");
    assert!(
        insert
            .links
            .iter()
            .any(|l| l.trace_id == process.trace_id && l.span_id == process.span_id),
        "the insert links to the message's process span: {:?}",
        insert.links
    );
    drop(ingester);
    app.stop().await;
}
