//! The judge of the kernel compatibility matrix: reads the results file of
//! `scripts/kernel-matrix.sh --results` (every boot of every kernel, see
//! `tests/kernels/checks.sh` for the rows) and says everything wrong with it.
//!
//! A run passes only when, for every kernel of the plan:
//! - no row of any boot failed (a retried boot's rows count as much as the last's);
//! - a second boot replaces a first only if the agent never answered `/healthz` in the
//!   first (a boot that ran checks is never hidden by another), and says why;
//! - the last boot finished: exit status 0 (qemu powered off by the guest, not killed
//!   by the timeout), the end marker `MXDONE` and, in a guest, the exit marker
//!   `MXEXIT|<kernel>|0` written after the checks returned;
//! - every mode did what `tests/kernels/kernels.list` says (attach or refuse);
//! - every run that attached produced every row it owes: the attach rows, four rows
//!   for [`IN_FLIGHT`] and for each scenario, and the end-of-run rows ([`END_OF_RUN`]);
//! - every row is exact (diff 0), except where the row itself declares the bound it
//!   was judged by (`diff allowed LOW..HIGH` in its note) and the diff is inside it.
//!
//! `tests/tests/kernel_matrix.rs` runs the matrix and calls [`judge`]; its unit tests
//! feed [`judge`] hand-written transcripts.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};

/// What a forced socket probe mode must do on a kernel (`kernels.list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Attach,
    Refuse,
}

/// One kernel of `tests/kernels/kernels.list`: its label and, per mode, what it must do
/// (a mode not listed may attach or be refused, clearly).
#[derive(Debug, Clone)]
pub struct KernelSpec {
    pub label: String,
    pub expect: BTreeMap<String, Expect>,
}

/// Parses `kernels.list`: `label suite mode=attach|refuse ...`, `#` comments.
pub fn parse_kernels_list(text: &str) -> Result<Vec<KernelSpec>> {
    let mut specs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let label = fields
            .next()
            .expect("a non-empty line has a field")
            .to_owned();
        fields
            .next()
            .with_context(|| format!("kernels.list line {}: no suite", n + 1))?;
        let mut expect = BTreeMap::new();
        for item in fields {
            let (mode, what) = item.split_once('=').with_context(|| {
                format!("kernels.list line {}: {item:?} is not mode=what", n + 1)
            })?;
            let what = match what {
                "attach" => Expect::Attach,
                "refuse" => Expect::Refuse,
                other => bail!(
                    "kernels.list line {}: {mode}={other}: attach or refuse",
                    n + 1
                ),
            };
            expect.insert(mode.to_owned(), what);
        }
        specs.push(KernelSpec { label, expect });
    }
    Ok(specs)
}

/// What the matrix was asked to run, so the judge knows every row it owes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The guests, from `kernels.list`.
    pub kernels: Vec<KernelSpec>,
    /// The host kernel's label (`host-6.18.0`), if the host was checked.
    pub host: Option<String>,
    /// The modes forced after each default run (`--modes`).
    pub modes: Vec<String>,
    /// The scenarios each run went through (`--scenarios`).
    pub scenarios: Vec<String>,
}

/// The rows of each scenario: the client copy against its own counts, the peer
/// server's copy against the server's.
pub const SCENARIO_PARTS: &[&str] = &["sent", "received", "peer_sent", "peer_received"];
/// The rows each run that attached starts with: mode seen in `/metrics` and the log.
pub const ATTACH_ROWS: &[(&str, &str)] = &[("attach", "socket_send"), ("attach", "socket_receive")];
/// The check every run that attached makes before its scenarios, with the same four
/// rows: the receive calls in flight when the probes attached (checks.sh says why).
pub const IN_FLIGHT: &str = "in_flight";
/// The rows each run that attached ends with: self-metrics at zero, exec tracking,
/// a clean shutdown within its bound, no kprobe event left in tracefs.
pub const END_OF_RUN: &[(&str, &str)] = &[
    ("self_metrics", "self"),
    ("exec_tracking", "self"),
    ("shutdown", "self"),
    ("cleanup", "self"),
];

