//! sha256 of executables, off the hot path, cached by file identity.
//!
//! A hash is only ever computed from a file descriptor whose device, inode
//! (and generation, where the file system tells it) match what the kernel
//! reported for the process, so a file replaced at the same path is never
//! hashed under the old identity. The process's own `/proc/<tgid>/exe` is
//! tried first: it reaches the exact file the process runs even when the path
//! was replaced or deleted since.
//!
//! The kernel names a file by device, inode and the inode's generation, so a
//! new file at a freed inode number is another key. Where the file system
//! keeps no generation, each cached hash also keeps the file's version (ctime
//! and size) and is reused only while a new process's file still has it; and
//! each announced process has its own entry in the [`HashIndex`], so its
//! traffic carries the hash of the file it ran, whatever file came next.

mod files;
mod worker;

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    os::unix::fs::MetadataExt,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

pub use files::hash_executable;
use files::open_matching;
use worker::Worker;

use super::{
    modification::{ModificationWatch, WatchReporting},
    processes::{ExeKey, Process},
};
use crate::{
    model::{Activity, Failures, Outbox, Sha256, Workload},
    telemetry::{ExeLabels, ExecutableLabels, ReasonLabels},
};

/// Why an executable has no hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashFailure {
    /// The process exited and its path no longer leads to the same file.
    ProcessExited,
    /// The path now holds another file, and the process could not be reached.
    Replaced,
    /// The file was reachable but reading it failed.
    Unreadable,
}

impl HashFailure {
    pub fn reason(self) -> &'static str {
        match self {
            Self::ProcessExited => "process_exited",
            Self::Replaced => "replaced",
            Self::Unreadable => "unreadable",
        }
    }
}

/// What hashing exports: each (executable, sha256) that ran recently, its
/// failures and its modifications in place.
#[derive(Debug, Clone, Default)]
pub struct HashMetrics {
    executable_info: Family<ExecutableLabels, Gauge>,
    hash_failures: Family<ReasonLabels, Counter>,
    executable_modified: Family<ExeLabels, Gauge>,
    watch_errors: Family<ReasonLabels, Counter>,
    failures: Failures,
}

impl HashMetrics {
    /// The modification watch reports fanotify failures to `failures`.
    pub fn reporting_to(mut self, failures: Failures) -> Self {
        self.failures = failures;
        self
    }

    fn watch_reporting(&self) -> WatchReporting {
        let reason = |reason: &str| {
            self.watch_errors
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .clone()
        };
        WatchReporting {
            unavailable: reason("unavailable"),
            mark: reason("mark"),
            failures: self.failures.clone(),
        }
    }

    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "executable_info",
            "Executables seen with each sha256 that ran within metrics.executable_expiry; value 1, join on exe",
            metrics.executable_info.clone(),
        );
        registry.register(
            "hash_failures",
            "Executables that could not be hashed, by reason",
            metrics.hash_failures.clone(),
        );
        registry.register_with_unit(
            "executable_modified_timestamp",
            "Unix time an executable was last modified in place (seen through fanotify)",
            Unit::Seconds,
            metrics.executable_modified.clone(),
        );
        registry.register(
            "modification_watch_errors",
            "fanotify failures, by reason: unavailable (fanotify_init failed at start: no \
             executable modified in place is noticed until it runs again), mark (a file \
             that could not be watched)",
            metrics.watch_errors.clone(),
        );
        for failure in [
            HashFailure::ProcessExited,
            HashFailure::Replaced,
            HashFailure::Unreadable,
        ] {
            metrics.failure(failure).inc_by(0);
        }
        // Both reasons exported at zero: rules see the family.
        let _ = metrics.watch_reporting();
        metrics
    }

    fn failure(&self, failure: HashFailure) -> Counter {
        self.hash_failures
            .get_or_create(&ReasonLabels {
                reason: failure.reason().to_owned(),
            })
            .clone()
    }
}

