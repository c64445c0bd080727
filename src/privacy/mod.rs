//! What personal data reaches Kafka: the operator's choice, per app.
//!
//! * **Addresses** (`privacy.ip`, or an app's own): `keep`, `truncate`,
//!   `hash` or `drop`, for the client's address and an event's own `ip`
//!   alike. GeoIP looks the full address up first, so the location stays;
//!   what is stored in the message, and shown in spans, is the reduced one.
//! * **Field rules** (`privacy.fields`, or an app's own): remove, hash,
//!   mask or scrub named fields of `meta` and of every event (`rules`,
//!   `detect`).
//! * **Consent**: a batch marked anonymous (header `X-Venus-Anonymous: 1`
//!   or `meta.anonymous: true`) stores no address whatever the mode, and
//!   keeps every field rule.
//!
//! The rules live with the apps in the configuration, are checked at load
//! and come back with every SIGHUP (see `apps::reload`), the hash key too
//! when it is read from `privacy.hash_key_file`. With no rule and `keep`,
//! nothing here runs for an upload and the bytes of `meta` and `data` go to
//! Kafka as sent (docs/PRIVACY.md).

pub mod detect;
pub mod hash;
pub mod rules;
pub mod settings;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::config::ConfigError;

pub use self::hash::{HashKey, Secret};
pub use self::rules::{FieldRule, MemberRewrite, Replacement, Root, RuleTree, Scratch, Unreadable};
pub use self::settings::{AppPrivacySettings, FieldRuleSettings, IpMode, PrivacySettings};

/// The request header that marks a batch anonymous.
pub const ANONYMOUS_HEADER: &str = "x-venus-anonymous";
/// The `meta` member that marks a batch anonymous.
pub const ANONYMOUS_META_FIELD: &str = "anonymous";

/// Whether a request's headers mark its batch anonymous
/// (`X-Venus-Anonymous: 1` or `true`).
pub fn anonymous_requested(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(ANONYMOUS_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| matches!(v.trim(), "1") || v.trim().eq_ignore_ascii_case("true"))
}

/// What is stored of one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredIp {
    /// The address as it is (`keep`).
    Address(IpAddr),
    /// The text of the address truncated to its network, made once per
    /// address and batch (an event's own `ip` is rewritten with it).
    Truncated(Arc<str>),
    /// The keyed hash of the whole address (32 hex digits).
    Hashed(Arc<str>),
    /// Nothing (an empty string in the message).
    Dropped,
}

impl std::fmt::Display for StoredIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Address(ip) => ip.fmt(f),
            Self::Truncated(text) | Self::Hashed(text) => f.write_str(text),
            Self::Dropped => Ok(()),
        }
    }
}

/// One app's rules, in force for one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privacy {
    pub ip: IpMode,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    key: Option<Arc<HashKey>>,
    meta_rules: RuleTree,
    data_rules: RuleTree,
}

impl Privacy {
    /// Keep everything: the rules of a gateway without a `privacy` section.
    pub fn keep_all() -> Self {
        Self {
            ip: IpMode::Keep,
            ipv4_prefix: 32,
            ipv6_prefix: 128,
            key: None,
            meta_rules: RuleTree::default(),
            data_rules: RuleTree::default(),
        }
    }

    /// What is stored of `ip` (already canonical: IPv4-mapped IPv6 as IPv4).
    /// Called once per address and batch: nearly once per event.
    pub fn store_ip(&self, ip: IpAddr) -> StoredIp {
        let text = |ip: IpAddr| {
            let mut out = Vec::with_capacity(16);
            write_ip(&mut out, ip);
            out
        };
        match self.ip {
            IpMode::Keep => StoredIp::Address(ip),
            IpMode::Truncate => {
                let out = text(truncate(ip, self.ipv4_prefix, self.ipv6_prefix));
                // Digits, dots, colons and hex: ASCII.
                StoredIp::Truncated(String::from_utf8(out).unwrap_or_default().into())
            }
            IpMode::Hash => match &self.key {
                Some(key) => StoredIp::Hashed(key.hash(&text(ip)).into()),
                // Checked at load: `hash` has a key. Never store the address.
                None => StoredIp::Dropped,
            },
            IpMode::Drop => StoredIp::Dropped,
        }
    }

    /// Whether an event's own `ip`, sent in its `data`, is rewritten.
    pub fn rewrites_sent_ip(&self) -> bool {
        self.ip != IpMode::Keep
    }

    pub fn has_meta_rules(&self) -> bool {
        !self.meta_rules.is_empty()
    }

    pub fn has_data_rules(&self) -> bool {
        !self.data_rules.is_empty()
    }

