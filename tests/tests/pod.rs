//! The agent as the chart's DaemonSet runs it: in a pod of its own.
//!
//! `podrun` (src/bin/podrun.rs) starts the agent as a container runtime
//! starts the chart's pod: its own network, mount, UTS and cgroup namespaces,
//! the host's PID namespace, a read-only root that is the image (the runtime
//! stage of docker/Dockerfile: the agent at /usr/local/bin, the C library, an
//! /etc of its own), the chart's hostPath volumes (bpffs, BTF, the cgroup
//! tree, tracefs, the journal directory, the node's `/` at `/host`), the
//! chart's capability set (read from the chart's values.yaml), `NODE_NAME`
//! set and the pod's name as host name. The image's `/etc/passwd` names the
//! workload's uid differently from the node's, and the image holds its own
//! file at the host program's path: an agent that looked at its own files
//! instead of the node's gets names and hashes wrong.
//!
//! Workloads run on the host (as an unprivileged user) and in a second
//! "container" (a mount namespace of its own whose file at the host
//! program's path is another build, in a containerd-named cgroup). A real
//! Prometheus scrapes the pod with the shipped rules; a real OTLP collector
//! receives its records.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    AgentGuard, MetricsClient, Sample, TempDir, agent_binary,
    otlp_collector::{Collector, free_port, rotel_agent},
    parse_samples,
    process::{ip_bin, run_bounded, run_checked},
    program, require_root,
    servers::Prometheus,
    sha256_file, workspace_root,
};

/// What `spec.nodeName` hands the pod through the downward API.
const NODE_NAME: &str = "node-fsn-e2e";
/// The pod's name: its host name.
const POD_NAME: &str = "fleetsnitch-x7k2p";
/// The uid the host workload runs as; the image's passwd calls it `imposter`.
const WORKLOAD_UID: u32 = 65534;
const HOST_BYTES: u64 = 40_000;
const CONTAINER_BYTES: u64 = 70_000;
const METRICS_PORT: u16 = 9941;

/// The pod's network namespace, joined to the host by a veth pair
/// (host 198.18.77.1/30, pod 198.18.77.2/30); deleted on drop.
struct PodNetwork {
    ns: String,
}

impl PodNetwork {
    const HOST_IP: &str = "198.18.77.1";
    const POD_IP: &str = "198.18.77.2";

    fn create() -> Result<Self> {
        let pid = std::process::id();
        let ns = format!("fsn-pod-{pid}");
        let host_end = format!("fsnpod{}", pid % 100_000);
        let ip = ip_bin();
        if Path::new("/var/run/netns").join(&ns).exists() {
            let _ = run_checked(&ip, &["netns", "del", &ns]);
        }
        run_checked(&ip, &["netns", "add", &ns])?;
        let network = Self { ns };
        let ns = network.ns.as_str();
        let host_cidr = format!("{}/30", Self::HOST_IP);
        let pod_cidr = format!("{}/30", Self::POD_IP);
        for args in [
            vec![
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
            vec!["addr", "add", &host_cidr, "dev", &host_end],
            vec!["link", "set", &host_end, "up"],
            vec!["-n", ns, "addr", "add", &pod_cidr, "dev", "eth0"],
            vec!["-n", ns, "link", "set", "eth0", "up"],
            vec!["-n", ns, "link", "set", "lo", "up"],
        ] {
            run_checked(&ip, &args)?;
        }
        Ok(network)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        // Removes the pod's end of the veth pair, and with it the host's.
        if let Err(error) = run_checked(&ip_bin(), &["netns", "del", &self.ns]) {
            eprintln!("pod: cleanup: {error:#}");
        }
    }
}

/// Cgroups made for the test, removed (deepest first) on drop.
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
            // The processes moved in have exited: wait for the kernel to let go.
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .context("no cgroup2 mount")
}

