//! One loaded set of GeoIP files: how their records are laid out, which
//! file answers for which address family, and how a file is held in memory.
//!
//! Two record layouts are read, told apart by the records themselves (a
//! probe record, and the metadata), never by a flag an operator could get
//! wrong:
//!
//! * GeoIP2 / GeoLite2-City: `country.iso_code`, `subdivisions[0].names.en`,
//!   `city.names.en`;
//! * the flat layout of the ip-location-db and DB-IP lite city databases:
//!   `country_code`, `state1`, `city`.
//!
//! A set is one file (IPv6 database with IPv4 inside, as MaxMind ships) or
//! two (an `ip_version` 4 file and an `ip_version` 6 one, as ip-location-db
//! ships); a lookup asks the file for its address family.
//!
//! **Memory.** By default (`geoip.residency: compact`) a file is read once
//! into a compact table in the heap (`ranges`) and not kept. Otherwise it
//! is memory-mapped, not read into the heap: only the pages that lookups
//! touch become resident (with `touched`, not even their neighbours: see
//! [`Residency`]), and the kernel may drop them again. Either way it is
//! read from a private copy. Mapping the operator's file itself would be unsafe: overwriting it
//! in place (`cp new.mmdb city.mmdb`) changes or truncates pages under the
//! reader, and a truncated mapping kills the process with SIGBUS. So the
//! gateway maps a **private copy**: an unnamed file (`O_TMPFILE`) in the
//! database's directory, or in the temp dir if that one is read-only. It has
//! no name, so no one else can open or change it, and its space goes back
//! when the database is replaced. On filesystems with reflinks the copy costs
//! no space at all; on a tmpfs temp dir it costs memory (during a reload,
//! twice), so mount the data somewhere writable or give the temp dir a disk.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use maxminddb::{LookupResult, Reader, WithinOptions};
use memmap2::Mmap;
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::cache::LookupCache;
use super::ranges::CompactFile;
use super::{GeoIpError, Location, Lookup};

/// How the records of a file are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    GeoIp2,
    Flat,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GeoIp2 => "geoip2",
            Self::Flat => "flat",
        }
    }
}

/// What an operator wants to know about a loaded file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileInfo {
    pub path: String,
    pub database_type: String,
    pub layout: &'static str,
    pub ip_version: u16,
    /// When the data was built, in seconds since the epoch.
    pub build_epoch: u64,
    /// Bytes of heap its compact table takes ([`Residency::Compact`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compact_bytes: Option<usize>,
}

/// How the files are held in memory (`geoip.residency`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residency {
    /// Nothing of the files: each is read once at load into a compact table
    /// of its address ranges and the three strings the gateway reads (see
    /// `ranges`), in the heap, and let go. The memory is the same whatever
    /// addresses come (35 MB for the DB-IP pair, where the mapped files'
    /// resident pages reach 80-102 MB under ~160,000 addresses) and no
    /// lookup ever waits for the disk. The price is at load: every network of the files is
    /// walked (about 2 s for the DB-IP pair on a 2-core VM, before the
    /// gateway listens, and on the reload thread while the old data
    /// serves). While it walks, the process's anonymous memory peaks at
    /// about 80 MB (tables and the maps that build them) plus the walked
    /// copy's pages, which the kernel can reclaim (77 MB; the DB-IP pair at
    /// start).
    #[default]
    Compact,
    /// The mapped copy stays in the page cache: a lookup anywhere in the
    /// file is a cheap fault, never a read from disk, but the kernel's
    /// fault-around maps the cached pages around each faulting one, so a
    /// few thousand addresses make most of the file resident (78 of the
    /// 134 MB DB-IP files at 256 connections), and a container's limit
    /// counts them.
    Cached,
    /// Only the pages lookups read stay (see `touched_pages_only`): 30 MB
    /// of the same files in the same run. A lookup into a part of the file
    /// no lookup read before reads its pages from disk, on the thread that
    /// serves the upload; after a start or a reload, until the addresses
    /// seen have been looked up once, that lengthens the tail (geoip/README.md).
    /// It saves memory only while the addresses are few: what lookups read
    /// grows with them (80 MB of the same files with ~160,000 addresses).
    Touched,
}

impl Residency {
    /// The setting's name, as in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Compact => "compact",
            Self::Cached => "cached",
            Self::Touched => "touched",
        }
    }
}

/// The bytes of a file: a mapping of its private copy, or (tests,
/// benchmarks) a heap buffer.
pub enum Source {
    Mapped(Mmap),
    Heap(Vec<u8>),
}

impl AsRef<[u8]> for Source {
    fn as_ref(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Heap(bytes) => bytes,
        }
    }
}

