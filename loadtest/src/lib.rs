//! venus-loadtest: load generator and end-to-end checker for the venus
//! gateway.
//!
//! It sends generated event batches to the gateway's upload endpoint (or,
//! with [`Target::RawKafka`], produces the gateway's Kafka messages itself),
//! in a closed loop (N workers back to back) or an open loop (fixed rate,
//! latency from the intended send time), and reports throughput, latency
//! percentiles, status and part codes. With `verify` it reads the topics
//! back and checks that every accepted event is in Kafka exactly once.
//!
//! ```no_run
//! # async fn smoke() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use venus_loadtest::{run, Config};
//!
//! let report = run(Config {
//!     url: "http://127.0.0.1:8080/api/v1/upload".into(),
//!     connections: 2,
//!     duration: Some(Duration::from_secs(1)),
//!     verify: true,
//!     brokers: Some("127.0.0.1:9092".into()),
//!     ..Config::default()
//! })
//! .await?;
//! assert_eq!(report.verify.unwrap().missing, 0);
//! # Ok(()) }
//! ```
//!
//! Files: `config.rs` (settings), `cli.rs` (command line), `generate.rs`
//! (batches), `load.rs` (closed and open loop), `http_load.rs` and
//! `raw_kafka.rs` (the two targets), `verify.rs` (Kafka read-back),
//! `report.rs` (totals, histogram, output), `progress.rs` (live bar),
//! `rng.rs` (the seeded generator).

pub mod c_malloc;
pub mod cli;
pub mod config;
pub mod generate;
mod http_client;
mod http_load;
mod load;
mod progress;
pub mod raw_kafka;
pub mod report;
pub mod rng;
pub mod verify;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

pub use config::{parse_duration, Config, GenConfig, IpMix, Target};
pub use raw_kafka::RawKafkaReport;
pub use report::{LatencyMs, Report};
pub use verify::VerifyReport;

use crate::generate::Generator;
use crate::http_load::HttpTarget;
use crate::load::{drive, Plan};
use crate::progress::{Goal, Progress};
use crate::raw_kafka::RawKafkaTarget;
use crate::report::RunShape;
use crate::verify::{TopicIds, VerifySettings};

/// Runs the load described by `config` to its end and returns the report.
pub async fn run(config: Config) -> anyhow::Result<Report> {
    run_until(config, std::future::pending()).await
}

/// Milliseconds since the Unix epoch: the time generated events are stamped
/// a little before.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// What `--write-body` wrote: the body's `Content-Type` and event counts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BodySummary {
    pub content_type: &'static str,
    pub events: usize,
    pub accepted_events: usize,
}

/// `--write-body`: writes the first batch the same configuration would send
/// (a fixed body for a load tool such as wrk) to `path`.
pub fn write_body(config: &Config, path: &std::path::Path) -> std::io::Result<BodySummary> {
    let generator = Generator::new(&config.generator, now_ms());
    let batch = generator.batch(0);
    std::fs::write(path, batch.multipart_body())?;
    Ok(BodySummary {
        content_type: generate::CONTENT_TYPE,
        events: batch.len(),
        accepted_events: batch.accepted_events().count(),
    })
}

