//! Recent lookups, kept in front of the database.
//!
//! A lookup in a mapped file walks its binary tree one bit of the address
//! at a time (up to 32 nodes for IPv4, 128 for IPv6, each a likely cache
//! miss in a file of 60 to 130 MB) and then decodes the record's strings:
//! about a tenth of the gateway's CPU per event when events carry many
//! addresses (docs/BENCHMARKS.md). The compact tables (the default) cost
//! about as much per lookup: a binary search over 35 MB and three strings
//! copied out. The same devices upload again and again, from the
//! same addresses, so most lookups have been done a few seconds before.
//!
//! The cache is set-associative: an address hashes to one set of [`WAYS`]
//! slots, kept in order of last use, and a new address in a full set
//! replaces the one used longest ago. That bounds its memory exactly
//! (`entries` slots, plus one [`Location`] per slot) with no bookkeeping
//! beyond the order within a set. It was direct-mapped, one slot per
//! address, until a benchmark showed why that is not enough: with 3,200
//! recurring addresses in 16,384 slots, a fifth of the slots in use, 14% of
//! lookups still missed. Two addresses that share a slot evict each other
//! every time they come back, and at that load about one address in six
//! shares its slot. With four ways an address is only evicted when five
//! share a set.
//!
//! A set is taken with `try_lock`: a request never waits for another; when
//! two race for a set, one of them walks the tree.
//!
//! It belongs to one loaded database, so a reload starts with an empty one
//! and an answer is always the answer of the data in use.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::Location;

/// Slots per set. Four keep a set's lock and its slots in about two cache
/// lines, and make eviction by a collision rare at any load short of full.
const WAYS: usize = 4;

/// One remembered answer: the address, where it is (empty strings when the
/// database has no record) and whether the database had a record.
type Slot = Option<(IpAddr, Arc<Location>, bool)>;

/// A set's slots, the most recently used first.
type Set = [Slot; WAYS];

pub struct LookupCache {
    sets: Box<[Mutex<Set>]>,
    /// `sets.len() - 1`; the length is a power of two.
    mask: usize,
}

impl LookupCache {
    /// A cache of `entries` slots, rounded up to a power of two and to at
    /// least one set ([`WAYS`] slots); 0 turns it off (every lookup walks the
    /// tree).
    pub fn new(entries: usize) -> Self {
        let sets = if entries == 0 {
            0
        } else {
            entries.next_power_of_two().div_ceil(WAYS)
        };
        Self {
            sets: (0..sets).map(|_| Mutex::new(Default::default())).collect(),
            mask: sets.saturating_sub(1),
        }
    }

    /// Number of slots.
    pub fn entries(&self) -> usize {
        self.sets.len() * WAYS
    }

    /// The remembered answer for `ip`: where it is and whether the database
    /// had a record. A hit becomes its set's most recently used.
    pub fn get(&self, ip: IpAddr) -> Option<(Arc<Location>, bool)> {
        let mut set = self.set(ip)?.try_lock().ok()?;
        let way = way_of(&set, ip)?;
        set[..=way].rotate_right(1);
        set[0]
            .as_ref()
            .map(|(_, location, found)| (Arc::clone(location), *found))
    }

    /// Remembers the answer for `ip` as its set's most recently used, in
    /// place of the one used longest ago (or of an earlier answer for `ip`,
    /// when two requests looked it up at once).
    pub fn put(&self, ip: IpAddr, location: &Arc<Location>, found: bool) {
        let Some(Ok(mut set)) = self.set(ip).map(Mutex::try_lock) else {
            return;
        };
        let way = way_of(&set, ip).unwrap_or(WAYS - 1);
        set[..=way].rotate_right(1);
        set[0] = Some((ip, Arc::clone(location), found));
    }

    fn set(&self, ip: IpAddr) -> Option<&Mutex<Set>> {
        if self.sets.is_empty() {
            return None;
        }
        let bits = match ip {
            IpAddr::V4(v4) => u64::from(u32::from(v4)),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                (bits as u64) ^ ((bits >> 64) as u64).rotate_left(29)
            }
        };
        // Fibonacci hashing: the product's high half mixes every input bit,
        // so neighbouring addresses land far apart.
        let hash = (bits.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize;
        Some(&self.sets[hash & self.mask])
    }
}

