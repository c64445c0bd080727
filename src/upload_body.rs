//! From an HTTP request to the batch document bytes.
//!
//! Accepted forms:
//! * `multipart/form-data` with one part named `batch` (a plain field or a
//!   file upload); the part may be gzip-compressed (part `Content-Type:
//!   application/gzip` or part header `Content-Encoding: gzip`);
//! * `application/json`, the document as the body; `text/plain` too, which
//!   is what `navigator.sendBeacon` sends for a string.
//!
//! Either may also arrive with request `Content-Encoding: gzip`. Every size is
//! checked against `server.max_body_bytes` after decompression, while
//! reading, so a small gzip bomb cannot inflate past the limit.

use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, HeaderMap, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::admission::Account;
use crate::wire::Reply;

/// Reads the request body into the batch document, or answers why not.
///
/// Every copy it makes (the body collected in one piece, each step of
/// inflated output, the multipart part) is charged to `account` before it is
/// made: a 10 KiB gzip body that inflates to 10 MiB must not take 10 MiB the
/// memory budget never saw. When a charge is refused the read ends with an
/// error and `account.exhausted()` says why.
pub async fn read_document(
    request: Request,
    max_bytes: usize,
    account: &Arc<Account>,
) -> Result<Bytes, Reply> {
    let (parts, body) = request.into_parts();
    let encoding = content_encoding(&parts.headers)?;
    let kind = body_kind(&parts.headers)?;

    match (kind, encoding) {
        (BodyKind::Json, Encoding::Identity) => {
            let content = collect(body, max_bytes, account).await?;
            inflate_if_gzip(content, max_bytes, account).await
        }
        (BodyKind::Json, Encoding::Gzip) => {
            let compressed = collect(body, max_bytes, account).await?;
            gunzip(compressed, max_bytes, account).await
        }
        (BodyKind::Multipart, Encoding::Identity) => {
            batch_part(Request::from_parts(parts, body), max_bytes, account).await
        }
        (BodyKind::Multipart, Encoding::Gzip) => {
            let compressed = collect(body, max_bytes, account).await?;
            let plain = gunzip(compressed, max_bytes, account).await?;
            let mut parts = parts;
            parts.headers.remove(header::CONTENT_ENCODING);
            parts.headers.remove(header::CONTENT_LENGTH);
            let request = Request::from_parts(parts, Body::from(plain));
            batch_part(request, max_bytes, account).await
        }
    }
}

/// The answer when the memory budget refused a charge (the upload handler
/// counts it as load shedding).
fn over_budget() -> Reply {
    Reply::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the gateway is at its memory budget for uploads; retry later",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Multipart,
}

fn content_encoding(headers: &HeaderMap) -> Result<Encoding, Reply> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(Encoding::Identity);
    };
    match value.to_str().map(|v| v.trim().to_ascii_lowercase()) {
        Ok(v) if v.is_empty() || v == "identity" => Ok(Encoding::Identity),
        Ok(v) if v == "gzip" || v == "x-gzip" => Ok(Encoding::Gzip),
        _ => Err(Reply::error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported Content-Encoding {:?}; use gzip or none",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )),
    }
}

fn body_kind(headers: &HeaderMap) -> Result<BodyKind, Reply> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "multipart/form-data" => Ok(BodyKind::Multipart),
        // `navigator.sendBeacon` with a string body sends text/plain (a
        // type browsers send cross-origin without a preflight).
        "application/json" | "text/plain" => Ok(BodyKind::Json),
        _ => Err(Reply::error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported Content-Type {content_type:?}; send multipart/form-data with a \"batch\" part, or the batch as application/json (or text/plain)"
            ),
        )),
    }
}

fn too_large(max_bytes: usize) -> Reply {
    Reply::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is larger than {max_bytes} bytes (counted after decompression)"),
    )
}

/// Reads a whole body, at most `max_bytes` of it, into one piece.
async fn collect(body: Body, max_bytes: usize, account: &Account) -> Result<Bytes, Reply> {
    match Limited::new(body, max_bytes).collect().await {
        Ok(collected) => {
            // The frames were charged as they arrived; the piece is a copy
            // (no larger than what was charged for them).
            let piece = collected.to_bytes();
            if !account.charge(piece.len()) {
                return Err(over_budget());
            }
            Ok(piece)
        }
        Err(error) if error.is::<LengthLimitError>() => Err(too_large(max_bytes)),
        Err(error) => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            format!("the body could not be read: {error}"),
        )),
    }
}

