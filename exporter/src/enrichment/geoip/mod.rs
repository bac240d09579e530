//! GeoIP: the country and autonomous system of a peer address, read from
//! MaxMind DB (`.mmdb`) files.
//!
//! Both common free layouts are read, and their commercial relatives, since
//! they share field names:
//!
//! | database | `database_type` | fields read |
//! | --- | --- | --- |
//! | MaxMind GeoLite2/GeoIP2 Country, City | `GeoLite2-Country`, `GeoLite2-City`, `GeoIP2-…` | `country.iso_code`, else `registered_country.iso_code` |
//! | MaxMind GeoLite2-ASN, GeoIP2-ISP | `GeoLite2-ASN`, `GeoIP2-ISP` | `autonomous_system_number`, `autonomous_system_organization` |
//! | DB-IP Lite | `DBIP-Country-Lite`, `DBIP-City-Lite`, `DBIP-ASN-Lite (compat=GeoLite2-ASN)` | the same GeoLite2 field names |
//! | GeoIP2-Enterprise | `GeoIP2-Enterprise` | the above, the AS also from `traits.autonomous_system_*` |
//!
//! Every record is searched for every field, so a combined database (country
//! and AS in one record) fills both. With several databases, the first one
//! that has a value wins, field by field; an AS number and its organization
//! always come from the same record.
//!
//! Databases are read into memory at open (not memory-mapped): no `unsafe`,
//! and a database file replaced or truncated in place by an updater while the
//! agent runs cannot crash it. The cost is the files' size in resident memory
//! (a few MB for GeoLite2-Country and -ASN, about 60 MB for -City); reopen to
//! pick up a new file.
//!
//! Lookups take `&self` (share a [`GeoIp`] through an `Arc`), never panic and
//! allocate nothing but the strings of the returned [`Geo`];
//! [`GeoIp::lookup_ref`] allocates nothing at all. Records are decoded by
//! visiting only the wanted keys, borrowing strings from the database buffer.
//! A field of an unexpected type reads as absent; a record that cannot be
//! decoded at all (a corrupt file) reads as empty, is counted in
//! [`GeoIp::lookup_errors`], and the first such failure is logged.

use std::{
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

mod decode;

use decode::{Fields, Lenient};
use maxminddb::{MaxMindDbError, Reader};
use prometheus_client::{metrics::counter::Counter, registry::Registry};

use crate::model::{FailureClass, Failures};

/// The `geoip:` section of the configuration.
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GeoIpConfig {
    /// A country (or city) database: GeoLite2-Country/City or DB-IP country/city lite.
    pub country_database: Option<PathBuf>,
    /// An ASN database: GeoLite2-ASN or DB-IP ASN lite.
    pub asn_database: Option<PathBuf>,
}

impl GeoIpConfig {
    pub fn is_enabled(&self) -> bool {
        self.country_database.is_some() || self.asn_database.is_some()
    }
}

/// What a lookup found. Every field is `None` when no database knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Geo {
    /// ISO 3166-1 alpha-2 code of the country (`country.iso_code`, else
    /// `registered_country.iso_code`), always two upper-case ASCII letters.
    pub country: Option<String>,
    /// Autonomous system number.
    pub asn: Option<u32>,
    /// Autonomous system organization, as the database names it.
    pub as_org: Option<String>,
}

impl Geo {
    /// True when no field is known.
    pub fn is_empty(&self) -> bool {
        self.country.is_none() && self.asn.is_none() && self.as_org.is_none()
    }
}

/// A lookup result borrowed from the databases: no allocation at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct GeoRef<'a> {
    /// See [`Geo::country`].
    pub country: Option<&'a str>,
    /// See [`Geo::asn`].
    pub asn: Option<u32>,
    /// See [`Geo::as_org`].
    pub as_org: Option<&'a str>,
}

impl From<GeoRef<'_>> for Geo {
    fn from(geo: GeoRef<'_>) -> Self {
        geo.to_geo()
    }
}

