//! Exec tracking on the identity side: each executed file is opened on the
//! exec reader's thread, at once, and held for the hasher (many programs exit
//! within a millisecond, and their file can then no longer be reached).

use std::sync::Arc;

use fleetsnitch_ebpf::{ARGS_LEN, EXEC_ARGS_TRUNCATED, ExecEvent};
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

/// The NUL-separated arguments the kernel copied, joined by spaces: invalid
/// UTF-8 escaped as `\xNN` and a cut marked `…`, as for connection records
/// (the kernel's copy is the only cut: escapes may make the line longer).
pub fn command_line(event: &ExecEvent) -> Option<String> {
    let len = (event.args_len as usize).min(event.args.len());
    super::command_line::from_args(
        &event.args[..len],
        4 * ARGS_LEN,
        event.args_flags & EXEC_ARGS_TRUNCATED != 0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec_with_args(args: &[u8], flags: u32) -> Box<ExecEvent> {
        // SAFETY: ExecEvent is plain data (aya::Pod): all zeroes is a valid value.
        let mut event: Box<ExecEvent> = Box::new(unsafe { std::mem::zeroed() });
        event.args[..args.len()].copy_from_slice(args);
        event.args_len = args.len() as u32;
        event.args_flags = flags;
        event
    }

    #[test]
    fn an_exec_command_line_is_escaped_like_a_connection_records() {
        let event = exec_with_args(b"/bin/tool\0--name\0caf\xe9\0", 0);
        assert_eq!(
            command_line(&event).as_deref(),
            Some("/bin/tool --name caf\\xe9")
        );
        let cut = exec_with_args(b"/bin/tool\0abc", EXEC_ARGS_TRUNCATED);
        assert_eq!(command_line(&cut).as_deref(), Some("/bin/tool abc…"));
        assert_eq!(command_line(&exec_with_args(b"", 0)), None);
    }
}
