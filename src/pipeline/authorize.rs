//! Second handler: may this app upload this batch, now?
//!
//! Once `split_and_validate` has read `meta`, the policy in force (see
//! `apps`) decides: the app must be listed (`auth.mode: known_apps`,
//! `keys`), the request's key must be one of the app's (`keys`), the
//! category one the app may use, and the client address and the app must be
//! within their rate limits (one request, and as many events as are still
//! valid). A refusal ends the
//! chain before anything reaches Kafka: 401 (with `WWW-Authenticate`), 403,
//! or 429 with `Retry-After`.

use axum::http::StatusCode;
use futures::future::BoxFuture;
use opentelemetry::KeyValue;

use crate::apps::{self, Apps, Refusal};
use crate::metrics::Metrics;
use crate::pipeline::{Handler, Outcome, UploadContext};
use crate::wire::Reply;

pub struct Authorize {
    apps: Apps,
    metrics: Metrics,
}

impl Authorize {
    pub fn new(apps: Apps, metrics: Metrics) -> Self {
        Self { apps, metrics }
    }
}

impl Handler for Authorize {
    fn name(&self) -> &'static str {
        "authorize"
    }

    fn handle<'a>(&'a self, ctx: &'a mut UploadContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { self.run(ctx) })
    }
}

impl Authorize {
    fn run(&self, ctx: &mut UploadContext) -> Outcome {
        let Some(batch) = &ctx.batch else {
            // `split_and_validate` answers every batch without a valid meta.
            return Outcome::proceed();
        };
        let registry = self.apps.load();
        let app_id = batch.app_id.as_str();
        // The app's privacy rules hold for its refusals too (the server span
        // records the client's address by them).
        ctx.privacy = Some(registry.privacy_of(app_id).clone());
        let decision = registry.admit(
            app_id,
            batch.category.as_str(),
            ctx.request.key.as_ref(),
            ctx.request.client_ip,
            ctx.pending(),
        );
        match decision {
            Ok(()) => {
                self.metrics.auth_check("ok");
                Outcome::proceed()
            }
            Err(refusal) => {
                self.metrics.auth_check(refusal.result());
                if let Refusal::RateLimited { over, .. } | Refusal::ClientRateLimited { over, .. } =
                    &refusal
                {
                    let label = if registry.is_listed(app_id) {
                        app_id
                    } else {
                        apps::UNLISTED_LABEL
                    };
                    self.metrics.rate_limited(label, over.kind);
                }
                let reply = refusal_reply(&refusal);
                Outcome::fail(refusal.message(), reply)
                    .with_attribute(KeyValue::new("venus.auth.result", refusal.result()))
            }
        }
    }
}

/// The answer to a refused upload: no parts, the usual JSON shape.
pub fn refusal_reply(refusal: &Refusal) -> Reply {
    let status = match refusal {
        Refusal::MissingKey | Refusal::WrongKey { .. } => StatusCode::UNAUTHORIZED,
        Refusal::UnknownApp { .. } | Refusal::CategoryNotAllowed { .. } => StatusCode::FORBIDDEN,
        Refusal::RateLimited { .. } | Refusal::ClientRateLimited { .. } => {
            StatusCode::TOO_MANY_REQUESTS
        }
    };
    let mut reply = Reply::error(status, refusal.message());
    reply.retry_after = refusal.retry_after().map(apps::retry_after_secs);
    reply
}
