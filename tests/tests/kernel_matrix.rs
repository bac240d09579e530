//! Kernel compatibility matrix: `scripts/kernel-matrix.sh` boots Debian's cloud kernels
//! 5.10, 6.1 and 6.12 under qemu (software emulation) and checks, on each of them and
//! on the host kernel, every socket probe mode the agent has: the mode attaches and
//! every scenario's bytes are attributed to the right executable within ±2%, or the
//! agent refuses to start with a message naming what the kernel lacks (and
//! `tests/kernels/kernels.list` says which modes each kernel must refuse).
//!
//! Skips, saying why, when not root or when the script cannot install qemu or fetch
//! the kernels (exit status 77). `FSN_SKIP_KERNEL_MATRIX=1` skips it on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use fleetsnitch_e2e::{agent_binary, program, require_root, skip_test, workspace_root};

/// Exit status of the script when the matrix cannot run on this machine.
const SKIP_CODE: i32 = 77;
/// Bound on the whole matrix (each guest also has its own timeout in the script).
const MATRIX_BOUND: Duration = Duration::from_secs(40 * 60);
/// Scenarios every kernel must pass in every mode it attaches in.
const REQUIRED_SCENARIOS: &[&str] = &[
    "tcp_download",
    "tcp_upload",
    "udp_both",
    "ipv6_tcp",
    "short_lived",
];

/// One kernel of `tests/kernels/kernels.list` and the mode -> attach/refuse table.
struct KernelSpec {
    label: String,
    expect: BTreeMap<String, String>,
}

fn kernel_specs(root: &Path) -> Vec<KernelSpec> {
    let text = std::fs::read_to_string(root.join("tests/kernels/kernels.list"))
        .expect("read tests/kernels/kernels.list");
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let mut fields = line.split_whitespace();
            let label = fields.next().expect("a label").to_owned();
            let _suite = fields.next().expect("a suite");
            let expect = fields
                .filter_map(|item| item.split_once('='))
                .map(|(mode, what)| (mode.to_owned(), what.to_owned()))
                .collect();
            KernelSpec { label, expect }
        })
        .collect()
}

