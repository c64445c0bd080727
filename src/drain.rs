//! The phases of a shutdown, as every part of the gateway sees them.
//!
//! mini-redis broadcasts one "shut down" to its connections; an upload
//! gateway needs three steps, because a client must get an answer for every
//! upload it sent:
//!
//! 1. [`Phase::Draining`]: the gateway still serves, but `/readyz` says 503
//!    so load balancers stop sending (`server.shutdown_delay_ms`);
//! 2. the listener closes and connections finish what they are doing
//!    (`server.shutdown_grace_ms`);
//! 3. [`Phase::AnswerNow`], shortly before the grace runs out: a body still
//!    arriving is answered 503, a Kafka wait ends with 1004 for the events
//!    not acknowledged yet. Every upload in flight gets its reply before the
//!    process lets go of its connections.

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    Draining,
    AnswerNow,
}

/// Moves the gateway through the phases (held by the serving loop).
pub struct DrainControl(watch::Sender<Phase>);

/// Tells a handler which phase the gateway is in.
#[derive(Clone)]
pub struct Drain(watch::Receiver<Phase>);

impl DrainControl {
    pub fn new() -> (Self, Drain) {
        let (tx, rx) = watch::channel(Phase::Serving);
        (Self(tx), Drain(rx))
    }

    pub fn enter(&self, phase: Phase) {
        self.0.send_if_modified(|current| {
            let later = phase > *current;
            if later {
                *current = phase;
            }
            later
        });
    }
}

impl Drain {
    /// A drain that never starts (benchmarks, unit tests).
    pub fn never() -> Self {
        let (control, drain) = DrainControl::new();
        // The receiver sees the last value once the sender is gone; keep it.
        std::mem::forget(control);
        drain
    }

    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    /// Completes when in-flight uploads must answer at once.
    pub async fn answer_now(&self) {
        let mut rx = self.0.clone();
        // An error means the control is gone: the process is ending anyway.
        let _ = rx.wait_for(|phase| *phase >= Phase::AnswerNow).await;
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM: the start of a shutdown, for
/// both binaries (`venus_shared::shutdown`).
pub use venus_shared::shutdown::shutdown_requested;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn answer_now_waits_for_its_phase_and_phases_only_advance() {
        let (control, drain) = DrainControl::new();
        let waiting = tokio::spawn({
            let drain = drain.clone();
            async move { drain.answer_now().await }
        });
        control.enter(Phase::Draining);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        assert_eq!(drain.phase(), Phase::Draining);
        control.enter(Phase::AnswerNow);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        control.enter(Phase::Draining);
        assert_eq!(drain.phase(), Phase::AnswerNow);
    }
}
