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
}

fn main() -> ExitCode {
    // Parsing recurses once per nesting level of a batch (bounded by
    // `split_and_validate::MAX_NESTING`); larger worker stacks keep a wide
    // margin above that bound.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 * 1024 * 1024)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(serve()),
        Err(error) => {
            eprintln!("venus: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> ExitCode {
    let cli = Cli::parse();
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
