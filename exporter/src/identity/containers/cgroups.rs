//! Which cgroup a process is in: `/proc/<pid>/cgroup` (the hierarchy that
//! names its container, on v1 and hybrid hosts) and the cgroup v2 tree, whose
//! directory inodes are the ids the kernel reports.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{ContainerRef, container_of};

/// The cgroup path of a process (`/` is the root), from `/proc/<pid>/cgroup`.
///
/// Fails as reading that file does (`NotFound` once the process is gone);
/// a file with no usable line is `InvalidData`.
pub fn cgroup_path_of(pid: u32) -> io::Result<String> {
    cgroup_path_in(Path::new("/proc"), pid)
}

/// [`cgroup_path_of`] with another proc mount (tests, a host's /proc seen
/// from a container).
pub fn cgroup_path_in(proc_root: &Path, pid: u32) -> io::Result<String> {
    let content = fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))?;
    select_cgroup_path(&content).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no cgroup line in /proc/{pid}/cgroup"),
        )
    })
}

/// Picks the path that identifies the process from the content of a
/// `/proc/<pid>/cgroup` file.
///
/// On a pure cgroup v2 host the file has one line, `0::<path>`. On cgroup v1
/// (and hybrid) hosts it has one line per hierarchy, and runtimes do not
/// create their cgroups in every hierarchy (some are not mounted, some are
/// left to their parent). The hierarchies are tried in this order:
/// `name=systemd` (systemd and every runtime with its systemd driver create
/// one cgroup per unit or container there), the v2 line of a hybrid host
/// (`0::`, which systemd and runc also keep per unit and container),
/// `cpu,cpuacct` (or `cpu`, `cpuacct` when mounted apart), `memory`, `pids`,
/// then the other hierarchies in file order. The first path naming a
/// container is chosen; failing that the first naming a systemd unit; failing
/// that the first that is not the root; failing that the root `/`.
pub fn select_cgroup_path(proc_cgroup: &str) -> Option<String> {
    let mut candidates: Vec<(usize, usize, &str)> = Vec::new();
    for (line_number, line) in proc_cgroup.lines().enumerate() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !path.starts_with('/') {
            continue;
        }
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        let rank = if id == "0" && controllers.is_empty() {
            1
        } else {
            let mut names: Vec<&str> = controllers.split(',').collect();
            names.sort_unstable();
            match names.as_slice() {
                ["name=systemd"] => 0,
                ["cpu", "cpuacct"] => 2,
                ["cpu"] => 3,
                ["cpuacct"] => 4,
                ["memory"] => 5,
                ["pids"] => 6,
                _ => 7,
            }
        };
        candidates.push((rank, line_number, path));
    }
    candidates.sort_unstable();
    let parsed: Vec<(&str, Option<ContainerRef>)> = candidates
        .iter()
        .map(|&(_, _, path)| (path, container_of(path)))
        .collect();
    let pick = parsed
        .iter()
        .find(|(_, c)| c.as_ref().is_some_and(|c| c.runtime.is_container()))
        .or_else(|| parsed.iter().find(|(_, c)| c.is_some()))
        .or_else(|| parsed.iter().find(|(path, _)| *path != "/"))
        .or_else(|| parsed.first())?;
    Some(pick.0.to_owned())
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on pure v2
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones), from
/// `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The id of a cgroup v2 cgroup (what `bpf_get_current_cgroup_id` returns):
/// the inode number of its directory below `mount`.
pub fn cgroup_id(mount: &Path, cgroup_path: &str) -> io::Result<u64> {
    Ok(fs::metadata(mount.join(cgroup_path.trim_start_matches('/')))?.ino())
}

