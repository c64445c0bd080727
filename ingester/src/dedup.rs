//! Which rows of a batch are in ClickHouse already, so that a message read
//! again is never a second row, with or without `FINAL`.
//!
//! A message is read again after a crash (what was inserted but not yet
//! committed), after a rebalance (what the partition's previous owner
//! inserted past its last commit), and after an insert whose answer was lost
//! (a timeout after ClickHouse took the rows). Only those messages can be in
//! the table already: the *suspects*. `marks` says which they are (the
//! offsets up to the partition's mark, written before any insert beyond
//! it), and the writer treats every row of an attempt whose answer was lost
//! as one. For the suspects alone the writer asks ClickHouse which are
//! there, by the table's identity, (`category`, UTC day of `upload_time`,
//! `app_id`, `event_id`): the sorting key, so the question reads the
//! granules of those events, not the table. Present rows are taken out of
//! the batch as done; the rest are inserted.
//!
//! Why this and not ClickHouse's insert deduplication: block deduplication
//! needs a Replicated table (or `non_replicated_deduplication_window`, and
//! `insert_deduplication_token`, which 18.16 lacks), and works only when the
//! re-sent block is byte-identical: a batch re-formed after a crash from a
//! different mix of partitions is not. Asking works on every server and for
//! any mix, and a batch spread over two monthly partitions (two parts, not
//! one atomic insert) is handled row by row. docs/INGESTER.md has the
//! trade-offs and the measured cost.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write;

use serde::Deserialize;

use crate::batch::{PendingRow, Rows};
use crate::row::Layout;

/// An event's identity in the table (its sorting key).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct Identity {
    pub category: String,
    /// `YYYY-MM-DD`, the UTC day of `upload_time`.
    pub day: String,
    pub app_id: String,
    pub event_id: String,
}

/// The leading columns of a row, read back from its `RowBinary` bytes (the
/// order of `row::COLUMNS`: `backend_id`, `app_id`, `category`, `event_id`,
/// `upload_time`).
#[derive(Debug, PartialEq, Eq)]
pub struct RowHead<'a> {
    pub backend_id: uuid::Uuid,
    pub app_id: &'a str,
    pub category: &'a str,
    pub event_id: &'a str,
    pub upload_time: u32,
}

impl RowHead<'_> {
    pub fn identity(&self) -> Identity {
        Identity {
            category: self.category.to_owned(),
            day: utc_day(self.upload_time),
            app_id: self.app_id.to_owned(),
            event_id: self.event_id.to_owned(),
        }
    }
}

/// `YYYY-MM-DD` of the UTC day of `seconds` since the epoch (the civil
/// calendar from a day count, after Howard Hinnant's `civil_from_days`).
pub fn utc_day(seconds: u32) -> String {
    let days = i64::from(seconds / 86_400) + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Reads a LEB128-prefixed string at `*at`.
fn string<'a>(bytes: &'a [u8], at: &mut usize) -> Option<&'a str> {
    let mut length = 0usize;
    let mut shift = 0;
    loop {
        let byte = *bytes.get(*at)?;
        *at += 1;
        length |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
    let text = bytes.get(*at..*at + length)?;
    *at += length;
    std::str::from_utf8(text).ok()
}

/// The head of a row written by `row::write_row` in `layout`.
pub fn row_head(row: &[u8], layout: Layout) -> Option<RowHead<'_>> {
    let high = u64::from_le_bytes(row.get(0..8)?.try_into().ok()?);
    let low = u64::from_le_bytes(row.get(8..16)?.try_into().ok()?);
    let mut at = 16;
    let app_id = string(row, &mut at)?;
    let category = string(row, &mut at)?;
    let event_id = string(row, &mut at)?;
    let upload_time = match layout {
        Layout::Classic => u32::from_le_bytes(row.get(at..at + 4)?.try_into().ok()?),
        Layout::Current => {
            let ms = i64::from_le_bytes(row.get(at..at + 8)?.try_into().ok()?);
            u32::try_from(ms.div_euclid(1000)).unwrap_or(u32::MAX)
        }
    };
    Some(RowHead {
        backend_id: uuid::Uuid::from_u64_pair(high, low),
        app_id,
        category,
        event_id,
        upload_time,
    })
}

