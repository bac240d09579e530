//! Exec tracking (`exec.enabled`): every executed program is journaled and
//! hashed, even those that exit within milliseconds and never touch the
//! network; with the switch off they are not. Also the file systems where the
//! kernel's (device, inode) and `stat`'s disagree or repeat: btrfs subvolumes,
//! overlayfs, tmpfs, and a file deleted while it runs. Needs root.

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    AgentGuard, TempDir, Testbed,
    filesystems::{Mounts, run_tool},
    otlp_collector::{Collector, free_port, rotel_agent},
    parse_samples, process, query_journal, random_suffix, require_root, run_loopback,
    servers::Prometheus,
    sha256_file, wait_until, workspace_root,
};

const BINARIES: usize = 20;
const EXECS_PER_BINARY: usize = 100;

/// Exec tracking on, the journal written often.
const EXEC_CONFIG: &str = "journal:\n  write_interval: 200ms\nexec:\n  enabled: true\n";

/// A copy of `/bin/true` with `tag` appended: a distinct sha256 that still runs.
fn tagged_true(dir: &Path, name: &str, tag: &str) -> Result<PathBuf> {
    let mut content = fs::read("/bin/true").context("read /bin/true")?;
    content.extend_from_slice(tag.as_bytes());
    let path = dir.join(name);
    fs::write(&path, content).with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Sum of the samples of `family` whose `exe` label passes `filter` (all
/// samples when the family has no `exe`).
fn metric_sum(agent: &AgentGuard, family: &str, filter: impl Fn(&str) -> bool) -> Result<f64> {
    let text = agent.metrics().text()?;
    Ok(parse_samples(&text, family)?
        .iter()
        .filter(|sample| sample.labels.get("exe").is_none_or(|exe| filter(exe)))
        .map(|sample| sample.value)
        .sum())
}

fn exe_of(path: &Path) -> String {
    path.display().to_string()
}

fn sql_text(text: &str) -> String {
    text.replace('\'', "''")
}

/// (sha256, used_network, hash_failure) of each journal row of `path`.
fn journal_rows(journal: &Path, path: &Path) -> Result<Vec<(String, String, String)>> {
    let out = query_journal(
        journal,
        &format!(
            "SELECT sha256, used_network, coalesce(hash_failure, '') FROM executables \
             WHERE path = '{}'",
            sql_text(&path.to_string_lossy())
        ),
    )?;
    Ok(out
        .lines()
        .map(|line| {
            let mut fields = line.split('|').map(str::to_owned);
            (
                fields.next().unwrap_or_default(),
                fields.next().unwrap_or_default(),
                fields.next().unwrap_or_default(),
            )
        })
        .collect())
}

/// Runs `exe` `times` times, each to completion.
fn run_times(exe: &Path, times: usize) -> Result<()> {
    for _ in 0..times {
        let status = Command::new(exe)
            .status()
            .with_context(|| format!("run {}", exe.display()))?;
        ensure!(status.success(), "{} exited with {status}", exe.display());
    }
    Ok(())
}

#[test]
fn two_thousand_short_lived_execs_are_journaled_with_their_hash() -> Result<()> {
    burst_of_execs(EXEC_CONFIG, true)
}

/// A ring buffer of 64 KiB holds about a dozen exec events: whatever the
/// burst overflows must be counted as lost, and nothing else may be missing.
#[test]
fn a_small_exec_ring_buffer_counts_what_it_loses() -> Result<()> {
    burst_of_execs(
        "journal:\n  write_interval: 200ms\nexec:\n  enabled: true\n  ring_buffer_bytes: 65536\n",
        false,
    )
}

/// `BINARIES` distinct copies of a quiet program (`<prefix><i>-<random>`), each
/// with its sha256.
fn new_binaries(dir: &Path, prefix: &str) -> Result<Vec<(PathBuf, String)>> {
    let suffix = random_suffix();
    (0..BINARIES)
        .map(|index| {
            let path = tagged_true(
                dir,
                &format!("{prefix}{index}-{suffix}"),
                &format!("{prefix}-{suffix}-{index}"),
            )?;
            let sha256 = sha256_file(&path)?;
            Ok((path, sha256))
        })
        .collect()
}

/// Runs 2,000 short-lived executions of 20 new binaries under `config`;
/// checks that every exec is counted or lost, every binary journaled with its
/// sha256 (or its miss counted with its reason, or lost), and, when
/// `check_network`, the network marks of a quiet binary and of one that talks.
fn burst_of_execs(config: &str, check_network: bool) -> Result<()> {
    require_root!("eBPF");
    let setup = Testbed::setup("fsn-exec")?;
    let binaries = new_binaries(setup.dir(), "quiet")?;
    let talker = setup.copy("trafficgen", "talker")?;
    let bed = setup.config(config).start()?;
    let (agent, journal) = (&bed.agent, bed.journal());

    // One thread per core, each running every binary in turn: 2,000 processes
    // that each live a millisecond or so.
    let (first, second) = binaries.split_at(BINARIES / 2);
    thread::scope(|scope| -> Result<()> {
        let runners: Vec<_> = [first, second]
            .into_iter()
            .map(|half| {
                scope.spawn(move || -> Result<()> {
                    for _ in 0..EXECS_PER_BINARY {
                        for (path, _) in half {
                            run_times(path, 1)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for runner in runners {
            runner.join().expect("exec runner panicked")?;
        }
        Ok(())
    })?;
    run_loopback(&talker, 10_000)?;

    let ours = |exe: &str| binaries.iter().any(|(path, _)| exe == exe_of(path));
    // Every exec is either counted or lost; wait until the agent has
    // accounted for all of them, then until the journal holds what it saw.
    let total = (BINARIES * EXECS_PER_BINARY) as f64;
    wait_until(
        Duration::from_secs(60),
        "2,000 execs counted or lost",
        || {
            let seen = metric_sum(agent, "fleetsnitch_exec_total", ours)?;
            let lost = metric_sum(agent, "fleetsnitch_exec_events_lost_total", |_| true)?;
            Ok(seen + lost >= total)
        },
    )?;
    let seen = metric_sum(agent, "fleetsnitch_exec_total", ours)?;
    let lost = metric_sum(agent, "fleetsnitch_exec_events_lost_total", |_| true)?;
    ensure!(seen <= total, "{seen} execs counted for {total} run");
    wait_until(
        Duration::from_secs(60),
        "every counted binary journaled",
        || {
            for (path, _) in &binaries {
                let counted =
                    metric_sum(agent, "fleetsnitch_exec_total", |exe| exe == exe_of(path))?;
                if counted > 0.0 && journal_rows(journal, path)?.is_empty() {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;

    let mut hashed = 0;
    let mut unhashed = Vec::new();
    let mut missing = Vec::new();
    for (path, expected) in &binaries {
        let rows = journal_rows(journal, path)?;
        if rows.is_empty() {
            missing.push(path.display().to_string());
            continue;
        }
        for (sha256, used_network, reason) in &rows {
            ensure!(
                used_network == "0",
                "{} never used the network but is journaled with used_network={used_network}",
                path.display()
            );
            if sha256.is_empty() {
                ensure!(
                    !reason.is_empty(),
                    "{} unhashed without a reason",
                    path.display()
                );
                unhashed.push(format!("{}: {reason}", path.display()));
            } else {
                ensure!(
                    sha256 == expected,
                    "{} journaled with sha256 {sha256}, the file's is {expected}",
                    path.display()
                );
                hashed += 1;
            }
        }
    }
    let failures = metric_sum(agent, "fleetsnitch_hash_failures_total", |_| true)?;
    let exhausted = metric_sum(agent, "fleetsnitch_exec_open_files_exhausted_total", |_| {
        true
    })?;
    eprintln!(
        "exec tracking: {total} execs run, {seen} counted, {lost} lost (host-wide); \
         {hashed} of {BINARIES} binaries hashed right, unhashed: {unhashed:?}, missing: \
         {missing:?}; hash failures {failures}, open-file budget exhausted {exhausted}"
    );
    // A binary is missing only if every one of its execs was lost.
    ensure!(
        lost >= (missing.len() * EXECS_PER_BINARY) as f64,
        "{} binaries missing from the journal but only {lost} exec events counted lost",
        missing.len()
    );
    ensure!(
        failures >= unhashed.len() as f64,
        "{} unhashed binaries but {failures} hash failures counted",
        unhashed.len()
    );
    ensure!(hashed + unhashed.len() + missing.len() == BINARIES);
    ensure!(hashed > 0, "no binary hashed: {unhashed:?} {missing:?}");
    if !check_network {
        return Ok(());
    }

    // The talker was executed too, and then used the network: not exec-only.
    wait_until(
        Duration::from_secs(30),
        "the talker journaled as networked",
        || {
            let rows = journal_rows(journal, &talker)?;
            Ok(!rows.is_empty() && rows.iter().all(|(_, used, _)| used == "1"))
        },
    )?;
    let text = agent.metrics().text()?;
    let exec_only = parse_samples(&text, "fleetsnitch_executable_exec_only")?;
    let marker = |path: &Path| {
        exec_only
            .iter()
            .find(|s| s.labels.get("exe") == Some(&exe_of(path)))
            .map(|s| s.value)
    };
    ensure!(
        marker(&binaries[0].0) == Some(1.0),
        "quiet binary not marked exec-only: {:?}",
        marker(&binaries[0].0)
    );
    ensure!(
        marker(&talker) != Some(1.0),
        "the talker used the network but is marked exec-only"
    );
    Ok(())
}

#[test]
fn programs_deleted_as_soon_as_they_exit_are_hashed_or_their_miss_counted() -> Result<()> {
    require_root!("eBPF");
    let setup = Testbed::setup("fsn-exec-brief")?;
    let binaries = new_binaries(setup.dir(), "brief")?;
    let bed = setup.config(EXEC_CONFIG).start()?;
    let (agent, journal) = (&bed.agent, bed.journal());
    let failures_before = metric_sum(agent, "fleetsnitch_hash_failures_total", |_| true)?;

    // Each runs once (about a millisecond) and its file is gone right after:
    // only a descriptor opened while it ran can still reach it.
    for (path, _) in &binaries {
        run_times(path, 1)?;
        fs::remove_file(path)?;
    }
    wait_until(
        Duration::from_secs(60),
        "every brief binary journaled or lost",
        || {
            let lost = metric_sum(agent, "fleetsnitch_exec_events_lost_total", |_| true)?;
            let mut journaled = 0;
            for (path, _) in &binaries {
                journaled += usize::from(!journal_rows(journal, path)?.is_empty());
            }
            Ok(journaled == BINARIES || lost > 0.0)
        },
    )?;
    let mut hashed = 0;
    let mut unhashed = Vec::new();
    for (path, expected) in &binaries {
        for (sha256, _, reason) in journal_rows(journal, path)? {
            if sha256.is_empty() {
                ensure!(
                    !reason.is_empty(),
                    "{} unhashed without a reason",
                    path.display()
                );
                unhashed.push(reason);
            } else {
                ensure!(
                    &sha256 == expected,
                    "{} journaled with sha256 {sha256}, the file's was {expected}",
                    path.display()
                );
                hashed += 1;
            }
        }
    }
    let failures =
        metric_sum(agent, "fleetsnitch_hash_failures_total", |_| true)? - failures_before;
    eprintln!(
        "deleted on exit: {hashed} of {BINARIES} hashed right, unhashed: {unhashed:?}, \
         hash failures counted: {failures}"
    );
    ensure!(
        failures >= unhashed.len() as f64,
        "{} unhashed but {failures} hash failures counted",
        unhashed.len()
    );
    Ok(())
}

#[test]
fn with_exec_tracking_off_a_quiet_program_is_not_journaled() -> Result<()> {
    require_root!("eBPF");
    let setup = Testbed::setup("fsn-exec-off")?;
    let quiet = tagged_true(setup.dir(), &format!("quiet-{}", random_suffix()), "off")?;
    let talker = setup.copy("trafficgen", "talker")?;
    let bed = setup
        .config("journal:\n  write_interval: 200ms\n")
        .start()?;
    let (agent, journal) = (&bed.agent, bed.journal());

    run_times(&quiet, 20)?;
    run_loopback(&talker, 10_000)?;
    // The talker's row proves the journal was written after the quiet runs.
    wait_until(Duration::from_secs(30), "the talker journaled", || {
        Ok(!journal_rows(journal, &talker)?.is_empty())
    })?;
    let rows = journal_rows(journal, &quiet)?;
    ensure!(
        rows.is_empty(),
        "exec tracking is off but {} is journaled: {rows:?}",
        quiet.display()
    );
    let text = agent.metrics().text()?;
    ensure!(
        parse_samples(&text, "fleetsnitch_exec_total")?.is_empty(),
        "exec tracking is off but fleetsnitch_exec_total has series"
    );
    ensure!(
        !text.contains("probe=\"process_exec\""),
        "exec tracking is off but its probe is reported"
    );
    Ok(())
}

#[test]
fn exec_only_program_reaches_otlp_with_its_command_line() -> Result<()> {
    require_root!("eBPF");
    let Some(binary) = rotel_agent() else {
        return Ok(());
    };
    let collector_dir = TempDir::new("fsn-exec-otlp-collector")?;
    let (grpc_port, http_port) = (free_port(), free_port());
    let collector = Collector::start(
        &binary,
        collector_dir.path(),
        "collector",
        grpc_port,
        http_port,
    );
    let bed = Testbed::setup("fsn-exec-otlp")?
        .config(format!(
            "journal:\n  write_interval: 200ms\n\
             exec:\n  enabled: true\n  record_command_lines: true\n\
             otlp:\n  enabled: true\n  protocol: http/protobuf\n  \
             endpoint: http://127.0.0.1:{http_port}\n  batch_delay: 200ms\n"
        ))
        .start()?;
    let quiet = tagged_true(
        bed.dir(),
        &format!("otlp-quiet-{}", random_suffix()),
        "otlp",
    )?;
    let sha256 = sha256_file(&quiet)?;
    let status = Command::new(&quiet).args(["--flag", "value"]).status()?;
    ensure!(status.success(), "{} exited with {status}", quiet.display());
    let path = exe_of(&quiet);
    let mut found = None;
    wait_until(
        Duration::from_secs(30),
        "the exec-only program's OTLP record",
        || {
            found = collector.records().into_iter().find(|r| {
                r.str("process.executable.path") == Some(path.as_str())
                    && r.str("fleetsnitch.event.kind") == Some("new_executable")
            });
            Ok(found.is_some())
        },
    )?;
    let record = found.expect("waited for");
    let detail = record.str("fleetsnitch.event.detail").unwrap_or_default();
    ensure!(
        detail.contains("never used the network") && detail.contains("--flag value"),
        "detail {detail:?}: {record:?}"
    );
    ensure!(
        record.str("fleetsnitch.executable.sha256") == Some(sha256.as_str()),
        "{record:?}"
    );
    drop(bed);
    Ok(())
}

/// The exec tracking rules of the shipped rule file, evaluated by a real
/// Prometheus scraping a real agent: a new program that ran without network
/// alerts as such (and not as a new networked executable), and exec events
/// lost to a small ring buffer alert too.
#[test]
fn exec_tracking_alerts_fire_in_prometheus() -> Result<()> {
    require_root!("eBPF");
    let setup = Testbed::setup("fsn-exec-alerts")?;
    let quiet = tagged_true(
        setup.dir(),
        &format!("alert-quiet-{}", random_suffix()),
        "alert",
    )?;
    let burst = tagged_true(setup.dir(), "burst", "burst")?;
    let mut bed = setup
        .config(
            "journal:\n  write_interval: 200ms\nexec:\n  enabled: true\n  ring_buffer_bytes: 65536\n",
        )
        .start()?;
    let rules = workspace_root().join("helm/fleetsnitch/rules/fleetsnitch.rules.yml");
    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: fleetsnitch\n    static_configs:\n      \
         - targets: ['{}']\n",
        rules.display(),
        bed.addr()
    ))?;
    // The lost-events counter must be scraped at 0 before the loss.
    wait_until(Duration::from_secs(60), "the agent scraped", || {
        Ok(!prometheus
            .query("fleetsnitch_exec_events_lost_total")?
            .is_empty())
    })?;

    run_times(&quiet, 1)?;
    let firing = |alert: &str, exe: Option<&Path>| -> Result<bool> {
        let selector = match exe {
            Some(exe) => format!(
                "ALERTS{{alertname=\"{alert}\",alertstate=\"firing\",exe=\"{}\"}}",
                exe.display()
            ),
            None => format!("ALERTS{{alertname=\"{alert}\",alertstate=\"firing\"}}"),
        };
        Ok(!prometheus.query(&selector)?.is_empty())
    };
    wait_until(
        Duration::from_secs(90),
        "FleetsnitchNewExecutableWithoutNetwork for the quiet program",
        || firing("FleetsnitchNewExecutableWithoutNetwork", Some(&quiet)),
    )?;
    ensure!(
        !firing("FleetsnitchNewExecutable", Some(&quiet))?,
        "a program that never used the network fired FleetsnitchNewExecutable"
    );

    // A stopped agent reads nothing: 100 execs overflow 64 KiB (about a
    // dozen exec events) for sure.
    bed.agent.signal(libc::SIGSTOP);
    let stopped = run_times(&burst, 100);
    bed.agent.signal(libc::SIGCONT);
    stopped?;
    wait_until(Duration::from_secs(30), "exec events counted lost", || {
        Ok(metric_sum(&bed.agent, "fleetsnitch_exec_events_lost_total", |_| true)? > 0.0)
    })?;
    wait_until(Duration::from_secs(90), "FleetsnitchExecEventsLost", || {
        firing("FleetsnitchExecEventsLost", None)
    })?;
    drop(prometheus);
    drop(bed);
    Ok(())
}

/// Waits until the journal holds `path`, then checks its sha256 is `expected`.
fn expect_hashed(journal: &Path, path: &Path, expected: &str) -> Result<()> {
    wait_until(
        Duration::from_secs(30),
        &format!("{} journaled", path.display()),
        || Ok(!journal_rows(journal, path)?.is_empty()),
    )?;
    let rows = journal_rows(journal, path)?;
    let hashes: Vec<&str> = rows.iter().map(|(sha256, _, _)| sha256.as_str()).collect();
    ensure!(
        hashes == [expected],
        "{} journaled with {rows:?}; the file's sha256 is {expected}",
        path.display()
    );
    Ok(())
}

#[test]
fn btrfs_subvolumes_with_the_same_inode_are_hashed_apart() -> Result<()> {
    require_root!("eBPF, mounts");
    if Command::new("mkfs.btrfs")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("mkfs.btrfs not found: run scripts/setup.sh (installs btrfs-progs)");
    }
    let dir = TempDir::new("fsn-exec-btrfs")?;
    let image = dir.path().join("btrfs.img");
    fs::File::create(&image)?.set_len(256 << 20)?;
    run_tool("mkfs.btrfs", &["-q", "-f", image.to_str().unwrap()])?;
    let mut mounts = Mounts::default();
    let mnt = dir.path().join("mnt");
    mounts.mount(
        &["-o", "loop", "-t", "btrfs", image.to_str().unwrap()],
        &mnt,
    )?;
    let mut tools = Vec::new();
    for name in ["a", "b"] {
        let subvolume = mnt.join(name);
        run_tool(
            "btrfs",
            &["-q", "subvolume", "create", subvolume.to_str().unwrap()],
        )?;
        let tool = tagged_true(
            &subvolume,
            "tool",
            &format!("btrfs-{name}-{}", random_suffix()),
        )?;
        let sha256 = sha256_file(&tool)?;
        tools.push((tool, sha256));
    }
    let (a, b) = (fs::metadata(&tools[0].0)?, fs::metadata(&tools[1].0)?);
    ensure!(
        a.ino() == b.ino() && a.dev() != b.dev(),
        "precondition: the two tools should share an inode number in two subvolumes \
         (ino {} / {}, st_dev {} / {})",
        a.ino(),
        b.ino(),
        a.dev(),
        b.dev()
    );

    // The testbed's directory is its own: the mounts stay out of it.
    let bed = Testbed::setup("fsn-exec-btrfs-agent")?
        .config(EXEC_CONFIG)
        .start()?;
    let journal = bed.journal();
    for _ in 0..5 {
        for (tool, _) in &tools {
            run_times(tool, 1)?;
        }
    }
    for (tool, sha256) in &tools {
        expect_hashed(journal, tool, sha256)?;
    }
    drop(bed);
    drop(mounts);
    Ok(())
}

#[test]
fn overlayfs_tmpfs_and_deleted_executables_are_hashed() -> Result<()> {
    require_root!("eBPF, mounts");
    let dir = TempDir::new("fsn-exec-fs")?;
    let mut mounts = Mounts::default();
    let tmpfs = dir.path().join("tmpfs");
    mounts.mount(&["-t", "tmpfs", "-o", "size=64m", "tmpfs"], &tmpfs)?;
    let suffix = random_suffix();
    let on_tmpfs = tagged_true(&tmpfs, "tool", &format!("tmpfs-{suffix}"))?;

    // Overlay: the lower layer holds the binary; upper and work dirs on tmpfs.
    let lower = dir.path().join("lower");
    fs::create_dir_all(&lower)?;
    tagged_true(&lower, "tool", &format!("overlay-{suffix}"))?;
    let (upper, work) = (tmpfs.join("upper"), tmpfs.join("work"));
    fs::create_dir_all(&upper)?;
    fs::create_dir_all(&work)?;
    let merged = dir.path().join("merged");
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mounts.mount(&["-t", "overlay", "overlay", "-o", &options], &merged)?;
    let on_overlay = merged.join("tool");

    // Deleted while it runs: a copy of sleep, removed as soon as it started.
    let mut sleeper_content = fs::read("/bin/sleep")?;
    sleeper_content.extend_from_slice(format!("deleted-{suffix}").as_bytes());
    let sleeper = dir.path().join(format!("sleeper-{suffix}"));
    fs::write(&sleeper, &sleeper_content)?;
    fs::set_permissions(&sleeper, fs::Permissions::from_mode(0o755))?;
    let sleeper_sha256 = sha256_file(&sleeper)?;

    // The testbed's directory is its own: the mounts stay out of it.
    let bed = Testbed::setup("fsn-exec-fs-agent")?
        .config(EXEC_CONFIG)
        .start()?;
    let journal = bed.journal();

    let expected = [
        (on_tmpfs.clone(), sha256_file(&on_tmpfs)?),
        (on_overlay.clone(), sha256_file(&on_overlay)?),
    ];
    for (tool, _) in &expected {
        run_times(tool, 3)?;
    }
    let mut sleeping = process::ProcessGuard::spawn(
        "sleeper",
        Command::new(&sleeper).arg("3"),
        Duration::from_secs(1),
    )?;
    fs::remove_file(&sleeper)?;
    for (tool, sha256) in &expected {
        expect_hashed(journal, tool, sha256)?;
    }
    expect_hashed(journal, &sleeper, &sleeper_sha256)?;
    sleeping.stop();
    drop(bed);
    drop(mounts);
    Ok(())
}
