//! Who is behind the traffic: processes and executables as the kernel saw them.
//!
//! The kernel announces each process once (path walked from its executable's
//! dentries, device+inode, parent, uid) when it first touches the network.
//! Traffic keys carry the executable's device+inode, so attribution holds even
//! after the process is gone; `/proc` is only a fallback for announcements the
//! ring buffer could not carry, and then only if device+inode still match.

use std::{collections::HashMap, fs, os::unix::fs::MetadataExt, path::PathBuf};

use fleetsnitch_ebpf::{IDENTITY_NO_EXE, IDENTITY_PATH_TRUNCATED, IdentityEvent};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

use super::containers::{self, CgroupIndex, ContainerCache, ContainerRef};

/// Label used for traffic of kernel threads, which have no executable.
pub const KERNEL_EXE: &str = "[kernel]";
/// Label used when neither the kernel nor `/proc` could name the executable.
pub const UNKNOWN_EXE: &str = "[unknown]";

/// An executable file, by the device and inode the kernel reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExeKey {
    /// Device number in the userspace `st_dev` encoding.
    pub dev: u64,
    pub ino: u64,
}

impl ExeKey {
    /// From the kernel's internal `dev_t` (`MAJOR << 20 | MINOR`).
    pub fn from_kernel(kernel_dev: u32, ino: u64) -> Self {
        let major = kernel_dev >> 20;
        let minor = kernel_dev & ((1 << 20) - 1);
        Self {
            dev: libc::makedev(major, minor),
            ino,
        }
    }

    pub fn is_kernel(&self) -> bool {
        self.dev == 0 && self.ino == 0
    }

    /// Whether `metadata` describes this very file.
    pub fn matches(&self, metadata: &fs::Metadata) -> bool {
        metadata.dev() == self.dev && metadata.ino() == self.ino
    }
}

/// A process as announced by the kernel.
#[derive(Debug, Clone)]
pub struct Process {
    pub tgid: u32,
    pub start_time_ns: u64,
    pub exe: ExeKey,
    pub comm: String,
    pub uid: u32,
    pub ppid: u32,
    pub parent_exe: ExeKey,
    /// Path of the parent's executable, when it could be found.
    pub parent_path: Option<String>,
    /// The container (or systemd unit) the process runs in, from its cgroup.
    pub container: Option<ContainerRef>,
}

/// Distinct cgroup paths whose container is remembered.
const CONTAINER_CACHE_ENTRIES: usize = 4096;

/// What the identity table knows and could not find.
#[derive(Debug, Clone, Default)]
pub struct IdentityMetrics {
    tracked_processes: Gauge,
    tracked_executables: Gauge,
    truncated_paths: Counter,
}

impl IdentityMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "tracked_processes",
            "Processes with a known identity",
            metrics.tracked_processes.clone(),
        );
        registry.register(
            "tracked_executables",
            "Executables with a known path",
            metrics.tracked_executables.clone(),
        );
        registry.register(
            "truncated_paths",
            "Executable paths too deep or too long for the kernel walk, resolved through /proc",
            metrics.truncated_paths.clone(),
        );
        metrics
    }
}

/// Processes and executables known to the agent.
#[derive(Debug, Default)]
pub struct IdentityTable {
    processes: HashMap<u32, Process>,
    containers: Option<ContainerCache<String>>,
    cgroups: Option<Option<CgroupIndex>>,
    /// Processes that exited, kept until the drain that carries their last traffic.
    exited: Vec<(u32, u64)>,
    exe_paths: HashMap<ExeKey, String>,
    metrics: IdentityMetrics,
}

/// What [`IdentityTable::record`] learnt.
#[derive(Debug)]
pub struct Recorded {
    pub process: Process,
    /// Set when this executable had no known path before.
    pub new_exe: Option<String>,
}

impl IdentityTable {
    pub fn new(metrics: IdentityMetrics) -> Self {
        Self {
            metrics,
            ..Self::default()
        }
    }

    /// The process an announcement or an exec record describes.
    fn process_of(&mut self, event: &IdentityEvent, exe: ExeKey) -> Process {
        let parent_exe = ExeKey::from_kernel(event.parent_exe_dev, event.parent_exe_ino);
        Process {
            tgid: event.tgid,
            start_time_ns: event.start_time_ns,
            exe,
            comm: c_string(&event.comm),
            uid: event.uid,
            ppid: event.ppid,
            parent_exe,
            parent_path: self.parent_path(event.ppid, parent_exe),
            container: self.container_of(event.tgid, event.cgroup_id),
        }
    }

