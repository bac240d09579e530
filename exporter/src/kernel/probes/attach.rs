//! Walking the probe table: the first mode of each probe that loads and
//! attaches wins; why the others did not is kept for the log and the metrics.

use std::{fmt, sync::Arc};

use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FExit, KProbe, ProbeKind, ProgramError, TracePoint},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{Attachment, Hook, Mode, PROBES, Probe, kretprobe};
use crate::support::error_chain;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    probe: String,
    mode: String,
}

/// `fleetsnitch_probe_attached`: which probes attached, and how.
#[derive(Debug, Clone, Default)]
pub struct ProbeMetrics {
    attached: Family<ProbeLabels, Gauge>,
}

impl ProbeMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "probe_attached",
            "Whether each probe is attached (1) or missing (0), and in which mode",
            metrics.attached.clone(),
        );
        metrics
    }

    /// Probe `probe` attached in `mode`, or not at all (`None`: mode="none", value 0).
    pub fn set(&self, probe: &str, mode: Option<&str>) {
        self.attached
            .get_or_create(&ProbeLabels {
                probe: probe.to_owned(),
                mode: mode.unwrap_or("none").to_owned(),
            })
            .set(i64::from(mode.is_some()));
    }

    pub fn export(&self, outcomes: &[ProbeOutcome]) {
        for outcome in outcomes {
            self.set(outcome.probe, outcome.mode);
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
