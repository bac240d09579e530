//! The kernel programs' own counters (the per-CPU `stats` array): what they
//! could not record. Each becomes a self-metric and, where it means data was
//! lost, a warning in the log.

use aya::maps::{MapData, PerCpuArray};
use fleetsnitch_ebpf::Stat;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::KernelError;
use crate::telemetry::{Direction, DirectionLabels};

/// Values of `map` on `fleetsnitch_map_full_total`.
pub const TRAFFIC_MAP: &str = "traffic";
pub const ANNOUNCED_MAP: &str = "announced";
pub const SPLICE_MAP: &str = "splice_calls";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

/// The metrics [`KernelStats`] feeds.
#[derive(Debug, Clone, Default)]
pub struct KernelStatsMetrics {
    map_full: Family<MapLabels, Counter>,
    unattributed_bytes: Family<DirectionLabels, Counter>,
    events_lost: Counter,
    exec_events_lost: Counter,
}

impl KernelStatsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "map_full",
            "Insertions refused because an in-kernel map was full, by map",
            metrics.map_full.clone(),
        );
        registry.register(
            "unattributed_bytes",
            "Bytes counted in the kernel but not attributed to an executable (traffic map full)",
            metrics.unattributed_bytes.clone(),
        );
        registry.register(
            "events_lost",
            "Process announcements the kernel could not deliver (ring buffer full)",
            metrics.events_lost.clone(),
        );
        registry.register(
            "exec_events_lost",
            "Exec events the kernel could not deliver (exec ring buffer full)",
            metrics.exec_events_lost.clone(),
        );
        // Known series start at zero, so `increase()` in alert rules sees their first increment.
        for map in [TRAFFIC_MAP, ANNOUNCED_MAP, SPLICE_MAP] {
            metrics.map_full(map).inc_by(0);
        }
        for direction in Direction::ALL {
            metrics.unattributed(direction).inc_by(0);
        }
        metrics
    }

    fn map_full(&self, map: &str) -> Counter {
        self.map_full
            .get_or_create(&MapLabels {
                map: map.to_owned(),
            })
            .clone()
    }

    fn unattributed(&self, direction: Direction) -> Counter {
        self.unattributed_bytes
            .get_or_create(&DirectionLabels { direction })
            .clone()
    }
}

/// Reads the `stats` array and turns its cumulative per-CPU counts into
/// metric increments.
pub struct KernelStats {
    stats: PerCpuArray<MapData, u64>,
    seen: [u64; Stat::ALL.len()],
    metrics: KernelStatsMetrics,
}

impl KernelStats {
    pub fn new(stats: PerCpuArray<MapData, u64>, metrics: KernelStatsMetrics) -> Self {
        Self {
            stats,
            seen: [0; Stat::ALL.len()],
            metrics,
        }
    }

    pub fn report(&mut self) -> Result<(), KernelError> {
        for stat in Stat::ALL {
            let index = stat as u32;
            let total: u64 = self
                .stats
                .get(&index, 0)
                .map_err(|source| KernelError::Map {
                    name: "stats",
                    source,
                })?
                .iter()
                .sum();
            let delta = total.saturating_sub(self.seen[index as usize]);
            self.seen[index as usize] = total;
            if delta > 0 {
                self.count(stat, delta);
            }
        }
        Ok(())
    }

    fn count(&self, stat: Stat, delta: u64) {
        let metrics = &self.metrics;
        match stat {
            Stat::TrafficMapFull => {
                tracing::warn!(
                    refused = delta,
                    "traffic map full: raise collector.traffic_map_entries; bytes counted as unattributed"
                );
                metrics.map_full(TRAFFIC_MAP).inc_by(delta);
            }
            Stat::UnattributedSentBytes => {
                metrics.unattributed(Direction::Sent).inc_by(delta);
            }
            Stat::UnattributedReceivedBytes => {
                metrics.unattributed(Direction::Received).inc_by(delta);
            }
            Stat::EventsLost => {
                tracing::warn!(
                    lost = delta,
                    "process announcements lost (ring buffer full): raise collector.ring_buffer_bytes"
                );
                metrics.events_lost.inc_by(delta);
            }
            Stat::AnnouncedMapFull => {
                metrics.map_full(ANNOUNCED_MAP).inc_by(delta);
            }
            Stat::ExecEventsLost => {
                tracing::warn!(
                    lost = delta,
                    "exec events lost (exec ring buffer full): raise exec.ring_buffer_bytes"
                );
                metrics.exec_events_lost.inc_by(delta);
            }
            Stat::SpliceMapFull => {
                metrics.map_full(SPLICE_MAP).inc_by(delta);
            }
        }
    }
}
