//! What the ingester does for every message before its batch is sent:
//! decode the gateway's value and write its row for ClickHouse
//! (`row/write_row`), and read its trace context (`row/extract`). The
//! messages are the ones `venus-loadtest --raw-kafka` produces (and
//! `scripts/bench` ingests): 50-event batches of ~300-byte events.
//!
//!     cargo bench -p venus-ingester --bench row

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use uuid::Uuid;
use venus_ingester::record::{Record, RecordHeaders, Source};
use venus_loadtest::generate::Generator;
use venus_loadtest::GenConfig;

/// 1,000 messages of 20 batches, with the gateway's two headers.
fn records() -> Vec<Record> {
    let config = GenConfig {
        seed: 7,
        ..GenConfig::default()
    };
    let generator = Generator::new(&config, 1_700_000_000_000);
    let mut records = Vec::new();
    for request in 0..20u64 {
        let batch = generator.batch(request);
        for (index, ip) in batch.accepted_events() {
            let mut value = Vec::new();
            let backend_id = Uuid::now_v7();
            venus_loadtest::raw_kafka::message_value(
                &batch,
                index,
                ip,
                backend_id,
                1_700_000_000_000,
                &mut value,
            );
            let trace = Uuid::new_v4().as_u128();
            let traceparent = format!("00-{trace:032x}-{:016x}-01", trace as u64 | 1);
            let request_id = format!("{:032x}", Uuid::now_v7().as_u128());
            let source = Source {
                topic: "to_analyzer__0.page_view".into(),
                partition: 0,
                offset: records.len() as i64,
                epoch: 1,
            };
            let headers = [
                ("traceparent", Some(traceparent.as_bytes())),
                ("request_id", Some(request_id.as_bytes())),
            ];
            records.push(Record::new(source, &value, None, headers));
        }
    }
    records
}

fn bench(c: &mut Criterion) {
    let records = records();
    let bytes: usize = records.iter().map(|r| r.payload().len()).sum();
    let mut group = c.benchmark_group("row");
    group.throughput(Throughput::Elements(records.len() as u64));
    let mut out = Vec::with_capacity(bytes * 3);
    group.bench_function("write_row", |b| {
        b.iter(|| {
            out.clear();
            for record in &records {
                venus_ingester::row::write_row(
                    &mut out,
                    black_box(record),
                    1_700_000_001,
                    venus_ingester::row::Layout::Classic,
                )
                .expect("a gateway message is a row");
            }
            black_box(out.len())
        })
    });
    group.bench_function("extract", |b| {
        b.iter(|| {
            for record in &records {
                black_box(venus_shared::telemetry::extract_with(&RecordHeaders(
                    black_box(record),
                )));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
