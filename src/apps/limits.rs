//! Per-app token buckets (GCRA, from `governor`): events per second and
//! requests per second, each with a burst.
//!
//! A bucket is a single atomic word, so checking one takes no lock. Listed
//! apps' buckets are made when the configuration is (re)loaded and looked up
//! in an immutable map. Unlisted apps (`auth.mode: off`) get buckets on
//! first use in a sharded map capped at `rate_limits.max_tracked_apps`;
//! past the cap they share one bucket, and buckets idle long enough to be
//! full again are dropped, so no stream of made-up `app_id`s can grow
//! memory. Client addresses (`rate_limits.per_client`) get buckets the same
//! way, keyed by [`PeerKey`], capped at `rate_limits.max_tracked_clients`.

use std::borrow::Borrow;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::settings::RateLimit;

/// Which limit a batch ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// The app's requests per second.
    Requests,
    /// The app's events per second.
    Events,
    /// One client address's requests per second (`rate_limits.per_client`).
    ClientRequests,
    /// One client address's events per second.
    ClientEvents,
}

impl LimitKind {
    pub const ALL: [LimitKind; 4] = [
        Self::Requests,
        Self::Events,
        Self::ClientRequests,
        Self::ClientEvents,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Events => "events",
            Self::ClientRequests => "client_requests",
            Self::ClientEvents => "client_events",
        }
    }

    /// The same limit, of a client address's buckets.
    pub fn of_client(self) -> Self {
        match self {
            Self::Requests | Self::ClientRequests => Self::ClientRequests,
            Self::Events | Self::ClientEvents => Self::ClientEvents,
        }
    }
}

/// Over a limit: which, and how long until the batch would fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    pub kind: LimitKind,
    pub retry_after: Duration,
}

/// One app's buckets.
pub struct Buckets {
    limit: RateLimit,
    requests: Option<DefaultDirectRateLimiter>,
    events: Option<DefaultDirectRateLimiter>,
}

