//! The pod resolver against a local server that speaks the Kubernetes pods
//! list/watch API (no API server can be reached from here): pod lists and
//! newline-delimited watch events shaped as the API server sends them,
//! `Status` objects for errors, `410 Gone` both as an HTTP status and as an
//! `ERROR` event, bearer tokens checked, and TLS with a cluster CA.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use fleetsnitch::{
    enrichment::kubernetes::{
        ApiHealth, InCluster, KubernetesConfig, PodRef, PodResolver, ResolverCounters,
    },
    model::{Event, EventKind, Failures, Outbox, Record},
};
use prometheus_client::{encoding::text::encode, metrics::counter::Counter, registry::Registry};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const NODE: &str = "node-a";
const WEB_UID: &str = "6f2c1a9e-8d47-4b1e-9f3a-2b5c7d8e9f01";
const DB_UID: &str = "0b9e8d7c-6a5f-4e3d-8c2b-1a0f9e8d7c6b";
const LEGACY_UID: &str = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d";
const NEW_UID: &str = "deadbeef-0000-4000-8000-000000000001";
const STATIC_UID: &str = "9e5c0d1b-aaaa-4bbb-8ccc-dddddddddddd";
const STATIC_HASH: &str = "3c1e5f0a9b8d7c6e5f4a3b2c1d0e9f8a";

fn id(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// One request the server received.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    watch: bool,
    raw_query: String,
    query: HashMap<String, String>,
    authorization: Option<String>,
}

#[derive(Default)]
struct Api {
    requests: Vec<Seen>,
    /// The bearer token accepted; others get 401.
    token: String,
    /// Statuses answered to the next lists before a good one.
    list_failures: VecDeque<u16>,
    /// Statuses answered to the next watches before a good one.
    watch_failures: VecDeque<u16>,
    pods: Vec<Value>,
    resource_version: u64,
    /// The open watch, if any: what is sent here is a line of its body.
    watch: Option<mpsc::UnboundedSender<String>>,
}

type Shared = Arc<Mutex<Api>>;

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn pods(
    State(api): State<Shared>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let raw_query = raw_query.unwrap_or_default();
    let query = parse_query(&raw_query);
    let mut api = api.lock().unwrap();
    let watch = query.get("watch").is_some_and(|w| w == "1" || w == "true");
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    api.requests.push(Seen {
        at: Instant::now(),
        watch,
        raw_query,
        query: query.clone(),
        authorization: authorization.clone(),
    });
    if authorization != Some(format!("Bearer {}", api.token)) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    if query.get("fieldSelector").map(String::as_str) != Some(&format!("spec.nodeName={NODE}")) {
        return status(400, "BadRequest", "unexpected field selector");
    }
    if !watch {
        if let Some(code) = api.list_failures.pop_front() {
            return status(code, "InternalError", "etcdserver: request timed out");
        }
        let list = json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": api.resource_version.to_string()},
            "items": api.pods,
        });
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            list.to_string(),
        )
            .into_response();
    }
    if let Some(code) = api.watch_failures.pop_front() {
        return if code == 410 {
            status(410, "Expired", "too old resource version: 1000 (2500)")
        } else {
            status(
                code,
                "InternalError",
                "an error on the server has prevented the request",
            )
        };
    }
    let (sender, receiver) = mpsc::unbounded_channel::<String>();
    api.watch = Some(sender);
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let line = receiver.recv().await?;
        Some((Ok::<_, Infallible>(format!("{line}\n")), receiver))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// `a=b&c=d%3De` as the API server decodes it.
fn parse_query(raw: &str) -> HashMap<String, String> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).expect("percent escape"));
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    }
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

fn router(api: Shared) -> Router {
    Router::new()
        .route("/api/v1/pods", get(pods))
        .with_state(api)
}

async fn start_server(api: Shared) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(api)).await.unwrap() });
    format!("http://{address}")
}

struct ContainerSpec<'a> {
    name: &'a str,
    /// `containerd://…`, `cri-o://…`, `docker://…`, or empty (waiting).
    container_id: String,
}

