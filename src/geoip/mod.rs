//! Country, region and city of an IP address, from MaxMind DB files that
//! can be replaced while the gateway runs.
//!
//! * `database`: one loaded set of files (layouts, address families, the
//!   private copy, how each is held: compact tables or a mapping);
//! * `cache`: recent lookups, in front of the tables or the tree walk;
//! * `ranges`: a file as a compact table of ranges in the heap
//!   (`geoip.residency: compact`);
//! * `reload`: SIGHUP and a periodic look at the files, swapping in a new
//!   set only when it loads and answers a probe.
//!
//! The current set sits behind an `ArcSwap`: a batch takes it once (one
//! atomic load, no lock) and finishes on it even if a reload swaps in a new
//! one meanwhile.

pub mod cache;
pub mod database;
pub mod ranges;
pub mod reload;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use database::Fingerprint;
pub use database::{Database, FileInfo, Layout, Located, Residency};

/// Where an address is, as far as the database knows. Unknown parts are
/// empty strings, as they appear in the Kafka message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Location {
    pub country: String,
    pub region: String,
    pub city: String,
}

/// The outcome of one lookup, also the `result` label of the lookup counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The database has a record for the address.
    Hit(Location),
    /// No record (private ranges, unassigned space, a database without IPv6).
    Miss,
}

#[derive(Debug, thiserror::Error)]
pub enum GeoIpError {
    #[error("GeoIP database {path} does not exist; run geoip/fetch.sh or set geoip.database (VENUS__GEOIP__DATABASE)")]
    Missing { path: String },
    #[error("GeoIP database {path} cannot be used: {reason}")]
    Invalid { path: String, reason: String },
}

/// The GeoIP data in use, replaceable at run time.
pub struct GeoIp {
    current: ArcSwap<Database>,
    /// The files it is loaded from (empty for an in-memory database).
    paths: Vec<PathBuf>,
    /// What the files were at the last load or reload attempt: a file that
    /// was refused is not tried again until it changes again.
    seen: Mutex<Vec<Option<Fingerprint>>>,
    /// Slots of each loaded set's cache of recent lookups.
    cache_entries: usize,
    /// Which pages of the mapped files stay in memory.
    residency: Residency,
}

/// Slots of the lookup cache when the configuration says nothing: about
/// 2 MB when full, and enough that the addresses of the last minute of
/// uploads at thousands of requests a second mostly stay.
pub const DEFAULT_CACHE_ENTRIES: usize = 16_384;

fn fingerprints(paths: &[PathBuf]) -> Vec<Option<Fingerprint>> {
    paths.iter().map(|p| Fingerprint::of(p)).collect()
}

impl GeoIp {
    /// Loads `paths`: one file, or an IPv4 and an IPv6 file.
    pub fn open(paths: &[PathBuf]) -> Result<Self, GeoIpError> {
        Self::open_with_cache(paths, DEFAULT_CACHE_ENTRIES)
    }

    /// [`GeoIp::open`] with `cache_entries` slots of recent lookups (0: no
    /// cache).
    pub fn open_with_cache(paths: &[PathBuf], cache_entries: usize) -> Result<Self, GeoIpError> {
        Self::open_with(paths, cache_entries, Residency::default())
    }

    /// [`GeoIp::open_with_cache`], holding the files in memory as
    /// `residency` says (at this load and every reload).
    pub fn open_with(
        paths: &[PathBuf],
        cache_entries: usize,
        residency: Residency,
    ) -> Result<Self, GeoIpError> {
        let seen = fingerprints(paths);
        Ok(Self {
            current: ArcSwap::from_pointee(
                Database::open(paths, residency)?.with_cache(cache_entries),
            ),
            paths: paths.to_vec(),
            seen: Mutex::new(seen),
            cache_entries,
            residency,
        })
    }

