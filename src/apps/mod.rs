//! Who may write, and how fast: the apps the gateway knows, their write
//! keys, the categories each may use, and their rate limits.
//!
//! * `settings`: the `auth`, `apps` and `rate_limits` sections, checked;
//! * `keys`: key digests, where a request presents its key, comparison;
//! * `limits`: the token buckets;
//! * `reload`: SIGHUP re-reads the configuration and swaps the policy in.
//!
//! The policy in force is an immutable [`Registry`] behind an `ArcSwap`:
//! a request loads it once, without a lock, and a reload replaces it whole
//! (keeping the buckets of apps whose limits did not change). Two checks
//! use it: [`Registry::check_key`] before the body is read (in `keys` mode
//! a request without a key anyone holds costs no parsing), and
//! [`Registry::admit`] once `meta` is known (pipeline handler `authorize`).

pub mod keys;
pub mod limits;
pub mod reload;
pub mod settings;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use self::keys::KeyDigest;
use self::limits::{Buckets, Clients, LimitKind, OverLimit, Unlisted};
use self::settings::{AccessPolicy, AuthMode};
use crate::privacy::AppPrivacy;

/// Why an upload may not go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no key, in `keys` mode.
    MissingKey,
    /// 401: a key that is not one of the app's (or anyone's).
    WrongKey { app_id: Option<String> },
    /// 403: the app is not listed (`known_apps`, `keys`).
    UnknownApp { app_id: String },
    /// 403: the app may not use this category.
    CategoryNotAllowed { app_id: String, category: String },
    /// 429: over one of the app's limits.
    RateLimited { app_id: String, over: OverLimit },
    /// 429: the client address is over its limits (`rate_limits.per_client`).
    ClientRateLimited { app_id: String, over: OverLimit },
}

impl Refusal {
    /// The `result` label of `venus.auth.checks`.
    pub fn result(&self) -> &'static str {
        match self {
            Self::MissingKey => "missing_key",
            Self::WrongKey { .. } => "wrong_key",
            Self::UnknownApp { .. } => "unknown_app",
            Self::CategoryNotAllowed { .. } => "category_not_allowed",
            Self::RateLimited { .. } => "rate_limited",
            Self::ClientRateLimited { .. } => "client_rate_limited",
        }
    }

    /// How long the client should wait, for a rate limit.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { over, .. } | Self::ClientRateLimited { over, .. } => {
                Some(over.retry_after)
            }
            _ => None,
        }
    }

    /// What the client is told. It names the app and category it sent,
    /// never a key.
    pub fn message(&self) -> String {
        match self {
            Self::MissingKey => "a write key is required: send Authorization: Bearer <key>, X-Venus-Key, or the key query parameter".into(),
            Self::WrongKey { app_id: Some(app) } => format!("the key is not a valid write key of app {app:?}"),
            Self::WrongKey { app_id: None } => "the key is not a valid write key".into(),
            Self::UnknownApp { app_id } => format!("app {app_id:?} is not allowed to upload here"),
            Self::CategoryNotAllowed { app_id, category } => {
                format!("app {app_id:?} may not upload category {category:?}")
            }
            Self::RateLimited { app_id, over } => format!(
                "app {app_id:?} is over its limit of {}; retry after {} s",
                per_second(over.kind),
                retry_after_secs(over.retry_after)
            ),
            // The address is the client's own; it is not repeated back (it
            // may be one a proxy resolved).
            Self::ClientRateLimited { over, .. } => format!(
                "this client address is over its limit of {}; retry after {} s",
                per_second(over.kind),
                retry_after_secs(over.retry_after)
            ),
        }
    }
}