/// The capabilities the chart adds (`capabilities` in values.yaml).
fn chart_capabilities() -> Result<Vec<String>> {
    let path = workspace_root().join("helm/fleetsnitch/values.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut lines = text.lines().skip_while(|line| *line != "capabilities:");
    lines.next().context("no `capabilities:` in values.yaml")?;
    let caps: Vec<String> = lines
        .map_while(|line| line.strip_prefix("  - "))
        .map(|cap| cap.trim().to_owned())
        .collect();
    ensure!(
        !caps.is_empty(),
        "no capabilities listed in {}",
        path.display()
    );
    Ok(caps)
}

/// The node's name for `uid` (its /etc/passwd, through the C library).
fn node_user_name(uid: u32) -> Result<String> {
    let out = run_bounded(
        Command::new("getent").args(["passwd", &uid.to_string()]),
        Duration::from_secs(10),
    )?;
    ensure!(out.status.success(), "getent passwd {uid}: {}", out.stderr);
    Ok(out.stdout.split(':').next().unwrap_or_default().to_owned())
}

/// The image: the agent, the shared objects it loads, an /etc of its own
/// (whose passwd names `WORKLOAD_UID` `imposter`), the chart's mount points,
/// and a file of its own at `twin_path`, a path the node also has.
fn build_image(root: &Path, agent: &Path, twin_path: &Path) -> Result<()> {
    for dir in [
        "proc",
        "sys",
        "dev",
        "tmp",
        "host",
        "etc/fleetsnitch",
        "var/lib/fleetsnitch",
        "usr/local/bin",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    let inside = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));
    let image_agent = root.join("usr/local/bin/fleetsnitch");
    fs::copy(agent, &image_agent)?;
    fs::set_permissions(&image_agent, fs::Permissions::from_mode(0o755))?;
    let ldd = run_bounded(Command::new("ldd").arg(agent), Duration::from_secs(30))?;
    ensure!(
        ldd.status.success(),
        "ldd {}: {}",
        agent.display(),
        ldd.stderr
    );
    for line in ldd.stdout.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let object = line
            .split_once("=>")
            .map_or(line, |(_, right)| right)
            .split_whitespace()
            .next()
            .unwrap_or_default();
        if object.starts_with('/') {
            let target = inside(Path::new(object));
            fs::create_dir_all(target.parent().context("library directory")?)?;
            fs::copy(object, &target).with_context(|| format!("copy {object}"))?;
        }
    }
    fs::write(
        root.join("etc/passwd"),
        format!(
            "root:x:0:0:root:/root:/bin/sh\nimposter:x:{WORKLOAD_UID}:{WORKLOAD_UID}:the image's, not the node's:/:/usr/sbin/nologin\n"
        ),
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    fs::write(
        root.join("etc/nsswitch.conf"),
        "passwd: files\ngroup: files\n",
    )?;
    fs::write(root.join("etc/hostname"), format!("{POD_NAME}\n"))?;
    fs::write(root.join("etc/fleetsnitch/fleetsnitch.yaml"), "")?;
    let twin = inside(twin_path);
    fs::create_dir_all(twin.parent().context("twin directory")?)?;
    fs::write(&twin, b"#!/bin/sh\n# the image's own file at a node path\n")?;
    fs::set_permissions(&twin, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Polls `done` every 250 ms for up to `bound`; the error names `what`.
fn wait_until(what: &str, bound: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + bound;
    let mut last_error = None;
    loop {
        match done() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() > deadline {
            bail!("{what} not within {bound:?} (last error: {last_error:?})");
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// `fleetsnitch_bytes_total` of `exe` summed by (sha256, direction, user, container_id).
fn bytes_by_version(
    metrics: &MetricsClient,
    exe: &Path,
) -> Result<BTreeMap<(String, String, String, String), f64>> {
    let samples: Vec<Sample> = parse_samples(&metrics.text()?, "fleetsnitch_bytes_total")?;
    let mut sums = BTreeMap::new();
    for sample in samples
        .iter()
        .filter(|s| s.labels.get("exe").map(String::as_str) == exe.to_str())
    {
        let label = |name: &str| sample.labels.get(name).cloned().unwrap_or_default();
        *sums
            .entry((
                label("sha256"),
                label("direction"),
                label("user"),
                label("container_id"),
            ))
            .or_insert(0.0) += sample.value;
    }
    Ok(sums)
}

#[test]
fn in_the_charts_pod_programs_users_and_the_node_are_the_nodes() -> Result<()> {
    require_root!("eBPF, namespaces, cgroups");
    let Some(rotel) = rotel_agent() else {
        return Ok(());
    };
    // Programs where an unprivileged user can run them.
    let work = TempDir::new("fsn-pod")?;
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755))?;
    let trafficgen = program("trafficgen")?;
    let app = work.path().join("app");
    fleetsnitch_e2e::filesystems::copy_executable(&trafficgen, &app, "\0host build")?;
    let container_build = work.path().join("app-container-build");
    fleetsnitch_e2e::filesystems::copy_executable(
        &trafficgen,
        &container_build,
        "\0container build",
    )?;
    for file in [&app, &container_build] {
        fs::set_permissions(file, fs::Permissions::from_mode(0o755))?;
    }
    let (host_sha, container_sha) = (sha256_file(&app)?, sha256_file(&container_build)?);

    let image = work.path().join("image");
    let agent = agent_binary()?;
    build_image(&image, &agent, &app)?;
    let journal_dir = work.path().join("journal");
    fs::create_dir(&journal_dir)?;
    let journal = journal_dir.join("journal.db");

    let network = PodNetwork::create()?;
    let collector_dir = TempDir::new("fsn-pod-collector")?;
    let grpc_port = free_port();
    let collector = Collector::start_on(
        &rotel,
        collector_dir.path(),
        "collector",
        PodNetwork::HOST_IP,
        grpc_port,
        free_port(),
    );
    let config = work.path().join("fleetsnitch.yaml");
    fs::write(
        &config,
        format!(
            "journal:\n  write_interval: 1s\n\
             metrics:\n  bytes_labels: [user, sha256, container_id]\n\
             otlp:\n  enabled: true\n  protocol: grpc\n  endpoint: http://{}:{grpc_port}\n  batch_delay: 200ms\n",
            PodNetwork::HOST_IP
        ),
    )?;

    let podrun = program("podrun")?;
    let podrun = podrun.to_str().context("podrun path")?;
    let image_arg = image.to_str().context("image path")?.to_owned();
    let mut wrapper: Vec<String> = [
        podrun,
        "--root",
        &image_arg,
        "--hostname",
        POD_NAME,
        "--netns",
        &network.ns,
    ]
    .map(str::to_owned)
    .to_vec();
    let binds = [
        format!("{}:/var/lib/fleetsnitch", journal_dir.display()),
        format!("{}:/etc/fleetsnitch/fleetsnitch.yaml:ro", config.display()),
        "/sys/fs/bpf:/sys/fs/bpf".to_owned(),
        "/sys/kernel/btf:/sys/kernel/btf:ro".to_owned(),
        format!("{}:/sys/fs/cgroup:ro", cgroup2_mount()?.display()),
        "/sys/kernel/tracing:/sys/kernel/tracing".to_owned(),
        "/:/host:ro".to_owned(),
    ];
    for bind in binds {
        wrapper.extend(["--bind".to_owned(), bind]);
    }
    for cap in chart_capabilities()? {
        wrapper.extend(["--cap".to_owned(), cap]);
    }
    wrapper.extend([
        "--env".to_owned(),
        format!("NODE_NAME={NODE_NAME}"),
        "--arg-map".to_owned(),
        format!("{}=/var/lib/fleetsnitch/journal.db", journal.display()),
        "--arg-map".to_owned(),
        format!("{}=/etc/fleetsnitch/fleetsnitch.yaml", config.display()),
        "--".to_owned(),
        "/usr/local/bin/fleetsnitch".to_owned(),
    ]);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let addr: SocketAddr = format!("{}:{METRICS_PORT}", PodNetwork::POD_IP).parse()?;
    let config_arg = config.to_str().context("config path")?;
    let mut pod = AgentGuard::start_wrapped(
        &wrapper,
        &agent,
        addr,
        Some(&journal),
        &["--config.file", config_arg, "--path.rootfs", "/host"],
    )?;

    // It really is in a pod: its own mount, UTS and network namespaces, the
    // host's PID namespace, a read-only root.
    let pid = pod.pid();
    for ns in ["mnt", "uts", "net", "cgroup"] {
        ensure!(
            fs::read_link(format!("/proc/{pid}/ns/{ns}"))?
                != fs::read_link(format!("/proc/self/ns/{ns}"))?,
            "the agent shares the test's {ns} namespace"
        );
    }
    ensure!(
        fs::read_link(format!("/proc/{pid}/ns/pid"))? == fs::read_link("/proc/self/ns/pid")?,
        "the agent is not in the host's PID namespace"
    );
    let agent_mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let root_line = agent_mounts
        .lines()
        .find(|line| line.split_whitespace().nth(4) == Some("/"))
        .context("no root mount in the agent's mountinfo")?;
    ensure!(
        root_line
            .split_whitespace()
            .nth(5)
            .is_some_and(|options| options.split(',').any(|o| o == "ro")),
        "the agent's root is not read-only: {root_line}"
    );

    // The host program, as the node's unprivileged user.
    let out = run_bounded(
        Command::new("setpriv")
            .args([
                &format!("--reuid={WORKLOAD_UID}"),
                &format!("--regid={WORKLOAD_UID}"),
                "--clear-groups",
            ])
            .arg(&app)
            .args(["client", "loopback", "--bytes", &HOST_BYTES.to_string()]),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "host program: {}", out.stderr);

    // The container: its own file at the same path, in a containerd cgroup.
    let container_id: String = std::iter::repeat_n('c', 8)
        .chain("0123456789abcdef".chars().cycle())
        .take(64)
        .collect();
    let mut cgroups = Cgroups(Vec::new());
    let cgroup = cgroup2_mount()?
        .join(format!("fsn-pod-{}.slice", std::process::id()))
        .join("kubepods-besteffort.slice/kubepods-besteffort-pod1a2b.slice")
        .join(format!("cri-containerd-{container_id}.scope"));
    cgroups.create(&cgroup)?;
    let script = format!(
        "mount --bind '{build}' '{app}' && echo $$ > '{cgroup}/cgroup.procs' && \
         exec '{app}' client loopback --bytes {CONTAINER_BYTES} --linger 3",
        build = container_build.display(),
        app = app.display(),
        cgroup = cgroup.display()
    );
    let out = run_bounded(
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "container program: {}", out.stderr);

    // Bytes per build, user and container, exactly.
    let node_user = node_user_name(WORKLOAD_UID)?;
    let mut expected = BTreeMap::new();
    for direction in ["sent", "received"] {
        expected.insert(
            (
                host_sha.clone(),
                direction.to_owned(),
                node_user.clone(),
                String::new(),
            ),
            HOST_BYTES as f64,
        );
        expected.insert(
            (
                container_sha.clone(),
                direction.to_owned(),
                "root".to_owned(),
                container_id.clone(),
            ),
            CONTAINER_BYTES as f64,
        );
    }
    let metrics = pod.metrics();
    let mut seen = BTreeMap::new();
    let settled = wait_until(
        "bytes per build, user and container",
        Duration::from_secs(30),
        || {
            seen = bytes_by_version(&metrics, &app)?;
            Ok(seen == expected)
        },
    );
    if settled.is_err() {
        bail!(
            "{} in the pod, by (sha256, direction, user, container_id):\nexpected {expected:#?}\nseen {seen:#?}\nagent log:\n{}",
            app.display(),
            pod.log_tail(40)
        );
    }

    // The records name the node, not the pod, and the node's user.
    let path = app.to_str().context("app path")?;
    let mut records = Vec::new();
    wait_until(
        "OTLP records of both builds",
        Duration::from_secs(30),
        || {
            records = collector.records();
            let of_build = |sha: &str| {
                records.iter().any(|r| {
                    r.event_name.as_deref() == Some("fleetsnitch.connection")
                        && r.str("process.executable.path") == Some(path)
                        && r.str("fleetsnitch.executable.sha256") == Some(sha)
                })
            };
            Ok(of_build(&host_sha) && of_build(&container_sha))
        },
    )
    .with_context(|| format!("collector output:\n{}", collector.output()))?;
    for record in records
        .iter()
        .filter(|r| r.str("process.executable.path") == Some(path))
    {
        ensure!(
            record.resource_str("host.name") == Some(NODE_NAME)
                && record.resource_str("k8s.node.name") == Some(NODE_NAME),
            "host.name and k8s.node.name must be the node ({NODE_NAME}), not the pod ({POD_NAME}): {record:?}"
        );
        if record.event_name.as_deref() != Some("fleetsnitch.connection") {
            continue;
        }
        if record.str("fleetsnitch.executable.sha256") == Some(host_sha.as_str()) {
            ensure!(
                record.str("process.real_user.name") == Some(node_user.as_str()),
                "the node's name of uid {WORKLOAD_UID} is {node_user}: {record:?}"
            );
        } else {
            ensure!(
                record.str("container.id") == Some(container_id.as_str()),
                "the container's record: {record:?}"
            );
        }
    }

    // A real Prometheus scrapes the pod with the shipped rules: the node's
    // program modified in place is noticed (through /host) and alerted.
    let rules = workspace_root().join("helm/fleetsnitch/rules/fleetsnitch.rules.yml");
    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: fleetsnitch\n    static_configs:\n      - targets: ['{addr}']\n",
        rules.display()
    ))?;
    fs::OpenOptions::new()
        .append(true)
        .open(&app)?
        .write_all(b"\0modified in place")?;
    let modified_sha = sha256_file(&app)?;
    let alert = format!(
        "ALERTS{{alertname=\"FleetsnitchExecutableModified\",alertstate=\"firing\",exe=\"{path}\",sha256=\"{modified_sha}\"}}"
    );
    wait_until(
        "FleetsnitchExecutableModified for the node's file",
        Duration::from_secs(60),
        || Ok(!prometheus.query(&alert)?.is_empty()),
    )
    .with_context(|| {
        format!(
            "ALERTS: {:?}\nagent log:\n{}",
            prometheus.query("ALERTS"),
            pod.log_tail(40)
        )
    })?;

    pod.check_running()?;
    drop(pod);
    drop(collector);
    drop(network);
    Ok(())
}
