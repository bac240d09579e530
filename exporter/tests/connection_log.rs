//! The local connection log: JSON lines, size-based rotation, errors counted,
//! and a stuck file never holding the caller.

use std::{
    ffi::CString,
    fs,
    io::Read,
    os::unix::ffi::OsStrExt,
    path::Path,
    time::{Duration, Instant},
};

use fleetsnitch::{
    model::{Bytes, Event, EventKind, ExeKey, FlowRecord, Peer, Program, Sha256, Window, Workload},
    sinks::connection_log::{ConnectionLog, ConnectionLogConfig, rotated},
};
use serde_json::Value;

fn config(path: &Path, max_bytes: u64, max_files: usize) -> ConnectionLogConfig {
    ConnectionLogConfig {
        enabled: true,
        path: path.to_owned(),
        max_bytes,
        max_files,
    }
}

fn connection(id: u16) -> FlowRecord {
    FlowRecord {
        program: Program {
            exe: "/usr/bin/curl".into(),
            sha256: Sha256::from_hex(&"ab".repeat(32)),
            uid: Some(1000),
            ..Program::default()
        },
        peer: Peer {
            transport: "tcp",
            remote_address: "192.0.2.1".parse().ok(),
            remote_port: Some(id),
            ..Peer::default()
        },
        bytes: Bytes {
            sent: u64::from(id),
            received: 2 * u64::from(id),
        },
        ..FlowRecord::default()
    }
}

fn window(ids: impl IntoIterator<Item = u16>) -> Window {
    Window {
        start: 1_767_225_600,
        seconds: 10,
        flows: ids.into_iter().map(connection).collect(),
        events: Vec::new(),
    }
}

fn lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

#[test]
fn writes_one_json_line_per_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/connections.jsonl");
    let mut log = ConnectionLog::start(&config(&path, 1 << 20, 3)).unwrap();
    let odd = FlowRecord {
        program: Program {
            exe: "/opt/we\"ird\n\\path/é".into(),
            // The file is the fan-out's business, never written.
            file: Some(ExeKey {
                dev: 8,
                ino: 12,
                generation: 3,
            }),
            sha256: None,
            parent: Some("/bin/sh".into()),
            parent_sha256: Sha256::from_hex(&"ef".repeat(32)),
            parent_name: Some("sh".into()),
            command_line: Some("weird --token \\xff \"q\"".into()),
            parent_command_line: Some("sh -c weird".into()),
            uid: Some(0),
            user_name: Some("root".into()),
            comm: Some("weird".into()),
        },
        peer: Peer {
            transport: "udp",
            local_address: "fd00::2".parse().ok(),
            local_port: Some(5353),
            remote_address: "fd00::1".parse().ok(),
            remote_port: Some(53),
            domain: Some("example.org".into()),
            country: Some("FR".into()),
            asn: Some(64_501),
        },
        workload: Workload {
            container_id: Some("abc".into()),
            container_name: Some("app".into()),
            pod: Some("app-1".into()),
            namespace: Some("prod".into()),
        },
        bytes: Bytes {
            sent: u64::MAX,
            received: 0,
        },
    };
    let records = Window {
        start: 1_767_225_600,
        seconds: 10,
        flows: vec![connection(443), odd],
        events: vec![Event {
            time: 1_767_225_603,
            kind: EventKind::NewExecutable,
            exe: Some("/tmp/new".into()),
            sha256: Sha256::from_hex(&"cd".repeat(32)),
            detail: None,
        }],
    };
    assert_eq!(log.write(&records), 0);
    log.shutdown(Duration::from_secs(5));
    let counters = log.counters();
    assert_eq!(counters.written_total(), 3);
    assert_eq!(counters.dropped_total(), 0);
    assert_eq!(counters.errors_total(), 0);

    let lines = lines(&path);
    assert_eq!(lines.len(), 3);
    let curl = &lines[0];
    assert_eq!(curl["record"], "connection");
    assert_eq!(curl["time"], "2026-01-01T00:00:00Z");
    assert_eq!(curl["window_start"], 1_767_225_600);
    assert_eq!(curl["window_seconds"], 10);
    assert_eq!(curl["exe"], "/usr/bin/curl");
    assert_eq!(curl["exe_name"], "curl");
    assert_eq!(curl["sha256"], "ab".repeat(32));
    assert_eq!(curl["network_type"], "ipv4");
    assert_eq!(curl["remote_port"], 443);
    assert_eq!(curl["bytes_sent"], 443);
    assert_eq!(curl["bytes_received"], 886);
    assert!(curl.get("domain").is_none(), "unknown values are left out");

    let odd = &lines[1];
    assert_eq!(odd["exe"], "/opt/we\"ird\n\\path/é");
    assert_eq!(odd["exe_name"], "é");
    assert!(odd.get("sha256").is_none());
    assert!(odd.get("file").is_none(), "the file is not written: {odd}");
    assert_eq!(odd["bytes_sent"], u64::MAX);
    assert_eq!(odd["network_type"], "ipv6");
    assert_eq!(odd["user"], "root");
    assert_eq!(odd["comm"], "weird");
    assert_eq!(odd["container_id"], "abc");
    assert_eq!(odd["container_name"], "app");
    assert_eq!(odd["pod"], "app-1");
    assert_eq!(odd["namespace"], "prod");
    assert_eq!(odd["country"], "FR");
    assert_eq!(odd["asn"], 64_501);
    assert_eq!(odd["domain"], "example.org");
    assert_eq!(odd["parent"], "/bin/sh");
    assert_eq!(odd["parent_sha256"], "ef".repeat(32));
    assert_eq!(odd["parent_name"], "sh");
    assert_eq!(odd["command_line"], "weird --token \\xff \"q\"");
    assert_eq!(odd["parent_command_line"], "sh -c weird");
    assert_eq!(odd["local_address"], "fd00::2");
    assert_eq!(odd["local_port"], 5353);

    let event = &lines[2];
    assert_eq!(event["record"], "event");
    assert_eq!(event["kind"], "new_executable");
    assert_eq!(event["time"], "2026-01-01T00:00:03Z");
    assert_eq!(event["exe"], "/tmp/new");
    assert_eq!(event["exe_name"], "new");
    assert_eq!(event["sha256"], "cd".repeat(32));

    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn rotates_by_size_and_keeps_max_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("connections.jsonl");
    let mut log = ConnectionLog::start(&config(&path, 1000, 2)).unwrap();
    for id in 1..=60u16 {
        log.write(&window([id]));
        // Let the writer keep up, so that nothing is dropped for being behind.
        std::thread::sleep(Duration::from_millis(2));
    }
    log.shutdown(Duration::from_secs(5));
    assert_eq!(log.counters().written_total(), 60);
    assert_eq!(log.counters().dropped_total(), 0);
    assert!(
        !rotated(&path, 3).exists(),
        "only max_files rotated files are kept"
    );

    let mut kept = Vec::new();
    for file in [rotated(&path, 2), rotated(&path, 1), path.clone()] {
        let size = fs::metadata(&file).unwrap().len();
        assert!(size <= 1000, "{} is {size} bytes", file.display());
        kept.extend(
            lines(&file)
                .iter()
                .map(|line| line["remote_port"].as_u64().unwrap()),
        );
    }
    // The newest lines, in order, without a gap.
    let first = kept[0];
    assert_eq!(*kept.last().unwrap(), 60);
    assert_eq!(kept, (first..=60).collect::<Vec<_>>());
}