/// A file's identity on disk, to notice that it was replaced or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl Fingerprint {
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path).ok()?;
        Some(Self {
            len: metadata.len(),
            modified: metadata.modified().ok(),
            inode: metadata.ino(),
        })
    }
}

struct File {
    index: Index,
    info: FileInfo,
}

/// How a file answers lookups.
enum Index {
    /// Its own search tree, in the mapped copy or a heap buffer.
    Tree(Reader<Source>, Layout),
    /// Its compact table ([`Residency::Compact`]).
    Compact(CompactFile),
}

/// One loaded, probed set of files.
pub struct Database {
    files: Vec<File>,
    /// Index of the file that answers IPv4 lookups, and IPv6 ones.
    v4: Option<usize>,
    v6: Option<usize>,
    /// Recent answers of these files (none until [`Database::with_cache`]).
    cache: LookupCache,
    /// The answer for an address the files have no record of, shared.
    nowhere: Arc<Location>,
}

/// The answer of [`Database::locate`].
pub struct Located {
    /// Where the address is; empty strings when the database has no record.
    pub location: Arc<Location>,
    /// Whether the database has a record of the address.
    pub found: bool,
    /// Whether the answer came from the cache of recent lookups.
    pub cached: bool,
}

#[derive(Deserialize)]
struct CityRecord<'a> {
    #[serde(borrow, default)]
    country: Option<CountryRecord<'a>>,
    #[serde(borrow, default)]
    subdivisions: Option<Vec<NamedRecord<'a>>>,
    #[serde(borrow, default)]
    city: Option<NamedRecord<'a>>,
}

#[derive(Deserialize)]
struct CountryRecord<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct NamedRecord<'a> {
    #[serde(borrow, default)]
    names: Option<EnglishName<'a>>,
}

#[derive(Deserialize)]
struct EnglishName<'a> {
    #[serde(borrow, default)]
    en: Option<&'a str>,
}

impl NamedRecord<'_> {
    fn english(&self) -> &str {
        self.names.as_ref().and_then(|n| n.en).unwrap_or_default()
    }
}

/// The flat layout: `country_code`, `state1`, `city` (and fields not read).
#[derive(Deserialize)]
struct FlatRecord<'a> {
    #[serde(borrow, default)]
    country_code: Option<&'a str>,
    #[serde(borrow, default)]
    state1: Option<&'a str>,
    #[serde(borrow, default)]
    city: Option<&'a str>,
}

impl Database {
    /// Loads and probes `paths` (one file, or an IPv4 and an IPv6 file).
    /// Blocking: reads metadata and copies each file.
    pub fn open(paths: &[PathBuf], residency: Residency) -> Result<Self, GeoIpError> {
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let shown = path.display().to_string();
            if !path.exists() {
                return Err(GeoIpError::Missing { path: shown });
            }
            let source = map_private_copy(path, residency).map_err(|e| GeoIpError::Invalid {
                path: shown.clone(),
                reason: format!("cannot map a private copy: {e}"),
            })?;
            files.push(if residency == Residency::Compact {
                // Walked from the mapped copy, whose pages the kernel can
                // drop under pressure, then unmapped and gone.
                File::load_compact(source.as_ref(), shown)?
            } else {
                File::load(source, shown)?
            });
        }
        Self::assemble(files)
    }

    /// A database from bytes in memory (tests, benchmarks).
    pub fn from_bytes(parts: Vec<Vec<u8>>) -> Result<Self, GeoIpError> {
        Self::from_bytes_with(parts, Residency::Cached)
    }

    /// [`Database::from_bytes`], read into compact tables with
    /// [`Residency::Compact`] (the others keep the bytes as they are).
    pub fn from_bytes_with(parts: Vec<Vec<u8>>, residency: Residency) -> Result<Self, GeoIpError> {
        let files = parts
            .into_iter()
            .enumerate()
            .map(|(i, bytes)| {
                let path = format!("<memory {i}>");
                if residency == Residency::Compact {
                    File::load_compact(&bytes, path)
                } else {
                    File::load(Source::Heap(bytes), path)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::assemble(files)
    }

    fn assemble(files: Vec<File>) -> Result<Self, GeoIpError> {
        let of_version = |version: u16| -> Result<Option<usize>, GeoIpError> {
            let found: Vec<usize> = (0..files.len())
                .filter(|&i| files[i].info.ip_version == version)
                .collect();
            match found.as_slice() {
                [] => Ok(None),
                [one] => Ok(Some(*one)),
                [_, second, ..] => Err(GeoIpError::Invalid {
                    path: files[*second].info.path.clone(),
                    reason: format!("a second IPv{version} database; give one per address family"),
                }),
            }
        };
        let v6 = of_version(6)?;
        // An IPv6 database answers IPv4 lookups too unless an IPv4 one is given.
        let v4 = of_version(4)?.or(v6);
        if v4.is_none() {
            return Err(GeoIpError::Invalid {
                path: String::new(),
                reason: "no database given".into(),
            });
        }
        Ok(Self {
            files,
            v4,
            v6,
            cache: LookupCache::new(0),
            nowhere: Arc::new(Location::default()),
        })
    }

    /// The same files with a cache of `entries` recent lookups (see
    /// `cache`); 0: none.
    pub fn with_cache(mut self, entries: usize) -> Self {
        self.cache = LookupCache::new(entries);
        self
    }

    /// Where `ip` is, from the cache of recent lookups or else the files
    /// (and then remembered).
    pub fn locate(&self, ip: IpAddr) -> Located {
        if let Some((location, found)) = self.cache.get(ip) {
            return Located {
                location,
                found,
                cached: true,
            };
        }
        let (location, found) = match self.lookup(ip) {
            Lookup::Hit(location) => (Arc::new(location), true),
            Lookup::Miss => (Arc::clone(&self.nowhere), false),
        };
        self.cache.put(ip, &location, found);
        Located {
            location,
            found,
            cached: false,
        }
    }

    /// Looks `ip` up in the file for its address family. A record that cannot
    /// be decoded counts as a miss: a damaged record must not fail an upload.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        let index = match ip {
            IpAddr::V4(_) => self.v4,
            IpAddr::V6(_) => self.v6,
        };
        let Some(file) = index.map(|i| &self.files[i]) else {
            return Lookup::Miss;
        };
        file.lookup(ip)
    }

    pub fn files(&self) -> impl Iterator<Item = &FileInfo> {
        self.files.iter().map(|f| &f.info)
    }

    /// The first file's database type (what `/readyz` has always shown).
    pub fn database_type(&self) -> &str {
        &self.files[0].info.database_type
    }
}

