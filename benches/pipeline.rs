//! The handler path without network: parse + validate, enrich, and build
//! the Kafka message values of a 50-event batch (~300 bytes per event).
//!
//!     cargo bench --bench pipeline
//!
//! Throughput is reported in events.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::executor::block_on;

use venus::apps::keys::{self, KeyDigest};
use venus::apps::settings::{AccessPolicy, AppPolicy, AuthMode, RateLimit};
use venus::apps::Apps;
use venus::domain::AppId;
use venus::geoip::{test_support, GeoIp};
use venus::metrics::Metrics;
use venus::pipeline::apply_privacy::ApplyPrivacy;
use venus::pipeline::authorize::Authorize;
use venus::pipeline::ip_enrich::IpEnrich;
use venus::pipeline::split_and_validate::{BatchLimits, SplitAndValidate};
use venus::pipeline::write_kafka::write_message_value;
use venus::pipeline::{Handler, UploadContext, UploadRequest};
use venus::privacy::{
    AppPrivacy, FieldRuleSettings, IpMode, PrivacyPolicy, PrivacySettings, Secret,
};

const EVENTS: usize = 50;

/// A batch like an SDK sends: a few IPs (public v4/v6, private), ~300-byte
/// events with nested properties.
fn batch() -> Bytes {
    let ips = ["81.2.69.142", "2a02:d280::7", "10.1.2.3", "89.160.20.128"];
    let events: Vec<String> = (0..EVENTS)
        .map(|i| {
            format!(
                r#"{{"id":"evt-{i:06}","ip":"{}","timestamp":{},"name":"screen_view","props":{{"screen":"/catalog/item/{i}","referrer":"/home","duration_ms":{},"experiment":"checkout-v2","flags":[true,false,true]}},"device":{{"os":"iOS","os_version":"17.2","model":"iPhone15,3","locale":"en_GB"}}}}"#,
                ips[i % ips.len()],
                1_763_779_200_000u64 + i as u64,
                100 + i * 7,
            )
        })
        .collect();
    Bytes::from(format!(
        r#"{{"meta":{{"app_id":"com.example.shop","category":"page_view","sdk":"ios/4.2.0","session":"9f1c2e"}},"data":[{}]}}"#,
        events.join(",")
    ))
}

/// IP truncation and three field rules.
fn privacy_rules() -> Arc<AppPrivacy> {
    let rule = |path: &str, action: &str| FieldRuleSettings {
        path: path.into(),
        action: action.into(),
        detect: Vec::new(),
    };
    let settings = PrivacySettings {
        ip: IpMode::Truncate,
        hash_key: Secret::new("a bench key of thirty-two bytes."),
        fields: vec![
            rule("data.device.model", "hash"),
            rule("data.props.experiment", "remove"),
            rule("data.props.referrer", "scrub"),
        ],
        ..PrivacySettings::default()
    };
    PrivacyPolicy::parse(&settings).unwrap().default
}

fn context(document: &Bytes) -> UploadContext {
    UploadContext::new(UploadRequest {
        anonymous: false,
        key: None,
        request_id: "bench".into(),
        client_ip: "81.2.69.1".parse().unwrap(),
        document: document.clone(),
    })
}

/// The Kafka message values of an enriched batch, as write_kafka makes
/// them (one buffer for the batch); their total size.
fn serialize(ctx: &UploadContext, value: &mut Vec<u8>) -> usize {
    let batch = ctx.batch.as_ref().unwrap();
    let mut bytes = 0;
    for event in &ctx.events {
        write_message_value(value, batch, event.enrichment.as_ref().unwrap(), &event.raw);
        bytes += value.len();
    }
    bytes
}

