//! Return probes created through tracefs `kprobe_events`, where maxactive can be set.

use std::{
    fs::OpenOptions,
    io::Write,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::programs::ProgramFd;

/// Calls in flight per return probe: the kernel's upper bound (KRETPROBE_MAXACTIVE_MAX).
pub const MAXACTIVE: u32 = 4096;
/// The tracefs event group of fleetsnitch's return probes.
const GROUP: &str = "fleetsnitch";

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// `struct perf_event_attr` up to `config1` (PERF_ATTR_SIZE_VER0, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

/// One kretprobe event with a BPF program attached; detached and removed on drop.
#[derive(Debug)]
pub struct TracefsKretprobe {
    perf: Option<OwnedFd>,
    events: PathBuf,
    name: String,
}

fn tracefs() -> Option<&'static Path> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(Path::new)
        .find(|path| path.join("kprobe_events").exists())
}

fn append(path: &Path, line: &str) -> std::io::Result<()> {
    OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(line.as_bytes())
}

/// Removes the events of fleetsnitch processes that are gone (killed before
/// they could remove their own).
fn remove_stale(events: &Path) {
    let Ok(text) = std::fs::read_to_string(events) else {
        return;
    };
    let prefix = format!("{GROUP}/fs");
    for line in text.lines() {
        let Some(name) = line
            .split_whitespace()
            .next()
            .and_then(|d| d.split(':').nth(1))
        else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = append(events, &format!("-:{name}\n"));
        }
    }
}

impl TracefsKretprobe {
    /// Creates `r<MAXACTIVE>:fleetsnitch/fs<pid>_<function> <function>` and
    /// attaches `program` to it.
    pub fn attach(program: &ProgramFd, function: &str) -> Result<Self, String> {
        let tracefs = tracefs().ok_or("no kprobe_events file in tracefs")?;
        let events = tracefs.join("kprobe_events");
        remove_stale(&events);
        let name = format!("fs{}_{function}", std::process::id());
        // A leftover of an earlier attempt by this process.
        let _ = append(&events, &format!("-:{GROUP}/{name}\n"));
        append(
            &events,
            &format!("r{MAXACTIVE}:{GROUP}/{name} {function}\n"),
        )
        .map_err(|e| format!("writing {}: {e}", events.display()))?;
        let mut probe = Self {
            perf: None,
            events,
            name,
        };
        let id_path = tracefs.join(format!("events/{GROUP}/{}/id", probe.name));
        let id: u64 = std::fs::read_to_string(&id_path)
            .map_err(|e| format!("reading {}: {e}", id_path.display()))?
            .trim()
            .parse()
            .map_err(|e| format!("parsing {}: {e}", id_path.display()))?;
        let attr = PerfEventAttr {
            kind: PERF_TYPE_TRACEPOINT,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config: id,
            sample_period: 1,
            wakeup_events: 1,
            ..PerfEventAttr::default()
        };
        // SAFETY: a valid attr for the duration of the call; pid -1, cpu 0, no group.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                -1 as libc::pid_t,
                0 as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(format!(
                "perf_event_open on {GROUP}/{}: {}",
                probe.name,
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: perf_event_open returned a new file descriptor that we own.
        let perf = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let prog = program.as_fd().as_raw_fd();
        // SAFETY: ioctls on the perf event we own, with a valid program fd.
        let attached = unsafe {
            libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog) == 0
                && libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) == 0
        };
        let error = std::io::Error::last_os_error();
        probe.perf = Some(perf);
        if !attached {
            return Err(format!("attaching to {GROUP}/{}: {error}", probe.name));
        }
        Ok(probe)
    }
}

impl Drop for TracefsKretprobe {
    fn drop(&mut self) {
        // Detach first: an event in use cannot be removed.
        drop(self.perf.take());
        if let Err(error) = append(&self.events, &format!("-:{GROUP}/{}\n", self.name)) {
            tracing::debug!(event = %self.name, %error, "removing the kretprobe event");
        }
    }
}