impl File {
    /// Reads the metadata, finds the layout from a probe record, and checks
    /// that a lookup of that record's address answers.
    fn load(source: Source, path: String) -> Result<Self, GeoIpError> {
        let (reader, layout, probe, info) = identify(source, &path)?;
        Self {
            index: Index::Tree(reader, layout),
            info,
        }
        .probed(probe)
    }

    /// [`File::load`] into a compact table ([`Residency::Compact`]): the
    /// bytes are walked once and not kept.
    fn load_compact(bytes: &[u8], path: String) -> Result<Self, GeoIpError> {
        let (reader, layout, probe, mut info) = identify(bytes, &path)?;
        let compact =
            CompactFile::build(&reader, bytes, |result| locate(result, layout)).map_err(|e| {
                GeoIpError::Invalid {
                    path,
                    reason: format!("cannot walk its networks: {e}"),
                }
            })?;
        info.compact_bytes = Some(compact.heap_bytes());
        Self {
            index: Index::Compact(compact),
            info,
        }
        .probed(probe)
    }

    /// The file, if a lookup of `probe` (an address it lists) answers.
    fn probed(self, probe: IpAddr) -> Result<Self, GeoIpError> {
        match self.lookup(probe) {
            Lookup::Hit(_) => Ok(self),
            Lookup::Miss => Err(GeoIpError::Invalid {
                path: self.info.path.clone(),
                reason: format!(
                    "a probe lookup of {probe}, which the database lists, found nothing"
                ),
            }),
        }
    }

    fn lookup(&self, ip: IpAddr) -> Lookup {
        let location = match &self.index {
            Index::Tree(reader, layout) => reader
                .lookup(ip)
                .ok()
                .and_then(|result| locate(&result, *layout)),
            Index::Compact(compact) => compact.lookup(ip),
        };
        location.map_or(Lookup::Miss, Lookup::Hit)
    }
}

/// A file's reader, its layout (found from a probe record), an address
/// the file lists, and what an operator sees of it.
fn identify<S: AsRef<[u8]>>(
    source: S,
    path: &str,
) -> Result<(Reader<S>, Layout, IpAddr, FileInfo), GeoIpError> {
    let invalid = |reason: String| GeoIpError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let reader = Reader::from_source(source).map_err(|e| invalid(e.to_string()))?;
    let (layout, probe) = probe(&reader).map_err(invalid)?;
    let metadata = reader.metadata();
    let info = FileInfo {
        path: path.to_owned(),
        database_type: metadata.database_type.clone(),
        layout: layout.as_str(),
        ip_version: metadata.ip_version,
        build_epoch: metadata.build_epoch,
        compact_bytes: None,
    };
    Ok((reader, layout, probe, info))
}

