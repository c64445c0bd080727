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

/// Appends the row of `record` in `RowBinary` to `out`, or says why the
/// message can never be inserted. `out` is left as it was on error.
pub fn write_row(
    out: &mut Vec<u8>,
    record: &Record,
    ingested_at: u64,
    layout: Layout,
) -> Result<(), Poison> {
    // First the gateway's own pre-parse scan: sonic-rs skips nested values
    // by recursion with no limit, so a value nested a million deep would
    // overflow the stack and abort the process, and the restarted ingester
    // would read it again (a crash loop on one message). Everything the
    // gateway writes is within its document limit (a value nests one level
    // less than its document did), and the scan's escape rules keep it and
    // the parser agreeing on where every string ends.
    venus_shared::json_scan::scan(record.payload(), MAX_NESTING)
        .map_err(|e| Poison::Shape(e.to_string()))?;
    // JSON text is UTF-8; checking it whole first, as the gateway does,
    // keeps the lazy parser from ever handing out a `&str` over invalid
    // bytes (sonic-rs asserts against that in debug builds).
    let text = std::str::from_utf8(record.payload())
        .map_err(|e| Poison::Shape(format!("not UTF-8 (at byte {})", e.valid_up_to())))?;
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
    // The table's identity is (category, day, app_id, event_id): an event
    // without an id (the gateway requires one; other producers may not
    // send it) is identified by its backend_id, so that such events never
    // fold into one.
    let fallback;
    let event_id = match &id {
        // A number (or anything else) as its JSON text.
        Some(id) if !id.is_null() => id.as_str().unwrap_or(id.as_raw_str()),
        _ => {
            fallback = backend_id.hyphenated().to_string();
            fallback.as_str()
        }
    };
    // Every check is done: from here on nothing fails, so a row is written
    // whole or not at all.
    out.reserve(record.payload().len() + 160);
    let mut row = RowBinary(out);
    row.uuid(backend_id);
    row.string(app_id.as_str().unwrap_or_default());
    row.string(category.as_str().unwrap_or_default());
    row.string(event_id);
    match layout {
        Layout::Classic => {
            row.u32(datetime(message.upload_time / 1000));
            row.u64(message.upload_time);
            // A client time beyond `DateTime` keeps only its milliseconds.
            let client_time = timestamp.and_then(|ms| u32::try_from(ms / 1000).ok());
            row.nullable(client_time, RowBinary::u32);
        }
        Layout::Current => {
            // `DateTime64(3)`: milliseconds as an `Int64`.
            row.i64(i64::try_from(message.upload_time).unwrap_or(i64::MAX));
            row.u64(message.upload_time);
            let client_time = timestamp.and_then(|ms| i64::try_from(ms).ok());
            row.nullable(client_time, RowBinary::i64);
        }
    }
    row.nullable(timestamp, RowBinary::u64);
    row.string(&message.ip);
    row.string(&message.country);
    row.string(&message.region);
    row.string(&message.city);
    row.string(meta.as_raw_str());
    row.string(data.as_raw_str());
    row.string(record.header("request_id").unwrap_or(""));
    row.string(trace_id(record.header("traceparent")));
    row.string(&record.source.topic);
    row.0
        .extend_from_slice(&record.source.partition.to_le_bytes());
    row.0.extend_from_slice(&record.source.offset.to_le_bytes());
    row.u32(datetime(ingested_at));
    Ok(())
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