    /// What one batch's rewrites reuse (its hashes, under this
    /// configuration's key, and the edit list).
    pub fn scratch(&self) -> Scratch<'_> {
        Scratch::new(self.key.as_deref())
    }

    /// `meta` with the meta rules applied; `Ok(None)` when none changed it.
    pub fn apply_meta(
        &self,
        meta: &str,
        scratch: &mut Scratch<'_>,
    ) -> Result<Option<String>, Unreadable> {
        self.meta_rules.apply(meta, scratch, None)
    }

    /// An event with the data rules applied and, when `sent_ip` is given,
    /// its own `ip` member replaced by it (removed when dropped), all in one
    /// walk; `Ok(None)` when nothing changed.
    pub fn apply_data(
        &self,
        event: &str,
        sent_ip: Option<&StoredIp>,
        scratch: &mut Scratch<'_>,
    ) -> Result<Option<String>, Unreadable> {
        let replace_ip = |raw: &str| -> Replacement {
            if !raw.trim_start().starts_with('"') {
                return Replacement::Keep;
            }
            match sent_ip {
                Some(StoredIp::Dropped) => Replacement::Remove,
                Some(StoredIp::Truncated(text) | StoredIp::Hashed(text)) => {
                    Replacement::PlainString(text.clone())
                }
                Some(StoredIp::Address(ip)) => Replacement::Value(format!("\"{ip}\"")),
                None => Replacement::Keep,
            }
        };
        let extra: Option<MemberRewrite<'_>> =
            sent_ip.map(|_| ("ip", &replace_ip as &dyn Fn(&str) -> Replacement));
        if self.data_rules.is_empty() && extra.is_none() {
            return Ok(None);
        }
        self.data_rules.apply(event, scratch, extra)
    }

    /// The same rules for a batch marked anonymous: no address stored.
    fn anonymous(&self) -> Self {
        Self {
            ip: IpMode::Drop,
            ..self.clone()
        }
    }
}

/// Appends `ip` in its `Display` form: IPv4 digit by digit, without the
/// formatting machinery, which costs several times more (this runs for
/// nearly every event, in `write_kafka` and in [`Privacy::store_ip`]).
pub fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    use std::io::Write;

    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
            }
        }
        // Writing to a Vec cannot fail.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `ip` with all but its first `v4` (IPv4) or `v6` (IPv6) bits set to 0.
pub fn truncate(ip: IpAddr, v4: u8, v6: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(v4.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(v6.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// An app's rules, and the same for its anonymous batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppPrivacy {
    normal: Privacy,
    anonymous: Privacy,
}

impl AppPrivacy {
    pub fn new(rules: Privacy) -> Self {
        Self {
            anonymous: rules.anonymous(),
            normal: rules,
        }
    }

    pub fn keep_all() -> Self {
        Self::new(Privacy::keep_all())
    }

    /// One shared [`AppPrivacy::keep_all`], for batches no app's rules
    /// were found for yet.
    pub fn shared_keep_all() -> &'static Arc<Self> {
        static KEEP_ALL: std::sync::OnceLock<Arc<AppPrivacy>> = std::sync::OnceLock::new();
        KEEP_ALL.get_or_init(|| Arc::new(Self::keep_all()))
    }

    /// The rules for a batch, anonymous or not.
    pub fn rules(&self, anonymous: bool) -> &Privacy {
        if anonymous {
            &self.anonymous
        } else {
            &self.normal
        }
    }
}

/// The `privacy` section, checked, ready to give each app its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivacyPolicy {
    ip: IpMode,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    key: Option<Arc<HashKey>>,
    default_rules: Vec<FieldRule>,
    /// The rules of every app without its own.
    pub default: Arc<AppPrivacy>,
}

impl PrivacyPolicy {
    /// Checks `settings` and reads the hash key (from `hash_key_file`, when
    /// set, at each call: a reload picks up a rotated key).
    pub fn parse(settings: &PrivacySettings) -> Result<Self, ConfigError> {
        for (key, bits, max) in [
            (
                "privacy.truncate_ipv4_prefix",
                settings.truncate_ipv4_prefix,
                32,
            ),
            (
                "privacy.truncate_ipv6_prefix",
                settings.truncate_ipv6_prefix,
                128,
            ),
        ] {
            if bits > max {
                return Err(ConfigError::invalid(
                    key,
                    format!("is {bits}; at most {max}"),
                ));
            }
        }
        let key = read_key(settings)?;
        let default_rules = parse_rules("privacy.fields", &settings.fields)?;
        let policy = Self {
            ip: settings.ip,
            ipv4_prefix: settings.truncate_ipv4_prefix,
            ipv6_prefix: settings.truncate_ipv6_prefix,
            key: key.clone(),
            default: Arc::new(AppPrivacy::keep_all()),
            default_rules,
        };
        let default = policy.rules_of(settings.ip, None, "privacy")?;
        Ok(Self {
            default: Arc::new(AppPrivacy::new(default)),
            ..policy
        })
    }

