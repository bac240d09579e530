//! Harness for the fleetsnitch end-to-end accuracy suite.
//!
//! - [`NetnsPair`]: a client and a peer network namespace joined by a veth pair.
//! - [`PeerServer`]: `trafficgen serve` running in the peer namespace.
//! - [`AgentGuard`]: the `fleetsnitch` agent, in the root namespace.
//! - [`MetricsClient`]: scrapes `fleetsnitch_bytes_total` from `/metrics`.
//! - [`exe_copy`] + [`run_client`]: run one scenario from a uniquely named copy of
//!   `trafficgen` and read the counts it measured itself.
//! - [`Report`]: the expected-versus-reported table.
//! - [`Testbed`]: one test's directory, peer namespaces and agent, set up in one place.
//! - [`filesystems`]: mounts undone on drop, a private ext4, copies onto a chosen inode.
//! - [`kernel_matrix`]: the judge of `scripts/kernel-matrix.sh`'s results.
//! - [`require_root!`]: the one root check; [`skip::skip`] decides what a skip means.
//! - [`summary::Summary`]: the count of a `cargo test` run that `scripts/test.sh` ends with.
//!
//! Every guard cleans up on drop, also while panicking.

pub mod agent;
pub mod ceiling;
pub mod cgroups;
pub mod chart;
pub mod dashboards;
pub mod dnswire;
pub mod filesystems;
pub mod kernel_matrix;
pub mod metrics;
pub mod netns;
pub mod otlp_collector;
pub mod pod;
pub mod process;
pub mod scenarios;
pub mod servers;
pub mod skip;
pub mod summary;
pub mod testbed;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};

pub use agent::{AgentGuard, agent_binary};
pub use metrics::{Accuracy, MetricsClient, Sample, bytes_for, difference, parse_samples};
pub use netns::NetnsPair;
pub use process::ProcessGuard;
pub use skip::is_root;
pub use testbed::{Setup, Testbed};

