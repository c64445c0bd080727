//! One Kafka message of the gateway into one ClickHouse row, in
//! ClickHouse's `RowBinary` format, or the reason it can never be one.
//!
//! The message value is `{"backend_id","upload_time","ip","country",
//! "region","city","meta","data"}` as the gateway's `pipeline::write_kafka`
//! writes it (the contract is `venus_shared::message`); `meta` and `data`
//! are stored exactly as they are in the message. Times are written as the
//! table stores them ([`Layout`]): epoch seconds for 18.16's `DateTime` (a
//! `UInt32`, the same on every server whatever its time zone), epoch
//! milliseconds for a current server's `DateTime64(3)`; the milliseconds
//! are in a column of their own as well, in both layouts.
//!
//! Why `RowBinary` and not `JSONEachRow`: both work the same on 18.16 and
//! on current servers, but JSON makes each side do the expensive part
//! twice over. The ingester had to escape `meta` and `data` (most of a row)
//! into JSON strings and ClickHouse had to unescape them again; in
//! `RowBinary` a string is its length and its bytes, copied as they are.
//! ClickHouse's CPU per inserted row fell by a third to a half, and the
//! ingester's cost of writing one by more (docs/BENCHMARKS.md). The layout is
//! ClickHouse's documented wire format: strings as LEB128 length and bytes,
//! integers little-endian, `UUID` as its two 64-bit halves each
//! little-endian, `Nullable` as a null byte then the value.

use serde::Deserialize;
use sonic_rs::{JsonValueTrait, LazyValue};

use crate::record::Record;

/// The message value as the gateway writes it.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    backend_id: std::borrow::Cow<'a, str>,
    upload_time: u64,
    #[serde(borrow)]
    ip: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    country: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    region: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    city: std::borrow::Cow<'a, str>,
    /// Kept as their text (sonic-rs checks it is JSON while skipping it).
    #[serde(borrow)]
    meta: LazyValue<'a>,
    #[serde(borrow)]
    data: LazyValue<'a>,
}

/// Field `key` of the object `value` when it is a string. `get` reads the
/// text that parsing the message already checked: no second validation,
/// and only as far as the key.
fn string_field<'v>(
    value: &'v LazyValue<'_>,
    key: &str,
    poison: fn(String) -> Poison,
) -> Result<LazyValue<'v>, Poison> {
    match value.get(key) {
        Some(field) if field.is_str() => Ok(field),
        Some(_) => Err(poison(format!("{key} is not a string"))),
        None => Err(poison(format!("no {key}"))),
    }
}

/// The events table's columns and their types in the classic layout, in
/// the order [`write_row`] writes them; the DDL and the insert's column
/// list are made from it ([`Layout::columns`] for the current layout).
pub const COLUMNS: &[(&str, &str)] = &[
    ("backend_id", "UUID"),
    ("app_id", "String"),
    ("category", "String"),
    ("event_id", "String"),
    ("upload_time", "DateTime"),
    ("upload_time_ms", "UInt64"),
    ("client_time", "Nullable(DateTime)"),
    ("client_time_ms", "Nullable(UInt64)"),
    ("ip", "String"),
    ("country", "String"),
    ("region", "String"),
    ("city", "String"),
    ("meta", "String"),
    ("data", "String"),
    ("request_id", "String"),
    ("trace_id", "String"),
    ("kafka_topic", "String"),
    ("kafka_partition", "Int32"),
    ("kafka_offset", "Int64"),
    ("ingested_at", "DateTime"),
];

/// How a table stores what a row carries. The writer encodes each row the
/// way the table it inserts into stores it (read from `system.columns`),
/// whatever version made that table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// ClickHouse 18.16's types: `DateTime` (seconds) for the times, plain
    /// `String` everywhere; also the tables earlier versions made.
    #[default]
    Classic,
    /// Current servers' (20.3 and later): `DateTime64(3, 'UTC')` for
    /// `upload_time` and `client_time` (milliseconds, no second column
    /// needed, though `upload_time_ms` and `client_time_ms` stay so that
    /// queries work on both), and `LowCardinality(String)` for the columns
    /// with a few thousand values at most (app, category, location).
    Current,
}

impl Layout {
    /// The layout a new table gets on a server of `version`.
    pub fn for_version(version: Option<(u32, u32)>) -> Self {
        match version {
            Some(version) if version >= (20, 3) => Self::Current,
            _ => Self::Classic,
        }
    }

