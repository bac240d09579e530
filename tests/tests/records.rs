//! Every field of picosnitch's conn.log, read back from each sink (issue #16).
//!
//! A parent (a copy of the shell) runs a child (a copy of `dnsclient`) as
//! the node's unprivileged user in the client namespace: the child resolves
//! a name through the peer's DNS server, connects to the peer and uploads a
//! known number of bytes. One rollup of that connection is read back from
//! the OTLP collector (a real rotel), the connection log and the journal,
//! and every field is compared with what the test knows the child and its
//! parent were: paths, task names, command lines, sha256 (computed by the
//! test), uid and the node's name for it, local and remote address and
//! port, domain, bytes each way, and the window's start (picosnitch's entry
//! time). The same runs with the agent in the chart's pod, where the paths,
//! the user database and `/proc` it reads are the node's seen from the pod.
//! A command line the agent could not read (the process was gone) is left
//! out and counted, never made up.
//!
//! Needs root (eBPF, network and mount namespaces).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    NetnsPair, TempDir, Testbed, exe_copy,
    otlp_collector::{Collector, Received, free_port, rotel_agent},
    parse_samples,
    pod::{JOURNAL_DIR, WORKLOAD_UID, node_user_name},
    process::run_bounded,
    program, require_root,
    scenarios::{CLIENT_V4, PEER_V4},
    sha256_file, wait_until,
};
use serde_json::Value;

const BYTES: u64 = 12_345;
const DOMAIN: &str = "every-field.fsn.test";
const PEER_PORT: u16 = 5001;

/// One sink's copy of a rollup: its fields by picosnitch's names, as text,
/// and the numbers that may be split over windows.
#[derive(Debug)]
struct Rollup {
    fields: BTreeMap<&'static str, Option<String>>,
    window_start: i64,
    sent: u64,
    received: u64,
}

/// The sinks' names for each of picosnitch's fields: (field, OTLP attribute,
/// connection log key, journal column).
const FIELDS: [Names; 16] = [
    ("exe", "process.executable.path", "exe", "exe"),
    ("name", "fleetsnitch.process.comm", "comm", "process_name"),
    (
        "cmdline",
        "process.command_line",
        "command_line",
        "command_line",
    ),
    (
        "sha256",
        "fleetsnitch.executable.sha256",
        "sha256",
        "sha256",
    ),
    (
        "parent_exe",
        "fleetsnitch.parent.executable.path",
        "parent",
        "parent",
    ),
    (
        "parent_name",
        "fleetsnitch.parent.comm",
        "parent_name",
        "parent_name",
    ),
    (
        "parent_cmdline",
        "fleetsnitch.parent.command_line",
        "parent_command_line",
        "parent_command_line",
    ),
    (
        "parent_sha256",
        "fleetsnitch.parent.executable.sha256",
        "parent_sha256",
        "parent_sha256",
    ),
    ("uid", "process.real_user.id", "uid", "uid"),
    ("user", "process.real_user.name", "user", "user_name"),
    ("transport", "network.transport", "transport", "transport"),
    (
        "local_address",
        "network.local.address",
        "local_address",
        "local_address",
    ),
    (
        "local_port",
        "network.local.port",
        "local_port",
        "local_port",
    ),
    (
        "remote_address",
        "network.peer.address",
        "remote_address",
        "remote_address",
    ),
    (
        "remote_port",
        "network.peer.port",
        "remote_port",
        "remote_port",
    ),
    ("domain", "server.address", "domain", "domain"),
];

/// A JSON value as the text the other sinks carry (`None` for null or absent).
fn json_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::Null => None,
        Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    }
}

fn from_otlp(record: &Received) -> Result<Rollup> {
    let fields = FIELDS
        .iter()
        .map(|(field, attribute, _, _)| {
            let text = record
                .str(attribute)
                .map(str::to_owned)
                .or_else(|| record.int(attribute).map(|n| n.to_string()));
            (*field, text)
        })
        .collect();
    // rotel prints the record's time in nanoseconds since the epoch.
    let timestamp = record.timestamp.as_deref().context("no timestamp")?;
    let nanoseconds: i64 = timestamp
        .parse()
        .with_context(|| format!("timestamp {timestamp:?}"))?;
    Ok(Rollup {
        fields,
        window_start: nanoseconds / 1_000_000_000,
        sent: record.int("fleetsnitch.bytes.sent").context("bytes sent")? as u64,
        received: record
            .int("fleetsnitch.bytes.received")
            .context("bytes received")? as u64,
    })
}

