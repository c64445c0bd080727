//! The configuration of who may write and how fast: `auth`, `apps` and
//! `rate_limits` in `config.yaml`. Checked at load (the error names the
//! key) and again on every SIGHUP reload, which swaps them in without a
//! restart (see `reload`).

use std::collections::HashSet;

use serde::Deserialize;

use std::sync::Arc;

use super::keys::KeyDigest;
use crate::config::ConfigError;
use crate::domain::{AppId, Category};
use crate::privacy::{AppPrivacy, AppPrivacySettings, PrivacyPolicy, PrivacySettings};

/// `auth.mode`: how strictly uploads are checked against `apps`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Any `app_id` may upload (listed apps still keep to their categories
    /// and limits).
    #[default]
    Off,
    /// Only apps listed in `apps` may upload; no key is needed (403 for
    /// any other).
    KnownApps,
    /// A listed app's valid key is required (401 without one, 403 for an
    /// app not listed).
    Keys,
}

impl AuthMode {
    /// As written in `auth.mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::KnownApps => "known_apps",
            Self::Keys => "keys",
        }
    }
}

/// The `auth` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// `off` (default), `known_apps` or `keys`.
    #[serde(default)]
    pub mode: AuthMode,
}

/// One entry of `apps`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSettings {
    /// The app's `meta.app_id`.
    pub app_id: String,
    /// SHA-256 digests (64 hex digits) of the app's write keys, never the
    /// keys themselves: `venus hash-key` prints one. Several keys let an app
    /// rotate: add the new one, ship it, remove the old one, SIGHUP.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Categories this app may upload; empty: any allowed category.
    #[serde(default)]
    pub categories: Vec<String>,
    /// The app's own limits; absent: `rate_limits.default`.
    #[serde(default)]
    pub limits: Option<RateLimit>,
    /// The app's own privacy rules (`ip`, `fields`); what it leaves out is
    /// the `privacy` section's.
    #[serde(default)]
    pub privacy: Option<AppPrivacySettings>,
}

/// Token buckets for one app. A rate of 0 means no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Events per second, sustained.
    #[serde(default)]
    pub events_per_sec: u32,
    /// Events that may come at once after a quiet spell; 0: the larger of
    /// `events_per_sec` and `server.max_events_per_batch`. Must hold a full
    /// batch, or a full batch could never pass.
    #[serde(default)]
    pub events_burst: u32,
    /// Upload requests per second, sustained.
    #[serde(default)]
    pub requests_per_sec: u32,
    /// Requests that may come at once; 0: `requests_per_sec`.
    #[serde(default)]
    pub requests_burst: u32,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        self.events_per_sec == 0 && self.requests_per_sec == 0
    }

    /// The limit with its bursts filled in, checked against the largest
    /// batch.
    fn resolved(mut self, key: &str, max_events_per_batch: usize) -> Result<Self, String> {
        if self.events_per_sec > 0 {
            if self.events_burst == 0 {
                self.events_burst = self
                    .events_per_sec
                    .max(u32::try_from(max_events_per_batch).unwrap_or(u32::MAX));
            } else if (self.events_burst as usize) < max_events_per_batch {
                return Err(format!(
                    "{key}.events_burst is {}, below server.max_events_per_batch ({max_events_per_batch}): a full batch could never pass",
                    self.events_burst
                ));
            }
        }
        if self.requests_per_sec > 0 && self.requests_burst == 0 {
            self.requests_burst = self.requests_per_sec;
        }
        Ok(self)
    }
}

/// The `rate_limits` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Limits of every app without its own (`apps[].limits`), each app in
    /// its own buckets. All zero (the default): no limit.
    #[serde(default)]
    pub default: RateLimit,
    /// Apps not in `apps` (possible with `auth.mode: off`) whose buckets are
    /// kept apart; past this many, further unlisted apps share one bucket, so
    /// memory stays bounded whatever `app_id`s are sent.
    #[serde(default = "default_max_tracked_apps")]
    pub max_tracked_apps: usize,
    /// Limits of each client address (resolved behind
    /// `server.trusted_proxies`; an IPv6 /64), checked before the app's own:
    /// a flood from one address is refused 429 before it empties the
    /// buckets of the app it names, which in `known_apps` mode anyone can
    /// name. All zero (the default): no limit per address.
    #[serde(default)]
    pub per_client: RateLimit,
    /// Client addresses whose buckets are kept apart; past this many,
    /// further addresses share one bucket, so memory stays bounded.
    #[serde(default = "default_max_tracked_clients")]
    pub max_tracked_clients: usize,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            default: RateLimit::default(),
            max_tracked_apps: default_max_tracked_apps(),
            per_client: RateLimit::default(),
            max_tracked_clients: default_max_tracked_clients(),
        }
    }
}

