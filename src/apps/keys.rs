//! Write keys: how they are stored (SHA-256 digests), how a request presents
//! one, and how it is compared.
//!
//! The configuration holds digests only, so a leaked `config.yaml` leaks no
//! key. A request's key is hashed as soon as it is read from the request
//! and only the digest goes on: the key itself is never stored, logged, put
//! in a span or a metric, or sent to Kafka.

use std::fmt;

use axum::http::{header, HeaderMap, HeaderName, Uri};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub static X_VENUS_KEY: HeaderName = HeaderName::from_static("x-venus-key");

/// The query parameter that carries a key for clients that cannot set
/// headers (`navigator.sendBeacon`).
pub const KEY_QUERY_PARAMETER: &str = "key";

/// The SHA-256 digest of a write key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// The digest of `key` as presented by a client.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses 64 hex digits (either case), as written in `apps[].keys`.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(format!(
                "is {} characters long, not 64 hex digits",
                text.len()
            ));
        }
        let mut digest = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let high = hex_value(pair[0]);
            let low = hex_value(pair[1]);
            match (high, low) {
                (Some(high), Some(low)) => digest[i] = high << 4 | low,
                _ => return Err("is not 64 hex digits".to_owned()),
            }
        }
        Ok(Self(digest))
    }

    pub fn to_hex(self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(64);
        for byte in self.0 {
            text.push(DIGITS[usize::from(byte >> 4)] as char);
            text.push(DIGITS[usize::from(byte & 0xf)] as char);
        }
        text
    }

    /// Whether `self` is one of `keys`. Every digest is compared in full, in
    /// constant time, so how long it takes says nothing about how close a
    /// guess came.
    pub fn is_one_of(&self, keys: &[KeyDigest]) -> bool {
        let mut found = subtle::Choice::from(0);
        for key in keys {
            found |= self.0.ct_eq(&key.0);
        }
        found.into()
    }
}

/// Never prints the digest either: it is as good as the key for guessing
/// offline.
impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDigest(..)")
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// The key a request presents, digested: from `Authorization: Bearer`,
/// else `X-Venus-Key`, else the `key` query parameter. `None` when it
/// carries none (an empty value counts as none).
pub fn presented(headers: &HeaderMap, uri: &Uri) -> Option<KeyDigest> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let header_key = || {
        headers
            .get(&X_VENUS_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(key) = bearer.or_else(header_key).filter(|k| !k.is_empty()) {
        return Some(KeyDigest::of(key));
    }
    let query = uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, value)| name == KEY_QUERY_PARAMETER && !value.is_empty())
        .map(|(_, value)| KeyDigest::of(&value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_through_hex() {
        let digest = KeyDigest::of("hunter2");
        // sha256("hunter2"), from `printf hunter2 | sha256sum`.
        assert_eq!(
            digest.to_hex(),
            "f52fbd32b2b3b86ff88ef6c490628285f482af15ddcb29541f94bcf526a3f6c7"
        );
        assert_eq!(KeyDigest::from_hex(&digest.to_hex()).unwrap(), digest);
        assert_eq!(
            KeyDigest::from_hex(&digest.to_hex().to_uppercase()).unwrap(),
            digest
        );
    }

    #[test]
    fn a_key_in_clear_is_not_a_digest() {
        assert!(KeyDigest::from_hex("hunter2").is_err());
        assert!(KeyDigest::from_hex(&"g".repeat(64)).is_err());
    }

    #[test]
    fn is_one_of_finds_only_equal_digests() {
        let keys = [KeyDigest::of("a"), KeyDigest::of("b")];
        assert!(KeyDigest::of("b").is_one_of(&keys));
        assert!(!KeyDigest::of("c").is_one_of(&keys));
        assert!(!KeyDigest::of("a").is_one_of(&[]));
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_key_is_read_from_each_place_in_order() {
        let uri: Uri = "/api/v1/upload?x=1&key=from%20query".parse().unwrap();
        let plain: Uri = "/api/v1/upload".parse().unwrap();
        assert_eq!(
            presented(&headers(&[("authorization", "Bearer k1")]), &uri),
            Some(KeyDigest::of("k1"))
        );
        assert_eq!(
            presented(&headers(&[("authorization", "bearer  k1 ")]), &plain),
            Some(KeyDigest::of("k1"))
        );
        assert_eq!(
            presented(&headers(&[("x-venus-key", "k2")]), &uri),
            Some(KeyDigest::of("k2"))
        );
        assert_eq!(
            presented(&headers(&[("authorization", "Basic Zm9v")]), &uri),
            Some(KeyDigest::of("from query"))
        );
        assert_eq!(presented(&headers(&[]), &plain), None);
        assert_eq!(presented(&headers(&[("x-venus-key", "")]), &plain), None);
        let empty: Uri = "/api/v1/upload?key=".parse().unwrap();
        assert_eq!(presented(&headers(&[]), &empty), None);
    }
}
