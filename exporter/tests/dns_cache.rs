//! The DNS answer cache: whose answer names an address, expiry on an
//! injected clock, the memory bound, process exit, counters.

use std::{net::IpAddr, time::Duration};

use fleetsnitch::enrichment::dns::{
    Answer, DnsCache, DnsCacheConfig, DnsError, DnsStats, DomainSource, ManualClock, Transport,
};

const MINUTE: Duration = Duration::from_secs(60);

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn answer(name: &str, addr: &str, ttl: u32) -> Answer {
    Answer {
        name: name.to_owned(),
        canonical: name.to_owned(),
        addr: ip(addr),
        ttl,
    }
}

fn cache(config: DnsCacheConfig) -> (DnsCache<ManualClock>, ManualClock) {
    let clock = ManualClock::new();
    (DnsCache::with_clock(config, clock.clone()), clock)
}

fn default_cache() -> (DnsCache<ManualClock>, ManualClock) {
    cache(DnsCacheConfig::default())
}

#[test]
fn two_programs_two_names_one_address() {
    let (mut dns, _) = default_cache();
    // Both names are served by one CDN address; each program resolved its own.
    dns.record(100, None, &[answer("shop.example", "198.51.100.7", 60)]);
    dns.record(200, None, &[answer("blog.example", "198.51.100.7", 60)]);
    let addr = ip("198.51.100.7");
    assert_eq!(
        dns.domain_for(100, None, addr).as_deref(),
        Some("shop.example")
    );
    assert_eq!(
        dns.domain_for(200, None, addr).as_deref(),
        Some("blog.example")
    );
    // A third program that resolved nothing gets nothing: no global guessing.
    assert_eq!(dns.domain_for(300, None, addr), None);
}

#[test]
fn process_answer_wins_over_container_answer() {
    let (mut dns, clock) = default_cache();
    let addr = ip("192.0.2.1");
    // Process 1 resolved a.example; later process 2 of the same container
    // resolved b.example to the same address.
    dns.record(1, Some("ctr-a"), &[answer("a.example", "192.0.2.1", 60)]);
    clock.advance(Duration::from_secs(1));
    dns.record(2, Some("ctr-a"), &[answer("b.example", "192.0.2.1", 60)]);

    let own = dns.resolve(1, Some("ctr-a"), addr).unwrap();
    assert_eq!(&*own.name, "a.example");
    assert_eq!(own.source, DomainSource::Process);
    // Process 3 of the container resolved nothing: the container's most
    // recent answer.
    let shared = dns.resolve(3, Some("ctr-a"), addr).unwrap();
    assert_eq!(&*shared.name, "b.example");
    assert_eq!(shared.source, DomainSource::Container);
    // Another container, or no container: nothing.
    assert_eq!(dns.domain_for(3, Some("ctr-b"), addr), None);
    assert_eq!(dns.domain_for(3, None, addr), None);
    assert_eq!(dns.domain_for(3, Some(""), addr), None);
}

#[test]
fn most_recent_answer_of_the_process_wins() {
    let (mut dns, clock) = default_cache();
    let addr = ip("192.0.2.9");
    dns.record(7, None, &[answer("old.example", "192.0.2.9", 600)]);
    clock.advance(Duration::from_secs(5));
    dns.record(7, None, &[answer("new.example", "192.0.2.9", 600)]);
    assert_eq!(
        dns.domain_for(7, None, addr).as_deref(),
        Some("new.example")
    );
    assert_eq!(dns.len(), 1);
}

#[test]
fn canonical_name_is_kept() {
    let (mut dns, _) = default_cache();
    let mut cdn = answer("www.example", "203.0.113.5", 60);
    cdn.canonical = "edge.cdn.example".to_owned();
    dns.record(1, None, &[cdn]);
    let resolved = dns.resolve(1, None, ip("203.0.113.5")).unwrap();
    assert_eq!(&*resolved.name, "www.example");
    assert_eq!(&*resolved.canonical, "edge.cdn.example");
}

