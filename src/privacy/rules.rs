//! Field rules: a path into `meta` or an event, and what to do with the
//! value found there.
//!
//! A rule rewrites only the objects and arrays on its path: every other
//! value is copied as its bytes were sent, and a document no rule matches is
//! not copied at all (the caller keeps the original bytes). An object or
//! array that is rewritten loses the whitespace between its tokens; its
//! other members keep their bytes.

use std::borrow::Cow;

use super::detect::{self, Detector};
use super::hash::HashKey;

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A member of an object.
    Key(String),
    /// Every item of an array (`[*]`).
    Items,
}

/// Where a rule applies: the top-level object and the path inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    Meta,
    Data,
}

/// What a rule does to the value it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The member (or array item) is left out.
    Remove,
    /// The value becomes a string: the keyed hash of the string's text (or
    /// of the JSON text of any other value).
    Hash,
    /// A string keeps its length in `*`; any other value but `null` becomes
    /// `"***"`.
    Mask,
    /// Personal data found in a string is replaced (see `detect`); other
    /// values stay.
    Scrub(Vec<Detector>),
}

impl Action {
    pub fn uses_key(&self) -> bool {
        matches!(self, Self::Hash)
    }
}

/// A checked rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRule {
    pub root: Root,
    pub path: Vec<Segment>,
    pub action: Action,
}

/// Fields the pipeline itself reads: a rule may not change them.
const PROTECTED: [(&str, &str); 4] = [
    ("meta", "app_id"),
    ("meta", "category"),
    ("data", "id"),
    ("data", "ip"),
];

impl FieldRule {
    /// Parses `path` (`data.a.b[*].c`) and `action`; the error says what is
    /// wrong in words for the configuration error.
    pub fn parse(path: &str, action: &str, detect: &[String]) -> Result<Self, String> {
        let (root, rest) = match path.split_once('.') {
            Some(("meta", rest)) => (Root::Meta, rest),
            Some(("data", rest)) => (Root::Data, rest),
            _ => {
                return Err(format!(
                    "path {path:?} must start with \"data.\" or \"meta.\""
                ))
            }
        };
        let mut segments = Vec::new();
        for part in rest.split('.') {
            let (name, items) = match part.strip_suffix("[*]") {
                Some(name) => (name, true),
                None => (part, false),
            };
            if name.is_empty() || name.contains(['[', ']', '*']) {
                return Err(format!(
                    "path {path:?}: {part:?} is not a field name (fields are separated by '.', and [*] after a name means every item of its array)"
                ));
            }
            segments.push(Segment::Key(name.to_owned()));
            if items {
                segments.push(Segment::Items);
            }
        }
        let top = match (&root, &segments[0]) {
            (Root::Meta, Segment::Key(name)) => ("meta", name.as_str()),
            (Root::Data, Segment::Key(name)) => ("data", name.as_str()),
            _ => unreachable!("the first segment is a key"),
        };
        if segments.len() == 1 && PROTECTED.contains(&top) {
            return Err(format!(
                "path {path:?} is read by the gateway itself and cannot be changed{}",
                if top == ("data", "ip") {
                    " (privacy.ip decides what is stored of it)"
                } else {
                    ""
                }
            ));
        }
        let action = match action {
            "remove" => Action::Remove,
            "hash" => Action::Hash,
            "mask" => Action::Mask,
            "scrub" => Action::Scrub(if detect.is_empty() {
                Detector::ALL.to_vec()
            } else {
                detect
                    .iter()
                    .map(|d| Detector::parse(d))
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("path {path:?}: detect: {e}"))?
            }),
            other => {
                return Err(format!(
                    "path {path:?}: action {other:?} is not one of remove, hash, mask, scrub"
                ))
            }
        };
        if !matches!(action, Action::Scrub(_)) && !detect.is_empty() {
            return Err(format!(
                "path {path:?}: detect is for the scrub action only"
            ));
        }
        Ok(Self {
            root,
            path: segments,
            action,
        })
    }

    /// `document` (the JSON text of `meta` or of one event) with the rule
    /// applied, or `None` when the rule found nothing to change.
    pub fn apply(&self, document: &str, key: Option<&HashKey>) -> Option<String> {
        rewrite(document, &self.path, &|raw| replace(raw, &self.action, key))
    }
}

