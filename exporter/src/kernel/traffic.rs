//! The `traffic` tables: bytes per (process, executable, flow), drained by
//! swapping tables.
//!
//! The programs add to the hash table in slot 0 of the `traffic` array of
//! maps. To drain, the collector puts an empty table in the slot and reads
//! the one it took out. The kernel returns from a map-in-map update only
//! after an RCU grace period, when every program that could still hold the
//! old table has finished (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c): from then on nothing adds to the old table, and
//! reading and deleting its entries cannot lose an add. No sleep, no guess
//! at how long a preempted program may take.

use aya::{
    Ebpf,
    maps::{ArrayOfMaps, HashMap, MapData, MapError},
};
use fleetsnitch_ebpf::{TrafficKey, TrafficValue};

use super::{KernelError, take_map};

type Table = HashMap<MapData, TrafficKey, TrafficValue>;

/// The slot of `traffic` the programs count in.
const SLOT: u32 = 0;

/// Entries of the table the object declares as the template of `traffic`'s
/// tables (`struct traffic_table` in fleetsnitch.bpf.c). Kernels before 5.10
/// accept only tables of exactly this size in the slot.
pub const TEMPLATE_ENTRIES: u32 = fleetsnitch_ebpf::TRAFFIC_TABLE_ENTRIES;

pub struct TrafficMap {
    slot: ArrayOfMaps<MapData, Table>,
    /// The table the programs write to.
    counting: Table,
    /// An empty table, swapped in at the next drain.
    spare: Table,
    entries: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TrafficTableError {
    #[error("cannot create a traffic table of {entries} entries: {source}")]
    Create {
        entries: u32,
        #[source]
        source: MapError,
    },
    #[error(
        "the kernel refused a traffic table of {entries} entries: {source} (kernels before 5.10 \
         take only {TEMPLATE_ENTRIES}: leave collector.traffic_map_entries at its default)"
    )]
    Refused {
        entries: u32,
        #[source]
        source: MapError,
    },
}

impl From<TrafficTableError> for KernelError {
    fn from(error: TrafficTableError) -> Self {
        KernelError::Traffic(Box::new(error))
    }
}

impl TrafficMap {
    /// Takes `traffic` out of the loaded object and puts a first table of
    /// `entries` in it: call before attaching, or the first bytes have
    /// nowhere to go.
    pub fn new(ebpf: &mut Ebpf, entries: u32) -> Result<Self, KernelError> {
        let slot = ArrayOfMaps::try_from(take_map(ebpf, "traffic")?)
            .map_err(KernelError::map("traffic"))?;
        let mut traffic = Self {
            slot,
            counting: create_table(entries)?,
            spare: create_table(entries)?,
            entries,
        };
        traffic
            .slot
            .set(SLOT, &traffic.counting, 0)
            .map_err(|source| TrafficTableError::Refused { entries, source })?;
        Ok(traffic)
    }

    /// Swaps the counting table for the empty spare, then reads and deletes
    /// every entry of the table taken out (which becomes the next spare).
    pub fn drain(&mut self) -> Result<Vec<(TrafficKey, TrafficValue)>, KernelError> {
        // Returns once no program holds the old table any more.
        self.slot
            .set(SLOT, &self.spare, 0)
            .map_err(|source| TrafficTableError::Refused {
                entries: self.entries,
                source,
            })?;
        std::mem::swap(&mut self.counting, &mut self.spare);
        take_all(&mut self.spare)
    }
}

fn create_table(entries: u32) -> Result<Table, TrafficTableError> {
    Table::create(entries, 0).map_err(|source| TrafficTableError::Create { entries, source })
}

/// Reads and deletes every entry of a table no program writes to.
fn take_all(table: &mut Table) -> Result<Vec<(TrafficKey, TrafficValue)>, KernelError> {
    let keys: Vec<TrafficKey> = table.keys().filter_map(Result::ok).collect();
    let mut entries = Vec::with_capacity(keys.len());
    for key in keys {
        let value = match table.get(&key, 0) {
            Ok(value) => value,
            Err(MapError::KeyNotFound) => continue,
            Err(source) => {
                return Err(KernelError::Map {
                    name: "traffic",
                    source,
                });
            }
        };
        match table.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(KernelError::Map {
                    name: "traffic",
                    source,
                });
            }
        }
        entries.push((key, value));
    }
    Ok(entries)
}
