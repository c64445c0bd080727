//! The live progress bar on stderr: requests/s, accepted events/s, failures.
//!
//! Counters are plain atomics that each finished request bumps; a ticker
//! task turns them into rates a few times a second. When the bar is off (not
//! asked for, or stderr is not a terminal) nothing is drawn and no ticker
//! runs.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

/// Totals so far, bumped by each finished request.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub requests: AtomicU64,
    pub accepted: AtomicU64,
    /// Requests without a 2xx response, or Kafka deliveries that failed.
    pub failed: AtomicU64,
}

impl Live {
    fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The bar and its ticker.
pub(crate) struct Progress {
    bar: ProgressBar,
    live: Arc<Live>,
    ticker: Option<JoinHandle<()>>,
}

/// How the bar measures completion.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Goal {
    /// Elapsed time against the duration.
    Time(Duration),
    /// Finished requests against the request limit.
    Requests(u64),
}

impl Progress {
    /// Starts the bar when `enabled` and stderr is a terminal.
    pub fn start(enabled: bool, goal: Goal) -> Self {
        let live = Arc::new(Live::default());
        if !(enabled && std::io::stderr().is_terminal()) {
            return Self {
                bar: ProgressBar::hidden(),
                live,
                ticker: None,
            };
        }
        let length = match goal {
            Goal::Time(duration) => duration.as_millis() as u64,
            Goal::Requests(requests) => requests,
        };
        let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {msg}")
                .expect("valid progress template")
                .progress_chars("=> "),
        );
        let ticker = tokio::spawn(tick(bar.clone(), live.clone(), goal));
        Self {
            bar,
            live,
            ticker: Some(ticker),
        }
    }

    /// The counters each finished request bumps.
    pub fn live(&self) -> Arc<Live> {
        self.live.clone()
    }

    /// The bar, for later phases to write their status on.
    pub fn bar(&self) -> ProgressBar {
        self.bar.clone()
    }

    /// Stops the ticker; the bar stays for later phases' messages.
    pub fn end_load(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        if let Some(length) = self.bar.length() {
            self.bar.set_position(length);
        }
    }

    /// Removes the bar from the terminal.
    pub fn finish(mut self) {
        self.end_load();
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
    }
}

/// Refreshes the bar: rates over the last tick, totals so far.
async fn tick(bar: ProgressBar, live: Arc<Live>, goal: Goal) {
    let start = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    let mut last = (start, 0u64, 0u64);
    loop {
        interval.tick().await;
        let now = Instant::now();
        let (requests, accepted, failed) = live.snapshot();
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let request_rate = (requests - last.1) as f64 / secs;
        let event_rate = (accepted - last.2) as f64 / secs;
        last = (now, requests, accepted);
        let position = match goal {
            Goal::Time(duration) => now.duration_since(start).min(duration).as_millis() as u64,
            Goal::Requests(_) => requests,
        };
        bar.set_position(position);
        bar.set_message(format!(
            "{request_rate:>8.0} req/s {event_rate:>9.0} events/s  {requests} requests  {failed} failed"
        ));
    }
}
