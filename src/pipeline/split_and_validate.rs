//! First handler: parse the batch document, check `meta` and every event.
//!
//! A malformed request (not JSON, bad `meta`, `data` missing, empty or too
//! long) ends the chain with 400 and no parts. Otherwise every event gets a
//! slot in the context, either pending or failed with code 1001 and the rule
//! it broke; the chain goes on with the pending ones.
//!
//! Events and `meta` are not copied: the context keeps slices of the
//! document's bytes, which are what goes to Kafka.

use std::collections::HashSet;

use axum::http::StatusCode;
use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Deserialize;
use sonic_rs::{JsonType, JsonValueTrait, LazyValue};

use crate::domain::{AppId, Category, EventId};
use crate::json_scan::{self, Data, Strings};
use crate::pipeline::context::{Batch, Event, EventStatus, SentIp};
use crate::pipeline::{cpu_heavy, Handler, Outcome, UploadContext};
use crate::wire::{PartCode, Reply};

/// How large a batch may be, from `server.*` settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most events in `data`.
    pub max_events: usize,
    /// Most bytes of `meta` as sent. `meta` is copied into every event's
    /// Kafka message, so without a bound a small body could ask the producer
    /// for `events x meta` bytes.
    pub max_meta_bytes: usize,
}

pub struct SplitAndValidate {
    limits: BatchLimits,
    /// Allowed categories; empty allows any valid category.
    categories: HashSet<String>,
    /// A category whose topic is the ingester's dead-letter topic (when the
    /// topic template makes one; names starting with `__` are refused by
    /// [`Category::parse`] already).
    reserved: Option<Category>,
}

impl SplitAndValidate {
    pub fn new(limits: BatchLimits, categories: &[String], reserved: Option<Category>) -> Self {
        Self {
            limits,
            categories: categories.iter().cloned().collect(),
            reserved,
        }
    }
}

impl Handler for SplitAndValidate {
    fn name(&self) -> &'static str {
        "split_and_validate"
    }

    fn handle<'a>(&'a self, ctx: &'a mut UploadContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { cpu_heavy(ctx.request.document.len(), || self.run(ctx)) })
    }
}

/// A request-level rejection: 400, code 2, no parts.
struct Malformed(String);

impl SplitAndValidate {
    fn run(&self, ctx: &mut UploadContext) -> Outcome {
        let document = ctx.request.document.clone();
        match self.split(&document) {
            Err(Malformed(message)) => Outcome::fail(
                message.clone(),
                Reply::error(StatusCode::BAD_REQUEST, message),
            ),
            Ok((batch, events)) => {
                ctx.batch = Some(batch);
                ctx.events = events;
                let total = ctx.events.len();
                let invalid = ctx.failed();
                if invalid == 0 {
                    return Outcome::proceed();
                }
                let first = ctx
                    .events
                    .iter()
                    .enumerate()
                    .find_map(|(i, e)| match &e.status {
                        EventStatus::Failed { reason, .. } => Some(format!("event {i}: {reason}")),
                        _ => None,
                    })
                    .unwrap_or_default();
                let message = format!("{invalid} of {total} events failed validation; {first}");
                if invalid == total {
                    Outcome::fail(message, ctx.reply())
                } else {
                    Outcome::error(message)
                }
            }
        }
    }

    fn split(&self, document: &Bytes) -> Result<(Batch, Vec<Event>), Malformed> {
        let first = document.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(Malformed(
                "the batch must be a JSON object with \"meta\" and \"data\"".into(),
            ));
        }
        // JSON text is UTF-8; checking it whole first also keeps the lazy
        // parser from ever handing out a `&str` over invalid bytes.
        let text = std::str::from_utf8(document).map_err(|error| {
            Malformed(format!(
                "the batch is not valid UTF-8 (at byte {})",
                error.valid_up_to()
            ))
        })?;
        // One validating pass finds `meta` and every event; it also bounds
        // the nesting for sonic-rs, which recurses without a limit of its
        // own when it reads `meta` or an event with an escaped key below.
        let parsed = json_scan::batch_document(document, MAX_NESTING, self.limits.max_events)
            .map_err(|e| Malformed(e.to_string()))?;
        let strings = parsed.strings;

        let meta = parsed
            .meta
            .ok_or_else(|| Malformed("meta is required".into()))?;
        let batch = self.batch(document, &text[meta])?;
        if strings == Strings::LoneSurrogate && json_scan::has_lone_surrogate(&batch.meta) {
            return Err(Malformed(format!("meta {LONE_SURROGATE}")));
        }

