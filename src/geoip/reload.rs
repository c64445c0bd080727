//! New GeoIP data without a restart.
//!
//! A reload is asked for by SIGHUP, or found needed by a look at the files
//! every `geoip.reload_interval_ms` (size, modification time, inode: a file
//! renamed over the old one, or changed in place). The new files are loaded
//! beside the old ones on a thread of their own, at a lower priority than
//! the serving threads; only a set that loads and
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
use crate::hangup::{self, Hangups};
use crate::metrics::Metrics;

/// Why a reload was tried (for the log).
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Signal,
    FileChanged,
}

/// Watches `hangups` (registered by the caller before it loaded the data:
/// see `crate::hangup`) and, every `interval` (none when zero), for changed
/// files, until the process ends.
pub fn spawn(geoip: Arc<GeoIp>, interval: Duration, metrics: Metrics, mut hangups: Hangups) {
    if geoip.paths().is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut ticker = (!interval.is_zero()).then(|| {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        loop {
            let trigger = tokio::select! {
                Some(()) = hangup::next(&mut hangups) => Trigger::Signal,
                _ = tick(&mut ticker) => {
                    if !geoip.changed_on_disk() {
                        continue;
                    }
                    Trigger::FileChanged
                }
            };
            let outcome = reload_in_background(geoip.clone()).await;
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

/// Loads the files again on a thread of its own that yields the CPU to the
/// ones serving uploads: building the compact tables of the DB-IP pair
/// takes a core for seconds, and the old data serves meanwhile, so a
/// reload at peak should slow itself, not the uploads.
async fn reload_in_background(
    geoip: Arc<GeoIp>,
) -> Result<Result<Vec<super::FileInfo>, super::GeoIpError>, String> {
    let (done, outcome) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("geoip-reload".into())
        .spawn(move || {
            lower_this_threads_priority();
            let _ = done.send(geoip.reload());
        })
        .map_err(|e| format!("cannot start the reload thread: {e}"))?;
    outcome
        .await
        .map_err(|_| "the reload thread ended without an answer".to_owned())
}

/// Nice 10 for the calling thread only (Linux keeps a nice value per
/// thread), unless it is nicer already: against the serving threads at 0
/// it gets about a tenth of a contended core, and all of an idle one.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread's own id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::getpriority(libc::PRIO_PROCESS, tid) < RELOAD_NICE {
            libc::setpriority(libc::PRIO_PROCESS, tid, RELOAD_NICE);
        }
    }
}

/// The reload thread's nice value.
const RELOAD_NICE: i32 = 10;

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    fn own_nice() -> i32 {
        // SAFETY: plain syscalls on the calling thread's own id.
        unsafe {
            libc::getpriority(
                libc::PRIO_PROCESS,
                libc::syscall(libc::SYS_gettid) as libc::id_t,
            )
        }
    }

    #[test]
    fn only_the_reload_thread_yields_the_cpu() {
        let before = own_nice();
        let lowered = std::thread::spawn(|| {
            super::lower_this_threads_priority();
            own_nice()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, before.max(super::RELOAD_NICE));
        assert_eq!(own_nice(), before, "the caller's own thread is untouched");
    }
}
