//! The marks: per consumer group and partition, an offset beyond which no
//! message has been inserted, written to ClickHouse (`<table>_marks`)
//! *before* any insert beyond it. Whoever reads the partition next (this
//! instance after a restart, another after a rebalance) reads the mark
//! first: the messages up to it may be in the table already (the
//! suspects, checked by [`crate::dedup`]); the messages past it cannot be,
//! and are inserted without asking.
//!
//! A mark is written ahead by `reserve` offsets, so that one small insert
//! into the marks table covers many batches. The mark is read once per
//! assignment of a partition (an epoch), before this instance writes any
//! mark of that epoch, under one lock shared by the writers.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::batch::Rows;
use crate::clickhouse::{ClickHouse, InsertError};

/// A partition: its topic and number.
type Partition = (Arc<str>, i32);

#[derive(Debug, Clone, Copy)]
struct Mark {
    epoch: u64,
    /// The mark found when this epoch began: offsets up to it are suspects.
    found: Option<i64>,
    /// The mark written since (offsets up to it may be inserted now).
    written: Option<i64>,
}

/// The marks of the partitions this instance writes, shared by the writers.
#[derive(Clone)]
pub struct Marks {
    group: Arc<str>,
    reserve: i64,
    partitions: Arc<Mutex<HashMap<Partition, Mark>>>,
}

impl Marks {
    pub fn new(group: &str, reserve: i64) -> Self {
        Self {
            group: group.into(),
            reserve: reserve.max(1),
            partitions: Default::default(),
        }
    }

    /// Makes sure the marks cover every row of `rows` (reading a
    /// partition's mark first when its epoch is new, writing marks ahead
    /// when the rows go past them) and returns which rows are suspects:
    /// at or below the mark found when their epoch began.
    pub async fn cover(
        &self,
        clickhouse: &ClickHouse,
        rows: &Rows,
    ) -> Result<Vec<bool>, InsertError> {
        let mut partitions = self.partitions.lock().await;
        // The highest offset of each partition of the batch.
        let mut highest: HashMap<Partition, (u64, i64)> = HashMap::new();
        for row in &rows.rows {
            let source = &row.record.source;
            let entry = highest
                .entry((source.topic.clone(), source.partition))
                .or_insert((source.epoch, source.offset));
            entry.1 = entry.1.max(source.offset);
        }
        let mut to_write = Vec::new();
        for ((topic, partition), (epoch, high)) in &highest {
            let key = (topic.clone(), *partition);
            let mark = match partitions.get(&key) {
                Some(mark) if mark.epoch == *epoch => *mark,
                _ => {
                    let found = clickhouse.read_mark(&self.group, topic, *partition).await?;
                    let mark = Mark {
                        epoch: *epoch,
                        found,
                        written: found,
                    };
                    partitions.insert(key.clone(), mark);
                    mark
                }
            };
            if mark.written.is_none_or(|written| written < *high) {
                to_write.push((key, *high + self.reserve));
            }
        }
        if !to_write.is_empty() {
            let marks: Vec<(&str, i32, i64)> = to_write
                .iter()
                .map(|((topic, partition), high)| (&**topic, *partition, *high))
                .collect();
            clickhouse.write_marks(&self.group, &marks).await?;
            for (key, high) in to_write {
                if let Some(mark) = partitions.get_mut(&key) {
                    mark.written = Some(high);
                }
            }
        }
        Ok(rows
            .rows
            .iter()
            .map(|row| {
                let source = &row.record.source;
                partitions
                    .get(&(source.topic.clone(), source.partition))
                    .and_then(|mark| mark.found)
                    .is_some_and(|found| source.offset <= found)
            })
            .collect())
    }
}
