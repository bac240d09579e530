//! Containers and pods on real traffic: cgroups named the way containerd,
//! CRI-O and Docker name them, a traffic generator in each, and a local HTTP
//! server speaking the Kubernetes pods API for the pod lookup: lists, watches
//! that expire (410 Gone) so that the agent lists again, and a service
//! account token that rotates. Needs root.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use fleetsnitch_e2e::{
    Testbed,
    cgroups::{Cgroups, cgroup2_mount},
    process, require_root, wait_until,
};

/// Runs `exe client loopback` inside `cgroup` (joined before it touches the network).
fn loopback_in(cgroup: &Path, exe: &Path, bytes: u64) -> Result<()> {
    let script = format!(
        "echo $$ > '{}/cgroup.procs' && exec '{}' client loopback --bytes {bytes}",
        cgroup.display(),
        exe.display()
    );
    let out = process::run_bounded(
        Command::new("/bin/sh").args(["-c", &script]),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "{}", out.stderr);
    Ok(())
}

/// A 64-hex-digit container id starting with `seed`.
fn hex_id(seed: char) -> String {
    let id: String = std::iter::repeat_n(seed, 8)
        .chain("0123456789abcdef".chars().cycle())
        .take(64)
        .collect();
    assert_eq!(id.len(), 64);
    id
}

/// What the stand-in API server answers, changed by the test as it goes.
struct ApiState {
    /// The bearer token accepted; others are answered 401.
    token: String,
    /// The next list: resource version and pods.
    list: (u64, Vec<serde_json::Value>),
    /// When set, the next watch is answered with an `ERROR` event of code 410
    /// (the resource version expired: the agent must list again), and the
    /// cluster moves on to this list meanwhile.
    expire_into: Option<(u64, Vec<serde_json::Value>)>,
    lists_served: usize,
    /// Every request: whether it was a watch, its `Authorization`, the status answered.
    requests: Vec<(bool, String, u16)>,
}

/// A pods API over HTTP/1.1, the way the API server answers: a `PodList` for
/// lists, and for watches a chunked stream of newline-delimited events that
/// ends (as the server ends watches after `timeoutSeconds`), here at once.
/// Errors are `Status` objects.
struct PodsApi {
    address: String,
    state: Arc<Mutex<ApiState>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PodsApi {
    fn start(state: ApiState) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, state) = (stop.clone(), state.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = answer(stream, &state);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Ok(Self {
            address,
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits up to 30 s for `done`.
    fn wait(&self, what: &str, done: impl Fn(&ApiState) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(&self.state()) {
            ensure!(
                Instant::now() < deadline,
                "timed out waiting for {what}; requests seen: {:?}",
                self.state().requests
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for PodsApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
}

/// A pod of node-a, its one container `name` with `container_id`.
fn pod_object(
    namespace: &str,
    name: &str,
    uid: &str,
    container: &str,
    container_id: &str,
) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "1"},
        "spec": {"nodeName": "node-a", "containers": [{"name": container}]},
        "status": {"containerStatuses": [{"name": container, "containerID": container_id, "image": "registry.example/app:1", "imageID": "", "ready": true, "restartCount": 0}]}
    })
}

fn answer(stream: TcpStream, state: &Mutex<ApiState>) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut authorization = String::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorization = value.trim().to_owned();
        }
    }
    let target = request.split_whitespace().nth(1).unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let watch = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    let (code, body, chunked) = if authorization != format!("Bearer {}", state.token) {
        (
            401,
            status(401, "Unauthorized", "Unauthorized").to_string(),
            false,
        )
    } else if path != "/api/v1/pods" || !query.contains("fieldSelector=spec.nodeName%3Dnode-a") {
        (
            400,
            status(400, "BadRequest", "unexpected request").to_string(),
            false,
        )
    } else if !watch {
        state.lists_served += 1;
        let (version, items) = &state.list;
        let list = serde_json::json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": version.to_string()}, "items": items,
        });
        (200, list.to_string(), false)
    } else if let Some(next) = state.expire_into.take() {
        state.list = next;
        let event = serde_json::json!({
            "type": "ERROR",
            "object": status(410, "Expired", "too old resource version: 100 (150)"),
        });
        (200, format!("{event}\n"), true)
    } else {
        (200, String::new(), true)
    };
    state.requests.push((watch, authorization, code));
    drop(state);
    let mut stream = reader.into_inner();
    let reason = match code {
        200 => "OK",
        401 => "Unauthorized",
        _ => "Bad Request",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nConnection: close\r\n"
    )?;
    if chunked {
        write!(stream, "Transfer-Encoding: chunked\r\n\r\n")?;
        if !body.is_empty() {
            write!(stream, "{:x}\r\n{body}\r\n", body.len())?;
        }
        write!(stream, "0\r\n\r\n")?;
    } else {
        write!(stream, "Content-Length: {}\r\n\r\n{body}", body.len())?;
    }
    Ok(())
}

