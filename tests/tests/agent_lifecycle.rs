//! The agent's life: identity of a replaced or deleted executable, clean
//! shutdown, and the one-sentence errors it stops with. Needs root (eBPF); skips otherwise.

use std::{
    fs,
    io::Write,
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    AgentGuard, TempDir, Testbed, agent_binary, process, query_journal, require_root, run_loopback,
    sha256_file,
};

/// `fleetsnitch_executable_info` series for `exe`: sha256 -> value.
fn info_for(agent: &AgentGuard, exe: &Path) -> Result<Vec<(String, f64)>> {
    let text =
        fleetsnitch_e2e::metrics::http_get(agent.addr, "/metrics", Duration::from_secs(5))?.body;
    let samples = fleetsnitch_e2e::parse_samples(&text, "fleetsnitch_executable_info")?;
    Ok(samples
        .into_iter()
        .filter(|s| s.labels.get("exe").map(String::as_str) == exe.to_str())
        .map(|s| (s.labels.get("sha256").cloned().unwrap_or_default(), s.value))
        .collect())
}

fn wait_for<T>(bound: Duration, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("condition not met within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn replaced_executable_is_reported_under_its_new_sha256() -> Result<()> {
    require_root!("to load eBPF programs");
    // Versions not seen for 5 s leave fleetsnitch_executable_info.
    let bed = Testbed::setup("fsn-replace")?
        .config("metrics:\n  executable_expiry: 5s\n")
        .start()?;
    let agent = &bed.agent;
    let exe = bed.copy("trafficgen", "replaced")?;
    let first_sha = sha256_file(&exe)?;

    run_loopback(&exe, 100_000)?;
    agent.metrics().wait_for_bytes(&exe, "sent", 100_000)?;
    let info = wait_for(Duration::from_secs(10), || {
        let info = info_for(agent, &exe)?;
        Ok((!info.is_empty()).then_some(info))
    })?;
    assert_eq!(
        info,
        vec![(first_sha.clone(), 1.0)],
        "hash of the first file"
    );

    // A new file at the same path, as a package upgrade does: write, rename over.
    let staged = exe.with_extension("new");
    let mut content = fs::read(&exe)?;
    content.extend_from_slice(b"\0fleetsnitch replaced build");
    let mut file = fs::File::create(&staged)?;
    file.write_all(&content)?;
    drop(file);
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))?;
    fs::rename(&staged, &exe)?;
    let second_sha = sha256_file(&exe)?;
    assert_ne!(first_sha, second_sha);

    run_loopback(&exe, 50_000)?;
    agent.metrics().wait_for_bytes(&exe, "sent", 150_000)?;
    let mut info = wait_for(Duration::from_secs(10), || {
        let info = info_for(agent, &exe)?;
        Ok(info
            .iter()
            .any(|(sha, _)| *sha == second_sha)
            .then_some(info))
    })
    .context("the new sha256 never appeared")?;
    info.sort_by(|a, b| a.0.cmp(&b.0));
    let mut both = vec![(first_sha, 1.0), (second_sha.clone(), 1.0)];
    both.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(info, both, "both versions ran within the expiry");

    // The new file keeps running; the old one, gone, expires.
    let info = wait_for(Duration::from_secs(30), || {
        run_loopback(&exe, 1_000)?;
        let info = info_for(agent, &exe)?;
        Ok((info.len() == 1).then_some(info))
    })
    .context("the old sha256 never expired")?;
    assert_eq!(
        info,
        vec![(second_sha, 1.0)],
        "the path now carries only the new hash"
    );
    Ok(())
}

