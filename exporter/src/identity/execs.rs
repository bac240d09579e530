//! Exec tracking on the identity side: each executed file is opened on the
//! exec reader's thread, at once, and held for the hasher (many programs exit
//! within a millisecond, and their file can then no longer be reached).

use std::sync::Arc;

use fleetsnitch_ebpf::{EXEC_ARGS_TRUNCATED, ExecEvent};
use prometheus_client::{metrics::counter::Counter, registry::Registry};

use super::{
    hashing::{FileHolder, HeldFile, NotHeld},
    processes,
};

/// `fleetsnitch_exec_open_files_exhausted_total`.
#[derive(Debug, Clone, Default)]
pub struct ExecHoldMetrics {
    open_files_exhausted: Counter,
}

impl ExecHoldMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "exec_open_files_exhausted",
            "Executed programs whose file could not be held open for hashing (exec.max_open_files reached); hashed by path instead",
            metrics.open_files_exhausted.clone(),
        );
        metrics
    }
}

/// One exec, as the reader saw it.
pub struct ExecRecord {
    pub event: Box<ExecEvent>,
    /// The executable's path, from the event's own kernel walk.
    pub path: String,
    /// The executable, held open for hashing.
    pub file: Option<Arc<HeldFile>>,
}

/// What the exec reader runs for each exec: names the file and holds it for
/// the hasher, within `max_open_files` descriptors.
pub fn holding_files(
    holder: FileHolder,
    max_open_files: usize,
    metrics: ExecHoldMetrics,
) -> impl FnMut(Box<ExecEvent>) -> ExecRecord + Send + 'static {
    move |event| {
        let identity = &event.identity;
        let exe = processes::exe_key_of(identity);
        let path = processes::exec_path(identity);
        let held = holder.hold(identity.tgid, &path, exe, max_open_files);
        if matches!(held, Err(NotHeld::BudgetExhausted)) {
            metrics.open_files_exhausted.inc();
        }
        ExecRecord {
            file: held.ok(),
            path,
            event,
        }
    }
}

/// The NUL-separated arguments the kernel copied, joined by spaces.
pub fn command_line(event: &ExecEvent) -> Option<String> {
    let len = (event.args_len as usize).min(event.args.len());
    let args: Vec<String> = event.args[..len]
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    if args.is_empty() {
        return None;
    }
    let mut line = args.join(" ");
    if event.args_flags & EXEC_ARGS_TRUNCATED != 0 {
        line.push('…');
    }
    Some(line)
}
