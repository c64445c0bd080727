//! Batch generation: realistic events, deterministic for a seed, cheap per
//! request.
//!
//! At start-up [`Generator::new`] draws a pool of batch templates (meta,
//! events, IPs, padding) from the seed. A request `n` takes template
//! `n % pool` and only stamps unique event ids (`<seed>-<n>-<i>`) into it, so
//! building a request is a few memory copies and integer formats; the
//! load generator's CPU goes to sending, not to making data.
//!
//! The HTTP body is `multipart/form-data` with a fixed [`BOUNDARY`] and one
//! part named `batch` holding the document
//! `{"meta":{...},"data":[{event},...]}`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::Bytes;

use crate::config::GenConfig;
use crate::rng::SplitMix64;

/// The boundary as a literal, for `concat!`.
macro_rules! boundary {
    () => {
        "venus-loadtest-7d1c3e9b5a2f4068"
    };
}

/// The multipart boundary of every request body. It cannot occur in the
/// generated JSON (which never contains `--venus-loadtest`).
pub const BOUNDARY: &str = boundary!();

/// The `Content-Type` header that goes with [`Batch::multipart_body`].
pub const CONTENT_TYPE: &str = concat!("multipart/form-data; boundary=", boundary!());

/// The head of the `batch` part, up to its content.
const MULTIPART_HEAD: &str = concat!(
    "--",
    boundary!(),
    "\r\nContent-Disposition: form-data; name=\"batch\"; filename=\"batch.json\"\r\n",
    "Content-Type: application/json\r\n\r\n"
);

/// The end of the document and of the multipart body.
const TRAILER: &str = concat!("]}\r\n--", boundary!(), "--\r\n");

/// The client address the gateway sees for events without an `ip` (the load
/// generator talks to it over loopback).
pub const CLIENT_IP: &str = "127.0.0.1";

/// What the gateway should answer for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A valid event: part code 0 (or 1004 when Kafka fails).
    Accepted,
    /// A valid event whose `ip` is not an address: part code 1002.
    InvalidIp,
    /// An event that breaks a validation rule: part code 1001.
    Invalid,
}

impl Expect {
    /// Whether `code` is a reasonable answer for this event. 1004 (Kafka did
    /// not acknowledge) is reasonable for a valid event, 1003 is not.
    pub fn allows(self, code: u16) -> bool {
        match self {
            Expect::Accepted => code == 0 || code == 1004,
            Expect::InvalidIp => code == 1002,
            Expect::Invalid => code == 1001,
        }
    }
}

/// The kind of `ip` an event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpKind {
    PublicV4,
    PublicV6,
    Private,
    Invalid,
    Absent,
}

/// One event of a template.
#[derive(Debug, Clone)]
struct EventTemplate {
    /// Whether the event starts with a string `id` that is stamped per
    /// request: its JSON is `{"id":"<id>` followed by `rest`. Otherwise
    /// `rest` is the whole event.
    stamped: bool,
    rest: Vec<u8>,
    expect: Expect,
    /// For an event the gateway accepts: the `ip` its Kafka message carries
    /// (the event's address in canonical form, or the client's).
    message_ip: Option<String>,
}

/// A pre-generated batch: everything but the event ids.
#[derive(Debug, Clone)]
struct Template {
    category: usize,
    /// The multipart head and the document up to the first event.
    head: Vec<u8>,
    /// The `meta` object as sent.
    meta: Vec<u8>,
    events: Vec<EventTemplate>,
    /// Bytes of the body without ids.
    size_without_ids: usize,
}

/// Makes the batches of a run; cheap to share between workers.
#[derive(Debug, Clone)]
pub struct Generator {
    seed: u64,
    categories: Vec<String>,
    templates: Vec<Template>,
}

impl Generator {
    /// Draws the template pool from `config.seed`. Event timestamps are a
    /// little before `now_ms` (pass a constant for byte-exact output).
    pub fn new(config: &GenConfig, now_ms: u64) -> Self {
        let mut rng = SplitMix64::new(config.seed);
        let templates = (0..config.pool)
            .map(|index| make_template(config, index, now_ms, &mut rng))
            .collect();
        Self {
            seed: config.seed,
            categories: config.categories.clone(),
            templates,
        }
    }

    /// The batch of request number `request`.
    pub fn batch(&self, request: u64) -> Batch<'_> {
        let template = &self.templates[(request % self.templates.len() as u64) as usize];
        Batch {
            generator: self,
            template,
            request,
        }
    }

    /// The categories, in the order [`Batch::category_index`] refers to.
    pub fn categories(&self) -> &[String] {
        &self.categories
    }
}

