//! File systems a test makes for itself: mounts undone on drop, a private
//! ext4 (so inode numbers are handed out as ext4 does, whatever `/tmp` is and
//! whatever else runs on the machine), and copies of executables placed onto
//! a chosen inode number.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::TempDir;
use crate::process::run_bounded;

/// Mounts made by a test, unmounted (lazily, last first) on drop, loop
/// devices detached with them.
#[derive(Default)]
pub struct Mounts(Vec<PathBuf>);

impl Mounts {
    /// `mount <args> <target>`, creating `target` first.
    pub fn mount(&mut self, args: &[&str], target: &Path) -> Result<()> {
        fs::create_dir_all(target).with_context(|| format!("create {}", target.display()))?;
        let out = run_bounded(
            Command::new("mount").args(args).arg(target),
            Duration::from_secs(30),
        )?;
        ensure!(
            out.status.success(),
            "mount {args:?} {}: {}",
            target.display(),
            out.stderr
        );
        self.0.push(target.to_owned());
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for target in self.0.iter().rev() {
            // -d detaches the loop device of a loop mount.
            let _ = run_bounded(
                Command::new("umount").arg("-d").arg(target),
                Duration::from_secs(30),
            );
        }
    }
}

/// Runs `program` (a setup tool such as `mkfs.ext4`) and fails with its
/// output if it fails.
pub fn run_tool(program: &str, args: &[&str]) -> Result<()> {
    let out = run_bounded(Command::new(program).args(args), Duration::from_secs(60))?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

/// A fresh ext4 file system of its own (a 128 MiB loop-mounted image in
/// `dir`), mounted at `dir/ext4` until `mounts` drops.
pub fn ext4(dir: &TempDir, mounts: &mut Mounts) -> Result<PathBuf> {
    let image = dir.path().join("ext4.img");
    fs::File::create(&image)?.set_len(128 << 20)?;
    let image = image.to_str().context("non-UTF-8 image path")?;
    run_tool("mkfs.ext4", &["-q", "-F", image])
        .context("mkfs.ext4 (e2fsprogs) is needed to make the test's file system")?;
    let mnt = dir.path().join("ext4");
    mounts.mount(&["-o", "loop", "-t", "ext4", image], &mnt)?;
    Ok(mnt)
}

/// Copies `from` to `to`, executable, with `tag` appended (a distinct sha256
/// that still runs: the loader ignores trailing bytes).
pub fn copy_executable(from: &Path, to: &Path, tag: &str) -> Result<()> {
    let mut content = fs::read(from).with_context(|| format!("read {}", from.display()))?;
    content.extend_from_slice(tag.as_bytes());
    fs::write(to, content).with_context(|| format!("write {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 755 {}", to.display()))?;
    Ok(())
}

/// Copies `from` to `to` (with `tag` appended), onto inode number `inode`
/// when given. ext4 hands out the lowest free number, but a freed number
/// comes back only once nothing holds the old file (a process still
/// exiting, the agent hashing it), so the copy is made again, for up to
/// 30 s, until it lands there. Returns the inode number it got.
pub fn copy_onto_inode(from: &Path, to: &Path, tag: &str, inode: Option<u64>) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        copy_executable(from, to, tag)?;
        let got = fs::metadata(to)?.ino();
        if inode.is_none_or(|inode| inode == got) {
            return Ok(got);
        }
        fs::remove_file(to)?;
        if Instant::now() > deadline {
            bail!(
                "precondition: {} should take the freed inode number {inode:?} on ext4 \
                 (got {got}); holders of the earlier file: {:?}",
                to.display(),
                holders_of_inode(to.parent().unwrap_or(Path::new("/")), inode.unwrap_or(0)),
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Processes that hold the file of `dir`'s file system with inode number
/// `inode` open or mapped (for the message of a failed precondition).
pub fn holders_of_inode(dir: &Path, inode: u64) -> Vec<String> {
    let Ok(device) = fs::metadata(dir).map(|m| m.dev()) else {
        return Vec::new();
    };
    let needle = format!(
        " {:02x}:{:02x} {inode} ",
        libc::major(device),
        libc::minor(device)
    );
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        for fd in fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if fs::metadata(fd.path()).is_ok_and(|m| m.ino() == inode && m.dev() == device) {
                // Position and open flags tell who holds it: a hasher reading
                // the file has moved its position, a fanotify event's
                // descriptor has not.
                let info = fs::read_to_string(entry.path().join("fdinfo").join(fd.file_name()))
                    .unwrap_or_default();
                let info: Vec<&str> = info
                    .lines()
                    .filter(|line| line.starts_with("pos:") || line.starts_with("flags:"))
                    .map(str::trim)
                    .collect();
                found.push(format!(
                    "{pid} {} (fd {:?}, {})",
                    comm.trim(),
                    fd.file_name(),
                    info.join(", ")
                ));
            }
        }
        if fs::read_to_string(entry.path().join("maps")).is_ok_and(|maps| maps.contains(&needle)) {
            found.push(format!("{pid} {} (mapped)", comm.trim()));
        }
    }
    found
}
