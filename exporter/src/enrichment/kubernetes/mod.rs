//! Pod attribution: which pod, namespace and container a container id is.
//!
//! When the agent runs in a Kubernetes pod (the service account token is
//! mounted and `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` are set),
//! [`PodResolver`] keeps the pods of this node with kube-rs's watcher
//! (`kube::runtime::watcher`, the reflector pattern of client-go) on
//! `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`:
//!
//! - the pods are listed (100 a page) and then watched from the list's
//!   resource version; watch events (`ADDED`, `MODIFIED`, `DELETED`) update
//!   the map as they come, bookmarks move the resource version;
//! - a watch the server ends (it does after `timeoutSeconds`, `watch_timeout`)
//!   is resumed from the last resource version seen; a server that ends
//!   every watch at once is paced by the back-off ([`client`]);
//! - `410 Gone`, as an `ERROR` event or as the HTTP status of a watch, means
//!   the resource version is too old: the pods are listed again and the map
//!   replaced (the watcher does it for the event; for the status, which the
//!   watcher would retry with the same expired version, a new watcher is
//!   started);
//! - any other failure (transport, TLS, HTTP 5xx, 401/403, malformed JSON) is
//!   counted, logged when the state changes from healthy to failing, and
//!   retried after an exponential back-off (`backoff_min` doubling up to
//!   `backoff_max`, 1 s .. 60 s by default, with jitter so that a fleet of
//!   agents does not retry in step). kube-rs's own retries are off;
//! - `fleetsnitch_kubernetes_api_up` is 1 after a list that ended, a watch
//!   the server accepted or a watch event, 0 from a failure until the next
//!   of those; outages are journaled as the `kubernetes` failure class
//!   ([`ApiHealth`]).
//!
//! The map is keyed by container id, from `status.containerStatuses`,
//! `initContainerStatuses` and `ephemeralContainerStatuses`
//! (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`: the scheme is
//! dropped). Pods are also indexed by uid, and static pods by the uid the
//! kubelet runs them under (their `kubernetes.io/config.mirror` annotation),
//! so a process in a container not yet in the pod's status (or in the pod
//! sandbox, whose id is in no status) is still given its pod and namespace
//! from the pod uid of its cgroup path ([`crate::enrichment::containers::pod_uid_of`]).
//! Pod objects are not kept: the map holds names and ids only.
//!
//! The bearer token is read again every `token_reload_interval` and after a
//! `401 Unauthorized` (bound service account tokens are rotated by the
//! kubelet); the CA bundle `ca.crt` is the only trust root of the connection
//! when present. TLS is rustls on ring.
//!
//! Needs RBAC `get`, `list` and `watch` on `pods` (cluster-wide: the field
//! selector narrows to the node, not the permission).

mod client;
mod health;
mod index;
mod watch;

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use prometheus_client::{metrics::counter::Counter, registry::Registry};
use serde::Deserialize;

use crate::{model::Failures, support::backoff::Backoff};

pub use health::ApiHealth;
pub use index::{PodIndex, PodInfo, PodRef, normalise_container_id};

/// Where the kubelet mounts the service account token.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Where the kubelet mounts the cluster's CA bundle.
pub const DEFAULT_CA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The annotation a mirror pod carries: the uid of the static pod it mirrors.
pub(super) const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// `kubernetes` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Attribute containers to pods when running in a cluster. Off: never
    /// talk to the API server.
    pub enabled: bool,
    /// The service account token (bearer credentials).
    pub token_path: PathBuf,
    /// The CA bundle the API server's certificate is checked against; when
    /// missing, the usual public roots are used.
    pub ca_path: PathBuf,
    /// The API server's URL. Default: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    pub api_url: Option<String>,
    /// This node's name. Default: the value of `node_name_env`.
    pub node_name: Option<String>,
    /// The environment variable holding the node's name (set it from
    /// `spec.nodeName` through the downward API).
    pub node_name_env: String,
    /// First pause after a failed request.
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Longest pause after repeated failures.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How long the server keeps one watch open (`timeoutSeconds`).
    #[serde(with = "humantime_serde")]
    pub watch_timeout: Duration,
    /// Timeout of connecting and of one list request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often the token file is read again (also at once after a 401).
    #[serde(with = "humantime_serde")]
    pub token_reload_interval: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            token_path: PathBuf::from(DEFAULT_TOKEN_PATH),
            ca_path: PathBuf::from(DEFAULT_CA_PATH),
            api_url: None,
            node_name: None,
            node_name_env: "NODE_NAME".to_owned(),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            watch_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(30),
            token_reload_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error(
        "running in Kubernetes but the node name is unknown: set {env} from spec.nodeName \
         (downward API) or kubernetes.node_name"
    )]
    NoNodeName { env: String },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: no usable PEM certificate ({reason})", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("{}: the token file is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error("{}: the token is not a valid HTTP header value", path.display())]
    BadToken { path: PathBuf },
    #[error("invalid API server URL {0:?}")]
    BadUrl(String),
    #[error("the pod resolver needs a tokio runtime")]
    NoRuntime,
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// What was found of the cluster this agent runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InCluster {
    /// Base URL of the API server, without a trailing slash.
    pub api_url: String,
    pub node_name: String,
    pub token_path: PathBuf,
    /// The CA bundle, when the file exists.
    pub ca_pem: Option<Vec<u8>>,
}

