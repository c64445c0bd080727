//! The `venus-loadtest` binary: mimalloc for Rust's and C's allocations,
//! then parse the command line, run, print the report (table or JSON) and
//! exit 1 when verification found missing events.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use venus_loadtest::cli::Cli;
use venus_loadtest::Report;

/// mimalloc, as the gateway: the load generator shares the two cores with
/// what it measures, and glibc's malloc was an eighth of its CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// C's `malloc` family, on mimalloc, for librdkafka (linked into this
/// binary) and libc: on glibc's malloc, raw produce is bound by an arena
/// lock its threads meet on for every message (`venus_loadtest::c_malloc`
/// says what it cost). Defined here, in the binary, and not in the library,
/// so that no test binary gets them. The executable's definitions take
/// precedence over libc's for every caller (ELF symbol interposition, the
/// way glibc documents replacing its malloc); `c_malloc` in every report
/// checks it. Each function hands its arguments to the mimalloc function
/// with the same contract, so its callers' obligations are C's.
mod c_malloc_on_mimalloc {
    use std::ffi::{c_int, c_void};

    use libmimalloc_sys as mi;

    const PAGE: usize = 4096;

    #[no_mangle]
    pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
        mi::mi_malloc(size)
    }

    #[no_mangle]
    pub unsafe extern "C" fn calloc(count: usize, size: usize) -> *mut c_void {
        mi::mi_calloc(count, size)
    }

    #[no_mangle]
    pub unsafe extern "C" fn realloc(block: *mut c_void, size: usize) -> *mut c_void {
        mi::mi_realloc(block, size)
    }

    #[no_mangle]
    pub unsafe extern "C" fn reallocarray(
        block: *mut c_void,
        count: usize,
        size: usize,
    ) -> *mut c_void {
        mi::mi_reallocn(block, count, size)
    }

    #[no_mangle]
    pub unsafe extern "C" fn free(block: *mut c_void) {
        mi::mi_free(block)
    }

    #[no_mangle]
    pub unsafe extern "C" fn posix_memalign(
        out: *mut *mut c_void,
        alignment: usize,
        size: usize,
    ) -> c_int {
        mi::mi_posix_memalign(out, alignment, size)
    }

    #[no_mangle]
    pub unsafe extern "C" fn aligned_alloc(alignment: usize, size: usize) -> *mut c_void {
        mi::mi_aligned_alloc(alignment, size)
    }

    #[no_mangle]
    pub unsafe extern "C" fn memalign(alignment: usize, size: usize) -> *mut c_void {
        mi::mi_malloc_aligned(size, alignment)
    }

    #[no_mangle]
    pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
        mi::mi_malloc_aligned(size, PAGE)
    }

    #[no_mangle]
    pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
        mi::mi_malloc_aligned(size.div_ceil(PAGE).max(1) * PAGE, PAGE)
    }

    #[no_mangle]
    pub unsafe extern "C" fn malloc_usable_size(block: *mut c_void) -> usize {
        mi::mi_usable_size(block)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.write_body {
        return match write_body(&cli, path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: cannot write {}: {error}", path.display());
                ExitCode::from(2)
            }
        };
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(venus_loadtest::run_until(cli.to_config(), ctrl_c()));
    let report = match result {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = print_report(&report, cli.json) {
        // A closed pipe (`| head`) is not worth a complaint.
        if error.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot print the report: {error}");
            return ExitCode::from(2);
        }
    }
    if report.has_missing_events() {
        eprintln!("error: accepted events are missing from Kafka");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// `--write-body`: the first batch of the run the same flags would make.
fn write_body(cli: &Cli, path: &std::path::Path) -> std::io::Result<()> {
    let summary = venus_loadtest::write_body(&cli.to_config(), path)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// Writes the report to stdout, as a table or as one JSON line.
fn print_report(report: &Report, json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, report)?;
        writeln!(out)?;
    } else {
        write!(out, "{report}")?;
    }
    out.flush()
}

/// Completes on the first Ctrl-C (the run then stops and still reports); a
/// second one ends the process.
async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        // No signal handling here: never stop early.
        std::future::pending::<()>().await;
    }
    eprintln!("stopping: finishing requests in flight (Ctrl-C again to quit)");
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
}
