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
use crate::json_scan;

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

/// Fields the gateway or the ingester reads: a rule may not change them
/// (a hashed `timestamp` would make the event a dead letter).
const PROTECTED: [(&str, &str); 5] = [
    ("meta", "app_id"),
    ("meta", "category"),
    ("data", "id"),
    ("data", "ip"),
    ("data", "timestamp"),
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
                "path {path:?} is read by the gateway itself (or the ingester) and cannot be changed{}",
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
}

/// The rules of one root (`meta` or an event), merged by path, so that one
/// walk over a document applies them all: each object and array on a path
/// is read once, whatever the number of rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleTree {
    /// By member name; a few rules make a short list, searched in order.
    members: Vec<(String, Node)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Node {
    /// Applied to the value at this path, in the order the rules were given.
    actions: Vec<Action>,
    /// Rules further down, in this value's members...
    members: RuleTree,
    /// ...or in every item of this value's array.
    items: Option<Box<Node>>,
}

impl RuleTree {
    pub fn new<'a>(rules: impl IntoIterator<Item = &'a FieldRule>) -> Self {
        let mut tree = Self::default();
        for rule in rules {
            tree.insert(&rule.path, rule.action.clone());
        }
        tree
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    fn insert(&mut self, path: &[Segment], action: Action) {
        let Some((Segment::Key(name), rest)) = path.split_first() else {
            return;
        };
        let index = match self.members.iter().position(|(n, _)| n == name) {
            Some(index) => index,
            None => {
                self.members.push((name.clone(), Node::default()));
                self.members.len() - 1
            }
        };
        self.members[index].1.insert(rest, action);
    }

    fn get(&self, name: &str) -> Option<&Node> {
        self.members
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, node)| node)
    }

    /// `document` (an object's JSON text) with every rule applied, and
    /// `extra` on its top-level member of that name; `None` when nothing
    /// changed.
    pub fn apply(
        &self,
        document: &str,
        hashes: &mut Hashes<'_>,
        extra: Option<MemberRewrite<'_>>,
    ) -> Option<String> {
        rewrite_object(document, self, hashes, extra)
    }
}

impl Node {
    fn insert(&mut self, path: &[Segment], action: Action) {
        match path.split_first() {
            None => self.actions.push(action),
            Some((Segment::Items, rest)) => self
                .items
                .get_or_insert_with(Default::default)
                .insert(rest, action),
            Some((Segment::Key(_), _)) => self.members.insert(path, action),
        }
    }

    /// What becomes of `raw` (a value at this node's path).
    fn apply(&self, raw: &str, hashes: &mut Hashes<'_>) -> Replacement {
        let mut current: Option<String> = None;
        let trimmed = raw.trim_start();
        if !self.members.is_empty() && trimmed.starts_with('{') {
            current = rewrite_object(raw, &self.members, hashes, None);
        } else if let Some(items) = &self.items {
            if trimmed.starts_with('[') {
                current = rewrite_array(raw, items, hashes);
            }
        }
        for action in &self.actions {
            match replace(current.as_deref().unwrap_or(raw), action, hashes) {
                Replacement::Remove => return Replacement::Remove,
                Replacement::Value(value) => current = Some(value),
                Replacement::Keep => {}
            }
        }
        match current {
            Some(value) => Replacement::Value(value),
            None => Replacement::Keep,
        }
    }
}

/// The keyed hashes of one batch: the key, and the values already hashed
/// (a batch's events mostly share a user id, a session, an address).
pub struct Hashes<'a> {
    key: Option<&'a HashKey>,
    done: Vec<(String, String)>,
}

impl<'a> Hashes<'a> {
    pub fn new(key: Option<&'a HashKey>) -> Self {
        Self {
            key,
            done: Vec::new(),
        }
    }

    /// The stored form of `input`: 32 hex digits, as a JSON string.
    fn hash(&mut self, input: &str) -> Option<String> {
        if let Some((_, known)) = self.done.iter().find(|(i, _)| i == input) {
            return Some(known.clone());
        }
        let hashed = format!("\"{}\"", self.key?.hash(input.as_bytes()));
        // A handful per batch is what repeats; past that, no list to scan.
        if self.done.len() < 16 {
            self.done.push((input.to_owned(), hashed.clone()));
        }
        Some(hashed)
    }
}

/// A top-level member and what becomes of its value, beside the rules (an
/// event's own `ip`, rewritten as the IP mode stores it).
pub type MemberRewrite<'a> = (&'a str, &'a dyn Fn(&str) -> Replacement);

/// What becomes of a value a rule found.
pub enum Replacement {
    Keep,
    Remove,
    /// The new value's JSON text.
    Value(String),
}

