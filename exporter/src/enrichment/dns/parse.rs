//! DNS responses on the wire to address answers.
//!
//! The wire format is read with NLnet Labs' `domain` crate: it parses a
//! message lazily, one record at a time (so a message cut by the kernel's
//! capture limit still yields the records before the cut), follows only
//! compression pointers that point backwards, at most 255 per name, and
//! bounds names to 255 octets. On top of it this module keeps the work
//! bounded: only the question and the answer section are read (each record
//! is at least 11 octets, so a 64 KiB payload holds at most ~6,000), CNAME
//! chains are followed for at most [`MAX_CNAME_CHAIN`] links, and at most
//! [`MAX_ANSWERS`] answers come out of one payload.

use std::{
    collections::HashSet,
    fmt::{self, Write as _},
    net::IpAddr,
};

use domain::{
    base::{
        Message, ParsedName, Rtype,
        iana::{Class, Opcode, Rcode},
        wire::ParseError,
    },
    rdata::{A, Aaaa, Cname},
};

/// CNAME links followed from the question name; resolvers give up sooner
/// (glibc and most recursors stop at 8 to 16).
pub const MAX_CNAME_CHAIN: usize = 16;

/// Answers taken from one payload. Real responses carry a few dozen
/// addresses at most; the cap keeps one hostile message from flooding the
/// cache. Answers past it are dropped and the result is marked truncated.
pub const MAX_ANSWERS: usize = 256;

/// How the payload arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// The DNS message itself (possibly cut at the capture limit).
    Udp,
    /// A TCP segment payload: 2-byte big-endian length, then the message
    /// (possibly cut at the capture limit, possibly followed by further
    /// length-prefixed messages).
    Tcp,
}

/// One address the client learnt, attributed to the name it asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Answer {
    /// The question name: what the client asked for. Lowercase ASCII,
    /// without the trailing dot; octets other than letters, digits, `-`,
    /// `_` and `*` are escaped as `\DDD` (RFC 1035 presentation format), so
    /// a dot inside a label can never pass for a label separator.
    pub name: String,
    /// The owner of the address record: the end of the CNAME chain, equal to
    /// `name` when there was no CNAME. Same format as `name`.
    pub canonical: String,
    pub addr: IpAddr,
    /// Seconds: the smallest TTL along the chain (each CNAME and the address
    /// record), since the mapping from `name` to `addr` holds only while
    /// every link does. TTLs with the top bit set count as 0 (RFC 2181 §8).
    pub ttl: u32,
}

/// What [`parse`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub answers: Vec<Answer>,
    /// The payload ended inside a record (the capture limit, most likely),
    /// or answers past [`MAX_ANSWERS`] were dropped: `answers` holds only
    /// what complete records said, but there was more.
    pub truncated: bool,
    /// TCP: why a message after the first could not be read. The answers of
    /// the messages before it are kept; this one and any after it are lost.
    pub later_error: Option<DnsError>,
}

/// Why a payload gave no answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsError {
    /// Shorter than a DNS header, or a TCP payload shorter than its length
    /// prefix.
    TooShort,
    /// The payload ends before the question section does: nothing can be
    /// attributed.
    Truncated,
    /// QR is 0: a query, not a response.
    NotAResponse,
    /// A response to something other than a standard query (NOTIFY, UPDATE…).
    UnsupportedOpcode(u8),
    /// Anything but exactly one question: answers cannot be attributed.
    QuestionCount(u16),
    /// Not a well-formed DNS message (bad label type, compression pointer
    /// loop or forward pointer, name too long, record data of the wrong
    /// length, a record running past the end of a complete message…).
    Malformed(&'static str),
}

impl DnsError {
    /// Whether this is a damaged payload (to be counted as a parse failure),
    /// as opposed to a well-formed message that simply carries nothing to
    /// attribute (a query, an UPDATE response, several questions).
    pub fn is_failure(&self) -> bool {
        matches!(self, Self::TooShort | Self::Truncated | Self::Malformed(_))
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort => f.write_str("payload shorter than a DNS header"),
            Self::Truncated => f.write_str("payload ends inside the question section"),
            Self::NotAResponse => f.write_str("a DNS query, not a response"),
            Self::UnsupportedOpcode(op) => write!(f, "response to opcode {op}, not QUERY"),
            Self::QuestionCount(n) => write!(f, "{n} questions instead of 1"),
            Self::Malformed(why) => write!(f, "malformed DNS message: {why}"),
        }
    }
}

