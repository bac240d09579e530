//! The journal under stress and on bad file systems: a SIGKILL in the middle
//! of heavy writing, a read-only file system, a full disk, an inode number
//! reused by a new program. Needs root.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    AgentGuard, TempDir, Testbed,
    filesystems::{Mounts, copy_onto_inode, ext4},
    process, program, query_journal, random_suffix, require_root, run_client, run_loopback,
    sha256_file, wait_until,
};

/// Journal written every 200 ms.
const WRITE_OFTEN: &str = "journal:\n  write_interval: 200ms\n";

fn metric(agent: &AgentGuard, name: &str) -> Result<f64> {
    let text =
        fleetsnitch_e2e::metrics::http_get(agent.addr, "/metrics", Duration::from_secs(5))?.body;
    let samples = fleetsnitch_e2e::parse_samples(&text, name)?;
    Ok(samples.iter().map(|s| s.value).sum())
}

#[test]
fn sigkill_during_heavy_writes_keeps_every_committed_row() -> Result<()> {
    require_root!("eBPF, network namespaces");
    // One row per connection (every source port kept): heavy writing.
    let mut bed = Testbed::setup("fsn-sigkill")?
        .peer()
        .config("journal:\n  write_interval: 100ms\n  record_ephemeral_ports: true\n")
        .start()?;
    let journal = bed.journal().to_owned();
    let storm = bed.copy("trafficgen", "storm")?;
    let net = &bed.peers.as_ref().expect("peers").net;
    let agent = &mut bed.agent;

    // Thousands of connections a second: one rollup row per connection and
    // window. Widen the client's port range so TIME_WAIT does not run it dry.
    let widen = process::run_bounded(
        &mut net.in_client(
            Path::new("/sbin/sysctl"),
            &["-qw", "net.ipv4.ip_local_port_range=1024 65000"],
        ),
        Duration::from_secs(10),
    )?;
    ensure!(widen.status.success(), "sysctl: {}", widen.stderr);
    let stop = AtomicBool::new(false);
    let (committed, last_id) = thread::scope(|scope| -> Result<(String, String)> {
        let traffic = scope.spawn(|| -> Result<()> {
            for _ in 0..20 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                run_client(net, &storm, "many_tcp_conns", &[], Duration::from_secs(60))?;
            }
            Ok(())
        });
        let outcome = (|| -> Result<(String, String)> {
            wait_until(Duration::from_secs(60), "4000 rollups committed", || {
                let rows = query_journal(&journal, "SELECT count(*) FROM connections")?
                    .parse::<u64>()
                    .unwrap_or(0);
                ensure!(
                    rows >= 4_000 || !traffic.is_finished(),
                    "the traffic stopped with only {rows} rollups journaled"
                );
                Ok(rows >= 4_000)
            })?;
            let snapshot = query_journal(
                &journal,
                "SELECT count(*) || ' ' || max(id) FROM connections",
            )?;
            let (committed, last_id) = snapshot.split_once(' ').context("snapshot")?;
            // Writes keep going while the agent dies.
            thread::sleep(Duration::from_millis(350));
            agent.signal(libc::SIGKILL);
            agent
                .wait_exit(Duration::from_secs(10))?
                .context("the agent survived SIGKILL")?;
            Ok((committed.to_owned(), last_id.to_owned()))
        })();
        stop.store(true, Ordering::Relaxed);
        // A traffic failure explains an early stop better than the wait does.
        traffic.join().expect("traffic thread")?;
        outcome
    })?;

    assert_eq!(query_journal(&journal, "PRAGMA integrity_check")?, "ok");
    let kept = query_journal(
        &journal,
        &format!("SELECT count(*) FROM connections WHERE id <= {last_id}"),
    )?;
    assert_eq!(kept, committed, "rows committed before the kill were lost");
    let after: u64 = query_journal(&journal, "SELECT count(*) FROM connections")?.parse()?;
    eprintln!("committed before kill: {committed}, after kill: {after}");

    // The restarted agent recovers the journal and does not announce the
    // storm executable again.
    bed.restart()?;
    run_client(
        bed.net(),
        &storm,
        "tcp_upload",
        &["--bytes", "10000"],
        Duration::from_secs(60),
    )?;
    bed.metrics().wait_for_bytes(&storm, "sent", 10_000)?;
    let storm_path = storm.display().to_string();
    wait_until(
        Duration::from_secs(10),
        "the restarted agent journals again",
        || {
            let last_seen: i64 = query_journal(
                &journal,
                &format!("SELECT max(last_seen) FROM executables WHERE path = '{storm_path}'"),
            )?
            .parse()
            .unwrap_or(0);
            let written: u64 = query_journal(
            &journal,
            &format!("SELECT count(*) FROM connections WHERE exe = '{storm_path}' AND remote_port = 5001"),
        )?
        .parse()
        .unwrap_or(0);
            Ok(last_seen > 0 && written > 0)
        },
    )?;
    let announcements = query_journal(
        &journal,
        &format!(
            "SELECT count(*) FROM events WHERE kind = 'new_executable' AND exe = '{storm_path}'"
        ),
    )?;
    assert_eq!(
        announcements, "1",
        "the storm executable was announced again after restart"
    );
    Ok(())
}

