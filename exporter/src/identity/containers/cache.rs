//! Remembered answers of [`container_of`], bounded.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
};

use super::{ContainerRef, container_of};

/// A bounded memo of [`container_of`] answers, keyed by cgroup id (cgroup v2
/// ids are never reused) or by path.
///
/// When full, the oldest entry is forgotten first. Negative answers (`None`)
/// are remembered too: most processes of a host are in no container.
#[derive(Debug)]
pub struct ContainerCache<K> {
    capacity: usize,
    entries: HashMap<K, Option<ContainerRef>>,
    order: VecDeque<K>,
    hits: u64,
    misses: u64,
}

impl<K: Hash + Eq + Clone> ContainerCache<K> {
    /// A cache of at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            entries: HashMap::with_capacity(capacity.min(4096)),
            order: VecDeque::with_capacity(capacity.min(4096)),
            hits: 0,
            misses: 0,
        }
    }

    /// The remembered answer for `key`, or `resolve()`'s, remembered.
    pub fn get_or_insert_with(
        &mut self,
        key: K,
        resolve: impl FnOnce() -> Option<ContainerRef>,
    ) -> Option<ContainerRef> {
        if let Some(found) = self.entries.get(&key) {
            self.hits += 1;
            return found.clone();
        }
        self.misses += 1;
        let value = resolve();
        while self.entries.len() >= self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.order.push_back(key.clone());
        self.entries.insert(key, value.clone());
        value
    }

    /// The remembered answer for `key`, without resolving.
    pub fn get(&self, key: &K) -> Option<&Option<ContainerRef>> {
        self.entries.get(key)
    }

    /// Forgets `key` (a removed cgroup).
    pub fn remove(&mut self, key: &K) {
        if self.entries.remove(key).is_some() {
            self.order.retain(|k| k != key);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Lookups answered from the cache, and lookups that resolved.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

impl ContainerCache<String> {
    /// The container of a cgroup path, parsed once per distinct path.
    pub fn container_of(&mut self, cgroup_path: &str) -> Option<ContainerRef> {
        if let Some(found) = self.entries.get(cgroup_path) {
            self.hits += 1;
            return found.clone();
        }
        self.get_or_insert_with(cgroup_path.to_owned(), || container_of(cgroup_path))
    }
}

#[cfg(test)]
mod tests {
    use super::{
        super::{Runtime, test_support::*},
        *,
    };

    #[test]
    fn cache_is_bounded_and_remembers_negative_answers() {
        let mut cache: ContainerCache<u64> = ContainerCache::new(3);
        let mut calls = 0;
        for round in 0..2 {
            for id in 0..3u64 {
                let got = cache.get_or_insert_with(id, || {
                    calls += 1;
                    (id != 0).then(|| ContainerRef {
                        runtime: Runtime::Docker,
                        id: A.to_owned(),
                        pod_uid: None,
                    })
                });
                assert_eq!(got.is_some(), id != 0, "round {round} id {id}");
            }
        }
        assert_eq!(calls, 3);
        assert_eq!(cache.stats(), (3, 3));
        // A fourth key evicts the oldest.
        cache.get_or_insert_with(3, || None);
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&0).is_none());
        assert!(cache.get(&1).is_some());
        cache.remove(&1);
        assert_eq!(cache.len(), 2);
        for id in 10..1000 {
            cache.get_or_insert_with(id, || None);
            assert!(cache.len() <= 3);
        }
        assert!(cache.order.len() <= 3);

        let mut by_path: ContainerCache<String> = ContainerCache::new(16);
        let path = format!("/docker/{A}");
        assert_eq!(by_path.container_of(&path), c(Runtime::Docker, A, None));
        assert_eq!(by_path.container_of(&path), c(Runtime::Docker, A, None));
        assert_eq!(by_path.stats(), (1, 1));
    }
}
