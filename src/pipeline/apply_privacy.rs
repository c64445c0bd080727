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
    if let Some(batch) = ctx.batch.as_mut() {
        // Valid UTF-8: the document was checked as JSON text.
        let meta = std::str::from_utf8(&batch.meta).unwrap_or_default();
        if let Some(clean) = rules.apply_meta(meta, &mut scratch) {
            batch.meta = Bytes::from(clean);
        }
    }
    for event in ctx.events.iter_mut().filter(|e| e.is_pending()) {
        let sent_ip = match (&event.ip, &event.enrichment) {
            (SentIp::Text(_), Some(enrichment)) if rules.rewrites_sent_ip() => Some(&enrichment.ip),
            _ => None,
        };
        let raw = std::str::from_utf8(&event.raw).unwrap_or_default();
        if let Some(clean) = rules.apply_data(raw, sent_ip, &mut scratch) {
            event.raw = Bytes::from(clean);
            rewritten += 1;
        }
    }
    Outcome::proceed().with_attribute(opentelemetry::KeyValue::new(
        "venus.privacy.events_rewritten",
        rewritten,
    ))
}
