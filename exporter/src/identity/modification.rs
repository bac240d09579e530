//! fanotify marks on every executable the agent has hashed, so a file
//! modified in place is rehashed (and journaled as modified) at once, without
//! waiting for the next process to run it.
//!
//! A file replaced by rename gets a new inode: that is not a modification of
//! the watched file and shows up as a new hash when the new file runs.
//!
//! Files are marked and read again where the agent can reach them, never at
//! the path its own mount namespace shows: a process's file through
//! `/proc/<pid>/exe`, else the node's file through the node's root (in the
//! chart's pod the agent's own `/usr/bin/curl` is the image's, not the
//! node's); a modified file is rehashed from the descriptor its event carries.

use std::{
    collections::HashMap,
    fs::{self, File},
    os::unix::fs::MetadataExt,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::AT_FDCWD,
    sys::{
        fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags},
        stat::fstat,
    },
};

use prometheus_client::metrics::counter::Counter;

use crate::{
    identity::processes::ExeKey,
    model::{FailureClass, Failures},
    support::node,
};

/// Writes keep coming while a file is rewritten: rehash once it is quiet.
const QUIET_TIME: Duration = Duration::from_millis(300);

struct Watched {
    exe: ExeKey,
    /// The path as the process that ran it named it.
    path: String,
    /// Where the agent reached it to mark it.
    marked_at: String,
}

/// A watched file whose writes have settled: its key, its path, and the
/// modified file itself when the event handed it over.
#[derive(Debug)]
pub struct Modified {
    pub exe: ExeKey,
    pub path: String,
    pub file: Option<File>,
}

pub struct ModificationWatch {
    fanotify: Option<Fanotify>,
    /// Watched files by device and inode (what `fstat` of an event tells),
    /// with the file's full key, its path and where the agent marked it.
    watched: HashMap<(u64, u64), Watched>,
    /// Modified files, when they were last written, and the file as the
    /// last event handed it over.
    dirty: HashMap<ExeKey, (Instant, Option<File>)>,
    failed_marks: u64,
    reporting: WatchReporting,
}

/// Where the watch reports what it cannot do: counters by reason
/// (`fleetsnitch_modification_watch_errors_total`) and `agent_error` events.
#[derive(Debug, Clone, Default)]
pub struct WatchReporting {
    /// fanotify could not be initialised (counted once, at start).
    pub unavailable: Counter,
    /// A mark that failed.
    pub mark: Counter,
    pub failures: Failures,
}

impl ModificationWatch {
    /// A watch; without fanotify (no privilege, old kernel) it watches nothing and says so once.
    pub fn new() -> Self {
        Self::reporting_to(WatchReporting::default())
    }