/// What becomes of a value a rule found.
pub enum Replacement {
    Keep,
    Remove,
    /// The new value's JSON text.
    Value(String),
}

/// The replacement of one value's raw JSON text for `action`.
pub fn replace(raw: &str, action: &Action, key: Option<&HashKey>) -> Replacement {
    match action {
        Action::Remove => Replacement::Remove,
        Action::Hash => {
            let Some(key) = key else {
                // Checked at load: a rule that hashes has a key.
                return Replacement::Remove;
            };
            let text = string_value(raw);
            let input = text.as_deref().unwrap_or(raw);
            Replacement::Value(format!("\"{}\"", key.hash(input.as_bytes())))
        }
        Action::Mask => match string_value(raw) {
            Some(text) => Replacement::Value(format!("\"{}\"", "*".repeat(text.chars().count()))),
            None if raw.trim() == "null" => Replacement::Keep,
            None => Replacement::Value("\"***\"".to_owned()),
        },
        Action::Scrub(detectors) => match string_value(raw) {
            Some(text) => match detect::scrub(&text, detectors) {
                Cow::Borrowed(_) => Replacement::Keep,
                Cow::Owned(clean) => Replacement::Value(json_string(&clean)),
            },
            None => Replacement::Keep,
        },
    }
}

/// The text of a JSON string value, unescaped; `None` for other values.
fn string_value(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if !raw.starts_with('"') {
        return None;
    }
    sonic_rs::from_str::<String>(raw).ok()
}