impl std::error::Error for DnsError {}

/// The addresses in a DNS response payload, each attributed to the question
/// name. See [`parse`] for the rules; this drops the `truncated` flag.
pub fn parse_response(payload: &[u8], transport: Transport) -> Result<Vec<Answer>, DnsError> {
    parse(payload, transport).map(|parsed| parsed.answers)
}

/// Parses a DNS response payload as the kernel captured it.
///
/// - Only responses (QR=1) to standard queries with exactly one question are
///   read; other messages are errors that [`DnsError::is_failure`] tells
///   apart from damage.
/// - A response whose RCODE is not NOERROR, or whose question class is not
///   IN, gives no answers (`Ok` with none).
/// - Answers are the A and AAAA records of class IN in the answer section
///   whose owner is the question name or reachable from it through the
///   section's CNAME records. Address records for other names are ignored:
///   a client does not use them for the name it asked.
/// - A payload may end early (the capture limit): records cut by the end are
///   dropped, complete records before them are used, and `truncated` is set.
///   A cut inside the header or question is [`DnsError::Truncated`]. For TCP
///   this applies only to a message shorter than its length prefix says; a
///   complete TCP message with a record running past its end is malformed.
/// - TCP: the 2-byte length prefix is stripped; further complete messages
///   in the same payload are read too. An error in a later message ends the
///   walk, keeps the answers of the earlier ones and is told in
///   `later_error`.
///
/// Without the payload's length on the wire, a UDP payload's end may be the
/// capture limit; [`parse_captured`] is stricter when the length is known.
///
/// Never panics; the work is bounded by the payload's length.
pub fn parse(payload: &[u8], transport: Transport) -> Result<Parsed, DnsError> {
    parse_captured(payload, usize::MAX, transport)
}

/// [`parse`] for a payload of which the kernel captured the first
/// `payload.len()` of `wire_len` bytes. A UDP message captured whole
/// (`wire_len <= payload.len()`) whose records run past its end is
/// malformed, not truncated. TCP payloads carry their own lengths.
pub fn parse_captured(
    payload: &[u8],
    wire_len: usize,
    transport: Transport,
) -> Result<Parsed, DnsError> {
    let mut parsed = Parsed::default();
    match transport {
        Transport::Udp => parse_message(payload, payload.len() < wire_len, &mut parsed)?,
        Transport::Tcp => {
            if payload.len() < 2 {
                return Err(DnsError::TooShort);
            }
            let mut rest = payload;
            let mut messages = 0usize;
            while let [high, low, body @ ..] = rest {
                let len = usize::from(u16::from_be_bytes([*high, *low]));
                let (message, cut, next) = match body.split_at_checked(len) {
                    Some((message, next)) => (message, false, next),
                    None => (body, true, &[][..]),
                };
                if let Err(error) = parse_message(message, cut, &mut parsed) {
                    if messages == 0 {
                        return Err(error);
                    }
                    parsed.later_error = Some(error);
                    break;
                }
                messages += 1;
                if cut {
                    break;
                }
                // A lone byte left over is the start of a cut length prefix.
                if next.len() == 1 {
                    parsed.truncated = true;
                }
                rest = next;
            }
        }
    }
    Ok(parsed)
}