/// Like [`run`], but stops starting requests early when `shutdown`
/// completes (Ctrl-C, say); what was sent is still reported and verified.
pub async fn run_until<F>(config: Config, shutdown: F) -> anyhow::Result<Report>
where
    F: Future<Output = ()> + Send + 'static,
{
    config.validate()?;
    let generator = Arc::new(Generator::new(&config.generator, now_ms()));
    let topics: Vec<String> = generator
        .categories()
        .iter()
        .map(|c| config.topic_for(c))
        .collect();
    let brokers = config.brokers.clone().unwrap_or_default();

    // Fail before the load, not after it, when Kafka is not there.
    if config.target == Target::RawKafka {
        let (brokers, topics) = (brokers.clone(), topics.clone());
        blocking(move || verify::check_topics(&brokers, &topics)).await?;
    } else if config.verify {
        let brokers = brokers.clone();
        blocking(move || verify::check_brokers(&brokers)).await?;
    }

    let duration = config.effective_duration();
    let plan = Plan {
        connections: config.connections,
        rate: config.rate,
        max_in_flight: config.max_in_flight,
        duration,
        requests: config.requests,
    };
    let goal = match (duration, config.requests) {
        (Some(duration), _) => Goal::Time(duration),
        (None, Some(requests)) => Goal::Requests(requests),
        (None, None) => Goal::Time(Config::DEFAULT_DURATION),
    };
    let mut progress = Progress::start(config.progress, goal);
    let categories = topics.len();

    let (driven, raw_settings) = match config.target {
        Target::Http => {
            let target = Arc::new(HttpTarget::new(&config, generator.clone())?);
            let driven = drive(target, &plan, categories, progress.live(), shutdown).await;
            (driven, None)
        }
        Target::RawKafka => {
            let settings = raw_kafka::producer_settings(&config);
            let target = Arc::new(RawKafkaTarget::new(
                &brokers,
                &settings,
                generator.clone(),
                topics.clone(),
                config.verify,
            )?);
            // The gateway's producer is long-lived: get this one past its
            // start-up (an idempotent producer first waits for its producer
            // id, about 0.5 s) before the clock starts.
            let warmup = target.warm_up().await?;
            let driven = drive(target.clone(), &plan, categories, progress.live(), shutdown).await;
            blocking(move || {
                target.flush(Duration::from_secs(10));
                Ok(())
            })
            .await?;
            (driven, Some((settings, warmup)))
        }
    };
    progress.end_load();

    let shape = RunShape {
        target: config.target.as_str(),
        mode: config.mode(),
        connections: config.connections,
        rate: config.rate,
    };
    let mut report = Report::from_stats(&driven.stats, driven.elapsed, &shape, driven.schedule);
    if let Some((producer, warmup)) = raw_settings {
        let secs = driven.elapsed.as_secs_f64().max(1e-9);
        report.raw_kafka = Some(RawKafkaReport {
            brokers: brokers.clone(),
            acked: driven.stats.accepted,
            failed: driven.stats.errors,
            acked_per_sec: driven.stats.accepted as f64 / secs,
            mb_per_sec: driven.stats.bytes as f64 / 1e6 / secs,
            warmup_secs: warmup.as_secs_f64(),
            producer,
        });
    }

    if config.verify {
        let settings = VerifySettings {
            brokers,
            idle: config.verify_idle,
            timeout: config.verify_timeout,
        };
        let stats = driven.stats;
        if let Some(path) = &config.accepted_ids {
            write_ids(path, &stats.accepted_ids)?;
        }
        let expected: Vec<TopicIds> = topics
            .into_iter()
            .zip(stats.accepted_ids.into_iter().zip(stats.failed_ids))
            .map(|(topic, (accepted, failed))| TopicIds {
                topic,
                accepted,
                failed,
            })
            .collect();
        let bar = progress.bar();
        report.verify = Some(blocking(move || verify::verify(&settings, &expected, &bar)).await?);
    }
    progress.finish();
    Ok(report)
}

/// The backend_ids of `ids` (every category's), one UUID a line.
fn write_ids(path: &std::path::Path, ids: &[Vec<u128>]) -> anyhow::Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(path)
        .with_context(|| format!("--accepted-ids {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for id in ids.iter().flatten() {
        writeln!(out, "{}", uuid::Uuid::from_u128(*id).hyphenated())?;
    }
    out.flush()
        .with_context(|| format!("--accepted-ids {}", path.display()))
}

/// Runs blocking Kafka work off the async workers.
async fn blocking<T, F>(work: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .context("a blocking Kafka task panicked")?
}
