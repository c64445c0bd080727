//! Country, region and city of an IP address, from a MaxMind DB.
//!
//! The gateway reads GeoIP2/GeoLite2-City-shaped databases: `country.iso_code`,
//! the English name of the first (largest) subdivision, the English name of
//! the city. Only these fields are decoded; the rest of a record is skipped.

use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

/// Where an address is, as far as the database knows. Unknown parts are
/// empty strings, as they appear in the Kafka message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    #[error("GeoIP database {path} cannot be read: {source}")]
    Unreadable {
        path: String,
        source: maxminddb::MaxMindDbError,
    },
}

pub struct GeoIp {
    reader: maxminddb::Reader<Vec<u8>>,
    database_type: String,
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

impl GeoIp {
    pub fn open(path: &Path) -> Result<Self, GeoIpError> {
        let shown = path.display().to_string();
        if !path.exists() {
            return Err(GeoIpError::Missing { path: shown });
        }
        let reader =
            maxminddb::Reader::open_readfile(path).map_err(|source| GeoIpError::Unreadable {
                path: shown.clone(),
                source,
            })?;
        Ok(Self::from_reader(reader))
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GeoIpError> {
        let reader =
            maxminddb::Reader::from_source(bytes).map_err(|source| GeoIpError::Unreadable {
                path: "<memory>".into(),
                source,
            })?;
        Ok(Self::from_reader(reader))
    }

    fn from_reader(reader: maxminddb::Reader<Vec<u8>>) -> Self {
        let database_type = reader.metadata().database_type.clone();
        Self {
            reader,
            database_type,
        }
    }

    /// The database's own name for its type, e.g. `GeoLite2-City`.
    pub fn database_type(&self) -> &str {
        &self.database_type
    }

    /// Looks `ip` up. A record that cannot be decoded counts as a miss: a
    /// damaged record must not fail an upload.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        let Ok(result) = self.reader.lookup(ip) else {
            return Lookup::Miss;
        };
        match result.decode::<CityRecord>() {
            Ok(Some(record)) => {
                let country = record
                    .country
                    .and_then(|c| c.iso_code)
                    .unwrap_or_default()
                    .to_owned();
                let region = record
                    .subdivisions
                    .as_ref()
                    .and_then(|s| s.first())
                    .map(|s| s.english().to_owned())
                    .unwrap_or_default();
                let city = record
                    .city
                    .as_ref()
                    .map(|c| c.english().to_owned())
                    .unwrap_or_default();
                Lookup::Hit(Location {
                    country,
                    region,
                    city,
                })
            }
            Ok(None) | Err(_) => Lookup::Miss,
        }
    }
}

/// Builds small GeoIP2-City-shaped databases for tests.
#[cfg(any(test, feature = "test-support"))]
pub mod test_support {
    use std::collections::BTreeMap;

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

    fn names(en: &'static str) -> Names {
        Names {
            names: [("en", en), ("de", "x")].into(),
        }
    }

    /// `(network, country, region, city)` rows of the test database.
    pub const ROWS: &[(&str, &str, &str, &str)] = &[
        ("81.2.69.0/24", "GB", "England", "London"),
        ("89.160.20.0/24", "SE", "Östergötland County", "Linköping"),
        ("2001:218::/32", "JP", "Tokyo", "Chiyoda"),
        ("2a02:d280::/32", "CZ", "Hlavni mesto Praha", "Prague"),
    ];

    /// A GeoIP2-City-shaped database holding [`ROWS`].
    pub fn city_database() -> Vec<u8> {
        let mut writer = mmdb_writer::Writer::new("Venus-Test-City");
        for (network, country, region, city) in ROWS {
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
    fn private_and_unknown_addresses_miss() {
        let db = db();
        for ip in ["10.1.2.3", "192.168.0.1", "8.8.8.8", "::1", "fd00::1"] {
            assert_eq!(db.lookup(ip.parse().unwrap()), Lookup::Miss, "{ip}");
        }
    }

    #[test]
    fn a_missing_file_is_named_in_the_error() {
        let err = GeoIp::open(Path::new("/nope/city.mmdb"))
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
}
