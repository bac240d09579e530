//! Arbitrary bytes as a DNS response payload, over both transports.
//!
//! Invariants: no panic (overflow checks are on in fuzz builds), no hang;
//! at most `MAX_ANSWERS` answers; every name and canonical name non-empty,
//! printable lowercase ASCII without empty labels; a payload cut short never
//! yields a (name, address) the whole payload does not; the cache stays
//! within its bound.
//!
//! The DNS module is compiled from the agent's own source rather than by
//! depending on the agent crate, which would build the eBPF programs, SQLite
//! and TLS with sanitizer instrumentation for nothing.

#![no_main]

use std::{net::IpAddr, time::Duration};

use libfuzzer_sys::fuzz_target;

#[path = "../../src/enrichment/dns/mod.rs"]
#[expect(
    dead_code,
    unused_imports,
    reason = "the agent's module; the target uses only part of it"
)]
mod dns;

use dns::{DnsCache, DnsCacheConfig, MAX_ANSWERS, ManualClock, Parsed, Transport};

fn check_name(name: &str) {
    assert!(!name.is_empty(), "empty name");
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()),
        "name {name:?} is not lowercase printable ASCII"
    );
    assert!(
        !name.starts_with('.') && !name.ends_with('.') && !name.contains(".."),
        "name {name:?} has an empty label"
    );
    assert!(name.len() <= 4 * 255, "name {name:?} too long");
}

fn check(parsed: &Parsed) {
    assert!(parsed.answers.len() <= MAX_ANSWERS);
    for answer in &parsed.answers {
        check_name(&answer.name);
        check_name(&answer.canonical);
    }
}

fn pairs(parsed: &Parsed) -> Vec<(&str, IpAddr)> {
    parsed
        .answers
        .iter()
        .map(|a| (a.name.as_str(), a.addr))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    for transport in [Transport::Udp, Transport::Tcp] {
        let Ok(full) = dns::parse(data, transport) else {
            continue;
        };
        check(&full);
        // Cut where the last byte says; compare with the whole.
        let cut_at = data.len() * usize::from(data.last().copied().unwrap_or(0)) / 256;
        if let Ok(cut) = dns::parse(&data[..cut_at], transport) {
            check(&cut);
            // Unless the whole payload's answers were capped, or a later TCP
            // message was damaged after the cut (then the cut one, which
            // cannot see the damage, keeps more).
            if full.answers.len() < MAX_ANSWERS && full.later_error.is_none() {
                let known = pairs(&full);
                for pair in pairs(&cut) {
                    assert!(known.contains(&pair), "{pair:?} only from the cut payload");
                }
            }
        }
    }
    if let Ok(parsed) = dns::parse_captured(data, data.len(), Transport::Udp) {
        check(&parsed);
    }

    let clock = ManualClock::new();
    let mut cache = DnsCache::with_clock(
        DnsCacheConfig {
            max_entries: 8,
            ..DnsCacheConfig::default()
        },
        clock.clone(),
    );
    for (tgid, transport) in [(1, Transport::Udp), (2, Transport::Tcp)] {
        let _ = cache.record_payload(tgid, Some("c"), data, usize::MAX, transport);
        assert!(cache.len() <= 8);
        clock.advance(Duration::from_secs(400));
        cache.purge_expired();
    }
});
