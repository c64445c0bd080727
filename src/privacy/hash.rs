//! The keyed hash of `hash` rules, and the secret it is keyed with.

pub use crate::secret::Secret;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key of every `hash` of one configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct HashKey(Vec<u8>);

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey([redacted])")
    }
}

/// Shorter keys are refused at load: a short key can be guessed, and then
/// every hashed address can be found by trying all 2^32 of them.
pub const MIN_KEY_BYTES: usize = 16;

/// Hex digits of a hash as stored: 128 bits, enough that two values never
/// meet by chance, half the bytes of the whole digest.
const HASH_HEX_DIGITS: usize = 32;

impl HashKey {
    pub fn new(key: &[u8]) -> Result<Self, String> {
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "is {} bytes long; a hash key must have at least {MIN_KEY_BYTES}",
                key.len()
            ));
        }
        Ok(Self(key.to_vec()))
    }

    /// HMAC-SHA256 of `input` under the key, as 32 lowercase hex digits.
    pub fn hash(&self, input: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(input);
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(HASH_HEX_DIGITS);
        for byte in &digest[..HASH_HEX_DIGITS / 2] {
            out.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
            out.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_hmac_sha256_rfc_4231_case_2_cut_to_128_bits() {
        // RFC 4231 test case 2 has a 4-byte key, below what `new` takes.
        let key = HashKey(b"Jefe".to_vec());
        assert_eq!(
            key.hash(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c7"
        );
    }

    #[test]
    fn short_keys_are_refused_and_secrets_never_print() {
        assert!(HashKey::new(b"short").is_err());
        let key = HashKey::new(b"0123456789abcdef").unwrap();
        assert_eq!(format!("{key:?}"), "HashKey([redacted])");
        let secret = Secret::new("hunter2-hunter2-hunter2");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_ne!(key.hash(b"a"), key.hash(b"b"));
        assert_eq!(key.hash(b"a"), key.hash(b"a"));
    }
}