/// Directories walked at most per rescan of the cgroup v2 tree.
const MAX_CGROUPS_SCANNED: usize = 200_000;
/// Shortest time between two rescans: a burst of unknown ids costs one walk.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Cgroup v2 id -> path, built by walking the hierarchy (an id is the inode
/// of the cgroup's directory). The kernel reports the id with each process,
/// so a process that has exited is still placed in its cgroup as long as the
/// cgroup itself exists, which is the case for every container while it runs.
#[derive(Debug)]
pub struct CgroupIndex {
    mount: PathBuf,
    paths: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl CgroupIndex {
    /// An index of the cgroup v2 hierarchy, if one is mounted.
    pub fn new() -> Option<Self> {
        Some(Self::at(cgroup2_mount()?))
    }

    pub fn at(mount: PathBuf) -> Self {
        Self {
            mount,
            paths: HashMap::new(),
            last_scan: None,
        }
    }

    /// The path (`/a/b`, relative to the mount) of cgroup `id`.
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if let Some(path) = self.paths.get(&id) {
            return Some(path.clone());
        }
        let due = self
            .last_scan
            .is_none_or(|at| at.elapsed() >= RESCAN_INTERVAL);
        if !due {
            return None;
        }
        self.rescan();
        self.paths.get(&id).cloned()
    }

    fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        self.paths.clear();
        let mut pending = vec![(self.mount.clone(), String::from("/"))];
        while let Some((dir, path)) = pending.pop() {
            if self.paths.len() >= MAX_CGROUPS_SCANNED {
                tracing::warn!(
                    limit = MAX_CGROUPS_SCANNED,
                    "cgroup tree too large to index completely; some containers go unnamed"
                );
                break;
            }
            let Ok(metadata) = fs::metadata(&dir) else {
                continue;
            };
            self.paths.insert(metadata.ino(), path.clone());
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let child = if path == "/" {
                        format!("/{name}")
                    } else {
                        format!("{path}/{name}")
                    };
                    pending.push((entry.path(), child));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{super::test_support::*, *};

    #[test]
    fn cgroup_index_finds_a_cgroup_by_its_inode() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("kubepods.slice/cri-containerd-abc.scope")).unwrap();
        let id = cgroup_id(dir.path(), "/kubepods.slice/cri-containerd-abc.scope").unwrap();
        let mut index = CgroupIndex::at(dir.path().to_path_buf());
        assert_eq!(
            index.path_of(id).as_deref(),
            Some("/kubepods.slice/cri-containerd-abc.scope")
        );
        assert_eq!(
            index.path_of(u64::MAX),
            None,
            "unknown ids are not invented"
        );
    }

    #[test]
    fn selects_the_hierarchy_that_names_the_container() {
        let cases: Vec<(String, Option<String>)> = vec![
            // Pure v2.
            (
                format!("0::/system.slice/docker-{A}.scope\n"),
                Some(format!("/system.slice/docker-{A}.scope")),
            ),
            ("0::/\n".to_owned(), Some("/".to_owned())),
            // v1, Docker cgroupfs: every hierarchy has it; name=systemd first.
            (
                format!(
                    "12:pids:/docker/{A}\n11:cpu,cpuacct:/docker/{A}\n4:memory:/docker/{A}\n1:name=systemd:/docker/{A}\n"
                ),
                Some(format!("/docker/{A}")),
            ),
            // v1 where name=systemd only has the session, cpu,cpuacct the container.
            (
                format!(
                    "11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{A}\n1:name=systemd:/user.slice/user-0.slice/session-1.scope\n"
                ),
                Some(format!("/kubepods/besteffort/pod{UID}/{A}")),
            ),
            // Hybrid host with a unit only: the unit wins over a non-root other path.
            (
                format!(
                    "9:name=systemd:/\n4:memory:/process_api/{}\n0::/system.slice/nginx.service\n",
                    &A[..32]
                ),
                Some("/system.slice/nginx.service".to_owned()),
            ),
            // Nothing recognised: the first non-root path in preference order.
            (
                "9:name=systemd:/\n4:memory:/foo\n0::/\n".to_owned(),
                Some("/foo".to_owned()),
            ),
            // Other named hierarchies count too.
            (
                format!("10:name=fsntest:/docker/{A}\n9:name=systemd:/\n0::/\n"),
                Some(format!("/docker/{A}")),
            ),
            ("".to_owned(), None),
            ("garbage\n".to_owned(), None),
        ];
        for (content, expected) in cases {
            assert_eq!(
                select_cgroup_path(&content),
                expected,
                "content {content:?}"
            );
        }
    }

    #[test]
    fn reads_this_process() {
        let path = cgroup_path_of(std::process::id()).unwrap();
        assert!(path.starts_with('/'), "{path}");
        assert_eq!(
            cgroup_path_of(u32::MAX).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
