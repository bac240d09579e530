//! Who is behind the traffic: processes and executables as the kernel saw them.
//!
//! The kernel announces each process once (path walked from its executable's
//! dentries, device, inode and inode generation, parent, uid) when it first
//! touches the network. Traffic keys carry the process and its executable's
//! file, so attribution holds even after the process is gone and its file's
//! inode number is given to another file: a flow is named by its own
//! process's announcement while the process is known, else by its file.
//! `/proc` is only a fallback for announcements the ring buffer could not
//! carry, and then only if device+inode still match.

use std::{collections::HashMap, fs, path::PathBuf, time::Duration};

use fleetsnitch_ebpf::{IDENTITY_NO_EXE, IDENTITY_PATH_TRUNCATED, IdentityEvent};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

use super::{
    command_line,
    containers::{self, CgroupIndex, ContainerCache, ContainerRef},
};
pub use crate::model::ExeKey;
use crate::support::unix_now;

/// Label used for traffic of kernel threads, which have no executable.
pub const KERNEL_EXE: &str = "[kernel]";
/// Label used when neither the kernel nor `/proc` could name the executable.
pub const UNKNOWN_EXE: &str = "[unknown]";

/// The kernel's name of an identity event's executable.
pub fn exe_key_of(event: &IdentityEvent) -> ExeKey {
    ExeKey::from_kernel(event.exe_dev, event.exe_ino, event.exe_inode_generation)
}

/// A process as announced by the kernel.
#[derive(Debug, Clone)]
pub struct Process {
    pub tgid: u32,
    pub start_time_ns: u64,
    pub exe: ExeKey,
    /// Path of its executable, from its own announcement: what its traffic is
    /// named by, whatever file later takes the same inode number.
    pub path: Option<String>,
    pub comm: String,
    pub uid: u32,
    pub ppid: u32,
    pub parent_exe: ExeKey,
    /// Path of the parent's executable, when it could be found.
    pub parent_path: Option<String>,
    /// The parent's task name, read when the process was announced (`None`
    /// when the parent had exited by then).
    pub parent_comm: Option<String>,
    /// Command lines of the process and its parent, when recorded
    /// (`journal.record_command_lines`).
    pub command_line: Option<String>,
    pub parent_command_line: Option<String>,
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

/// A file's path, and when it was last needed (Unix seconds).
#[derive(Debug, Clone)]
struct KnownPath {
    path: String,
    used: i64,
}

/// How [`IdentityTable::name`] named a flow's executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// By its process's own announcement.
    Process,
    /// By the path last announced for its file (the process is gone).
    File,
    /// Through `/proc/<pid>/exe`: the announcement was lost.
    Proc,
    /// Not at all: `[unknown]` (or `[kernel]` for kernel threads, which is resolved).
    Unresolved,
}