fn statuses(containers: &[ContainerSpec]) -> Value {
    Value::Array(
        containers
            .iter()
            .map(|c| {
                let mut status = json!({
                    "name": c.name,
                    "image": format!("registry.example/{}:1.0", c.name),
                    "imageID": format!("registry.example/{}@sha256:{}", c.name, id(0xee)),
                    "ready": true,
                    "restartCount": 0,
                    "started": true,
                    "state": {"running": {"startedAt": "2024-05-01T10:00:00Z"}},
                });
                if !c.container_id.is_empty() {
                    status["containerID"] = json!(c.container_id);
                } else {
                    status["state"] = json!({"waiting": {"reason": "ContainerCreating"}});
                    status["ready"] = json!(false);
                }
                status
            })
            .collect(),
    )
}

/// A pod object as the API server serialises it (the fields the resolver
/// does not read included, so that they are known to be ignored).
fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    resource_version: u64,
    containers: &[ContainerSpec],
    init: &[ContainerSpec],
    ephemeral: &[ContainerSpec],
) -> Value {
    let mut pod = json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": resource_version.to_string(),
            "creationTimestamp": "2024-05-01T09:59:58Z",
            "labels": {"app": name},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-7d9c"), "uid": "11111111-2222-4333-8444-555555555555", "controller": true}],
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}],
        },
        "spec": {
            "nodeName": NODE,
            "containers": containers.iter().map(|c| json!({"name": c.name, "image": format!("registry.example/{}:1.0", c.name)})).collect::<Vec<_>>(),
            "restartPolicy": "Always",
            "serviceAccountName": "default",
        },
        "status": {
            "phase": "Running",
            "hostIP": "10.0.0.5",
            "podIP": "10.244.1.7",
            "podIPs": [{"ip": "10.244.1.7"}],
            "qosClass": "Burstable",
            "startTime": "2024-05-01T09:59:58Z",
            "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2024-05-01T10:00:01Z"}],
            "containerStatuses": statuses(containers),
        },
    });
    if !init.is_empty() {
        pod["status"]["initContainerStatuses"] = statuses(init);
    }
    if !ephemeral.is_empty() {
        pod["status"]["ephemeralContainerStatuses"] = statuses(ephemeral);
    }
    pod
}

fn spec<'a>(name: &'a str, container_id: String) -> ContainerSpec<'a> {
    ContainerSpec { name, container_id }
}

fn web(resource_version: u64) -> Value {
    pod(
        "shop",
        "web-7d9c-x2x4z",
        WEB_UID,
        resource_version,
        &[
            spec("web", format!("containerd://{}", id(1))),
            spec("envoy", format!("containerd://{}", id(2))),
        ],
        &[spec("migrate", format!("containerd://{}", id(3)))],
        &[spec("debugger-abcde", format!("containerd://{}", id(4)))],
    )
}

fn db(resource_version: u64, with_sidecar: bool) -> Value {
    let mut containers = vec![spec("postgres", format!("cri-o://{}", id(5)))];
    if with_sidecar {
        containers.push(spec("exporter", format!("cri-o://{}", id(6))));
    } else {
        // Not started yet: no containerID.
        containers.push(spec("exporter", String::new()));
    }
    pod(
        "data",
        "db-0",
        DB_UID,
        resource_version,
        &containers,
        &[],
        &[],
    )
}

fn legacy(resource_version: u64) -> Value {
    pod(
        "default",
        "legacy-app",
        LEGACY_UID,
        resource_version,
        &[spec("app", format!("docker://{}", id(7)))],
        &[],
        &[],
    )
}

fn event(kind: &str, object: Value) -> String {
    json!({"type": kind, "object": object}).to_string()
}

struct Fixture {
    api: Shared,
    dir: tempfile::TempDir,
    config: KubernetesConfig,
}

