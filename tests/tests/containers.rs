//! Containers and pods on real traffic: cgroups named the way containerd,
//! CRI-O and Docker name them, a traffic generator in each, and a local HTTP
//! server speaking the Kubernetes pods API for the pod lookup. Needs root.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use fleetsnitch_e2e::{Testbed, process, require_root};

/// The cgroup v2 mount (on hybrid hosts it is not /sys/fs/cgroup itself).
fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs_part) = line.split_once(" - ")?;
            (fs_part.split_whitespace().next()? == "cgroup2")
                .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount")
}

/// Cgroups created for one test, removed (deepest first) when dropped.
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    fn create(&mut self, path: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut at = path.to_path_buf();
        while !at.exists() {
            missing.push(at.clone());
            at = at.parent().context("cgroup root")?.to_path_buf();
        }
        for dir in missing.into_iter().rev() {
            fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            self.0.push(dir);
        }
        Ok(())
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            // The processes inside have exited; give the kernel a moment to agree.
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

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

/// A minimal pods API: the list names one pod whose container has `container_id`.
struct PodsApi {
    address: String,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PodsApi {
    fn start(container_id: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = format!("http://{}", listener.local_addr()?);
        let list = serde_json::json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": "100"},
            "items": [{
                "metadata": {"name": "web-7d4b9", "namespace": "shop", "uid": "0d9e4c1a-1111-2222-3333-444455556666"},
                "spec": {"nodeName": "node-a", "containers": [{"name": "nginx"}]},
                "status": {"containerStatuses": [{"name": "nginx", "containerID": format!("containerd://{container_id}")}]}
            }]
        })
        .to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = answer(stream, &list);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Ok(Self {
            address,
            stop,
            thread: Some(thread),
        })
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

/// Lists get the pod list; watches get an empty, closed stream (the resolver re-watches).
fn answer(stream: TcpStream, list: &str) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let body = if request.contains("watch=") { "" } else { list };
    let mut stream = reader.into_inner();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

#[test]
fn bytes_carry_the_container_id_of_each_runtime_and_the_pod_from_the_api() -> Result<()> {
    require_root!("eBPF, cgroups");
    let root = cgroup2_mount()?.join(format!("fsn-e2e-{}.slice", std::process::id()));
    let mut cgroups = Cgroups(Vec::new());
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
    fs::write(&token, "test-token\n")?;
    let api = PodsApi::start(&containerd)?;
    let config = format!(
        "metrics:\n  bytes_labels: [container_id, container_name, pod, namespace]\n\
         kubernetes:\n  token_path: {}\n  ca_path: {}\n  api_url: {}\n  node_name: node-a\n  backoff_min: 100ms\n  backoff_max: 1s\n",
        token.display(),
        setup.dir().join("no-ca.crt").display(),
        api.address
    );
    let bed = setup.config(config).start()?;

    let mut runs = Vec::new();
    for (runtime, path, id) in &cases {
        let exe = bed.copy("trafficgen", &format!("in-{runtime}"))?;
        loopback_in(path, &exe, 30_000)?;
        runs.push((runtime, exe, id));
    }
    for (runtime, exe, id) in &runs {
        bed.metrics().wait_for_bytes(exe, "sent", 30_000)?;
        let sent = bed
            .metrics()
            .samples_for("fleetsnitch_bytes_total", exe, Some("sent"))?;
        ensure!(
            sent.len() == 1,
            "{runtime}: one series expected, got {sent:?}"
        );
        let labels = &sent[0].labels;
        assert_eq!(
            labels.get("container_id"),
            Some(*id),
            "{runtime}: {labels:?}"
        );
        if **runtime == "containerd" {
            assert_eq!(
                labels.get("pod").map(String::as_str),
                Some("web-7d4b9"),
                "{labels:?}"
            );
            assert_eq!(
                labels.get("namespace").map(String::as_str),
                Some("shop"),
                "{labels:?}"
            );
            assert_eq!(
                labels.get("container_name").map(String::as_str),
                Some("nginx"),
                "{labels:?}"
            );
        } else {
            assert_eq!(
                labels.get("pod").map(String::as_str),
                Some(""),
                "{runtime}: {labels:?}"
            );
        }
    }
    drop(bed);
    Ok(())
}
