//! Rows waiting for one insert, and when they are due: at `batch_rows`
//! rows, `batch_bytes` bytes or `flush_interval` after the first row,
//! whichever comes first (small inserts make too many ClickHouse parts).

use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry::trace::SpanContext;

use crate::record::Record;

/// A row and what it takes to finish its message: its bytes in the
/// batch's body, its source (for the offset marker), its original message (for the
/// dead-letter topic, should ClickHouse reject the row for good) and its
/// `process` span (linked from the insert span).
#[derive(Debug)]
pub struct PendingRow {
    /// Where the row (in `RowBinary`) is in the body.
    pub bytes: Range<usize>,
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

/// The batch being filled. Rows are written straight into one body, the
/// bytes of the insert: no buffer per row, and no copy to assemble the
/// request.
#[derive(Debug)]
pub struct Batch {
    limits: Limits,
    body: Vec<u8>,
    rows: Vec<PendingRow>,
    first_at: Option<Instant>,
}

impl Batch {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            body: Vec::new(),
            rows: Vec::new(),
            first_at: None,
        }
    }

    /// Adds the row that `write` appends to the body for `record`; `true`
    /// when the batch is full (rows or bytes) and must be flushed now. When
    /// `write` fails, the body is left as it was and the record comes back
    /// with the error.
    pub fn push_with<E>(
        &mut self,
        record: Record,
        span: SpanContext,
        write: impl FnOnce(&mut Vec<u8>, &Record) -> Result<(), E>,
    ) -> Result<bool, (Record, E)> {
        self.push_at(record, span, write, Instant::now)
    }

    /// `now` is asked only for the first row (one clock read a batch).
    fn push_at<E>(
        &mut self,
        record: Record,
        span: SpanContext,
        write: impl FnOnce(&mut Vec<u8>, &Record) -> Result<(), E>,
        now: impl FnOnce() -> Instant,
    ) -> Result<bool, (Record, E)> {
        let start = self.body.len();
        if let Err(error) = write(&mut self.body, &record) {
            self.body.truncate(start);
            return Err((record, error));
        }
        let bytes = start..self.body.len();
        if self.rows.is_empty() {
            self.first_at = Some(now());
            self.reserve(bytes.len());
        }
        self.rows.push(PendingRow {
            bytes,
            record,
            span,
        });
        Ok(self.is_full())
    }

    /// Room for a whole batch of rows about as long as the first, so the
    /// body is not copied as it grows.
    fn reserve(&mut self, row: usize) {
        let row = row.max(1);
        let rows = self.limits.rows.min(self.limits.bytes / row + 1);
        self.rows.reserve(rows);
        let bytes = (rows * row + rows * row / 8).min(self.limits.bytes + row);
        self.body.reserve(bytes.saturating_sub(self.body.len()));
    }

    pub fn is_full(&self) -> bool {
        self.rows.len() >= self.limits.rows || self.body.len() >= self.limits.bytes
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
    pub fn take(&mut self) -> Rows {
        self.first_at = None;
        Rows {
            body: Bytes::from(std::mem::take(&mut self.body)),
            rows: std::mem::take(&mut self.rows),
        }
    }
}

/// Rows on their way into ClickHouse: their bytes, in order, in one body
/// (shared by the halves of a batch that had to be split).
#[derive(Debug)]
pub struct Rows {
    body: Bytes,
    pub rows: Vec<PendingRow>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The bytes of these rows: one slice of the body, since the rows of a
    /// batch and of each half of it are contiguous.
    pub fn body(&self) -> Bytes {
        match (self.rows.first(), self.rows.last()) {
            (Some(first), Some(last)) => self.body.slice(first.bytes.start..last.bytes.end),
            _ => Bytes::new(),
        }
    }

    /// The `RowBinary` bytes of `row`, one of these rows.
    pub fn row_bytes(&self, row: &PendingRow) -> &[u8] {
        &self.body[row.bytes.clone()]
    }

    /// Takes out the rows whose `drop` is true and returns them; the rest
    /// stay, in order. The body is copied only when the rows left are no
    /// longer contiguous in it (rare: rows of one batch already inserted).
    pub fn remove(&mut self, drop: &[bool]) -> Vec<PendingRow> {
        debug_assert_eq!(drop.len(), self.rows.len());
        if !drop.iter().any(|d| *d) {
            return Vec::new();
        }
        let (mut removed, mut kept) = (Vec::new(), Vec::new());
        for (row, drop) in std::mem::take(&mut self.rows).into_iter().zip(drop) {
            if *drop {
                removed.push(row);
            } else {
                kept.push(row);
            }
        }
        let contiguous = kept
            .windows(2)
            .all(|pair| pair[0].bytes.end == pair[1].bytes.start);
        if !contiguous {
            let mut body = Vec::with_capacity(kept.iter().map(|r| r.bytes.len()).sum());
            for row in &mut kept {
                let start = body.len();
                body.extend_from_slice(&self.body[row.bytes.clone()]);
                row.bytes = start..body.len();
            }
            self.body = Bytes::from(body);
        }
        self.rows = kept;
        removed
    }