/// `text` as a ClickHouse string literal.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        match c {
            '\'' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Longest text of one lookup: ClickHouse refuses queries over
/// `max_query_size` (256 KiB by default), and 10,000 suspects with UUID ids
/// are more than twice that.
pub const MAX_LOOKUP_BYTES: usize = 128 * 1024;

/// The questions for the rows of `rows` marked in `suspects`: which of
/// their identities are in `database.table`, in as many queries as keep
/// each under [`MAX_LOOKUP_BYTES`]. Empty when there is nothing to ask.
pub fn presence_sql(
    database: &str,
    table: &str,
    rows: &Rows,
    suspects: &[bool],
    layout: Layout,
) -> Vec<String> {
    let mut categories = BTreeSet::new();
    let mut days = BTreeSet::new();
    let mut pairs = BTreeSet::new();
    for (row, suspect) in rows.rows.iter().zip(suspects) {
        if !suspect {
            continue;
        }
        let Some(head) = row_head(rows.row_bytes(row), layout) else {
            continue;
        };
        categories.insert(head.category);
        days.insert(utc_day(head.upload_time));
        pairs.insert((head.app_id, head.event_id));
    }
    if pairs.is_empty() {
        return Vec::new();
    }
    let list = |items: &mut dyn Iterator<Item = String>| items.collect::<Vec<_>>().join(", ");
    let head = format!(
        "SELECT category, toString(toDate(upload_time, 'UTC')) AS day, app_id, event_id FROM {database}.{table} WHERE category IN ({}) AND toDate(upload_time, 'UTC') IN ({}) AND (app_id, event_id) IN (",
        list(&mut categories.iter().map(|c| quote(c))),
        list(&mut days.iter().map(|d| format!("toDate('{d}')"))),
    );
    const TAIL: &str = ") FORMAT JSONEachRow";
    let mut queries = Vec::new();
    let mut sql = head.clone();
    let mut in_this = 0;
    for (app_id, event_id) in &pairs {
        let pair = format!("({}, {})", quote(app_id), quote(event_id));
        if in_this > 0 && sql.len() + 2 + pair.len() + TAIL.len() > MAX_LOOKUP_BYTES {
            sql.push_str(TAIL);
            queries.push(std::mem::replace(&mut sql, head.clone()));
            in_this = 0;
        }
        if in_this > 0 {
            sql.push_str(", ");
        }
        let _ = write!(sql, "{pair}");
        in_this += 1;
    }
    sql.push_str(TAIL);
    queries.push(sql);
    queries
}