fn per_second(kind: LimitKind) -> &'static str {
    match kind {
        LimitKind::Requests | LimitKind::ClientRequests => "requests per second",
        LimitKind::Events | LimitKind::ClientEvents => "events per second",
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

/// The `app` label of a rate-limit counter: listed apps by name, every
/// other one as `unlisted` (label values stay bounded).
pub const UNLISTED_LABEL: &str = "unlisted";

struct KnownApp {
    keys: Vec<KeyDigest>,
    categories: HashSet<String>,
    buckets: Option<Arc<Buckets>>,
    privacy: Arc<AppPrivacy>,
}

/// The access policy in force.
pub struct Registry {
    policy: AccessPolicy,
    apps: HashMap<String, KnownApp>,
    /// Every key digest of every app, for the check before the body.
    all_keys: HashSet<KeyDigest>,
    unlisted: Option<Arc<Unlisted>>,
    /// Buckets per client address, when `rate_limits.per_client` limits.
    clients: Option<Arc<Clients>>,
}

impl Registry {
    /// Builds the registry for `policy`, keeping `previous`'s buckets where
    /// the limits are unchanged, so a reload does not hand every app a fresh
    /// burst.
    pub fn new(policy: AccessPolicy, previous: Option<&Registry>) -> Self {
        let mut apps = HashMap::with_capacity(policy.apps.len());
        let mut all_keys = HashSet::new();
        for app in &policy.apps {
            let kept = previous
                .and_then(|p| p.apps.get(app.app_id.as_str()))
                .and_then(|old| old.buckets.clone())
                .filter(|b| b.limit() == app.limits);
            all_keys.extend(app.keys.iter().copied());
            apps.insert(
                app.app_id.as_str().to_owned(),
                KnownApp {
                    keys: app.keys.clone(),
                    categories: app.categories.clone(),
                    buckets: kept.or_else(|| Buckets::new(app.limits).map(Arc::new)),
                    privacy: app.privacy.clone(),
                },
            );
        }
        let unlisted = previous
            .and_then(|p| p.unlisted.clone())
            .filter(|u| {
                u.limit() == policy.default_limits
                    && previous.map(|p| p.policy.max_tracked_apps) == Some(policy.max_tracked_apps)
            })
            .or_else(|| {
                Unlisted::new(policy.default_limits, policy.max_tracked_apps).map(Arc::new)
            });
        let clients = previous
            .and_then(|p| p.clients.clone())
            .filter(|c| {
                c.limit() == policy.client_limits
                    && previous.map(|p| p.policy.max_tracked_clients)
                        == Some(policy.max_tracked_clients)
            })
            .or_else(|| {
                Clients::new(policy.client_limits, policy.max_tracked_clients).map(Arc::new)
            });
        Self {
            policy,
            apps,
            all_keys,
            unlisted,
            clients,
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.policy.mode
    }

    pub fn policy(&self) -> &AccessPolicy {
        &self.policy
    }

    /// The check before the body is read: in `keys` mode a request must
    /// present a key that some app holds. Looking the digest up in a set
    /// leaks nothing useful about the key (finding a digest's neighbours
    /// needs SHA-256 preimages); the comparison that decides for the app is
    /// [`Registry::admit`]'s, in constant time.
    pub fn check_key(&self, key: Option<&KeyDigest>) -> Result<(), Refusal> {
        if self.policy.mode != AuthMode::Keys {
            return Ok(());
        }
        match key {
            None => Err(Refusal::MissingKey),
            Some(key) if self.all_keys.contains(key) => Ok(()),
            Some(_) => Err(Refusal::WrongKey { app_id: None }),
        }
    }

    /// The check once `meta` is known: the app, its key, its category,
    /// then the buckets of the client address and of the app (one request
    /// and `events` events each). The address's come first, so that a
    /// flood from one address is refused before it takes the app's tokens.
    pub fn admit(
        &self,
        app_id: &str,
        category: &str,
        key: Option<&KeyDigest>,
        client: IpAddr,
        events: usize,
    ) -> Result<(), Refusal> {
        let Some(app) = self.apps.get(app_id) else {
            if self.policy.mode != AuthMode::Off {
                return Err(Refusal::UnknownApp {
                    app_id: app_id.to_owned(),
                });
            }
            self.admit_client(app_id, client, events)?;
            return match &self.unlisted {
                Some(unlisted) => {
                    unlisted
                        .take(app_id, events)
                        .map_err(|over| Refusal::RateLimited {
                            app_id: app_id.to_owned(),
                            over,
                        })
                }
                None => Ok(()),
            };
        };
        if self.policy.mode == AuthMode::Keys {
            match key {
                None => return Err(Refusal::MissingKey),
                Some(key) if key.is_one_of(&app.keys) => {}
                Some(_) => {
                    return Err(Refusal::WrongKey {
                        app_id: Some(app_id.to_owned()),
                    })
                }
            }
        }
        if !app.categories.is_empty() && !app.categories.contains(category) {
            return Err(Refusal::CategoryNotAllowed {
                app_id: app_id.to_owned(),
                category: category.to_owned(),
            });
        }
        self.admit_client(app_id, client, events)?;
        match &app.buckets {
            Some(buckets) => buckets.take(events).map_err(|over| Refusal::RateLimited {
                app_id: app_id.to_owned(),
                over,
            }),
            None => Ok(()),
        }
    }

    /// The client address's buckets, when `rate_limits.per_client` limits.
    fn admit_client(&self, app_id: &str, client: IpAddr, events: usize) -> Result<(), Refusal> {
        let Some(clients) = &self.clients else {
            return Ok(());
        };
        clients
            .take(&crate::peers::PeerKey::of(client), events)
            .map_err(|over| Refusal::ClientRateLimited {
                app_id: app_id.to_owned(),
                over: OverLimit {
                    kind: over.kind.of_client(),
                    ..over
                },
            })
    }

    /// The privacy rules of `app_id`: its own, or the default.
    pub fn privacy_of(&self, app_id: &str) -> &Arc<AppPrivacy> {
        self.apps
            .get(app_id)
            .map_or(&self.policy.default_privacy, |app| &app.privacy)
    }

    /// Whether `app_id` is listed (for the metric's `app` label).
    pub fn is_listed(&self, app_id: &str) -> bool {
        self.apps.contains_key(app_id)
    }

    /// Listed app ids, for seeding counters.
    pub fn listed(&self) -> impl Iterator<Item = &str> {
        self.apps.keys().map(String::as_str)
    }

    /// Unlisted apps with buckets of their own right now.
    pub fn tracked_unlisted(&self) -> usize {
        self.unlisted.as_ref().map_or(0, |u| u.tracked())
    }

    fn forget_idle(&self) {
        if let Some(unlisted) = &self.unlisted {
            unlisted.forget_idle();
        }
        if let Some(clients) = &self.clients {
            clients.forget_idle();
        }
    }
}

/// The shared handle on the registry in force.
#[derive(Clone)]
pub struct Apps {
    current: Arc<ArcSwap<Registry>>,
}

impl Apps {
    pub fn new(policy: AccessPolicy) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(Registry::new(policy, None))),
        }
    }

    /// The registry in force now (no lock).
    pub fn load(&self) -> arc_swap::Guard<Arc<Registry>> {
        self.current.load()
    }

    /// Puts `policy` in force; requests already past a check finish under the
    /// old one.
    pub fn replace(&self, policy: AccessPolicy) {
        let previous = self.current.load_full();
        self.current
            .store(Arc::new(Registry::new(policy, Some(&previous))));
    }

    /// Drops idle buckets of unlisted apps, every minute, while the process
    /// runs.
    pub fn spawn_housekeeping(&self) {
        let apps = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(60));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                apps.load().forget_idle();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::settings::{AppPolicy, RateLimit};
    use super::*;
    use crate::domain::AppId;
    use std::net::Ipv4Addr;

    fn policy(mode: AuthMode, limits: RateLimit) -> AccessPolicy {
        AccessPolicy {
            mode,
            apps: vec![AppPolicy {
                app_id: AppId::parse("shop").unwrap(),
                keys: vec![KeyDigest::of("right")],
                categories: ["page_view".to_owned()].into(),
                limits,
                privacy: Arc::new(AppPrivacy::keep_all()),
            }],
            default_limits: RateLimit::default(),
            max_tracked_apps: 10,
            client_limits: RateLimit::default(),
            max_tracked_clients: 10,
            default_privacy: Arc::new(AppPrivacy::keep_all()),
        }
    }

    const HERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const THERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn off_lets_anyone_in_but_keeps_listed_apps_to_their_categories() {
        let registry = Registry::new(policy(AuthMode::Off, RateLimit::default()), None);
        assert_eq!(registry.check_key(None), Ok(()));
        assert_eq!(registry.admit("anyone", "click", None, HERE, 1), Ok(()));
        assert_eq!(registry.admit("shop", "page_view", None, HERE, 1), Ok(()));
        assert!(matches!(
            registry.admit("shop", "click", None, HERE, 1),
            Err(Refusal::CategoryNotAllowed { .. })
        ));
    }

    #[test]
    fn known_apps_refuses_the_unlisted() {
        let registry = Registry::new(policy(AuthMode::KnownApps, RateLimit::default()), None);
        assert_eq!(registry.admit("shop", "page_view", None, HERE, 1), Ok(()));
        assert!(matches!(
            registry.admit("anyone", "page_view", None, HERE, 1),
            Err(Refusal::UnknownApp { .. })
        ));
    }

    #[test]
    fn keys_needs_the_apps_own_key() {
        let registry = Registry::new(policy(AuthMode::Keys, RateLimit::default()), None);
        let right = KeyDigest::of("right");
        let wrong = KeyDigest::of("wrong");
        assert_eq!(registry.check_key(None), Err(Refusal::MissingKey));
        assert_eq!(
            registry.check_key(Some(&wrong)),
            Err(Refusal::WrongKey { app_id: None })
        );
        assert_eq!(registry.check_key(Some(&right)), Ok(()));
        assert_eq!(
            registry.admit("shop", "page_view", Some(&right), HERE, 1),
            Ok(())
        );
        assert!(matches!(
            registry.admit("shop", "page_view", Some(&wrong), HERE, 1),
            Err(Refusal::WrongKey { .. })
        ));
    }

    #[test]
    fn a_reload_keeps_buckets_whose_limits_did_not_change() {
        let limits = RateLimit {
            requests_per_sec: 1,
            requests_burst: 1,
            ..RateLimit::default()
        };
        let apps = Apps::new(policy(AuthMode::Off, limits));
        assert_eq!(
            apps.load().admit("shop", "page_view", None, HERE, 1),
            Ok(())
        );
        apps.replace(policy(AuthMode::Off, limits));
        assert!(
            matches!(
                apps.load().admit("shop", "page_view", None, HERE, 1),
                Err(Refusal::RateLimited { .. })
            ),
            "the spent token is still spent after the reload"
        );
        let more = RateLimit {
            requests_per_sec: 5,
            requests_burst: 5,
            ..RateLimit::default()
        };
        apps.replace(policy(AuthMode::Off, more));
        assert_eq!(
            apps.load().admit("shop", "page_view", None, HERE, 1),
            Ok(())
        );
    }

    #[test]
    fn a_flood_from_one_address_is_refused_before_it_empties_the_apps_bucket() {
        let mut policy = policy(
            AuthMode::KnownApps,
            RateLimit {
                requests_per_sec: 5,
                requests_burst: 5,
                ..RateLimit::default()
            },
        );
        policy.client_limits = RateLimit {
            requests_per_sec: 2,
            requests_burst: 2,
            ..RateLimit::default()
        };
        let registry = Registry::new(policy, None);
        let mut refused = 0;
        for _ in 0..100 {
            match registry.admit("shop", "page_view", None, HERE, 1) {
                Ok(()) => {}
                Err(Refusal::ClientRateLimited { over, .. }) => {
                    assert_eq!(over.kind, LimitKind::ClientRequests);
                    refused += 1;
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!(refused, 98, "the flooding address got its two");
        // The app's bucket still has three of its five for others.
        for _ in 0..2 {
            assert_eq!(registry.admit("shop", "page_view", None, THERE, 1), Ok(()));
        }
        let third = Ipv4Addr::new(192, 0, 2, 3).into();
        assert_eq!(registry.admit("shop", "page_view", None, third, 1), Ok(()));
        let fourth = Ipv4Addr::new(192, 0, 2, 4).into();
        assert!(matches!(
            registry.admit("shop", "page_view", None, fourth, 1),
            Err(Refusal::RateLimited { .. })
        ));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}

#[cfg(test)]
mod reload_privacy_tests {
    use super::settings::{AccessPolicy, AuthSettings, RateLimitSettings};
    use super::*;

    fn policy(action: &str) -> AccessPolicy {
        let privacy: crate::privacy::PrivacySettings = config::Config::builder()
            .add_source(config::File::from_str(
                &format!("fields:\n  - {{path: data.email, action: {action}}}\nhash_key: 0123456789abcdef0123"),
                config::FileFormat::Yaml,
            ))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        AccessPolicy::parse(
            &AuthSettings::default(),
            &[],
            &RateLimitSettings::default(),
            &privacy,
            1000,
        )
        .unwrap()
    }

    #[test]
    fn a_replaced_policy_brings_its_privacy_rules() {
        let apps = Apps::new(policy("hash"));
        let event = r#"{"id":"1","email":"x@y.z"}"#;
        let before = apps.load().privacy_of("a").clone();
        let rules = before.rules(false);
        assert!(rules
            .apply_data(event, None, &mut rules.scratch())
            .unwrap()
            .unwrap()
            .contains("email"));
        apps.replace(policy("remove"));
        let after = apps.load().privacy_of("a").clone();
        let rules = after.rules(false);
        assert_eq!(
            rules
                .apply_data(event, None, &mut rules.scratch())
                .unwrap()
                .unwrap(),
            r#"{"id":"1"}"#
        );
    }
}
