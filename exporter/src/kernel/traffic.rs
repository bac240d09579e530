//! The traffic tables: bytes per (process, executable, flow), drained by
//! swapping tables.
//!
//! The programs count in tables each in slot 0 of an array of maps. The
//! common case goes to a fast one: for the tp_btf programs `flow_slots`, an
//! array of slots found by the flow key's hash (an inlined array lookup
//! instead of a hash-table call); for the other modes `socket_traffic`, keyed
//! by a socket's kernel address (an 8-byte hash). Everything else goes to
//! `traffic`, keyed by the whole flow. Each entry of the fast tables holds the
//! flow key it counts for, so all three drain into the same (key, value)
//! pairs.
//!
//! To drain, the collector puts an empty table in each slot and reads the
//! ones it took out. The kernel returns from a map-in-map update only after
//! an RCU grace period, when every program that could still hold the old
//! table has finished (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c):
//! from then on nothing adds to the old table, and reading and deleting its
//! entries cannot lose an add. No sleep, no guess at how long a preempted
//! program may take.

use std::os::fd::AsFd;

use aya::{
    Ebpf, Pod,
    maps::{ArrayOfMaps, HashMap, InnerMap, MapData, MapError},
};
use fleetsnitch_ebpf::{
    FLOW_SLOTS, FlowSlot, SLOT_EMPTY, SLOT_READY, SocketTraffic, TrafficKey, TrafficValue,
};
use memmap2::{MmapMut, MmapOptions};

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
    flows: Swapped<HashMap<MapData, TrafficKey, TrafficValue>>,
    sockets: Swapped<HashMap<MapData, u64, SocketTraffic>>,
    slots: Swapped<MapData>,
}

