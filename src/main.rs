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
}

fn main() -> ExitCode {
    venus::allocator::disable_transparent_huge_pages();
    venus::allocator::return_freed_memory_promptly();
    let cli = Cli::parse();
    if let Some(Command::HashKey) = cli.command {
        return hash_key();
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
