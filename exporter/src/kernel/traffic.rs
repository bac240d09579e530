//! The `traffic` map: bytes per (process, executable, flow), drained by
//! generation.
//!
//! The programs add to keys of the generation the `config` array names. To
//! drain, the collector flips the generation, waits out programs still
//! running with the old one ([`GENERATION_GRACE`]), then reads and deletes
//! every key of the old generation.

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError},
};
use fleetsnitch_ebpf::{Config, TrafficKey, TrafficValue};

use super::{KernelError, take_map};

/// Time given to programs that read the old generation before it is drained.
/// Tracing programs run with migration disabled for microseconds at most.
pub const GENERATION_GRACE: Duration = Duration::from_millis(2);

pub struct TrafficMap {
    traffic: HashMap<MapData, TrafficKey, TrafficValue>,
    config: Array<MapData, Config>,
    generation: u32,
}

impl TrafficMap {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        Ok(Self {
            traffic: HashMap::try_from(take_map(ebpf, "traffic")?)
                .map_err(KernelError::map("traffic"))?,
            config: Array::try_from(take_map(ebpf, "config")?)
                .map_err(KernelError::map("config"))?,
            generation: 0,
        })
    }

    /// Makes the programs write under the other generation.
    pub fn flip(&mut self) -> Result<(), KernelError> {
        self.generation ^= 1;
        let config = Config {
            generation: self.generation,
            _pad: 0,
        };
        self.config
            .set(0, config, 0)
            .map_err(KernelError::map("config"))
    }

    /// Reads and deletes every entry of the generation before the last flip.
    pub fn take_previous(&mut self) -> Result<Vec<(TrafficKey, TrafficValue)>, KernelError> {
        let old_keys: Vec<TrafficKey> = self
            .traffic
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.generation != self.generation)
            .collect();
        let mut entries = Vec::with_capacity(old_keys.len());
        for key in old_keys {
            let value = match self.traffic.get(&key, 0) {
                Ok(value) => value,
                Err(MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(KernelError::Map {
                        name: "traffic",
                        source,
                    });
                }
            };
            match self.traffic.remove(&key) {
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
}
