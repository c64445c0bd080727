//! Everything that crosses the wire to the client: the response body, the
//! per-event part codes and the mapping from results to HTTP status.
//!
//! The request side of the wire (the batch document) is parsed in
//! `pipeline::split_and_validate`, which borrows straight from the body bytes.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::borrow::Cow;

use serde::{Serialize, Serializer};
use uuid::Uuid;

/// How long a client should wait before retrying after a 503.
pub const RETRY_AFTER_SECONDS: u64 = 5;

/// The challenge of every 401: a bearer write key.
pub const WWW_AUTHENTICATE: &str = "Bearer realm=\"venus\"";

/// The result code of one event (one `part` of the response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "u16")]
pub enum PartCode {
    /// Kafka acknowledged the event.
    Accepted = 0,
    /// The event broke a validation rule.
    Validation = 1001,
    /// The event's `ip` is not an IPv4 or IPv6 address.
    InvalidIp = 1002,
    /// The event could not be turned into a Kafka message.
    Serialization = 1003,
    /// Kafka did not acknowledge the event.
    KafkaDelivery = 1004,
}

impl From<PartCode> for u16 {
    fn from(code: PartCode) -> u16 {
        code as u16
    }
}

/// The batch-level result code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "u8")]
pub enum BatchCode {
    /// Every event was accepted.
    AllAccepted = 0,
    /// Some events were accepted, some were not.
    Partial = 1,
    /// Nothing was accepted (or the request itself was malformed).
    NoneAccepted = 2,
}

impl From<BatchCode> for u8 {
    fn from(code: BatchCode) -> u8 {
        code as u8
    }
}

/// The result of one event, in request order.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Part {
    /// The event's `id` as sent, when it was a string.
    pub id: Option<String>,
    /// The server-side id given to the event; absent for events rejected
    /// before enrichment. Written as text only into the response body: a
    /// `String` per event cost an allocation and a formatting pass each.
    #[serde(serialize_with = "hyphenated")]
    pub backend_id: Option<Uuid>,
    pub code: PartCode,
    /// What happened, for a person (a constant for accepted events).
    pub data: Cow<'static, str>,
}

/// A UUID as its lowercase hyphenated text, or `null`.
fn hyphenated<S: Serializer>(id: &Option<Uuid>, serializer: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => {
            serializer.serialize_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
        }
        None => serializer.serialize_none(),
    }
}

/// The body of every response of `POST /api/v1/upload`, errors included.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UploadResponse {
    pub code: BatchCode,
    pub data: String,
    pub parts: Vec<Part>,
}

/// A finished response: status plus body. This is what a pipeline responder
/// carries and what the HTTP layer sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: StatusCode,
    pub body: UploadResponse,
    /// `Retry-After` in seconds, when the reply knows better than the
    /// default (a rate limit knows when its bucket has room again).
    pub retry_after: Option<u64>,
}

