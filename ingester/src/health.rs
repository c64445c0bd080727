//! What `/readyz` reports: whether ClickHouse answers (probed with a short
//! timeout, so a hanging server counts as down, not only a refusing one)
//! and whether the last insert went in.

use std::sync::Mutex;
use std::time::Duration;

use crate::clickhouse::ClickHouse;

/// The reasons the ingester is not ready; none means ready.
#[derive(Default)]
pub struct Health {
    ping: Mutex<Option<String>>,
    insert: Mutex<Option<String>>,
}

fn set(slot: &Mutex<Option<String>>, value: Option<String>) {
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = value;
}

fn get(slot: &Mutex<Option<String>>) -> Option<String> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Health {
    pub fn ping_result(&self, result: Result<(), String>) {
        set(
            &self.ping,
            result.err().map(|e| format!("ClickHouse ping failed: {e}")),
        );
    }

    pub fn insert_ok(&self) {
        set(&self.insert, None);
    }

    pub fn insert_failed(&self, reason: &str) {
        set(&self.insert, Some(format!("inserts are failing: {reason}")));
    }

    /// `Err` with every reason when not ready.
    pub fn readiness(&self) -> Result<(), String> {
        let reasons: Vec<String> = [get(&self.ping), get(&self.insert)]
            .into_iter()
            .flatten()
            .collect();
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
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
