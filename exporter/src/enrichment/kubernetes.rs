//! Pod attribution: which pod, namespace and container a container id is.
//!
//! When the agent runs in a Kubernetes pod (the service account token is
//! mounted and `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` are set),
//! [`PodResolver`] lists the pods of this node from the API server
//! (`GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`) and then watches
//! them from the list's resource version, the way client-go's reflector
//! does:
//!
//! - watch events (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`, `ERROR`) arrive
//!   as newline-delimited JSON and update the map as they come;
//! - a watch the server ends (it does after `timeoutSeconds`) is resumed from
//!   the last resource version seen, with no back-off;
//! - `410 Gone`, as an HTTP status or as an `ERROR` event, means the resource
//!   version is too old: the pods are listed again and the map replaced;
//! - any other failure (transport, TLS, HTTP 5xx, 401/403, malformed JSON) is
//!   counted, logged when the state changes from healthy to failing, and
//!   retried after an exponential back-off (`backoff_min` doubling up to
//!   `backoff_max`, 1 s .. 60 s by default, with jitter so that a fleet of
//!   agents does not retry in step).
//!
//! The map is keyed by container id, from `status.containerStatuses`,
//! `initContainerStatuses` and `ephemeralContainerStatuses`
//! (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`: the scheme is
//! dropped). Pods are also indexed by uid, and static pods by the uid the
//! kubelet runs them under (their `kubernetes.io/config.mirror` annotation),
//! so a process in a container not yet in the pod's status (or in the pod
//! sandbox, whose id is in no status) is still given its pod and namespace
//! from the pod uid of its cgroup path ([`crate::enrichment::containers::pod_uid_of`]).
//!
//! The bearer token is read again every `token_reload_interval` (bound
//! service account tokens are rotated by the kubelet); the CA bundle
//! `ca.crt` is the only trust root of the connection when present.
//!
//! Needs RBAC `get`, `list` and `watch` on `pods` (cluster-wide: the field
//! selector narrows to the node, not the permission).

