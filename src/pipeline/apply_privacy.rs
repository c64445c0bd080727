//! Fourth handler: the app's privacy rules on what goes to Kafka.
//!
//! `ip_enrich` has already reduced each event's stored address; here the
//! field rules of the app (`privacy.fields`, or its own) rewrite `meta`
//! once for the batch and each pending event's `data`, and an event's own
//! `ip` member, sent in its `data`, is replaced by what the app's IP mode
//! stores (removed when it stores nothing).
//!
//! An upload whose app has no field rule and keeps addresses (the default)
//! skips this handler altogether, span included: its bytes go on untouched.

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::pipeline::context::SentIp;
use crate::pipeline::{cpu_heavy, Handler, Outcome, UploadContext};
use crate::privacy::Unreadable;
use crate::wire::PartCode;

const UNREADABLE_META: &str =
    "the batch's meta could not be read to apply the app's privacy rules; nothing of it is stored";
const UNREADABLE_EVENT: &str =
    "the event could not be read to apply the app's privacy rules; it is not stored";

pub struct ApplyPrivacy;

impl Handler for ApplyPrivacy {
    fn name(&self) -> &'static str {
        "apply_privacy"
    }

    fn applies(&self, ctx: &UploadContext) -> bool {
        let rules = ctx.privacy_rules();
        rules.has_meta_rules()
            || rules.has_data_rules()
            || (rules.rewrites_sent_ip()
                && ctx
                    .events
                    .iter()
                    .any(|e| e.is_pending() && matches!(e.ip, SentIp::Text(_))))
    }

    fn handle<'a>(&'a self, ctx: &'a mut UploadContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { cpu_heavy(ctx.request.document.len(), || run(ctx)) })
    }
}

fn run(ctx: &mut UploadContext) -> Outcome {
    let Some(app) = ctx.privacy.clone() else {
        return Outcome::proceed();
    };
    let rules = app.rules(ctx.anonymous());
    // Hashes repeat within a batch (its events share a user, a session),
    // and the edit list serves every event.
    let mut scratch = rules.scratch();
    let mut rewritten = 0i64;
    // What the rules cannot read is not stored as it came (fail closed):
    // the door accepted every part as JSON, so this is a bug, never input.
    let mut meta_unreadable = false;
    if let Some(batch) = ctx.batch.as_mut() {
        // Valid UTF-8: the document was checked as JSON text.
        let meta = std::str::from_utf8(&batch.meta).unwrap_or_default();
        match rules.apply_meta(meta, &mut scratch) {
            Ok(Some(clean)) => batch.meta = Bytes::from(clean),
            Ok(None) => {}
            Err(Unreadable) => meta_unreadable = true,
        }
    }
    for event in ctx.events.iter_mut().filter(|e| e.is_pending()) {
        if meta_unreadable {
            event.fail(PartCode::Serialization, UNREADABLE_META);
            continue;
        }
        let sent_ip = match (&event.ip, &event.enrichment) {
            (SentIp::Text(_), Some(enrichment)) if rules.rewrites_sent_ip() => Some(&enrichment.ip),
            _ => None,
        };
        let raw = std::str::from_utf8(&event.raw).unwrap_or_default();
        match rules.apply_data(raw, sent_ip, &mut scratch) {
            Ok(Some(clean)) => {
                event.raw = Bytes::from(clean);
                rewritten += 1;
            }
            Ok(None) => {}
            Err(Unreadable) => event.fail(PartCode::Serialization, UNREADABLE_EVENT),
        }
    }
    Outcome::proceed().with_attribute(opentelemetry::KeyValue::new(
        "venus.privacy.events_rewritten",
        rewritten,
    ))
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;

    use super::*;
    use crate::pipeline::context::EventStatus;
    use crate::pipeline::split_and_validate::{BatchLimits, SplitAndValidate};
    use crate::pipeline::UploadRequest;
    use crate::privacy::{FieldRuleSettings, PrivacyPolicy, PrivacySettings};

    /// Two events with an `email`, validated at the door, and rules that
    /// remove `data.email` and `meta.user`.
    fn validated() -> UploadContext {
        let document = Bytes::from_static(
            br#"{"meta":{"app_id":"a","category":"c","user":"u"},"data":[{"id":"1","email":"x@y.z"},{"id":"2","email":"x@y.z"}]}"#,
        );
        let mut ctx = UploadContext::new(UploadRequest {
            request_id: "test".into(),
            client_ip: "81.2.69.1".parse().unwrap(),
            document,
            key: None,
            anonymous: false,
        });
        let limits = BatchLimits {
            max_events: 10,
            max_meta_bytes: 1024,
        };
        block_on(SplitAndValidate::new(limits, &[], None).handle(&mut ctx));
        assert_eq!(ctx.events.len(), 2);
        let remove = |path: &str| FieldRuleSettings {
            path: path.into(),
            action: "remove".into(),
            detect: Vec::new(),
        };
        let settings = PrivacySettings {
            fields: vec![remove("data.email"), remove("meta.user")],
            ..PrivacySettings::default()
        };
        ctx.privacy = Some(PrivacyPolicy::parse(&settings).unwrap().default);
        ctx
    }

    fn failed_for_privacy(status: &EventStatus) -> bool {
        matches!(status, EventStatus::Failed { code: PartCode::Serialization, reason } if reason.contains("privacy rules"))
    }

    #[test]
    fn what_the_rules_cannot_read_is_failed_not_stored_as_it_came() {
        let mut ctx = validated();
        // Bytes the door never let through: the rules cannot say whether
        // an `email` is in them.
        ctx.events[1].raw = Bytes::from_static(br#"{"id":"2","email":"x@y.z""#);
        run(&mut ctx);
        assert_eq!(&ctx.events[0].raw[..], br#"{"id":"1"}"#);
        assert!(ctx.events[0].is_pending());
        assert!(
            failed_for_privacy(&ctx.events[1].status),
            "{:?}",
            ctx.events[1].status
        );
        assert_eq!(
            &ctx.batch.as_ref().unwrap().meta[..],
            br#"{"app_id":"a","category":"c"}"#
        );

        // An unreadable `meta`: no event of the batch is stored.
        let mut ctx = validated();
        ctx.batch.as_mut().unwrap().meta = Bytes::from_static(b"{\"user\":");
        run(&mut ctx);
        assert!(ctx.events.iter().all(|e| failed_for_privacy(&e.status)));
    }
}
