#!/usr/bin/env python3
"""Generates the small .mmdb fixtures that exporter/tests/geoip.rs reads.

The generated files are committed next to this script, so the cargo tests do
not need Python. Regenerate them (byte for byte the same: the build epoch is
fixed) with:

    python3 -m venv /tmp/mmdb-venv
    /tmp/mmdb-venv/bin/pip install mmdb-writer==0.2.7 maxminddb==3.2.0
    /tmp/mmdb-venv/bin/python exporter/tests/data/make_mmdb.py

mmdb-writer (PyPI) writes real MaxMind DB files; each one is then read back
with MaxMind's own Python reader (`maxminddb`, PyPI) to check it.

The records copy the layouts of the real databases: MaxMind GeoLite2-Country,
GeoLite2-City and GeoLite2-ASN, DB-IP's dbip-country-lite, dbip-city-lite and
dbip-asn-lite (their `database_type` strings are the real ones), an IPv4-only
country database, a combined country+ASN database, a database whose records
have unexpected types, and an unsupported database type (Anonymous-IP).

Networks: 81.2.69.0/24 and 89.160.20.112/28 as in MaxMind's own test data,
2001:8b0::/32, and the documentation ranges 198.51.100.0/24, 203.0.113.0/24
and 2001:db8::/32 (never 192.0.2.0/24, which the tests use as "in no
network"). Each database answers differently for the same network, so a test
can tell which database an answer came from.
"""

import os
import sys

from mmdb_writer import MMDBWriter, MmdbI32, MmdbU16, MmdbU32, MmdbU64, MmdbU128
from netaddr import IPSet

# 2026-01-01T00:00:00Z: fixed so that a rerun writes identical files.
BUILD_EPOCH = 1767225600

HERE = os.path.dirname(os.path.abspath(__file__))


class FixedEpochWriter(MMDBWriter):
    def _build_meta(self):
        meta = super()._build_meta()
        meta["build_epoch"] = BUILD_EPOCH
        return meta


def names(en, **others):
    # GeoLite2 and DB-IP ship names in several languages, some non-ASCII.
    result = {"en": en}
    for language, name in others.items():
        result[language.replace("_", "-")] = name
    return result


def place(geoname_id, iso_code, en, **others):
    return {
        "geoname_id": MmdbU32(geoname_id),
        "iso_code": iso_code,
        "names": names(en, **others),
    }


CONTINENT_EU = {"code": "EU", "geoname_id": MmdbU32(6255148), "names": names("Europe", de="Europa", ja="ヨーロッパ")}
CONTINENT_AS = {"code": "AS", "geoname_id": MmdbU32(6255147), "names": names("Asia", de="Asien", ja="アジア")}

GB = place(2635167, "GB", "United Kingdom", de="Vereinigtes Königreich", ja="イギリス", zh_CN="英国")
DE = place(2921044, "DE", "Germany", de="Deutschland", ja="ドイツ連邦共和国")
NL = place(2750405, "NL", "Netherlands", de="Niederlande")
SE = place(2661886, "SE", "Sweden", de="Schweden", ja="スウェーデン王国")
DK = place(2623032, "DK", "Denmark", de="Dänemark")
JP = place(1861060, "JP", "Japan", de="Japan", ja="日本")
FR = place(3017382, "FR", "France", de="Frankreich", ja="フランス共和国")
IT = place(3175395, "IT", "Italy", de="Italien", ja="イタリア共和国")


def eu(country):
    # GeoLite2 and DB-IP mark EU members with is_in_european_union.
    return dict(country, is_in_european_union=True)


def write(filename, database_type, networks, ip_version=6, description=None):
    writer = FixedEpochWriter(
        ip_version=ip_version,
        ipv4_compatible=ip_version == 6,
        database_type=database_type,
        languages=["en"],
        description=description or f"fleetsnitch test fixture in the {database_type} layout",
    )
    for cidrs, record in networks:
        writer.insert_network(IPSet(cidrs), record)
    path = os.path.join(HERE, filename)
    writer.to_db_file(path)
    return path


