//! What the README says is counted, and under which name: local IPC (AF_UNIX,
//! netlink) and `MSG_PEEK` reads are not network traffic; a kernel thread's sends
//! are `exe="[kernel]"`; an executable whose path the kernel's dentry walk cannot
//! hold (deeper than its slots, or a component longer than a slot) is still named
//! by its full path, through `/proc`, and counted in
//! `fleetsnitch_truncated_paths_total`. Needs root (eBPF); skips otherwise.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use fleetsnitch_e2e::{
    MetricsClient, Testbed, bytes_for, difference, parse_client_report, process, require_root,
    wait_until,
};
use fleetsnitch_ebpf::{NAME_LEN, PATH_DEPTH};

/// Runs `scenario` of a trafficgen copy in this (the root) network namespace, on
/// loopback only; returns what it counted itself.
fn run_local(exe: &Path, scenario: &str, bytes: u64) -> Result<(u64, u64)> {
    let out = process::run_bounded(
        Command::new(exe).args(["client", scenario, "--bytes", &bytes.to_string()]),
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "{} {scenario}: {}",
        exe.display(),
        out.stderr
    );
    eprintln!("{scenario}: {}", out.stderr.trim());
    let report = parse_client_report(&out.stdout, scenario)?;
    Ok((report.sent, report.received))
}

/// The value of an unlabelled counter (0 when absent).
fn counter(metrics: &MetricsClient, name: &str) -> Result<f64> {
    Ok(fleetsnitch_e2e::parse_samples(&metrics.text()?, name)?
        .iter()
        .map(|s| s.value)
        .sum())
}

/// `fleetsnitch_bytes_total{exe="[kernel]",direction}` (0 when absent).
fn kernel_bytes(metrics: &MetricsClient, direction: &str) -> Result<f64> {
    Ok(bytes_for(&metrics.scrape()?, "[kernel]", direction).unwrap_or(0.0))
}

#[test]
fn peeks_unix_sockets_and_netlink_are_not_counted() -> Result<()> {
    require_root!("eBPF");
    let bed = Testbed::setup("fsn-not-network")?.start()?;
    let exe = bed.copy("trafficgen", "ipc-and-peek")?;
    // 1 MiB over TCP, each read peeked first; 4 MiB over AF_UNIX, AF_UNIX datagrams
    // and a netlink dump besides: only the TCP reads and writes count.
    let (sent, received) = run_local(&exe, "local_ipc_and_peek", 1 << 20)?;
    ensure!(
        sent == 1 << 20 && received == 1 << 20,
        "the program reports sent={sent} received={received}"
    );
    let metrics = bed.metrics();
    metrics.wait_for_bytes(&exe, "sent", sent)?;
    metrics.wait_for_bytes(&exe, "received", received)?;
    // Nothing arrives later either (the agent drains every second).
    std::thread::sleep(Duration::from_millis(2_500));
    for (direction, expected) in [("sent", sent), ("received", received)] {
        let seen = metrics.bytes(&exe, direction)?;
        ensure!(
            seen == Some(expected as f64),
            "{direction} of {}: {}",
            exe.display(),
            difference(expected, seen)
        );
    }
    Ok(())
}