/// A process, as the hash index knows it: tgid and start time.
pub type ProcessKey = (u32, u64);

/// A process ran the executable `exe` from `path`: hash it (once per file) and journal the sighting.
#[derive(Debug, Clone)]
pub struct HashJob {
    pub exe: ExeKey,
    pub tgid: u32,
    /// The announced process, whose traffic takes this hash (exec-only
    /// sightings and lost announcements have none).
    pub process: Option<ProcessKey>,
    pub path: String,
    pub name: String,
    pub uid: u32,
    /// The user's name, filled by the collector (which has the user database).
    pub user_name: Option<String>,
    pub parent_path: Option<String>,
    /// The container and pod, filled by the collector (which has the pods).
    pub workload: Workload,
    /// Unix seconds.
    pub seen_at: i64,
    /// The executable, opened (and its identity checked) when the event
    /// arrived: a program that exits within milliseconds is still hashed.
    pub file: Option<Arc<HeldFile>>,
    /// Seen doing network I/O; `false` for a sighting from exec tracking alone.
    pub used_network: bool,
    /// Its command line, when exec tracking records them.
    pub command_line: Option<String>,
    /// A sighting for the sinks and the metrics; `false` for a parent hashed
    /// only so its children's records carry its sha256 (a parent that never
    /// used the network is not journaled as seen).
    pub sighting: bool,
}

impl HashJob {
    /// `process` seen running `path` at `seen_at`, on the network.
    pub fn of(process: &Process, path: String, seen_at: i64) -> Self {
        Self {
            process: Some((process.tgid, process.start_time_ns)),
            name: process.comm.clone(),
            uid: process.uid,
            parent_path: process.parent_path.clone(),
            ..Self::unannounced(process.exe, process.tgid, path, seen_at)
        }
    }

    /// A process whose announcement was lost: only its executable is known
    /// (named through `/proc`).
    pub fn unannounced(exe: ExeKey, tgid: u32, path: String, seen_at: i64) -> Self {
        Self {
            exe,
            tgid,
            process: None,
            path,
            name: String::new(),
            uid: 0,
            user_name: None,
            parent_path: None,
            workload: Workload::default(),
            seen_at,
            file: None,
            used_network: true,
            command_line: None,
            sighting: true,
        }
    }

    /// The parent of `process`, to hash for its children's records, when its
    /// file and path are known.
    pub fn parent_of(process: &Process, seen_at: i64) -> Option<Self> {
        let path = process.parent_path.clone()?;
        if process.ppid == 0 || process.parent_exe.is_kernel() {
            return None;
        }
        Some(Self {
            sighting: false,
            ..Self::unannounced(process.parent_exe, process.ppid, path, seen_at)
        })
    }
}

/// A file descriptor held open on an executable until it is hashed; counted
/// against `exec.max_open_files` while it lives.
#[derive(Debug)]
pub struct HeldFile {
    file: File,
    /// `st_dev` of the open file: differs from the kernel's device on btrfs and overlayfs.
    file_dev: u64,
    held: Arc<AtomicUsize>,
}

impl Drop for HeldFile {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why [`Hasher::hold`] did not keep a file open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotHeld {
    /// Already hashed, or a file of it is already held: nothing to keep.
    NotNeeded,
    /// `exec.max_open_files` descriptors are held already.
    BudgetExhausted,
    /// Neither `/proc/<pid>/exe` nor the path led to the file the kernel named.
    Unreachable,
}

/// What is known of the hash of a file, or of the file a process ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashState {
    /// Queued for the worker.
    Pending,
    Hashed(Sha256),
    /// It could not be hashed (see `fleetsnitch_hash_failures_total`).
    Failed,
}

impl HashState {
    pub fn sha256(&self) -> Option<&Sha256> {
        match self {
            Self::Hashed(sha256) => Some(sha256),
            Self::Pending | Self::Failed => None,
        }
    }
}