def geolite2_country():
    return write(
        "GeoLite2-Country.mmdb",
        "GeoLite2-Country",
        [
            (["81.2.69.0/24", "2001:8b0::/32"],
             {"continent": CONTINENT_EU, "country": eu(GB), "registered_country": eu(GB)}),
            (["198.51.100.0/24", "2001:db8:100::/48"],
             {"continent": CONTINENT_EU, "country": eu(DE), "registered_country": eu(DE)}),
            # Only registered_country, as GeoLite2 has for some satellite and
            # anycast networks: the lookup falls back to it.
            (["203.0.113.0/24", "2001:db8:203::/48"],
             {"continent": CONTINENT_AS, "registered_country": JP}),
            # Located in one country, registered in another: country wins.
            (["89.160.20.112/28", "2001:db8:89::/48"],
             {"continent": CONTINENT_EU, "country": eu(SE), "registered_country": eu(DK),
              "traits": {"is_anycast": True}}),
            # Not in the real databases: here so that a test can tell that
            # loopback, private and link-local addresses are never looked up.
            (["127.0.0.0/8", "10.0.0.0/8", "169.254.0.0/16", "fe80::/10", "fd00::/8"],
             {"country": place(6697173, "AQ", "Antarctica")}),
            # The benchmarking range the end-to-end tests give their peers
            # (tests/tests/geoip_labels.rs), so real traffic gets a country.
            (["198.18.0.0/15"],
             {"continent": CONTINENT_EU, "country": eu(NL), "registered_country": eu(NL)}),
        ],
    )


def geolite2_country_ipv4_only():
    return write(
        "GeoLite2-Country-IPv4.mmdb",
        "GeoLite2-Country",
        [(["81.2.69.0/24"], {"continent": CONTINENT_EU, "country": eu(GB), "registered_country": eu(GB)})],
        ip_version=4,
    )


def geolite2_city():
    london = {
        "city": {"geoname_id": MmdbU32(2643743), "names": names("London", de="London", ja="ロンドン")},
        "continent": CONTINENT_EU,
        "country": eu(GB),
        "location": {"accuracy_radius": MmdbU16(100), "latitude": 51.5142, "longitude": -0.0931,
                     "time_zone": "Europe/London"},
        "postal": {"code": "EC2V"},
        "registered_country": eu(GB),
        "subdivisions": [{"geoname_id": MmdbU32(6269131), "iso_code": "ENG",
                          "names": names("England", de="England")}],
    }
    return write(
        "GeoLite2-City.mmdb",
        "GeoLite2-City",
        [(["81.2.69.0/24", "2001:8b0::/32"], london)],
    )


def geolite2_asn():
    return write(
        "GeoLite2-ASN.mmdb",
        "GeoLite2-ASN",
        [
            (["81.2.69.0/24", "2001:8b0::/32"],
             {"autonomous_system_number": MmdbU32(20712), "autonomous_system_organization": "Andrews & Arnold Ltd"}),
            (["198.51.100.0/24"],
             {"autonomous_system_number": MmdbU32(64496), "autonomous_system_organization": "Documentation AS 64496"}),
            (["2001:db8:100::/48"],
             {"autonomous_system_number": MmdbU32(64497), "autonomous_system_organization": "Documentation AS 64497"}),
            # A 32-bit AS number, as many are today.
            (["203.0.113.0/24", "2001:db8:203::/48"],
             {"autonomous_system_number": MmdbU32(4200000001),
              "autonomous_system_organization": "Private Use AS 4200000001"}),
            # The end-to-end tests' peers (see geolite2_country).
            (["198.18.0.0/15"],
             {"autonomous_system_number": MmdbU32(64511), "autonomous_system_organization": "Benchmark AS 64511"}),
        ],
    )


def dbip_country_lite():
    return write(
        "dbip-country-lite.mmdb",
        "DBIP-Country-Lite",
        [
            (["198.51.100.0/24", "2001:db8:100::/48"], {"continent": CONTINENT_EU, "country": eu(FR)}),
            (["81.2.69.0/24", "2001:8b0::/32"], {"continent": CONTINENT_EU, "country": eu(GB)}),
        ],
        description="IP to Country Lite by DB-IP (fleetsnitch test fixture)",
    )


def dbip_city_lite():
    def city(en, country, latitude, longitude, region):
        return {
            "city": {"names": names(en)},
            "continent": CONTINENT_EU,
            "country": eu(country),
            "location": {"latitude": latitude, "longitude": longitude},
            "subdivisions": [{"names": names(region)}],
        }

    return write(
        "dbip-city-lite.mmdb",
        "DBIP-City-Lite",
        [
            (["198.51.100.0/24"], city("Paris", FR, 48.8566, 2.35222, "Île-de-France")),
            (["2001:db8:100::/48"], city("Rome", IT, 41.8919, 12.5113, "Lazio")),
        ],
        description="IP to City Lite by DB-IP (fleetsnitch test fixture)",
    )


