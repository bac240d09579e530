//! The pods of this node, by container id and by pod uid.

use std::{
    collections::HashMap,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use k8s_openapi::api::core::v1::Pod;

use super::MIRROR_ANNOTATION;

/// The pod a container belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
    /// The container's name in the pod spec.
    pub container: String,
    pub pod_uid: String,
}

/// A pod, without a container.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodInfo {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
}

#[derive(Debug, Default)]
pub(super) struct Index {
    by_container: HashMap<String, PodRef>,
    by_uid: HashMap<String, PodInfo>,
    /// Per pod uid: the container ids and extra uids it put in the maps.
    owned: HashMap<String, Owned>,
}

#[derive(Debug, Default)]
struct Owned {
    containers: Vec<String>,
    uids: Vec<String>,
}

impl Index {
    /// Pods known.
    pub(super) fn pods(&self) -> usize {
        self.owned.len()
    }

    pub(super) fn remove_pod(&mut self, uid: &str) {
        if let Some(owned) = self.owned.remove(uid) {
            for id in owned.containers {
                self.by_container.remove(&id);
            }
            for uid in owned.uids {
                self.by_uid.remove(&uid);
            }
        }
    }

    pub(super) fn upsert_pod(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.as_deref().filter(|u| !u.is_empty()) else {
            return;
        };
        self.remove_pod(uid);
        let info = PodInfo {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            pod: pod.metadata.name.clone().unwrap_or_default(),
            pod_uid: uid.to_owned(),
        };
        let mut owned = Owned::default();
        let status = pod.status.as_ref();
        let statuses = [
            status.and_then(|s| s.container_statuses.as_deref()),
            status.and_then(|s| s.init_container_statuses.as_deref()),
            status.and_then(|s| s.ephemeral_container_statuses.as_deref()),
        ]
        .into_iter()
        .flatten()
        .flatten();
        for status in statuses {
            let Some(id) = status
                .container_id
                .as_deref()
                .and_then(normalise_container_id)
            else {
                continue;
            };
            self.by_container.insert(
                id.clone(),
                PodRef {
                    namespace: info.namespace.clone(),
                    pod: info.pod.clone(),
                    container: status.name.clone(),
                    pod_uid: uid.to_owned(),
                },
            );
            owned.containers.push(id);
        }
        let mut uids = vec![uid.to_ascii_lowercase()];
        if let Some(mirror) = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(MIRROR_ANNOTATION))
        {
            uids.push(mirror.to_ascii_lowercase());
        }
        for key in uids {
            self.by_uid.insert(key.clone(), info.clone());
            owned.uids.push(key);
        }
        self.owned.insert(uid.to_owned(), owned);
    }
}

/// A container id as the cgroup path has it: the `runtime://` scheme of
/// `containerID` dropped, lowercase. `None` for an empty id (a container
/// still waiting).
pub fn normalise_container_id(id: &str) -> Option<String> {
    let id = id.split_once("://").map_or(id, |(_, id)| id).trim();
    (!id.is_empty()).then(|| id.to_ascii_lowercase())
}

/// A cheap, cloneable read handle on the resolver's map.
#[derive(Debug, Clone, Default)]
pub struct PodIndex {
    inner: Arc<RwLock<Index>>,
    synced: Arc<AtomicBool>,
}

impl PodIndex {
    /// The pod of a container id (`<64hex>` or `containerd://<64hex>`).
    pub fn lookup(&self, container_id: &str) -> Option<PodRef> {
        let id = normalise_container_id(container_id)?;
        let index = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        index.by_container.get(&id).cloned()
    }

    /// The pod of a pod uid (dashes, as in the API; a static pod's uid too).
    pub fn lookup_pod(&self, pod_uid: &str) -> Option<PodInfo> {
        let index = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        index.by_uid.get(&pod_uid.to_ascii_lowercase()).cloned()
    }

    /// Whether the pods have been listed at least once.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Pods known.
    pub fn pods(&self) -> usize {
        let index = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        index.owned.len()
    }

    /// Container ids known.
    pub fn containers(&self) -> usize {
        let index = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        index.by_container.len()
    }

    pub(super) fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a freshly listed map in place of the current one.
    pub(super) fn replace(&self, fresh: Index) {
        *self.write() = fresh;
        self.synced.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::core::v1::{ContainerStatus, PodStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    #[test]
    fn container_ids_lose_their_scheme() {
        let id = "3f1b2e4d5c6a7980a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
        for raw in [
            format!("containerd://{id}"),
            format!("cri-o://{id}"),
            format!("docker://{id}"),
            id.to_owned(),
            id.to_ascii_uppercase(),
        ] {
            assert_eq!(normalise_container_id(&raw).as_deref(), Some(id), "{raw}");
        }
        assert_eq!(normalise_container_id(""), None);
        assert_eq!(normalise_container_id("containerd://"), None);
    }

    #[test]
    fn index_replaces_a_pods_containers() {
        let index = PodIndex::default();
        let pod = |ids: &[&str]| Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("U1".into()),
                annotations: Some(BTreeMap::from([(
                    MIRROR_ANNOTATION.to_owned(),
                    "abc".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus {
                container_statuses: Some(
                    ids.iter()
                        .map(|id| ContainerStatus {
                            name: format!("c-{id}"),
                            container_id: Some(format!("containerd://{id}")),
                            ..ContainerStatus::default()
                        })
                        .collect(),
                ),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        index.write().upsert_pod(&pod(&["a", "b"]));
        assert_eq!(index.lookup("b").unwrap().container, "c-b");
        index.write().upsert_pod(&pod(&["c"]));
        assert_eq!(index.lookup("b"), None);
        assert_eq!(index.lookup("containerd://c").unwrap().pod, "p");
        assert_eq!(index.lookup_pod("abc").unwrap().namespace, "ns");
        assert_eq!(index.lookup_pod("u1").unwrap().pod_uid, "U1");
        index.write().remove_pod("U1");
        assert_eq!(index.containers(), 0);
        assert_eq!(index.lookup_pod("abc"), None);
        assert_eq!(index.pods(), 0);
    }
}
