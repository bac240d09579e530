//! `journal.ignore` end to end, read back from the connection log and the
//! journal (`/metrics` counts every byte regardless):
//! - an ignored hash applies from the program's first window, also when its
//!   hash takes longer than the collector waits for it (`HASH_WAIT`, 5 s):
//!   the program runs from a slow FUSE file system (`tools/slowfs.py`,
//!   Debian's python3-fusepy), whose reads past the ELF stall 8 s;
//! - an ignored port inside the ephemeral range matches before ephemeral
//!   ports are left out of the records.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    ProcessGuard, TempDir, Testbed, process::run_bounded, query_journal, require_root, run_client,
    sha256_file, skip, workspace_root,
};

/// Connection lines of the connection log that name `exe` (its events, such
/// as new_executable, are not traffic: they stay).
fn log_lines_of(log: &Path, exe: &Path) -> Vec<String> {
    let needle = format!("\"exe\":\"{}\"", exe.display());
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("\"record\":\"connection\"") && line.contains(&needle))
        .map(str::to_owned)
        .collect()
}

/// Connection rollups the journal holds for `exe`.
fn journal_rollups_of(journal: &Path, exe: &Path) -> Result<u64> {
    let count = query_journal(
        journal,
        &format!(
            "SELECT count(*) FROM connections WHERE exe = '{}'",
            exe.display()
        ),
    )?;
    count.parse().with_context(|| format!("count {count:?}"))
}

/// The slow FUSE mount: unmounted, then its server stopped, on drop.
struct SlowFs {
    mountpoint: PathBuf,
    _server: ProcessGuard,
}

impl SlowFs {
    fn mount(source: &Path, mountpoint: &Path, slow_from: u64, delay_secs: u64) -> Result<Self> {
        fs::create_dir_all(mountpoint)?;
        let server = ProcessGuard::spawn(
            "slowfs",
            Command::new("/usr/bin/python3")
                .arg(workspace_root().join("tests/tools/slowfs.py"))
                .arg(source)
                .arg(mountpoint)
                .arg(slow_from.to_string())
                .arg(delay_secs.to_string()),
            Duration::from_secs(5),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let target = mountpoint.to_str().context("non-UTF-8 mount point")?;
        while !fs::read_to_string("/proc/self/mounts")?
            .lines()
            .any(|line| line.split(' ').nth(1) == Some(target))
        {
            if Instant::now() > deadline {
                bail!("slowfs did not mount {target} within 10 s");
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(Self {
            mountpoint: mountpoint.to_owned(),
            _server: server,
        })
    }
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        let _ = run_bounded(
            Command::new("umount").arg("-l").arg(&self.mountpoint),
            Duration::from_secs(10),
        );
    }
}

#[test]
fn an_ignored_hash_is_ignored_from_the_first_window_even_when_hashing_is_slow() -> Result<()> {
    require_root!("eBPF, network namespaces, FUSE");
    if skip::program("fusermount3", "fuse3")?.is_none() {
        return Ok(());
    }
    if !Path::new("/usr/lib/python3/dist-packages/fusepy.py").exists() {
        return skip::skip("needs Debian's python3-fusepy (the slow FUSE file system)");
    }
    const DELAY_SECS: u64 = 8;
    let fs_dir = TempDir::new("fsn-ignore-slowfs")?;
    let source = fs_dir.path().join("source");
    fs::create_dir_all(&source)?;
    let setup = Testbed::setup("fsn-ignore-hash")?;
    // The program: trafficgen with 1 MiB appended, so that its hash reads
    // past the ELF (into the slow part) and is its own.
    let original = setup.copy("trafficgen", "ignored")?;
    let mut content = fs::read(&original)?;
    let elf_len = content.len() as u64;
    content.extend(std::iter::repeat_n(0x5a, 1 << 20));
    let name = original.file_name().context("copy name")?;
    fs::write(source.join(name), &content)?;
    fs::set_permissions(source.join(name), fs::Permissions::from_mode(0o755))?;
    let sha256 = sha256_file(&source.join(name))?;
    let slow = SlowFs::mount(&source, &fs_dir.path().join("mnt"), elf_len, DELAY_SECS)?;
    let exe = slow.mountpoint.join(name);
    let log = setup.dir().join("connections.jsonl");

    let bed = setup
        .config(format!(
            "journal:\n  write_interval: 500ms\n  ignore:\n    hashes: [{sha256}]\n\
             connection_log:\n  enabled: true\n  path: {}\n",
            log.display()
        ))
        .peer()
        .start()?;
    // A program not ignored, in the same windows: the log is written.
    let control = bed.copy("trafficgen", "control")?;
    run_client(
        bed.net(),
        &control,
        "tcp_upload",
        &["--bytes", "3000"],
        Duration::from_secs(30),
    )?;
    let started = Instant::now();
    run_client(
        bed.net(),
        &exe,
        "tcp_upload",
        &["--bytes", "5000"],
        Duration::from_secs(60),
    )?;
    bed.metrics().wait_for_bytes(&exe, "sent", 5000)?;

    // Its hash arrives after DELAY_SECS: wait for it to be known, then a few
    // windows more, so anything that was going to leak has leaked.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = bed
            .metrics()
            .samples_for("fleetsnitch_executable_info", &exe, None)?;
        if info
            .iter()
            .any(|sample| sample.labels.get("sha256") == Some(&sha256))
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the slow executable was never hashed: {info:?}\n{}",
            bed.log_tail(30)
        );
        thread::sleep(Duration::from_millis(250));
    }
    ensure!(
        started.elapsed() >= Duration::from_secs(DELAY_SECS),
        "precondition: hashing should have taken {DELAY_SECS} s or more (the slow file \
         system), it took {:?}",
        started.elapsed()
    );
    thread::sleep(Duration::from_secs(3));