impl GeoRef<'_> {
    /// True when no field is known.
    pub fn is_empty(&self) -> bool {
        self.country.is_none() && self.asn.is_none() && self.as_org.is_none()
    }

    /// The owned form, allocating the strings.
    pub fn to_geo(&self) -> Geo {
        Geo {
            country: self.country.map(str::to_owned),
            asn: self.asn,
            as_org: self.as_org.map(str::to_owned),
        }
    }

    fn is_complete(&self) -> bool {
        self.country.is_some() && self.asn.is_some()
    }
}

/// Why a GeoIP database could not be opened. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum GeoIpError {
    /// The file could not be read (missing, unreadable, a directory).
    #[error("cannot read GeoIP database {}: {source}", path.display())]
    Read {
        /// The database file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is not a MaxMind DB, or its metadata or layout is broken.
    #[error("GeoIP database {} is not a valid MaxMind DB (.mmdb) file: {source}", path.display())]
    Invalid {
        /// The database file.
        path: PathBuf,
        /// What the reader found wrong.
        source: MaxMindDbError,
    },
    /// The database holds neither country nor AS data.
    #[error(
        "GeoIP database {} has database_type {database_type:?}, which holds neither country nor \
         AS data; use a country, city or ASN database (GeoLite2-Country, GeoLite2-City, \
         GeoLite2-ASN, dbip-country-lite, dbip-city-lite, dbip-asn-lite)",
        path.display()
    )]
    UnsupportedType {
        /// The database file.
        path: PathBuf,
        /// The `database_type` of its metadata.
        database_type: String,
    },
    /// The database was given for one kind of data but holds another (an
    /// ASN database given as the country database, say).
    #[error(
        "GeoIP database {} was given as the {expected} database, but its database_type \
         {database_type:?} holds no {expected} data",
        path.display()
    )]
    WrongKind {
        /// The database file.
        path: PathBuf,
        /// The `database_type` of its metadata.
        database_type: String,
        /// `country` or `ASN`.
        expected: &'static str,
    },
    /// [`GeoIp::verify`] found the file corrupt.
    #[error("GeoIP database {} is corrupt: {source}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What verification found.
        source: MaxMindDbError,
    },
}

/// Which data a database holds, judged from its `database_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provides {
    /// Country codes (Country, City, Enterprise databases).
    pub country: bool,
    /// Autonomous systems (ASN, ISP, Enterprise databases).
    pub asn: bool,
}

impl Provides {
    /// Classifies a `database_type` by its words, case-insensitively:
    /// `Country`, `City`, `Location` or `Enterprise` mean country data;
    /// `ASN`, `ISP` or `Enterprise` mean AS data. So `GeoLite2-City`,
    /// `DBIP-Country-Lite`, `DBIP-Location (compat=City)` and
    /// `DBIP-ASN-Lite (compat=GeoLite2-ASN)` are recognised, and
    /// `GeoIP2-Anonymous-IP` or `GeoIP2-Domain` hold neither.
    pub fn from_database_type(database_type: &str) -> Self {
        let mut provides = Self::default();
        for word in database_type.split(|c: char| !c.is_ascii_alphanumeric()) {
            let is = |name: &str| word.eq_ignore_ascii_case(name);
            if is("country") || is("city") || is("location") || is("enterprise") {
                provides.country = true;
            }
            if is("asn") || is("isp") || is("enterprise") {
                provides.asn = true;
            }
        }
        provides
    }

    fn any(self) -> bool {
        self.country || self.asn
    }
}