#[test]
fn entries_expire_at_the_larger_of_ttl_and_minimum() {
    let (mut dns, clock) = cache(DnsCacheConfig {
        min_ttl: 5 * MINUTE,
        ..DnsCacheConfig::default()
    });
    dns.record(
        1,
        None,
        &[
            answer("short.example", "192.0.2.1", 30),  // lives 5 min
            answer("long.example", "192.0.2.2", 3600), // lives 1 h
        ],
    );
    clock.advance(5 * MINUTE - Duration::from_secs(1));
    assert!(dns.domain_for(1, None, ip("192.0.2.1")).is_some());
    clock.advance(Duration::from_secs(1));
    assert_eq!(dns.domain_for(1, None, ip("192.0.2.1")), None);
    assert!(dns.domain_for(1, None, ip("192.0.2.2")).is_some());
    assert_eq!(dns.purge_expired(), 1);
    assert_eq!(dns.len(), 1);
    clock.advance(55 * MINUTE);
    assert_eq!(dns.domain_for(1, None, ip("192.0.2.2")), None);
    assert_eq!(dns.purge_expired(), 1);
    assert!(dns.is_empty());
    assert_eq!(dns.stats().expirations, 2);
}

#[test]
fn huge_ttls_are_capped() {
    let (mut dns, clock) = cache(DnsCacheConfig {
        max_ttl: Duration::from_secs(3600),
        ..DnsCacheConfig::default()
    });
    dns.record(
        1,
        None,
        &[answer("forever.example", "192.0.2.1", i32::MAX as u32)],
    );
    clock.advance(Duration::from_secs(3600));
    assert_eq!(dns.domain_for(1, None, ip("192.0.2.1")), None);
}

#[test]
fn re_recording_refreshes_the_expiry() {
    let (mut dns, clock) = default_cache();
    dns.record(1, None, &[answer("a.example", "192.0.2.1", 0)]);
    clock.advance(4 * MINUTE);
    dns.record(1, None, &[answer("a.example", "192.0.2.1", 0)]);
    clock.advance(4 * MINUTE);
    assert!(dns.domain_for(1, None, ip("192.0.2.1")).is_some());
}

#[test]
fn eviction_keeps_the_cache_bounded_and_drops_the_oldest() {
    let (mut dns, clock) = cache(DnsCacheConfig {
        max_entries: 100,
        ..DnsCacheConfig::default()
    });
    for i in 0..1000u32 {
        let addr = format!("10.0.{}.{}", i / 256, i % 256);
        dns.record(i % 7 + 1, Some("ctr"), &[answer("x.example", &addr, 3600)]);
        clock.advance(Duration::from_millis(1));
        assert!(dns.len() <= 100);
    }
    assert_eq!(dns.len(), 100);
    // 2 entries per answer (process and container): 2000 inserted, 100 kept.
    assert_eq!(dns.stats().evictions, 1900);
    assert_eq!(dns.stats().answers_recorded, 1000);
    // The newest answers survived, the oldest did not.
    assert!(
        dns.domain_for(999 % 7 + 1, Some("ctr"), ip("10.0.3.231"))
            .is_some()
    );
    assert_eq!(dns.domain_for(1, Some("ctr"), ip("10.0.0.0")), None);
}

#[test]
fn expired_entries_make_room_before_live_ones_are_evicted() {
    let (mut dns, clock) = cache(DnsCacheConfig {
        max_entries: 2,
        min_ttl: Duration::from_secs(10),
        ..DnsCacheConfig::default()
    });
    dns.record(1, None, &[answer("old.example", "192.0.2.1", 10)]);
    clock.advance(Duration::from_secs(5));
    dns.record(1, None, &[answer("mid.example", "192.0.2.2", 3600)]);
    clock.advance(Duration::from_secs(6)); // old.example expired
    dns.record(1, None, &[answer("new.example", "192.0.2.3", 3600)]);
    assert_eq!(dns.stats().evictions, 0);
    assert_eq!(dns.stats().expirations, 1);
    assert!(dns.domain_for(1, None, ip("192.0.2.2")).is_some());
    assert!(dns.domain_for(1, None, ip("192.0.2.3")).is_some());
}

