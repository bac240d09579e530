//! Kernel compatibility matrix: `scripts/kernel-matrix.sh` boots Debian's cloud kernels
//! 5.10, 6.1 and 6.12 under qemu (software emulation) and checks, on each of them and
//! on the host kernel, every socket probe mode the agent has: the mode attaches and
//! every scenario's bytes are attributed to the right executable exactly (client and
//! peer server each against their own counts), or the agent refuses to start with a
//! message naming what the kernel lacks (`tests/kernels/kernels.list` says which modes
//! each kernel must refuse). [`fleetsnitch_e2e::kernel_matrix::judge`] reads every row
//! of every boot; the `judge` tests below feed it transcripts of each way a run fails.
//!
//! Skips, saying why, when not root or when the script cannot install qemu or fetch
//! the kernels (exit status 77). `FSN_SKIP_KERNEL_MATRIX=1` skips it on purpose.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fleetsnitch_e2e::kernel_matrix::{Plan, judge, parse_kernels_list};
use fleetsnitch_e2e::{agent_binary, program, require_root, skip_test, workspace_root};

/// Exit status of the script when the matrix cannot run on this machine.
const SKIP_CODE: i32 = 77;
/// Bound on the whole matrix: the host, two rounds of guests and one retry alone,
/// each within the script's guest timeout, plus the kernel downloads.
const MATRIX_BOUND: Duration = Duration::from_secs(45 * 60);
/// Every scenario each run goes through (passed to the script, so the judge knows the
/// rows it owes).
const SCENARIOS: &[&str] = &[
    "tcp_download",
    "tcp_upload",
    "udp_both",
    "ipv6_tcp",
    "short_lived",
    "loopback",
    "sendmmsg",
    "recvmmsg",
    "sendfile_upload",
    "splice_download",
    "io_uring_send",
    "io_uring_recv",
];
/// The socket probe modes forced after each default run.
const MODES: &[&str] = &["tp_btf", "fexit", "kprobe"];

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

/// The label checks.sh gives the host kernel: `host-` and `uname -r` up to its first `-`.
fn host_label() -> Result<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("read /proc/sys/kernel/osrelease")?;
    let version = release.trim().split('-').next().unwrap_or_default();
    Ok(format!("host-{version}"))
}

fn plan(root: &Path) -> Result<Plan> {
    let list = root.join("tests/kernels/kernels.list");
    let text =
        std::fs::read_to_string(&list).with_context(|| format!("read {}", list.display()))?;
    Ok(Plan {
        kernels: parse_kernels_list(&text)?,
        host: Some(host_label()?),
        modes: MODES.iter().map(|m| m.to_string()).collect(),
        scenarios: SCENARIOS.iter().map(|s| s.to_string()).collect(),
    })
}

#[test]
fn kernel_matrix() -> Result<()> {
    if std::env::var_os("FSN_SKIP_KERNEL_MATRIX").is_some() {
        skip_test!("FSN_SKIP_KERNEL_MATRIX is set");
    }
    require_root!("qemu install, namespaces, eBPF");
    let root = workspace_root();
    let plan = plan(&root)?;
    let agent = agent_binary()?;
    let results = std::env::temp_dir().join(format!("fsn-kmatrix-{}.results", std::process::id()));
    let mut cmd = Command::new(root.join("scripts/kernel-matrix.sh"));
    cmd.arg("--results")
        .arg(&results)
        .arg("--scenarios")
        .arg(SCENARIOS.join(" "))
        .arg("--modes")
        .arg(MODES.join(" "))
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
    let verdict = judge(&text, &plan);
    eprintln!("kernel matrix judge: {} rows", verdict.rows);
    for retry in &verdict.retries {
        eprintln!("kernel matrix judge: retried: {retry}");
    }
    assert!(
        verdict.problems.is_empty(),
        "kernel matrix failed ({status}), {} problem(s):\n  {}",
        verdict.problems.len(),
        verdict.problems.join("\n  ")
    );
    assert!(status.success(), "kernel-matrix.sh failed: {status}");
    Ok(())
}

/// The judge, fed hand-written transcripts of one guest (5.10) and the host.
mod judge {
    use fleetsnitch_e2e::kernel_matrix::{
        ATTACH_ROWS, END_OF_RUN, IN_FLIGHT, Plan, SCENARIO_PARTS, judge, parse_kernels_list,
    };

    const SCENARIOS: &[&str] = &["tcp_download", "udp_both"];

