//! `geoip.residency: compact`: a GeoIP file read once into a table of
//! address ranges in the heap, and the file let go.
//!
//! **Why.** A city database is mostly its search tree, one node per bit of
//! every network's prefix: 44 of the 63 MB of the DB-IP IPv4 file, 59 of the
//! 71 MB IPv6 one. Lookups from addresses all over the internet touch most
//! of it, so a gateway that maps the files ends up with most of their pages
//! resident whichever pages it tries to keep (`cached`, `touched`:
//! docs/BENCHMARKS.md). The gateway reads three strings of a record (country,
//! region, city). Kept as what it reads, the same data is much smaller:
//! neighbouring networks with the same three strings become one range
//! (6.3 million IPv4 networks are 3.5 million ranges), a range is the
//! distance from the one before and a number for its place, and the places
//! are a table of their own (168,678 in the DB-IP IPv4 file, 127,939 in
//! the IPv6 one).
//!
//! **Layout.** The ranges of an address family, in order of their first
//! address, are cut into blocks of [`BLOCK`]:
//! * `block_starts`: the first address of each block, binary-searched;
//! * `stream`, per block: one byte `shift`, the place of its first range,
//!   then for each further range its distance from the range before in
//!   units of 2^`shift` (the largest power of two all of the block's
//!   distances are multiples of: whole /48s in most of the IPv6 space,
//!   whatever the odd /128 elsewhere), and its place; LEB128 varints;
//! * places are numbered by how many ranges they have, most first, so the
//!   common ones take one or two bytes. Place 0 is "no record": space the
//!   file has nothing for.
//!
//! A lookup is a binary search over the block starts and a scan of one
//! block. No page of it is ever read from disk, and its memory does not
//! grow with the addresses looked up. The price is paid at load: every
//! network of the file is walked once (about 2 s for the DB-IP pair on 2
//! cores, before the gateway listens, or at a reload on the
//! reload thread, while the old data keeps serving; see geoip/README.md).
//!
//! **Aliases.** A MaxMind-style IPv6 file with IPv4 inside keeps IPv4 at
//! `::/96` and points some IPv6 prefixes (`::ffff:0:0/96`, `2001::/32`,
//! `2002::/16`) at the same subtree, so an address there is answered by
//! the IPv4 address in the 32 bits after the prefix. The table finds those
//! prefixes in the file's tree and answers them the same way.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use maxminddb::{LookupResult, Reader, WithinOptions};

use super::Location;

/// Ranges per block: a lookup scans at most this many varint pairs after
/// its binary search; the index costs 20 bytes per block.
const BLOCK: usize = 32;

/// Bits of the address that pick the part of the block index a lookup
/// searches (256 KiB of index per family).
const TOP_BITS: u32 = 16;

/// One address family's ranges (see the module doc for the layout).
struct RangeTable {
    /// Ranges in all.
    len: usize,
    /// Bits of an address: 32 or 128.
    width: u32,
    /// For each value `p` of an address's top [`TOP_BITS`] bits, the first
    /// block that starts at or above `p`'s part of the space (one more
    /// entry at the end): the binary search then looks only among the
    /// blocks of one part.
    top: Box<[u32]>,
    block_starts: Box<[u128]>,
    block_offsets: Box<[u32]>,
    stream: Box<[u8]>,
}

/// The distinct (country, region, city) of a file; place `p` ≥ 1 is
/// `fields[p - 1]`, each an offset of a length-prefixed string in `text`.
struct Places {
    fields: Box<[[u32; 3]]>,
    text: Box<[u8]>,
}

/// A whole file, compact: what answers IPv4, what answers IPv6, and which
/// IPv6 prefixes stand for IPv4 addresses.
pub struct CompactFile {
    places: Places,
    v4: RangeTable,
    v6: Option<RangeTable>,
    /// `(prefix, length)`: an address under `prefix/length` is answered for
    /// the IPv4 address in the 32 bits after the prefix.
    v4_aliases: Vec<(u128, u32)>,
}