#[test]
fn exited_process_answers_last_through_the_grace() {
    let (mut dns, clock) = cache(DnsCacheConfig {
        exit_grace: Duration::from_secs(10),
        ..DnsCacheConfig::default()
    });
    let addr = ip("192.0.2.1");
    dns.record(42, Some("ctr"), &[answer("a.example", "192.0.2.1", 3600)]);
    dns.forget_process(42);
    // The last drain after the exit still finds the process's answer.
    clock.advance(Duration::from_secs(9));
    assert_eq!(
        dns.resolve(42, Some("ctr"), addr).unwrap().source,
        DomainSource::Process
    );
    clock.advance(Duration::from_secs(1));
    // Gone for the process (a reused tgid inherits nothing), kept for the
    // container.
    assert_eq!(dns.domain_for(42, None, addr), None);
    assert_eq!(
        dns.resolve(42, Some("ctr"), addr).unwrap().source,
        DomainSource::Container
    );
    assert_eq!(dns.purge_expired(), 1);
    assert_eq!(dns.len(), 1);
    // Forgetting an unknown process is harmless.
    dns.forget_process(4242);
}

#[test]
fn unknown_process_zero_is_never_a_shared_bucket() {
    let (mut dns, _) = default_cache();
    let addr = ip("192.0.2.1");
    assert_eq!(
        dns.record(0, None, &[answer("a.example", "192.0.2.1", 60)]),
        0
    );
    assert_eq!(dns.domain_for(0, None, addr), None);
    // With a container, the answer still counts for the container.
    dns.record(0, Some("ctr"), &[answer("a.example", "192.0.2.1", 60)]);
    assert_eq!(dns.len(), 1);
    assert_eq!(
        dns.domain_for(5, Some("ctr"), addr).as_deref(),
        Some("a.example")
    );
}

#[test]
fn zero_capacity_records_nothing() {
    let (mut dns, _) = cache(DnsCacheConfig {
        max_entries: 0,
        ..DnsCacheConfig::default()
    });
    assert_eq!(
        dns.record(1, None, &[answer("a.example", "192.0.2.1", 60)]),
        0
    );
    assert!(dns.is_empty());
}

#[test]
fn record_payload_parses_and_counts() {
    let (mut dns, _) = default_cache();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/dns_response");
    let read = |name: &str| std::fs::read(format!("{dir}/{name}")).unwrap();

    let one = read("udp-shared-one.bin");
    let two = read("tcp-a.bin");
    assert_eq!(
        dns.record_payload(1, None, &one, one.len(), Transport::Udp),
        Ok(1)
    );
    assert_eq!(
        dns.record_payload(2, None, &two, two.len(), Transport::Tcp),
        Ok(1)
    );
    assert_eq!(
        dns.domain_for(1, None, ip("198.51.100.7")).as_deref(),
        Some("cdn-one.test")
    );
    assert_eq!(
        dns.domain_for(2, None, ip("192.0.2.10")).as_deref(),
        Some("example.test")
    );

    // A query (QR=0): ignored, not a failure.
    let mut query = one.clone();
    query[2] &= 0x7f;
    assert_eq!(
        dns.record_payload(1, None, &query, query.len(), Transport::Udp),
        Err(DnsError::NotAResponse)
    );
    // Garbage: a failure.
    assert!(
        dns.record_payload(1, None, &[1, 2, 3], 3, Transport::Udp)
            .is_err()
    );
    // A TCP payload whose second message is damaged: the first one's answer
    // counts, and so does the failure.
    let mut pipelined = two.clone();
    pipelined.extend([0x00, 0x03, 0xff, 0xff, 0xff]);
    assert_eq!(
        dns.record_payload(4, None, &pipelined, pipelined.len(), Transport::Tcp),
        Ok(1)
    );
    // Cut by the capture limit: the complete records count.
    let big = read("tcp-big.bin");
    assert_eq!(
        dns.record_payload(3, None, &big[..512], big.len(), Transport::Tcp),
        Ok((512 - 28) / 16)
    );

    assert_eq!(
        dns.stats(),
        DnsStats {
            answers_recorded: 3 + (512 - 28) / 16,
            parse_failures: 2,
            ignored_messages: 1,
            truncated_payloads: 1,
            evictions: 0,
            expirations: 0,
        }
    );
    // The shared counters read the same, without the cache.
    let counters = dns.counters().clone();
    assert_eq!(counters.snapshot(), dns.stats());
}
