//! Loading the kernel programs and choosing, per kernel, how each hook attaches.
//!
//! The choice is data: [`PROBES`] lists each hook with its attachment modes in
//! order of preference. [`attach_all`] walks the table, keeps the first mode
//! that loads and attaches, and remembers why the others did not, so an
//! operator can see both in the log and in `fleetsnitch_probe_attached`.

mod attach;
pub mod kretprobe;

pub use attach::{NoModeFits, ProbeMetrics, ProbeOutcome, attach_all};
use serde::Deserialize;

use crate::support::InvalidValue;

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

/// The `probes:` section of the configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProbesConfig {
    /// Attachment modes never to use (tp_btf, fexit, kprobe, tracepoint), e.g. to
    /// force a fallback on a kernel where the preferred mode misbehaves.
    pub disabled_modes: Vec<String>,
}

impl ProbesConfig {
    pub fn validate(&self) -> Result<(), InvalidValue> {
        for mode in &self.disabled_modes {
            if !MODE_NAMES.contains(&mode.as_str()) {
                return Err(InvalidValue::new(
                    "probes.disabled_modes",
                    mode,
                    format!("unknown mode; known modes: {}", MODE_NAMES.join(", ")),
                ));
            }
        }
        Ok(())
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
}