/// The kernel sends on a socket from a kernel thread: a BPF sockmap verdict
/// redirects what one loopback connection receives to the egress of another, and
/// the socket's backlog work (a kworker, no executable) sends it on. Those bytes
/// are `[kernel]`'s, not the process's that owns the socket.
#[test]
fn kernel_thread_traffic_is_labelled_kernel() -> Result<()> {
    require_root!("eBPF, BPF sockmap");
    let bed = Testbed::setup("fsn-kernel-thread")?.start()?;
    let metrics = bed.metrics();
    let exe = bed.copy("trafficgen", "kernel-forward")?;
    let before = kernel_bytes(&metrics, "sent")?;
    const BYTES: u64 = 2 << 20;
    let (sent, received) = run_local(&exe, "kernel_forward", BYTES)?;
    ensure!(
        sent == BYTES && received == BYTES,
        "the program reports sent={sent} received={received}"
    );
    // The process: what it sent and read itself, not the forwarded copy.
    metrics.wait_for_bytes(&exe, "sent", BYTES)?;
    metrics.wait_for_bytes(&exe, "received", BYTES)?;
    // The kernel: the forwarded bytes (other kernel threads may add to it).
    let mut seen = before;
    wait_until(
        Duration::from_secs(10),
        "[kernel] sent the forwarded bytes",
        || {
            seen = kernel_bytes(&metrics, "sent")?;
            Ok(seen - before >= BYTES as f64)
        },
    )
    .with_context(|| {
        format!(
            "fleetsnitch_bytes_total{{exe=\"[kernel]\",direction=\"sent\"}} grew by {}: {}",
            seen - before,
            difference(BYTES, Some(seen - before))
        )
    })?;
    std::thread::sleep(Duration::from_millis(2_500));
    for (direction, expected) in [("sent", BYTES), ("received", BYTES)] {
        let now = metrics.bytes(&exe, direction)?;
        ensure!(
            now == Some(expected as f64),
            "{direction} of {} once settled: {}",
            exe.display(),
            difference(expected, now)
        );
    }
    eprintln!(
        "[kernel] sent grew by {} for {BYTES} forwarded bytes",
        seen - before
    );
    Ok(())
}

/// A copy of the `connector` program at `path`, run for 2 s against a local
/// listener (long enough for the agent to read `/proc/<pid>/exe` while it runs);
/// returns the bytes it sent (64 per connection).
fn connect_from(source: &Path, path: &Path) -> Result<u64> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::copy(source, path).with_context(|| format!("copy to {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    listener.set_nonblocking(true)?;
    let accepting = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut open = Vec::new();
        while std::time::Instant::now() < deadline && open.len() < 20 {
            match listener.accept() {
                Ok((stream, _)) => open.push(stream),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    let out = process::run_bounded(
        Command::new(path).args(["--addr", &addr, "--per-second", "10", "--seconds", "2"]),
        Duration::from_secs(30),
    )?;
    let _ = accepting.join();
    ensure!(out.status.success(), "{}: {}", path.display(), out.stderr);
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("connector output: {}", out.stdout))?;
    let connections = report["connections"]
        .as_u64()
        .context("no \"connections\" in the connector's output")?;
    ensure!(connections > 0, "the connector made no connection");
    Ok(connections * 64)
}

#[test]
fn paths_beyond_the_kernel_walk_are_named_in_full_and_counted() -> Result<()> {
    require_root!("eBPF");
    let setup = Testbed::setup("fsn-truncated")?;
    let connector = setup.copy("connector", "source")?;
    // Deeper than the walk's slots.
    let mut deep = setup.dir().to_path_buf();
    for level in 0..PATH_DEPTH + 8 {
        deep.push(format!("d{level}"));
    }
    fs::create_dir_all(&deep)?;
    let deep_exe = deep.join("deep-connector");
    // One component longer than a slot (names are at most 255 bytes).
    let long_exe: PathBuf = setup
        .dir()
        .join(format!("long-{}", "n".repeat(NAME_LEN + 60)));
    let bed = setup.start()?;
    let metrics = bed.metrics();
    for (what, exe) in [("deep", &deep_exe), ("long", &long_exe)] {
        let before = counter(&metrics, "fleetsnitch_truncated_paths_total")?;
        let sent = connect_from(&connector, exe)?;
        metrics.wait_for_bytes(exe, "sent", sent).with_context(|| {
            format!(
                "the {what} path by its full name; exe labels seen: {:?}",
                metrics.scrape().map(|samples| samples
                    .iter()
                    .filter_map(|s| s.labels.get("exe").cloned())
                    .filter(|e| e.contains("connector") || e.contains("/…"))
                    .collect::<Vec<_>>())
            )
        })?;
        let after = counter(&metrics, "fleetsnitch_truncated_paths_total")?;
        ensure!(
            after > before,
            "fleetsnitch_truncated_paths_total stayed at {before} for the {what} path {}",
            exe.display()
        );
        eprintln!(
            "{what} path ({} bytes): {sent} bytes under its full name, truncated paths {before} -> {after}",
            exe.as_os_str().len()
        );
    }
    Ok(())
}
