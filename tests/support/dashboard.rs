//! The compose Grafana dashboard as the tests read it: which metric names
//! its queries use, so that the gateway's and the ingester's tests can each
//! check theirs against a real `/metrics`.

use std::collections::HashSet;
use std::path::PathBuf;

use serde_json::Value;

/// The dashboard JSON of the compose stack.
pub fn dashboard() -> Value {
    let path: PathBuf = super::repo_root().join("compose/grafana/dashboards/venus-uploads.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .expect("the dashboard is valid JSON")
}

/// Every metric name a dashboard query uses.
pub fn dashboard_metric_names(dashboard: &Value) -> HashSet<String> {
    let mut names = HashSet::new();
    let mut stack = vec![dashboard];
    while let Some(node) = stack.pop() {
        match node {
            Value::Object(map) => {
                if let Some(Value::String(expr)) = map.get("expr") {
                    for token in
                        expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                    {
                        if token.starts_with("venus_") || token.starts_with("http_server_") {
                            names.insert(token.to_owned());
                        }
                    }
                }
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    names
}

/// Metric names of the ingester (checked by its own tests).
pub fn is_ingester_metric(name: &str) -> bool {
    name.starts_with("venus_ingester_")
}

/// Metric names of the spool, exported only with `spool.enabled` (checked
/// by tests/spool.rs).
pub fn is_spool_metric(name: &str) -> bool {
    name.starts_with("venus_spool_")
}

/// The metric names a Prometheus text exposes.
pub fn exported_names(text: &str) -> HashSet<&str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect()
}