/// One request's batch: a template plus the request number.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    generator: &'a Generator,
    template: &'a Template,
    request: u64,
}

impl<'a> Batch<'a> {
    /// The request number.
    pub fn request(&self) -> u64 {
        self.request
    }

    /// The batch's `meta.category`.
    pub fn category(&self) -> &'a str {
        &self.generator.categories[self.template.category]
    }

    /// Index of the category in [`Generator::categories`].
    pub fn category_index(&self) -> usize {
        self.template.category
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.template.events.len()
    }

    /// Whether the batch has no event (never true for a generated batch).
    pub fn is_empty(&self) -> bool {
        self.template.events.is_empty()
    }

    /// The `meta` object as sent.
    pub fn meta(&self) -> &'a [u8] {
        &self.template.meta
    }

    /// What the gateway should answer for each event, in order.
    pub fn expectations(&self) -> impl Iterator<Item = Expect> + 'a {
        self.template.events.iter().map(|e| e.expect)
    }

    /// The id stamped into event `index` (`<seed>-<request>-<index>`).
    pub fn event_id(&self, index: usize) -> String {
        format!("{}-{}-{}", self.generator.seed, self.request, index)
    }

    /// Whether `text` is the id of event `index`, without building it: the
    /// check runs for every part of every answer, beside the gateway on the
    /// same cores.
    pub fn is_event_id(&self, index: usize, text: &str) -> bool {
        let mut number = itoa::Buffer::new();
        let Some(rest) = text.strip_prefix(number.format(self.generator.seed)) else {
            return false;
        };
        let Some(rest) = rest.strip_prefix('-') else {
            return false;
        };
        let Some(rest) = rest.strip_prefix(number.format(self.request)) else {
            return false;
        };
        rest.strip_prefix('-') == Some(number.format(index))
    }

    /// Appends event `index`'s JSON to `out`.
    pub fn write_event(&self, index: usize, out: &mut Vec<u8>) {
        let event = &self.template.events[index];
        if event.stamped {
            out.extend_from_slice(b"{\"id\":\"");
            let mut number = itoa::Buffer::new();
            out.extend_from_slice(number.format(self.generator.seed).as_bytes());
            out.push(b'-');
            out.extend_from_slice(number.format(self.request).as_bytes());
            out.push(b'-');
            out.extend_from_slice(number.format(index).as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(&event.rest);
    }

    /// The events the gateway would accept, as `(index, ip of the message)`.
    pub fn accepted_events(&self) -> impl Iterator<Item = (usize, &'a str)> + 'a {
        self.template
            .events
            .iter()
            .enumerate()
            .filter_map(|(index, e)| e.message_ip.as_deref().map(|ip| (index, ip)))
    }

    /// The whole `multipart/form-data` request body (see [`CONTENT_TYPE`]).
    pub fn multipart_body(&self) -> Bytes {
        let events = self.template.events.len();
        // An id is at most 3 numbers of 20 digits and 2 dashes.
        let mut out = Vec::with_capacity(self.template.size_without_ids + events * 40);
        out.extend_from_slice(&self.template.head);
        for index in 0..events {
            if index > 0 {
                out.push(b',');
            }
            self.write_event(index, &mut out);
        }
        out.extend_from_slice(TRAILER.as_bytes());
        Bytes::from(out)
    }
}

/// Appends `text` as a JSON string.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

const PAGES: &[&str] = &[
    "/",
    "/search",
    "/products",
    "/products/item",
    "/cart",
    "/checkout",
    "/account/orders",
    "/blog/release-notes",
];
const NAMES: &[&str] = &[
    "screen_viewed",
    "button_clicked",
    "search_submitted",
    "item_added_to_cart",
    "checkout_started",
    "video_played",
];
const BROWSERS: &[&str] = &["Chrome", "Firefox", "Safari", "Edge", "Samsung Internet"];
const SYSTEMS: &[&str] = &[
    "Android 14",
    "iOS 17.4",
    "Windows 11",
    "macOS 14.4",
    "Linux",
];
const SCREENS: &[&str] = &["1920x1080", "1366x768", "390x844", "412x915", "2560x1440"];
const LANGUAGES: &[&str] = &["en-US", "de-DE", "fr-FR", "pt-BR", "ja-JP", "es-ES"];
const WORDS: &[&str] = &[
    "summer",
    "sale",
    "blue",
    "running",
    "shoes",
    "wireless",
    "headphones",
    "kitchen",
    "coffee",
    "grinder",
    "organic",
    "tea",
    "gift",
    "card",
    "winter",
    "jacket",
    "kids",
    "bike",
    "helmet",
    "garden",
    "hose",
    "smart",
    "watch",
    "strap",
    "travel",
    "backpack",
    "desk",
    "lamp",
    "yoga",
    "mat",
    "water",
    "bottle",
];
const INVALID_IPS: &[&str] = &[
    "not-an-ip",
    "256.12.4.1",
    "10.0.0",
    "1.2.3.4.5",
    "2001:db8::g1",
    "localhost",
    "192.168.1.1/24",
    "unknown",
];

/// Draws the kind of `ip` of one event from the mix.
pub fn draw_ip_kind(cumulative: &[f64; 5], rng: &mut SplitMix64) -> IpKind {
    let x = rng.next_f64();
    const KINDS: [IpKind; 5] = [
        IpKind::PublicV4,
        IpKind::PublicV6,
        IpKind::Private,
        IpKind::Invalid,
        IpKind::Absent,
    ];
    KINDS
        .into_iter()
        .zip(cumulative)
        .find(|(_, limit)| x < **limit)
        .map_or(IpKind::Absent, |(kind, _)| kind)
}

/// Whether an IPv4 address is in a private, shared, loopback, link-local,
/// documentation, benchmark or multicast/reserved range.
pub fn is_special_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_documentation()
        || ip.is_unspecified()
        || a == 0
        || a >= 224
        || (a == 100 && (64..=127).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19))
}