fn bucket(per_sec: u32, burst: u32) -> Option<DefaultDirectRateLimiter> {
    let rate = NonZeroU32::new(per_sec)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(RateLimiter::direct(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

impl Buckets {
    /// `None` when `limit` limits nothing.
    pub fn new(limit: RateLimit) -> Option<Self> {
        if limit.is_unlimited() {
            return None;
        }
        Some(Self {
            limit,
            requests: bucket(limit.requests_per_sec, limit.requests_burst),
            events: bucket(limit.events_per_sec, limit.events_burst),
        })
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one request and `events` events, or says which limit refused.
    /// A refused request still used its request token: a client that keeps
    /// retrying too fast stays limited.
    pub fn take(&self, events: usize) -> Result<(), OverLimit> {
        if let Some(requests) = &self.requests {
            if let Err(not_until) = requests.check() {
                return Err(OverLimit {
                    kind: LimitKind::Requests,
                    retry_after: not_until.wait_time_from(requests.clock().now()),
                });
            }
        }
        let (Some(bucket), Some(n)) = (&self.events, NonZeroU32::new(clamp(events))) else {
            return Ok(());
        };
        match bucket.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(OverLimit {
                kind: LimitKind::Events,
                retry_after: not_until.wait_time_from(bucket.clock().now()),
            }),
            // More events than the burst: the configuration check keeps the
            // burst at or above the largest batch, so this cannot happen; if
            // it did, the batch could never pass, and the client is told to
            // wait a full refill rather than retry at once.
            Err(_) => Err(OverLimit {
                kind: LimitKind::Events,
                retry_after: self.refill_time(),
            }),
        }
    }

    /// How long a bucket takes to fill up from empty: after that long idle,
    /// dropping it changes nothing.
    fn refill_time(&self) -> Duration {
        let fill = |burst: u32, rate: u32| {
            if rate == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(f64::from(burst) / f64::from(rate))
            }
        };
        fill(self.limit.requests_burst, self.limit.requests_per_sec)
            .max(fill(self.limit.events_burst, self.limit.events_per_sec))
    }
}

fn clamp(events: usize) -> u32 {
    u32::try_from(events).unwrap_or(u32::MAX)
}

/// An unlisted app's buckets and when they were last used.
struct Tracked {
    buckets: Buckets,
    /// Seconds since [`BucketMap::epoch`].
    last_used: AtomicU64,
}

/// Buckets of apps not in `apps`, under the default limit, capped.
pub type Unlisted = BucketMap<String>;

/// Buckets of client addresses, under `rate_limits.per_client`, capped.
pub type Clients = BucketMap<crate::peers::PeerKey>;

/// Buckets made on first use for keys nobody listed (app ids, client
/// addresses), one limit for all, capped; past the cap the rest share one.
pub struct BucketMap<K: Hash + Eq> {
    limit: RateLimit,
    apps: DashMap<K, Arc<Tracked>>,
    /// Places taken in `apps`, reserved before an insert and given back after
    /// a removal, so that concurrent first uploads of new apps cannot push
    /// the map past `cap` (a length check then an insert could).
    slots: AtomicUsize,
    cap: usize,
    /// Shared by every unlisted app past the cap.
    overflow: Buckets,
    epoch: Instant,
}

impl<K: Hash + Eq + Clone> BucketMap<K> {
    /// `None` when the default limit limits nothing.
    pub fn new(limit: RateLimit, cap: usize) -> Option<Self> {
        Some(Self {
            limit,
            apps: DashMap::new(),
            slots: AtomicUsize::new(0),
            cap,
            overflow: Buckets::new(limit)?,
            epoch: Instant::now(),
        })
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Apps with buckets of their own right now (at most the cap).
    pub fn tracked(&self) -> usize {
        self.apps.len()
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    pub fn take<Q>(&self, key: &Q, events: usize) -> Result<(), OverLimit>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let now = self.now();
        if let Some(tracked) = self.apps.get(key) {
            tracked.last_used.store(now, Ordering::Relaxed);
            return tracked.buckets.take(events);
        }
        if self.slots.fetch_add(1, Ordering::AcqRel) >= self.cap {
            self.slots.fetch_sub(1, Ordering::AcqRel);
            return self.overflow.take(events);
        }
        let tracked = match self.apps.entry(key.to_owned()) {
            // Another upload of the same new app got there first.
            Entry::Occupied(entry) => {
                self.slots.fetch_sub(1, Ordering::AcqRel);
                entry.get().clone()
            }
            Entry::Vacant(entry) => entry
                .insert(Arc::new(Tracked {
                    buckets: Buckets::new(self.limit).expect("the default limit limits something"),
                    last_used: AtomicU64::new(now),
                }))
                .clone(),
        };
        tracked.buckets.take(events)
    }

    /// Drops the buckets of apps idle long enough for them to be full:
    /// their next request finds a new, full bucket, exactly as if it had
    /// been kept.
    pub fn forget_idle(&self) {
        let idle_after = self.overflow.refill_time().as_secs() + 1;
        let now = self.now();
        let mut removed = 0;
        self.apps.retain(|_, tracked| {
            let keep = now.saturating_sub(tracked.last_used.load(Ordering::Relaxed)) <= idle_after;
            removed += usize::from(!keep);
            keep
        });
        self.slots.fetch_sub(removed, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(events_per_sec: u32, events_burst: u32, requests_per_sec: u32) -> RateLimit {
        RateLimit {
            events_per_sec,
            events_burst,
            requests_per_sec,
            requests_burst: requests_per_sec,
        }
    }

    #[test]
    fn no_limit_makes_no_buckets() {
        assert!(Buckets::new(RateLimit::default()).is_none());
        assert!(Unlisted::new(RateLimit::default(), 10).is_none());
        assert!(Clients::new(RateLimit::default(), 10).is_none());
    }

    #[test]
    fn each_client_address_has_its_own_buckets() {
        use crate::peers::PeerKey;
        let clients = Clients::new(limit(0, 0, 2), 10).unwrap();
        let a = PeerKey::of([192, 0, 2, 1].into());
        let b = PeerKey::of([192, 0, 2, 2].into());
        assert_eq!(clients.take(&a, 1), Ok(()));
        assert_eq!(clients.take(&a, 1), Ok(()));
        assert!(clients.take(&a, 1).is_err(), "a has spent its two");
        assert_eq!(clients.take(&b, 1), Ok(()), "b has its own");
        assert_eq!(clients.tracked(), 2);
    }

    #[test]
    fn events_beyond_the_burst_are_refused_with_a_wait() {
        let buckets = Buckets::new(limit(10, 20, 0)).unwrap();
        assert_eq!(buckets.take(15), Ok(()));
        let refused = buckets.take(10).unwrap_err();
        assert_eq!(refused.kind, LimitKind::Events);
        // 5 tokens left, 10 wanted: 5 more at 10/s is about half a second.
        assert!(
            refused.retry_after > Duration::from_millis(300)
                && refused.retry_after <= Duration::from_millis(600),
            "{refused:?}"
        );
        assert_eq!(buckets.take(5), Ok(()));
    }

    #[test]
    fn requests_are_limited_apart_from_events() {
        let buckets = Buckets::new(limit(0, 0, 2)).unwrap();
        assert_eq!(buckets.take(1000), Ok(()));
        assert_eq!(buckets.take(1000), Ok(()));
        assert_eq!(buckets.take(1).unwrap_err().kind, LimitKind::Requests);
    }

    #[test]
    fn a_hundred_thousand_made_up_apps_stay_within_the_cap() {
        let unlisted = Unlisted::new(limit(0, 0, 1), 1000).unwrap();
        let mut refused = 0;
        for i in 0..100_000u32 {
            if unlisted
                .take(&format!("app-{i:x}-{}", i.wrapping_mul(2654435761)), 1)
                .is_err()
            {
                refused += 1;
            }
        }
        assert_eq!(unlisted.tracked(), 1000);
        // The first 1,000 apps had their own bucket; the other 99,000 shared
        // one that allows a single request a second.
        assert!(refused >= 98_990, "{refused} refused");
        // A tracked app keeps its own bucket (its one token is spent).
        assert!(unlisted.take(&format!("app-0-{}", 0), 1).is_err());
    }

    #[test]
    fn concurrent_new_apps_never_pass_the_cap() {
        let unlisted = Arc::new(Unlisted::new(limit(0, 0, 1000), 50).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let unlisted = unlisted.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let _ = unlisted.take(&format!("t{t}-{i}"), 1);
                        assert!(unlisted.tracked() <= 50);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(unlisted.tracked(), 50);
    }

    #[test]
    fn idle_full_buckets_are_forgotten() {
        let unlisted = Unlisted::new(limit(0, 0, 1000), 10).unwrap();
        unlisted.take("a", 1).unwrap();
        unlisted.forget_idle();
        assert_eq!(unlisted.tracked(), 1, "just used: kept");
        unlisted
            .apps
            .get("a")
            .unwrap()
            .last_used
            .store(0, Ordering::Relaxed);
        // Pretend the registry is old: the entry was last used long ago.
        let old = Unlisted {
            epoch: Instant::now() - Duration::from_secs(100),
            ..unlisted
        };
        old.forget_idle();
        assert_eq!(old.tracked(), 0);
        assert_eq!(
            old.slots.load(Ordering::Relaxed),
            0,
            "the place is free again"
        );
    }
}
