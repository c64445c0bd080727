//! A secret from the configuration (a Kafka or ClickHouse password, the
//! privacy hash key): it never prints, so no `Debug` of a settings struct
//! can put it in a log line, a span or an error body.

use serde::Deserialize;

/// A secret from the configuration: it prints as `[redacted]`, so that no
/// `Debug` of a settings struct can put it in a log line.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "[empty]"
        } else {
            "[redacted]"
        })
    }
}
