//! What a run does: the [`Config`] built by the command line (see `cli.rs`)
//! or by code, plus the small parsers it needs (durations, the IP mix).
//!
//! Every field has a default ([`Config::default`]), so a test can write
//! `Config { requests: Some(20), verify: true, brokers: Some(..), ..Default::default() }`.

use std::fmt;
use std::time::Duration;

use anyhow::{bail, ensure, Context};

/// The gateway's default upload endpoint.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080/api/v1/upload";

/// The gateway's default topic template.
pub const DEFAULT_TOPIC_TEMPLATE: &str = "to_analyzer__0.{category}";

/// Where the generated batches go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// `POST` each batch to the gateway as `multipart/form-data`.
    #[default]
    Http,
    /// Produce each batch's events straight to Kafka, shaped as the gateway
    /// would write them: the ceiling that broker and client give.
    RawKafka,
}

impl Target {
    /// The name used in reports: `http` or `raw_kafka`.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Http => "http",
            Target::RawKafka => "raw_kafka",
        }
    }
}

/// Fractions of the kinds of `ip` field an event carries. They need not add
/// up to 1: each is divided by their sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IpMix {
    /// A public (routable) IPv4 address.
    pub public_v4: f64,
    /// A public (routable) IPv6 address.
    pub public_v6: f64,
    /// A private address (10.x, 172.16-31.x, 192.168.x): valid, no location.
    pub private: f64,
    /// A string that is not an address; the gateway answers part code 1002.
    pub invalid: f64,
    /// No `ip` field at all; the gateway uses the client's address.
    pub absent: f64,
}

impl Default for IpMix {
    fn default() -> Self {
        Self {
            public_v4: 0.6,
            public_v6: 0.2,
            private: 0.15,
            invalid: 0.05,
            absent: 0.0,
        }
    }
}

impl IpMix {
    /// Parses `public4,public6,private,invalid[,absent]`, e.g. `0.6,0.2,0.15,0.05`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let values = text
            .split(',')
            .map(|part| {
                let part = part.trim();
                part.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .with_context(|| format!("{part:?} is not a non-negative number"))
            })
            .collect::<anyhow::Result<Vec<f64>>>()
            .with_context(|| format!("invalid --ip-mix {text:?}"))?;
        let mix = match values[..] {
            [public_v4, public_v6, private, invalid] => Self {
                public_v4,
                public_v6,
                private,
                invalid,
                absent: 0.0,
            },
            [public_v4, public_v6, private, invalid, absent] => Self {
                public_v4,
                public_v6,
                private,
                invalid,
                absent,
            },
            _ => bail!(
                "invalid --ip-mix {text:?}: expected 4 or 5 comma-separated fractions \
                 (public4,public6,private,invalid[,absent])"
            ),
        };
        mix.validate()?;
        Ok(mix)
    }

    fn total(&self) -> f64 {
        self.public_v4 + self.public_v6 + self.private + self.invalid + self.absent
    }

    /// Checks the fractions are non-negative with a positive sum.
    pub fn validate(&self) -> anyhow::Result<()> {
        let all = [
            self.public_v4,
            self.public_v6,
            self.private,
            self.invalid,
            self.absent,
        ];
        ensure!(
            all.iter().all(|v| v.is_finite() && *v >= 0.0),
            "ip mix fractions must be non-negative numbers"
        );
        ensure!(self.total() > 0.0, "ip mix fractions must not all be 0");
        Ok(())
    }

    /// The cumulative thresholds (normalised) in the order
    /// public4, public6, private, invalid, absent.
    pub(crate) fn cumulative(&self) -> [f64; 5] {
        let total = self.total();
        let mut acc = 0.0;
        let mut out = [0.0; 5];
        for (slot, value) in out.iter_mut().zip([
            self.public_v4,
            self.public_v6,
            self.private,
            self.invalid,
            self.absent,
        ]) {
            acc += value / total;
            *slot = acc;
        }
        out[4] = 1.0;
        out
    }
}

impl fmt::Display for IpMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},{},{},{},{}",
            self.public_v4, self.public_v6, self.private, self.invalid, self.absent
        )
    }
}