    /// Records an identity announcement from the kernel.
    pub fn record(&mut self, event: &IdentityEvent) -> Recorded {
        let exe = ExeKey::from_kernel(event.exe_dev, event.exe_ino);
        let process = self.process_of(event, exe);
        let mut new_exe = None;
        let truncated = event.flags & IDENTITY_PATH_TRUNCATED != 0;
        // A known file announced under another path was renamed or hard-linked,
        // or is a new file under a reused inode number: the latest announcement
        // names it (a truncated one is not worth a /proc lookup when known).
        let path_changed = |known: &String| !truncated && *known != join_path(event);
        if event.flags & IDENTITY_NO_EXE == 0 && self.exe_paths.get(&exe).is_none_or(path_changed) {
            let path = if truncated {
                self.metrics.truncated_paths.inc();
                proc_exe_path(event.tgid, exe).unwrap_or_else(|| format!("/…{}", join_path(event)))
            } else {
                join_path(event)
            };
            self.exe_paths.insert(exe, path.clone());
            new_exe = Some(path);
        }
        self.processes.insert(event.tgid, process.clone());
        Recorded { process, new_exe }
    }

    /// Describes a process that just executed a program (exec tracking),
    /// without tracking it as a process (exec-only processes announce no
    /// exit). The path is the one this event's kernel walk found, never one
    /// remembered for the same (device, inode): on btrfs two files in two
    /// subvolumes can share both.
    pub fn describe_exec(&mut self, event: &IdentityEvent) -> (Process, String) {
        let path = exec_path(event);
        (self.exec_process(event, &path), path)
    }

    /// The process of an exec event whose path ([`exec_path`]) is `path`:
    /// parent, container.
    pub fn exec_process(&mut self, event: &IdentityEvent, path: &str) -> Process {
        let exe = ExeKey::from_kernel(event.exe_dev, event.exe_ino);
        if event.flags & IDENTITY_PATH_TRUNCATED != 0 {
            self.metrics.truncated_paths.inc();
        }
        let process = self.process_of(event, exe);
        // The exec's own walk is current: an earlier file at this (device,
        // inode) may have been deleted and its inode reused.
        if self.exe_paths.get(&exe).is_none_or(|known| known != path) {
            self.exe_paths.insert(exe, path.to_owned());
        }
        process
    }

    /// The container of a process: from the cgroup v2 id the kernel reported
    /// (which outlives the process), else from `/proc/<tgid>/cgroup` (cgroup
    /// v1 hosts; the process was just on the network, so it usually still runs).
    fn container_of(&mut self, tgid: u32, cgroup_id: u64) -> Option<ContainerRef> {
        let from_kernel = self
            .cgroups
            .get_or_insert_with(CgroupIndex::new)
            .as_mut()
            .and_then(|index| index.path_of(cgroup_id));
        let containers = self
            .containers
            .get_or_insert_with(|| ContainerCache::new(CONTAINER_CACHE_ENTRIES));
        if let Some(found) = from_kernel.and_then(|path| containers.container_of(&path)) {
            return Some(found);
        }
        let cgroup = containers::cgroup_path_of(tgid).ok()?;
        containers.container_of(&cgroup)
    }

    /// The parent's executable path: known already, or read from `/proc` while
    /// the parent still runs that very file. The kernel announces parents only
    /// when they use the network themselves.
    fn parent_path(&mut self, ppid: u32, parent_exe: ExeKey) -> Option<String> {
        if parent_exe.is_kernel() {
            return Some(KERNEL_EXE.to_owned());
        }
        if let Some(path) = self.exe_paths.get(&parent_exe) {
            return Some(path.clone());
        }
        let path = proc_exe_path(ppid, parent_exe)?;
        self.exe_paths.insert(parent_exe, path.clone());
        Some(path)
    }

    /// Notes that a process exited. It stays known until [`Self::purge_exited`]:
    /// its last traffic is still in the kernel map, waiting for the next drain.
    pub fn forget(&mut self, tgid: u32, start_time_ns: u64) {
        self.exited.push((tgid, start_time_ns));
    }

    /// Takes the exits noted so far; pass them to [`Self::purge`] once the
    /// traffic that preceded them has been drained.
    pub fn take_exited(&mut self) -> Vec<(u32, u64)> {
        std::mem::take(&mut self.exited)
    }