/// What the gateway reads of a record: `None` when there is no record or it
/// does not decode (a damaged record must not fail an upload).
fn locate<S: AsRef<[u8]>>(result: &LookupResult<'_, S>, layout: Layout) -> Option<Location> {
    match layout {
        Layout::GeoIp2 => result
            .decode::<CityRecord>()
            .ok()
            .flatten()
            .map(|r| Location {
                country: r
                    .country
                    .and_then(|c| c.iso_code)
                    .unwrap_or_default()
                    .to_owned(),
                region: r
                    .subdivisions
                    .as_ref()
                    .and_then(|s| s.first())
                    .map(|s| s.english().to_owned())
                    .unwrap_or_default(),
                city: r
                    .city
                    .as_ref()
                    .map(|c| c.english().to_owned())
                    .unwrap_or_default(),
            }),
        Layout::Flat => result
            .decode::<FlatRecord>()
            .ok()
            .flatten()
            .map(|r| Location {
                country: r.country_code.unwrap_or_default().to_owned(),
                region: r.state1.unwrap_or_default().to_owned(),
                city: r.city.unwrap_or_default().to_owned(),
            }),
    }
}

/// The layout of the first record with data, and an address inside it.
fn probe<S: AsRef<[u8]>>(reader: &Reader<S>) -> Result<(Layout, IpAddr), String> {
    // Leaf by leaf, and no further than a sound tree's leaves: a damaged
    // tree whose nodes share children must not keep the load walking.
    // Aliases are not skipped either: `maxminddb` skips every record equal
    // to the one `::/96` leads to, which without an IPv4 subtree may be
    // "nothing", and would then skip empty leaves without yielding them.
    let first = reader
        .networks(
            WithinOptions::default()
                .include_networks_without_data()
                .include_aliased_networks(),
        )
        .map_err(|e| e.to_string())?
        .take(super::ranges::walk_budget(reader.metadata().node_count))
        .filter_map(Result::ok)
        .find(LookupResult::has_data)
        .ok_or("the database has no records")?;
    let network = first.network().map_err(|e| e.to_string())?;
    let keys: std::collections::BTreeMap<String, IgnoredAny> = first
        .decode()
        .map_err(|e| format!("its first record does not decode: {e}"))?
        .ok_or("its first record is empty")?;
    let has = |key: &str| keys.contains_key(key);
    let layout = if has("country_code") || has("state1") {
        Layout::Flat
    } else if has("country") || has("city") || has("subdivisions") || has("continent") {
        Layout::GeoIp2
    } else {
        return Err(format!(
            "records have neither the GeoIP2 city layout nor the flat one (keys: {})",
            keys.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    };
    Ok((layout, network.ip()))
}

/// Copies `path` into an unnamed file (O_TMPFILE) in its own directory, or
/// in the temp dir when that one is read-only, and maps the copy: a mapping
/// nobody else can open or change (see the module doc). An unnamed file
/// leaves nothing behind, whatever happens.
fn map_private_copy(path: &Path, residency: Residency) -> std::io::Result<Source> {
    let mut original = std::fs::File::open(path)?;
    let beside = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut copy = tempfile::tempfile_in(beside).or_else(|_| tempfile::tempfile())?;
    std::io::copy(&mut original, &mut copy)?;
    // SAFETY: `copy` has no name in any directory and only this process
    // holds it: nothing else can change or truncate it while it is mapped.
    let map = unsafe { memmap2::MmapOptions::new().map(&copy) }?;
    if residency == Residency::Touched {
        touched_pages_only(&copy, &map)?;
    }
    Ok(Source::Mapped(map))
}

/// Makes only the pages lookups touch resident ([`Residency::Touched`]).
///
/// Writing the copy leaves all of it in the page cache, and a read fault
/// on a mapping maps the cached pages around the faulting one too (the
/// kernel's fault-around, 64 KiB): a few thousand lookups then make most
/// of the file resident, and a container's memory limit counts those
/// pages as the process's. So the copy is written back and dropped from
/// the cache, and the mapping is marked random (no read-ahead): a fault
/// reads the one page a lookup needs. The first lookup into a cold part of
/// the tree pays a read from disk; the pages of the addresses seen stay.
/// A copy that cannot be written back is refused (the load fails and the
/// old data keeps serving): a page dropped after a failed write-back could
/// be read back wrong. On a filesystem that cannot drop pages (a tmpfs
/// temp dir) they simply stay cached.
fn touched_pages_only(copy: &std::fs::File, map: &Mmap) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    copy.sync_data()?;
    // SAFETY: a plain syscall on a file descriptor this function borrows.
    unsafe { libc::posix_fadvise(copy.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    map.advise(memmap2::Advice::Random)
}