#[derive(Debug, Default)]
struct Hashes {
    /// By file identity (device, inode, generation).
    files: HashMap<ExeKey, HashState>,
    /// By announced process: the hash of the very file it ran, even where
    /// the file system keeps no inode generation (overlayfs) or two files
    /// share device, inode and generation (btrfs subvolumes).
    processes: HashMap<ProcessKey, HashState>,
}

/// The hashes the collector gives flows, kept by the worker.
#[derive(Debug, Clone, Default)]
pub struct HashIndex(Arc<RwLock<Hashes>>);

impl HashIndex {
    /// The hash of the file process `process` ran (`exe`): its own entry
    /// first, else the file's.
    pub fn state(&self, exe: ExeKey, process: Option<ProcessKey>) -> Option<HashState> {
        let hashes = self.0.read().ok()?;
        process
            .and_then(|process| hashes.processes.get(&process))
            .or_else(|| hashes.files.get(&exe))
            .cloned()
    }

    /// The hash of the file `exe`, if it was hashed already.
    pub fn sha256_of(&self, exe: ExeKey) -> Option<Sha256> {
        self.state(exe, None)?.sha256().cloned()
    }

    /// A job for `exe` (ran by `process`) is queued.
    fn expect(&self, exe: ExeKey, process: Option<ProcessKey>) {
        if let Ok(mut hashes) = self.0.write() {
            hashes.files.entry(exe).or_insert(HashState::Pending);
            if let Some(process) = process {
                hashes.processes.insert(process, HashState::Pending);
            }
        }
    }

    /// What the worker found for `exe` (ran by `process`). A failure does not
    /// erase the file's known hash (the file was reached before).
    fn settle(
        &self,
        exe: ExeKey,
        process: Option<ProcessKey>,
        outcome: &Result<Sha256, HashFailure>,
    ) {
        let state = match outcome {
            Ok(sha256) => HashState::Hashed(sha256.clone()),
            Err(_) => HashState::Failed,
        };
        let Ok(mut hashes) = self.0.write() else {
            return;
        };
        if let Some(process) = process {
            hashes.processes.insert(process, state.clone());
        }
        let file = hashes.files.entry(exe).or_insert(HashState::Pending);
        if state != HashState::Failed || !matches!(file, HashState::Hashed(_)) {
            *file = state;
        }
    }

    fn forget_processes(&self, processes: &[ProcessKey]) {
        if let Ok(mut hashes) = self.0.write() {
            for process in processes {
                hashes.processes.remove(process);
            }
        }
    }

    fn forget_files(&self, files: &[ExeKey]) {
        if let Ok(mut hashes) = self.0.write() {
            for file in files {
                hashes.files.remove(file);
            }
        }
    }
}

/// Tells apart two files that had the same (device, inode) one after the
/// other: a file created at a freed and reused inode has another change time
/// (and a file written in place too). A hash is reused only for the same stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ctime: i64,
    ctime_nsec: i64,
    size: u64,
}

/// A hash (or why there is none) and the stamp of the file it was taken from.
type Cached = (Option<Stamp>, Result<Sha256, HashFailure>);

fn stamp_of(file: &File) -> Option<Stamp> {
    let metadata = file.metadata().ok()?;
    Some(Stamp {
        ctime: metadata.ctime(),
        ctime_nsec: metadata.ctime_nsec(),
        size: metadata.size(),
    })
}

/// State the collector and the worker share.
#[derive(Debug, Default)]
struct Shared {
    /// Descriptors held by [`HeldFile`]s.
    held: Arc<AtomicUsize>,
    /// Executables with a held file queued: one is enough.
    pending: Mutex<HashSet<ExeKey>>,
    /// The file each hashed (device, inode) was when it was hashed.
    stamps: RwLock<HashMap<ExeKey, Stamp>>,
    /// Kernel devices found to be btrfs or overlayfs, where the kernel's (device, inode)
    /// does not name one file: every sighting needs its own file to hash.
    ambiguous_devs: RwLock<HashSet<u64>>,
}

