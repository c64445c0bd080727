//! The offset markers of every assigned partition, shared by the poll
//! thread (which tracks what it reads, stores offsets and commits on
//! revoke) and the writer and dead-letter paths (which mark messages done).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use crate::offset_marker::OffsetMarker;
use crate::record::Source;

struct Partition {
    epoch: u64,
    marker: OffsetMarker,
    /// The offset last handed to `store_offsets`.
    stored: Option<i64>,
    /// The offset of the last message read under this assignment.
    last_read: Option<i64>,
}

#[derive(Default)]
struct Inner {
    partitions: HashMap<(String, i32), Partition>,
    next_epoch: u64,
}

/// Offset markers by partition, plus the count of messages in flight.
#[derive(Default)]
pub struct Offsets {
    inner: Mutex<Inner>,
    in_flight: AtomicI64,
}

impl Offsets {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; go on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A partition was assigned: a fresh marker under a new epoch.
    pub fn assign(&self, topic: &str, partition: i32) {
        let mut inner = self.lock();
        inner.next_epoch += 1;
        let epoch = inner.next_epoch;
        inner.partitions.insert(
            (topic.to_owned(), partition),
            Partition {
                epoch,
                marker: OffsetMarker::default(),
                stored: None,
                last_read: None,
            },
        );
    }

    /// A partition was revoked: forgets it and returns the offset to commit
    /// for it, if any message of it is done. Completions of its messages
    /// still in flight are ignored from now on (their epoch is gone); the
    /// partition's next owner reads them again.
    pub fn revoke(&self, topic: &str, partition: i32) -> Option<i64> {
        let mut inner = self.lock();
        inner
            .partitions
            .remove(&(topic.to_owned(), partition))
            .and_then(|p| p.marker.next_to_commit())
    }

    /// Tracks a message just read; returns the epoch to carry with it and
    /// how many offsets were skipped since the previous message of the
    /// partition (0 normally; compaction or transaction markers make gaps
    /// legitimately, a broker that fetches wrongly makes them too).
    pub fn track(&self, topic: &str, partition: i32, offset: i64) -> (u64, i64) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let key = (topic.to_owned(), partition);
        if !inner.partitions.contains_key(&key) {
            // Read before its assignment was seen (not expected): track it
            // under a new epoch anyway.
            inner.next_epoch += 1;
            let epoch = inner.next_epoch;
            inner.partitions.insert(
                key.clone(),
                Partition {
                    epoch,
                    marker: OffsetMarker::default(),
                    stored: None,
                    last_read: None,
                },
            );
        }
        let entry = inner.partitions.get_mut(&key).expect("inserted above");
        entry.marker.track(offset);
        let gap = match entry.last_read {
            Some(last) if offset > last + 1 => offset - last - 1,
            _ => 0,
        };
        entry.last_read = Some(offset);
        (entry.epoch, gap)
    }

    /// The message at `source` is in ClickHouse or the dead-letter topic.
    pub fn done(&self, source: &Source) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let mut inner = self.lock();
        if let Some(partition) = inner
            .partitions
            .get_mut(&(source.topic.clone(), source.partition))
        {
            if partition.epoch == source.epoch {
                partition.marker.mark_done(source.offset);
            }
        }
    }

    /// A message that will not be finished by this process (given up at
    /// shutdown): it only leaves the in-flight count.
    pub fn abandon(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Messages read and not yet done.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// `(topic, partition, next offset)` of every partition whose
    /// committable offset moved since the last call.
    pub fn to_store(&self) -> Vec<(String, i32, i64)> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for ((topic, partition), state) in inner.partitions.iter_mut() {
            if let Some(next) = state.marker.next_to_commit() {
                if state.stored != Some(next) {
                    state.stored = Some(next);
                    out.push((topic.clone(), *partition, next));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(offset: i64, epoch: u64) -> Source {
        Source {
            topic: "t".into(),
            partition: 0,
            offset,
            epoch,
        }
    }

    #[test]
    fn only_changes_are_stored_and_old_epochs_are_ignored() {
        let offsets = Offsets::default();
        offsets.assign("t", 0);
        let (epoch, _) = offsets.track("t", 0, 0);
        offsets.track("t", 0, 1);
        offsets.done(&source(1, epoch));
        assert!(offsets.to_store().is_empty());
        offsets.done(&source(0, epoch));
        assert_eq!(offsets.to_store(), vec![("t".into(), 0, 2)]);
        assert!(offsets.to_store().is_empty(), "nothing new");
        assert_eq!(offsets.in_flight(), 0);

        let (late, _) = offsets.track("t", 0, 2);
        assert_eq!(offsets.revoke("t", 0), Some(2));
        offsets.assign("t", 0);
        let (fresh, _) = offsets.track("t", 0, 2);
        assert_ne!(late, fresh);
        offsets.done(&source(2, late));
        assert!(
            offsets.to_store().is_empty(),
            "a completion of the old assignment"
        );
        offsets.done(&source(2, fresh));
        assert_eq!(offsets.to_store(), vec![("t".into(), 0, 3)]);
    }

    #[test]
    fn skipped_offsets_are_reported() {
        let offsets = Offsets::default();
        offsets.assign("t", 0);
        assert_eq!(
            offsets.track("t", 0, 5).1,
            0,
            "the first read has no predecessor"
        );
        assert_eq!(offsets.track("t", 0, 6).1, 0);
        assert_eq!(offsets.track("t", 0, 10).1, 3);
        offsets.assign("t", 0);
        assert_eq!(
            offsets.track("t", 0, 100).1,
            0,
            "a new assignment starts anew"
        );
    }
}