def dbip_asn_lite():
    return write(
        "dbip-asn-lite.mmdb",
        "DBIP-ASN-Lite (compat=GeoLite2-ASN)",
        [
            (["198.51.100.0/24"],
             {"autonomous_system_number": MmdbU32(64500), "autonomous_system_organization": "DB-IP Documentation AS"}),
            (["2001:db8:100::/48"],
             {"autonomous_system_number": MmdbU32(64501),
              "autonomous_system_organization": "DB-IP Documentation AS v6"}),
        ],
        description="IP to ASN Lite by DB-IP (fleetsnitch test fixture)",
    )


def combined():
    # One database with both country and ASN fields in each record; the last
    # network carries its AS in `traits`, as GeoIP2-Enterprise does.
    return write(
        "combined-country-asn.mmdb",
        "Fleetsnitch-Test-Country-ASN",
        [
            (["198.51.100.0/24"],
             {"country": place(2750405, "NL", "Netherlands"), "autonomous_system_number": MmdbU32(64510),
              "autonomous_system_organization": "Combined Org v4"}),
            (["2001:db8:100::/48"],
             {"country": place(2750405, "NL", "Netherlands"), "autonomous_system_number": MmdbU32(64511),
              "autonomous_system_organization": "Combined Org v6"}),
            (["203.0.113.0/24"],
             {"country": place(2802361, "BE", "Belgium"),
              "traits": {"autonomous_system_number": MmdbU32(64512),
                         "autonomous_system_organization": "Traits Org", "isp": "Traits ISP"}}),
        ],
    )


def odd_types():
    # Records whose fields have unexpected types: each such field must come
    # back empty, the well-typed fields beside it must still be read.
    return write(
        "odd-types.mmdb",
        "Fleetsnitch-Test-Country-ASN",
        [
            # country is a string, not a map: fall back to registered_country.
            (["1.0.0.0/24"],
             {"country": "GB", "registered_country": {"iso_code": "SE"},
              "autonomous_system_number": "AS64496", "autonomous_system_organization": MmdbU32(7)}),
            (["1.0.1.0/24"],
             {"country": {"iso_code": MmdbU16(826)}, "autonomous_system_number": MmdbU64(2**40),
              "autonomous_system_organization": ["not", "a", "string"]}),
            (["1.0.2.0/24"],
             {"country": {"iso_code": "GBR"}, "autonomous_system_number": MmdbI32(-5),
              "autonomous_system_organization": {"en": "a map"}}),
            (["1.0.3.0/24"],
             {"country": {"iso_code": "gb"}, "autonomous_system_number": MmdbU16(64496),
              "autonomous_system_organization": ""}),
            (["1.0.4.0/24"], "a record that is a string"),
            (["1.0.5.0/24"], [MmdbU32(10), MmdbU32(20)]),
            (["1.0.6.0/24"],
             {"country": {"iso_code": b"GB"}, "registered_country": {"iso_code": "FR", "names": names("France")},
              "autonomous_system_number": MmdbU128(64497), "autonomous_system_organization": "Ok Org"}),
            # Nested values before and after the wanted key must be skipped whole.
            (["1.0.7.0/24"],
             {"country": {"names": {"en": "Norway", "extra": [{"deep": [MmdbU32(1), {"x": 2.5}]}]},
                          "iso_code": "NO", "after": {"list": ["a", "b"]}},
              "autonomous_system_number": MmdbU32(64498)}),
        ],
    )


def anonymous_ip():
    return write(
        "GeoIP2-Anonymous-IP.mmdb",
        "GeoIP2-Anonymous-IP",
        [(["198.51.100.0/24"], {"is_anonymous": True, "is_anonymous_vpn": True})],
    )


def check(path):
    """Reads a written file back with MaxMind's Python reader, if installed."""
    try:
        import maxminddb
    except ImportError:
        print(f"{path}: written (maxminddb not installed, not read back)", file=sys.stderr)
        return
    with maxminddb.open_database(path, maxminddb.MODE_MEMORY) as reader:
        meta = reader.metadata()
        count = sum(1 for _ in reader)
        print(f"{os.path.basename(path)}: {meta.database_type}, IPv{meta.ip_version}, "
              f"{meta.node_count} nodes, {count} networks, {os.path.getsize(path)} bytes")


def main():
    for make in (geolite2_country, geolite2_country_ipv4_only, geolite2_city, geolite2_asn,
                 dbip_country_lite, dbip_city_lite, dbip_asn_lite, combined, odd_types, anonymous_ip):
        check(make())


if __name__ == "__main__":
    main()
