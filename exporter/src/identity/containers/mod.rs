//! Which container (or systemd unit) a process runs in, from its cgroup path.
//!
//! Container runtimes name the cgroup of each container after its id, so the
//! path in `/proc/<pid>/cgroup` says which container a process belongs to
//! without asking any runtime. [`container_of`] recognises every naming in use:
//!
//! | runtime | cgroup driver | last path segments |
//! | --- | --- | --- |
//! | Docker | systemd | `docker-<64hex>.scope` |
//! | Docker | cgroupfs | `/docker/<64hex>` |
//! | containerd (CRI) | systemd | `cri-containerd-<64hex>.scope` |
//! | containerd (CRI) | systemd, v1 cgroup-path form | `containerd.service/<slice>:cri-containerd:<64hex>` |
//! | containerd (nerdctl) | systemd | `nerdctl-<64hex>.scope` |
//! | CRI-O | systemd | `crio-<64hex>.scope` (`crio-conmon-<64hex>.scope` is the monitor: ignored) |
//! | CRI-O | cgroupfs | `pod<uid>/crio-<64hex>` |
//! | Podman | systemd | `libpod-<64hex>.scope`, maybe with a `container` child (`libpod-conmon-` ignored) |
//! | Podman | cgroupfs | `/libpod_parent/libpod-<64hex>` |
//! | kubelet cgroupfs driver (Docker or containerd) | cgroupfs | `/kubepods/<qos>/pod<uid>/<64hex>`: [`Runtime::Unknown`] |
//!
//! A bare 64-hex segment anywhere else (ECS, nerdctl with cgroupfs, CI
//! runners' cgroup parents) is a container of [`Runtime::Unknown`] runtime,
//! except under `/docker/`, which is Docker's cgroupfs parent. Nested
//! containers (Docker in Docker, kind, a kubelet inside a container) are
//! attributed to the innermost container: the last container segment of the
//! path wins, whatever follows it (`init.scope` of a systemd inside the
//! container, podman's `container` leaf).
//!
//! Pods: the kubelet puts each pod in `pod<uid>` (cgroupfs driver) or
//! `kubepods[-<qos>]-pod<uid with _ for ->.slice` (systemd driver); the pod
//! uid closest above the container is returned with `-` restored
//! ([`pod_uid_of`]).
//!
//! Processes in no container are attributed to their systemd unit
//! ([`Runtime::Systemd`]), chosen so that the number of distinct values stays
//! bounded by what is installed, not by what happens:
//!
//! 1. anything run by a per-user manager (`user@1000.service/app.slice/x.scope`,
//!    its user services too) is `user@1000.service`: user units are named by
//!    desktop environments with pids and random ids, and a user unit may share
//!    its name with a system unit;
//! 2. otherwise the innermost `.service` (`/system.slice/nginx.service` and
//!    any cgroup it delegates below itself are `nginx.service`);
//! 3. a login session (`user-1000.slice/session-42.scope`) is its user's slice
//!    `user-1000.slice` (session numbers grow without bound);
//! 4. otherwise the innermost `.scope` (`init.scope`, transient scopes such as
//!    `run-u42.scope`, whose names are chosen by who started them);
//! 5. a path of slices only (or `/`) is no unit: `None`.
//!
//! Paths read from inside a cgroup namespace (an agent container that does
//! not share the host's) are relative to the namespace's root and may start
//! with `/..`; only the last segments matter, so they are recognised too.
//!
//! Which hierarchy [`cgroup_path_of`] reads on cgroup v1 and hybrid hosts is
//! described at [`select_cgroup_path`].

mod cache;
mod cgroups;

use std::{fmt, io};

pub use cache::ContainerCache;
pub use cgroups::{
    CgroupIndex, cgroup_id, cgroup_path_in, cgroup_path_of, cgroup2_mount, select_cgroup_path,
};

/// What created the cgroup a process runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
    /// A container id in a path that does not name its runtime: the
    /// kubelet's cgroupfs driver (Docker or containerd), or another cgroup
    /// parent holding bare ids. The pod's `containerID` scheme says which.
    Unknown,
    /// Not a container: a systemd unit (the id is the unit name).
    Systemd,
}

