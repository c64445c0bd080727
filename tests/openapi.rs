//! The machine-readable contract, `docs/openapi.yaml`, held to the gateway
//! and to `docs/API.md`:
//! * the gateway serves it, as built in, at `GET /api/v1/openapi.yaml`;
//! * every JSON example of `docs/API.md` validates against the schema of its
//!   route and status;
//! * every status the upload route can answer is in it: each one the code
//!   names, and each one a real gateway answers when driven to it, body and
//!   required headers included.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use yaml_rust2::{Yaml, YamlLoader};

use support::{shared_broker, TestApp};

const UPLOAD: &str = "/api/v1/upload";
const BASE: &str = "urn:venus-openapi";

fn spec_text() -> String {
    std::fs::read_to_string(support::repo_root().join("docs/openapi.yaml")).unwrap()
}

fn spec() -> Value {
    let docs = YamlLoader::load_from_str(&spec_text()).expect("docs/openapi.yaml is YAML");
    to_json(&docs[0])
}

fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        other => panic!("unexpected key {other:?}"),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(r) => json!(r.parse::<f64>().unwrap()),
        Yaml::Boolean(b) => json!(b),
        Yaml::Null => Value::Null,
        other => panic!("unexpected YAML {other:?}"),
    }
}

/// A JSON pointer token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn at<'a>(spec: &'a Value, pointer: &str) -> &'a Value {
    spec.pointer(pointer.trim_start_matches('#'))
        .unwrap_or_else(|| panic!("{pointer} is not in the spec"))
}

/// The response object of (path, method, status), `$ref`s followed, and its
/// pointer.
fn response<'a>(
    spec: &'a Value,
    path: &str,
    method: &str,
    status: u16,
) -> Option<(String, &'a Value)> {
    let mut pointer = format!("/paths/{}/{method}/responses/{status}", escape(path));
    let mut response = spec.pointer(&pointer)?;
    if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
        pointer = reference.trim_start_matches('#').to_owned();
        response = at(spec, reference);
    }
    Some((pointer, response))
}

/// The statuses any method of `path` answers.
fn statuses(spec: &Value, path: &str) -> BTreeSet<u16> {
    at(spec, &format!("/paths/{}", escape(path)))
        .as_object()
        .unwrap()
        .values()
        .filter_map(|op| op.get("responses")?.as_object())
        .flat_map(|responses| responses.keys().map(|k| k.parse::<u16>().unwrap()))
        .collect()
}

