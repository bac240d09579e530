//! Cgroups a test makes for itself (named the way container runtimes name
//! theirs), removed when the test ends, also when it fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The cgroup v2 mount (on hybrid hosts it is not /sys/fs/cgroup itself).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs_part) = line.split_once(" - ")?;
            (fs_part.split_whitespace().next()? == "cgroup2")
                .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount in /proc/self/mountinfo")
}

/// Cgroups created for one test, removed (deepest first) on drop.
#[derive(Default)]
pub struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    /// Creates `path` and every missing directory above it.
    pub fn create(&mut self, path: &Path) -> Result<()> {
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
            // The processes moved in have exited: give the kernel a moment to
            // let go of the cgroup.
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
