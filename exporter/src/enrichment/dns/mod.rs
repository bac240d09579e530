//! Which domain an address came from, learnt from the DNS answers each
//! process received.
//!
//! The kernel hands the agent the payload of every DNS response a process
//! receives (for UDP the message itself, for TCP the segment payload starting
//! with its 2-byte length prefix, both possibly cut at the capture limit),
//! with the receiving process's tgid and container id. [`parse_response`]
//! turns a payload into [`Answer`]s: each A/AAAA address attributed to the
//! name the client asked, CNAME chains followed. [`DnsCache`] keeps them per
//! process and per container, so that a flow to an address can be labelled
//! with the domain *its own program* resolved: two programs that resolved two
//! names sharing one address each get their own name, and nothing is guessed
//! from other programs' answers.
//!
//! What it can and cannot see:
//! - Answers are what the process *received*, not what it accepted: a
//!   response with a wrong query id that the resolver dropped is recorded
//!   all the same. It only names the address for that process (and its
//!   container), never for others.
//! - A process that resolves through another one (nscd, systemd-resolved
//!   over its varlink socket) receives no DNS message itself; only the
//!   resolver does. Programs that query the 127.0.0.53 stub over UDP or TCP
//!   are seen as usual.
//! - A TCP response split over several segments is read from its first
//!   segment only (the one with the length prefix), up to the capture limit.
//!   A later segment handed over on its own starts mid-message: it almost
//!   always fails to parse and is counted as a parse failure.
//!
//! This module depends on nothing but `std` and the `domain` crate (no
//! `crate::` paths): the fuzz project in `exporter/fuzz/` compiles this very
//! source on its own, without the rest of the agent.
//!
//! Reverse (PTR) lookups are not done. They would come last in
//! [`DnsCache::resolve`], after the process and container steps, as a new
//! [`DomainSource`] variant; the parser marks where PTR records would be read.

mod cache;
mod parse;

pub use cache::{
    Clock, DnsCache, DnsCacheConfig, DnsCounters, DnsStats, DomainSource, ManualClock, Resolved,
    SystemClock,
};
pub use parse::{
    Answer, DnsError, MAX_ANSWERS, MAX_CNAME_CHAIN, Parsed, Transport, parse, parse_captured,
    parse_response,
};