/// Validates `body` against the schema at `pointer` (inside the spec, so
/// that its `$ref`s resolve).
fn validate(spec: &Value, pointer: &str, body: &Value) -> Result<(), String> {
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .with_resource(
            BASE,
            jsonschema::Draft::Draft202012.create_resource(spec.clone()),
        )
        .build(&json!({ "$ref": format!("{BASE}#{pointer}") }))
        .map_err(|e| format!("schema at {pointer}: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Checks a body against the JSON schema of (path, method, status); the
/// status must be in the spec.
fn check_body(
    spec: &Value,
    path: &str,
    method: &str,
    status: u16,
    body: &Value,
) -> Result<(), String> {
    let (pointer, response) = response(spec, path, method, status)
        .or_else(|| {
            // Path-independent answers.
            let name = match status {
                404 => "NotFound",
                405 => "MethodNotAllowed",
                _ => return None,
            };
            let pointer = format!("/components/responses/{name}");
            Some((pointer.clone(), at(spec, &pointer)))
        })
        .ok_or_else(|| format!("{method} {path} has no {status} in the spec"))?;
    if response.pointer("/content/application~1json").is_none() {
        return Err(format!(
            "{method} {path} {status} has no JSON body in the spec"
        ));
    }
    validate(
        spec,
        &format!("{pointer}/content/application~1json/schema"),
        body,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_the_document_it_was_built_with() {
    let app = TestApp::spawn(support::settings(&shared_broker().address(), &[])).await;
    let answer = app
        .client
        .get(app.url("/api/v1/openapi.yaml"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "application/yaml");
    let served = answer.text().await.unwrap();
    assert_eq!(served, spec_text());
    let spec = spec();
    assert_eq!(spec["openapi"], "3.1.0");
    // Every path of the document is a route of the gateway (none is 404).
    for path in spec["paths"].as_object().unwrap().keys() {
        let status = app.client.get(app.url(path)).send().await.unwrap().status();
        assert_ne!(status, 404, "{path} is in the spec but not a route");
    }
    // The spec's own examples fit their schemas.
    let mut checked = 0;
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let Some(responses) = operation.get("responses").and_then(Value::as_object) else {
                continue;
            };
            for status in responses.keys() {
                let status: u16 = status.parse().unwrap();
                let Some((_, response)) = response(&spec, path, method, status) else {
                    continue;
                };
                let Some(examples) = response
                    .pointer("/content/application~1json/examples")
                    .and_then(Value::as_object)
                else {
                    continue;
                };
                for (name, example) in examples {
                    check_body(&spec, path, method, status, &example["value"]).unwrap_or_else(
                        |e| panic!("example {name} of {method} {path} {status}: {e}"),
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 10, "only {checked} examples in the spec");
}

/// Where an API.md example belongs, from its shape: upload replies have
/// `parts`; `/healthz` says `ok`; `/readyz` the rest.
fn route_of(body: &Value) -> (&'static str, &'static str) {
    if body.get("parts").is_some() {
        (UPLOAD, "post")
    } else if body["status"] == "ok" {
        ("/healthz", "get")
    } else {
        ("/readyz", "get")
    }
}

#[test]
fn every_json_example_in_the_api_document_fits_the_spec() {
    let spec = spec();
    let doc = std::fs::read_to_string(support::repo_root().join("docs/API.md")).unwrap();
    let mut examples: Vec<(usize, u16, Value)> = Vec::new();
    // `HTTP/1.1 NNN` answers in code blocks: the status line, headers, a
    // blank line, the JSON body.
    let lines: Vec<&str> = doc.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        if let Some(rest) = lines[i].strip_prefix("HTTP/1.1 ") {
            let status: u16 = rest[..3].parse().unwrap();
            let start = i;
            while i < lines.len() && !lines[i].trim().is_empty() && !lines[i].starts_with("```") {
                i += 1;
            }
            let mut body = String::new();
            if lines.get(i).is_some_and(|l| l.starts_with("```")) {
                // Headers only (a preflight's answer).
                continue;
            }
            i += 1;
            while i < lines.len() && !lines[i].starts_with("```") {
                body.push_str(lines[i]);
                body.push('\n');
                i += 1;
            }
            if !body.trim().is_empty() {
                let value: Value = serde_json::from_str(&body).unwrap_or_else(|e| {
                    panic!("API.md line {}: not JSON ({e}): {body}", start + 1)
                });
                examples.push((start + 1, status, value));
            }
        }
        // `NNN  {json}` lines of the error tables.
        let line = lines.get(i).copied().unwrap_or("");
        let code = line
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
        if let (Some(code), Some(json)) = (code, line.get(3..).and_then(|r| r.strip_prefix("  {")))
        {
            let value: Value = serde_json::from_str(&format!("{{{json}"))
                .unwrap_or_else(|e| panic!("API.md line {}: not JSON ({e})", i + 1));
            examples.push((i + 1, code.parse().unwrap(), value));
        }
        i += 1;
    }
    assert!(
        examples.len() >= 25,
        "only {} examples found in API.md",
        examples.len()
    );
    let failures: Vec<String> = examples
        .iter()
        .filter_map(|(line, status, body)| {
            let (path, method) = route_of(body);
            check_body(&spec, path, method, *status, body)
                .err()
                .map(|e| format!("API.md line {line} ({status}): {e}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every `StatusCode::X` in the gateway's source is a status of the upload
/// route in the spec, or one the spec gives every path (404).
#[test]
fn every_status_the_code_names_is_in_the_spec() {
    let spec = spec();
    let upload = statuses(&spec, UPLOAD);
    let mut named = BTreeSet::new();
    let mut pending = vec![support::repo_root().join("src")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // The code, not its unit tests.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            for piece in code.split("StatusCode::").skip(1) {
                let name: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    named.insert(name);
                }
            }
        }
    }
    assert!(named.len() >= 10, "{named:?}");
    for name in &named {
        let code = match name.as_str() {
            "OK" => 200,
            "PARTIAL_CONTENT" => 206,
            "BAD_REQUEST" => 400,
            "UNAUTHORIZED" => 401,
            "FORBIDDEN" => 403,
            // The answer to any unknown path, in the spec's components.
            "NOT_FOUND" => {
                assert!(spec.pointer("/components/responses/NotFound").is_some());
                continue;
            }
            "METHOD_NOT_ALLOWED" => 405,
            "REQUEST_TIMEOUT" => 408,
            "PAYLOAD_TOO_LARGE" => 413,
            "UNSUPPORTED_MEDIA_TYPE" => 415,
            "TOO_MANY_REQUESTS" => 429,
            "INTERNAL_SERVER_ERROR" => 500,
            "SERVICE_UNAVAILABLE" => 503,
            other => panic!("StatusCode::{other} is new: add it to the spec and to this table"),
        };
        assert!(
            upload.contains(&code),
            "{name} ({code}) is not in the spec's {UPLOAD}"
        );
    }
}

/// Drives a real gateway to each status the upload route can answer and
/// checks status, body and required headers against the spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_only_what_the_spec_says() {
    let spec = spec();
    let broker = shared_broker();
    let (category, _topic) = support::fresh_topic("openapi").await;
    let key = "openapi-key";
    let config = support::config_file(&format!(
        "auth:\n  mode: keys\napps:\n  - app_id: shop\n    keys: [\"{}\"]\n  - app_id: tiny\n    keys: [\"{0}\"]\n    limits: {{requests_per_sec: 1, requests_burst: 1}}\n  - app_id: blog\n    keys: [\"{}\"]\n    categories: [page_view]\n",
        venus::apps::keys::KeyDigest::of(key).to_hex(),
        venus::apps::keys::KeyDigest::of("blog").to_hex(),
    ));
    let settings = support::settings_from(
        config.path(),
        &broker.address(),
        &[
            ("VENUS__SERVER__MAX_BODY_BYTES", "4096"),
            ("VENUS__SERVER__BODY_TIMEOUT_MS", "1000"),
            ("VENUS__SERVER__MAX_HEADER_BYTES", "2048"),
            (
                "VENUS__SERVER__CORS__ALLOWED_ORIGINS",
                "https://shop.example.com",
            ),
        ],
    );
    let app = TestApp::spawn(settings).await;
    let url = app.url(UPLOAD);
    let doc = |app_id: &str, category: &str, events: &[&str]| {
        format!(
            r#"{{"meta":{{"app_id":"{app_id}","category":"{category}"}},"data":[{}]}}"#,
            events.join(",")
        )
    };
    let good = r#"{"id":"a"}"#;
    let bad = r#"{"id":"b","ip":"not an address"}"#;
    let json_as = |key: &str, body: String| {
        app.client
            .post(&url)
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body)
    };
    let json = |body: String| json_as(key, body);
    let missing = support::unique_category("missing");
    let requests = vec![
        ("200", json(doc("shop", &category, &[good]))),
        ("206", json(doc("shop", &category, &[good, bad]))),
        (
            "400 events",
            json_as("blog", doc("blog", "page_view", &[bad])),
        ),
        ("400 malformed", json("{\"meta\":".into())),
        (
            "401",
            app.client
                .post(&url)
                .header("content-type", "application/json")
                .body(doc("shop", &category, &[good])),
        ),
        ("403", json_as("blog", doc("blog", &category, &[good]))),
        ("413", json(format!("{{\"pad\":\"{}\"}}", "x".repeat(8000)))),
        (
            "415",
            app.client
                .post(&url)
                .bearer_auth(key)
                .header("content-type", "text/csv")
                .body(doc("shop", &category, &[good])),
        ),
        // tiny's one token goes to an upload whose topic is missing (503 at
        // once); its next upload finds the bucket empty.
        ("503", json(doc("tiny", &missing, &[good]))),
        ("429", json(doc("tiny", &missing, &[good]))),
        ("405", app.client.get(&url)),
        (
            "200 preflight",
            app.client
                .request(reqwest::Method::OPTIONS, &url)
                .header("origin", "https://shop.example.com")
                .header("access-control-request-method", "POST"),
        ),
    ];
    let mut seen = BTreeSet::new();
    for (what, request) in requests {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        assert_eq!(status.to_string(), what[..3], "{what}");
        let method = match what {
            "405" => "get",
            "200 preflight" => "options",
            _ => "post",
        };
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        seen.insert(status);
        if status == 405 {
            assert_eq!(headers["allow"], "POST", "{what}");
        }
        // Required headers of this response in the spec are present.
        if let Some((_, described)) = response_for(&spec, method, status) {
            for (name, header) in described["headers"].as_object().into_iter().flatten() {
                let header = resolve(&spec, header);
                if header["required"] == true {
                    assert!(
                        headers.contains_key(name.as_str()),
                        "{what}: {name} is required"
                    );
                }
            }
        }
        if text.is_empty() {
            continue;
        }
        let body: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
        check_body(&spec, UPLOAD, method, status, &body).unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    // 408: a body that stops coming.
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    stream
        .write_all(format!("POST {UPLOAD} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{").as_bytes())
        .await
        .unwrap();
    let answer = support::read_to_close(&mut stream, Duration::from_secs(10)).await;
    let (status, body) = status_and_body(&answer);
    assert_eq!(status, 408, "{answer}");
    check_body(
        &spec,
        UPLOAD,
        "post",
        408,
        &serde_json::from_str(body).unwrap(),
    )
    .unwrap();
    seen.insert(status);

    // 431: a head over server.max_header_bytes, answered by hyper.
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    stream
        .write_all(
            format!(
                "POST {UPLOAD} HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n\r\n",
                "y".repeat(4096)
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = support::read_to_close(&mut stream, Duration::from_secs(10)).await;
    let (status, _) = status_and_body(&answer);
    assert_eq!(status, 431, "{answer}");
    seen.insert(status);

    let documented = statuses(&spec, UPLOAD);
    assert!(
        seen.is_subset(&documented),
        "answered {seen:?}, documented {documented:?}"
    );
    // What this test cannot provoke from outside: 500 (a bug; the panic
    // route of the test build shows its shape in tests/binary.rs) and 414
    // (a request line longer than hyper's limit).
    let unprovoked: BTreeSet<u16> = documented.difference(&seen).copied().collect();
    assert_eq!(
        unprovoked,
        BTreeSet::from([414, 500]),
        "statuses documented but not provoked here"
    );
}

fn response_for<'a>(spec: &'a Value, method: &str, status: u16) -> Option<(String, &'a Value)> {
    response(spec, UPLOAD, method, status)
}

fn resolve<'a>(spec: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(reference) => at(spec, reference),
        None => node,
    }
}

fn status_and_body(answer: &str) -> (u16, &str) {
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, body)
}
