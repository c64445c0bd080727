//! Which allocator C code in this process gets: the raw Kafka target's
//! ceiling depends on it.
//!
//! librdkafka allocates each message (and its headers) on the thread that
//! produces it and frees it on its broker thread once acknowledged. On
//! glibc's malloc those threads meet on an arena lock for every message, and
//! raw produce read 294-337k events/s where the same run on mimalloc read
//! 414-427k (docs/BENCHMARKS.md, issue 12): the ceiling the gateway is
//! compared with was a quarter low. So the `venus-loadtest` binary defines
//! C's `malloc` family itself, on mimalloc (`src/main.rs`), and librdkafka,
//! linked into it, calls those.
//!
//! Only the binary: a library that defined `malloc` would also replace it in
//! every test binary that links it, the gateway's included. The gateway
//! keeps glibc for its C code (`venus::allocator` says why).

/// `"mimalloc"` when a block from C's `malloc` comes from mimalloc's heap,
/// `"libc"` otherwise. The report carries it, so a figure says which
/// allocator librdkafka had.
pub fn c_malloc() -> &'static str {
    // SAFETY: a plain malloc/free pair; between them the pointer is only
    // looked up in mimalloc's bookkeeping, not read.
    let ours = unsafe {
        let block = libc::malloc(64);
        let ours = !block.is_null() && libmimalloc_sys::mi_is_in_heap_region(block);
        libc::free(block);
        ours
    };
    if ours {
        "mimalloc"
    } else {
        "libc"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This library's test binary does not replace `malloc` (only the
    /// `venus-loadtest` binary does): the check must say so. The binary's
    /// side is `tests/fake_gateway.rs`.
    #[test]
    fn a_library_test_binary_has_libcs_malloc() {
        assert_eq!(c_malloc(), "libc");
    }
}
