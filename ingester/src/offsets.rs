//! The offset markers of every assigned partition, shared by the poll
//! thread (which tracks what it reads, stores offsets and commits on
//! revoke) and the writer and dead-letter paths (which mark messages done).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

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

/// The partitions of one topic, by number.
type Topic = HashMap<i32, Partition>;

#[derive(Default)]
struct Inner {
    /// By topic, then partition: found by `&str` without building a key.
    topics: HashMap<Arc<str>, Topic>,
    next_epoch: u64,
}

impl Inner {
    fn partition(&mut self, topic: &str, partition: i32) -> Option<&mut Partition> {
        self.topics.get_mut(topic)?.get_mut(&partition)
    }

    /// A fresh marker for `topic`/`partition` under a new epoch.
    fn start(&mut self, topic: &str, partition: i32) -> &mut Partition {
        self.next_epoch += 1;
        // An assignment, not a message: the key's allocation is fine here.
        self.topics
            .entry(Arc::from(topic))
            .or_default()
            .entry(partition)
            .insert_entry(Partition {
                epoch: self.next_epoch,
                marker: OffsetMarker::default(),
                stored: None,
                last_read: None,
            })
            .into_mut()
    }
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
        self.lock().start(topic, partition);
    }

    /// Whether `source` was read under the current assignment of its
    /// partition (not one revoked since).
    pub fn is_current(&self, source: &Source) -> bool {
        self.lock()
            .partition(&source.topic, source.partition)
            .is_some_and(|p| p.epoch == source.epoch)
    }

    /// Messages of `topic`/`partition` read and not yet done.
    pub fn pending(&self, topic: &str, partition: i32) -> usize {
        self.lock()
            .partition(topic, partition)
            .map_or(0, |p| p.marker.pending())
    }

    /// Whether `topic`/`partition` is assigned to this instance now.
    pub fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        self.lock().partition(topic, partition).is_some()
    }

    /// A partition was revoked: forgets it and returns the offset to commit
    /// for it, if any message of it is done. Completions of its messages
    /// still in flight are ignored from now on (their epoch is gone); the
    /// partition's next owner reads them again.
    pub fn revoke(&self, topic: &str, partition: i32) -> Option<i64> {
        let mut inner = self.lock();
        inner
            .topics
            .get_mut(topic)?
            .remove(&partition)
            .and_then(|p| p.marker.next_to_commit())
    }

    /// Tracks a message just read; returns the epoch to carry with it and
    /// how many offsets were skipped since the previous message of the
    /// partition (0 normally; compaction or transaction markers make gaps
    /// legitimately, a broker that fetches wrongly makes them too).
    pub fn track(&self, topic: &str, partition: i32, offset: i64) -> (u64, i64) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        if inner.partition(topic, partition).is_none() {
            // Read before its assignment was seen (not expected): track it
            // under a new epoch anyway.
            inner.start(topic, partition);
        }
        let entry = inner.partition(topic, partition).expect("started above");
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
        self.done_all([source]);
    }

    /// Every message at `sources` is in ClickHouse or the dead-letter topic
    /// (one lock for a whole batch).
    pub fn done_all<'a>(&self, sources: impl IntoIterator<Item = &'a Source>) {
        let mut inner = self.lock();
        let mut count = 0;
        for source in sources {
            count += 1;
            if let Some(partition) = inner.partition(&source.topic, source.partition) {
                if partition.epoch == source.epoch {
                    partition.marker.mark_done(source.offset);
                }
            }
        }
        self.in_flight.fetch_sub(count, Ordering::Relaxed);
    }

    /// A message that will not be finished by this process (given up at
    /// shutdown): it only leaves the in-flight count.
    pub fn abandon(&self) {
        self.abandon_many(1);
    }

    /// `count` messages that will not be finished by this process.
    pub fn abandon_many(&self, count: usize) {
        self.in_flight.fetch_sub(count as i64, Ordering::Relaxed);
    }

    /// Messages read and not yet done.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// `(topic, partition, next offset)` of every partition whose
    /// committable offset moved since the last call.
    pub fn to_store(&self) -> Vec<(Arc<str>, i32, i64)> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for (topic, partitions) in inner.topics.iter_mut() {
            for (partition, state) in partitions.iter_mut() {
                if let Some(next) = state.marker.next_to_commit() {
                    if state.stored != Some(next) {
                        state.stored = Some(next);
                        out.push((topic.clone(), *partition, next));
                    }
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

    #[test]
    fn a_batch_done_at_once_moves_each_partition_and_the_count() {
        let offsets = Offsets::default();
        offsets.assign("a", 0);
        offsets.assign("b", 1);
        let mut sources = Vec::new();
        for offset in 0..3 {
            for (topic, partition) in [("a", 0), ("b", 1)] {
                let (epoch, _) = offsets.track(topic, partition, offset);
                sources.push(Source {
                    topic: topic.into(),
                    partition,
                    offset,
                    epoch,
                });
            }
        }
        offsets.track("a", 0, 3);
        assert_eq!(offsets.in_flight(), 7);
        offsets.done_all(&sources);
        assert_eq!(offsets.in_flight(), 1, "a/0 offset 3 is still in flight");
        let mut stored = offsets.to_store();
        stored.sort();
        assert_eq!(stored, vec![("a".into(), 0, 3), ("b".into(), 1, 3)]);
    }
}
