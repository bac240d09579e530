//! The hashing thread: hashes each sighting's file once per version, keeps
//! fanotify marks on what it hashed, hands every sighting on, and exports
//! each (executable, sha256) that ran within the expiry.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    sync::{Arc, mpsc},
    time::Duration,
};

use super::{
    Cached, HashFailure, HashIndex, HashJob, HashMetrics, HeldFile, Shared, Stamp,
    files::{Mismatch, open_executable, open_on_node, sha256_of},
    stamp_of,
};
use crate::{
    identity::{
        modification::{ModificationWatch, Modified},
        processes::ExeKey,
    },
    model::{Activity, ExecutableSighting, Outbox, Record, Sha256, Touched},
    support::unix_now,
    telemetry::{ExeLabels, ExecutableLabels, UNAVAILABLE},
};

pub(super) struct Worker {
    metrics: HashMetrics,
    outbox: Option<Outbox>,
    index: HashIndex,
    /// Results by file identity: the kernel's (device, inode, generation)
    /// and the open file's `st_dev` (the same but on btrfs and overlayfs,
    /// where it names the subvolume or layer). Each with the stamp of the
    /// file hashed (`None` for failures).
    cache: HashMap<(ExeKey, u64), Cached>,
    /// The files behind each exported `executable_info` series (two files
    /// of one content at one path share a series).
    versions: HashMap<ExecutableLabels, HashSet<ExeKey>>,
    /// The series each file is exported under: its current hash.
    file_labels: HashMap<ExeKey, ExecutableLabels>,
    info_touched: Touched<ExecutableLabels>,
    modified_touched: Touched<ExeLabels>,
    /// The path each file was last seen at, and when (for forgetting it).
    files: HashMap<ExeKey, String>,
    files_touched: Touched<ExeKey>,
    /// The last sighting of each watched executable, to journal a modification with it.
    last_jobs: HashMap<ExeKey, HashJob>,
    watch: ModificationWatch,
    shared: Arc<Shared>,
    activity: Activity,
}

impl Worker {
    pub(super) fn new(
        metrics: HashMetrics,
        outbox: Option<Outbox>,
        index: HashIndex,
        shared: Arc<Shared>,
        watch: ModificationWatch,
        activity: Activity,
    ) -> Self {
        Self {
            metrics,
            outbox,
            index,
            cache: HashMap::new(),
            versions: HashMap::new(),
            file_labels: HashMap::new(),
            info_touched: Touched::default(),
            modified_touched: Touched::default(),
            files: HashMap::new(),
            files_touched: Touched::default(),
            last_jobs: HashMap::new(),
            watch,
            shared,
            activity,
        }
    }

