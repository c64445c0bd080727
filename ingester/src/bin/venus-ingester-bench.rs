//! The two ceilings of the ingester's benchmark (`scripts/bench`), measured
//! on the same topic the ingester then consumes:
//!
//! * `consume`: librdkafka alone reads the topic (no decode, no insert);
//! * `insert`: the topic's messages, mapped to rows as the ingester maps
//!   them (untimed), inserted into ClickHouse in batches of `--batch-rows`
//!   over the same HTTP client, `--concurrency` inserts at a time as the
//!   ingester's default `insert_concurrency` (timed): ClickHouse's own
//!   insert rate for these rows.
//!
//! Prints one JSON object: `{"mode", "messages", "bytes", "seconds", "per_sec"}`.

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use venus_ingester::clickhouse::ClickHouse;
use venus_ingester::config::ClickHouseSettings;
use venus_ingester::record::Record;

#[derive(Parser)]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(long)]
    brokers: String,
    /// The pre-filled topic (every partition is read from the beginning).
    #[arg(long)]
    topic: String,
    /// Messages to read: the topic's count (tansu's watermarks cannot be
    /// trusted, so the caller says how many were produced).
    #[arg(long)]
    count: u64,
    /// Start every partition at this offset instead of the beginning.
    #[arg(long)]
    from_offset: Option<i64>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Read the messages, nothing else.
    Consume,
    /// Insert the messages' rows into ClickHouse.
    Insert {
        #[arg(long)]
        clickhouse: String,
        #[arg(long, default_value = "venus")]
        database: String,
        #[arg(long)]
        table: String,
        #[arg(long, default_value_t = 10_000)]
        batch_rows: usize,
        /// Inserts in flight at once.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
    },
}

/// Reads `count` messages of every partition of `topic` from the start;
/// calls `each` per message; returns the seconds from the first message to
/// the last.
fn read_all(
    from: Option<i64>,
    brokers: &str,
    topic: &str,
    count: u64,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            let start = from.map_or(Offset::Beginning, Offset::Offset);
            assignment.add_partition_offset(topic, p.id(), start)?;
        }
    }
    consumer.assign(&assignment)?;
    let mut seen = 0;
    let mut first = None;
    let mut last = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < count {
        anyhow::ensure!(Instant::now() < deadline, "read {seen} of {count} messages");
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            if first.is_none() {
                eprintln!(
                    "first message: partition {} offset {}",
                    message.partition(),
                    message.offset()
                );
            }
            first.get_or_insert_with(Instant::now);
            each(&message);
            seen += 1;
            last = Instant::now();
        }
    }
    Ok(last.duration_since(first.unwrap_or(last)).as_secs_f64())
}

fn report(mode: &str, messages: u64, bytes: u64, seconds: f64) {
    println!(
        "{}",
        serde_json::json!({
            "mode": mode,
            "messages": messages,
            "bytes": bytes,
            "seconds": seconds,
            "per_sec": messages as f64 / seconds.max(1e-9),
        })
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.mode {
        Mode::Consume => {
            let mut bytes = 0u64;
            let seconds = read_all(cli.from_offset, &cli.brokers, &cli.topic, cli.count, |m| {
                bytes += m.payload_len() as u64;
            })?;
            report("consume", cli.count, bytes, seconds);
        }
        Mode::Insert {
            clickhouse,
            database,
            table,
            batch_rows,
            concurrency,
        } => {
            let client = ClickHouse::new(&ClickHouseSettings {
                url: clickhouse,
                replica_urls: Vec::new(),
                cluster: None,
                database,
                table,
                user: "default".into(),
                password: Default::default(),
                password_file: None,
                ca_file: None,
                manage_schema: true,
                ttl_days: 0,
                timeout_ms: 120_000,
                ping_timeout_ms: 1_000,
            })?;
            client.ensure_schema().await?;
            // Rows in the table's own layout.
            let layout = client.layout();
            let mut batches: Vec<Vec<u8>> = vec![Vec::new()];
            let mut rows_in_last = 0;
            let now = venus_ingester::processor::now_seconds();
            let topic: std::sync::Arc<str> = cli.topic.as_str().into();
            read_all(cli.from_offset, &cli.brokers, &cli.topic, cli.count, |m| {
                let record = Record::from_message(m, topic.clone(), 0);
                let last = batches.last_mut().expect("one batch at least");
                if venus_ingester::row::write_row(last, &record, now, layout).is_ok() {
                    rows_in_last += 1;
                    if rows_in_last == batch_rows {
                        batches.push(Vec::new());
                        rows_in_last = 0;
                    }
                }
            })?;
            let bytes: u64 = batches.iter().map(|b| b.len() as u64).sum();
            // Each of `concurrency` tasks takes the next batch when free,
            // as the ingester's writers do.
            let queue = std::sync::Arc::new(std::sync::Mutex::new(
                batches
                    .into_iter()
                    .filter(|b| !b.is_empty())
                    .map(bytes::Bytes::from)
                    .collect::<std::collections::VecDeque<_>>(),
            ));
            let started = Instant::now();
            let tasks: Vec<_> = (0..concurrency.max(1))
                .map(|_| {
                    let (client, queue) = (client.clone(), queue.clone());
                    tokio::spawn(async move {
                        loop {
                            let next = queue.lock().expect("not poisoned").pop_front();
                            let Some(batch) = next else {
                                return Ok::<(), anyhow::Error>(());
                            };
                            client
                                .insert(batch, &uuid::Uuid::new_v4().to_string())
                                .await?;
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await??;
            }
            report("insert", cli.count, bytes, started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}