impl Runtime {
    /// A short lowercase name, fit for a label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Podman => "podman",
            Self::Unknown => "unknown",
            Self::Systemd => "systemd",
        }
    }

    /// True for containers, false for systemd units.
    pub fn is_container(self) -> bool {
        self != Self::Systemd
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The container (or systemd unit) of a cgroup path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    pub runtime: Runtime,
    /// The container id, 64 lowercase hex digits; the unit name for
    /// [`Runtime::Systemd`].
    pub id: String,
    /// The Kubernetes pod uid (with dashes) when the path is under kubepods.
    pub pod_uid: Option<String>,
}

/// The container of a process, `None` when it is in none (nor in a unit).
pub fn container_of_pid(pid: u32) -> io::Result<Option<ContainerRef>> {
    Ok(container_of(&cgroup_path_of(pid)?))
}

/// The container (or systemd unit) a cgroup path belongs to; see the module
/// documentation for the namings recognised.
pub fn container_of(cgroup_path: &str) -> Option<ContainerRef> {
    let path = cgroup_path
        .strip_suffix(" (deleted)")
        .unwrap_or(cgroup_path);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();

    // The innermost container wins.
    for (index, segment) in segments.iter().enumerate().rev() {
        let parent = index.checked_sub(1).map(|i| segments[i]);
        if is_monitor_segment(segment) {
            // The runtime's monitor (conmon) of a container: not the container,
            // and not a unit either.
            return None;
        }
        if let Some((runtime, id, slice_pod)) = container_segment(segment, parent) {
            let pod_uid = slice_pod.or_else(|| pod_uid_in(&segments[..index]));
            return Some(ContainerRef {
                runtime,
                id,
                pod_uid,
            });
        }
    }
    systemd_unit(&segments).map(|unit| ContainerRef {
        runtime: Runtime::Systemd,
        id: unit.to_owned(),
        pod_uid: None,
    })
}

/// The Kubernetes pod uid of a cgroup path (with dashes), the innermost one
/// when pods nest; `None` when the path is not under a pod.
pub fn pod_uid_of(cgroup_path: &str) -> Option<String> {
    if let Some(uid) = container_of(cgroup_path).and_then(|c| c.pod_uid) {
        return Some(uid);
    }
    let segments: Vec<&str> = cgroup_path.split('/').filter(|s| !s.is_empty()).collect();
    pod_uid_in(&segments)
}