impl Reply {
    /// A request-level error: code 2, no parts.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: UploadResponse {
                code: BatchCode::NoneAccepted,
                data: message.into(),
                parts: Vec::new(),
            },
            retry_after: None,
        }
    }

    /// The response for a batch whose every event has a final result.
    ///
    /// * all accepted: 200, code 0;
    /// * some accepted: 206, code 1;
    /// * none accepted: 503 when any event failed on Kafka's side (a retry
    ///   may succeed), otherwise 400 (the client must fix its events).
    pub fn from_parts(parts: Vec<Part>) -> Self {
        let total = parts.len();
        let accepted = parts
            .iter()
            .filter(|p| p.code == PartCode::Accepted)
            .count();
        let kafka_failed = parts
            .iter()
            .filter(|p| p.code == PartCode::KafkaDelivery)
            .count();
        let (status, code, data) = if accepted == total {
            (
                StatusCode::OK,
                BatchCode::AllAccepted,
                format!("all {total} events accepted"),
            )
        } else if accepted > 0 {
            (
                StatusCode::PARTIAL_CONTENT,
                BatchCode::Partial,
                format!("{accepted} of {total} events accepted"),
            )
        } else if kafka_failed > 0 {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                BatchCode::NoneAccepted,
                format!("none of {total} events accepted: Kafka did not acknowledge {kafka_failed} of them; retry later"),
            )
        } else {
            (
                StatusCode::BAD_REQUEST,
                BatchCode::NoneAccepted,
                format!("none of {total} events accepted: every event was rejected, see parts"),
            )
        };
        Self {
            status,
            body: UploadResponse { code, data, parts },
            retry_after: None,
        }
    }

    /// Whether a retry later could change the outcome (Kafka trouble).
    fn wants_retry_after(&self) -> bool {
        self.status == StatusCode::SERVICE_UNAVAILABLE
            || self
                .body
                .parts
                .iter()
                .any(|p| p.code == PartCode::KafkaDelivery)
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        // Sized for the usual part up front: growing the buffer part by
        // part copied the body over and over.
        let mut body = Vec::with_capacity(64 + 160 * self.body.parts.len());
        let body = match sonic_rs::to_writer(&mut body, &self.body) {
            Ok(()) => body,
            // Serializing plain strings and integers cannot fail; if it ever
            // does, the client still gets a well-formed error body.
            Err(_) => {
                br#"{"code":2,"data":"internal error while writing the response","parts":[]}"#
                    .to_vec()
            }
        };
        let retry = self
            .retry_after
            .or_else(|| self.wants_retry_after().then_some(RETRY_AFTER_SECONDS));
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut response = (
            self.status,
            [(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if let Some(seconds) = retry {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if unauthorized {
            // RFC 9110: a 401 names the scheme it wants.
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static(WWW_AUTHENTICATE),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(code: PartCode) -> Part {
        Part {
            id: Some("e".into()),
            backend_id: None,
            code,
            data: Cow::Borrowed(""),
        }
    }

    #[test]
    fn all_accepted_is_200_code_0() {
        let reply = Reply::from_parts(vec![part(PartCode::Accepted), part(PartCode::Accepted)]);
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body.code, BatchCode::AllAccepted);
    }

    #[test]
    fn some_accepted_is_206_code_1() {
        for failed in [
            PartCode::Validation,
            PartCode::InvalidIp,
            PartCode::Serialization,
            PartCode::KafkaDelivery,
        ] {
            let reply = Reply::from_parts(vec![part(PartCode::Accepted), part(failed)]);
            assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "{failed:?}");
            assert_eq!(reply.body.code, BatchCode::Partial);
        }
    }

    #[test]
    fn none_accepted_for_invalid_events_is_400() {
        let reply = Reply::from_parts(vec![part(PartCode::Validation), part(PartCode::InvalidIp)]);
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.body.code, BatchCode::NoneAccepted);
        assert!(!reply.wants_retry_after());
    }

    #[test]
    fn none_accepted_with_kafka_failures_is_503_with_retry_after() {
        let reply = Reply::from_parts(vec![
            part(PartCode::Validation),
            part(PartCode::KafkaDelivery),
        ]);
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.body.code, BatchCode::NoneAccepted);
        let response = reply.into_response();
        assert_eq!(response.headers()[axum::http::header::RETRY_AFTER], "5");
    }

    #[test]
    fn partial_with_kafka_failure_also_says_when_to_retry() {
        let reply = Reply::from_parts(vec![
            part(PartCode::Accepted),
            part(PartCode::KafkaDelivery),
        ]);
        let response = reply.into_response();
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
        assert!(response
            .headers()
            .contains_key(axum::http::header::RETRY_AFTER));
    }

    #[test]
    fn codes_serialize_as_numbers() {
        let body = UploadResponse {
            code: BatchCode::Partial,
            data: "x".into(),
            parts: vec![Part {
                id: Some("a".into()),
                backend_id: Some(Uuid::from_u128(0x0193_4b6e_0000_7000_8000_0000_0000_0001)),
                code: PartCode::InvalidIp,
                data: "bad".into(),
            }],
        };
        let json = sonic_rs::to_string(&body).unwrap();
        assert_eq!(
            json,
            r#"{"code":1,"data":"x","parts":[{"id":"a","backend_id":"01934b6e-0000-7000-8000-000000000001","code":1002,"data":"bad"}]}"#
        );
    }

    #[test]
    fn error_reply_has_the_same_shape_with_no_parts() {
        let reply = Reply::error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "nope");
        let json = sonic_rs::to_string(&reply.body).unwrap();
        assert_eq!(json, r#"{"code":2,"data":"nope","parts":[]}"#);
    }
}