        let (items, count) = match parsed.data {
            None => return Err(Malformed("data is required".into())),
            Some(Data::NotAnArray) => {
                return Err(Malformed("data must be an array of events".into()))
            }
            Some(Data::Events { items, count }) => (items, count),
        };
        let mut events: Vec<Event> = items
            .into_iter()
            .map(|item| event_of(document, &text[item], strings))
            .collect();
        if count == 0 {
            return Err(Malformed("data must hold at least one event".into()));
        }
        if count > self.limits.max_events {
            return Err(Malformed(format!(
                "data holds {count} events; at most {} are allowed per batch",
                self.limits.max_events
            )));
        }
        // Uniqueness is a property of the batch: a repeated id fails every
        // occurrence after the first.
        let mut seen_ids: HashSet<&str> = HashSet::with_capacity(events.len());
        let mut repeated = Vec::new();
        for (index, event) in events.iter().enumerate() {
            if let Some(id) = event.id.as_deref() {
                if !seen_ids.insert(id) {
                    repeated.push(index);
                }
            }
        }
        drop(seen_ids);
        for index in repeated {
            let event = &mut events[index];
            if event.is_pending() {
                let id = event.id.as_deref().unwrap_or_default();
                let reason = format!("id {:?} appears more than once in the batch", trimmed(id));
                event.fail(PartCode::Validation, reason);
            }
        }
        Ok((batch, events))
    }

    /// The batch of `meta`, whose text (a part of `document`, valid JSON)
    /// is `meta`.
    fn batch(&self, document: &Bytes, meta: &str) -> Result<Batch, Malformed> {
        if !meta.starts_with('{') {
            return Err(Malformed("meta must be a JSON object".into()));
        }
        let meta_bytes = meta.len();
        if meta_bytes > self.limits.max_meta_bytes {
            return Err(Malformed(format!(
                "meta is {meta_bytes} bytes; at most {} are allowed (it is copied into every event's message)",
                self.limits.max_meta_bytes
            )));
        }
        // One pass over `meta`: it goes to Kafka as sent, so a repeated key
        // would let a consumer read another app id or category than the one
        // checked here; and the two fields the gateway needs are picked up.
        let mut keys = HashSet::new();
        let mut app_id = None;
        let mut category = None;
        let mut anonymous = false;
        for entry in sonic_rs::to_object_iter(meta) {
            let (key, value) = entry
                .map_err(|e| Malformed(format!("meta is not valid JSON: {}", first_line(&e))))?;
            if keys.len() == MAX_META_FIELDS {
                return Err(Malformed(format!(
                    "meta has more than {MAX_META_FIELDS} fields"
                )));
            }
            if keys.contains(&key) {
                return Err(Malformed(format!(
                    "meta.{} appears more than once",
                    trimmed(&key)
                )));
            }
            match key.as_ref() {
                "app_id" => app_id = Some(value),
                "category" => category = Some(value),
                // `true` asks for no address to be stored (anything else
                // asks nothing: a consent flag is not guessed).
                crate::privacy::ANONYMOUS_META_FIELD => {
                    anonymous = value.as_raw_str() == "true";
                }
                _ => {}
            }
            keys.insert(key);
        }
        let app_id =
            AppId::parse(&meta_string("app_id", app_id)?).map_err(|e| Malformed(e.to_string()))?;
        let category = Category::parse(&meta_string("category", category)?)
            .map_err(|e| Malformed(e.to_string()))?;
        if self.reserved.as_ref() == Some(&category) {
            return Err(Malformed(format!(
                "meta.category {:?} names the dead-letter topic, which is reserved for the system",
                category.as_str()
            )));
        }
        if !self.categories.is_empty() && !self.categories.contains(category.as_str()) {
            return Err(Malformed(format!(
                "meta.category {:?} is not one of the categories this gateway accepts",
                trimmed(category.as_str())
            )));
        }
        Ok(Batch {
            app_id,
            category,
            meta: share(document, meta),
            anonymous,
        })
    }
}

/// The text of a required string field of `meta`.
fn meta_string(field: &str, value: Option<LazyValue>) -> Result<String, Malformed> {
    let value = value.ok_or_else(|| Malformed(format!("meta.{field} is required")))?;
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Malformed(not_a_string(&format!("meta.{field}"), value.get_type())))
}

/// One element of `data` as an event slot: pending, or failed with the rule
/// it broke.
fn event_of(document: &Bytes, item: &str, strings: Strings) -> Event {
    let mut event = Event {
        raw: share(document, item),
        id: None,
        ip: SentIp::Absent,
        enrichment: None,
        status: EventStatus::Pending,
    };
    if let Err(reason) = check_event(item, &mut event) {
        event.fail(PartCode::Validation, reason);
    } else if strings == Strings::LoneSurrogate && json_scan::has_lone_surrogate(&event.raw) {
        event.fail(PartCode::Validation, format!("the event {LONE_SURROGATE}"));
    }
    event
}

/// Why a part with an unpaired surrogate escape is refused.
const LONE_SURROGATE: &str = "has an unpaired UTF-16 surrogate escape (like \\ud800 alone), \
     which is not text and which standard JSON parsers reject";

/// The three fields of an event the gateway reads, borrowed from the
/// document. Read with serde rather than sonic-rs's object iterator, which
/// makes an owned `String` of every key of every event (about 2% of the
/// gateway's CPU at peak, docs/BENCHMARKS.md): other fields are skipped
/// without a copy, and a repeated `id`, `ip` or `timestamp` is serde's
/// "duplicate field" error.
#[derive(Deserialize)]
struct EventFields<'a> {
    #[serde(borrow, default)]
    id: Field<'a>,
    #[serde(borrow, default)]
    ip: Field<'a>,
    #[serde(borrow, default)]
    timestamp: Field<'a>,
}

