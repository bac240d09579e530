//! Container attribution against real cgroups: creates cgroups named exactly
//! as Docker, containerd, CRI-O, Podman and the kubelet name them, moves a
//! `sleep` into each and checks what `/proc/<pid>/cgroup` then says.
//!
//! Needs root (skipped with a message otherwise). The cgroup v2 case works in
//! the v2 hierarchy wherever it is mounted (`/sys/fs/cgroup` on pure v2 hosts,
//! `/sys/fs/cgroup/unified` on hybrid ones); the v1 case mounts a named v1
//! hierarchy of its own (no controllers, so nothing of the host is touched).
//! Everything created is removed by a guard, also when an assertion fails.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use fleetsnitch::identity::containers::{
    ContainerRef, Runtime, cgroup_id, cgroup_path_of, cgroup2_mount, container_of,
};

const A: &str = "3f1b2e4d5c6a7980a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
const B: &str = "8e0d6a1c2b3f4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d";
const C: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
const UID: &str = "5f1a8e4b-2c3d-4e5f-8a9b-0c1d2e3f4a5b";
const UID_: &str = "5f1a8e4b_2c3d_4e5f_8a9b_0c1d2e3f4a5b";

/// Cgroups, processes and a mount made by one test, undone on drop: the
/// processes are killed and reaped first, then the cgroups removed deepest
/// first, then the mount.
struct Guard {
    children: Vec<Child>,
    /// Directories created, in creation order (parents before children).
    dirs: Vec<PathBuf>,
    /// A named v1 hierarchy mounted by the test: (mount point, name).
    mount: Option<(PathBuf, String)>,
}

impl Guard {
    fn new() -> Self {
        Self {
            children: Vec::new(),
            dirs: Vec::new(),
            mount: None,
        }
    }

