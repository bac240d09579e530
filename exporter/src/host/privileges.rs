//! Least privilege: the capabilities the agent needs to start, the smaller set
//! it keeps once started, and dropping the rest from every thread.
//!
//! Linux keeps capabilities per thread. By the time everything is loaded the
//! tokio workers, the collector, hasher, journal and exporter threads already
//! exist, each with its own copy of the start-up set, and `capset(2)` only
//! changes the calling thread. So the drop runs in the calling thread through
//! the `caps` crate, then in every other thread from a signal handler (what
//! libcap's psx does for C), and is verified from `/proc/self/task/*/status`:
//! the agent refuses to run with a thread that kept more than the run-time set.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use caps::{CapSet, Capability, CapsHashSet};

/// One capability: when the agent needs it and why.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub capability: Capability,
    pub name: &'static str,
    /// Needed to start (load, attach, set up).
    pub startup: bool,
    /// Kept after start-up, for the whole run.
    pub runtime: bool,
    pub why: &'static str,
}

/// The documented set. README "Capabilities", the systemd unit and the Helm
/// chart list the same start-up set; the e2e test checks the run-time set.
pub const NEEDS: &[Need] = &[
    Need {
        capability: Capability::CAP_BPF,
        name: "CAP_BPF",
        startup: true,
        // Kept on kernels before 6.5 only, see runtime_set().
        runtime: false,
        why: "load programs and create maps; on kernels before 6.5 also every bpf() call \
              of the drains (map reads and deletes) while kernel.unprivileged_bpf_disabled \
              is set, so it is kept at run time there",
    },
    Need {
        capability: Capability::CAP_PERFMON,
        name: "CAP_PERFMON",
        startup: true,
        runtime: false,
        why: "attach tracepoints, tp_btf, fexit and kprobe programs, and load programs \
              that read kernel memory",
    },
    Need {
        capability: Capability::CAP_SYS_ADMIN,
        name: "CAP_SYS_ADMIN",
        startup: true,
        runtime: false,
        why: "fanotify_init (executables modified in place), attaching the cgroup \
              programs of DNS capture, mounting tracefs when missing, BPF on kernels \
              without CAP_BPF (< 5.8, where it is kept at run time instead of CAP_BPF)",
    },
    Need {
        capability: Capability::CAP_NET_ADMIN,
        name: "CAP_NET_ADMIN",
        startup: true,
        runtime: false,
        why: "load and attach the cgroup_sock_addr and cgroup_skb programs of DNS capture \
              (CAP_SYS_ADMIN also allows it; with CAP_NET_ADMIN, CAP_SYS_ADMIN is only \
              needed for fanotify)",
    },
    Need {
        capability: Capability::CAP_SYS_RESOURCE,
        name: "CAP_SYS_RESOURCE",
        startup: true,
        runtime: false,
        why: "raise RLIMIT_MEMLOCK for maps on kernels before 5.11",
    },
    Need {
        capability: Capability::CAP_SYS_PTRACE,
        name: "CAP_SYS_PTRACE",
        startup: true,
        runtime: true,
        why: "open /proc/<pid>/exe of processes of other users (and of more privileged \
              ones) to name and hash their executables",
    },
    Need {
        capability: Capability::CAP_DAC_READ_SEARCH,
        name: "CAP_DAC_READ_SEARCH",
        startup: true,
        runtime: true,
        why: "read and hash executables its user could not read, and put fanotify marks \
              on them (fanotify_mark needs read permission on the file)",
    },
    Need {
        capability: Capability::CAP_SETPCAP,
        name: "CAP_SETPCAP",
        startup: true,
        runtime: false,
        why: "shrink the bounding set after start-up, so that no exec can bring the \
              dropped capabilities back; without it the agent warns and keeps the \
              bounding set it was given",
    },
];

const CAP_BPF_NUMBER: u8 = 39;

/// The start-up set as a mask.
pub fn startup_set() -> u64 {
    NEEDS
        .iter()
        .filter(|need| need.startup)
        .fold(0, |set, need| set | need.capability.bitmask())
}

/// The run-time set as a mask, on this kernel. Before Linux 6.5 every bpf()
/// command, map reads on descriptors already open included, is refused without
/// CAP_BPF (or CAP_SYS_ADMIN) while kernel.unprivileged_bpf_disabled is set;
/// from 6.5 on only creating maps and loading programs is (measured on 6.18:
/// the drains work with neither). Without CAP_BPF (< 5.8) CAP_SYS_ADMIN
/// stands in for it.
pub fn runtime_set() -> u64 {
    let mut set = NEEDS
        .iter()
        .filter(|need| need.runtime)
        .fold(0, |set, need| set | need.capability.bitmask());
    if !kernel_at_least(6, 5) {
        set |= if last_cap() < CAP_BPF_NUMBER {
            Capability::CAP_SYS_ADMIN.bitmask()
        } else {
            Capability::CAP_BPF.bitmask()
        };
    }
    set
}