/// One opened database.
pub struct Database {
    path: PathBuf,
    provides: Provides,
    reader: Reader<Vec<u8>>,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("path", &self.path)
            .field("database_type", &self.database_type())
            .field("provides", &self.provides)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Reads and parses one database file, whatever its type.
    pub fn open(path: &Path) -> Result<Self, GeoIpError> {
        let bytes = fs::read(path).map_err(|source| GeoIpError::Read {
            path: path.to_owned(),
            source,
        })?;
        let reader = Reader::from_source(bytes).map_err(|source| GeoIpError::Invalid {
            path: path.to_owned(),
            source,
        })?;
        let provides = Provides::from_database_type(&reader.metadata().database_type);
        Ok(Self {
            path: path.to_owned(),
            provides,
            reader,
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `database_type` of its metadata, e.g. `GeoLite2-Country`.
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// When the database was built, in seconds since the Unix epoch.
    pub fn build_epoch(&self) -> u64 {
        self.reader.metadata().build_epoch
    }

    /// Which data its `database_type` says it holds.
    pub fn provides(&self) -> Provides {
        self.provides
    }

    fn unsupported(&self) -> GeoIpError {
        GeoIpError::UnsupportedType {
            path: self.path.clone(),
            database_type: self.database_type().to_owned(),
        }
    }

    fn fields(&self, ip: IpAddr) -> Result<Fields<'_>, MaxMindDbError> {
        Ok(self
            .reader
            .lookup(ip)?
            .decode::<Lenient<Fields<'_>>>()?
            .map(|fields| fields.0)
            .unwrap_or_default())
    }
}

/// Country and AS lookups over one or more opened databases.
#[derive(Debug)]
pub struct GeoIp {
    databases: Vec<Database>,
    lookup_errors: Counter,
    error_logged: AtomicBool,
    /// The last lookup that touched a database failed.
    failing: AtomicBool,
    failures: Failures,
}

impl GeoIp {
    /// Opens a country (or city) database and an ASN database, each
    /// optional. The country database is asked first. A database given for
    /// one kind whose `database_type` does not hold that kind is refused
    /// ([`GeoIpError::WrongKind`]); a combined database given for either
    /// kind fills both. With neither path, every lookup is empty.
    pub fn open(country: Option<&Path>, asn: Option<&Path>) -> Result<Self, GeoIpError> {
        let mut databases = Vec::new();
        for (path, expected) in [(country, "country"), (asn, "ASN")] {
            let Some(path) = path else { continue };
            let database = Database::open(path)?;
            let provides = database.provides();
            if !provides.any() {
                return Err(database.unsupported());
            }
            let fits = if expected == "country" {
                provides.country
            } else {
                provides.asn
            };
            if !fits {
                return Err(GeoIpError::WrongKind {
                    path: path.to_owned(),
                    database_type: database.database_type().to_owned(),
                    expected,
                });
            }
            databases.push(database);
        }
        Ok(Self::from_databases(databases))
    }

    /// Opens databases of any supported kind, each recognised by its
    /// `database_type`, asked in the order given.
    pub fn open_all<I>(paths: I) -> Result<Self, GeoIpError>
    where
        I: IntoIterator,
        I::Item: AsRef<Path>,
    {
        let mut databases = Vec::new();
        for path in paths {
            let database = Database::open(path.as_ref())?;
            if !database.provides().any() {
                return Err(database.unsupported());
            }
            databases.push(database);
        }
        Ok(Self::from_databases(databases))
    }

    fn from_databases(databases: Vec<Database>) -> Self {
        Self {
            databases,
            lookup_errors: Counter::default(),
            error_logged: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            failures: Failures::none(),
        }
    }

    /// Failed lookups are reported to `failures` (`agent_error` events), and
    /// the first lookup that works again after them.
    pub fn reporting_to(mut self, failures: Failures) -> Self {
        self.failures = failures;
        self
    }

    /// Exports the lookups that failed as `fleetsnitch_geoip_lookup_errors_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "geoip_lookup_errors",
            "GeoIP lookups that failed because a database could not be decoded (a corrupt file): country and ASN may be missing",
            self.lookup_errors.clone(),
        );
    }