/// How batches are made. The same settings and seed give the same bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct GenConfig {
    /// Events in each batch.
    pub events_per_batch: usize,
    /// Approximate size of each event's JSON in bytes; a `props` object is
    /// padded to reach it.
    pub event_size: usize,
    /// Which kinds of `ip` the events carry.
    pub ip_mix: IpMix,
    /// `meta.category` values, used in turn by the batch templates.
    pub categories: Vec<String>,
    /// Number of distinct `meta.app_id` values.
    pub app_ids: usize,
    /// Share of events made invalid for the gateway's validation (missing or
    /// non-string `id`); they are answered part code 1001.
    pub invalid_fraction: f64,
    /// Seed of every random choice; also the first part of every event id.
    pub seed: u64,
    /// Distinct batch templates generated up front; request `n` uses template
    /// `n % pool` with fresh ids stamped in.
    pub pool: usize,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self {
            events_per_batch: 50,
            event_size: 300,
            ip_mix: IpMix::default(),
            categories: vec!["page_view".into(), "click".into()],
            app_ids: 4,
            invalid_fraction: 0.0,
            seed: 1,
            pool: 64,
        }
    }
}

impl GenConfig {
    /// Checks the settings can make valid-looking batches.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(self.events_per_batch > 0, "events per batch must be > 0");
        ensure!(
            self.pool > 0,
            "the template pool must hold at least 1 batch"
        );
        ensure!(self.app_ids > 0, "there must be at least 1 app id");
        ensure!(
            (0.0..=1.0).contains(&self.invalid_fraction),
            "the invalid fraction must be within 0..=1"
        );
        ensure!(!self.categories.is_empty(), "at least 1 category is needed");
        for category in &self.categories {
            ensure!(
                (1..=64).contains(&category.len())
                    && category
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "category {category:?} does not match ^[A-Za-z0-9_]{{1,64}}$"
            );
        }
        self.ip_mix.validate()
    }
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where batches go: the gateway over HTTP or Kafka directly.
    pub target: Target,
    /// The gateway's upload URL (HTTP target).
    pub url: String,
    /// Write key sent as `Authorization: Bearer` with every upload.
    pub key: Option<String>,
    /// Concurrent workers of the closed loop, each sending back to back.
    /// Ignored in open loop (`rate` set).
    pub connections: usize,
    /// Open loop: requests started per second on a fixed schedule, whatever
    /// the responses do. `None`: closed loop.
    pub rate: Option<f64>,
    /// Open loop: most requests outstanding at once; beyond it the schedule
    /// waits (and the wait counts in latency, which is measured from the
    /// intended send time).
    pub max_in_flight: usize,
    /// Stop starting requests after this long. When neither this nor
    /// `requests` is set the run lasts 10 s.
    pub duration: Option<Duration>,
    /// Stop after this many requests (batches).
    pub requests: Option<u64>,
    /// Per-request timeout (HTTP request or Kafka delivery).
    pub timeout: Duration,
    /// How batches are generated.
    pub generator: GenConfig,
    /// Kafka bootstrap servers, for `verify` and the raw Kafka target.
    pub brokers: Option<String>,
    /// Topic of a batch; `{category}` is replaced by its category.
    pub topic_template: String,
    /// After the load, read the topics back and check every accepted event
    /// is there exactly once.
    pub verify: bool,
    /// With `verify`: where to write the accepted events' backend_ids.
    pub accepted_ids: Option<std::path::PathBuf>,
    /// Verification ends when nothing new arrived for this long.
    pub verify_idle: Duration,
    /// Verification ends after this long in any case.
    pub verify_timeout: Duration,
    /// Extra librdkafka producer settings of the raw Kafka target (they win
    /// over the gateway-like defaults).
    pub producer: Vec<(String, String)>,
    /// Draw a live progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            target: Target::Http,
            url: DEFAULT_URL.into(),
            key: None,
            connections: 8,
            rate: None,
            max_in_flight: 4096,
            duration: None,
            requests: None,
            timeout: Duration::from_secs(30),
            generator: GenConfig::default(),
            brokers: None,
            topic_template: DEFAULT_TOPIC_TEMPLATE.into(),
            verify: false,
            accepted_ids: None,
            verify_idle: Duration::from_secs(5),
            verify_timeout: Duration::from_secs(300),
            producer: Vec::new(),
            progress: false,
        }
    }
}

impl Config {
    /// How long the run lasts when neither `duration` nor `requests` is set.
    pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

    /// The duration limit in force (the default one when no limit was given).
    pub fn effective_duration(&self) -> Option<Duration> {
        match (self.duration, self.requests) {
            (None, None) => Some(Self::DEFAULT_DURATION),
            (duration, _) => duration,
        }
    }

