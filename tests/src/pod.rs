//! The chart's DaemonSet pod, without a container runtime: what a test needs
//! to start the agent the way Kubernetes starts it (see `src/bin/podrun.rs`).
//!
//! - [`PodNetwork`]: the pod's network namespace, joined to the host by a
//!   veth pair, a /30 of its own per pod (several pods may run at once);
//! - [`build_image`]: the image's root file system (the agent, the shared
//!   objects it loads, an `/etc` of its own whose passwd names
//!   [`WORKLOAD_UID`] differently from the node's);
//! - [`Pod`]: both, and the `podrun` command line that starts the agent with
//!   the chart's hostPath volumes (bpffs, BTF, the cgroup tree, tracefs, the
//!   journal directory, the node's `/` at `/host`), the chart's capability
//!   set (read from its values.yaml), `NODE_NAME`, the pod's name as host
//!   name, and `--path.rootfs /host` as the chart passes it.
//!
//! [`crate::Testbed`] runs any test's agent in a pod with `.in_pod()`.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::cgroups::cgroup2_mount;
use crate::process::{ip_bin, run_bounded, run_checked};
use crate::{program, workspace_root};

/// What `spec.nodeName` hands the pod through the downward API.
pub const NODE_NAME: &str = "node-fsn-e2e";
/// The pod's name: its host name.
pub const POD_NAME: &str = "fleetsnitch-x7k2p";
/// A uid the image's passwd calls `imposter` (the node calls it otherwise).
pub const WORKLOAD_UID: u32 = 65534;
/// The chart's metrics port.
pub const METRICS_PORT: u16 = 9941;
/// Where the chart mounts the node's `/` (`hostRootFsMount`).
pub const HOST_ROOT: &str = "/host";
/// Where the chart mounts the journal's volume; the pod's agent sees the
/// directory of the test's journal there.
pub const JOURNAL_DIR: &str = "/var/lib/fleetsnitch";

/// Pods made by this test process so far (each gets its own /30).
static NEXT_POD: AtomicU8 = AtomicU8::new(0);

/// The pod's network namespace, joined to the host by a veth pair (host
/// 198.18.77.4n+1/30, pod 198.18.77.4n+2/30); deleted on drop.
pub struct PodNetwork {
    ns: String,
    host_ip: Ipv4Addr,
    pod_ip: Ipv4Addr,
}

