//! Recent lookups, kept in front of the database's tree walk.
//!
//! A lookup walks the database's binary tree one bit of the address at a
//! time (up to 32 nodes for IPv4, 128 for IPv6, each a likely cache miss in a
//! file of 60 to 130 MB) and then decodes the record's strings: about a tenth
//! of the gateway's CPU per event when events carry many addresses
//! (docs/BENCHMARKS.md). The same devices upload again and again, from the
//! same addresses, so most lookups have been done a few seconds before.
//!
//! The cache is direct-mapped: an address hashes to one slot, and a new
//! address in a taken slot replaces the old one. That bounds its memory
//! exactly (`entries` slots of 40 bytes, plus one [`Location`] per slot) with
//! no eviction bookkeeping. A slot is taken with `try_lock`: a request never
//! waits for another; when two race for a slot, one of them walks the tree.
//!
//! It belongs to one loaded database, so a reload starts with an empty one
//! and an answer is always the answer of the data in use.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::Location;

/// One remembered answer: the address, where it is (empty strings when the
/// database has no record) and whether the database had a record.
type Slot = Option<(IpAddr, Arc<Location>, bool)>;

pub struct LookupCache {
    slots: Box<[Mutex<Slot>]>,
    /// `slots.len() - 1`; the length is a power of two.
    mask: usize,
}

impl LookupCache {
    /// A cache of `entries` slots, rounded up to a power of two; 0 turns it
    /// off (every lookup walks the tree).
    pub fn new(entries: usize) -> Self {
        let len = if entries == 0 {
            0
        } else {
            entries.next_power_of_two()
        };
        Self {
            slots: (0..len).map(|_| Mutex::new(None)).collect(),
            mask: len.saturating_sub(1),
        }
    }

    /// Number of slots.
    pub fn entries(&self) -> usize {
        self.slots.len()
    }

    /// The remembered answer for `ip`: where it is and whether the database
    /// had a record.
    pub fn get(&self, ip: IpAddr) -> Option<(Arc<Location>, bool)> {
        let slot = self.slot(ip)?.try_lock().ok()?;
        match &*slot {
            Some((cached, location, found)) if *cached == ip => {
                Some((Arc::clone(location), *found))
            }
            _ => None,
        }
    }

    /// Remembers the answer for `ip`, in place of whatever its slot held.
    pub fn put(&self, ip: IpAddr, location: &Arc<Location>, found: bool) {
        if let Some(Ok(mut slot)) = self.slot(ip).map(Mutex::try_lock) {
            *slot = Some((ip, Arc::clone(location), found));
        }
    }

    fn slot(&self, ip: IpAddr) -> Option<&Mutex<Slot>> {
        if self.slots.is_empty() {
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
        Some(&self.slots[hash & self.mask])
    }
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

    #[test]
    fn a_new_address_replaces_the_one_in_its_slot() {
        // One slot: every address shares it.
        let cache = LookupCache::new(1);
        let (a, b): (IpAddr, IpAddr) = ("1.1.1.1".parse().unwrap(), "2001:db8::1".parse().unwrap());
        cache.put(a, &place("A"), true);
        cache.put(b, &place("B"), true);
        assert!(cache.get(a).is_none());
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
    fn neighbouring_addresses_spread_over_the_slots() {
        let cache = LookupCache::new(4096);
        let used: std::collections::HashSet<usize> = (0..4096u32)
            .map(|i| {
                let ip = IpAddr::from(std::net::Ipv4Addr::from(0x5102_0000 + i));
                let slot = cache.slot(ip).unwrap() as *const _ as usize;
                slot
            })
            .collect();
        // A uniform hash of 4096 keys into 4096 slots fills about 63%.
        assert!(used.len() > 2400, "{} slots used", used.len());
    }
}
