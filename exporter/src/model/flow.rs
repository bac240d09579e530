//! One executable's traffic with one peer during one window: the record the
//! metrics, the journal, OTLP and the connection log all write.
//!
//! The serde names are the connection log's JSON keys (the other sinks map
//! the fields by hand); unknown values are `None` and left out.

use std::{
    collections::HashMap,
    net::IpAddr,
    ops::{Add, AddAssign},
};

use serde::Serialize;

use super::{Event, ExeKey, Sha256};

/// Who sent and received: the process and its executable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Program {
    /// Absolute path of the executable (`[kernel]`, `[unknown]` when not a file).
    pub exe: String,
    /// The file that sent, while its hash may still be on its way: the
    /// fan-out fills `sha256` from this file's sighting (never from another
    /// file at the same path), then drops it. Not written by any sink.
    #[serde(skip)]
    pub file: Option<ExeKey>,
    /// The content of the file that sent; `None` when it could not be hashed (yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Sha256>,
    /// Path of the parent process's executable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The content of the parent's executable, through the same hash cache
    /// (hashed when the child is announced; `None` if not done by the drain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_sha256: Option<Sha256>,
    /// The parent's task name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_name: Option<String>,
    /// Command lines (`journal.record_command_lines`), capped and escaped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_line: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_command_line: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The uid's name in the host's user database.
    #[serde(rename = "user", skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
    /// The kernel's task name (`comm`, 15 bytes at most).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
}

impl Program {
    /// Base name of the executable path (`process.executable.name`).
    pub fn exe_name(&self) -> &str {
        executable_name(&self.exe)
    }
}

/// Whom it talked to, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Peer {
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `raw`, `packet`, ...
    pub transport: &'static str,
    /// The socket's own address (the first socket of the flow in a window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_address: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_address: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<u16>,
    /// The name the process resolved to the peer's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// ISO 3166-1 alpha-2 code of the peer's country.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// Autonomous system number of the peer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asn: Option<u32>,
}

impl Peer {
    /// `ipv4` or `ipv6`, from the peer address (IPv4-mapped IPv6 is `ipv4`).
    pub fn network_type(&self) -> Option<&'static str> {
        match self.remote_address? {
            IpAddr::V4(_) => Some("ipv4"),
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Some("ipv4"),
            IpAddr::V6(_) => Some("ipv6"),
        }
    }
}

/// Where the program runs: its container and pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Workload {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Application payload bytes, as send/recv returned them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Bytes {
    #[serde(rename = "bytes_sent")]
    pub sent: u64,
    #[serde(rename = "bytes_received")]
    pub received: u64,
}

impl Add for Bytes {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            sent: self.sent.saturating_add(other.sent),
            received: self.received.saturating_add(other.received),
        }
    }
}

impl AddAssign for Bytes {
    fn add_assign(&mut self, other: Self) {
        *self = *self + other;
    }
}

/// One program's traffic with one peer during one window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct FlowRecord {
    #[serde(flatten)]
    pub program: Program,
    #[serde(flatten)]
    pub peer: Peer,
    #[serde(flatten)]
    pub workload: Workload,
    #[serde(flatten)]
    pub bytes: Bytes,
}

/// Flow records summed by flow: what a window (or a journal batch) holds.
#[derive(Debug, Clone, Default)]
pub struct FlowTotals {
    totals: HashMap<FlowRecord, Bytes>,
}

impl FlowTotals {
    /// Adds `flow`'s bytes to the same flow's: records that differ only by
    /// their bytes add up (the key is the record with its bytes taken out).
    pub fn add(&mut self, mut flow: FlowRecord) {
        let bytes = std::mem::take(&mut flow.bytes);
        *self.totals.entry(flow).or_default() += bytes;
    }

    pub fn len(&self) -> usize {
        self.totals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.totals.is_empty()
    }

    /// Each flow with its bytes.
    pub fn iter(&self) -> impl Iterator<Item = (&FlowRecord, &Bytes)> {
        self.totals.iter()
    }

    /// One record per flow, with its bytes.
    pub fn records(&self) -> Vec<FlowRecord> {
        self.totals
            .iter()
            .map(|(key, bytes)| FlowRecord {
                bytes: *bytes,
                ..key.clone()
            })
            .collect()
    }

