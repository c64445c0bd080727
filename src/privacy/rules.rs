//! Field rules: a path into `meta` or an event, and what to do with the
//! value found there.
//!
//! One walk over a document applies every rule: it reads each byte once,
//! descending only into the objects and arrays on a rule's path, and
//! records what changes as edits (a range of the text and what takes its
//! place); the result is the document with its edits spliced in, made in
//! one copy. Every byte no rule changes stays as it was sent, whitespace
//! included; a removed member or item takes its comma with it. A document
//! no rule changes is not copied at all (the caller keeps the original
//! bytes).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

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
    /// `extra` on its top-level member of that name; `Ok(None)` when
    /// nothing changed. [`Unreadable`] when the text is not the object the
    /// door accepted, anywhere on a rule's path: the caller must not store
    /// it as it is, since a rule could not be applied.
    pub fn apply(
        &self,
        document: &str,
        scratch: &mut Scratch<'_>,
        extra: Option<MemberRewrite<'_>>,
    ) -> Result<Option<String>, Unreadable> {
        scratch.edits.clear();
        let start = json_scan::skip_whitespace(document.as_bytes(), 0);
        rewrite_object(document, start, self, scratch, extra).ok_or(Unreadable)?;
        if scratch.edits.is_empty() {
            return Ok(None);
        }
        Ok(Some(splice(document, 0..document.len(), &scratch.edits)))
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

    /// Records the edits of the value starting at `start` (at this node's
    /// path): the rules further down first, then this node's actions, in
    /// order, on the value as those left it. Returns where the value ends
    /// and whether it is removed (then it has no edits of its own).
    fn rewrite(&self, doc: &str, start: usize, scratch: &mut Scratch<'_>) -> Option<(usize, bool)> {
        let mark = scratch.edits.len();
        let end = match (doc.as_bytes().get(start), &self.items) {
            (Some(b'{'), _) if !self.members.is_empty() => {
                rewrite_object(doc, start, &self.members, scratch, None)?
            }
            (Some(b'['), Some(items)) => rewrite_array(doc, start, items, scratch)?,
            _ => json_scan::value_end(doc.as_bytes(), start)?,
        };
        if self.actions.is_empty() {
            return Some((end, false));
        }
        // An action reads the value as the rules below it left it: this is
        // the one place a value is made before the final splice (a rule on
        // an object and another inside it; rare).
        let mut current = (scratch.edits.len() > mark)
            .then(|| Replacement::Value(splice(doc, start..end, &scratch.edits[mark..])));
        for action in &self.actions {
            let replaced = {
                let text = match &current {
                    Some(replacement) => replacement.json_text(),
                    None => Cow::Borrowed(&doc[start..end]),
                };
                replace(&text, action, scratch)
            };
            match replaced {
                Replacement::Keep => {}
                Replacement::Remove => {
                    scratch.edits.truncate(mark);
                    return Some((end, true));
                }
                other => current = Some(other),
            }
        }
        if let Some(with) = current {
            scratch.edits.truncate(mark);
            scratch.edits.push(Edit {
                range: start..end,
                with,
            });
        }
        Some((end, false))
    }
}

/// A document the rules could not be applied to: not the JSON object the
/// door accepted (which cannot happen to a document that passed
/// `split_and_validate`; if it does, nothing of it may be stored unrewritten).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// What one batch's rewrites reuse: the keyed hashes already made (a
/// batch's events mostly share a user id, a session, an address) and the
/// list of edits, kept from one document to the next, so that rewriting an
/// event allocates little more than its result.
pub struct Scratch<'a> {
    key: Option<&'a HashKey>,
    done: Vec<(Box<str>, Arc<str>)>,
    edits: Vec<Edit>,
}

impl<'a> Scratch<'a> {
    pub fn new(key: Option<&'a HashKey>) -> Self {
        Self {
            key,
            done: Vec::new(),
            edits: Vec::new(),
        }
    }

    /// The keyed hash of `input` (32 hex digits).
    fn hash(&mut self, input: &str) -> Option<Arc<str>> {
        if let Some((_, known)) = self.done.iter().find(|(i, _)| **i == *input) {
            return Some(known.clone());
        }
        let hashed: Arc<str> = self.key?.hash(input.as_bytes()).into();
        // A handful per batch is what repeats; past that, no list to scan.
        if self.done.len() < 16 {
            self.done.push((input.into(), hashed.clone()));
        }
        Some(hashed)
    }
}

