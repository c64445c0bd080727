//! SIGHUP re-reads the configuration and puts the new `auth`, `apps`,
//! `rate_limits` and `privacy` in force (the privacy hash key too, when it
//! is read from `privacy.hash_key_file`): a leaked key is revoked, an app
//! added, or a privacy rule changed, without a restart. A configuration that fails its checks is refused whole and
//! the old policy stays (warn in the log, `venus.config.reloads` by
//! result). Other sections need a restart; the GeoIP files reload on the
//! same signal (see `geoip::reload`).

use std::sync::Arc;

use super::settings::AccessPolicy;
use super::Apps;
use crate::config::ConfigError;
use crate::hangup::{self, Hangups};
use crate::metrics::Metrics;

/// Reads the access policy afresh (from the configuration's file and
/// environment).
pub type Loader = Arc<dyn Fn() -> Result<AccessPolicy, ConfigError> + Send + Sync>;

/// Reloads on every SIGHUP of `hangups` (registered by the caller before
/// its slow start: see `crate::hangup`) until the process ends.
pub fn spawn(apps: Apps, load: Loader, metrics: Metrics, mut hangups: Hangups) {
    if hangups.is_none() {
        tracing::warn!("cannot listen for SIGHUP: the app policy reloads only with a restart");
        return;
    }
    tokio::spawn(async move {
        while hangup::next(&mut hangups).await.is_some() {
            let loading = load.clone();
            match tokio::task::spawn_blocking(move || loading()).await {
                Ok(Ok(policy)) => {
                    let summary =
                        format!("auth.mode {:?}, {} apps", policy.mode, policy.apps.len());
                    apps.replace(policy);
                    metrics.config_reload("loaded");
                    tracing::info!(policy = %summary, "auth, apps, rate_limits and privacy reloaded");
                }
                Ok(Err(error)) => {
                    metrics.config_reload("rejected");
                    tracing::warn!(%error, "configuration reload refused; the old app policy stays in force");
                }
                Err(error) => {
                    metrics.config_reload("rejected");
                    tracing::warn!(%error, "configuration reload failed; the old app policy stays in force");
                }
            }
        }
    });
}
