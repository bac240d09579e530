//! GeoIP lookups against real MaxMind DB files in the GeoLite2 and DB-IP Lite
//! layouts (`tests/data/*.mmdb`, written by `tests/data/make_mmdb.py` with
//! the mmdb-writer package): countries and autonomous systems for IPv4 and
//! IPv6, misses, skipped local addresses, IPv4-mapped addresses, records of
//! unexpected types, broken files, and random addresses and random damage
//! that must never make a lookup panic.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use fleetsnitch::enrichment::geoip::{Geo, GeoIp, GeoIpError, GeoRef, is_private_or_local};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn geo(country: Option<&str>, asn: Option<u32>, as_org: Option<&str>) -> Geo {
    Geo {
        country: country.map(str::to_owned),
        asn,
        as_org: as_org.map(str::to_owned),
    }
}

fn country(code: &str) -> Geo {
    geo(Some(code), None, None)
}

fn assert_lookups(geoip: &GeoIp, cases: &[(&str, Geo)]) {
    for (address, expected) in cases {
        assert_eq!(&geoip.lookup(ip(address)), expected, "lookup of {address}");
        assert_eq!(
            &geoip.lookup_ref(ip(address)).to_geo(),
            expected,
            "lookup_ref of {address}"
        );
    }
    assert_eq!(geoip.lookup_errors(), 0);
}

/// Every supported fixture, country databases first.
const ALL: [&str; 9] = [
    "GeoLite2-Country.mmdb",
    "GeoLite2-Country-IPv4.mmdb",
    "GeoLite2-City.mmdb",
    "dbip-country-lite.mmdb",
    "dbip-city-lite.mmdb",
    "GeoLite2-ASN.mmdb",
    "dbip-asn-lite.mmdb",
    "combined-country-asn.mmdb",
    "odd-types.mmdb",
];

#[test]
fn geoip_is_shared_between_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<GeoIp>();
    send_sync::<GeoIpError>();
}

#[test]
fn metadata_is_that_of_the_real_databases() {
    let geoip = GeoIp::open_all(ALL.map(data)).unwrap();
    let types: Vec<_> = geoip
        .databases()
        .iter()
        .map(|database| database.database_type())
        .collect();
    assert_eq!(
        types,
        [
            "GeoLite2-Country",
            "GeoLite2-Country",
            "GeoLite2-City",
            "DBIP-Country-Lite",
            "DBIP-City-Lite",
            "GeoLite2-ASN",
            "DBIP-ASN-Lite (compat=GeoLite2-ASN)",
            "Fleetsnitch-Test-Country-ASN",
            "Fleetsnitch-Test-Country-ASN",
        ]
    );
    for (database, name) in geoip.databases().iter().zip(ALL) {
        assert_eq!(database.build_epoch(), 1_767_225_600);
        assert_eq!(database.path(), data(name));
    }
    geoip.verify().unwrap();
}

#[test]
fn geolite2_country_v4_and_v6() {
    let geoip = GeoIp::open(Some(&data("GeoLite2-Country.mmdb")), None).unwrap();
    assert_lookups(
        &geoip,
        &[
            ("81.2.69.1", country("GB")),
            ("81.2.69.255", country("GB")),
            ("2001:8b0::1", country("GB")),
            ("2001:8b0:ffff::1", country("GB")),
            ("198.51.100.7", country("DE")),
            ("2001:db8:100::7", country("DE")),
            // Only registered_country in the record.
            ("203.0.113.7", country("JP")),
            ("2001:db8:203::7", country("JP")),
            // country SE wins over registered_country DK.
            ("89.160.20.113", country("SE")),
            ("2001:db8:89::1", country("SE")),
        ],
    );
}

#[test]
fn geolite2_city_v4_and_v6() {
    let geoip = GeoIp::open(Some(&data("GeoLite2-City.mmdb")), None).unwrap();
    assert_lookups(
        &geoip,
        &[
            ("81.2.69.160", country("GB")),
            ("2001:8b0::1", country("GB")),
        ],
    );
}