/// The sinks' names of one field (a row of [`FIELDS`]).
type Names = (&'static str, &'static str, &'static str, &'static str);

fn from_json(line: &Value, key_of: fn(&Names) -> &'static str) -> Result<Rollup> {
    let fields = FIELDS
        .iter()
        .map(|names| (names.0, json_text(line.get(key_of(names)))))
        .collect();
    let number = |key: &str| {
        line.get(key)
            .and_then(Value::as_u64)
            .with_context(|| format!("no {key} in {line}"))
    };
    Ok(Rollup {
        fields,
        window_start: number("window_start")? as i64,
        sent: number("bytes_sent")?,
        received: number("bytes_received")?,
    })
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// The child's rollups of its upload in each sink.
fn read_back(
    collector: &Collector,
    connection_log: &Path,
    journal: &Path,
    child: &str,
) -> Result<BTreeMap<&'static str, Vec<Rollup>>> {
    let mut sinks = BTreeMap::new();
    let otlp = collector
        .records()
        .iter()
        .filter(|r| {
            r.event_name.as_deref() == Some("fleetsnitch.connection")
                && r.str("process.executable.path") == Some(child)
                && r.int("network.peer.port") == Some(i64::from(PEER_PORT))
        })
        .map(from_otlp)
        .collect::<Result<Vec<_>>>()?;
    sinks.insert("OTLP", otlp);

    let text = fs::read_to_string(connection_log).unwrap_or_default();
    let mut lines = Vec::new();
    for line in text.lines() {
        let line: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: {line}", connection_log.display()))?;
        if line["record"] == "connection"
            && line["exe"] == child
            && line["remote_port"] == u64::from(PEER_PORT)
        {
            lines.push(from_json(&line, |names| names.2)?);
        }
    }
    sinks.insert("connection log", lines);

    let columns: Vec<&str> = FIELDS.iter().map(|names| names.3).collect();
    let out = run_bounded(
        Command::new("sqlite3")
            .args(["-readonly", "-json"])
            .arg(journal)
            .arg(format!(
                "SELECT window_start, bytes_sent, bytes_received, {} FROM connections \
                 WHERE exe = '{}' AND remote_port = {PEER_PORT}",
                columns.join(", "),
                child.replace('\'', "''")
            )),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "sqlite3: {}", out.stderr);
    let rows: Vec<Value> = if out.stdout.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(&out.stdout).with_context(|| out.stdout.clone())?
    };
    let journaled = rows
        .iter()
        .map(|row| from_json(row, |names| names.3))
        .collect::<Result<Vec<_>>>()?;
    sinks.insert("journal", journaled);
    Ok(sinks)
}

/// The kernel's task name of a program started from `path`: its file name,
/// cut at 15 bytes.
fn comm_of(path: &Path) -> String {
    let name = path.file_name().unwrap_or_default().as_encoded_bytes();
    String::from_utf8_lossy(&name[..name.len().min(15)]).into_owned()
}

#[derive(Clone, Copy, PartialEq)]
enum Agent {
    OnTheHost,
    InThePod,
}

