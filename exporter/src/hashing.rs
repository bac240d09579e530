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
    collections::HashMap,
    fs::File,
    io::{self, Read},
    os::unix::fs::MetadataExt,
    sync::{Arc, RwLock, mpsc},
    thread,
    time::Duration,
};

use sha2::{Digest, Sha256};

use crate::{
    identity::ExeKey,
    journal::{ExecutableSeen, Input, JournalHandle, unix_now},
    metrics::{ExeLabels, ExecutableLabels, Metrics, ReasonLabels},
    modification::ModificationWatch,
    virustotal::{Check, VirusTotalHandle},
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
}

/// sha256 of every executable hashed so far, by file identity.
pub type HashIndex = Arc<RwLock<HashMap<ExeKey, String>>>;

/// Handle to the hashing worker thread.
pub struct Hasher {
    jobs: mpsc::Sender<HashJob>,
    index: HashIndex,
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
        // fanotify_init needs CAP_SYS_ADMIN, which is dropped once start-up ends:
        // initialised here, before the worker thread could run late.
        let watch = ModificationWatch::new();
        thread::Builder::new()
            .name("fleetsnitch-hash".into())
            .spawn(move || {
                let mut worker = Worker {
                    metrics,
                    journal,
                    virustotal,
                    index: worker_index,
                    cache: HashMap::new(),
                    current: HashMap::new(),
                    last_jobs: HashMap::new(),
                    watch,
                };
                worker.serve(queue);
            })?;
        Ok(Self { jobs, index })
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
}

struct Worker {
    metrics: Arc<Metrics>,
    journal: Option<JournalHandle>,
    virustotal: Option<VirusTotalHandle>,
    index: HashIndex,
    /// Results by file identity: one hash per (device, inode) and version.
    cache: HashMap<ExeKey, Cached>,
    /// The `executable_info` series currently exported for each path.
    current: HashMap<String, ExecutableLabels>,
    /// The last sighting of each watched executable, to journal a modification with it.
    last_jobs: HashMap<ExeKey, HashJob>,
    watch: ModificationWatch,
}

impl Worker {
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
        let sha256 = match open_matching(path, exe).map(sha256_of) {
            Ok(Ok(sha256)) => sha256,
            _ => return,
        };
        let version = open_matching(path, exe)
            .ok()
            .and_then(|file| Version::of(&file));
        let previous = self.cache.insert(
            exe,
            Cached {
                outcome: Ok(sha256.clone()),
                version,
            },
        );
        if previous
            .as_ref()
            .is_some_and(|p| p.outcome.as_deref() == Ok(sha256.as_str()))
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

    fn run(&mut self, job: HashJob) {
        let opened = open_executable(&job);
        let version = opened.as_ref().ok().and_then(Version::of);
        let cached = self.cache.get(&job.exe).filter(|cached| {
            // Unreachable now: the cached result is the best knowledge there is.
            version.is_none() || cached.version == version
        });
        let outcome = match cached {
            Some(cached) => cached.outcome.clone(),
            None => {
                if self.cache.contains_key(&job.exe) {
                    // Another file under a reused inode number, or one changed
                    // unseen: its mark (if any) belonged to the old version.
                    self.watch.forget(job.exe);
                }
                let outcome =
                    opened.and_then(|file| sha256_of(file).map_err(|_| HashFailure::Unreadable));
                if let Err(failure) = &outcome {
                    tracing::warn!(
                        exe = ?job.path,
                        pid = job.tgid,
                        reason = failure.reason(),
                        "cannot hash executable; its traffic is still counted"
                    );
                    self.metrics
                        .hash_failures
                        .get_or_create(&ReasonLabels {
                            reason: failure.reason().to_owned(),
                        })
                        .inc();
                }
                self.cache.insert(
                    job.exe,
                    Cached {
                        outcome: outcome.clone(),
                        version,
                    },
                );
                if let Ok(sha256) = &outcome {
                    if let Ok(mut index) = self.index.write() {
                        index.insert(job.exe, sha256.clone());
                    }
                    self.check_virustotal(&job.path, sha256);
                }
                outcome
            }
        };
        if outcome.is_ok() {
            self.watch.watch(job.exe, &job.path);
            self.last_jobs.insert(job.exe, job.clone());
        }
        self.export(&job, outcome, false);
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

/// A cached hash and the version of the file it was computed from.
struct Cached {
    outcome: Result<String, HashFailure>,
    /// `None` when the file could not be opened.
    version: Option<Version>,
}

/// One version of a file: a new file under a reused inode number, or the same
/// file written to or renamed, gets another ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    ctime: i64,
    ctime_nsec: i64,
    size: u64,
}

impl Version {
    fn of(file: &File) -> Option<Self> {
        let metadata = file.metadata().ok()?;
        Some(Self {
            ctime: metadata.ctime(),
            ctime_nsec: metadata.ctime_nsec(),
            size: metadata.size(),
        })
    }
}

/// Hashes the file the kernel identified as `job.exe`.
pub fn hash_executable(job: &HashJob) -> Result<String, HashFailure> {
    sha256_of(open_executable(job)?).map_err(|_| HashFailure::Unreadable)
}

/// Opens the file the kernel identified as `job.exe`: through the process,
/// else at its path if device+inode still match.
fn open_executable(job: &HashJob) -> Result<File, HashFailure> {
    let via_process = open_matching(&format!("/proc/{}/exe", job.tgid), job.exe);
    match via_process {
        Ok(file) => Ok(file),
        Err(process_error) => match open_matching(&job.path, job.exe) {
            Ok(file) => Ok(file),
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

fn open_matching(path: &str, exe: ExeKey) -> Result<File, Mismatch> {
    // A name with invalid UTF-8 is carried as text with `\xNN` escapes; the
    // file has the raw bytes (the device+inode check below rejects a wrong file).
    let file = File::open(path)
        .or_else(|error| match crate::raw_text::to_bytes(path) {
            Some(raw) => {
                File::open(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&raw))
            }
            None => Err(error),
        })
        .map_err(|_| Mismatch::Missing)?;
    let metadata = file.metadata().map_err(|_| Mismatch::Missing)?;
    if metadata.dev() == exe.dev && metadata.ino() == exe.ino {
        Ok(file)
    } else {
        Err(Mismatch::Other)
    }
}

fn sha256_of(mut file: File) -> io::Result<String> {
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
        Worker {
            metrics: Arc::new(Metrics::new()),
            journal: None,
            virustotal: None,
            index: HashIndex::default(),
            cache: HashMap::new(),
            current: HashMap::new(),
            last_jobs: HashMap::new(),
            watch: ModificationWatch::new(),
        }
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
        // same device+inode, another ctime and size (no fanotify event seen).
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"another program").unwrap();
        assert_eq!(key_of(&path), key);
        worker.run(job(key, u32::MAX - 1, &path.to_string_lossy()));
        let second = worker.index.read().unwrap()[&key].clone();
        assert_ne!(first, second);
        assert_eq!(
            second,
            sha256_of(File::open(&path).unwrap()).unwrap(),
            "the new content's hash"
        );
        // Unchanged, the cached hash is used without reading the file again.
        worker.run(job(key, u32::MAX - 1, &path.to_string_lossy()));
        assert_eq!(worker.index.read().unwrap()[&key], second);
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
        let expected = sha256_of(File::open(std::env::current_exe().unwrap()).unwrap()).unwrap();
        assert_eq!(hash_executable(&job).unwrap(), expected);
    }
}
