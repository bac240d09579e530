//! The node as seen from wherever the agent runs.
//!
//! On a plain host the agent's root directory is the node's. In the chart's
//! pod it is not: the pod has its own mount namespace whose root is the
//! image, while it shares the node's PID namespace (`hostPID`). The node's
//! files are then reached through the node's root mounted into the pod
//! (`--path.rootfs`, as node_exporter names it: the chart mounts `/` at
//! `/host`), else through init's root, `/proc/1/root`, which the kernel
//! resolves in init's mount namespace (reading it needs `CAP_SYS_PTRACE`
//! over init, which some sandboxes refuse even to root).

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// Init's root directory: the node's file system, from any mount namespace
/// of the node's PID namespace.
const INIT_ROOT: &str = "/proc/1/root";

static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Errors of `--path.rootfs`.
#[derive(Debug, thiserror::Error)]
pub enum NodeRootError {
    #[error("--path.rootfs {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--path.rootfs {}: not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("--path.rootfs must be given before the node's files are first read")]
    TooLate,
}

/// The node's root file system is mounted at `path` (`--path.rootfs`).
pub fn use_root(path: &Path) -> Result<(), NodeRootError> {
    let metadata = fs::metadata(path).map_err(|source| NodeRootError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    if !metadata.is_dir() {
        return Err(NodeRootError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    // `/` is the agent's own root: nothing to translate.
    let root = (path != Path::new("/")).then(|| path.to_path_buf());
    ROOT.set(root).map_err(|_| NodeRootError::TooLate)?;
    tracing::info!(root = %path.display(), "the node's files are read under --path.rootfs");
    Ok(())
}

/// The node's root directory when it is not the agent's own (the agent runs
/// in a mount namespace of its own, as in the chart's pod); `None` on the
/// host itself, or when neither `--path.rootfs` was given nor init's
/// namespace can be read (then the agent's own root is the best view it has).
pub fn foreign_root() -> Option<&'static Path> {
    ROOT.get_or_init(|| {
        let own = fs::metadata("/proc/self/ns/mnt").ok()?.ino();
        let init = match fs::metadata("/proc/1/ns/mnt") {
            Ok(metadata) => metadata.ino(),
            Err(error) => {
                tracing::debug!(%error, "cannot read init's mount namespace: paths are the agent's own");
                return None;
            }
        };
        if own == init {
            return None;
        }
        tracing::info!(
            "the agent's mount namespace is not the node's: node files are read through {INIT_ROOT}"
        );
        Some(PathBuf::from(INIT_ROOT))
    })
    .as_deref()
}

/// Where the agent reaches the node's file `path` (an absolute path as the
/// node sees it).
pub fn path_on_node(path: &Path) -> PathBuf {
    match foreign_root() {
        Some(root) => root.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_path_buf(),
    }
}
