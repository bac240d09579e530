//! Loads `dns.bpf.c` and hands its DNS answers to the collector.
//!
//! The programs attach to the root of the cgroup v2 hierarchy, so they see
//! every process of the host, in every network namespace. Without cgroup v2
//! (or when the kernel refuses the program types) the agent runs without
//! domains and says so in `fleetsnitch_probe_attached`.

use std::{fs::File, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr},
};
use fleetsnitch_ebpf::DnsEvent;

use crate::probes::error_chain;

static DNS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dns.bpf.o"));

/// Where cgroup2 is usually mounted; /proc/self/mountinfo says otherwise.
const CGROUP2_DEFAULT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum DnsCaptureError {
    #[error("no cgroup v2 hierarchy is mounted: DNS answers cannot be captured")]
    NoCgroup2,
    #[error("cannot open the cgroup v2 root {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the DNS capture programs: {0}")]
    Load(String),
}

/// How one DNS probe attached, for `fleetsnitch_probe_attached`.
#[derive(Debug, Clone)]
pub struct DnsProbe {
    pub probe: &'static str,
    pub mode: &'static str,
    /// The reason it did not attach, if it did not.
    pub error: Option<String>,
}

pub struct DnsCapture {
    // Keeps the programs attached; dropping it detaches them.
    _ebpf: Ebpf,
    events: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    lost_seen: u64,
}

/// The mount point of the cgroup v2 hierarchy.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let fs_type = fs.split_whitespace().next()?;
            (fs_type == "cgroup2").then(|| mount.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .or_else(|| {
            let default = PathBuf::from(CGROUP2_DEFAULT);
            default
                .join("cgroup.controllers")
                .exists()
                .then_some(default)
        })
}

const PROGRAMS_OWNERS: &[&str] = &[
    "dns_owner_connect4",
    "dns_owner_connect6",
    "dns_owner_sendmsg4",
    "dns_owner_sendmsg6",
];

impl DnsCapture {
    /// Loads and attaches the DNS programs; the outcomes go to `fleetsnitch_probe_attached`.
    pub fn start() -> Result<(Self, Vec<DnsProbe>), DnsCaptureError> {
        let root = cgroup2_root().ok_or(DnsCaptureError::NoCgroup2)?;
        let cgroup = File::open(&root).map_err(|source| DnsCaptureError::OpenCgroup {
            path: root.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .load(DNS_OBJECT)
            .map_err(|error| DnsCaptureError::Load(error_chain(&error)))?;

        let owners = attach_owners(&mut ebpf, &cgroup);
        let answers = attach_answers(&mut ebpf, &cgroup);
        let outcomes = vec![
            DnsProbe {
                probe: "dns_owners",
                mode: "cgroup_sock_addr",
                error: owners.err(),
            },
            DnsProbe {
                probe: "dns_answers",
                mode: "cgroup_skb",
                error: answers.err(),
            },
        ];
        for outcome in &outcomes {
            match &outcome.error {
                None => {
                    tracing::info!(probe = outcome.probe, mode = outcome.mode, "probe attached")
                }
                Some(error) => tracing::warn!(
                    probe = outcome.probe,
                    mode = outcome.mode,
                    %error,
                    "DNS probe not attached: domains may be missing"
                ),
            }
        }

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| DnsCaptureError::Load(format!("map {name} is missing")))
        };
        let events = RingBuf::try_from(take(&mut ebpf, "dns_events")?)
            .map_err(|e| DnsCaptureError::Load(format!("map dns_events: {e}")))?;
        let lost = PerCpuArray::try_from(take(&mut ebpf, "dns_lost")?)
            .map_err(|e| DnsCaptureError::Load(format!("map dns_lost: {e}")))?;
        Ok((
            Self {
                _ebpf: ebpf,
                events,
                lost,
                lost_seen: 0,
            },
            outcomes,
        ))
    }

    /// Hands every pending answer to `handle`.
    pub fn drain(&mut self, mut handle: impl FnMut(&DnsEvent)) {
        while let Some(item) = self.events.next() {
            let bytes: &[u8] = &item;
            if bytes.len() < size_of::<DnsEvent>() {
                continue;
            }
            // SAFETY: the length was checked; DnsEvent is integers and byte
            // arrays, valid for any bit pattern.
            let event: DnsEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            handle(&event);
        }
    }

    /// Answers lost since the last call because the ring buffer was full.
    pub fn take_lost(&mut self) -> u64 {
        let total: u64 = self
            .lost
            .get(&0, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(self.lost_seen);
        let delta = total.saturating_sub(self.lost_seen);
        self.lost_seen = total;
        delta
    }
}

fn attach_owners(ebpf: &mut Ebpf, cgroup: &File) -> Result<(), String> {
    for name in PROGRAMS_OWNERS {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("program {name} is missing"))?
            .try_into()
            .map_err(|e| format!("program {name}: {e}"))?;
        program
            .load()
            .and_then(|()| {
                program
                    .attach(cgroup, CgroupAttachMode::AllowMultiple)
                    .map(drop)
            })
            .map_err(|e| format!("program {name}: {}", error_chain(&e)))?;
    }
    Ok(())
}

fn attach_answers(ebpf: &mut Ebpf, cgroup: &File) -> Result<(), String> {
    let name = "dns_answers";
    let program: &mut CgroupSkb = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} is missing"))?
        .try_into()
        .map_err(|e| format!("program {name}: {e}"))?;
    program
        .load()
        .and_then(|()| {
            program
                .attach(
                    cgroup,
                    CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::AllowMultiple,
                )
                .map(drop)
        })
        .map_err(|e| format!("program {name}: {}", error_chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_root_is_found_on_this_host() {
        // Every machine this is developed and tested on runs cgroup v2.
        let root = cgroup2_root().expect("a cgroup2 mount");
        assert!(
            root.join("cgroup.controllers").exists(),
            "{}",
            root.display()
        );
    }
}