#[test]
fn geolite2_asn_v4_and_v6() {
    let geoip = GeoIp::open(None, Some(&data("GeoLite2-ASN.mmdb"))).unwrap();
    let aaisp = geo(None, Some(20712), Some("Andrews & Arnold Ltd"));
    assert_lookups(
        &geoip,
        &[
            ("81.2.69.1", aaisp.clone()),
            ("2001:8b0::1", aaisp),
            (
                "198.51.100.1",
                geo(None, Some(64496), Some("Documentation AS 64496")),
            ),
            (
                "2001:db8:100::1",
                geo(None, Some(64497), Some("Documentation AS 64497")),
            ),
            // A 32-bit AS number.
            (
                "203.0.113.1",
                geo(None, Some(4_200_000_001), Some("Private Use AS 4200000001")),
            ),
            (
                "2001:db8:203::1",
                geo(None, Some(4_200_000_001), Some("Private Use AS 4200000001")),
            ),
        ],
    );
}

#[test]
fn geolite2_country_and_asn_together() {
    let geoip = GeoIp::open(
        Some(&data("GeoLite2-Country.mmdb")),
        Some(&data("GeoLite2-ASN.mmdb")),
    )
    .unwrap();
    assert_lookups(
        &geoip,
        &[
            (
                "81.2.69.1",
                geo(Some("GB"), Some(20712), Some("Andrews & Arnold Ltd")),
            ),
            (
                "2001:8b0::1",
                geo(Some("GB"), Some(20712), Some("Andrews & Arnold Ltd")),
            ),
            (
                "2001:db8:100::1",
                geo(Some("DE"), Some(64497), Some("Documentation AS 64497")),
            ),
            // In the country database only.
            ("89.160.20.113", country("SE")),
        ],
    );
}

#[test]
fn dbip_lite_country_asn_and_city() {
    let geoip = GeoIp::open(
        Some(&data("dbip-country-lite.mmdb")),
        Some(&data("dbip-asn-lite.mmdb")),
    )
    .unwrap();
    assert_lookups(
        &geoip,
        &[
            (
                "198.51.100.200",
                geo(Some("FR"), Some(64500), Some("DB-IP Documentation AS")),
            ),
            (
                "2001:db8:100:1::1",
                geo(Some("FR"), Some(64501), Some("DB-IP Documentation AS v6")),
            ),
            ("81.2.69.1", country("GB")),
            ("2001:8b0::1", country("GB")),
        ],
    );

    let city = GeoIp::open(Some(&data("dbip-city-lite.mmdb")), None).unwrap();
    assert_lookups(
        &city,
        &[
            ("198.51.100.1", country("FR")),
            ("2001:db8:100::1", country("IT")),
        ],
    );
}

#[test]
fn combined_database_fills_country_and_asn() {
    for geoip in [
        GeoIp::open(Some(&data("combined-country-asn.mmdb")), None).unwrap(),
        GeoIp::open(None, Some(&data("combined-country-asn.mmdb"))).unwrap(),
        GeoIp::open_all([data("combined-country-asn.mmdb")]).unwrap(),
    ] {
        assert_lookups(
            &geoip,
            &[
                (
                    "198.51.100.1",
                    geo(Some("NL"), Some(64510), Some("Combined Org v4")),
                ),
                (
                    "2001:db8:100::1",
                    geo(Some("NL"), Some(64511), Some("Combined Org v6")),
                ),
                // AS in traits, as GeoIP2-Enterprise has it.
                (
                    "203.0.113.1",
                    geo(Some("BE"), Some(64512), Some("Traits Org")),
                ),
            ],
        );
    }
}