    /// Removes exited processes, unless their tgid was reused since.
    pub fn purge(&mut self, exited: Vec<(u32, u64)>) {
        for (tgid, start_time_ns) in exited {
            if self
                .processes
                .get(&tgid)
                .is_some_and(|p| p.start_time_ns == start_time_ns)
            {
                self.processes.remove(&tgid);
            }
        }
        self.metrics
            .tracked_processes
            .set(self.processes.len() as i64);
        self.metrics
            .tracked_executables
            .set(self.exe_paths.len() as i64);
    }

    pub fn process(&self, tgid: u32) -> Option<&Process> {
        self.processes.get(&tgid)
    }

    /// The path of `exe`, resolving through `/proc/<tgid>/exe` when the kernel's
    /// announcement was lost. Kernel threads and unknown files get a bracketed label.
    pub fn exe_path(&mut self, tgid: u32, exe: ExeKey) -> (String, bool) {
        if exe.is_kernel() {
            return (KERNEL_EXE.to_owned(), true);
        }
        if let Some(path) = self.exe_paths.get(&exe) {
            return (path.clone(), true);
        }
        match proc_exe_path(tgid, exe) {
            Some(path) => {
                self.exe_paths.insert(exe, path.clone());
                (path, true)
            }
            None => (UNKNOWN_EXE.to_owned(), false),
        }
    }

    /// Path already known for `exe`, without any lookup.
    pub fn known_path(&self, exe: ExeKey) -> Option<&str> {
        self.exe_paths.get(&exe).map(String::as_str)
    }

    pub fn process_count(&self) -> usize {
        self.processes.len()
    }

    pub fn executable_count(&self) -> usize {
        self.exe_paths.len()
    }
}

/// The executable path an exec event names, from its own kernel walk
/// (`/proc` only when the walk was truncated). Cheap: called before the file
/// is opened, while the process may still run.
pub fn exec_path(event: &IdentityEvent) -> String {
    if event.flags & IDENTITY_PATH_TRUNCATED != 0 {
        let exe = ExeKey::from_kernel(event.exe_dev, event.exe_ino);
        proc_exe_path(event.tgid, exe).unwrap_or_else(|| format!("/…{}", join_path(event)))
    } else {
        join_path(event)
    }
}

/// `/proc/<tgid>/exe`, if that process still runs the executable `exe`.
pub fn proc_exe_path(tgid: u32, exe: ExeKey) -> Option<String> {
    let link = PathBuf::from(format!("/proc/{tgid}/exe"));
    let metadata = fs::metadata(&link).ok()?;
    if !exe.matches(&metadata) {
        return None;
    }
    let target = fs::read_link(&link).ok()?;
    let text = crate::support::raw_text::from_os(target.as_os_str());
    Some(text.strip_suffix(" (deleted)").unwrap_or(&text).to_owned())
}

/// Joins the kernel's leaf-first components into an absolute path.
fn join_path(event: &IdentityEvent) -> String {
    let depth = (event.depth as usize).min(event.names.len());
    let mut path = Vec::with_capacity(depth * 16);
    // Empty slots are mount crossings; "/" is the root of a file system
    // mounted on the namespace's root (seen under some init setups).
    for name in event.names[..depth].iter().rev().map(|name| c_bytes(name)) {
        if !name.is_empty() && name != b"/" {
            path.push(b'/');
            path.extend_from_slice(name);
        }
    }
    if path.is_empty() {
        path.push(b'/');
    }
    crate::support::raw_text::from_bytes(&path)
}

fn c_bytes(buffer: &[u8]) -> &[u8] {
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    &buffer[..end]
}

fn c_string(buffer: &[u8]) -> String {
    crate::support::raw_text::from_bytes(c_bytes(buffer))
}

#[cfg(test)]
mod tests {
    use fleetsnitch_ebpf::{EVENT_IDENTITY, NAME_LEN, PATH_DEPTH};

    use super::*;

    fn event(components: &[&str]) -> IdentityEvent {
        let mut names = [[0u8; NAME_LEN]; PATH_DEPTH];
        for (slot, name) in names.iter_mut().zip(components.iter().rev()) {
            slot[..name.len()].copy_from_slice(name.as_bytes());
        }
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        IdentityEvent {
            kind: EVENT_IDENTITY,
            tgid: 4242,
            ppid: 1,
            uid: 1000,
            start_time_ns: 7,
            exe_ino: 99,
            exe_dev: (8 << 20) | 1,
            flags: 0,
            parent_exe_ino: 0,
            parent_exe_dev: 0,
            depth: components.len() as u32,
            comm,
            cgroup_id: 0,
            names,
        }
    }