/// A program deleted from disk while it runs, before its first byte on the
/// network: it is still hashed (through the process) and journaled with the
/// content it runs.
#[test]
fn executable_deleted_while_running_is_still_hashed() -> Result<()> {
    require_root!("to load eBPF programs");
    let bed = Testbed::setup("fsn-deleted")?
        .config("journal:\n  write_interval: 200ms\n")
        .start()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let exe = bed.copy("connector", "deleted")?;
    let sha256 = sha256_file(&exe)?;
    let mut child = Command::new(&exe)
        .args([
            "--addr",
            &addr,
            "--per-second",
            "10",
            "--seconds",
            "1",
            "--start-after-ms",
            "1000",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    // Deleted while it runs and before it connects.
    fs::remove_file(&exe)?;
    let accepting = std::thread::spawn(move || {
        for stream in listener.incoming().take(10) {
            drop(stream);
        }
    });
    let status = process::wait_timeout(&mut child, Duration::from_secs(30))?;
    ensure!(status.is_some_and(|s| s.success()), "connector: {status:?}");
    let _ = accepting.join();
    let query = format!(
        "SELECT sha256 FROM executables WHERE path = '{}'",
        exe.display()
    );
    let journaled = wait_for(Duration::from_secs(20), || {
        let rows = query_journal(bed.journal(), &query)?;
        Ok((!rows.is_empty()).then_some(rows))
    })
    .with_context(|| format!("{} never journaled:\n{}", exe.display(), bed.log_tail(20)))?;
    assert_eq!(journaled, sha256, "the deleted program's own content");
    Ok(())
}

/// Ids of the BPF programs process `pid` holds, from its file descriptors.
fn programs_of(pid: u32) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        ids.extend(
            info.lines()
                .filter_map(|line| line.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse::<u32>().ok()),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Whether the kernel still has program `id` loaded.
fn program_loaded(id: u32) -> Result<bool> {
    let out = process::run_bounded(
        Command::new("bpftool").args(["prog", "show", "id", &id.to_string()]),
        Duration::from_secs(10),
    )?;
    Ok(out.status.success())
}

/// Stops the agent with `signal` after it counted a program, and checks what the
/// README promises of SIGINT and SIGTERM alike: a clean exit, the last counts in the
/// journal (only the shutdown's final drain and write can have them), and every
/// program the agent held unloaded from the kernel.
fn stop_flushes_the_journal_and_detaches_every_probe(signal: i32, name: &str) -> Result<()> {
    let mut bed = Testbed::setup(&format!("fsn-shutdown-{name}"))?.start()?;
    let exe = bed.copy("trafficgen", &format!("lastword-{name}"))?;
    let journal = bed.journal().to_owned();
    let agent = &mut bed.agent;
    let programs = programs_of(agent.pid())?;
    ensure!(
        programs.len() >= 4,
        "expected the agent to hold its programs, found {programs:?}"
    );
    for &id in &programs {
        ensure!(program_loaded(id)?, "bpftool does not see program {id}");
    }

    run_loopback(&exe, 10_000)?;
    agent.metrics().wait_for_bytes(&exe, "sent", 10_000)?;
    // The journal writes every 10 s by default: only the shutdown flush can have it now.
    agent.signal(signal);
    let status = agent
        .wait_exit(Duration::from_secs(20))?
        .with_context(|| format!("the agent did not exit within 20 s of {name}"))?;
    assert!(
        status.success(),
        "exit status {status} after {name}:\n{}",
        agent.log_tail(30)
    );
    // The whole log: the final journal write may log many events after this line.
    let log = fs::read_to_string(agent.log_path())?;
    ensure!(
        log.contains("shutting down: final drain, then detaching every probe"),
        "no shutdown line after {name}:\n{}",
        agent.log_tail(30)
    );

    wait_for(Duration::from_secs(10), || {
        for &id in &programs {
            if program_loaded(id)? {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .with_context(|| format!("programs {programs:?} still loaded after {name}"))?;

    let out = process::run_bounded(
        Command::new("sqlite3").arg(&journal).arg(format!(
            "SELECT (SELECT count(*) FROM executables WHERE path = '{exe}') || ' ' || \
             coalesce(sum(bytes_sent), 0) || ' ' || coalesce(sum(bytes_received), 0) \
             FROM connections WHERE exe = '{exe}'",
            exe = exe.display()
        )),
        Duration::from_secs(10),
    )?;
    assert_eq!(
        out.stdout.trim(),
        "1 10000 10000",
        "executable rows, bytes sent and received in the journal after {name}: {}",
        out.stderr
    );
    Ok(())
}

#[test]
fn sigterm_flushes_the_journal_and_detaches_every_probe() -> Result<()> {
    require_root!("to load eBPF programs");
    stop_flushes_the_journal_and_detaches_every_probe(libc::SIGTERM, "SIGTERM")
}

#[test]
fn sigint_flushes_the_journal_and_detaches_every_probe() -> Result<()> {
    require_root!("to load eBPF programs");
    stop_flushes_the_journal_and_detaches_every_probe(libc::SIGINT, "SIGINT")
}

/// `GET /healthz`: status and body.
fn healthz(agent: &AgentGuard) -> Result<(u16, String)> {
    let response =
        fleetsnitch_e2e::metrics::http_get(agent.addr, "/healthz", Duration::from_secs(5))?;
    Ok((response.status, response.body))
}

/// The collector thread stuck (held in a ptrace stop, as a deadlock would leave it):
/// `/healthz` turns to 503 once no drain happened for five drain intervals and a
/// second, while `/metrics` still answers; released, the collector drains and
/// `/healthz` is 200 again.
#[test]
fn healthz_answers_503_while_drains_stall_and_200_once_they_resume() -> Result<()> {
    require_root!("to load eBPF programs");
    let mut bed = Testbed::setup("fsn-healthz")?
        .config("collector:\n  drain_interval: 500ms\n")
        .start()?;
    ensure!(healthz(&bed.agent)?.0 == 200, "not healthy at start");
    let frozen = process::FrozenThread::freeze(bed.agent.pid(), "fleetsnitch-col")?;
    let frozen_at = Instant::now();
    let mut last = (0, String::new());
    let stalled = wait_for(Duration::from_secs(30), || {
        last = healthz(&bed.agent)?;
        Ok((last.0 == 503).then_some(frozen_at.elapsed()))
    });
    let metrics =
        fleetsnitch_e2e::metrics::http_get(bed.addr(), "/metrics", Duration::from_secs(5));
    drop(frozen);
    let stalled =
        stalled.with_context(|| format!("collector frozen, /healthz still says {last:?}"))?;
    ensure!(
        last.1.contains("not been drained recently"),
        "503 body: {:?}",
        last.1
    );
    // 5 x 500 ms + 1 s without a drain: never sooner.
    ensure!(
        stalled >= Duration::from_millis(3_000),
        "503 after only {stalled:?} of stall"
    );
    ensure!(
        metrics.as_ref().is_ok_and(|r| r.status == 200),
        "/metrics while the collector was stuck: {:?}",
        metrics.map(|r| r.status)
    );
    wait_for(Duration::from_secs(20), || {
        last = healthz(&bed.agent)?;
        Ok((last.0 == 200).then_some(()))
    })
    .with_context(|| format!("collector released, /healthz still says {last:?}"))?;
    bed.agent.check_running()?;
    eprintln!("/healthz: 503 after {stalled:?} of stalled drains, 200 once released");
    Ok(())
}

/// Whether `mountinfo` (a /proc/<pid>/mountinfo) has tracefs mounted at `path`.
fn tracefs_at(mountinfo: &str, path: &str) -> bool {
    mountinfo.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let fs_type = line
            .split_once(" - ")
            .and_then(|(_, rest)| rest.split_whitespace().next());
        fields.get(4) == Some(&path) && fs_type == Some("tracefs")
    })
}

/// A host (or container) without tracefs: the agent, started in a private mount
/// namespace where tracefs (and debugfs, whose `tracing` directory would do too) is
/// unmounted, mounts it at /sys/kernel/tracing itself, attaches its classic
/// tracepoints through it and counts. The test's own namespace keeps its mounts.
#[test]
fn a_missing_tracefs_is_mounted_at_start() -> Result<()> {
    require_root!("mount namespaces, eBPF");
    let unmount = "for m in /sys/kernel/debug/tracing /sys/kernel/debug /sys/kernel/tracing; do \
                   if mountpoint -q \"$m\"; then umount -l \"$m\" || exit 1; fi; done; \
                   if [ -e /sys/kernel/tracing/events ]; then \
                   echo 'tracefs still there' >&2; exit 1; fi; exec \"$@\"";
    let mut bed = Testbed::setup("fsn-tracefs")?
        .wrapped_in(&[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            unmount,
            "sh",
        ])
        .start()?;
    let pid = bed.agent.pid();
    let agent_mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    ensure!(
        tracefs_at(&agent_mounts, "/sys/kernel/tracing"),
        "no tracefs at /sys/kernel/tracing in the agent's namespace:\n{agent_mounts}"
    );
    ensure!(
        bed.log_tail(200).contains("mounted tracefs"),
        "the agent did not say it mounted tracefs:\n{}",
        bed.log_tail(30)
    );
    // The mount is the agent's own: its namespace had none when it started, and
    // the test's namespace is untouched.
    let own = fs::read_to_string("/proc/self/mountinfo")?;
    let own_tracefs = tracefs_at(&own, "/sys/kernel/tracing");
    // Classic tracepoints attached through it, and counting works.
    let text = bed.metrics().text()?;
    let attached = fleetsnitch_e2e::parse_samples(&text, "fleetsnitch_probe_attached")?;
    let mode_of = |probe: &str| {
        attached
            .iter()
            .find(|s| s.labels.get("probe").map(String::as_str) == Some(probe) && s.value == 1.0)
            .and_then(|s| s.labels.get("mode").cloned())
    };
    ensure!(
        mode_of("process_exit").as_deref() == Some("tracepoint")
            && mode_of("splice_receive").as_deref() == Some("tracepoint"),
        "classic tracepoints: process_exit {:?}, splice_receive {:?}",
        mode_of("process_exit"),
        mode_of("splice_receive")
    );
    let exe = bed.copy("trafficgen", "without-tracefs")?;
    run_loopback(&exe, 30_000)?;
    bed.metrics().wait_for_bytes(&exe, "sent", 30_000)?;
    bed.metrics().wait_for_bytes(&exe, "received", 30_000)?;
    bed.agent.check_running()?;
    eprintln!(
        "tracefs mounted by the agent in its namespace; the test's namespace has tracefs: {own_tracefs}"
    );
    Ok(())
}

/// Runs a command as `nobody` with every capability dropped.
const AS_NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

/// Runs the agent expecting it to stop at once; returns (exit code, output).
fn run_to_failure(args: &[&str], wrap: Option<&[&str]>) -> Result<(i32, String)> {
    let binary = agent_binary()?;
    let mut command = match wrap {
        Some(prefix) => {
            let mut command = Command::new(prefix[0]);
            command.args(&prefix[1..]).arg(&binary);
            command
        }
        None => Command::new(&binary),
    };
    command.args(args);
    let out = process::run_bounded(&mut command, Duration::from_secs(60))?;
    let code = out.status.code().unwrap_or(-1);
    Ok((code, format!("{}{}", out.stdout, out.stderr)))
}

fn free_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn invalid_configuration_names_file_key_and_value() -> Result<()> {
    let dir = TempDir::new("fsn-config")?;
    let config = dir.path().join("bad.yaml");
    fs::write(&config, "collector:\n  drain_interval: 5s\n")?;
    let (code, output) = run_to_failure(&["--config.file", config.to_str().unwrap()], None)?;
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("collector.drain_interval (5s)"), "{output}");

    fs::write(&config, "web:\n  listen_adress: 1.2.3.4:5\n")?;
    let (code, output) = run_to_failure(&["--config.file", config.to_str().unwrap()], None)?;
    assert_eq!(code, 2, "{output}");
    assert!(
        output.contains(config.to_str().unwrap())
            && output.contains("listen_adress")
            && output.contains("line 2"),
        "{output}"
    );

    let (code, output) = run_to_failure(&["--config.file", "/nonexistent/fleetsnitch.yaml"], None)?;
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("/nonexistent/fleetsnitch.yaml"), "{output}");
    Ok(())
}

#[test]
fn address_in_use_is_reported_before_loading_anything() -> Result<()> {
    require_root!("to get past the capability check");
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let address = taken.local_addr()?.to_string();
    let dir = TempDir::new("fsn-inuse")?;
    let journal = dir.path().join("j.db");
    let (code, output) = run_to_failure(
        &[
            "--web.listen-address",
            &address,
            "--journal.path",
            journal.to_str().unwrap(),
        ],
        None,
    )?;
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains(&format!("cannot listen on {address}")) && output.contains("in use"),
        "{output}"
    );
    Ok(())
}

#[test]
fn missing_privileges_are_named() -> Result<()> {
    require_root!("to drop privileges with setpriv");
    let address = free_address();
    let (code, output) = run_to_failure(
        &[
            "--web.listen-address",
            &address,
            "--journal.path",
            "/tmp/fsn-unused.db",
        ],
        Some(AS_NOBODY),
    )?;
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("CAP_BPF") && output.contains("root"),
        "{output}"
    );
    Ok(())
}

#[test]
fn without_its_preferred_hook_the_agent_falls_back_or_names_what_is_missing() -> Result<()> {
    require_root!("to load eBPF programs");
    let setup = Testbed::setup("fsn-fallback")?.config("probes:\n  disabled_modes: [tp_btf]\n");
    match setup.start() {
        // Kernels with BPF trampolines or kprobes carry on in a fallback mode.
        Ok(bed) => {
            let text =
                fleetsnitch_e2e::metrics::http_get(bed.addr(), "/metrics", Duration::from_secs(5))?
                    .body;
            let samples = fleetsnitch_e2e::parse_samples(&text, "fleetsnitch_probe_attached")?;
            let send = samples
                .iter()
                .find(|s| s.labels.get("probe").map(String::as_str) == Some("socket_send"))
                .context("no socket_send probe in /metrics")?;
            let mode = send.labels.get("mode").cloned().unwrap_or_default();
            assert!(
                mode == "fexit" || mode == "kprobe",
                "socket_send attached as {mode}"
            );
            assert_eq!(send.value, 1.0);
        }
        // Kernels with neither (like the development machines) refuse, naming why.
        Err(error) => {
            let text = format!("{error:#}");
            assert!(
                text.contains("cannot run the required probe socket_send"),
                "{text}"
            );
            assert!(
                text.contains("tp_btf: disabled by probes.disabled_modes"),
                "{text}"
            );
            assert!(
                text.contains("fexit:") && text.contains("kprobe:"),
                "{text}"
            );
        }
    }
    Ok(())
}

#[test]
fn check_reports_what_the_host_offers_and_fails_without_privileges() -> Result<()> {
    require_root!("to compare with and without privileges");
    let (code, output) = run_to_failure(&["--check"], None)?;
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("ok       capabilities to load eBPF"),
        "{output}"
    );
    assert!(output.contains("ok       BTF"), "{output}");
    let (code, output) = run_to_failure(&["--check"], Some(AS_NOBODY))?;
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains("MISSING  capabilities to load eBPF"),
        "{output}"
    );
    assert!(output.contains("cannot run here"), "{output}");
    Ok(())
}
