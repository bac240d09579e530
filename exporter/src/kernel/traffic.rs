//! The traffic tables: bytes per (process, executable, flow), drained by
//! swapping tables.
//!
//! The programs count in two hash tables, each in slot 0 of an array of maps:
//! `socket_traffic`, keyed by a socket's kernel address, takes the common
//! case (a socket carrying one process's one flow) at the cost of an 8-byte
//! hash; `traffic`, keyed by the whole flow, takes everything else. Each
//! entry of the first holds the flow key it counts for, so both drain into
//! the same (key, value) pairs.
//!
//! To drain, the collector puts an empty table in each slot and reads the
//! ones it took out. The kernel returns from a map-in-map update only after
//! an RCU grace period, when every program that could still hold the old
//! table has finished (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c):
//! from then on nothing adds to the old table, and reading and deleting its
//! entries cannot lose an add. No sleep, no guess at how long a preempted
//! program may take.

use aya::{
    Ebpf, Pod,
    maps::{ArrayOfMaps, HashMap, MapData, MapError},
};
use fleetsnitch_ebpf::{SocketTraffic, TrafficKey, TrafficValue};

use super::{KernelError, take_map};

/// The slot of each array of maps the programs count in.
const SLOT: u32 = 0;

/// Entries of the table the object declares as the template of `traffic`'s
/// tables (`struct traffic_table` in fleetsnitch.bpf.c). Kernels before 5.10
/// accept only tables of exactly this size in the slot.
pub const TEMPLATE_ENTRIES: u32 = fleetsnitch_ebpf::TRAFFIC_TABLE_ENTRIES;

/// The per-socket tables hold a quarter of the flow tables' entries: sockets
/// active within one drain interval. When one is full, the flow table takes
/// the bytes; nothing is lost.
fn socket_table_entries(traffic_entries: u32) -> u32 {
    traffic_entries / 4
}

pub struct TrafficMap {
    flows: SwappedTables<TrafficKey, TrafficValue>,
    sockets: SwappedTables<u64, SocketTraffic>,
}

/// One array of maps whose slot holds the table the programs count in, and
/// the empty table swapped in at the next drain.
struct SwappedTables<K: Pod, V: Pod> {
    map: &'static str,
    slot: ArrayOfMaps<MapData, HashMap<MapData, K, V>>,
    counting: HashMap<MapData, K, V>,
    spare: HashMap<MapData, K, V>,
    entries: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TrafficTableError {
    #[error("cannot create a {map} table of {entries} entries: {source}")]
    Create {
        map: &'static str,
        entries: u32,
        #[source]
        source: MapError,
    },
    #[error(
        "the kernel refused a {map} table of {entries} entries: {source} (kernels before 5.10 \
         take only the default size: leave collector.traffic_map_entries at \
         {TEMPLATE_ENTRIES})"
    )]
    Refused {
        map: &'static str,
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
    /// Takes `traffic` and `socket_traffic` out of the loaded object and
    /// puts a first table in each, sized from `entries`
    /// (collector.traffic_map_entries): call before attaching, or the first
    /// bytes have nowhere to go.
    pub fn new(ebpf: &mut Ebpf, entries: u32) -> Result<Self, KernelError> {
        Ok(Self {
            flows: SwappedTables::new(ebpf, "traffic", entries)?,
            sockets: SwappedTables::new(ebpf, "socket_traffic", socket_table_entries(entries))?,
        })
    }

    /// Swaps both counting tables for empty ones, then reads and deletes
    /// every entry of the tables taken out: one (key, value) per flow, the
    /// bytes a flow has in both tables (or under two sockets) added together.
    pub fn drain(&mut self) -> Result<Vec<(TrafficKey, TrafficValue)>, KernelError> {
        let mut entries = Vec::new();
        self.sockets
            .swap_and_take(|_, entry| entries.push((entry.key, entry.value)))?;
        self.flows
            .swap_and_take(|key, value| entries.push((key, value)))?;
        merge_same_flows(&mut entries);
        Ok(entries)
    }
}

/// One entry per flow key, bytes added together; in place, so a drain holds
/// no second collection.
fn merge_same_flows(entries: &mut Vec<(TrafficKey, TrafficValue)>) {
    entries.sort_unstable_by_key(|(key, _)| *key);
    entries.dedup_by(|(key, value), (kept_key, kept)| {
        let same = key == kept_key;
        if same {
            kept.bytes[0] += value.bytes[0];
            kept.bytes[1] += value.bytes[1];
        }
        same
    });
}

impl<K: Pod, V: Pod> SwappedTables<K, V> {
    fn new(ebpf: &mut Ebpf, map: &'static str, entries: u32) -> Result<Self, KernelError> {
        let slot = ArrayOfMaps::try_from(take_map(ebpf, map)?).map_err(KernelError::map(map))?;
        let create = || {
            HashMap::create(entries, 0).map_err(|source| TrafficTableError::Create {
                map,
                entries,
                source,
            })
        };
        let mut tables = Self {
            map,
            slot,
            counting: create()?,
            spare: create()?,
            entries,
        };
        tables.install_spare_and_swap()?;
        // The first install put the spare in; the other is the next spare.
        Ok(tables)
    }

    /// Puts the spare in the slot and makes it the counting table. Returns
    /// once no program holds the table taken out.
    fn install_spare_and_swap(&mut self) -> Result<(), TrafficTableError> {
        self.slot
            .set(SLOT, &self.spare, 0)
            .map_err(|source| TrafficTableError::Refused {
                map: self.map,
                entries: self.entries,
                source,
            })?;
        std::mem::swap(&mut self.counting, &mut self.spare);
        Ok(())
    }

    /// Swaps in the empty spare, then reads and deletes every entry of the
    /// table taken out (which becomes the next spare), handing each to `take`.
    fn swap_and_take(&mut self, take: impl FnMut(K, V)) -> Result<(), KernelError> {
        self.install_spare_and_swap()?;
        take_all(self.map, &mut self.spare, take)
    }
}

/// Reads and deletes every entry of a table no program writes to.
fn take_all<K: Pod, V: Pod>(
    name: &'static str,
    table: &mut HashMap<MapData, K, V>,
    mut take: impl FnMut(K, V),
) -> Result<(), KernelError> {
    let keys: Vec<K> = table.keys().filter_map(Result::ok).collect();
    for key in keys {
        let value = match table.get(&key, 0) {
            Ok(value) => value,
            Err(MapError::KeyNotFound) => continue,
            Err(source) => return Err(KernelError::Map { name, source }),
        };
        match table.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(KernelError::Map { name, source }),
        }
        take(key, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tgid: u32, sent: u64, received: u64) -> (TrafficKey, TrafficValue) {
        let key = TrafficKey {
            tgid,
            ..TrafficKey::default()
        };
        let value = TrafficValue {
            bytes: [sent, received],
            ..TrafficValue::default()
        };
        (key, value)
    }

    /// A flow counted in both tables (or under two sockets) comes out once,
    /// with every byte; other flows are untouched.
    #[test]
    fn a_flow_in_both_tables_is_one_entry_with_all_its_bytes() {
        let mut entries = vec![
            entry(7, 100, 1),
            entry(9, 5, 5),
            entry(7, 20, 2),
            entry(7, 3, 0),
        ];
        merge_same_flows(&mut entries);
        let totals: Vec<(u32, [u64; 2])> = entries
            .iter()
            .map(|(key, value)| (key.tgid, value.bytes))
            .collect();
        assert_eq!(totals, vec![(7, [123, 3]), (9, [5, 5])]);
    }
}