    /// The databases, in the order they are asked.
    pub fn databases(&self) -> &[Database] {
        &self.databases
    }

    /// Checks every database whole (search tree, data section, metadata).
    /// Opening checks only the metadata and layout, so a file corrupt inside
    /// opens and then fails lookups; this finds it up front, at the cost of
    /// a pass over each file (milliseconds for the Lite databases, longer for
    /// City).
    pub fn verify(&self) -> Result<(), GeoIpError> {
        for database in &self.databases {
            database
                .reader
                .verify()
                .map_err(|source| GeoIpError::Corrupt {
                    path: database.path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Looks up `ip`. Private, loopback, link-local, unspecified, multicast
    /// and similar addresses (see [`is_private_or_local`]) return an empty
    /// [`Geo`] without touching a database; an IPv4-mapped IPv6 address is
    /// looked up as IPv4.
    pub fn lookup(&self, ip: IpAddr) -> Geo {
        self.lookup_ref(ip).to_geo()
    }

    /// [`lookup`](Self::lookup) without allocating: the strings borrow from
    /// the databases.
    pub fn lookup_ref(&self, ip: IpAddr) -> GeoRef<'_> {
        let ip = canonical(ip);
        let mut geo = GeoRef::default();
        if is_private_or_local(ip) {
            return geo;
        }
        let mut failed = false;
        for database in &self.databases {
            if geo.is_complete() {
                break;
            }
            // An IPv4-only database has no IPv6 tree to search.
            if ip.is_ipv6() && database.reader.metadata().ip_version == 4 {
                continue;
            }
            match database.fields(ip) {
                Ok(fields) => fields.merge_into(&mut geo),
                Err(error) => {
                    failed = true;
                    self.record_error(database, ip, &error);
                }
            }
        }
        if !failed && self.failing.load(Ordering::Relaxed) {
            self.failing.store(false, Ordering::Relaxed);
            self.failures.succeeded(FailureClass::GeoIp);
        }
        geo
    }

    /// Lookups that failed because a database could not be decoded (a
    /// corrupt file), since open. Those lookups returned what the other
    /// databases knew.
    pub fn lookup_errors(&self) -> u64 {
        self.lookup_errors.get()
    }

    #[cold]
    fn record_error(&self, database: &Database, ip: IpAddr, error: &MaxMindDbError) {
        self.lookup_errors.inc();
        self.failing.store(true, Ordering::Relaxed);
        self.failures.failed(
            FailureClass::GeoIp,
            format_args!(
                "lookup in {} failed (corrupt database?): {error}",
                database.path.display()
            ),
        );
        if !self.error_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                database = %database.path.display(),
                %ip,
                %error,
                "GeoIP lookup failed: the database looks corrupt; failed lookups are counted \
                 and not logged again"
            );
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// True for addresses that have no location, which lookups skip: private
/// (RFC 1918, IPv6 unique local `fc00::/7`), shared (`100.64.0.0/10`),
/// loopback, link-local, unspecified and "this network" (`0.0.0.0/8`),
/// broadcast and multicast. IPv4-mapped IPv6 addresses are judged as IPv4.
/// Documentation ranges (`192.0.2.0/24`, `198.51.100.0/24`,
/// `203.0.113.0/24`, `2001:db8::/32`) are looked up like public addresses.
pub fn is_private_or_local(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_private_or_local_v4(v4),
        IpAddr::V6(v6) => is_private_or_local_v6(v6),
    }
}

fn is_private_or_local_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (b & 0xc0) == 64)
}

fn is_private_or_local_v6(ip: Ipv6Addr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
}

#[cfg(test)]
mod tests {
    use super::{decode::iso_code, *};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn geoip_classifies_real_database_types() {
        let both = Provides {
            country: true,
            asn: true,
        };
        let country = Provides {
            country: true,
            asn: false,
        };
        let asn = Provides {
            country: false,
            asn: true,
        };
        for (database_type, expected) in [
            ("GeoLite2-Country", country),
            ("GeoLite2-City", country),
            ("GeoIP2-Country", country),
            ("GeoIP2-City-Africa", country),
            ("DBIP-Country-Lite", country),
            ("DBIP-City-Lite", country),
            ("DBIP-Location (compat=City)", country),
            ("GeoLite2-ASN", asn),
            ("GeoIP2-ISP", asn),
            ("DBIP-ASN-Lite (compat=GeoLite2-ASN)", asn),
            ("GeoIP2-Enterprise", both),
            ("Fleetsnitch-Test-Country-ASN", both),
            ("GeoIP2-Anonymous-IP", Provides::default()),
            ("GeoIP2-Domain", Provides::default()),
            ("GeoIP2-Connection-Type", Provides::default()),
            ("", Provides::default()),
        ] {
            assert_eq!(
                Provides::from_database_type(database_type),
                expected,
                "{database_type}"
            );
        }
    }

