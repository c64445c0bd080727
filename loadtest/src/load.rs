//! The load driver: closed loop or open loop, for any target.
//!
//! * Closed loop: `connections` workers, each sending its next request as
//!   soon as the last one finished. Latency runs from the actual send.
//! * Open loop: a scheduler starts request `n` at `start + n / rate`
//!   whatever the responses do, with at most `max_in_flight` outstanding.
//!   Latency runs from the *intended* start, so a slow server (or a full
//!   in-flight cap) shows up in the percentiles instead of quietly lowering
//!   the send rate (no coordinated omission).
//!
//! A closed-loop worker whose request got no response at all (refused
//! connection, timeout) pauses 10 ms before its next one, so a dead server
//! does not turn the loop into a busy spin.
//!
//! Both stop starting requests at the deadline, after the request limit, or
//! when the shutdown future completes, then wait for what is in flight.
//! Each request adds its result to the totals itself, under a lock held for
//! the few counters and the histogram: a channel to a collector task woke
//! that task for every request, often on the other worker thread, and the
//! load generator's CPU is taken from the gateway it measures.
//!
//! In open loop the driver also records each request's *start lag*: how long
//! after it was due its task first ran, where "due" is the intended start or,
//! when the in-flight cap held it back, the moment a slot freed. That is the
//! load generator's own delay (its timer, its runtime, the CPU it got),
//! already inside the latency; reported apart, it tells a slow server from a
//! starved load generator sharing the server's cores.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};

use crate::progress::Live;
use crate::report::{Outcome, Stats};

/// Closed loop: a worker's pause after a request that got no response.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// One finished request, as the driver hands it to the collector.
struct Finished {
    /// From the actual send (closed loop) or the intended start (open loop).
    latency: Duration,
    /// Open loop: from when the request was due (see the module doc) to its
    /// task's first poll.
    start_lag: Option<Duration>,
    outcome: Outcome,
}

/// Something that carries out request number `n` (one batch).
pub(crate) trait Target: Send + Sync + 'static {
    /// Sends batch `request` and reports what came of it.
    fn send(&self, request: u64) -> impl Future<Output = Outcome> + Send;
}

/// How to load.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub connections: usize,
    pub rate: Option<f64>,
    pub max_in_flight: usize,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
}

/// How well the open loop kept its schedule (all 0 in closed loop).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ScheduleFigures {
    /// Times the schedule had to wait for a free in-flight slot.
    pub in_flight_waits: u64,
    /// Requests the schedule was due to start before it stopped but never
    /// started, because `max_in_flight` requests were outstanding.
    pub behind_schedule: u64,
}

/// What a drive produced.
#[derive(Debug)]
pub(crate) struct Driven {
    pub stats: Stats,
    /// From the first request to the last response.
    pub elapsed: Duration,
    pub schedule: ScheduleFigures,
}

/// Runs `plan` against `target` until a stop condition or `shutdown`.
pub(crate) async fn drive<T, F>(
    target: Arc<T>,
    plan: &Plan,
    categories: usize,
    live: Arc<Live>,
    shutdown: F,
) -> Driven
where
    T: Target,
    F: Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let deadline = plan.duration.map(|d| start + d);

    // `true` once the run must stop starting requests.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopper = tokio::spawn(async move {
        match deadline {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline.into()) => {}
                    _ = shutdown => {}
                }
            }
            None => shutdown.await,
        }
        let _ = stop_tx.send(true);
        // Keep the sender alive so receivers never see it closed early.
        std::future::pending::<()>().await;
    });

    let collector = Arc::new(Collector {
        stats: Mutex::new(Stats::new(categories)),
        live,
    });

    let schedule = match plan.rate {
        None => closed_loop(target, plan, stop_rx, collector.clone()).await,
        Some(rate) => {
            open_loop(
                target,
                plan,
                rate,
                start,
                deadline,
                stop_rx,
                collector.clone(),
            )
            .await
        }
    };
    // Every request has recorded its result by now.
    let stats = std::mem::replace(&mut *collector.lock(), Stats::new(0));
    let elapsed = start.elapsed();
    stopper.abort();
    Driven {
        stats,
        elapsed,
        schedule,
    }
}

/// The run's totals, added to by every finished request.
struct Collector {
    stats: Mutex<Stats>,
    live: Arc<Live>,
}

