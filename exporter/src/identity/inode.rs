//! What `stat` does not tell about a file: its inode's generation, which the
//! kernel reports with every executable (see [`crate::model::ExeKey`]).

use std::{fs::File, os::fd::AsRawFd};

use crate::model::ExeKey;

/// The inode generation of an open file, where its file system tells it
/// (`FS_IOC_GETVERSION`: ext4, xfs, btrfs, f2fs; not tmpfs or overlayfs).
pub fn generation_of(file: &File) -> Option<u32> {
    let mut value: libc::c_long = 0;
    // SAFETY: FS_IOC_GETVERSION writes at most a long into `value`, which
    // lives for the duration of the call.
    let done = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::FS_IOC_GETVERSION,
            &mut value as *mut libc::c_long,
        )
    } == 0;
    // The kernel writes an int: the low 32 bits.
    done.then_some(value as u32)
}

/// Whether `file` (whose device and inode number already match `exe`) may
/// be the file `exe`: false only when both generations are known and differ,
/// that is when `file` is another file that took over a freed inode number.
pub fn generation_agrees(file: &File, exe: ExeKey) -> bool {
    exe.generation == 0 || generation_of(file).is_none_or(|generation| generation == exe.generation)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn a_file_agrees_with_its_own_generation_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"x").unwrap();
        let file = File::open(&path).unwrap();
        let metadata = file.metadata().unwrap();
        let mut exe = ExeKey {
            dev: metadata.dev(),
            ino: metadata.ino(),
            generation: 0,
        };
        assert!(generation_agrees(&file, exe), "unknown generation");
        let Some(generation) = generation_of(&file) else {
            eprintln!("the test directory's file system reports no inode generation");
            return;
        };
        exe.generation = generation;
        assert!(generation_agrees(&file, exe));
        exe.generation = generation.wrapping_add(1).max(1);
        assert!(!generation_agrees(&file, exe));
    }
}