fn default_max_tracked_apps() -> usize {
    10_000
}

fn default_max_tracked_clients() -> usize {
    100_000
}

/// A listed app, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppPolicy {
    pub app_id: AppId,
    pub keys: Vec<KeyDigest>,
    /// Empty: any category.
    pub categories: HashSet<String>,
    /// Resolved: the app's own limits or the default.
    pub limits: RateLimit,
    /// Resolved: the app's own privacy rules or the default.
    pub privacy: Arc<AppPrivacy>,
}

/// `auth`, `apps` and `rate_limits`, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    pub mode: AuthMode,
    pub apps: Vec<AppPolicy>,
    /// For unlisted apps, resolved.
    pub default_limits: RateLimit,
    pub max_tracked_apps: usize,
    /// For each client address, resolved.
    pub client_limits: RateLimit,
    pub max_tracked_clients: usize,
    /// The privacy rules of apps without their own (listed or not).
    pub default_privacy: Arc<AppPrivacy>,
}

impl AccessPolicy {
    /// Parses the four sections; the error names the key at fault.
    pub fn parse(
        auth: &AuthSettings,
        apps: &[AppSettings],
        limits: &RateLimitSettings,
        privacy: &PrivacySettings,
        max_events_per_batch: usize,
    ) -> Result<Self, ConfigError> {
        let privacy = PrivacyPolicy::parse(privacy)?;
        let default_limits = limits
            .default
            .resolved("rate_limits.default", max_events_per_batch)
            .map_err(|e| ConfigError::invalid("rate_limits.default", e))?;
        if limits.max_tracked_apps == 0 {
            return Err(ConfigError::invalid(
                "rate_limits.max_tracked_apps",
                "must be greater than 0",
            ));
        }
        let client_limits = limits
            .per_client
            .resolved("rate_limits.per_client", max_events_per_batch)
            .map_err(|e| ConfigError::invalid("rate_limits.per_client", e))?;
        if limits.max_tracked_clients == 0 {
            return Err(ConfigError::invalid(
                "rate_limits.max_tracked_clients",
                "must be greater than 0",
            ));
        }
        let mut seen = HashSet::new();
        let mut parsed = Vec::with_capacity(apps.len());
        for (i, app) in apps.iter().enumerate() {
            let at = |message: String| {
                ConfigError::invalid("apps", format!("apps[{i}] ({:?}): {message}", app.app_id))
            };
            let app_id = AppId::parse(&app.app_id).map_err(|e| at(e.to_string()))?;
            if !seen.insert(app.app_id.clone()) {
                return Err(at("listed twice".into()));
            }
            let keys = app
                .keys
                .iter()
                .enumerate()
                .map(|(k, digest)| {
                    KeyDigest::from_hex(digest).map_err(|e| {
                        at(format!(
                            "keys[{k}] {e} (write the SHA-256 digest that `venus hash-key` prints, not the key)"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            for category in &app.categories {
                Category::parse(category).map_err(|e| at(format!("categories: {e}")))?;
            }
            let limits = match app.limits {
                Some(own) => own
                    .resolved(&format!("apps[{i}].limits"), max_events_per_batch)
                    .map_err(at)?,
                None => default_limits,
            };
            let app_privacy = privacy
                .app(app.privacy.as_ref(), &format!("apps[{i}].privacy"))
                .map_err(|e| at(format!("privacy: {e}")))?;
            parsed.push(AppPolicy {
                app_id,
                keys,
                categories: app.categories.iter().cloned().collect(),
                limits,
                privacy: app_privacy,
            });
        }
        if auth.mode == AuthMode::Keys && parsed.iter().all(|app| app.keys.is_empty()) {
            return Err(ConfigError::invalid(
                "auth.mode",
                "is keys, but no app in `apps` has a key: every upload would be refused",
            ));
        }
        Ok(Self {
            mode: auth.mode,
            apps: parsed,
            default_limits,
            max_tracked_apps: limits.max_tracked_apps,
            client_limits,
            max_tracked_clients: limits.max_tracked_clients,
            default_privacy: privacy.default.clone(),
        })
    }
}