async fn fixture(pods: Vec<Value>, resource_version: u64) -> Fixture {
    let api = Shared::new(Mutex::new(Api {
        token: "token-1".to_owned(),
        pods,
        resource_version,
        ..Api::default()
    }));
    let url = start_server(api.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "token-1\n").unwrap();
    let config = KubernetesConfig {
        token_path: dir.path().join("token"),
        ca_path: dir.path().join("ca.crt"),
        api_url: Some(url),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        token_reload_interval: Duration::ZERO,
        request_timeout: Duration::from_secs(5),
        ..KubernetesConfig::default()
    };
    Fixture { api, dir, config }
}

fn env(name: &str) -> Option<String> {
    (name == "NODE_NAME").then(|| NODE.to_owned())
}

fn spawn(fixture: &Fixture) -> PodResolver {
    spawn_reporting(fixture, ApiHealth::default())
}

fn spawn_reporting(fixture: &Fixture, health: ApiHealth) -> PodResolver {
    PodResolver::try_spawn(&fixture.config, &env, ResolverCounters::default(), health)
        .expect("resolver starts")
        .expect("in a cluster")
}

/// Failures journaled at once (no interval between a class's events), and
/// the queue their `agent_error` events go to.
fn journaled_failures() -> (Failures, std::sync::mpsc::Receiver<Record>) {
    let (outbox, records) = Outbox::bounded(100, Counter::default());
    (
        Failures::with_interval(Some(outbox), Duration::ZERO),
        records,
    )
}

/// The details of the `agent_error` events queued since the last call.
fn agent_errors(records: &std::sync::mpsc::Receiver<Record>) -> Vec<String> {
    records
        .try_iter()
        .filter_map(|record| match record {
            Record::Event(Event {
                kind: EventKind::AgentError,
                detail,
                ..
            }) => detail,
            _ => None,
        })
        .collect()
}

/// Polls `done` every 5 ms for up to 10 s.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn requests(api: &Shared) -> Vec<Seen> {
    api.lock().unwrap().requests.clone()
}

fn watch_open(api: &Shared) -> bool {
    api.lock()
        .unwrap()
        .watch
        .as_ref()
        .is_some_and(|w| !w.is_closed())
}

fn push(api: &Shared, line: String) {
    api.lock()
        .unwrap()
        .watch
        .as_ref()
        .expect("a watch is open")
        .send(line)
        .expect("the watch is still open");
}

fn pod_ref(namespace: &str, pod: &str, container: &str, uid: &str) -> Option<PodRef> {
    Some(PodRef {
        namespace: namespace.to_owned(),
        pod: pod.to_owned(),
        container: container.to_owned(),
        pod_uid: uid.to_owned(),
    })
}