impl CompactFile {
    /// Walks every network of `reader`, the reader of `bytes`, and keeps,
    /// for each, what `locate` makes of its record (`None`: no record, as
    /// for a record that does not decode). Errors name what is wrong with
    /// the file.
    pub fn build(
        reader: &Reader<&[u8]>,
        bytes: &[u8],
        locate: impl Fn(&LookupResult<'_, &[u8]>) -> Option<Location>,
    ) -> Result<Self, String> {
        let ipv6 = reader.metadata().ip_version == 6;
        let v4_aliases = if ipv6 {
            v4_aliases(bytes, reader)?
        } else {
            Vec::new()
        };
        let mut interner = Interner::default();
        let mut families = vec![Family::V4];
        if ipv6 {
            families.push(Family::V6);
        }
        // One walk per family: the ranges, numbering places as they are
        // first seen, and how many ranges each place has.
        let mut uses = vec![0u64];
        let mut tables = Vec::with_capacity(families.len());
        for family in families {
            let mut encoder = Encoder::new(family.width());
            let walk = Walk {
                family,
                aliases_skipped: !v4_aliases.is_empty(),
            };
            for_each_range(reader, walk, &mut interner, &locate, |start, place| {
                let place = place as usize;
                if uses.len() <= place {
                    uses.resize(place + 1, 0);
                }
                uses[place] += 1;
                encoder.push(start, place as u32);
            })?;
            tables.push(encoder.finish());
        }
        // Then the places numbered by use, most used first, so the common
        // ones take the fewest bytes, and the tables written again with
        // those numbers (a pass over their bytes, not over the file).
        let mut order: Vec<u32> = (1..uses.len() as u32).collect();
        order.sort_by_key(|&p| std::cmp::Reverse(uses[p as usize]));
        let mut renumber = vec![0u32; uses.len()];
        for (rank, &place) in order.iter().enumerate() {
            renumber[place as usize] = rank as u32 + 1;
        }
        // The largest of the maps that built the tables, done with.
        interner.by_offset = Default::default();
        let mut tables: Vec<RangeTable> = tables
            .into_iter()
            .map(|t| t.renumbered(&renumber))
            .collect();
        let places = interner.finish(&order);
        let v6 = if ipv6 { tables.pop() } else { None };
        let v4 = tables.pop().expect("an IPv4 table is always built");
        Ok(Self {
            places,
            v4,
            v6,
            v4_aliases,
        })
    }

    /// Where `ip` is; `None` when the file has no record of it.
    pub fn lookup(&self, ip: IpAddr) -> Option<Location> {
        let place = match ip {
            IpAddr::V4(v4) => self.v4.place(u32::from(v4).into()),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let alias = self
                    .v4_aliases
                    .iter()
                    .find(|&&(prefix, len)| bits >> (128 - len) == prefix >> (128 - len));
                match (alias, &self.v6) {
                    (Some(&(_, len)), _) => self.v4.place((bits << len) >> 96),
                    (None, Some(table)) => table.place(bits),
                    (None, None) => 0,
                }
            }
        };
        self.places.get(place)
    }

    /// Bytes of heap the file takes (for the load's log line and tests).
    pub fn heap_bytes(&self) -> usize {
        let table = |t: &RangeTable| {
            t.top.len() * 4 + t.block_starts.len() * 16 + t.block_offsets.len() * 4 + t.stream.len()
        };
        table(&self.v4)
            + self.v6.as_ref().map_or(0, table)
            + self.places.fields.len() * 12
            + self.places.text.len()
    }

    /// Ranges in all (both families).
    pub fn ranges(&self) -> usize {
        self.v4.len + self.v6.as_ref().map_or(0, |t| t.len)
    }
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn width(self) -> u32 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }
}

/// Hashes a data offset: a 64-bit multiply folded onto itself, so both
/// halves of the product reach the bits the table picks buckets by.
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }

    fn write_u64(&mut self, value: u64) {
        let product = u128::from(self.0 ^ value) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }
}

/// Places by the data record they came from and by their strings, while a
/// file is walked.
#[derive(Default)]
struct Interner {
    /// Asked once per network (millions per file): a plain multiply hash,
    /// not SipHash, since the offsets come from the file, not a client.
    by_offset: HashMap<usize, u32, BuildHasherDefault<OffsetHasher>>,
    /// Numbered from 1 in the order first seen.
    by_location: HashMap<Location, u32>,
}

