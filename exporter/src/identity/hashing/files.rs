//! Opening and hashing the very file the kernel named, never another at its path.

use std::{
    fs::File,
    io::{self, Read},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
};

use sha2::Digest;

use super::{HashFailure, HashJob};
use crate::{
    identity::{inode::generation_agrees, processes::ExeKey},
    model::Sha256,
    support::node,
};

/// Hashes the file the kernel identified as `job.exe`.
pub fn hash_executable(job: &HashJob) -> Result<Sha256, HashFailure> {
    let (file, _) = open_executable(job)?;
    sha256_of(&file).map_err(|_| HashFailure::Unreadable)
}

/// Opens the file the kernel identified as `job.exe`: through the process
/// first, else by path on the node; with the open file's `st_dev`.
pub(super) fn open_executable(job: &HashJob) -> Result<(File, u64), HashFailure> {
    let via_process = open_matching(&format!("/proc/{}/exe", job.tgid), job.exe);
    match via_process {
        Ok(opened) => Ok(opened),
        Err(process_error) => match open_on_node(&job.path, job.exe) {
            Ok(opened) => Ok(opened),
            Err(Mismatch::Other) => Err(HashFailure::Replaced),
            Err(Mismatch::Missing) if process_error == Mismatch::Missing => {
                Err(HashFailure::ProcessExited)
            }
            Err(_) => Err(HashFailure::Replaced),
        },
    }
}

/// Opens `path` as the node names it, if it is the file `exe`: through the
/// node's root when the agent runs in a mount namespace of its own (the
/// chart's pod), where its own `path` would be the image's file.
pub(super) fn open_on_node(path: &str, exe: ExeKey) -> Result<(File, u64), Mismatch> {
    match node::foreign_root() {
        Some(root) if path.starts_with('/') => {
            open_matching(&format!("{}{path}", root.display()), exe)
        }
        _ => open_matching(path, exe),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Mismatch {
    /// Nothing to open there.
    Missing,
    /// A file, but not the one the kernel reported.
    Other,
}

/// `statfs` magic of btrfs.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
/// `statfs` magic of overlayfs.
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794C_7630;

/// Opens `path` if it is the file the kernel named `exe`; returns it with its `st_dev`.
///
/// The kernel reports the file system's device (`inode->i_sb->s_dev`), which
/// is what `stat` returns on most file systems, but not on two that fleets
/// run executables from:
/// - btrfs: `stat` returns the subvolume's own anonymous device, and inode
///   numbers repeat across subvolumes;
/// - overlayfs whose layers are on different file systems (containers on a
///   tmpfs or another disk): `stat` returns a per-layer pseudo device and the
///   layer's inode number, which can repeat across layers.
///
/// There the inode must match and the device may differ; the returned
/// `st_dev` then tells the subvolumes (layers) apart in the hash cache.
pub(super) fn open_matching(path: &str, exe: ExeKey) -> Result<(File, u64), Mismatch> {
    // A name with invalid UTF-8 is carried as text with `\xNN` escapes; the
    // file has the raw bytes (the device+inode check below rejects a wrong file).
    let file = File::open(path)
        .or_else(|error| match crate::support::raw_text::to_bytes(path) {
            Some(raw) => {
                File::open(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&raw))
            }
            None => Err(error),
        })
        .map_err(|_| Mismatch::Missing)?;
    let metadata = file.metadata().map_err(|_| Mismatch::Missing)?;
    // Another file at a freed inode number has another generation.
    if metadata.ino() != exe.ino || !generation_agrees(&file, exe) {
        return Err(Mismatch::Other);
    }
    if metadata.dev() == exe.dev || devices_differ_from_kernel(&file) {
        Ok((file, metadata.dev()))
    } else {
        Err(Mismatch::Other)
    }
}

/// Whether `file` is on a file system whose `st_dev` is not its superblock's device.
#[expect(
    clippy::unnecessary_cast,
    reason = "statfs.f_type is i64 on x86_64 but another type elsewhere"
)]
fn devices_differ_from_kernel(file: &File) -> bool {
    let mut stats = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: a valid descriptor and a buffer of the right type for the call.
    let ok = unsafe { libc::fstatfs(file.as_raw_fd(), stats.as_mut_ptr()) } == 0;
    // SAFETY: fstatfs filled the buffer (it was zeroed before in any case).
    let magic = unsafe { stats.assume_init() }.f_type as i64;
    ok && (magic == BTRFS_SUPER_MAGIC || magic == OVERLAYFS_SUPER_MAGIC)
}

pub(super) fn sha256_of(mut file: &File) -> io::Result<Sha256> {
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(Sha256::from_digest(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::{super::test_support::*, *};

    #[test]
    fn hashes_the_file_with_the_reported_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"abc").unwrap();
        let job = job(key_of(&path), u32::MAX - 1, &path.to_string_lossy());
        assert_eq!(
            hash_executable(&job).unwrap().as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn replaced_file_is_never_hashed_under_the_old_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"old").unwrap();
        let old = key_of(&path);
        let replacement = dir.path().join("tool.new");
        File::create(&replacement)
            .unwrap()
            .write_all(b"new")
            .unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        let job = job(old, u32::MAX - 1, &path.to_string_lossy());
        assert_eq!(hash_executable(&job), Err(HashFailure::Replaced));
    }

    #[test]
    fn a_file_with_another_generation_is_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"abc").unwrap();
        let mut exe = key_of(&path);
        if exe.generation == 0 {
            eprintln!("the test directory's file system reports no inode generation");
            return;
        }
        exe.generation = exe.generation.wrapping_add(1).max(1);
        let job = job(exe, u32::MAX - 1, &path.to_string_lossy());
        assert_eq!(hash_executable(&job), Err(HashFailure::Replaced));
    }

    #[test]
    fn vanished_file_and_process_is_process_exited() {
        let job = job(
            ExeKey {
                dev: 1,
                ino: 2,
                generation: 0,
            },
            u32::MAX - 1,
            "/nonexistent/fleetsnitch-test",
        );
        assert_eq!(hash_executable(&job), Err(HashFailure::ProcessExited));
    }

    #[test]
    fn running_process_is_hashed_through_proc_even_if_path_is_wrong() {
        let metadata = std::fs::metadata("/proc/self/exe").unwrap();
        let key = ExeKey {
            dev: metadata.dev(),
            ino: metadata.ino(),
            generation: 0,
        };
        let job = job(key, std::process::id(), "/nonexistent/elsewhere");
        let expected = sha256_of(&File::open(std::env::current_exe().unwrap()).unwrap()).unwrap();
        assert_eq!(hash_executable(&job).unwrap(), expected);
    }
}