/// A routable IPv4 address.
pub fn public_v4(rng: &mut SplitMix64) -> Ipv4Addr {
    loop {
        let ip = Ipv4Addr::new(
            rng.range(1, 223) as u8,
            rng.below(256) as u8,
            rng.below(256) as u8,
            rng.range(1, 254) as u8,
        );
        if !is_special_v4(ip) {
            return ip;
        }
    }
}

/// A global unicast IPv6 address in a range the RIRs actually allocate.
pub fn public_v6(rng: &mut SplitMix64) -> Ipv6Addr {
    const REGIONS: [u16; 5] = [0x2400, 0x2600, 0x2800, 0x2a00, 0x2c00];
    let first = rng.pick(&REGIONS) + rng.below(16) as u16;
    let mut segments = [0u16; 8];
    segments[0] = first;
    for segment in &mut segments[1..4] {
        *segment = rng.below(0x1_0000) as u16;
    }
    if rng.chance(0.3) {
        // A server-like interface id: ::1, ::53 and the like.
        segments[7] = rng.range(1, 0xff) as u16;
    } else {
        for segment in &mut segments[4..] {
            *segment = rng.below(0x1_0000) as u16;
        }
    }
    Ipv6Addr::from(segments)
}

/// A private IPv4 address (10/8, 172.16/12 or 192.168/16).
pub fn private_v4(rng: &mut SplitMix64) -> Ipv4Addr {
    let low = rng.range(1, 254) as u8;
    match rng.below(20) {
        0..=9 => Ipv4Addr::new(10, rng.below(256) as u8, rng.below(256) as u8, low),
        10..=16 => Ipv4Addr::new(192, 168, rng.below(256) as u8, low),
        _ => Ipv4Addr::new(172, rng.range(16, 31) as u8, rng.below(256) as u8, low),
    }
}

/// A string the gateway must refuse as an address.
pub fn invalid_ip(rng: &mut SplitMix64) -> &'static str {
    rng.pick(INVALID_IPS)
}

/// The `ip` text of one event, by kind (`None` for an absent one).
fn draw_ip(kind: IpKind, rng: &mut SplitMix64) -> Option<String> {
    match kind {
        IpKind::PublicV4 => Some(public_v4(rng).to_string()),
        IpKind::PublicV6 => Some(public_v6(rng).to_string()),
        IpKind::Private => Some(private_v4(rng).to_string()),
        IpKind::Invalid => Some(invalid_ip(rng).to_owned()),
        IpKind::Absent => None,
    }
}

/// How an invalid event breaks the rules.
#[derive(Debug, Clone, Copy)]
enum Breakage {
    MissingId,
    NumericId,
    EmptyId,
    NegativeTimestamp,
}

