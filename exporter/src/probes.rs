//! Loading the kernel programs and choosing, per kernel, how each hook attaches.
//!
//! The choice is data: [`PROBES`] lists each hook with its attachment modes in
//! order of preference. [`attach_all`] walks the table, keeps the first mode
//! that loads and attaches, and remembers why the others did not, so an
//! operator can see both in the log and in `fleetsnitch_probe_attached`.

use std::fmt;

use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FExit, KProbe, ProgramError, TracePoint},
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
}

/// One way to provide a probe: all its programs attach, or none stays.
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
    Attachment { program, hook }
}

/// Names a mode can have, for validating `probes.disabled_modes`.
pub const MODE_NAMES: &[&str] = &["tp_btf", "fexit", "kprobe", "tracepoint"];

/// Every probe, each with its modes from most to least preferred.
pub const PROBES: &[Probe] = &[
    Probe {
        name: "socket_send",
        required: true,
        needs: "the sock:sock_send_length tracepoint (Linux >= 6.3), BPF trampolines (fexit) \
                or kprobes on sock_sendmsg",
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
                attachments: &[at("sendmsg_fexit", Hook::FExit("sock_sendmsg"))],
            },
            Mode {
                name: "kprobe",
                attachments: &[
                    at("sendmsg_kprobe", Hook::KProbe("sock_sendmsg")),
                    at("sendmsg_kretprobe", Hook::KProbe("sock_sendmsg")),
                ],
            },
        ],
    },
    Probe {
        name: "socket_receive",
        required: true,
        needs: "the sock:sock_recv_length tracepoint (Linux >= 6.3), BPF trampolines (fexit) \
                or kprobes on sock_recvmsg",
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
                attachments: &[at("recvmsg_fexit", Hook::FExit("sock_recvmsg"))],
            },
            Mode {
                name: "kprobe",
                attachments: &[
                    at("recvmsg_kprobe", Hook::KProbe("sock_recvmsg")),
                    at("recvmsg_kretprobe", Hook::KProbe("sock_recvmsg")),
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
];

/// What happened to one probe.
#[derive(Debug, Clone)]
pub struct ProbeOutcome {
    pub probe: &'static str,
    pub required: bool,
    /// The mode that attached, if any.
    pub mode: Option<&'static str>,
    /// Each mode tried before (or instead of) the one that attached, with its error.
    pub rejected: Vec<(&'static str, String)>,
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

/// Attaches every probe in [`PROBES`]; fails if a required one cannot attach.
///
/// Modes named in `disabled` are skipped, and say so in the outcome.
pub fn attach_all(
    ebpf: &mut Ebpf,
    btf: &Btf,
    disabled: &[String],
) -> Result<Vec<ProbeOutcome>, NoModeFits> {
    let mut outcomes = Vec::with_capacity(PROBES.len());
    for probe in PROBES {
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
            Ok(()) => {
                return ProbeOutcome {
                    probe: probe.name,
                    required: probe.required,
                    mode: Some(mode.name),
                    rejected,
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
    }
}

/// Where the kernel lists its kprobe PMU; absent when CONFIG_KPROBES is off.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

/// Loads and attaches every program of `mode`; on failure unloads those that did.
fn attach_mode(ebpf: &mut Ebpf, btf: &Btf, mode: &Mode) -> Result<(), String> {
    let uses_kprobes = mode
        .attachments
        .iter()
        .any(|attachment| matches!(attachment.hook, Hook::KProbe(_)));
    if uses_kprobes && !std::path::Path::new(KPROBE_PMU).exists() {
        return Err(format!(
            "kprobes are not available in this kernel ({KPROBE_PMU} is missing: CONFIG_KPROBES is off)"
        ));
    }
    for (index, attachment) in mode.attachments.iter().enumerate() {
        if let Err(error) = attach_one(ebpf, btf, attachment) {
            for done in &mode.attachments[..index] {
                unload(ebpf, done.program);
            }
            return Err(format!(
                "program {}: {}",
                attachment.program,
                error_chain(&error)
            ));
        }
    }
    Ok(())
}

fn attach_one(ebpf: &mut Ebpf, btf: &Btf, attachment: &Attachment) -> Result<(), ProgramError> {
    let program = ebpf
        .program_mut(attachment.program)
        .ok_or(ProgramError::UnexpectedProgramType)?;
    let result = match attachment.hook {
        Hook::BtfTracePoint(tracepoint) => {
            let program: &mut BtfTracePoint = program.try_into()?;
            program.load(tracepoint, btf)?;
            program.attach().map(drop)
        }
        Hook::FExit(function) => {
            let program: &mut FExit = program.try_into()?;
            program.load(function, btf)?;
            program.attach().map(drop)
        }
        Hook::KProbe(function) => {
            let program: &mut KProbe = program.try_into()?;
            program.load()?;
            program.attach(function, 0).map(drop)
        }
        Hook::TracePoint(category, name) => {
            let program: &mut TracePoint = program.try_into()?;
            program.load()?;
            program.attach(category, name).map(drop)
        }
    };
    if result.is_err() {
        unload(ebpf, attachment.program);
    }
    result
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