    /// `closed` or `open`.
    pub fn mode(&self) -> &'static str {
        if self.rate.is_some() {
            "open"
        } else {
            "closed"
        }
    }

    /// The topic of `category`.
    pub fn topic_for(&self, category: &str) -> String {
        self.topic_template.replace("{category}", category)
    }

    /// Checks the settings make sense together.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.generator.validate()?;
        ensure!(self.connections > 0, "connections must be > 0");
        ensure!(self.max_in_flight > 0, "max in flight must be > 0");
        ensure!(
            self.max_in_flight <= 1 << 20,
            "max in flight must be at most 1048576"
        );
        if let Some(rate) = self.rate {
            ensure!(
                rate.is_finite() && rate > 0.0,
                "rate must be a positive number of requests per second"
            );
        }
        if let Some(duration) = self.duration {
            ensure!(!duration.is_zero(), "duration must be > 0");
        }
        ensure!(!self.timeout.is_zero(), "timeout must be > 0");
        ensure!(
            self.topic_template.contains("{category}"),
            "topic template {:?} must contain {{category}}",
            self.topic_template
        );
        let needs_brokers = self.verify || self.target == Target::RawKafka;
        if needs_brokers {
            ensure!(
                self.brokers
                    .as_deref()
                    .is_some_and(|b| !b.trim().is_empty()),
                "--brokers is required with --verify and --raw-kafka"
            );
        }
        if self.target == Target::Http {
            // The HTTP client is built without TLS.
            ensure!(
                self.url.starts_with("http://"),
                "url {:?} must start with http:// (https is not supported)",
                self.url
            );
        }
        Ok(())
    }
}

/// Parses a duration such as `10s`, `500ms`, `2m`, `1m30s`, `1.5s`, `250us`
/// or `1h`. A bare number is seconds.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    ensure!(!text.is_empty(), "empty duration");
    if let Ok(seconds) = text.parse::<f64>() {
        return seconds_to_duration(seconds, text);
    }
    let mut total = 0.0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .with_context(|| format!("duration {text:?} lacks a unit after {rest:?}"))?;
        ensure!(
            number_len > 0,
            "invalid duration {text:?}: expected a number"
        );
        let number: f64 = rest[..number_len]
            .parse()
            .with_context(|| format!("invalid duration {text:?}"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" | "hr" | "hrs" => 3600.0,
            unit => bail!("invalid duration {text:?}: unknown unit {unit:?} (use us, ms, s, m, h)"),
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    seconds_to_duration(total, text)
}

fn seconds_to_duration(seconds: f64, text: &str) -> anyhow::Result<Duration> {
    ensure!(
        seconds.is_finite() && seconds >= 0.0,
        "invalid duration {text:?}"
    );
    Duration::try_from_secs_f64(seconds).with_context(|| format!("duration {text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration(" 7 ").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("0.25").unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn bad_durations_are_refused() {
        for text in ["", "s", "10x", "ms10", "-1s", "1..5s", "abc"] {
            assert!(parse_duration(text).is_err(), "{text:?} parsed");
        }
    }

    #[test]
    fn ip_mix_parses_four_or_five_fractions() {
        let mix = IpMix::parse("0.6,0.2,0.15,0.05").unwrap();
        assert_eq!(mix, IpMix::default());
        let mix = IpMix::parse("1, 1, 1, 0, 1").unwrap();
        assert_eq!(mix.absent, 1.0);
        let cumulative = mix.cumulative();
        assert!((cumulative[0] - 0.25).abs() < 1e-9);
        assert!((cumulative[3] - 0.75).abs() < 1e-9);
        assert_eq!(cumulative[4], 1.0);
        assert!(IpMix::parse("1,2,3").is_err());
        assert!(IpMix::parse("0,0,0,0").is_err());
        assert!(IpMix::parse("0.5,-0.1,0,0").is_err());
    }

    #[test]
    fn the_default_config_is_valid_and_lasts_ten_seconds() {
        let config = Config::default();
        config.validate().unwrap();
        assert_eq!(config.effective_duration(), Some(Duration::from_secs(10)));
        assert_eq!(
            config.topic_for("click"),
            "to_analyzer__0.click".to_string()
        );
        let bounded = Config {
            requests: Some(5),
            ..Config::default()
        };
        assert_eq!(bounded.effective_duration(), None);
    }

    #[test]
    fn verify_needs_brokers() {
        let config = Config {
            verify: true,
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }
}
