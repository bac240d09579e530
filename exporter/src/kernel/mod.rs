//! The kernel side: loading and attaching the programs, and reading what they
//! counted and announced (maps and ring buffers). Nothing here knows about
//! processes' names or sinks: the agent hands what is read on to `identity`.

pub mod announcements;
pub mod btf;
pub mod dns_capture;
pub mod exec_events;
pub mod flow;
pub mod probes;
mod ring;
pub mod stats;
pub mod traffic;

use std::time::Duration;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Map, MapError},
};
use serde::Deserialize;

use crate::support::{InvalidValue, check_duration, check_range, check_ring_buffer};
use dns_capture::{DnsCaptureError, DnsObject};
use exec_events::ExecConfig;

/// The kernel programs, compiled by build.rs.
static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fleetsnitch.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Traffic(Box<traffic::TrafficTableError>),
}

impl KernelError {
    /// Wraps a map error with the map's name.
    pub fn map(name: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Map { name, source }
    }
}

/// Takes map `name` out of the loaded object.
pub fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, KernelError> {
    ebpf.take_map(name).ok_or(KernelError::MissingMap { name })
}

/// The `collector:` section of the configuration: the in-kernel tables and
/// how often they are drained.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CollectorConfig {
    /// How often the in-kernel counters are drained into `/metrics`.
    #[serde(with = "humantime_serde")]
    pub drain_interval: Duration,
    /// Capacity of the in-kernel (process, socket) table per drain interval.
    pub traffic_map_entries: u32,
    /// Capacity of the in-kernel table of processes already announced.
    pub process_map_entries: u32,
    /// Size of the ring buffer carrying process identities to the agent.
    pub ring_buffer_bytes: u32,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            drain_interval: Duration::from_secs(1),
            traffic_map_entries: traffic::TEMPLATE_ENTRIES,
            process_map_entries: 32_768,
            // Records carry only the path slots they fill (some 500 bytes
            // for a three-name path): about 500 announcements at once.
            ring_buffer_bytes: 256 << 10,
        }
    }
}

impl CollectorConfig {
    pub fn validate(&self) -> Result<(), InvalidValue> {
        check_duration(
            "collector.drain_interval",
            self.drain_interval,
            Duration::from_millis(100),
            Duration::from_secs(2),
            "must be between 100ms and 2s: /metrics reflects traffic within 2 s",
        )?;
        check_range(
            "collector.traffic_map_entries",
            self.traffic_map_entries,
            1_024,
            4 << 20,
        )?;
        check_range(
            "collector.process_map_entries",
            self.process_map_entries,
            1_024,
            4 << 20,
        )?;
        check_ring_buffer("collector.ring_buffer_bytes", self.ring_buffer_bytes)
    }
}

/// The kernel objects, loaded; nothing is attached yet.
pub struct Objects {
    /// The counting programs, with their maps sized by the configuration.
    pub main: Ebpf,
    /// DNS capture's; failing to load it only leaves domains empty.
    pub dns: Result<DnsObject, DnsCaptureError>,
}

/// Loads both objects with one loader: aya's loader parses the whole kernel
/// BTF when it is created (some 17 MiB here while it lives, file included),
/// and a second loader would parse it again. The agent keeps its peak memory
/// (VmHWM) for life, and this is where the peak is.
pub fn load_objects(collector: &CollectorConfig, exec: &ExecConfig) -> Result<Objects, EbpfError> {
    let mut loader = EbpfLoader::new();
    // DNS first, while the loader carries none of the main object's settings.
    let dns = DnsObject::load(&mut loader);
    // Off, exec tracking keeps its ring buffer at one page.
    let exec_ring = if exec.enabled {
        exec.ring_buffer_bytes
    } else {
        4096
    };
    // One identity being built per thread at a time; a thread is on one CPU.
    let scratch = aya::util::nr_cpus().map_or(256, |cpus| cpus.saturating_mul(2));
    let main = loader
        .map_max_entries("announced", collector.process_map_entries)
        .map_max_entries(
            "identity_scratch",
            u32::try_from(scratch).unwrap_or(u32::MAX),
        )
        .map_max_entries("events", collector.ring_buffer_bytes)
        .map_max_entries("exec_events", exec_ring)
        .override_global(
            "record_command_lines",
            &u32::from(exec.record_command_lines),
            true,
        )
        .load(BPF_OBJECT)?;
    Ok(Objects { main, dns })
}