    /// Fills the sha256 of flows drained before their executable was hashed
    /// (hashing runs beside the drain) with the hash of the very file that
    /// sent (`hash_of`: file -> sha256), never another file's at the same
    /// path; then forgets the files, so flows that differ only by theirs
    /// (two files of one content at one path) add up.
    pub fn fill_missing_hashes(&mut self, hash_of: impl Fn(&ExeKey) -> Option<Sha256>) {
        if !self.totals.keys().any(|flow| flow.program.file.is_some()) {
            return;
        }
        for (mut flow, bytes) in std::mem::take(&mut self.totals) {
            if let Some(file) = flow.program.file.take()
                && flow.program.sha256.is_none()
            {
                flow.program.sha256 = hash_of(&file);
            }
            *self.totals.entry(flow).or_default() += bytes;
        }
    }
}

/// What one window hands to the sinks: its flows and its events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Window {
    /// Unix seconds at the start of the window.
    pub start: i64,
    /// Length of the window (0 for events found after it).
    pub seconds: u64,
    pub flows: Vec<FlowRecord>,
    pub events: Vec<Event>,
}

impl Window {
    pub fn len(&self) -> usize {
        self.flows.len() + self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty() && self.events.is_empty()
    }
}

/// Base name of an executable's path.
pub fn executable_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_network_types() {
        let program = |exe: &str| Program {
            exe: exe.to_owned(),
            ..Program::default()
        };
        assert_eq!(program("/usr/bin/curl").exe_name(), "curl");
        assert_eq!(program("[kernel]").exe_name(), "[kernel]");
        let peer = |address: &str| Peer {
            remote_address: address.parse().ok(),
            ..Peer::default()
        };
        assert_eq!(peer("10.0.0.1").network_type(), Some("ipv4"));
        assert_eq!(peer("::ffff:10.0.0.1").network_type(), Some("ipv4"));
        assert_eq!(peer("fd00::1").network_type(), Some("ipv6"));
        assert_eq!(peer("not an address").network_type(), None);
    }

    #[test]
    fn missing_hashes_are_those_of_the_file_that_sent() {
        let (v1, v2) = (
            ExeKey {
                dev: 1,
                ino: 7,
                generation: 1,
            },
            ExeKey {
                dev: 1,
                ino: 7,
                generation: 2,
            },
        );
        let flow = |file: ExeKey, sent: u64| FlowRecord {
            program: Program {
                exe: "/usr/bin/tool".into(),
                file: Some(file),
                ..Program::default()
            },
            bytes: Bytes { sent, received: 0 },
            ..FlowRecord::default()
        };
        let mut totals = FlowTotals::default();
        totals.add(flow(v1, 10));
        totals.add(flow(v2, 20));
        totals.add(flow(v2, 5));
        let hashes = HashMap::from([
            (v1, Sha256::from_digest(&[1; 32])),
            (v2, Sha256::from_digest(&[2; 32])),
        ]);
        totals.fill_missing_hashes(|file| hashes.get(file).cloned());
        let mut sent: Vec<(Option<Sha256>, Option<ExeKey>, u64)> = totals
            .records()
            .into_iter()
            .map(|r| (r.program.sha256, r.program.file, r.bytes.sent))
            .collect();
        sent.sort();
        assert_eq!(
            sent,
            vec![
                (Some(Sha256::from_digest(&[1; 32])), None, 10),
                (Some(Sha256::from_digest(&[2; 32])), None, 25),
            ]
        );
    }

    #[test]
    fn records_with_one_key_add_up() {
        let record = FlowRecord {
            bytes: Bytes {
                sent: 3,
                received: 4,
            },
            ..FlowRecord::default()
        };
        let mut totals = FlowTotals::default();
        totals.add(record.clone());
        totals.add(record);
        let summed: Vec<_> = totals.iter().collect();
        assert_eq!(summed.len(), 1);
        assert_eq!(summed[0].0.bytes, Bytes::default());
        assert_eq!(
            *summed[0].1,
            Bytes {
                sent: 6,
                received: 8
            }
        );
    }
}
