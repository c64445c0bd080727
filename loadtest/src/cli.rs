//! The command line of `venus-loadtest` and its translation to a [`Config`].

use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::config::{
    parse_duration, Config, GenConfig, IpMix, Target, DEFAULT_TOPIC_TEMPLATE, DEFAULT_URL,
};

/// Load generator and end-to-end checker for the venus gateway.
///
/// Sends generated event batches to POST /api/v1/upload (or, with
/// --raw-kafka, produces the gateway's Kafka messages directly) and reports
/// throughput, latency percentiles, HTTP status and part codes. With
/// --verify it reads the topics back and checks every accepted event is
/// there exactly once.
///
/// Exit status: 0 done, 1 accepted events missing from Kafka, 2 error.
#[derive(Debug, Parser)]
#[command(name = "venus-loadtest", version)]
pub struct Cli {
    /// Upload URL of the gateway (plain `http://`: the load generator speaks
    /// HTTP/1.1 without TLS).
    #[arg(long, default_value = DEFAULT_URL, help_heading = "Load")]
    pub url: String,

    /// Write key sent with every upload (`Authorization: Bearer`), for a
    /// gateway with `auth.mode: keys`.
    #[arg(long, help_heading = "Load")]
    pub key: Option<String>,

    /// Closed loop: concurrent workers, each sending back to back.
    #[arg(short, long, default_value_t = 8, help_heading = "Load")]
    pub connections: usize,

    /// Open loop: requests per second on a fixed schedule; latency counts
    /// from the intended send time.
    #[arg(short, long, help_heading = "Load")]
    pub rate: Option<f64>,

    /// Open loop: most requests outstanding at once.
    #[arg(long, default_value_t = 4096, help_heading = "Load")]
    pub max_in_flight: usize,

    /// Stop after this long, e.g. 10s, 500ms, 2m, 1m30s [default: 10s unless
    /// --requests is given].
    #[arg(short, long, value_parser = parse_duration, help_heading = "Load")]
    pub duration: Option<Duration>,

    /// Stop after this many requests (batches).
    #[arg(short = 'n', long, help_heading = "Load")]
    pub requests: Option<u64>,

    /// Timeout of each request (or Kafka delivery).
    #[arg(long, value_parser = parse_duration, default_value = "30s", help_heading = "Load")]
    pub timeout: Duration,

    /// Runtime worker threads [default: the number of CPUs].
    #[arg(long, help_heading = "Load")]
    pub threads: Option<usize>,

    /// Events per batch.
    #[arg(long, default_value_t = 50, help_heading = "Batches")]
    pub events_per_batch: usize,

    /// Approximate size of each event's JSON, in bytes.
    #[arg(long, default_value_t = 300, help_heading = "Batches")]
    pub event_size: usize,

    /// Fractions of event ips: public4,public6,private,invalid and optionally
    /// absent.
    #[arg(long, value_parser = IpMix::parse, default_value = "0.6,0.2,0.15,0.05", help_heading = "Batches")]
    pub ip_mix: IpMix,

    /// Batch categories (comma-separated), used in turn.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "page_view,click",
        help_heading = "Batches"
    )]
    pub categories: Vec<String>,

    /// Number of distinct app ids.
    #[arg(long, default_value_t = 4, help_heading = "Batches")]
    pub app_ids: usize,

    /// Share of events that break validation (missing or non-string id,
    /// negative timestamp).
    #[arg(long, default_value_t = 0.0, help_heading = "Batches")]
    pub invalid_fraction: f64,

    /// Seed of all generated data (same seed, same batches).
    #[arg(long, default_value_t = 1, help_heading = "Batches")]
    pub seed: u64,

    /// Distinct batch templates generated up front.
    #[arg(long, default_value_t = 64, help_heading = "Batches")]
    pub pool: usize,

    /// Kafka bootstrap servers (for --verify and --raw-kafka).
    #[arg(long, value_name = "HOST:PORT", help_heading = "Kafka")]
    pub brokers: Option<String>,

    /// Topic of a batch; {category} is replaced by its category.
    #[arg(long, default_value = DEFAULT_TOPIC_TEMPLATE, help_heading = "Kafka")]
    pub topic_template: String,

    /// After the load, read the topics back and check every accepted event
    /// is there exactly once (exit status 1 if any is missing).
    #[arg(long, requires = "brokers", help_heading = "Kafka")]
    pub verify: bool,

    /// With --verify: also write the backend_id of every accepted event to
    /// this file, one UUID a line (to check a table downstream against).
    #[arg(long, value_name = "FILE", requires = "verify", help_heading = "Kafka")]
    pub accepted_ids: Option<std::path::PathBuf>,

    /// Verification stops when nothing new arrived for this long.
    #[arg(long, value_parser = parse_duration, default_value = "5s", help_heading = "Kafka")]
    pub verify_idle: Duration,

    /// Verification stops after this long in any case.
    #[arg(long, value_parser = parse_duration, default_value = "5m", help_heading = "Kafka")]
    pub verify_timeout: Duration,

    /// Produce the gateway's messages straight to Kafka instead of calling
    /// the gateway (the broker and client ceiling). Topics must exist.
    #[arg(long, requires = "brokers", help_heading = "Kafka")]
    pub raw_kafka: bool,

    /// Extra librdkafka producer setting for --raw-kafka (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value, help_heading = "Kafka")]
    pub producer: Vec<(String, String)>,

    /// Print the report as one JSON object.
    #[arg(long, help_heading = "Output")]
    pub json: bool,

    /// No progress bar.
    #[arg(short, long, help_heading = "Output")]
    pub quiet: bool,

    /// Send nothing: write the first batch's multipart body to this file
    /// (for a load tool that posts one fixed body, such as wrk) and print
    /// its Content-Type and event counts as one JSON object.
    #[arg(long, value_name = "PATH", help_heading = "Output")]
    pub write_body: Option<std::path::PathBuf>,
}