/// Writes an agent configuration file `fleetsnitch.yaml` into `dir`.
pub fn write_config(dir: &Path, yaml: &str) -> Result<PathBuf> {
    let path = dir.join("fleetsnitch.yaml");
    std::fs::write(&path, yaml).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Runs `sql` on the journal at `journal` with the sqlite3 shell, read-only (a
/// second, independent reader), and returns its trimmed output.
pub fn query_journal(journal: &Path, sql: &str) -> Result<String> {
    let out = process::run_bounded(
        std::process::Command::new("sqlite3")
            .arg("-readonly")
            .arg(journal)
            .arg(sql),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "sqlite3 {sql}: {}", out.stderr);
    Ok(out.stdout.trim().to_owned())
}

/// The client and peer namespaces with the peer services running, from their
/// own copy of trafficgen (`dir/peer-<random>`), so their traffic is told apart.
pub struct PeerNet {
    // Declared first: the server stops before its namespace is deleted.
    pub server: PeerServer,
    pub net: NetnsPair,
}

impl PeerNet {
    /// `extra` goes to `trafficgen serve` (e.g. `--dns off`).
    pub fn start(trafficgen: &Path, dir: &Path, extra: &[&str]) -> Result<Self> {
        let net = NetnsPair::new()?;
        let peer = exe_copy(trafficgen, dir, &format!("peer-{}", random_suffix()))?;
        let server = PeerServer::start_with(&net, &peer, extra)?;
        Ok(Self { server, net })
    }
}

/// Polls `check` every 100 ms until it says yes, for at most `bound`.
pub fn wait_until(
    bound: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + bound;
    while !check()? {
        if std::time::Instant::now() > deadline {
            bail!("{what}: not within {bound:?}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Hex sha256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let content = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    Ok(format!("{:x}", sha2::Sha256::digest(content)))
}

/// Runs `exe client loopback --bytes N` (a trafficgen copy) in this namespace.
pub fn run_loopback(exe: &Path, bytes: u64) -> Result<()> {
    let out = process::run_bounded(
        std::process::Command::new(exe).args(["client", "loopback", "--bytes", &bytes.to_string()]),
        Duration::from_secs(30),
    )?;
    ensure!(
        out.status.success(),
        "loopback from {}: {}",
        exe.display(),
        out.stderr
    );
    Ok(())
}

/// The cargo workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A directory under `/tmp` (`<prefix>-<pid>[-n]`), removed with its content on drop.
/// Set `FSN_E2E_KEEP=1` to keep it.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `/tmp/<prefix>-<pid>` (or `-<pid>-<n>` for later ones).
    pub fn new(prefix: &str) -> Result<Self> {
        let pid = std::process::id();
        for _ in 0..1000 {
            let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
            let name = if n == 0 {
                format!("{prefix}-{pid}")
            } else {
                format!("{prefix}-{pid}-{n}")
            };
            let path = std::env::temp_dir().join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    // Canonical, so exe paths match what the kernel reports.
                    return Ok(Self(path.canonicalize()?));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("create {}", path.display())),
            }
        }
        bail!("could not create a temporary directory for {prefix}")
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("FSN_E2E_KEEP").is_some() {
            eprintln!("fleetsnitch-e2e: keeping {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// 12 random hex digits.
pub fn random_suffix() -> String {
    let mut b = [0u8; 6];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One of this crate's programs (`trafficgen`, `sweep`, `dnsclient`, `connector`):
/// `$CARGO_BIN_EXE_<name>` (cargo sets it when it runs the tests), else where cargo
/// builds it, beside the `deps` directory of the running test executable.
pub fn program(name: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().context("path of the test executable")?;
            let mut dir = exe.parent().unwrap_or(Path::new("."));
            if dir.ends_with("deps") {
                dir = dir.parent().unwrap_or(dir);
            }
            dir.join(name)
        }
    };
    ensure!(
        path.is_file(),
        "{name} not found at {}: build it with `cargo build -p fleetsnitch-e2e --bins`",
        path.display()
    );
    Ok(path)
}

/// Copies `src` (the trafficgen binary, `env!("CARGO_BIN_EXE_trafficgen")` in tests) to
/// `<dir>/<name>-<random>` with mode 0755, so the bytes of each scenario are attributed to
/// an executable path of its own.
///
/// Make every copy before starting concurrent child processes: a copy still open for
/// writing while another thread forks cannot be executed (ETXTBSY).
pub fn exe_copy(src: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dst = dir.join(format!("{name}-{}", random_suffix()));
    std::fs::copy(src, &dst)
        .with_context(|| format!("copy {} to {}", src.display(), dst.display()))?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))?;
    Ok(dst)
}

/// `trafficgen serve` in the peer namespace; stopped on drop.
pub struct PeerServer {
    process: ProcessGuard,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    exe: PathBuf,
}

impl PeerServer {
    /// Starts the peer services from `exe` (a trafficgen binary, ideally a copy of its
    /// own so its bytes can be checked too) and waits (bounded) for them to be bound.
    pub fn start(net: &NetnsPair, exe: &Path) -> Result<Self> {
        Self::start_with(net, exe, &[])
    }

    /// Starts the peer services with extra `serve` options (e.g. `--dns off`).
    pub fn start_with(net: &NetnsPair, exe: &Path, extra: &[&str]) -> Result<Self> {
        let mut args = vec![
            "serve",
            "--v4",
            scenarios::PEER_V4,
            "--v6",
            scenarios::PEER_V6,
        ];
        args.extend_from_slice(extra);
        let mut cmd = net.in_peer(exe, &args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut process =
            ProcessGuard::spawn("trafficgen serve", &mut cmd, Duration::from_secs(5))?;
        let stdout = process
            .child_mut()
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout"))?;
        let stdin = process.child_mut().stdin.take();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            // Ends when the server exits and its stdout closes.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        match lines.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.trim() == "ready" => Ok(Self {
                process,
                stdin,
                lines,
                exe: exe.to_path_buf(),
            }),
            other => {
                let state = process.check_running();
                bail!("trafficgen serve did not become ready: {other:?} ({state:?})")
            }
        }
    }

    /// The executable the server runs from.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// What the server's own socket calls returned so far.
    pub fn stats(&mut self) -> Result<ClientReport> {
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("no stdin"))?;
        writeln!(stdin, "stats")?;
        stdin.flush()?;
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(10))
            .context("no answer to `stats` from trafficgen serve")?;
        parse_client_report(&line, "serve")
    }

    /// [`Self::stats`] once two readings 500 ms apart agree (bounded): the services have
    /// finished with every connection.
    pub fn settled_stats(&mut self) -> Result<ClientReport> {
        let mut last = self.stats()?;
        for _ in 0..20 {
            thread::sleep(Duration::from_millis(500));
            let now = self.stats()?;
            if now == last {
                return Ok(now);
            }
            last = now;
        }
        bail!("peer counters still moving after 10 s: {last:?}")
    }

    /// Fails if the server has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.process.check_running()
    }
}

