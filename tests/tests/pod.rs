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
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    AgentGuard, MetricsClient, Sample, TempDir, agent_binary,
    cgroups::{Cgroups, cgroup2_mount},
    otlp_collector::{Collector, free_port, rotel_agent},
    parse_samples,
    pod::{NODE_NAME, POD_NAME, Pod, PodNetwork, WORKLOAD_UID, inside, node_user_name},
    process::run_bounded,
    program, require_root,
    servers::Prometheus,
    sha256_file, workspace_root,
};

const HOST_BYTES: u64 = 40_000;
const CONTAINER_BYTES: u64 = 70_000;

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

    let agent = agent_binary()?;
    let journal_dir = work.path().join("journal");
    fs::create_dir(&journal_dir)?;
    let journal = journal_dir.join("journal.db");
    let config = work.path().join("fleetsnitch.yaml");
    let mut args = vec![
        "--config.file".to_owned(),
        config.to_str().context("config path")?.to_owned(),
    ];
    let pod = Pod::prepare(work.path(), PodNetwork::create()?, &journal, &args)?;
    // The image's own file at the node program's path: hashing it instead of
    // the node's file would give the wrong sha256.
    let twin = inside(pod.image(), &app);
    fs::create_dir_all(twin.parent().context("twin directory")?)?;
    fs::write(&twin, b"#!/bin/sh\n# the image's own file at a node path\n")?;
    fs::set_permissions(&twin, fs::Permissions::from_mode(0o755))?;

    let host_ip = pod.network.host_ip().to_string();
    let collector_dir = TempDir::new("fsn-pod-collector")?;
    let grpc_port = free_port();
    let collector = Collector::start_on(
        &rotel,
        collector_dir.path(),
        "collector",
        &host_ip,
        grpc_port,
        free_port(),
    );
    fs::write(
        &config,
        format!(
            "journal:\n  write_interval: 1s\n\
             metrics:\n  bytes_labels: [user, sha256, container_id]\n\
             otlp:\n  enabled: true\n  protocol: grpc\n  endpoint: http://{host_ip}:{grpc_port}\n  batch_delay: 200ms\n",
        ),
    )?;
    args.extend(Pod::agent_args().map(str::to_owned));
    let wrapper: Vec<&str> = pod.wrapper().iter().map(String::as_str).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let addr = pod.addr();
    let mut agent = AgentGuard::start_wrapped(&wrapper, &agent, addr, Some(&journal), &args)?;

    Pod::ensure_runs(agent.pid())?;

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
    let mut cgroups = Cgroups::default();
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
    let metrics = agent.metrics();
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
            agent.log_tail(40)
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
            agent.log_tail(40)
        )
    })?;

    agent.check_running()?;
    drop(agent);
    drop(collector);
    drop(pod);
    Ok(())
}
