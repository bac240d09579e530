//! The local connection log: the records the OTLP export sends (one per
//! connection rollup, one per journal event) as JSON lines in a file, for
//! local tools (`jq`, `grep`, log shippers). Off by default.
//!
//! Lines are serialized on the caller's thread and handed to a writer thread
//! through a bounded channel, so a slow or stuck disk never holds the agent:
//! when the channel is full the lines are dropped and counted. The file is
//! rotated by size: past `max_bytes` it becomes `PATH.1`, `PATH.1` becomes
//! `PATH.2`, ..., and `PATH.<max_files>` is deleted. Failures to open or write
//! are counted and logged once (again after the log has worked in between);
//! the writer retries at the next window.
//!
//! One line per record, every value JSON-encoded by serde_json:
//!
//! ```json
//! {"time":"2026-01-01T00:00:00Z","record":"connection","window_start":1767225600,"window_seconds":10,"exe_name":"curl","network_type":"ipv4","exe":"/usr/bin/curl","sha256":"…","transport":"tcp","remote_address":"192.0.2.1","remote_port":443,"domain":"example.org","bytes_sent":512,"bytes_received":4096}
//! {"time":"2026-01-01T00:00:03Z","record":"event","kind":"new_executable","exe":"/tmp/x","exe_name":"x","sha256":"…"}
//! ```
//!
//! Keys of unknown values are left out.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::Duration,
};

use prometheus_client::{metrics::counter::Counter, registry::Registry};
use serde::{Deserialize, Serialize};

use crate::{
    model::{Event, FailureClass, Failures, FlowRecord, Window, executable_name},
    sinks::otlp::unix_time,
};

/// Windows waiting for the writer before new ones are dropped.
const CHANNEL_WINDOWS: usize = 64;

/// The `connection_log:` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLogConfig {
    /// Write the connection log. Off by default.
    pub enabled: bool,
    /// The file; its directory is created (owner only) if missing.
    pub path: PathBuf,
    /// Size at which the file is rotated.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` is the newest); 0 keeps none.
    pub max_files: usize,
}

impl Default for ConnectionLogConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: PathBuf::from("/var/log/fleetsnitch/connections.jsonl"),
            max_bytes: 100 * 1024 * 1024,
            max_files: 5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionLogError {
    #[error("invalid value for {key} ({value}): {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("cannot start the connection log thread: {0}")]
    Thread(io::Error),
}

impl ConnectionLogConfig {
    pub fn validate(&self) -> Result<(), ConnectionLogError> {
        if self.path.as_os_str().is_empty() || self.path.file_name().is_none() {
            return Err(ConnectionLogError::Invalid {
                key: "connection_log.path",
                value: self.path.display().to_string(),
                reason: "must name a file",
            });
        }
        if self.max_bytes == 0 {
            return Err(ConnectionLogError::Invalid {
                key: "connection_log.max_bytes",
                value: "0".to_owned(),
                reason: "must be at least 1",
            });
        }
        Ok(())
    }
}

/// What the connection log counts, as `fleetsnitch_connection_log_*`.
#[derive(Debug, Clone, Default)]
pub struct ConnectionLogCounters {
    written: Counter,
    dropped: Counter,
    errors: Counter,
}

impl ConnectionLogCounters {
    /// Exports these counters from `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "connection_log_written",
            "Records written to the local connection log",
            self.written.clone(),
        );
        registry.register(
            "connection_log_dropped",
            "Records dropped because the connection log writer fell behind",
            self.dropped.clone(),
        );
        registry.register(
            "connection_log_errors",
            "Connection log opens, writes or rotations that failed",
            self.errors.clone(),
        );
    }

    /// Lines written to the file.
    pub fn written_total(&self) -> u64 {
        self.written.get()
    }

    /// Lines lost: writer too far behind, or the file could not be written.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.get()
    }

    /// Failed opens, writes and rotations.
    pub fn errors_total(&self) -> u64 {
        self.errors.get()
    }
}

/// The connection log sink.
pub struct ConnectionLog {
    sender: Option<SyncSender<Vec<String>>>,
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
    counters: ConnectionLogCounters,
    /// The "writer behind" warning was logged.
    full_logged: AtomicBool,
}

