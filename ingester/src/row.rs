//! One Kafka message of the gateway into one ClickHouse row (a JSONEachRow
//! line), or the reason it can never be one.
//!
//! The message value is `{"backend_id","upload_time","ip","country",
//! "region","city","meta","data"}` (see `venus::pipeline::write_kafka`);
//! `meta` and `data` are stored exactly as they are in the message. Times
//! are sent as numbers (epoch seconds for `DateTime`, which every
//! ClickHouse parses the same whatever its time zone, and milliseconds
//! beside them, since 18.16 has no `DateTime64`).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

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
    #[serde(borrow)]
    meta: &'a RawValue,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// The fields of `meta` that become columns.
#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(borrow)]
    app_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    category: std::borrow::Cow<'a, str>,
}

/// The fields of `data` that become columns.
#[derive(Deserialize)]
struct Data<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    timestamp: Option<u64>,
}

/// A row of the events table, in the table's column order.
#[derive(Debug, Serialize, PartialEq)]
pub struct Row<'a> {
    pub backend_id: &'a str,
    pub app_id: &'a str,
    pub category: &'a str,
    pub event_id: String,
    pub upload_time: u64,
    pub upload_time_ms: u64,
    pub client_time: Option<u64>,
    pub client_time_ms: Option<u64>,
    pub ip: &'a str,
    pub country: &'a str,
    pub region: &'a str,
    pub city: &'a str,
    pub meta: &'a str,
    pub data: &'a str,
    pub request_id: &'a str,
    pub trace_id: &'a str,
    pub kafka_topic: &'a str,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub ingested_at: u64,
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

/// The largest epoch second a `DateTime` holds (it is a UInt32).
const MAX_DATETIME: u64 = u32::MAX as u64;

/// The trace id of a W3C `traceparent`, or empty.
pub fn trace_id(traceparent: Option<&str>) -> &str {
    traceparent
        .and_then(|tp| tp.split('-').nth(1))
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or("")
}

/// Appends the JSONEachRow line of `record` (with its trailing newline) to
/// `out`, or says why the message can never be inserted. `out` is left as it
/// was on error.
pub fn write_row(out: &mut Vec<u8>, record: &Record, ingested_at: u64) -> Result<(), Poison> {
    let message: Message<'_> =
        serde_json::from_slice(&record.payload).map_err(|e| Poison::Shape(e.to_string()))?;
    let meta: Meta<'_> =
        serde_json::from_str(message.meta.get()).map_err(|e| Poison::Meta(e.to_string()))?;
    let data: Data<'_> =
        serde_json::from_str(message.data.get()).map_err(|e| Poison::Data(e.to_string()))?;
    if uuid::Uuid::try_parse(&message.backend_id).is_err() {
        return Err(Poison::BackendId(message.backend_id.into_owned()));
    }
    let event_id = match data.id {
        None => String::new(),
        Some(raw) => match serde_json::from_str::<String>(raw.get()) {
            Ok(text) => text,
            Err(_) if raw.get() == "null" => String::new(),
            // A number (or anything else) as its JSON text.
            Err(_) => raw.get().to_owned(),
        },
    };
    let client_time = data.timestamp.map(|ms| ms / 1000);
    let row = Row {
        backend_id: &message.backend_id,
        app_id: &meta.app_id,
        category: &meta.category,
        event_id,
        upload_time: (message.upload_time / 1000).min(MAX_DATETIME),
        upload_time_ms: message.upload_time,
        client_time: client_time.filter(|s| *s <= MAX_DATETIME),
        client_time_ms: data.timestamp,
        ip: &message.ip,
        country: &message.country,
        region: &message.region,
        city: &message.city,
        meta: message.meta.get(),
        data: message.data.get(),
        request_id: record.header("request_id").unwrap_or(""),
        trace_id: trace_id(record.header("traceparent")),
        kafka_topic: &record.source.topic,
        kafka_partition: record.source.partition,
        kafka_offset: record.source.offset,
        ingested_at,
    };
    // Serializing plain strings and numbers into a Vec cannot fail.
    serde_json::to_writer(&mut *out, &row).map_err(|e| Poison::Shape(e.to_string()))?;
    out.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Source;
    use serde_json::{json, Value};

    fn record(payload: &str) -> Record {
        Record {
            source: Source {
                topic: "to_analyzer__0.click".into(),
                partition: 3,
                offset: 42,
                epoch: 1,
            },
            key: None,
            payload: payload.as_bytes().to_vec(),
            headers: vec![
                (
                    "traceparent".into(),
                    b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec(),
                ),
                ("request_id".into(), b"req-1".to_vec()),
            ],
        }
    }

    fn row(payload: &str) -> Result<Value, Poison> {
        let mut out = b"previous\n".to_vec();
        write_row(&mut out, &record(payload), 1_700_000_100)?;
        let text = std::str::from_utf8(&out).unwrap();
        let line = text.strip_prefix("previous\n").unwrap();
        assert!(line.ends_with('\n'));
        Ok(serde_json::from_str(line).unwrap())
    }

    const META: &str = r#"{"app_id":"shop","category":"click","extra":[1, 2]}"#;

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
        assert_eq!(value["event_id"], "");
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
            let err = write_row(&mut out, &record(&payload), 0).unwrap_err();
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