/// What one scenario measured itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientReport {
    /// Sum of what send-side calls returned.
    pub sent: u64,
    /// Sum of what receive-side calls returned.
    pub received: u64,
}

/// Parses trafficgen's single JSON line and checks it is about `scenario`.
pub fn parse_client_report(stdout: &str, scenario: &str) -> Result<ClientReport> {
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        lines.len() == 1,
        "expected exactly one JSON line on stdout, got {lines:?}"
    );
    let v: serde_json::Value = serde_json::from_str(lines[0]).context("trafficgen JSON")?;
    let name = v["scenario"].as_str().unwrap_or_default();
    ensure!(name == scenario, "report is for {name:?}, not {scenario:?}");
    let field = |k: &str| {
        v[k].as_u64()
            .ok_or_else(|| anyhow!("missing or bad {k:?} in {}", lines[0]))
    };
    Ok(ClientReport {
        sent: field("sent")?,
        received: field("received")?,
    })
}

/// Runs `<exe> client <scenario> --peer-v4 .. --peer-v6 .. <extra>` in the client
/// namespace, bounded by `timeout`, and returns its counts.
pub fn run_client(
    net: &NetnsPair,
    exe: &Path,
    scenario: &str,
    extra: &[&str],
    timeout: Duration,
) -> Result<ClientReport> {
    let mut args = vec![
        "client",
        scenario,
        "--peer-v4",
        scenarios::PEER_V4,
        "--peer-v6",
        scenarios::PEER_V6,
    ];
    args.extend_from_slice(extra);
    let out = process::run_bounded(&mut net.in_client(exe, &args), timeout)?;
    if !out.status.success() {
        bail!(
            "trafficgen {scenario} failed ({}) after {:?}:\n{}",
            out.status,
            out.elapsed,
            process::tail(&out.stderr, 20)
        );
    }
    parse_client_report(&out.stdout, scenario)
        .with_context(|| format!("stderr:\n{}", process::tail(&out.stderr, 20)))
}

/// One row of the accuracy table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Scenario name.
    pub scenario: String,
    /// `sent` or `received`.
    pub direction: String,
    /// What the scenario measured itself (`None` if it failed to run).
    pub expected: Option<u64>,
    /// What `/metrics` reported (`None` if absent).
    pub reported: Option<f64>,
    /// How closely the two must agree (the scenario's own [`Accuracy`]).
    pub accuracy: Accuracy,
    /// Why the row failed beyond the numbers (scenario or scrape error).
    pub error: Option<String>,
    /// How long after the traffic ended `/metrics` first agreed (informational; the
    /// design promises 2 s).
    pub lag: Option<Duration>,
}

impl Row {
    /// PASS when there is no error and the numbers agree as the row's accuracy says.
    pub fn pass(&self) -> bool {
        self.error.is_none()
            && self
                .expected
                .is_some_and(|e| self.accuracy.accepts(e, self.reported))
    }

