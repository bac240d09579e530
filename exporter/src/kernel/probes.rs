//! Loading the kernel programs and choosing, per kernel, how each hook attaches.
//!
//! The choice is data: [`PROBES`] lists each hook with its attachment modes in
//! order of preference. [`attach_all`] walks the table, keeps the first mode
//! that loads and attaches, and remembers why the others did not, so an
//! operator can see both in the log and in `fleetsnitch_probe_attached`.

use std::{fmt, sync::Arc};

use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FExit, KProbe, ProbeKind, ProgramError, TracePoint},
};

/// How one program attaches to the kernel.
#[derive(Debug, Clone, Copy)]
pub enum Hook {
    /// BTF-typed tracepoint (`tp_btf`), by tracepoint name.
    BtfTracePoint(&'static str),
    /// BPF trampoline after a kernel function returns.
    FExit(&'static str),
    /// kprobe or kretprobe (decided by the program's section) on a function.
    KProbe(&'static str),
    /// Classic tracepoint, by category and name.
    TracePoint(&'static str, &'static str),
}

/// One program of the object and where it attaches.
#[derive(Debug, Clone, Copy)]
pub struct Attachment {
    pub program: &'static str,
    pub hook: Hook,
    /// `Some(when)`: the mode still fits if this one cannot attach (the hooked
    /// function is not on every kernel); `when` says which kernels lack it.
    pub optional: Option<&'static str>,
}

/// One way to provide a probe: all its required programs attach, or none stays.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub name: &'static str,
    pub attachments: &'static [Attachment],
}

/// A capability of the agent and the modes that can provide it.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub name: &'static str,
    /// Without a required probe the agent cannot count correctly and refuses to start.
    pub required: bool,
    /// What is missing when no mode fits, for the error message.
    pub needs: &'static str,
    pub modes: &'static [Mode],
}

const fn at(program: &'static str, hook: Hook) -> Attachment {
    Attachment {
        program,
        hook,
        optional: None,
    }
}

const fn optional(program: &'static str, hook: Hook, when: &'static str) -> Attachment {
    Attachment {
        program,
        hook,
        optional: Some(when),
    }
}

/// Names a mode can have, for validating `probes.disabled_modes`.
pub const MODE_NAMES: &[&str] = &["tp_btf", "fexit", "kprobe", "tracepoint"];

const NO_IPV6: &str = "kernels with IPv6 as a module that is not loaded";
const NO_PACKET: &str = "kernels with AF_PACKET as a module that is not loaded";
const NO_SENDPAGE: &str =
    "kernels from 6.5 on, which send sendfile/splice data through inet_sendmsg";

// Below the tracepoints, the hooks sit on the protocol families' sendmsg/recvmsg
// (what sock->ops points to), not on sock_sendmsg/sock_recvmsg: the syscalls reach
// the protocol through __sock_sendmsg and sendmmsg/recvmmsg through the inlined
// sock_*msg_nosec, bypassing those two (ebpf/bpf/fleetsnitch.bpf.c says more).

/// Every probe, each with its modes from most to least preferred.
pub const PROBES: &[Probe] = &[
    Probe {
        name: "socket_send",
        required: true,
        needs: "the sock:sock_send_length tracepoint (Linux >= 6.3), BPF trampolines (fexit) \
                or kprobes on inet_sendmsg",
        modes: &[
            Mode {
                name: "tp_btf",
                attachments: &[at(
                    "send_length_btf",
                    Hook::BtfTracePoint("sock_send_length"),
                )],
            },
            Mode {
                name: "fexit",
                attachments: &[
                    at("inet_sendmsg_fexit", Hook::FExit("inet_sendmsg")),
                    optional("inet6_sendmsg_fexit", Hook::FExit("inet6_sendmsg"), NO_IPV6),
                    optional(
                        "packet_sendmsg_fexit",
                        Hook::FExit("packet_sendmsg"),
                        NO_PACKET,
                    ),
                    optional(
                        "tcp_sendpage_fexit",
                        Hook::FExit("tcp_sendpage"),
                        NO_SENDPAGE,
                    ),
                    optional(
                        "udp_sendpage_fexit",
                        Hook::FExit("udp_sendpage"),
                        NO_SENDPAGE,
                    ),
                ],
            },
            Mode {
                name: "kprobe",
                attachments: &[
                    at("inet_sendmsg_kprobe", Hook::KProbe("inet_sendmsg")),
                    at("inet_sendmsg_kretprobe", Hook::KProbe("inet_sendmsg")),
                    optional(
                        "inet6_sendmsg_kprobe",
                        Hook::KProbe("inet6_sendmsg"),
                        NO_IPV6,
                    ),
                    optional(
                        "inet6_sendmsg_kretprobe",
                        Hook::KProbe("inet6_sendmsg"),
                        NO_IPV6,
                    ),
                    optional(
                        "packet_sendmsg_kprobe",
                        Hook::KProbe("packet_sendmsg"),
                        NO_PACKET,
                    ),
                    optional(
                        "packet_sendmsg_kretprobe",
                        Hook::KProbe("packet_sendmsg"),
                        NO_PACKET,
                    ),
                    optional(
                        "tcp_sendpage_kprobe",
                        Hook::KProbe("tcp_sendpage"),
                        NO_SENDPAGE,
                    ),
                    optional(
                        "tcp_sendpage_kretprobe",
                        Hook::KProbe("tcp_sendpage"),
                        NO_SENDPAGE,
                    ),
                    optional(
                        "udp_sendpage_kprobe",
                        Hook::KProbe("udp_sendpage"),
                        NO_SENDPAGE,
                    ),
                    optional(
                        "udp_sendpage_kretprobe",
                        Hook::KProbe("udp_sendpage"),
                        NO_SENDPAGE,
                    ),
                ],
            },
        ],
    },
    Probe {
        name: "socket_receive",
        required: true,
        needs: "the sock:sock_recv_length tracepoint (Linux >= 6.3), BPF trampolines (fexit) \
                or kprobes on inet_recvmsg",
        modes: &[
            Mode {
                name: "tp_btf",
                attachments: &[at(
                    "recv_length_btf",
                    Hook::BtfTracePoint("sock_recv_length"),
                )],
            },
            Mode {
                name: "fexit",
                attachments: &[
                    at("inet_recvmsg_fexit", Hook::FExit("inet_recvmsg")),
                    optional("inet6_recvmsg_fexit", Hook::FExit("inet6_recvmsg"), NO_IPV6),
                    optional(
                        "packet_recvmsg_fexit",
                        Hook::FExit("packet_recvmsg"),
                        NO_PACKET,
                    ),
                ],
            },
            Mode {
                name: "kprobe",
                attachments: &[
                    at("inet_recvmsg_kprobe", Hook::KProbe("inet_recvmsg")),
                    at("inet_recvmsg_kretprobe", Hook::KProbe("inet_recvmsg")),
                    optional(
                        "inet6_recvmsg_kprobe",
                        Hook::KProbe("inet6_recvmsg"),
                        NO_IPV6,
                    ),
                    optional(
                        "inet6_recvmsg_kretprobe",
                        Hook::KProbe("inet6_recvmsg"),
                        NO_IPV6,
                    ),
                    optional(
                        "packet_recvmsg_kprobe",
                        Hook::KProbe("packet_recvmsg"),
                        NO_PACKET,
                    ),
                    optional(
                        "packet_recvmsg_kretprobe",
                        Hook::KProbe("packet_recvmsg"),
                        NO_PACKET,
                    ),
                ],
            },
        ],
    },
    Probe {
        name: "splice_receive",
        required: false,
        needs: "the syscalls:sys_enter_splice and sys_exit_splice tracepoints \
                (CONFIG_FTRACE_SYSCALLS)",
        modes: &[Mode {
            name: "tracepoint",
            attachments: &[
                at(
                    "splice_enter",
                    Hook::TracePoint("syscalls", "sys_enter_splice"),
                ),
                at(
                    "splice_exit",
                    Hook::TracePoint("syscalls", "sys_exit_splice"),
                ),
            ],
        }],
    },
    Probe {
        name: "process_exit",
        required: false,
        needs: "the sched:sched_process_exit tracepoint",
        modes: &[Mode {
            name: "tracepoint",
            attachments: &[at(
                "process_exit",
                Hook::TracePoint("sched", "sched_process_exit"),
            )],
        }],
    },
    // Exec tracking (exec.enabled): every executed program, not only those on
    // the network. Left out of the attach walk when the switch is off.
    Probe {
        name: EXEC_PROBE,
        required: false,
        needs: "the sched:sched_process_exec tracepoint",
        modes: &[
            Mode {
                name: "tp_btf",
                attachments: &[at(
                    "process_exec_btf",
                    Hook::BtfTracePoint("sched_process_exec"),
                )],
            },
            Mode {
                name: "tracepoint",
                attachments: &[at(
                    "process_exec",
                    Hook::TracePoint("sched", "sched_process_exec"),
                )],
            },
        ],
    },
];

/// The probe of exec tracking, attached only when `exec.enabled` is on.
pub const EXEC_PROBE: &str = "process_exec";

/// What happened to one probe.
#[derive(Debug, Clone)]
pub struct ProbeOutcome {
    pub probe: &'static str,
    pub required: bool,
    /// The mode that attached, if any.
    pub mode: Option<&'static str>,
    /// Each mode tried before (or instead of) the one that attached, with its error.
    pub rejected: Vec<(&'static str, String)>,
    /// Return probes created through tracefs (aya cannot set their maxactive): they
    /// stay attached as long as this outcome (or a clone) lives.
    pub kretprobes: Vec<Arc<kretprobe::TracefsKretprobe>>,
}

#[derive(Debug, thiserror::Error)]
pub struct NoModeFits {
    pub probe: &'static str,
    pub needs: &'static str,
    pub rejected: Vec<(&'static str, String)>,
}

impl fmt::Display for NoModeFits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this kernel cannot run the required probe {}: it needs {}",
            self.probe, self.needs
        )?;
        for (mode, error) in &self.rejected {
            write!(f, "; {mode}: {error}")?;
        }
        Ok(())
    }
}

