//! Child processes that never outlive the test: a kill-on-drop guard and a bounded runner.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The `ip` binary of iproute2.
pub fn ip_bin() -> PathBuf {
    for p in ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("ip")
}

/// Makes the child get SIGKILL if the thread that spawned it dies (test runner killed,
/// panic unwinding past the guard...). The spawning thread must outlive the child, which
/// every guard here ensures by waiting for or killing the child before it is dropped.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Sends `sig` to `pid` (ignoring errors: the process may be gone already).
pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall on a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Waits for `child` up to `timeout`; `None` if still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a child: SIGTERM, up to `grace` to exit, then SIGKILL. Always reaps it.
pub fn stop(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    signal(child.id(), libc::SIGTERM);
    if matches!(wait_timeout(child, grace), Ok(Some(_))) {
        return;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A spawned child that is stopped (SIGTERM, then SIGKILL) when the guard is dropped.
pub struct ProcessGuard {
    child: Option<Child>,
    name: String,
    grace: Duration,
}

impl ProcessGuard {
    /// Spawns `cmd` (with [`die_with_parent`]).
    pub fn spawn(name: &str, cmd: &mut Command, grace: Duration) -> Result<Self> {
        let child = die_with_parent(cmd)
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        Ok(Self {
            child: Some(child),
            name: name.to_owned(),
            grace,
        })
    }

    /// The child (for pipes and status).
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    /// Fails if the child has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(st) = self.child_mut().try_wait()? {
            bail!("{} exited unexpectedly: {st}", self.name);
        }
        Ok(())
    }

    /// Stops the child now.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, self.grace);
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Output of a bounded run.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // Bounded by what the child writes; the child itself is bounded in time.
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Spawns `cmd`, retrying a few times on ETXTBSY: a freshly copied executable
/// can still be open for writing in a child another test thread just forked.
pub fn spawn_retrying_busy(cmd: &mut Command) -> std::io::Result<Child> {
    let mut attempts = 0;
    loop {
        match cmd.spawn() {
            Err(error) if error.raw_os_error() == Some(libc::ETXTBSY) && attempts < 20 => {
                attempts += 1;
                thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Runs `cmd` to completion with captured output; kills it after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let start = Instant::now();
    die_with_parent(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut child = spawn_retrying_busy(cmd).with_context(|| format!("spawn {cmd:?}"))?;
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));
    let status = match wait_timeout(&mut child, timeout) {
        Ok(Some(st)) => st,
        other => {
            stop(&mut child, Duration::from_secs(2));
            let stderr = err.join().unwrap_or_default();
            bail!(
                "{cmd:?} did not finish within {timeout:?} ({other:?}); stderr:\n{}",
                tail(&stderr, 20)
            );
        }
    };
    // Grandchildren that inherited the pipes could keep them open; they are bounded too.
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
        elapsed: start.elapsed(),
    })
}

/// Runs a setup command (no output expected) and fails with its stderr if it fails.
pub fn run_checked(program: &Path, args: &[&str]) -> Result<()> {
    let out = run_bounded(Command::new(program).args(args), Duration::from_secs(30))?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            out.stderr.trim()
        );
    }
    Ok(())
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of a file (empty if it cannot be read).
pub fn file_tail(path: &Path, n: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    tail(&s, n)
}

/// One thread of another process held in a ptrace stop while the rest of the
/// process runs on: a stuck thread, as a deadlock or a hung syscall would leave
/// it. Released when dropped, which must happen on the thread that froze it
/// (ptrace requests come from the tracer thread).
pub struct FrozenThread {
    tid: libc::pid_t,
}

impl FrozenThread {
    /// Freezes the thread of `pid` whose name (`comm`, 15 bytes at most) is `comm`.
    pub fn freeze(pid: u32, comm: &str) -> Result<Self> {
        let tid = fs::read_dir(format!("/proc/{pid}/task"))?
            .filter_map(|entry| {
                entry
                    .ok()?
                    .file_name()
                    .to_str()?
                    .parse::<libc::pid_t>()
                    .ok()
            })
            .find(|tid| {
                fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                    .is_ok_and(|name| name.trim_end() == comm)
            })
            .with_context(|| format!("no thread named {comm} in process {pid}"))?;
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: ptrace with no addr/data; the kernel checks the tid.
        if unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, null, null) } == -1 {
            bail!("PTRACE_SEIZE {tid}: {}", std::io::Error::last_os_error());
        }
        let frozen = Self { tid };
        // SAFETY: as above, on the thread just seized.
        if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null) } == -1 {
            bail!(
                "PTRACE_INTERRUPT {tid}: {}",
                std::io::Error::last_os_error()
            );
        }
        let mut status = 0;
        // SAFETY: waits for the tracee's stop; `status` is valid.
        if unsafe { libc::waitpid(tid, &mut status, libc::__WALL) } != tid {
            bail!("waitpid {tid}: {}", std::io::Error::last_os_error());
        }
        Ok(frozen)
    }
}

impl Drop for FrozenThread {
    fn drop(&mut self) {
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: detaching the tracee this thread seized resumes it.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.tid, null, null) };
    }
}