    /// Leaves the rows before `at` here and returns the rest.
    pub fn split_off(&mut self, at: usize) -> Rows {
        Rows {
            body: self.body.clone(),
            rows: self.rows.split_off(at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Source;

    #[test]
    fn removing_rows_keeps_the_others_bytes_in_order() {
        let mut batch = Batch::new(limits(10, 1000));
        for (offset, text) in [(0, "a"), (1, "bb"), (2, "ccc"), (3, "dddd")] {
            batch
                .push_with(record(offset), SpanContext::empty_context(), |out, _| {
                    out.extend_from_slice(text.as_bytes());
                    Ok::<_, ()>(())
                })
                .unwrap();
        }
        let mut rows = batch.take();
        let removed = rows.remove(&[false, true, false, false]);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].record.source.offset, 1);
        assert_eq!(&rows.body()[..], b"acccdddd");
        let offsets: Vec<i64> = rows.rows.iter().map(|r| r.record.source.offset).collect();
        assert_eq!(offsets, vec![0, 2, 3]);
        assert_eq!(rows.row_bytes(&rows.rows[1]), b"ccc");
        // Removing from an end keeps the body shared, still right.
        let removed = rows.remove(&[true, false, false]);
        assert_eq!(removed.len(), 1);
        assert_eq!(&rows.body()[..], b"cccdddd");
        assert!(rows.remove(&[false, false]).is_empty());
    }

    fn record(offset: i64) -> Record {
        let source = Source {
            topic: "t".into(),
            partition: 0,
            offset,
            epoch: 0,
        };
        Record::new(source, b"", None, std::iter::empty())
    }

    fn row_of(bytes: usize) -> impl FnOnce(&mut Vec<u8>, &Record) -> Result<(), ()> {
        move |out, _| {
            out.extend(std::iter::repeat_n(b'x', bytes));
            Ok(())
        }
    }

    fn push(batch: &mut Batch, bytes: usize) -> bool {
        batch
            .push_with(record(0), SpanContext::empty_context(), row_of(bytes))
            .unwrap()
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
        assert!(!push(&mut batch, 10));
        assert!(!push(&mut batch, 10));
        assert!(push(&mut batch, 10));
        assert_eq!(batch.take().len(), 3);
        assert!(batch.is_empty());
        assert!(!push(&mut batch, 10), "taking resets the count");
    }

    #[test]
    fn full_at_the_byte_limit() {
        let mut batch = Batch::new(limits(1000, 100));
        assert!(!push(&mut batch, 60));
        assert!(push(&mut batch, 40));
        batch.take();
        assert!(!push(&mut batch, 99), "taking resets the bytes");
        assert!(push(&mut batch, 1));
    }

    #[test]
    fn the_interval_runs_from_the_first_row() {
        let mut batch = Batch::new(limits(1000, 1_000_000));
        assert_eq!(batch.deadline(), None);
        let start = Instant::now();
        let empty = SpanContext::empty_context;
        batch
            .push_at(record(0), empty(), row_of(1), || start)
            .unwrap();
        let later = start + Duration::from_millis(300);
        batch
            .push_at(record(1), empty(), row_of(1), || later)
            .unwrap();
        assert_eq!(batch.deadline(), Some(start + Duration::from_millis(500)));
        batch.take();
        assert_eq!(batch.deadline(), None);
    }

    #[test]
    fn a_row_that_cannot_be_written_leaves_the_body_and_the_count_alone() {
        let mut batch = Batch::new(limits(2, 1_000_000));
        push(&mut batch, 3);
        let failed = batch.push_with(record(7), SpanContext::empty_context(), |out, _| {
            out.extend_from_slice(b"half a row");
            Err("poison")
        });
        let (back, error) = failed.unwrap_err();
        assert_eq!((back.source.offset, error), (7, "poison"));
        assert_eq!(batch.len(), 1);
        assert!(push(&mut batch, 4), "the second row fills it");
        assert_eq!(&batch.take().body()[..], b"xxxxxxx");
    }

    #[test]
    fn halves_of_a_batch_carry_their_own_bytes() {
        let mut batch = Batch::new(limits(10, 1_000_000));
        for (offset, text) in [(0, "a\n"), (1, "bb\n"), (2, "ccc\n")] {
            let text = text.to_owned();
            batch
                .push_with(record(offset), SpanContext::empty_context(), |out, _| {
                    out.extend_from_slice(text.as_bytes());
                    Ok::<(), ()>(())
                })
                .unwrap();
        }
        let mut first = batch.take();
        assert_eq!(&first.body()[..], b"a\nbb\nccc\n");
        let second = first.split_off(1);
        assert_eq!(&first.body()[..], b"a\n");
        assert_eq!(&second.body()[..], b"bb\nccc\n");
        let mut second = second;
        let third = second.split_off(1);
        assert_eq!(&second.body()[..], b"bb\n");
        assert_eq!(&third.body()[..], b"ccc\n");
        assert_eq!(third.rows[0].record.source.offset, 2);
    }
}
