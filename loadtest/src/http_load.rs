//! The HTTP target: `POST` each batch to the gateway and read its answer.
//!
//! The response body is checked against what was sent: one part per event,
//! in order, with the event's id, and a part code that fits the generated
//! event (valid → 0 or 1004, bad ip → 1002, broken event → 1001). With
//! `--verify`, the backend_id of every accepted event is kept for the Kafka
//! read-back.

use std::borrow::Cow;
use std::sync::Arc;

use anyhow::Context;
use hyper::header::HeaderValue;
use serde::Deserialize;
use uuid::Uuid;

use crate::config::Config;
use crate::generate::{self, Batch, Generator};
use crate::http_client::Client;
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
    client: Client,
    content_type: HeaderValue,
    /// `Bearer <key>`, when the gateway wants a key.
    authorization: Option<HeaderValue>,
    /// Keep the backend_ids of the answers (for `--verify`).
    keep_ids: bool,
    generator: Arc<Generator>,
}

impl HttpTarget {
    /// A client keeping as many idle connections as the load can use.
    pub fn new(config: &Config, generator: Arc<Generator>) -> anyhow::Result<Self> {
        let idle = match config.rate {
            Some(_) => config.max_in_flight,
            None => config.connections,
        };
        let client = Client::new(&config.url, idle, config.timeout)?;
        let authorization = config
            .key
            .as_ref()
            .map(|key| HeaderValue::from_str(&format!("Bearer {key}")))
            .transpose()
            .context("--key must be printable ASCII")?;
        Ok(Self {
            client,
            content_type: HeaderValue::from_static(generate::CONTENT_TYPE),
            authorization,
            keep_ids: config.verify,
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
        let answer = self
            .client
            .post(&self.content_type, self.authorization.as_ref(), body)
            .await;
        match answer {
            Ok(answer) => {
                outcome.status = Some(answer.status);
                outcome.record_latency = true;
                check_response(
                    answer.status,
                    &answer.body,
                    &batch,
                    &mut outcome,
                    self.keep_ids,
                );
            }
            Err(failure) => outcome.count_error(failure.kind(), 1),
        }
        outcome
    }
}

/// Counts the part codes of a response and checks them against the batch;
/// with `keep_ids`, keeps the backend_ids for the read-back.
pub(crate) fn check_response(
    status: u16,
    body: &[u8],
    batch: &Batch<'_>,
    outcome: &mut Outcome,
    keep_ids: bool,
) {
    // UTF-8 checked once over the body, not string by string as
    // `from_slice` does: the reply's parsing was a fifth of this tool's CPU.
    let Some(response) = std::str::from_utf8(body)
        .ok()
        .and_then(|text| serde_json::from_str::<UploadResponse>(text).ok())
    else {
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
    if keep_ids {
        outcome.accepted_ids.reserve(batch.len());
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
                if keep_ids {
                    outcome.accepted_ids.push(id.as_u128());
                }
            }
            (0, None) => {
                // Accepted without a usable backend_id: cannot be verified.
                outcome.accepted += 1;
                outcome.bad_response = true;
            }
            (1004, Some(id)) if keep_ids => outcome.failed_ids.push(id.as_u128()),
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

    /// `check_response` on a fresh outcome.
    fn checked(status: u16, body: &[u8], batch: &Batch<'_>, keep_ids: bool) -> Outcome {
        let mut outcome = Outcome::default();
        check_response(status, body, batch, &mut outcome, keep_ids);
        outcome
    }

    #[test]
    fn a_fitting_answer_is_counted_and_ids_are_kept() {
        let generator = generator(0.0);
        // Find a batch whose events are all expected to be accepted.
        let batch = (0..64)
            .map(|n| generator.batch(n))
            .find(|b| b.expectations().all(|e| e == generate::Expect::Accepted))
            .expect("a fully valid batch");
        let outcome = checked(200, &answer(&batch, &[0, 0, 0, 0]), &batch, true);
        assert!(!outcome.bad_response);
        assert_eq!(outcome.accepted, 4);
        assert_eq!(outcome.accepted_ids.len(), 4);
        assert_eq!(outcome.unexpected_codes, 0);

        let outcome = checked(206, &answer(&batch, &[0, 1001, 0, 0]), &batch, true);
        assert_eq!(outcome.unexpected_codes, 1);
        assert_eq!(outcome.accepted, 3);
        assert!(!outcome.bad_response);

        let outcome = checked(200, &answer(&batch, &[0, 0, 0]), &batch, true);
        assert!(outcome.bad_response, "a missing part is a bad response");

        let outcome = checked(503, br#"{"code":2,"data":"busy","parts":[]}"#, &batch, true);
        assert!(!outcome.bad_response);
        assert_eq!(outcome.accepted, 0);

        let outcome = checked(200, b"<html>", &batch, true);
        assert!(outcome.bad_response);

        // Without --verify the ids are checked but not kept.
        let outcome = checked(206, &answer(&batch, &[0, 1004, 0, 0]), &batch, false);
        assert!(!outcome.bad_response);
        assert_eq!(outcome.accepted, 3);
        assert!(outcome.accepted_ids.is_empty() && outcome.failed_ids.is_empty());
        let outcome = checked(206, &answer(&batch, &[0, 1004, 0, 0]), &batch, true);
        assert_eq!(
            (outcome.accepted_ids.len(), outcome.failed_ids.len()),
            (3, 1)
        );
    }
}
