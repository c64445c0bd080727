//! Batches into ClickHouse: each insert retried with capped exponential
//! backoff until it is in (never dropped because retries "ran out"), a batch
//! ClickHouse rejects for its data split in halves until the bad rows are
//! found and sent to the dead-letter topic, and every message marked done
//! only once it is in ClickHouse or the dead-letter topic.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Mutex};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::batch::Rows;
use crate::clickhouse::{ClickHouse, InsertError};
use crate::dead_letter::DeadLetters;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::offsets::Offsets;

/// Links from one insert span to the `process` spans of its rows, at most
/// (the SDK keeps 128 links per span by default).
const MAX_LINKS: usize = 128;

/// Capped exponential backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The wait before the next attempt; doubles up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

enum Attempt {
    Inserted,
    Rejected(String),
    Cancelled,
}

pub struct Writer {
    /// This writer's number, its part of `/readyz`.
    pub id: usize,
    pub clickhouse: ClickHouse,
    pub offsets: Arc<Offsets>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub dead_letters: DeadLetters,
    pub backoff: Backoff,
    pub cancel: watch::Receiver<bool>,
    pub schema_ready: bool,
    /// Ask before each attempt which rows are in the table already
    /// (`ingester.deduplicate`, [`crate::dedup`]).
    pub deduplicate: bool,
    /// The partitions' marks, shared by the writers.
    pub marks: crate::marks::Marks,
}

