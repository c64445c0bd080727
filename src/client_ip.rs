//! The client's address behind proxies, without letting the client choose
//! it.
//!
//! Forwarding headers are written by whoever sends the request, so they are
//! believed only from a **trusted proxy** (`server.trusted_proxies`, CIDRs;
//! none by default, and then only the TCP peer counts). From a trusted peer:
//!
//! 1. `server.client_ip_header` (e.g. `CF-Connecting-IP`, `True-Client-IP`),
//!    when set and holding an address, is the client;
//! 2. otherwise the hops of the one forwarding header the proxies write
//!    (`server.forwarding_header`: `X-Forwarded-For`, or RFC 7239
//!    `Forwarded: for=`) are walked from the right, the end the nearest proxy
//!    wrote. Trusted addresses are proxies and are passed; the first address
//!    that is not trusted is the client. Every entry to its left was written
//!    by the client or by proxies nobody vouches for.
//!
//! Which header is walked is a setting, never "whichever is present": proxies
//! that append to `X-Forwarded-For` pass a client's own `Forwarded` through
//! untouched, so preferring `Forwarded` when present would let the client
//! pick its address.
//!
//! The walk stops at an entry that is no address (garbage, `unknown`, an
//! obfuscated `_identifier`): what lies left of it cannot be trusted, so the
//! last good hop is used. A bad header never fails an upload. IPv4-mapped
//! IPv6 addresses count as the IPv4 address.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, HeaderName};
use ipnet::IpNet;

pub struct ClientIpResolver {
    trusted: Vec<IpNet>,
    header: Option<HeaderName>,
    forwarding: Forwarding,
}

/// The forwarding header the trusted proxies write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    XForwardedFor,
    Forwarded,
}

impl Forwarding {
    pub fn parse(name: &str) -> Result<Self, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(Self::XForwardedFor),
            "forwarded" => Ok(Self::Forwarded),
            other => Err(format!(
                "forwarding header {other:?} is not x-forwarded-for or forwarded"
            )),
        }
    }
}

static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

impl ClientIpResolver {
    /// From `server.trusted_proxies` and `server.client_ip_header`; the error
    /// names what cannot be parsed.
    pub fn new(
        trusted_proxies: &[String],
        client_ip_header: &str,
        forwarding_header: &str,
    ) -> Result<Self, String> {
        let trusted = trusted_proxies
            .iter()
            .map(|cidr| {
                let cidr = cidr.trim();
                cidr.parse::<IpNet>()
                    .or_else(|_| cidr.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| format!("{cidr:?} is not a CIDR or an address"))
            })
            .collect::<Result<_, _>>()?;
        let header = match client_ip_header.trim() {
            "" => None,
            name => Some(HeaderName::try_from(name).map_err(|e| format!("{name:?}: {e}"))?),
        };
        Ok(Self {
            trusted,
            header,
            forwarding: Forwarding::parse(forwarding_header)?,
        })
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub fn resolve(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        if let Some(name) = &self.header {
            let named = headers
                .get_all(name)
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_hop(v.trim()));
            if let Some(ip) = named {
                return ip.to_canonical();
            }
        }
        let mut last_good = peer;
        let hops = match self.forwarding {
            Forwarding::Forwarded => hops_of(headers, &FORWARDED, forwarded_for),
            Forwarding::XForwardedFor => {
                hops_of(headers, &X_FORWARDED_FOR, |entry| Some(entry.trim()))
            }
        };
        for hop in hops.iter().rev() {
            let Some(ip) = hop.and_then(parse_hop).map(|ip| ip.to_canonical()) else {
                break;
            };
            if !self.trusts(ip) {
                return ip;
            }
            last_good = ip;
        }
        last_good
    }
}

/// The entries of every `name` header, in order; `pick` turns one
/// comma-separated element into its address text (`None`: unreadable).
fn hops_of<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
    pick: fn(&'h str) -> Option<&'h str>,
) -> Vec<Option<&'h str>> {
    let mut hops = Vec::new();
    for value in headers.get_all(name) {
        match value.to_str() {
            Ok(text) => hops.extend(split_elements(text).map(pick)),
            // Not text: nothing left of here can be read.
            Err(_) => hops.push(None),
        }
    }
    hops
}