impl std::fmt::Debug for ConnectionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionLog").finish_non_exhaustive()
    }
}

impl ConnectionLog {
    /// Starts the writer thread. The file is opened there: an unwritable
    /// path is counted and logged, not an error (the agent keeps running).
    pub fn start(config: &ConnectionLogConfig) -> Result<Self, ConnectionLogError> {
        Self::start_reporting(config, Failures::none())
    }

    /// [`Self::start`], telling `failures` when writes fail and work again.
    pub fn start_reporting(
        config: &ConnectionLogConfig,
        failures: Failures,
    ) -> Result<Self, ConnectionLogError> {
        config.validate()?;
        let counters = ConnectionLogCounters::default();
        let (sender, receiver) = mpsc::sync_channel::<Vec<String>>(CHANNEL_WINDOWS);
        let (done_sender, done) = mpsc::channel();
        let mut writer = Writer {
            path: config.path.clone(),
            max_bytes: config.max_bytes,
            max_files: config.max_files,
            file: None,
            size: 0,
            failing: false,
            counters: counters.clone(),
            failures,
        };
        let thread = std::thread::Builder::new()
            .name("connection-log".to_owned())
            .spawn(move || {
                for lines in receiver {
                    writer.write(&lines);
                }
                let _ = done_sender.send(());
            })
            .map_err(ConnectionLogError::Thread)?;
        Ok(Self {
            sender: Some(sender),
            done,
            thread: Some(thread),
            counters,
            full_logged: AtomicBool::new(false),
        })
    }

    /// Serializes one line per record and hands them to the writer; never
    /// waits for the disk. Returns how many lines were dropped.
    pub fn write(&self, window: &Window) -> usize {
        if window.is_empty() {
            return 0;
        }
        let lines = lines_of(window);
        let count = lines.len();
        let Some(sender) = &self.sender else {
            self.counters.dropped.inc_by(count as u64);
            return count;
        };
        match sender.try_send(lines) {
            Ok(()) => {
                self.full_logged.store(false, Ordering::Relaxed);
                0
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped.inc_by(count as u64);
                if !self.full_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "the connection log writer is behind (slow disk?); lines are dropped and counted"
                    );
                }
                count
            }
        }
    }

    pub fn counters(&self) -> ConnectionLogCounters {
        self.counters.clone()
    }

    /// Lets the writer finish what is queued, waiting at most `grace`.
    pub fn shutdown(&mut self, grace: Duration) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            if self.done.recv_timeout(grace).is_ok() {
                let _ = thread.join();
            } else {
                tracing::warn!("the connection log writer did not finish in time");
            }
        }
    }
}

impl Drop for ConnectionLog {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish on its own.
        self.sender = None;
    }
}

/// The JSON lines of a window, each ending with a newline.
pub fn lines_of(window: &Window) -> Vec<String> {
    let window_time = rfc3339(window.start);
    let mut lines = Vec::with_capacity(window.len());
    for record in &window.flows {
        lines.push(line(&connection_line(record, window, &window_time)));
    }
    for record in &window.events {
        lines.push(line(&event_line(record)));
    }
    lines
}

fn line(value: &impl Serialize) -> String {
    // Serializing these plain structs cannot fail.
    let mut text = serde_json::to_string(value).unwrap_or_default();
    text.push('\n');
    text
}

fn rfc3339(unix_seconds: i64) -> String {
    humantime::format_rfc3339_seconds(unix_time(unix_seconds)).to_string()
}

/// A flow record's line: the window, two derived names, then every field of
/// the record under its own name (see [`FlowRecord`]).
#[derive(Serialize)]
struct ConnectionLine<'a> {
    time: &'a str,
    record: &'static str,
    window_start: i64,
    window_seconds: u64,
    exe_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    network_type: Option<&'static str>,
    #[serde(flatten)]
    flow: &'a FlowRecord,
}

fn connection_line<'a>(
    record: &'a FlowRecord,
    window: &Window,
    time: &'a str,
) -> ConnectionLine<'a> {
    ConnectionLine {
        time,
        record: "connection",
        window_start: window.start,
        window_seconds: window.seconds,
        exe_name: record.program.exe_name(),
        network_type: record.peer.network_type(),
        flow: record,
    }
}

