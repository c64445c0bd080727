//! The batch document's one validating pass ([`batch_document`]): JSON
//! grammar, how deep it nests, and whether every string is JSON as RFC 8259
//! writes it; it returns where `meta` and each event are. Then, per event,
//! where its few wanted fields are ([`object_fields`]), without validating
//! again. The ingester reads each message of the gateway the same way in
//! one pass that also finds the fields it wants ([`object_paths`]).
//!
//! sonic-rs still reads `meta`, and the rare event whose keys have escapes,
//! after this pass. It skips nested values by recursion with no depth limit
//! of its own, so a body of deeply nested brackets would overflow a worker's
//! stack and abort the process (a stack overflow cannot be caught); the depth
//! bound here protects it only if both agree on where every string ends, and
//! they agree only on valid escapes: sonic-rs steps over `\u` plus any four
//! bytes, so `"\u"abc"` is one string to it and a string followed by `abc"`
//! to a reader that reads `\u` as two bytes. Hence the rule here: any escape
//! that is not exactly one of `\" \\ \/ \b \f \n \r \t \uXXXX` (four hex
//! digits) makes the document invalid. The same rule keeps `"\uZZZZ"` from
//! reaching Kafka, where standard JSON parsers would reject the message.
//! [`scan`] is that string and depth check alone, for parts of a document.
//!
//! One thing is valid JSON grammar and still poison downstream: a `\uD800`
//! with no low surrogate after it (RFC 8259 §8.2 leaves its meaning open;
//! serde_json and ClickHouse reject it). The pass reports that it saw one;
//! the caller then asks [`has_lone_surrogate`] of each part to fail only the
//! event (or the `meta`) that carries it.

use std::fmt;
use std::ops::Range;

/// Why a document was refused; `offset` is a byte offset into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanError {
    /// Arrays and objects nested deeper than the limit.
    TooDeep { limit: usize },
    /// A backslash followed by something that is not a JSON escape.
    BadEscape { offset: usize, found: String },
    /// A raw control character (below U+0020) inside a string.
    ControlCharacter { offset: usize, byte: u8 },
    /// Not JSON: something else than `expected` at `offset` (the length of
    /// the document when it ends too soon).
    Syntax {
        offset: usize,
        expected: &'static str,
    },
    /// `meta` or `data` twice at the top of a batch.
    DuplicateKey(&'static str),
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooDeep { limit } => write!(
                f,
                "the batch nests arrays and objects more than {limit} levels deep"
            ),
            Self::BadEscape { offset, found } => write!(
                f,
                "the batch is not valid JSON: invalid escape {found:?} at byte {offset} \
                 (allowed: \\\" \\\\ \\/ \\b \\f \\n \\r \\t and \\u followed by four hex digits)"
            ),
            Self::ControlCharacter { offset, byte } => write!(
                f,
                "the batch is not valid JSON: control character 0x{byte:02x} inside a string \
                 at byte {offset} (escape it)"
            ),
            Self::Syntax { offset, expected } => write!(
                f,
                "the batch is not valid JSON: expected {expected} at byte {offset}"
            ),
            Self::DuplicateKey(key) => write!(
                f,
                "the batch is not valid: duplicate field `{key}` at its top level"
            ),
        }
    }
}

/// What a successful scan saw in the document's strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strings {
    /// Every string is valid JSON text.
    Clean,
    /// Valid grammar, but at least one `\uXXXX` is an unpaired UTF-16
    /// surrogate: find the part that carries it with [`has_lone_surrogate`].
    LoneSurrogate,
}

// Byte classes: 0 nothing to do, 1 quote, 2 backslash, 3 opens, 4 closes,
// 5 a control character (only matters inside a string).
const QUOTE: u8 = 1;
const BACKSLASH: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const CONTROL: u8 = 5;
const CLASS: [u8; 256] = {
    let mut class = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        class[byte] = CONTROL;
        byte += 1;
    }
    class[b'"' as usize] = QUOTE;
    class[b'\\' as usize] = BACKSLASH;
    class[b'[' as usize] = OPEN;
    class[b'{' as usize] = OPEN;
    class[b']' as usize] = CLOSE;
    class[b'}' as usize] = CLOSE;
    class
};

/// Checks nesting depth and string escapes of `json` in one pass, without
/// allocating. Structure outside strings (commas, colons, literals) is left
/// to the parser; so is an unterminated string.
pub fn scan(json: &[u8], max_depth: usize) -> Result<Strings, ScanError> {
    scan_with::<true>(json, max_depth)
}

/// [`scan`], with the eight-bytes-at-a-time skip over string text or (for
/// the tests to compare against) without.
fn scan_with<const SKIP: bool>(json: &[u8], max_depth: usize) -> Result<Strings, ScanError> {
    let mut depth = 0usize;
    let mut strings = Strings::Clean;
    let mut i = 0;
    while i < json.len() {
        match CLASS[json[i] as usize] {
            QUOTE => {
                let end = string_end::<SKIP>(json, i + 1)?;
                if end.lone {
                    strings = Strings::LoneSurrogate;
                }
                i = end.next;
                continue;
            }
            OPEN => {
                depth += 1;
                if depth > max_depth {
                    return Err(ScanError::TooDeep { limit: max_depth });
                }
            }
            CLOSE => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(strings)
}

/// Whether `json` (a part of a document that [`scan`] accepted) has an
/// unpaired surrogate escape in any of its strings.
pub fn has_lone_surrogate(json: &[u8]) -> bool {
    // The part passed `scan` as a piece of the whole document, so no error
    // can come back; treat one as "yes" to stay on the safe side.
    scan(json, usize::MAX).map_or(true, |s| s == Strings::LoneSurrogate)
}

/// A batch document as the gateway reads it: where `meta` and each event of
/// `data` are (byte ranges of the document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchDocument {
    /// `meta`'s value; `None` when absent or `null`.
    pub meta: Option<Range<usize>>,
    /// `None` when absent or `null`.
    pub data: Option<Data>,
    pub strings: Strings,
}

/// What `data` held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// An array: its first `max_events` elements, and how many it held.
    Events {
        items: Vec<Range<usize>>,
        count: usize,
    },
    /// Anything but an array or `null`.
    NotAnArray,
}