fn make_template(config: &GenConfig, index: usize, now_ms: u64, rng: &mut SplitMix64) -> Template {
    let category = index % config.categories.len();
    let app = rng.below(config.app_ids as u64) + 1;

    let mut meta = Vec::with_capacity(128);
    meta.extend_from_slice(b"{\"app_id\":");
    push_json_str(&mut meta, &format!("com.example.app-{app}"));
    meta.extend_from_slice(b",\"category\":");
    push_json_str(&mut meta, &config.categories[category]);
    meta.extend_from_slice(b",\"sdk_version\":\"3.");
    meta.extend_from_slice(rng.below(12).to_string().as_bytes());
    meta.extend_from_slice(b".0\",\"platform\":");
    push_json_str(&mut meta, rng.pick(&["web", "android", "ios"]));
    meta.push(b'}');

    let mut head = MULTIPART_HEAD.as_bytes().to_vec();
    head.extend_from_slice(b"{\"meta\":");
    head.extend_from_slice(&meta);
    head.extend_from_slice(b",\"data\":[");

    // Events of one batch share a user and a session, like a real client's.
    let user = rng.below(1_000_000);
    let session = rng.next_u64();
    let cumulative = config.ip_mix.cumulative();
    // The length of a typical stamped id, for padding events to size.
    let typical_id_len = format!("{}-{}-{}", config.seed, 100_000, 10).len();

    let events: Vec<EventTemplate> = (0..config.events_per_batch)
        .map(|_| {
            make_event(
                config,
                now_ms,
                user,
                session,
                &cumulative,
                typical_id_len,
                rng,
            )
        })
        .collect();
    let size_without_ids =
        head.len() + events.iter().map(|e| e.rest.len() + 10).sum::<usize>() + TRAILER.len();
    Template {
        category,
        head,
        meta,
        events,
        size_without_ids,
    }
}