#[test]
fn first_database_wins_field_by_field() {
    // GeoLite2 says DE and AS 64496, DB-IP says FR and AS 64500.
    let geoip = GeoIp::open_all([
        data("GeoLite2-Country.mmdb"),
        data("dbip-country-lite.mmdb"),
        data("dbip-asn-lite.mmdb"),
        data("GeoLite2-ASN.mmdb"),
    ])
    .unwrap();
    assert_lookups(
        &geoip,
        &[
            (
                "198.51.100.1",
                geo(Some("DE"), Some(64500), Some("DB-IP Documentation AS")),
            ),
            // Only GeoLite2-ASN knows 203.0.113.0/24's AS.
            (
                "203.0.113.1",
                geo(
                    Some("JP"),
                    Some(4_200_000_001),
                    Some("Private Use AS 4200000001"),
                ),
            ),
        ],
    );
}

#[test]
fn addresses_outside_every_network_are_empty() {
    let geoip = GeoIp::open_all(ALL.map(data)).unwrap();
    for address in [
        "192.0.2.1",
        "8.8.8.8",
        "1.1.1.1",
        "81.2.70.1",
        "198.51.101.1",
        "2001:db8:ffff::1",
        "2001:db8:101::1",
        "2a00:1450::1",
        "::ffff:192.0.2.1",
    ] {
        let found = geoip.lookup(ip(address));
        assert_eq!(found, Geo::default(), "{address}");
        assert!(found.is_empty());
        assert!(geoip.lookup_ref(ip(address)).is_empty());
    }
    assert_eq!(geoip.lookup_errors(), 0);
}

#[test]
fn local_addresses_are_not_looked_up() {
    // The fixture maps 127.0.0.0/8, 10.0.0.0/8, 169.254.0.0/16, fe80::/10
    // and fd00::/8 to Antarctica, which a real lookup would return.
    let path = data("GeoLite2-Country.mmdb");
    let raw = maxminddb::Reader::open_readfile(&path).unwrap();
    for address in ["127.0.0.1", "10.1.2.3", "169.254.1.1", "fe80::1", "fd00::1"] {
        let iso: Option<String> = raw
            .lookup(ip(address))
            .unwrap()
            .decode_path(&maxminddb::path!["country", "iso_code"])
            .unwrap();
        assert_eq!(iso.as_deref(), Some("AQ"), "raw lookup of {address}");
    }

    let geoip = GeoIp::open(Some(&path), Some(&data("GeoLite2-ASN.mmdb"))).unwrap();
    for address in [
        "127.0.0.1",
        "127.1.2.3",
        "10.1.2.3",
        "169.254.1.1",
        "fe80::1",
        "fd00::1",
        "::1",
        "::",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "192.168.0.1",
        "172.16.0.1",
        "100.64.0.1",
    ] {
        assert!(is_private_or_local(ip(address)), "{address}");
        assert_eq!(geoip.lookup(ip(address)), Geo::default(), "{address}");
        assert_eq!(
            geoip.lookup_ref(ip(address)),
            GeoRef::default(),
            "{address}"
        );
    }
    assert_eq!(geoip.lookup_errors(), 0);
}

#[test]
fn ipv4_mapped_ipv6_is_looked_up_as_ipv4() {
    // The writer put IPv4 under ::/96 only, as some writers do: the mapped
    // form is not in the tree, so a hit proves the address was converted.
    let path = data("GeoLite2-Country.mmdb");
    let raw = maxminddb::Reader::open_readfile(&path).unwrap();
    assert!(!raw.lookup(ip("::ffff:81.2.69.1")).unwrap().has_data());

    let geoip = GeoIp::open(Some(&path), Some(&data("GeoLite2-ASN.mmdb"))).unwrap();
    let expected = geo(Some("GB"), Some(20712), Some("Andrews & Arnold Ltd"));
    assert_eq!(geoip.lookup(ip("::ffff:81.2.69.1")), expected);
    assert_eq!(
        geoip.lookup(IpAddr::V6(Ipv4Addr::new(81, 2, 69, 1).to_ipv6_mapped())),
        expected
    );
    assert_eq!(
        geoip.lookup(ip("::ffff:198.51.100.9")).country.as_deref(),
        Some("DE")
    );

    // The same in an IPv4-only database, which has no IPv6 tree at all.
    let v4 = GeoIp::open(Some(&data("GeoLite2-Country-IPv4.mmdb")), None).unwrap();
    assert_lookups(
        &v4,
        &[
            ("81.2.69.1", country("GB")),
            ("::ffff:81.2.69.1", country("GB")),
            ("2001:8b0::1", Geo::default()),
            ("2001:db8::1", Geo::default()),
        ],
    );
}