/// Parses one DNS message into `out`. `may_be_cut`: the message may end
/// before its real end (capture limit), so running out of bytes inside a
/// record means truncation rather than damage.
fn parse_message(message: &[u8], may_be_cut: bool, out: &mut Parsed) -> Result<(), DnsError> {
    let short = if may_be_cut {
        DnsError::Truncated
    } else {
        DnsError::Malformed("message ends inside the question section")
    };
    let Ok(msg) = Message::from_octets(message) else {
        return Err(if may_be_cut {
            DnsError::TooShort
        } else {
            DnsError::Malformed("message shorter than a DNS header")
        });
    };
    let header = msg.header();
    if !header.qr() {
        return Err(DnsError::NotAResponse);
    }
    if header.opcode() != Opcode::QUERY {
        return Err(DnsError::UnsupportedOpcode(header.opcode().to_int()));
    }
    if header.rcode() != Rcode::NOERROR {
        return Ok(());
    }
    let counts = msg.header_counts();
    if counts.qdcount() != 1 {
        return Err(DnsError::QuestionCount(counts.qdcount()));
    }

    let mut questions = msg.question();
    let question = match questions.next() {
        Some(Ok(question)) => question,
        Some(Err(ParseError::ShortInput)) => return Err(short),
        Some(Err(ParseError::Form(_))) => return Err(DnsError::Malformed("bad question name")),
        None => return Err(short),
    };
    if question.qclass() != Class::IN {
        return Ok(());
    }
    let qname = presentation(question.qname());
    if qname.is_empty() {
        // The root: nothing a connection could be attributed to.
        return Ok(());
    }
    let section = questions
        .answer()
        .map_err(|_| DnsError::Malformed("bad question section"))?;

    let mut cnames: Vec<(String, String, u32)> = Vec::new();
    let mut addresses: Vec<(String, IpAddr, u32)> = Vec::new();
    for record in section {
        let record = match record {
            Ok(record) => record,
            Err(ParseError::ShortInput) if may_be_cut => {
                out.truncated = true;
                break;
            }
            Err(ParseError::ShortInput) => {
                return Err(DnsError::Malformed(
                    "record runs past the end of the message",
                ));
            }
            Err(ParseError::Form(_)) => return Err(DnsError::Malformed("bad record owner name")),
        };
        if record.class() != Class::IN {
            continue;
        }
        let ttl = ttl_secs(record.ttl().as_secs());
        match record.rtype() {
            Rtype::A => match record.into_record::<A>() {
                Ok(Some(rr)) => {
                    addresses.push((presentation(rr.owner()), IpAddr::V4(rr.data().addr()), ttl))
                }
                _ => return Err(DnsError::Malformed("bad A record data")),
            },
            Rtype::AAAA => match record.into_record::<Aaaa>() {
                Ok(Some(rr)) => {
                    addresses.push((presentation(rr.owner()), IpAddr::V6(rr.data().addr()), ttl))
                }
                _ => return Err(DnsError::Malformed("bad AAAA record data")),
            },
            Rtype::CNAME => match record.into_record::<Cname<ParsedName<&[u8]>>>() {
                Ok(Some(rr)) => cnames.push((
                    presentation(rr.owner()),
                    presentation(rr.data().cname()),
                    ttl,
                )),
                _ => return Err(DnsError::Malformed("bad CNAME record data")),
            },
            // PTR answers (reverse lookups) would be read here.
            _ => {}
        }
    }

    // The chain from the question name: each name with the smallest TTL of
    // the links leading to it. The first CNAME of a name counts (a name with
    // a CNAME has no other data, RFC 1034 §3.6.2); a loop ends the chain.
    let mut chain: Vec<(&str, u32)> = vec![(&qname, u32::MAX)];
    while chain.len() <= MAX_CNAME_CHAIN {
        let Some(&(current, ttl)) = chain.last() else {
            break;
        };
        let Some((_, target, link_ttl)) = cnames.iter().find(|(owner, _, _)| owner == current)
        else {
            break;
        };
        if target.is_empty() || chain.iter().any(|(name, _)| name == target) {
            break;
        }
        chain.push((target, ttl.min(*link_ttl)));
    }

    // The same address twice for the question counts once (the first).
    let mut seen = HashSet::new();
    for (owner, addr, ttl) in addresses {
        let Some(&(_, chain_ttl)) = chain.iter().find(|(name, _)| *name == owner) else {
            continue;
        };
        if !seen.insert(addr) {
            continue;
        }
        if out.answers.len() >= MAX_ANSWERS {
            out.truncated = true;
            break;
        }
        out.answers.push(Answer {
            name: qname.clone(),
            canonical: owner,
            addr,
            ttl: ttl.min(chain_ttl),
        });
    }
    Ok(())
}

/// RFC 2181 §8: a TTL with the most significant bit set is treated as 0.
fn ttl_secs(ttl: u32) -> u32 {
    if ttl > i32::MAX as u32 { 0 } else { ttl }
}

/// A name in lowercase presentation format without the trailing dot; the
/// root is the empty string. Letters, digits, `-`, `_` and `*` are kept,
/// every other octet (including `.` and `\` inside a label) is `\DDD`.
fn presentation(name: &ParsedName<&[u8]>) -> String {
    let mut out = String::with_capacity(64);
    for label in name.iter() {
        if label.is_root() {
            break;
        }
        if !out.is_empty() {
            out.push('.');
        }
        for &octet in label.as_slice() {
            let octet = octet.to_ascii_lowercase();
            if octet.is_ascii_alphanumeric() || matches!(octet, b'-' | b'_' | b'*') {
                out.push(char::from(octet));
            } else {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\{octet:03}");
            }
        }
    }
    out
}