fn make_event(
    config: &GenConfig,
    now_ms: u64,
    user: u64,
    session: u64,
    cumulative: &[f64; 5],
    typical_id_len: usize,
    rng: &mut SplitMix64,
) -> EventTemplate {
    let breakage = rng.chance(config.invalid_fraction).then(|| {
        rng.pick(&[
            Breakage::MissingId,
            Breakage::NumericId,
            Breakage::EmptyId,
            Breakage::NegativeTimestamp,
        ])
    });
    let ip_kind = draw_ip_kind(cumulative, rng);
    let ip = draw_ip(ip_kind, rng);

    // `rest` is what follows `{"id":"<id>` for a stamped event, or the whole
    // event otherwise.
    let mut rest = Vec::with_capacity(config.event_size + 64);
    let stamped = match breakage {
        None | Some(Breakage::NegativeTimestamp) => true,
        Some(Breakage::MissingId) => {
            rest.extend_from_slice(b"{\"event_id\":\"lost\"");
            false
        }
        Some(Breakage::NumericId) => {
            rest.extend_from_slice(b"{\"id\":");
            rest.extend_from_slice(rng.below(1 << 40).to_string().as_bytes());
            false
        }
        Some(Breakage::EmptyId) => {
            rest.extend_from_slice(b"{\"id\":\"\"");
            false
        }
    };
    rest.extend_from_slice(b",\"timestamp\":");
    if matches!(breakage, Some(Breakage::NegativeTimestamp)) {
        rest.push(b'-');
    }
    // Up to ten minutes old, as buffered client events are.
    let timestamp = now_ms.saturating_sub(rng.below(600_000));
    rest.extend_from_slice(timestamp.to_string().as_bytes());
    if let Some(ip) = &ip {
        rest.extend_from_slice(b",\"ip\":");
        push_json_str(&mut rest, ip);
    }
    rest.extend_from_slice(b",\"name\":");
    push_json_str(&mut rest, rng.pick(NAMES));
    rest.extend_from_slice(b",\"user_id\":\"u_");
    rest.extend_from_slice(user.to_string().as_bytes());
    rest.extend_from_slice(b"\",\"session_id\":\"");
    rest.extend_from_slice(format!("{session:016x}").as_bytes());
    rest.extend_from_slice(b"\",\"page\":");
    push_json_str(&mut rest, rng.pick(PAGES));
    rest.extend_from_slice(b",\"duration_ms\":");
    rest.extend_from_slice(rng.below(30_000).to_string().as_bytes());
    rest.extend_from_slice(b",\"props\":{\"browser\":");
    push_json_str(&mut rest, rng.pick(BROWSERS));
    rest.extend_from_slice(b",\"os\":");
    push_json_str(&mut rest, rng.pick(SYSTEMS));
    rest.extend_from_slice(b",\"screen\":");
    push_json_str(&mut rest, rng.pick(SCREENS));
    rest.extend_from_slice(b",\"lang\":");
    push_json_str(&mut rest, rng.pick(LANGUAGES));
    rest.extend_from_slice(b",\"query\":\"");
    // Pad with words to the wanted size; the closing `"}}` is 3 bytes.
    let stamped_len = if stamped { 8 + typical_id_len } else { 0 };
    let target = config.event_size.saturating_sub(stamped_len + 3);
    let mut first = true;
    while rest.len() < target || first {
        if !first {
            rest.push(b' ');
        }
        first = false;
        rest.extend_from_slice(rng.pick(WORDS).as_bytes());
    }
    rest.extend_from_slice(b"\"}}");

    let expect = match (breakage, ip_kind) {
        (Some(_), _) => Expect::Invalid,
        (None, IpKind::Invalid) => Expect::InvalidIp,
        (None, _) => Expect::Accepted,
    };
    let message_ip = (expect == Expect::Accepted).then(|| match &ip {
        // The gateway writes the address in canonical form.
        Some(text) => text
            .parse::<IpAddr>()
            .map(|ip| ip.to_canonical().to_string())
            .unwrap_or_else(|_| text.clone()),
        None => CLIENT_IP.to_owned(),
    });
    EventTemplate {
        stamped,
        rest,
        expect,
        message_ip,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::config::IpMix;

    const NOW: u64 = 1_790_000_000_000;

    fn bodies(config: &GenConfig, requests: u64) -> Vec<Bytes> {
        let generator = Generator::new(config, NOW);
        (0..requests)
            .map(|n| generator.batch(n).multipart_body())
            .collect()
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let config = GenConfig {
            invalid_fraction: 0.1,
            ..GenConfig::default()
        };
        assert_eq!(bodies(&config, 200), bodies(&config, 200));
        let other = GenConfig {
            seed: 2,
            ..config.clone()
        };
        assert_ne!(bodies(&config, 3), bodies(&other, 3));
    }

    /// Splits a multipart body into its parts' (headers, content).
    fn parse_multipart(body: &[u8], boundary: &str) -> Vec<(String, Vec<u8>)> {
        let delimiter = format!("--{boundary}");
        let text = std::str::from_utf8(body).expect("body is UTF-8");
        assert!(
            text.starts_with(&delimiter),
            "body starts with the boundary"
        );
        assert!(
            text.ends_with(&format!("{delimiter}--\r\n")),
            "body ends with the closing boundary"
        );
        let mut parts = Vec::new();
        for chunk in text.split(&delimiter).skip(1) {
            if chunk.starts_with("--") {
                break;
            }
            let chunk = chunk.strip_prefix("\r\n").expect("CRLF after boundary");
            let chunk = chunk.strip_suffix("\r\n").expect("CRLF before boundary");
            let (headers, content) = chunk.split_once("\r\n\r\n").expect("blank line");
            parts.push((headers.to_owned(), content.as_bytes().to_vec()));
        }
        parts
    }

    #[test]
    fn the_body_is_one_batch_part_with_valid_json() {
        let config = GenConfig {
            events_per_batch: 37,
            invalid_fraction: 0.0,
            ..GenConfig::default()
        };
        let generator = Generator::new(&config, NOW);
        let boundary = CONTENT_TYPE
            .split_once("boundary=")
            .map(|(_, b)| b)
            .unwrap();
        assert_eq!(boundary, BOUNDARY);
        let mut all_ids = HashSet::new();
        for request in [0u64, 1, 63, 64, 12_345] {
            let batch = generator.batch(request);
            let body = batch.multipart_body();
            let parts = parse_multipart(&body, boundary);
            assert_eq!(parts.len(), 1);
            let (headers, content) = &parts[0];
            assert!(
                headers.contains("Content-Disposition: form-data; name=\"batch\""),
                "{headers}"
            );
            let document: serde_json::Value = serde_json::from_slice(content).unwrap();
            let meta = &document["meta"];
            assert_eq!(meta["category"], batch.category());
            let app_id = meta["app_id"].as_str().unwrap();
            assert!(app_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
            let events = document["data"].as_array().unwrap();
            assert_eq!(events.len(), 37);
            let mut ids = HashSet::new();
            for (index, event) in events.iter().enumerate() {
                let id = event["id"].as_str().unwrap();
                assert_eq!(id, batch.event_id(index));
                assert!(batch.is_event_id(index, id));
                assert!(!batch.is_event_id(index + 1, id));
                assert!(!batch.is_event_id(index, &format!("{id}0")));
                assert!(!batch.is_event_id(index, &id[..id.len() - 1]));
                assert!(ids.insert(id.to_owned()), "duplicate id {id}");
                assert!(event["timestamp"].as_u64().is_some());
            }
            all_ids.extend(ids);
        }
        assert_eq!(all_ids.len(), 5 * 37, "ids are unique across requests");
    }

    #[test]
    fn events_are_about_the_requested_size() {
        for size in [300usize, 1000, 4000] {
            let config = GenConfig {
                event_size: size,
                ..GenConfig::default()
            };
            let generator = Generator::new(&config, NOW);
            let batch = generator.batch(7);
            for index in 0..batch.len() {
                let mut event = Vec::new();
                batch.write_event(index, &mut event);
                let len = event.len() as f64;
                assert!(
                    (len - size as f64).abs() / (size as f64) < 0.1,
                    "event of {len} bytes for size {size}"
                );
                serde_json::from_slice::<serde_json::Value>(&event).unwrap();
            }
        }
    }

    #[test]
    fn ip_mix_fractions_hold_over_many_draws() {
        let mix = IpMix::parse("0.6,0.2,0.15,0.05").unwrap();
        let cumulative = mix.cumulative();
        let mut rng = SplitMix64::new(99);
        let draws = 200_000;
        let mut counts = [0usize; 5];
        for _ in 0..draws {
            let kind = draw_ip_kind(&cumulative, &mut rng);
            let slot = kind as usize;
            counts[slot] += 1;
            // The address of each kind is what it claims to be.
            match draw_ip(kind, &mut rng).map(|text| text.parse::<IpAddr>()) {
                Some(Ok(IpAddr::V4(ip))) if kind == IpKind::PublicV4 => {
                    assert!(!is_special_v4(ip), "{ip}")
                }
                Some(Ok(IpAddr::V6(ip))) if kind == IpKind::PublicV6 => {
                    assert!((0x2000..0x4000).contains(&ip.segments()[0]), "{ip}")
                }
                Some(Ok(IpAddr::V4(ip))) if kind == IpKind::Private => {
                    assert!(ip.is_private(), "{ip}")
                }
                Some(Err(_)) if kind == IpKind::Invalid => {}
                None if kind == IpKind::Absent => {}
                other => panic!("{kind:?} gave {other:?}"),
            }
        }
        let expected = [0.6, 0.2, 0.15, 0.05, 0.0];
        for (count, expected) in counts.iter().zip(expected) {
            let share = *count as f64 / draws as f64;
            assert!(
                (share - expected).abs() < 0.01,
                "share {share} for {expected}"
            );
        }
    }

    #[test]
    fn expectations_follow_the_generated_events() {
        let config = GenConfig {
            events_per_batch: 200,
            invalid_fraction: 0.2,
            ..GenConfig::default()
        };
        let generator = Generator::new(&config, NOW);
        let batch = generator.batch(3);
        let mut counts = [0usize; 3];
        let accepted: Vec<usize> = batch.accepted_events().map(|(i, _)| i).collect();
        for (index, expect) in batch.expectations().enumerate() {
            let mut event = Vec::new();
            batch.write_event(index, &mut event);
            let value: serde_json::Value = serde_json::from_slice(&event).unwrap();
            let has_string_id = value["id"].as_str().is_some_and(|id| !id.is_empty());
            let ip_ok = value
                .get("ip")
                .is_none_or(|ip| ip.as_str().unwrap().parse::<IpAddr>().is_ok());
            let ts_ok = value["timestamp"].as_i64().unwrap() >= 0;
            match expect {
                Expect::Accepted => {
                    counts[0] += 1;
                    assert!(has_string_id && ip_ok && ts_ok, "{value}");
                    assert!(accepted.contains(&index));
                }
                Expect::InvalidIp => {
                    counts[1] += 1;
                    assert!(has_string_id && !ip_ok && ts_ok, "{value}");
                }
                Expect::Invalid => {
                    counts[2] += 1;
                    assert!(!has_string_id || !ts_ok, "{value}");
                }
            }
        }
        assert_eq!(accepted.len(), counts[0]);
        assert!(counts.iter().all(|c| *c > 0), "{counts:?}");
    }
}