/// Attaches every probe in [`PROBES`] but those named in `left_out` (features
/// switched off: not attached, not reported); fails if a required one cannot attach.
///
/// Modes named in `disabled` are skipped, and say so in the outcome.
pub fn attach_all(
    ebpf: &mut Ebpf,
    btf: &Btf,
    disabled: &[String],
    left_out: &[&str],
) -> Result<Vec<ProbeOutcome>, NoModeFits> {
    let mut outcomes = Vec::with_capacity(PROBES.len());
    for probe in PROBES {
        if left_out.contains(&probe.name) {
            tracing::debug!(probe = probe.name, "probe switched off by configuration");
            continue;
        }
        let outcome = attach_probe(ebpf, btf, probe, disabled);
        match outcome.mode {
            Some(mode) => tracing::info!(probe = probe.name, mode, "probe attached"),
            None if probe.required => {
                return Err(NoModeFits {
                    probe: probe.name,
                    needs: probe.needs,
                    rejected: outcome.rejected,
                });
            }
            None => tracing::warn!(
                probe = probe.name,
                needs = probe.needs,
                rejected = ?outcome.rejected,
                "optional probe not attached: what it counts is missing"
            ),
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn attach_probe(ebpf: &mut Ebpf, btf: &Btf, probe: &Probe, disabled: &[String]) -> ProbeOutcome {
    let mut rejected = Vec::new();
    for mode in probe.modes {
        if disabled.iter().any(|name| name == mode.name) {
            rejected.push((mode.name, "disabled by probes.disabled_modes".to_owned()));
            continue;
        }
        match attach_mode(ebpf, btf, mode) {
            Ok(kretprobes) => {
                return ProbeOutcome {
                    probe: probe.name,
                    required: probe.required,
                    mode: Some(mode.name),
                    rejected,
                    kretprobes,
                };
            }
            Err(error) => {
                tracing::debug!(probe = probe.name, mode = mode.name, %error, "mode rejected");
                rejected.push((mode.name, error));
            }
        }
    }
    ProbeOutcome {
        probe: probe.name,
        required: probe.required,
        mode: None,
        rejected,
        kretprobes: Vec::new(),
    }
}

/// Where the kernel lists its kprobe PMU; absent when CONFIG_KPROBES is off.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

/// Loads and attaches every program of `mode`; on failure unloads those that did.
/// Returns the return probes it attached through tracefs, which must be kept.
fn attach_mode(
    ebpf: &mut Ebpf,
    btf: &Btf,
    mode: &Mode,
) -> Result<Vec<Arc<kretprobe::TracefsKretprobe>>, String> {
    let uses_kprobes = mode
        .attachments
        .iter()
        .any(|attachment| matches!(attachment.hook, Hook::KProbe(_)));
    if uses_kprobes && !std::path::Path::new(KPROBE_PMU).exists() {
        return Err(format!(
            "kprobes are not available in this kernel ({KPROBE_PMU} is missing: CONFIG_KPROBES is off)"
        ));
    }
    let mut attached: Vec<(&Attachment, Option<Arc<kretprobe::TracefsKretprobe>>)> = Vec::new();
    let mut missing: Vec<&Attachment> = Vec::new();
    for attachment in mode.attachments {
        match attach_one(ebpf, btf, attachment) {
            Ok(kretprobe) => attached.push((attachment, kretprobe)),
            Err(error) => {
                let Some(when) = attachment.optional else {
                    for (done, kretprobe) in attached {
                        drop(kretprobe);
                        unload(ebpf, done.program);
                    }
                    return Err(format!(
                        "program {}: {}",
                        attachment.program,
                        error_chain(&error)
                    ));
                };
                tracing::warn!(
                    mode = mode.name,
                    program = attachment.program,
                    function = hooked(attachment),
                    error = %error_chain(&error),
                    "optional hook not attached (expected on {when}): traffic through it is not counted"
                );
                missing.push(attachment);
            }
        }
    }
    // A kprobe without its kretprobe (or the reverse) would count nothing and
    // leave stale entries: drop what attached of a function that did not fully.
    let mut kept = Vec::new();
    for (done, kretprobe) in attached {
        if missing.iter().any(|m| hooked(m) == hooked(done)) {
            drop(kretprobe);
            unload(ebpf, done.program);
        } else {
            kept.extend(kretprobe);
        }
    }
    Ok(kept)
}

/// The kernel function or tracepoint an attachment hooks.
fn hooked(attachment: &Attachment) -> &'static str {
    match attachment.hook {
        Hook::BtfTracePoint(name) | Hook::FExit(name) | Hook::KProbe(name) => name,
        Hook::TracePoint(_, name) => name,
    }
}

fn attach_one(
    ebpf: &mut Ebpf,
    btf: &Btf,
    attachment: &Attachment,
) -> Result<Option<Arc<kretprobe::TracefsKretprobe>>, ProgramError> {
    let program = ebpf
        .program_mut(attachment.program)
        .ok_or(ProgramError::UnexpectedProgramType)?;
    let result = match attachment.hook {
        Hook::BtfTracePoint(tracepoint) => {
            let program: &mut BtfTracePoint = program.try_into()?;
            program.load(tracepoint, btf)?;
            program.attach().map(|_| None)
        }
        Hook::FExit(function) => {
            let program: &mut FExit = program.try_into()?;
            program.load(function, btf)?;
            program.attach().map(|_| None)
        }
        Hook::KProbe(function) => {
            let program: &mut KProbe = program.try_into()?;
            program.load()?;
            if matches!(program.kind(), ProbeKind::Return) {
                attach_kretprobe(program, function)
            } else {
                program.attach(function, 0).map(|_| None)
            }
        }
        Hook::TracePoint(category, name) => {
            let program: &mut TracePoint = program.try_into()?;
            program.load()?;
            program.attach(category, name).map(|_| None)
        }
    };
    if result.is_err() {
        unload(ebpf, attachment.program);
    }
    result
}

/// A return probe with room for many calls in flight. The kernel's default
/// maxactive (num_possible_cpus() on 5.10 without CONFIG_PREEMPTION, at most
/// max(10, 2 * CPUs) elsewhere) is used up by threads blocked in recvmsg, and
/// every return past it is silently missed; aya cannot set it, tracefs can.
fn attach_kretprobe(
    program: &mut KProbe,
    function: &str,
) -> Result<Option<Arc<kretprobe::TracefsKretprobe>>, ProgramError> {
    match kretprobe::TracefsKretprobe::attach(program.fd()?, function) {
        Ok(kretprobe) => Ok(Some(Arc::new(kretprobe))),
        Err(error) => {
            // A function this kernel lacks fails here too, and says so.
            program.attach(function, 0)?;
            tracing::warn!(
                function,
                %error,
                "cannot create a kretprobe through tracefs; using the kernel's default \
                 maxactive: returns are missed while many threads wait in {function}"
            );
            Ok(None)
        }
    }
}

fn unload(ebpf: &mut Ebpf, name: &str) {
    let Some(program) = ebpf.program_mut(name) else {
        return;
    };
    let result = match program {
        aya::programs::Program::BtfTracePoint(p) => p.unload(),
        aya::programs::Program::FExit(p) => p.unload(),
        aya::programs::Program::KProbe(p) => p.unload(),
        aya::programs::Program::TracePoint(p) => p.unload(),
        _ => Ok(()),
    };
    if let Err(error) = result {
        tracing::debug!(program = name, %error, "unload after a failed attach");
    }
}

/// An error and its sources on one line: aya's top-level messages alone often
/// omit the errno that explains them.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Return probes created through tracefs `kprobe_events`, where maxactive can be set.
pub mod kretprobe {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_probe_has_a_mode_and_unique_programs() {
        let mut programs = std::collections::HashSet::new();
        for probe in PROBES {
            assert!(!probe.modes.is_empty(), "{} has no mode", probe.name);
            for mode in probe.modes {
                for attachment in mode.attachments {
                    assert!(
                        programs.insert(attachment.program),
                        "program {} is listed twice",
                        attachment.program
                    );
                }
            }
        }
    }

    #[test]
    fn every_mode_starts_with_what_it_requires() {
        for probe in PROBES {
            for mode in probe.modes {
                let first_optional = mode
                    .attachments
                    .iter()
                    .position(|a| a.optional.is_some())
                    .unwrap_or(mode.attachments.len());
                assert!(
                    first_optional > 0,
                    "{} {} has no required attachment",
                    probe.name,
                    mode.name
                );
                assert!(
                    mode.attachments[first_optional..]
                        .iter()
                        .all(|a| a.optional.is_some()),
                    "{} {}: required attachments must come first, so a mode that does \
                     not fit attaches nothing optional",
                    probe.name,
                    mode.name
                );
            }
        }
    }

    #[test]
    fn refusal_names_the_probe_what_it_needs_and_each_rejection() {
        let error = NoModeFits {
            probe: "socket_send",
            needs: "the sock:sock_send_length tracepoint",
            rejected: vec![("tp_btf", "not found".into()), ("kprobe", "EPERM".into())],
        };
        let text = error.to_string();
        assert!(text.contains("socket_send"), "{text}");
        assert!(text.contains("sock_send_length"), "{text}");
        assert!(text.contains("tp_btf: not found"), "{text}");
        assert!(text.contains("kprobe: EPERM"), "{text}");
    }
}
