//! Exec tracking's reader: a thread that only drains the `exec_events` ring
//! buffer and hands each exec at once to a function run on that thread (the
//! agent's opens the executed file while the program may still run: many exit
//! within a millisecond). Everything slower (parent, container, metrics,
//! hashing, journal) happens later, on the collector and the hasher, which
//! receive what that function returned.

use std::{
    io,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use fleetsnitch_ebpf::{EVENT_EXEC, ExecEvent, IDENTITY_NO_EXE};
use serde::Deserialize;

use super::ring;
use crate::support::{InvalidValue, check_range, check_ring_buffer};

/// Execs read but not yet taken by the collector; past this the reader waits
/// and the kernel counts what no longer fits in the ring buffer.
const QUEUE: usize = 16_384;

/// How long the reader sleeps in poll(2) before it looks at its stop flag.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// The `exec:` section of the configuration: every executed program, not
/// only those on the network.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ExecConfig {
    /// Journal and export every executed program. Off: the exec probe is not attached.
    pub enabled: bool,
    /// Size of the ring buffer carrying exec events to the agent.
    pub ring_buffer_bytes: u32,
    /// Read each program's command line (it may hold secrets) for the OTLP records.
    pub record_command_lines: bool,
    /// File descriptors held open on executables waiting to be hashed.
    pub max_open_files: u32,
}

impl Default for ExecConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ring_buffer_bytes: 1 << 20,
            record_command_lines: false,
            max_open_files: 256,
        }
    }
}

impl ExecConfig {
    pub fn validate(&self) -> Result<(), InvalidValue> {
        check_ring_buffer("exec.ring_buffer_bytes", self.ring_buffer_bytes)?;
        check_range("exec.max_open_files", self.max_open_files, 1, 65_536)
    }
}

/// The reader thread; stopped and joined on drop.
pub struct ExecReader<T> {
    records: Option<mpsc::Receiver<T>>,
    alive: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> ExecReader<T> {
    /// Starts the reader; `on_exec` runs on its thread for every exec of a
    /// file (kernel threads' execs are skipped) and what it returns is queued.
    pub fn spawn(
        events: RingBuf<MapData>,
        on_exec: impl FnMut(Box<ExecEvent>) -> T + Send + 'static,
    ) -> io::Result<Self> {
        let (sender, records) = mpsc::sync_channel(QUEUE);
        let alive = Arc::new(AtomicBool::new(true));
        let running = alive.clone();
        let thread = thread::Builder::new()
            .name("fleetsnitch-exec".into())
            .spawn(move || read(events, on_exec, &sender, &running))?;
        Ok(Self {
            records: Some(records),
            alive,
            thread: Some(thread),
        })
    }

    /// The execs read since the last call.
    pub fn take(&self) -> impl Iterator<Item = T> + '_ {
        self.records.iter().flat_map(mpsc::Receiver::try_iter)
    }
}

impl<T> Drop for ExecReader<T> {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
        // A reader blocked on a full queue returns once the receiver is gone.
        drop(self.records.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the exec reader thread panicked");
        }
    }
}

fn read<T>(
    mut events: RingBuf<MapData>,
    mut on_exec: impl FnMut(Box<ExecEvent>) -> T,
    sender: &mpsc::SyncSender<T>,
    alive: &AtomicBool,
) {
    raise_priority();
    while alive.load(Ordering::Relaxed) {
        let mut poll = libc::pollfd {
            fd: events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut poll, 1, POLL_TIMEOUT.as_millis() as libc::c_int) };
        while let Some(item) = events.next() {
            let bytes: &[u8] = &item;
            let event = match ring::kind(bytes) {
                Some(EVENT_EXEC) => ring::read::<ExecEvent>(bytes).map(Box::new),
                _ => None,
            };
            drop(item);
            let Some(event) = event else {
                tracing::warn!("unexpected exec ring buffer record");
                continue;
            };
            if event.identity.flags & IDENTITY_NO_EXE != 0 {
                continue;
            }
            if sender.send(on_exec(event)).is_err() {
                return;
            }
        }
    }
}

/// Nice value of the reader thread: it must run between an exec and the
/// program's exit, often under a millisecond later, even on a busy host; it
/// does little per event, so it cannot crowd anything out.
const READER_NICE: libc::c_int = -10;

fn raise_priority() {
    // SAFETY: gettid has no preconditions; setpriority on this thread's id.
    let done = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, READER_NICE) == 0
    };
    if !done {
        tracing::info!(
            error = %io::Error::last_os_error(),
            "exec reader runs at normal priority (CAP_SYS_NICE missing?): programs that exit \
             within a millisecond on a busy host may then go unhashed"
        );
    }
}

/// Descriptors the agent needs besides those held for hashing (maps, programs,
/// sockets, the journal, fanotify).
const OTHER_DESCRIPTORS: u64 = 1024;

/// Raises the soft RLIMIT_NOFILE so `exec.max_open_files` held descriptors fit
/// beside the others (picosnitch's "Set RLIMIT_NOFILE"); up to the hard limit.
pub fn ensure_descriptor_limit(max_open_files: usize) {
    let want = max_open_files as u64 + OTHER_DESCRIPTORS;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= want {
            return;
        }
        limit.rlim_cur = want.min(limit.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    if limit.rlim_cur < want {
        tracing::warn!(
            limit = limit.rlim_cur,
            wanted = want,
            "RLIMIT_NOFILE is below exec.max_open_files plus the agent's own descriptors: \
             lower exec.max_open_files or raise the hard limit"
        );
    }
}
