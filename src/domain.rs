//! Domain types that cannot hold an invalid value.
//!
//! Every value a client sends that the gateway relies on (the app id, the
//! category that picks the Kafka topic, the event id) is parsed once into one of
//! these types. Code that holds an `AppId` never has to wonder whether it was
//! checked: "parse, don't validate".

use std::fmt;

/// Why a client value was rejected, in words a person understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(String);

impl InvalidValue {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Checks a token-like client value: not empty, at most `max` characters,
/// every character `allowed` (described by `alphabet` for the message).
fn check_token(
    field: &str,
    value: &str,
    max: usize,
    allowed: fn(char) -> bool,
    alphabet: &str,
) -> Result<(), InvalidValue> {
    if value.is_empty() {
        return Err(InvalidValue::new(format!("{field} must not be empty")));
    }
    if value.len() > max {
        return Err(InvalidValue::new(format!(
            "{field} is {} characters long; at most {max} are allowed",
            value.len()
        )));
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(InvalidValue::new(format!(
            "{field} contains {bad:?}; only {alphabet} are allowed"
        )));
    }
    Ok(())
}

/// `meta.app_id`: 1..=64 characters from `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppId(String);

impl AppId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        check_token(
            "meta.app_id",
            value,
            Self::MAX_LEN,
            |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
            "letters, digits, '.', '_' and '-'",
        )?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `meta.category`: 1..=64 characters from `[A-Za-z0-9_]`, not starting
/// with `__`. It becomes part of a Kafka topic name, which is why the
/// alphabet is so narrow; names starting with `__` are the system's own (the
/// ingester's dead-letter topic is `to_analyzer__0.__dead_letter`, and the
/// ingester consumes no `__` topic), so no client may write to one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Category(String);

impl Category {
    pub const MAX_LEN: usize = 64;
    /// Categories starting with this name the system's own topics.
    pub const RESERVED_PREFIX: &'static str = "__";

    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        let category = Self::parse_unreserved(value)?;
        if value.starts_with(Self::RESERVED_PREFIX) {
            return Err(InvalidValue::new(format!(
                "meta.category {value:?} starts with {:?}, which is reserved for the system's own topics",
                Self::RESERVED_PREFIX
            )));
        }
        Ok(category)
    }

    /// The alphabet and length checks alone, for naming the system's own
    /// topics (`kafka::category_of_topic`); never for a client's value.
    pub(crate) fn parse_unreserved(value: &str) -> Result<Self, InvalidValue> {
        check_token(
            "meta.category",
            value,
            Self::MAX_LEN,
            |c| c.is_ascii_alphanumeric() || c == '_',
            "letters, digits and '_'",
        )?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event's `id`: 1..=128 characters, unique within its batch (uniqueness is
/// a property of the batch and is checked there).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventId(String);

impl EventId {
    pub const MAX_LEN: usize = 128;

    pub fn into_string(self) -> String {
        self.0
    }

    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        if value.is_empty() {
            return Err(InvalidValue::new("id must not be empty"));
        }
        let chars = value.chars().count();
        if chars > Self::MAX_LEN {
            return Err(InvalidValue::new(format!(
                "id is {chars} characters long; at most {} are allowed",
                Self::MAX_LEN
            )));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_id_accepts_its_alphabet_and_bounds() {
        assert!(AppId::parse("a").is_ok());
        assert!(AppId::parse("com.example.app-1_beta").is_ok());
        assert!(AppId::parse(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn app_id_rejects_empty_long_and_foreign_characters() {
        assert!(AppId::parse("").unwrap_err().to_string().contains("empty"));
        assert!(AppId::parse(&"x".repeat(65))
            .unwrap_err()
            .to_string()
            .contains("65 characters"));
        assert!(AppId::parse("my app")
            .unwrap_err()
            .to_string()
            .contains("' '"));
        assert!(AppId::parse("app/1").is_err());
        assert!(AppId::parse("appé").is_err());
    }

    #[test]
    fn category_accepts_its_alphabet_and_bounds() {
        assert!(Category::parse("page_view").is_ok());
        assert!(Category::parse("A1").is_ok());
        assert!(Category::parse(&"c".repeat(64)).is_ok());
    }

    #[test]
    fn category_rejects_what_cannot_be_in_a_topic_name() {
        assert!(Category::parse("").is_err());
        assert!(Category::parse(&"c".repeat(65)).is_err());
        for bad in ["page-view", "page.view", "a b", "x/y", "ü"] {
            let err = Category::parse(bad).unwrap_err().to_string();
            assert!(err.contains("meta.category"), "{bad}: {err}");
        }
    }

    #[test]
    fn category_refuses_the_reserved_prefix() {
        for reserved in ["__dead_letter", "__anything", "__"] {
            let err = Category::parse(reserved).unwrap_err().to_string();
            assert!(err.contains("reserved"), "{reserved}: {err}");
        }
        // One underscore is an ordinary category (the ingester consumes it).
        for fine in ["_", "_x", "a__b", "x__"] {
            assert!(Category::parse(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn event_id_counts_characters_not_bytes() {
        assert!(EventId::parse("e-1").is_ok());
        assert!(EventId::parse(&"é".repeat(128)).is_ok());
        assert!(EventId::parse(&"é".repeat(129)).is_err());
        assert!(EventId::parse("").is_err());
    }
}