fn json_string(text: &str) -> String {
    sonic_rs::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// `raw` (an object or array) with `replace` applied to what `path` finds
/// in it; `None` when nothing changed.
pub fn rewrite(
    raw: &str,
    path: &[Segment],
    replace: &dyn Fn(&str) -> Replacement,
) -> Option<String> {
    let (first, rest) = path.split_first()?;
    let trimmed = raw.trim_start();
    match first {
        Segment::Key(name) if trimmed.starts_with('{') => {
            let mut out = String::with_capacity(raw.len());
            out.push('{');
            let mut changed = false;
            let mut members = 0;
            for member in sonic_rs::to_object_iter(raw) {
                let (key, value) = member.ok()?;
                let value_raw = value.as_raw_str();
                let new = if key.as_ref() == name.as_str() {
                    if rest.is_empty() {
                        replace(value_raw)
                    } else {
                        match rewrite(value_raw, rest, replace) {
                            Some(text) => Replacement::Value(text),
                            None => Replacement::Keep,
                        }
                    }
                } else {
                    Replacement::Keep
                };
                let text = match &new {
                    Replacement::Remove => {
                        changed = true;
                        continue;
                    }
                    Replacement::Value(text) => {
                        changed = true;
                        text.as_str()
                    }
                    Replacement::Keep => value_raw,
                };
                if members > 0 {
                    out.push(',');
                }
                members += 1;
                out.push_str(&json_string(key.as_ref()));
                out.push(':');
                out.push_str(text);
            }
            out.push('}');
            changed.then_some(out)
        }
        Segment::Items if trimmed.starts_with('[') => {
            let mut out = String::with_capacity(raw.len());
            out.push('[');
            let mut changed = false;
            let mut items = 0;
            for item in sonic_rs::to_array_iter(raw) {
                let item = item.ok()?;
                let item_raw = item.as_raw_str();
                let new = if rest.is_empty() {
                    replace(item_raw)
                } else {
                    match rewrite(item_raw, rest, replace) {
                        Some(text) => Replacement::Value(text),
                        None => Replacement::Keep,
                    }
                };
                let text = match &new {
                    Replacement::Remove => {
                        changed = true;
                        continue;
                    }
                    Replacement::Value(text) => {
                        changed = true;
                        text.as_str()
                    }
                    Replacement::Keep => item_raw,
                };
                if items > 0 {
                    out.push(',');
                }
                items += 1;
                out.push_str(text);
            }
            out.push(']');
            changed.then_some(out)
        }
        // The path goes on where the document has no object or array: the
        // rule finds nothing here.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> HashKey {
        HashKey::new(b"a test key of 32 bytes, not used").unwrap()
    }

    fn apply(path: &str, action: &str, document: &str) -> Option<String> {
        FieldRule::parse(path, action, &[])
            .unwrap()
            .apply(document, Some(&key()))
    }

    #[test]
    fn paths_parse_into_segments_and_bad_ones_say_why() {
        let rule = FieldRule::parse("data.items[*].card", "remove", &[]).unwrap();
        assert_eq!(rule.root, Root::Data);
        assert_eq!(
            rule.path,
            [
                Segment::Key("items".into()),
                Segment::Items,
                Segment::Key("card".into())
            ]
        );
        for (path, action, why) in [
            ("user.email", "remove", "must start with"),
            ("data.", "remove", "not a field name"),
            ("data.a[0]", "remove", "not a field name"),
            ("data.a", "shred", "not one of remove, hash, mask, scrub"),
            ("meta.app_id", "hash", "read by the gateway itself"),
            ("data.id", "remove", "read by the gateway itself"),
            ("data.ip", "mask", "privacy.ip decides"),
        ] {
            let err = FieldRule::parse(path, action, &[]).unwrap_err();
            assert!(err.contains(why), "{path} {action}: {err}");
        }
        assert!(FieldRule::parse("data.note", "scrub", &["iban".into()])
            .unwrap_err()
            .contains("not a detector"));
        assert!(FieldRule::parse("data.note", "remove", &["email".into()])
            .unwrap_err()
            .contains("scrub action only"));
    }

    #[test]
    fn remove_hash_and_mask_touch_only_their_field() {
        let event = r#"{"id":"e1","email":"jane@example.com","n":1.50,"nested":{"keep":[1, 2]}}"#;
        assert_eq!(
            apply("data.email", "remove", event).unwrap(),
            r#"{"id":"e1","n":1.50,"nested":{"keep":[1, 2]}}"#
        );
        let hashed = apply("data.email", "hash", event).unwrap();
        let expected = key().hash(b"jane@example.com");
        assert_eq!(
            hashed,
            format!(r#"{{"id":"e1","email":"{expected}","n":1.50,"nested":{{"keep":[1, 2]}}}}"#)
        );
        assert_eq!(
            apply("data.email", "mask", event).unwrap(),
            r#"{"id":"e1","email":"****************","n":1.50,"nested":{"keep":[1, 2]}}"#
        );
        assert_eq!(apply("data.absent", "remove", event), None, "nothing to do");
        assert_eq!(
            apply("data.n.deeper", "remove", event),
            None,
            "not an object"
        );
    }

    #[test]
    fn wildcards_reach_every_item() {
        let event = r#"{"id":"e","items":[{"sku":"a","card":"4111"},{"sku":"b"},{"card":"5500"}]}"#;
        assert_eq!(
            apply("data.items[*].card", "remove", event).unwrap(),
            r#"{"id":"e","items":[{"sku":"a"},{"sku":"b"},{}]}"#
        );
        let tags = r#"{"id":"e","tags":["a@b.io","plain"]}"#;
        assert_eq!(
            apply("data.tags[*]", "scrub", tags).unwrap(),
            r#"{"id":"e","tags":["[email]","plain"]}"#
        );
    }

    #[test]
    fn escaped_strings_are_read_as_text_and_written_back_escaped() {
        let event = r#"{"id":"e","note":"call \"me\" at jane\u0040example.com"}"#;
        assert_eq!(
            apply("data.note", "scrub", event).unwrap(),
            r#"{"id":"e","note":"call \"me\" at [email]"}"#
        );
        // The hash of a string is the hash of its text, however escaped.
        let plain = apply("data.note", "hash", r#"{"note":"a@b"}"#).unwrap();
        let escaped = apply("data.note", "hash", r#"{"note":"a\u0040b"}"#).unwrap();
        assert_eq!(plain, escaped);
    }
}
