//! The task that keeps the index in step with the API server: kube-rs's
//! watcher on this node's pods, its events applied to the index, its errors
//! counted, logged and retried after a back-off.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    runtime::watcher::{self, Event},
};

use super::{
    ResolverCounters,
    health::ApiHealth,
    index::{Index, PodIndex},
};
use crate::support::backoff::Backoff;

/// Pods asked for in one list request; more come in further pages. Each
/// page is held parsed whole while it is applied: 100 rather than 500 keeps
/// the peak of a 1,000-pod list at 32 MB RSS instead of 52 MB (README).
const LIST_PAGE_SIZE: u32 = 100;

/// The watcher's configuration: the pods of `node`, each watch held open by
/// the server for `watch_timeout` (`timeoutSeconds`), bookmarks asked for.
pub(super) fn watcher_config(node: &str, watch_timeout: Duration) -> watcher::Config {
    let timeout = u32::try_from(watch_timeout.as_secs().max(1)).unwrap_or(u32::MAX);
    watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .timeout(timeout)
        .page_size(LIST_PAGE_SIZE)
}

/// What one watcher error means.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The list failed: retry after a back-off.
    List,
    /// A watch failed: retry after a back-off, from the same resource version.
    Watch,
    /// 410 Gone as an `ERROR` event: the watcher lists again by itself.
    Expired,
    /// 410 Gone as the HTTP status of a watch request: the watcher would ask
    /// again from the same, expired, resource version; a new watcher lists.
    ExpiredAtStart,
}

fn classify(err: &watcher::Error) -> Failure {
    match err {
        watcher::Error::InitialListFailed(_) | watcher::Error::NoResourceVersion => Failure::List,
        watcher::Error::WatchError(status) if status.code == 410 => Failure::Expired,
        watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410 => {
            Failure::ExpiredAtStart
        }
        watcher::Error::WatchStartFailed(_)
        | watcher::Error::WatchError(_)
        | watcher::Error::WatchFailed(_) => Failure::Watch,
    }
}

/// The resolver's task: lists, then watches, lists again after 410 Gone.
/// Runs until the resolver is dropped; every wait in it is bounded (request
/// and watch timeouts, the back-off).
pub(super) async fn run(
    api: Api<Pod>,
    config: watcher::Config,
    index: PodIndex,
    counters: ResolverCounters,
    health: ApiHealth,
    mut backoff: Backoff,
) {
    // The map being listed, put in place of the index when the list ends.
    let mut listing: Option<Index> = None;
    loop {
        let events = watcher::watcher(api.clone(), config.clone());
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Init) => listing = Some(Index::default()),
                Ok(Event::InitApply(pod)) => {
                    listing.get_or_insert_default().upsert_pod(&pod);
                }
                Ok(Event::InitDone) => {
                    let fresh = listing.take().unwrap_or_default();
                    let pods = fresh.pods();
                    index.replace(fresh);
                    if counters.lists.get() > 0 {
                        counters.relists.inc();
                    }
                    counters.lists.inc();
                    tracing::debug!(pods, "listed the pods of this node");
                    backoff.reset();
                    health.succeeded();
                }
                Ok(Event::Apply(pod)) => {
                    index.write().upsert_pod(&pod);
                    counters.watch_events.inc();
                    backoff.reset();
                    health.succeeded();
                }
                Ok(Event::Delete(pod)) => {
                    if let Some(uid) = &pod.metadata.uid {
                        index.write().remove_pod(uid);
                    }
                    counters.watch_events.inc();
                    backoff.reset();
                    health.succeeded();
                }
                Err(err) => match classify(&err) {
                    Failure::Expired => {
                        tracing::debug!("watch expired (410 Gone): listing again");
                    }
                    Failure::ExpiredAtStart => {
                        tracing::debug!("watch refused (410 Gone): listing again");
                        break;
                    }
                    failure => {
                        let (what, counter) = if failure == Failure::List {
                            ("listing the pods of this node", &counters.list_errors)
                        } else {
                            ("watching the pods of this node", &counters.watch_errors)
                        };
                        counter.inc();
                        let pause = backoff.next_delay();
                        health.failed(what, &err, pause);
                        // Not polled meanwhile: the watcher retries when polled.
                        tokio::time::sleep(pause).await;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    #[test]
    fn gone_is_told_apart_from_failures() {
        let status = |code| Status::failure("too old resource version", "Expired").with_code(code);
        let api = |code| kube::Error::Api(status(code).boxed());
        assert_eq!(
            classify(&watcher::Error::WatchError(status(410).boxed())),
            Failure::Expired
        );
        assert_eq!(
            classify(&watcher::Error::WatchStartFailed(api(410))),
            Failure::ExpiredAtStart
        );
        assert_eq!(
            classify(&watcher::Error::WatchError(status(500).boxed())),
            Failure::Watch
        );
        assert_eq!(
            classify(&watcher::Error::WatchStartFailed(api(401))),
            Failure::Watch
        );
        assert_eq!(
            classify(&watcher::Error::InitialListFailed(api(410))),
            Failure::List
        );
    }

    #[test]
    fn the_watch_asks_for_this_nodes_pods() {
        let config = watcher_config("node-a", Duration::from_secs(300));
        assert_eq!(
            config.field_selector.as_deref(),
            Some("spec.nodeName=node-a")
        );
        assert_eq!(config.timeout, Some(300));
        assert!(config.bookmarks);
    }
}