#[tokio::test]
async fn list_then_watch_keeps_the_map() {
    let fixture = fixture(vec![web(990), db(995, false), legacy(999)], 1000).await;
    let api = fixture.api.clone();
    let resolver = spawn(&fixture);
    assert_eq!(resolver.node_name(), NODE);

    wait_until("the initial list", || resolver.index().synced()).await;
    // containerd, with init and ephemeral containers.
    assert_eq!(
        resolver.lookup(&id(1)),
        pod_ref("shop", "web-7d9c-x2x4z", "web", WEB_UID)
    );
    assert_eq!(
        resolver.lookup(&id(2)),
        pod_ref("shop", "web-7d9c-x2x4z", "envoy", WEB_UID)
    );
    assert_eq!(
        resolver.lookup(&id(3)),
        pod_ref("shop", "web-7d9c-x2x4z", "migrate", WEB_UID)
    );
    assert_eq!(
        resolver.lookup(&id(4)),
        pod_ref("shop", "web-7d9c-x2x4z", "debugger-abcde", WEB_UID)
    );
    // CRI-O and Docker.
    assert_eq!(
        resolver.lookup(&id(5)),
        pod_ref("data", "db-0", "postgres", DB_UID)
    );
    assert_eq!(
        resolver.lookup(&format!("docker://{}", id(7))),
        pod_ref("default", "legacy-app", "app", LEGACY_UID)
    );
    // A container not yet in the status: its pod is still known by uid.
    assert_eq!(resolver.lookup(&id(6)), None);
    let db_pod = resolver.lookup_pod(DB_UID).expect("db pod by uid");
    assert_eq!(
        (db_pod.namespace.as_str(), db_pod.pod.as_str()),
        ("data", "db-0")
    );

    // The list request: the node's pods only, with the token.
    let first = &requests(&api)[0];
    assert!(!first.watch);
    assert!(
        first
            .raw_query
            .contains(&format!("fieldSelector=spec.nodeName%3D{NODE}")),
        "{}",
        first.raw_query
    );
    assert_eq!(first.authorization.as_deref(), Some("Bearer token-1"));

    // Then a watch from the list's resource version.
    wait_until("the watch", || watch_open(&api)).await;
    let watch = requests(&api).into_iter().find(|r| r.watch).unwrap();
    assert_eq!(
        watch.query.get("resourceVersion").map(String::as_str),
        Some("1000")
    );
    assert_eq!(
        watch.query.get("fieldSelector").map(String::as_str),
        Some("spec.nodeName=node-a")
    );
    assert_eq!(watch.authorization.as_deref(), Some("Bearer token-1"));

    // MODIFIED: the sidecar started.
    push(&api, event("MODIFIED", db(1001, true)));
    wait_until("the sidecar", || resolver.lookup(&id(6)).is_some()).await;
    assert_eq!(
        resolver.lookup(&id(6)),
        pod_ref("data", "db-0", "exporter", DB_UID)
    );
    assert!(resolver.lookup(&id(5)).is_some());

    // DELETED: the pod and its containers are forgotten.
    push(&api, event("DELETED", legacy(1002)));
    wait_until("the deletion", || resolver.lookup(&id(7)).is_none()).await;
    assert_eq!(resolver.lookup_pod(LEGACY_UID), None);

    // ADDED: a new pod, and a static pod known by its kubelet uid too.
    push(
        &api,
        event(
            "ADDED",
            pod(
                "batch",
                "job-1-abcde",
                NEW_UID,
                1003,
                &[spec("job", format!("containerd://{}", id(8)))],
                &[],
                &[],
            ),
        ),
    );
    let mut static_pod = pod(
        "kube-system",
        "kube-apiserver-node-a",
        STATIC_UID,
        1004,
        &[spec("kube-apiserver", format!("containerd://{}", id(9)))],
        &[],
        &[],
    );
    static_pod["metadata"]["annotations"] = json!({
        "kubernetes.io/config.hash": STATIC_HASH,
        "kubernetes.io/config.mirror": STATIC_HASH,
        "kubernetes.io/config.source": "file",
    });
    push(&api, event("ADDED", static_pod));
    wait_until("the new pods", || resolver.lookup(&id(9)).is_some()).await;
    assert_eq!(
        resolver.lookup(&id(8)),
        pod_ref("batch", "job-1-abcde", "job", NEW_UID)
    );
    assert_eq!(
        resolver.lookup_pod(STATIC_HASH).map(|p| p.pod),
        Some("kube-apiserver-node-a".to_owned())
    );

    // A bookmark moves the resource version; the token rotates; the server
    // ends the watch: the next one resumes from the bookmark with the new token.
    push(
        &api,
        event(
            "BOOKMARK",
            json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "2000"}, "spec": {"containers": null}, "status": {}}),
        ),
    );
    let counters = resolver.counters().clone();
    assert_eq!(
        counters.watch_events.get(),
        4,
        "bookmarks are not pod events"
    );
    std::fs::write(fixture.dir.path().join("token"), "token-2\n").unwrap();
    {
        // The watch ends after the bookmark line it already carries.
        let mut api = api.lock().unwrap();
        api.token = "token-2".to_owned();
        api.watch = None;
    }
    wait_until("the second watch", || {
        requests(&api).iter().filter(|r| r.watch).count() >= 2
    })
    .await;
    let second = requests(&api)
        .into_iter()
        .filter(|r| r.watch)
        .nth(1)
        .unwrap();
    assert_eq!(
        second.query.get("resourceVersion").map(String::as_str),
        Some("2000")
    );
    assert_eq!(second.authorization.as_deref(), Some("Bearer token-2"));

    // One list, no errors.
    assert_eq!(counters.lists.get(), 1);
    assert_eq!(counters.relists.get(), 0);
    assert_eq!(counters.list_errors.get(), 0);
    assert_eq!(counters.watch_errors.get(), 0);
    assert_eq!(requests(&api).iter().filter(|r| !r.watch).count(), 1);
    drop(resolver);
}

