//! The batch parser (`split_and_validate`) on arbitrary bytes: it must never
//! panic or overflow its stack, never answer 5xx, and every event it accepts
//! must be a JSON object whose strings hold no invalid escape. It reads the
//! JSON grammar as serde_json does: a body it calls not valid JSON is one
//! serde_json refuses, and a body serde_json refuses yields no event.
#![no_main]

use bytes::Bytes;
use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use venus::pipeline::split_and_validate::{BatchLimits, SplitAndValidate};
use venus::pipeline::{EventStatus, Handler, UploadContext, UploadRequest};

fuzz_target!(|data: &[u8]| {
    let handler = SplitAndValidate::new(
        BatchLimits {
            max_events: 100,
            max_meta_bytes: 16 * 1024,
        },
        &[],
        None,
    );
    let mut ctx = UploadContext::new(UploadRequest {
        anonymous: false,
        request_id: "fuzz".into(),
        key: None,
        client_ip: "127.0.0.1".parse().unwrap(),
        document: Bytes::copy_from_slice(data),
    });
    let outcome = block_on(handler.handle(&mut ctx));
    let json = serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok();
    if let Some(reply) = outcome.responder {
        assert!(reply.status.as_u16() < 500, "{}", reply.status);
        if reply.body.data.starts_with("the batch is not valid JSON") {
            assert!(!json, "{}", reply.body.data);
        }
    }
    if !json {
        assert!(ctx.events.is_empty());
    }
    for event in &ctx.events {
        if matches!(event.status, EventStatus::Pending) {
            assert!(event.raw.starts_with(b"{"));
            assert!(venus::json_scan::scan(&event.raw, usize::MAX).is_ok());
            assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&event.raw).is_ok());
            assert!(!venus::json_scan::has_lone_surrogate(&event.raw));
        }
    }
});
