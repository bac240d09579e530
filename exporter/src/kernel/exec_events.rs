//! Exec tracking's reader: a thread that only drains the `exec_events` ring
//! buffer and opens each executed file at once, while the program may still
//! run (many exit within a millisecond). Everything slower (parent, container,
//! metrics, hashing, journal) happens later, on the collector and the hasher,
//! which receive each exec with its file already held.

use std::{
    io,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
};

use aya::maps::{MapData, RingBuf};
use fleetsnitch_ebpf::{EVENT_EXEC, ExecEvent, IDENTITY_NO_EXE};

use crate::{
    identity::hashing::{FileHolder, HeldFile, NotHeld},
    identity::processes::{self, ExeKey},
};

/// Execs read but not yet taken by the collector; past this the reader waits
/// and the kernel counts what no longer fits in the ring buffer.
const QUEUE: usize = 16_384;

/// One exec, as the reader saw it.
pub struct ExecRecord {
    pub event: Box<ExecEvent>,
    /// The executable's path, from the event's own kernel walk.
    pub path: String,
    /// The executable, held open for hashing.
    pub file: Option<Arc<HeldFile>>,
    /// Not held because `exec.max_open_files` descriptors were held already.
    pub budget_exhausted: bool,
}

/// The reader thread; stopped and joined on drop.
pub struct ExecReader {
    records: Option<mpsc::Receiver<ExecRecord>>,
    alive: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ExecReader {
    pub fn spawn(
        events: RingBuf<MapData>,
        holder: FileHolder,
        max_open_files: usize,
    ) -> io::Result<Self> {
        ensure_descriptor_limit(max_open_files);
        let (sender, records) = mpsc::sync_channel(QUEUE);
        let alive = Arc::new(AtomicBool::new(true));
        let running = alive.clone();
        let thread = thread::Builder::new()
            .name("fleetsnitch-exec".into())
            .spawn(move || read(events, &holder, max_open_files, &sender, &running))?;
        Ok(Self {
            records: Some(records),
            alive,
            thread: Some(thread),
        })
    }

    /// The execs read since the last call.
    pub fn take(&self) -> impl Iterator<Item = ExecRecord> + '_ {
        self.records.iter().flat_map(mpsc::Receiver::try_iter)
    }
}

impl Drop for ExecReader {
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

fn read(
    mut events: RingBuf<MapData>,
    holder: &FileHolder,
    max_open_files: usize,
    sender: &mpsc::SyncSender<ExecRecord>,
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
        unsafe { libc::poll(&mut poll, 1, 100) };
        while let Some(item) = events.next() {
            let bytes: &[u8] = &item;
            if bytes.len() < size_of::<ExecEvent>() || bytes[..4] != EVENT_EXEC.to_ne_bytes()[..] {
                tracing::warn!(len = bytes.len(), "unexpected exec ring buffer record");
                continue;
            }
            // SAFETY: the length was checked; ExecEvent is plain integers and
            // byte arrays, valid for any bit pattern.
            let event: Box<ExecEvent> =
                Box::new(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) });
            drop(item);
            if event.identity.flags & IDENTITY_NO_EXE != 0 {
                continue;
            }
            let identity = &event.identity;
            let exe = ExeKey::from_kernel(identity.exe_dev, identity.exe_ino);
            let path = processes::exec_path(identity);
            let held = holder.hold(identity.tgid, &path, exe, max_open_files);
            let record = ExecRecord {
                budget_exhausted: matches!(held, Err(NotHeld::BudgetExhausted)),
                file: held.ok(),
                path,
                event,
            };
            if sender.send(record).is_err() {
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
fn ensure_descriptor_limit(max_open_files: usize) {
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