/// Whether the agent runs in a Kubernetes cluster, and how to reach its API.
///
/// `Ok(None)`: not in a cluster (disabled, no token file, or neither
/// `api_url` nor `KUBERNETES_SERVICE_HOST`/`_PORT`). An error: in a cluster
/// but something needed is missing or unreadable. `env` reads environment
/// variables (`|name| std::env::var(name).ok()` in production).
pub fn detect(
    config: &KubernetesConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<InCluster>, KubernetesError> {
    if !config.enabled || !config.token_path.exists() {
        return Ok(None);
    }
    let nonempty = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let api_url = match &config.api_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let (Some(host), Some(port)) = (
                nonempty("KUBERNETES_SERVICE_HOST"),
                nonempty("KUBERNETES_SERVICE_PORT"),
            ) else {
                return Ok(None);
            };
            let host = host.trim();
            if host.contains(':') && !host.starts_with('[') {
                format!("https://[{host}]:{}", port.trim())
            } else {
                format!("https://{host}:{}", port.trim())
            }
        }
    };
    if !(api_url.starts_with("https://") || api_url.starts_with("http://")) {
        return Err(KubernetesError::BadUrl(api_url));
    }
    let node_name = config
        .node_name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .or_else(|| nonempty(&config.node_name_env))
        .map(|n| n.trim().to_owned())
        .ok_or_else(|| KubernetesError::NoNodeName {
            env: config.node_name_env.clone(),
        })?;
    read_token(&config.token_path)?;
    let ca_pem = match std::fs::read(&config.ca_path) {
        Ok(pem) => Some(pem),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(KubernetesError::Read {
                path: config.ca_path.clone(),
                source,
            });
        }
    };
    Ok(Some(InCluster {
        api_url,
        node_name,
        token_path: config.token_path.clone(),
        ca_pem,
    }))
}