fn pipeline(c: &mut Criterion) {
    let document = batch();
    let split = SplitAndValidate::new(
        BatchLimits {
            max_events: 1000,
            max_meta_bytes: 16 * 1024,
        },
        &[],
        None,
    );
    let geoip = Arc::new(GeoIp::from_bytes(test_support::city_database()).unwrap());
    let enrich = IpEnrich::new(geoip, Metrics::noop());

    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(EVENTS as u64));

    // The depth and escape scan split_and_validate (and the ingester, per
    // message) runs before parsing; here alone.
    group.bench_function("json_scan", |b| {
        b.iter(|| venus::json_scan::scan(black_box(&document), 128).is_ok())
    });

    group.bench_function("split_and_validate", |b| {
        b.iter(|| {
            let mut ctx = context(&document);
            block_on(split.handle(&mut ctx));
            black_box(ctx.events.len())
        })
    });

    let mut validated = context(&document);
    block_on(split.handle(&mut validated));
    group.bench_function("ip_enrich", |b| {
        b.iter(|| {
            let mut ctx = UploadContext {
                request: validated.request.clone(),
                batch: validated.batch.clone(),
                events: validated.events.clone(),
                errors: Vec::new(),
                privacy: None,
            };
            block_on(enrich.handle(&mut ctx));
            black_box(ctx.events.len())
        })
    });

    let mut enriched = context(&document);
    block_on(split.handle(&mut enriched));
    block_on(enrich.handle(&mut enriched));
    let batch = enriched.batch.clone().unwrap();
    // As write_kafka does it: one buffer for the batch.
    let mut value = Vec::with_capacity(4096);
    group.bench_function("serialize", |b| {
        b.iter(|| {
            let mut bytes = 0;
            for event in &enriched.events {
                write_message_value(
                    &mut value,
                    &batch,
                    event.enrichment.as_ref().unwrap(),
                    &event.raw,
                );
                bytes += value.len();
            }
            black_box(bytes)
        })
    });

    // authorize as a `keys` gateway runs it: the key read from the request
    // and hashed, the app's digest compared, both buckets taken (limits high
    // enough never to refuse, so every iteration does the whole work).
    let key = "sk_live_bench_0123456789";
    let never = u32::MAX / 2;
    let apps = Apps::new(AccessPolicy {
        mode: AuthMode::Keys,
        apps: vec![AppPolicy {
            app_id: AppId::parse("com.example.shop").unwrap(),
            keys: vec![KeyDigest::of("another"), KeyDigest::of(key)],
            categories: ["page_view".to_owned()].into(),
            limits: RateLimit {
                events_per_sec: never,
                events_burst: never,
                requests_per_sec: never,
                requests_burst: never,
            },
            privacy: Arc::new(venus::privacy::AppPrivacy::keep_all()),
        }],
        default_limits: RateLimit::default(),
        max_tracked_apps: 10_000,
        client_limits: RateLimit::default(),
        max_tracked_clients: 100_000,
        default_privacy: Arc::new(venus::privacy::AppPrivacy::keep_all()),
    });
    let authorize = Authorize::new(apps.clone(), Metrics::noop());
    let mut headers = axum::http::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {key}").parse().unwrap());
    let uri: axum::http::Uri = "/api/v1/upload".parse().unwrap();
    group.bench_function("authorize", |b| {
        b.iter(|| {
            let mut ctx = UploadContext {
                request: validated.request.clone(),
                batch: validated.batch.clone(),
                // Cloned per iteration as ip_enrich's bench does; the ratio
                // that matters is the whole-path pair below.
                events: validated.events.clone(),
                errors: Vec::new(),
                privacy: None,
            };
            ctx.request.key = keys::presented(&headers, &uri);
            let outcome = block_on(authorize.handle(&mut ctx));
            assert!(outcome.responder.is_none());
            black_box(ctx.request.key.is_some())
        })
    });

    // The check alone, without the context copies above: what the hot
    // path pays per batch for keys and limits.
    let registry = apps.load();
    group.bench_function("authorize_check_only", |b| {
        b.iter(|| {
            let key = keys::presented(&headers, &uri);
            let admitted = registry.admit(
                "com.example.shop",
                "page_view",
                key.as_ref(),
                [203, 0, 113, 7].into(),
                EVENTS,
            );
            assert!(admitted.is_ok());
            black_box(admitted.is_ok())
        })
    });

    group.bench_function("parse_validate_authorize_enrich_serialize", |b| {
        b.iter(|| {
            let mut ctx = context(&document);
            ctx.request.key = keys::presented(&headers, &uri);
            block_on(split.handle(&mut ctx));
            let outcome = block_on(authorize.handle(&mut ctx));
            assert!(outcome.responder.is_none());
            block_on(enrich.handle(&mut ctx));
            black_box(serialize(&ctx, &mut value))
        })
    });

    group.bench_function("parse_validate_enrich_serialize", |b| {
        b.iter(|| {
            let mut ctx = context(&document);
            block_on(split.handle(&mut ctx));
            block_on(enrich.handle(&mut ctx));
            black_box(serialize(&ctx, &mut value))
        })
    });

    // The privacy rules of docs/BENCHMARKS.md's A/B: IP truncation and three
    // field rules (a hash, a removal, a scrub), on the enriched batch.
    let privacy = privacy_rules();
    group.bench_function("apply_privacy", |b| {
        b.iter(|| {
            let mut ctx = UploadContext {
                request: enriched.request.clone(),
                batch: enriched.batch.clone(),
                events: enriched.events.clone(),
                errors: Vec::new(),
                privacy: Some(privacy.clone()),
            };
            block_on(ApplyPrivacy.handle(&mut ctx));
            black_box(ctx.events.len())
        })
    });
    group.bench_function("parse_validate_enrich_privacy_serialize", |b| {
        b.iter(|| {
            let mut ctx = context(&document);
            block_on(split.handle(&mut ctx));
            ctx.privacy = Some(privacy.clone());
            block_on(enrich.handle(&mut ctx));
            block_on(ApplyPrivacy.handle(&mut ctx));
            black_box(serialize(&ctx, &mut value))
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
