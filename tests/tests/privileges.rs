//! Least privilege: once started, every thread of the agent holds only the
//! documented run-time capabilities (README "Capabilities"): CAP_SYS_PTRACE and
//! CAP_DAC_READ_SEARCH, plus CAP_BPF on kernels before 6.5. Effective,
//! permitted and bounding sets are read for every thread from
//! /proc/<pid>/task/*/status; inheritable and ambient must be empty. And what
//! those capabilities are kept for still works after the drop: an executable
//! nobody may read, run by another user, is hashed (CAP_DAC_READ_SEARCH), and
//! so is a root process's executable in a private mount namespace, reachable
//! only through /proc/<pid>/exe (CAP_SYS_PTRACE). Needs root; skips otherwise.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use fleetsnitch_e2e::{
    ProcessGuard, Testbed, process::run_bounded, random_suffix, require_root, sha256_file,
    wait_until,
};

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_BPF: u32 = 39;

/// The documented run-time set for the running kernel.
fn documented_runtime_set() -> Result<u64> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let mut set = (1u64 << CAP_DAC_READ_SEARCH) | (1 << CAP_SYS_PTRACE);
    if version < (6, 5) {
        set |= 1 << CAP_BPF;
    }
    Ok(set)
}

fn field(status: &str, name: &str) -> Result<u64> {
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .with_context(|| format!("no {name} line"))?;
    Ok(u64::from_str_radix(value.trim(), 16)?)
}

/// Every thread's capability sets that differ from `expected`, and how many threads were read.
fn threads_beyond(pid: u32, expected: u64) -> Result<(Vec<String>, usize)> {
    let mut wrong = Vec::new();
    let mut threads = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        // A thread may exit between the listing and the read.
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        threads += 1;
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("")
            .trim()
            .to_owned();
        let sets = [
            ("CapEff", field(&status, "CapEff")?, expected),
            ("CapPrm", field(&status, "CapPrm")?, expected),
            ("CapBnd", field(&status, "CapBnd")?, expected),
            ("CapInh", field(&status, "CapInh")?, 0),
            ("CapAmb", field(&status, "CapAmb")?, 0),
        ];
        for (set, seen, want) in sets {
            if seen != want {
                wrong.push(format!(
                    "thread {} ({name}): {set} {seen:#018x}, expected {want:#018x}",
                    task.file_name().to_string_lossy()
                ));
            }
        }
    }
    Ok((wrong, threads))
}

fn own_permitted() -> Result<u64> {
    field(&fs::read_to_string("/proc/self/status")?, "CapPrm")
}

#[test]
fn every_thread_keeps_only_the_documented_runtime_capabilities() -> Result<()> {
    require_root!("the agent loads eBPF");
    let expected = documented_runtime_set()? & own_permitted()?;
    let setup = Testbed::setup("fsn-privileges")?;
    fs::set_permissions(setup.dir(), fs::Permissions::from_mode(0o755))?;
    let mut bed = setup.start()?;
    let pid = bed.agent.pid();

    let (wrong, threads) = threads_beyond(pid, expected)?;
    ensure!(
        wrong.is_empty(),
        "after start-up:\n{}\nagent log:\n{}",
        wrong.join("\n"),
        bed.log_tail(20)
    );
    // The collector, hasher, journal threads and tokio's workers at least.
    ensure!(
        threads >= 4,
        "only {threads} threads read: the check would prove little"
    );
    ensure!(
        bed.log_tail(200)
            .contains("capabilities beyond the run-time set dropped in every thread"),
        "{}",
        bed.log_tail(30)
    );

    // What the kept capabilities are for: an executable nobody may read
    // (mode 0111, owned by root), run by nobody: naming it needs
    // /proc/<pid>/exe of another user's non-dumpable process (CAP_SYS_PTRACE),
    // hashing it needs to read it (CAP_DAC_READ_SEARCH).
    let exe = bed.copy("trafficgen", "unreadable")?;
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o111))?;
    let sha256 = sha256_file(&exe)?;
    run_as_nobody(&exe)?;
    let metrics = bed.metrics();
    let info = |text: &str| {
        let prefix = format!(
            "fleetsnitch_executable_info{{exe=\"{}\",sha256=\"",
            exe.display()
        );
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map(|rest| rest.split('"').next().unwrap_or("").to_owned())
    };
    let mut seen = None;
    wait_until(
        Duration::from_secs(30),
        "the unreadable executable hashed",
        || {
            seen = info(&metrics.text()?);
            Ok(seen.as_deref().is_some_and(|hash| hash != "unavailable"))
        },
    )
    .with_context(|| format!("executable_info: {seen:?}\n{}", bed.log_tail(20)))?;
    ensure!(
        seen.as_deref() == Some(sha256.as_str()),
        "sha256 of {}: expected {sha256}, agent says {seen:?}",
        exe.display()
    );

    // A root process in its own mount namespace, as in any container: its path
    // does not exist in the agent's namespace, so only /proc/<pid>/exe reaches
    // the file, and with the agent's permitted set now smaller than the
    // process's, opening it needs CAP_SYS_PTRACE even though both are uid 0.
    let mount_point = bed.dir().join("private-mnt");
    fs::create_dir(&mount_point)?;
    let private_exe = mount_point.join(format!("bash-{}", random_suffix()));
    // bash waits on its stdin (a pipe from this test, a builtin read: no other
    // process) until the hash is seen; the guard kills unshare on drop, and
    // --kill-child takes bash (exec'd by sh) with it.
    let mut command = Command::new("unshare");
    command
        .args([
            "--mount",
            "--propagation",
            "private",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
        ])
        .arg(
            "mount -t tmpfs fsn-private \"$1\" && cp /bin/bash \"$2\" && \
             exec \"$2\" -c 'exec 3<>/dev/udp/127.0.0.1/9; echo hello >&3; read -t 60 line; exit 0'",
        )
        .arg("sh")
        .arg(&mount_point)
        .arg(&private_exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _private_shell = ProcessGuard::spawn("unshare", &mut command, Duration::from_secs(5))?;
    let bash_sha256 = sha256_file(Path::new("/bin/bash"))?;
    let private_info = format!(
        "fleetsnitch_executable_info{{exe=\"{}\",sha256=\"{bash_sha256}\"}} 1",
        private_exe.display()
    );
    let mut text = String::new();
    wait_until(
        Duration::from_secs(30),
        "the private namespace's executable hashed",
        || {
            text = metrics.text()?;
            Ok(text.lines().any(|line| line == private_info))
        },
    )
    .with_context(|| {
        format!(
            "expected {private_info}, got:\n{}",
            text.lines()
                .filter(|l| l.contains("private-mnt") || l.contains("hash_failures"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;

    // Threads started after the drop (blocking pool, reconnections) inherit the
    // reduced sets; check them all again.
    let (wrong, _) = threads_beyond(pid, expected)?;
    ensure!(wrong.is_empty(), "after running:\n{}", wrong.join("\n"));
    bed.agent.check_running()?;
    Ok(())
}

fn run_as_nobody(exe: &Path) -> Result<()> {
    let out = run_bounded(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(exe)
            .args(["client", "loopback", "--bytes", "20000"]),
        Duration::from_secs(30),
    )?;
    ensure!(
        out.status.success(),
        "{} as nobody: {}{}",
        exe.display(),
        out.stdout,
        out.stderr
    );
    Ok(())
}
