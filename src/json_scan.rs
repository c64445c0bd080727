//! One pass over a batch document before any parser sees it: how deep it
//! nests, and whether every string is JSON as RFC 8259 writes it. And, once
//! the parser has accepted it, where an event's few wanted fields are
//! ([`object_fields`]), without a second validating parse.
//!
//! Why a separate pass: sonic-rs skips nested values by recursion with no
//! depth limit of its own, so a body of deeply nested brackets overflows a
//! worker's stack and aborts the process (a stack overflow cannot be caught).
//! Bounding the depth beforehand only works if this scan and the parser agree
//! on where every string ends, and they agree only on valid escapes: sonic-rs
//! steps over `\u` plus any four bytes, so `"\u"abc"` is one string to it and
//! a string followed by `abc"` to a scanner that reads `\u` as two bytes.
//! Hence the rule here: any escape that is not exactly one of `\" \\ \/ \b
//! \f \n \r \t \uXXXX` (four hex digits) makes the document invalid, so the
//! only documents that reach the parser are those on which every reading of
//! JSON agrees. The same rule keeps `"\uZZZZ"` from reaching Kafka, where
//! standard JSON parsers would reject the message.
//!
//! One thing is valid JSON grammar and still poison downstream: a `\uD800`
//! with no low surrogate after it (RFC 8259 §8.2 leaves its meaning open;
//! serde_json and ClickHouse reject it). The scan reports that it saw one;
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
                let (end, lone) = string_end::<SKIP>(json, i + 1)?;
                if lone {
                    strings = Strings::LoneSurrogate;
                }
                i = end;
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

/// Reads a string whose opening quote is just before `start`. Returns the
/// index after its closing quote (or the end of input, for the parser to
/// report) and whether it held an unpaired surrogate.
fn string_end<const SKIP: bool>(json: &[u8], start: usize) -> Result<(usize, bool), ScanError> {
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
            QUOTE => return Ok((i + 1, lone)),
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
                    // Input ends after the backslash: unterminated, the
                    // parser says so.
                    None => return Ok((json.len(), lone || pending_high)),
                    Some(_) => return Err(bad_escape(json, escape_at)),
                }
            }
            _ => i += 1,
        }
    }
    Ok((json.len(), lone || pending_high))
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
    use FieldsError::Unreadable;
    let mut found = std::array::from_fn(|_| None);
    let mut i = skip_whitespace(object, 0);
    if object.get(i) != Some(&b'{') {
        return Err(Unreadable);
    }
    i = skip_whitespace(object, i + 1);
    if object.get(i) == Some(&b'}') {
        return Ok(found);
    }
    loop {
        if object.get(i) != Some(&b'"') {
            return Err(Unreadable);
        }
        let key_end = closing_quote(object, i + 1).ok_or(Unreadable)?;
        let key = &object[i + 1..key_end];
        if key.contains(&b'\\') {
            return Err(Unreadable);
        }
        i = skip_whitespace(object, key_end + 1);
        if object.get(i) != Some(&b':') {
            return Err(Unreadable);
        }
        let start = skip_whitespace(object, i + 1);
        i = value_end(object, start).ok_or(Unreadable)?;
        if let Some(slot) = names.iter().position(|name| name.as_bytes() == key) {
            if found[slot].is_some() {
                return Err(FieldsError::Duplicate(names[slot]));
            }
            found[slot] = Some(start..i);
        }
        i = skip_whitespace(object, i);
        match object.get(i) {
            Some(b',') => i = skip_whitespace(object, i + 1),
            Some(b'}') => return Ok(found),
            _ => return Err(Unreadable),
        }
    }
}

fn skip_whitespace(json: &[u8], mut i: usize) -> usize {
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

/// The index just after the value starting at `i`.
fn value_end(json: &[u8], mut i: usize) -> Option<usize> {
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
    use super::*;

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
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1d);
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
        let mut next = crate::xorshift(0x1234_5678_9abc_def1);
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
