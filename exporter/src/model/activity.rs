//! When each executable, and each version of it, was last seen: the clock
//! that per-executable series expire by (`metrics.executable_expiry`).
//!
//! The collector records every executable it sees (traffic, executions);
//! each owner of per-executable series (the traffic counters, the hasher's
//! `_info`, the journal's first sightings, VirusTotal's verdicts) remembers
//! when it last set each series in a [`Touched`], and sweeps: a series whose
//! executable was neither seen nor set for the expiry is removed from
//! `/metrics` (the journal keeps the executable) and gives its place under
//! the label caps back. The clock forgets what it no longer needs, so its
//! size follows the executables seen within one expiry.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::Sha256;

/// Last sighting of one path, and of each of its versions.
#[derive(Debug, Default)]
struct Seen {
    last: i64,
    /// sha256 (hex) -> last seen.
    versions: HashMap<String, i64>,
}

/// The shared clock; cheap to clone.
#[derive(Debug, Clone)]
pub struct Activity {
    paths: Arc<Mutex<HashMap<String, Seen>>>,
    expiry: Duration,
}

impl Activity {
    pub fn new(expiry: Duration) -> Self {
        Self {
            paths: Arc::default(),
            expiry,
        }
    }

    /// How long an executable may go unseen before its series go.
    pub fn expiry(&self) -> Duration {
        self.expiry
    }