/// A field as sent, `null` included; `None` when absent.
#[derive(Default)]
struct Field<'a>(Option<LazyValue<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        LazyValue::deserialize(deserializer).map(|value| Field(Some(value)))
    }
}

/// The value of one of an event's fields, as the checks read it.
///
/// The usual forms, a string with no escape, `null` and an unsigned integer,
/// are read straight from the text the document's parse validated; anything
/// else goes through sonic-rs. A `from_str` per field cost more than finding
/// the three fields (docs/BENCHMARKS.md, change 19).
enum FieldValue<'a> {
    /// A string with no escape, quotes included.
    Text(&'a str),
    Null,
    /// Only ASCII digits.
    Unsigned(&'a str),
    Parsed(LazyValue<'a>),
}

impl<'a> FieldValue<'a> {
    /// The value whose JSON text is `text` (already validated).
    fn read(text: &'a str) -> Result<Self, String> {
        let bytes = text.as_bytes();
        let plain_string = bytes.len() >= 2
            && bytes[0] == b'"'
            && bytes[bytes.len() - 1] == b'"'
            && !bytes[1..bytes.len() - 1].contains(&b'\\');
        if plain_string {
            return Ok(Self::Text(text));
        }
        if text == "null" {
            return Ok(Self::Null);
        }
        if !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit) {
            return Ok(Self::Unsigned(text));
        }
        sonic_rs::from_str(text)
            .map(Self::Parsed)
            .map_err(|e| not_valid_json(&first_line(&e)))
    }

    fn json_type(&self) -> JsonType {
        match self {
            Self::Text(_) => JsonType::String,
            Self::Null => JsonType::Null,
            Self::Unsigned(_) => JsonType::Number,
            Self::Parsed(value) => value.get_type(),
        }
    }

    /// The text of a string; `None` for other types and for a string whose
    /// escapes do not make text (a lone surrogate).
    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Text(raw) => Some(&raw[1..raw.len() - 1]),
            Self::Parsed(value) => value.as_str(),
            Self::Null | Self::Unsigned(_) => None,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        match self {
            Self::Unsigned(digits) => digits.parse().ok(),
            Self::Parsed(value) => value.as_u64(),
            Self::Text(_) | Self::Null => None,
        }
    }

    /// The value as sent.
    fn raw(&self) -> &str {
        match self {
            Self::Text(raw) | Self::Unsigned(raw) => raw,
            Self::Null => "null",
            Self::Parsed(value) => value.as_raw_str(),
        }
    }
}

/// `id`, `ip` and `timestamp` of an event, each as sent or `None`.
///
/// The document's parse has already validated the event, so
/// [`json_scan::object_fields`] only finds where they are; an event with an
/// escaped key (which might spell one of them) is read by serde instead.
fn event_fields(raw: &str) -> Result<[Option<FieldValue<'_>>; 3], String> {
    match json_scan::object_fields(raw.as_bytes(), ["id", "ip", "timestamp"]) {
        Ok(ranges) => {
            let mut values = [None, None, None];
            for (value, range) in values.iter_mut().zip(ranges) {
                if let Some(range) = range {
                    // Ranges end at ASCII delimiters: always on a char boundary.
                    let text = raw.get(range).ok_or_else(|| not_valid_json(&"not UTF-8"))?;
                    *value = Some(FieldValue::read(text)?);
                }
            }
            Ok(values)
        }
        Err(json_scan::FieldsError::Duplicate(name)) => Err(appears_twice(name)),
        Err(json_scan::FieldsError::Unreadable) => event_fields_by_serde(raw),
    }
}

/// [`event_fields`] by a full parse of the event.
fn event_fields_by_serde(raw: &str) -> Result<[Option<FieldValue<'_>>; 3], String> {
    let fields: EventFields =
        sonic_rs::from_str(raw).map_err(|e| match duplicate_field(&e.to_string()) {
            Some(name) => appears_twice(name),
            None => not_valid_json(&first_line(&e)),
        })?;
    Ok([fields.id.0, fields.ip.0, fields.timestamp.0].map(|v| v.map(FieldValue::Parsed)))
}

fn appears_twice(name: &str) -> String {
    format!("field {name:?} appears more than once")
}

fn not_valid_json(reason: &dyn std::fmt::Display) -> String {
    format!("the event is not valid JSON: {reason}")
}

/// The name in serde's "duplicate field `name`" error.
fn duplicate_field(message: &str) -> Option<&str> {
    let rest = message.split("duplicate field `").nth(1)?;
    rest.split('`').next()
}

