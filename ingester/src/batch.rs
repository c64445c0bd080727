//! Rows waiting for one insert, and when they are due: at `batch_rows`
//! rows, `batch_bytes` bytes or `flush_interval` after the first row,
//! whichever comes first (small inserts make too many ClickHouse parts).

use std::time::{Duration, Instant};

use opentelemetry::trace::SpanContext;

use crate::record::Record;

/// A row and what it takes to finish its message: its source (for the
/// offset marker), its original message (for the dead-letter topic, should
/// ClickHouse reject the row for good) and its `process` span (linked from
/// the insert span).
#[derive(Debug)]
pub struct PendingRow {
    /// The JSONEachRow line, newline included.
    pub line: Vec<u8>,
    pub record: Record,
    pub span: SpanContext,
}

/// The limits of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub rows: usize,
    pub bytes: usize,
    pub interval: Duration,
}

/// The batch being filled.
#[derive(Debug)]
pub struct Batch {
    limits: Limits,
    rows: Vec<PendingRow>,
    bytes: usize,
    first_at: Option<Instant>,
}

impl Batch {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            rows: Vec::new(),
            bytes: 0,
            first_at: None,
        }
    }

    /// Adds a row; `true` when the batch is full (rows or bytes) and must be
    /// flushed now.
    pub fn push(&mut self, row: PendingRow) -> bool {
        self.push_at(row, Instant::now())
    }

    fn push_at(&mut self, row: PendingRow, now: Instant) -> bool {
        self.first_at.get_or_insert(now);
        self.bytes += row.line.len();
        self.rows.push(row);
        self.is_full()
    }

    pub fn is_full(&self) -> bool {
        self.rows.len() >= self.limits.rows || self.bytes >= self.limits.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// When the interval runs out; `None` while empty.
    pub fn deadline(&self) -> Option<Instant> {
        self.first_at.map(|first| first + self.limits.interval)
    }

    /// Takes the rows out, leaving an empty batch.
    pub fn take(&mut self) -> Vec<PendingRow> {
        self.bytes = 0;
        self.first_at = None;
        std::mem::take(&mut self.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Source;

    fn row(bytes: usize) -> PendingRow {
        PendingRow {
            line: vec![b'x'; bytes],
            record: Record {
                source: Source {
                    topic: "t".into(),
                    partition: 0,
                    offset: 0,
                    epoch: 0,
                },
                key: None,
                payload: Vec::new(),
                headers: Vec::new(),
            },
            span: SpanContext::empty_context(),
        }
    }

    fn limits(rows: usize, bytes: usize) -> Limits {
        Limits {
            rows,
            bytes,
            interval: Duration::from_millis(500),
        }
    }

    #[test]
    fn full_at_the_row_limit() {
        let mut batch = Batch::new(limits(3, 1_000_000));
        assert!(!batch.push(row(10)));
        assert!(!batch.push(row(10)));
        assert!(batch.push(row(10)));
        assert_eq!(batch.take().len(), 3);
        assert!(batch.is_empty());
        assert!(!batch.push(row(10)), "taking resets the count");
    }

    #[test]
    fn full_at_the_byte_limit() {
        let mut batch = Batch::new(limits(1000, 100));
        assert!(!batch.push(row(60)));
        assert!(batch.push(row(40)));
        batch.take();
        assert!(!batch.push(row(99)), "taking resets the bytes");
        assert!(batch.push(row(1)));
    }

    #[test]
    fn the_interval_runs_from_the_first_row() {
        let mut batch = Batch::new(limits(1000, 1_000_000));
        assert_eq!(batch.deadline(), None);
        let start = Instant::now();
        batch.push_at(row(1), start);
        batch.push_at(row(1), start + Duration::from_millis(300));
        assert_eq!(batch.deadline(), Some(start + Duration::from_millis(500)));
        batch.take();
        assert_eq!(batch.deadline(), None);
    }
}