/// `name`'s value on the agent's `/metrics` page (a sample without labels).
fn metric(bed: &Testbed, name: &str) -> Result<f64> {
    let text = bed.metrics().text()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no {name} on /metrics"))
}

#[test]
fn bytes_carry_the_container_id_of_each_runtime_and_the_pod_from_the_api() -> Result<()> {
    require_root!("eBPF, cgroups");
    let root = cgroup2_mount()?.join(format!("fsn-e2e-{}.slice", std::process::id()));
    let mut cgroups = Cgroups::default();
    let (containerd, crio, docker) = (hex_id('a'), hex_id('c'), hex_id('d'));
    let cases = [
        (
            "containerd",
            root.join("kubepods-burstable.slice/kubepods-burstable-pod0d9e4c1a_1111_2222_3333_444455556666.slice")
                .join(format!("cri-containerd-{containerd}.scope")),
            containerd.clone(),
        ),
        (
            "crio",
            root.join("kubepods-besteffort.slice/kubepods-besteffort-pod77aa.slice")
                .join(format!("crio-{crio}.scope")),
            crio.clone(),
        ),
        ("docker", root.join("system.slice").join(format!("docker-{docker}.scope")), docker.clone()),
    ];
    for (_, path, _) in &cases {
        cgroups.create(path)?;
    }

    let setup = Testbed::setup("fsn-containers")?;
    let token = setup.dir().join("token");
    fs::write(&token, "token-1\n")?;
    let web = pod_object(
        "shop",
        "web-7d4b9",
        "0d9e4c1a-1111-2222-3333-444455556666",
        "nginx",
        &format!("containerd://{containerd}"),
    );
    let db = pod_object(
        "data",
        "db-0",
        "77aa0000-1111-4222-8333-444455556666",
        "postgres",
        &format!("cri-o://{crio}"),
    );
    let legacy = pod_object(
        "default",
        "legacy-app",
        "d0c0e000-1111-4222-8333-444455556666",
        "app",
        &format!("docker://{docker}"),
    );
    // The first list has web only; the first watch is answered 410 Gone
    // while db came: the agent must list again to learn it.
    let api = PodsApi::start(ApiState {
        token: "token-1".to_owned(),
        list: (100, vec![web.clone()]),
        expire_into: Some((200, vec![web.clone(), db.clone()])),
        lists_served: 0,
        requests: Vec::new(),
    })?;
    // The periodic token re-read is an hour away: only the API server's
    // refusal of the old token can make the agent read the new one.
    let config = format!(
        "metrics:\n  bytes_labels: [container_id, container_name, pod, namespace]\n\
         kubernetes:\n  token_path: {}\n  ca_path: {}\n  api_url: {}\n  node_name: node-a\n  backoff_min: 100ms\n  backoff_max: 1s\n  token_reload_interval: 1h\n",
        token.display(),
        setup.dir().join("no-ca.crt").display(),
        api.address
    );
    let bed = setup.config(config).start()?;
    api.wait("the list after 410 Gone", |state| state.lists_served >= 2)?;

    // The token rotates the kubelet's way (a new file renamed over the old)
    // and the old one is refused from now on; the next watch expires too,
    // while legacy came: the third list must be made with the new token.
    let rotated = bed.dir().join("token.new");
    fs::write(&rotated, "token-2\n")?;
    fs::rename(&rotated, &token)?;
    {
        let mut state = api.state();
        state.token = "token-2".to_owned();
        state.expire_into = Some((300, vec![web, db, legacy]));
    }
    api.wait("the list with the rotated token", |state| {
        state.lists_served >= 3
    })?;

    let mut runs = Vec::new();
    for (runtime, path, id) in &cases {
        let exe = bed.copy("trafficgen", &format!("in-{runtime}"))?;
        loopback_in(path, &exe, 30_000)?;
        runs.push((runtime, exe, id));
    }
    let expected = [
        ("containerd", ("web-7d4b9", "shop", "nginx")),
        ("crio", ("db-0", "data", "postgres")),
        ("docker", ("legacy-app", "default", "app")),
    ];
    for ((runtime, exe, id), (_, (pod, namespace, container))) in runs.iter().zip(expected) {
        bed.metrics().wait_for_bytes(exe, "sent", 30_000)?;
        let sent = bed
            .metrics()
            .samples_for("fleetsnitch_bytes_total", exe, Some("sent"))?;
        ensure!(
            sent.len() == 1,
            "{runtime}: one series expected, got {sent:?}"
        );
        let labels = &sent[0].labels;
        let label = |name: &str| labels.get(name).map(String::as_str);
        assert_eq!(
            label("container_id"),
            Some(id.as_str()),
            "{runtime}: {labels:?}"
        );
        assert_eq!(label("pod"), Some(pod), "{runtime}: {labels:?}");
        assert_eq!(label("namespace"), Some(namespace), "{runtime}: {labels:?}");
        assert_eq!(
            label("container_name"),
            Some(container),
            "{runtime}: {labels:?}"
        );
        // Its first sighting (journaled at the next write) names the same
        // workload: the context the fleet alerts carry.
        let mut first_seen = Vec::new();
        wait_until(
            Duration::from_secs(30),
            &format!("{runtime}: the first sighting on /metrics"),
            || {
                first_seen = bed.metrics().samples_for(
                    "fleetsnitch_executable_first_seen_timestamp_seconds",
                    exe,
                    None,
                )?;
                Ok(!first_seen.is_empty())
            },
        )?;
        let labels = &first_seen[0].labels;
        let label = |name: &str| labels.get(name).map(String::as_str);
        assert_eq!(
            (
                label("container_id"),
                label("container_name"),
                label("pod"),
                label("namespace"),
                label("user")
            ),
            (
                Some(id.as_str()),
                Some(container),
                Some(pod),
                Some(namespace),
                Some("root")
            ),
            "{runtime}: first sighting {labels:?}"
        );
    }

    // Three lists, two of them relists after 410 Gone; one watch refused
    // (the old token), none failed otherwise, no list failed.
    assert_eq!(metric(&bed, "fleetsnitch_kubernetes_lists_total")?, 3.0);
    assert_eq!(metric(&bed, "fleetsnitch_kubernetes_relists_total")?, 2.0);
    assert_eq!(
        metric(&bed, "fleetsnitch_kubernetes_list_errors_total")?,
        0.0
    );
    assert_eq!(
        metric(&bed, "fleetsnitch_kubernetes_watch_errors_total")?,
        1.0
    );
    // The old token until it was refused once, the new one on every request since.
    let requests = api.state().requests.clone();
    let first_new = requests
        .iter()
        .position(|(_, auth, _)| auth == "Bearer token-2")
        .context("no request with the new token")?;
    let (before, after) = requests.split_at(first_new);
    let refused: Vec<_> = before.iter().filter(|(_, _, code)| *code == 401).collect();
    assert_eq!(refused.len(), 1, "one request refused: {requests:?}");
    assert_eq!(
        before.last().map(|(_, _, code)| *code),
        Some(401),
        "{requests:?}"
    );
    assert!(
        after
            .iter()
            .all(|(_, auth, code)| auth == "Bearer token-2" && *code == 200),
        "{requests:?}"
    );
    drop(bed);
    Ok(())
}