    pub(super) fn serve(&mut self, queue: mpsc::Receiver<HashJob>) {
        loop {
            match queue.recv_timeout(Duration::from_millis(100)) {
                Ok(job) => self.run(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            for modified in self.watch.poll() {
                self.rehash_modified(modified);
            }
            self.expire(unix_now());
        }
    }

    /// Removes the series of executables (and versions) nothing saw for the
    /// expiry, and forgets the files nothing saw either: their cached hash,
    /// stamp and fanotify mark.
    fn expire(&mut self, now: i64) {
        let activity = self.activity.clone();
        for labels in self.info_touched.sweep(&activity, now, |labels, at| {
            activity.is_stale(&labels.exe.0, version_of(labels), at, now)
        }) {
            self.metrics.executable_info.remove(&labels);
            for file in self.versions.remove(&labels).unwrap_or_default() {
                if self.file_labels.get(&file) == Some(&labels) {
                    self.file_labels.remove(&file);
                }
            }
        }
        for labels in self.modified_touched.sweep(&activity, now, |labels, at| {
            activity.is_stale(&labels.exe.0, None, at, now)
        }) {
            self.metrics.executable_modified.remove(&labels);
        }
        let files = &self.files;
        let gone: HashSet<ExeKey> = self
            .files_touched
            .sweep(&activity, now, |file, at| {
                files
                    .get(file)
                    .is_none_or(|path| activity.is_stale(path, None, at, now))
            })
            .into_iter()
            .collect();
        if gone.is_empty() {
            return;
        }
        self.cache.retain(|(file, _), _| !gone.contains(file));
        for file in &gone {
            self.files.remove(file);
            self.last_jobs.remove(file);
            self.file_labels.remove(file);
            self.watch.unwatch(*file);
        }
        if let Ok(mut stamps) = self.shared.stamps.write() {
            stamps.retain(|file, _| !gone.contains(file));
        }
        let gone: Vec<ExeKey> = gone.into_iter().collect();
        self.index.forget_files(&gone);
    }

    /// `exe` was written to in place: hash it again and journal the change.
    fn rehash_modified(&mut self, modified: Modified) {
        let Modified { exe, path, file } = modified;
        let path = path.as_str();
        let Some(mut job) = self.last_jobs.get(&exe).cloned() else {
            return;
        };
        // The file the event handed over, else the file where it was marked.
        let opened = match file {
            Some(file) => file
                .metadata()
                .map(|metadata| (file, metadata.dev()))
                .map_err(|_| Mismatch::Missing),
            None => open_on_node(path, exe),
        };
        let (sha256, file_dev, stamp) = match opened {
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
            .is_some_and(|(_, p)| p.as_ref() == Ok(&sha256))
        {
            return;
        }
        self.index.settle(exe, None, &Ok(sha256.clone()));
        tracing::warn!(exe = path, %sha256, "executable modified in place");
        let now = unix_now();
        let labels = ExeLabels::new(path);
        self.metrics
            .executable_modified
            .get_or_create(&labels)
            .set(now);
        self.modified_touched.touch(&labels, now);
        job.seen_at = now;
        self.export(&job, Ok(sha256), true);
    }

    fn run(&mut self, mut job: HashJob) {
        // Writes seen to watched files first: a sighting of a file being
        // modified in place must not pass for a new file (see `outcome`).
        for modified in self.watch.poll() {
            self.rehash_modified(modified);
        }
        let held = job.file.take();
        let started = std::time::Instant::now();
        let outcome = self.outcome(&job, held.as_deref());
        tracing::debug!(exe = ?job.path, pid = job.tgid, elapsed = ?started.elapsed(), ok = outcome.is_ok(), "sighting hashed");
        self.index.settle(job.exe, job.process, &outcome);
        if held.is_some()
            && let Ok(mut pending) = self.shared.pending.lock()
        {
            pending.remove(&job.exe);
        }
        // The descriptor is released here, before the job is remembered.
        drop(held);
        if !job.sighting {
            // A parent's hash for its children's records: cached and indexed,
            // forgotten like any file nothing ran for the expiry.
            let now = unix_now();
            self.files.insert(job.exe, job.path.clone());
            self.files_touched.touch(&job.exe, now);
            return;
        }
        if outcome.is_ok() {
            self.watch.watch(job.exe, &job.path, job.tgid);
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
    fn outcome(&mut self, job: &HashJob, held: Option<&HeldFile>) -> Result<Sha256, HashFailure> {
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
            self.metrics.failure(*failure).inc();
        }
        self.cache.insert(key, (stamp, outcome.clone()));
        if outcome.is_ok() {
            self.remember_stamp(job.exe, stamp);
        }
        outcome
    }

    /// Hands the sighting on and exports the file's current hash, beside the
    /// other versions of its path that ran within the expiry.
    fn export(&mut self, job: &HashJob, outcome: Result<Sha256, HashFailure>, modified: bool) {
        let now = unix_now();
        let labels = ExecutableLabels::new(&job.path, outcome.as_ref().ok().map(Sha256::as_str));
        self.files.insert(job.exe, job.path.clone());
        self.files_touched.touch(&job.exe, now);
        if let Some(outbox) = &self.outbox {
            outbox.send(Record::Executable(Box::new(ExecutableSighting {
                path: job.path.clone(),
                file: job.exe,
                hash_failure: outcome.as_ref().err().map(|failure| failure.reason()),
                sha256: outcome.ok(),
                name: job.name.clone(),
                uid: job.uid,
                user_name: job.user_name.clone(),
                parent_path: job.parent_path.clone(),
                workload: job.workload.clone(),
                seen_at: job.seen_at,
                modified,
                used_network: job.used_network,
                command_line: job.command_line.clone(),
            })));
        }
        // A file has one current hash: modified in place (or first
        // unhashable), its earlier series goes, unless another file still
        // holds it.
        if let Some(previous) = self.file_labels.insert(job.exe, labels.clone())
            && previous != labels
            && let Some(files) = self.versions.get_mut(&previous)
        {
            files.remove(&job.exe);
            if files.is_empty() {
                self.versions.remove(&previous);
                self.info_touched.forget(&previous);
                self.metrics.executable_info.remove(&previous);
            }
        }
        self.versions
            .entry(labels.clone())
            .or_default()
            .insert(job.exe);
        self.info_touched.touch(&labels, now);
        self.metrics.executable_info.get_or_create(&labels).set(1);
    }
}

/// The version an `executable_info` series names; none when unhashed.
fn version_of(labels: &ExecutableLabels) -> Option<&str> {
    Some(labels.sha256.as_str()).filter(|sha256| *sha256 != UNAVAILABLE)
}

#[cfg(test)]
mod tests {
    use std::{fs::File, thread};

    use super::{super::test_support::*, *};

    fn worker() -> Worker {
        Worker::new(
            HashMetrics::default(),
            None,
            HashIndex::default(),
            Arc::new(Shared::default()),
            ModificationWatch::new(),
            activity(),
        )
    }

    #[test]
    fn a_parent_is_hashed_for_its_children_without_a_sighting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("parent-shell");
        std::fs::write(&path, b"a parent that never used the network").unwrap();
        let key = key_of(&path);
        let (outbox, records) = Outbox::bounded(16, Default::default());
        let metrics = HashMetrics::default();
        let mut worker = Worker::new(
            metrics.clone(),
            Some(outbox),
            HashIndex::default(),
            Arc::new(Shared::default()),
            ModificationWatch::new(),
            activity(),
        );
        let parent = HashJob {
            sighting: false,
            ..job(key, u32::MAX - 1, &path.to_string_lossy())
        };
        worker.run(parent);
        assert_eq!(
            worker.index.sha256_of(key),
            Some(sha256_of(&File::open(&path).unwrap()).unwrap()),
            "the parent's hash is in the index its children's flows read"
        );
        assert!(
            records.try_recv().is_err(),
            "no sighting: a parent is not journaled as an executable seen"
        );
        // The same file as a sighting of its own is handed on.
        worker.run(job(key, u32::MAX - 1, &path.to_string_lossy()));
        assert!(matches!(records.try_recv(), Ok(Record::Executable(_))));
    }

    #[test]
    fn a_cached_hash_is_not_reused_for_another_version_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"abc").unwrap();
        let key = key_of(&path);
        let mut worker = worker();
        worker.run(job(key, u32::MAX - 1, &path.to_string_lossy()));
        let first = worker.index.sha256_of(key).unwrap();
        // What a new file under the same inode number looks like from here:
        // same device+inode, another ctime and size (no fanotify event seen:
        // a freed inode takes its mark with it).
        worker.watch.forget(key);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"another program").unwrap();
        assert_eq!(key_of(&path), key);
        worker.run(job(key, u32::MAX - 1, &path.to_string_lossy()));
        let second = worker.index.sha256_of(key).unwrap();
        assert_ne!(first, second);
        assert_eq!(
            second,
            sha256_of(&File::open(&path).unwrap()).unwrap(),
            "the new content's hash"
        );
        // Unchanged, the cached hash is used without reading the file again.
        worker.run(job(key, u32::MAX - 1, &path.to_string_lossy()));
        assert_eq!(worker.index.sha256_of(key).unwrap(), second);
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
            worker.outcome(&sighting, None).unwrap().as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Another file with the same (device, inode), as a freed inode reused
        // by a new file would be: its change time differs.
        thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"abd").unwrap();
        assert_eq!(key_of(&path), exe);
        assert_eq!(
            worker.outcome(&sighting, None).unwrap().as_str(),
            "a52d159f262b2c6ddb724a61840befc36eb30c88877a4030b65cbe86298449c9",
            "the hash of the earlier file was reused"
        );
    }
}