impl Collector {
    fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        // A request that panicked while holding the lock left the totals
        // whole (each record is one call): go on with them.
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, finished: Finished) {
        let Finished {
            latency,
            start_lag,
            outcome,
        } = finished;
        let failed = match outcome.status {
            Some(status) => u64::from(!(200..300).contains(&status)),
            None => outcome.errors.iter().map(|(_, n)| u64::from(*n)).sum(),
        };
        self.live.requests.fetch_add(1, Ordering::Relaxed);
        self.live
            .accepted
            .fetch_add(u64::from(outcome.accepted), Ordering::Relaxed);
        self.live.failed.fetch_add(failed, Ordering::Relaxed);
        let mut stats = self.lock();
        if let Some(lag) = start_lag {
            stats.record_start_lag(lag);
        }
        stats.record(latency, outcome);
    }
}

/// `connections` workers sending back to back.
async fn closed_loop<T: Target>(
    target: Arc<T>,
    plan: &Plan,
    stop: watch::Receiver<bool>,
    collector: Arc<Collector>,
) -> ScheduleFigures {
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..plan.connections)
        .map(|_| {
            let target = target.clone();
            let next = next.clone();
            let stop = stop.clone();
            let collector = collector.clone();
            let limit = plan.requests;
            tokio::spawn(async move {
                loop {
                    if *stop.borrow() {
                        break;
                    }
                    let request = next.fetch_add(1, Ordering::Relaxed);
                    if limit.is_some_and(|limit| request >= limit) {
                        break;
                    }
                    let sent = Instant::now();
                    let outcome = target.send(request).await;
                    let no_response = !outcome.record_latency;
                    collector.record(Finished {
                        latency: sent.elapsed(),
                        start_lag: None,
                        outcome,
                    });
                    if no_response {
                        // A refused connection fails at once: do not spin.
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        // A panicking worker loses its own results only.
        let _ = worker.await;
    }
    ScheduleFigures::default()
}

/// Requests started on a fixed schedule.
async fn open_loop<T: Target>(
    target: Arc<T>,
    plan: &Plan,
    rate: f64,
    start: Instant,
    deadline: Option<Instant>,
    mut stop: watch::Receiver<bool>,
    collector: Arc<Collector>,
) -> ScheduleFigures {
    let slots = Arc::new(Semaphore::new(plan.max_in_flight));
    let mut waits = 0u64;
    let mut request = 0u64;
    loop {
        if plan.requests.is_some_and(|limit| request >= limit) || *stop.borrow() {
            break;
        }
        let intended = start + Duration::from_secs_f64(request as f64 / rate);
        if deadline.is_some_and(|deadline| intended >= deadline) {
            break;
        }
        if intended > Instant::now() {
            tokio::select! {
                _ = tokio::time::sleep_until(intended.into()) => {}
                _ = stop.changed() => break,
            }
        }
        let (permit, due) = match slots.clone().try_acquire_owned() {
            Ok(permit) => (permit, intended),
            Err(_) => {
                waits += 1;
                tokio::select! {
                    permit = slots.clone().acquire_owned() => {
                        let permit = permit.expect("the semaphore is never closed");
                        (permit, Instant::now().max(intended))
                    }
                    _ = stop.changed() => break,
                }
            }
        };
        let target = target.clone();
        let collector = collector.clone();
        tokio::spawn(async move {
            let start_lag = due.elapsed();
            let outcome = target.send(request).await;
            collector.record(Finished {
                latency: intended.elapsed(),
                start_lag: Some(start_lag),
                outcome,
            });
            drop(permit);
        });
        request += 1;
    }
    // Requests due by now (or by the deadline) that never started.
    let end = deadline.map_or_else(Instant::now, |d| d.min(Instant::now()));
    let mut due = (end.duration_since(start).as_secs_f64() * rate).ceil() as u64;
    if let Some(limit) = plan.requests {
        due = due.min(limit);
    }
    // Wait for what is in flight: each task records its result, then gives
    // its slot back.
    let _all = slots
        .acquire_many(u32::try_from(plan.max_in_flight).unwrap_or(u32::MAX))
        .await
        .expect("the semaphore is never closed");
    ScheduleFigures {
        in_flight_waits: waits,
        behind_schedule: due.saturating_sub(request),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target that takes a fixed time and accepts every event.
    struct Sleepy {
        delay: Duration,
        sent: AtomicU64,
    }

    impl Target for Sleepy {
        async fn send(&self, _request: u64) -> Outcome {
            self.sent.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.delay).await;
            Outcome {
                events: 2,
                accepted: 2,
                status: Some(200),
                record_latency: true,
                ..Outcome::default()
            }
        }
    }

    fn sleepy(delay_ms: u64) -> Arc<Sleepy> {
        Arc::new(Sleepy {
            delay: Duration::from_millis(delay_ms),
            sent: AtomicU64::new(0),
        })
    }

    #[tokio::test]
    async fn closed_loop_stops_at_the_request_limit() {
        let target = sleepy(1);
        let plan = Plan {
            connections: 4,
            rate: None,
            max_in_flight: 10,
            duration: None,
            requests: Some(37),
        };
        let live = Arc::new(Live::default());
        let driven = drive(
            target.clone(),
            &plan,
            1,
            live.clone(),
            std::future::pending(),
        )
        .await;
        assert_eq!(driven.stats.requests, 37);
        assert_eq!(target.sent.load(Ordering::Relaxed), 37);
        assert_eq!(driven.stats.accepted, 74);
        assert_eq!(live.requests.load(Ordering::Relaxed), 37);
        assert!(driven.stats.latency().p50 >= 1.0);
        assert_eq!(driven.stats.start_lag(), None, "no schedule, no lag");
    }

    /// An open loop at `rate` with `max_in_flight` for `millis`, to its end.
    async fn open_loop_for<T: Target>(
        target: Arc<T>,
        rate: f64,
        max_in_flight: usize,
        millis: u64,
    ) -> Driven {
        let plan = Plan {
            connections: 1,
            rate: Some(rate),
            max_in_flight,
            duration: Some(Duration::from_millis(millis)),
            requests: None,
        };
        let live = Arc::new(Live::default());
        drive(target, &plan, 1, live, std::future::pending()).await
    }

    #[tokio::test]
    async fn open_loop_latency_counts_from_the_intended_time() {
        // 100 req/s for 0.5 s, each request takes 50 ms, at most 1 in
        // flight: the schedule falls behind and latency must show it.
        let driven = open_loop_for(sleepy(50), 100.0, 1, 500).await;
        let latency = driven.stats.latency();
        assert!(driven.schedule.in_flight_waits > 0);
        // 50 were due, about 10 could go (1 at a time, 50 ms each).
        assert!(
            driven.schedule.behind_schedule >= 30,
            "{:?}",
            driven.schedule
        );
        // The last requests were intended far earlier than they could go.
        assert!(latency.max > 200.0, "{latency:?}");
        assert!(driven.stats.requests >= 5, "{}", driven.stats.requests);
        // ... but that was the cap, not the load generator: each task ran
        // soon after its slot freed.
        let lag = driven
            .stats
            .start_lag()
            .expect("open loop records start lag");
        assert_eq!(lag.samples, driven.stats.requests);
        assert!(lag.max < 40.0, "{lag:?}");
    }

    #[tokio::test]
    async fn open_loop_waits_for_every_request_in_flight() {
        // 10 requests start in the first 100 ms and each takes 300 ms: all
        // are still out when the schedule ends, and all must be counted.
        let target = sleepy(300);
        let driven = open_loop_for(target.clone(), 100.0, 100, 100).await;
        let sent = target.sent.load(Ordering::Relaxed);
        assert!(sent >= 9, "{sent}");
        assert_eq!(driven.stats.requests, sent);
        assert_eq!(driven.stats.accepted, 2 * sent);
        assert!(driven.elapsed >= Duration::from_millis(300));
    }

    /// A target whose first request blocks its thread: the one-thread
    /// runtime cannot start the next ones on time.
    struct Hog {
        sent: AtomicU64,
    }

    impl Target for Hog {
        async fn send(&self, _request: u64) -> Outcome {
            if self.sent.fetch_add(1, Ordering::Relaxed) == 0 {
                std::thread::sleep(Duration::from_millis(120));
            }
            Outcome {
                events: 1,
                accepted: 1,
                status: Some(200),
                record_latency: true,
                ..Outcome::default()
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn open_loop_start_lag_shows_a_starved_load_generator() {
        let target = Arc::new(Hog {
            sent: AtomicU64::new(0),
        });
        let driven = open_loop_for(target, 200.0, 100, 300).await;
        assert_eq!(driven.schedule.in_flight_waits, 0);
        let lag = driven
            .stats
            .start_lag()
            .expect("open loop records start lag");
        // Requests due during the 120 ms block started up to ~115 ms late.
        assert!(lag.max >= 80.0, "{lag:?}");
        assert!(lag.p50 < 80.0, "{lag:?}");
    }

    #[tokio::test]
    async fn shutdown_stops_an_endless_run() {
        let target = sleepy(1);
        let plan = Plan {
            connections: 2,
            rate: None,
            max_in_flight: 10,
            duration: None,
            requests: None,
        };
        let driven = drive(
            target,
            &plan,
            1,
            Arc::new(Live::default()),
            tokio::time::sleep(Duration::from_millis(100)),
        )
        .await;
        assert!(driven.stats.requests > 0);
        assert!(driven.elapsed < Duration::from_secs(5));
    }
}