/// Where in `set` the answer for `ip` is, if it is there.
fn way_of(set: &Set, ip: IpAddr) -> Option<usize> {
    set.iter()
        .position(|slot| matches!(slot, Some((cached, _, _)) if *cached == ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(city: &str) -> Arc<Location> {
        Arc::new(Location {
            country: "GB".into(),
            region: "England".into(),
            city: city.into(),
        })
    }

    #[test]
    fn remembers_an_answer_and_only_for_its_address() {
        let cache = LookupCache::new(1000);
        assert_eq!(cache.entries(), 1024);
        let ip: IpAddr = "81.2.69.142".parse().unwrap();
        assert!(cache.get(ip).is_none());
        cache.put(ip, &place("London"), true);
        let (location, found) = cache.get(ip).expect("cached");
        assert_eq!(location.city, "London");
        assert!(found);
        assert!(cache.get("81.2.69.143".parse().unwrap()).is_none());
    }

    #[test]
    fn a_miss_is_remembered_as_a_miss() {
        let cache = LookupCache::new(16);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        cache.put(ip, &Arc::new(Location::default()), false);
        let (location, found) = cache.get(ip).expect("cached");
        assert!(!found);
        assert_eq!(*location, Location::default());
    }

    /// `count` distinct IPv4 addresses that fall in one set of `cache`.
    fn same_set(cache: &LookupCache, count: usize) -> Vec<IpAddr> {
        let first: IpAddr = "81.2.69.1".parse().unwrap();
        let target = cache.set(first).unwrap() as *const _;
        (0x5102_4501u32..)
            .map(|n| IpAddr::from(std::net::Ipv4Addr::from(n)))
            .filter(|ip| std::ptr::eq(cache.set(*ip).unwrap(), target))
            .take(count)
            .collect()
    }

    #[test]
    fn addresses_that_share_a_set_are_all_kept_up_to_its_ways() {
        // What a direct-mapped cache got wrong: two recurring addresses with
        // one slot evicted each other at every turn.
        let cache = LookupCache::new(4096);
        let ips = same_set(&cache, WAYS);
        for _round in 0..3 {
            for (n, ip) in ips.iter().enumerate() {
                if cache.get(*ip).is_none() {
                    cache.put(*ip, &place(&format!("city {n}")), true);
                }
            }
        }
        for (n, ip) in ips.iter().enumerate() {
            assert_eq!(cache.get(*ip).expect("kept").0.city, format!("city {n}"));
        }
    }

    #[test]
    fn a_full_set_gives_up_the_address_used_longest_ago() {
        let cache = LookupCache::new(64);
        let ips = same_set(&cache, WAYS + 1);
        for ip in &ips[..WAYS] {
            cache.put(*ip, &place("old"), true);
        }
        // The first one is used again, so the second is now the oldest.
        assert!(cache.get(ips[0]).is_some());
        cache.put(ips[WAYS], &place("new"), true);
        assert!(cache.get(ips[1]).is_none(), "the least recently used left");
        for ip in [ips[0], ips[2], ips[3], ips[WAYS]] {
            assert!(cache.get(ip).is_some(), "{ip} kept");
        }
    }

    #[test]
    fn a_second_answer_for_an_address_replaces_the_first() {
        // Two requests that missed the same address at once both put it: it
        // must not take two slots of its set.
        let cache = LookupCache::new(64);
        let ips = same_set(&cache, WAYS);
        cache.put(ips[0], &place("first"), true);
        cache.put(ips[0], &place("second"), true);
        for ip in &ips[1..] {
            cache.put(*ip, &place("other"), true);
        }
        assert_eq!(cache.get(ips[0]).expect("still kept").0.city, "second");
    }

    #[test]
    fn a_tiny_cache_has_one_set() {
        let cache = LookupCache::new(1);
        assert_eq!(cache.entries(), WAYS);
        let (a, b): (IpAddr, IpAddr) = ("1.1.1.1".parse().unwrap(), "2001:db8::1".parse().unwrap());
        cache.put(a, &place("A"), true);
        cache.put(b, &place("B"), true);
        assert_eq!(cache.get(a).unwrap().0.city, "A");
        assert_eq!(cache.get(b).unwrap().0.city, "B");
    }

    #[test]
    fn zero_entries_remember_nothing() {
        let cache = LookupCache::new(0);
        let ip: IpAddr = "81.2.69.142".parse().unwrap();
        cache.put(ip, &place("London"), true);
        assert!(cache.get(ip).is_none());
        assert_eq!(cache.entries(), 0);
    }

    #[test]
    fn neighbouring_addresses_spread_over_the_sets() {
        let cache = LookupCache::new(4096 * WAYS);
        let used: std::collections::HashSet<usize> = (0..4096u32)
            .map(|i| {
                let ip = IpAddr::from(std::net::Ipv4Addr::from(0x5102_0000 + i));
                cache.set(ip).unwrap() as *const _ as usize
            })
            .collect();
        // A uniform hash of 4096 keys into 4096 sets fills about 63%.
        assert!(used.len() > 2400, "{} sets used", used.len());
    }
}
