//! What `/readyz` reports: every part the ingester needs, each under its
//! own name, so that one part's success never hides another's failure
//! (writer 1's insert going in says nothing of writer 0's). A part is
//! ready until it reports a reason; the reasons are joined in the answer.
//!
//! The parts: ClickHouse's ping (probed with a short timeout, so a hanging
//! server counts as down, not only a refusing one), the schema, each
//! writer's inserts, the dead-letter topic and its sends, and the
//! processor task and Kafka poll thread being alive.
//!
//! Reasons are written by the code that knows them; they carry no secret
//! (URLs are logged without their user and password, see `clickhouse`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::clickhouse::ClickHouse;

/// The reasons the ingester is not ready, by part; none means ready.
#[derive(Default)]
pub struct Health {
    reasons: Mutex<BTreeMap<String, String>>,
}

impl Health {
    fn reasons(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.reasons.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `part` is not ready, for `reason`.
    pub fn fail(&self, part: impl Into<String>, reason: impl Into<String>) {
        self.reasons().insert(part.into(), reason.into());
    }

    /// Whether `part` has a reason now.
    pub fn has(&self, part: &str) -> bool {
        self.reasons().contains_key(part)
    }

    /// `part` is ready (again).
    pub fn ok(&self, part: &str) {
        self.reasons().remove(part);
    }

    pub fn ping_result(&self, result: Result<(), String>) {
        match result {
            Ok(()) => self.ok("clickhouse"),
            Err(e) => self.fail("clickhouse", format!("ClickHouse ping failed: {e}")),
        }
    }

    /// Writer `writer`'s last insert went in.
    pub fn insert_ok(&self, writer: usize) {
        self.ok(&format!("writer {writer}"));
    }

    /// Writer `writer`'s inserts are failing.
    pub fn insert_failed(&self, writer: usize, reason: &str) {
        self.fail(
            format!("writer {writer}"),
            format!("inserts are failing: {reason}"),
        );
    }

    /// `Err` with every reason when not ready.
    pub fn readiness(&self) -> Result<(), String> {
        let reasons = self.reasons();
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.values().cloned().collect::<Vec<_>>().join("; "))
        }
    }
}

/// Pings ClickHouse every `interval` until the process ends. Starts as not
/// ready until the first ping answers.
pub async fn probe(health: std::sync::Arc<Health>, clickhouse: ClickHouse, interval: Duration) {
    health.ping_result(Err("not checked yet".into()));
    loop {
        health.ping_result(clickhouse.ping().await);
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writers_success_does_not_hide_anothers_failure() {
        let health = Health::default();
        assert!(health.readiness().is_ok());
        health.insert_failed(0, "connection refused");
        health.insert_ok(1);
        let reason = health.readiness().unwrap_err();
        assert!(reason.contains("connection refused"), "{reason}");
        health.fail("processor", "the processor stopped");
        let reason = health.readiness().unwrap_err();
        assert!(reason.contains("connection refused") && reason.contains("processor"));
        health.insert_ok(0);
        health.ok("processor");
        assert!(health.readiness().is_ok());
    }
}