#[test]
fn fields_of_unexpected_types_are_empty() {
    let geoip = GeoIp::open_all([data("odd-types.mmdb")]).unwrap();
    assert_lookups(
        &geoip,
        &[
            // country is a string: registered_country; AS number a string,
            // organization a number.
            ("1.0.0.1", country("SE")),
            // iso_code a number, AS number over 32 bits, organization a list.
            ("1.0.1.1", Geo::default()),
            // iso_code of three letters, AS number negative, organization a map.
            ("1.0.2.1", Geo::default()),
            // lower-case iso_code, AS number as uint16, empty organization.
            ("1.0.3.1", geo(None, Some(64496), None)),
            // The record is a string, then an array.
            ("1.0.4.1", Geo::default()),
            ("1.0.5.1", Geo::default()),
            // iso_code as bytes: registered_country; AS number as uint128.
            ("1.0.6.1", geo(Some("FR"), Some(64497), Some("Ok Org"))),
            // Nested values around iso_code are skipped whole.
            ("1.0.7.1", geo(Some("NO"), Some(64498), None)),
        ],
    );
}

fn assert_names_file(error: &GeoIpError, path: &Path) {
    let message = error.to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "{message:?} does not name {}",
        path.display()
    );
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("GeoLite2-Country.mmdb");
    let error = GeoIp::open(Some(&missing), None).unwrap_err();
    assert!(matches!(error, GeoIpError::Read { .. }), "{error:?}");
    assert_names_file(&error, &missing);
    assert!(error.to_string().contains("No such file"), "{error}");

    let error = GeoIp::open(Some(&data("GeoLite2-Country.mmdb")), Some(&missing)).unwrap_err();
    assert_names_file(&error, &missing);

    // A directory cannot be read either.
    let error = GeoIp::open_all([dir.path()]).unwrap_err();
    assert!(matches!(error, GeoIpError::Read { .. }), "{error:?}");
    assert_names_file(&error, dir.path());
}

#[test]
fn files_that_are_not_mmdb_are_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let original = fs::read(data("GeoLite2-ASN.mmdb")).unwrap();
    let cases: [(&str, Vec<u8>); 4] = [
        ("empty.mmdb", Vec::new()),
        ("text.mmdb", b"this is not a MaxMind DB\n".repeat(100)),
        // Cut before the metadata.
        ("truncated.mmdb", original[..original.len() / 2].to_vec()),
        // Valid metadata, but a search tree larger than the file.
        ("short-tree.mmdb", {
            let marker = find_metadata(&original);
            let mut bytes = original[..200].to_vec();
            bytes.extend_from_slice(&original[marker..]);
            bytes
        }),
    ];
    for (name, bytes) in cases {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        let error = GeoIp::open(None, Some(&path)).unwrap_err();
        assert!(
            matches!(error, GeoIpError::Invalid { .. }),
            "{name}: {error:?}"
        );
        assert_names_file(&error, &path);
        assert!(
            error.to_string().contains("not a valid MaxMind DB"),
            "{error}"
        );
    }
}

