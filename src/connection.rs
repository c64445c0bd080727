//! One accepted connection: HTTP/1 served by hyper, with the two timers a
//! public endpoint needs and hyper has only one of.
//!
//! hyper's `header_read_timeout` starts when it begins to wait for a request
//! head, so on a keep-alive connection it also counts the idle time between
//! requests. A gateway behind a load balancer must keep idle connections
//! longer than the balancer does (AWS ALB and nginx keep idle upstream
//! connections 60 s): closing first races the balancer's next request into a
//! closing socket, which its client sees as a 502. A gateway on the open
//! internet must also drop a client that sends its head a byte at a time
//! (slowloris). So each connection here has:
//!
//! * an **idle timer** (`server.idle_timeout_ms`): no request in progress and
//!   no byte received since the last response;
//! * a **head timer** (`server.header_read_timeout_ms`), from the first byte
//!   of a request until its head is complete (the handler is called); for
//!   a connection's first request it runs from the accept, so a socket that
//!   never sends a byte is closed at the head timeout, not the idle one (a
//!   new connection is no keep-alive connection a balancer is waiting on).
//!
//! While a request is being handled neither runs; the body has its own
//! timeout and minimum rate in the upload handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;

/// The timer limits of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle: Duration,
    pub head: Duration,
}

/// Why a connection was closed by its timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    Idle,
    Head,
}

/// What a connection is doing, shared by its socket, its service and its
/// watchdog.
pub struct Activity {
    phase: AtomicU8,
    /// When the current phase began, in ms since `epoch`.
    since_ms: AtomicU64,
    epoch: Instant,
    changed: Notify,
}

impl Activity {
    /// A connection just accepted: waiting for its first request head,
    /// with the head timer running from now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            phase: AtomicU8::new(HEAD),
            since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            changed: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Bytes arrived: an idle connection starts reading a request head.
    fn bytes_received(&self) {
        if self.phase.load(Ordering::Relaxed) == IDLE
            && self
                .phase
                .compare_exchange(IDLE, HEAD, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.since_ms.store(self.now_ms(), Ordering::Release);
            // The head deadline is earlier than the idle one it replaces.
            self.changed.notify_one();
        }
    }

    /// hyper parsed a request head and calls the service.
    pub fn request_started(&self) {
        self.phase.store(BUSY, Ordering::Release);
    }

    /// The service answered: the connection is idle until the next byte.
    pub fn response_ready(&self) {
        self.since_ms.store(self.now_ms(), Ordering::Release);
        self.phase.store(IDLE, Ordering::Release);
        self.changed.notify_one();
    }

    /// Completes when a timer of the connection runs out.
    pub async fn expired(&self, timeouts: Timeouts) -> Expired {
        loop {
            let phase = self.phase.load(Ordering::Acquire);
            let since = Duration::from_millis(self.since_ms.load(Ordering::Acquire));
            let (limit, reason) = match phase {
                IDLE => (timeouts.idle, Expired::Idle),
                HEAD => (timeouts.head, Expired::Head),
                _ => {
                    self.changed.notified().await;
                    continue;
                }
            };
            let deadline = self.epoch + since + limit;
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    // Still the same phase that started at `since`?
                    let unchanged = self.phase.load(Ordering::Acquire) == phase
                        && self.since_ms.load(Ordering::Acquire) == since.as_millis() as u64;
                    if unchanged {
                        return reason;
                    }
                }
                _ = self.changed.notified() => {}
            }
        }
    }
}

/// A socket that tells its [`Activity`] when bytes arrive.
pub struct WatchedIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> WatchedIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_received();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Runs `connection` until it ends or a timer of `activity` runs out (then
/// the connection is dropped, which closes the socket).
pub async fn serve<F, E>(connection: F, activity: Arc<Activity>, timeouts: Timeouts)
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        }
        reason = activity.expired(timeouts) => {
            tracing::debug!(?reason, "closing a connection whose timer ran out");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        idle: Duration::from_secs(75),
        head: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_that_sends_nothing_lasts_the_head_timeout() {
        let activity = Activity::new();
        let started = Instant::now();
        assert_eq!(activity.expired(TIMEOUTS).await, Expired::Head);
        assert_eq!(started.elapsed().as_secs(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_lasts_the_idle_timeout_not_the_head_timeout() {
        let activity = Activity::new();
        activity.bytes_received();
        activity.request_started();
        activity.response_ready();
        let answered = Instant::now();
        assert_eq!(activity.expired(TIMEOUTS).await, Expired::Idle);
        assert_eq!(answered.elapsed().as_secs(), 75);
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_timer_starts_at_the_first_byte() {
        let activity = Activity::new();
        activity.bytes_received();
        activity.request_started();
        activity.response_ready();
        let watchdog = tokio::spawn({
            let activity = activity.clone();
            async move { activity.expired(TIMEOUTS).await }
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        let first_byte = Instant::now();
        activity.bytes_received();
        assert_eq!(watchdog.await.unwrap(), Expired::Head);
        assert_eq!(first_byte.elapsed().as_secs(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn no_timer_runs_while_a_request_is_handled_and_idle_restarts_after() {
        let activity = Activity::new();
        activity.bytes_received();
        activity.request_started();
        let watchdog = tokio::spawn({
            let activity = activity.clone();
            async move { activity.expired(TIMEOUTS).await }
        });
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(!watchdog.is_finished(), "a long request is not cut off");
        let answered = Instant::now();
        activity.response_ready();
        assert_eq!(watchdog.await.unwrap(), Expired::Idle);
        assert_eq!(answered.elapsed().as_secs(), 75);
    }
}