/// One change to the document being rewritten: the bytes of `range` give
/// way to `with` (nothing, for [`Replacement::Remove`]). A document's edits
/// are in the order of their ranges, which never overlap.
struct Edit {
    range: Range<usize>,
    with: Replacement,
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
    /// A JSON string of this text, which has nothing to escape (an
    /// address, a hash's hex digits): shared by the events that store it.
    PlainString(Arc<str>),
}

impl Replacement {
    /// The JSON text of a new value (empty for `Keep` and `Remove`).
    fn json_text(&self) -> Cow<'_, str> {
        match self {
            Self::Value(text) => Cow::Borrowed(text),
            Self::PlainString(text) => Cow::Owned(format!("\"{text}\"")),
            Self::Keep | Self::Remove => Cow::Borrowed(""),
        }
    }
}

/// The replacement of one value's raw JSON text for `action`.
fn replace(raw: &str, action: &Action, scratch: &mut Scratch<'_>) -> Replacement {
    match action {
        Action::Remove => Replacement::Remove,
        Action::Hash => {
            let text = string_value(raw);
            match scratch.hash(text.as_deref().unwrap_or(raw.trim())) {
                Some(hashed) => Replacement::PlainString(hashed),
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

/// The removed members (or items) of one object (or array), as edits that
/// take out their commas too: a run of removed ones followed by a kept one
/// goes from the first removed to the kept one's start; a run at the end
/// goes from the last kept one's end (its comma) to the end of the run.
#[derive(Default)]
struct Removals {
    /// Where the last kept member's value ends.
    last_kept_end: Option<usize>,
    /// The run of removed members not yet recorded: where its first starts
    /// and its last ends.
    run: Option<(usize, usize)>,
}

impl Removals {
    /// The member at `start..end` (from its key's quote to its value's end)
    /// was removed or kept; `mark` is where its own edits begin.
    fn next(
        &mut self,
        start: usize,
        end: usize,
        removed: bool,
        mark: usize,
        edits: &mut Vec<Edit>,
    ) {
        if removed {
            self.run = Some((self.run.map_or(start, |(first, _)| first), end));
            return;
        }
        if let Some((first, _)) = self.run.take() {
            // Before this member's own edits: edits stay in order.
            edits.insert(
                mark,
                Edit {
                    range: first..start,
                    with: Replacement::Remove,
                },
            );
        }
        self.last_kept_end = Some(end);
    }

    fn finish(self, edits: &mut Vec<Edit>) {
        if let Some((first, last)) = self.run {
            edits.push(Edit {
                range: self.last_kept_end.unwrap_or(first)..last,
                with: Replacement::Remove,
            });
        }
    }
}

/// Records the edits of the object whose `{` is at `start`: the rules of
/// `tree` on its members, and `extra` on the member it names. Returns where
/// the object ends; `None` when the text is not an object (the door checked
/// it: it is one).
fn rewrite_object(
    doc: &str,
    start: usize,
    tree: &RuleTree,
    scratch: &mut Scratch<'_>,
    extra: Option<MemberRewrite<'_>>,
) -> Option<usize> {
    let bytes = doc.as_bytes();
    let mut removals = Removals::default();
    let end = json_scan::walk_object(bytes, start, |key, value| {
        // Both ranges end at ASCII delimiters of valid UTF-8 text.
        let name = key_name(&doc[key.clone()]);
        let node = tree.get(&name);
        let wanted = extra.filter(|(wanted, _)| *wanted == name);
        let mark = scratch.edits.len();
        let (end, mut removed) = match node {
            Some(node) => node.rewrite(doc, value, scratch)?,
            None => (json_scan::value_end(bytes, value)?, false),
        };
        if let (Some((_, replace)), false) = (wanted, removed) {
            let current = if scratch.edits.len() > mark {
                Cow::Owned(splice(doc, value..end, &scratch.edits[mark..]))
            } else {
                Cow::Borrowed(&doc[value..end])
            };
            match replace(&current) {
                Replacement::Keep => {}
                Replacement::Remove => {
                    scratch.edits.truncate(mark);
                    removed = true;
                }
                with => {
                    scratch.edits.truncate(mark);
                    scratch.edits.push(Edit {
                        range: value..end,
                        with,
                    });
                }
            }
        }
        // The member starts at its key's opening quote.
        removals.next(key.start - 1, end, removed, mark, &mut scratch.edits);
        Some(end)
    })?;
    removals.finish(&mut scratch.edits);
    Some(end)
}

/// Records the edits of the array whose `[` is at `start`: `node`'s rules
/// on every item. Returns where the array ends.
fn rewrite_array(doc: &str, start: usize, node: &Node, scratch: &mut Scratch<'_>) -> Option<usize> {
    let mut removals = Removals::default();
    let end = json_scan::walk_array(doc.as_bytes(), start, |item| {
        let mark = scratch.edits.len();
        let (end, removed) = node.rewrite(doc, item, scratch)?;
        removals.next(item, end, removed, mark, &mut scratch.edits);
        Some(end)
    })?;
    removals.finish(&mut scratch.edits);
    Some(end)
}

/// The text of `range` of `doc` with `edits` (inside it, in order) made.
fn splice(doc: &str, range: Range<usize>, edits: &[Edit]) -> String {
    let added: usize = edits
        .iter()
        .map(|edit| match &edit.with {
            Replacement::Value(text) => text.len(),
            Replacement::PlainString(text) => text.len() + 2,
            Replacement::Keep | Replacement::Remove => 0,
        })
        .sum();
    let mut out = String::with_capacity(range.len() + added);
    let mut at = range.start;
    for edit in edits {
        out.push_str(&doc[at..edit.range.start]);
        match &edit.with {
            Replacement::Value(text) => out.push_str(text),
            Replacement::PlainString(text) => {
                out.push('"');
                out.push_str(text);
                out.push('"');
            }
            Replacement::Keep | Replacement::Remove => {}
        }
        at = edit.range.end;
    }
    out.push_str(&doc[at..range.end]);
    out
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
        RuleTree::new([&rule])
            .apply(document, &mut Scratch::new(Some(&key)), None)
            .expect("readable")
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
        let mut scratch = Scratch::new(Some(&key));
        let out = tree.apply(event, &mut scratch, None).unwrap().unwrap();
        // The hash of "u1", then masked: 32 stars.
        assert_eq!(
            out,
            format!(
                r#"{{"id":"e","user":"{}","props":{{"query":"[email]","tags":[{{"k":1}}]}},"n":2}}"#,
                "*".repeat(32)
            )
        );
        assert_eq!(
            tree.apply(r#"{"id":"e","n":2}"#, &mut scratch, None),
            Ok(None)
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

    #[test]
    fn what_no_rule_changes_keeps_its_bytes_whitespace_included() {
        let meta = "{\"app_id\": \"a\",\n  \"user\" : \"jane\", \"sdk\": {\"v\": [1, 2]} }";
        let rule = FieldRule::parse("meta.user", "mask", &[]).unwrap();
        assert_eq!(
            RuleTree::new([&rule])
                .apply(meta, &mut Scratch::new(None), None)
                .unwrap()
                .unwrap(),
            "{\"app_id\": \"a\",\n  \"user\" : \"****\", \"sdk\": {\"v\": [1, 2]} }"
        );
        let nested = r#"{ "id": "e", "props": { "query": "a@b.io" , "n": [ 1 ] } }"#;
        assert_eq!(
            apply("data.props.query", "scrub", nested).unwrap(),
            r#"{ "id": "e", "props": { "query": "[email]" , "n": [ 1 ] } }"#
        );
    }

    #[test]
    fn a_removed_member_takes_its_comma_wherever_it_stands() {
        let rules = |paths: &[&str]| -> RuleTree {
            let rules: Vec<FieldRule> = paths
                .iter()
                .map(|path| FieldRule::parse(path, "remove", &[]).unwrap())
                .collect();
            RuleTree::new(&rules)
        };
        let event = r#"{ "a": 1 , "b": [2, 3], "c": {"d": 4} ,"e":"5" }"#;
        for (paths, expected) in [
            (
                &["data.a"][..],
                r#"{ "b": [2, 3], "c": {"d": 4} ,"e":"5" }"#,
            ),
            (&["data.b"], r#"{ "a": 1 , "c": {"d": 4} ,"e":"5" }"#),
            (&["data.e"], r#"{ "a": 1 , "b": [2, 3], "c": {"d": 4} }"#),
            (&["data.a", "data.b"], r#"{ "c": {"d": 4} ,"e":"5" }"#),
            (&["data.b", "data.e"], r#"{ "a": 1 , "c": {"d": 4} }"#),
            (&["data.c", "data.e"], r#"{ "a": 1 , "b": [2, 3] }"#),
            (&["data.a", "data.c"], r#"{ "b": [2, 3], "e":"5" }"#),
            (&["data.a", "data.b", "data.c", "data.e"], "{  }"),
            (
                &["data.c.d"],
                r#"{ "a": 1 , "b": [2, 3], "c": {} ,"e":"5" }"#,
            ),
        ] {
            let out = rules(paths)
                .apply(event, &mut Scratch::new(None), None)
                .unwrap()
                .unwrap();
            assert_eq!(out, expected, "{paths:?}");
            serde_json::from_str::<serde_json::Value>(&out).unwrap();
        }
        let items = r#"{"l":[{"x":1},{"k":0},{"x":2} , {"x":3}]}"#;
        let tree = RuleTree::new([&FieldRule::parse("data.l[*]", "remove", &[]).unwrap()]);
        assert_eq!(
            tree.apply(items, &mut Scratch::new(None), None)
                .unwrap()
                .unwrap(),
            r#"{"l":[]}"#
        );
        let tree = RuleTree::new([&FieldRule::parse("data.l[*].x", "remove", &[]).unwrap()]);
        assert_eq!(
            tree.apply(items, &mut Scratch::new(None), None)
                .unwrap()
                .unwrap(),
            r#"{"l":[{},{"k":0},{} , {}]}"#
        );
    }

    #[test]
    fn a_rule_on_an_object_sees_what_the_rules_inside_it_left() {
        let rules: Vec<FieldRule> = [("data.user", "hash"), ("data.user.email", "remove")]
            .iter()
            .map(|(path, action)| FieldRule::parse(path, action, &[]).unwrap())
            .collect();
        let key = key();
        let out = RuleTree::new(&rules)
            .apply(
                r#"{"id":"e","user":{"name":"j", "email":"j@x.io"}}"#,
                &mut Scratch::new(Some(&key)),
                None,
            )
            .unwrap()
            .unwrap();
        let expected = key.hash(br#"{"name":"j"}"#);
        assert_eq!(out, format!(r#"{{"id":"e","user":"{expected}"}}"#));
    }

    #[test]
    fn the_extra_member_rewrite_comes_after_the_rules() {
        let tree = RuleTree::new([&FieldRule::parse("data.b", "remove", &[]).unwrap()]);
        let to_x = |_: &str| Replacement::PlainString("x".into());
        let drop = |_: &str| Replacement::Remove;
        let event = r#"{"ip":"1.2.3.4","b":1,"c":2}"#;
        assert_eq!(
            tree.apply(event, &mut Scratch::new(None), Some(("ip", &to_x)))
                .unwrap()
                .unwrap(),
            r#"{"ip":"x","c":2}"#
        );
        assert_eq!(
            tree.apply(event, &mut Scratch::new(None), Some(("ip", &drop)))
                .unwrap()
                .unwrap(),
            r#"{"c":2}"#
        );
        // A key written with an escape is the same member.
        assert_eq!(
            RuleTree::default()
                .apply(
                    r#"{"\u0069p":"1.2.3.4"}"#,
                    &mut Scratch::new(None),
                    Some(("ip", &to_x))
                )
                .unwrap()
                .unwrap(),
            r#"{"\u0069p":"x"}"#
        );
    }

    #[test]
    fn text_that_is_not_the_object_the_door_accepted_is_unreadable_not_passed_on() {
        let tree = RuleTree::new([&FieldRule::parse("data.a.b", "remove", &[]).unwrap()]);
        for text in [
            r#"["a"]"#,
            r#"{"a":{"b":1"#,
            r#"{"a":{"b" 1}}"#,
            r#"{"x":1 "a":{"b":1}}"#,
            "",
        ] {
            assert_eq!(
                tree.apply(text, &mut Scratch::new(None), None),
                Err(Unreadable),
                "{text}"
            );
        }
        // Off a rule's path nothing is read but the members' extent.
        assert_eq!(
            tree.apply(r#"{"c":{"b":1}}"#, &mut Scratch::new(None), None),
            Ok(None)
        );
    }

    /// The walk against a plain model of the rules: a document parsed into
    /// a `serde_json::Value`, each rule applied to it in order (remove and
    /// mask give the same result in any order), then the top-level `ip`.
    mod model {
        use proptest::prelude::*;
        use serde_json::Value;

        use super::super::*;

        const KEYS: [&str; 4] = ["a", "b", "c", "ip"];

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<i32>().prop_map(Value::from),
                "[a-z@. ]{0,8}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    object(inner),
                ]
            })
        }

        fn object(inner: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
            prop::collection::vec((0..KEYS.len(), inner), 0..5).prop_map(|members| {
                let mut map = serde_json::Map::new();
                for (key, value) in members {
                    map.insert(KEYS[key].to_owned(), value);
                }
                Value::Object(map)
            })
        }

        /// `value` as JSON text with whitespace from `spaces` between tokens.
        fn render(value: &Value, spaces: &mut impl Iterator<Item = u8>, out: &mut String) {
            fn space(spaces: &mut impl Iterator<Item = u8>, out: &mut String) {
                out.push_str(["", " ", "\n  ", "\t"][usize::from(spaces.next().unwrap_or(0) % 4)])
            }
            match value {
                Value::Object(map) => {
                    out.push('{');
                    for (i, (key, member)) in map.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        space(spaces, out);
                        out.push_str(&serde_json::to_string(key).unwrap());
                        space(spaces, out);
                        out.push(':');
                        space(spaces, out);
                        render(member, spaces, out);
                        space(spaces, out);
                    }
                    out.push('}');
                }
                Value::Array(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        space(spaces, out);
                        render(item, spaces, out);
                        space(spaces, out);
                    }
                    out.push(']');
                }
                other => out.push_str(&other.to_string()),
            }
        }

        fn path() -> impl Strategy<Value = (String, bool)> {
            (
                prop::collection::vec((0..3usize, any::<bool>()), 1..4),
                any::<bool>(),
            )
                .prop_map(|(steps, mask)| {
                    let path: Vec<String> = steps
                        .iter()
                        .map(|(key, items)| {
                            format!("{}{}", KEYS[*key], if *items { "[*]" } else { "" })
                        })
                        .collect();
                    (format!("data.{}", path.join(".")), mask)
                })
        }

        /// The rule's action on `value` at `path`; true when it is removed.
        fn model_apply(value: &mut Value, path: &[Segment], mask: bool) -> bool {
            let Some((first, rest)) = path.split_first() else {
                if !mask {
                    return true;
                }
                match value {
                    Value::String(text) => *text = "*".repeat(text.chars().count()),
                    Value::Null => {}
                    other => *other = Value::from("***"),
                }
                return false;
            };
            match (first, value) {
                (Segment::Key(name), Value::Object(map)) => {
                    if let Some(member) = map.get_mut(name) {
                        if model_apply(member, rest, mask) {
                            map.remove(name);
                        }
                    }
                }
                (Segment::Items, Value::Array(items)) => {
                    items.retain_mut(|item| !model_apply(item, rest, mask));
                }
                _ => {}
            }
            false
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn the_walk_does_what_the_rules_say(
                document in object(value()),
                spaces in prop::collection::vec(any::<u8>(), 0..256),
                paths in prop::collection::vec(path(), 1..4),
                ip in 0..3u8,
            ) {
                let mut text = String::new();
                render(&document, &mut spaces.into_iter(), &mut text);
                let rules: Vec<FieldRule> = paths
                    .iter()
                    .map(|(path, mask)| {
                        FieldRule::parse(path, if *mask { "mask" } else { "remove" }, &[]).unwrap()
                    })
                    .collect();
                let to_x = |raw: &str| {
                    if raw.starts_with('"') {
                        Replacement::PlainString("x".into())
                    } else {
                        Replacement::Keep
                    }
                };
                let drop = |_: &str| Replacement::Remove;
                let extra: Option<MemberRewrite<'_>> = match ip {
                    0 => None,
                    1 => Some(("ip", &to_x)),
                    _ => Some(("ip", &drop)),
                };
                let out = RuleTree::new(&rules)
                    .apply(&text, &mut Scratch::new(None), extra)
                    .map_err(|_| TestCaseError::fail(format!("unreadable: {text}")))?
                    .unwrap_or_else(|| text.clone());

                let mut expected = document.clone();
                for rule in &rules {
                    model_apply(&mut expected, &rule.path, rule.action == Action::Mask);
                }
                if let Value::Object(map) = &mut expected {
                    match (ip, map.get("ip")) {
                        (1, Some(Value::String(_))) => {
                            map.insert("ip".into(), Value::from("x"));
                        }
                        (2, Some(_)) => {
                            map.remove("ip");
                        }
                        _ => {}
                    }
                }
                let got: Value = serde_json::from_str(&out)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {out}")))?;
                prop_assert_eq!(got, expected, "{} -> {}", text, out);
            }
        }
    }
}