/// The judge's reading of a results file.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Everything wrong, one sentence each, naming kernel, boot, run and row.
    pub problems: Vec<String>,
    /// Every second boot and the reason the script gave for it.
    pub retries: Vec<String>,
    /// Rows read (`MATRIX` and `MXRUN`), over every boot.
    pub rows: usize,
}

/// One boot (one qemu run, or the host's one run) of a kernel.
#[derive(Debug, Default)]
struct Boot<'a> {
    number: usize,
    /// `MXRETRY` reason, for a boot after the first.
    retry: Option<&'a str>,
    rows: Vec<Vec<&'a str>>,
    /// `MXSTATUS`: exit status of qemu (of checks.sh on the host); None if missing.
    status: Option<&'a str>,
}

impl Boot<'_> {
    fn has(&self, prefix: &[&str]) -> bool {
        self.rows.iter().any(|r| r.starts_with(prefix))
    }

    /// Mode of the first run that answered `/healthz`, if any did.
    fn agent_started(&self) -> Option<&str> {
        self.rows.iter().find_map(|r| match r.as_slice() {
            ["MXRUN", _, run, "healthy" | "attached", ..] => Some(*run),
            _ => None,
        })
    }
}

/// Splits the results into boots per kernel, in order; problems for anything that
/// does not fit the MXRETRY? MXBEGIN ... MXSTATUS structure.
fn boots<'a>(text: &'a str, problems: &mut Vec<String>) -> BTreeMap<&'a str, Vec<Boot<'a>>> {
    let mut kernels: BTreeMap<&str, Vec<Boot>> = BTreeMap::new();
    let mut open: Option<(&str, Boot)> = None;
    let mut retry: Option<(&str, &str)> = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let row: Vec<&str> = line.split('|').collect();
        match (row.as_slice(), open.as_mut()) {
            (["MXRETRY", kernel, _boot, reason @ ..], None) => {
                retry = Some((kernel, reason.first().copied().unwrap_or("")));
            }
            (["MXBEGIN", kernel, number, ..], None) => {
                let number = number.parse().unwrap_or(0);
                let earlier = kernels.get(kernel).map_or(0, Vec::len);
                if number != earlier + 1 {
                    problems.push(format!(
                        "{kernel}: boot {number} follows {earlier} boot(s) in the results"
                    ));
                }
                let reason = match retry.take() {
                    Some((k, reason)) if k == *kernel => Some(reason),
                    Some((k, _)) => {
                        problems.push(format!("MXRETRY of {k} before a boot of {kernel}"));
                        None
                    }
                    None => None,
                };
                open = Some((
                    kernel,
                    Boot {
                        number,
                        retry: reason,
                        ..Boot::default()
                    },
                ));
            }
            (["MXSTATUS", kernel, _number, status, ..], Some((open_kernel, _)))
                if kernel == open_kernel =>
            {
                let (kernel, mut boot) = open.take().expect("matched Some");
                boot.status = Some(status);
                kernels.entry(kernel).or_default().push(boot);
            }
            ([_, kernel, ..], Some((open_kernel, boot))) if kernel == open_kernel => {
                boot.rows.push(row);
            }
            (_, Some((open_kernel, boot))) => problems.push(format!(
                "{open_kernel} boot {}: a line that is not one of its rows: {line:?}",
                boot.number
            )),
            (_, None) => problems.push(format!("a line outside any boot: {line:?}")),
        }
    }
    if let Some((kernel, boot)) = open {
        problems.push(format!(
            "{kernel} boot {}: no MXSTATUS (the results end inside it)",
            boot.number
        ));
        kernels.entry(kernel).or_default().push(boot);
    }
    kernels
}

