//! The DNS parser against a few hundred thousand damaged messages, on the
//! stable toolchain: bit flips, compression pointers aimed anywhere, counts
//! and lengths overwritten, truncations and splices of the real responses in
//! the fuzz seed corpus. Catches panics and hangs in CI without nightly;
//! `scripts/fuzz.sh` runs the coverage-guided fuzzer on the same invariants.
//!
//! `DNS_MUTATION_CASES` (default 300000) and `DNS_MUTATION_SECONDS` (default
//! 60) bound the run; the seed is fixed so a failure reproduces.

use std::{
    collections::HashSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use fleetsnitch::enrichment::dns::{
    Answer, DnsCache, DnsCacheConfig, MAX_ANSWERS, ManualClock, Parsed, Transport, parse,
    parse_captured,
};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/dns_response");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    assert!(seeds.len() >= 10, "seed corpus missing from {dir}");
    // Each seed also without/with a TCP length prefix, so both transports
    // start from well-formed input.
    let extra: Vec<Vec<u8>> = seeds
        .iter()
        .map(|seed| {
            let mut framed = (seed.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(seed);
            framed
        })
        .collect();
    seeds.extend(extra);
    seeds
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    const INTERESTING: [u8; 10] = [0x00, 0x01, 0x3f, 0x40, 0x7f, 0x80, 0xc0, 0xc1, 0xfe, 0xff];
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(10) {
            0 | 1 if len > 0 => {
                let at = rng.below(len);
                input[at] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let at = rng.below(len);
                input[at] = INTERESTING[rng.below(INTERESTING.len())];
            }
            3 if len > 1 => {
                // A compression pointer to anywhere (often backwards, often
                // at itself, sometimes past the end).
                let at = rng.below(len - 1);
                let target = rng.below(len + 16) as u16 & 0x3fff;
                input[at..at + 2].copy_from_slice(&(0xc000 | target).to_be_bytes());
            }
            4 if len > 1 => {
                // A 16-bit field (a count, a TYPE, an RDLENGTH, the TCP prefix).
                let at = rng.below(len - 1);
                let value = match rng.below(3) {
                    0 => 0xffff,
                    1 => rng.below(8) as u16,
                    _ => rng.next() as u16,
                };
                input[at..at + 2].copy_from_slice(&value.to_be_bytes());
            }
            5 => input.truncate(rng.below(len + 1)),
            6 if len > 0 => {
                // Duplicate a slice (repeated labels, records).
                let from = rng.below(len);
                let to = from + rng.below((len - from).min(64) + 1);
                let at = rng.below(len + 1);
                let chunk = input[from..to].to_vec();
                input.splice(at..at, chunk);
            }
            7 if len > 0 => {
                let from = rng.below(len);
                let to = from + rng.below((len - from).min(32) + 1);
                input.drain(from..to);
            }
            8 => {
                // Splice the tail of another seed.
                let other = &seeds[rng.below(seeds.len())];
                let at = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            _ => {
                let at = rng.below(len + 1);
                let byte = rng.byte();
                input.insert(at, byte);
            }
        }
    }
}

/// What every answer must look like, whatever the input.
fn check_name(name: &str, input: &[u8]) {
    assert!(!name.is_empty(), "empty name from {input:02x?}");
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()),
        "name {name:?} not lowercase printable ASCII, from {input:02x?}"
    );
    assert!(
        !name.starts_with('.') && !name.ends_with('.') && !name.contains(".."),
        "name {name:?} has an empty label, from {input:02x?}"
    );
    assert!(name.len() <= 4 * 255, "name {name:?} too long");
}

fn check(parsed: &Parsed, input: &[u8]) {
    assert!(parsed.answers.len() <= MAX_ANSWERS);
    for answer in &parsed.answers {
        check_name(&answer.name, input);
        check_name(&answer.canonical, input);
    }
}

fn pairs(answers: &[Answer]) -> HashSet<(&str, IpAddr)> {
    answers.iter().map(|a| (a.name.as_str(), a.addr)).collect()
}

/// A payload cut short never yields an answer the whole payload does not.
fn check_cut_invents_nothing(rng: &mut Rng, input: &[u8], transport: Transport) {
    let Ok(full) = parse(input, transport) else {
        return;
    };
    // A capped whole, or a later TCP message damaged after the cut point (the
    // cut payload cannot see the damage and keeps more), proves nothing.
    if full.answers.len() >= MAX_ANSWERS || full.later_error.is_some() {
        return;
    }
    let cut = &input[..rng.below(input.len() + 1)];
    let Ok(partial) = parse(cut, transport) else {
        return;
    };
    check(&partial, cut);
    let known = pairs(&full.answers);
    for pair in pairs(&partial.answers) {
        assert!(
            known.contains(&pair),
            "{pair:?} from a cut ({} of {} bytes, {transport:?}) of {input:02x?} but not from the whole",
            cut.len(),
            input.len()
        );
    }
}

#[test]
fn mutated_responses_never_panic_and_answers_stay_sane() {
    let cases: usize = std::env::var("DNS_MUTATION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let budget = Duration::from_secs(
        std::env::var("DNS_MUTATION_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    let seeds = seeds();
    let mut rng = Rng(0x5eed_f1ee_75a1_7c40);
    let clock = ManualClock::new();
    let mut cache = DnsCache::with_clock(
        DnsCacheConfig {
            max_entries: 512,
            ..DnsCacheConfig::default()
        },
        clock.clone(),
    );
    let started = Instant::now();
    let mut answered = 0usize;
    let mut ran = 0usize;
    let mut slowest = Duration::ZERO;
    while ran < cases && started.elapsed() < budget {
        let mut input = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &mut input, &seeds);
        let transport = if rng.below(2) == 0 {
            Transport::Udp
        } else {
            Transport::Tcp
        };
        let one = Instant::now();
        for transport in [Transport::Udp, Transport::Tcp] {
            if let Ok(parsed) = parse(&input, transport) {
                check(&parsed, &input);
                answered += usize::from(!parsed.answers.is_empty());
            }
        }
        if let Ok(parsed) = parse_captured(&input, input.len(), Transport::Udp) {
            check(&parsed, &input);
        }
        slowest = slowest.max(one.elapsed());
        check_cut_invents_nothing(&mut rng, &input, transport);
        if ran.is_multiple_of(16) {
            let tgid = rng.below(8) as u32;
            let container = ["", "a", "b"][rng.below(3)];
            let _ = cache.record_payload(tgid, Some(container), &input, input.len(), transport);
            assert!(cache.len() <= 512);
            clock.advance(Duration::from_secs(rng.below(30) as u64));
        }
        ran += 1;
    }
    eprintln!(
        "{ran} mutated payloads in {:.1?}, {answered} parses gave answers, slowest case {slowest:?}",
        started.elapsed()
    );
    assert!(ran >= 10_000, "only {ran} cases ran in {budget:?}");
    assert!(
        answered > 0,
        "no mutated payload gave an answer: mutations too destructive"
    );
}
