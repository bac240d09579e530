//! The agent under test, run as a child process.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::TempDir;
use crate::metrics::{MetricsClient, http_get};
use crate::process::{ProcessGuard, file_tail};

/// How long the agent gets to answer `/healthz` (loading eBPF on 2 cores can be slow).
pub const STARTUP_BOUND: Duration = Duration::from_secs(60);

/// Where the agent binary is: `$FLEETSNITCH_BIN`, else `<workspace>/target/debug/fleetsnitch`.
/// Fails with a hint if it does not exist.
pub fn agent_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("FLEETSNITCH_BIN") {
        Some(p) => PathBuf::from(p),
        None => crate::workspace_root().join("target/debug/fleetsnitch"),
    };
    if !path.is_file() {
        bail!(
            "agent binary not found at {}: run `cargo build -p fleetsnitch` first \
             (or set FLEETSNITCH_BIN to the binary to test)",
            path.display()
        );
    }
    Ok(path)
}

/// A free TCP port on 127.0.0.1 (there is a small race until the agent binds it).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// The running agent: SIGTERM (then SIGKILL) on drop, its log tail printed if the
/// thread is panicking.
pub struct AgentGuard {
    process: ProcessGuard,
    /// Where `/metrics` and `/healthz` are served.
    pub addr: SocketAddr,
    log: PathBuf,
    dir: TempDir,
}

impl AgentGuard {
    /// Starts `bin` with `--web.listen-address 127.0.0.1:<free port> --journal.path
    /// <tempdir>/journal.db` and waits until `GET /healthz` answers 200.
    pub fn start(bin: &Path) -> Result<Self> {
        Self::start_with_args(bin, &[])
    }

    /// [`Self::start`] with extra arguments appended.
    pub fn start_with_args(bin: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_with_journal(bin, None, extra)
    }

    /// Starts the agent with its journal at `journal` (kept across agents, for
    /// restart tests), or in the agent's own temporary directory when `None`.
    pub fn start_with_journal(bin: &Path, journal: Option<&Path>, extra: &[&str]) -> Result<Self> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        Self::start_at(bin, addr, journal, extra)
    }

    /// Starts the agent listening on `addr` (for restarts a scraper must find again).
    pub fn start_at(
        bin: &Path,
        addr: SocketAddr,
        journal: Option<&Path>,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_wrapped(&[], bin, addr, journal, extra)
    }

    /// [`Self::start_at`] through `wrapper`, a command that ends by executing its
    /// arguments (`unshare --mount sh -c '...; exec "$@"' sh`): the agent keeps the
    /// wrapper's pid, so signals and [`Self::pid`] reach it.
    pub fn start_wrapped(
        wrapper: &[&str],
        bin: &Path,
        addr: SocketAddr,
        journal: Option<&Path>,
        extra: &[&str],
    ) -> Result<Self> {
        let dir = TempDir::new("fsn-agent")?;
        let log = dir.path().join("agent.log");
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let journal = journal
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("journal.db"));
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin);
                cmd
            }
            None => Command::new(bin),
        };
        cmd.arg("--web.listen-address")
            .arg(addr.to_string())
            .arg("--journal.path")
            .arg(&journal)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let process = ProcessGuard::spawn("fleetsnitch", &mut cmd, Duration::from_secs(10))?;
        let mut agent = Self {
            process,
            addr,
            log,
            dir,
        };
        agent.wait_healthy(STARTUP_BOUND)?;
        Ok(agent)
    }

    fn wait_healthy(&mut self, bound: Duration) -> Result<()> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(st) = self.process.child_mut().try_wait()? {
                bail!(
                    "fleetsnitch exited during startup ({st}); its output:\n{}",
                    self.log_tail(50)
                );
            }
            let last = match http_get(self.addr, "/healthz", Duration::from_secs(2)) {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => format!("status {}: {}", r.status, r.body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "fleetsnitch did not answer GET /healthz with 200 within {bound:?} \
                     (last: {last}); its output:\n{}",
                    self.log_tail(50)
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// A scraper for this agent's `/metrics`.
    pub fn metrics(&self) -> MetricsClient {
        MetricsClient::new(self.addr)
    }

    /// The last `n` lines of the agent's stdout+stderr.
    pub fn log_tail(&self, n: usize) -> String {
        file_tail(&self.log, n)
    }

    /// Path of the agent's stdout+stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The agent's temporary directory (journal lives there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&mut self) -> u32 {
        self.process.child_mut().id()
    }

    /// Sends `signal` to the agent.
    pub fn signal(&mut self, signal: i32) {
        crate::process::signal(self.pid(), signal);
    }

    /// Waits up to `bound` for the agent to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, bound: Duration) -> Result<Option<std::process::ExitStatus>> {
        crate::process::wait_timeout(self.process.child_mut(), bound)
    }

    /// Stops the agent now (SIGTERM, then SIGKILL); nothing if it has exited already.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Fails (with the log tail) if the agent has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.process
            .check_running()
            .with_context(|| format!("agent output:\n{}", self.log_tail(50)))
    }
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        self.process.stop();
        if thread::panicking() {
            eprintln!(
                "---- fleetsnitch output (last 50 lines of {}) ----\n{}\n----",
                self.log.display(),
                self.log_tail(50)
            );
        }
    }
}