#[derive(Serialize)]
struct EventLine<'a> {
    time: String,
    record: &'static str,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    exe: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exe_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

fn event_line(record: &Event) -> EventLine<'_> {
    EventLine {
        time: rfc3339(record.time),
        record: "event",
        kind: record.kind.as_str(),
        exe: record.exe.as_deref(),
        exe_name: record.exe.as_deref().map(executable_name),
        sha256: record.sha256.as_ref().map(|sha256| sha256.as_str()),
        detail: record.detail.as_deref(),
    }
}

struct Writer {
    path: PathBuf,
    max_bytes: u64,
    max_files: usize,
    file: Option<File>,
    size: u64,
    /// A failure was logged and nothing was written since.
    failing: bool,
    counters: ConnectionLogCounters,
    failures: Failures,
}

impl Writer {
    fn write(&mut self, lines: &[String]) {
        let mut pending = Vec::new();
        let mut pending_lines = 0u64;
        for (index, line) in lines.iter().enumerate() {
            if self.file.is_none()
                && let Err(error) = self.open()
            {
                self.failed("open", &error, (lines.len() - index) as u64 + pending_lines);
                return;
            }
            let len = line.len() as u64;
            if self.size + pending.len() as u64 > 0
                && self.size + pending.len() as u64 + len > self.max_bytes
            {
                if !self.flush(&mut pending, &mut pending_lines) {
                    self.drop_lines((lines.len() - index) as u64);
                    return;
                }
                if let Err(error) = self.rotate() {
                    self.failed("rotate", &error, (lines.len() - index) as u64);
                    return;
                }
            }
            pending.extend_from_slice(line.as_bytes());
            pending_lines += 1;
        }
        self.flush(&mut pending, &mut pending_lines);
    }

    /// Writes `pending`; false (lines counted as dropped) when that failed.
    fn flush(&mut self, pending: &mut Vec<u8>, pending_lines: &mut u64) -> bool {
        if pending.is_empty() {
            return true;
        }
        let lines = std::mem::take(pending_lines);
        let Some(file) = self.file.as_mut() else {
            self.drop_lines(lines);
            pending.clear();
            return false;
        };
        let result = file.write_all(pending);
        let written = pending.len() as u64;
        pending.clear();
        match result {
            Ok(()) => {
                self.size += written;
                self.counters.written.inc_by(lines);
                self.failures.succeeded(FailureClass::ConnectionLog);
                if self.failing {
                    self.failing = false;
                    tracing::info!(path = %self.path.display(), "the connection log is written again");
                }
                true
            }
            Err(error) => {
                // Reopen next time: the file may have been replaced or its disk fixed.
                self.file = None;
                self.failed("write", &error, lines);
                false
            }
        }
    }

    fn open(&mut self) -> io::Result<()> {
        if let Some(dir) = self.path.parent().filter(|dir| !dir.as_os_str().is_empty())
            && !dir.exists()
        {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        if self.max_files == 0 {
            ignore_missing(fs::remove_file(&self.path))?;
        } else {
            ignore_missing(fs::remove_file(rotated(&self.path, self.max_files)))?;
            for index in (1..self.max_files).rev() {
                ignore_missing(fs::rename(
                    rotated(&self.path, index),
                    rotated(&self.path, index + 1),
                ))?;
            }
            ignore_missing(fs::rename(&self.path, rotated(&self.path, 1)))?;
        }
        self.open()
    }

    fn drop_lines(&self, lines: u64) {
        self.counters.dropped.inc_by(lines);
    }

    fn failed(&mut self, action: &str, error: &io::Error, lines: u64) {
        self.counters.errors.inc_by(1);
        self.drop_lines(lines);
        self.failures.failed(
            FailureClass::ConnectionLog,
            format_args!("cannot {action} {}: {error}", self.path.display()),
        );
        if !self.failing {
            self.failing = true;
            tracing::warn!(
                path = %self.path.display(),
                %error,
                "cannot {action} the connection log; lines are dropped and counted until it works again"
            );
        }
    }
}

/// `PATH.index`.
pub fn rotated(path: &Path, index: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