/// Checks an event whose text (valid JSON) is `item`.
fn check_event(item: &str, event: &mut Event) -> Result<(), String> {
    let json_type = match item.as_bytes()[0] {
        b'{' => JsonType::Object,
        b'[' => JsonType::Array,
        b'"' => JsonType::String,
        b't' | b'f' => JsonType::Boolean,
        b'n' => JsonType::Null,
        _ => JsonType::Number,
    };
    if json_type != JsonType::Object {
        return Err(format!(
            "an event must be a JSON object, not {}",
            type_name(json_type)
        ));
    }
    let [id, ip, timestamp] = event_fields(item)?;

    let id = id.ok_or_else(|| "id is required".to_owned())?;
    let id_text = id
        .as_str()
        .ok_or_else(|| not_a_string("id", id.json_type()))?;
    match EventId::parse(id_text) {
        Ok(valid) => event.id = Some(valid.into_string()),
        Err(error) => {
            event.id = Some(id_text.to_owned());
            return Err(error.to_string());
        }
    }

    match ip {
        Some(ip) if ip.json_type() != JsonType::Null => {
            let text = ip
                .as_str()
                .ok_or_else(|| not_a_string("ip", ip.json_type()))?;
            event.ip = SentIp::Text(text.to_owned());
        }
        _ => event.ip = SentIp::Absent,
    }

    if let Some(timestamp) = timestamp {
        if timestamp.json_type() != JsonType::Null && timestamp.as_u64().is_none() {
            return Err(format!(
                "timestamp must be a non-negative integer (milliseconds since the epoch), not {}",
                trimmed(timestamp.raw())
            ));
        }
    }
    Ok(())
}

/// Deepest nesting of arrays and objects a batch may have (the message
/// contract's, which the ingester checks too).
pub use venus_shared::message::MAX_NESTING;

/// Most fields `meta` may have.
pub const MAX_META_FIELDS: usize = 256;

/// Client text quoted in a message: at most 64 characters, so that a huge
/// value cannot blow up responses, logs and spans.
pub fn trimmed(text: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        None => std::borrow::Cow::Borrowed(text),
        Some((end, _)) => std::borrow::Cow::Owned(format!("{}…", &text[..end])),
    }
}

/// Why a value of `field` of this type is not usable as a string.
fn not_a_string(field: &str, json_type: JsonType) -> String {
    match json_type {
        // A JSON string whose escapes do not make text (a lone surrogate).
        JsonType::String => format!("{field} is not a valid string (bad escape sequence)"),
        other => format!("{field} must be a string, not {}", type_name(other)),
    }
}

/// sonic-rs errors end with a drawing of the input around the error;
/// the client gets the sentence only.
fn first_line(error: &sonic_rs::Error) -> String {
    error
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn type_name(t: JsonType) -> &'static str {
    match t {
        JsonType::Null => "null",
        JsonType::Boolean => "a boolean",
        JsonType::Number => "a number",
        JsonType::String => "a string",
        JsonType::Array => "an array",
        JsonType::Object => "an object",
    }
}