#[tokio::test]
async fn server_errors_back_off_then_recover() {
    let mut fixture = fixture(vec![web(10)], 11).await;
    fixture.config.backoff_min = Duration::from_millis(100);
    fixture.config.backoff_max = Duration::from_millis(300);
    let api = fixture.api.clone();
    {
        let mut api = api.lock().unwrap();
        api.list_failures = VecDeque::from([500, 500, 503, 500, 500]);
        api.watch_failures = VecDeque::from([500, 503]);
    }
    let (failures, records) = journaled_failures();
    let resolver = spawn_reporting(&fixture, ApiHealth::new(failures));
    wait_until("recovery", || resolver.lookup(&id(1)).is_some()).await;
    wait_until("the watch", || watch_open(&api)).await;

    // One event when listing starts failing, one when a list works; the
    // same for the watch, whose recovery is the server accepting it (no
    // event came: a quiet node must not look down).
    let events = std::cell::RefCell::new(Vec::new());
    wait_until("four agent_error events", || {
        events.borrow_mut().extend(agent_errors(&records));
        events.borrow().len() >= 4
    })
    .await;
    let events = events.into_inner();
    let expected = [
        "kubernetes: failing: listing the pods of this node failed: ",
        "kubernetes: recovered after 5 failures",
        "kubernetes: failing: watching the pods of this node failed: ",
        "kubernetes: recovered after 2 failures",
    ];
    assert_eq!(events.len(), expected.len(), "{events:#?}");
    for (event, prefix) in events.iter().zip(expected) {
        assert!(
            event.starts_with(prefix),
            "expected {prefix:?}, saw {events:#?}"
        );
    }
    assert!(resolver.api_health().is_up(), "the watch was accepted");

    let seen = requests(&api);
    let lists: Vec<Instant> = seen.iter().filter(|r| !r.watch).map(|r| r.at).collect();
    assert_eq!(lists.len(), 6, "five failures then a success");
    let gaps: Vec<Duration> = lists.windows(2).map(|w| w[1] - w[0]).collect();
    // Pauses drawn from [0.8 x c, c], c = 100, 200, 300 (the bound), 300, 300 ms.
    let ceilings = [100, 200, 300, 300, 300];
    for (gap, ceiling) in gaps.iter().zip(ceilings) {
        let floor = Duration::from_millis(ceiling * 8 / 10);
        let roof = Duration::from_millis(ceiling + 250);
        assert!(*gap >= floor && *gap <= roof, "gaps {gaps:?}");
    }
    assert!(gaps[1] > gaps[0], "the pause grows: {gaps:?}");

    // The watch failed twice: back-off from the minimum again (a success
    // resets it), no relist.
    let watches: Vec<Instant> = seen.iter().filter(|r| r.watch).map(|r| r.at).collect();
    assert_eq!(watches.len(), 3);
    let first_pause = watches[1] - watches[0];
    assert!(
        first_pause >= Duration::from_millis(80) && first_pause <= Duration::from_millis(350),
        "{first_pause:?}"
    );

    let counters = resolver.counters();
    assert_eq!(counters.list_errors.get(), 5);
    assert_eq!(counters.watch_errors.get(), 2);
    assert_eq!(counters.lists.get(), 1);
    assert_eq!(counters.relists.get(), 0);

    // And the recovered watch works.
    push(&api, event("MODIFIED", db(12, true)));
    wait_until("an event after recovery", || {
        resolver.lookup(&id(6)).is_some()
    })
    .await;
    assert!(agent_errors(&records).is_empty(), "nothing failed since");
}