impl PodNetwork {
    pub fn create() -> Result<Self> {
        let n = NEXT_POD.fetch_add(1, Ordering::Relaxed);
        if n >= 64 {
            bail!("more than 64 pods in one test process: no /30 left in 198.18.77.0/24");
        }
        let pid = std::process::id();
        let ns = format!("fsn-pod-{pid}-{n}");
        // At most 15 bytes (IFNAMSIZ).
        let host_end = format!("fsnpod{}-{n}", pid % 100_000);
        let host_ip = Ipv4Addr::new(198, 18, 77, 4 * n + 1);
        let pod_ip = Ipv4Addr::new(198, 18, 77, 4 * n + 2);
        let ip = ip_bin();
        if Path::new("/var/run/netns").join(&ns).exists() {
            let _ = run_checked(&ip, &["netns", "del", &ns]);
        }
        run_checked(&ip, &["netns", "add", &ns])?;
        let network = Self {
            ns,
            host_ip,
            pod_ip,
        };
        let ns = network.ns.as_str();
        let host_cidr = format!("{host_ip}/30");
        let pod_cidr = format!("{pod_ip}/30");
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

    /// The namespace's name (under /var/run/netns).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The host's end of the veth pair (where a collector for the pod listens).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The pod's address.
    pub fn pod_ip(&self) -> Ipv4Addr {
        self.pod_ip
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

/// The capabilities the chart adds (`capabilities` in values.yaml).
pub fn chart_capabilities() -> Result<Vec<String>> {
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

/// The node's name for `uid` (its /etc/passwd, through the C library): what
/// the pod's agent must report, not the image's name for it.
pub fn node_user_name(uid: u32) -> Result<String> {
    let out = run_bounded(
        Command::new("getent").args(["passwd", &uid.to_string()]),
        Duration::from_secs(10),
    )?;
    ensure!(out.status.success(), "getent passwd {uid}: {}", out.stderr);
    Ok(out.stdout.split(':').next().unwrap_or_default().to_owned())
}

/// `path` (an absolute path) inside the tree rooted at `root`.
pub fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The image at `root`: the agent at /usr/local/bin, the shared objects it
/// loads, an /etc of its own (whose passwd names [`WORKLOAD_UID`]
/// `imposter`) and the chart's mount points.
pub fn build_image(root: &Path, agent: &Path) -> Result<()> {
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
    let image_agent = root.join("usr/local/bin/fleetsnitch");
    fs::copy(agent, &image_agent)
        .with_context(|| format!("copy {} into the image", agent.display()))?;
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
            let target = inside(root, Path::new(object));
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
    Ok(())
}

/// A pod ready to start the agent: its image and network, and the `podrun`
/// command line (see [`crate::AgentGuard::start_wrapped`]).
pub struct Pod {
    image: PathBuf,
    wrapper: Vec<String>,
    /// Dropped after the agent (whoever holds the pod drops the agent first).
    pub network: PodNetwork,
}

impl Pod {
    /// Builds the image in `<dir>/image` and, for the pod on `network`, the
    /// command line for an agent whose journal is `journal` and whose other
    /// arguments are `args`, as the test would pass them on the host: the
    /// journal's directory becomes the chart's journal volume, a
    /// `--config.file` the chart's ConfigMap, and every other absolute path
    /// in `args` is read through the node's root at `/host`, as a hostPath
    /// volume would show it.
    pub fn prepare(
        dir: &Path,
        network: PodNetwork,
        journal: &Path,
        args: &[String],
    ) -> Result<Self> {
        let image = dir.join("image");
        build_image(&image, &crate::agent_binary()?)?;
        let journal_dir = journal.parent().context("journal directory")?;
        let journal_name = journal.file_name().context("journal file name")?;
        let mut wrapper: Vec<String> = vec![
            program("podrun")?
                .to_str()
                .context("non-UTF-8 podrun path")?
                .to_owned(),
            "--root".to_owned(),
            utf8(&image)?.to_owned(),
            "--hostname".to_owned(),
            POD_NAME.to_owned(),
            "--netns".to_owned(),
            network.ns().to_owned(),
        ];
        let mut bind = |bind: String| wrapper.extend(["--bind".to_owned(), bind]);
        bind(format!("{}:{JOURNAL_DIR}", utf8(journal_dir)?));
        bind("/sys/fs/bpf:/sys/fs/bpf".to_owned());
        bind("/sys/kernel/btf:/sys/kernel/btf:ro".to_owned());
        bind(format!("{}:/sys/fs/cgroup:ro", utf8(&cgroup2_mount()?)?));
        bind("/sys/kernel/tracing:/sys/kernel/tracing".to_owned());
        bind(format!("/:{HOST_ROOT}:ro"));
        let mut arg_maps = vec![(
            utf8(journal)?.to_owned(),
            format!("{JOURNAL_DIR}/{}", utf8(Path::new(journal_name))?),
        )];
        let mut config = false;
        for (index, arg) in args.iter().enumerate() {
            if !arg.starts_with('/') {
                continue;
            }
            if index > 0 && args[index - 1] == "--config.file" {
                ensure!(!config, "more than one --config.file");
                config = true;
                wrapper.extend([
                    "--bind".to_owned(),
                    format!("{arg}:/etc/fleetsnitch/fleetsnitch.yaml:ro"),
                ]);
                arg_maps.push((arg.clone(), "/etc/fleetsnitch/fleetsnitch.yaml".to_owned()));
            } else {
                arg_maps.push((arg.clone(), format!("{HOST_ROOT}{arg}")));
            }
        }
        for cap in chart_capabilities()? {
            wrapper.extend(["--cap".to_owned(), cap]);
        }
        wrapper.extend(["--env".to_owned(), format!("NODE_NAME={NODE_NAME}")]);
        for (from, to) in arg_maps {
            wrapper.extend(["--arg-map".to_owned(), format!("{from}={to}")]);
        }
        wrapper.extend(["--".to_owned(), "/usr/local/bin/fleetsnitch".to_owned()]);
        Ok(Self {
            image,
            wrapper,
            network,
        })
    }

    /// The image's root (to add files of its own before the agent starts).
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The command that starts the agent in the pod.
    pub fn wrapper(&self) -> &[String] {
        &self.wrapper
    }

    /// Where the agent serves `/metrics`: the pod's address, the chart's port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.network.pod_ip(), METRICS_PORT))
    }

    /// Fails unless process `pid` really runs as in the pod: its own mount,
    /// UTS, network and cgroup namespaces, the host's PID namespace, a
    /// read-only root.
    pub fn ensure_runs(pid: u32) -> Result<()> {
        let ns_of = |pid: &str, ns: &str| {
            let link = format!("/proc/{pid}/ns/{ns}");
            fs::read_link(&link).with_context(|| format!("readlink {link}"))
        };
        let pid = pid.to_string();
        for ns in ["mnt", "uts", "net", "cgroup"] {
            ensure!(
                ns_of(&pid, ns)? != ns_of("self", ns)?,
                "the agent shares the test's {ns} namespace: it is not in a pod"
            );
        }
        ensure!(
            ns_of(&pid, "pid")? == ns_of("self", "pid")?,
            "the agent is not in the host's PID namespace"
        );
        let mountinfo = format!("/proc/{pid}/mountinfo");
        let agent_mounts =
            fs::read_to_string(&mountinfo).with_context(|| format!("read {mountinfo}"))?;
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
        Ok(())
    }

    /// The arguments the chart adds to the agent's.
    pub fn agent_args() -> [&'static str; 2] {
        ["--path.rootfs", HOST_ROOT]
    }
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}
