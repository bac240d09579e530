//! The API server's side: the bearer token, the list and watch requests,
//! and the task that keeps the index in step.

use std::{
    path::PathBuf,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::{
    InCluster, KubernetesConfig, KubernetesError, LIST_PAGE_SIZE, MAX_EVENT_BYTES, MAX_LIST_PAGES,
    ResolverCounters,
    index::PodIndex,
    read_token,
    wire::{Change, Pod, PodList, Status, decode_event},
};
use crate::support::{backoff::Backoff, error_chain};

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

pub(super) struct ApiClient {
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
    pub(super) fn new(
        cluster: &InCluster,
        config: &KubernetesConfig,
    ) -> Result<Self, KubernetesError> {
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
                counters.watch_events.inc();
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
pub(super) async fn run(
    client: ApiClient,
    index: PodIndex,
    counters: ResolverCounters,
    mut backoff: Backoff,
) {
    let mut health = Health { failing: false };
    let mut listed_once = false;
    loop {
        let (pods, mut resource_version) = match client.list().await {
            Ok(listed) => listed,
            Err(err) => {
                counters.list_errors.inc();
                let pause = backoff.next_delay();
                health.failed("listing the pods of this node", &err, pause);
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        counters.lists.inc();
        if listed_once {
            counters.relists.inc();
        }
        listed_once = true;
        index.replace_all(&pods);
        tracing::debug!(pods = pods.len(), %resource_version, "listed the pods of this node");
        drop(pods);
        backoff.reset();
        health.recovered();

        loop {
            counters.watches.inc();
            match client.watch(&mut resource_version, &index, &counters).await {
                Ok(WatchEnd::Gone) => {
                    tracing::debug!("watch expired (410 Gone): listing again");
                    break;
                }
                Ok(WatchEnd::Closed { events, lasted }) => {
                    health.recovered();
                    if events > 0 || lasted >= backoff.min() {
                        backoff.reset();
                    } else {
                        // A server that ends every watch at once: do not spin.
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
                Err(err) => {
                    counters.watch_errors.inc();
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
    fn encodes_query_values() {
        assert_eq!(
            percent_encode("spec.nodeName=node-a"),
            "spec.nodeName%3Dnode-a"
        );
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }
}
