//! New GeoIP data without a restart.
//!
//! A reload is asked for by SIGHUP, or found needed by a look at the files
//! every `geoip.reload_interval_ms` (size, modification time, inode: a file
//! renamed over the old one, or changed in place). The new files are loaded
//! beside the old ones on a blocking thread; only a set that loads and
//! answers a probe lookup replaces the current one. A missing, truncated or
//! corrupt file is refused: the old data keeps serving, the refusal is
//! logged at warn and counted, and readiness does not change.
//!
//! The safe way to update a file is to write the new one beside it and
//! `rename` it over the old (`mv`, which is atomic). Overwriting it in place
//! cannot crash the gateway either (it maps a private copy, see
//! `database`), but a reload may then read a half-written file and refuse it
//! until the next look.

use std::sync::Arc;
use std::time::Duration;

use super::GeoIp;
use crate::metrics::Metrics;

/// Why a reload was tried (for the log).
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Signal,
    FileChanged,
}

/// Watches for SIGHUP and, every `interval` (none when zero), for changed
/// files, until the process ends.
pub fn spawn(geoip: Arc<GeoIp>, interval: Duration, metrics: Metrics) {
    if geoip.paths().is_empty() {
        return;
    }
    // Registered now, before the task first runs: a SIGHUP that arrives
    // early must reload, not take SIGHUP's default action (exit).
    let mut hangups = hangup_signals();
    tokio::spawn(async move {
        let mut ticker = (!interval.is_zero()).then(|| {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        loop {
            let trigger = tokio::select! {
                Some(()) = next_hangup(&mut hangups) => Trigger::Signal,
                _ = tick(&mut ticker) => {
                    if !geoip.changed_on_disk() {
                        continue;
                    }
                    Trigger::FileChanged
                }
            };
            let loading = geoip.clone();
            let outcome = tokio::task::spawn_blocking(move || loading.reload()).await;
            match outcome {
                Ok(Ok(files)) => {
                    metrics.geoip_reload("loaded");
                    tracing::info!(?trigger, ?files, "GeoIP database reloaded");
                }
                Ok(Err(error)) => {
                    metrics.geoip_reload("rejected");
                    tracing::warn!(?trigger, %error, "GeoIP reload refused; the old database keeps serving");
                }
                Err(error) => {
                    metrics.geoip_reload("rejected");
                    tracing::warn!(?trigger, %error, "GeoIP reload failed; the old database keeps serving");
                }
            }
        }
    });
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

fn hangup_signals() -> Hangups {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

async fn next_hangup(hangups: &mut Hangups) -> Option<()> {
    #[cfg(unix)]
    if let Some(signal) = hangups {
        return signal.recv().await;
    }
    let _ = hangups;
    std::future::pending().await
}

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}