/// Splits at commas outside quoted strings.
fn split_elements(text: &str) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    let mut parts = Vec::new();
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter()
}

/// The `for=` value of one `Forwarded` element, unquoted.
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim().eq_ignore_ascii_case("for").then(|| {
            let value = value.trim();
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value)
        })
    })
}

/// An address from a hop: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:443`. Anything else (`unknown`,
/// `_hidden`, garbage) is none.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(socket) = hop.parse::<SocketAddr>() {
        return Some(socket.ip());
    }
    hop.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse::<IpAddr>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn resolver(trusted: &[&str], header: &str) -> ClientIpResolver {
        resolver_of(trusted, header, "x-forwarded-for")
    }

    fn resolver_of(trusted: &[&str], header: &str, forwarding: &str) -> ClientIpResolver {
        let trusted: Vec<String> = trusted.iter().map(|s| s.to_string()).collect();
        ClientIpResolver::new(&trusted, header, forwarding).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::try_from(*name).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    const CLIENT: &str = "81.2.69.142";

    #[test]
    fn an_untrusted_peer_cannot_move_the_location() {
        let peer = ip("203.0.113.9");
        for forwarding in ["x-forwarded-for", "forwarded"] {
            let r = resolver_of(&["10.0.0.0/8"], "CF-Connecting-IP", forwarding);
            for (name, value) in [
                ("x-forwarded-for", CLIENT),
                ("forwarded", "for=81.2.69.142"),
                ("cf-connecting-ip", CLIENT),
            ] {
                assert_eq!(r.resolve(&headers(&[(name, value)]), peer), peer, "{name}");
            }
        }
        // No trusted proxies at all (the default): only the peer counts.
        let r = resolver(&[], "");
        let h = headers(&[("x-forwarded-for", CLIENT)]);
        assert_eq!(r.resolve(&h, ip("10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn a_trusted_chain_of_two_proxies_resolves_to_the_real_client() {
        // client -> 10.1.0.5 (edge) -> 10.2.0.7 (internal) -> gateway
        let r = resolver(&["10.0.0.0/8"], "");
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 81.2.69.142, 10.1.0.5")]);
        assert_eq!(
            r.resolve(&h, ip("10.2.0.7")),
            ip(CLIENT),
            "6.6.6.6 was the client's own claim"
        );
        // The same hops over several header lines.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "81.2.69.142, 10.1.0.5"),
        ]);
        assert_eq!(r.resolve(&h, ip("10.2.0.7")), ip(CLIENT));
    }

    #[test]
    fn forwarded_is_understood_with_quotes_brackets_and_ports() {
        let r = resolver_of(&["10.0.0.0/8", "2001:db8:ffff::/48"], "", "forwarded");
        let peer = ip("10.2.0.7");
        for (value, expected) in [
            ("for=81.2.69.142", CLIENT),
            (r#"for="81.2.69.142:47011";proto=https"#, CLIENT),
            (r#"For="[2a02:d280::1]:4711", for=10.1.0.5"#, "2a02:d280::1"),
            (
                r#"for="[2001:db8:ffff::9]";by=x, for=10.1.0.5"#,
                "2001:db8:ffff::9",
            ),
            (
                r#"for=6.6.6.6, for="[2a02:d280::1]", for=10.1.0.5"#,
                "2a02:d280::1",
            ),
        ] {
            assert_eq!(
                r.resolve(&headers(&[("forwarded", value)]), peer),
                ip(expected),
                "{value}"
            );
        }
        // Only the configured header is walked: a client's own
        // X-Forwarded-For is ignored here, and the other way round below.
        let h = headers(&[
            ("forwarded", "for=81.2.69.142"),
            ("x-forwarded-for", "6.6.6.6"),
        ]);
        assert_eq!(r.resolve(&h, peer), ip(CLIENT));
    }

    #[test]
    fn the_walk_stops_at_garbage_unknown_and_obfuscated_hops() {
        let r = resolver(&["10.0.0.0/8"], "");
        let forwarded = resolver_of(&["10.0.0.0/8"], "", "forwarded");
        let peer = ip("10.2.0.7");
        for (name, value) in [
            ("x-forwarded-for", "81.2.69.142, nonsense, 10.1.0.5"),
            ("forwarded", "for=81.2.69.142, for=unknown, for=10.1.0.5"),
            ("forwarded", "for=81.2.69.142, for=_hidden, for=10.1.0.5"),
            ("forwarded", "for=81.2.69.142, proto=http, for=10.1.0.5"),
        ] {
            // The last good hop: the trusted proxy that wrote the bad entry.
            let r = if name == "forwarded" { &forwarded } else { &r };
            assert_eq!(
                r.resolve(&headers(&[(name, value)]), peer),
                ip("10.1.0.5"),
                "{value}"
            );
        }
        // Garbage right away: the peer.
        let h = headers(&[("x-forwarded-for", "not an address")]);
        assert_eq!(r.resolve(&h, peer), peer);
        // Only trusted hops: the leftmost of them.
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.1.0.5")]);
        assert_eq!(r.resolve(&h, peer), ip("10.9.9.9"));
    }

    #[test]
    fn a_cdn_header_is_honoured_from_trusted_peers_only_and_falls_back_to_the_walk() {
        let r = resolver(&["173.245.48.0/20"], "CF-Connecting-IP");
        let cdn = ip("173.245.48.10");
        let h = headers(&[("cf-connecting-ip", CLIENT), ("x-forwarded-for", "6.6.6.6")]);
        assert_eq!(r.resolve(&h, cdn), ip(CLIENT));
        assert_eq!(r.resolve(&h, ip("198.51.100.1")), ip("198.51.100.1"));
        let h = headers(&[("cf-connecting-ip", "garbage"), ("x-forwarded-for", CLIENT)]);
        assert_eq!(r.resolve(&h, cdn), ip(CLIENT));
    }

    #[test]
    fn ipv6_peers_and_ipv4_mapped_addresses() {
        let r = resolver(&["10.0.0.0/8", "fd00::/8"], "");
        // A v4-mapped peer is its IPv4 address, and trusted as such.
        let h = headers(&[("x-forwarded-for", CLIENT)]);
        assert_eq!(r.resolve(&h, ip("::ffff:10.0.0.1")), ip(CLIENT));
        // An IPv6 proxy, an IPv4-mapped client in the header.
        let h = headers(&[("x-forwarded-for", "::ffff:81.2.69.142")]);
        assert_eq!(r.resolve(&h, ip("fd00::1")), ip(CLIENT));
        // An untrusted IPv6 peer: itself.
        assert_eq!(r.resolve(&h, ip("2a02:d280::1")), ip("2a02:d280::1"));
    }

    #[test]
    fn bad_settings_are_named() {
        let err = ClientIpResolver::new(&["10.0.0.0/33".into()], "", "x-forwarded-for")
            .err()
            .unwrap();
        assert!(err.contains("10.0.0.0/33"), "{err}");
        assert!(ClientIpResolver::new(&["10.0.0.1".into()], "", "forwarded").is_ok());
        assert!(ClientIpResolver::new(&[], "bad header", "forwarded").is_err());
        assert!(ClientIpResolver::new(&[], "", "via").is_err());
    }

    #[test]
    fn a_clients_forwarded_header_is_ignored_behind_proxies_that_write_x_forwarded_for() {
        // nginx, ALB, HAProxy append to X-Forwarded-For and pass Forwarded on.
        let r = resolver(&["10.0.0.0/8"], "");
        let h = headers(&[
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "81.2.69.142, 10.1.0.5"),
        ]);
        assert_eq!(r.resolve(&h, ip("10.2.0.7")), ip(CLIENT));
        let h = headers(&[("forwarded", "for=6.6.6.6")]);
        assert_eq!(r.resolve(&h, ip("10.2.0.7")), ip("10.2.0.7"));
    }
}
