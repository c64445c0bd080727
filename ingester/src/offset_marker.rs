//! Which offset of a partition may be committed: the highest one whose every
//! earlier message (of those read) is done, as Jaeger's offset manager does.
//!
//! Messages of one partition complete out of order (a poison message goes to
//! the dead-letter topic while the rows before it wait for their batch, a
//! batch is split after a rejection). Committing the highest completed offset
//! would skip unfinished ones after a crash; committing only the contiguous
//! prefix never does. Kafka offsets can have gaps (compaction, transaction
//! markers), so "contiguous" means "every offset read", not "every integer".

use std::collections::VecDeque;

/// The marker of one partition.
///
/// A partition is read in offset order, so tracking appends to a queue
/// sorted by offset; completing finds its entry by binary search and pops
/// the done prefix. Per message that is no allocation (the queue's ring is
/// reused) and O(log n) work, where an ordered map allocated a node each.
#[derive(Debug, Default)]
pub struct OffsetMarker {
    /// Offsets read and not yet committable, ascending, with whether they
    /// are done.
    in_flight: VecDeque<(i64, bool)>,
    /// The last offset of the contiguous done prefix.
    last_done: Option<i64>,
}

impl OffsetMarker {
    /// Records that `offset` was read and is being processed. Tracking an
    /// offset already tracked changes nothing.
    pub fn track(&mut self, offset: i64) {
        match self.in_flight.back() {
            None => self.in_flight.push_back((offset, false)),
            Some(&(last, _)) if offset > last => self.in_flight.push_back((offset, false)),
            // Read out of order (a seek back): kept in its place.
            Some(_) => {
                if let Err(at) = self.find(offset) {
                    self.in_flight.insert(at, (offset, false));
                }
            }
        }
    }

    fn find(&self, offset: i64) -> Result<usize, usize> {
        self.in_flight.binary_search_by_key(&offset, |&(o, _)| o)
    }

    /// Records that `offset` is in ClickHouse or in the dead-letter topic.
    /// Offsets never tracked are ignored.
    pub fn mark_done(&mut self, offset: i64) {
        if let Ok(at) = self.find(offset) {
            self.in_flight[at].1 = true;
        }
        while let Some(&(offset, true)) = self.in_flight.front() {
            self.in_flight.pop_front();
            // A message read again after its offset was committed never
            // moves the commit backwards.
            self.last_done = Some(self.last_done.map_or(offset, |last| last.max(offset)));
        }
    }

    /// The last offset whose every predecessor is done, if any.
    pub fn last_done(&self) -> Option<i64> {
        self.last_done
    }

    /// The offset to store for a commit: the *next* message to read, i.e.
    /// `last_done + 1`, as `rd_kafka_offsets_store` (and so
    /// `Consumer::store_offsets`) takes it verbatim.
    pub fn next_to_commit(&self) -> Option<i64> {
        self.last_done.map(|offset| offset + 1)
    }

    /// Messages read and not yet done.
    pub fn pending(&self) -> usize {
        self.in_flight.iter().filter(|(_, done)| !*done).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_committable_before_the_first_message_is_done() {
        let mut marker = OffsetMarker::default();
        marker.track(5);
        marker.track(6);
        assert_eq!(marker.next_to_commit(), None);
        marker.mark_done(6);
        assert_eq!(marker.next_to_commit(), None, "5 is not done yet");
        marker.mark_done(5);
        assert_eq!(marker.last_done(), Some(6));
        assert_eq!(marker.next_to_commit(), Some(7));
    }

    #[test]
    fn out_of_order_completions_commit_only_the_contiguous_prefix() {
        let mut marker = OffsetMarker::default();
        for offset in 0..10 {
            marker.track(offset);
        }
        for offset in [3, 1, 0, 7, 8, 9] {
            marker.mark_done(offset);
        }
        assert_eq!(marker.last_done(), Some(1), "2 is still pending");
        assert_eq!(marker.next_to_commit(), Some(2));
        assert_eq!(marker.pending(), 4, "2, 4, 5 and 6");
        marker.mark_done(2);
        assert_eq!(marker.next_to_commit(), Some(4), "4 is still pending");
        marker.mark_done(5);
        marker.mark_done(6);
        assert_eq!(marker.next_to_commit(), Some(4));
        marker.mark_done(4);
        assert_eq!(marker.next_to_commit(), Some(10));
        assert_eq!(marker.pending(), 0);
    }

    #[test]
    fn gaps_between_offsets_do_not_block_the_commit() {
        let mut marker = OffsetMarker::default();
        for offset in [10, 12, 20] {
            marker.track(offset);
        }
        marker.mark_done(20);
        marker.mark_done(10);
        assert_eq!(marker.next_to_commit(), Some(11));
        marker.mark_done(12);
        assert_eq!(marker.next_to_commit(), Some(21));
    }

    #[test]
    fn untracked_and_repeated_completions_change_nothing() {
        let mut marker = OffsetMarker::default();
        marker.track(1);
        marker.mark_done(0);
        marker.mark_done(2);
        assert_eq!(marker.next_to_commit(), None);
        marker.mark_done(1);
        marker.mark_done(1);
        assert_eq!(marker.next_to_commit(), Some(2));
        // A message read again after it was committed (a re-delivery) is
        // tracked anew and does not move the commit backwards.
        marker.track(3);
        marker.mark_done(3);
        assert_eq!(marker.next_to_commit(), Some(4));
        marker.track(0);
        marker.track(0);
        marker.mark_done(0);
        assert_eq!(marker.next_to_commit(), Some(4));
        assert_eq!(marker.pending(), 0);
    }

    #[test]
    fn an_offset_read_out_of_order_is_kept_in_its_place() {
        let mut marker = OffsetMarker::default();
        for offset in [5, 9, 7, 6] {
            marker.track(offset);
        }
        assert_eq!(marker.pending(), 4);
        for offset in [5, 6, 9] {
            marker.mark_done(offset);
        }
        assert_eq!(marker.next_to_commit(), Some(7), "7 is still pending");
        marker.mark_done(7);
        assert_eq!(marker.next_to_commit(), Some(10));
    }
}