    /// A database held in memory (tests, benchmarks), one buffer per file.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GeoIpError> {
        Self::from_parts(vec![bytes])
    }

    pub fn from_parts(parts: Vec<Vec<u8>>) -> Result<Self, GeoIpError> {
        Ok(Self {
            current: ArcSwap::from_pointee(
                Database::from_bytes(parts)?.with_cache(DEFAULT_CACHE_ENTRIES),
            ),
            paths: Vec::new(),
            seen: Mutex::new(Vec::new()),
            cache_entries: DEFAULT_CACHE_ENTRIES,
            // Never reloaded (no paths); the bytes are kept as they are.
            residency: Residency::Cached,
        })
    }

    /// The set in use now: take it once per batch.
    pub fn current(&self) -> Arc<Database> {
        self.current.load_full()
    }

    /// Looks `ip` up in the set in use now.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        self.current.load().lookup(ip)
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Loads the files again and, if they load and answer a probe lookup,
    /// puts them in place of the current set. Blocking.
    pub fn reload(&self) -> Result<Vec<FileInfo>, GeoIpError> {
        // Taken before loading: a file that changes while it is read is
        // seen as changed again next time.
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = fingerprints(&self.paths);
        // A fresh cache with the fresh data: no answer of the old files
        // outlives them.
        let fresh = Database::open(&self.paths, self.residency)?.with_cache(self.cache_entries);
        let files = fresh.files().cloned().collect();
        self.current.store(Arc::new(fresh));
        Ok(files)
    }

    /// Whether the files on disk differ from what was last loaded or tried.
    pub fn changed_on_disk(&self) -> bool {
        !self.paths.is_empty()
            && fingerprints(&self.paths) != *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Builds small databases of both layouts for tests and benchmarks.
#[cfg(any(test, feature = "test-support"))]
pub mod test_support {
    use std::collections::BTreeMap;

    use mmdb_writer::{IpVersion, Writer};
    use serde::Serialize;

    #[derive(Serialize)]
    struct Names {
        names: BTreeMap<&'static str, &'static str>,
    }

    #[derive(Serialize)]
    struct Country {
        iso_code: &'static str,
    }

    #[derive(Serialize)]
    struct City {
        country: Country,
        subdivisions: Vec<Names>,
        city: Names,
    }

    /// A record of the flat ip-location-db / DB-IP layout.
    #[derive(Serialize)]
    struct Flat {
        city: &'static str,
        country_code: &'static str,
        latitude: f64,
        longitude: f64,
        postcode: &'static str,
        state1: &'static str,
        state2: &'static str,
        timezone: &'static str,
    }

    fn names(en: &'static str) -> Names {
        Names {
            names: [("en", en), ("de", "x")].into(),
        }
    }

    /// `(network, country, region, city)`.
    pub type Row = (&'static str, &'static str, &'static str, &'static str);

    /// The rows of [`city_database`].
    pub const ROWS: &[Row] = &[
        ("81.2.69.0/24", "GB", "England", "London"),
        ("89.160.20.0/24", "SE", "Östergötland County", "Linköping"),
        ("2001:218::/32", "JP", "Tokyo", "Chiyoda"),
        ("2a02:d280::/32", "CZ", "Hlavni mesto Praha", "Prague"),
    ];

    /// The rows of [`flat_databases`]: the same networks, other places, so a
    /// test can tell which database answered.
    pub const FLAT_ROWS: &[Row] = &[
        ("81.2.69.0/24", "GB", "England", "Bracknell"),
        ("89.160.20.0/24", "SE", "Stockholm", "Stockholm"),
        ("2001:218::/32", "JP", "Osaka", "Osaka"),
        ("2a02:d280::/32", "CZ", "South Moravian", "Brno"),
    ];

    /// A GeoIP2-City-shaped database (one file, IPv6 with IPv4 inside)
    /// holding [`ROWS`].
    pub fn city_database() -> Vec<u8> {
        geoip2_database("Venus-Test-City", ROWS)
    }

    /// A GeoIP2-City-shaped database of `rows`.
    pub fn geoip2_database(database_type: &str, rows: &[Row]) -> Vec<u8> {
        let mut writer = Writer::new(database_type);
        for (network, country, region, city) in rows {
            let record = City {
                country: Country { iso_code: country },
                subdivisions: vec![names(region), names("second level")],
                city: names(city),
            };
            writer
                .insert(
                    network
                        .parse::<mmdb_writer::ipnet::IpNet>()
                        .expect("test network"),
                    &record,
                )
                .expect("insert test record");
        }
        writer.to_bytes().expect("write test database")
    }

    /// The flat layout as ip-location-db ships it: an IPv4 file and an IPv6
    /// file (which holds no IPv4 ranges), holding [`FLAT_ROWS`].
    pub fn flat_databases() -> (Vec<u8>, Vec<u8>) {
        (
            flat_database(IpVersion::V4, FLAT_ROWS),
            flat_database(IpVersion::V6, FLAT_ROWS),
        )
    }

    /// A flat-layout database for one address family, of the `rows` of that
    /// family.
    pub fn flat_database(version: IpVersion, rows: &[Row]) -> Vec<u8> {
        let mut writer = Writer::builder("city").ip_version(version).build();
        for (network, country, region, city) in rows {
            let network: mmdb_writer::ipnet::IpNet = network.parse().expect("test network");
            let v4 = matches!(network, mmdb_writer::ipnet::IpNet::V4(_));
            if v4 != (version == IpVersion::V4) {
                continue;
            }
            let record = Flat {
                city,
                country_code: country,
                latitude: 1.5,
                longitude: 2.5,
                postcode: "",
                state1: region,
                state2: "",
                timezone: "UTC",
            };
            writer.insert(network, &record).expect("insert test record");
        }
        writer.to_bytes().expect("write test database")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> GeoIp {
        GeoIp::from_bytes(test_support::city_database()).unwrap()
    }

    #[test]
    fn known_ipv4_address_resolves_to_country_region_city() {
        assert_eq!(
            db().lookup("81.2.69.142".parse().unwrap()),
            Lookup::Hit(Location {
                country: "GB".into(),
                region: "England".into(),
                city: "London".into(),
            })
        );
    }

    #[test]
    fn known_ipv6_address_resolves() {
        let Lookup::Hit(location) = db().lookup("2a02:d280::1".parse().unwrap()) else {
            panic!("expected a hit");
        };
        assert_eq!(location.country, "CZ");
        assert_eq!(location.city, "Prague");
    }

    #[test]
    fn locate_answers_like_lookup_and_remembers_hits_and_misses() {
        let database = db().current();
        for ip in ["81.2.69.142", "10.0.0.1", "2a02:d280::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let first = database.locate(ip);
            assert!(!first.cached, "{ip}");
            let expected = match database.lookup(ip) {
                Lookup::Hit(location) => (location, true),
                Lookup::Miss => (Location::default(), false),
            };
            assert_eq!(((*first.location).clone(), first.found), expected, "{ip}");
            let again = database.locate(ip);
            assert!(again.cached, "{ip}");
            assert_eq!(again.found, first.found);
            assert!(Arc::ptr_eq(&again.location, &first.location));
        }
    }

    #[test]
    fn without_a_cache_every_locate_reads_the_files() {
        let database = Database::from_bytes(vec![test_support::city_database()]).unwrap();
        let ip: IpAddr = "81.2.69.142".parse().unwrap();
        assert!(!database.locate(ip).cached);
        assert!(!database.locate(ip).cached);
    }

    #[test]
    fn private_and_unknown_addresses_miss() {
        let db = db();
        for ip in ["10.1.2.3", "192.168.0.1", "8.8.8.8", "::1", "fd00::1"] {
            assert_eq!(db.lookup(ip.parse().unwrap()), Lookup::Miss, "{ip}");
        }
    }

    #[test]
    fn a_missing_file_is_named_in_the_error() {
        let err = GeoIp::open(&[PathBuf::from("/nope/city.mmdb")])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("/nope/city.mmdb") && err.contains("fetch.sh"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_not_a_database() {
        assert!(GeoIp::from_bytes(b"not a database".to_vec()).is_err());
    }

    fn hit(db: &GeoIp, ip: &str) -> Location {
        match db.lookup(ip.parse().unwrap()) {
            Lookup::Hit(location) => location,
            Lookup::Miss => panic!("{ip}: a miss"),
        }
    }

    #[test]
    fn the_flat_layout_in_two_files_answers_each_family_from_its_own_file() {
        let (v4, v6) = test_support::flat_databases();
        // In either order: the file's own ip_version decides.
        for parts in [vec![v4.clone(), v6.clone()], vec![v6, v4]] {
            let db = GeoIp::from_parts(parts).unwrap();
            let location = hit(&db, "81.2.69.142");
            assert_eq!(
                (
                    location.country.as_str(),
                    location.region.as_str(),
                    location.city.as_str()
                ),
                ("GB", "England", "Bracknell")
            );
            assert_eq!(hit(&db, "2a02:d280::7").city, "Brno");
            // An IPv4-mapped address is the IPv4 address.
            assert_eq!(db.lookup("10.9.9.9".parse().unwrap()), Lookup::Miss);
            let layouts: Vec<&str> = db.current().files().map(|f| f.layout).collect();
            assert_eq!(layouts, ["flat", "flat"]);
        }
    }

    #[test]
    fn compact_tables_are_rebuilt_by_a_reload_and_a_bad_file_keeps_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("city.mmdb");
        let install = |bytes: &[u8]| {
            let staged = dir.path().join("city.mmdb.new");
            std::fs::write(&staged, bytes).unwrap();
            std::fs::rename(&staged, &path).unwrap();
        };
        install(&test_support::city_database());
        let db = GeoIp::open_with(std::slice::from_ref(&path), 0, Residency::Compact).unwrap();
        assert_eq!(hit(&db, "81.2.69.142").city, "London");
        assert!(db.current().files().all(|f| f.compact_bytes.is_some()));

        let moved = [("81.2.69.0/24", "GB", "Scotland", "Edinburgh")];
        install(&test_support::geoip2_database("Venus-Test-City-2", &moved));
        assert!(db.changed_on_disk());
        db.reload().unwrap();
        assert_eq!(hit(&db, "81.2.69.142").city, "Edinburgh");
        assert_eq!(db.lookup("2001:218::1".parse().unwrap()), Lookup::Miss);

        install(b"not a database");
        assert!(db.reload().is_err());
        assert_eq!(hit(&db, "81.2.69.142").city, "Edinburgh");
    }

    #[test]
    fn an_ipv4_only_file_answers_no_ipv6_lookup() {
        let (v4, _) = test_support::flat_databases();
        let db = GeoIp::from_parts(vec![v4]).unwrap();
        assert_eq!(hit(&db, "89.160.20.1").city, "Stockholm");
        assert_eq!(db.lookup("2a02:d280::7".parse().unwrap()), Lookup::Miss);
    }

    #[test]
    fn the_geoip2_layout_is_detected_from_its_records() {
        let db = db();
        let files: Vec<_> = db.current().files().cloned().collect();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].layout, "geoip2");
        assert_eq!(files[0].database_type, "Venus-Test-City");
        assert_eq!(files[0].ip_version, 6);
        assert!(files[0].build_epoch > 1_700_000_000);
    }

    #[test]
    fn two_files_of_one_family_are_refused() {
        let (v4, _) = test_support::flat_databases();
        let err = GeoIp::from_parts(vec![v4.clone(), v4])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("second IPv4 database"), "{err}");
    }

    #[test]
    fn a_database_of_another_kind_is_refused() {
        #[derive(serde::Serialize)]
        struct Asn {
            autonomous_system_number: u32,
        }
        let mut writer = mmdb_writer::Writer::new("GeoLite2-ASN");
        writer
            .insert(
                "81.2.69.0/24".parse::<mmdb_writer::ipnet::IpNet>().unwrap(),
                &Asn {
                    autonomous_system_number: 1,
                },
            )
            .unwrap();
        let err = GeoIp::from_bytes(writer.to_bytes().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("neither the GeoIP2 city layout nor the flat one"),
            "{err}"
        );
    }

    #[test]
    fn a_truncated_database_is_refused() {
        let mut bytes = test_support::city_database();
        bytes.truncate(bytes.len() / 2);
        assert!(GeoIp::from_bytes(bytes.clone()).is_err());
        assert!(Database::from_bytes_with(vec![bytes], Residency::Compact).is_err());
    }

    #[test]
    fn a_damaged_search_tree_is_refused_by_the_compact_load() {
        // The tree's last node points past the data section. Mapped, the
        // file loads (its probe record is elsewhere) and a lookup there
        // misses; the compact load walks every node and refuses the file.
        let mut bytes = test_support::city_database();
        let (start, end) = {
            let reader = maxminddb::Reader::from_source(bytes.as_slice()).unwrap();
            let m = reader.metadata();
            let node = m.record_size as usize * 2 / 8;
            let nodes = m.node_count as usize;
            ((nodes - 1) * node, nodes * node)
        };
        bytes[start..end].fill(0xff);
        assert!(Database::from_bytes(vec![bytes.clone()]).is_ok());
        let error = Database::from_bytes_with(vec![bytes], Residency::Compact)
            .err()
            .expect("refused");
        assert!(
            error.to_string().contains("cannot walk its networks"),
            "{error}"
        );
    }
}