pub(super) fn read_token(path: &Path) -> Result<String, KubernetesError> {
    let token = std::fs::read_to_string(path).map_err(|source| KubernetesError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(KubernetesError::EmptyToken {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

/// What the resolver did: `fleetsnitch_kubernetes_*_total`.
#[derive(Debug, Clone, Default)]
pub struct ResolverCounters {
    /// Successful lists (the first one included).
    pub lists: Counter,
    /// Lists that failed.
    pub list_errors: Counter,
    /// Lists after the first successful one (410 Gone).
    pub relists: Counter,
    /// Watch requests made.
    pub watches: Counter,
    /// Watches that failed (anything but a clean end or 410 Gone).
    pub watch_errors: Counter,
    /// Watch events applied (added, modified, deleted pods).
    pub watch_events: Counter,
}

impl ResolverCounters {
    pub fn register(registry: &mut Registry) -> Self {
        let counters = Self::default();
        for (name, help, counter) in [
            (
                "kubernetes_lists",
                "Successful lists of this node's pods from the API server (410 Gone relists included)",
                &counters.lists,
            ),
            (
                "kubernetes_list_errors",
                "Lists of this node's pods that failed (retried with back-off): pods stay unnamed meanwhile",
                &counters.list_errors,
            ),
            (
                "kubernetes_relists",
                "Lists after the first one, made because a watch expired (410 Gone)",
                &counters.relists,
            ),
            (
                "kubernetes_watches",
                "Watch requests made on this node's pods",
                &counters.watches,
            ),
            (
                "kubernetes_watch_errors",
                "Watches of this node's pods that failed (retried with back-off)",
                &counters.watch_errors,
            ),
            (
                "kubernetes_watch_events",
                "Pod watch events applied",
                &counters.watch_events,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        counters
    }
}

/// Keeps the pods of this node, and the containers in them, up to date from
/// the API server, in a task of the tokio runtime it was started on. Dropping
/// it stops the task.
#[derive(Debug)]
pub struct PodResolver {
    index: PodIndex,
    counters: ResolverCounters,
    health: ApiHealth,
    node_name: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodResolver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodResolver {
    /// Starts the resolver when the agent runs in a cluster; `None` outside
    /// Kubernetes, and when it cannot start (the cause is logged as a
    /// warning and reported to `failures`). Registers the counters in any
    /// case (dashboards see the families) and `fleetsnitch_kubernetes_api_up`
    /// in a cluster only, 0 when the resolver could not start: pods go
    /// unnamed then as surely as with the API server down. Must be called
    /// within a tokio runtime.
    pub fn spawn(
        config: &KubernetesConfig,
        registry: &mut Registry,
        failures: Failures,
    ) -> Option<Self> {
        let counters = ResolverCounters::register(registry);
        let health = ApiHealth::new(failures);
        let env = |name: &str| std::env::var(name).ok();
        match Self::try_spawn(config, &env, counters, health.clone()) {
            Ok(Some(resolver)) => {
                health.register(registry);
                Some(resolver)
            }
            Ok(None) => None,
            Err(err) => {
                tracing::warn!("pods will not be attributed: {err}");
                health.register(registry);
                health.not_started(&err);
                None
            }
        }
    }

    /// [`PodResolver::spawn`] with the environment given and the error
    /// returned.
    pub fn try_spawn(
        config: &KubernetesConfig,
        env: &dyn Fn(&str) -> Option<String>,
        counters: ResolverCounters,
        health: ApiHealth,
    ) -> Result<Option<Self>, KubernetesError> {
        match detect(config, env)? {
            Some(cluster) => Self::start(cluster, config, counters, health).map(Some),
            None => {
                tracing::debug!("not running in Kubernetes: no pod attribution");
                Ok(None)
            }
        }
    }

    /// Starts listing and watching the pods of `cluster.node_name`.
    pub fn start(
        cluster: InCluster,
        config: &KubernetesConfig,
        counters: ResolverCounters,
        health: ApiHealth,
    ) -> Result<Self, KubernetesError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| KubernetesError::NoRuntime)?;
        let backoff = || Backoff::new(config.backoff_min, config.backoff_max, BACKOFF_JITTER);
        let client = client::build(&cluster, config, &counters, &health, backoff())?;
        let index = PodIndex::default();
        tracing::info!(
            api = %cluster.api_url,
            node = %cluster.node_name,
            "attributing containers to the pods of this node"
        );
        let task = runtime.spawn(watch::run(
            kube::Api::all(client),
            watch::watcher_config(&cluster.node_name, config.watch_timeout),
            index.clone(),
            counters.clone(),
            health.clone(),
            backoff(),
        ));
        Ok(Self {
            index,
            counters,
            health,
            node_name: cluster.node_name,
            task,
        })
    }

    /// The pod of a container id; see [`PodIndex::lookup`].
    pub fn lookup(&self, container_id: &str) -> Option<PodRef> {
        self.index.lookup(container_id)
    }

    /// The pod of a pod uid; see [`PodIndex::lookup_pod`].
    pub fn lookup_pod(&self, pod_uid: &str) -> Option<PodInfo> {
        self.index.lookup_pod(pod_uid)
    }

    /// A handle to look pods up from elsewhere (valid while the resolver runs).
    pub fn index(&self) -> PodIndex {
        self.index.clone()
    }

    pub fn counters(&self) -> &ResolverCounters {
        &self.counters
    }

    /// Whether the API server answers; see [`ApiHealth`].
    pub fn api_health(&self) -> &ApiHealth {
        &self.health
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }
}

/// Each pause is drawn from `[0.8 x current, current]`: a fleet of agents
/// that lost the API server together does not retry in step.
const BACKOFF_JITTER: f64 = 0.2;

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn config_in(dir: &Path) -> KubernetesConfig {
        KubernetesConfig {
            token_path: dir.join("token"),
            ca_path: dir.join("ca.crt"),
            ..KubernetesConfig::default()
        }
    }

    const IN_CLUSTER: &[(&str, &str)] = &[
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
        ("NODE_NAME", "node-a"),
    ];

    #[test]
    fn detection() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        // No token: not in a cluster, whatever the environment says.
        assert_eq!(detect(&config, &env_of(IN_CLUSTER)).unwrap(), None);

        std::fs::write(dir.path().join("token"), "tok\n").unwrap();
        // A token but no service environment: not in a cluster.
        assert_eq!(
            detect(&config, &env_of(&[("NODE_NAME", "n")])).unwrap(),
            None
        );
        // Disabled.
        let disabled = KubernetesConfig {
            enabled: false,
            ..config.clone()
        };
        assert_eq!(detect(&disabled, &env_of(IN_CLUSTER)).unwrap(), None);

        let found = detect(&config, &env_of(IN_CLUSTER)).unwrap().unwrap();
        assert_eq!(found.api_url, "https://10.96.0.1:443");
        assert_eq!(found.node_name, "node-a");
        assert_eq!(found.ca_pem, None);

        // IPv6 service address.
        let found = detect(
            &config,
            &env_of(&[
                ("KUBERNETES_SERVICE_HOST", "fd00::1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
                ("NODE_NAME", "node-a"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(found.api_url, "https://[fd00::1]:443");

        // In a cluster without a node name: an error naming the variable.
        let err = detect(
            &config,
            &env_of(&[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("NODE_NAME"), "{err}");

        // Configured node name, env variable and URL.
        let configured = KubernetesConfig {
            api_url: Some("https://api.example:6443/".to_owned()),
            node_name_env: "MY_NODE".to_owned(),
            ..config.clone()
        };
        let found = detect(&configured, &env_of(&[("MY_NODE", "node-b")]))
            .unwrap()
            .unwrap();
        assert_eq!(found.api_url, "https://api.example:6443");
        assert_eq!(found.node_name, "node-b");

        // An empty token is an error.
        std::fs::write(dir.path().join("token"), "\n").unwrap();
        assert!(matches!(
            detect(&config, &env_of(IN_CLUSTER)),
            Err(KubernetesError::EmptyToken { .. })
        ));
    }
}
