//! What the gateway sets up about memory before anything else: no
//! transparent huge pages for the process, and freed memory handed back to
//! the kernel at once rather than kept for later.
//!
//! Both binaries use mimalloc (`#[global_allocator]` in each `main.rs`: a
//! library cannot declare it, since the ingester links this crate). mimalloc asks
//! the kernel for transparent huge pages on the regions it maps
//! (`madvise(MADV_HUGEPAGE)`), so even on a system where THP is only for
//! processes that ask (`madvise`, Debian's default) every 2 MiB region it
//! touches is backed whole. Under 256 connections the gateway's anonymous
//! memory was 60-62 MB with them and 37-41 MB without, for the same
//! throughput (docs/BENCHMARKS.md). mimalloc's own switch
//! (`MIMALLOC_ALLOW_THP=0`) is read when it starts, before `main`, so it
//! would have to be set by whoever starts the process; the process-wide
//! `PR_SET_THP_DISABLE` does the same from `main` and also covers the
//! regions already mapped, since the kernel checks it at each page fault.
//!
//! Then [`return_freed_memory_promptly`]: under 256 connections the
//! gateway's memory rises with the uploads in flight and falls back as they
//! are answered. By default neither allocator gives back what falls: mimalloc
//! (v3) purges a freed region only after a second, and glibc's malloc, which
//! librdkafka's C code uses, gives each thread that allocates its own 64 MiB
//! arena to fill and fragment (librdkafka's broker threads, and the tokio
//! workers that hand it messages). With mimalloc purging at once and glibc
//! keeping one arena, the peak RSS under 256 connections fell from 96-102 MB
//! to 89-93 MB, with no more CPU per event (docs/BENCHMARKS.md, issue 11).
//!
//! librdkafka's own allocations stay on glibc's malloc. Handing them to
//! mimalloc (its `override` feature, issue 12) took the gateway's tokio
//! workers from 7,000 `futex` calls a second to 1,350 at half of peak, most
//! of the difference glibc's arena lock that a message's allocation on a
//! worker and its free on librdkafka's broker thread meet on. But with
//! mimalloc purging at once, librdkafka's freed pages went back to the kernel
//! and were faulted in again: CPU per event at peak rose 3-28% over seven
//! alternated rounds, and the half-peak tail did not move
//! (docs/BENCHMARKS.md). `venus-loadtest` does hand them over (its raw
//! produce, which has no memory target, read a quarter more).
//!
//! The ingester keeps huge pages: its memory has no target of that kind,
//! and catching up on a full topic it did 7% fewer rows/s without them
//! (`scripts/bench-ingester-ab`, 3 rounds: 96,230 against 89,107).

/// Turns transparent huge pages off for this process; `false` where that
/// is not possible (not Linux, or a kernel before 3.15).
pub fn disable_transparent_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and
        // only sets a flag of the calling process.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// mimalloc's `mi_option_purge_delay`: its place in `mi_option_t`
/// (`mimalloc.h`, the same in v2 and v3; `libmimalloc-sys` names only some
/// options). A test checks it is the option `MIMALLOC_PURGE_DELAY` sets.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Has mimalloc purge freed memory at once (instead of after 1 s) and
/// glibc's malloc keep a single arena (instead of up to eight per core),
/// so memory that uploads in flight used goes back when they are answered.
/// Call it first in `main`, before any thread starts: mimalloc's options
/// are not thread-safe to set, and glibc's limit only stops new arenas.
/// Returns whether glibc took the limit (`false` off glibc).
pub fn return_freed_memory_promptly() -> bool {
    // SAFETY: sets one of mimalloc's integer options, before other threads
    // exist (see above).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and sets a limit of glibc's
        // allocator; it returns 1 on success.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// mimalloc's purge delay in milliseconds, as it is now.
pub fn mimalloc_purge_delay_ms() -> std::ffi::c_long {
    // SAFETY: reads one of mimalloc's integer options.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

/// Whether transparent huge pages are on for this process, as the kernel
/// reports it (`THP_enabled` in `/proc/PID/status`, Linux 5.0 and later);
/// `None` where it does not say.
pub fn transparent_huge_pages_enabled(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(|value| value.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn huge_pages_are_off_after_the_call() {
        // Each test binary is its own process: this changes nothing else.
        let pid = std::process::id();
        let before = transparent_huge_pages_enabled(pid);
        assert!(disable_transparent_huge_pages());
        match before {
            // The kernel reports it: it must now say off.
            Some(_) => assert_eq!(transparent_huge_pages_enabled(pid), Some(false)),
            None => eprintln!("this kernel does not report THP_enabled"),
        }
    }

    /// The option this module sets is the purge delay: a copy of this test
    /// binary started with `MIMALLOC_PURGE_DELAY=4321` (read by mimalloc
    /// when it starts) reads 4321 through `MI_OPTION_PURGE_DELAY`.
    #[test]
    fn the_option_set_is_mimallocs_purge_delay() {
        const CHILD: &str = "VENUS_ALLOCATOR_TEST_CHILD";
        if std::env::var_os(CHILD).is_some() {
            println!("purge_delay={}", mimalloc_purge_delay_ms());
            return;
        }
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "allocator::tests::the_option_set_is_mimallocs_purge_delay",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("MIMALLOC_PURGE_DELAY", "4321")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}");
        assert!(stdout.contains("purge_delay=4321"), "{stdout}");
    }

    #[test]
    fn freed_memory_is_purged_at_once_after_the_call() {
        let took = return_freed_memory_promptly();
        assert_eq!(mimalloc_purge_delay_ms(), 0);
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(took, "glibc refused M_ARENA_MAX");
        }
    }
}