/// Whether `note` declares `diff allowed LOW..HIGH` and `diff` is within it.
fn declared_bound_holds(note: &str, diff: &str) -> bool {
    let Some((_, bound)) = note.split_once("diff allowed ") else {
        return false;
    };
    let bound = bound.split_whitespace().next().unwrap_or_default();
    let parsed = bound
        .split_once("..")
        .and_then(|(low, high)| Some((low.parse::<i64>().ok()?, high.parse::<i64>().ok()?)));
    match (parsed, diff.parse::<i64>()) {
        (Some((low, high)), Ok(diff)) => (low..=high).contains(&diff),
        _ => false,
    }
}

/// `5.10 boot 1 kprobe tcp_download sent: expected 10, seen 9, diff -1 (note)`.
fn failed_row(kernel: &str, boot: usize, row: &[&str]) -> Option<String> {
    match row {
        [
            "MATRIX",
            _,
            run,
            scenario,
            part,
            expected,
            seen,
            diff,
            verdict,
            note,
        ] => {
            // A PASS with a difference is a broken check unless the row declares the
            // bound it was judged by, and the difference is inside it.
            let passed = *verdict == "PASS"
                && (matches!(*diff, "0" | "-") || declared_bound_holds(note, diff));
            (!passed).then(|| {
                format!(
                    "{kernel} boot {boot} {run} {scenario} {part}: {verdict}: expected \
                     {expected}, seen {seen}, diff {diff} ({note})"
                )
            })
        }
        ["MATRIX", ..] => Some(format!(
            "{kernel} boot {boot}: malformed row (10 fields wanted): {}",
            row.join("|")
        )),
        ["MXRUN", _, run, "refused", verdict, message @ ..] => (*verdict != "PASS").then(|| {
            format!(
                "{kernel} boot {boot} {run}: the agent refused to start: {}",
                message.join("|")
            )
        }),
        _ => None,
    }
}

/// Everything wrong with a results file, judged against the plan.
pub fn judge(text: &str, plan: &Plan) -> Verdict {
    let mut verdict = Verdict::default();
    let by_kernel = boots(text, &mut verdict.problems);

    let mut wanted: Vec<(&str, Option<&KernelSpec>)> = plan
        .kernels
        .iter()
        .map(|spec| (spec.label.as_str(), Some(spec)))
        .collect();
    if let Some(host) = &plan.host {
        wanted.push((host.as_str(), None));
    }
    for kernel in by_kernel.keys() {
        if !wanted.iter().any(|(label, _)| label == kernel) {
            verdict.problems.push(format!(
                "{kernel}: results for a kernel that is not in the plan"
            ));
        }
    }

    for (kernel, spec) in wanted {
        let Some(boots) = by_kernel.get(kernel) else {
            verdict
                .problems
                .push(format!("{kernel}: no boot in the results"));
            continue;
        };
        let problems = &mut verdict.problems;
        // Every row of every boot counts.
        for boot in boots {
            verdict.rows += boot
                .rows
                .iter()
                .filter(|r| matches!(r.first(), Some(&"MATRIX" | &"MXRUN")))
                .count();
            problems.extend(
                boot.rows
                    .iter()
                    .filter_map(|r| failed_row(kernel, boot.number, r)),
            );
        }
        if boots.len() > 2 {
            problems.push(format!(
                "{kernel}: booted {} times; one retry at most",
                boots.len()
            ));
        }
        // A boot replaced by a later one must never have started the agent.
        for pair in boots.windows(2) {
            let (earlier, later) = (&pair[0], &pair[1]);
            match later.retry {
                Some(reason) if !reason.trim().is_empty() => verdict
                    .retries
                    .push(format!("{kernel} boot {}: {reason}", later.number)),
                _ => problems.push(format!(
                    "{kernel}: boot {} has no MXRETRY line saying why it was needed",
                    later.number
                )),
            }
            if let Some(run) = earlier.agent_started() {
                problems.push(format!(
                    "{kernel}: boot {} was retried although the agent had answered /healthz \
                     in it (run {run}): only a boot that never started the agent may be \
                     replaced",
                    earlier.number
                ));
            }
        }
        let last = boots.last().expect("a kernel in the map has a boot");
        judge_last_boot(kernel, spec, last, plan, problems);
    }
    verdict
}