    #[test]
    fn geoip_private_and_local_addresses_are_skipped() {
        for s in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.1.1",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.127.255.255",
            "255.255.255.255",
            "224.0.0.251",
            "::",
            "::1",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_private_or_local(ip(s)), "{s} should be skipped");
        }
        for s in [
            "81.2.69.1",
            "8.8.8.8",
            "100.128.0.1",
            "100.63.255.255",
            "172.32.0.1",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.7",
            "2001:db8::1",
            "2001:8b0::1",
            "::ffff:81.2.69.1",
        ] {
            assert!(!is_private_or_local(ip(s)), "{s} should be looked up");
        }
    }

    #[test]
    fn geoip_mapped_addresses_become_ipv4() {
        assert_eq!(canonical(ip("::ffff:81.2.69.1")), ip("81.2.69.1"));
        assert_eq!(canonical(ip("2001:db8::1")), ip("2001:db8::1"));
        assert_eq!(canonical(ip("81.2.69.1")), ip("81.2.69.1"));
    }

    #[test]
    fn geoip_iso_codes_are_two_upper_case_letters() {
        assert_eq!(iso_code(Some("GB")), Some("GB"));
        for bad in ["gb", "GBR", "G", "", "G1", "ÉU"] {
            assert_eq!(iso_code(Some(bad)), None, "{bad}");
        }
    }

    #[test]
    fn geoip_as_number_and_organization_come_from_one_record() {
        let mut geo = GeoRef::default();
        Fields {
            as_org: Some("org without number"),
            ..Fields::default()
        }
        .merge_into(&mut geo);
        assert_eq!((geo.asn, geo.as_org), (None, Some("org without number")));
        Fields {
            asn: Some(64496),
            as_org: None,
            ..Fields::default()
        }
        .merge_into(&mut geo);
        // The number replaces the organization found without one.
        assert_eq!((geo.asn, geo.as_org), (Some(64496), None));
        Fields {
            asn: Some(1),
            as_org: Some("later"),
            ..Fields::default()
        }
        .merge_into(&mut geo);
        assert_eq!((geo.asn, geo.as_org), (Some(64496), None));
    }

    #[test]
    fn geoip_loopback_is_not_looked_up() {
        // The fixture holds 127.0.0.0/8 and 10.0.0.0/8 (as Antarctica): a
        // lookup that reached it would say AQ.
        let geoip = GeoIp::open_all([fixture("GeoLite2-Country.mmdb")]).unwrap();
        let database = &geoip.databases()[0];
        assert_eq!(
            database.fields(ip("127.0.0.1")).unwrap().country,
            Some("AQ")
        );
        for s in ["127.0.0.1", "10.1.2.3", "::ffff:127.0.0.1", "fe80::1"] {
            assert_eq!(geoip.lookup_ref(ip(s)), GeoRef::default(), "{s}");
        }
        assert_eq!(geoip.lookup(ip("81.2.69.1")).country.as_deref(), Some("GB"));
    }
}