/// Reads a batch document in one validating pass: it must be one JSON
/// object (RFC 8259, with the escape rule above), nested at most
/// `max_depth` deep, with `meta` and `data` at most once each at its top
/// level (other keys are skipped). Keeps the ranges of the first
/// `max_events` elements of `data`; the rest are only checked and counted,
/// so a huge array of tiny values costs no memory.
///
/// This replaced a parse by sonic-rs after [`scan`]: two passes over every
/// byte where one does, and the second was the larger part of reading a
/// batch (docs/BENCHMARKS.md, change 21). It recurses once per level, at
/// most `max_depth` deep.
pub fn batch_document(
    json: &[u8],
    max_depth: usize,
    max_events: usize,
) -> Result<BatchDocument, ScanError> {
    let mut parser = Parser::at_object(json, max_depth)?;
    let (mut meta, mut data) = (None, None);
    let (mut seen_meta, mut seen_data) = (false, false);
    parser.object_members(|parser, key| {
        let start = parser.i;
        match top_level_key(&json[key]) {
            TopLevelKey::Meta => {
                if std::mem::replace(&mut seen_meta, true) {
                    return Err(ScanError::DuplicateKey("meta"));
                }
                parser.value()?;
                // Only `null` starts with `n`.
                meta = (json[start] != b'n').then_some(start..parser.i);
            }
            TopLevelKey::Data => {
                if std::mem::replace(&mut seen_data, true) {
                    return Err(ScanError::DuplicateKey("data"));
                }
                data = match json.get(start) {
                    Some(b'[') => {
                        let mut items = Vec::with_capacity(max_events.min(64));
                        let mut count = 0usize;
                        parser.array_elements(|parser| {
                            let start = parser.i;
                            parser.value()?;
                            if count < max_events {
                                items.push(start..parser.i);
                            }
                            count += 1;
                            Ok(())
                        })?;
                        Some(Data::Events { items, count })
                    }
                    Some(b'n') => {
                        parser.value()?;
                        None
                    }
                    _ => {
                        parser.value()?;
                        Some(Data::NotAnArray)
                    }
                };
            }
            TopLevelKey::Other => parser.value()?,
        }
        Ok(())
    })?;
    parser.only_whitespace_left("the end of the batch")?;
    Ok(BatchDocument {
        meta,
        data,
        strings: parser.strings,
    })
}

/// What [`object_paths`] found in an object it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths<const N: usize> {
    /// The value of each path (a byte range of the document), `None` when
    /// absent.
    pub found: [Option<Range<usize>>; N],
    /// What the pass saw in the document's strings.
    pub strings: Strings,
    /// A key the answer depends on has an escape (it might spell a wanted
    /// name), or a wanted field appears twice: `found` may be wrong, so
    /// leave the document to a parser.
    pub unreadable: bool,
}

/// Reads the JSON object `json` in one validating pass (the parser of
/// [`batch_document`]: RFC 8259 grammar, the escape rule above, at most
/// `max_depth` deep, nothing after it but whitespace; a key twice is valid
/// JSON and only flagged, see [`Paths::unreadable`]) and finds where the
/// values of `paths` are: `(key, None)` is a member of the object,
/// `(key, Some(inner))` the member `inner` of the object that is the
/// value of `key`.
///
/// This is one pass where a [`scan`] and a parse by sonic-rs were two: the
/// ingester reads every message of the gateway with it.
pub fn object_paths<const N: usize>(
    json: &[u8],
    max_depth: usize,
    paths: [(&'static str, Option<&'static str>); N],
) -> Result<Paths<N>, ScanError> {
    let mut parser = Parser::at_object(json, max_depth)?;
    let mut found: [Option<Range<usize>>; N] = std::array::from_fn(|_| None);
    // A wanted field twice: which one counts is the parser's call.
    let mut twice = false;
    let mut escaped = false;
    parser.object_members(|parser, key| {
        let key = &json[key.start + 1..key.end - 1];
        escaped |= key.contains(&b'\\');
        let start = parser.i;
        // The paths inside this member's value, if it is an object.
        let mut inside = [0usize; N];
        let mut wanted_inside = 0;
        if parser.peek() == Some(b'{') {
            for (slot, &(outer, inner)) in paths.iter().enumerate() {
                if inner.is_some() && same(outer.as_bytes(), key) {
                    inside[wanted_inside] = slot;
                    wanted_inside += 1;
                }
            }
        }
        if wanted_inside == 0 {
            parser.value()?;
        } else {
            let inside = &inside[..wanted_inside];
            parser.object_members(|parser, inner| {
                let inner = &json[inner.start + 1..inner.end - 1];
                escaped |= inner.contains(&b'\\');
                let start = parser.i;
                parser.value()?;
                let slot = inside.iter().find(|&&slot| {
                    paths[slot]
                        .1
                        .is_some_and(|name| same(name.as_bytes(), inner))
                });
                if let Some(&slot) = slot {
                    twice |= found[slot].replace(start..parser.i).is_some();
                }
                Ok(())
            })?;
        }
        let slot = paths
            .iter()
            .position(|&(outer, inner)| inner.is_none() && same(outer.as_bytes(), key));
        if let Some(slot) = slot {
            twice |= found[slot].replace(start..parser.i).is_some();
        }
        Ok(())
    })?;
    parser.only_whitespace_left("the end of the document")?;
    Ok(Paths {
        found,
        strings: parser.strings,
        unreadable: twice || escaped,
    })
}

/// Whether two short keys are equal: their lengths and first bytes tell
/// most pairs apart without a call to `memcmp`, which was a fifth of
/// reading a message when every key went to it.
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.first() == b.first() && a == b
}

enum TopLevelKey {
    Meta,
    Data,
    Other,
}

/// Which key a top-level key (a valid JSON string, quotes included) is,
/// escapes read: `"m\u0065ta"` is `meta` to any parser downstream.
fn top_level_key(key: &[u8]) -> TopLevelKey {
    let text = &key[1..key.len() - 1];
    let unescaped;
    let text = if text.contains(&b'\\') {
        unescaped = sonic_rs::from_slice::<String>(key).unwrap_or_default();
        unescaped.as_bytes()
    } else {
        text
    };
    match text {
        b"meta" => TopLevelKey::Meta,
        b"data" => TopLevelKey::Data,
        _ => TopLevelKey::Other,
    }
}

