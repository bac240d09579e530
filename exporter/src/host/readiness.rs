//! `fleetsnitch --check`: what this host offers the agent, before anything is
//! loaded. Each line says what was checked, whether it holds, and what it is
//! for; the command fails when a requirement without which the agent cannot
//! count is missing.

use std::{fmt::Write as _, path::Path};

use caps::Capability;

use super::{preflight, privileges};
use crate::identity::containers;

/// Linux capability number (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;

/// One thing checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub name: &'static str,
    pub ok: bool,
    /// Without it the agent refuses to start.
    pub required: bool,
    pub detail: String,
}

/// Everything `--check` looks at.
pub fn inspect() -> Vec<Item> {
    let effective = preflight::effective_capabilities().unwrap_or(0);
    let has = |capability: u32| effective & (1 << capability) != 0;
    let exists = |path: &str| Path::new(path).exists();
    let tracefs = [preflight::TRACEFS_PATH, "/sys/kernel/debug/tracing"]
        .iter()
        .map(|root| Path::new(root).join("events"))
        .find(|events| events.exists());
    let tracepoint = |category: &str, name: &str| {
        tracefs
            .as_ref()
            .is_some_and(|events| events.join(category).join(name).exists())
    };
    let send_tracepoint = tracepoint("sock", "sock_send_length");
    vec![
        Item {
            name: "capabilities to load eBPF",
            ok: preflight::can_load_bpf(effective),
            required: true,
            detail: format!(
                "CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN (effective set {effective:#x})"
            ),
        },
        Item {
            name: "BTF",
            ok: exists(preflight::BTF_PATH),
            required: true,
            detail: format!("{} (CONFIG_DEBUG_INFO_BTF), for CO-RE", preflight::BTF_PATH),
        },
        Item {
            name: "socket tracepoints (tp_btf mode)",
            ok: send_tracepoint,
            required: false,
            detail: "sock:sock_send_length and sock_recv_length (Linux >= 6.3); without them \
                     the agent falls back to fexit or kprobes"
                .to_owned(),
        },
        Item {
            name: "kprobes (fallback mode)",
            ok: exists("/sys/bus/event_source/devices/kprobe"),
            required: false,
            detail: "CONFIG_KPROBES, for kernels without the socket tracepoints or trampolines"
                .to_owned(),
        },
        Item {
            name: "tracefs",
            ok: tracefs.is_some() || has(CAP_SYS_ADMIN),
            required: false,
            detail: match &tracefs {
                Some(events) => format!("{} (classic tracepoints)", events.display()),
                None => {
                    "not mounted; the agent mounts it at start (needs CAP_SYS_ADMIN)".to_owned()
                }
            },
        },
        Item {
            name: "splice tracepoints",
            ok: tracepoint("syscalls", "sys_enter_splice"),
            required: false,
            detail:
                "syscalls:sys_{enter,exit}_splice (CONFIG_FTRACE_SYSCALLS), for splice from sockets"
                    .to_owned(),
        },
        Item {
            name: "exec tracepoint",
            ok: tracepoint("sched", "sched_process_exec"),
            required: false,
            detail: "sched:sched_process_exec, for exec tracking (exec.enabled)".to_owned(),
        },
        Item {
            name: "cgroup v2",
            ok: containers::cgroup2_mount().is_some(),
            required: false,
            detail: "for DNS answers (domain label) and container ids that outlive processes"
                .to_owned(),
        },
    ]
    .into_iter()
    .chain(capability_items(effective))
    .collect()
}

/// One line per capability of the documented start-up set (README
/// "Capabilities", src/privileges.rs) beyond the two the first line covers.
fn capability_items(effective: u64) -> impl Iterator<Item = Item> {
    privileges::NEEDS
        .iter()
        .filter(|need| ![Capability::CAP_BPF, Capability::CAP_PERFMON].contains(&need.capability))
        .map(move |need| Item {
            name: need.name,
            ok: effective & need.capability.bitmask() != 0,
            required: false,
            detail: format!(
                "{}: {}",
                if need.runtime {
                    "start-up and run time"
                } else {
                    "start-up only"
                },
                need.why
            ),
        })
}

/// The report printed by `--check`, and whether every requirement holds.
pub fn report(items: &[Item]) -> (String, bool) {
    let mut text = String::new();
    for item in items {
        let verdict = match (item.ok, item.required) {
            (true, _) => "ok",
            (false, true) => "MISSING",
            (false, false) => "absent",
        };
        let _ = writeln!(text, "{verdict:<8} {:<34} {}", item.name, item.detail);
    }
    let ready = items.iter().all(|item| item.ok || !item.required);
    let _ = writeln!(
        text,
        "{}",
        if ready {
            "fleetsnitch can run here (absent items only limit what it sees)"
        } else {
            "fleetsnitch cannot run here: see the MISSING lines"
        }
    );
    (text, ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(ok: bool, required: bool) -> Item {
        Item {
            name: "x",
            ok,
            required,
            detail: String::new(),
        }
    }

    #[test]
    fn only_a_missing_requirement_fails() {
        assert!(report(&[item(true, true), item(false, false)]).1);
        let (text, ready) = report(&[item(false, true)]);
        assert!(!ready);
        assert!(text.contains("MISSING"), "{text}");
    }
}