impl Writer {
    /// Writes every batch until the processor closes the channel. Several
    /// writers may share `batches` (`ingester.insert_concurrency`): each
    /// takes the next batch when it is free. Batches then complete out of
    /// order, which the offset markers are for.
    pub async fn run(mut self, batches: Arc<Mutex<mpsc::Receiver<Rows>>>) {
        // The database and table exist from the start (queries work before
        // the first event); batches wait meanwhile, and fetching pauses if
        // ClickHouse stays away.
        while !self.schema_ready {
            match self.clickhouse.ensure_schema().await {
                Ok(()) => {
                    self.schema_ready = true;
                    self.backoff.reset();
                    self.health.ok("schema");
                    tracing::info!(table = %self.clickhouse.table_name(), version = ?self.clickhouse.version(), "ClickHouse table ready");
                }
                Err(error) => {
                    let wait = self.backoff.next_wait();
                    self.health.fail("schema", error.to_string());
                    tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "the ClickHouse table is not ready; retrying");
                    if !self.sleep(wait).await {
                        break;
                    }
                }
            }
        }
        loop {
            // The lock is held only while waiting for the next batch.
            let next = batches.lock().await.recv().await;
            let Some(rows) = next else {
                break;
            };
            self.write(rows).await;
        }
    }

    async fn write(&mut self, rows: Rows) {
        let mut queue = VecDeque::from([rows]);
        while let Some(mut chunk) = queue.pop_front() {
            match self.insert(&mut chunk).await {
                Attempt::Inserted => {
                    self.offsets
                        .done_all(chunk.rows.iter().map(|row| &row.record.source));
                }
                Attempt::Rejected(reason) if chunk.len() > 1 => {
                    tracing::warn!(rows = chunk.len(), %reason, "ClickHouse rejected a batch; splitting it");
                    let second = chunk.split_off(chunk.len() / 2);
                    queue.push_front(second);
                    queue.push_front(chunk);
                }
                Attempt::Rejected(reason) => {
                    let row = &chunk.rows[0];
                    let reason = format!("ClickHouse rejected the row: {reason}");
                    if self
                        .dead_letters
                        .send(&row.record, &reason, "clickhouse", &mut self.cancel)
                        .await
                    {
                        self.offsets.done(&row.record.source);
                    } else {
                        self.offsets.abandon();
                    }
                }
                Attempt::Cancelled => {
                    let left = chunk.len() + queue.iter().map(Rows::len).sum::<usize>();
                    self.offsets.abandon_many(left);
                    return;
                }
            }
        }
    }

    /// Sleeps `wait`; `false` when cancelled first.
    async fn sleep(&mut self, wait: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = self.cancel.wait_for(|c| *c) => false,
        }
    }

    /// Fails the attempt `failed` the way an insert fails: `/readyz`, the
    /// retry count, the backoff. `false` when cancelled while waiting.
    async fn failed(&mut self, reason: String, seconds: f64) -> bool {
        self.metrics.insert_failed(seconds);
        self.health.insert_failed(self.id, &reason);
        let wait = self.backoff.next_wait();
        tracing::warn!(%reason, retry_in_ms = wait.as_millis() as u64, "insert failed; retrying");
        self.sleep(wait).await
    }

    /// Before an attempt: waits until the previous attempt, if its answer
    /// was lost, has ended on the server; drops rows of partitions revoked
    /// meanwhile (their new owner reads them again); takes out, as done,
    /// the rows ClickHouse has already. `Ok(true)`: nothing left to insert.
    async fn prepare(
        &mut self,
        chunk: &mut Rows,
        last: &mut Option<(String, usize)>,
        all_suspect: &mut bool,
    ) -> Result<bool, InsertError> {
        if let Some((query_id, replica)) = last.as_ref() {
            if self.clickhouse.running(query_id, *replica).await? {
                return Err(InsertError::Transient(format!(
                    "the previous attempt ({query_id}) is still running on the server"
                )));
            }
            // Its rows may be in: every row of this batch is a suspect now.
            *last = None;
            *all_suspect = true;
        }
        let stale: Vec<bool> = chunk
            .rows
            .iter()
            .map(|row| !self.offsets.is_current(&row.record.source))
            .collect();
        let gone = chunk.remove(&stale);
        if !gone.is_empty() {
            tracing::info!(
                rows = gone.len(),
                "rows of revoked partitions left to their new owner"
            );
            self.offsets.abandon_many(gone.len());
        }
        if chunk.is_empty() {
            return Ok(true);
        }
        let mut suspects = self.marks.cover(&self.clickhouse, chunk).await?;
        if *all_suspect {
            suspects.iter_mut().for_each(|s| *s = true);
        }
        let present = self.clickhouse.present(chunk, &suspects).await?;
        let layout = self.clickhouse.layout();
        if !present.is_empty() {
            let found: Vec<bool> = chunk
                .rows
                .iter()
                .zip(&suspects)
                .map(|(row, suspect)| {
                    *suspect && crate::dedup::is_present(chunk, row, &present, layout)
                })
                .collect();
            let done = chunk.remove(&found);
            if !done.is_empty() {
                tracing::info!(
                    rows = done.len(),
                    "rows already in ClickHouse (read again) are not inserted twice"
                );
                self.metrics.deduplicated(done.len() as u64);
                self.offsets
                    .done_all(done.iter().map(|row| &row.record.source));
            }
        }
        Ok(chunk.is_empty())
    }

    async fn insert(&mut self, chunk: &mut Rows) -> Attempt {
        // The query id of an attempt that failed without a clear answer:
        // ClickHouse may still be writing its rows.
        let mut last: Option<(String, usize)> = None;
        let mut all_suspect = false;
        loop {
            if *self.cancel.borrow() {
                return Attempt::Cancelled;
            }
            if !self.schema_ready {
                match self.clickhouse.ensure_schema().await {
                    Ok(()) => {
                        self.schema_ready = true;
                        self.health.ok("schema");
                    }
                    Err(error) => {
                        let reason = error.to_string();
                        self.health.fail("schema", &reason);
                        tracing::warn!(%reason, "the ClickHouse table is not ready; retrying");
                        let wait = self.backoff.next_wait();
                        if !self.sleep(wait).await {
                            return Attempt::Cancelled;
                        }
                        continue;
                    }
                }
            }
            if self.deduplicate {
                let started = Instant::now();
                match self.prepare(chunk, &mut last, &mut all_suspect).await {
                    Ok(true) => {
                        // Nothing left to insert: every row was in (an
                        // earlier attempt's, whose answer was lost).
                        self.health.insert_ok(self.id);
                        self.backoff.reset();
                        return Attempt::Inserted;
                    }
                    Ok(false) => {}
                    Err(error) => {
                        if matches!(error, InsertError::MissingTable(_)) {
                            self.schema_ready = false;
                        }
                        let seconds = started.elapsed().as_secs_f64();
                        if !self.failed(error.to_string(), seconds).await {
                            return Attempt::Cancelled;
                        }
                        continue;
                    }
                }
            }
            let body = chunk.body();
            let query_id = uuid::Uuid::new_v4().to_string();
            let span = tracing::info_span!(
                "insert",
                otel.name = format!("INSERT {}", self.clickhouse.table_name()),
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                db.system = "clickhouse",
                db.system.name = "clickhouse",
                db.operation.name = "INSERT",
                db.collection.name = %self.clickhouse.table_name(),
                db.operation.batch.size = chunk.len() as i64,
                db.response.returned_rows = tracing::field::Empty,
                server.address = %self.clickhouse.server_address(),
                error.type = tracing::field::Empty,
            );
            // The insert's own trace, linked to each message's trace.
            let _ = span.set_parent(opentelemetry::Context::new());
            for row in chunk.rows.iter().take(MAX_LINKS) {
                if row.span.is_valid() {
                    span.add_link(row.span.clone());
                }
            }
            let started = Instant::now();
            let replica = self.clickhouse.replica();
            let result = self
                .clickhouse
                .insert(body, &query_id)
                .instrument(span.clone())
                .await;
            let seconds = started.elapsed().as_secs_f64();
            match result {
                Ok(()) => {
                    self.metrics.inserted(chunk.len() as u64, seconds);
                    self.health.insert_ok(self.id);
                    self.backoff.reset();
                    return Attempt::Inserted;
                }
                Err(InsertError::Rejected { code, message }) => {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", code.to_string());
                    return Attempt::Rejected(format!("code {code}: {message}"));
                }
                Err(error) => {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", "unavailable");
                    if matches!(error, InsertError::MissingTable(_)) {
                        self.schema_ready = false;
                    }
                    // Without a clear answer the rows may be in, or going
                    // in: the next attempt first waits for this one and asks.
                    last = Some((query_id, replica));
                    drop(span);
                    if !self.failed(error.to_string(), seconds).await {
                        return Attempt::Cancelled;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let waits: Vec<u64> = (0..5)
            .map(|_| backoff.next_wait().as_millis() as u64)
            .collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.next_wait(), Duration::from_millis(100));
    }
}
