//! Traffic kept out of the journal's rollups, the connection log and OTLP (its
//! executable is still journaled, and /metrics counts it).

use ipnet::IpNet;
use serde::Deserialize;

use crate::model::FlowRecord;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IgnoreList {
    /// Executables by sha256 (hex).
    pub hashes: Vec<String>,
    /// Domains ending with one of these (`example.com` matches `a.example.com`).
    pub domain_suffixes: Vec<String>,
    /// Remote addresses inside one of these networks, e.g. `10.0.0.0/8`.
    pub subnets: Vec<IpNet>,
    /// Remote ports.
    pub ports: Vec<u16>,
}

impl IgnoreList {
    /// Whether executables are ignored by hash (flows then wait for theirs).
    pub fn has_hashes(&self) -> bool {
        !self.hashes.is_empty()
    }

    pub fn matches(&self, flow: &FlowRecord) -> bool {
        let (program, peer) = (&flow.program, &flow.peer);
        if let Some(sha256) = &program.sha256
            && self
                .hashes
                .iter()
                .any(|hash| hash.eq_ignore_ascii_case(sha256.as_str()))
        {
            return true;
        }
        if let Some(port) = peer.remote_port
            && self.ports.contains(&port)
        {
            return true;
        }
        if let Some(address) = peer.remote_address
            && self.subnets.iter().any(|net| net.contains(&address))
        {
            return true;
        }
        if let Some(domain) = peer.domain.as_deref() {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            return self.domain_suffixes.iter().any(|suffix| {
                let suffix = suffix
                    .trim_start_matches('.')
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                domain == suffix || domain.ends_with(&format!(".{suffix}"))
            });
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::{Peer, Program, Sha256};

    fn rollup() -> FlowRecord {
        FlowRecord {
            program: Program {
                exe: "/usr/bin/curl".into(),
                sha256: Sha256::from_hex("ABCD"),
                ..Program::default()
            },
            peer: Peer {
                transport: "tcp",
                local_port: Some(50000),
                remote_address: "10.1.2.3".parse().ok(),
                remote_port: Some(443),
                domain: Some("api.example.com".into()),
                ..Peer::default()
            },
            ..FlowRecord::default()
        }
    }

    #[test]
    fn each_rule_matches_on_its_own() {
        let none = IgnoreList::default();
        assert!(!none.matches(&rollup()));
        let by_hash = IgnoreList {
            hashes: vec!["abcd".into()],
            ..IgnoreList::default()
        };
        assert!(by_hash.matches(&rollup()));
        let by_port = IgnoreList {
            ports: vec![443],
            ..IgnoreList::default()
        };
        assert!(by_port.matches(&rollup()));
        let by_subnet = IgnoreList {
            subnets: vec!["10.0.0.0/8".parse().unwrap()],
            ..IgnoreList::default()
        };
        assert!(by_subnet.matches(&rollup()));
        let by_domain = IgnoreList {
            domain_suffixes: vec!["example.com".into()],
            ..IgnoreList::default()
        };
        assert!(by_domain.matches(&rollup()));
    }

    #[test]
    fn suffix_matches_whole_labels_only() {
        let list = IgnoreList {
            domain_suffixes: vec!["ample.com".into()],
            ..IgnoreList::default()
        };
        assert!(!list.matches(&rollup()));
        let other_subnet = IgnoreList {
            subnets: vec!["192.168.0.0/16".parse().unwrap()],
            ..IgnoreList::default()
        };
        assert!(!other_subnet.matches(&rollup()));
    }
}