/// Parses `key=value`.
fn parse_key_value(text: &str) -> anyhow::Result<(String, String)> {
    let (key, value) = text
        .split_once('=')
        .with_context(|| format!("{text:?} is not KEY=VALUE"))?;
    anyhow::ensure!(!key.trim().is_empty(), "{text:?} has an empty key");
    Ok((key.trim().to_owned(), value.trim().to_owned()))
}

impl Cli {
    /// The run these options describe.
    pub fn to_config(&self) -> Config {
        Config {
            target: if self.raw_kafka {
                Target::RawKafka
            } else {
                Target::Http
            },
            url: self.url.clone(),
            key: self.key.clone(),
            connections: self.connections,
            rate: self.rate,
            max_in_flight: self.max_in_flight,
            duration: self.duration,
            requests: self.requests,
            timeout: self.timeout,
            generator: GenConfig {
                events_per_batch: self.events_per_batch,
                event_size: self.event_size,
                ip_mix: self.ip_mix,
                categories: self
                    .categories
                    .iter()
                    .map(|c| c.trim().to_owned())
                    .filter(|c| !c.is_empty())
                    .collect(),
                app_ids: self.app_ids,
                invalid_fraction: self.invalid_fraction,
                seed: self.seed,
                pool: self.pool,
            },
            brokers: self.brokers.clone(),
            topic_template: self.topic_template.clone(),
            verify: self.verify,
            accepted_ids: self.accepted_ids.clone(),
            verify_idle: self.verify_idle,
            verify_timeout: self.verify_timeout,
            producer: self.producer.clone(),
            progress: !self.quiet,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_library_defaults() {
        let cli = Cli::parse_from(["venus-loadtest"]);
        let config = cli.to_config();
        let defaults = Config::default();
        assert_eq!(config.url, defaults.url);
        assert_eq!(config.connections, defaults.connections);
        assert_eq!(config.max_in_flight, defaults.max_in_flight);
        assert_eq!(config.timeout, defaults.timeout);
        assert_eq!(config.generator, defaults.generator);
        assert_eq!(config.topic_template, defaults.topic_template);
        assert_eq!(config.verify_idle, defaults.verify_idle);
        assert_eq!(config.verify_timeout, defaults.verify_timeout);
        assert!(config.progress);
    }

    #[test]
    fn options_reach_the_config() {
        let cli = Cli::parse_from([
            "venus-loadtest",
            "--rate",
            "250",
            "--duration",
            "1m30s",
            "--ip-mix",
            "1,0,0,0,1",
            "--categories",
            "a,b_c",
            "--raw-kafka",
            "--brokers",
            "k:9092",
            "--producer",
            "linger.ms=20",
            "--producer",
            "batch.size = 65536",
            "--quiet",
        ]);
        let config = cli.to_config();
        config.validate().unwrap();
        assert_eq!(config.rate, Some(250.0));
        assert_eq!(config.duration, Some(Duration::from_secs(90)));
        assert_eq!(config.generator.ip_mix.absent, 1.0);
        assert_eq!(config.generator.categories, ["a", "b_c"]);
        assert_eq!(config.target, Target::RawKafka);
        assert_eq!(
            config.producer,
            [
                ("linger.ms".to_owned(), "20".to_owned()),
                ("batch.size".to_owned(), "65536".to_owned())
            ]
        );
        assert!(!config.progress);
        assert!(Cli::try_parse_from(["venus-loadtest", "--verify"]).is_err());
        assert!(Cli::try_parse_from(["venus-loadtest", "--duration", "10x"]).is_err());
    }
}