impl Shared {
    fn is_ambiguous(&self, dev: u64) -> bool {
        self.ambiguous_devs
            .read()
            .is_ok_and(|devs| devs.contains(&dev))
    }
}

/// Handle to the hashing worker thread.
pub struct Hasher {
    /// `None` once dropping: the worker finishes the queue, then stops.
    jobs: Option<mpsc::Sender<HashJob>>,
    index: HashIndex,
    shared: Arc<Shared>,
    worker: Option<thread::JoinHandle<()>>,
}

impl Hasher {
    /// Starts the worker. Dropping the `Hasher` waits for it to hash what is
    /// queued and hand those sightings on: at shutdown, the sinks then get
    /// every sighting before they stop.
    /// Sightings go to `outbox` (none: only the index and the metrics are kept);
    /// what nothing saw for `activity`'s expiry is forgotten.
    pub fn spawn(
        metrics: HashMetrics,
        outbox: Option<Outbox>,
        activity: Activity,
    ) -> io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<HashJob>();
        let index = HashIndex::default();
        let worker_index = index.clone();
        let shared = Arc::new(Shared::default());
        let worker_shared = shared.clone();
        // fanotify_init needs CAP_SYS_ADMIN, which is dropped once start-up ends:
        // initialised here, before the worker thread could run late.
        let watch = ModificationWatch::reporting_to(metrics.watch_reporting());
        let worker = thread::Builder::new()
            .name("fleetsnitch-hash".into())
            .spawn(move || {
                let mut worker = Worker::new(
                    metrics,
                    outbox,
                    worker_index,
                    worker_shared,
                    watch,
                    activity,
                );
                worker.serve(queue);
            })?;
        Ok(Self {
            jobs: Some(jobs),
            index,
            shared,
            worker: Some(worker),
        })
    }

    /// The sha256 of `exe`, if it was hashed already.
    pub fn sha256_of(&self, exe: ExeKey) -> Option<Sha256> {
        self.index.sha256_of(exe)
    }

    /// What is known of the hash of the file `exe` that `process` ran.
    pub fn state(&self, exe: ExeKey, process: Option<ProcessKey>) -> Option<HashState> {
        self.index.state(exe, process)
    }

    /// Queues `job`; never blocks.
    pub fn request(&self, job: HashJob) {
        self.index.expect(job.exe, job.process);
        // The worker only stops when the agent shuts down.
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
    }

    /// Forgets the hashes of processes whose traffic has all been drained.
    pub fn forget_processes(&self, processes: &[ProcessKey]) {
        self.index.forget_processes(processes);
    }

    /// A handle that holds files for this hasher from another thread.
    pub fn holder(&self) -> FileHolder {
        FileHolder {
            shared: self.shared.clone(),
        }
    }

    /// [`FileHolder::hold`] on this hasher.
    pub fn hold(
        &self,
        tgid: u32,
        path: &str,
        exe: ExeKey,
        budget: usize,
    ) -> Result<Arc<HeldFile>, NotHeld> {
        self.holder().hold(tgid, path, exe, budget)
    }

    /// Descriptors held open for hashing now.
    pub fn held_files(&self) -> usize {
        self.shared.held.load(Ordering::Relaxed)
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            tracing::error!("the hashing thread panicked");
        }
    }
}

/// Opens executables for a [`Hasher`], from the thread that learns of them first.
#[derive(Clone)]
pub struct FileHolder {
    shared: Arc<Shared>,
}