#[test]
fn unsupported_and_mismatched_database_types_are_errors() {
    let anonymous = data("GeoIP2-Anonymous-IP.mmdb");
    for error in [
        GeoIp::open(Some(&anonymous), None).unwrap_err(),
        GeoIp::open(None, Some(&anonymous)).unwrap_err(),
        GeoIp::open_all([data("GeoLite2-ASN.mmdb"), anonymous.clone()]).unwrap_err(),
    ] {
        assert!(
            matches!(error, GeoIpError::UnsupportedType { .. }),
            "{error:?}"
        );
        assert_names_file(&error, &anonymous);
        assert!(error.to_string().contains("GeoIP2-Anonymous-IP"), "{error}");
    }

    let asn = data("GeoLite2-ASN.mmdb");
    let error = GeoIp::open(Some(&asn), None).unwrap_err();
    assert!(matches!(error, GeoIpError::WrongKind { .. }), "{error:?}");
    assert_names_file(&error, &asn);
    assert!(error.to_string().contains("country"), "{error}");

    let city = data("dbip-city-lite.mmdb");
    let error = GeoIp::open(None, Some(&city)).unwrap_err();
    assert!(matches!(error, GeoIpError::WrongKind { .. }), "{error:?}");
    assert_names_file(&error, &city);
}

/// Where the metadata marker ends (the metadata starts).
fn find_metadata(bytes: &[u8]) -> usize {
    const MARKER: &[u8] = b"\xab\xcd\xefMaxMind.com";
    bytes
        .windows(MARKER.len())
        .rposition(|window| window == MARKER)
        .expect("metadata marker")
        + MARKER.len()
}

/// The data section of a fixture: after the search tree and its 16-byte
/// separator, up to the metadata marker.
fn data_section(path: &Path, bytes: &[u8]) -> std::ops::Range<usize> {
    let reader = maxminddb::Reader::open_readfile(path).unwrap();
    let metadata = reader.metadata();
    let tree = metadata.node_count as usize * metadata.record_size as usize / 4;
    tree + 16..find_metadata(bytes) - 14
}

#[test]
fn corrupt_data_section_fails_lookups_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let original = data("GeoLite2-Country.mmdb");
    let mut bytes = fs::read(&original).unwrap();
    let section = data_section(&original, &bytes);
    for byte in &mut bytes[section] {
        *byte = 0xff;
    }
    let corrupt = dir.path().join("GeoLite2-Country.mmdb");
    fs::write(&corrupt, &bytes).unwrap();

    // The metadata is intact, so it opens; verify finds the damage.
    let geoip = GeoIp::open(Some(&corrupt), Some(&data("GeoLite2-ASN.mmdb"))).unwrap();
    let error = geoip.verify().unwrap_err();
    assert!(matches!(error, GeoIpError::Corrupt { .. }), "{error:?}");
    assert_names_file(&error, &corrupt);

    // Lookups answer what the intact ASN database knows, and count.
    assert_eq!(
        geoip.lookup(ip("81.2.69.1")),
        geo(None, Some(20712), Some("Andrews & Arnold Ltd"))
    );
    assert_eq!(
        geoip.lookup(ip("2001:db8:100::1")),
        geo(None, Some(64497), Some("Documentation AS 64497"))
    );
    assert_eq!(geoip.lookup_errors(), 2);
    // A miss in the tree never reaches the data section.
    assert_eq!(geoip.lookup(ip("192.0.2.1")), Geo::default());
    assert_eq!(geoip.lookup_errors(), 2);
}

/// xorshift64*: reproducible pseudo-random numbers without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn address(&mut self) -> IpAddr {
        let bits = (u128::from(self.next()) << 64) | u128::from(self.next());
        match self.below(4) {
            0 | 1 => IpAddr::V4(Ipv4Addr::from(bits as u32)),
            2 => IpAddr::V6(Ipv6Addr::from(bits)),
            _ => IpAddr::V6(Ipv4Addr::from(bits as u32).to_ipv6_mapped()),
        }
    }
}