    /// The layout of a table whose `upload_time` has the type `kind`.
    pub fn of_upload_time(kind: &str) -> Self {
        if kind.starts_with("DateTime64") {
            Self::Current
        } else {
            Self::Classic
        }
    }

    /// The columns and their types in this layout, in the order
    /// [`write_row`] writes them.
    pub fn columns(self) -> Vec<(&'static str, &'static str)> {
        COLUMNS
            .iter()
            .map(|&(name, kind)| {
                let kind = match (self, name) {
                    (Self::Classic, _) => kind,
                    (_, "upload_time") => "DateTime64(3, 'UTC')",
                    (_, "client_time") => "Nullable(DateTime64(3, 'UTC'))",
                    (_, "app_id" | "category" | "country" | "region" | "city") => {
                        "LowCardinality(String)"
                    }
                    _ => kind,
                };
                (name, kind)
            })
            .collect()
    }
}

/// How deep a message value may nest: the gateway's limit for a whole
/// batch document (the message contract's).
const MAX_NESTING: usize = venus_shared::message::MAX_NESTING;

/// Appends values in `RowBinary`.
struct RowBinary<'a>(&'a mut Vec<u8>);

impl RowBinary<'_> {
    fn string(&mut self, text: &str) {
        let mut length = text.len();
        // The length as unsigned LEB128: 7 bits a byte, low bits first.
        while length >= 0x80 {
            self.0.push(length as u8 | 0x80);
            length >>= 7;
        }
        self.0.push(length as u8);
        self.0.extend_from_slice(text.as_bytes());
    }

    fn uuid(&mut self, uuid: uuid::Uuid) {
        let (high, low) = uuid.as_u64_pair();
        self.0.extend_from_slice(&high.to_le_bytes());
        self.0.extend_from_slice(&low.to_le_bytes());
    }

    fn u32(&mut self, value: u32) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn i64(&mut self, value: i64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn nullable<T>(&mut self, value: Option<T>, write: impl FnOnce(&mut Self, T)) {
        match value {
            None => self.0.push(1),
            Some(value) => {
                self.0.push(0);
                write(self, value);
            }
        }
    }
}

/// A `DateTime` of epoch seconds: `UInt32`, capped at its largest value.
fn datetime(seconds: u64) -> u32 {
    u32::try_from(seconds).unwrap_or(u32::MAX)
}

/// Why a message can never become a row (the dead-letter `reason`).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Poison {
    #[error("message value is not JSON of the gateway's shape: {0}")]
    Shape(String),
    #[error("meta is not an object with string app_id and category: {0}")]
    Meta(String),
    #[error("data is not an object with an integer timestamp (if any): {0}")]
    Data(String),
    #[error("backend_id {0:?} is not a UUID")]
    BackendId(String),
}

/// The trace id of a W3C `traceparent`, or empty.
pub fn trace_id(traceparent: Option<&str>) -> &str {
    traceparent
        .and_then(|tp| tp.split('-').nth(1))
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or("")
}

/// What a row is made of, read from one message.
struct Fields<'a> {
    backend_id: uuid::Uuid,
    upload_time: u64,
    ip: &'a str,
    country: &'a str,
    region: &'a str,
    city: &'a str,
    app_id: &'a str,
    category: &'a str,
    event_id: &'a str,
    /// `data.timestamp`, the client's time in epoch milliseconds.
    timestamp: Option<u64>,
    /// `meta` and `data` as they are in the message.
    meta: &'a str,
    data: &'a str,
}

/// Appends the row of `record` in `RowBinary` to `out`, or says why the
/// message can never be inserted. `out` is left as it was on error.
///
/// Two ways to read a message, one result. A message as the gateway writes
/// it (every field where it should be, no escape in a key or in the strings
/// a row takes apart) is read by [`fast_fields`]: one validating pass that
/// also finds the fields. Anything else, poison included, goes to
/// [`parsed_fields`], a parse by sonic-rs, which decides what the row or
/// the poison is. The fast way never decides a message is poison, so what
/// is poison and why is the parser's answer alone; a test feeds both ways
/// mutated messages and requires the same bytes wherever the fast way
/// answers. One validating pass where a scan and the parse were two took a
/// third off writing a row (docs/BENCHMARKS.md, "Issue 33: the ingester
/// reads a message in one pass").
pub fn write_row(
    out: &mut Vec<u8>,
    record: &Record,
    ingested_at: u64,
    layout: Layout,
) -> Result<(), Poison> {
    // JSON text is UTF-8; checking it whole first, as the gateway does,
    // lets both readers hand out `&str`s of the text.
    let text = std::str::from_utf8(record.payload())
        .map_err(|e| Poison::Shape(format!("not UTF-8 (at byte {})", e.valid_up_to())))?;
    let mut hyphenated = [0; 36];
    if let Some(fields) = fast_fields(text, &mut hyphenated) {
        write_fields(out, record, ingested_at, layout, &fields);
        return Ok(());
    }
    parsed_fields(text, |fields| {
        write_fields(out, record, ingested_at, layout, fields)
    })
}

