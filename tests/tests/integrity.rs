//! No program hides behind another (issue #15).
//!
//! - A program that deletes itself has its bytes counted under its own path,
//!   even when the next program created takes its inode number (ext4 hands it
//!   over at once): 50 rounds of "A unlinks itself, sends 1.5 MB; B, created
//!   next on A's inode number, sends 3,885,000 bytes", TCP and UDP, with and
//!   without exec tracking, half of them with the agent stopped while both run
//!   (so that A's last bytes are always drained after B is announced), exact
//!   in `/metrics` and in the journal's `connections` table.
//! - Two files at one path, running at once in two mount namespaces, are told
//!   apart by sha256: exact bytes per hash in `/metrics`, the journal and the
//!   connection log; `fleetsnitch_executable_info` shows both.
//! - 10,000 one-off binaries (each connects once, then is deleted) leave the
//!   series bounded: an executable not seen for `metrics.executable_expiry`
//!   gives its series and its place under the caps back, a program new after
//!   the churn gets its own `exe` value, and the agent's memory levels off.
//!
//! - A socket carried in turn by two programs (the second inherits it across
//!   exec), then connected to another port, all within one drain: each
//!   program's bytes to each port are counted under its own name. (The agent
//!   counts most bytes in a table keyed by the socket's address; an entry
//!   there holds only the flow it was created for.)
//! - A socket kept by one process across an exec into another program, within
//!   one drain: the bytes before and after the exec are counted under each
//!   program's own name (the flow slots tell process images apart without
//!   reading the executable on every call).
//!
//! Each of the first three runs twice: with the agent on the host, and with the agent in the
//! chart's pod (`Testbed::in_pod`), where every path it names and every file
//! it hashes is the node's, seen through `/host`.
//!
//! Needs root (eBPF, network and mount namespaces, a loop-mounted ext4).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Read,
    net::{Ipv4Addr, TcpListener},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    AgentGuard, TempDir, Testbed,
    filesystems::{Mounts, copy_executable, copy_onto_inode, ext4},
    parse_samples,
    pod::JOURNAL_DIR,
    process, query_journal, random_suffix, require_root, run_loopback,
    scenarios::PEER_V4,
    sha256_file, wait_until,
};

// --- shared helpers ------------------------------------------------------

/// The Python interpreter as an ELF file to copy (not a wrapper script).
fn python() -> Result<PathBuf> {
    let path = fs::canonicalize("/usr/bin/python3")
        .context("/usr/bin/python3 is needed (Debian's python3)")?;
    let mut magic = [0u8; 4];
    fs::File::open(&path)?.read_exact(&mut magic)?;
    ensure!(
        magic == *b"\x7fELF",
        "{} is not an ELF executable",
        path.display()
    );
    Ok(path)
}

/// Sum of `fleetsnitch_bytes_total` samples sent by `exe` (over every other
/// label), by the value of `by` (`""` for all).
fn sent_by(text: &str, exe: &str, by: &str) -> Result<BTreeMap<String, u64>> {
    let mut sums = BTreeMap::new();
    for sample in parse_samples(text, "fleetsnitch_bytes_total")? {
        if sample.labels.get("exe").map(String::as_str) == Some(exe)
            && sample.labels.get("direction").map(String::as_str) == Some("sent")
        {
            let key = sample.labels.get(by).cloned().unwrap_or_default();
            *sums.entry(key).or_default() += sample.value as u64;
        }
    }
    Ok(sums)
}

fn sql_text(text: &str) -> String {
    text.replace('\'', "''")
}

/// The agent stopped (SIGSTOP) until dropped.
struct Stopped<'a>(&'a mut AgentGuard);