/// Runs the script bounded by [`MATRIX_BOUND`]: SIGTERM first (its trap stops qemu
/// and cleans up), then SIGKILL.
fn run_bounded(mut cmd: Command) -> ExitStatus {
    let mut child = cmd.spawn().expect("start scripts/kernel-matrix.sh");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for the matrix") {
            return status;
        }
        if start.elapsed() > MATRIX_BOUND {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(30) {
                if let Some(status) = child.try_wait().expect("wait for the matrix") {
                    panic!("kernel matrix did not finish within {MATRIX_BOUND:?} ({status})");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("kernel matrix did not finish within {MATRIX_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn kernel_matrix() -> Result<()> {
    if std::env::var_os("FSN_SKIP_KERNEL_MATRIX").is_some() {
        skip_test!("FSN_SKIP_KERNEL_MATRIX is set");
    }
    require_root!("qemu install, namespaces, eBPF");
    let root = workspace_root();
    let agent = agent_binary()?;
    let results = std::env::temp_dir().join(format!("fsn-kmatrix-{}.results", std::process::id()));
    let mut cmd = Command::new(root.join("scripts/kernel-matrix.sh"));
    cmd.arg("--results")
        .arg(&results)
        .env("FLEETSNITCH_BIN", &agent)
        .env("TRAFFICGEN_BIN", program("trafficgen")?)
        .env("FSN_MATRIX_SKIP_CODE", SKIP_CODE.to_string())
        .stdin(Stdio::null());
    let status = run_bounded(cmd);
    if status.code() == Some(SKIP_CODE) {
        skip_test!("the kernel matrix cannot run here (reason printed above)");
    }
    let text = std::fs::read_to_string(&results)
        .unwrap_or_else(|e| panic!("no results at {} ({e}); script {status}", results.display()));
    let _ = std::fs::remove_file(&results);
    let problems = check_results(&text, &kernel_specs(&root));
    assert!(
        problems.is_empty(),
        "kernel matrix failed ({status}):\n  {}",
        problems.join("\n  ")
    );
    assert!(status.success(), "kernel-matrix.sh failed: {status}");
    Ok(())
}

/// Everything wrong with a results file: lines split on '|', see tests/kernels/checks.sh.
fn check_results(text: &str, specs: &[KernelSpec]) -> Vec<String> {
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('|').collect()).collect();
    let mut problems = Vec::new();

    // Every cell passes; refusals were judged clear and expected by the checks.
    for row in &rows {
        match row.as_slice() {
            [
                "MATRIX",
                kernel,
                run,
                scenario,
                part,
                expected,
                reported,
                verdict,
                rest @ ..,
            ] if *verdict != "PASS" => {
                problems.push(format!(
                    "{kernel} {run} {scenario} {part}: expected {expected}, reported \
                     {reported} ({})",
                    rest.join("|")
                ));
            }
            ["MXRUN", kernel, run, "refused", verdict, message @ ..] if *verdict != "PASS" => {
                problems.push(format!(
                    "{kernel} {run}: the agent refused to start: {}",
                    message.join("|")
                ));
            }
            _ => {}
        }
    }

    let mut kernels: Vec<(String, BTreeMap<String, String>)> = specs
        .iter()
        .map(|s| (s.label.clone(), s.expect.clone()))
        .collect();
    if let Some(host) = rows.iter().find_map(|r| match r.as_slice() {
        ["MXDONE", kernel, ..] if kernel.starts_with("host-") => Some(kernel.to_string()),
        _ => None,
    }) {
        kernels.push((host, BTreeMap::new()));
    } else {
        problems.push("the host kernel did not finish its checks".to_owned());
    }

    for (kernel, expect) in &kernels {
        let of_kernel: Vec<&Vec<&str>> = rows
            .iter()
            .filter(|r| r.len() > 2 && r[1] == kernel.as_str())
            .collect();
        if !of_kernel.iter().any(|r| r[0] == "MXDONE") {
            problems.push(format!("{kernel}: the checks did not finish"));
            continue;
        }
        // run -> socket_send mode it attached in.
        let attached: BTreeMap<&str, &str> = of_kernel
            .iter()
            .filter(|r| r[0] == "MXRUN" && r.get(3) == Some(&"attached"))
            .filter_map(|r| {
                let mode = r
                    .get(4)?
                    .split(',')
                    .find_map(|p| p.strip_prefix("socket_send="))?;
                Some((r[2], mode))
            })
            .collect();
        let refused: BTreeSet<&str> = of_kernel
            .iter()
            .filter(|r| r[0] == "MXRUN" && r.get(3) == Some(&"refused"))
            .map(|r| r[2])
            .collect();
        if !attached.contains_key("default") {
            problems.push(format!(
                "{kernel}: the agent did not start with its defaults"
            ));
        }
        for (mode, what) in expect {
            // The default run stands for the mode it chose.
            let run = if attached.get("default") == Some(&mode.as_str()) {
                "default"
            } else {
                mode.as_str()
            };
            match what.as_str() {
                "refuse" if !refused.contains(run) => {
                    problems.push(format!("{kernel}: expected the agent to refuse {mode}"))
                }
                "attach" if attached.get(run) != Some(&mode.as_str()) => {
                    problems.push(format!("{kernel}: expected {mode} to attach"))
                }
                "attach" => {
                    for scenario in REQUIRED_SCENARIOS {
                        let seen = of_kernel.iter().any(|r| {
                            r[0] == "MATRIX" && r.get(2) == Some(&run) && r.get(3) == Some(scenario)
                        });
                        if !seen {
                            problems.push(format!("{kernel} {mode}: {scenario} did not run"));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    problems
}

#[cfg(test)]
mod parsing {
    use super::*;

    fn spec() -> Vec<KernelSpec> {
        vec![KernelSpec {
            label: "5.10".into(),
            expect: [("tp_btf", "refuse"), ("fexit", "attach")]
                .into_iter()
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .collect(),
        }]
    }

    fn scenarios(kernel: &str, run: &str) -> String {
        REQUIRED_SCENARIOS
            .iter()
            .map(|s| format!("MATRIX|{kernel}|{run}|{s}|sent|10|10|PASS|x\n"))
            .collect()
    }

    #[test]
    fn a_complete_passing_matrix_has_no_problem() {
        let text = format!(
            "MXRUN|5.10|default|attached|socket_receive=fexit,socket_send=fexit\n{}\
             MXRUN|5.10|tp_btf|refused|PASS|exit 1: cannot run the required probe socket_send\n\
             MXDONE|5.10|100\n\
             MXRUN|host-6.18|default|attached|socket_send=tp_btf\n{}MXDONE|host-6.18|30\n",
            scenarios("5.10", "default"),
            scenarios("host-6.18", "default"),
        );
        assert_eq!(check_results(&text, &spec()), Vec::<String>::new());
    }

    #[test]
    fn failures_missing_runs_and_unexpected_refusals_are_problems() {
        let text = "MXRUN|5.10|default|refused|FAIL|exit 1: no\n\
                    MATRIX|5.10|kprobe|udp_both|sent|10|0|FAIL|x\n\
                    MXDONE|5.10|100\n";
        let problems = check_results(text, &spec());
        let all = problems.join("\n");
        assert!(all.contains("refused to start"), "{all}");
        assert!(all.contains("udp_both sent"), "{all}");
        assert!(all.contains("expected the agent to refuse tp_btf"), "{all}");
        assert!(all.contains("expected fexit to attach"), "{all}");
        assert!(all.contains("host kernel did not finish"), "{all}");
    }
}