impl FileHolder {
    /// Opens the executable `exe` that process `tgid` just executed from
    /// `path` (its `/proc/<tgid>/exe` first), checks it is that file, and
    /// keeps it open for the worker, unless it is hashed or held already or
    /// `budget` descriptors are held.
    pub fn hold(
        &self,
        tgid: u32,
        path: &str,
        exe: ExeKey,
        budget: usize,
    ) -> Result<Arc<HeldFile>, NotHeld> {
        let (file, file_dev) = open_matching(&format!("/proc/{tgid}/exe"), exe)
            .or_else(|_| open_matching(path, exe))
            .map_err(|_| NotHeld::Unreachable)?;
        if !self.shared.is_ambiguous(exe.dev) {
            // Hashed already, as this very file (not an earlier one at a reused inode)?
            let stamp = stamp_of(&file);
            let hashed = stamp.is_some()
                && self
                    .shared
                    .stamps
                    .read()
                    .is_ok_and(|stamps| stamps.get(&exe) == stamp.as_ref());
            let pending = self
                .shared
                .pending
                .lock()
                .is_ok_and(|pending| pending.contains(&exe));
            if hashed || pending {
                return Err(NotHeld::NotNeeded);
            }
        }
        if self.shared.held.load(Ordering::Relaxed) >= budget {
            return Err(NotHeld::BudgetExhausted);
        }
        self.shared.held.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.insert(exe);
        }
        Ok(Arc::new(HeldFile {
            file,
            file_dev,
            held: self.shared.held.clone(),
        }))
    }
}

#[cfg(test)]
pub(super) mod test_support {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    pub(super) fn job(exe: ExeKey, tgid: u32, path: &str) -> HashJob {
        HashJob {
            exe,
            tgid,
            process: None,
            path: path.to_owned(),
            name: "tool".into(),
            uid: 0,
            user_name: None,
            parent_path: None,
            workload: Workload::default(),
            seen_at: 0,
            file: None,
            used_network: true,
            command_line: None,
            sighting: true,
        }
    }

    pub(super) fn key_of(path: &std::path::Path) -> ExeKey {
        let file = std::fs::File::open(path).unwrap();
        let metadata = file.metadata().unwrap();
        ExeKey {
            dev: metadata.dev(),
            ino: metadata.ino(),
            generation: crate::identity::inode::generation_of(&file).unwrap_or(0),
        }
    }

    pub(super) fn activity() -> Activity {
        Activity::new(std::time::Duration::from_secs(86_400))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{test_support::*, *};

    #[test]
    fn held_files_stay_within_the_budget_and_one_per_executable() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("first"), dir.path().join("second"));
        std::fs::write(&first, b"one").unwrap();
        std::fs::write(&second, b"two").unwrap();
        let hasher = Hasher::spawn(HashMetrics::default(), None, activity()).unwrap();
        let gone = u32::MAX - 1;
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();

        let held = hasher.hold(gone, &path(&first), key_of(&first), 1).unwrap();
        assert_eq!(hasher.held_files(), 1);
        assert_eq!(
            hasher.hold(gone, &path(&first), key_of(&first), 8).err(),
            Some(NotHeld::NotNeeded),
            "one descriptor per executable is enough"
        );
        assert_eq!(
            hasher.hold(gone, &path(&second), key_of(&second), 1).err(),
            Some(NotHeld::BudgetExhausted)
        );
        drop(held);
        assert_eq!(hasher.held_files(), 0);
        let wrong = ExeKey {
            ino: key_of(&second).ino + 1,
            ..key_of(&second)
        };
        assert_eq!(
            hasher.hold(gone, &path(&second), wrong, 1).err(),
            Some(NotHeld::Unreachable),
            "a file with another identity is never held"
        );
    }

    #[test]
    fn held_file_is_hashed_after_its_path_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("brief");
        std::fs::write(&path, b"abc").unwrap();
        let hasher = Hasher::spawn(HashMetrics::default(), None, activity()).unwrap();
        let exe = key_of(&path);
        let gone = u32::MAX - 1;
        let held = hasher.hold(gone, &path.to_string_lossy(), exe, 4).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut job = job(exe, gone, &path.to_string_lossy());
        job.file = Some(held);
        hasher.request(job);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (hasher.sha256_of(exe).is_none() || hasher.held_files() != 0)
            && std::time::Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            hasher.sha256_of(exe).as_ref().map(Sha256::as_str),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(hasher.held_files(), 0, "released once hashed");
    }
}