/// Output inflated on the async worker; past it, inflating goes on on a
/// blocking thread. The bound is on the output: a 4 KiB gzip of zeros is
/// 4 MB of output, milliseconds of CPU.
const INLINE_INFLATE_BYTES: usize = 256 * 1024;

/// How much output is inflated (and charged) at a time.
const INFLATE_STEP: usize = 64 * 1024;

/// Decompresses gzip data, stopping as soon as the output passes `max_bytes`.
/// Small outputs inflate inline; a large one finishes on a blocking thread,
/// so that it does not stall the runtime.
async fn gunzip(
    compressed: Bytes,
    max_bytes: usize,
    account: &Arc<Account>,
) -> Result<Bytes, Reply> {
    use bytes::Buf;
    let mut decoder = flate2::read::MultiGzDecoder::new(compressed.reader());
    let mut plain = Vec::new();
    let inline = INLINE_INFLATE_BYTES.min(max_bytes + 1);
    match inflate_into(&mut decoder, &mut plain, inline, account) {
        Ok(true) => return finish_inflate(plain, max_bytes),
        Ok(false) => {}
        Err(reply) => return Err(reply),
    }
    let account = account.clone();
    tokio::task::spawn_blocking(move || {
        inflate_into(&mut decoder, &mut plain, max_bytes + 1, &account)?;
        finish_inflate(plain, max_bytes)
    })
    .await
    .unwrap_or_else(|_| {
        Err(Reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "decompression failed",
        ))
    })
}

/// Inflates into `plain` until it holds `limit` bytes or the data ends,
/// charging each step to `account` before producing it; `true` when the data
/// ended.
fn inflate_into(
    decoder: &mut impl Read,
    plain: &mut Vec<u8>,
    limit: usize,
    account: &Account,
) -> Result<bool, Reply> {
    loop {
        let step = INFLATE_STEP.min(limit.saturating_sub(plain.len()));
        if step == 0 {
            return Ok(false);
        }
        if !account.charge(step) {
            return Err(over_budget());
        }
        let before = plain.len();
        match (&mut *decoder).take(step as u64).read_to_end(plain) {
            Ok(_) if plain.len() - before < step => return Ok(true),
            Ok(_) => {}
            Err(error) => {
                return Err(Reply::error(
                    StatusCode::BAD_REQUEST,
                    format!("the gzip data is corrupt: {error}"),
                ))
            }
        }
    }
}

fn finish_inflate(plain: Vec<u8>, max_bytes: usize) -> Result<Bytes, Reply> {
    if plain.len() > max_bytes {
        Err(too_large(max_bytes))
    } else {
        Ok(Bytes::from(plain))
    }
}

/// Content that starts with the gzip magic number is gzip whatever its
/// headers say (SDKs and curl often send a gzip file part as
/// `application/octet-stream`); JSON text never starts with these bytes.
async fn inflate_if_gzip(
    content: Bytes,
    max_bytes: usize,
    account: &Arc<Account>,
) -> Result<Bytes, Reply> {
    if content.starts_with(&[0x1f, 0x8b]) {
        gunzip(content, max_bytes, account).await
    } else {
        Ok(content)
    }
}

fn multipart_error(error: axum::extract::multipart::MultipartError, max_bytes: usize) -> Reply {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(max_bytes)
    } else {
        Reply::error(
            StatusCode::BAD_REQUEST,
            format!("the multipart body is malformed: {}", error.body_text()),
        )
    }
}

fn is_gzip_part(headers: &HeaderMap) -> bool {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    matches!(
        content_type.as_deref(),
        Some("application/gzip" | "application/x-gzip")
    ) || matches!(encoding.as_deref(), Some("gzip" | "x-gzip"))
}

