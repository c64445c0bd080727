//! `kafka.security`: how every Kafka client of both binaries connects (the
//! gateway's producer and its topic creation, the ingester's consumer, its
//! admin client and its dead-letter producer). One section, so that no
//! client is left on plaintext while the others use TLS and SASL: the
//! pass-through maps (`kafka.producer`, `ingester.consumer`) refuse the keys
//! this section sets.
//!
//! The password and the key password are [`Secret`]s (they never print);
//! the files are read at start-up, so a missing CA or key stops the process
//! naming the key, not the first connection.
//!
//! [`all_brokers_down`] tells the error that hides such a cause from the
//! cause itself.

use std::path::PathBuf;

use rdkafka::config::ClientConfig;
use serde::Deserialize;

use crate::config::ConfigError;
use crate::secret::Secret;

/// The librdkafka keys set from this section; the pass-through maps refuse
/// them.
pub const SECURITY_KEYS: &[&str] = &[
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.ca.pem",
    "ssl.certificate.location",
    "ssl.certificate.pem",
    "ssl.key.location",
    "ssl.key.pem",
    "ssl.key.password",
    "ssl.endpoint.identification.algorithm",
];

/// How the Kafka clients talk to the brokers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `plaintext` (the default), `ssl`, `sasl_plaintext` or `sasl_ssl`
    /// (what MSK, Confluent Cloud, Aiven and Redpanda Cloud use).
    #[serde(default)]
    pub protocol: Protocol,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; needed with the `sasl_`
    /// protocols.
    #[serde(default)]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// The SASL user name.
    #[serde(default)]
    pub username: String,
    /// The SASL password (`VENUS__KAFKA__SECURITY__PASSWORD`); never logged.
    #[serde(default)]
    pub password: Secret,
    /// A file holding the SASL password instead (a mounted secret); a
    /// trailing newline is dropped.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM file of the certificate authorities the brokers' certificates
    /// must chain to; unset: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that authenticate clients by
    /// TLS (mTLS); with `key_file`.
    #[serde(default)]
    pub certificate_file: Option<PathBuf>,
    /// PEM private key of `certificate_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Password of an encrypted `key_file`; never logged.
    #[serde(default)]
    pub key_password: Secret,
    /// Check that a broker's certificate names the host connected to
    /// (default true). Turn off only for brokers reached by an address
    /// their certificate does not carry.
    #[serde(default = "yes")]
    pub verify_hostname: bool,
}

fn yes() -> bool {
    true
}

/// `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Protocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    pub fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    pub fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

impl TryFrom<String> for Protocol {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "plaintext" => Ok(Self::Plaintext),
            "ssl" => Ok(Self::Ssl),
            "sasl_plaintext" => Ok(Self::SaslPlaintext),
            "sasl_ssl" => Ok(Self::SaslSsl),
            _ => Err(format!(
                "{value:?} is not one of plaintext, ssl, sasl_plaintext, sasl_ssl"
            )),
        }
    }
}

/// `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl TryFrom<String> for SaslMechanism {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.trim().to_ascii_uppercase().replace('_', "-").as_str() {
            "PLAIN" => Ok(Self::Plain),
            "SCRAM-SHA-256" => Ok(Self::ScramSha256),
            "SCRAM-SHA-512" => Ok(Self::ScramSha512),
            _ => Err(format!(
                "{value:?} is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"
            )),
        }
    }
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::invalid("kafka.security", message)
}

/// Reads `path` now, so that a missing or unreadable file stops start-up.
fn readable(what: &str, path: &PathBuf) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| invalid(format!("{what} {}: {e}", path.display())))
}

impl KafkaSecurity {
    /// Checks the section and reads `password_file` in. Run once at load.
    pub fn resolve(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = self.password_file.take() {
            if !self.password.is_empty() {
                return Err(invalid("password and password_file are both set"));
            }
            let text = readable("password_file", &path)?;
            self.password = Secret::new(text.trim_end_matches(['\r', '\n']));
        }
        let protocol = self.protocol;
        if protocol.sasl() {
            if self.sasl_mechanism.is_none() {
                return Err(invalid(format!(
                    "protocol {} needs sasl_mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)",
                    protocol.as_str()
                )));
            }
            if self.username.is_empty() || self.password.is_empty() {
                return Err(invalid(format!(
                    "protocol {} needs username and password (or password_file)",
                    protocol.as_str()
                )));
            }
        } else if self.sasl_mechanism.is_some()
            || !self.username.is_empty()
            || !self.password.is_empty()
        {
            return Err(invalid(format!(
                "sasl_mechanism, username and password need protocol sasl_plaintext or sasl_ssl, not {}",
                protocol.as_str()
            )));
        }
        let files = [
            ("ca_file", &self.ca_file),
            ("certificate_file", &self.certificate_file),
            ("key_file", &self.key_file),
        ];
        for (what, file) in files {
            if let Some(path) = file {
                if !protocol.tls() {
                    return Err(invalid(format!(
                        "{what} needs protocol ssl or sasl_ssl, not {}",
                        protocol.as_str()
                    )));
                }
                let text = readable(what, path)?;
                if !text.contains("-----BEGIN ") {
                    return Err(invalid(format!("{what} {} is not PEM", path.display())));
                }
            }
        }
        if self.certificate_file.is_some() != self.key_file.is_some() {
            return Err(invalid("certificate_file and key_file go together"));
        }
        Ok(())
    }