/// `crio-conmon-<id>[.scope]`, `libpod-conmon-<id>[.scope]`.
fn is_monitor_segment(segment: &str) -> bool {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    name.rsplit_once('-')
        .is_some_and(|(prefix, id)| prefix.ends_with("-conmon") && is_container_id(id))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A segment naming a container: its runtime, id and (for the containerd
/// `slice:prefix:id` form) the pod uid its slice carries.
fn container_segment(
    segment: &str,
    parent: Option<&str>,
) -> Option<(Runtime, String, Option<String>)> {
    // systemd cgroup-path form kept literally below containerd.service on
    // some v1 hosts: `kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`.
    if let Some((slice, rest)) = segment.split_once(':') {
        let (prefix, id) = rest.split_once(':')?;
        if !is_container_id(id) {
            return None;
        }
        let runtime = runtime_of_prefix(prefix)?;
        return Some((runtime, id.to_ascii_lowercase(), slice_pod_uid(slice)));
    }
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    if let Some((prefix, id)) = name.rsplit_once('-')
        && is_container_id(id)
    {
        let runtime = runtime_of_prefix(prefix)?;
        return Some((runtime, id.to_ascii_lowercase(), None));
    }
    if is_container_id(segment) {
        let runtime = if parent == Some("docker") {
            Runtime::Docker
        } else {
            Runtime::Unknown
        };
        return Some((runtime, segment.to_ascii_lowercase(), None));
    }
    None
}

fn runtime_of_prefix(prefix: &str) -> Option<Runtime> {
    Some(match prefix {
        "docker" => Runtime::Docker,
        "cri-containerd" | "containerd" | "nerdctl" => Runtime::Containerd,
        "crio" | "cri-o" => Runtime::CriO,
        "libpod" => Runtime::Podman,
        _ => return None,
    })
}

fn is_pod_uid(s: &str) -> bool {
    // Pod uids are UUIDs; static pods' are 32-hex config hashes.
    (32..=36).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_')
}

/// `kubepods[-<qos>]-pod<uid>.slice` (systemd driver): the uid with dashes.
fn slice_pod_uid(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice")?;
    // `kubepods-…`, and kind's `kubelet-kubepods-…` (a kubelet in a container).
    if !name.contains("kubepods") {
        return None;
    }
    let (_, uid) = name.rsplit_once("-pod")?;
    is_pod_uid(uid).then(|| uid.replace('_', "-").to_ascii_lowercase())
}

/// The innermost pod uid among the segments (the container's ancestors).
fn pod_uid_in(segments: &[&str]) -> Option<String> {
    for (index, segment) in segments.iter().enumerate().rev() {
        if let Some(uid) = slice_pod_uid(segment) {
            return Some(uid);
        }
        // cgroupfs driver: /kubepods[/<qos>]/pod<uid>.
        if let Some(uid) = segment.strip_prefix("pod")
            && is_pod_uid(uid)
            && segments[..index].iter().any(|s| s.contains("kubepods"))
        {
            return Some(uid.replace('_', "-").to_ascii_lowercase());
        }
    }
    None
}

fn systemd_unit<'a>(segments: &[&'a str]) -> Option<&'a str> {
    if let Some(user_manager) = segments
        .iter()
        .find(|s| s.starts_with("user@") && s.ends_with(".service"))
    {
        return Some(user_manager);
    }
    if let Some(service) = segments.iter().rev().find(|s| s.ends_with(".service")) {
        return Some(service);
    }
    let scope_index = segments.iter().rposition(|s| s.ends_with(".scope"))?;
    let scope = segments[scope_index];
    if scope.starts_with("session-")
        && let Some(user_slice) = scope_index
            .checked_sub(1)
            .map(|i| segments[i])
            .filter(|s| s.starts_with("user-") && s.ends_with(".slice"))
    {
        return Some(user_slice);
    }
    Some(scope)
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub(crate) const A: &str = "3f1b2e4d5c6a7980a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
    pub(crate) const B: &str = "8e0d6a1c2b3f4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d";
    pub(crate) const UID: &str = "5f1a8e4b-2c3d-4e5f-8a9b-0c1d2e3f4a5b";
    pub(crate) const UID_: &str = "5f1a8e4b_2c3d_4e5f_8a9b_0c1d2e3f4a5b";

    pub(crate) fn c(runtime: Runtime, id: &str, pod: Option<&str>) -> Option<ContainerRef> {
        Some(ContainerRef {
            runtime,
            id: id.to_owned(),
            pod_uid: pod.map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::*, *};

    #[test]
    fn recognises_every_naming() {
        use Runtime::*;
        let cases: Vec<(String, Option<ContainerRef>)> = vec![
            // Docker, systemd driver (v1 and v2).
            (
                format!("/system.slice/docker-{A}.scope"),
                c(Docker, A, None),
            ),
            // Docker, cgroupfs driver.
            (format!("/docker/{A}"), c(Docker, A, None)),
            // Rootless Docker under the user manager.
            (
                format!("/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{A}.scope"),
                c(Docker, A, None),
            ),
            // containerd + kubelet, systemd driver, burstable and besteffort.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{A}.scope"
                ),
                c(Containerd, A, Some(UID)),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{A}.scope"
                ),
                c(Containerd, A, Some(UID)),
            ),
            // Guaranteed QoS has no QoS slice.
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-{A}.scope"),
                c(CriO, A, Some(UID)),
            ),
            // CRI-O, systemd driver, and its monitor.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{B}.scope"
                ),
                c(CriO, B, Some(UID)),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{B}.scope"
                ),
                None,
            ),
            // CRI-O with a systemd inside the container (crun's `container` leaf).
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-{B}.scope/container"),
                c(CriO, B, Some(UID)),
            ),
            // CRI-O, cgroupfs driver.
            (
                format!("/kubepods/burstable/pod{UID}/crio-{B}"),
                c(CriO, B, Some(UID)),
            ),
            // kubelet cgroupfs driver: bare ids.
            (
                format!("/kubepods/besteffort/pod{UID}/{A}"),
                c(Unknown, A, Some(UID)),
            ),
            (format!("/kubepods/pod{UID}/{A}"), c(Unknown, A, Some(UID))),
            // containerd's systemd cgroup-path form below containerd.service.
            (
                format!(
                    "/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{A}"
                ),
                c(Containerd, A, Some(UID)),
            ),
            (
                format!(
                    "/system.slice/containerd.service/kubepods-pod{UID_}.slice:cri-containerd:{A}"
                ),
                c(Containerd, A, Some(UID)),
            ),
            // Podman, systemd (rootful, rootless, with its `container` leaf) and cgroupfs.
            (
                format!("/machine.slice/libpod-{A}.scope"),
                c(Podman, A, None),
            ),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{A}.scope/container"
                ),
                c(Podman, A, None),
            ),
            (format!("/machine.slice/libpod-conmon-{A}.scope"), None),
            (format!("/libpod_parent/libpod-{A}"), c(Podman, A, None)),
            // nerdctl (containerd without Kubernetes).
            (
                format!("/system.slice/nerdctl-{A}.scope"),
                c(Containerd, A, None),
            ),
            // Nested: Docker in Docker, kind (kubelet in a Docker container).
            (format!("/docker/{A}/docker/{B}"), c(Docker, B, None)),
            (
                format!("/system.slice/docker-{A}.scope/kubepods/besteffort/pod{UID}/{B}"),
                c(Unknown, B, Some(UID)),
            ),
            (
                format!(
                    "/system.slice/docker-{A}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{B}.scope"
                ),
                c(Containerd, B, Some(UID)),
            ),
            // A systemd inside a container: still the container.
            (
                format!("/system.slice/docker-{A}.scope/init.scope"),
                c(Docker, A, None),
            ),
            (
                format!("/system.slice/docker-{A}.scope/system.slice/nginx.service"),
                c(Docker, A, None),
            ),
            // Upper-case hex is normalised.
            (
                format!("/docker/{}", A.to_ascii_uppercase()),
                c(Docker, A, None),
            ),
            // Bare ids elsewhere (ECS task, CI runner parent).
            (
                format!("/ecs/0123456789abcdef0123456789abcdef/{A}"),
                c(Unknown, A, None),
            ),
            // systemd units.
            (
                "/system.slice/nginx.service".to_owned(),
                c(Systemd, "nginx.service", None),
            ),
            (
                "/system.slice/docker.service".to_owned(),
                c(Systemd, "docker.service", None),
            ),
            (
                "/system.slice/containerd.service".to_owned(),
                c(Systemd, "containerd.service", None),
            ),
            (
                "/system.slice/system-getty.slice/getty@tty1.service".to_owned(),
                c(Systemd, "getty@tty1.service", None),
            ),
            (
                "/system.slice/app.service/worker".to_owned(),
                c(Systemd, "app.service", None),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope".to_owned(),
                c(Systemd, "user@1000.service", None),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service/session.slice/pipewire.service"
                    .to_owned(),
                c(Systemd, "user@1000.service", None),
            ),
            (
                "/user.slice/user-1000.slice/session-42.scope".to_owned(),
                c(Systemd, "user-1000.slice", None),
            ),
            ("/init.scope".to_owned(), c(Systemd, "init.scope", None)),
            (
                "/system.slice/run-u42.scope".to_owned(),
                c(Systemd, "run-u42.scope", None),
            ),
            // Nothing to attribute.
            ("/".to_owned(), None),
            ("".to_owned(), None),
            ("/user.slice".to_owned(), None),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
                ),
                None,
            ),
            // Not ids: too short, not hex, unknown prefix.
            ("/docker/3f1b2e4d5c6a".to_owned(), None),
            (format!("/docker/{}", A.replace('a', "g")), None),
            (
                format!("/system.slice/foo-{A}.scope"),
                c(Systemd, &format!("foo-{A}.scope"), None),
            ),
            (format!("/process_api/{}", &A[..32]), None),
            // Read from inside a cgroup namespace (an agent container without
            // the host's cgroupns): paths are relative to its root.
            (
                format!("/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{A}.scope"),
                c(Containerd, A, Some(UID)),
            ),
            // A removed cgroup.
            (format!("/docker/{A} (deleted)"), c(Docker, A, None)),
        ];
        for (path, expected) in cases {
            assert_eq!(container_of(&path), expected, "path {path}");
        }
    }

    #[test]
    fn pod_uid_alone() {
        assert_eq!(
            pod_uid_of(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
            ))
            .as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_uid_of(&format!("/kubepods/burstable/pod{UID}")).as_deref(),
            Some(UID)
        );
        // Static pods: the uid is a 32-hex config hash.
        assert_eq!(
            pod_uid_of("/kubepods/burstable/pod0123456789abcdef0123456789abcdef").as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(
            pod_uid_of(&format!(
                "/system.slice/containerd.service/kubepods-pod{UID_}.slice:cri-containerd:{A}"
            ))
            .as_deref(),
            Some(UID)
        );
        // `pod` outside kubepods is not a pod.
        assert_eq!(pod_uid_of(&format!("/pod{UID}")), None);
        assert_eq!(pod_uid_of("/system.slice/nginx.service"), None);
    }
}