    /// reported - expected, if there is an expectation.
    pub fn diff(&self) -> Option<f64> {
        Some(self.reported.unwrap_or(0.0) - self.expected? as f64)
    }
}

/// The expected-versus-reported table.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Rows in insertion order.
    pub rows: Vec<Row>,
}

impl Report {
    /// Renders the table as text: expected, seen, their difference, the accuracy the
    /// row is held to, and the verdict.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<18} {:<9} {:>14} {:>14} {:>9} {:>8} {:>6}  verdict",
            "scenario", "direction", "expected", "seen", "diff", "accuracy", "lag"
        );
        for r in &self.rows {
            let expected = r.expected.map_or_else(|| "-".to_owned(), |e| e.to_string());
            let reported = r
                .reported
                .map_or_else(|| "absent".to_owned(), |v| format!("{v:.0}"));
            let diff = r
                .diff()
                .map_or_else(|| "-".to_owned(), |d| format!("{d:+.0}"));
            let lag = r
                .lag
                .map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
            let verdict = if r.pass() { "PASS" } else { "FAIL" };
            let _ = write!(
                s,
                "{:<18} {:<9} {:>14} {:>14} {:>9} {:>8} {lag:>6}  {verdict}",
                r.scenario,
                r.direction,
                expected,
                reported,
                diff,
                r.accuracy.label()
            );
            if let Some(e) = &r.error {
                let one_line: Vec<&str> =
                    e.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                let mut one_line = one_line.join(" | ");
                if one_line.len() > 300 {
                    let cut = (0..=300)
                        .rev()
                        .find(|i| one_line.is_char_boundary(*i))
                        .unwrap_or(0);
                    one_line.truncate(cut);
                    one_line.push_str("...");
                }
                let _ = write!(s, "  ({one_line})");
            }
            s.push('\n');
        }
        s
    }

    /// The failing rows.
    pub fn failures(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| !r.pass()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_report_parses() {
        let r = parse_client_report(
            "{\"scenario\":\"tcp_upload\",\"sent\":10,\"received\":0}\n",
            "tcp_upload",
        )
        .unwrap();
        assert_eq!(
            r,
            ClientReport {
                sent: 10,
                received: 0
            }
        );
        assert!(parse_client_report("", "tcp_upload").is_err());
        assert!(
            parse_client_report("{\"scenario\":\"x\",\"sent\":1,\"received\":0}", "y").is_err()
        );
        assert!(
            parse_client_report("{\"scenario\":\"y\",\"sent\":-1,\"received\":0}", "y").is_err()
        );
    }

    #[test]
    fn rows_and_verdicts() {
        let row = |e: Option<u64>, r: Option<f64>| Row {
            scenario: "s".into(),
            direction: "sent".into(),
            expected: e,
            reported: r,
            accuracy: Accuracy::Exact,
            error: None,
            lag: None,
        };
        assert!(row(Some(0), None).pass());
        assert!(row(Some(0), Some(0.0)).pass());
        assert!(!row(Some(0), Some(5.0)).pass());
        assert!(row(Some(100), Some(100.0)).pass());
        assert!(!row(Some(100), Some(101.0)).pass());
        assert!(!row(Some(100), None).pass());
        assert!(!row(None, Some(1.0)).pass());
        let bounded = Row {
            accuracy: Accuracy::Within {
                fraction: 0.02,
                why: "test",
            },
            ..row(Some(100), Some(101.0))
        };
        assert!(bounded.pass());
        let report = Report {
            rows: vec![row(Some(100), Some(50.0)), row(Some(0), None)],
        };
        assert_eq!(report.failures().len(), 1);
        let table = report.render();
        assert!(
            table.contains(" 100 ") && table.contains(" 50 ") && table.contains(" -50 "),
            "{table}"
        );
    }

    #[test]
    fn scenario_names_are_unique() {
        let mut names: Vec<_> = scenarios::SCENARIOS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len());
    }
}