/// The paths [`fast_fields`] reads, in the order of its slots.
const PATHS: [(&str, Option<&str>); 12] = [
    ("backend_id", None),
    ("upload_time", None),
    ("ip", None),
    ("country", None),
    ("region", None),
    ("city", None),
    ("meta", None),
    ("data", None),
    ("meta", Some("app_id")),
    ("meta", Some("category")),
    ("data", Some("timestamp")),
    ("data", Some("id")),
];

/// The fields of a message of the common shape, read in one validating
/// pass (`json_scan::object_paths`), or `None` for anything else: a
/// message this is not sure of is left to [`parsed_fields`], never called
/// poison here. `hyphenated` holds the backend id's text when the event
/// has no id of its own.
fn fast_fields<'a>(text: &'a str, hyphenated: &'a mut [u8; 36]) -> Option<Fields<'a>> {
    let json = text.as_bytes();
    let paths = venus_shared::json_scan::object_paths(json, MAX_NESTING, PATHS).ok()?;
    if paths.unreadable || paths.strings != venus_shared::json_scan::Strings::Clean {
        return None;
    }
    let [backend_id, upload_time, ip, country, region, city, meta, data, app_id, category, timestamp, id] =
        paths.found.map(|range| range.map(|range| &text[range]));
    // The text of a string with nothing to unescape.
    let plain = |value: &'a str| -> Option<&'a str> {
        let inner = value.strip_prefix('"')?.strip_suffix('"')?;
        (!inner.contains('\\')).then_some(inner)
    };
    // A number the pass accepted that `u64` parses is plain digits (JSON
    // has no `+`): what serde reads as `u64`; a sign, a fraction or an
    // exponent goes to the parser.
    let integer = |value: &str| value.parse::<u64>().ok();
    let optional = |value: Option<&'a str>| match value {
        None => Some(""),
        Some(value) => plain(value),
    };
    let (meta, data) = (meta?, data?);
    if !meta.starts_with('{') || !data.starts_with('{') {
        return None;
    }
    let timestamp = match timestamp {
        None | Some("null") => None,
        Some(value) => Some(integer(value)?),
    };
    let backend_id = uuid::Uuid::try_parse(plain(backend_id?)?).ok()?;
    let event_id = match id {
        None | Some("null") => &*backend_id.hyphenated().encode_lower(hyphenated),
        Some(id) if id.starts_with('"') => plain(id)?,
        // A number (or anything else) as its JSON text.
        Some(id) => id,
    };
    Some(Fields {
        backend_id,
        upload_time: integer(upload_time?)?,
        ip: plain(ip?)?,
        country: optional(country)?,
        region: optional(region)?,
        city: optional(city)?,
        app_id: plain(app_id?)?,
        category: plain(category?)?,
        event_id,
        timestamp,
        meta,
        data,
    })
}

