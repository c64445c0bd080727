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

/// `text` with the user and password of every URL in it replaced
/// (`https://user:pw@host/` becomes `https://[redacted]@host/`): for error
/// texts and log lines that quote a URL a client was configured with.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == ')')
            .unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(userinfo_end) => {
                out.push_str("[redacted]");
                rest = &tail[userinfo_end..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_user_and_password() {
        assert_eq!(
            redact_urls("error sending request for url (https://venus:s3cret@ch:8443/?query=1)"),
            "error sending request for url (https://[redacted]@ch:8443/?query=1)"
        );
        assert_eq!(
            redact_urls("http://ch:8123/ and mailto a@b"),
            "http://ch:8123/ and mailto a@b"
        );
        assert_eq!(redact_urls("x://u@h y://h"), "x://[redacted]@h y://h");
        assert_eq!(format!("{:?}", Secret::new("pw")), "[redacted]");
    }
}