    /// [`Self::new`], counting and reporting what fails in `reporting`.
    pub fn reporting_to(reporting: WatchReporting) -> Self {
        let fanotify = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        );
        let fanotify = match fanotify {
            Ok(fanotify) => Some(fanotify),
            Err(errno) => {
                reporting.unavailable.inc();
                reporting.failures.failed(
                    FailureClass::Fanotify,
                    format_args!(
                        "fanotify_init failed ({errno}): executables modified in place are \
                         only noticed when they run again"
                    ),
                );
                tracing::warn!(
                    error = %errno,
                    "fanotify is unavailable: executables modified in place are only noticed \
                     when they run again (needs CAP_SYS_ADMIN and CONFIG_FANOTIFY)"
                );
                None
            }
        };
        Self {
            fanotify,
            watched: HashMap::new(),
            dirty: HashMap::new(),
            failed_marks: 0,
            reporting,
        }
    }

    pub fn is_active(&self) -> bool {
        self.fanotify.is_some()
    }

    /// Stops treating `exe` as watched, so that the next [`Self::watch`] marks
    /// the file now under that device+inode (the old mark went with its inode,
    /// or is renewed harmlessly).
    pub fn forget(&mut self, exe: ExeKey) {
        if self
            .watched
            .get(&(exe.dev, exe.ino))
            .is_some_and(|watched| watched.exe == exe)
        {
            self.watched.remove(&(exe.dev, exe.ino));
        }
        self.dirty.remove(&exe);
    }

    /// Stops watching `exe` for good: its mark is removed if its path still
    /// leads to it (a deleted file's mark went with its last link).
    pub fn unwatch(&mut self, exe: ExeKey) {
        let Some(watched) = self.watched.get(&(exe.dev, exe.ino)) else {
            return;
        };
        if watched.exe != exe {
            return;
        }
        let path = watched.marked_at.clone();
        self.forget(exe);
        if let Some(fanotify) = &self.fanotify
            && fs::metadata(&path).is_ok_and(|m| exe.matches(&m))
        {
            let mask = MaskFlags::FAN_MODIFY | MaskFlags::FAN_CLOSE_WRITE;
            let _ = fanotify.mark(
                MarkFlags::FAN_MARK_REMOVE,
                mask,
                AT_FDCWD,
                Some(path.as_str()),
            );
        }
    }

    /// Files watched now.
    pub fn len(&self) -> usize {
        self.watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }

    /// Marks failed so far (file gone, unsupported file system).
    pub fn failed_marks(&self) -> u64 {
        self.failed_marks
    }

    /// Watches the file `exe`, which process `tgid` ran from `path`: marked
    /// through the process while it runs, else at `path` on the node.
    pub fn watch(&mut self, exe: ExeKey, path: &str, tgid: u32) {
        let Some(fanotify) = &self.fanotify else {
            return;
        };
        if self
            .watched
            .get(&(exe.dev, exe.ino))
            .is_some_and(|watched| watched.exe == exe)
        {
            return;
        }
        let through_process = format!("/proc/{tgid}/exe");
        let on_node = match node::foreign_root() {
            Some(root) => format!("{}{path}", root.display()),
            None => path.to_owned(),
        };
        // Only the very file: a path may lead to another file by now.
        let Some(marked_at) = [through_process, on_node]
            .into_iter()
            .find(|candidate| fs::metadata(candidate).is_ok_and(|m| exe.matches(&m)))
        else {
            return;
        };
        let mask = MaskFlags::FAN_MODIFY | MaskFlags::FAN_CLOSE_WRITE;
        // fanotify follows /proc/<pid>/exe to the file itself, which it marks.
        match fanotify.mark(
            MarkFlags::FAN_MARK_ADD,
            mask,
            AT_FDCWD,
            Some(marked_at.as_str()),
        ) {
            Ok(()) => {
                self.reporting.failures.succeeded(FailureClass::Fanotify);
                self.watched.insert(
                    (exe.dev, exe.ino),
                    Watched {
                        exe,
                        path: path.to_owned(),
                        marked_at,
                    },
                );
            }
            Err(errno) => {
                self.failed_marks += 1;
                self.reporting.mark.inc();
                self.reporting.failures.failed(
                    FailureClass::Fanotify,
                    format_args!("cannot mark {path} ({marked_at}): {errno}"),
                );
                tracing::debug!(exe = path, error = %errno, "cannot watch executable");
            }
        }
    }

    /// Reads pending notifications; returns the files whose writes have
    /// settled and that need a new hash.
    pub fn poll(&mut self) -> Vec<Modified> {
        if let Some(fanotify) = &self.fanotify {
            match fanotify.read_events() {
                Ok(events) => {
                    let now = Instant::now();
                    for event in events {
                        let Some(fd) = event.fd() else {
                            tracing::warn!(
                                "fanotify queue overflowed: some modifications were missed"
                            );
                            continue;
                        };
                        if let Ok(stat) = fstat(fd)
                            && let Some(watched) = self.watched.get(&(stat.st_dev, stat.st_ino))
                        {
                            // The event's own descriptor (opened read-only by the
                            // kernel) reaches the file from any mount namespace.
                            let file = fd.try_clone_to_owned().ok().map(File::from);
                            self.dirty.insert(watched.exe, (now, file));
                        }
                    }
                }
                Err(Errno::EAGAIN) => {}
                Err(errno) => tracing::debug!(error = %errno, "reading fanotify events"),
            }
        }
        let settled: Vec<ExeKey> = self
            .dirty
            .iter()
            .filter(|(_, (last, _))| last.elapsed() >= QUIET_TIME)
            .map(|(key, _)| *key)
            .collect();
        settled
            .into_iter()
            .filter_map(|key| {
                let (_, file) = self.dirty.remove(&key)?;
                self.watched
                    .get(&(key.dev, key.ino))
                    .filter(|watched| watched.exe == key)
                    .map(|watched| Modified {
                        exe: key,
                        path: watched.path.clone(),
                        file,
                    })
            })
            .collect()
    }

    /// Whether a modification is waiting to settle.
    pub fn has_pending(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Whether `exe` was written to and the writes have not settled yet.
    pub fn is_dirty(&self, exe: ExeKey) -> bool {
        self.dirty.contains_key(&exe)
    }
}

impl Default for ModificationWatch {
    fn default() -> Self {
        Self::new()
    }
}

/// Device, inode and (where the file system tells it) generation of `path` right now.
pub fn identity_of(path: &str) -> Option<ExeKey> {
    let file = fs::File::open(path).ok()?;
    let metadata = file.metadata().ok()?;
    Some(ExeKey {
        dev: metadata.dev(),
        ino: metadata.ino(),
        generation: super::inode::generation_of(&file).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn in_place_modification_is_reported_once_settled() {
        let mut watch = ModificationWatch::new();
        if !watch.is_active() {
            // The suite's one skip policy: a failure in a strict run (CI).
            if let Err(error) = fleetsnitch_e2e::skip::skip("fanotify needs CAP_SYS_ADMIN") {
                panic!("{error:#}");
            }
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        fs::write(&path, b"v1").unwrap();
        let path = path.to_str().unwrap().to_owned();
        let key = identity_of(&path).unwrap();
        // No such process: the file is marked at its path.
        watch.watch(key, &path, u32::MAX);

        let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"v2").unwrap();
        drop(file);

        let deadline = Instant::now() + Duration::from_secs(5);
        let mut reported = Vec::new();
        while reported.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            reported = watch.poll();
        }
        assert_eq!(reported.len(), 1, "{reported:?}");
        assert_eq!((reported[0].exe, &reported[0].path), (key, &path));
        let mut content = String::new();
        let mut file: &File = reported[0].file.as_ref().expect("the event's file");
        std::io::Read::read_to_string(&mut file, &mut content).unwrap();
        assert_eq!(content, "v1v2", "the modified file itself");
        assert!(watch.poll().is_empty(), "reported twice");
    }
}