/// The boot that stands: it finished, and every run produced every row it owes.
fn judge_last_boot(
    kernel: &str,
    spec: Option<&KernelSpec>,
    boot: &Boot,
    plan: &Plan,
    problems: &mut Vec<String>,
) {
    let n = boot.number;
    match boot.status {
        Some("0") => {}
        Some(status) => problems.push(format!(
            "{kernel} boot {n}: exit status {status}{}",
            if status == "124" || status == "137" {
                " (killed by the timeout)"
            } else {
                ""
            }
        )),
        None => problems.push(format!("{kernel} boot {n}: no exit status")),
    }
    if !boot.has(&["MXDONE", kernel]) {
        problems.push(format!(
            "{kernel} boot {n}: no end marker MXDONE: the checks did not finish"
        ));
    }
    // The host runs checks.sh directly: its exit status is the marker.
    if spec.is_some() && !boot.has(&["MXEXIT", kernel, "0"]) {
        problems.push(format!(
            "{kernel} boot {n}: no exit marker MXEXIT|{kernel}|0: the guest did not get \
             from its checks to powering off"
        ));
    }

    // run -> (socket_send mode, socket_receive mode) it attached in; runs refused.
    let mut attached: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    let mut refused: BTreeSet<&str> = BTreeSet::new();
    for row in &boot.rows {
        match row.as_slice() {
            ["MXRUN", _, run, "attached", modes] => {
                let modes = modes
                    .split(',')
                    .filter_map(|pair| pair.split_once('='))
                    .collect();
                attached.insert(run, modes);
            }
            ["MXRUN", _, run, "refused", ..] => {
                refused.insert(run);
            }
            _ => {}
        }
    }
    let Some(default_mode) = attached
        .get("default")
        .and_then(|m| m.get("socket_send"))
        .copied()
    else {
        problems.push(format!(
            "{kernel} boot {n}: the agent did not start with its defaults"
        ));
        return;
    };

    // checks.sh skips the forced run of the mode the default run chose.
    let runs = std::iter::once("default").chain(
        plan.modes
            .iter()
            .map(String::as_str)
            .filter(|m| *m != default_mode),
    );
    for run in runs {
        if refused.contains(run) {
            continue;
        }
        if !attached.contains_key(run) {
            problems.push(format!(
                "{kernel} boot {n} {run}: no MXRUN row: the run did not happen"
            ));
            continue;
        }
        let owed = ATTACH_ROWS
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .chain(
                std::iter::once(IN_FLIGHT.to_owned())
                    .chain(plan.scenarios.iter().cloned())
                    .flat_map(|s| {
                        SCENARIO_PARTS
                            .iter()
                            .map(move |p| (s.clone(), p.to_string()))
                    }),
            )
            .chain(
                END_OF_RUN
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string())),
            );
        for (check, part) in owed {
            let present = boot.rows.iter().any(|r| {
                r.len() > 4 && r[0] == "MATRIX" && r[2] == run && r[3] == check && r[4] == part
            });
            if !present {
                problems.push(format!(
                    "{kernel} boot {n} {run}: missing row {check}|{part}"
                ));
            }
        }
    }

    for (mode, expect) in spec.map(|s| &s.expect).into_iter().flatten() {
        if !plan.modes.contains(mode) {
            continue;
        }
        // The default run stands for the mode it chose.
        let run = if default_mode == mode {
            "default"
        } else {
            mode.as_str()
        };
        match expect {
            Expect::Refuse if !refused.contains(run) => problems.push(format!(
                "{kernel} boot {n}: expected the agent to refuse {mode}"
            )),
            Expect::Attach
                if attached.get(run).and_then(|m| m.get("socket_send")) != Some(&mode.as_str()) =>
            {
                problems.push(format!("{kernel} boot {n}: expected {mode} to attach"))
            }
            _ => {}
        }
    }
}