/// One array of maps whose slot holds the table the programs count in, and
/// the empty table swapped in at the next drain.
struct Swapped<T> {
    map: &'static str,
    slot: ArrayOfMaps<MapData, T>,
    counting: T,
    spare: T,
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
    #[error("cannot map a flow_slots table to read it: {0}")]
    MapSlots(#[source] std::io::Error),
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
            flows: Swapped::new(ebpf, "traffic", entries, || HashMap::create(entries, 0))?,
            sockets: {
                let entries = socket_table_entries(entries);
                Swapped::new(ebpf, "socket_traffic", entries, || {
                    HashMap::create(entries, 0)
                })?
            },
            slots: Swapped::new(ebpf, "flow_slots", FLOW_SLOTS, create_slot_table)?,
        })
    }

    /// Swaps every counting table for an empty one, then reads and deletes
    /// every entry of the tables taken out: one (key, value) per flow, the
    /// bytes a flow has in several tables (or under two sockets or slots)
    /// added together.
    pub fn drain(&mut self) -> Result<Vec<(TrafficKey, TrafficValue)>, KernelError> {
        let mut entries = Vec::new();
        take_slots(&mut self.slots, |key, value| entries.push((key, value)))?;
        take_entries(&mut self.sockets, |_, entry| {
            entries.push((entry.key, entry.value))
        })?;
        take_entries(&mut self.flows, |key, value| entries.push((key, value)))?;
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

impl<T: InnerMap> Swapped<T> {
    /// Takes `map` (an array of maps) out of the loaded object and puts the
    /// first of two tables made by `create` in its slot.
    fn new(
        ebpf: &mut Ebpf,
        map: &'static str,
        entries: u32,
        create: impl Fn() -> Result<T, MapError>,
    ) -> Result<Self, KernelError> {
        let slot = ArrayOfMaps::try_from(take_map(ebpf, map)?).map_err(KernelError::map(map))?;
        let create = || {
            create().map_err(|source| TrafficTableError::Create {
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
    /// once no program holds the table taken out, which is then the spare.
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
}

/// Swaps in the empty spare of a hash table pair, then reads and deletes
/// every entry of the table taken out, handing each to `take`.
fn take_entries<K: Pod, V: Pod>(
    tables: &mut Swapped<HashMap<MapData, K, V>>,
    take: impl FnMut(K, V),
) -> Result<(), KernelError> {
    tables.install_spare_and_swap()?;
    take_all(tables.map, &mut tables.spare, take)
}

/// A `flow_slots` table: an array the agent can map (`BPF_F_MMAPABLE`, to
/// read and zero it in place: one pass over memory instead of a system call
/// per slot), of exactly the template's size (the programs mask the slot
/// index with it).
fn create_slot_table() -> Result<MapData, MapError> {
    let definition = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        size_of::<u32>() as u32,
        size_of::<FlowSlot>() as u32,
        FLOW_SLOTS,
        aya_obj::generated::BPF_F_MMAPABLE,
    );
    MapData::create(definition, "flow_slots", None)
}

/// Swaps in the zeroed spare of the slot tables, then hands every ready slot
/// of the table taken out to `take` and zeroes it.
fn take_slots(
    tables: &mut Swapped<MapData>,
    take: impl FnMut(TrafficKey, TrafficValue),
) -> Result<(), KernelError> {
    tables.install_spare_and_swap()?;
    let mut mapped = map_slots(&tables.spare)?;
    take_ready_slots(slots_of(&mut mapped)?, take);
    Ok(())
}

/// Maps a slot table, shared with the kernel, for reading and zeroing. Mapped
/// at each drain and unmapped after it, so its pages do not stay in the
/// agent's resident set.
fn map_slots(table: &MapData) -> Result<MmapMut, TrafficTableError> {
    let fd = table.fd().as_fd();
    // SAFETY: an array map created BPF_F_MMAPABLE of exactly this size; no
    // program writes to it while it is out of its slot (see the module
    // documentation), and only this mapping does, on this thread.
    unsafe {
        MmapOptions::new()
            .len(FLOW_SLOTS as usize * size_of::<FlowSlot>())
            .map_mut(&fd)
    }
    .map_err(TrafficTableError::MapSlots)
}

/// The mapping as slots; refused (not a panic) if it is not exactly the
/// table's size or not aligned for them, which no mapping of it should be.
fn slots_of(mapped: &mut MmapMut) -> Result<&mut [FlowSlot], TrafficTableError> {
    let expected = FLOW_SLOTS as usize * size_of::<FlowSlot>();
    if mapped.len() != expected || mapped.as_ptr().align_offset(align_of::<FlowSlot>()) != 0 {
        return Err(TrafficTableError::MapSlots(std::io::Error::other(format!(
            "mapped {} bytes at {:p}, expected {expected} bytes aligned to {}",
            mapped.len(),
            mapped.as_ptr(),
            align_of::<FlowSlot>()
        ))));
    }
    // SAFETY: the length and alignment are checked above; FlowSlot is
    // `repr(C)` plain integers, valid for any bit pattern, and the kernel
    // lays out an mmapable array's elements contiguously (96 bytes, already
    // a multiple of 8).
    Ok(unsafe {
        std::slice::from_raw_parts_mut(mapped.as_mut_ptr().cast::<FlowSlot>(), FLOW_SLOTS as usize)
    })
}

/// Hands every ready slot to `take` and zeroes every slot in use. A slot
/// still claimed cannot be seen here (the swap waited for every program);
/// were one seen, its key would be incomplete, so it is zeroed uncounted
/// rather than attributed to a wrong flow.
fn take_ready_slots(slots: &mut [FlowSlot], mut take: impl FnMut(TrafficKey, TrafficValue)) {
    for slot in slots.iter_mut().filter(|slot| slot.state != SLOT_EMPTY) {
        if slot.state == SLOT_READY {
            take(slot.key, slot.value);
        } else {
            tracing::warn!(
                state = slot.state,
                "flow_slots: a slot taken out was not ready"
            );
        }
        *slot = FlowSlot::default();
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

    fn slot(state: u32, tgid: u32, sent: u64) -> FlowSlot {
        let (key, value) = entry(tgid, sent, 0);
        FlowSlot {
            state,
            key,
            value,
            ..FlowSlot::default()
        }
    }

    /// Ready slots are read; a slot left claimed (its key possibly half
    /// written) is not attributed to anyone; every slot comes back zeroed,
    /// so the table can be swapped in again.
    #[test]
    fn ready_slots_are_taken_and_every_used_slot_is_zeroed() {
        let mut slots = vec![FlowSlot::default(); 6];
        slots[1] = slot(SLOT_READY, 7, 100);
        slots[2] = slot(fleetsnitch_ebpf::SLOT_CLAIMED, 8, 5);
        slots[5] = slot(SLOT_READY, 9, 1);
        let mut taken = Vec::new();
        take_ready_slots(&mut slots, |key, value| {
            taken.push((key.tgid, value.bytes[0]))
        });
        assert_eq!(taken, vec![(7, 100), (9, 1)]);
        assert!(slots.iter().all(|slot| slot.state == SLOT_EMPTY
            && slot.key == TrafficKey::default()
            && slot.value.bytes == [0, 0]));
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