impl<'a> Stopped<'a> {
    fn new(agent: &'a mut AgentGuard) -> Self {
        agent.signal(libc::SIGSTOP);
        Self(agent)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

// --- inode reuse ----------------------------------------------------------

/// A's and B's program: `<own path> <tcp|udp> <bytes> <peer> <delete|keep>`.
/// Deleting, it unlinks its own file and waits 0.3 s first. TCP goes to the
/// peer's sink (5001), UDP as 1,500-byte datagrams on a connected socket to
/// the peer's UDP sink (6003). Prints `{"sent": N}`, N the sum of what send
/// returned.
const SENDER: &str = r#"
import json, os, socket, sys, time
path, transport, total, peer, mode = sys.argv[1:6]
total = int(total)
if mode == "delete":
    os.unlink(path)
    time.sleep(0.3)
sent = 0
if transport == "tcp":
    s = socket.create_connection((peer, 5001))
    chunk = b"a" * 65536
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((peer, 6003))
    chunk = b"u" * 1500
while sent < total:
    sent += s.send(chunk[: min(len(chunk), total - sent)])
s.close()
print(json.dumps({"sent": sent}))
"#;

const A_BYTES: u64 = 1_500_000;
const B_BYTES: u64 = 3_885_000;
const ROUNDS: usize = 50;

/// One round's two programs and what each sent.
struct Round {
    a: String,
    b: String,
}

/// A (a copy of Python) unlinks itself, waits 0.3 s, sends 1.5 MB and exits;
/// right after, B is copied (onto A's freed inode number) and sends
/// 3,885,000 bytes; B is then deleted too, so every round reuses one inode
/// number. `swap` swaps the transports (A UDP, B TCP); `stop_agent` keeps
/// the agent stopped while both run.
fn inode_reuse_round(
    bed: &mut Testbed,
    fs_dir: &Path,
    python: &Path,
    chain: &mut Option<u64>,
    index: usize,
    swap: bool,
    stop_agent: bool,
) -> Result<Round> {
    let suffix = random_suffix();
    let a = fs_dir.join(format!("A-{index}-{suffix}"));
    let b = fs_dir.join(format!("B-{index}-{suffix}"));
    // Every round uses one inode number: A waits for the last round's B to
    // be freed (the agent may still hash it).
    let inode = copy_onto_inode(python, &a, "", *chain)?;
    *chain = Some(inode);
    let (a_transport, b_transport) = if swap { ("udp", "tcp") } else { ("tcp", "udp") };

    let client = bed.net().client.clone();
    let stopped = stop_agent.then(|| Stopped::new(&mut bed.agent));
    let result = (|| -> Result<()> {
        send(&client, &a, a_transport, A_BYTES, "delete")?;
        // B takes A's inode number once A's last reference is gone.
        copy_onto_inode(python, &b, "", Some(inode))?;
        send(&client, &b, b_transport, B_BYTES, "keep")
    })();
    drop(stopped);
    result?;
    fs::remove_file(&b)?;
    Ok(Round {
        a: a.display().to_string(),
        b: b.display().to_string(),
    })
}

/// Runs a copy of Python in the namespace `client` with [`SENDER`]; checks
/// it sent `bytes`.
fn send(client: &str, exe: &Path, transport: &str, bytes: u64, mode: &str) -> Result<()> {
    let path = exe.to_str().context("non-UTF-8 path")?;
    let mut attempts = 0;
    let out = loop {
        let out = process::run_bounded(
            &mut fleetsnitch_e2e::NetnsPair::command(
                client,
                exe,
                &[
                    "-c",
                    SENDER,
                    path,
                    transport,
                    &bytes.to_string(),
                    PEER_V4,
                    mode,
                ],
            ),
            Duration::from_secs(60),
        )?;
        // `ip netns exec` could not execute the fresh copy: a child another
        // test thread forked while the copy was open for writing still holds
        // that descriptor (until its own exec). Nothing ran, nothing was sent.
        if !out.status.success() && out.stderr.contains("Text file busy") && attempts < 20 {
            attempts += 1;
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        break out;
    };
    ensure!(
        out.status.success(),
        "{} ({transport}) failed: {}",
        exe.display(),
        out.stderr
    );
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("{}: {:?}", exe.display(), out.stdout))?;
    ensure!(
        report["sent"].as_u64() == Some(bytes),
        "{} sent {} bytes, not {bytes}",
        exe.display(),
        report["sent"]
    );
    Ok(())
}

/// What the agent says it could not do, and where bytes went, for a failure's message.
fn diagnosis(bed: &Testbed, fs_dir: &Path) -> Result<String> {
    let text = bed.metrics().text()?;
    let mut lines = Vec::new();
    for family in [
        "fleetsnitch_events_lost_total",
        "fleetsnitch_unresolved_bytes_total",
        "fleetsnitch_unattributed_bytes_total",
        "fleetsnitch_map_full_total",
    ] {
        let total: f64 = parse_samples(&text, family)?.iter().map(|s| s.value).sum();
        lines.push(format!("{family} {total}"));
    }
    let prefix = format!("{}/", fs_dir.display());
    let mut others = BTreeMap::new();
    for sample in parse_samples(&text, "fleetsnitch_bytes_total")? {
        let exe = sample.labels.get("exe").cloned().unwrap_or_default();
        if exe.starts_with('[') || exe.starts_with(&prefix) {
            *others.entry(exe).or_insert(0.0) += sample.value;
        }
    }
    lines.push(format!(
        "bytes of the test's and bracketed exes: {others:?}"
    ));
    lines.push(format!("agent log:\n{}", bed.log_tail(40)));
    Ok(lines.join("\n"))
}

/// Where the agent runs: on the host, or as the chart's pod runs it (its own
/// mount namespace, the node's files read through `/host`).
#[derive(Clone, Copy, PartialEq)]
enum Agent {
    OnTheHost,
    InThePod,
}

fn inode_reuse(config: &str, name: &str, agent: Agent) -> Result<()> {
    let python = python()?;
    let fs_dir = TempDir::new(&format!("fsn-{name}-fs"))?;
    let mut mounts = Mounts::default();
    let mnt = ext4(&fs_dir, &mut mounts)?;
    let mut setup = Testbed::setup(&format!("fsn-{name}"))?
        .peer()
        .config(config);
    if agent == Agent::InThePod {
        setup = setup.in_pod()?;
    }
    let mut bed = setup.start()?;

    let started = Instant::now();
    let mut rounds = Vec::with_capacity(ROUNDS);
    let mut chain = None;
    for index in 0..ROUNDS {
        let (swap, stop_agent) = (index % 4 >= 2, index % 2 == 0);
        let round = inode_reuse_round(&mut bed, &mnt, &python, &mut chain, index, swap, stop_agent)
            .with_context(|| format!("round {index}"))?;
        rounds.push(round);
    }
    eprintln!(
        "{ROUNDS} rounds of A (deleted, 1.5 MB) then B (A's inode, 3,885,000 bytes) in {:?}",
        started.elapsed()
    );

    // /metrics: exactly each program's bytes, under its own path.
    let expected: BTreeMap<String, u64> = rounds
        .iter()
        .flat_map(|round| [(round.a.clone(), A_BYTES), (round.b.clone(), B_BYTES)])
        .collect();
    let reported = |text: &str| -> Result<BTreeMap<String, u64>> {
        let mut reported = BTreeMap::new();
        for exe in expected.keys() {
            reported.insert(exe.clone(), sent_by(text, exe, "")?.values().sum());
        }
        Ok(reported)
    };
    let mut last = BTreeMap::new();
    let settled = wait_until(Duration::from_secs(20), "exact bytes in /metrics", || {
        last = reported(&bed.metrics().text()?)?;
        Ok(last == expected)
    });
    if settled.is_err() {
        let wrong: Vec<String> = expected
            .iter()
            .filter(|(exe, bytes)| last.get(*exe) != Some(bytes))
            .map(|(exe, bytes)| format!("{exe}: expected {bytes}, /metrics {:?}", last.get(exe)))
            .collect();
        bail!(
            "{} of {} programs not counted exactly in /metrics:\n{}\n{}",
            wrong.len(),
            expected.len(),
            wrong.join("\n"),
            diagnosis(&bed, &mnt)?
        );
    }

    // The journal's connection rollups: the same, once written.
    let prefix = format!("{}/", mnt.display());
    let journaled = || -> Result<BTreeMap<String, u64>> {
        let out = query_journal(
            bed.journal(),
            &format!(
                "SELECT exe, sum(bytes_sent) FROM connections WHERE substr(exe, 1, {}) = '{}' \
                 GROUP BY exe",
                prefix.len(),
                sql_text(&prefix)
            ),
        )?;
        Ok(out
            .lines()
            .filter_map(|line| line.split_once('|'))
            .map(|(exe, sent)| (exe.to_owned(), sent.parse().unwrap_or(0)))
            .collect())
    };
    let mut last = BTreeMap::new();
    let settled = wait_until(
        Duration::from_secs(40),
        "exact bytes in the journal",
        || {
            last = journaled()?;
            Ok(last == expected)
        },
    );
    if settled.is_err() {
        let names: BTreeSet<&String> = expected.keys().chain(last.keys()).collect();
        let wrong: Vec<String> = names
            .into_iter()
            .filter(|exe| expected.get(*exe) != last.get(*exe))
            .map(|exe| {
                format!(
                    "{exe}: expected {:?}, journal {:?}",
                    expected.get(exe),
                    last.get(exe)
                )
            })
            .collect();
        bail!(
            "{} programs not journaled exactly:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }
    drop(bed);
    drop(mounts);
    Ok(())
}

// --- a socket shared by two programs -------------------------------------

/// Runs `sweep <what>` (its first program `first`, with `args`) and returns
/// its report.
fn sweep_report(first: &Path, what: &str, args: &[&str]) -> Result<serde_json::Value> {
    let out = process::run_bounded(
        Command::new(first).arg(what).args(args),
        Duration::from_secs(60),
    )?;
    ensure!(out.status.success(), "sweep {what}: {}", out.stderr);
    serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("sweep {what} said {:?}", out.stdout))
}

/// A number from a sweep report.
fn report_field(report: &serde_json::Value, name: &str) -> Result<u64> {
    report[name]
        .as_u64()
        .with_context(|| format!("no {name} in {report}"))
}

/// Waits until `/metrics` shows exactly `expected` (program -> remote port ->
/// bytes sent) for each program, and says what it saw either way.
fn wait_for_sent_by_port(bed: &Testbed, expected: &[(&Path, BTreeMap<String, u64>)]) -> Result<()> {
    let mut seen = vec![BTreeMap::new(); expected.len()];
    let settled = wait_until(Duration::from_secs(15), "every program counted", || {
        let text = bed.metrics().text()?;
        for ((program, _), seen) in expected.iter().zip(seen.iter_mut()) {
            *seen = sent_by(&text, &program.to_string_lossy(), "remote_port")?;
        }
        Ok(expected
            .iter()
            .zip(&seen)
            .all(|((_, want), got)| want == got))
    });
    for ((program, want), got) in expected.iter().zip(&seen) {
        eprintln!(
            "sent by remote_port, {}: expected {want:?}, seen {got:?}",
            program.display()
        );
    }
    settled
}

/// One socket, two programs and two peers within one drain: the per-socket
/// table's entry belongs to the first flow the socket carried; the child's
/// bytes on the same socket, and the parent's after reconnecting, must land
/// under their own executable and port, never in that entry.
#[test]
fn a_socket_shared_by_two_programs_counts_each_programs_own_bytes() -> Result<()> {
    require_root!("eBPF");
    let bed = Testbed::setup("fsn-integrity-shared")?
        .config("collector:\n  drain_interval: 2s\n")
        .start()?;
    let parent = bed.copy("sweep", "share-parent")?;
    let child = bed.copy("sweep", "share-child")?;
    let child_path = child.to_str().context("child path")?;
    let report = sweep_report(
        &parent,
        "share",
        &["--child", child_path, "--rounds", "300"],
    )?;
    let field = |name: &str| report_field(&report, name);
    let (first, second) = (field("first_port")?, field("second_port")?);
    let expected_parent = BTreeMap::from([
        (first.to_string(), field("parent_first")?),
        (second.to_string(), field("parent_second")?),
    ]);
    let expected_child = BTreeMap::from([(first.to_string(), field("child_first")?)]);
    wait_for_sent_by_port(
        &bed,
        &[(&parent, expected_parent), (&child, expected_child)],
    )
}

/// One process, one socket, two programs: the program before an exec and the
/// one after it send on the same connected socket within one drain. The
/// tp_btf programs find a flow's slot without reading the executable (by
/// process image, see `image_of` in the eBPF source); the bytes after the
/// exec must still land under the new program, never in the slot the first
/// one filled.
#[test]
fn a_socket_kept_across_exec_counts_each_programs_own_bytes() -> Result<()> {
    require_root!("eBPF");
    let bed = Testbed::setup("fsn-integrity-handover")?
        .config("collector:\n  drain_interval: 2s\n")
        .start()?;
    let first = bed.copy("sweep", "handover-first")?;
    let next = bed.copy("sweep", "handover-next")?;
    let next_path = next.to_str().context("next path")?;
    let report = sweep_report(
        &first,
        "handover",
        &["--next", next_path, "--rounds", "300"],
    )?;
    let field = |name: &str| report_field(&report, name);
    let port = field("port")?.to_string();
    let expected_first = BTreeMap::from([(port.clone(), field("first")?)]);
    let expected_next = BTreeMap::from([(port, field("next")?)]);
    wait_for_sent_by_port(&bed, &[(&first, expected_first), (&next, expected_next)])
}

/// Two programs, one process id, one flow, within one drain: the first
/// sends from a fixed local port and exits, the next gets the same process
/// id and sends from the same port to the same peer. The slot the first one
/// filled matches the next one's process id and flow exactly; only the
/// process image (see `image_of` in the eBPF source) tells them apart, and
/// the next one's bytes must land under its own executable.
#[test]
fn a_reused_process_id_on_the_same_flow_counts_each_programs_own_bytes() -> Result<()> {
    require_root!("eBPF, and writing /proc/sys/kernel/ns_last_pid");
    let bed = Testbed::setup("fsn-integrity-reuse")?
        .config("collector:\n  drain_interval: 2s\n")
        .start()?;
    let driver = bed.copy("sweep", "reuse-driver")?;
    let first = bed.copy("sweep", "reuse-first")?;
    let next = bed.copy("sweep", "reuse-next")?;
    let path = |program: &Path| program.to_str().map(str::to_owned).context("path");
    let report = sweep_report(
        &driver,
        "reuse",
        &[
            "--first",
            &path(&first)?,
            "--next",
            &path(&next)?,
            "--rounds",
            "300",
        ],
    )?;
    eprintln!("sweep reuse: {report}");
    let field = |name: &str| report_field(&report, name);
    let port = field("port")?.to_string();
    let expected_first = BTreeMap::from([(port.clone(), field("first")?)]);
    let expected_next = BTreeMap::from([(port, field("next")?)]);
    wait_for_sent_by_port(&bed, &[(&first, expected_first), (&next, expected_next)])
}

const WITHOUT_EXEC_TRACKING: &str = "journal:\n  write_interval: 10s\n";
const WITH_EXEC_TRACKING: &str = "journal:\n  write_interval: 10s\nexec:\n  enabled: true\n";

#[test]
fn a_deleted_program_keeps_its_bytes_when_the_next_file_takes_its_inode_number() -> Result<()> {
    require_root!("eBPF, network namespaces, mounts");
    inode_reuse(WITHOUT_EXEC_TRACKING, "reuse", Agent::OnTheHost)
}

#[test]
fn a_deleted_program_keeps_its_bytes_with_exec_tracking_on() -> Result<()> {
    require_root!("eBPF, network namespaces, mounts");
    inode_reuse(WITH_EXEC_TRACKING, "reuse-exec", Agent::OnTheHost)
}

#[test]
fn in_the_charts_pod_a_deleted_program_keeps_its_bytes_when_the_next_file_takes_its_inode()
-> Result<()> {
    require_root!("eBPF, network and mount namespaces, mounts");
    inode_reuse(WITHOUT_EXEC_TRACKING, "reuse-pod", Agent::InThePod)
}

#[test]
fn in_the_charts_pod_a_deleted_program_keeps_its_bytes_with_exec_tracking_on() -> Result<()> {
    require_root!("eBPF, network and mount namespaces, mounts");
    inode_reuse(WITH_EXEC_TRACKING, "reuse-exec-pod", Agent::InThePod)
}

// --- two versions at one path ---------------------------------------------

/// Each version's program: `<go file> <bytes> <peer>`. It says it is ready
/// (a file `<go>.ready-<pid>`), waits for `<go>` (so both versions run at
/// once), uploads its bytes to the peer's TCP sink, writes what send
/// returned in total to `<go>.sent-<pid>` and runs on until `<go>.exit`
/// exists, as a service would (so that it can be hashed through its process).
const VERSION: &str = r#"
import os, socket, sys, time
go, total, peer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def wait_for(path):
    deadline = time.time() + 60
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.01)
open("%s.ready-%d" % (go, os.getpid()), "w").close()
wait_for(go)
s = socket.create_connection((peer, 5001))
chunk = b"v" * 65536
sent = 0
while sent < total:
    sent += s.send(chunk[: min(len(chunk), total - sent)])
s.close()
with open("%s.sent-%d" % (go, os.getpid()), "w") as report:
    report.write(str(sent))
wait_for(go + ".exit")
"#;

/// Starts `version` bound onto `path` in a mount namespace of its own (in
/// the client network namespace), running [`VERSION`].
fn start_version(
    bed: &Testbed,
    version: &Path,
    path: &Path,
    go: &Path,
    bytes: u64,
) -> Result<std::process::Child> {
    let text = |p: &Path| p.to_str().map(str::to_owned).context("non-UTF-8 path");
    let mut cmd = bed.net().in_client(
        Path::new("unshare"),
        &[
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind \"$1\" \"$2\" && exec \"$2\" -c \"$3\" \"$4\" \"$5\" \"$6\"",
            "sh",
            &text(version)?,
            &text(path)?,
            VERSION,
            &text(go)?,
            &bytes.to_string(),
            PEER_V4,
        ],
    );
    process::die_with_parent(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    process::spawn_retrying_busy(&mut cmd).with_context(|| format!("start {}", version.display()))
}

#[test]
fn two_versions_at_one_path_are_told_apart_by_their_sha256() -> Result<()> {
    require_root!("eBPF, network and mount namespaces");
    two_versions(Agent::OnTheHost)
}

#[test]
fn in_the_charts_pod_two_versions_at_one_path_are_told_apart_by_their_sha256() -> Result<()> {
    require_root!("eBPF, network and mount namespaces");
    two_versions(Agent::InThePod)
}

fn two_versions(agent: Agent) -> Result<()> {
    let python = python()?;
    let mut setup = Testbed::setup("fsn-versions")?;
    if agent == Agent::InThePod {
        setup = setup.in_pod()?;
    }
    let dir = setup.dir().to_owned();
    let suffix = random_suffix();
    let (v1, v2) = (dir.join("v1"), dir.join("v2"));
    copy_executable(&python, &v1, &format!("version 1 {suffix}"))?;
    copy_executable(&python, &v2, &format!("version 2 {suffix}"))?;
    let (sha1, sha2) = (sha256_file(&v1)?, sha256_file(&v2)?);
    // The one path both run from, each in its own mount namespace.
    fs::create_dir_all(dir.join("bin"))?;
    let tool = dir.join("bin/tool");
    fs::write(&tool, b"")?;
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o755))?;
    let log = dir.join("connections.jsonl");
    let agents_log = match agent {
        Agent::OnTheHost => log.display().to_string(),
        // The testbed's directory is the pod's journal volume.
        Agent::InThePod => format!("{JOURNAL_DIR}/connections.jsonl"),
    };
    let bed = setup
        .peer()
        .config(format!(
            "metrics:\n  bytes_labels: [sha256]\njournal:\n  write_interval: 1s\n\
             connection_log:\n  enabled: true\n  path: {agents_log}\n",
        ))
        .start()?;

    let go = dir.join("go");
    let (bytes1, bytes2) = (2_000_003u64, 3_100_007u64);
    let mut children = vec![
        start_version(&bed, &v1, &tool, &go, bytes1)?,
        start_version(&bed, &v2, &tool, &go, bytes2)?,
    ];
    let reports = |kind: &str| -> Result<Vec<PathBuf>> {
        let prefix = format!("go.{kind}-");
        Ok(fs::read_dir(&dir)?
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
            .map(|entry| entry.path())
            .collect())
    };
    let ran = (|| -> Result<BTreeSet<u64>> {
        wait_until(Duration::from_secs(30), "both versions running", || {
            Ok(reports("ready")?.len() == 2)
        })?;
        fs::write(&go, b"")?;
        wait_until(
            Duration::from_secs(60),
            "both versions done sending",
            || Ok(reports("sent")?.len() == 2),
        )?;
        reports("sent")?
            .iter()
            .map(|report| Ok(fs::read_to_string(report)?.trim().parse()?))
            .collect()
    })();
    // Both run on until the checks of /metrics are done, or the test fails.
    let stop = |children: &mut Vec<std::process::Child>| -> Result<()> {
        fs::write(dir.join("go.exit"), b"")?;
        for child in children {
            let status = process::wait_timeout(child, Duration::from_secs(30))?;
            ensure!(
                status.is_some_and(|status| status.success()),
                "a version failed: {status:?}"
            );
        }
        Ok(())
    };
    let sent = match ran {
        Ok(sent) => sent,
        Err(error) => {
            let _ = stop(&mut children);
            return Err(error);
        }
    };
    ensure!(
        sent == BTreeSet::from([bytes1, bytes2]),
        "the versions sent {sent:?}"
    );

    let exe = tool.display().to_string();
    let expected = BTreeMap::from([(sha1.clone(), bytes1), (sha2.clone(), bytes2)]);
    let mut last = BTreeMap::new();
    let counted = wait_until(
        Duration::from_secs(20),
        "exact bytes per sha256 in /metrics",
        || {
            last = sent_by(&bed.metrics().text()?, &exe, "sha256")?;
            Ok(last == expected)
        },
    );
    if let Err(error) = counted {
        let _ = stop(&mut children);
        return Err(error).with_context(|| format!("expected {expected:?}, /metrics {last:?}"));
    }

    let text = bed.metrics().text()?;
    let versions: BTreeSet<String> = parse_samples(&text, "fleetsnitch_executable_info")?
        .into_iter()
        .filter(|sample| sample.labels.get("exe") == Some(&exe))
        .filter_map(|sample| sample.labels.get("sha256").cloned())
        .collect();
    ensure!(
        versions == BTreeSet::from([sha1.clone(), sha2.clone()]),
        "fleetsnitch_executable_info of {exe}: {versions:?}, expected both versions"
    );
    stop(&mut children)?;

    // Every rollup carries the hash of the file that sent it.
    let journaled = || -> Result<BTreeMap<String, u64>> {
        let out = query_journal(
            bed.journal(),
            &format!(
                "SELECT sha256, sum(bytes_sent) FROM connections WHERE exe = '{}' GROUP BY sha256",
                sql_text(&exe)
            ),
        )?;
        Ok(out
            .lines()
            .filter_map(|line| line.split_once('|'))
            .map(|(sha256, sent)| (sha256.to_owned(), sent.parse().unwrap_or(0)))
            .collect())
    };
    wait_until(
        Duration::from_secs(30),
        "exact bytes per sha256 in the journal",
        || {
            last = journaled()?;
            Ok(last == expected)
        },
    )
    .with_context(|| format!("expected {expected:?}, journal {last:?}"))?;
    let logged = || -> Result<BTreeMap<String, u64>> {
        let mut sums = BTreeMap::new();
        for line in fs::read_to_string(&log).unwrap_or_default().lines() {
            let record: serde_json::Value = serde_json::from_str(line)?;
            if record["record"] == "connection" && record["exe"] == exe.as_str() {
                let sha256 = record["sha256"].as_str().unwrap_or_default().to_owned();
                *sums.entry(sha256).or_default() += record["bytes_sent"].as_u64().unwrap_or(0);
            }
        }
        Ok(sums)
    };
    wait_until(
        Duration::from_secs(30),
        "exact bytes per sha256 in the connection log",
        || {
            last = logged()?;
            Ok(last == expected)
        },
    )
    .with_context(|| format!("expected {expected:?}, connection log {last:?}"))?;
    eprintln!(
        "two versions of {exe}: {expected:?} in /metrics, the journal and the connection log"
    );
    Ok(())
}

// --- bounded series under churn -------------------------------------------

/// A static x86-64 Linux program of a few hundred bytes, built here so that
/// thousands of distinct copies cost nothing to write: it connects to
/// 127.0.0.1:`port`, writes 18 bytes and exits, with status 0 only if all
/// 18 were written. Bytes appended after it (a tag) are not loaded.
fn one_off_program(port: u16) -> Vec<u8> {
    const MESSAGE: &[u8] = b"fleetsnitch churn\n";
    let mut code: Vec<u8> = Vec::new();
    code.extend([0xb8, 41, 0, 0, 0]); // mov eax, 41 (socket)
    code.extend([0xbf, 2, 0, 0, 0]); // mov edi, AF_INET
    code.extend([0xbe, 1, 0, 0, 0]); // mov esi, SOCK_STREAM
    code.extend([0x31, 0xd2]); // xor edx, edx
    code.extend([0x0f, 0x05]); // syscall
    code.extend([0x41, 0x89, 0xc4]); // mov r12d, eax
    code.extend([0x89, 0xc7]); // mov edi, eax
    let address_lea = code.len();
    code.extend([0x48, 0x8d, 0x35, 0, 0, 0, 0]); // lea rsi, [rip + address]
    code.extend([0xba, 16, 0, 0, 0]); // mov edx, 16
    code.extend([0xb8, 42, 0, 0, 0]); // mov eax, 42 (connect)
    code.extend([0x0f, 0x05]); // syscall
    code.extend([0x44, 0x89, 0xe7]); // mov edi, r12d
    let message_lea = code.len();
    code.extend([0x48, 0x8d, 0x35, 0, 0, 0, 0]); // lea rsi, [rip + message]
    code.extend([0xba, MESSAGE.len() as u8, 0, 0, 0]); // mov edx, len
    code.extend([0xb8, 1, 0, 0, 0]); // mov eax, 1 (write)
    code.extend([0x0f, 0x05]); // syscall
    code.extend([0x48, 0x83, 0xf8, MESSAGE.len() as u8]); // cmp rax, len
    code.extend([0x40, 0x0f, 0x95, 0xc7]); // setne dil
    code.extend([0x40, 0x0f, 0xb6, 0xff]); // movzx edi, dil
    code.extend([0xb8, 231, 0, 0, 0]); // mov eax, 231 (exit_group)
    code.extend([0x0f, 0x05]); // syscall
    let address = code.len();
    code.extend(2u16.to_le_bytes()); // sin_family
    code.extend(port.to_be_bytes()); // sin_port
    code.extend([127, 0, 0, 1]); // sin_addr
    code.extend([0; 8]);
    let message = code.len();
    code.extend(MESSAGE);
    for (lea, target) in [(address_lea, address), (message_lea, message)] {
        let relative = target as i32 - (lea as i32 + 7);
        code[lea + 3..lea + 7].copy_from_slice(&relative.to_le_bytes());
    }

    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let size = HEADERS + code.len() as u64;
    let mut elf = Vec::with_capacity(size as usize);
    elf.extend(b"\x7fELF");
    elf.extend([2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    elf.extend([0; 8]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86-64
    elf.extend(1u32.to_le_bytes());
    elf.extend((BASE + HEADERS).to_le_bytes()); // entry
    elf.extend(64u64.to_le_bytes()); // program headers
    elf.extend(0u64.to_le_bytes()); // no section headers
    elf.extend(0u32.to_le_bytes());
    elf.extend(64u16.to_le_bytes());
    elf.extend(56u16.to_le_bytes());
    elf.extend(1u16.to_le_bytes());
    elf.extend([0; 6]);
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // R + X
    elf.extend(0u64.to_le_bytes());
    elf.extend(BASE.to_le_bytes());
    elf.extend(BASE.to_le_bytes());
    elf.extend(size.to_le_bytes());
    elf.extend(size.to_le_bytes());
    elf.extend(0x1000u64.to_le_bytes());
    elf.extend(code);
    elf
}

const CHURN: usize = 10_000;
const CHURN_BATCH: usize = 1_000;
const CHURN_WORKERS: usize = 4;
/// New binaries a second, at most: with the expiry below, about 1,750
/// executables are alive in /metrics at any time, under the cap of 3,000;
/// without expiry the 3,001st would be folded into exe="other".
const CHURN_RATE: u32 = 250;
const CHURN_EXE_CAP: usize = 3_000;
const CHURN_EXPIRY_SECS: u64 = 5;
/// Files each worker keeps before deleting the oldest: the agent has time
/// to hash most of them by path once their process is gone.
const CHURN_LAG: usize = 20;

fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches(" kB").trim().parse().ok())
        .context("no VmRSS")
}

fn family_sum(text: &str, family: &str, label: &str, value: &str) -> Result<f64> {
    Ok(parse_samples(text, family)?
        .iter()
        .filter(|sample| sample.labels.get(label).map(String::as_str) == Some(value))
        .map(|sample| sample.value)
        .sum())
}

/// Runs one-off binaries `first..first + count`, each a distinct file in
/// `dir` (the program plus a tag), paced to [`CHURN_RATE`] from `start`.
fn churn_batch(
    dir: &Path,
    program: &[u8],
    first: usize,
    count: usize,
    start: Instant,
) -> Result<()> {
    thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..CHURN_WORKERS)
            .map(|worker| {
                scope.spawn(move || -> Result<()> {
                    let mut kept = std::collections::VecDeque::new();
                    for index in (first + worker..first + count).step_by(CHURN_WORKERS) {
                        let due = start + Duration::from_secs(1) * index as u32 / CHURN_RATE;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                        let path = dir.join(format!("one-off-{index:05}"));
                        let mut file = fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o755)
                            .open(&path)?;
                        std::io::Write::write_all(&mut file, program)?;
                        std::io::Write::write_all(&mut file, format!("#{index}").as_bytes())?;
                        drop(file);
                        let mut child = process::spawn_retrying_busy(
                            Command::new(&path)
                                .stdin(Stdio::null())
                                .stdout(Stdio::null())
                                .stderr(Stdio::null()),
                        )
                        .with_context(|| format!("run {}", path.display()))?;
                        let status = process::wait_timeout(&mut child, Duration::from_secs(10))?;
                        ensure!(
                            status.is_some_and(|status| status.success()),
                            "{} did not connect and write: {status:?}",
                            path.display()
                        );
                        kept.push_back(path);
                        if kept.len() > CHURN_LAG
                            && let Some(old) = kept.pop_front()
                        {
                            fs::remove_file(old)?;
                        }
                    }
                    for path in kept {
                        fs::remove_file(path)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("churn worker panicked")?;
        }
        Ok(())
    })
}

#[test]
fn ten_thousand_one_off_binaries_leave_the_series_bounded() -> Result<()> {
    require_root!("eBPF");
    churn_with_a_listener(Agent::OnTheHost)
}

#[test]
fn in_the_charts_pod_ten_thousand_one_off_binaries_leave_the_series_bounded() -> Result<()> {
    require_root!("eBPF, network and mount namespaces");
    churn_with_a_listener(Agent::InThePod)
}

fn churn_with_a_listener(agent: Agent) -> Result<()> {
    ensure!(
        cfg!(all(target_arch = "x86_64", target_os = "linux")),
        "the churn's one-off program is x86-64 Linux machine code"
    );
    // The binaries' peer: a listener in this process that reads and forgets.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let accepting = {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                        let _ = std::io::copy(&mut stream, &mut std::io::sink());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        })
    };
    let result = churn(port, agent);
    stop.store(true, Ordering::Relaxed);
    let _ = accepting.join();
    result
}

fn churn(port: u16, agent: Agent) -> Result<()> {
    let mut setup = Testbed::setup("fsn-churn")?;
    if agent == Agent::InThePod {
        setup = setup.in_pod()?;
    }
    let bins = setup.dir().join("churn");
    fs::create_dir_all(&bins)?;
    let prefix = format!("{}/", bins.display());
    let mut bed = setup
        .config(format!(
            "metrics:\n  bytes_labels: [sha256]\n  \
             label_caps: {{exe: {CHURN_EXE_CAP}, sha256: {CHURN_EXE_CAP}}}\n  \
             executable_expiry: {CHURN_EXPIRY_SECS}s\n"
        ))
        .start()?;
    let program = one_off_program(port);
    let pid = bed.agent.pid();
    let churned = |text: &str| -> Result<BTreeSet<String>> {
        Ok(parse_samples(text, "fleetsnitch_bytes_total")?
            .into_iter()
            .filter_map(|sample| sample.labels.get("exe").cloned())
            .filter(|exe| exe.starts_with(&prefix))
            .collect())
    };

    let start = Instant::now();
    let mut most = 0;
    let mut samples = Vec::new();
    for first in (0..CHURN).step_by(CHURN_BATCH) {
        churn_batch(&bins, &program, first, CHURN_BATCH, start)?;
        let text = bed.metrics().text()?;
        let alive = churned(&text)?.len();
        most = most.max(alive);
        let series = parse_samples(&text, "fleetsnitch_bytes_series")?
            .first()
            .map_or(0.0, |sample| sample.value);
        let rss = vm_rss_kib(pid)?;
        eprintln!(
            "churn: {:>6} binaries after {:>5.1?}: {alive} of them in /metrics, {series} bytes \
             series, agent VmRSS {rss} KiB",
            first + CHURN_BATCH,
            start.elapsed()
        );
        samples.push(rss);
        bed.agent.check_running()?;
    }
    let elapsed = start.elapsed();
    ensure!(
        elapsed < Duration::from_secs(600),
        "the churn took {elapsed:?}, more than 10 minutes"
    );

    // Every one-off binary expires; none was ever folded.
    wait_until(
        Duration::from_secs(60),
        "the one-off binaries' series expired",
        || Ok(churned(&bed.metrics().text()?)?.is_empty()),
    )?;
    let text = bed.metrics().text()?;
    for label in ["exe", "sha256"] {
        let folded = family_sum(&text, "fleetsnitch_label_overflow_total", "label", label)?;
        ensure!(
            folded == 0.0,
            "{folded} values of {label} folded into \"other\": places were not given back"
        );
    }
    ensure!(
        most < CHURN_EXE_CAP,
        "{most} one-off binaries in /metrics at once, not under the cap of {CHURN_EXE_CAP}"
    );
    let tracked = parse_samples(&text, "fleetsnitch_tracked_executables")?
        .first()
        .map_or(0.0, |sample| sample.value);
    ensure!(
        tracked < 1_000.0,
        "{tracked} executables still in the agent's path table after the churn expired"
    );

    // A program new after the churn has its own exe value.
    let newcomer = bed.copy("trafficgen", "after-churn")?;
    run_loopback(&newcomer, 10_000)?;
    bed.metrics()
        .wait_for_bytes(&newcomer, "sent", 10_000)
        .context("the program run after the churn has no exe value of its own")?;

    // Memory levels off: the second half of the churn adds (almost) nothing
    // to the first half's peak. (Without expiry it grew by 40 % here.)
    let (first, second) = samples.split_at(samples.len() / 2);
    let first_peak = first.iter().copied().max().unwrap_or(0);
    let second_peak = second.iter().copied().max().unwrap_or(0);
    let rss = vm_rss_kib(pid)?;
    eprintln!(
        "churn: {CHURN} binaries in {elapsed:?}, at most {most} in /metrics at once; VmRSS \
         {samples:?} KiB, {rss} KiB after they expired; path table {tracked}"
    );
    ensure!(
        second_peak <= first_peak + first_peak / 10 + 4 * 1024,
        "VmRSS peaked at {first_peak} KiB over the first 5,000 binaries and at {second_peak} KiB \
         over the next 5,000: it does not level off"
    );
    Ok(())
}