/// Whether the running kernel is at least `major.minor` (from its release
/// string, e.g. `6.18.0-1-amd64`); an unreadable release counts as old, which
/// keeps more rather than breaking the drains.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let found = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    found >= (major, minor)
}

/// Names of the capabilities in `set`, e.g. `CAP_BPF,CAP_SYS_PTRACE`.
pub fn names(set: u64) -> String {
    let mut all: Vec<Capability> = caps::all().into_iter().collect();
    all.sort_by_key(|capability| capability.index());
    let mut text = String::new();
    for capability in all.into_iter().filter(|c| set & c.bitmask() != 0) {
        if !text.is_empty() {
            text.push(',');
        }
        let _ = write!(text, "{capability}");
    }
    text
}

fn last_cap() -> u8 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(40)
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot drop capabilities after start-up ({what}): {detail}")]
    Drop { what: &'static str, detail: String },
    #[error(
        "capabilities could not be dropped in every thread; still holding more than \
         {kept}: {threads}"
    )]
    Threads { kept: String, threads: String },
}

fn drop_error(what: &'static str) -> impl Fn(caps::errors::CapsError) -> PrivilegeError {
    move |error| PrivilegeError::Drop {
        what,
        detail: error.to_string(),
    }
}

/// What the signal handler applies, set before any signal is sent.
static KEEP: AtomicU64 = AtomicU64::new(0);
static SHRINK_BOUNDING: AtomicBool = AtomicBool::new(false);
static LAST_CAP: AtomicU64 = AtomicU64::new(40);