/// Finds the one `batch` part and returns its (decompressed) content.
async fn batch_part(
    request: Request,
    max_bytes: usize,
    account: &Arc<Account>,
) -> Result<Bytes, Reply> {
    let mut multipart = Multipart::from_request(request, &()).await.map_err(|e| {
        Reply::error(
            StatusCode::BAD_REQUEST,
            format!("the multipart body is malformed: {}", e.body_text()),
        )
    })?;
    let mut batch: Option<Bytes> = None;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, max_bytes))?
    {
        if field.name() != Some("batch") {
            continue;
        }
        if batch.is_some() {
            return Err(Reply::error(
                StatusCode::BAD_REQUEST,
                "the body has more than one \"batch\" part",
            ));
        }
        let gzip = is_gzip_part(field.headers());
        let mut content = Vec::new();
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| multipart_error(e, max_bytes))?
        {
            if content.len() + chunk.len() > max_bytes {
                return Err(too_large(max_bytes));
            }
            // The part is a copy of the body's bytes.
            if !account.charge(chunk.len()) {
                return Err(over_budget());
            }
            content.extend_from_slice(&chunk);
        }
        let content = Bytes::from(content);
        batch = Some(if gzip {
            gunzip(content, max_bytes, account).await?
        } else {
            inflate_if_gzip(content, max_bytes, account).await?
        });
    }
    batch.ok_or_else(|| {
        Reply::error(
            StatusCode::BAD_REQUEST,
            "the multipart body has no part named \"batch\"",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::MemoryBudget;
    use std::io::Write;

    /// `read_document` with a budget that never says no.
    async fn read_document(request: Request, max_bytes: usize) -> Result<Bytes, Reply> {
        let account = MemoryBudget::new(1 << 30, 0).account([127, 0, 0, 1].into());
        super::read_document(request, max_bytes, &account).await
    }

    #[tokio::test]
    async fn inflated_output_is_charged_while_it_is_made() {
        // 4 MB of zeros in a few KiB of gzip, against a 1 MB budget.
        let bomb = gzip(&vec![b'0'; 4_000_000]);
        assert!(bomb.len() < 20_000);
        let budget = MemoryBudget::new(1_000_000, 0);
        let account = budget.account([127, 0, 0, 1].into());
        let reply = super::read_document(
            request("application/json", Some("gzip"), bomb),
            10_000_000,
            &account,
        )
        .await
        .unwrap_err();
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(account.exhausted());
        assert!(account.held() <= 1_000_000, "{}", account.held());
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn request(content_type: &str, encoding: Option<&str>, body: Vec<u8>) -> Request {
        let mut builder = Request::builder()
            .method("POST")
            .uri("/api/v1/upload")
            .header(header::CONTENT_TYPE, content_type);
        if let Some(encoding) = encoding {
            builder = builder.header(header::CONTENT_ENCODING, encoding);
        }
        builder.body(Body::from(body)).unwrap()
    }

    fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
        let boundary = "XyZbOuNdArY";
        let mut body = Vec::new();
        for (name, content_type, data) in parts {
            write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.json\"\r\n").unwrap();
            if let Some(ct) = content_type {
                write!(body, "Content-Type: {ct}\r\n").unwrap();
            }
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        write!(body, "--{boundary}--\r\n").unwrap();
        (format!("multipart/form-data; boundary={boundary}"), body)
    }

    const DOC: &[u8] = br#"{"meta":{},"data":[]}"#;

    #[tokio::test]
    async fn json_body_is_the_document() {
        let got = read_document(
            request("application/json; charset=utf-8", None, DOC.to_vec()),
            1000,
        )
        .await
        .unwrap();
        assert_eq!(&got[..], DOC);
    }

    #[tokio::test]
    async fn gzip_json_body_is_inflated() {
        let got = read_document(request("application/json", Some("gzip"), gzip(DOC)), 1000)
            .await
            .unwrap();
        assert_eq!(&got[..], DOC);
    }

    #[tokio::test]
    async fn multipart_batch_part_plain_and_gzip() {
        let (ct, body) = multipart(&[
            ("other", None, b"x"),
            ("batch", Some("application/json"), DOC),
        ]);
        assert_eq!(
            &read_document(request(&ct, None, body), 1000).await.unwrap()[..],
            DOC
        );
        let zipped = gzip(DOC);
        let (ct, body) = multipart(&[("batch", Some("application/gzip"), &zipped)]);
        assert_eq!(
            &read_document(request(&ct, None, body), 1000).await.unwrap()[..],
            DOC
        );
    }

    #[tokio::test]
    async fn gzip_content_is_recognised_by_its_magic_number() {
        let zipped = gzip(DOC);
        let (ct, body) = multipart(&[("batch", Some("application/octet-stream"), &zipped)]);
        assert_eq!(
            &read_document(request(&ct, None, body), 1000).await.unwrap()[..],
            DOC
        );
        let got = read_document(request("application/json", None, zipped), 1000)
            .await
            .unwrap();
        assert_eq!(&got[..], DOC);
    }

    #[tokio::test]
    async fn a_part_marked_gzip_is_inflated_even_when_it_is_not_gzip() {
        // Marked by its Content-Encoding header: corrupt gzip, not "bad JSON".
        let boundary = "B";
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"batch\"\r\nContent-Encoding: gzip\r\n\r\n{{\"meta\":1}}\r\n--{boundary}--\r\n"
        );
        let ct = format!("multipart/form-data; boundary={boundary}");
        let reply = read_document(request(&ct, None, body.into_bytes()), 1000)
            .await
            .unwrap_err();
        assert!(
            reply.body.data.contains("gzip data is corrupt"),
            "{}",
            reply.body.data
        );
        let (ct, body) = multipart(&[("batch", Some("application/gzip"), DOC)]);
        let reply = read_document(request(&ct, None, body), 1000)
            .await
            .unwrap_err();
        assert!(
            reply.body.data.contains("gzip data is corrupt"),
            "{}",
            reply.body.data
        );
    }

    #[tokio::test]
    async fn multipart_without_batch_part_is_400() {
        let (ct, body) = multipart(&[("other", None, DOC)]);
        let reply = read_document(request(&ct, None, body), 1000)
            .await
            .unwrap_err();
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert!(reply.body.data.contains("batch"), "{}", reply.body.data);
    }

    #[tokio::test]
    async fn two_batch_parts_are_400() {
        let (ct, body) = multipart(&[("batch", None, DOC), ("batch", None, DOC)]);
        let reply = read_document(request(&ct, None, body), 1000)
            .await
            .unwrap_err();
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn a_text_plain_body_is_the_document_as_sendbeacon_sends_it() {
        let got = read_document(
            request("text/plain;charset=UTF-8", None, DOC.to_vec()),
            1000,
        )
        .await
        .unwrap();
        assert_eq!(&got[..], DOC);
    }

    #[tokio::test]
    async fn unsupported_types_and_encodings_are_415() {
        let reply = read_document(request("text/csv", None, DOC.to_vec()), 1000)
            .await
            .unwrap_err();
        assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let reply = read_document(request("application/json", Some("br"), DOC.to_vec()), 1000)
            .await
            .unwrap_err();
        assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413_before_and_after_inflating() {
        let big = vec![b' '; 2000];
        let reply = read_document(request("application/json", None, big.clone()), 1000)
            .await
            .unwrap_err();
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
        // Compresses to far below the limit, inflates past it.
        let bomb = gzip(&vec![b' '; 100_000]);
        assert!(bomb.len() < 1000);
        let reply = read_document(
            request("application/json", Some("gzip"), bomb.clone()),
            1000,
        )
        .await
        .unwrap_err();
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
        let (ct, body) = multipart(&[("batch", Some("application/gzip"), &bomb)]);
        let reply = read_document(request(&ct, None, body), 1000)
            .await
            .unwrap_err();
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn corrupt_gzip_is_400() {
        let reply = read_document(
            request("application/json", Some("gzip"), b"not gzip".to_vec()),
            1000,
        )
        .await
        .unwrap_err();
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert!(reply.body.data.contains("gzip"));
    }
}

#[cfg(test)]
mod charging {
    use super::*;
    use crate::admission::{MemoryBudget, MeteredBody};

    #[tokio::test]
    async fn a_plain_body_is_charged_as_received_and_as_collected() {
        let budget = MemoryBudget::new(1 << 20, 0);
        let account = budget.account([127, 0, 0, 1].into());
        let doc = vec![b'x'; 18_000];
        let request = Request::builder()
            .header("content-type", "application/json")
            .body(MeteredBody::wrap(Body::from(doc), account.clone()))
            .unwrap();
        let _ = read_document(request, 100_000, &account).await;
        assert_eq!(account.held(), 36_000);
    }
}