    ensure!(
        !log_lines_of(&log, &control).is_empty(),
        "precondition: the control program's traffic should be in the connection log"
    );
    let leaked = log_lines_of(&log, &exe);
    ensure!(
        leaked.is_empty(),
        "the ignored hash {sha256} reached the connection log:\n{}",
        leaked.join("\n")
    );
    let rollups = journal_rollups_of(bed.journal(), &exe)?;
    ensure!(
        rollups == 0,
        "the ignored hash {sha256} has {rollups} connection rollups in the journal"
    );
    Ok(())
}

#[test]
fn an_ignored_port_in_the_ephemeral_range_is_ignored() -> Result<()> {
    require_root!("eBPF, network namespaces");
    let setup = Testbed::setup("fsn-ignore-port")?;
    let log = setup.dir().join("connections.jsonl");
    // The peer's TCP services (5001 sink, 5002 source) inside the ephemeral range.
    let bed = setup
        .config(format!(
            "metrics:\n  ephemeral_ports: 5000-60999\n\
             journal:\n  write_interval: 200ms\n  ignore:\n    ports: [5001]\n\
             connection_log:\n  enabled: true\n  path: {}\n",
            log.display()
        ))
        .peer()
        .start()?;
    let ignored = bed.copy("trafficgen", "to-5001")?;
    let kept = bed.copy("trafficgen", "to-5002")?;
    run_client(
        bed.net(),
        &ignored,
        "tcp_upload",
        &["--bytes", "4000"],
        Duration::from_secs(30),
    )?;
    run_client(
        bed.net(),
        &kept,
        "tcp_download",
        &["--bytes", "4000"],
        Duration::from_secs(30),
    )?;
    bed.metrics().wait_for_bytes(&ignored, "sent", 4000)?;
    bed.metrics().wait_for_bytes(&kept, "received", 4000)?;

    let deadline = Instant::now() + Duration::from_secs(20);
    while log_lines_of(&log, &kept).is_empty() {
        ensure!(
            Instant::now() < deadline,
            "precondition: traffic to port 5002 should be in the connection log"
        );
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(Duration::from_secs(1));
    let leaked = log_lines_of(&log, &ignored);
    ensure!(
        leaked.is_empty(),
        "traffic to the ignored port 5001 reached the connection log:\n{}",
        leaked.join("\n")
    );
    let rollups = journal_rollups_of(bed.journal(), &ignored)?;
    ensure!(
        rollups == 0,
        "traffic to the ignored port 5001 has {rollups} connection rollups in the journal"
    );
    Ok(())
}