/// The identities in ClickHouse's answer to [`presence_sql`].
pub fn parse_present(answer: &str) -> HashSet<Identity> {
    answer
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Whether `row` of `rows` is among `present`.
pub fn is_present(
    rows: &Rows,
    row: &PendingRow,
    present: &HashSet<Identity>,
    layout: Layout,
) -> bool {
    row_head(rows.row_bytes(row), layout).is_some_and(|head| present.contains(&head.identity()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Batch, Limits};
    use crate::record::{Record, Source};
    use opentelemetry::trace::SpanContext;
    use std::time::Duration;

    fn message(category: &str, id: &str, upload_ms: u64) -> String {
        format!(
            r#"{{"backend_id":"0190a0a0-0000-7000-8000-000000000001","upload_time":{upload_ms},"ip":"","meta":{{"app_id":"a","category":"{category}"}},"data":{{"id":"{id}"}}}}"#
        )
    }

    fn rows(messages: &[String]) -> Rows {
        rows_in(messages, Layout::Classic)
    }

    fn rows_in(messages: &[String], layout: Layout) -> Rows {
        let mut batch = Batch::new(Limits {
            rows: 100,
            bytes: 1 << 20,
            interval: Duration::from_secs(1),
        });
        for (offset, value) in messages.iter().enumerate() {
            let source = Source {
                topic: "t".into(),
                partition: 0,
                offset: offset as i64,
                epoch: 1,
            };
            let record = Record::new(source, value.as_bytes(), None, std::iter::empty());
            batch
                .push_with(record, SpanContext::empty_context(), |out, record| {
                    crate::row::write_row(out, record, 0, layout)
                })
                .unwrap();
        }
        batch.take()
    }

    #[test]
    fn utc_days_are_the_civil_calendars() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(1_700_000_000), "2023-11-14");
        assert_eq!(utc_day(951_782_400), "2000-02-29");
        assert_eq!(utc_day(1_709_164_799), "2024-02-28");
        assert_eq!(utc_day(1_709_251_199), "2024-02-29");
        assert_eq!(utc_day(u32::MAX), "2106-02-07");
    }

    #[test]
    fn the_head_of_a_written_row_reads_back() {
        let rows = rows(&[message("page's", "e\\t1", 1_700_000_000_123)]);
        let head = row_head(rows.row_bytes(&rows.rows[0]), Layout::Classic).unwrap();
        let current = rows_in(
            &[message("page's", "e\\t1", 1_700_000_000_123)],
            Layout::Current,
        );
        assert_eq!(
            row_head(current.row_bytes(&current.rows[0]), Layout::Current),
            Some(RowHead { ..head })
        );
        assert_eq!(
            head.backend_id.to_string(),
            "0190a0a0-0000-7000-8000-000000000001"
        );
        assert_eq!(head.app_id, "a");
        assert_eq!(head.category, "page's");
        assert_eq!(head.event_id, "e\t1");
        assert_eq!(head.upload_time, 1_700_000_000);
    }

    #[test]
    fn only_suspects_are_asked_for_by_the_sorting_key() {
        let rows = rows(&[
            message("a", "e1", 1_700_000_000_000),
            message("b'x", "e2", 1_700_100_000_000),
            message("c", "e3", 1_700_000_000_000),
        ]);
        assert!(presence_sql(
            "venus",
            "events",
            &rows,
            &[false, false, false],
            Layout::Classic
        )
        .is_empty());
        let sql = presence_sql(
            "venus",
            "events",
            &rows,
            &[true, true, false],
            Layout::Classic,
        );
        assert_eq!(sql.len(), 1);
        let sql = &sql[0];
        assert!(sql.contains("FROM venus.events WHERE category IN ('a', 'b\\'x') AND toDate(upload_time, 'UTC') IN (toDate('2023-11-14'), toDate('2023-11-16'))"), "{sql}");
        assert!(
            sql.contains("(app_id, event_id) IN (('a', 'e1'), ('a', 'e2'))"),
            "{sql}"
        );
        assert!(!sql.contains("'e3'"), "{sql}");
    }

    #[test]
    fn many_suspects_are_asked_for_in_queries_clickhouse_takes() {
        let messages: Vec<String> = (0..10_000)
            .map(|i| {
                message(
                    "page_view",
                    &format!("{}", uuid::Uuid::from_u128(i)),
                    1_700_000_000_000,
                )
            })
            .collect();
        let rows = rows(&messages);
        let sql = presence_sql(
            "venus",
            "events",
            &rows,
            &vec![true; 10_000],
            Layout::Classic,
        );
        assert!(sql.len() >= 4, "{} queries", sql.len());
        let mut asked = 0;
        for query in &sql {
            assert!(query.len() <= MAX_LOOKUP_BYTES, "{}", query.len());
            assert!(query.ends_with(") FORMAT JSONEachRow"));
            asked += query.matches("('a', '").count();
        }
        assert_eq!(asked, 10_000, "every suspect asked for once");
    }

    #[test]
    fn a_row_is_present_when_its_identity_is_that_day() {
        let rows = rows(&[
            message("a", "e1", 1_700_000_000_000),
            message("a", "e2", 1_700_000_000_000),
            message("a", "e3", 1_700_000_000_000),
        ]);
        let answer = concat!(
            r#"{"category":"a","day":"2023-11-14","app_id":"a","event_id":"e1"}"#,
            "\n",
            r#"{"category":"a","day":"2023-11-15","app_id":"a","event_id":"e2"}"#,
            "\n"
        );
        let present = parse_present(answer);
        let found: Vec<bool> = rows
            .rows
            .iter()
            .map(|row| is_present(&rows, row, &present, Layout::Classic))
            .collect();
        // e2 is there on another day: another event.
        assert_eq!(found, vec![true, false, false]);
    }
}