    /// Creates `root/relative` and every missing parent, remembering each.
    fn create(&mut self, root: &Path, relative: &str) -> io::Result<PathBuf> {
        let mut dir = root.to_path_buf();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            dir.push(part);
            if !dir.exists() {
                fs::create_dir(&dir)?;
                self.dirs.push(dir.clone());
            }
        }
        Ok(dir)
    }

    /// Starts a `sleep` and moves it into the cgroup directory.
    fn sleep_in(&mut self, cgroup_dir: &Path) -> io::Result<u32> {
        let child = Command::new("sleep")
            .arg("300")
            .stdin(Stdio::null())
            .spawn()?;
        let pid = child.id();
        self.children.push(child);
        fs::write(cgroup_dir.join("cgroup.procs"), pid.to_string())?;
        Ok(pid)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in self.dirs.iter().rev() {
            // A cgroup whose last process just exited can be busy for a moment.
            for attempt in 0..50 {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => break,
                    Err(err) if attempt == 49 => {
                        eprintln!("cannot remove cgroup {}: {err}", dir.display())
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        if let Some((mount, name)) = &self.mount {
            // The kernel frees a named v1 hierarchy at unmount only when no
            // cgroup is left in it, dying ones included; removed cgroups die
            // asynchronously, so a hierarchy unmounted too early stays listed
            // in every /proc/<pid>/cgroup. Mount and unmount again until the
            // hierarchy is gone.
            for attempt in 0..40 {
                if !unmount(mount) {
                    eprintln!("cannot unmount {}", mount.display());
                    break;
                }
                if !hierarchy_listed(name) {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
                if attempt == 39 || !mount_named(name, mount) {
                    eprintln!("the cgroup v1 hierarchy name={name} is left behind");
                    break;
                }
            }
            let _ = fs::remove_dir(mount);
        }
    }
}

fn mount_named(name: &str, at: &Path) -> bool {
    Command::new("mount")
        .args(["-t", "cgroup", "-o", &format!("none,name={name}"), "cgroup"])
        .arg(at)
        .status()
        .is_ok_and(|s| s.success())
}

fn unmount(at: &Path) -> bool {
    Command::new("umount")
        .arg(at)
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a v1 hierarchy of this name exists (mounted or not).
fn hierarchy_listed(name: &str) -> bool {
    fs::read_to_string("/proc/self/cgroup")
        .is_ok_and(|c| c.lines().any(|l| l.contains(&format!(":name={name}:"))))
}

struct Case {
    /// Below the test's own top cgroup.
    path: String,
    expected: Option<ContainerRef>,
}

fn case(path: String, runtime: Runtime, id: &str, pod: Option<&str>) -> Case {
    Case {
        path,
        expected: Some(ContainerRef {
            runtime,
            id: id.to_owned(),
            pod_uid: pod.map(str::to_owned),
        }),
    }
}

fn v2_cases() -> Vec<Case> {
    vec![
        // containerd + kubelet, systemd driver.
        case(
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{A}.scope"
            ),
            Runtime::Containerd,
            A,
            Some(UID),
        ),
        // CRI-O, systemd driver, guaranteed QoS (no QoS slice)...
        case(
            format!("kubepods.slice/kubepods-pod{UID_}.slice/crio-{B}.scope"),
            Runtime::CriO,
            B,
            Some(UID),
        ),
        // ...and its monitor beside it, which is no container.
        Case {
            path: format!("kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{B}.scope"),
            expected: None,
        },
        // Docker, systemd driver.
        case(
            format!("system.slice/docker-{A}.scope"),
            Runtime::Docker,
            A,
            None,
        ),
        // Docker, cgroupfs driver.
        case(format!("docker/{C}"), Runtime::Docker, C, None),
        // kubelet cgroupfs driver.
        case(
            format!("kubepods/besteffort/pod{UID}/{C}"),
            Runtime::Unknown,
            C,
            Some(UID),
        ),
        // containerd's systemd cgroup-path form below containerd.service.
        case(
            format!(
                "system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{B}"
            ),
            Runtime::Containerd,
            B,
            Some(UID),
        ),
        // Podman with its `container` leaf.
        case(
            format!("machine.slice/libpod-{C}.scope/container"),
            Runtime::Podman,
            C,
            None,
        ),
        // kind: a kubelet in a Docker container; the innermost container wins.
        case(
            format!(
                "system.slice/docker-{A}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{C}.scope"
            ),
            Runtime::Containerd,
            C,
            Some(UID),
        ),
        // A plain unit.
        Case {
            path: "system.slice/nginx.service".to_owned(),
            expected: Some(ContainerRef {
                runtime: Runtime::Systemd,
                id: "nginx.service".to_owned(),
                pod_uid: None,
            }),
        },
    ]
}

#[test]
fn cgroup_v2_paths_name_the_container() -> anyhow::Result<()> {
    fleetsnitch_e2e::require_root!("creating cgroups");
    let Some(mount) = cgroup2_mount() else {
        fleetsnitch_e2e::skip_test!("no cgroup v2 hierarchy is mounted");
    };
    let top = format!("fsn-test-{}.slice", std::process::id());
    let mut guard = Guard::new();
    guard
        .create(&mount, &top)
        .expect("create the test's top cgroup");

    for case in v2_cases() {
        let relative = format!("{top}/{}", case.path);
        let dir = guard.create(&mount, &relative).expect("create cgroup");
        let pid = guard.sleep_in(&dir).expect("move a sleep into the cgroup");
        let path = cgroup_path_of(pid).expect("read /proc/<pid>/cgroup");
        if case.expected.is_some() {
            // The v2 line is the one naming the container (or the unit).
            assert_eq!(path, format!("/{relative}"), "pid {pid}");
        }
        assert_eq!(container_of(&path), case.expected, "cgroup {path}");
        // The id the kernel reports for the cgroup is its directory's inode.
        let id = cgroup_id(&mount, &format!("/{relative}")).expect("cgroup id");
        assert_ne!(id, 0);
    }
    Ok(())
}

#[test]
fn cgroup_v1_named_hierarchy_paths_name_the_container() -> anyhow::Result<()> {
    fleetsnitch_e2e::require_root!("mounting a cgroup v1 hierarchy");
    let name = format!("fsntest{}", std::process::id());
    let mount = std::env::temp_dir().join(format!("fsn-cgroup-v1-{}", std::process::id()));
    let mut guard = Guard::new();
    fs::create_dir_all(&mount).expect("create the mount point");
    if !mount_named(&name, &mount) {
        let _ = fs::remove_dir(&mount);
        fleetsnitch_e2e::skip_test!(
            "this kernel refuses a named cgroup v1 hierarchy (CONFIG_CGROUP_V1 off?)"
        );
    }
    guard.mount = Some((mount.clone(), name.clone()));

    let cases = vec![
        case(format!("docker/{A}"), Runtime::Docker, A, None),
        case(
            format!("kubepods/burstable/pod{UID}/{B}"),
            Runtime::Unknown,
            B,
            Some(UID),
        ),
        case(
            format!("kubepods/burstable/pod{UID}/crio-{C}"),
            Runtime::CriO,
            C,
            Some(UID),
        ),
        case(
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{A}.scope"
            ),
            Runtime::Containerd,
            A,
            Some(UID),
        ),
    ];
    for case in cases {
        let dir = guard.create(&mount, &case.path).expect("create cgroup");
        let pid = guard.sleep_in(&dir).expect("move a sleep into the cgroup");
        let content = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            content
                .lines()
                .any(|l| l.ends_with(&format!(":name={name}:/{}", case.path))),
            "{content}"
        );
        let path = cgroup_path_of(pid).expect("read /proc/<pid>/cgroup");
        assert_eq!(path, format!("/{}", case.path));
        assert_eq!(container_of(&path), case.expected, "cgroup {path}");
    }
    Ok(())
}