/// A recursive-descent JSON validator over `json`, at index `i`.
struct Parser<'a> {
    json: &'a [u8],
    i: usize,
    depth: usize,
    max_depth: usize,
    strings: Strings,
}

impl<'a> Parser<'a> {
    /// A parser at the start of `json`, which must be an object.
    fn at_object(json: &'a [u8], max_depth: usize) -> Result<Self, ScanError> {
        let parser = Parser {
            json,
            i: skip_whitespace(json, 0),
            depth: 0,
            max_depth,
            strings: Strings::Clean,
        };
        if parser.peek() != Some(b'{') {
            return Err(parser.expected("an object"));
        }
        Ok(parser)
    }

    /// After the document's value: nothing but whitespace may follow.
    fn only_whitespace_left(&mut self, expected: &'static str) -> Result<(), ScanError> {
        self.i = skip_whitespace(self.json, self.i);
        if self.i != self.json.len() {
            return Err(self.expected(expected));
        }
        Ok(())
    }

    fn peek(&self) -> Option<u8> {
        self.json.get(self.i).copied()
    }

    fn expected(&self, what: &'static str) -> ScanError {
        ScanError::Syntax {
            offset: self.i,
            expected: what,
        }
    }

    /// One value starting exactly at `i`; leaves `i` just after it.
    fn value(&mut self) -> Result<(), ScanError> {
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'{') => self.object_members(|parser, _| parser.value()),
            Some(b'[') => self.array_elements(Self::value),
            Some(b't') => self.literal("true"),
            Some(b'f') => self.literal("false"),
            Some(b'n') => self.literal("null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.expected("a value")),
        }
    }

    /// A string starting at `i`; its range, quotes included.
    fn string(&mut self) -> Result<Range<usize>, ScanError> {
        let start = self.i;
        let end = string_end::<true>(self.json, start + 1)?;
        if !end.closed {
            self.i = self.json.len();
            return Err(self.expected("the end of a string"));
        }
        if end.lone {
            self.strings = Strings::LoneSurrogate;
        }
        self.i = end.next;
        Ok(start..end.next)
    }

    fn literal(&mut self, word: &'static str) -> Result<(), ScanError> {
        if self.json[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.expected(word))
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Result<(), ScanError> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.expected("a digit")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.expected("a digit after the decimal point"));
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.expected("a digit in the exponent"));
            }
            self.digits();
        }
        Ok(())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
    }

    /// One level deeper, if the limit allows.
    fn enter(&mut self) -> Result<(), ScanError> {
        self.depth += 1;
        if self.depth > self.max_depth {
            return Err(ScanError::TooDeep {
                limit: self.max_depth,
            });
        }
        self.i += 1;
        self.i = skip_whitespace(self.json, self.i);
        Ok(())
    }

    /// The object starting at `i`: `member` is called with each key's range
    /// (quotes included) and must read the value, which starts at `i`.
    fn object_members(
        &mut self,
        mut member: impl FnMut(&mut Self, Range<usize>) -> Result<(), ScanError>,
    ) -> Result<(), ScanError> {
        self.items(b'}', "',' or '}'", |parser| {
            if parser.peek() != Some(b'"') {
                return Err(parser.expected("a key in quotes"));
            }
            let key = parser.string()?;
            parser.i = skip_whitespace(parser.json, parser.i);
            if parser.peek() != Some(b':') {
                return Err(parser.expected("':'"));
            }
            parser.i = skip_whitespace(parser.json, parser.i + 1);
            member(parser, key)
        })
    }

    /// The array starting at `i`: `element` must read each element, which
    /// starts at `i`.
    fn array_elements(
        &mut self,
        element: impl FnMut(&mut Self) -> Result<(), ScanError>,
    ) -> Result<(), ScanError> {
        self.items(b']', "',' or ']'", element)
    }

    /// The comma-separated items of the object or array opening at `i`,
    /// each read by `item` from its first byte, up to `close`.
    fn items(
        &mut self,
        close: u8,
        expected: &'static str,
        mut item: impl FnMut(&mut Self) -> Result<(), ScanError>,
    ) -> Result<(), ScanError> {
        self.enter()?;
        if self.peek() != Some(close) {
            loop {
                item(self)?;
                self.i = skip_whitespace(self.json, self.i);
                match self.peek() {
                    Some(b',') => self.i = skip_whitespace(self.json, self.i + 1),
                    Some(byte) if byte == close => break,
                    _ => return Err(self.expected(expected)),
                }
            }
        }
        self.i += 1;
        self.depth -= 1;
        Ok(())
    }
}

/// Where a string ends, as [`string_end`] found it.
struct StringEnd {
    /// The index after its closing quote, or the end of input.
    next: usize,
    /// Whether it held an unpaired surrogate.
    lone: bool,
    /// Whether a closing quote was found before the end of input.
    closed: bool,
}

/// Reads a string whose opening quote is just before `start`.
fn string_end<const SKIP: bool>(json: &[u8], start: usize) -> Result<StringEnd, ScanError> {
    let mut lone = false;
    // A high surrogate was just read and waits for its low half.
    let mut pending_high = false;
    let mut i = start;
    while i < json.len() {
        if SKIP && !pending_high {
            // Most of a document is string text with nothing to check.
            i = skip_plain(json, i);
            if i == json.len() {
                break;
            }
        }
        let class = CLASS[json[i] as usize];
        if class != BACKSLASH && std::mem::take(&mut pending_high) {
            lone = true;
        }
        match class {
            QUOTE => {
                return Ok(StringEnd {
                    next: i + 1,
                    lone,
                    closed: true,
                })
            }
            CONTROL => {
                return Err(ScanError::ControlCharacter {
                    offset: i,
                    byte: json[i],
                })
            }
            BACKSLASH => {
                let escape_at = i;
                match json.get(i + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                        lone |= std::mem::take(&mut pending_high);
                        i += 2;
                    }
                    Some(b'u') => {
                        let unit = json
                            .get(i + 2..i + 6)
                            .and_then(hex4)
                            .ok_or_else(|| bad_escape(json, escape_at))?;
                        let high = std::mem::take(&mut pending_high);
                        match unit {
                            0xD800..=0xDBFF => {
                                if high {
                                    lone = true;
                                }
                                pending_high = true;
                            }
                            0xDC00..=0xDFFF if !high => lone = true,
                            _ if high && !(0xDC00..=0xDFFF).contains(&unit) => lone = true,
                            _ => {}
                        }
                        i += 6;
                    }
                    // Input ends after the backslash: unterminated.
                    None => break,
                    Some(_) => return Err(bad_escape(json, escape_at)),
                }
            }
            _ => i += 1,
        }
    }
    Ok(StringEnd {
        next: json.len(),
        lone: lone || pending_high,
        closed: false,
    })
}

