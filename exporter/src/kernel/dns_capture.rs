//! Loads `dns.bpf.c` and hands its DNS answers to the collector.
//!
//! The programs attach to the root of the cgroup v2 hierarchy, so they see
//! every process of the host, in every network namespace. Without cgroup v2
//! (or when the kernel refuses the program types) the agent runs without
//! domains and says so in `fleetsnitch_probe_attached`.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr},
};
use fleetsnitch_ebpf::DnsEvent;
use prometheus_client::{metrics::counter::Counter, registry::Registry};

use super::ring;
use crate::support::error_chain;

static DNS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dns.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DnsCaptureError {
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

/// `fleetsnitch_dns_answers_lost_total`.
#[derive(Debug, Clone, Default)]
pub struct DnsCaptureMetrics {
    answers_lost: Counter,
}

impl DnsCaptureMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "dns_answers_lost",
            "DNS responses the kernel could not deliver (DNS ring buffer full): their domains are missing",
            metrics.answers_lost.clone(),
        );
        metrics
    }
}

pub struct DnsCapture {
    // Keeps the programs attached; dropping it detaches them.
    _ebpf: Ebpf,
    events: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    lost_seen: u64,
    metrics: DnsCaptureMetrics,
}

const PROGRAMS_OWNERS: &[&str] = &[
    "dns_owner_connect4",
    "dns_owner_connect6",
    "dns_owner_sendmsg4",
    "dns_owner_sendmsg6",
];

/// The DNS object with its maps created; its programs are loaded into the
/// kernel when [`DnsCapture::start`] attaches them.
pub struct DnsObject(Ebpf);

impl DnsObject {
    /// Creates the object's maps with `loader`, which must carry no setting
    /// (map sizes, globals) of another object: they would apply here too.
    /// [`super::load_objects`] lends the loader of the main object, so the
    /// kernel BTF it parsed is parsed once.
    pub fn load(loader: &mut EbpfLoader<'_>) -> Result<Self, DnsCaptureError> {
        loader
            .load(DNS_OBJECT)
            .map(Self)
            .map_err(|error| DnsCaptureError::Load(error_chain(&error)))
    }
}

impl DnsCapture {
    /// Attaches the DNS programs of `object`; the outcomes go to
    /// `fleetsnitch_probe_attached`. `cgroup_root` is the root of the cgroup
    /// v2 hierarchy. `object` is the result of [`DnsObject::load`]: a cgroup
    /// that cannot be opened is reported before a failed load.
    pub fn start(
        cgroup_root: &Path,
        object: Result<DnsObject, DnsCaptureError>,
        metrics: DnsCaptureMetrics,
    ) -> Result<(Self, Vec<DnsProbe>), DnsCaptureError> {
        let cgroup = File::open(cgroup_root).map_err(|source| DnsCaptureError::OpenCgroup {
            path: cgroup_root.to_owned(),
            source,
        })?;
        let DnsObject(mut ebpf) = object?;

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
                metrics,
            },
            outcomes,
        ))
    }

    /// Hands every pending answer to `handle`.
    pub fn drain(&mut self, mut handle: impl FnMut(&DnsEvent)) {
        while let Some(item) = self.events.next() {
            if let Some(event) = answer(&item) {
                handle(&event);
            }
        }
    }

    /// The ring buffer's descriptor, to wait for answers with poll(2).
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.events.as_raw_fd()
    }

    /// Counts the answers lost since the last call because the ring buffer was full.
    pub fn report_lost(&mut self) {
        let total: u64 = self
            .lost
            .get(&0, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(self.lost_seen);
        self.metrics
            .answers_lost
            .inc_by(total.saturating_sub(self.lost_seen));
        self.lost_seen = total;
    }
}

// Attached through bpf_link (kernels >= 5.7), which coexists with other
// programs on the same cgroup whatever the mode; the legacy flags (such as
// BPF_F_ALLOW_MULTI) are refused with EINVAL on a link.
/// Program `name` of the object, as the program type `T`.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} is missing"))?
        .try_into()
        .map_err(|e| format!("program {name}: {e}"))
}

fn attach_owners(ebpf: &mut Ebpf, cgroup: &File) -> Result<(), String> {
    for name in PROGRAMS_OWNERS {
        let program: &mut CgroupSockAddr = program(ebpf, name)?;
        program
            .load()
            .and_then(|()| program.attach(cgroup, CgroupAttachMode::Single).map(drop))
            .map_err(|e| format!("program {name}: {}", error_chain(&e)))?;
    }
    Ok(())
}

fn attach_answers(ebpf: &mut Ebpf, cgroup: &File) -> Result<(), String> {
    let name = "dns_answers";
    let program: &mut CgroupSkb = program(ebpf, name)?;
    program
        .load()
        .and_then(|()| {
            program
                .attach(
                    cgroup,
                    CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )
                .map(drop)
        })
        .map_err(|e| format!("program {name}: {}", error_chain(&e)))
}

/// An answer record: sent up to the last byte captured, so it is valid when
/// it holds the fixed fields and the `captured` bytes it counts.
fn answer(bytes: &[u8]) -> Option<DnsEvent> {
    let fixed = std::mem::offset_of!(DnsEvent, payload);
    let event = ring::read_prefix::<DnsEvent>(bytes, fixed)?;
    let captured = usize::from(event.captured);
    (captured <= event.payload.len() && bytes.len() >= fixed + captured).then_some(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(captured: u16, payload_sent: usize) -> Vec<u8> {
        let fixed = std::mem::offset_of!(DnsEvent, payload);
        let mut bytes = vec![0u8; fixed + payload_sent];
        let at = std::mem::offset_of!(DnsEvent, captured);
        bytes[at..at + 2].copy_from_slice(&captured.to_ne_bytes());
        bytes[fixed..].fill(0xab);
        bytes
    }

    #[test]
    fn an_answer_sent_at_its_length_reads_with_its_payload() {
        let event = answer(&record(100, 100)).unwrap();
        assert_eq!(event.captured, 100);
        assert!(event.payload[..100].iter().all(|&byte| byte == 0xab));
        assert!(event.payload[100..].iter().all(|&byte| byte == 0));
    }

    #[test]
    fn an_answer_shorter_than_it_says_is_refused() {
        assert!(answer(&record(100, 99)).is_none());
        assert!(answer(&record(2000, 1024)).is_none());
        assert!(answer(&record(0, 0)[..10]).is_none());
    }
}
