//! A process seen running an executable.

use super::Sha256;

/// An executable as one process ran it: what the hasher hands on for the
/// journal (and, through it, the other sinks) once the file is hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutableSighting {
    pub path: String,
    /// `None` when the executable could not be hashed (see `hash_failure`).
    pub sha256: Option<Sha256>,
    /// Why it could not be hashed (a `fleetsnitch_hash_failures_total` reason).
    pub hash_failure: Option<&'static str>,
    /// The kernel's task name (`comm`).
    pub name: String,
    pub uid: u32,
    pub parent_path: Option<String>,
    /// Unix seconds.
    pub seen_at: i64,
    /// The file was modified in place since it was last hashed.
    pub modified: bool,
    /// Seen doing network I/O; `false` for a sighting from exec tracking alone.
    pub used_network: bool,
    /// Its command line, when exec tracking records them.
    pub command_line: Option<String>,
}