#[tokio::test]
async fn gone_triggers_a_relist() {
    let fixture = fixture(vec![web(90), db(95, false)], 100).await;
    let api = fixture.api.clone();
    let resolver = spawn(&fixture);
    wait_until("the watch", || watch_open(&api)).await;
    assert!(resolver.lookup(&id(5)).is_some());

    // The API server compacted past our resource version: meanwhile db went
    // away and legacy came.
    {
        let mut api = api.lock().unwrap();
        api.pods = vec![web(150), legacy(160)];
        api.resource_version = 200;
        // The watch after the relist is answered 410 too (as an HTTP status).
        api.watch_failures = VecDeque::from([410]);
    }
    push(
        &api,
        event(
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "too old resource version: 100 (180)", "reason": "Expired", "code": 410}),
        ),
    );
    let counters = resolver.counters().clone();
    wait_until("two relists", || counters.relists.get() >= 2).await;
    wait_until("a watch after the relists", || {
        requests(&api).iter().filter(|r| r.watch).count() >= 3 && watch_open(&api)
    })
    .await;

    assert_eq!(resolver.lookup(&id(5)), None, "db is gone after the relist");
    assert_eq!(resolver.lookup_pod(DB_UID), None);
    assert_eq!(
        resolver.lookup(&id(7)),
        pod_ref("default", "legacy-app", "app", LEGACY_UID)
    );
    assert!(resolver.lookup(&id(1)).is_some());

    let seen = requests(&api);
    assert_eq!(seen.iter().filter(|r| !r.watch).count(), 3);
    let last_watch = seen.iter().rfind(|r| r.watch).unwrap();
    assert_eq!(
        last_watch.query.get("resourceVersion").map(String::as_str),
        Some("200")
    );
    assert_eq!(counters.lists.get(), 3);
    assert_eq!(counters.relists.get(), 2);
    assert_eq!(counters.watch_errors.get(), 0);
    assert_eq!(counters.list_errors.get(), 0);
}

#[tokio::test]
async fn a_rejected_token_is_retried_until_it_rotates() {
    let fixture = fixture(vec![web(1)], 2).await;
    let api = fixture.api.clone();
    api.lock().unwrap().token = "token-2".to_owned();
    let resolver = spawn(&fixture);
    let counters = resolver.counters().clone();
    wait_until("401 answers", || counters.list_errors.get() >= 2).await;
    assert!(!resolver.index().synced());
    assert!(
        !resolver.api_health().is_up(),
        "a refused token is an outage"
    );
    std::fs::write(fixture.dir.path().join("token"), "token-2").unwrap();
    wait_until("the list with the new token", || resolver.index().synced()).await;
    assert!(resolver.lookup(&id(1)).is_some());
    wait_until("up again", || resolver.api_health().is_up()).await;
    let seen = requests(&api);
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer token-1"));
    assert_eq!(
        seen.last().unwrap().authorization.as_deref(),
        Some("Bearer token-2")
    );
}

