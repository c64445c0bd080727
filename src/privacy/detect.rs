//! Ready rules for personal data inside a string: e-mail addresses, phone
//! numbers, card numbers (checked by Luhn) and advertising ids (IDFA, GAID:
//! UUIDs). `scrub` replaces each occurrence with `[email]`, `[phone]`,
//! `[card]` or `[ad_id]` and leaves the rest of the string as it was.
//!
//! They run only on the string values of fields an operator named: a
//! phone-number rule over every string of every event would find phone
//! numbers in timestamps.

use std::borrow::Cow;
use std::sync::OnceLock;

use regex::{Captures, Regex};

/// One kind of personal data a `scrub` rule looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detector {
    Email,
    Phone,
    Card,
    AdId,
}

impl Detector {
    pub const ALL: [Detector; 4] = [Self::Card, Self::AdId, Self::Email, Self::Phone];

    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "email" => Ok(Self::Email),
            "phone" => Ok(Self::Phone),
            "card" => Ok(Self::Card),
            "ad_id" => Ok(Self::AdId),
            other => Err(format!(
                "{other:?} is not a detector; use email, phone, card or ad_id"
            )),
        }
    }

    fn placeholder(self) -> &'static str {
        match self {
            Self::Email => "[email]",
            Self::Phone => "[phone]",
            Self::Card => "[card]",
            Self::AdId => "[ad_id]",
        }
    }

    fn pattern(self) -> &'static Regex {
        static PATTERNS: OnceLock<[Regex; 4]> = OnceLock::new();
        let patterns = PATTERNS.get_or_init(|| {
            [
                Regex::new(r"(?i)[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}").unwrap(),
                // A plus, digits and the usual separators, judged by the
                // count of digits below.
                Regex::new(r"\+?\(?\d[\d ().-]{5,}\d").unwrap(),
                Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").unwrap(),
                Regex::new(r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
                    .unwrap(),
            ]
        });
        match self {
            Self::Email => &patterns[0],
            Self::Phone => &patterns[1],
            Self::Card => &patterns[2],
            Self::AdId => &patterns[3],
        }
    }

    /// Whether a match of the pattern really is this kind of data.
    fn confirms(self, found: &str) -> bool {
        let digits = || found.bytes().filter(u8::is_ascii_digit);
        match self {
            Self::Phone => (7..=15).contains(&digits().count()),
            Self::Card => luhn(digits().map(|d| d - b'0')),
            Self::Email | Self::AdId => true,
        }
    }
}

/// The Luhn checksum of card numbers, over the digits in order.
fn luhn(digits: impl DoubleEndedIterator<Item = u8>) -> bool {
    let sum: u32 = digits
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// `text` with every occurrence of what `detectors` find replaced; borrowed
/// when nothing was found. Cards and ad ids go first, so that a card
/// number is not taken for a phone number.
pub fn scrub<'a>(text: &'a str, detectors: &[Detector]) -> Cow<'a, str> {
    // What each kind needs at the least, checked in one pass: most strings
    // (words, names, paths) have none of it and no pattern runs on them.
    let (mut digits, mut at, mut dash) = (0usize, false, false);
    for byte in text.bytes() {
        digits += usize::from(byte.is_ascii_digit());
        at |= byte == b'@';
        dash |= byte == b'-';
    }
    let mut current = Cow::Borrowed(text);
    for detector in Detector::ALL {
        let possible = match detector {
            Detector::Email => at,
            Detector::Phone => digits >= 7,
            Detector::Card => digits >= 13,
            Detector::AdId => dash && text.len() >= 36,
        };
        if !possible || !detectors.contains(&detector) {
            continue;
        }
        let replaced = detector
            .pattern()
            .replace_all(&current, |found: &Captures<'_>| {
                let found = &found[0];
                if detector.confirms(found) {
                    detector.placeholder().to_owned()
                } else {
                    found.to_owned()
                }
            });
        if let Cow::Owned(changed) = replaced {
            if changed != current.as_ref() {
                current = Cow::Owned(changed);
            }
        }
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_found_in_running_text() {
        let text = "mail jane.doe+x@example.co.uk or call +44 (20) 7946-0958, card 4111 1111 1111 1111, idfa 6D92078A-8246-4BA4-AE5B-76104861E7DC";
        assert_eq!(
            scrub(text, &Detector::ALL),
            "mail [email] or call [phone], card [card], idfa [ad_id]"
        );
    }

    #[test]
    fn only_the_named_detectors_run_and_clean_text_is_borrowed() {
        let text = "jane@example.com 4111-1111-1111-1111";
        assert_eq!(
            scrub(text, &[Detector::Email]),
            "[email] 4111-1111-1111-1111"
        );
        assert!(matches!(
            scrub("nothing personal here", &Detector::ALL),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn luhn_decides_what_is_a_card() {
        // 4111 1111 1111 1112 fails Luhn: not a card, and with 16 digits
        // too long for a phone number.
        assert_eq!(
            scrub("4111 1111 1111 1112", &[Detector::Card, Detector::Phone]),
            "4111 1111 1111 1112"
        );
        assert_eq!(scrub("5500005555555559", &[Detector::Card]), "[card]");
    }

    #[test]
    fn short_numbers_are_not_phones() {
        assert_eq!(
            scrub("order 12345 of 2024", &[Detector::Phone]),
            "order 12345 of 2024"
        );
        assert_eq!(scrub("555-0100 ext", &[Detector::Phone]), "[phone] ext");
    }
}
