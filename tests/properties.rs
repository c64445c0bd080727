//! Properties of the two places where client bytes are read: the body
//! reader (`upload_body`) and the batch parser (`split_and_validate`).
//!
//! * Arbitrary bytes, in any body form, never panic and never get a 5xx.
//! * Arbitrary JSON documents never panic and never get a 5xx.
//! * Strings built from valid and invalid escapes: an event is accepted only
//!   if a standard JSON parser (serde_json) reads it, and a valid batch is
//!   accepted whole, with its bytes unchanged.

use axum::body::Body;
use axum::extract::Request;
use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Value};

use venus::pipeline::split_and_validate::{BatchLimits, SplitAndValidate};
use venus::pipeline::{EventStatus, Handler, UploadContext, UploadRequest};
use venus::upload_body::read_document;

const LIMITS: BatchLimits = BatchLimits {
    max_events: 50,
    max_meta_bytes: 4096,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs the parser on `document`: the reply status if it answered, and the
/// context.
fn split(document: Vec<u8>) -> (Option<u16>, UploadContext) {
    let handler = SplitAndValidate::new(LIMITS, &[], None);
    let mut ctx = UploadContext::new(UploadRequest {
        anonymous: false,
        key: None,
        request_id: "p".into(),
        client_ip: "127.0.0.1".parse().unwrap(),
        document: Bytes::from(document),
    });
    let outcome = runtime().block_on(handler.handle(&mut ctx));
    (outcome.responder.map(|r| r.status.as_u16()), ctx)
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The text of a JSON string literal's content, from fragments that include
/// escapes valid and invalid, and unpaired surrogates.
fn string_content() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        4 => "[a-zA-Z0-9 é€😀\\[\\]{}]{1,4}",
        1 => Just(r#"\""#.to_owned()),
        1 => Just(r"\\".to_owned()),
        1 => Just(r"\/".to_owned()),
        1 => Just(r"\n\t\r\b\f".to_owned()),
        1 => Just(r"\u00e9".to_owned()),
        1 => Just(r"\ud83d\ude00".to_owned()),
        1 => Just(r"\ud800".to_owned()),
        1 => Just(r"\udc00".to_owned()),
        1 => Just(r"\uZZZZ".to_owned()),
        1 => Just(r#"\u""#.to_owned()),
        1 => Just(r"\u12".to_owned()),
        1 => Just(r"\x".to_owned()),
        1 => Just(r"\'".to_owned()),
    ];
    prop::collection::vec(fragment, 0..6).prop_map(|parts| parts.concat())
}

fn document_with(meta_extra: &str, events: &[String]) -> String {
    format!(
        r#"{{"meta":{{"app_id":"a","category":"c","x":"{meta_extra}"}},"data":[{}]}}"#,
        events
            .iter()
            .enumerate()
            .map(|(i, text)| format!(r#"{{"id":"e{i}","t":"{text}"}}"#))
            .collect::<Vec<_>>()
            .join(",")
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_and_never_get_a_5xx(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let (status, _) = split(bytes);
        if let Some(status) = status {
            prop_assert!(status < 500, "{status}");
        }
    }

    #[test]
    fn arbitrary_json_never_panics_and_never_gets_a_5xx(value in json_value()) {
        let (status, _) = split(serde_json::to_vec(&value).unwrap());
        if let Some(status) = status {
            prop_assert!(status < 500, "{status}");
        }
    }

    #[test]
    fn arbitrary_events_in_a_valid_envelope_are_judged_not_crashed_on(events in prop::collection::vec(json_value(), 1..8)) {
        let document = json!({"meta": {"app_id": "a", "category": "c"}, "data": events});
        let (status, ctx) = split(serde_json::to_vec(&document).unwrap());
        if let Some(status) = status {
            prop_assert!(status == 400, "{status}");
        } else {
            prop_assert_eq!(ctx.events.len(), events.len());
        }
    }

    #[test]
    fn an_accepted_event_is_one_a_standard_parser_reads(
        meta_extra in string_content(),
        texts in prop::collection::vec(string_content(), 1..6),
    ) {
        let document = document_with(&meta_extra, &texts);
        let whole: Result<Value, _> = serde_json::from_str(&document);
        let (status, ctx) = split(document.clone().into_bytes());
        match status {
            // Refused whole: then a standard parser refuses it too, or its
            // meta is what it refuses.
            Some(400) => {
                let meta: Result<Value, _> =
                    serde_json::from_str(&format!(r#""{meta_extra}""#));
                prop_assert!(whole.is_err() || meta.is_err(), "{document}");
            }
            Some(other) => prop_assert!(false, "status {other} for {document}"),
            None => {
                let meta = ctx.batch.as_ref().unwrap().meta.clone();
                prop_assert!(serde_json::from_slice::<Value>(&meta).is_ok(), "{document}");
                for event in &ctx.events {
                    let parsed = serde_json::from_slice::<Value>(&event.raw);
                    match &event.status {
                        EventStatus::Pending => prop_assert!(parsed.is_ok(), "accepted but unreadable: {}", String::from_utf8_lossy(&event.raw)),
                        EventStatus::Failed { .. } => prop_assert!(parsed.is_err(), "refused but readable: {}", String::from_utf8_lossy(&event.raw)),
                        other => prop_assert!(false, "{other:?}"),
                    }
                }
                // The bytes go on exactly as sent.
                let rebuilt = document_with_raw(&meta, &ctx.events.iter().map(|e| e.raw.clone()).collect::<Vec<_>>());
                prop_assert_eq!(rebuilt, document);
            }
        }
    }

    #[test]
    fn a_valid_batch_is_accepted_whole_with_its_bytes_unchanged(
        extra in prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..4),
        payloads in prop::collection::vec(json_value(), 1..10),
    ) {
        let events: Vec<String> = payloads
            .iter()
            .enumerate()
            .map(|(i, payload)| json!({"id": format!("id-{i}"), "payload": payload}).to_string())
            .collect();
        let mut meta = json!({"app_id": "app", "category": "cat"});
        for (key, value) in &extra {
            if key != "app_id" && key != "category" {
                meta[key] = value.clone();
            }
        }
        let meta = meta.to_string();
        prop_assume!(meta.len() <= LIMITS.max_meta_bytes);
        let document = format!(r#"{{"meta":{meta},"data":[{}]}}"#, events.join(","));
        let (status, ctx) = split(document.into_bytes());
        prop_assert_eq!(status, None);
        prop_assert_eq!(&ctx.batch.as_ref().unwrap().meta[..], meta.as_bytes());
        prop_assert_eq!(ctx.events.len(), events.len());
        for (event, sent) in ctx.events.iter().zip(&events) {
            prop_assert!(event.is_pending(), "{:?}", event.status);
            prop_assert_eq!(&event.raw[..], sent.as_bytes());
        }
    }

    #[test]
    fn the_body_reader_never_panics_and_never_gets_a_5xx(
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
        content_type in prop_oneof![
            Just("application/json"),
            Just("multipart/form-data; boundary=XyZ"),
            Just("multipart/form-data"),
            Just("text/plain"),
        ],
        gzip in any::<bool>(),
        wrap_as_part in any::<bool>(),
    ) {
        let mut body = bytes.clone();
        if wrap_as_part {
            body = [
                b"--XyZ\r\nContent-Disposition: form-data; name=\"batch\"\r\n\r\n".as_slice(),
                &bytes,
                b"\r\n--XyZ--\r\n",
            ]
            .concat();
        }
        let mut request = Request::builder()
            .method("POST")
            .uri("/api/v1/upload")
            .header("content-type", content_type);
        if gzip {
            body = gzipped(&body);
            request = request.header("content-encoding", "gzip");
        }
        let request = request.body(Body::from(body)).unwrap();
        let account = venus::admission::MemoryBudget::new(1 << 30, 0).account([127, 0, 0, 1].into());
        let read = runtime().block_on(read_document(request, 4096, &account));
        if let Err(reply) = read {
            prop_assert!(reply.status.as_u16() < 500, "{}", reply.status);
        }
    }
}

fn document_with_raw(meta: &[u8], events: &[Bytes]) -> String {
    // The document shape of `document_with`, from the parts the parser
    // kept: equal to the input only if no byte changed.
    let meta = String::from_utf8_lossy(meta);
    let events: Vec<String> = events
        .iter()
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect();
    format!(r#"{{"meta":{meta},"data":[{}]}}"#, events.join(","))
}

fn gzipped(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}