/// The replacement of one value's raw JSON text for `action`.
fn replace(raw: &str, action: &Action, hashes: &mut Hashes<'_>) -> Replacement {
    match action {
        Action::Remove => Replacement::Remove,
        Action::Hash => {
            let text = string_value(raw);
            match hashes.hash(text.as_deref().unwrap_or(raw.trim())) {
                Some(hashed) => Replacement::Value(hashed),
                // Checked at load: a rule that hashes has a key.
                None => Replacement::Remove,
            }
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

/// The text of a JSON string value, unescaped (borrowed when it has no
/// escape); `None` for other values.
fn string_value(raw: &str) -> Option<Cow<'_, str>> {
    let raw = raw.trim();
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    sonic_rs::from_str::<String>(raw).ok().map(Cow::Owned)
}

fn json_string(text: &str) -> String {
    sonic_rs::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// The name a key's text (between its quotes) spells: itself, unless it
/// has an escape.
fn key_name(text: &str) -> Cow<'_, str> {
    if text.contains('\\') {
        sonic_rs::from_str::<String>(&format!("\"{text}\""))
            .map(Cow::Owned)
            .unwrap_or(Cow::Borrowed(text))
    } else {
        Cow::Borrowed(text)
    }
}

/// Appends `text` to the object or array being rebuilt, after a comma
/// unless it is the first.
fn push_part(out: &mut String, count: &mut usize, parts: &[&str]) {
    if *count > 0 {
        out.push(',');
    }
    *count += 1;
    for part in parts {
        out.push_str(part);
    }
}

/// An object with the rules of `tree` applied to its members (and `extra`
/// to the member it names); `None` when nothing changed. Members are found
/// by [`json_scan::for_each_member`]: the text was checked at the door.
fn rewrite_object(
    raw: &str,
    tree: &RuleTree,
    hashes: &mut Hashes<'_>,
    extra: Option<MemberRewrite<'_>>,
) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    out.push('{');
    let mut changed = false;
    let mut members = 0;
    json_scan::for_each_member(raw.as_bytes(), |key, value| {
        // Both ranges end at ASCII delimiters of valid UTF-8 text.
        let (key_text, value_raw) = (&raw[key], &raw[value]);
        let name = key_name(key_text);
        let mut new = match tree.get(&name) {
            Some(node) => node.apply(value_raw, hashes),
            None => Replacement::Keep,
        };
        if let Some((wanted, replace)) = extra {
            if wanted == name {
                let current = match &new {
                    Replacement::Value(text) => text.as_str(),
                    _ => value_raw,
                };
                match replace(current) {
                    Replacement::Keep => {}
                    other => new = other,
                }
            }
        }
        match &new {
            Replacement::Remove => changed = true,
            Replacement::Value(text) => {
                changed = true;
                push_part(&mut out, &mut members, &["\"", key_text, "\":", text]);
            }
            Replacement::Keep => {
                push_part(&mut out, &mut members, &["\"", key_text, "\":", value_raw]);
            }
        }
    })?;
    out.push('}');
    changed.then_some(out)
}

/// An array with `node`'s rules applied to every item; `None` when nothing
/// changed.
fn rewrite_array(raw: &str, node: &Node, hashes: &mut Hashes<'_>) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    out.push('[');
    let mut changed = false;
    let mut items = 0;
    json_scan::for_each_item(raw.as_bytes(), |item| {
        let item_raw = &raw[item];
        match node.apply(item_raw, hashes) {
            Replacement::Remove => changed = true,
            Replacement::Value(text) => {
                changed = true;
                push_part(&mut out, &mut items, &[&text]);
            }
            Replacement::Keep => push_part(&mut out, &mut items, &[item_raw]),
        }
    })?;
    out.push(']');
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> HashKey {
        HashKey::new(b"a test key of 32 bytes, not used").unwrap()
    }

    fn apply(path: &str, action: &str, document: &str) -> Option<String> {
        let rule = FieldRule::parse(path, action, &[]).unwrap();
        let key = key();
        RuleTree::new([&rule]).apply(document, &mut Hashes::new(Some(&key)), None)
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
            ("data.timestamp", "hash", "read by the gateway itself"),
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
    fn several_rules_apply_in_one_walk_and_in_their_order() {
        let rules: Vec<FieldRule> = [
            ("data.user", "hash"),
            ("data.props.query", "scrub"),
            ("data.props.tags[*].mail", "remove"),
            ("data.session", "remove"),
            ("data.user", "mask"),
        ]
        .iter()
        .map(|(path, action)| FieldRule::parse(path, action, &[]).unwrap())
        .collect();
        let key = key();
        let tree = RuleTree::new(&rules);
        let event = r#"{"id":"e","user":"u1","session":"s","props":{"query":"a@b.io","tags":[{"mail":"x","k":1}]},"n":2}"#;
        let mut hashes = Hashes::new(Some(&key));
        let out = tree.apply(event, &mut hashes, None).unwrap();
        // The hash of "u1", then masked: 32 stars.
        assert_eq!(
            out,
            format!(
                r#"{{"id":"e","user":"{}","props":{{"query":"[email]","tags":[{{"k":1}}]}},"n":2}}"#,
                "*".repeat(32)
            )
        );
        assert_eq!(tree.apply(r#"{"id":"e","n":2}"#, &mut hashes, None), None);
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