impl Interner {
    fn place<S: AsRef<[u8]>>(
        &mut self,
        result: &LookupResult<'_, S>,
        locate: &impl Fn(&LookupResult<'_, S>) -> Option<Location>,
    ) -> u32 {
        let Some(offset) = result.offset() else {
            return 0;
        };
        if let Some(&place) = self.by_offset.get(&offset) {
            return place;
        }
        let place = match locate(result) {
            None => 0,
            Some(location) => {
                let next = self.by_location.len() as u32 + 1;
                *self.by_location.entry(location).or_insert(next)
            }
        };
        self.by_offset.insert(offset, place);
        place
    }

    /// The places in `order` (old numbers; the new number of `order[i]` is
    /// `i + 1`), each string stored once.
    fn finish(self, order: &[u32]) -> Places {
        let mut list = vec![Location::default(); self.by_location.len()];
        for (location, place) in self.by_location {
            list[place as usize - 1] = location;
        }
        let mut text = Vec::new();
        let mut stored: HashMap<&str, u32> = HashMap::new();
        let mut fields = Vec::with_capacity(order.len());
        for &old in order {
            let location = &list[old as usize - 1];
            let mut field = [0u32; 3];
            for (slot, value) in
                field
                    .iter_mut()
                    .zip([&location.country, &location.region, &location.city])
            {
                *slot = *stored.entry(value.as_str()).or_insert_with(|| {
                    let at = text.len() as u32;
                    put_varint(&mut text, value.len() as u128);
                    text.extend_from_slice(value.as_bytes());
                    at
                });
            }
            fields.push(field);
        }
        Places {
            fields: fields.into(),
            text: text.into(),
        }
    }
}

impl Places {
    fn get(&self, place: u32) -> Option<Location> {
        let field = self.fields.get((place as usize).checked_sub(1)?)?;
        let string = |at: u32| {
            let mut pos = at as usize;
            let len = get_varint(&self.text, &mut pos) as usize;
            String::from_utf8_lossy(&self.text[pos..pos + len]).into_owned()
        };
        Some(Location {
            country: string(field[0]),
            region: string(field[1]),
            city: string(field[2]),
        })
    }
}

/// What a walk covers.
#[derive(Clone, Copy)]
struct Walk {
    family: Family,
    /// Whether the file has an IPv4 subtree, whose aliases the IPv6 walk
    /// skips (the table answers them from IPv4).
    aliases_skipped: bool,
}

/// Calls `emit(start, place)` for each range of `family` in `reader`, in
/// order of address: where the place changes, where the file has a gap
/// (place 0), and once at address 0.
fn for_each_range<S: AsRef<[u8]>>(
    reader: &Reader<S>,
    Walk {
        family,
        aliases_skipped,
    }: Walk,
    interner: &mut Interner,
    locate: &impl Fn(&LookupResult<'_, S>) -> Option<Location>,
    mut emit: impl FnMut(u128, u32),
) -> Result<(), String> {
    let all: ipnetwork::IpNetwork = match family {
        Family::V4 => "0.0.0.0/0",
        Family::V6 => "::/0",
    }
    .parse()
    .expect("a valid network");
    // Every leaf is yielded, with data or not, so that a walk is counted
    // leaf by leaf: a damaged or crafted tree whose nodes share children
    // can have astronomically many leaves, and is refused past the budget.
    let mut options = WithinOptions::default().include_networks_without_data();
    if !aliases_skipped {
        // `maxminddb` skips, as an alias, every record equal to the one
        // `::/96` leads to. Without an IPv4 subtree that record is data (or
        // nothing), and other networks with the same record are no aliases.
        options = options.include_aliased_networks();
    }
    let networks = reader.within(all, options).map_err(|e| e.to_string())?;
    let mut budget = walk_budget(reader.metadata().node_count);
    emit(0, 0);
    let mut current = 0u32;
    // The address after the last network seen; `None` past the top.
    let mut expected = Some(0u128);
    for result in networks {
        budget = budget.checked_sub(1).ok_or_else(too_many_leaves)?;
        let result = result.map_err(|e| e.to_string())?;
        let network = result.network().map_err(|e| e.to_string())?;
        let (start, end) = match (family, network) {
            (Family::V4, ipnetwork::IpNetwork::V4(n)) => (
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            ),
            // An IPv6 file without IPv4 inside answers every IPv4
            // address with the network on the way to `::/96`.
            (Family::V4, ipnetwork::IpNetwork::V6(_)) => (0, u128::from(u32::MAX)),
            // IPv4 inside an IPv6 file: answered by the IPv4 table.
            (Family::V6, ipnetwork::IpNetwork::V4(_)) => continue,
            (Family::V6, ipnetwork::IpNetwork::V6(n)) => {
                (u128::from(n.network()), u128::from(n.broadcast()))
            }
        };
        let place = interner.place(&result, locate);
        if expected != Some(start) && current != 0 {
            emit(expected.unwrap_or(start), 0);
            current = 0;
        }
        if place != current {
            emit(start, place);
            current = place;
        }
        expected = end.checked_add(1);
    }
    if let (Some(next), true) = (expected, current != 0) {
        let top = match family {
            Family::V4 => u128::from(u32::MAX),
            Family::V6 => u128::MAX,
        };
        if next <= top {
            emit(next, 0);
        }
    }
    Ok(())
}

/// How many leaves a walk of a tree of `node_count` nodes may visit: a
/// tree is at most `node_count + 1` leaves; a writer that shares subtrees
/// (besides the IPv4 aliases, which walks skip) may make a few times more.
pub(super) fn walk_budget(node_count: u32) -> usize {
    4 * node_count as usize + 65_536
}

fn too_many_leaves() -> String {
    "its search tree has more networks than four times its nodes plus 65,536: damaged, or its nodes share subtrees (a mapped geoip.residency reads it without walking it)".into()
}

/// Writes ranges, in order, into blocks.
struct Encoder {
    len: usize,
    width: u32,
    block_starts: Vec<u128>,
    block_offsets: Vec<u32>,
    stream: Vec<u8>,
    /// The block being filled: its ranges, written out when full.
    pending: Vec<(u128, u32)>,
}

impl Encoder {
    fn new(width: u32) -> Self {
        Self {
            len: 0,
            width,
            block_starts: Vec::new(),
            block_offsets: Vec::new(),
            stream: Vec::new(),
            pending: Vec::with_capacity(BLOCK),
        }
    }

    fn push(&mut self, start: u128, place: u32) {
        self.len += 1;
        self.pending.push((start, place));
        if self.pending.len() == BLOCK {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let Some(&(first, place)) = self.pending.first() else {
            return;
        };
        let shift = self
            .pending
            .windows(2)
            .map(|w| (w[1].0 - w[0].0).trailing_zeros())
            .min()
            .unwrap_or(0)
            .min(127);
        self.block_starts.push(first);
        self.block_offsets.push(self.stream.len() as u32);
        self.stream.push(shift as u8);
        put_varint(&mut self.stream, place.into());
        for w in self.pending.windows(2) {
            put_varint(&mut self.stream, (w[1].0 - w[0].0) >> shift);
            put_varint(&mut self.stream, w[1].1.into());
        }
        self.pending.clear();
    }

    fn finish(mut self) -> RangeTable {
        self.flush();
        self.stream.shrink_to_fit();
        let shift = self.width - TOP_BITS;
        let top = (0..=1u128 << TOP_BITS)
            .map(|part| self.block_starts.partition_point(|&s| s >> shift < part) as u32)
            .collect();
        RangeTable {
            len: self.len,
            width: self.width,
            top,
            block_starts: self.block_starts.into(),
            block_offsets: self.block_offsets.into(),
            stream: self.stream.into(),
        }
    }
}

impl RangeTable {
    /// The same ranges with place `p` written as `renumber[p]`.
    fn renumbered(self, renumber: &[u32]) -> RangeTable {
        let mut stream = Vec::with_capacity(self.stream.len());
        let mut block_offsets = Vec::with_capacity(self.block_offsets.len());
        let mut pos = 0;
        for block in 0..self.block_starts.len() {
            block_offsets.push(stream.len() as u32);
            let shift = self.stream[pos];
            pos += 1;
            stream.push(shift);
            let place = get_varint(&self.stream, &mut pos) as usize;
            put_varint(&mut stream, renumber[place].into());
            for _ in 1..BLOCK.min(self.len - block * BLOCK) {
                put_varint(&mut stream, get_varint(&self.stream, &mut pos));
                let place = get_varint(&self.stream, &mut pos) as usize;
                put_varint(&mut stream, renumber[place].into());
            }
        }
        RangeTable {
            len: self.len,
            width: self.width,
            top: self.top,
            block_starts: self.block_starts,
            block_offsets: block_offsets.into(),
            stream: stream.into(),
        }
    }

    /// The place of the range `address` falls in.
    fn place(&self, address: u128) -> u32 {
        // The block is the last that starts at or below `address`: among
        // those of its part of the space, or the one before them.
        let part = (address >> (self.width - TOP_BITS)) as usize;
        let (low, high) = (self.top[part] as usize, self.top[part + 1] as usize);
        let block = low + self.block_starts[low..high].partition_point(|&s| s <= address);
        let Some(block) = block.checked_sub(1) else {
            return 0;
        };
        let in_block = BLOCK.min(self.len - block * BLOCK);
        let mut pos = self.block_offsets[block] as usize;
        let shift = u32::from(self.stream[pos]);
        pos += 1;
        let mut start = self.block_starts[block];
        let mut place = get_varint(&self.stream, &mut pos) as u32;
        for _ in 1..in_block {
            let next = start + (get_varint(&self.stream, &mut pos) << shift);
            if next > address {
                break;
            }
            start = next;
            place = get_varint(&self.stream, &mut pos) as u32;
        }
        place
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u128) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(bytes: &[u8], pos: &mut usize) -> u128 {
    let mut value = 0u128;
    let mut shift = 0;
    loop {
        let byte = bytes[*pos];
        *pos += 1;
        value |= u128::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return value;
        }
        shift += 7;
    }
}

/// The IPv6 prefixes whose tree node is the IPv4 subtree's: `::/96`, and
/// the aliases a MaxMind-style writer adds (`::ffff:0:0/96`, `2001::/32`,
/// `2002::/16`, or any other), found by walking the tree's nodes as
/// `maxminddb` does when it skips them. A file with an alias deeper than
/// /96 (fewer than 32 bits left for the IPv4 address) or more than
/// [`MAX_ALIASES`] of them is refused.
fn v4_aliases(bytes: &[u8], reader: &Reader<&[u8]>) -> Result<Vec<(u128, u32)>, String> {
    let metadata = reader.metadata();
    let tree = Tree {
        bytes,
        node_count: metadata.node_count as usize,
        record_size: metadata.record_size,
    };
    let Some(ipv4_start) = tree.walk(0, 96) else {
        return Ok(Vec::new());
    };
    if ipv4_start >= tree.node_count {
        // No IPv4 subtree: `::/96` is part of an ordinary IPv6 network.
        return Ok(Vec::new());
    }
    let mut aliases = vec![(0u128, 96u32)];
    let mut budget = walk_budget(metadata.node_count);
    let mut stack = vec![(0usize, 0u128, 0u32)];
    while let Some((node, prefix, depth)) = stack.pop() {
        for side in 0..2u32 {
            let Some(child) = tree.record(node, side as usize) else {
                return Err(format!("node {node} lies outside the file"));
            };
            let prefix = prefix | u128::from(side) << (127 - depth);
            let depth = depth + 1;
            if child == ipv4_start {
                if (prefix, depth) == (0, 96) {
                    continue;
                }
                if depth > 96 {
                    return Err(format!(
                        "the IPv6 prefix {}/{depth} points at the IPv4 data, leaving it fewer than 32 bits",
                        std::net::Ipv6Addr::from(prefix)
                    ));
                }
                if aliases.len() == MAX_ALIASES {
                    return Err(format!(
                        "more than {MAX_ALIASES} IPv6 prefixes point at the IPv4 data"
                    ));
                }
                aliases.push((prefix, depth));
            } else if child < tree.node_count && depth < 128 {
                budget = budget.checked_sub(1).ok_or_else(too_many_leaves)?;
                stack.push((child, prefix, depth));
            }
        }
    }
    Ok(aliases)
}

/// IPv6 prefixes that may stand for IPv4 in one file: every lookup of an
/// IPv6 address looks through them, and real files have four at most.
const MAX_ALIASES: usize = 64;

/// Just enough of the MaxMind DB search tree to follow a prefix.
struct Tree<'a> {
    bytes: &'a [u8],
    node_count: usize,
    record_size: u16,
}

impl Tree<'_> {
    /// The record reached by following the first `len` bits of `prefix`
    /// from the root; `None` when the walk leaves the tree early or the
    /// file is damaged.
    fn walk(&self, prefix: u128, len: u32) -> Option<usize> {
        let mut node = 0usize;
        for i in 0..len {
            if node >= self.node_count {
                return None;
            }
            let bit = (prefix >> (127 - i)) & 1;
            node = self.record(node, bit as usize)?;
        }
        Some(node)
    }

    fn record(&self, node: usize, side: usize) -> Option<usize> {
        let b = |i: usize| -> Option<usize> { self.bytes.get(i).map(|&x| x as usize) };
        match self.record_size {
            24 => {
                let at = node * 6 + side * 3;
                Some(b(at)? << 16 | b(at + 1)? << 8 | b(at + 2)?)
            }
            28 => {
                let at = node * 7;
                let middle = b(at + 3)?;
                if side == 0 {
                    Some((middle & 0xf0) << 20 | b(at)? << 16 | b(at + 1)? << 8 | b(at + 2)?)
                } else {
                    Some((middle & 0x0f) << 24 | b(at + 4)? << 16 | b(at + 5)? << 8 | b(at + 6)?)
                }
            }
            32 => {
                let at = node * 8 + side * 4;
                Some(b(at)? << 24 | b(at + 1)? << 16 | b(at + 2)? << 8 | b(at + 3)?)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use mmdb_writer::ipnet::IpNet;
    use mmdb_writer::{IpVersion, Ipv4Aliasing, RecordSize, Writer};
    use proptest::prelude::*;

    use super::super::database::{Database, Residency};

    const PLACES: [(&str, &str, &str); 4] = [
        ("GB", "England", "London"),
        ("GB", "England", "Bracknell"),
        ("CZ", "South Moravian", "Brno"),
        ("", "", ""),
    ];

    /// A network of `family`'s width from random bits and a prefix length.
    fn network(v6: bool, bits: u128, prefix: u8) -> IpNet {
        if v6 {
            let prefix = prefix % 129;
            IpNet::new(IpAddr::V6(Ipv6Addr::from(bits)), prefix)
                .unwrap()
                .trunc()
        } else {
            let prefix = prefix % 33;
            IpNet::new(IpAddr::V4(Ipv4Addr::from(bits as u32)), prefix)
                .unwrap()
                .trunc()
        }
    }

    fn record(place: usize, flat: bool, serial: usize) -> serde_json::Value {
        let (country, region, city) = PLACES[place % PLACES.len()];
        if flat {
            // Coordinates differ per network, as in DB-IP: records that
            // differ in what the gateway does not read must still merge.
            serde_json::json!({
                "country_code": country, "state1": region, "city": city,
                "latitude": serial as f64, "longitude": 1.5, "postcode": "",
            })
        } else {
            serde_json::json!({
                "country": {"iso_code": country},
                "subdivisions": [{"names": {"en": region, "de": "x"}}],
                "city": {"names": {"en": city}},
                "location": {"latitude": serial as f64},
            })
        }
    }

    /// Bytes of a database of `version` holding `networks` (those the
    /// writer refuses, such as aliased space, are left out).
    fn database(
        version: IpVersion,
        size: RecordSize,
        flat: bool,
        networks: &[(IpNet, usize)],
    ) -> Vec<u8> {
        database_with(version, size, flat, Ipv4Aliasing::Enabled, networks)
    }

    fn database_with(
        version: IpVersion,
        size: RecordSize,
        flat: bool,
        aliasing: Ipv4Aliasing,
        networks: &[(IpNet, usize)],
    ) -> Vec<u8> {
        let mut writer = Writer::builder(if flat { "city" } else { "Test-City" })
            .ip_version(version)
            .record_size(size)
            .ipv4_aliasing(aliasing)
            .build();
        for (serial, (network, place)) in networks.iter().enumerate() {
            let _ = writer.insert(*network, &record(*place, flat, serial));
        }
        writer.to_bytes().unwrap()
    }

    /// Addresses worth asking: around every network's edges, inside the
    /// IPv6 prefixes that stand for IPv4, and some at random.
    fn probes(networks: &[(IpNet, usize)], random: &[u128]) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for (network, _) in networks {
            for edge in [network.network(), network.broadcast()] {
                match edge {
                    IpAddr::V4(v4) => {
                        let n = u32::from(v4);
                        for a in [n.wrapping_sub(1), n, n.wrapping_add(1)] {
                            let v4 = Ipv4Addr::from(a);
                            out.push(IpAddr::V4(v4));
                            out.push(IpAddr::V6(v4.to_ipv6_compatible()));
                            out.push(IpAddr::V6(v4.to_ipv6_mapped()));
                            out.push(IpAddr::V6(Ipv6Addr::from(
                                (0x2002u128 << 112) | (u128::from(a) << 80),
                            )));
                            out.push(IpAddr::V6(Ipv6Addr::from(
                                (0x2001u128 << 112) | (u128::from(a) << 64) | 7,
                            )));
                        }
                    }
                    IpAddr::V6(v6) => {
                        let n = u128::from(v6);
                        for a in [n.wrapping_sub(1), n, n.wrapping_add(1)] {
                            out.push(IpAddr::V6(Ipv6Addr::from(a)));
                        }
                    }
                }
            }
        }
        for &bits in random {
            out.push(IpAddr::V4(Ipv4Addr::from(bits as u32)));
            out.push(IpAddr::V6(Ipv6Addr::from(bits)));
        }
        out
    }

    fn networks(v6_share: u8) -> impl Strategy<Value = Vec<(IpNet, usize)>> {
        prop::collection::vec(
            (any::<u8>(), any::<u128>(), any::<u8>(), 0..PLACES.len()),
            0..40,
        )
        .prop_map(move |rows| {
            rows.into_iter()
                .map(|(kind, bits, prefix, place)| {
                    let v6 = kind < v6_share;
                    // Mostly long prefixes, as in real data (short ones
                    // cover everything else), sometimes any length, and
                    // sometimes at the very bottom or top of the space.
                    let prefix = match (prefix % 8, v6) {
                        (0, _) => prefix,
                        (_, true) => 64 + prefix % 65,
                        (_, false) => 16 + prefix % 17,
                    };
                    let bits = match kind % 16 {
                        0 => 0,
                        1 => u128::MAX,
                        _ => bits,
                    };
                    (network(v6, bits, prefix), place)
                })
                .collect()
        })
    }

    fn same_answers(parts: Vec<Vec<u8>>, probes: &[IpAddr]) {
        let tree = Database::from_bytes(parts.clone());
        let compact = Database::from_bytes_with(parts, Residency::Compact);
        // A database with no record at all is refused either way.
        let (tree, compact) = match (tree, compact) {
            (Ok(tree), Ok(compact)) => (tree, compact),
            (Err(_), Err(_)) => return,
            (tree, compact) => panic!(
                "one loads, the other not: tree {:?}, compact {:?}",
                tree.err(),
                compact.err()
            ),
        };
        for &ip in probes {
            assert_eq!(compact.lookup(ip), tree.lookup(ip), "{ip}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// One MaxMind-style file (IPv6, IPv4 inside, aliases), GeoIP2
        /// layout, each record size: the compact table answers every
        /// address as the tree does.
        #[test]
        fn one_ipv6_file_with_ipv4_inside_answers_as_its_tree(
            rows in networks(128),
            size in prop::sample::select(vec![RecordSize::Bits24, RecordSize::Bits28, RecordSize::Bits32]),
            aliasing in prop::sample::select(vec![Ipv4Aliasing::Enabled, Ipv4Aliasing::Disabled]),
            flat in any::<bool>(),
            random in prop::collection::vec(any::<u128>(), 16),
        ) {
            // Without aliases, networks may sit in ::ffff:0:0/96 and
            // 2002::/16 themselves.
            let file = database_with(IpVersion::V6, size, flat, aliasing, &rows);
            same_answers(vec![file], &probes(&rows, &random));
        }

        /// The flat layout in two files (IPv4, and IPv6 without IPv4
        /// inside), as DB-IP ships it.
        #[test]
        fn two_flat_files_answer_as_their_trees(
            rows in networks(128),
            size in prop::sample::select(vec![RecordSize::Bits24, RecordSize::Bits28, RecordSize::Bits32]),
            random in prop::collection::vec(any::<u128>(), 16),
        ) {
            let v4: Vec<_> = rows.iter().filter(|(n, _)| matches!(n, IpNet::V4(_))).cloned().collect();
            let v6: Vec<_> = rows.iter().filter(|(n, _)| matches!(n, IpNet::V6(_))).cloned().collect();
            let parts = vec![
                database(IpVersion::V4, size, true, &v4),
                database(IpVersion::V6, size, true, &v6),
            ];
            same_answers(parts, &probes(&rows, &random));
            // The IPv6 file alone answers IPv4 too (from the network on
            // the way to ::/96, if any).
            same_answers(vec![database(IpVersion::V6, size, true, &v6)], &probes(&rows, &random));
        }
    }

    #[test]
    fn neighbouring_networks_with_the_same_place_are_one_range() {
        // 256 /24s of one place, in one block, with other coordinates each.
        let rows: Vec<_> = (0..256u32)
            .map(|i| (network(false, u128::from(0x5100_0000 | i << 8), 24), 0))
            .collect();
        let bytes = database(IpVersion::V4, RecordSize::Bits28, true, &rows);
        let reader = maxminddb::Reader::from_source(bytes.as_slice()).unwrap();
        // The file has a network per /24 (their records differ).
        assert!(reader.metadata().node_count > 256);
        let compact = super::CompactFile::build(&reader, &bytes, |r| {
            r.decode::<serde_json::Value>()
                .ok()
                .flatten()
                .map(|v| super::Location {
                    country: v["country_code"].as_str().unwrap_or_default().into(),
                    region: v["state1"].as_str().unwrap_or_default().into(),
                    city: v["city"].as_str().unwrap_or_default().into(),
                })
        })
        .unwrap();
        // Nothing below 81.0.0.0, the /16 of London, nothing above.
        assert_eq!(compact.ranges(), 3);
        assert_eq!(
            compact.lookup("81.0.200.7".parse().unwrap()).unwrap().city,
            "London"
        );
        assert_eq!(compact.lookup("81.1.0.0".parse().unwrap()), None);
        assert_eq!(compact.lookup("80.255.255.255".parse().unwrap()), None);
    }

    #[test]
    fn the_edges_of_the_space_and_records_that_do_not_decode() {
        let rows: Vec<(IpNet, usize)> = [
            ("0.0.0.0/8", 0),
            ("255.255.255.0/24", 1),
            ("1.2.3.4/32", 2),
            ("::/64", 0),
            ("ffff::/16", 1),
            ("2a02::1/128", 2),
            ("2a02::2/128", 2),
        ]
        .iter()
        .map(|(n, p)| (n.parse().unwrap(), *p))
        .collect();
        let mut probes = probes(&rows, &[0, u128::MAX, 1 << 64, u128::from(u32::MAX)]);
        probes.push("64:ff9b::102:304".parse().unwrap());
        let v4: Vec<_> = rows
            .iter()
            .filter(|(n, _)| matches!(n, IpNet::V4(_)))
            .cloned()
            .collect();
        let v6: Vec<_> = rows
            .iter()
            .filter(|(n, _)| matches!(n, IpNet::V6(_)))
            .cloned()
            .collect();
        for size in [RecordSize::Bits24, RecordSize::Bits32] {
            same_answers(vec![database(IpVersion::V6, size, false, &rows)], &probes);
            same_answers(
                vec![
                    database(IpVersion::V4, size, true, &v4),
                    database(IpVersion::V6, size, true, &v6),
                ],
                &probes,
            );
            // ::/64 holds ::a.b.c.d: an IPv6 file without IPv4 inside
            // answers every IPv4 address from it.
            let v6_only = database_with(IpVersion::V6, size, true, Ipv4Aliasing::Disabled, &v6);
            same_answers(vec![v6_only], &probes);
        }
        // A record whose `country` is a string, not a map: it does not
        // decode, and both answer no record. (The file's first record, the
        // one its layout is probed on, is a good one.)
        let mut writer = Writer::builder("Test-City").build();
        writer
            .insert(
                "81.2.69.0/24".parse::<IpNet>().unwrap(),
                &serde_json::json!({"country": "GB", "city": {"names": {"en": "London"}}}),
            )
            .unwrap();
        writer
            .insert("1.2.3.0/24".parse::<IpNet>().unwrap(), &record(2, false, 0))
            .unwrap();
        let bytes = writer.to_bytes().unwrap();
        same_answers(vec![bytes.clone()], &probes);
        let compact = Database::from_bytes_with(vec![bytes], Residency::Compact).unwrap();
        assert_eq!(
            compact.lookup("81.2.69.1".parse().unwrap()),
            super::super::Lookup::Miss
        );
        assert_ne!(
            compact.lookup("1.2.3.4".parse().unwrap()),
            super::super::Lookup::Miss
        );
    }

    #[test]
    fn a_tree_whose_nodes_share_children_is_refused_not_walked_forever() {
        // Node 0: a record on the left, node 1 on the right; nodes 1 to
        // 100 point both ways at the next one, and node 101 at nothing:
        // 2^100 leaves from 102 nodes. The probe finds the record; the
        // walk must stop at its budget.
        let rows: Vec<(IpNet, usize)> = (0..200u128)
            .map(|i| (network(true, (i + 1) << 100, 28), 2))
            .collect();
        let mut bytes = database(IpVersion::V6, RecordSize::Bits32, false, &rows);
        let (node_count, data) = {
            let reader = maxminddb::Reader::from_source(bytes.as_slice()).unwrap();
            let found = reader
                .lookup(IpAddr::V6(Ipv6Addr::from(1u128 << 100)))
                .unwrap();
            let node_count = reader.metadata().node_count as usize;
            (
                node_count,
                (found.offset().unwrap() + node_count + 16) as u32,
            )
        };
        assert!(node_count >= 102, "{node_count} nodes");
        let mut set =
            |node: usize, side: usize, value: u32| set_record(&mut bytes, node, side, value);
        set(0, 0, data);
        set(0, 1, 1);
        for node in 1..=100 {
            set(node, 0, node as u32 + 1);
            set(node, 1, node as u32 + 1);
        }
        set(101, 0, node_count as u32);
        set(101, 1, node_count as u32);
        assert!(Database::from_bytes(vec![bytes.clone()]).is_ok());
        let error = Database::from_bytes_with(vec![bytes.clone()], Residency::Compact)
            .err()
            .expect("refused");
        assert!(error.to_string().contains("more networks than"), "{error}");
        // With nothing on the left either, the probe that finds a file's
        // layout (every residency runs it) meets only empty leaves: it
        // stops at the same budget.
        set_record(&mut bytes, 0, 0, node_count as u32);
        for residency in [Residency::Cached, Residency::Compact] {
            let error = Database::from_bytes_with(vec![bytes.clone()], residency)
                .err()
                .expect("refused");
            assert!(error.to_string().contains("no records"), "{error}");
        }
    }

    #[test]
    fn ipv6_prefixes_pointing_at_the_ipv4_data_are_aliases_up_to_a_limit() {
        // An IPv6 file with IPv4 inside and none of the writer's aliases,
        // and 64 IPv6 /32s of their own; the test then points /32s at the
        // IPv4 subtree, as a writer's aliases do (`2001::/32` is one).
        let mut rows: Vec<(IpNet, usize)> = vec![
            ("81.2.69.0/24".parse().unwrap(), 0),
            ("1.2.3.0/24".parse().unwrap(), 2),
        ];
        let slash32 = |i: u128| (0x2400_0000u128 + i) << 96;
        rows.extend((0..64).map(|i| (network(true, slash32(i), 32), 1)));
        let file = database_with(
            IpVersion::V6,
            RecordSize::Bits32,
            false,
            Ipv4Aliasing::Disabled,
            &rows,
        );
        let ipv4_start = node_at(&file, 0, 96) as u32;
        // The last bit of a /32 chooses the side of the node above it.
        let point = |count: u128| {
            let mut bytes = file.clone();
            for i in 0..count {
                let node = node_at(&bytes, slash32(i), 31);
                set_record(
                    &mut bytes,
                    node,
                    ((slash32(i) >> 96) & 1) as usize,
                    ipv4_start,
                );
            }
            bytes
        };
        // With `::/96`, 64 prefixes: the limit. Behind each /32, the next
        // 32 bits are an IPv4 address, and both lookups agree on it.
        let bytes = point(63);
        let london = slash32(5) | (u128::from(u32::from(Ipv4Addr::new(81, 2, 69, 7))) << 64);
        let compact = Database::from_bytes_with(vec![bytes.clone()], Residency::Compact).unwrap();
        match compact.lookup(IpAddr::V6(Ipv6Addr::from(london))) {
            super::super::Lookup::Hit(location) => assert_eq!(location.city, "London"),
            other => panic!("{other:?}"),
        }
        let mut probes = probes(&rows, &[london, slash32(62) | 7, slash32(63) | 7]);
        probes.push(IpAddr::V6(Ipv6Addr::from(london)));
        same_answers(vec![bytes], &probes);
        // One more is refused, with the count.
        let error = Database::from_bytes_with(vec![point(64)], Residency::Compact)
            .err()
            .expect("refused");
        assert!(
            error
                .to_string()
                .contains("more than 64 IPv6 prefixes point at the IPv4 data"),
            "{error}"
        );
        // A prefix deeper than /96 leaves the IPv4 data fewer than 32 bits:
        // refused, naming it.
        rows.push((network(true, 0x2a02u128 << 112, 112), 1));
        let mut bytes = database_with(
            IpVersion::V6,
            RecordSize::Bits32,
            false,
            Ipv4Aliasing::Disabled,
            &rows,
        );
        let ipv4_start = node_at(&bytes, 0, 96) as u32;
        let node = node_at(&bytes, 0x2a02u128 << 112, 111);
        set_record(&mut bytes, node, 0, ipv4_start);
        let error = Database::from_bytes_with(vec![bytes], Residency::Compact)
            .err()
            .expect("refused");
        assert!(
            error.to_string().contains(
                "the IPv6 prefix 2a02::/112 points at the IPv4 data, leaving it fewer than 32 bits"
            ),
            "{error}"
        );
    }

    /// The record reached from the root by the first `depth` bits of
    /// `prefix`, in a file of 32-bit records.
    fn node_at(bytes: &[u8], prefix: u128, depth: u32) -> usize {
        let mut node = 0usize;
        for i in 0..depth {
            let at = node * 8 + ((prefix >> (127 - i)) & 1) as usize * 4;
            node = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        }
        node
    }

    fn set_record(bytes: &mut [u8], node: usize, side: usize, value: u32) {
        let at = node * 8 + side * 4;
        bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }
}
