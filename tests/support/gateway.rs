//! The `venus` binary as a child process, its JSON log lines readable.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::free_port;

pub struct Gateway {
    pub child: Child,
    lines: Receiver<String>,
    pub port: u16,
}

/// The binary with the repository's config.yaml and `env` on top.
pub fn command(env: &[(&str, String)]) -> Command {
    command_with(&super::repo_root().join("config.yaml"), env)
}

/// The binary with the configuration file `config` and `env` on top.
pub fn command_with(config: &std::path::Path, env: &[(&str, String)]) -> Command {
    // Only the venus package's tests have the binary; others (the
    // ingester's, which share this support code) never start it.
    let Some(binary) = option_env!("CARGO_BIN_EXE_venus") else {
        panic!("the venus binary is built only for the venus package's tests");
    };
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(config)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

impl Gateway {
    pub fn start(brokers: &str, extra: &[(&str, String)]) -> Self {
        Self::start_with(&super::repo_root().join("config.yaml"), brokers, extra)
    }

    /// Like [`Gateway::start`], with the configuration file `config`.
    pub fn start_with(config: &std::path::Path, brokers: &str, extra: &[(&str, String)]) -> Self {
        let port = free_port();
        let mut env = vec![
            ("VENUS__SERVER__LISTEN", format!("127.0.0.1:{port}")),
            ("VENUS__KAFKA__BROKERS", brokers.to_owned()),
            (
                "VENUS__GEOIP__DATABASE",
                super::geoip_database().display().to_string(),
            ),
            (
                "VENUS__TELEMETRY__LOG_LEVEL",
                "debug,rdkafka=off,librdkafka=off".to_owned(),
            ),
        ];
        env.extend(extra.iter().cloned());
        let mut child = command_with(config, &env).spawn().expect("start venus");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut gateway = Self { child, lines, port };
        if gateway
            .try_wait_for_line(|l| l["message"] == "listening", Duration::from_secs(20))
            .is_none()
        {
            let _ = gateway.child.kill();
            let mut stderr = String::new();
            if let Some(mut pipe) = gateway.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            panic!("venus did not start listening; stderr: {stderr}");
        }
        gateway
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        super::fetch_text(&reqwest::Client::new(), &self.url("/metrics")).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn wait_for_line(&self, wanted: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        self.try_wait_for_line(wanted, timeout)
            .expect("the wanted log line did not come")
    }

    /// Every log line not read yet, until the process's stdout closes (stop
    /// the process first) or nothing comes for `idle`.
    pub fn rest_of_log(&self, idle: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(idle) {
            lines.push(line);
        }
        lines
    }

    /// The first log line `wanted` accepts, within `timeout`.
    pub fn try_wait_for_line(
        &self,
        wanted: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            let parsed: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if wanted(&parsed) {
                return Some(parsed);
            }
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