    /// The rules of an app with `own` settings (`None`: the defaults);
    /// `at` names the app's `privacy` key in an error (`apps[0].privacy`).
    pub fn app(
        &self,
        own: Option<&AppPrivacySettings>,
        at: &str,
    ) -> Result<Arc<AppPrivacy>, String> {
        let Some(own) = own else {
            return Ok(self.default.clone());
        };
        let fields = match &own.fields {
            Some(fields) => Some(parse_rules_at(&format!("{at}.fields"), fields)?),
            None => None,
        };
        let ip = own.ip.unwrap_or(self.ip);
        self.rules_of(ip, fields, at)
            .map(|rules| Arc::new(AppPrivacy::new(rules)))
            .map_err(|e| e.to_string())
    }

    fn rules_of(
        &self,
        ip: IpMode,
        fields: Option<Vec<FieldRule>>,
        at: &str,
    ) -> Result<Privacy, ConfigError> {
        let rules = fields.unwrap_or_else(|| self.default_rules.clone());
        let needs_key = ip == IpMode::Hash || rules.iter().any(|r| r.action.uses_key());
        if needs_key && self.key.is_none() {
            return Err(ConfigError::invalid(
                "privacy.hash_key",
                format!("{at} hashes, but no key is set: give privacy.hash_key (VENUS__PRIVACY__HASH_KEY) or privacy.hash_key_file"),
            ));
        }
        let (meta, data): (Vec<FieldRule>, Vec<FieldRule>) =
            rules.into_iter().partition(|r| r.root == Root::Meta);
        let (meta_rules, data_rules) = (RuleTree::new(&meta), RuleTree::new(&data));
        Ok(Privacy {
            ip,
            ipv4_prefix: self.ipv4_prefix,
            ipv6_prefix: self.ipv6_prefix,
            key: self.key.clone(),
            meta_rules,
            data_rules,
        })
    }
}

fn read_key(settings: &PrivacySettings) -> Result<Option<Arc<HashKey>>, ConfigError> {
    let from_file;
    let (text, key_name) = if !settings.hash_key_file.is_empty() {
        if !settings.hash_key.is_empty() {
            return Err(ConfigError::invalid(
                "privacy.hash_key_file",
                "is set together with privacy.hash_key; give one",
            ));
        }
        from_file = std::fs::read_to_string(&settings.hash_key_file).map_err(|e| {
            ConfigError::invalid(
                "privacy.hash_key_file",
                format!("cannot read {}: {e}", settings.hash_key_file),
            )
        })?;
        (from_file.trim(), "privacy.hash_key_file")
    } else {
        (settings.hash_key.expose(), "privacy.hash_key")
    };
    if text.is_empty() {
        return Ok(None);
    }
    HashKey::new(text.as_bytes())
        .map(|key| Some(Arc::new(key)))
        .map_err(|e| ConfigError::invalid(key_name, e))
}

fn parse_rules(
    key: &'static str,
    fields: &[FieldRuleSettings],
) -> Result<Vec<FieldRule>, ConfigError> {
    parse_rules_at(key, fields).map_err(|e| ConfigError::invalid(key, e))
}