/// Networks of the fixtures and what every address in them must give
/// through [`ALL`] (first database wins).
const KNOWN: [(&str, u8, &str, u32); 6] = [
    ("81.2.69.0", 24, "GB", 20712),
    ("2001:8b0::", 32, "GB", 20712),
    ("198.51.100.0", 24, "DE", 64496),
    ("2001:db8:100::", 48, "DE", 64497),
    ("203.0.113.0", 24, "JP", 4_200_000_001),
    ("2001:db8:203::", 48, "JP", 4_200_000_001),
];

fn inside(rng: &mut Rng, network: &str, prefix: u8) -> IpAddr {
    let host = (u128::from(rng.next()) << 64) | u128::from(rng.next());
    match ip(network) {
        IpAddr::V4(v4) => {
            let mask = u32::MAX >> prefix;
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) | (host as u32 & mask)))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX >> prefix;
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) | (host & mask)))
        }
    }
}

#[test]
fn random_addresses_never_panic() {
    let geoip = GeoIp::open_all(ALL.map(data)).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut found = 0;
    for _ in 0..200_000 {
        let address = rng.address();
        let result = geoip.lookup_ref(address);
        if let Some(code) = result.country {
            assert!(
                code.len() == 2 && code.bytes().all(|b| b.is_ascii_uppercase()),
                "{address}: {code:?}"
            );
        }
        if is_private_or_local(address) {
            assert!(result.is_empty(), "{address}");
        }
        if !result.is_empty() {
            found += 1;
        }
    }
    // Random addresses land in the fixtures' few networks only rarely; the
    // fixture networks themselves always answer.
    for (network, prefix, code, asn) in KNOWN {
        for _ in 0..1000 {
            let address = inside(&mut rng, network, prefix);
            let result = geoip.lookup_ref(address);
            assert_eq!(result.country, Some(code), "{address}");
            assert_eq!(result.asn, Some(asn), "{address}");
            found += 1;
        }
    }
    assert!(found >= 6000);
    assert_eq!(geoip.lookup_errors(), 0);
}

#[test]
fn damaged_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let probes: Vec<IpAddr> = KNOWN
        .iter()
        .map(|&(network, _, _, _)| ip(network))
        .chain(["1.0.7.1", "::ffff:81.2.69.1", "89.160.20.113", "8.8.8.8"].map(ip))
        .chain((0..40).map(|_| rng.address()))
        .collect();
    let (mut opened, mut refused, mut failed_lookups) = (0, 0, 0);
    for name in ALL {
        let original = fs::read(data(name)).unwrap();
        // Most damage goes to the search tree and data section, which
        // opening does not read: lookups meet it.
        let before_metadata = (find_metadata(&original) - 14) as u64;
        for round in 0..200 {
            let mut bytes = original.clone();
            if round % 10 == 9 {
                bytes.truncate(rng.below(bytes.len() as u64) as usize);
            } else {
                let span = if round % 4 == 0 {
                    bytes.len() as u64
                } else {
                    before_metadata
                };
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(span) as usize;
                    bytes[at] = rng.next() as u8;
                }
            }
            let path = dir.path().join(name);
            fs::write(&path, &bytes).unwrap();
            match GeoIp::open_all([&path]) {
                Ok(geoip) => {
                    opened += 1;
                    for &address in &probes {
                        if let Some(code) = geoip.lookup(address).country {
                            assert!(code.len() == 2, "{name} {address}: {code:?}");
                        }
                    }
                    let _ = geoip.verify();
                    failed_lookups += geoip.lookup_errors();
                }
                Err(error) => {
                    refused += 1;
                    assert_names_file(&error, &path);
                }
            }
        }
    }
    eprintln!("damaged files: {opened} opened, {refused} refused, {failed_lookups} failed lookups");
    assert!(opened > 0 && refused > 0 && failed_lookups > 0);
}
