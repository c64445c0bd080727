//! What the gateway sets up about memory before anything else: no
//! transparent huge pages for the process.
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
}