/// The kubelet rotates a bound service account token by swapping the
/// projected volume's `..data` symlink, and the API server refuses the old
/// token once it expired. The refusal makes the resolver read the file again:
/// the next request carries the new token, although the periodic re-read is
/// an hour away, and the watch resumes where it was (no relist).
#[tokio::test]
async fn a_token_rotated_on_disk_is_read_again_when_the_old_one_is_refused() {
    use std::os::unix::fs::symlink;

    let mut fixture = fixture(vec![web(1)], 2).await;
    fixture.config.token_reload_interval = Duration::from_secs(3600);
    let dir = fixture.dir.path().to_owned();
    let volume = |name: &str, token: &str| {
        std::fs::create_dir(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("token"), token).unwrap();
    };
    std::fs::remove_file(dir.join("token")).unwrap();
    volume("..2024_05_01_10_00_00.1", "token-1\n");
    symlink("..2024_05_01_10_00_00.1", dir.join("..data")).unwrap();
    symlink("..data/token", dir.join("token")).unwrap();
    let api = fixture.api.clone();
    let resolver = spawn(&fixture);
    let counters = resolver.counters().clone();
    wait_until("the watch", || watch_open(&api)).await;

    volume("..2024_05_01_10_48_00.2", "token-2\n");
    symlink("..2024_05_01_10_48_00.2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    {
        // The old token expires; the server ends the watch.
        let mut api = api.lock().unwrap();
        api.token = "token-2".to_owned();
        api.watch = None;
    }
    wait_until("a watch with the new token", || {
        watch_open(&api)
            && requests(&api)
                .iter()
                .any(|r| r.authorization.as_deref() == Some("Bearer token-2"))
    })
    .await;
    let seen = requests(&api);
    let tokens: Vec<(bool, &str)> = seen
        .iter()
        .map(|r| (r.watch, r.authorization.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(
        tokens,
        [
            (false, "Bearer token-1"),
            (true, "Bearer token-1"),
            (true, "Bearer token-1"),
            (true, "Bearer token-2"),
        ],
        "list, watch, the refused watch, then the new token"
    );
    assert_eq!(
        seen[3].query.get("resourceVersion").map(String::as_str),
        Some("2"),
        "resumed, not listed again"
    );
    assert_eq!(counters.watch_errors.get(), 1, "the 401");
    assert_eq!(counters.lists.get(), 1);
    assert_eq!(counters.list_errors.get(), 0);

    // The watch with the new token works.
    push(&api, event("ADDED", db(3, true)));
    wait_until("an event after the rotation", || {
        resolver.lookup(&id(6)).is_some()
    })
    .await;
}

#[test]
fn outside_kubernetes_there_is_no_resolver() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let dir = tempfile::tempdir().unwrap();
    let config = KubernetesConfig {
        token_path: dir.path().join("token"),
        ca_path: dir.path().join("ca.crt"),
        ..KubernetesConfig::default()
    };
    // No token file: the counters are exported (at zero), the API's health
    // is not (no API to be down, no alert on a plain host).
    let mut registry = Registry::default();
    assert!(PodResolver::spawn(&config, &mut registry, Failures::none()).is_none());
    let exposition = exposition(&registry);
    assert!(
        exposition.contains("\nkubernetes_lists_total 0\n"),
        "{exposition}"
    );
    assert!(!exposition.contains("kubernetes_api_up"), "{exposition}");
    std::fs::write(dir.path().join("token"), "t").unwrap();
    // A token but no KUBERNETES_SERVICE_* variables.
    assert!(
        PodResolver::try_spawn(
            &config,
            &|_| None,
            ResolverCounters::default(),
            ApiHealth::default()
        )
        .unwrap()
        .is_none()
    );
}

fn exposition(registry: &Registry) -> String {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    text
}

#[test]
fn in_a_cluster_a_resolver_that_cannot_start_is_an_outage() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    std::fs::write(dir.path().join("ca.crt"), "not a certificate\n").unwrap();
    // In a cluster by configuration (no environment needed), with a CA
    // bundle that holds no certificate.
    let config = KubernetesConfig {
        token_path: dir.path().join("token"),
        ca_path: dir.path().join("ca.crt"),
        api_url: Some("https://127.0.0.1:1".to_owned()),
        node_name: Some(NODE.to_owned()),
        ..KubernetesConfig::default()
    };
    let (failures, records) = journaled_failures();
    let mut registry = Registry::default();
    assert!(PodResolver::spawn(&config, &mut registry, failures).is_none());
    let exposition = exposition(&registry);
    assert!(
        exposition.contains("\nkubernetes_api_up 0\n"),
        "{exposition}"
    );
    let events = agent_errors(&records);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].starts_with("kubernetes: failing: the pod resolver cannot start: ")
            && events[0].contains("ca.crt"),
        "{events:?}"
    );
}

// TLS: the API server's certificate is signed by the cluster CA in ca.crt.

struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, address)) = self.tcp.accept().await else {
                continue;
            };
            // Clients that reject the certificate end here.
            if let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(stream)).await
            {
                return (tls, address);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A CA, and a server certificate for 127.0.0.1 it signed: (CA PEM, server
/// certificate DER, server key DER).
fn cluster_pki() -> (String, Vec<u8>, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubernetes");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let mut server_params = rcgen::CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ])
    .unwrap();
    server_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();
    (ca.pem(), server.der().to_vec(), server_key.serialize_der())
}

async fn start_tls_server(api: Shared, certificate: Vec<u8>, key: Vec<u8>) -> SocketAddr {
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(certificate)],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    )
    .unwrap();
    let listener = TlsListener {
        tcp: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    };
    let address = axum::serve::Listener::local_addr(&listener).unwrap();
    tokio::spawn(async move { axum::serve(listener, router(api)).await.unwrap() });
    address
}

fn in_cluster_env(address: SocketAddr) -> impl Fn(&str) -> Option<String> {
    move |name| match name {
        "KUBERNETES_SERVICE_HOST" => Some(address.ip().to_string()),
        "KUBERNETES_SERVICE_PORT" => Some(address.port().to_string()),
        "NODE_NAME" => Some(NODE.to_owned()),
        _ => None,
    }
}

fn tls_config(dir: &Path) -> KubernetesConfig {
    KubernetesConfig {
        token_path: dir.join("token"),
        ca_path: dir.join("ca.crt"),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        request_timeout: Duration::from_secs(5),
        ..KubernetesConfig::default()
    }
}

#[tokio::test]
async fn in_cluster_over_tls_with_the_cluster_ca() {
    let (ca_pem, certificate, key) = cluster_pki();
    let api = Shared::new(Mutex::new(Api {
        token: "sa-token".to_owned(),
        pods: vec![web(5)],
        resource_version: 6,
        ..Api::default()
    }));
    let address = start_tls_server(api.clone(), certificate, key).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "sa-token").unwrap();
    std::fs::write(dir.path().join("ca.crt"), &ca_pem).unwrap();
    let config = tls_config(dir.path());

    // Detection from the service account mount and the environment.
    let resolver = PodResolver::try_spawn(
        &config,
        &in_cluster_env(address),
        ResolverCounters::default(),
        ApiHealth::default(),
    )
    .unwrap()
    .expect("in a cluster");
    wait_until("the list over TLS", || resolver.lookup(&id(1)).is_some()).await;
    wait_until("the watch over TLS", || watch_open(&api)).await;
    push(&api, event("MODIFIED", db(7, true)));
    wait_until("a watch event over TLS", || {
        resolver.lookup(&id(6)).is_some()
    })
    .await;
    assert_eq!(resolver.counters().list_errors.get(), 0);
}

#[tokio::test]
async fn a_server_the_cluster_ca_did_not_sign_is_refused() {
    let (_, certificate, key) = cluster_pki();
    let (other_ca_pem, _, _) = cluster_pki();
    let api = Shared::new(Mutex::new(Api {
        token: "sa-token".to_owned(),
        pods: vec![web(5)],
        resource_version: 6,
        ..Api::default()
    }));
    let address = start_tls_server(api.clone(), certificate, key).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "sa-token").unwrap();
    std::fs::write(dir.path().join("ca.crt"), &other_ca_pem).unwrap();
    let config = tls_config(dir.path());
    let cluster = InCluster {
        api_url: format!("https://{address}"),
        node_name: NODE.to_owned(),
        token_path: config.token_path.clone(),
        ca_pem: Some(other_ca_pem.into_bytes()),
    };
    let resolver = PodResolver::start(
        cluster,
        &config,
        ResolverCounters::default(),
        ApiHealth::default(),
    )
    .unwrap();
    let counters = resolver.counters().clone();
    wait_until("refused lists", || counters.list_errors.get() >= 2).await;
    assert!(!resolver.index().synced());
    assert!(requests(&api).is_empty(), "no request got through");
    assert_eq!(resolver.lookup(&id(1)), None);

    // A CA file that holds no certificate is refused at start.
    std::fs::write(dir.path().join("ca.crt"), "not a certificate\n").unwrap();
    let err = PodResolver::try_spawn(
        &config,
        &in_cluster_env(address),
        ResolverCounters::default(),
        ApiHealth::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("ca.crt"), "{err}");
}