/// Drops every capability outside the run-time set from the effective,
/// permitted, inheritable, ambient and (with CAP_SETPCAP) bounding sets of
/// every thread of the process; returns the set kept.
pub fn drop_to_runtime_set() -> Result<u64, PrivilegeError> {
    let permitted = mask(&caps::read(None, CapSet::Permitted).map_err(drop_error("capget"))?);
    let keep = runtime_set() & permitted;
    let shrink_bounding = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(drop_error("capget"))?;
    if !shrink_bounding {
        tracing::warn!(
            "no CAP_SETPCAP: the bounding set stays as given; an exec could regain those \
             capabilities (grant CAP_SETPCAP at start, or limit the bounding set in the \
             service manager)"
        );
    }
    KEEP.store(keep, Ordering::SeqCst);
    SHRINK_BOUNDING.store(shrink_bounding, Ordering::SeqCst);
    LAST_CAP.store(u64::from(last_cap()), Ordering::SeqCst);

    // This thread, through the caps crate.
    let kept = set_of(keep);
    if shrink_bounding {
        for capability in caps::runtime::thread_all_supported() {
            if keep & capability.bitmask() == 0 {
                caps::drop(None, CapSet::Bounding, capability)
                    .map_err(drop_error("bounding set"))?;
            }
        }
    }
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).map_err(drop_error("ambient set"))?;
    }
    caps::clear(None, CapSet::Inheritable).map_err(drop_error("inheritable set"))?;
    caps::set(None, CapSet::Effective, &kept).map_err(drop_error("effective set"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(drop_error("permitted set"))?;

    // Every other thread, until /proc shows none holding more than `keep`
    // (threads started meanwhile by a thread not yet reduced are caught by the
    // next round; threads started by a reduced one inherit the reduced sets).
    install_handler()?;
    let me = gettid();
    let mut offenders = Vec::new();
    for _round in 0..100 {
        offenders = threads_holding_more_than(keep, shrink_bounding);
        if offenders.is_empty() {
            return Ok(keep);
        }
        for (tid, _) in &offenders {
            if *tid != me {
                // SAFETY: tgkill with this process's id and one of its thread ids;
                // a thread that exited meanwhile makes it fail with ESRCH, harmlessly.
                unsafe {
                    libc::syscall(libc::SYS_tgkill, libc::getpid(), *tid, drop_signal());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(PrivilegeError::Threads {
        kept: names(keep),
        threads: offenders
            .iter()
            .map(|(tid, line)| format!("thread {tid} ({line})"))
            .collect::<Vec<_>>()
            .join("; "),
    })
}

fn set_of(mask_bits: u64) -> CapsHashSet {
    caps::all()
        .into_iter()
        .filter(|capability| mask_bits & capability.bitmask() != 0)
        .collect()
}

fn mask(set: &CapsHashSet) -> u64 {
    set.iter()
        .fold(0, |bits, capability| bits | capability.bitmask())
}

fn gettid() -> i32 {
    // SAFETY: gettid cannot fail.
    unsafe { libc::gettid() }
}

/// A real-time signal nobody else in the agent uses (glibc keeps the first two).
fn drop_signal() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

fn install_handler() -> Result<(), PrivilegeError> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the
    // handler only makes async-signal-safe system calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = reduce_this_thread as extern "C" fn(libc::c_int) as usize;
        // SA_RESTART: system calls the signal interrupts carry on.
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(drop_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(PrivilegeError::Drop {
                what: "signal handler",
                detail: std::io::Error::last_os_error().to_string(),
            });
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The signal handler: the same reduction as [`drop_to_runtime_set`] for the
/// thread it runs in, with raw system calls only (the caps crate allocates,
/// which a signal handler must not). Failures show in /proc and are reported
/// by the caller.
extern "C" fn reduce_this_thread(_signal: libc::c_int) {
    // SAFETY: errno is thread-local; the handler restores it for the code it interrupted.
    let saved_errno = unsafe { *libc::__errno_location() };
    let keep = KEEP.load(Ordering::SeqCst);
    // SAFETY: prctl and capget/capset with valid arguments and live buffers.
    unsafe {
        if SHRINK_BOUNDING.load(Ordering::SeqCst) {
            for capability in 0..=LAST_CAP.load(Ordering::SeqCst) {
                if keep & (1 << capability) == 0 {
                    libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0);
                }
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) == 0 {
            let permitted = u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32);
            let kept = keep & permitted;
            for (index, half) in data.iter_mut().enumerate() {
                let bits = (kept >> (32 * index)) as u32;
                half.effective = bits;
                half.permitted = bits;
                half.inheritable = 0;
            }
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr());
        }
        *libc::__errno_location() = saved_errno;
    }
}

/// Capability sets of one thread, from its `/proc/.../status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ThreadCaps {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
}

/// Parses the `Cap*` lines of a `/proc/<pid>/task/<tid>/status`.
pub fn parse_status(status: &str) -> ThreadCaps {
    let mut caps = ThreadCaps::default();
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let Ok(value) = u64::from_str_radix(value.trim(), 16) else {
            continue;
        };
        match key {
            "CapInh" => caps.inheritable = value,
            "CapPrm" => caps.permitted = value,
            "CapEff" => caps.effective = value,
            "CapBnd" => caps.bounding = value,
            "CapAmb" => caps.ambient = value,
            _ => {}
        }
    }
    caps
}

/// Threads of this process with any capability beyond `keep` (in the bounding
/// set too when it could be shrunk), with their name and sets.
fn threads_holding_more_than(keep: u64, check_bounding: bool) -> Vec<(i32, String)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return vec![(0, "cannot list /proc/self/task".to_owned())];
    };
    let mut offenders = Vec::new();
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // A thread that exited meanwhile has no status any more: nothing to drop.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let sets = parse_status(&status);
        let beyond = (sets.effective | sets.permitted) & !keep != 0
            || sets.inheritable != 0
            || sets.ambient != 0
            || (check_bounding && sets.bounding & !keep != 0);
        if beyond {
            let name = status
                .lines()
                .find_map(|line| line.strip_prefix("Name:"))
                .unwrap_or("")
                .trim()
                .to_owned();
            offenders.push((
                tid,
                format!(
                    "{name}: CapEff {:#x} CapPrm {:#x} CapBnd {:#x}",
                    sets.effective, sets.permitted, sets.bounding
                ),
            ));
        }
    }
    offenders
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_set_is_part_of_the_startup_set() {
        assert_eq!(
            runtime_set() & !startup_set() & !Capability::CAP_SYS_ADMIN.bitmask(),
            0
        );
        let expected = if kernel_at_least(6, 5) {
            "CAP_DAC_READ_SEARCH,CAP_SYS_PTRACE"
        } else if last_cap() >= CAP_BPF_NUMBER {
            "CAP_DAC_READ_SEARCH,CAP_SYS_PTRACE,CAP_BPF"
        } else {
            "CAP_DAC_READ_SEARCH,CAP_SYS_PTRACE,CAP_SYS_ADMIN"
        };
        assert_eq!(names(runtime_set()), expected);
    }

    #[test]
    fn systemd_unit_and_helm_chart_grant_exactly_the_startup_set() {
        use std::collections::BTreeSet;
        let expected: BTreeSet<String> = NEEDS
            .iter()
            .filter(|need| need.startup)
            .map(|need| need.name.to_owned())
            .collect();
        let unit = include_str!("../../systemd/fleetsnitch.service");
        for key in ["CapabilityBoundingSet=", "AmbientCapabilities="] {
            let listed: BTreeSet<String> = unit
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in the unit"))
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            assert_eq!(
                listed, expected,
                "{key} of exporter/systemd/fleetsnitch.service"
            );
        }
        let values: yaml_serde::Value =
            yaml_serde::from_str(include_str!("../../../helm/fleetsnitch/values.yaml")).unwrap();
        let listed: BTreeSet<String> = values["capabilities"]
            .as_sequence()
            .expect("capabilities list in values.yaml")
            .iter()
            .map(|name| format!("CAP_{}", name.as_str().unwrap()))
            .collect();
        assert_eq!(
            listed, expected,
            "capabilities of helm/fleetsnitch/values.yaml"
        );
    }

    #[test]
    fn status_lines_are_parsed() {
        let caps = parse_status(
            "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000008000080004\n\
             CapEff:\t0000008000080004\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n",
        );
        assert_eq!(caps.effective, 0x80_0008_0004);
        assert_eq!(caps.bounding, 0x1ff_ffff_ffff);
    }
}
