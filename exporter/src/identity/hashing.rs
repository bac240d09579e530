//! sha256 of executables, off the hot path, cached by device+inode.
//!
//! A hash is only ever computed from a file descriptor whose device+inode
//! match what the kernel reported for the process, so a file replaced at the
//! same path is never hashed under the old identity. The process's own
//! `/proc/<tgid>/exe` is tried first: it reaches the exact file the process
//! runs even when the path was replaced or deleted since.
//!
//! Device+inode alone do not name a file for ever: a deleted file's inode
//! number is soon given to a new file. Each cached hash therefore keeps the
//! file's version (ctime and size) and is reused only while a new process's
//! file still has it.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, Read},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use sha2::{Digest, Sha256};

use crate::{
    identity::modification::ModificationWatch,
    identity::processes::ExeKey,
    sinks::journal::{ExecutableSeen, Input, JournalHandle, unix_now},
    sinks::metrics::{ExeLabels, ExecutableLabels, Metrics, ReasonLabels},
    sinks::virustotal::{Check, VirusTotalHandle},
};

/// Label value of `sha256` when the executable could not be hashed.
pub const UNAVAILABLE: &str = "unavailable";

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

/// A process ran the executable `exe` from `path`: hash it (once per file) and journal the sighting.
#[derive(Debug, Clone)]
pub struct HashJob {
    pub exe: ExeKey,
    pub tgid: u32,
    pub path: String,
    pub name: String,
    pub uid: u32,
    pub parent_path: Option<String>,
    /// Unix seconds.
    pub seen_at: i64,
    /// The executable, opened (and its identity checked) when the event
    /// arrived: a program that exits within milliseconds is still hashed.
    pub file: Option<Arc<HeldFile>>,
    /// Seen doing network I/O; `false` for a sighting from exec tracking alone.
    pub used_network: bool,
    /// Its command line, when exec tracking records them.
    pub command_line: Option<String>,
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

/// sha256 of every executable hashed so far, by file identity.
pub type HashIndex = Arc<RwLock<HashMap<ExeKey, String>>>;

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
type Cached = (Option<Stamp>, Result<String, HashFailure>);

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
    jobs: mpsc::Sender<HashJob>,
    index: HashIndex,
    shared: Arc<Shared>,
}

