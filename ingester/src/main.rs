//! The `venus-ingester` binary: load the configuration, start telemetry,
//! ingest until SIGINT or SIGTERM, drain, exit 0.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The gateway's allocator, for the same reasons (its `main.rs`). Unlike
/// the gateway, the ingester keeps transparent huge pages (see the
/// gateway's `src/allocator.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Consumes venus's Kafka topics into ClickHouse.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Configuration file; every key can be overridden as VENUS__SECTION__KEY.
    #[arg(long, default_value = "config.yaml")]
    config: PathBuf,
    /// Print the statements that create the database, the events table and
    /// its marks table in this layout (`current` for ClickHouse 20.3 and
    /// later, `classic` for 18.16), for the configured names, and exit:
    /// for a deployment with `manage_schema: false`. Connects to nothing.
    #[arg(long, value_name = "LAYOUT", value_parser = ["current", "classic"])]
    print_schema: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match venus_ingester::config::Settings::load(&cli.config) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("venus-ingester: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(layout) = cli.print_schema {
        let layout = match layout.as_str() {
            "classic" => venus_ingester::row::Layout::Classic,
            _ => venus_ingester::row::Layout::Current,
        };
        let clickhouse = &settings.ingester.clickhouse;
        let schema = venus_ingester::schema::Schema {
            database: &clickhouse.database,
            table: &clickhouse.table,
            cluster: clickhouse.cluster.as_deref(),
        };
        for sql in schema.creates(layout, clickhouse.ttl_days) {
            println!("{sql};\n");
        }
        return ExitCode::SUCCESS;
    }
    let mut telemetry = settings.telemetry.clone();
    if telemetry.service_name.trim().is_empty()
        && std::env::var("OTEL_SERVICE_NAME")
            .unwrap_or_default()
            .trim()
            .is_empty()
    {
        telemetry.service_name = "venus-ingester".into();
    }
    let settings = venus_ingester::config::Settings {
        telemetry,
        ..settings
    };
    let tracing = match venus_shared::telemetry::init_tracing(&settings.telemetry) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("venus-ingester: cannot start telemetry: {error}");
            return ExitCode::from(2);
        }
    };
    let ingester =
        match venus_ingester::Ingester::build(settings, tracing.tracer("venus-ingester")).await {
            Ok(ingester) => ingester,
            Err(error) => {
                tracing::error!(%error, "cannot start");
                eprintln!("venus-ingester: {error}");
                return ExitCode::from(2);
            }
        };
    tracing::info!(address = %ingester.local_addr(), "listening");
    let result = ingester
        .run_until(venus_shared::shutdown::shutdown_requested())
        .await;
    tracing.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("venus-ingester: {error}");
            ExitCode::FAILURE
        }
    }
}