    #[test]
    fn path_is_rebuilt_root_first() {
        let mut table = IdentityTable::default();
        let recorded = table.record(&event(&["usr", "bin", "curl"]));
        assert_eq!(recorded.new_exe.as_deref(), Some("/usr/bin/curl"));
        assert_eq!(recorded.process.comm, "curl");
        let key = ExeKey::from_kernel((8 << 20) | 1, 99);
        assert_eq!(
            table.exe_path(4242, key),
            ("/usr/bin/curl".to_owned(), true)
        );
    }

    #[test]
    fn a_reused_inode_is_named_by_its_latest_walk() {
        let mut table = IdentityTable::default();
        table.record(&event(&["tmp", "deleted-tool"]));
        let recorded = table.record(&event(&["tmp", "new-tool"]));
        assert_eq!(recorded.new_exe.as_deref(), Some("/tmp/new-tool"));
        let key = ExeKey::from_kernel((8 << 20) | 1, 99);
        assert_eq!(table.exe_path(4242, key).0, "/tmp/new-tool");
        let mut exec = event(&["tmp", "newest-tool"]);
        exec.tgid = 4343;
        table.describe_exec(&exec);
        assert_eq!(table.exe_path(4242, key).0, "/tmp/newest-tool");
    }

    #[test]
    fn exec_is_described_by_its_own_path_and_not_tracked() {
        let mut table = IdentityTable::default();
        table.record(&event(&["srv", "a", "tool"]));
        let mut other = event(&["srv", "b", "tool"]);
        other.tgid = 4343;
        let (process, path) = table.describe_exec(&other);
        assert_eq!(path, "/srv/b/tool", "same (dev, ino), another subvolume");
        assert_eq!(process.comm, "curl");
        assert!(table.process(4343).is_none());
    }

    #[test]
    fn empty_slots_of_mount_crossings_are_skipped() {
        let mut table = IdentityTable::default();
        let recorded = table.record(&event(&["/", "", "usr", "", "bin", "tool"]));
        assert_eq!(recorded.new_exe.as_deref(), Some("/usr/bin/tool"));
    }

    #[test]
    fn kernel_dev_is_converted_to_userspace_encoding() {
        let key = ExeKey::from_kernel((259 << 20) | 3, 5);
        assert_eq!(libc::major(key.dev), 259);
        assert_eq!(libc::minor(key.dev), 3);
    }

    #[test]
    fn second_announcement_of_a_known_exe_is_not_new() {
        let mut table = IdentityTable::default();
        assert!(table.record(&event(&["bin", "sh"])).new_exe.is_some());
        assert!(table.record(&event(&["bin", "sh"])).new_exe.is_none());
    }

    #[test]
    fn a_reused_inode_number_takes_the_path_announced_last() {
        let mut table = IdentityTable::default();
        let key = ExeKey::from_kernel((8 << 20) | 1, 99);
        table.record(&event(&["tmp", "deleted-tool"]));
        let recorded = table.record(&event(&["tmp", "new-tool"]));
        assert_eq!(recorded.new_exe.as_deref(), Some("/tmp/new-tool"));
        assert_eq!(table.exe_path(4242, key).0, "/tmp/new-tool");
    }

    #[test]
    fn exit_of_a_reused_tgid_keeps_the_new_process() {
        let mut table = IdentityTable::default();
        table.record(&event(&["bin", "sh"]));
        table.forget(4242, 6);
        let exited = table.take_exited();
        table.purge(exited);
        assert!(table.process(4242).is_some());
        table.forget(4242, 7);
        assert!(
            table.process(4242).is_some(),
            "kept until its traffic is drained"
        );
        let exited = table.take_exited();
        table.purge(exited);
        assert!(table.process(4242).is_none());
    }

    #[test]
    fn unknown_exe_of_a_vanished_process_is_labelled_unknown() {
        let mut table = IdentityTable::default();
        let key = ExeKey { dev: 1, ino: 1 };
        assert_eq!(
            table.exe_path(u32::MAX - 1, key),
            (UNKNOWN_EXE.to_owned(), false)
        );
    }

    #[test]
    fn own_process_resolves_through_proc() {
        let metadata = fs::metadata("/proc/self/exe").unwrap();
        let key = ExeKey {
            dev: metadata.dev(),
            ino: metadata.ino(),
        };
        let path = proc_exe_path(std::process::id(), key).unwrap();
        assert_eq!(PathBuf::from(path), std::env::current_exe().unwrap());
        let wrong = ExeKey {
            dev: key.dev,
            ino: key.ino + 1,
        };
        assert!(proc_exe_path(std::process::id(), wrong).is_none());
    }
}