impl Hasher {
    /// Starts the worker; it exits when the `Hasher` is dropped.
    pub fn spawn(
        metrics: Arc<Metrics>,
        journal: Option<JournalHandle>,
        virustotal: Option<VirusTotalHandle>,
    ) -> io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<HashJob>();
        let index = HashIndex::default();
        let worker_index = index.clone();
        let shared = Arc::new(Shared::default());
        let worker_shared = shared.clone();
        // fanotify_init needs CAP_SYS_ADMIN, which is dropped once start-up ends:
        // initialised here, before the worker thread could run late.
        let watch = ModificationWatch::new();
        thread::Builder::new()
            .name("fleetsnitch-hash".into())
            .spawn(move || {
                let mut worker = Worker::new(
                    metrics,
                    journal,
                    virustotal,
                    worker_index,
                    worker_shared,
                    watch,
                );
                worker.serve(queue);
            })?;
        Ok(Self {
            jobs,
            index,
            shared,
        })
    }

    /// The sha256 of `exe`, if it was hashed already.
    pub fn sha256_of(&self, exe: ExeKey) -> Option<String> {
        self.index.read().ok()?.get(&exe).cloned()
    }

    /// Queues `job`; never blocks.
    pub fn request(&self, job: HashJob) {
        // The worker only stops when the agent shuts down.
        let _ = self.jobs.send(job);
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

struct Worker {
    metrics: Arc<Metrics>,
    journal: Option<JournalHandle>,
    virustotal: Option<VirusTotalHandle>,
    index: HashIndex,
    /// Results by file identity: the kernel's (device, inode) and the open
    /// file's `st_dev` (the same but on btrfs and overlayfs, where it names the subvolume or layer).
    /// Each with the stamp of the file hashed (`None` for failures).
    cache: HashMap<(ExeKey, u64), Cached>,
    /// The `executable_info` series currently exported for each path.
    current: HashMap<String, ExecutableLabels>,
    /// The last sighting of each watched executable, to journal a modification with it.
    last_jobs: HashMap<ExeKey, HashJob>,
    watch: ModificationWatch,
    shared: Arc<Shared>,
}

impl Worker {
    fn new(
        metrics: Arc<Metrics>,
        journal: Option<JournalHandle>,
        virustotal: Option<VirusTotalHandle>,
        index: HashIndex,
        shared: Arc<Shared>,
        watch: ModificationWatch,
    ) -> Self {
        Self {
            metrics,
            journal,
            virustotal,
            index,
            cache: HashMap::new(),
            current: HashMap::new(),
            last_jobs: HashMap::new(),
            watch,
            shared,
        }
    }

    fn serve(&mut self, queue: mpsc::Receiver<HashJob>) {
        loop {
            match queue.recv_timeout(Duration::from_millis(100)) {
                Ok(job) => self.run(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            for (exe, path) in self.watch.poll() {
                self.rehash_modified(exe, &path);
            }
        }
    }

    /// `exe` was written to in place: hash it again and journal the change.
    fn rehash_modified(&mut self, exe: ExeKey, path: &str) {
        let Some(mut job) = self.last_jobs.get(&exe).cloned() else {
            return;
        };
        let (sha256, file_dev, stamp) = match open_matching(path, exe) {
            Ok((file, file_dev)) => match sha256_of(&file) {
                Ok(sha256) => (sha256, file_dev, stamp_of(&file)),
                Err(_) => return,
            },
            Err(_) => return,
        };
        let previous = self
            .cache
            .insert((exe, file_dev), (stamp, Ok(sha256.clone())));
        self.remember_stamp(exe, stamp);
        if previous
            .as_ref()
            .is_some_and(|(_, p)| p.as_deref() == Ok(sha256.as_str()))
        {
            return;
        }
        if let Ok(mut index) = self.index.write() {
            index.insert(exe, sha256.clone());
        }
        tracing::warn!(exe = path, %sha256, "executable modified in place");
        self.check_virustotal(path, &sha256);
        self.metrics
            .executable_modified
            .get_or_create(&ExeLabels {
                exe: path.to_owned().into(),
            })
            .set(unix_now());
        job.seen_at = unix_now();
        self.export(&job, Ok(sha256), true);
    }

    fn check_virustotal(&self, path: &str, sha256: &str) {
        if let Some(virustotal) = &self.virustotal {
            virustotal.check(Check {
                path: path.to_owned(),
                sha256: sha256.to_owned(),
            });
        }
    }

    fn run(&mut self, mut job: HashJob) {
        // Writes seen to watched files first: a sighting of a file being
        // modified in place must not pass for a new file (see `outcome`).
        for (exe, path) in self.watch.poll() {
            self.rehash_modified(exe, &path);
        }
        let held = job.file.take();
        let outcome = self.outcome(&job, held.as_deref());
        if held.is_some()
            && let Ok(mut pending) = self.shared.pending.lock()
        {
            pending.remove(&job.exe);
        }
        // The descriptor is released here, before the job is remembered.
        drop(held);
        if outcome.is_ok() {
            self.watch.watch(job.exe, &job.path);
            self.last_jobs.insert(job.exe, job.clone());
        }
        self.export(&job, outcome, false);
    }

    fn remember_stamp(&self, exe: ExeKey, stamp: Option<Stamp>) {
        if let (Some(stamp), Ok(mut stamps)) = (stamp, self.shared.stamps.write()) {
            stamps.insert(exe, stamp);
        }
    }

    /// The hash of the file `job` names: from the cache when the file is the
    /// one hashed before (same stamp), else computed from the held file or
    /// from what [`open_executable`] reaches.
    fn outcome(&mut self, job: &HashJob, held: Option<&HeldFile>) -> Result<String, HashFailure> {
        let opened = match held {
            Some(held) => held
                .file
                .try_clone()
                .map(|file| (file, held.file_dev))
                .map_err(|_| HashFailure::Unreadable),
            None => open_executable(job),
        };
        let (key, stamp, outcome) = match opened {
            Ok((file, file_dev)) => {
                if file_dev != job.exe.dev
                    && let Ok(mut devs) = self.shared.ambiguous_devs.write()
                    && devs.insert(job.exe.dev)
                {
                    tracing::info!(
                        kernel_dev = job.exe.dev,
                        file_dev,
                        exe = ?job.path,
                        "executables on this file system (btrfs, overlayfs) are told apart by \
                         their subvolume's or layer's device: every sighting is hashed from \
                         its own file"
                    );
                }
                let key = (job.exe, file_dev);
                let stamp = stamp_of(&file);
                if let Some((cached, Ok(sha256))) = self.cache.get(&key)
                    && stamp.is_some()
                    && (*cached == stamp || self.watch.is_dirty(job.exe))
                {
                    // Same file; or a watched one being written to in place,
                    // whose new hash is journaled as `modified` once the
                    // writes settle (rehash_modified), not as a new file.
                    return Ok(sha256.clone());
                }
                if self.cache.contains_key(&key) {
                    // Another file under a reused inode number, or one changed
                    // unseen: its mark (if any) belonged to the old version.
                    self.watch.forget(job.exe);
                }
                let outcome = sha256_of(&file).map_err(|_| HashFailure::Unreadable);
                (key, stamp, outcome)
            }
            Err(failure) => {
                // Nothing reachable: what this identity was hashed as before is
                // the best left (a failure is retried when a file is held).
                let key = (job.exe, job.exe.dev);
                if !self.shared.is_ambiguous(job.exe.dev)
                    && let Some((_, outcome)) = self.cache.get(&key)
                    && (outcome.is_ok() || held.is_none())
                {
                    return outcome.clone();
                }
                (key, None, Err(failure))
            }
        };
        if let Err(failure) = &outcome {
            tracing::warn!(
                exe = ?job.path,
                pid = job.tgid,
                reason = failure.reason(),
                "cannot hash executable; it is still recorded"
            );
            self.metrics
                .hash_failures
                .get_or_create(&ReasonLabels {
                    reason: failure.reason().to_owned(),
                })
                .inc();
        }
        self.cache.insert(key, (stamp, outcome.clone()));
        if let Ok(sha256) = &outcome {
            if let Ok(mut index) = self.index.write() {
                index.insert(job.exe, sha256.clone());
            }
            self.remember_stamp(job.exe, stamp);
            self.check_virustotal(&job.path, sha256);
        }
        outcome
    }

    /// Journals the sighting and exports the executable's current hash.
    fn export(&mut self, job: &HashJob, outcome: Result<String, HashFailure>, modified: bool) {
        if let Some(journal) = &self.journal {
            journal.send(Input::Executable(ExecutableSeen {
                path: job.path.clone(),
                sha256: outcome.clone().ok(),
                name: job.name.clone(),
                uid: job.uid,
                parent_path: job.parent_path.clone(),
                seen_at: job.seen_at,
                modified,
                used_network: job.used_network,
                hash_failure: outcome.as_ref().err().map(|failure| failure.reason()),
                command_line: job.command_line.clone(),
            }));
        }
        let labels = ExecutableLabels {
            exe: job.path.clone().into(),
            sha256: outcome.unwrap_or_else(|_| UNAVAILABLE.to_owned()),
        };
        if let Some(previous) = self.current.insert(job.path.clone(), labels.clone())
            && previous != labels
        {
            self.metrics.executable_info.remove(&previous);
        }
        self.metrics.executable_info.get_or_create(&labels).set(1);
    }
}

/// Hashes the file the kernel identified as `job.exe`.
pub fn hash_executable(job: &HashJob) -> Result<String, HashFailure> {
    let (file, _) = open_executable(job)?;
    sha256_of(&file).map_err(|_| HashFailure::Unreadable)
}

/// Opens the file the kernel identified as `job.exe`: through the process
/// first, else by path; with the open file's `st_dev`.
fn open_executable(job: &HashJob) -> Result<(File, u64), HashFailure> {
    let via_process = open_matching(&format!("/proc/{}/exe", job.tgid), job.exe);
    match via_process {
        Ok(opened) => Ok(opened),
        Err(process_error) => match open_matching(&job.path, job.exe) {
            Ok(opened) => Ok(opened),
            Err(Mismatch::Other) => Err(HashFailure::Replaced),
            Err(Mismatch::Missing) if process_error == Mismatch::Missing => {
                Err(HashFailure::ProcessExited)
            }
            Err(_) => Err(HashFailure::Replaced),
        },
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Mismatch {
    /// Nothing to open there.
    Missing,
    /// A file, but not the one the kernel reported.
    Other,
}

/// `statfs` magic of btrfs.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
/// `statfs` magic of overlayfs.
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794C_7630;

/// Opens `path` if it is the file the kernel named `exe`; returns it with its `st_dev`.
///
/// The kernel reports the file system's device (`inode->i_sb->s_dev`), which
/// is what `stat` returns on most file systems, but not on two that fleets
/// run executables from:
/// - btrfs: `stat` returns the subvolume's own anonymous device, and inode
///   numbers repeat across subvolumes;
/// - overlayfs whose layers are on different file systems (containers on a
///   tmpfs or another disk): `stat` returns a per-layer pseudo device and the
///   layer's inode number, which can repeat across layers.
///
/// There the inode must match and the device may differ; the returned
/// `st_dev` then tells the subvolumes (layers) apart in the hash cache.
fn open_matching(path: &str, exe: ExeKey) -> Result<(File, u64), Mismatch> {
    // A name with invalid UTF-8 is carried as text with `\xNN` escapes; the
    // file has the raw bytes (the device+inode check below rejects a wrong file).
    let file = File::open(path)
        .or_else(|error| match crate::support::raw_text::to_bytes(path) {
            Some(raw) => {
                File::open(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&raw))
            }
            None => Err(error),
        })
        .map_err(|_| Mismatch::Missing)?;
    let metadata = file.metadata().map_err(|_| Mismatch::Missing)?;
    if metadata.ino() != exe.ino {
        return Err(Mismatch::Other);
    }
    if metadata.dev() == exe.dev || devices_differ_from_kernel(&file) {
        Ok((file, metadata.dev()))
    } else {
        Err(Mismatch::Other)
    }
}

/// Whether `file` is on a file system whose `st_dev` is not its superblock's device.
#[expect(
    clippy::unnecessary_cast,
    reason = "statfs.f_type is i64 on x86_64 but another type elsewhere"
)]
fn devices_differ_from_kernel(file: &File) -> bool {
    let mut stats = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: a valid descriptor and a buffer of the right type for the call.
    let ok = unsafe { libc::fstatfs(file.as_raw_fd(), stats.as_mut_ptr()) } == 0;
    // SAFETY: fstatfs filled the buffer (it was zeroed before in any case).
    let magic = unsafe { stats.assume_init() }.f_type as i64;
    ok && (magic == BTRFS_SUPER_MAGIC || magic == OVERLAYFS_SUPER_MAGIC)
}

fn sha256_of(mut file: &File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn job(exe: ExeKey, tgid: u32, path: &str) -> HashJob {
        HashJob {
            exe,
            tgid,
            path: path.to_owned(),
            name: "tool".into(),
            uid: 0,
            parent_path: None,
            seen_at: 0,
            file: None,
            used_network: true,
            command_line: None,
        }
    }

    fn key_of(path: &std::path::Path) -> ExeKey {
        let metadata = std::fs::metadata(path).unwrap();
        ExeKey {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }

    #[test]
    fn hashes_the_file_with_the_reported_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"abc").unwrap();
        let job = job(key_of(&path), u32::MAX - 1, &path.to_string_lossy());
        assert_eq!(
            hash_executable(&job).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn replaced_file_is_never_hashed_under_the_old_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"old").unwrap();
        let old = key_of(&path);
        let replacement = dir.path().join("tool.new");
        File::create(&replacement)
            .unwrap()
            .write_all(b"new")
            .unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        let job = job(old, u32::MAX - 1, &path.to_string_lossy());
        assert_eq!(hash_executable(&job), Err(HashFailure::Replaced));
    }

    fn worker() -> Worker {
        Worker::new(
            Arc::new(Metrics::new()),
            None,
            None,
            HashIndex::default(),
            Arc::new(Shared::default()),
            ModificationWatch::new(),
        )
    }

    #[test]
    fn a_cached_hash_is_not_reused_for_another_version_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"abc").unwrap();
        let key = key_of(&path);
        let mut worker = worker();
        worker.run(job(key, u32::MAX - 1, &path.to_string_lossy()));
        let first = worker.index.read().unwrap()[&key].clone();
        // What a new file under the same inode number looks like from here:
        // same device+inode, another ctime and size (no fanotify event seen:
        // a freed inode takes its mark with it).
        worker.watch.forget(key);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"another program").unwrap();
        assert_eq!(key_of(&path), key);
        worker.run(job(key, u32::MAX - 1, &path.to_string_lossy()));
        let second = worker.index.read().unwrap()[&key].clone();
        assert_ne!(first, second);
        assert_eq!(
            second,
            sha256_of(&File::open(&path).unwrap()).unwrap(),
            "the new content's hash"
        );
        // Unchanged, the cached hash is used without reading the file again.
        worker.run(job(key, u32::MAX - 1, &path.to_string_lossy()));
        assert_eq!(worker.index.read().unwrap()[&key], second);
    }

    #[test]
    fn held_files_stay_within_the_budget_and_one_per_executable() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("first"), dir.path().join("second"));
        std::fs::write(&first, b"one").unwrap();
        std::fs::write(&second, b"two").unwrap();
        let hasher = Hasher::spawn(Arc::new(Metrics::new()), None, None).unwrap();
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
        let hasher = Hasher::spawn(Arc::new(Metrics::new()), None, None).unwrap();
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
            hasher.sha256_of(exe).as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(hasher.held_files(), 0, "released once hashed");
    }

    #[test]
    fn a_new_file_at_a_reused_identity_is_hashed_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"abc").unwrap();
        let exe = key_of(&path);
        // The worker alone, without its modification watch running: only the
        // stamp can tell the two files apart.
        let mut worker = worker();
        let sighting = job(exe, u32::MAX - 1, &path.to_string_lossy());
        assert_eq!(
            worker.outcome(&sighting, None).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Another file with the same (device, inode), as a freed inode reused
        // by a new file would be: its change time differs.
        thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"abd").unwrap();
        assert_eq!(key_of(&path), exe);
        assert_eq!(
            worker.outcome(&sighting, None).unwrap(),
            "a52d159f262b2c6ddb724a61840befc36eb30c88877a4030b65cbe86298449c9",
            "the hash of the earlier file was reused"
        );
    }

    #[test]
    fn vanished_file_and_process_is_process_exited() {
        let job = job(
            ExeKey { dev: 1, ino: 2 },
            u32::MAX - 1,
            "/nonexistent/fleetsnitch-test",
        );
        assert_eq!(hash_executable(&job), Err(HashFailure::ProcessExited));
    }

    #[test]
    fn running_process_is_hashed_through_proc_even_if_path_is_wrong() {
        let metadata = std::fs::metadata("/proc/self/exe").unwrap();
        let key = ExeKey {
            dev: metadata.dev(),
            ino: metadata.ino(),
        };
        let job = job(key, std::process::id(), "/nonexistent/elsewhere");
        let expected = sha256_of(&File::open(std::env::current_exe().unwrap()).unwrap()).unwrap();
        assert_eq!(hash_executable(&job).unwrap(), expected);
    }
}