    /// Sets the connection keys of `config` (any client: producer,
    /// consumer, admin).
    pub fn apply(&self, config: &mut ClientConfig) {
        config.set("security.protocol", self.protocol.as_str());
        if let Some(mechanism) = self.sasl_mechanism {
            config
                .set("sasl.mechanism", mechanism.as_str())
                .set("sasl.username", &self.username)
                .set("sasl.password", self.password.expose());
        }
        if self.protocol.tls() {
            if let Some(path) = &self.ca_file {
                config.set("ssl.ca.location", path.display().to_string());
            }
            if let (Some(certificate), Some(key)) = (&self.certificate_file, &self.key_file) {
                config
                    .set(
                        "ssl.certificate.location",
                        certificate.display().to_string(),
                    )
                    .set("ssl.key.location", key.display().to_string());
                if !self.key_password.is_empty() {
                    config.set("ssl.key.password", self.key_password.expose());
                }
            }
            config.set(
                "ssl.endpoint.identification.algorithm",
                if self.verify_hostname {
                    "https"
                } else {
                    "none"
                },
            );
        }
    }
}

/// librdkafka's "every broker is down", which follows the error that says
/// why (and would hide it): both binaries' Kafka clients keep the earlier
/// reason (a failed TLS handshake or SASL login) for `/readyz`.
pub fn all_brokers_down(error: &rdkafka::error::KafkaError) -> bool {
    error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        file
    }

    fn set(security: &KafkaSecurity) -> std::collections::BTreeMap<String, String> {
        let mut config = ClientConfig::new();
        security.apply(&mut config);
        config
            .config_map()
            .keys()
            // `get`: the map itself shows secrets as "[sanitized for safety]".
            .map(|k| (k.to_string(), config.get(k).unwrap_or_default().to_owned()))
            .collect()
    }

    #[test]
    fn plaintext_sets_only_the_protocol() {
        let mut security = KafkaSecurity::default();
        security.resolve().unwrap();
        let keys = set(&security);
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_eq!(keys["security.protocol"], "plaintext");
    }

    #[test]
    fn sasl_ssl_sets_every_key_and_reads_the_password_file() {
        let ca = pem();
        let password = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(password.path(), "0123\n").unwrap();
        let mut security = KafkaSecurity {
            protocol: Protocol::try_from("SASL_SSL".to_owned()).unwrap(),
            sasl_mechanism: Some(SaslMechanism::try_from("scram-sha-512".to_owned()).unwrap()),
            username: "venus".into(),
            password_file: Some(password.path().into()),
            ca_file: Some(ca.path().into()),
            verify_hostname: true,
            ..Default::default()
        };
        security.resolve().unwrap();
        let keys = set(&security);
        assert_eq!(keys["security.protocol"], "sasl_ssl");
        assert_eq!(keys["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(keys["sasl.username"], "venus");
        assert_eq!(keys["sasl.password"], "0123");
        assert_eq!(keys["ssl.ca.location"], ca.path().display().to_string());
        assert_eq!(keys["ssl.endpoint.identification.algorithm"], "https");
        assert_eq!(format!("{security:?}").matches("0123").count(), 0);
        // Every key set is one the pass-through maps refuse.
        for key in keys.keys() {
            assert!(SECURITY_KEYS.contains(&key.as_str()), "{key}");
        }
    }

    #[test]
    fn inconsistent_sections_are_refused_naming_what_is_missing() {
        let cases: Vec<(KafkaSecurity, &str)> = vec![
            (
                KafkaSecurity {
                    protocol: Protocol::SaslSsl,
                    username: "u".into(),
                    password: Secret::new("p"),
                    ..Default::default()
                },
                "needs sasl_mechanism",
            ),
            (
                KafkaSecurity {
                    protocol: Protocol::SaslPlaintext,
                    sasl_mechanism: Some(SaslMechanism::Plain),
                    username: "u".into(),
                    ..Default::default()
                },
                "needs username and password",
            ),
            (
                KafkaSecurity {
                    username: "u".into(),
                    ..Default::default()
                },
                "need protocol sasl_plaintext or sasl_ssl",
            ),
            (
                KafkaSecurity {
                    ca_file: Some(pem().path().into()),
                    ..Default::default()
                },
                "ca_file needs protocol ssl",
            ),
            (
                KafkaSecurity {
                    protocol: Protocol::Ssl,
                    ca_file: Some("/nonexistent/ca.pem".into()),
                    ..Default::default()
                },
                "/nonexistent/ca.pem",
            ),
        ];
        for (mut security, wanted) in cases {
            let error = security.resolve().unwrap_err().to_string();
            assert!(error.contains("kafka.security"), "{error}");
            assert!(error.contains(wanted), "{wanted}: {error}");
        }
        assert!(Protocol::try_from("tls".to_owned()).is_err());
        assert!(SaslMechanism::try_from("GSSAPI".to_owned()).is_err());
    }
}