#[test]
fn unwritable_path_is_counted_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("blocker");
    fs::write(&blocker, "a file where the directory should be").unwrap();
    let path = blocker.join("connections.jsonl");
    let mut log = ConnectionLog::start(&config(&path, 1 << 20, 1)).unwrap();
    let counters = log.counters();
    log.write(&window([1, 2]));
    log.write(&window([3]));
    let start = Instant::now();
    while counters.dropped_total() < 3 {
        assert!(start.elapsed() < Duration::from_secs(10), "no drop counted");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(counters.errors_total(), 2);
    assert_eq!(counters.written_total(), 0);

    fs::remove_file(&blocker).unwrap();
    log.write(&window([4]));
    log.shutdown(Duration::from_secs(5));
    assert_eq!(counters.written_total(), 1);
    assert_eq!(counters.dropped_total(), 3);
    assert_eq!(lines(&path).len(), 1);
}

#[test]
fn a_stuck_file_never_holds_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fifo");
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // Opening a FIFO for writing blocks until a reader comes: the writer is stuck.
    let mut log = ConnectionLog::start(&config(&path, 1 << 30, 0)).unwrap();
    let start = Instant::now();
    let mut dropped = 0;
    for id in 1..=200u16 {
        dropped += log.write(&window([id]));
    }
    assert!(start.elapsed() < Duration::from_secs(1), "write() blocked");
    assert!(dropped >= 200 - 66, "only {dropped} dropped");
    let counters = log.counters();
    assert_eq!(counters.dropped_total(), dropped as u64);

    let reader = std::thread::spawn({
        let path = path.clone();
        move || {
            let mut text = String::new();
            fs::File::open(path)
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            text.lines().count() as u64
        }
    });
    log.shutdown(Duration::from_secs(10));
    drop(log);
    let read = reader.join().unwrap();
    assert_eq!(counters.written_total(), read);
    assert_eq!(counters.written_total() + counters.dropped_total(), 200);
}

#[test]
fn bad_configuration_names_the_key() {
    let error = ConnectionLog::start(&ConnectionLogConfig {
        max_bytes: 0,
        ..ConnectionLogConfig::default()
    })
    .unwrap_err();
    assert!(
        error.to_string().contains("connection_log.max_bytes"),
        "{error}"
    );
    let parsed: ConnectionLogConfig =
        yaml_serde::from_str("enabled: true\npath: /tmp/c.jsonl\nmax_files: 2\n").unwrap();
    assert_eq!(parsed.max_bytes, 100 * 1024 * 1024);
    assert_eq!(parsed.max_files, 2);
    assert!(!ConnectionLogConfig::default().enabled);
    assert!(yaml_serde::from_str::<ConnectionLogConfig>("max_size: 3").is_err());
}