fn every_field_read_back_from_each_sink(name: &str, agent: Agent) -> Result<()> {
    let Some(rotel) = rotel_agent() else {
        return Ok(());
    };
    let mut setup = Testbed::setup(name)?.peer();
    if agent == Agent::InThePod {
        setup = setup.in_pod()?;
    }
    // The programs run as an unprivileged user: the directory must let them.
    fs::set_permissions(setup.dir(), fs::Permissions::from_mode(0o755))?;
    let collector_dir = TempDir::new(&format!("{name}-collector"))?;
    let grpc_port = free_port();
    let collector = Collector::start_on(
        &rotel,
        collector_dir.path(),
        "collector",
        &setup.host_address().to_string(),
        grpc_port,
        free_port(),
    );
    let connection_log = setup.dir().join("connections.jsonl");
    let agents_connection_log = match agent {
        Agent::OnTheHost => connection_log.display().to_string(),
        // The journal's directory is the pod's journal volume.
        Agent::InThePod => format!("{JOURNAL_DIR}/connections.jsonl"),
    };
    let config = format!(
        "journal:\n  write_interval: 1s\n  record_command_lines: true\n  record_ephemeral_ports: true\n\
         otlp:\n  enabled: true\n  protocol: grpc\n  endpoint: http://{}:{grpc_port}\n  batch_delay: 200ms\n\
         connection_log:\n  enabled: true\n  path: {agents_connection_log}\n",
        setup.host_address()
    );
    let parent = exe_copy(&fs::canonicalize("/bin/sh")?, setup.dir(), "parent-shell")?;
    let child = exe_copy(&program("dnsclient")?, setup.dir(), "child-client")?;
    let bed = setup.config(config).start()?;

    let child_args = [
        "udp",
        DOMAIN,
        "--server",
        PEER_V4,
        "--port",
        &PEER_PORT.to_string(),
        "--bytes",
        &BYTES.to_string(),
        // The agent reads command lines when it reads the announcement, a
        // moment after the kernel wrote it; one that exited before has none
        // (counted: see the last test).
        "--linger",
        "2",
    ];
    let child_path = child.to_str().context("child path")?;
    let parent_path = parent.to_str().context("parent path")?;
    // Not the script's last command, so the shell forks the child and stays
    // its parent.
    let script = format!("{child_path} {}; exit $?", child_args.join(" "));
    let started = SystemTime::now();
    let out = run_bounded(
        &mut NetnsPair::command(
            &bed.net().client,
            Path::new("setpriv"),
            &[
                &format!("--reuid={WORKLOAD_UID}"),
                &format!("--regid={WORKLOAD_UID}"),
                "--clear-groups",
                parent_path,
                "-c",
                &script,
            ],
        ),
        Duration::from_secs(60),
    )?;
    let finished = SystemTime::now();
    ensure!(out.status.success(), "the child failed: {}", out.stderr);
    let report: Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("child's report {:?}", out.stdout))?;
    ensure!(
        report["sent"].as_u64() == Some(BYTES) && report["address"] == PEER_V4,
        "the child sent {} to {}, not {BYTES} to {PEER_V4}",
        report["sent"],
        report["address"]
    );
    let local: std::net::SocketAddr = report["local"]
        .as_str()
        .context("no local address in the child's report")?
        .parse()?;

    let expected: BTreeMap<&str, Option<String>> = [
        ("exe", child_path.to_owned()),
        ("name", comm_of(&child)),
        ("cmdline", format!("{child_path} {}", child_args.join(" "))),
        ("sha256", sha256_file(&child)?),
        ("parent_exe", parent_path.to_owned()),
        ("parent_name", comm_of(&parent)),
        ("parent_cmdline", format!("{parent_path} -c {script}")),
        ("parent_sha256", sha256_file(&parent)?),
        ("uid", WORKLOAD_UID.to_string()),
        ("user", node_user_name(WORKLOAD_UID)?),
        ("transport", "tcp".to_owned()),
        ("local_address", CLIENT_V4.to_owned()),
        ("local_port", local.port().to_string()),
        ("remote_address", PEER_V4.to_owned()),
        ("remote_port", PEER_PORT.to_string()),
        ("domain", DOMAIN.to_owned()),
    ]
    .into_iter()
    .map(|(field, value)| (field, Some(value)))
    .collect();
    ensure!(
        local.ip().to_string() == CLIENT_V4,
        "the child's connection is from {local}, not {CLIENT_V4}"
    );

    // Every sink has the whole upload.
    let journal = bed.journal().to_path_buf();
    let mut sinks = BTreeMap::new();
    let complete = wait_until(Duration::from_secs(30), "every sink's rollups", || {
        sinks = read_back(&collector, &connection_log, &journal, child_path)?;
        Ok(sinks
            .values()
            .all(|rollups| rollups.iter().map(|r| r.sent).sum::<u64>() == BYTES))
    });
    if let Err(error) = complete {
        bail!(
            "the child's {BYTES} bytes did not reach every sink ({error:#}): {sinks:#?}\nagent log:\n{}",
            bed.log_tail(40)
        );
    }

    // Each rollup, in each sink, carries every field right.
    // A window may have begun a little before the upload.
    let earliest = unix_seconds(started) - 2;
    let latest = unix_seconds(finished) + 1;
    let mut windows = BTreeMap::new();
    let mut problems = Vec::new();
    for (sink, rollups) in &sinks {
        for rollup in rollups {
            for (field, want) in &expected {
                let got = rollup.fields.get(field).cloned().flatten();
                if got.as_ref() != want.as_ref() {
                    problems.push(format!("{sink}: {field} is {got:?}, not {want:?}"));
                }
            }
            if rollup.received != 0 {
                problems.push(format!(
                    "{sink}: {} bytes received, the peer sent none",
                    rollup.received
                ));
            }
            // The window starts at or before the first byte and ends after it.
            if !(earliest..=latest).contains(&rollup.window_start) {
                problems.push(format!(
                    "{sink}: window start {} outside the upload's time [{earliest}, {latest}]",
                    rollup.window_start
                ));
            }
        }
        let starts: BTreeSet<i64> = rollups.iter().map(|r| r.window_start).collect();
        windows.insert(*sink, starts);
    }
    let first = windows.values().next().cloned().unwrap_or_default();
    if windows.values().any(|starts| *starts != first) {
        problems.push(format!("the sinks' windows differ: {windows:?}"));
    }
    ensure!(
        problems.is_empty(),
        "{} wrong field(s):\n{}\nagent log:\n{}",
        problems.len(),
        problems.join("\n"),
        bed.log_tail(20)
    );

    // The child's first sighting names who ran it: the fleet alerts' context.
    let first_seen = format!(
        "fleetsnitch_executable_first_seen_timestamp_seconds{{exe=\"{child_path}\",sha256=\"{}\",\
         parent=\"{parent_path}\",user=\"{}\"}} ",
        sha256_file(&child)?,
        node_user_name(WORKLOAD_UID)?
    );
    let page = bed.metrics().text()?;
    ensure!(
        page.lines().any(|line| line.starts_with(&first_seen)),
        "no {first_seen:?} on /metrics:\n{}",
        page.lines()
            .filter(|line| line.contains("first_seen_timestamp"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(bed);
    drop(collector);
    Ok(())
}

#[test]
fn every_field_of_a_connection_is_right_in_every_sink() -> Result<()> {
    require_root!("eBPF, network namespaces");
    every_field_read_back_from_each_sink("fsn-records", Agent::OnTheHost)
}

#[test]
fn in_the_charts_pod_every_field_of_a_connection_is_right_in_every_sink() -> Result<()> {
    require_root!("eBPF, network and mount namespaces");
    every_field_read_back_from_each_sink("fsn-records-pod", Agent::InThePod)
}

#[test]
fn a_command_line_the_agent_could_not_read_is_counted_and_left_out() -> Result<()> {
    require_root!("eBPF, network namespaces");
    let setup = Testbed::setup("fsn-records-unread")?.peer();
    let connection_log = setup.dir().join("connections.jsonl");
    let child = exe_copy(&program("dnsclient")?, setup.dir(), "gone-before-read")?;
    let mut bed = setup
        .config(format!(
            "journal:\n  write_interval: 1s\n  record_command_lines: true\n\
             connection_log:\n  enabled: true\n  path: {}\n",
            connection_log.display()
        ))
        .start()?;
    let unread = |bed: &Testbed, of: &str| -> Result<f64> {
        Ok(parse_samples(
            &bed.metrics().text()?,
            "fleetsnitch_command_lines_unread_total",
        )?
        .iter()
        .filter(|s| s.labels.get("of").map(String::as_str) == Some(of))
        .map(|s| s.value)
        .sum())
    };
    let before = unread(&bed, "process")?;

    // The agent stopped while the child runs and exits: it reads the
    // announcement only once the process is gone.
    bed.agent.signal(libc::SIGSTOP);
    let out = run_bounded(
        &mut bed.net().in_client(
            &child,
            &[
                "udp",
                DOMAIN,
                "--server",
                PEER_V4,
                "--port",
                &PEER_PORT.to_string(),
                "--bytes",
                &BYTES.to_string(),
            ],
        ),
        Duration::from_secs(60),
    );
    bed.agent.signal(libc::SIGCONT);
    let out = out?;
    ensure!(out.status.success(), "the child failed: {}", out.stderr);

    let child_path = child.to_str().context("child path")?;
    let mut line = None;
    wait_until(
        Duration::from_secs(30),
        "the child's connection in the log",
        || {
            let text = fs::read_to_string(&connection_log).unwrap_or_default();
            line = text
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .find(|line| line["record"] == "connection" && line["exe"] == child_path);
            Ok(line.is_some())
        },
    )
    .with_context(|| bed.log_tail(20))?;
    let line = line.unwrap_or_default();
    ensure!(
        line.get("command_line").is_none(),
        "a command line the agent could not read must be left out, not made up: {line}"
    );
    // The parent (this test) still runs: its command line was read.
    ensure!(
        line.get("parent_command_line")
            .and_then(Value::as_str)
            .is_some_and(|text| !text.is_empty()),
        "the running parent's command line is missing: {line}"
    );
    let after = unread(&bed, "process")?;
    ensure!(
        after >= before + 1.0,
        "fleetsnitch_command_lines_unread_total{{of=\"process\"}} went from {before} to {after}"
    );
    Ok(())
}
