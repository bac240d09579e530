//! The DNS response parser on real wire messages: hand-written bytes, and
//! responses captured from dnsmasq (`exporter/fuzz/seeds/`, made by
//! `exporter/fuzz/seeds/capture.py`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use fleetsnitch::enrichment::dns::{
    Answer, DnsError, MAX_ANSWERS, Transport, parse, parse_captured, parse_response,
};

fn seed(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/fuzz/seeds/dns_response/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn answer(name: &str, canonical: &str, addr: IpAddr, ttl: u32) -> Answer {
    Answer {
        name: name.to_owned(),
        canonical: canonical.to_owned(),
        addr,
        ttl,
    }
}

/// Wire-format builder for the cases below; every byte is spelt out.
mod wire {
    pub const QR: u16 = 0x8000;
    pub const RD_RA: u16 = 0x0180;
    pub const RESPONSE: u16 = QR | RD_RA;

    /// Header: id 0x1234, `flags`, counts (qd, an, ns, ar).
    pub fn header(flags: u16, qd: u16, an: u16) -> Vec<u8> {
        let mut out = vec![0x12, 0x34];
        for word in [flags, qd, an, 0, 0] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out
    }

    /// An uncompressed name: length-prefixed labels and the root label.
    pub fn name(dotted: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in dotted.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// A compression pointer to `offset`.
    pub fn ptr(offset: u16) -> Vec<u8> {
        (0xC000 | offset).to_be_bytes().to_vec()
    }

    /// Question: name, QTYPE, QCLASS IN.
    pub fn question(name: &[u8], qtype: u16) -> Vec<u8> {
        let mut out = name.to_vec();
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out
    }

    /// Resource record: owner, TYPE, CLASS, TTL, RDLENGTH, RDATA.
    pub fn rr(owner: &[u8], rtype: u16, class: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
        let mut out = owner.to_vec();
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&class.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(rdata);
        out
    }

    pub const A: u16 = 1;
    pub const CNAME: u16 = 5;
    pub const AAAA: u16 = 28;
    pub const IN: u16 = 1;
    pub const CH: u16 = 3;
    /// Offset of the question name, right after the 12-byte header.
    pub const QNAME: u16 = 12;

    pub fn message(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    /// The TCP framing: 2-byte big-endian length, then the message.
    pub fn tcp(message: &[u8]) -> Vec<u8> {
        let mut out = (message.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(message);
        out
    }
}

use wire::{A, AAAA, CH, CNAME, IN, QNAME, RESPONSE};

/// example.com A 93.184.216.34, TTL 3600, every byte by hand.
const A_RESPONSE: &[u8] = &[
    0xab, 0xcd, // ID
    0x81, 0x80, // QR=1 opcode=QUERY RD=1 RA=1 RCODE=NOERROR
    0x00, 0x01, // QDCOUNT 1
    0x00, 0x01, // ANCOUNT 1
    0x00, 0x00, // NSCOUNT 0
    0x00, 0x00, // ARCOUNT 0
    // offset 12, question: 7"example" 3"com" 0, type A, class IN
    0x07, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0x03, b'c', b'o', b'm', 0x00, //
    0x00, 0x01, 0x00, 0x01, //
    // answer: owner = pointer to offset 12, type A, class IN, TTL 3600, RDLENGTH 4
    0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x0e, 0x10, 0x00, 0x04, //
    93, 184, 216, 34,
];

#[test]
fn a_record() {
    assert_eq!(
        parse_response(A_RESPONSE, Transport::Udp).unwrap(),
        vec![answer(
            "example.com",
            "example.com",
            v4(93, 184, 216, 34),
            3600
        )]
    );
}

#[test]
fn a_record_over_tcp() {
    let parsed = parse(&wire::tcp(A_RESPONSE), Transport::Tcp).unwrap();
    assert_eq!(parsed.answers.len(), 1);
    assert!(!parsed.truncated);
    assert_eq!(parsed.answers[0].addr, v4(93, 184, 216, 34));
}

#[test]
fn aaaa_record() {
    let addr: Ipv6Addr = "2606:2800:220:1:248:1893:25c8:1946".parse().unwrap();
    let msg = wire::message(&[
        wire::header(RESPONSE, 1, 1),
        wire::question(&wire::name("ipv6.example.org"), AAAA),
        wire::rr(&wire::ptr(QNAME), AAAA, IN, 60, &addr.octets()),
    ]);
    assert_eq!(
        parse_response(&msg, Transport::Udp).unwrap(),
        vec![answer(
            "ipv6.example.org",
            "ipv6.example.org",
            IpAddr::V6(addr),
            60
        )]
    );
}

#[test]
fn cname_chain_is_attributed_to_the_question_name() {
    // www.shop.example CNAME shop.cdn.example (TTL 300)
    // shop.cdn.example CNAME edge-7.cdn.example (TTL 30)
    // edge-7.cdn.example A 198.51.100.1, 198.51.100.2 (TTL 120)
    let qname = wire::name("www.shop.example");
    let hop1 = wire::name("shop.cdn.example");
    let hop2 = wire::name("edge-7.cdn.example");
    let msg = wire::message(&[
        wire::header(RESPONSE, 1, 4),
        wire::question(&qname, A),
        wire::rr(&wire::ptr(QNAME), CNAME, IN, 300, &hop1),
        wire::rr(&hop1, CNAME, IN, 30, &hop2),
        wire::rr(&hop2, A, IN, 120, &[198, 51, 100, 1]),
        wire::rr(&hop2, A, IN, 120, &[198, 51, 100, 2]),
    ]);
    assert_eq!(
        parse_response(&msg, Transport::Udp).unwrap(),
        vec![
            // TTL: the smallest along the chain (30).
            answer(
                "www.shop.example",
                "edge-7.cdn.example",
                v4(198, 51, 100, 1),
                30
            ),
            answer(
                "www.shop.example",
                "edge-7.cdn.example",
                v4(198, 51, 100, 2),
                30
            ),
        ]
    );
}

#[test]
fn cname_chain_from_dnsmasq_with_compressed_targets() {
    // alias.test CNAME www.example.test (120) CNAME example.test (600) A 192.0.2.10 (300)
    assert_eq!(
        parse_response(&seed("udp-cname-chain-a.bin"), Transport::Udp).unwrap(),
        vec![answer("alias.test", "example.test", v4(192, 0, 2, 10), 120)]
    );
    let addr: IpAddr = "2001:db8::10".parse().unwrap();
    assert_eq!(
        parse_response(&seed("tcp-cname-chain-aaaa.bin"), Transport::Tcp).unwrap(),
        vec![answer("alias.test", "example.test", addr, 120)]
    );
}

#[test]
fn names_are_lowercased() {
    // dnsmasq echoes the question as asked: WwW.ExAmPlE.TeSt
    assert_eq!(
        parse_response(&seed("udp-cname-mixed-case.bin"), Transport::Udp).unwrap(),
        vec![answer(
            "www.example.test",
            "example.test",
            v4(192, 0, 2, 10),
            300
        )]
    );
}

#[test]
fn multiple_answers() {
    let answers = parse_response(&seed("udp-multi-a.bin"), Transport::Udp).unwrap();
    // dnsmasq rotates the order of the records.
    let mut addrs: Vec<IpAddr> = answers.iter().map(|a| a.addr).collect();
    addrs.sort();
    assert_eq!(
        addrs,
        [v4(192, 0, 2, 21), v4(192, 0, 2, 22), v4(192, 0, 2, 23)]
    );
    assert!(
        answers
            .iter()
            .all(|a| a.name == "multi.test" && a.ttl == 300)
    );
}

#[test]
fn dnsmasq_a_and_aaaa() {
    assert_eq!(
        parse_response(&seed("udp-a.bin"), Transport::Udp).unwrap(),
        vec![answer(
            "example.test",
            "example.test",
            v4(192, 0, 2, 10),
            300
        )]
    );
    assert_eq!(
        parse_response(&seed("udp-aaaa.bin"), Transport::Udp).unwrap(),
        vec![answer(
            "example.test",
            "example.test",
            "2001:db8::10".parse().unwrap(),
            300
        )]
    );
    assert_eq!(
        parse_response(&seed("tcp-a.bin"), Transport::Tcp).unwrap(),
        vec![answer(
            "example.test",
            "example.test",
            v4(192, 0, 2, 10),
            300
        )]
    );
}

#[test]
fn nxdomain_has_no_answers() {
    assert_eq!(
        parse(&seed("udp-nxdomain.bin"), Transport::Udp).unwrap(),
        Default::default()
    );
    // An NXDOMAIN that still carries an address record gives nothing either.
    let mut msg = wire::message(&[
        wire::header(RESPONSE | 3, 1, 1),
        wire::question(&wire::name("gone.example"), A),
        wire::rr(&wire::ptr(QNAME), A, IN, 60, &[192, 0, 2, 1]),
    ]);
    assert_eq!(parse_response(&msg, Transport::Udp), Ok(vec![]));
    // SERVFAIL likewise.
    msg[3] = 0x82;
    assert_eq!(parse_response(&msg, Transport::Udp), Ok(vec![]));
}

#[test]
fn a_query_is_ignored() {
    // The A response with QR cleared: a query (with an answer section, even).
    let mut query = A_RESPONSE.to_vec();
    query[2] &= 0x7f;
    let error = parse_response(&query, Transport::Udp).unwrap_err();
    assert_eq!(error, DnsError::NotAResponse);
    assert!(!error.is_failure());
    assert_eq!(
        parse_response(&wire::tcp(&query), Transport::Tcp),
        Err(DnsError::NotAResponse)
    );
}

#[test]
fn other_opcodes_and_question_counts_are_ignored() {
    let mut notify = A_RESPONSE.to_vec();
    notify[2] |= 4 << 3; // opcode NOTIFY
    assert_eq!(
        parse_response(&notify, Transport::Udp),
        Err(DnsError::UnsupportedOpcode(4))
    );
    let mut two_questions = A_RESPONSE.to_vec();
    two_questions[5] = 2;
    let error = parse_response(&two_questions, Transport::Udp).unwrap_err();
    assert_eq!(error, DnsError::QuestionCount(2));
    assert!(!error.is_failure());
}

#[test]
fn compression_pointer_loop_is_rejected_quickly() {
    let started = Instant::now();
    // The question name is a pointer to itself (offset 12 -> 12).
    let self_loop = wire::message(&[
        wire::header(RESPONSE, 1, 0),
        wire::ptr(QNAME),
        vec![0, 1, 0, 1],
    ]);
    assert!(matches!(
        parse_response(&self_loop, Transport::Udp),
        Err(DnsError::Malformed(_))
    ));
    // Two records whose owners point at each other: 27 -> 43 -> 27.
    let mut mutual = wire::message(&[
        wire::header(RESPONSE, 1, 2),
        wire::question(&wire::name("a.example"), A), // 12..27
    ]);
    assert_eq!(mutual.len(), 27);
    mutual.extend(wire::rr(&wire::ptr(0), A, IN, 60, &[192, 0, 2, 1])); // at 27, 16 bytes
    mutual.extend(wire::rr(&wire::ptr(27), A, IN, 60, &[192, 0, 2, 2])); // at 43
    mutual[27..29].copy_from_slice(&wire::ptr(43)); // first owner points forward
    assert!(matches!(
        parse_response(&mutual, Transport::Udp),
        Err(DnsError::Malformed(_))
    ));
    // A CNAME whose target is a pointer into its own RDATA.
    let mut own = wire::message(&[
        wire::header(RESPONSE, 1, 1),
        wire::question(&wire::name("b.example"), A), // 12..27
        wire::rr(&wire::ptr(QNAME), CNAME, IN, 60, &[0xc0, 0x00]), // RDATA at 39
    ]);
    let len = own.len();
    own[len - 2..].copy_from_slice(&wire::ptr(39));
    assert!(matches!(
        parse_response(&own, Transport::Udp),
        Err(DnsError::Malformed(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn long_backward_pointer_chains_are_bounded() {
    // A record of an unknown type (99) whose RDATA is 3000 compression
    // pointers, each pointing at the one before it (the first at the question
    // name), then an A record whose owner enters the chain at its end: every
    // pointer points backwards, but there are far more than a name may take.
    let mut msg = wire::header(RESPONSE, 1, 2);
    msg.extend(wire::question(&wire::name("x"), A)); // 12..19
    let rdata_at = (msg.len() + 2 + 10) as u16; // after owner and fixed fields
    let mut chain = wire::ptr(QNAME);
    for i in 1..3000u16 {
        chain.extend(wire::ptr(rdata_at + 2 * (i - 1)));
    }
    msg.extend(wire::rr(&wire::ptr(QNAME), 99, IN, 60, &chain));
    msg.extend(wire::rr(
        &wire::ptr(rdata_at + 2 * 2999),
        A,
        IN,
        60,
        &[192, 0, 2, 1],
    ));
    let started = Instant::now();
    assert!(matches!(
        parse(&msg, Transport::Udp),
        Err(DnsError::Malformed(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn truncated_tcp_keeps_only_complete_records() {
    let full = seed("tcp-big.bin");
    let all = parse(&full, Transport::Tcp).unwrap();
    assert_eq!(all.answers.len(), 80);
    assert!(!all.truncated);
    // dnsmasq compresses every owner: each A record is 16 bytes, after the
    // 2-byte prefix, 12-byte header and 14-byte question (28 bytes).
    for cut in [512usize, 1024, 28 + 16 * 10 + 5, 28 + 16 * 10] {
        let parsed = parse(&full[..cut], Transport::Tcp).unwrap();
        let complete = (cut - 28) / 16;
        assert_eq!(parsed.answers, all.answers[..complete], "cut at {cut}");
        assert!(parsed.truncated, "cut at {cut}");
    }
    // Cut inside the question: nothing can be attributed.
    assert_eq!(parse(&full[..20], Transport::Tcp), Err(DnsError::Truncated));
    // The length prefix alone (or less).
    assert_eq!(parse(&full[..2], Transport::Tcp), Err(DnsError::TooShort));
    assert_eq!(parse(&full[..1], Transport::Tcp), Err(DnsError::TooShort));
}

#[test]
fn complete_tcp_message_with_records_past_its_end_is_malformed() {
    // ANCOUNT says 2, the message (as long as its prefix says) holds one.
    let mut msg = A_RESPONSE.to_vec();
    msg[7] = 2;
    assert!(matches!(
        parse(&wire::tcp(&msg), Transport::Tcp),
        Err(DnsError::Malformed(_))
    ));
    // Over UDP the end may be the capture limit: the complete record counts.
    let parsed = parse(&msg, Transport::Udp).unwrap();
    assert_eq!(parsed.answers.len(), 1);
    assert!(parsed.truncated);
    // Unless the kernel says the datagram was captured whole.
    assert!(matches!(
        parse_captured(&msg, msg.len(), Transport::Udp),
        Err(DnsError::Malformed(_))
    ));
    assert_eq!(
        parse_captured(&msg, msg.len() + 100, Transport::Udp)
            .unwrap()
            .answers
            .len(),
        1
    );
}

#[test]
fn truncated_udp_capture() {
    let full = seed("udp-big-truncated-tc.bin"); // dnsmasq set TC, 30 records fit
    let all = parse_captured(&full, full.len(), Transport::Udp).unwrap();
    assert_eq!(all.answers.len(), 30);
    assert!(!all.truncated);
    let cut = parse_captured(&full[..300], full.len(), Transport::Udp).unwrap();
    assert_eq!(cut.answers, all.answers[..(300 - 26) / 16]);
    assert!(cut.truncated);
}

#[test]
fn pipelined_tcp_responses() {
    // One TCP payload with two length-prefixed responses (A, then AAAA).
    let answers = parse_response(&seed("tcp-pipelined-a-aaaa.bin"), Transport::Tcp).unwrap();
    let mut addrs: Vec<String> = answers.iter().map(|a| a.addr.to_string()).collect();
    addrs.sort(); // dnsmasq rotates the order of the records
    assert_eq!(
        addrs,
        ["192.0.2.21", "192.0.2.22", "192.0.2.23", "2001:db8::21"]
    );
    // A garbage second message keeps the first one's answers.
    let mut payload = wire::tcp(A_RESPONSE);
    payload.extend([0x00, 0x03, 0xff, 0xff, 0xff]);
    let parsed = parse(&payload, Transport::Tcp).unwrap();
    assert_eq!(parsed.answers.len(), 1);
    assert!(matches!(parsed.later_error, Some(DnsError::Malformed(_))));
    // A lone byte after the first message: the next prefix was cut.
    let mut payload = wire::tcp(A_RESPONSE);
    payload.push(0);
    let parsed = parse(&payload, Transport::Tcp).unwrap();
    assert_eq!(parsed.answers.len(), 1);
    assert!(parsed.truncated);
    assert_eq!(parsed.later_error, None);
}

#[test]
fn addresses_outside_the_question_chain_are_ignored() {
    let qname = wire::name("asked.example");
    let msg = wire::message(&[
        wire::header(RESPONSE, 1, 3),
        wire::question(&qname, A),
        wire::rr(&wire::name("other.example"), A, IN, 60, &[192, 0, 2, 66]),
        wire::rr(&wire::ptr(QNAME), A, IN, 60, &[192, 0, 2, 1]),
        // Class CHAOS: not an Internet address.
        wire::rr(&wire::ptr(QNAME), A, CH, 60, &[192, 0, 2, 99]),
    ]);
    assert_eq!(
        parse_response(&msg, Transport::Udp).unwrap(),
        vec![answer(
            "asked.example",
            "asked.example",
            v4(192, 0, 2, 1),
            60
        )]
    );
}

#[test]
fn cname_loops_end_the_chain() {
    // loop.example CNAME b.example, b.example CNAME loop.example; A for both.
    let q = wire::name("loop.example");
    let b = wire::name("b.example");
    let msg = wire::message(&[
        wire::header(RESPONSE, 1, 4),
        wire::question(&q, A),
        wire::rr(&wire::ptr(QNAME), CNAME, IN, 60, &b),
        wire::rr(&b, CNAME, IN, 60, &q),
        wire::rr(&b, A, IN, 60, &[192, 0, 2, 2]),
        wire::rr(&q, A, IN, 60, &[192, 0, 2, 1]),
    ]);
    let answers = parse_response(&msg, Transport::Udp).unwrap();
    assert_eq!(answers.len(), 2);
    assert!(answers.iter().all(|a| a.name == "loop.example"));
}

#[test]
fn question_class_other_than_in_gives_nothing() {
    let mut msg = A_RESPONSE.to_vec();
    msg[28] = CH as u8; // QCLASS low byte (offset 12 + 13 name + 2 type + 1)
    assert_eq!(parse_response(&msg, Transport::Udp), Ok(vec![]));
}

#[test]
fn ttl_with_the_top_bit_set_is_zero() {
    let mut msg = A_RESPONSE.to_vec();
    msg[35] = 0x80; // TTL's first byte
    assert_eq!(parse_response(&msg, Transport::Udp).unwrap()[0].ttl, 0);
}

#[test]
fn odd_label_bytes_are_escaped() {
    // Label "a.B" (a dot inside a label) and label "\xff".
    let mut qname = vec![3, b'a', b'.', b'B', 1, 0xff];
    qname.extend(wire::name("example"));
    let msg = wire::message(&[
        wire::header(RESPONSE, 1, 1),
        wire::question(&qname, A),
        wire::rr(&wire::ptr(QNAME), A, IN, 1, &[192, 0, 2, 1]),
    ]);
    assert_eq!(
        parse_response(&msg, Transport::Udp).unwrap()[0].name,
        "a\\046b.\\255.example"
    );
}

#[test]
fn wrong_rdata_length_is_malformed() {
    let mut msg = A_RESPONSE[..A_RESPONSE.len() - 1].to_vec();
    msg[40] = 3; // RDLENGTH 3 for an A record (RDLENGTH is at 39..41)
    assert!(matches!(
        parse_response(&msg, Transport::Udp),
        Err(DnsError::Malformed(_))
    ));
}

#[test]
fn root_question_and_short_payloads() {
    let msg = wire::message(&[
        wire::header(RESPONSE, 1, 1),
        wire::question(&[0], A),
        wire::rr(&[0], A, IN, 60, &[192, 0, 2, 1]),
    ]);
    assert_eq!(parse_response(&msg, Transport::Udp), Ok(vec![]));
    assert_eq!(
        parse_response(&A_RESPONSE[..11], Transport::Udp),
        Err(DnsError::TooShort)
    );
    assert_eq!(parse_response(&[], Transport::Udp), Err(DnsError::TooShort));
    assert!(matches!(
        parse_response(&wire::tcp(&A_RESPONSE[..11]), Transport::Tcp),
        Err(DnsError::Malformed(_))
    ));
}

#[test]
fn answers_are_capped() {
    let mut msg = wire::header(RESPONSE, 1, 300);
    msg.extend(wire::question(&wire::name("many.example"), A));
    for i in 0..300u16 {
        let [hi, lo] = i.to_be_bytes();
        msg.extend(wire::rr(&wire::ptr(QNAME), A, IN, 60, &[10, 0, hi, lo]));
    }
    let parsed = parse(&msg, Transport::Udp).unwrap();
    assert_eq!(parsed.answers.len(), MAX_ANSWERS);
    assert!(parsed.truncated);
}

#[test]
fn ptr_response_gives_no_addresses() {
    assert_eq!(
        parse_response(&seed("udp-ptr.bin"), Transport::Udp),
        Ok(vec![])
    );
}