/// A tmpfs mounted for one test and lazily unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(path: &Path, options: &str) -> Result<Self> {
        fs::create_dir_all(path)?;
        process::run_checked(
            Path::new("/bin/mount"),
            &[
                "-t",
                "tmpfs",
                "-o",
                options,
                "fsn-test",
                path.to_str().unwrap(),
            ],
        )?;
        Ok(Self(path.to_owned()))
    }

    fn remount(&self, options: &str) -> Result<()> {
        process::run_checked(
            Path::new("/bin/mount"),
            &[
                "-o",
                &format!("remount,{options}"),
                self.0.to_str().unwrap(),
            ],
        )
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn read_only_journal_degrades_then_catches_up() -> Result<()> {
    require_root!("eBPF, mounts");
    // Mounted in a directory of its own: unmounted before the testbed's is removed.
    let mounts = TempDir::new("fsn-rofs-mnt")?;
    let mount = Mount::tmpfs(&mounts.path().join("ro"), "size=8m,mode=0700,ro")?;
    let journal = mount.0.join("journal.db");
    let bed = Testbed::setup("fsn-rofs")?
        .config(WRITE_OFTEN)
        .journal(&journal)
        .start()?;

    let exe = bed.copy("trafficgen", "rofs")?;
    run_loopback(&exe, 20_000)?;
    bed.metrics().wait_for_bytes(&exe, "sent", 20_000)?;
    wait_until(Duration::from_secs(10), "journal errors counted", || {
        Ok(metric(&bed.agent, "fleetsnitch_journal_write_errors_total")? >= 1.0)
    })?;
    let log = fs::read_to_string(bed.agent.log_path())?;
    assert!(
        log.contains(&format!("cannot create the journal {}", journal.display())),
        "the log does not name the journal:\n{log}"
    );

    mount.remount("rw")?;
    let path = exe.display().to_string();
    wait_until(
        Duration::from_secs(15),
        "entries written once writable",
        || {
            Ok(journal.exists()
                && query_journal(
                    &journal,
                    &format!("SELECT count(*) FROM executables WHERE path = '{path}'"),
                )? == "1")
        },
    )?;
    Ok(())
}

#[test]
fn full_disk_is_counted_and_nothing_queued_is_lost() -> Result<()> {
    require_root!("eBPF, mounts");
    // Mounted in a directory of its own: unmounted before the testbed's is removed.
    let mounts = TempDir::new("fsn-full-mnt")?;
    let mount = Mount::tmpfs(&mounts.path().join("small"), "size=32m,mode=0700")?;
    let journal = mount.0.join("journal.db");
    // Other tests' namespace traffic (198.18.0.0/15) stays out of this small
    // file system, which is also how the ignore list is exercised end to end.
    let mut bed = Testbed::setup("fsn-full")?
        .config(
            "journal:\n  write_interval: 200ms\n  ignore:\n    subnets: [198.18.0.0/15, \"fd00:f5::/64\"]\n",
        )
        .journal(&journal)
        .start()?;
    let first = bed.copy("trafficgen", "before-full")?;
    run_loopback(&first, 10_000)?;
    let first_path = first.display().to_string();
    wait_until(
        Duration::from_secs(15),
        "first executable journaled",
        || {
            Ok(query_journal(
                &journal,
                &format!("SELECT count(*) FROM executables WHERE path = '{first_path}'"),
            )? == "1")
        },
    )?;

    // Fill the file system to the last byte.
    let filler_path = mount.0.join("filler");
    let mut filler = fs::File::create(&filler_path)?;
    let block = vec![0u8; 64 << 10];
    for _ in 0..1024 {
        if filler.write_all(&block).is_err() {
            break;
        }
    }
    let _ = filler.write_all(&[0u8; 1]);
    drop(filler);

    let errors_before = metric(&bed.agent, "fleetsnitch_journal_write_errors_total")?;
    // Many distinct executables, so the journal must grow.
    let mut later = Vec::new();
    for index in 0..20 {
        let exe = bed.copy("trafficgen", &format!("when-full-{index}"))?;
        run_loopback(&exe, 1_000)?;
        later.push(exe.display().to_string());
    }
    wait_until(Duration::from_secs(15), "full disk counted", || {
        Ok(metric(&bed.agent, "fleetsnitch_journal_write_errors_total")? > errors_before)
    })?;
    bed.agent.check_running()?;

    fs::remove_file(&filler_path)?;
    let list = later
        .iter()
        .map(|p| format!("'{p}'"))
        .collect::<Vec<_>>()
        .join(",");
    let written = || {
        query_journal(
            &journal,
            &format!("SELECT count(*) FROM executables WHERE path IN ({list})"),
        )
    };
    let caught_up = wait_until(
        Duration::from_secs(30),
        "queued entries written after space returns",
        || Ok(written()? == later.len().to_string()),
    );
    if let Err(error) = caught_up {
        let present = query_journal(
            &journal,
            &format!("SELECT path FROM executables WHERE path IN ({list})"),
        )?;
        let missing: Vec<&String> = later
            .iter()
            .filter(|p| !present.contains(p.as_str()))
            .collect();
        let text =
            fleetsnitch_e2e::metrics::http_get(bed.addr(), "/metrics", Duration::from_secs(5))?
                .body;
        let related: Vec<&str> = text
            .lines()
            .filter(|l| {
                missing.iter().any(|m| l.contains(m.as_str()))
                    || l.contains("journal")
                    || l.contains("lost")
                    || l.contains("hash_failures")
            })
            .collect();
        bail!(
            "{error:#} ({} of {} written; missing {missing:?})\nmetrics:\n{}\nagent log:\n{}",
            written()?,
            later.len(),
            related.join("\n"),
            bed.log_tail(40)
        );
    }
    assert_eq!(query_journal(&journal, "PRAGMA integrity_check")?, "ok");
    Ok(())
}

/// A deleted program's inode number goes to the next file created (ext4 hands
/// out the lowest free one): the new program must be journaled and exported
/// under its own path and hash, not the deleted one's. Both live on an ext4
/// of the test's own, so the number is reused whatever `/tmp` is and whatever
/// else creates files on the machine meanwhile.
#[test]
fn a_new_program_under_a_reused_inode_number_gets_its_own_path_and_hash() -> Result<()> {
    require_root!("eBPF, a loop-mounted ext4");
    let fs_dir = TempDir::new("fsn-inode-reuse-fs")?;
    let mut mounts = Mounts::default();
    let mnt = ext4(&fs_dir, &mut mounts)?;
    let bed = Testbed::setup("fsn-inode-reuse")?
        .config(WRITE_OFTEN)
        .start()?;
    let journal = bed.journal();
    let hashed = |path: &Path| -> Result<bool> {
        let sha256 = sha256_file(path)?;
        Ok(query_journal(
            journal,
            &format!(
                "SELECT count(*) FROM executables WHERE path = '{}' AND sha256 = '{sha256}'",
                path.display()
            ),
        )? == "1")
    };

    let trafficgen = program("trafficgen")?;
    let first = mnt.join(format!("first-{}", random_suffix()));
    let inode = copy_onto_inode(&trafficgen, &first, "", None)?;
    run_loopback(&first, 10_000)?;
    wait_until(Duration::from_secs(30), "first program journaled", || {
        hashed(&first)
    })?;
    fs::remove_file(&first)?;

    let second = mnt.join(format!("second-{}", random_suffix()));
    copy_onto_inode(&trafficgen, &second, "\0another program", Some(inode))?;
    ensure!(
        sha256_file(&second)? != sha256_file(&trafficgen)?,
        "the second program must differ from the first"
    );
    run_loopback(&second, 10_000)?;
    wait_until(
        Duration::from_secs(30),
        "second program journaled with its own hash",
        || hashed(&second),
    )
    .with_context(|| {
        format!(
            "journal: {:?}",
            query_journal(journal, "SELECT path, sha256 FROM executables")
        )
    })?;
    bed.metrics().wait_for_bytes(&second, "sent", 10_000)?;
    drop(bed);
    drop(mounts);
    Ok(())
}

/// Twenty connections from one program to one peer port: their source ports
/// are ephemeral, so they share one rollup per window (no local port), and
/// their bytes add up.
#[test]
fn connections_from_ephemeral_ports_fold_into_one_rollup_per_window() -> Result<()> {
    require_root!("eBPF");
    let bed = Testbed::setup("fsn-fold")?.config(WRITE_OFTEN).start()?;
    // A service port below the ephemeral range (32768-60999).
    let listener = (20_000..20_100)
        .find_map(|port| std::net::TcpListener::bind(("127.0.0.1", port)).ok())
        .context("no free port in 20000..20100")?;
    let port = listener.local_addr()?.port();
    let accepting = thread::spawn(move || {
        for stream in listener.incoming().take(20) {
            let Ok(mut stream) = stream else { continue };
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stream, &mut sink);
        }
    });
    let connector = bed.copy("connector", "fold")?;
    let out = process::run_bounded(
        Command::new(&connector).args([
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--per-second",
            "20",
            "--seconds",
            "1",
        ]),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "connector: {}", out.stderr);
    let _ = accepting.join();
    let rows = |sql: &str| query_journal(bed.journal(), sql);
    let exe = connector.display();
    wait_until(
        Duration::from_secs(20),
        "all 20 x 64 bytes journaled",
        || {
            Ok(rows(&format!(
                "SELECT coalesce(sum(bytes_sent), 0) FROM connections WHERE exe = '{exe}'"
            ))? == "1280")
        },
    )?;
    let shape = rows(&format!(
        "SELECT count(*), count(local_port), count(DISTINCT remote_port), max(remote_port) \
         FROM connections WHERE exe = '{exe}'"
    ))?;
    let fields: Vec<u64> = shape.split('|').map(str::parse).collect::<Result<_, _>>()?;
    ensure!(
        fields[1] == 0 && fields[2] == 1 && fields[3] == u64::from(port),
        "rows, local ports, distinct remote ports, remote port: {shape}"
    );
    ensure!(
        fields[0] < 20,
        "{} rows for 20 connections: they were not folded",
        fields[0]
    );
    Ok(())
}

