//! Issue #17 item 4: by default the agent listens on every address of both
//! families, and keeps listening on IPv4 where the host has no IPv6.
//!
//! Each agent runs with no `--web.listen-address` (the real default, port
//! 9941) in a network namespace of its own, so that the port is free whatever
//! else runs on this machine; the test reaches it with `nsenter` and curl.
//! - Dual stack: the namespace has `net.ipv6.bindv6only=1`, under which a
//!   socket left to the sysctl default would be IPv6-only: the agent must set
//!   `IPV6_V6ONLY` off itself, and answers over 127.0.0.1 and ::1.
//! - No IPv6: the agent runs under `no-ipv6` (src/bin/no-ipv6.rs), a seccomp
//!   filter that fails `socket(AF_INET6, ...)` with EAFNOSUPPORT, as a kernel
//!   booted with `ipv6.disable=1` does (that boot option itself cannot be set
//!   for one test); it answers over 127.0.0.1, not over ::1, and says why.
//!
//! Needs root (eBPF, network namespaces); skips otherwise.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use fleetsnitch_e2e::{
    ProcessGuard, TempDir, agent_binary, process::file_tail, process::run_bounded, program,
    require_root,
};

/// The agent in a network namespace of its own, with the loopback up.
struct IsolatedAgent {
    process: ProcessGuard,
    log: PathBuf,
    _dir: TempDir,
}

impl IsolatedAgent {
    /// Starts the agent with its default listen address; `sysctl` is set in
    /// the namespace first, and `wrapper` (if any) executes the agent.
    fn start(sysctl: &[&str], wrapper: Option<&Path>) -> Result<Self> {
        let dir = TempDir::new("fsn-listen")?;
        let log = dir.path().join("agent.log");
        let out = std::fs::File::create(&log)?;
        let mut script = String::from("ip link set lo up");
        for setting in sysctl {
            script += &format!(" && sysctl -qw {setting}");
        }
        script += " && exec \"$@\"";
        let mut command = Command::new("unshare");
        command.args(["--net", "--", "sh", "-c", &script, "sh"]);
        if let Some(wrapper) = wrapper {
            command.arg(wrapper);
        }
        command
            .arg(agent_binary()?)
            .arg("--journal.path")
            .arg(dir.path().join("journal.db"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let process = ProcessGuard::spawn("fleetsnitch", &mut command, Duration::from_secs(10))?;
        let mut agent = Self {
            process,
            log,
            _dir: dir,
        };
        agent.wait_healthy()?;
        Ok(agent)
    }

    /// The HTTP status of `/healthz` at `ip`:9941 from inside the namespace,
    /// or curl's error.
    fn healthz(&mut self, ip: &str) -> Result<Result<u16, String>> {
        let pid = self.process.child_mut().id();
        let url = if ip.contains(':') {
            format!("http://[{ip}]:9941/healthz")
        } else {
            format!("http://{ip}:9941/healthz")
        };
        let out = run_bounded(
            Command::new("nsenter")
                .arg(format!("--net=/proc/{pid}/ns/net"))
                .args(["curl", "-sS", "-g", "--max-time", "2", "-o", "/dev/null"])
                .args(["-w", "%{http_code}", &url]),
            Duration::from_secs(10),
        )?;
        Ok(match out.stdout.trim().parse::<u16>() {
            Ok(status) if status != 0 => Ok(status),
            _ => Err(format!("{url}: {}", out.stderr.trim())),
        })
    }

    /// Until `/healthz` answers 200 over either family (the tests then ask
    /// each).
    fn wait_healthy(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.process.child_mut().try_wait()? {
                bail!("the agent exited ({status}):\n{}", file_tail(&self.log, 40));
            }
            let last = [self.healthz("127.0.0.1")?, self.healthz("::1")?];
            if last.contains(&Ok(200)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no 200 from /healthz over 127.0.0.1 or ::1 within 120 s (last: {last:?}):\n{}",
                    file_tail(&self.log, 40)
                );
            }
            thread::sleep(Duration::from_millis(300));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[test]
fn the_default_address_answers_over_ipv4_and_ipv6_whatever_bindv6only_says() -> Result<()> {
    require_root!("eBPF, network namespaces");
    let mut agent = IsolatedAgent::start(&["net.ipv6.bindv6only=1"], None)?;
    let v4 = agent.healthz("127.0.0.1")?;
    let v6 = agent.healthz("::1")?;
    let log = agent.log();
    let said = log
        .lines()
        .find(|l| l.contains("serving metrics"))
        .unwrap_or("(no \"serving metrics\" line)")
        .to_owned();
    if v4 != Ok(200)
        || v6 != Ok(200)
        || !said.contains("[::]:9941")
        || !said.contains("IPv4 and IPv6")
    {
        bail!(
            "expected 200 over 127.0.0.1 and ::1, and a log line naming [::]:9941 for IPv4 \
             and IPv6; seen {v4:?}, {v6:?}, {said:?}:\n{}",
            file_tail(&agent.log, 40)
        );
    }
    Ok(())
}

#[test]
fn without_ipv6_sockets_the_default_address_falls_back_to_ipv4() -> Result<()> {
    require_root!("eBPF, network namespaces, seccomp");
    let no_ipv6 = program("no-ipv6")?;
    let mut agent = IsolatedAgent::start(&[], Some(&no_ipv6))?;
    let v4 = agent.healthz("127.0.0.1")?;
    let v6 = agent.healthz("::1")?;
    let log = agent.log();
    let warned = log
        .lines()
        .find(|l| l.contains("no IPv6 sockets"))
        .map(str::to_owned);
    let said = log
        .lines()
        .find(|l| l.contains("serving metrics"))
        .unwrap_or("(no \"serving metrics\" line)")
        .to_owned();
    let warned_right = warned.as_deref().is_some_and(|w| w.contains("level=warn"));
    if v4 != Ok(200)
        || v6.is_ok()
        || !warned_right
        || !said.contains("0.0.0.0:9941")
        || !said.contains("IPv4 only")
    {
        bail!(
            "expected 200 over 127.0.0.1, no answer over ::1, a warning about IPv6 and a log \
             line naming 0.0.0.0:9941 for IPv4 only; seen {v4:?}, {v6:?}, {warned:?}, {said:?}:\n{}",
            file_tail(&agent.log, 40)
        );
    }
    Ok(())
}
