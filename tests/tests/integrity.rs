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
//! Needs root (eBPF, network and mount namespaces, a loop-mounted ext4).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Read,
    net::{Ipv4Addr, TcpListener},
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
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
    AgentGuard, TempDir, Testbed, parse_samples, process, query_journal, random_suffix,
    require_root, run_loopback, scenarios::PEER_V4, sha256_file, wait_until,
};

// --- shared helpers ------------------------------------------------------

/// Mounts made by a test, unmounted (lazily, last first) on drop, loop
/// devices detached with them.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(&mut self, args: &[&str], target: &Path) -> Result<()> {
        fs::create_dir_all(target)?;
        let out = process::run_bounded(
            Command::new("mount").args(args).arg(target),
            Duration::from_secs(30),
        )?;
        ensure!(
            out.status.success(),
            "mount {args:?} {}: {}",
            target.display(),
            out.stderr
        );
        self.0.push(target.to_owned());
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for target in self.0.iter().rev() {
            let _ = process::run_bounded(
                Command::new("umount").arg("-d").arg(target),
                Duration::from_secs(30),
            );
        }
    }
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = process::run_bounded(Command::new(program).args(args), Duration::from_secs(60))?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

/// A fresh ext4 file system of its own (a loop-mounted image in `dir`), so
/// that inode numbers are handed out as ext4 does, whatever `/tmp` is and
/// whatever else runs on the machine.
fn ext4(dir: &TempDir, mounts: &mut Mounts) -> Result<PathBuf> {
    let image = dir.path().join("ext4.img");
    fs::File::create(&image)?.set_len(128 << 20)?;
    let image = image.to_str().context("non-UTF-8 image path")?;
    run("mkfs.ext4", &["-q", "-F", image])
        .context("mkfs.ext4 (e2fsprogs) is needed to make the test's file system")?;
    let mnt = dir.path().join("ext4");
    mounts.mount(&["-o", "loop", "-t", "ext4", image], &mnt)?;
    Ok(mnt)
}

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

/// Copies `from` to `to`, executable, with `tag` appended (a distinct sha256
/// that still runs: the loader ignores trailing bytes).
fn copy_executable(from: &Path, to: &Path, tag: &str) -> Result<()> {
    let mut content = fs::read(from).with_context(|| format!("read {}", from.display()))?;
    content.extend_from_slice(tag.as_bytes());
    fs::write(to, content).with_context(|| format!("write {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
    Ok(())
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

/// Copies `python` to `to`, onto inode number `inode` when given: ext4 hands
/// out the lowest free number, so the copy is made again (for up to 30 s)
/// until whatever still held that inode (a process, the agent hashing the
/// file) has let it go.
fn copy_onto_inode(python: &Path, to: &Path, inode: Option<u64>) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        copy_executable(python, to, "")?;
        let got = fs::metadata(to)?.ino();
        if inode.is_none_or(|inode| inode == got) {
            return Ok(got);
        }
        fs::remove_file(to)?;
        if Instant::now() > deadline {
            bail!(
                "precondition: {} should take the freed inode number {inode:?} on ext4 \
                 (got {got}); holders of the earlier file: {:?}",
                to.display(),
                holders_of_inode(to.parent().unwrap_or(Path::new("/")), inode.unwrap_or(0))
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Processes that hold a deleted file of `dir` with inode number `inode`
/// open, mapped or as their executable (for the message of a failed precondition).
fn holders_of_inode(dir: &Path, inode: u64) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        for fd in fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let held = fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with(&prefix))
                && fs::metadata(fd.path()).is_ok_and(|m| m.ino() == inode);
            if held {
                found.push(format!("{pid} {} (fd {:?})", comm.trim(), fd.file_name()));
            }
        }
    }
    found
}

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
    let inode = copy_onto_inode(python, &a, *chain)?;
    *chain = Some(inode);
    let (a_transport, b_transport) = if swap { ("udp", "tcp") } else { ("tcp", "udp") };

    let client = bed.net().client.clone();
    let stopped = stop_agent.then(|| Stopped::new(&mut bed.agent));
    let result = (|| -> Result<()> {
        send(&client, &a, a_transport, A_BYTES, "delete")?;
        // B takes A's inode number once A's last reference is gone.
        copy_onto_inode(python, &b, Some(inode))?;
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

fn inode_reuse(config: &str, name: &str) -> Result<()> {
    let python = python()?;
    let fs_dir = TempDir::new(&format!("fsn-{name}-fs"))?;
    let mut mounts = Mounts::default();
    let mnt = ext4(&fs_dir, &mut mounts)?;
    let mut bed = Testbed::setup(&format!("fsn-{name}"))?
        .peer()
        .config(config)
        .start()?;

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
            "{} of {} programs not counted exactly in /metrics:\n{}",
            wrong.len(),
            expected.len(),
            wrong.join("\n")
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

#[test]
fn a_deleted_program_keeps_its_bytes_when_the_next_file_takes_its_inode_number() -> Result<()> {
    require_root!("eBPF, network namespaces, mounts");
    inode_reuse("journal:\n  write_interval: 10s\n", "reuse")
}

#[test]
fn a_deleted_program_keeps_its_bytes_with_exec_tracking_on() -> Result<()> {
    require_root!("eBPF, network namespaces, mounts");
    inode_reuse(
        "journal:\n  write_interval: 10s\nexec:\n  enabled: true\n",
        "reuse-exec",
    )
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
    let python = python()?;
    let setup = Testbed::setup("fsn-versions")?;
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
    let bed = setup
        .peer()
        .config(format!(
            "metrics:\n  bytes_labels: [sha256]\njournal:\n  write_interval: 1s\n\
             connection_log:\n  enabled: true\n  path: {}\n",
            log.display()
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