/// A slice of `document` for `part`, which must be borrowed from it; falls
/// back to a copy if it is not (it always is for sonic-rs lazy values).
fn share(document: &Bytes, part: &str) -> Bytes {
    let base = document.as_ptr() as usize;
    let start = part.as_ptr() as usize;
    if start >= base && start + part.len() <= base + document.len() {
        document.slice(start - base..start - base + part.len())
    } else {
        Bytes::copy_from_slice(part.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::UploadRequest;

    /// The quick field finder and a full serde parse read the same fields,
    /// the quick reading of a value reads what sonic-rs does (type, text,
    /// unsigned integer), and both fail with the same message, on events of
    /// every shape the document's parse lets through: escaped and repeated
    /// keys, nested values with brackets and quotes in strings, any
    /// whitespace.
    #[test]
    fn the_field_finder_reads_what_a_full_parse_reads() {
        const KEYS: &[&str] = &[
            r#""id""#,
            r#""ip""#,
            r#""timestamp""#,
            r#""x""#,
            r#""idd""#,
            r#""""#,
            r#""i\u0064""#,
            r#""t\"s""#,
            r#""ip ""#,
        ];
        const VALUES: &[&str] = &[
            r#""evt-1""#,
            r#""a\"b}""#,
            r#""\u00e9[""#,
            r#""81.2.69.142""#,
            "0",
            "-1.5e3",
            "1763779200000",
            "18446744073709551615",
            "18446744073709551616",
            "1.0",
            "-0",
            "1e2",
            r#""""#,
            r#""\ud800""#,
            r#""1763779200000""#,
            "true",
            "false",
            "null",
            "{}",
            "[]",
            r#"{"a":["}",{"b":"]\\"}],"c":null}"#,
            r#"[1,"x",[{}],{"y":[]}]"#,
        ];
        const SPACE: &[&str] = &["", " ", "\n\t ", "\r\n"];
        let mut rng = crate::xorshift(0x9e37_79b9_7f4a_7c15);
        let mut next = move |n: usize| (rng() % n as u64) as usize;
        let (mut found, mut failed) = (0, 0);
        // A lazy value is validated: the check below can fail.
        assert!(sonic_rs::from_str::<LazyValue>(r#"{"a":[1,]}"#).is_err());
        for _ in 0..5_000 {
            let mut event = format!("{}{{", SPACE[next(SPACE.len())]);
            let mut escaped_key = false;
            for field in 0..next(6) {
                if field > 0 {
                    event.push_str(SPACE[next(SPACE.len())]);
                    event.push(',');
                }
                let (space, key, value) = (
                    SPACE[next(SPACE.len())],
                    KEYS[next(KEYS.len())],
                    VALUES[next(VALUES.len())],
                );
                escaped_key |= key.contains('\\');
                event.push_str(&format!("{space}{key}{space}:{space}{value}"));
            }
            event.push_str(SPACE[next(SPACE.len())]);
            event.push('}');
            // Valid as the document's parse reads an event (a lazy value:
            // an integer too large for u64 is valid JSON).
            assert!(sonic_rs::from_str::<LazyValue>(&event).is_ok(), "{event}");
            // Each value as sent and as the checks read it.
            let raw = |values: Result<[Option<FieldValue>; 3], String>| {
                values.map(|v| {
                    v.map(|v| {
                        v.map(|v| {
                            let read = (v.json_type(), v.as_str().map(str::to_owned), v.as_u64());
                            (v.raw().to_owned(), read)
                        })
                    })
                })
            };
            // Only an escaped key sends an event to the full parse.
            if !escaped_key {
                let finder = json_scan::object_fields(event.as_bytes(), ["id", "ip", "timestamp"]);
                assert_ne!(finder, Err(json_scan::FieldsError::Unreadable), "{event}");
            }
            let quick = raw(event_fields(&event));
            assert_eq!(quick, raw(event_fields_by_serde(&event)), "{event}");
            match quick {
                Ok(_) => found += 1,
                Err(_) => failed += 1,
            }
        }
        // Both outcomes were exercised.
        assert!(
            found > 1_000 && failed > 500,
            "{found} read, {failed} refused"
        );
    }

    fn limits(max_events: usize) -> BatchLimits {
        BatchLimits {
            max_events,
            max_meta_bytes: 1024,
        }
    }

    fn run_with(handler: &SplitAndValidate, document: &str) -> (UploadContext, Outcome) {
        let mut ctx = UploadContext::new(UploadRequest {
            anonymous: false,
            key: None,
            request_id: "r".into(),
            client_ip: "127.0.0.1".parse().unwrap(),
            document: Bytes::from(document.to_owned()),
        });
        let outcome = handler.run(&mut ctx);
        (ctx, outcome)
    }

    fn run(document: &str) -> (UploadContext, Outcome) {
        run_with(&SplitAndValidate::new(limits(3), &[], None), document)
    }

    /// The 400 message of a malformed request.
    fn rejected(document: &str) -> String {
        let (ctx, outcome) = run(document);
        let reply = outcome
            .responder
            .expect("a malformed request gets a response");
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{document}");
        assert!(reply.body.parts.is_empty());
        assert!(ctx.events.is_empty());
        assert_eq!(outcome.error.unwrap().message, reply.body.data);
        reply.body.data
    }

    /// The reason event 0 failed with, given a valid meta.
    fn event_failure(event: &str) -> (PartCode, String) {
        let doc = format!(
            r#"{{"meta":{{"app_id":"a","category":"c"}},"data":[{event},{{"id":"other"}}]}}"#
        );
        let (ctx, outcome) = run(&doc);
        assert!(outcome.responder.is_none(), "one valid event remains");
        assert!(outcome.error.is_some(), "an invalid event is an error");
        match &ctx.events[0].status {
            EventStatus::Failed { code, reason } => (*code, reason.clone()),
            other => panic!("{event}: expected a failure, got {other:?}"),
        }
    }

    const META: &str = r#""meta":{"app_id":"app-1","category":"page_view","sdk":"ios/1.2"}"#;

    #[test]
    fn a_valid_batch_keeps_meta_and_events_as_sent() {
        let doc = format!(
            r#"{{{META}, "data":[ {{"id":"e1","n":1.50,"ip":"1.2.3.4"}} , {{"id":"e2","timestamp":1700000000000,"nested":{{"a":[1,2]}}}}]}}"#
        );
        let (ctx, outcome) = run(&doc);
        assert!(outcome.error.is_none() && outcome.responder.is_none());
        let batch = ctx.batch.unwrap();
        assert_eq!(batch.app_id.as_str(), "app-1");
        assert_eq!(batch.category.as_str(), "page_view");
        assert_eq!(
            &batch.meta[..],
            br#"{"app_id":"app-1","category":"page_view","sdk":"ios/1.2"}"#
        );
        assert_eq!(ctx.events.len(), 2);
        assert_eq!(
            &ctx.events[0].raw[..],
            br#"{"id":"e1","n":1.50,"ip":"1.2.3.4"}"#
        );
        assert_eq!(ctx.events[0].ip, SentIp::Text("1.2.3.4".into()));
        assert_eq!(ctx.events[1].ip, SentIp::Absent);
        assert_eq!(
            &ctx.events[1].raw[..],
            br#"{"id":"e2","timestamp":1700000000000,"nested":{"a":[1,2]}}"#
        );
        assert!(ctx.events.iter().all(|e| e.is_pending()));

        // Other top-level keys are skipped wherever they are; a key may be
        // written with escapes.
        let doc = format!(
            r#"{{"v":{{"x":[1,{{"y":null}}]}},{META},"extra":"s","d\u0061ta":[{{"id":"e1"}},{{"id":"e2"}}],"z":[]}}"#
        );
        let (ctx, outcome) = run(&doc);
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(ctx.events.len(), 2);
        assert_eq!(&ctx.events[1].raw[..], br#"{"id":"e2"}"#);
    }

    #[test]
    fn malformed_documents_are_rejected_with_their_reason() {
        assert!(rejected("").contains("JSON object"));
        assert!(rejected("[1,2]").contains("JSON object"));
        assert!(rejected("{\"meta\":").contains("not valid JSON"));
        assert!(rejected(&format!(r#"{{{META},"data":[{{"id":"a","x":tru}}]}}"#)).contains("JSON"));
        assert!(rejected(&format!(r#"{{{META},"data":[]}} trailing"#)).contains("JSON"));
        assert!(rejected(r#"{"data":[{"id":"a"}]}"#).contains("meta is required"));
        assert!(rejected(r#"{"meta":null,"data":[{"id":"a"}]}"#).contains("meta is required"));
        assert!(
            rejected(r#"{"meta":"x","data":[{"id":"a"}]}"#).contains("meta must be a JSON object")
        );
        assert!(rejected(&format!("{{{META}}}")).contains("data is required"));
        assert!(rejected(&format!(r#"{{{META},"data":{{}}}}"#)).contains("data must be an array"));
        for not_an_array in ["{\"a\":[1]}", "\"x\"", "3", "-1.5", "true"] {
            let reason = rejected(&format!(r#"{{{META},"data":{not_an_array}}}"#));
            assert!(
                reason.contains("data must be an array"),
                "{not_an_array}: {reason}"
            );
        }
        assert!(rejected(&format!(r#"{{{META},"data":null}}"#)).contains("data is required"));
        // A number no parser can hold is valid JSON, and not an array.
        let infinite = rejected(&format!(r#"{{{META},"data":1e999}}"#));
        assert!(infinite.contains("data must be an array"), "{infinite}");
        let twice = format!(r#"{{{META},"data":[{{"id":"a"}}],"data":[{{"id":"b"}}]}}"#);
        assert!(rejected(&twice).contains("duplicate field `data`"));
        let twice = format!(r#"{{{META},{META},"data":[{{"id":"a"}}]}}"#);
        assert!(rejected(&twice).contains("duplicate field `meta`"));
        let bad_inside = format!(r#"{{{META},"data":[{{"id":"a"}},[1,}}]}}"#);
        assert!(rejected(&bad_inside).contains("not valid JSON"));
        assert!(rejected(&format!(r#"{{{META},"data":[]}}"#)).contains("at least one event"));
        assert!(rejected(&format!(
            r#"{{{META},"data":[{{"id":"1"}},{{"id":"2"}},{{"id":"3"}},{{"id":"4"}}]}}"#
        ))
        .contains("4 events; at most 3"));
    }

    #[test]
    fn invalid_utf8_is_rejected_not_parsed() {
        let mut doc =
            br#"{"meta":{"app_id":"a","category":"c"},"data":[{"id":"x","note":""}]}"#.to_vec();
        let at = doc.len() - 4;
        doc.insert(at, 0xc3);
        let handler = SplitAndValidate::new(limits(3), &[], None);
        let mut ctx = UploadContext::new(UploadRequest {
            anonymous: false,
            key: None,
            request_id: "r".into(),
            client_ip: "127.0.0.1".parse().unwrap(),
            document: Bytes::from(doc),
        });
        let outcome = handler.run(&mut ctx);
        let reply = outcome.responder.unwrap();
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert!(
            reply.body.data.contains("not valid UTF-8"),
            "{}",
            reply.body.data
        );
    }

    #[test]
    fn deep_nesting_is_rejected_before_the_parser_recurses() {
        let deep = format!(
            r#"{{"meta":{{"app_id":"a","category":"c"}},"data":[{}{}]}}"#,
            "[".repeat(200_000),
            "]".repeat(200_000)
        );
        assert!(rejected(&deep).contains("more than 32 levels"));
        // Brackets inside strings are text, not nesting.
        let doc = format!(
            r#"{{"meta":{{"app_id":"a","category":"c"}},"data":[{{"id":"s","text":"{}\"]"}}]}}"#,
            "[".repeat(500)
        );
        let (ctx, outcome) = run(&doc);
        assert!(outcome.responder.is_none(), "{:?}", outcome.error);
        assert!(ctx.events[0].is_pending());
        // As deep as allowed is fine.
        let nested = format!(
            r#"{{"meta":{{"app_id":"a","category":"c"}},"data":[{{"id":"n","x":{}1{}}}]}}"#,
            "[".repeat(MAX_NESTING - 3),
            "]".repeat(MAX_NESTING - 3)
        );
        assert!(run(&nested).0.events[0].is_pending());
    }

    #[test]
    fn the_490_byte_crash_is_a_400_naming_the_escape() {
        // sonic-rs reads `\u"abc` as one escape; the old nesting scan read
        // it as two bytes, so the brackets after it escaped the depth check
        // and the parser's recursion overflowed the stack.
        let doc = format!(
            r#"{{"meta":{{"app_id":"a","category":"c"}},"data":[{{"id":"x"}}],"s":"\u"abc","y":{}}}"#,
            "[".repeat(200_000)
        );
        let message = rejected(&doc);
        assert!(message.contains("invalid escape"), "{message}");
        assert!(message.contains(r#""\\u\"abc""#), "{message}");
    }

    #[test]
    fn an_invalid_escape_anywhere_makes_the_batch_invalid_json() {
        // In meta, in an event's field, in an event's key: where strings end
        // is then open to interpretation, so no part of the batch is used.
        for doc in [
            r#"{"meta":{"app_id":"a","category":"c","x":"\uZZZZ"},"data":[{"id":"1"}]}"#,
            r#"{"meta":{"app_id":"a","category":"c"},"data":[{"id":"1"},{"id":"2","x":"\uZZZZ"}]}"#,
            r#"{"meta":{"app_id":"a","category":"c"},"data":[{"id":"1","\q":1}]}"#,
        ] {
            let message = rejected(doc);
            assert!(message.contains("invalid escape"), "{doc}: {message}");
        }
    }

    #[test]
    fn a_lone_surrogate_fails_its_event_only() {
        let doc = r#"{"meta":{"app_id":"a","category":"c"},"data":[{"id":"1","t":"\ud800 x"},{"id":"2","t":"\ud83d\ude00"}]}"#;
        let (ctx, outcome) = run(doc);
        assert!(outcome.responder.is_none());
        match &ctx.events[0].status {
            EventStatus::Failed { code, reason } => {
                assert_eq!(*code, PartCode::Validation);
                assert!(reason.contains("unpaired UTF-16 surrogate"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(ctx.events[1].is_pending(), "a proper pair is fine");
    }

    #[test]
    fn a_lone_surrogate_in_meta_is_a_400() {
        let message =
            rejected(r#"{"meta":{"app_id":"a","category":"c","x":"\udc00"},"data":[{"id":"1"}]}"#);
        assert!(message.contains("meta has an unpaired"), "{message}");
    }

    #[test]
    fn meta_has_a_byte_limit() {
        let doc = format!(
            r#"{{"meta":{{"app_id":"a","category":"c","pad":"{}"}},"data":[{{"id":"1"}}]}}"#,
            "x".repeat(1024)
        );
        let message = rejected(&doc);
        assert!(message.contains("at most 1024 are allowed"), "{message}");
        let doc = format!(
            r#"{{"meta":{{"app_id":"a","category":"c","pad":"{}"}},"data":[{{"id":"1"}}]}}"#,
            "x".repeat(900)
        );
        assert!(run(&doc).1.responder.is_none());
    }

    #[test]
    fn a_huge_data_array_is_counted_not_kept() {
        let doc = format!(
            r#"{{"meta":{{"app_id":"a","category":"c"}},"data":[{}0]}}"#,
            "0,".repeat(100_000)
        );
        assert!(rejected(&doc).contains("100001 events; at most 3"));
    }

    #[test]
    fn meta_may_not_have_too_many_fields() {
        let fields: Vec<String> = (0..300).map(|i| format!(r#""f{i}":1"#)).collect();
        let doc = format!(
            r#"{{"meta":{{"app_id":"a","category":"c",{}}},"data":[{{"id":"1"}}]}}"#,
            fields.join(",")
        );
        let handler = SplitAndValidate::new(
            BatchLimits {
                max_events: 3,
                max_meta_bytes: 16 * 1024,
            },
            &[],
            None,
        );
        let reply = run_with(&handler, &doc).1.responder.unwrap();
        assert!(
            reply.body.data.contains("more than 256 fields"),
            "{}",
            reply.body.data
        );
    }

    #[test]
    fn client_values_quoted_in_reasons_are_trimmed() {
        let big = "9".repeat(10_000);
        let (_, reason) = event_failure(&format!(r#"{{"id":"a","timestamp":"{big}"}}"#));
        assert!(reason.len() < 200, "{}", reason.len());
        assert!(reason.ends_with('…'));
    }

    #[test]
    fn a_repeated_meta_key_is_rejected() {
        let message = rejected(
            r#"{"meta":{"app_id":"ok","category":"c","app_id":"other"},"data":[{"id":"1"}]}"#,
        );
        assert!(
            message.contains("meta.app_id appears more than once"),
            "{message}"
        );
    }

    #[test]
    fn a_lone_surrogate_is_a_bad_string_not_a_wrong_type() {
        let (code, reason) = event_failure(r#"{"id":"\ud800"}"#);
        assert_eq!(code, PartCode::Validation);
        assert!(reason.contains("not a valid string"), "{reason}");
    }

    #[test]
    fn meta_rules() {
        let data = r#""data":[{"id":"a"}]"#;
        for (meta, expected) in [
            (r#"{"category":"c"}"#, "meta.app_id is required"),
            (
                r#"{"app_id":7,"category":"c"}"#,
                "meta.app_id must be a string",
            ),
            (
                r#"{"app_id":"","category":"c"}"#,
                "meta.app_id must not be empty",
            ),
            (r#"{"app_id":"a b","category":"c"}"#, "meta.app_id contains"),
            (r#"{"app_id":"a"}"#, "meta.category is required"),
            (
                r#"{"app_id":"a","category":null}"#,
                "meta.category must be a string",
            ),
            (
                r#"{"app_id":"a","category":"a-b"}"#,
                "meta.category contains",
            ),
        ] {
            let message = rejected(&format!(r#"{{"meta":{meta},{data}}}"#));
            assert!(message.contains(expected), "{meta}: {message}");
        }
        let long = "x".repeat(65);
        let message = rejected(&format!(
            r#"{{"meta":{{"app_id":"{long}","category":"c"}},{data}}}"#
        ));
        assert!(message.contains("at most 64"), "{message}");
    }

    #[test]
    fn the_category_allow_list_applies_when_set() {
        let handler = SplitAndValidate::new(limits(10), &["click".to_string()], None);
        let (_, outcome) = run_with(
            &handler,
            r#"{"meta":{"app_id":"a","category":"click"},"data":[{"id":"1"}]}"#,
        );
        assert!(outcome.responder.is_none());
        let (_, outcome) = run_with(
            &handler,
            r#"{"meta":{"app_id":"a","category":"view"},"data":[{"id":"1"}]}"#,
        );
        let reply = outcome.responder.unwrap();
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert!(reply.body.data.contains("\"view\""));
    }

    #[test]
    fn reserved_categories_are_refused_before_any_event_is_read() {
        let reserved = Category::parse("dlq").ok();
        let handler = SplitAndValidate::new(limits(10), &[], reserved);
        for (category, why) in [
            ("__dead_letter", "reserved for the system's own topics"),
            ("__x", "reserved for the system's own topics"),
            ("dlq", "names the dead-letter topic"),
        ] {
            let (ctx, outcome) = run_with(
                &handler,
                &format!(
                    r#"{{"meta":{{"app_id":"a","category":"{category}"}},"data":[{{"id":"1"}}]}}"#
                ),
            );
            let reply = outcome.responder.expect("refused");
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{category}");
            assert!(
                reply.body.data.contains(why),
                "{category}: {}",
                reply.body.data
            );
            assert!(ctx.batch.is_none(), "{category}");
        }
        let (_, outcome) = run_with(
            &handler,
            r#"{"meta":{"app_id":"a","category":"_ok"},"data":[{"id":"1"}]}"#,
        );
        assert!(outcome.responder.is_none());
    }

    #[test]
    fn event_rules() {
        for (event, expected) in [
            ("7", "must be a JSON object, not a number"),
            ("[]", "must be a JSON object, not an array"),
            (r#"{"x":1}"#, "id is required"),
            (r#"{"id":5}"#, "id must be a string, not a number"),
            (r#"{"id":""}"#, "id must not be empty"),
            (
                r#"{"id":"a","id":"b"}"#,
                "field \"id\" appears more than once",
            ),
            // The same key written with an escape is the same key.
            (
                r#"{"ip":"1.2.3.4","id":"a","\u0069p":"5.6.7.8"}"#,
                "field \"ip\" appears more than once",
            ),
            (r#"{"id":null}"#, "id must be a string, not null"),
            (
                r#"{"x":{"id":"nested"},"y":[1,{"id":2}]}"#,
                "id is required",
            ),
            (r#"{"id":"a","ip":4}"#, "ip must be a string"),
            (
                r#"{"id":"a","timestamp":"now"}"#,
                "timestamp must be a non-negative integer",
            ),
            (
                r#"{"id":"a","timestamp":-1}"#,
                "timestamp must be a non-negative integer",
            ),
            (
                r#"{"id":"a","timestamp":1.5}"#,
                "timestamp must be a non-negative integer",
            ),
        ] {
            let (code, reason) = event_failure(event);
            assert_eq!(code, PartCode::Validation, "{event}");
            assert!(reason.contains(expected), "{event}: {reason}");
        }
        let long = format!(r#"{{"id":"{}"}}"#, "i".repeat(129));
        assert!(event_failure(&long).1.contains("at most 128"));
    }

    #[test]
    fn null_ip_and_timestamp_count_as_absent() {
        let doc = format!(r#"{{{META},"data":[{{"id":"a","ip":null,"timestamp":null}}]}}"#);
        let (ctx, outcome) = run(&doc);
        assert!(outcome.error.is_none());
        assert_eq!(ctx.events[0].ip, SentIp::Absent);
    }

    #[test]
    fn an_escaped_id_is_unescaped() {
        let doc = format!(r#"{{{META},"data":[{{"id":"a\"b\u00e9"}}]}}"#);
        let (ctx, _) = run(&doc);
        assert_eq!(ctx.events[0].id.as_deref(), Some("a\"bé"));
    }

    #[test]
    fn repeated_ids_fail_every_occurrence_after_the_first() {
        let doc = format!(r#"{{{META},"data":[{{"id":"a"}},{{"id":"b"}},{{"id":"a"}}]}}"#);
        let (ctx, outcome) = run(&doc);
        assert!(ctx.events[0].is_pending());
        assert!(ctx.events[1].is_pending());
        assert!(matches!(
            &ctx.events[2].status,
            EventStatus::Failed { code: PartCode::Validation, reason } if reason.contains("more than once")
        ));
        assert!(outcome.error.unwrap().message.contains("1 of 3 events"));
    }

    #[test]
    fn all_events_invalid_ends_the_chain_with_400_and_parts() {
        let doc = format!(r#"{{{META},"data":[{{"id":5}},{{"x":1}}]}}"#);
        let (_, outcome) = run(&doc);
        let reply = outcome.responder.unwrap();
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.body.parts.len(), 2);
        assert!(reply
            .body
            .parts
            .iter()
            .all(|p| p.code == PartCode::Validation));
        assert_eq!(reply.body.parts[0].id, None);
        assert!(outcome.error.is_some());
    }
}
