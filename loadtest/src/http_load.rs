//! The HTTP target: `POST` each batch to the gateway and read its answer.
//!
//! The response body is checked against what was sent: one part per event,
//! in order, with the event's id, and a part code that fits the generated
//! event (valid → 0 or 1004, bad ip → 1002, broken event → 1001). The
//! backend_id of every accepted event is kept for the Kafka read-back.

use std::borrow::Cow;
use std::sync::Arc;

use anyhow::Context;
use reqwest::header::CONTENT_TYPE;
use serde::Deserialize;
use uuid::Uuid;

use crate::config::Config;
use crate::generate::{self, Batch, Generator};
use crate::load::Target;
use crate::report::Outcome;

/// The gateway's response, only the fields the check needs.
#[derive(Deserialize)]
struct UploadResponse<'a> {
    #[serde(borrow, default)]
    parts: Vec<Part<'a>>,
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    backend_id: Option<Cow<'a, str>>,
    code: u16,
}

/// Sends batches to the gateway's upload URL.
pub(crate) struct HttpTarget {
    client: reqwest::Client,
    /// Parsed once: reqwest would parse (and IDNA-map) a string per request.
    url: reqwest::Url,
    /// `Bearer <key>`, when the gateway wants a key.
    authorization: Option<reqwest::header::HeaderValue>,
    generator: Arc<Generator>,
}

impl HttpTarget {
    /// A client keeping as many idle connections as the load can use.
    pub fn new(config: &Config, generator: Arc<Generator>) -> anyhow::Result<Self> {
        let idle = match config.rate {
            Some(_) => config.max_in_flight,
            None => config.connections,
        };
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .pool_max_idle_per_host(idle)
            .tcp_nodelay(true)
            // Loopback tests must not go through an HTTP_PROXY of the environment.
            .no_proxy()
            .build()
            .context("cannot build the HTTP client")?;
        let authorization = config
            .key
            .as_ref()
            .map(|key| reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")))
            .transpose()
            .context("--key must be printable ASCII")?;
        let url = reqwest::Url::parse(&config.url)
            .with_context(|| format!("--url {} is not a URL", config.url))?;
        Ok(Self {
            client,
            authorization,
            url,
            generator,
        })
    }
}

impl Target for HttpTarget {
    async fn send(&self, request: u64) -> Outcome {
        let batch = self.generator.batch(request);
        let body = batch.multipart_body();
        let mut outcome = Outcome {
            events: batch.len() as u32,
            bytes: body.len() as u64,
            category: batch.category_index(),
            ..Outcome::default()
        };
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, generate::CONTENT_TYPE);
        if let Some(authorization) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization.clone());
        }
        let response = request.body(body).send().await;
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                outcome.count_error(error_kind(&error), 1);
                return outcome;
            }
        };
        let status = response.status().as_u16();
        match response.bytes().await {
            Ok(body) => {
                outcome.status = Some(status);
                outcome.record_latency = true;
                check_response(status, &body, &batch, &mut outcome);
            }
            Err(error) => outcome.count_error(error_kind(&error), 1),
        }
        outcome
    }
}

/// A short name for what went wrong with a request.
fn error_kind(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else if error.is_request() {
        "request"
    } else {
        "other"
    }
}

/// Counts the part codes of a response and checks them against the batch.
pub(crate) fn check_response(status: u16, body: &[u8], batch: &Batch<'_>, outcome: &mut Outcome) {
    let Ok(response) = serde_json::from_slice::<UploadResponse>(body) else {
        outcome.bad_response = true;
        return;
    };
    if response.parts.is_empty() {
        // A request-level error (413, 415, 400 for a malformed batch, 503
        // when overloaded) has no parts; a success must have them.
        outcome.bad_response = matches!(status, 200 | 206);
        return;
    }
    if response.parts.len() != batch.len() {
        outcome.bad_response = true;
    }
    for ((index, part), expect) in response.parts.iter().enumerate().zip(batch.expectations()) {
        outcome.count_code(part.code);
        if !expect.allows(part.code) {
            outcome.unexpected_codes += 1;
        }
        // Parts come in request order and echo the ids sent.
        if expect != generate::Expect::Invalid
            && !part
                .id
                .as_deref()
                .is_some_and(|id| batch.is_event_id(index, id))
        {
            outcome.bad_response = true;
        }
        let backend_id = part
            .backend_id
            .as_deref()
            .and_then(|text| Uuid::try_parse(text).ok());
        match (part.code, backend_id) {
            (0, Some(id)) => {
                outcome.accepted += 1;
                outcome.accepted_ids.push(id.as_u128());
            }
            (0, None) => {
                // Accepted without a usable backend_id: cannot be verified.
                outcome.accepted += 1;
                outcome.bad_response = true;
            }
            (1004, Some(id)) => outcome.failed_ids.push(id.as_u128()),
            _ => {}
        }
    }
    let all_accepted = outcome.accepted as usize == batch.len();
    let expected_status = match (all_accepted, outcome.accepted) {
        (true, _) => 200,
        (false, 0) => {
            if outcome.codes.iter().any(|(code, _)| *code == 1004) {
                503
            } else {
                400
            }
        }
        (false, _) => 206,
    };
    if status != expected_status {
        outcome.bad_response = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GenConfig;

    fn generator(invalid_fraction: f64) -> Generator {
        Generator::new(
            &GenConfig {
                events_per_batch: 4,
                invalid_fraction,
                ..GenConfig::default()
            },
            1_790_000_000_000,
        )
    }

    /// A response as the gateway would give it for `batch`.
    fn answer(batch: &Batch<'_>, codes: &[u16]) -> Vec<u8> {
        let parts: Vec<serde_json::Value> = codes
            .iter()
            .enumerate()
            .map(|(i, code)| {
                serde_json::json!({
                    "id": batch.event_id(i),
                    "backend_id": (*code == 0 || *code == 1004).then(|| Uuid::now_v7().to_string()),
                    "code": code,
                    "data": "x",
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"code": 0, "data": "", "parts": parts})).unwrap()
    }

    #[test]
    fn a_fitting_answer_is_counted_and_ids_are_kept() {
        let generator = generator(0.0);
        // Find a batch whose events are all expected to be accepted.
        let batch = (0..64)
            .map(|n| generator.batch(n))
            .find(|b| b.expectations().all(|e| e == generate::Expect::Accepted))
            .expect("a fully valid batch");
        let mut outcome = Outcome::default();
        check_response(200, &answer(&batch, &[0, 0, 0, 0]), &batch, &mut outcome);
        assert!(!outcome.bad_response);
        assert_eq!(outcome.accepted, 4);
        assert_eq!(outcome.accepted_ids.len(), 4);
        assert_eq!(outcome.unexpected_codes, 0);

        let mut outcome = Outcome::default();
        check_response(206, &answer(&batch, &[0, 1001, 0, 0]), &batch, &mut outcome);
        assert_eq!(outcome.unexpected_codes, 1);
        assert_eq!(outcome.accepted, 3);
        assert!(!outcome.bad_response);

        let mut outcome = Outcome::default();
        check_response(200, &answer(&batch, &[0, 0, 0]), &batch, &mut outcome);
        assert!(outcome.bad_response, "a missing part is a bad response");

        let mut outcome = Outcome::default();
        check_response(
            503,
            br#"{"code":2,"data":"busy","parts":[]}"#,
            &batch,
            &mut outcome,
        );
        assert!(!outcome.bad_response);
        assert_eq!(outcome.accepted, 0);

        let mut outcome = Outcome::default();
        check_response(200, b"<html>", &batch, &mut outcome);
        assert!(outcome.bad_response);
    }
}