fn parse_rules_at(at: &str, fields: &[FieldRuleSettings]) -> Result<Vec<FieldRule>, String> {
    fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FieldRule::parse(&f.path, &f.action, &f.detect).map_err(|e| format!("{at}[{i}]: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn settings(yaml: &str) -> PrivacySettings {
        serde_yaml_like(yaml)
    }

    /// The section from YAML, through the configuration crate as at load.
    fn serde_yaml_like(yaml: &str) -> PrivacySettings {
        config::Config::builder()
            .add_source(config::File::from_str(yaml, config::FileFormat::Yaml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    #[test]
    fn addresses_are_written_as_their_display_form() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.9.100",
            "81.2.69.142",
            "::1",
            "2001:db8::ff00:42:8329",
            "::ffff:1.2.3.4",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = b"x".to_vec();
            write_ip(&mut out, ip);
            assert_eq!(out, format!("x{ip}").into_bytes());
        }
    }

    #[test]
    fn truncation_keeps_the_network() {
        assert_eq!(truncate(ip("203.0.113.77"), 24, 48), ip("203.0.113.0"));
        assert_eq!(truncate(ip("203.0.113.77"), 16, 48), ip("203.0.0.0"));
        assert_eq!(
            truncate(ip("2001:db8:aaaa:bbbb::1"), 24, 48),
            ip("2001:db8:aaaa::")
        );
        assert_eq!(truncate(ip("203.0.113.77"), 0, 0), ip("0.0.0.0"));
        assert_eq!(truncate(ip("203.0.113.77"), 32, 128), ip("203.0.113.77"));
    }

    #[test]
    fn each_ip_mode_stores_what_it_says() {
        let key = "0123456789abcdef0123";
        for (mode, expected) in [
            ("keep", Some("81.2.69.142")),
            ("truncate", Some("81.2.69.0")),
            ("drop", Some("")),
            ("hash", None),
        ] {
            let policy =
                PrivacyPolicy::parse(&settings(&format!("ip: {mode}\nhash_key: {key}"))).unwrap();
            let stored = policy
                .default
                .rules(false)
                .store_ip(ip("81.2.69.142"))
                .to_string();
            match expected {
                Some(expected) => assert_eq!(stored, expected, "{mode}"),
                None => {
                    assert_eq!(stored.len(), 32, "{stored}");
                    assert!(!stored.contains("81.2"), "{stored}");
                    assert_eq!(
                        stored,
                        HashKey::new(key.as_bytes()).unwrap().hash(b"81.2.69.142")
                    );
                }
            }
            // An anonymous batch stores nothing, whatever the mode.
            assert_eq!(
                policy.default.rules(true).store_ip(ip("81.2.69.142")),
                StoredIp::Dropped
            );
        }
    }

    #[test]
    fn hashing_without_a_key_or_with_a_short_one_is_a_load_error() {
        let err = PrivacyPolicy::parse(&settings("ip: hash"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("privacy.hash_key"), "{err}");
        let err = PrivacyPolicy::parse(&settings("fields:\n  - {path: data.email, action: hash}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no key is set"), "{err}");
        let err = PrivacyPolicy::parse(&settings("hash_key: short"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 16"), "{err}");
        assert!(!err.contains("short\""), "the key is not repeated: {err}");
        let err = PrivacyPolicy::parse(&settings("fields:\n  - {path: data.email, action: burn}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("privacy.fields[0]") && err.contains("\"burn\""),
            "{err}"
        );
    }

    #[test]
    fn the_key_file_is_read_at_each_parse() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "first key, sixteen bytes or more\n").unwrap();
        let yaml = format!("ip: hash\nhash_key_file: {}", file.path().display());
        let first = PrivacyPolicy::parse(&settings(&yaml)).unwrap();
        std::fs::write(file.path(), "second key, sixteen bytes or more\n").unwrap();
        let second = PrivacyPolicy::parse(&settings(&yaml)).unwrap();
        let address = ip("192.0.2.1");
        assert_ne!(
            first.default.rules(false).store_ip(address),
            second.default.rules(false).store_ip(address)
        );
    }

    #[test]
    fn an_apps_own_rules_replace_the_defaults_and_inherit_what_they_leave_out() {
        let policy = PrivacyPolicy::parse(&settings(
            "ip: truncate\nfields:\n  - {path: data.email, action: remove}",
        ))
        .unwrap();
        let own = AppPrivacySettings {
            ip: None,
            fields: Some(vec![FieldRuleSettings {
                path: "meta.user".into(),
                action: "mask".into(),
                detect: vec![],
            }]),
        };
        let app = policy.app(Some(&own), "apps[0].privacy").unwrap();
        let rules = app.rules(false);
        assert_eq!(rules.ip, IpMode::Truncate, "inherited");
        assert!(rules.has_meta_rules() && !rules.has_data_rules());
        assert_eq!(
            rules
                .apply_meta(r#"{"app_id":"a","user":"jane"}"#, &mut rules.scratch())
                .unwrap()
                .unwrap(),
            r#"{"app_id":"a","user":"****"}"#
        );
        let default = policy.app(None, "apps[1]").unwrap();
        assert!(default.rules(false).has_data_rules());
    }

    #[test]
    fn an_events_own_ip_follows_the_mode() {
        let policy = PrivacyPolicy::parse(&settings("ip: drop")).unwrap();
        let rules = policy.default.rules(false);
        let event = r#"{"id":"1","ip":"81.2.69.142","x":1}"#;
        assert_eq!(
            rules
                .apply_data(event, Some(&StoredIp::Dropped), &mut rules.scratch())
                .unwrap()
                .unwrap(),
            r#"{"id":"1","x":1}"#
        );
        let truncated = StoredIp::Truncated("81.2.69.0".into());
        assert_eq!(
            rules
                .apply_data(event, Some(&truncated), &mut rules.scratch())
                .unwrap()
                .unwrap(),
            r#"{"id":"1","ip":"81.2.69.0","x":1}"#
        );
        assert_eq!(
            rules.apply_data(event, None, &mut rules.scratch()),
            Ok(None)
        );
    }
}
