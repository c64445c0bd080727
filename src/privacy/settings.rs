//! The `privacy` section of `config.yaml` and the `privacy` key of an app,
//! as written; [`super::PrivacyPolicy::parse`] checks them.

use serde::Deserialize;

use super::hash::Secret;

/// What is stored of an address: the client's, or an event's own `ip`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IpMode {
    /// The address as it is (the default).
    #[default]
    Keep,
    /// The network only: IPv4 to `truncate_ipv4_prefix` bits (/24), IPv6 to
    /// `truncate_ipv6_prefix` bits (/48).
    Truncate,
    /// A keyed hash (HMAC-SHA256 with `hash_key`): the same address gives
    /// the same value, which nobody without the key can turn back.
    Hash,
    /// Nothing: `ip` is an empty string.
    Drop,
}

impl IpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Truncate => "truncate",
            Self::Hash => "hash",
            Self::Drop => "drop",
        }
    }
}

/// The `privacy` section: the rules of every app without its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySettings {
    /// `keep` (default), `truncate`, `hash` or `drop`.
    #[serde(default)]
    pub ip: IpMode,
    /// Bits of an IPv4 address `truncate` keeps (0..=32).
    #[serde(default = "default_ipv4_prefix")]
    pub truncate_ipv4_prefix: u8,
    /// Bits of an IPv6 address `truncate` keeps (0..=128).
    #[serde(default = "default_ipv6_prefix")]
    pub truncate_ipv6_prefix: u8,
    /// The key of every `hash` (addresses and fields), best given as
    /// `VENUS__PRIVACY__HASH_KEY`; at least 16 bytes. Never logged.
    #[serde(default)]
    pub hash_key: Secret,
    /// A file whose content (trimmed) is the key instead; read at start and
    /// on every SIGHUP, so a key is rotated by rewriting the file.
    #[serde(default)]
    pub hash_key_file: String,
    /// Field rules for every app without rules of its own.
    #[serde(default)]
    pub fields: Vec<FieldRuleSettings>,
}

impl Default for PrivacySettings {
    fn default() -> Self {
        Self {
            ip: IpMode::default(),
            truncate_ipv4_prefix: default_ipv4_prefix(),
            truncate_ipv6_prefix: default_ipv6_prefix(),
            hash_key: Secret::default(),
            hash_key_file: String::new(),
            fields: Vec::new(),
        }
    }
}

fn default_ipv4_prefix() -> u8 {
    24
}

fn default_ipv6_prefix() -> u8 {
    48
}

/// `apps[].privacy`: an app's own rules; what it leaves out is the
/// `privacy` section's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppPrivacySettings {
    /// The app's IP mode; absent: `privacy.ip`.
    #[serde(default)]
    pub ip: Option<IpMode>,
    /// The app's field rules, instead of `privacy.fields`; absent: those.
    #[serde(default)]
    pub fields: Option<Vec<FieldRuleSettings>>,
}

/// One field rule as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldRuleSettings {
    /// `data.<field>...` or `meta.<field>...`, fields separated by `.`, with
    /// `[*]` after a field for every item of its array: `data.items[*].sku`.
    pub path: String,
    /// `remove`, `hash`, `mask` or `scrub`.
    pub action: String,
    /// For `scrub`: what to look for in the field's strings: `email`,
    /// `phone`, `card` (checked by Luhn), `ad_id`; empty: all four.
    #[serde(default)]
    pub detect: Vec<String>,
}