/// Reads a message with sonic-rs and calls `write` with its fields, or
/// says why it can never be a row: what [`fast_fields`] leaves to it.
fn parsed_fields(text: &str, write: impl FnOnce(&Fields<'_>)) -> Result<(), Poison> {
    // First the gateway's own pre-parse scan: sonic-rs skips nested values
    // by recursion with no limit, so a value nested a million deep would
    // overflow the stack and abort the process, and the restarted ingester
    // would read it again (a crash loop on one message). Everything the
    // gateway writes is within its document limit (a value nests one level
    // less than its document did), and the scan's escape rules keep it and
    // the parser agreeing on where every string ends.
    venus_shared::json_scan::scan(text.as_bytes(), MAX_NESTING)
        .map_err(|e| Poison::Shape(e.to_string()))?;
    // sonic-rs: SIMD parsing and skipping, the same JSON rules as
    // serde_json.
    let message: Message<'_> =
        sonic_rs::from_str(text).map_err(|e| Poison::Shape(e.to_string()))?;
    let (meta, data) = (&message.meta, &message.data);
    if !meta.is_object() {
        return Err(Poison::Meta("not an object".into()));
    }
    let app_id = string_field(meta, "app_id", Poison::Meta)?;
    let category = string_field(meta, "category", Poison::Meta)?;
    if !data.is_object() {
        return Err(Poison::Data("not an object".into()));
    }
    let timestamp = match data.get("timestamp") {
        None => None,
        Some(value) if value.is_null() => None,
        Some(value) => Some(value.as_u64().ok_or_else(|| {
            Poison::Data(format!(
                "timestamp {} is not an integer",
                value.as_raw_str()
            ))
        })?),
    };
    let Ok(backend_id) = uuid::Uuid::try_parse(&message.backend_id) else {
        return Err(Poison::BackendId(message.backend_id.into_owned()));
    };
    let id = data.get("id");
    let fallback;
    let event_id = match &id {
        // A number (or anything else) as its JSON text.
        Some(id) if !id.is_null() => id.as_str().unwrap_or(id.as_raw_str()),
        _ => {
            fallback = backend_id.hyphenated().to_string();
            fallback.as_str()
        }
    };
    write(&Fields {
        backend_id,
        upload_time: message.upload_time,
        ip: &message.ip,
        country: &message.country,
        region: &message.region,
        city: &message.city,
        app_id: app_id.as_str().unwrap_or_default(),
        category: category.as_str().unwrap_or_default(),
        event_id,
        timestamp,
        meta: meta.as_raw_str(),
        data: data.as_raw_str(),
    });
    Ok(())
}

/// Appends the row of `fields` (read from `record`) in the columns' order.
/// Every check is done before: nothing here fails, so a row is written
/// whole or not at all.
fn write_fields(
    out: &mut Vec<u8>,
    record: &Record,
    ingested_at: u64,
    layout: Layout,
    fields: &Fields<'_>,
) {
    out.reserve(record.payload().len() + 160);
    let mut row = RowBinary(out);
    row.uuid(fields.backend_id);
    row.string(fields.app_id);
    row.string(fields.category);
    // The table's identity is (category, day, app_id, event_id): an event
    // without an id (the gateway requires one; other producers may not
    // send it) is identified by its backend_id, so that such events never
    // fold into one.
    row.string(fields.event_id);
    let timestamp = fields.timestamp;
    match layout {
        Layout::Classic => {
            row.u32(datetime(fields.upload_time / 1000));
            row.u64(fields.upload_time);
            // A client time beyond `DateTime` keeps only its milliseconds.
            let client_time = timestamp.and_then(|ms| u32::try_from(ms / 1000).ok());
            row.nullable(client_time, RowBinary::u32);
        }
        Layout::Current => {
            // `DateTime64(3)`: milliseconds as an `Int64`.
            row.i64(i64::try_from(fields.upload_time).unwrap_or(i64::MAX));
            row.u64(fields.upload_time);
            let client_time = timestamp.and_then(|ms| i64::try_from(ms).ok());
            row.nullable(client_time, RowBinary::i64);
        }
    }
    row.nullable(timestamp, RowBinary::u64);
    row.string(fields.ip);
    row.string(fields.country);
    row.string(fields.region);
    row.string(fields.city);
    row.string(fields.meta);
    row.string(fields.data);
    row.string(record.header("request_id").unwrap_or(""));
    row.string(trace_id(record.header("traceparent")));
    row.string(&record.source.topic);
    row.0
        .extend_from_slice(&record.source.partition.to_le_bytes());
    row.0.extend_from_slice(&record.source.offset.to_le_bytes());
    row.u32(datetime(ingested_at));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Source;
    use serde_json::{json, Value};

    fn record(payload: &str) -> Record {
        let source = Source {
            topic: "to_analyzer__0.click".into(),
            partition: 3,
            offset: 42,
            epoch: 1,
        };
        let headers: [(&str, Option<&[u8]>); 2] = [
            (
                "traceparent",
                Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ),
            ("request_id", Some(b"req-1")),
        ];
        Record::new(source, payload.as_bytes(), None, headers)
    }

    /// Reads one `RowBinary` value of `kind` from the front of `bytes`.
    fn read(kind: &str, bytes: &mut &[u8]) -> Value {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> &'a [u8] {
            let (head, rest) = bytes.split_at(n);
            *bytes = rest;
            head
        }
        let le = |bytes: &mut &[u8], n: usize| -> u64 {
            let mut buf = [0u8; 8];
            buf[..n].copy_from_slice(take(bytes, n));
            u64::from_le_bytes(buf)
        };
        if let Some(inner) = kind.strip_prefix("Nullable(") {
            return match take(bytes, 1)[0] {
                1 => Value::Null,
                0 => read(inner.trim_end_matches(')'), bytes),
                other => panic!("null flag {other}"),
            };
        }
        match kind {
            "UUID" => {
                let high = le(bytes, 8);
                let low = le(bytes, 8);
                json!(uuid::Uuid::from_u64_pair(high, low).to_string())
            }
            "String" => {
                let (mut length, mut shift) = (0usize, 0);
                loop {
                    let byte = take(bytes, 1)[0];
                    length |= ((byte & 0x7f) as usize) << shift;
                    shift += 7;
                    if byte < 0x80 {
                        break;
                    }
                }
                json!(std::str::from_utf8(take(bytes, length)).unwrap())
            }
            "DateTime" => json!(le(bytes, 4)),
            "LowCardinality(String)" => read("String", bytes),
            datetime64 if datetime64.starts_with("DateTime64") => json!(le(bytes, 8) as i64),
            "UInt64" => json!(le(bytes, 8)),
            "Int32" => json!(le(bytes, 4) as u32 as i32),
            "Int64" => json!(le(bytes, 8) as i64),
            other => panic!("no reader for {other}"),
        }
    }

    /// The row `write_row` appends, read back column by column; it must
    /// end exactly where the row ends.
    fn row(payload: &str) -> Result<Value, Poison> {
        row_in(payload, Layout::Classic)
    }

    fn row_in(payload: &str, layout: Layout) -> Result<Value, Poison> {
        let mut out = b"previous".to_vec();
        write_row(&mut out, &record(payload), 1_700_000_100, layout)?;
        let mut bytes = out.strip_prefix(b"previous").unwrap();
        let mut columns = serde_json::Map::new();
        for (name, kind) in layout.columns() {
            columns.insert(name.to_string(), read(kind, &mut bytes));
        }
        assert!(
            bytes.is_empty(),
            "{} bytes past the last column",
            bytes.len()
        );
        Ok(Value::Object(columns))
    }

    const META: &str = r#"{"app_id":"shop","category":"click","extra":[1, 2]}"#;

    #[test]
    fn the_current_layout_writes_milliseconds_and_the_same_columns() {
        let payload = format!(
            r#"{{"backend_id":"0190a0e0-0000-7000-8000-000000000001","upload_time":1700000005678,"ip":"81.2.69.142","country":"GB","meta":{META},"data":{{"id":"e1","timestamp":1700000000123}}}}"#
        );
        let classic = row_in(&payload, Layout::Classic).unwrap();
        let current = row_in(&payload, Layout::Current).unwrap();
        assert_eq!(classic["upload_time"], 1_700_000_005u64);
        assert_eq!(current["upload_time"], 1_700_000_005_678i64);
        assert_eq!(current["client_time"], 1_700_000_000_123i64);
        for column in [
            "backend_id",
            "app_id",
            "category",
            "event_id",
            "upload_time_ms",
            "client_time_ms",
            "country",
            "meta",
            "data",
            "kafka_offset",
            "ingested_at",
        ] {
            assert_eq!(classic[column], current[column], "{column}");
        }
        let names =
            |layout: Layout| -> Vec<&str> { layout.columns().iter().map(|(n, _)| *n).collect() };
        assert_eq!(names(Layout::Classic), names(Layout::Current));
        assert_eq!(Layout::for_version(Some((18, 16))), Layout::Classic);
        assert_eq!(Layout::for_version(Some((26, 9))), Layout::Current);
        assert_eq!(Layout::for_version(None), Layout::Classic);
        assert_eq!(
            Layout::of_upload_time("DateTime64(3, 'UTC')"),
            Layout::Current
        );
        assert_eq!(Layout::of_upload_time("DateTime"), Layout::Classic);
    }

    #[test]
    fn every_column_is_mapped() {
        let data = r#"{"id":"e1","timestamp":1700000000123,"n":1.50,"nested":{"a":[1,2]}}"#;
        let payload = format!(
            r#"{{"backend_id":"0190a0e0-0000-7000-8000-000000000001","upload_time":1700000005678,"ip":"81.2.69.142","country":"GB","region":"ENG","city":"London","meta":{META},"data":{data}}}"#
        );
        let value = row(&payload).unwrap();
        assert_eq!(
            value,
            json!({
                "backend_id": "0190a0e0-0000-7000-8000-000000000001",
                "app_id": "shop",
                "category": "click",
                "event_id": "e1",
                "upload_time": 1700000005u64,
                "upload_time_ms": 1700000005678u64,
                "client_time": 1700000000u64,
                "client_time_ms": 1700000000123u64,
                "ip": "81.2.69.142",
                "country": "GB",
                "region": "ENG",
                "city": "London",
                "meta": META,
                "data": data,
                "request_id": "req-1",
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                "kafka_topic": "to_analyzer__0.click",
                "kafka_partition": 3,
                "kafka_offset": 42,
                "ingested_at": 1700000100u64,
            })
        );
    }

    #[test]
    fn meta_and_data_keep_their_exact_text() {
        let data = "{ \"id\" : 7 ,\"s\":\"\\u00e9\\n\" }";
        let payload = format!(
            r#"{{"backend_id":"0190a0e0-0000-7000-8000-000000000001","upload_time":1,"ip":"::1","country":"","region":"","city":"","meta":{META},"data":{data}}}"#
        );
        let value = row(&payload).unwrap();
        assert_eq!(value["data"], data);
        assert_eq!(value["event_id"], "7", "a numeric id as its JSON text");
        assert_eq!(value["client_time"], Value::Null);
        assert_eq!(value["client_time_ms"], Value::Null);
    }

    #[test]
    fn a_client_time_beyond_datetime_keeps_only_milliseconds() {
        let payload = format!(
            r#"{{"backend_id":"0190a0e0-0000-7000-8000-000000000001","upload_time":1,"ip":"::1","meta":{META},"data":{{"timestamp":99999999999999999}}}}"#
        );
        let value = row(&payload).unwrap();
        assert_eq!(value["client_time"], Value::Null);
        assert_eq!(value["client_time_ms"], 99999999999999999u64);
        assert_eq!(
            value["event_id"], "0190a0e0-0000-7000-8000-000000000001",
            "without an id, the backend_id identifies the event"
        );
    }

    #[test]
    fn messages_that_can_never_be_rows_are_poison_and_leave_the_buffer_alone() {
        let ok_backend = "0190a0e0-0000-7000-8000-000000000001";
        for (payload, kind) in [
            ("not json".to_owned(), "shape"),
            (r#"{"backend_id":"x"}"#.to_owned(), "shape"),
            (
                format!(
                    r#"{{"backend_id":"{ok_backend}","upload_time":1,"ip":"::1","meta":[],"data":{{}}}}"#
                ),
                "meta",
            ),
            (
                format!(
                    r#"{{"backend_id":"{ok_backend}","upload_time":1,"ip":"::1","meta":{META},"data":{{"timestamp":"now"}}}}"#
                ),
                "data",
            ),
            (
                format!(
                    r#"{{"backend_id":"nope","upload_time":1,"ip":"::1","meta":{META},"data":{{}}}}"#
                ),
                "backend_id",
            ),
        ] {
            let mut out = b"kept".to_vec();
            let err = write_row(&mut out, &record(&payload), 0, Layout::Classic).unwrap_err();
            assert_eq!(out, b"kept", "{payload}");
            let matches = matches!(
                (&err, kind),
                (Poison::Shape(_), "shape")
                    | (Poison::Meta(_), "meta")
                    | (Poison::Data(_), "data")
                    | (Poison::BackendId(_), "backend_id")
            );
            assert!(matches, "{payload}: {err}");
        }
    }

    #[test]
    fn crafted_values_are_poison_and_never_a_crash() {
        let message = |data: &[u8]| {
            let mut payload = format!(
                r#"{{"backend_id":"0190a0e0-0000-7000-8000-000000000001","upload_time":1,"ip":"::1","meta":{META},"data":"#
            )
            .into_bytes();
            payload.extend_from_slice(data);
            payload.push(b'}');
            let source = record("").source;
            Record::new(source, &payload, None, std::iter::empty())
        };
        let deep = [
            "[".repeat(1_000_000).into_bytes(),
            "]".repeat(1_000_000).into_bytes(),
        ]
        .concat();
        let deep_object = format!(r#"{{"id":"e","n":{}}}"#, "[".repeat(100_000));
        // As deep as a message of the gateway can be is still a row.
        let deepest = format!(
            r#"{{"id":"e","x":{}1{}}}"#,
            "[".repeat(MAX_NESTING - 2),
            "]".repeat(MAX_NESTING - 2)
        );
        let mut out = Vec::new();
        write_row(&mut out, &message(deepest.as_bytes()), 0, Layout::Classic).unwrap();
        for (name, data) in [
            ("one level deeper", format!("[{deepest}]").into_bytes()),
            ("a million nested arrays", deep),
            (
                "deep and unclosed inside an object",
                deep_object.into_bytes(),
            ),
            (
                "invalid UTF-8 in a string",
                b"{\"id\":\"\xff\xfe\"}".to_vec(),
            ),
            ("an unterminated string", b"{\"id\":\"abc}".to_vec()),
            (
                "a control character in a string",
                b"{\"id\":\"a\x01b\"}".to_vec(),
            ),
            ("a bad escape", b"{\"id\":\"\\q\"}".to_vec()),
        ] {
            let mut out = b"kept".to_vec();
            let result = write_row(&mut out, &message(&data), 0, Layout::Classic);
            assert!(result.is_err(), "{name} was taken as a row");
            assert_eq!(out, b"kept", "{name}");
        }
    }

    #[test]
    fn values_have_clickhouses_documented_wire_layout() {
        // The example of ClickHouse's RowBinary documentation.
        let mut out = Vec::new();
        let uuid = uuid::Uuid::parse_str("61f0c404-5cb3-11e7-907b-a6006ad3dba0").unwrap();
        RowBinary(&mut out).uuid(uuid);
        assert_eq!(
            out,
            [
                0xE7, 0x11, 0xB3, 0x5C, 0x04, 0xC4, 0xF0, 0x61, 0xA0, 0xDB, 0xD3, 0x6A, 0x00, 0xA6,
                0x7B, 0x90
            ]
        );
        out.clear();
        RowBinary(&mut out).string("foobar");
        assert_eq!(out, b"\x06foobar");
        for (length, prefix) in [
            (127usize, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (300, vec![0xac, 0x02]),
            (16_384, vec![0x80, 0x80, 0x01]),
        ] {
            out.clear();
            RowBinary(&mut out).string(&"x".repeat(length));
            assert_eq!(out[..prefix.len()], prefix[..], "{length}");
            assert_eq!(out.len(), prefix.len() + length);
        }
        out.clear();
        let mut row = RowBinary(&mut out);
        row.nullable(None::<u32>, RowBinary::u32);
        row.nullable(Some(1_705_314_600u32), RowBinary::u32);
        assert_eq!(out, [1, 0, 0x28, 0x09, 0xA5, 0x65]);
    }

    #[test]
    fn long_meta_and_data_keep_their_bytes() {
        let padding = r#"é\u00e9\"\n"#.repeat(200);
        let data = format!(r#"{{"id":"e\u00e9","pad":"{padding}"}}"#);
        let payload = format!(
            r#"{{"backend_id":"0190a0e0-0000-7000-8000-000000000001","upload_time":1,"ip":"::1","meta":{META},"data":{data}}}"#
        );
        let value = row(&payload).unwrap();
        assert_eq!(value["data"], data.as_str());
        assert_eq!(value["event_id"], "eé", "the id unescaped");
    }

    /// The messages of `venus-loadtest --raw-kafka` (the gateway's
    /// format), and a few shapes other producers may send.
    fn seeds() -> Vec<String> {
        use venus_loadtest::generate::Generator;
        let config = venus_loadtest::GenConfig {
            seed: 11,
            ..Default::default()
        };
        let generator = Generator::new(&config, 1_700_000_000_000);
        let mut seeds = Vec::new();
        for request in 0..4u64 {
            let batch = generator.batch(request);
            for (index, ip) in batch.accepted_events() {
                let mut value = Vec::new();
                venus_loadtest::raw_kafka::message_value(
                    &batch,
                    index,
                    ip,
                    // Fixed, so that a failure can be run again.
                    uuid::Uuid::from_u128(
                        0x0190_a0e0_0000_7000_8000_0000_0000_0000 | index as u128,
                    ),
                    1_700_000_000_000,
                    &mut value,
                );
                seeds.push(String::from_utf8(value).unwrap());
            }
        }
        let backend = "0190a0e0-0000-7000-8000-000000000001";
        for (meta, data) in [
            (META, r#"{"id":7,"timestamp":null,"n":[1.5e3,{"a":"é"}]}"#),
            (META, r#"{"timestamp":1700000000123,"s":"\u00e9\n"}"#),
            (META, r#"{"id":{"k":[true,false]},"timestamp":0}"#),
            (r#"{"category":"c","app_id":"a"}"#, r#"{"id":"x"}"#),
        ] {
            seeds.push(format!(
                r#"{{"backend_id":"{backend}","upload_time":1700000005678,"ip":"::1","meta":{meta},"data":{data}}}"#
            ));
            seeds.push(format!(
                r#" {{ "data" : {data} , "meta" : {meta} , "city" : "Köln" , "ip" : "10.0.0.1" , "upload_time" : 5 , "backend_id" : "{backend}" }} "#
            ));
        }
        seeds
    }

    #[test]
    fn the_gateways_messages_take_the_one_pass_way() {
        let seeds = seeds();
        for seed in &seeds {
            assert!(
                fast_fields(seed, &mut [0; 36]).is_some(),
                "read by the parser: {seed}"
            );
        }
        // Escapes in the fields a row takes apart are the parser's.
        let seed = &seeds[0];
        let escaped = seed.replacen(r#""ip":""#, r#""ip":"\u0031"#, 1);
        assert_ne!(&escaped, seed);
        assert!(fast_fields(&escaped, &mut [0; 36]).is_none());
    }

    /// Every message the one pass reads, it reads as sonic-rs does: the
    /// same row, byte for byte. Thousands of random mutations of the seeds
    /// (JSON's own tokens inserted, bytes replaced or removed) look for one
    /// where they part.
    #[test]
    fn the_one_pass_and_the_parser_write_the_same_rows() {
        const TOKENS: &[&str] = &[
            "\"",
            "\\",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            " ",
            "null",
            "1",
            "-",
            ".",
            "e",
            "0",
            "é",
            "\\u00e9",
            "\\ud800",
            "\\n",
            "1e3",
            "\"id\":",
            "\"timestamp\":",
            "\"app_id\":\"x\",",
            "\"meta\":{},",
            "\"country\":null,",
            "\"x\\u0041\":1,",
            "\"ip\":\"y\",",
            "99999999999999999999",
            "\"upload_time\":2,",
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as usize
        };
        let seeds = seeds();
        let row_of = |text: &str| {
            let mut row = Vec::new();
            let mut hyphenated = [0; 36];
            let fields = fast_fields(text, &mut hyphenated)?;
            write_fields(&mut row, &record(""), 1, Layout::Current, &fields);
            Some(row)
        };
        let seed_rows: Vec<_> = seeds.iter().map(|seed| row_of(seed).unwrap()).collect();
        // Mutations read by the one pass, and those of them whose row is
        // not their seed's (a field the row takes was changed).
        let (mut tried, mut fast, mut changed) = (0, 0, 0);
        for _ in 0..40_000 {
            let seed = next() % seeds.len();
            let mut bytes = seeds[seed].clone().into_bytes();
            for _ in 0..1 + next() % 3 {
                let at = next() % (bytes.len() + 1);
                match next() % 3 {
                    0 => {
                        let token = TOKENS[next() % TOKENS.len()];
                        bytes.splice(at..at, token.bytes());
                    }
                    1 if at < bytes.len() => {
                        let token = TOKENS[next() % TOKENS.len()];
                        bytes.splice(at..at + 1, token.bytes());
                    }
                    _ => {
                        let end = (at + 1 + next() % 4).min(bytes.len());
                        bytes.drain(at.min(end)..end);
                    }
                }
            }
            let Ok(text) = std::str::from_utf8(&bytes) else {
                continue;
            };
            tried += 1;
            let record = record("");
            let mut hyphenated = [0; 36];
            let Some(fields) = fast_fields(text, &mut hyphenated) else {
                continue;
            };
            fast += 1;
            let (mut one_pass, mut parsed) = (Vec::new(), Vec::new());
            write_fields(&mut one_pass, &record, 1, Layout::Current, &fields);
            parsed_fields(text, |fields| {
                write_fields(&mut parsed, &record, 1, Layout::Current, fields)
            })
            .unwrap_or_else(|poison| panic!("the parser calls it poison ({poison}): {text}"));
            assert_eq!(one_pass, parsed, "{text}");
            changed += usize::from(one_pass != seed_rows[seed]);
        }
        // Enough of each kind for the comparison to mean something.
        assert!(
            fast > 2_000 && tried - fast > 2_000 && changed > 500,
            "{fast} of {tried} read by the one pass, {changed} with a changed row"
        );
    }

    #[test]
    fn trace_id_comes_from_a_valid_traceparent_only() {
        assert_eq!(
            trace_id(Some(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            )),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(trace_id(Some("garbage")), "");
        assert_eq!(trace_id(None), "");
    }
}
