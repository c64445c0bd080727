//! `run()` end to end over HTTP against a small in-process fake of the
//! gateway's upload endpoint (no Kafka): the generated requests must parse,
//! and the load generator must read the answers as the gateway gives them.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::time::Duration;

use venus_loadtest::{run, Config, GenConfig};

/// Starts the fake gateway on its own threads; returns its upload URL.
fn fake_gateway() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || serve(stream));
        }
    });
    format!("http://{address}/api/v1/upload")
}

/// Answers HTTP/1.1 requests on one connection until it closes.
fn serve(mut stream: TcpStream) {
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 65536];
    loop {
        // Read the head.
        let head_end = loop {
            if let Some(at) = find(&buffer, b"\r\n\r\n") {
                break at + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_lowercase();
        assert!(head.starts_with("post /api/v1/upload "), "{head}");
        assert!(
            head.contains("content-type: multipart/form-data; boundary="),
            "{head}"
        );
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .expect("a content-length");
        while buffer.len() < head_end + length {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buffer.drain(..head_end + length).skip(head_end).collect();
        let (status, answer) = answer(&body);
        let mut response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            answer.len()
        )
        .into_bytes();
        response.extend_from_slice(&answer);
        if stream.write_all(&response).is_err() {
            return;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The gateway's answer to one multipart body, by its rules.
fn answer(body: &[u8]) -> (u16, Vec<u8>) {
    let start = find(body, b"\r\n\r\n").unwrap() + 4;
    let end = body.len() - body.iter().rev().position(|b| *b == b'}').unwrap();
    let document: serde_json::Value = serde_json::from_slice(&body[start..end]).unwrap();
    assert!(document["meta"]["app_id"].is_string());
    assert!(document["meta"]["category"].is_string());
    let mut accepted = 0;
    let events = document["data"].as_array().unwrap();
    let parts: Vec<serde_json::Value> = events
        .iter()
        .map(|event| {
            let id = event["id"].as_str().filter(|id| !id.is_empty());
            let ts_ok = event["timestamp"].as_i64().is_none_or(|t| t >= 0);
            let code = match (id, ts_ok, event.get("ip").and_then(|ip| ip.as_str())) {
                (None, _, _) | (_, false, _) => 1001,
                (Some(_), true, Some(ip)) if ip.parse::<IpAddr>().is_err() => 1002,
                _ => 0,
            };
            if code == 0 {
                accepted += 1;
            }
            serde_json::json!({
                "id": event["id"].as_str(),
                "backend_id": (code == 0).then(|| uuid::Uuid::now_v7().to_string()),
                "code": code,
                "data": "",
            })
        })
        .collect();
    let status = match accepted {
        n if n == events.len() => 200,
        0 => 400,
        _ => 206,
    };
    let body = serde_json::json!({"code": 0, "data": "", "parts": parts});
    (status, serde_json::to_vec(&body).unwrap())
}

#[tokio::test]
async fn closed_loop_against_the_fake_gateway() {
    let url = fake_gateway();
    let report = run(Config {
        url,
        connections: 4,
        requests: Some(120),
        generator: GenConfig {
            events_per_batch: 20,
            invalid_fraction: 0.1,
            ..GenConfig::default()
        },
        ..Config::default()
    })
    .await
    .unwrap();

    assert_eq!(report.target, "http");
    assert_eq!(report.mode, "closed");
    assert_eq!(report.requests, 120);
    assert_eq!(report.events, 120 * 20);
    assert_eq!(report.errors, 0, "{report}");
    assert_eq!(report.bad_responses, 0, "{report}");
    assert_eq!(report.unexpected_codes, 0, "{report}");
    assert_eq!(report.latency_ms.samples, 120);
    assert_eq!(report.part_codes.values().sum::<u64>(), 120 * 20);
    assert_eq!(report.events_accepted, report.part_codes["0"]);
    assert!(report.part_codes["1001"] > 0 && report.part_codes["1002"] > 0);
    assert_eq!(report.status_counts.values().sum::<u64>(), 120);
    assert!(report.verify.is_none());
}

#[tokio::test]
async fn open_loop_against_the_fake_gateway() {
    let url = fake_gateway();
    let report = run(Config {
        url,
        rate: Some(200.0),
        duration: Some(Duration::from_millis(500)),
        ..Config::default()
    })
    .await
    .unwrap();
    assert_eq!(report.mode, "open");
    // 100 due in 0.5 s; allow for a slow test machine.
    assert!((90..=100).contains(&report.requests), "{report}");
    assert_eq!(report.behind_schedule, 0);
    assert_eq!(report.bad_responses, 0, "{report}");
    assert_eq!(report.unexpected_codes, 0, "{report}");
}

/// The `venus-loadtest` binary hands C's `malloc` to mimalloc (src/main.rs),
/// so librdkafka's messages in the raw Kafka target do not go through
/// glibc's arena lock; its report says so. (This test binary itself keeps
/// libc's: see `c_malloc`'s own test.)
#[test]
fn the_binary_gives_c_code_mimalloc() {
    let url = fake_gateway();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_venus-loadtest"))
        .args(["--url", &url, "--requests", "5", "--connections", "1"])
        .args(["--json", "--quiet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: venus_loadtest::Report = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report.requests, 5, "{stdout}");
    assert_eq!(report.c_malloc, "mimalloc", "{stdout}");
}