/// The index of the first quote, backslash or control character at or
/// after `i` (or `json.len()`), found eight bytes at a time.
///
/// For each of the three tests, `(x - n·0x01…01) & !x & 0x80…80` flags the
/// bytes of `x` below `n` (a byte equal to the quote or the backslash is zero
/// after the XOR). A borrow only carries towards higher bytes, so the lowest
/// flag is always a true one: `trailing_zeros` finds the first such byte
/// exactly, though flags above it may be false.
#[inline]
fn skip_plain(json: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const QUOTES: u64 = ONES * b'"' as u64;
    const BACKSLASHES: u64 = ONES * b'\\' as u64;
    while let Some(chunk) = json.get(i..i + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("a chunk of eight bytes"));
        let quote = word ^ QUOTES;
        let backslash = word ^ BACKSLASHES;
        let flags = ((quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (word.wrapping_sub(ONES * 0x20) & !word))
            & HIGHS;
        if flags != 0 {
            return i + (flags.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    // The last few bytes, one at a time.
    while i < json.len() && !matches!(CLASS[json[i] as usize], QUOTE | BACKSLASH | CONTROL) {
        i += 1;
    }
    i
}

/// Why [`object_fields`] gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldsError {
    /// The field of this name appears more than once.
    Duplicate(&'static str),
    /// A key has an escape (it might spell a wanted name), or the text is
    /// not the object it should be: leave it to a parser.
    Unreadable,
}

/// Where the values of the top-level fields `names` of `object` are (byte
/// ranges of `object`), each `None` when absent.
///
/// For an object a validating parser has already accepted (and [`scan`]
/// with it): this only finds where keys and values start and end, without
/// checking them again, which is what made reading three fields of an event
/// cost more than parsing the whole batch. On text that is not such an
/// object it returns an error or a wrong answer, never panics.
pub fn object_fields<const N: usize>(
    object: &[u8],
    names: [&'static str; N],
) -> Result<[Option<Range<usize>>; N], FieldsError> {
    let mut found: [Option<Range<usize>>; N] = std::array::from_fn(|_| None);
    let mut error = None;
    for_each_member(object, |key, value| {
        if error.is_some() {
            return;
        }
        let key = &object[key];
        if key.contains(&b'\\') {
            error = Some(FieldsError::Unreadable);
        } else if let Some(slot) = names.iter().position(|name| name.as_bytes() == key) {
            if found[slot].is_some() {
                error = Some(FieldsError::Duplicate(names[slot]));
            } else {
                found[slot] = Some(value);
            }
        }
    })
    .ok_or(FieldsError::Unreadable)?;
    match error {
        Some(error) => Err(error),
        None => Ok(found),
    }
}

/// Calls `member` with the range of each key's text (between its quotes,
/// escapes as sent) and of its value, in order, for an object a validating
/// parser has already accepted, like [`object_fields`]; `None` when the
/// text is not such an object (it never panics).
pub fn for_each_member(
    object: &[u8],
    mut member: impl FnMut(Range<usize>, Range<usize>),
) -> Option<()> {
    walk_object(object, skip_whitespace(object, 0), |key, start| {
        let end = value_end(object, start)?;
        member(key, start..end);
        Some(end)
    })
    .map(drop)
}

/// The members of the object whose `{` is at `start` in `json` (already
/// accepted by a validating parser), in order: `member` gets the range of
/// the key's text (between its quotes, escapes as sent) and where the value
/// starts, and returns the index just after the value, found by reading it
/// (the privacy rules descend into the objects on a rule's path this way,
/// and read each byte once) or with [`value_end`]. Returns the index just
/// after the closing `}`; `None` when the text is not such an object or
/// `member` returned `None`. Never panics.
pub fn walk_object(
    json: &[u8],
    start: usize,
    mut member: impl FnMut(Range<usize>, usize) -> Option<usize>,
) -> Option<usize> {
    if json.get(start) != Some(&b'{') {
        return None;
    }
    let mut i = skip_whitespace(json, start + 1);
    if json.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        if json.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = closing_quote(json, i + 1)?;
        let key = i + 1..key_end;
        i = skip_whitespace(json, key_end + 1);
        if json.get(i) != Some(&b':') {
            return None;
        }
        let value = skip_whitespace(json, i + 1);
        match after_value(json, value, member(key, value)?, b'}')? {
            After::Next(next) => i = next,
            After::Closed(end) => return Some(end),
        }
    }
}

/// The items of the array whose `[` is at `start` in `json`, like
/// [`walk_object`]: `item` gets where each starts and returns the index
/// just after it. Returns the index just after the closing `]`.
pub fn walk_array(
    json: &[u8],
    start: usize,
    mut item: impl FnMut(usize) -> Option<usize>,
) -> Option<usize> {
    if json.get(start) != Some(&b'[') {
        return None;
    }
    let mut i = skip_whitespace(json, start + 1);
    if json.get(i) == Some(&b']') {
        return Some(i + 1);
    }
    loop {
        match after_value(json, i, item(i)?, b']')? {
            After::Next(next) => i = next,
            After::Closed(end) => return Some(end),
        }
    }
}

/// What follows a member's or an item's value.
enum After {
    /// A comma: the next one starts here.
    Next(usize),
    /// The closing bracket: the object or array ends just before here.
    Closed(usize),
}

/// After the value that starts at `start` and ends at `end`, in an object
/// or array closed by `close`; `None` when neither a comma nor `close`
/// follows, or when `end` is not past `start` (a callback that went
/// backwards would loop for ever).
fn after_value(json: &[u8], start: usize, end: usize, close: u8) -> Option<After> {
    if end <= start {
        return None;
    }
    let i = skip_whitespace(json, end);
    match json.get(i) {
        Some(b',') => Some(After::Next(skip_whitespace(json, i + 1))),
        Some(&byte) if byte == close => Some(After::Closed(i + 1)),
        _ => None,
    }
}

/// The index of the first byte at or after `i` that is not JSON whitespace.
pub fn skip_whitespace(json: &[u8], mut i: usize) -> usize {
    while matches!(json.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index of the quote that ends the string whose text starts at `i`.
fn closing_quote(json: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i = skip_plain(json, i);
        match json.get(i)? {
            b'"' => return Some(i),
            // Any escape is at least two bytes, and no byte after its
            // backslash is a quote or a backslash that ends or escapes.
            b'\\' => i += 2,
            // A raw control character: the parser refused it already.
            _ => i += 1,
        }
    }
}

/// The index just after the value starting at `i`, in a document a
/// validating parser has already accepted; `None` when there is no value
/// there.
pub fn value_end(json: &[u8], mut i: usize) -> Option<usize> {
    match json.get(i)? {
        b'"' => closing_quote(json, i + 1).map(|end| end + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                match json.get(i)? {
                    b'"' => {
                        i = closing_quote(json, i + 1)?;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        b',' | b'}' | b']' | b':' => None,
        // A number or a literal: up to the next delimiter.
        _ => {
            while !matches!(
                json.get(i),
                None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            ) {
                i += 1;
            }
            Some(i)
        }
    }
}

/// The value of four hex digits, if they are four hex digits.
fn hex4(digits: &[u8]) -> Option<u16> {
    digits.iter().try_fold(0u16, |value, &digit| {
        let nibble = (digit as char).to_digit(16)?;
        Some(value << 4 | nibble as u16)
    })
}

fn bad_escape(json: &[u8], at: usize) -> ScanError {
    let end = (at + 6).min(json.len());
    ScanError::BadEscape {
        offset: at,
        found: String::from_utf8_lossy(&json[at..end]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn members_and_items_are_found_with_their_text_as_sent() {
        let object = br#" { "a" : 1 , "k\"ey":{"x":[1, "]"]} ,"s":"q\"}" } "#;
        let mut seen = Vec::new();
        for_each_member(object, |key, value| {
            seen.push((
                String::from_utf8_lossy(&object[key]).into_owned(),
                String::from_utf8_lossy(&object[value]).into_owned(),
            ))
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                ("a".to_owned(), "1".to_owned()),
                (r#"k\"ey"#.to_owned(), r#"{"x":[1, "]"]}"#.to_owned()),
                ("s".to_owned(), r#""q\"}""#.to_owned()),
            ]
        );
        let array = br#"[ {"a":[1]}, "x,y" ,null] "#;
        let mut items = Vec::new();
        let end = walk_array(array, 0, |item| {
            let end = value_end(array, item)?;
            items.push(String::from_utf8_lossy(&array[item..end]).into_owned());
            Some(end)
        });
        assert_eq!(items, [r#"{"a":[1]}"#, r#""x,y""#, "null"]);
        assert_eq!(end, Some(array.len() - 1), "just after the ]");
        assert!(for_each_member(b"[1]", |_, _| {}).is_none());
        assert!(walk_array(b"{}", 0, |_| None).is_none());
        // A callback that does not move past its value ends the walk.
        assert!(walk_array(b"[1,2]", 0, Some).is_none());
        assert!(walk_object(br#"{"a":1}"#, 0, |_, value| Some(value)).is_none());
        assert!(
            for_each_member(br#"{"a":"#, |_, _| {}).is_none(),
            "truncated"
        );
    }

    use super::*;

    /// A seeded xorshift64 sequence (the gateway's test helper, copied): the
    /// same inputs on every run, so a failure names a case that can be rerun.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    fn ok(json: &str) -> Strings {
        scan(json.as_bytes(), 4).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    fn err(json: &str) -> ScanError {
        scan(json.as_bytes(), 4).expect_err(json)
    }

    /// The eight-byte skip finds exactly what the byte loop finds: every
    /// outcome (end, error and offset, surrogate flag, depth) agrees on
    /// documents where quotes, backslashes, escapes, control characters,
    /// brackets and UTF-8 fall at every position of an eight-byte word.
    #[test]
    fn the_fast_skip_agrees_with_the_byte_loop() {
        const PIECES: &[&[u8]] = &[
            b"a",
            b"Z",
            b" ",
            b"\"",
            b"\\",
            b"\\n",
            b"\\\"",
            b"\\u00e9",
            b"\\uD83D\\uDE00",
            b"\\uD800",
            b"\\uDC00",
            b"\\uZZ",
            b"\\x",
            b"\x01",
            b"\x1f",
            b"\x7f",
            b"\xc3\xa9",
            b"\xf0\x9f\x98\x80",
            b"\xff",
            b"[",
            b"]",
            b"{",
            b"}",
            b":",
            b",",
            b"!",
            b"#",
        ];
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let mut compared = 0;
        for _ in 0..20_000 {
            let mut doc = b"[\"".to_vec();
            for _ in 0..next() % 24 {
                // Mostly plain text, so runs of eight clean bytes occur.
                let piece = if next().is_multiple_of(3) {
                    PIECES[(next() % PIECES.len() as u64) as usize]
                } else {
                    b"plain"
                };
                doc.extend_from_slice(piece);
            }
            if !next().is_multiple_of(4) {
                doc.extend_from_slice(b"\",[[\"x\"]]]");
            }
            assert_eq!(
                scan_with::<true>(&doc, 3),
                scan_with::<false>(&doc, 3),
                "{}",
                String::from_utf8_lossy(&doc)
            );
            compared += 1;
        }
        assert_eq!(compared, 20_000);
        // And the one-byte tails: every length up to two words.
        for len in 0..17 {
            for special in [b'"', b'\\', 0x01, b'a'] {
                for at in 0..len {
                    let mut doc = vec![b'"'];
                    doc.extend(std::iter::repeat_n(b'x', len));
                    doc[1 + at] = special;
                    assert_eq!(scan_with::<true>(&doc, 3), scan_with::<false>(&doc, 3));
                    assert_eq!(
                        skip_plain(&doc, 1),
                        1 + if special == b'a' { len } else { at }
                    );
                }
            }
        }
    }

    /// On text no parser accepted, the field finder answers something and
    /// never panics or loops.
    #[test]
    fn the_field_finder_survives_any_text() {
        const BYTES: &[u8] = b"{}[]\"\\:, a1\n\xff";
        let mut next = xorshift(0x1234_5678_9abc_def1);
        let mut answered = 0;
        for _ in 0..50_000 {
            let state = next();
            let text: Vec<u8> = (0..state % 40)
                .map(|k| BYTES[((state >> (k % 56)) as usize + k as usize) % BYTES.len()])
                .collect();
            let _ = object_fields(&text, ["a", "1"]);
            answered += 1;
        }
        assert_eq!(answered, 50_000);
        assert_eq!(
            object_fields(br#"{"a":1,"b":[{"a":2}],"a":3}"#, ["a", "b"]),
            Err(FieldsError::Duplicate("a"))
        );
        assert_eq!(
            object_fields(br#" { "b" : [ "]" ] , "a" : "x\"}" } "#, ["a", "b"]),
            Ok([Some(25..31), Some(9..16)])
        );
        assert_eq!(object_fields(b"[1]", ["a"]), Err(FieldsError::Unreadable));
        assert_eq!(object_fields(b"{}", ["a"]), Ok([None]));
    }

    /// A random JSON value, `depth` levels down, with whitespace, escapes
    /// and numbers of every form between its tokens.
    fn random_value(next: &mut impl FnMut() -> u64, depth: usize) -> String {
        const SPACE: &[&str] = &["", "", " ", "\n", "\t ", "\r\n"];
        const TEXT: &[&str] = &[
            "a",
            "é",
            "\\n",
            "\\\"",
            "\\\\",
            "\\/",
            "\\u00e9",
            "\\uD83D\\uDE00",
            " ",
            "[",
            "]",
            "{",
            "}",
            ":",
            ",",
            "😀",
        ];
        const NUMBERS: &[&str] = &[
            "0",
            "-0",
            "12",
            "-3.25",
            "1e5",
            "2E-3",
            "0.5e+7",
            "123456789012345678901",
        ];
        let mut pick = |options: &[&'static str]| options[(next() % options.len() as u64) as usize];
        let space = pick(SPACE);
        let string = |next: &mut dyn FnMut() -> u64| {
            let pieces: String = (0..next() % 5)
                .map(|_| TEXT[(next() % TEXT.len() as u64) as usize])
                .collect();
            format!("\"{pieces}\"")
        };
        let value = match next() % 10 {
            0..=2 if depth < 5 => {
                let members: Vec<String> = (0..next() % 4)
                    .map(|_| {
                        let key = string(next);
                        format!("{key}{space}:{space}{}", random_value(next, depth + 1))
                    })
                    .collect();
                format!("{{{space}{}{space}}}", members.join(&format!("{space},")))
            }
            3..=4 if depth < 5 => {
                let elements: Vec<String> = (0..next() % 4)
                    .map(|_| random_value(next, depth + 1))
                    .collect();
                format!("[{}{space}]", elements.join(","))
            }
            7 => NUMBERS[(next() % NUMBERS.len() as u64) as usize].to_owned(),
            8 => ["true", "false", "null"][(next() % 3) as usize].to_owned(),
            _ => string(next),
        };
        format!("{space}{value}")
    }

    /// One kind of damage to `doc` at a random place: a byte lost, a stray
    /// byte, a cut.
    fn damage(doc: &mut Vec<u8>, next: &mut impl FnMut() -> u64) {
        const STRAY: &[u8] = b"{}[]\",:0-.eE+ \\atn";
        let at = (next() % (doc.len() as u64 + 1)) as usize;
        match next() % 3 {
            0 if at < doc.len() => {
                doc.remove(at);
            }
            1 => doc.insert(at, STRAY[(next() % STRAY.len() as u64) as usize]),
            _ => doc.truncate(at),
        }
    }

    /// Whether serde_json's answer is one to compare with: the gateway
    /// checks UTF-8 first, and an unpaired surrogate is valid grammar here
    /// that serde_json refuses.
    fn comparable(doc: &[u8]) -> bool {
        std::str::from_utf8(doc).is_ok() && scan(doc, 64) != Ok(Strings::LoneSurrogate)
    }

    /// How many times `meta` and `data` are keys of a top-level object.
    struct TopKeys(usize, usize);

    impl<'de> serde::Deserialize<'de> for TopKeys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Counter;
            impl<'de> serde::de::Visitor<'de> for Counter {
                type Value = TopKeys;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<TopKeys, A::Error> {
                    let mut keys = TopKeys(0, 0);
                    while let Some(key) = map.next_key::<String>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        keys.0 += usize::from(key == "meta");
                        keys.1 += usize::from(key == "data");
                    }
                    Ok(keys)
                }
            }
            d.deserialize_map(Counter)
        }
    }

    /// The one-pass reader accepts exactly the batches serde_json accepts
    /// (an object with `meta` and `data` at most once each), and finds the
    /// same `meta` and events, on random documents and on every kind of
    /// damage to them: a byte lost, a stray byte, a cut.
    #[test]
    fn the_batch_reader_agrees_with_serde_json() {
        let mut next = xorshift(0x51af_d7ed_558c_cd13);
        let (mut accepted, mut refused, mut compared) = (0, 0, 0);
        for round in 0..30_000 {
            let mut members = Vec::new();
            for _ in 0..1 + next() % 3 {
                let member = match next() % 6 {
                    0 | 1 => format!("\"meta\":{}", random_value(&mut next, 1)),
                    2 => format!("\"m\\u0065ta\":{}", random_value(&mut next, 1)),
                    3 => format!("\"x\":{}", random_value(&mut next, 1)),
                    _ => {
                        let events: Vec<String> = (0..next() % 5)
                            .map(|_| random_value(&mut next, 2))
                            .collect();
                        format!("\"data\" : [{}]", events.join(" ,"))
                    }
                };
                members.push(member);
            }
            let mut doc = format!("{{{}}}", members.join(",")).into_bytes();
            if round % 2 == 1 {
                damage(&mut doc, &mut next);
            }
            if !comparable(&doc) {
                continue;
            }
            let ours = batch_document(&doc, 32, 3);
            let theirs = serde_json::from_slice::<serde::de::IgnoredAny>(&doc).is_ok()
                && matches!(
                    serde_json::from_slice::<TopKeys>(&doc),
                    Ok(TopKeys(0..=1, 0..=1))
                );
            assert_eq!(
                ours.is_ok(),
                theirs,
                "{}: {ours:?}",
                String::from_utf8_lossy(&doc)
            );
            let Ok(found) = ours else {
                refused += 1;
                continue;
            };
            accepted += 1;
            let Ok(whole) = serde_json::from_slice::<serde_json::Value>(&doc) else {
                continue;
            };
            let value = |range: &Range<usize>| {
                serde_json::from_slice::<serde_json::Value>(&doc[range.clone()]).unwrap()
            };
            let meta = whole.get("meta").filter(|v| !v.is_null());
            assert_eq!(found.meta.as_ref().map(value).as_ref(), meta);
            match (&found.data, whole.get("data")) {
                (None, None | Some(serde_json::Value::Null)) => {}
                (Some(Data::NotAnArray), Some(data)) => {
                    assert!(!data.is_array() && !data.is_null())
                }
                (Some(Data::Events { items, count }), Some(serde_json::Value::Array(events))) => {
                    assert_eq!(*count, events.len());
                    let read: Vec<_> = items.iter().map(value).collect();
                    assert_eq!(read[..], events[..events.len().min(3)]);
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(&doc)),
            }
            compared += 1;
        }
        assert!(
            accepted > 10_000 && refused > 5_000 && compared > 10_000,
            "{accepted} accepted, {refused} refused, {compared} compared"
        );
    }

    /// The path reader accepts exactly the objects serde_json accepts, and
    /// finds the same values at its paths, on random objects and on every
    /// kind of damage to them; keys with escapes and wanted keys twice are
    /// reported, not guessed at.
    #[test]
    fn the_path_reader_agrees_with_serde_json() {
        const PATHS: [(&str, Option<&str>); 3] = [("a", None), ("m", Some("k")), ("m", None)];
        let mut next = xorshift(0x7a3c_91e4_0b5d_2f68);
        let (mut accepted, mut refused, mut unreadable, mut inner) = (0, 0, 0, 0);
        for round in 0..30_000 {
            let mut members = Vec::new();
            for _ in 0..next() % 4 {
                let member = match next() % 9 {
                    0 | 1 => format!("\"a\" :{}", random_value(&mut next, 1)),
                    2 => format!("\"\\u0061\":{}", random_value(&mut next, 1)),
                    3 => format!("\"x\":{}", random_value(&mut next, 1)),
                    4 => format!("\"m\":{}", random_value(&mut next, 1)),
                    _ => {
                        // `k` once among `y`s, and now and then a second
                        // `k` or a key with an escape.
                        let mut inner: Vec<String> = (0..next() % 3)
                            .map(|_| format!("\"y\":{}", random_value(&mut next, 2)))
                            .collect();
                        let at = (next() % (inner.len() as u64 + 1)) as usize;
                        inner.insert(at, format!("\"k\" : {}", random_value(&mut next, 2)));
                        match next() % 6 {
                            0 => inner.push(format!("\"k\":{}", random_value(&mut next, 2))),
                            1 => inner.push(format!("\"k\\\\\":{}", random_value(&mut next, 2))),
                            _ => {}
                        }
                        format!("\"m\":{{ {} }}", inner.join(","))
                    }
                };
                members.push(member);
            }
            let mut doc = format!(" {{{}}}\n", members.join(",")).into_bytes();
            if round % 2 == 1 {
                damage(&mut doc, &mut next);
            }
            if !comparable(&doc) {
                continue;
            }
            let ours = object_paths(&doc, 32, PATHS);
            let text = String::from_utf8_lossy(&doc);
            // Grammar only: a number beyond `f64` is valid JSON, which
            // serde_json's `Value` refuses and `IgnoredAny` does not.
            let theirs = serde_json::from_slice::<serde::de::IgnoredAny>(&doc).is_ok()
                && text.trim_start().starts_with('{');
            assert_eq!(ours.is_ok(), theirs, "{text}: {ours:?}");
            let Ok(paths) = ours else {
                refused += 1;
                continue;
            };
            accepted += 1;
            // What makes an answer unreadable: a key with an escape where
            // a wanted one could be, a wanted key twice.
            let members = |object: &[u8]| {
                let mut members = Vec::new();
                for_each_member(object, |key, value| {
                    members.push((object[key].to_vec(), object[value].to_vec()))
                });
                members
            };
            let twice = |members: &[(Vec<u8>, Vec<u8>)], key: &[u8]| {
                members.iter().filter(|(k, _)| k == key).count() > 1
            };
            let top = members(&doc);
            let inner_unreadable =
                top.iter()
                    .filter(|(k, v)| k == b"m" && v[0] == b'{')
                    .any(|(_, m)| {
                        let inner = members(m);
                        twice(&inner, b"k") || inner.iter().any(|(k, _)| k.contains(&b'\\'))
                    });
            let expected = top.iter().any(|(k, _)| k.contains(&b'\\'))
                || twice(&top, b"a")
                || twice(&top, b"m")
                || inner_unreadable;
            assert_eq!(paths.unreadable, expected, "{text}");
            if paths.unreadable {
                unreadable += 1;
                continue;
            }
            let Ok(whole) = serde_json::from_slice::<serde_json::Value>(&doc) else {
                continue;
            };
            let value = |range: &Option<Range<usize>>| {
                range
                    .as_ref()
                    .map(|r| serde_json::from_slice::<serde_json::Value>(&doc[r.clone()]).unwrap())
            };
            assert_eq!(value(&paths.found[0]).as_ref(), whole.get("a"), "{text}");
            assert_eq!(value(&paths.found[2]).as_ref(), whole.get("m"), "{text}");
            let k = whole
                .get("m")
                .filter(|m| m.is_object())
                .and_then(|m| m.get("k"));
            assert_eq!(value(&paths.found[1]).as_ref(), k, "{text}");
            inner += usize::from(k.is_some());
        }
        assert!(
            accepted > 5_000 && refused > 5_000 && unreadable > 1_000 && inner > 1_500,
            "{accepted} accepted, {refused} refused, {unreadable} unreadable, \
             {inner} with m.k compared"
        );
        // As deep as the limit is allowed, one more is not.
        let at_limit = object_paths(b"{\"m\":{\"k\":[1]}}", 3, PATHS).unwrap();
        assert_eq!(at_limit.found[1], Some(10..13));
        assert_eq!(
            object_paths(b"[1]", 32, PATHS),
            Err(ScanError::Syntax {
                offset: 0,
                expected: "an object"
            })
        );
        assert!(matches!(
            object_paths(b"{\"m\":{\"k\":[[[1]]]}}", 3, PATHS),
            Err(ScanError::TooDeep { limit: 3 })
        ));
    }

    #[test]
    fn batch_errors_say_what_and_where() {
        let refused = |doc: &str| {
            batch_document(doc.as_bytes(), 4, 10)
                .unwrap_err()
                .to_string()
        };
        for (doc, expected) in [
            (r#"{"meta":{},"data":[1,]}"#, "a value at byte 21"),
            (r#"{"meta":"#, "a value at byte 8"),
            (r#"{"data":["abc"#, "the end of a string at byte 13"),
            (r#"{"data":[01]}"#, "',' or ']' at byte 10"),
            (r#"{"data":[]} x"#, "the end of the batch at byte 12"),
        ] {
            assert_eq!(
                refused(doc),
                format!("the batch is not valid JSON: expected {expected}"),
                "{doc}"
            );
        }
        assert!(refused(r#"{"data":[],"d\u0061ta":[]}"#).contains("duplicate field `data`"));
        assert_eq!(
            batch_document(b"{\"a\":[[[[1]]]]}", 4, 10),
            Err(ScanError::TooDeep { limit: 4 })
        );
        // Only the first `max_events` events are kept; all are counted.
        let doc = br#"{"data":[{"id":1}, 2 ,"x",[]], "meta" : null}"#;
        let read = batch_document(doc, 4, 2).unwrap();
        assert_eq!(read.meta, None);
        assert_eq!(
            read.data,
            Some(Data::Events {
                items: vec![9..17, 19..20],
                count: 4
            })
        );
    }

    #[test]
    fn brackets_count_outside_strings_only() {
        assert_eq!(ok(r#"{"a":"[[[[[[[[{{{{"}"#), Strings::Clean);
        assert_eq!(ok("[[[[]]]]"), Strings::Clean);
        assert_eq!(err("[[[[[]]]]]"), ScanError::TooDeep { limit: 4 });
        assert_eq!(
            err(r#"{"a":"\\","b":[[[[1]]]]}"#),
            ScanError::TooDeep { limit: 4 }
        );
        assert_eq!(ok(r#"["\"[[[[[["]"#), Strings::Clean);
    }

    #[test]
    fn the_490_byte_crash_document_is_refused_at_its_escape() {
        // sonic-rs read `\u"abc` as one escape and the old scan as two bytes,
        // so the brackets after it were "in a string" for the scan only.
        let doc = format!(r#"{{"s":"\u"abc","y":{}}}"#, "[".repeat(1000));
        match scan(doc.as_bytes(), 32) {
            Err(ScanError::BadEscape { offset, found }) => {
                assert_eq!(offset, 6);
                assert_eq!(found, "\\u\"abc");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_json_escape_is_accepted() {
        assert_eq!(
            ok(r#"["\" \\ \/ \b \f \n \r \t \u00e9 \uD83D\uDE00 \u0000"]"#),
            Strings::Clean
        );
    }

    #[test]
    fn invalid_escapes_are_refused_with_their_text() {
        for (json, found) in [
            (r#"["\uZZZZ"]"#, r#"\uZZZZ"#),
            (r#"["\u12G4"]"#, r#"\u12G4"#),
            (r#"["\u12"]"#, r#"\u12"]"#),
            (r#"["\x41"]"#, r#"\x41"]"#),
            (r#"["\'"]"#, r#"\'"]"#),
            (r#"["\u"]"#, r#"\u"]"#),
        ] {
            match err(json) {
                ScanError::BadEscape { offset, found: f } => {
                    assert_eq!(offset, 2, "{json}");
                    assert_eq!(f, found, "{json}");
                }
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn raw_control_characters_in_strings_are_refused() {
        assert_eq!(
            err("[\"a\nb\"]"),
            ScanError::ControlCharacter {
                offset: 3,
                byte: b'\n'
            }
        );
        // Outside strings they are whitespace (or the parser's business).
        assert_eq!(ok("[\n1,\t2\r\n]"), Strings::Clean);
    }

    #[test]
    fn unpaired_surrogates_are_reported_not_refused() {
        for json in [
            r#"["\uD800"]"#,
            r#"["\uDC00"]"#,
            r#"["\uD800x"]"#,
            r#"["\uD800\n"]"#,
            r#"["\uD800\uD800\uDC00"]"#,
            r#"["\uD800\u0041"]"#,
            r#"["\uDBFF"#,
        ] {
            assert_eq!(ok(json), Strings::LoneSurrogate, "{json}");
        }
        assert_eq!(ok(r#"["\uD800\uDC00", "\udbff\udfff"]"#), Strings::Clean);
        assert!(has_lone_surrogate(br#"{"a":"\ud800"}"#));
        assert!(!has_lone_surrogate(br#"{"a":"\ud800\udc00"}"#));
    }

    #[test]
    fn truncated_input_is_left_to_the_parser() {
        assert_eq!(ok(r#"["abc"#), Strings::Clean);
        assert_eq!(ok(r#"["abc\"#), Strings::Clean);
        assert_eq!(ok("[[["), Strings::Clean);
    }
}
