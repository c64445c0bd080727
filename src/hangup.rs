//! SIGHUP, the signal that reloads the configuration's app policy and the
//! GeoIP files, as streams the gateway registers before anything slow.
//!
//! Until a process registers a handler, SIGHUP's default action ends it.
//! The gateway's start takes seconds (the GeoIP files are read into compact
//! tables before it listens), and a configuration reloader in front of it
//! may send SIGHUP at any time, so `Application::build` registers one
//! stream per reloader first, and a signal that arrives while it starts is
//! delivered to the reloaders once they run.

/// One reloader's SIGHUPs (`None` where signals cannot be listened for).
#[cfg(unix)]
pub type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub type Hangups = Option<()>;

/// A new stream of SIGHUPs; from now on SIGHUP no longer ends the process.
/// Must be called inside the tokio runtime.
pub fn listen() -> Hangups {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The next SIGHUP of `hangups` (one that came before this call included);
/// never, when there is no stream.
pub async fn next(hangups: &mut Hangups) -> Option<()> {
    #[cfg(unix)]
    if let Some(signal) = hangups {
        return signal.recv().await;
    }
    let _ = hangups;
    std::future::pending().await
}

#[cfg(all(test, unix))]
mod tests {
    use std::time::Duration;

    #[tokio::test]
    async fn a_sighup_that_comes_before_anyone_waits_is_delivered_not_fatal() {
        let mut hangups = super::listen();
        assert!(hangups.is_some());
        // SAFETY: raising a signal this process handles from now on.
        unsafe { libc::raise(libc::SIGHUP) };
        tokio::time::timeout(Duration::from_secs(5), super::next(&mut hangups))
            .await
            .expect("the SIGHUP reaches the stream")
            .expect("the stream is open");
    }
}