    /// How often owners sweep: a tenth of the expiry, between 1 s and 1 min.
    pub fn sweep_interval(&self) -> Duration {
        (self.expiry / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    fn expiry_secs(&self) -> i64 {
        i64::try_from(self.expiry.as_secs()).unwrap_or(i64::MAX)
    }

    /// `path` (running the file hashed as `sha256`, if known) was seen at `at`.
    pub fn record(&self, path: &str, sha256: Option<&Sha256>, at: i64) {
        self.record_all([(path, sha256)], at);
    }

    /// [`Self::record`] for many executables, under one lock.
    pub fn record_all<'a>(
        &self,
        seen: impl IntoIterator<Item = (&'a str, Option<&'a Sha256>)>,
        at: i64,
    ) {
        let Ok(mut paths) = self.paths.lock() else {
            return;
        };
        for (path, sha256) in seen {
            let entry = match paths.get_mut(path) {
                Some(entry) => entry,
                None => paths.entry(path.to_owned()).or_default(),
            };
            entry.last = entry.last.max(at);
            if let Some(sha256) = sha256 {
                let version = match entry.versions.get_mut(sha256.as_str()) {
                    Some(version) => version,
                    None => entry
                        .versions
                        .entry(sha256.as_str().to_owned())
                        .or_default(),
                };
                *version = (*version).max(at);
            }
        }
    }

    /// When `path` (with `sha256`: that version of it) was last seen.
    pub fn last_seen(&self, path: &str, sha256: Option<&str>) -> Option<i64> {
        let paths = self.paths.lock().ok()?;
        let seen = paths.get(path)?;
        match sha256 {
            Some(sha256) => seen.versions.get(sha256).copied(),
            None => Some(seen.last),
        }
    }

    /// Whether a series of `path` (of its version `sha256`) that its owner
    /// last set at `updated_at` has outlived the expiry at `now`: neither
    /// set nor seen since.
    pub fn is_stale(&self, path: &str, sha256: Option<&str>, updated_at: i64, now: i64) -> bool {
        let last = self
            .last_seen(path, sha256)
            .map_or(updated_at, |seen| seen.max(updated_at));
        now.saturating_sub(last) > self.expiry_secs()
    }

    /// Forgets what was last seen more than one expiry before `now`.
    pub fn prune(&self, now: i64) {
        let horizon = now.saturating_sub(self.expiry_secs());
        if let Ok(mut paths) = self.paths.lock() {
            paths.retain(|_, seen| {
                seen.versions.retain(|_, at| *at >= horizon);
                seen.last >= horizon
            });
        }
    }

    /// Paths remembered now.
    pub fn len(&self) -> usize {
        self.paths.lock().map_or(0, |paths| paths.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// When its owner last set each series, and when it last swept.
#[derive(Debug)]
pub struct Touched<K> {
    updated: HashMap<K, i64>,
    next_sweep: i64,
}

impl<K> Default for Touched<K> {
    fn default() -> Self {
        Self {
            updated: HashMap::new(),
            next_sweep: 0,
        }
    }
}

impl<K: Hash + Eq + Clone> Touched<K> {
    /// The series `key` was set at `now`.
    pub fn touch(&mut self, key: &K, now: i64) {
        match self.updated.get_mut(key) {
            Some(at) => *at = now,
            None => {
                self.updated.insert(key.clone(), now);
            }
        }
    }

    /// The series `key` is gone.
    pub fn forget(&mut self, key: &K) {
        self.updated.remove(key);
    }

    /// Takes out the series `is_stale(key, updated_at)` says have expired,
    /// at most once per `activity`'s sweep interval (empty otherwise).
    pub fn sweep(
        &mut self,
        activity: &Activity,
        now: i64,
        mut is_stale: impl FnMut(&K, i64) -> bool,
    ) -> Vec<K> {
        if now < self.next_sweep {
            return Vec::new();
        }
        self.next_sweep =
            now + i64::try_from(activity.sweep_interval().as_secs()).unwrap_or(i64::MAX);
        let stale: Vec<K> = self
            .updated
            .iter()
            .filter(|(key, at)| is_stale(key, **at))
            .map(|(key, _)| key.clone())
            .collect();
        for key in &stale {
            self.updated.remove(key);
        }
        stale
    }

    pub fn len(&self) -> usize {
        self.updated.len()
    }

    pub fn is_empty(&self) -> bool {
        self.updated.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_series_expires_once_its_executable_is_neither_seen_nor_set() {
        let activity = Activity::new(MINUTE);
        let (v1, v2) = (Sha256::from_digest(&[1; 32]), Sha256::from_digest(&[2; 32]));
        activity.record("/usr/bin/tool", Some(&v1), 100);
        activity.record("/usr/bin/tool", Some(&v2), 150);
        assert!(!activity.is_stale("/usr/bin/tool", None, 0, 200));
        assert!(
            activity.is_stale("/usr/bin/tool", Some(v1.as_str()), 90, 200),
            "version 1 last ran at 100"
        );
        assert!(!activity.is_stale("/usr/bin/tool", Some(v2.as_str()), 90, 200));
        assert!(
            !activity.is_stale("/never/seen", None, 180, 200),
            "set recently by its owner"
        );
        assert!(activity.is_stale("/never/seen", None, 100, 200));
    }

    #[test]
    fn the_clock_forgets_what_expired() {
        let activity = Activity::new(MINUTE);
        activity.record("/tmp/once", None, 100);
        activity.record("/usr/bin/daemon", None, 100);
        activity.record("/usr/bin/daemon", None, 170);
        activity.prune(200);
        assert_eq!(activity.len(), 1);
        assert_eq!(activity.last_seen("/usr/bin/daemon", None), Some(170));
    }

    #[test]
    fn sweeps_take_out_stale_series_once_per_interval() {
        let activity = Activity::new(MINUTE);
        let mut touched = Touched::default();
        touched.touch(&"/tmp/a".to_owned(), 100);
        touched.touch(&"/tmp/b".to_owned(), 150);
        let stale = touched.sweep(&activity, 200, |key, at| {
            activity.is_stale(key, None, at, 200)
        });
        assert_eq!(stale, vec!["/tmp/a".to_owned()]);
        assert_eq!(touched.len(), 1);
        assert!(
            touched.sweep(&activity, 201, |_, _| true).is_empty(),
            "swept a second ago"
        );
    }
}
