//! Second handler: give every valid event its server-side facts.
//!
//! * `backend_id`: a UUIDv7, time-ordered, unique per event;
//! * `upload_time`: when the batch reached this handler, ms since the epoch;
//! * `ip`: the event's own `ip`, or the client's address when it has none,
//!   as the app's `privacy.ip` stores it (kept, truncated, hashed or
//!   dropped; always dropped for an anonymous batch);
//! * `country`, `region`, `city` from the GeoIP database (empty when
//!   unknown), looked up with the whole address before it is reduced.
//!
//! An `ip` that does not parse as an address fails its event with code 1002.
//! An address the database does not know (a private range, say) is not an
//! error: the event goes on with empty location fields.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use uuid::{ContextV7, Timestamp, Uuid};

use crate::geoip::{GeoIp, Located, Location};
use crate::metrics::Metrics;
use crate::pipeline::context::{Enrichment, SentIp};
use crate::pipeline::split_and_validate::trimmed;
use crate::pipeline::{Handler, Outcome, UploadContext};
use crate::privacy::{AppPrivacy, IpMode, StoredIp};
use crate::wire::PartCode;

pub struct IpEnrich {
    geoip: Arc<GeoIp>,
    metrics: Metrics,
}

impl IpEnrich {
    pub fn new(geoip: Arc<GeoIp>, metrics: Metrics) -> Self {
        Self { geoip, metrics }
    }
}

impl Handler for IpEnrich {
    fn name(&self) -> &'static str {
        "ip_enrich"
    }

    fn handle<'a>(&'a self, ctx: &'a mut UploadContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { self.run(ctx) })
    }
}

/// A batch's lookups by result, added to the counters once per batch (an
/// attribute set per event would cost more than the cached lookup itself).
#[derive(Default)]
struct LookupCounts {
    found: u64,
    not_found: u64,
    invalid: u64,
    cached: u64,
    uncached: u64,
}

impl LookupCounts {
    fn record(&mut self, located: &Located) {
        if located.found {
            self.found += 1;
        } else {
            self.not_found += 1;
        }
        if located.cached {
            self.cached += 1;
        } else {
            self.uncached += 1;
        }
    }

    fn report(&self, metrics: &Metrics) {
        metrics.geoip_lookups("hit", self.found);
        metrics.geoip_lookups("miss", self.not_found);
        metrics.geoip_lookups("invalid", self.invalid);
        metrics.geoip_cache("hit", self.cached);
        metrics.geoip_cache("miss", self.uncached);
    }
}

impl IpEnrich {
    fn run(&self, ctx: &mut UploadContext) -> Outcome {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let upload_time_ms = now.as_millis() as u64;
        // The batch's ids from one clock reading and a counter of its own:
        // ordered within the batch and by the millisecond across batches,
        // each with 73 random bits, and without the process-wide lock and
        // clock reading `Uuid::now_v7` takes per id.
        let ids = ContextV7::new();
        let client_ip = ctx.request.client_ip.to_canonical();
        // Events of one batch mostly share an address or a few: look each
        // one up once. foldhash, not SipHash: hashing was about 1% of the
        // gateway's CPU, and a batch's map is small and short-lived, so a
        // seeded fast hash is enough against crafted addresses.
        let mut locations: HashMap<IpAddr, (Arc<Location>, StoredIp), foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(16, foldhash::fast::RandomState::default());
        // The privacy rules live in the context, the events too: a clone of
        // the `Arc` lets both be borrowed in the loop.
        let privacy = ctx
            .privacy
            .clone()
            .unwrap_or_else(|| AppPrivacy::shared_keep_all().clone());
        let rules = privacy.rules(ctx.anonymous());
        // One database for the whole batch, even if a reload swaps it.
        let database = self.geoip.current();
        let mut invalid = 0usize;
        let mut first_invalid = String::new();
        let mut counts = LookupCounts::default();

        for event in ctx.events.iter_mut().filter(|e| e.is_pending()) {
            let ip = match &event.ip {
                SentIp::Absent => client_ip,
                SentIp::Text(text) => match text.parse::<IpAddr>() {
                    Ok(ip) => ip.to_canonical(),
                    Err(_) => {
                        counts.invalid += 1;
                        // Quoted back only where addresses are kept: a
                        // value such as "81.2.69.142:443" is still one.
                        let reason = if rules.ip == IpMode::Keep {
                            format!("ip {:?} is not an IPv4 or IPv6 address", trimmed(text))
                        } else {
                            "ip is not an IPv4 or IPv6 address".to_owned()
                        };
                        if invalid == 0 {
                            first_invalid = reason.clone();
                        }
                        invalid += 1;
                        event.fail(PartCode::InvalidIp, reason);
                        continue;
                    }
                },
            };
            let (location, stored) = locations
                .entry(ip)
                .or_insert_with(|| {
                    let located = database.locate(ip);
                    counts.record(&located);
                    (located.location, rules.store_ip(ip))
                })
                .clone();
            event.enrichment = Some(Enrichment {
                backend_id: Uuid::new_v7(Timestamp::from_unix(
                    &ids,
                    now.as_secs(),
                    now.subsec_nanos(),
                )),
                upload_time_ms,
                ip: stored,
                location,
            });
        }

        counts.report(&self.metrics);
        if invalid == 0 {
            return Outcome::proceed();
        }
        let message = format!("{invalid} events have an invalid ip; {first_invalid}");
        if ctx.pending() == 0 {
            Outcome::fail(message, ctx.reply())
        } else {
            Outcome::error(message)
        }
    }
}