    fn plan() -> Plan {
        Plan {
            kernels: parse_kernels_list("5.10 bullseye tp_btf=refuse fexit=attach kprobe=attach\n")
                .expect("a valid kernels.list"),
            host: Some("host-6.18".into()),
            modes: ["tp_btf", "fexit", "kprobe"].map(String::from).to_vec(),
            scenarios: SCENARIOS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Every row a run that attached in `mode` prints, all passing.
    fn attached_run(kernel: &str, run: &str, mode: &str) -> Vec<String> {
        let mut rows = vec![
            format!("MXRUN|{kernel}|{run}|healthy|4.20"),
            format!("MXRUN|{kernel}|{run}|attached|socket_receive={mode},socket_send={mode}"),
        ];
        for (check, part) in ATTACH_ROWS {
            rows.push(format!(
                "MATRIX|{kernel}|{run}|{check}|{part}|any|{mode}|-|PASS|the log agrees"
            ));
        }
        for scenario in std::iter::once(&IN_FLIGHT).chain(SCENARIOS) {
            for part in SCENARIO_PARTS {
                rows.push(format!(
                    "MATRIX|{kernel}|{run}|{scenario}|{part}|1000|1000|0|PASS|tg-{scenario}"
                ));
            }
        }
        for (check, part) in END_OF_RUN {
            rows.push(format!(
                "MATRIX|{kernel}|{run}|{check}|{part}|0|0|0|PASS|fine"
            ));
        }
        rows
    }

    /// The rows of a 5.10 guest that passed everything, end and exit markers included.
    fn guest_rows() -> Vec<String> {
        let mut rows = vec!["MXBOOT|5.10|5.10.0-35-cloud-amd64|2.91s".to_owned()];
        rows.extend(attached_run("5.10", "default", "fexit"));
        rows.push(
            "MXRUN|5.10|tp_btf|refused|PASS|exit 1: cannot run the required probe \
             socket_send: it needs ... tp_btf: no sock_send_length"
                .to_owned(),
        );
        rows.extend(attached_run("5.10", "kprobe", "kprobe"));
        rows.push("MXDONE|5.10|240".to_owned());
        rows.push("MXEXIT|5.10|0".to_owned());
        rows
    }

    fn host_boot() -> String {
        let mut rows = attached_run("host-6.18", "default", "tp_btf");
        rows.push("MXRUN|host-6.18|fexit|refused|PASS|exit 1: ...".to_owned());
        rows.push("MXRUN|host-6.18|kprobe|refused|PASS|exit 1: ...".to_owned());
        rows.push("MXDONE|host-6.18|40".to_owned());
        boot("host-6.18", 1, &rows, "0")
    }

    fn boot(kernel: &str, number: usize, rows: &[String], status: &str) -> String {
        format!(
            "MXBEGIN|{kernel}|{number}|test\n{}\nMXSTATUS|{kernel}|{number}|{status}\n",
            rows.join("\n")
        )
    }

    fn retry(kernel: &str, number: usize, reason: &str) -> String {
        format!("MXRETRY|{kernel}|{number}|{reason}\n")
    }

    /// The judge's problems, one per line (empty: the run passes).
    fn problems(text: &str) -> String {
        judge(text, &plan()).problems.join("\n")
    }

    #[test]
    fn a_complete_passing_matrix_has_no_problem() {
        let text = boot("5.10", 1, &guest_rows(), "0") + &host_boot();
        let verdict = judge(&text, &plan());
        assert_eq!(verdict.problems, Vec::<String>::new());
        assert!(verdict.retries.is_empty());
        assert!(verdict.rows > 40, "{} rows", verdict.rows);
    }

    #[test]
    fn a_fail_in_a_first_boot_fails_the_run_although_the_retry_passes() {
        let first = vec![
            "MXBOOT|5.10|5.10.0-35-cloud-amd64|2.91s".to_owned(),
            "MATRIX|5.10|setup|network|-|-|-|-|FAIL|cannot create the namespaces and veth pair"
                .to_owned(),
        ];
        let text = boot("5.10", 1, &first, "124")
            + &retry(
                "5.10",
                2,
                "boot 1 ended with exit 124 before the agent answered /healthz",
            )
            + &boot("5.10", 2, &guest_rows(), "0")
            + &host_boot();
        let all = problems(&text);
        assert!(
            all.contains("5.10 boot 1 setup network -: FAIL") && all.contains("cannot create"),
            "{all}"
        );
    }

    #[test]
    fn an_end_marker_then_a_timeout_fails() {
        // The guest printed MXDONE and MXEXIT, then hung: the timeout killed qemu.
        let text = boot("5.10", 1, &guest_rows(), "124") + &host_boot();
        let all = problems(&text);
        assert_eq!(
            all, "5.10 boot 1: exit status 124 (killed by the timeout)",
            "{all}"
        );
    }

    #[test]
    fn no_exit_marker_fails_even_with_status_zero() {
        // qemu also exits 0 when a panicking guest reboots (-no-reboot, panic=-1).
        let rows: Vec<String> = guest_rows()
            .into_iter()
            .filter(|r| !r.starts_with("MXEXIT"))
            .collect();
        let all = problems(&(boot("5.10", 1, &rows, "0") + &host_boot()));
        assert!(all.contains("no exit marker MXEXIT|5.10|0"), "{all}");
    }

    #[test]
    fn no_end_marker_fails() {
        let rows: Vec<String> = guest_rows()
            .into_iter()
            .filter(|r| !r.starts_with("MXDONE"))
            .collect();
        let all = problems(&(boot("5.10", 1, &rows, "0") + &host_boot()));
        assert!(all.contains("5.10 boot 1: no end marker MXDONE"), "{all}");
    }

    #[test]
    fn each_missing_row_fails_naming_it() {
        for missing in [
            "MATRIX|5.10|kprobe|cleanup|self|",
            "MATRIX|5.10|kprobe|shutdown|self|",
            "MATRIX|5.10|default|self_metrics|self|",
            "MATRIX|5.10|default|exec_tracking|self|",
            "MATRIX|5.10|default|udp_both|peer_received|",
            "MATRIX|5.10|default|in_flight|peer_received|",
            "MATRIX|5.10|kprobe|attach|socket_receive|",
        ] {
            let rows: Vec<String> = guest_rows()
                .into_iter()
                .filter(|r| !r.starts_with(missing))
                .collect();
            let all = problems(&(boot("5.10", 1, &rows, "0") + &host_boot()));
            let fields: Vec<&str> = missing.split('|').collect();
            let want = format!(
                "5.10 boot 1 {}: missing row {}|{}",
                fields[2], fields[3], fields[4]
            );
            assert_eq!(all, want, "without {missing}");
        }
    }

    #[test]
    fn a_run_that_never_happened_fails() {
        let rows: Vec<String> = guest_rows()
            .into_iter()
            .filter(|r| !r.contains("|kprobe|"))
            .collect();
        let all = problems(&(boot("5.10", 1, &rows, "0") + &host_boot()));
        assert!(
            all.contains("5.10 boot 1 kprobe: no MXRUN row")
                && all.contains("expected kprobe to attach"),
            "{all}"
        );
    }

    #[test]
    fn a_retry_of_a_guest_that_had_started_the_agent_is_refused() {
        // The first boot's agent answered /healthz, then the guest timed out: its
        // checks ran, so a second boot may not stand in for it.
        let first = vec![
            "MXBOOT|5.10|5.10.0-35-cloud-amd64|2.91s".to_owned(),
            "MXRUN|5.10|default|healthy|30.5".to_owned(),
        ];
        let text = boot("5.10", 1, &first, "124")
            + &retry("5.10", 2, "boot 1 ended with exit 124")
            + &boot("5.10", 2, &guest_rows(), "0")
            + &host_boot();
        let all = problems(&text);
        assert!(
            all.contains("5.10: boot 1 was retried although the agent had answered /healthz"),
            "{all}"
        );
    }

    #[test]
    fn a_retry_of_a_guest_that_never_started_the_agent_stands_and_is_reported() {
        let first = vec!["MXBOOT|5.10|5.10.0-35-cloud-amd64|2.91s".to_owned()];
        let reason = "boot 1 ended with exit 124 (killed by the 600s timeout) before the \
                      agent answered /healthz, soft lockups on its console";
        let text = boot("5.10", 1, &first, "124")
            + &retry("5.10", 2, reason)
            + &boot("5.10", 2, &guest_rows(), "0")
            + &host_boot();
        let verdict = judge(&text, &plan());
        assert_eq!(verdict.problems, Vec::<String>::new());
        assert_eq!(verdict.retries, vec![format!("5.10 boot 2: {reason}")]);
    }

    #[test]
    fn a_second_boot_without_its_reason_or_a_third_boot_fails() {
        let first = vec!["MXBOOT|5.10|5.10.0-35-cloud-amd64|2.91s".to_owned()];
        let text = boot("5.10", 1, &first, "124")
            + &boot("5.10", 2, &first, "124")
            + &retry("5.10", 3, "again")
            + &boot("5.10", 3, &guest_rows(), "0")
            + &host_boot();
        let all = problems(&text);
        assert!(
            all.contains("5.10: boot 2 has no MXRETRY line")
                && all.contains("5.10: booted 3 times; one retry at most"),
            "{all}"
        );
    }

    #[test]
    fn an_inexact_count_fails_with_its_difference() {
        let rows: Vec<String> = guest_rows()
            .into_iter()
            .map(|r| {
                if r.starts_with("MATRIX|5.10|kprobe|udp_both|received|") {
                    "MATRIX|5.10|kprobe|udp_both|received|1000|999|-1|FAIL|tg-udp_both".to_owned()
                } else if r.starts_with("MATRIX|5.10|default|tcp_download|sent|") {
                    // A PASS that carries a difference is a broken check, not a pass.
                    "MATRIX|5.10|default|tcp_download|sent|1000|1001|1|PASS|tg".to_owned()
                } else if r.starts_with("MATRIX|5.10|default|tcp_download|received|") {
                    // Nor is one outside the bound it declares.
                    "MATRIX|5.10|default|tcp_download|received|1000|900|-100|PASS|tg; diff \
                     allowed -50..0"
                        .to_owned()
                } else if r.starts_with("MATRIX|5.10|kprobe|in_flight|peer_received|") {
                    // Inside its declared bound: a pass.
                    "MATRIX|5.10|kprobe|in_flight|peer_received|416|208|-208|PASS|tg; kprobe \
                     mode: calls in flight at attach may be missed, diff allowed -208..0"
                        .to_owned()
                } else {
                    r
                }
            })
            .collect();
        let all = problems(&(boot("5.10", 1, &rows, "0") + &host_boot()));
        assert!(
            all.contains(
                "5.10 boot 1 kprobe udp_both received: FAIL: expected 1000, seen 999, diff -1"
            ) && all.contains(
                "5.10 boot 1 default tcp_download sent: PASS: expected 1000, seen 1001, diff 1"
            ) && all.contains(
                "5.10 boot 1 default tcp_download received: PASS: expected 1000, seen 900, \
                 diff -100"
            ),
            "{all}"
        );
        assert_eq!(all.lines().count(), 3, "{all}");
    }

    #[test]
    fn unexpected_refusals_and_attachments_fail() {
        let rows: Vec<String> = guest_rows()
            .into_iter()
            .map(|r| {
                r.replace(
                    "MXRUN|5.10|tp_btf|refused|PASS",
                    "MXRUN|5.10|tp_btf|attached|socket_send=tp_btf",
                )
            })
            .filter(|r| !r.contains("|kprobe|"))
            .chain(["MXRUN|5.10|kprobe|refused|FAIL|exit 1: no".to_owned()])
            .collect();
        let all = problems(&(boot("5.10", 1, &rows, "0") + &host_boot()));
        assert!(all.contains("expected the agent to refuse tp_btf"), "{all}");
        assert!(all.contains("expected kprobe to attach"), "{all}");
        assert!(
            all.contains("5.10 boot 1 kprobe: the agent refused to start: exit 1: no"),
            "{all}"
        );
    }

    #[test]
    fn missing_kernels_and_stray_lines_fail() {
        let text = format!(
            "MXLOG|5.10|setup|stray\n{}",
            boot("5.10", 1, &guest_rows(), "0")
        );
        let all = problems(&text);
        assert!(all.contains("a line outside any boot"), "{all}");
        assert!(all.contains("host-6.18: no boot in the results"), "{all}");
    }

    #[test]
    fn the_real_kernels_list_parses() {
        let root = fleetsnitch_e2e::workspace_root();
        let text = std::fs::read_to_string(root.join("tests/kernels/kernels.list"))
            .expect("read kernels.list");
        let specs = parse_kernels_list(&text).expect("kernels.list parses");
        assert!(specs.iter().any(|s| s.label == "5.10"), "{specs:?}");
        assert!(parse_kernels_list("6.1 bookworm kprobe=maybe\n").is_err());
    }
}