impl Naming {
    /// Whether the flow has a real name (`[kernel]` counts as one).
    pub fn is_resolved(self) -> bool {
        self != Self::Unresolved
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
    exe_paths: HashMap<ExeKey, KnownPath>,
    metrics: IdentityMetrics,
    /// Byte budget of command lines, when they are recorded.
    command_lines: Option<usize>,
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

    /// Reads each announced process's and its parent's command line, capped
    /// at `max_bytes` (`journal.record_command_lines`).
    pub fn with_command_lines(mut self, max_bytes: usize) -> Self {
        self.command_lines = Some(max_bytes);
        self
    }

    /// The process an announcement or an exec record describes.
    fn process_of(&mut self, event: &IdentityEvent, exe: ExeKey) -> Process {
        let parent_exe = ExeKey::from_kernel(
            event.parent_exe_dev,
            event.parent_exe_ino,
            event.parent_exe_inode_generation,
        );
        Process {
            tgid: event.tgid,
            start_time_ns: event.start_time_ns,
            exe,
            path: None,
            comm: c_string(&event.comm),
            uid: event.uid,
            ppid: event.ppid,
            parent_exe,
            parent_path: self.parent_path(event.ppid, parent_exe),
            parent_comm: (event.ppid != 0)
                .then(|| command_line::comm_of(event.ppid))
                .flatten(),
            command_line: None,
            parent_command_line: None,
            container: self.container_of(event.tgid, event.cgroup_id),
        }
    }

    /// Records an identity announcement from the kernel.
    pub fn record(&mut self, event: &IdentityEvent) -> Recorded {
        let exe = exe_key_of(event);
        let mut process = self.process_of(event, exe);
        if let Some(max_bytes) = self.command_lines {
            // Read now: the process may exit before its first window is drained.
            process.command_line = command_line::of_process(event.tgid, max_bytes);
            process.parent_command_line = (event.ppid != 0)
                .then(|| command_line::of_process(event.ppid, max_bytes))
                .flatten();
        }
        let mut new_exe = None;
        if event.flags & IDENTITY_NO_EXE == 0 {
            // A known file announced under another path was renamed or
            // hard-linked: the latest announcement names the file, each
            // process keeps the path it was announced with. A truncated walk
            // is not worth a /proc lookup when the file is known.
            let known = self.exe_paths.get(&exe).map(|known| known.path.clone());
            let path = match (event.flags & IDENTITY_PATH_TRUNCATED != 0, known.clone()) {
                (true, Some(known)) => known,
                (true, None) => {
                    self.metrics.truncated_paths.inc();
                    proc_exe_path(event.tgid, exe)
                        .unwrap_or_else(|| format!("/…{}", join_path(event)))
                }
                (false, _) => join_path(event),
            };
            if known.as_deref() != Some(path.as_str()) {
                new_exe = Some(path.clone());
            }
            self.remember_path(exe, &path);
            process.path = Some(path);
        }
        self.processes.insert(event.tgid, process.clone());
        Recorded { process, new_exe }
    }

    /// Notes that the file `exe` is at `path`, now.
    fn remember_path(&mut self, exe: ExeKey, path: &str) {
        let used = unix_now();
        match self.exe_paths.get_mut(&exe) {
            Some(known) if known.path == path => known.used = used,
            _ => {
                self.exe_paths.insert(
                    exe,
                    KnownPath {
                        path: path.to_owned(),
                        used,
                    },
                );
            }
        }
    }

    /// The path of `exe` in the table, marked as needed now.
    fn lookup_path(&mut self, exe: ExeKey) -> Option<String> {
        let known = self.exe_paths.get_mut(&exe)?;
        known.used = unix_now();
        Some(known.path.clone())
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
        let exe = exe_key_of(event);
        if event.flags & IDENTITY_PATH_TRUNCATED != 0 {
            self.metrics.truncated_paths.inc();
        }
        let mut process = self.process_of(event, exe);
        // The exec's own walk is current (on btrfs, two subvolumes' files
        // may share device, inode and generation).
        self.remember_path(exe, path);
        process.path = Some(path.to_owned());
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
        if let Some(path) = self.lookup_path(parent_exe) {
            return Some(path);
        }
        let path = proc_exe_path(ppid, parent_exe)?;
        self.remember_path(parent_exe, &path);
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

    /// The process `tgid` if it is the one that runs (ran) the file `exe`.
    pub fn process_running(&self, tgid: u32, exe: ExeKey) -> Option<&Process> {
        self.processes
            .get(&tgid)
            .filter(|process| process.exe == exe)
    }

    /// The path of the executable `exe` that process `tgid` ran, for its
    /// traffic: the process's own announcement while it is known (so a file
    /// that took over the inode number of a deleted one never takes its
    /// traffic, even where the file system keeps no inode generation), else
    /// the path last announced for the file, else `/proc/<tgid>/exe` (the
    /// announcement was lost). Kernel threads and unknown files get a
    /// bracketed label.
    pub fn name(&mut self, tgid: u32, exe: ExeKey) -> (String, Naming) {
        if exe.is_kernel() {
            return (KERNEL_EXE.to_owned(), Naming::File);
        }
        if let Some(path) = self.process_running(tgid, exe).and_then(|p| p.path.clone()) {
            if let Some(known) = self.exe_paths.get_mut(&exe) {
                known.used = unix_now();
            }
            return (path, Naming::Process);
        }
        if let Some(path) = self.lookup_path(exe) {
            return (path, Naming::File);
        }
        match proc_exe_path(tgid, exe) {
            Some(path) => {
                self.remember_path(exe, &path);
                (path, Naming::Proc)
            }
            None => (UNKNOWN_EXE.to_owned(), Naming::Unresolved),
        }
    }

    /// The path of `exe` (see [`Self::name`]), and whether it was resolved.
    pub fn exe_path(&mut self, tgid: u32, exe: ExeKey) -> (String, bool) {
        let (path, naming) = self.name(tgid, exe);
        (path, naming.is_resolved())
    }

    /// Path already known for `exe`, without any lookup.
    pub fn known_path(&self, exe: ExeKey) -> Option<&str> {
        self.exe_paths.get(&exe).map(|known| known.path.as_str())
    }

    /// Forgets the paths of files no process runs that were not needed for
    /// `keep` (a deleted file's entry would otherwise stay for ever).
    pub fn prune_paths(&mut self, now: i64, keep: Duration) {
        let horizon = now.saturating_sub(i64::try_from(keep.as_secs()).unwrap_or(i64::MAX));
        let running: std::collections::HashSet<ExeKey> = self
            .processes
            .values()
            .flat_map(|process| [process.exe, process.parent_exe])
            .collect();
        self.exe_paths
            .retain(|exe, known| known.used >= horizon || running.contains(exe));
        self.metrics
            .tracked_executables
            .set(self.exe_paths.len() as i64);
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
        let exe = exe_key_of(event);
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
    if exe.generation != 0
        && let Ok(file) = fs::File::open(&link)
        && !super::inode::generation_agrees(&file, exe)
    {
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
    use std::os::unix::fs::MetadataExt;

    use fleetsnitch_ebpf::{EVENT_IDENTITY, NAME_LEN, PATH_DEPTH};

    use super::*;

    const DEV: u32 = (8 << 20) | 1;

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
            exe_dev: DEV,
            flags: 0,
            parent_exe_ino: 0,
            parent_exe_dev: 0,
            depth: components.len() as u32,
            comm,
            cgroup_id: 0,
            exe_inode_generation: 1,
            parent_exe_inode_generation: 0,
            names,
        }
    }

    fn key(generation: u32) -> ExeKey {
        ExeKey::from_kernel(DEV, 99, generation)
    }

    #[test]
    fn path_is_rebuilt_root_first() {
        let mut table = IdentityTable::default();
        let recorded = table.record(&event(&["usr", "bin", "curl"]));
        assert_eq!(recorded.new_exe.as_deref(), Some("/usr/bin/curl"));
        assert_eq!(recorded.process.comm, "curl");
        assert_eq!(
            table.exe_path(4242, key(1)),
            ("/usr/bin/curl".to_owned(), true)
        );
    }

    /// The sequence: A deletes itself and sends; B, created next,
    /// gets A's inode number; A's last traffic is named after B is announced.
    #[test]
    fn a_file_at_a_reused_inode_number_never_takes_the_traffic_of_the_deleted_one() {
        let mut table = IdentityTable::default();
        table.record(&event(&["tmp", "A"]));
        table.forget(4242, 7);
        let mut b = event(&["tmp", "B"]);
        b.tgid = 4343;
        b.start_time_ns = 9;
        b.exe_inode_generation = 2;
        let recorded = table.record(&b);
        assert_eq!(recorded.new_exe.as_deref(), Some("/tmp/B"));
        // Drained after B's announcement: A's traffic is still A's, by its
        // process and by its file.
        assert_eq!(
            table.name(4242, key(1)),
            ("/tmp/A".to_owned(), Naming::Process)
        );
        assert_eq!(
            table.name(4343, key(2)),
            ("/tmp/B".to_owned(), Naming::Process)
        );
        let exited = table.take_exited();
        table.purge(exited);
        assert_eq!(
            table.name(4242, key(1)),
            ("/tmp/A".to_owned(), Naming::File)
        );
    }

    #[test]
    fn where_the_file_system_keeps_no_generation_the_process_names_its_traffic() {
        let mut table = IdentityTable::default();
        let mut a = event(&["overlay", "A"]);
        a.exe_inode_generation = 0;
        table.record(&a);
        let mut b = event(&["overlay", "B"]);
        b.exe_inode_generation = 0;
        b.tgid = 4343;
        table.record(&b);
        assert_eq!(table.name(4242, key(0)).0, "/overlay/A");
        assert_eq!(table.name(4343, key(0)).0, "/overlay/B");
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
        assert_eq!(
            table.name(4242, key(1)).0,
            "/srv/a/tool",
            "the announced process keeps its own path"
        );
    }

    #[test]
    fn empty_slots_of_mount_crossings_are_skipped() {
        let mut table = IdentityTable::default();
        let recorded = table.record(&event(&["/", "", "usr", "", "bin", "tool"]));
        assert_eq!(recorded.new_exe.as_deref(), Some("/usr/bin/tool"));
    }

    #[test]
    fn kernel_dev_is_converted_to_userspace_encoding() {
        let key = ExeKey::from_kernel((259 << 20) | 3, 5, 0);
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
    fn a_renamed_file_is_named_by_its_latest_announcement() {
        let mut table = IdentityTable::default();
        table.record(&event(&["tmp", "old-name"]));
        table.forget(4242, 7);
        let exited = table.take_exited();
        table.purge(exited);
        let mut renamed = event(&["tmp", "new-name"]);
        renamed.tgid = 4343;
        let recorded = table.record(&renamed);
        assert_eq!(recorded.new_exe.as_deref(), Some("/tmp/new-name"));
        assert_eq!(table.exe_path(1, key(1)).0, "/tmp/new-name");
    }

    #[test]
    fn paths_of_files_nobody_runs_are_forgotten() {
        let mut table = IdentityTable::default();
        table.record(&event(&["tmp", "gone"]));
        let now = unix_now();
        table.prune_paths(now + 3600, Duration::from_secs(60));
        assert!(table.known_path(key(1)).is_some(), "its process still runs");
        table.forget(4242, 7);
        let exited = table.take_exited();
        table.purge(exited);
        table.prune_paths(now + 3600, Duration::from_secs(60));
        assert!(table.known_path(key(1)).is_none());
        assert_eq!(table.executable_count(), 0);
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
        let key = ExeKey {
            dev: 1,
            ino: 1,
            generation: 0,
        };
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
            generation: 0,
        };
        let path = proc_exe_path(std::process::id(), key).unwrap();
        assert_eq!(PathBuf::from(path), std::env::current_exe().unwrap());
        let wrong = ExeKey {
            ino: key.ino + 1,
            ..key
        };
        assert!(proc_exe_path(std::process::id(), wrong).is_none());
    }
}
