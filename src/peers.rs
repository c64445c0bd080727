//! Fair shares per client address: what one address may hold of the
//! gateway's connections (and, through [`PeerKey`], of its body budget and
//! rate limits), so that one client cannot lock every other one out.
//!
//! An address is a [`PeerKey`]: an IPv4 address, or the /64 network of an
//! IPv6 address. One IPv6 host is routinely given a whole /64 (SLAAC,
//! privacy addresses), so counting single IPv6 addresses would give one
//! attacker 2^64 shares.
//!
//! Connections are counted by the TCP peer, the only address known when a
//! connection is accepted. Behind a load balancer every connection comes
//! from the balancer's few addresses, so there the per-peer limit must be
//! raised (or turned off with 0) and the balancer left to hold clients to
//! their share: docs/RELIABILITY.md says how.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use dashmap::DashMap;

/// The address a share is counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerKey(IpAddr);

impl PeerKey {
    /// An IPv4 address (also when written as IPv4-mapped IPv6) as it is; an
    /// IPv6 address as its /64.
    pub fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => Self(address),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let network = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(Ipv6Addr::from(network)))
                }
            },
        }
    }
}

/// Open connections per peer, each at most `limit`.
#[derive(Clone)]
pub struct ConnectionShares {
    open: Arc<DashMap<PeerKey, usize>>,
    /// 0: no limit per peer.
    limit: usize,
}

impl ConnectionShares {
    pub fn new(limit: usize) -> Self {
        Self {
            open: Arc::new(DashMap::new()),
            limit,
        }
    }

    /// Counts a new connection of `peer`, or `None` when the peer already
    /// holds its share. The count goes down when the guard is dropped.
    pub fn open(&self, peer: IpAddr) -> Option<PeerConnection> {
        let key = PeerKey::of(peer);
        if self.limit > 0 {
            let mut count = self.open.entry(key).or_insert(0);
            if *count >= self.limit {
                return None;
            }
            *count += 1;
        }
        Some(PeerConnection {
            shares: self.clone(),
            key,
        })
    }

    /// Peers with at least one open connection (tests, gauges).
    pub fn peers(&self) -> usize {
        self.open.len()
    }
}

/// One counted connection; dropping it gives the place back.
pub struct PeerConnection {
    shares: ConnectionShares,
    key: PeerKey,
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        if self.shares.limit == 0 {
            return;
        }
        // Remove the entry with its last connection, so that the map holds
        // only peers that are connected now.
        self.shares.open.remove_if_mut(&self.key, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            PeerKey::of(ip("2001:db8:1:2:aaaa::1")),
            PeerKey::of(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            PeerKey::of(ip("2001:db8:1:2::1")),
            PeerKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            PeerKey::of(ip("::ffff:192.0.2.7")),
            PeerKey::of(ip("192.0.2.7"))
        );
        assert_ne!(PeerKey::of(ip("192.0.2.7")), PeerKey::of(ip("192.0.2.8")));
    }

    #[test]
    fn a_peer_gets_its_share_and_no_more_and_others_are_unaffected() {
        let shares = ConnectionShares::new(2);
        let a = [shares.open(ip("10.0.0.1")), shares.open(ip("10.0.0.1"))];
        assert!(a.iter().all(Option::is_some));
        assert!(shares.open(ip("10.0.0.1")).is_none(), "third from one peer");
        let b = shares.open(ip("10.0.0.2"));
        assert!(b.is_some(), "another peer has its own share");
        drop(a);
        assert_eq!(shares.peers(), 1, "a peer with no connection is forgotten");
        assert!(shares.open(ip("10.0.0.1")).is_some(), "places come back");
    }

    #[test]
    fn zero_is_no_limit() {
        let shares = ConnectionShares::new(0);
        let held: Vec<_> = (0..1000).map(|_| shares.open(ip("10.0.0.1"))).collect();
        assert!(held.iter().all(Option::is_some));
        assert_eq!(shares.peers(), 0, "nothing is counted");
    }
}
