//! Executables: the file that ran, and a process seen running it.

use std::{fs, os::unix::fs::MetadataExt};

use super::{Sha256, Workload};

/// An executable file as the kernel names it: its file system's device, its
/// inode number and the inode's generation.
///
/// The inode number alone does not name a file for ever: a deleted file's
/// number is given to the next file created (ext4 does at once). The
/// generation (`i_generation`) is drawn anew for every inode by ext4, xfs,
/// btrfs, tmpfs and f2fs, so two files that shared a number one after the
/// other are two keys. Where the file system sets no generation (0:
/// overlayfs, procfs) the agent names traffic by its process first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExeKey {
    /// Device number in the userspace `st_dev` encoding.
    pub dev: u64,
    pub ino: u64,
    /// The inode's `i_generation`; 0 when the file system sets none.
    pub generation: u32,
}

impl ExeKey {
    /// From the kernel's internal `dev_t` (`MAJOR << 20 | MINOR`).
    pub fn from_kernel(kernel_dev: u32, ino: u64, generation: u32) -> Self {
        let major = kernel_dev >> 20;
        let minor = kernel_dev & ((1 << 20) - 1);
        Self {
            dev: libc::makedev(major, minor),
            ino,
            generation,
        }
    }

    /// The key of kernel threads, which run no file.
    pub fn is_kernel(&self) -> bool {
        self.dev == 0 && self.ino == 0
    }

    /// Whether `metadata` may describe this very file: device and inode
    /// agree (`stat` does not tell the generation; see
    /// `identity::hashing` for the check that does, where it can).
    pub fn matches(&self, metadata: &fs::Metadata) -> bool {
        metadata.dev() == self.dev && metadata.ino() == self.ino
    }
}

/// An executable as one process ran it: what the hasher hands on for the
/// journal (and, through it, the other sinks) once the file is hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutableSighting {
    pub path: String,
    /// The file that ran: flows of that very file take this hash.
    pub file: ExeKey,
    /// `None` when the executable could not be hashed (see `hash_failure`).
    pub sha256: Option<Sha256>,
    /// Why it could not be hashed (a `fleetsnitch_hash_failures_total` reason).
    pub hash_failure: Option<&'static str>,
    /// The kernel's task name (`comm`).
    pub name: String,
    pub uid: u32,
    /// The user's name on this host, when it was looked up.
    pub user_name: Option<String>,
    pub parent_path: Option<String>,
    /// The container and pod the process ran in, where known.
    pub workload: Workload,
    /// Unix seconds.
    pub seen_at: i64,
    /// The file was modified in place since it was last hashed.
    pub modified: bool,
    /// Seen doing network I/O; `false` for a sighting from exec tracking alone.
    pub used_network: bool,
    /// Its command line, when exec tracking records them.
    pub command_line: Option<String>,
}