/// `journal.record_addresses: false` and `record_ports: false`: the connection rows
/// keep the executable, transport and bytes, and no address or port, not even the
/// ephemeral ports `record_ephemeral_ports` would keep. A second agent with the
/// defaults watches the same traffic and records them: the first one had them.
#[test]
fn addresses_and_ports_are_left_out_of_the_journal_when_told() -> Result<()> {
    require_root!("eBPF, network namespaces");
    let bed = Testbed::setup("fsn-no-addresses")?
        .peer()
        .config(
            "journal:\n  write_interval: 200ms\n  record_addresses: false\n  \
             record_ports: false\n  record_ephemeral_ports: true\n",
        )
        .start()?;
    let witness = Testbed::setup("fsn-addresses")?
        .config("journal:\n  write_interval: 200ms\n  record_ephemeral_ports: true\n")
        .start()?;
    let exe = bed.copy("trafficgen", "private")?;
    let report = run_client(
        bed.net(),
        &exe,
        "tcp_upload",
        &["--bytes", "30000"],
        Duration::from_secs(60),
    )?;
    ensure!(report.sent == 30_000, "tcp_upload sent {}", report.sent);
    let total = format!(
        "SELECT coalesce(sum(bytes_sent), 0) FROM connections WHERE exe = '{}'",
        exe.display()
    );
    for (what, journal) in [("told to", bed.journal()), ("witness", witness.journal())] {
        wait_until(
            Duration::from_secs(20),
            &format!("30,000 bytes in the {what} journal"),
            || Ok(query_journal(journal, &total)? == "30000"),
        )
        .with_context(|| format!("{what}: {:?}", query_journal(journal, &total)))?;
    }
    let shape = format!(
        "SELECT DISTINCT transport || '|' || coalesce(remote_address, '-') || '|' || \
         coalesce(local_port, '-') || '|' || coalesce(remote_port, '-') \
         FROM connections WHERE exe = '{}'",
        exe.display()
    );
    let private = query_journal(bed.journal(), &shape)?;
    ensure!(
        private == "tcp|-|-|-",
        "rows of the agent told to leave addresses and ports out (transport|address|local port|remote port):\n{private}"
    );
    let witnessed = query_journal(witness.journal(), &shape)?;
    ensure!(
        witnessed.lines().any(|row| {
            let fields: Vec<&str> = row.split('|').collect();
            fields.len() == 4
                && fields[1] == fleetsnitch_e2e::scenarios::PEER_V4
                && fields[2] != "-"
                && fields[3] == "5001"
        }),
        "the witness agent did not record the address and ports: {witnessed}"
    );
    Ok(())
}