use std::{
    collections::{HashMap, hash_map::RandomState},
    hash::{BuildHasher, Hasher},
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Deserialize;

/// Where the kubelet mounts the service account token.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Where the kubelet mounts the cluster's CA bundle.
pub const DEFAULT_CA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// Pods asked for in one list request; more come in further pages.
const LIST_PAGE_SIZE: u32 = 500;
/// Pages of one list before giving up (a node runs at most a few hundred pods).
const MAX_LIST_PAGES: usize = 100;
/// Longest watch event accepted (a pod object is a few KiB to a few hundred).
const MAX_EVENT_BYTES: usize = 16 << 20;
/// The annotation a mirror pod carries: the uid of the static pod it mirrors.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

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
    /// How often the token file is read again.
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
    #[error("invalid API server URL {0:?}")]
    BadUrl(String),
    #[error("the pod resolver needs a tokio runtime")]
    NoRuntime,
    #[error("HTTP client: {0}")]
    Client(String),
    #[error("HTTP status {status}: {message}")]
    Status { status: u16, message: String },
    #[error("resource version too old (410 Gone)")]
    Gone,
    #[error("request failed: {0}")]
    Transport(String),
    #[error("malformed answer: {0}")]
    Malformed(String),
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

fn read_token(path: &Path) -> Result<String, KubernetesError> {
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

/// What the resolver did, for the agent's self-metrics.
#[derive(Debug, Default)]
pub struct ResolverCounters {
    /// Successful lists (the first one included).
    pub lists: AtomicU64,
    /// Lists that failed.
    pub list_errors: AtomicU64,
    /// Lists after the first successful one (410 Gone).
    pub relists: AtomicU64,
    /// Watch requests made.
    pub watches: AtomicU64,
    /// Watches that failed (anything but a clean end or 410 Gone).
    pub watch_errors: AtomicU64,
    /// Watch events applied.
    pub watch_events: AtomicU64,
}

impl ResolverCounters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Index {
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
    fn remove_pod(&mut self, uid: &str) {
        if let Some(owned) = self.owned.remove(uid) {
            for id in owned.containers {
                self.by_container.remove(&id);
            }
            for uid in owned.uids {
                self.by_uid.remove(&uid);
            }
        }
    }

    fn upsert_pod(&mut self, pod: &Pod) {
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
        let statuses = pod
            .status
            .container_statuses
            .iter()
            .chain(&pod.status.init_container_statuses)
            .chain(&pod.status.ephemeral_container_statuses);
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
        if let Some(mirror) = pod.metadata.annotations.get(MIRROR_ANNOTATION) {
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

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn replace_all(&self, pods: &[Pod]) {
        let mut fresh = Index::default();
        for pod in pods {
            fresh.upsert_pod(pod);
        }
        *self.write() = fresh;
        self.synced.store(true, Ordering::Relaxed);
    }
}

/// Keeps the pods of this node, and the containers in them, up to date from
/// the API server, in a task of the tokio runtime it was started on. Dropping
/// it stops the task.
#[derive(Debug)]
pub struct PodResolver {
    index: PodIndex,
    counters: Arc<ResolverCounters>,
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
    /// warning). Must be called within a tokio runtime.
    pub fn spawn(config: &KubernetesConfig) -> Option<Self> {
        match Self::try_spawn(config, &|name| std::env::var(name).ok()) {
            Ok(resolver) => resolver,
            Err(err) => {
                tracing::warn!("pods will not be attributed: {err}");
                None
            }
        }
    }

    /// [`PodResolver::spawn`] with the environment given and the error
    /// returned.
    pub fn try_spawn(
        config: &KubernetesConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, KubernetesError> {
        match detect(config, env)? {
            Some(cluster) => Self::start(cluster, config).map(Some),
            None => {
                tracing::debug!("not running in Kubernetes: no pod attribution");
                Ok(None)
            }
        }
    }

    /// Starts listing and watching the pods of `cluster.node_name`.
    pub fn start(cluster: InCluster, config: &KubernetesConfig) -> Result<Self, KubernetesError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| KubernetesError::NoRuntime)?;
        let client = ApiClient::new(&cluster, config)?;
        let index = PodIndex::default();
        let counters = Arc::new(ResolverCounters::default());
        tracing::info!(
            api = %cluster.api_url,
            node = %cluster.node_name,
            "attributing containers to the pods of this node"
        );
        let task = runtime.spawn(run(
            client,
            index.clone(),
            counters.clone(),
            Backoff::new(config.backoff_min, config.backoff_max),
        ));
        Ok(Self {
            index,
            counters,
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

    pub fn counters(&self) -> &Arc<ResolverCounters> {
        &self.counters
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }
}

/// Exponential back-off with jitter: each pause is drawn from
/// `[max(min, 0.8 x current), current]`, `current` doubling from `min` to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    random: RandomState,
    draws: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Self {
            min,
            max,
            current: min,
            random: RandomState::new(),
            draws: 0,
        }
    }

    /// The next pause.
    pub fn next_delay(&mut self) -> Duration {
        let current = self.current;
        self.current = (current * 2).min(self.max);
        self.draws += 1;
        let mut hasher = self.random.build_hasher();
        hasher.write_u64(self.draws);
        let fraction = (hasher.finish() % 1001) as f64 / 1000.0;
        let low = current.mul_f64(0.8).max(self.min);
        low + (current - low).mul_f64(fraction)
    }

    /// After a success: the next pause is `min` again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

// The parts of the API objects that are read.

#[derive(Debug, Deserialize)]
struct PodList {
    #[serde(default)]
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default)]
    resource_version: String,
    #[serde(default, rename = "continue")]
    continue_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Pod {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatus {
    #[serde(default)]
    name: String,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

#[derive(Debug, Default, Deserialize)]
struct Status {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    message: String,
}

/// One decoded watch event.
#[derive(Debug)]
enum Change {
    Upsert(Pod),
    Delete(Pod),
    Bookmark(String),
    Gone,
    Error(Status),
    Ignored,
}

fn decode_event(line: &[u8]) -> Result<Change, KubernetesError> {
    let event: WatchEvent = serde_json::from_slice(line)
        .map_err(|err| KubernetesError::Malformed(format!("watch event: {err}")))?;
    let pod = |object| {
        serde_json::from_value::<Pod>(object)
            .map_err(|err| KubernetesError::Malformed(format!("{} pod: {err}", event.kind)))
    };
    Ok(match event.kind.as_str() {
        "ADDED" | "MODIFIED" => Change::Upsert(pod(event.object)?),
        "DELETED" => Change::Delete(pod(event.object)?),
        "BOOKMARK" => Change::Bookmark(
            pod(event.object)?
                .metadata
                .resource_version
                .unwrap_or_default(),
        ),
        "ERROR" => {
            let status: Status = serde_json::from_value(event.object).unwrap_or_default();
            if status.code == 410 {
                Change::Gone
            } else {
                Change::Error(status)
            }
        }
        _ => Change::Ignored,
    })
}

struct Token {
    path: PathBuf,
    reload_interval: Duration,
    cached: Mutex<(String, Instant)>,
}

impl Token {
    /// The token, read again when older than the reload interval; the last
    /// good one when the file cannot be read (it is swapped atomically, so
    /// that is rare and short).
    fn get(&self) -> String {
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.1.elapsed() >= self.reload_interval {
            match read_token(&self.path) {
                Ok(token) => *cached = (token, Instant::now()),
                Err(err) => tracing::debug!("keeping the previous token: {err}"),
            }
        }
        cached.0.clone()
    }
}

struct ApiClient {
    http: reqwest::Client,
    pods_url: String,
    token: Token,
    watch_timeout: Duration,
    request_timeout: Duration,
}

enum WatchEnd {
    /// The server ended the watch; resume from the last resource version.
    Closed { events: u64, lasted: Duration },
    /// 410 Gone: list again.
    Gone,
}

impl ApiClient {
    fn new(cluster: &InCluster, config: &KubernetesConfig) -> Result<Self, KubernetesError> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("fleetsnitch/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.request_timeout)
            // Every read of a watch: the server ends it after watch_timeout.
            .read_timeout(config.watch_timeout + config.request_timeout);
        if let Some(pem) = &cluster.ca_pem {
            let certificates = reqwest::Certificate::from_pem_bundle(pem).map_err(|err| {
                KubernetesError::BadCa {
                    path: config.ca_path.clone(),
                    reason: err.to_string(),
                }
            })?;
            if certificates.is_empty() {
                return Err(KubernetesError::BadCa {
                    path: config.ca_path.clone(),
                    reason: "no certificate in the file".to_owned(),
                });
            }
            builder = builder.tls_built_in_root_certs(false);
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
            .build()
            .map_err(|err| KubernetesError::Client(err.to_string()))?;
        let token = read_token(&cluster.token_path)?;
        Ok(Self {
            http,
            pods_url: format!(
                "{}/api/v1/pods?fieldSelector={}",
                cluster.api_url,
                percent_encode(&format!("spec.nodeName={}", cluster.node_name))
            ),
            token: Token {
                path: cluster.token_path.clone(),
                reload_interval: config.token_reload_interval,
                cached: Mutex::new((token, Instant::now())),
            },
            watch_timeout: config.watch_timeout.max(Duration::from_secs(1)),
            request_timeout: config.request_timeout,
        })
    }

    async fn get(
        &self,
        url: &str,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, KubernetesError> {
        let mut request = self.http.get(url).bearer_auth(self.token.get());
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let response = request
            .send()
            .await
            .map_err(|err| KubernetesError::Transport(error_chain(&err)))?;
        let status = response.status().as_u16();
        if status == 410 {
            return Err(KubernetesError::Gone);
        }
        if !(200..300).contains(&status) {
            let body = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Status>(&body)
                .map(|s| format!("{} {}", s.reason, s.message).trim().to_owned())
                .unwrap_or_else(|_| body.chars().take(200).collect());
            return Err(KubernetesError::Status { status, message });
        }
        Ok(response)
    }

    /// Every pod of the node, and the resource version to watch from.
    async fn list(&self) -> Result<(Vec<Pod>, String), KubernetesError> {
        let mut pods = Vec::new();
        let mut continue_token: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let mut url = format!("{}&limit={LIST_PAGE_SIZE}", self.pods_url);
            if let Some(token) = &continue_token {
                url.push_str("&continue=");
                url.push_str(&percent_encode(token));
            }
            let response = self.get(&url, Some(self.request_timeout)).await?;
            let body = response
                .bytes()
                .await
                .map_err(|err| KubernetesError::Transport(error_chain(&err)))?;
            let page: PodList = serde_json::from_slice(&body)
                .map_err(|err| KubernetesError::Malformed(format!("pod list: {err}")))?;
            pods.extend(page.items);
            match page.metadata.continue_token.filter(|t| !t.is_empty()) {
                Some(token) => continue_token = Some(token),
                None => return Ok((pods, page.metadata.resource_version)),
            }
        }
        Err(KubernetesError::Malformed(format!(
            "pod list longer than {MAX_LIST_PAGES} pages"
        )))
    }

    /// Watches from `resource_version`, applying each event to the index and
    /// advancing `resource_version`, until the server ends the watch.
    async fn watch(
        &self,
        resource_version: &mut String,
        index: &PodIndex,
        counters: &ResolverCounters,
    ) -> Result<WatchEnd, KubernetesError> {
        let started = Instant::now();
        let url = format!(
            "{}&watch=1&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds={}",
            self.pods_url,
            percent_encode(resource_version),
            self.watch_timeout.as_secs()
        );
        let mut response = match self.get(&url, None).await {
            Err(KubernetesError::Gone) => return Ok(WatchEnd::Gone),
            other => other?,
        };
        let mut buffer: Vec<u8> = Vec::new();
        let mut events = 0;
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|err| KubernetesError::Transport(error_chain(&err)))?;
            let Some(chunk) = chunk else {
                return Ok(WatchEnd::Closed {
                    events,
                    lasted: started.elapsed(),
                });
            };
            buffer.extend_from_slice(&chunk);
            while let Some(newline) = buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=newline).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                events += 1;
                match decode_event(line)? {
                    Change::Upsert(pod) => {
                        advance(resource_version, &pod);
                        index.write().upsert_pod(&pod);
                    }
                    Change::Delete(pod) => {
                        advance(resource_version, &pod);
                        if let Some(uid) = &pod.metadata.uid {
                            index.write().remove_pod(uid);
                        }
                    }
                    Change::Bookmark(version) => {
                        if !version.is_empty() {
                            *resource_version = version;
                        }
                    }
                    Change::Gone => return Ok(WatchEnd::Gone),
                    Change::Error(status) => {
                        return Err(KubernetesError::Status {
                            status: status.code,
                            message: format!("{} {}", status.reason, status.message)
                                .trim()
                                .to_owned(),
                        });
                    }
                    Change::Ignored => continue,
                }
                ResolverCounters::add(&counters.watch_events);
            }
            if buffer.len() > MAX_EVENT_BYTES {
                return Err(KubernetesError::Malformed(format!(
                    "watch event longer than {MAX_EVENT_BYTES} bytes"
                )));
            }
        }
    }
}

fn advance(resource_version: &mut String, pod: &Pod) {
    if let Some(version) = pod
        .metadata
        .resource_version
        .as_deref()
        .filter(|v| !v.is_empty())
    {
        *resource_version = version.to_owned();
    }
}

/// The error and its causes (reqwest's own message omits what failed below).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    for _ in 0..8 {
        let Some(cause) = source else { break };
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Logs a failure when the resolver goes from working to failing, and the
/// recovery, so that a long outage is one warning, not one per retry.
struct Health {
    failing: bool,
}

impl Health {
    fn failed(&mut self, what: &str, err: &KubernetesError, pause: Duration) {
        if self.failing {
            tracing::debug!("{what} failed again: {err}; retrying in {pause:?}");
        } else {
            tracing::warn!("{what} failed: {err}; retrying in {pause:?}");
            self.failing = true;
        }
    }

    fn recovered(&mut self) {
        if self.failing {
            tracing::info!("the Kubernetes API answers again");
            self.failing = false;
        }
    }
}

/// The resolver's task: list, then watch until told to list again. Runs
/// until the resolver is dropped; every wait in it is bounded (request
/// timeouts, the watch's timeoutSeconds, the back-off).
async fn run(
    client: ApiClient,
    index: PodIndex,
    counters: Arc<ResolverCounters>,
    mut backoff: Backoff,
) {
    let mut health = Health { failing: false };
    let mut listed_once = false;
    loop {
        let (pods, mut resource_version) = match client.list().await {
            Ok(listed) => listed,
            Err(err) => {
                ResolverCounters::add(&counters.list_errors);
                let pause = backoff.next_delay();
                health.failed("listing the pods of this node", &err, pause);
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        ResolverCounters::add(&counters.lists);
        if listed_once {
            ResolverCounters::add(&counters.relists);
        }
        listed_once = true;
        index.replace_all(&pods);
        tracing::debug!(pods = pods.len(), %resource_version, "listed the pods of this node");
        drop(pods);
        backoff.reset();
        health.recovered();

        loop {
            ResolverCounters::add(&counters.watches);
            match client.watch(&mut resource_version, &index, &counters).await {
                Ok(WatchEnd::Gone) => {
                    tracing::debug!("watch expired (410 Gone): listing again");
                    break;
                }
                Ok(WatchEnd::Closed { events, lasted }) => {
                    health.recovered();
                    if events > 0 || lasted >= backoff.min {
                        backoff.reset();
                    } else {
                        // A server that ends every watch at once: do not spin.
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
                Err(err) => {
                    ResolverCounters::add(&counters.watch_errors);
                    let pause = backoff.next_delay();
                    health.failed("watching the pods of this node", &err, pause);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn backoff_doubles_within_bounds_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        let mut backoff = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        let expected = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
        for (delay, ceiling) in delays.iter().zip(expected) {
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                *delay <= ceiling && *delay >= ceiling.mul_f64(0.8).max(min),
                "{delays:?}"
            );
        }
        backoff.reset();
        assert_eq!(backoff.next_delay(), min);
    }

    #[test]
    fn watch_events_decode() {
        let pod = r#"{"type":"MODIFIED","object":{"kind":"Pod","apiVersion":"v1",
            "metadata":{"name":"web-0","namespace":"shop","uid":"u1","resourceVersion":"42"},
            "spec":{"nodeName":"node-a"},
            "status":{"phase":"Running","containerStatuses":[{"name":"web","containerID":"containerd://ab","ready":true}]}}}"#;
        let Change::Upsert(pod) = decode_event(pod.as_bytes()).unwrap() else {
            panic!("not an upsert");
        };
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("42"));
        let bookmark = r#"{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"77","annotations":{"k8s.io/initial-events-end":"true"}},"spec":{"containers":null},"status":{}}}"#;
        assert!(
            matches!(decode_event(bookmark.as_bytes()).unwrap(), Change::Bookmark(v) if v == "77")
        );
        let gone = r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 1 (5)","reason":"Expired","code":410}}"#;
        assert!(matches!(
            decode_event(gone.as_bytes()).unwrap(),
            Change::Gone
        ));
        let other = r#"{"type":"ERROR","object":{"kind":"Status","code":500,"reason":"InternalError","message":"boom"}}"#;
        assert!(
            matches!(decode_event(other.as_bytes()).unwrap(), Change::Error(s) if s.code == 500)
        );
        assert!(decode_event(b"{not json").is_err());
    }

    #[test]
    fn index_replaces_a_pods_containers() {
        let index = PodIndex::default();
        let pod = |ids: &[&str]| Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("U1".into()),
                annotations: HashMap::from([(MIRROR_ANNOTATION.to_owned(), "abc".to_owned())]),
                ..ObjectMeta::default()
            },
            status: PodStatus {
                container_statuses: ids
                    .iter()
                    .map(|id| ContainerStatus {
                        name: format!("c-{id}"),
                        container_id: Some(format!("containerd://{id}")),
                    })
                    .collect(),
                ..PodStatus::default()
            },
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

    #[test]
    fn encodes_query_values() {
        assert_eq!(
            percent_encode("spec.nodeName=node-a"),
            "spec.nodeName%3Dnode-a"
        );
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }
}
