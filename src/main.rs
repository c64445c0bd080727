//! The `venus` binary: load the configuration, start telemetry, serve until
//! SIGINT or SIGTERM, drain.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// glibc's allocator spent about a fifth of the gateway's CPU under load
/// (see docs/BENCHMARKS.md); mimalloc's per-thread caches suit the many
/// short-lived per-request allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// HTTP gateway that writes uploaded event batches to Kafka.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Configuration file; every key can be overridden as VENUS__SECTION__KEY.
    #[arg(long, default_value = "config.yaml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Prints the SHA-256 digest of a write key, for `apps[].keys`. The key
    /// is read from standard input (so it stays out of the shell history),
    /// one key, a trailing newline ignored.
    HashKey,
    /// The local spool (`spool.path`).
    #[command(subcommand)]
    Spool(SpoolCommand),
}

#[derive(clap::Subcommand)]
enum SpoolCommand {
    /// Checks a spool directory offline, changing nothing: every segment's
    /// records (pending and replayed), pending records per topic, the
    /// oldest pending record, torn tails and corrupt records, and what is
    /// in quarantine/. Exit status 1 if a segment outside quarantine is
    /// torn or corrupt (the gateway cuts or quarantines it at start).
    Verify {
        /// The spool directory.
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    venus::allocator::disable_transparent_huge_pages();
    venus::allocator::return_freed_memory_promptly();
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::HashKey) => return hash_key(),
        Some(Command::Spool(SpoolCommand::Verify { path })) => return verify_spool(path),
        None => {}
    }
    // Parsing recurses once per nesting level of a batch (bounded by
    // `split_and_validate::MAX_NESTING`); larger worker stacks keep a wide
    // margin above that bound.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 * 1024 * 1024)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(serve(cli)),
        Err(error) => {
            eprintln!("venus: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

fn verify_spool(path: &std::path::Path) -> ExitCode {
    use venus::spool::segment;
    if !path.is_dir() {
        eprintln!("venus spool verify: {} is not a directory", path.display());
        return ExitCode::from(2);
    }
    let inspection = match segment::inspect(path) {
        Ok(inspection) => inspection,
        Err(error) => {
            eprintln!("venus spool verify: {}: {error}", path.display());
            return ExitCode::from(2);
        }
    };
    let now = venus::spool::now_ms();
    let describe = |report: &segment::SegmentReport| {
        let state = if report.corrupt {
            format!(
                "CORRUPT after {} records (byte {} of {})",
                report.records, report.valid_bytes, report.file_bytes
            )
        } else if report.torn_tail {
            format!(
                "TORN TAIL: {} bytes after the last whole record",
                report.file_bytes - report.valid_bytes
            )
        } else {
            "ok".to_owned()
        };
        let oldest = report
            .oldest_pending_ms
            .map(|ms| format!(", oldest pending {} s old", now.saturating_sub(ms) / 1000))
            .unwrap_or_default();
        println!(
            "segment {:020}: {} records, {} pending ({} bytes replayed){oldest}: {state}",
            report.id, report.records, report.pending_records, report.replayed_bytes
        );
    };
    let mut topics = std::collections::BTreeMap::<String, u64>::new();
    let mut bad = 0;
    for report in &inspection.segments {
        describe(report);
        bad += usize::from(report.corrupt || report.torn_tail);
        for (topic, n) in &report.topics {
            *topics.entry(topic.clone()).or_default() += n;
        }
    }
    for report in &inspection.quarantined {
        print!("quarantine/ ");
        describe(report);
    }
    let pending: u64 = topics.values().sum();
    println!(
        "{} segments, {pending} records pending, {} in quarantine",
        inspection.segments.len(),
        inspection.quarantined.len()
    );
    for (topic, n) in topics {
        println!("  {topic}: {n}");
    }
    if bad > 0 {
        println!(
            "{bad} segments torn or corrupt: the gateway cuts or quarantines them when it starts"
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn hash_key() -> ExitCode {
    let mut key = String::new();
    if let Err(error) = std::io::stdin().read_line(&mut key) {
        eprintln!("venus hash-key: cannot read the key from standard input: {error}");
        return ExitCode::FAILURE;
    }
    let key = key.strip_suffix('\n').unwrap_or(&key);
    let key = key.strip_suffix('\r').unwrap_or(key);
    if key.is_empty() {
        eprintln!("venus hash-key: give the key on standard input, e.g. `printf %s \"$KEY\" | venus hash-key`");
        return ExitCode::FAILURE;
    }
    println!("{}", venus::apps::keys::KeyDigest::of(key).to_hex());
    ExitCode::SUCCESS
}

async fn serve(cli: Cli) -> ExitCode {
    let settings = match venus::config::Settings::load(&cli.config) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("venus: {error}");
            return ExitCode::from(2);
        }
    };
    let tracing = match venus::telemetry::init_tracing(&settings.telemetry) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("venus: cannot start telemetry: {error}");
            return ExitCode::from(2);
        }
    };
    let app = match venus::Application::build(settings).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            eprintln!("venus: {error}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(address = %app.local_addr(), "listening");
    app.run_until(venus::drain::shutdown_requested()).await;
    tracing.shutdown();
    ExitCode::SUCCESS
}
