//! A real OTLP collector for tests: rotel (PyPI package `rotel`, its
//! `rotel-agent` binary; `scripts/setup.sh` installs it), listening on
//! loopback and printing every log record it receives to its debug log:
//!
//! ```text
//! rotel-agent start --exporter blackhole --debug-log logs --debug-log-verbosity detailed \
//!   --otlp-grpc-endpoint 127.0.0.1:PORT --otlp-http-endpoint 127.0.0.1:PORT \
//!   --otlp-receiver-traces-disabled --otlp-receiver-metrics-disabled --pid-file DIR/rotel.pid
//! ```

use std::{
    collections::BTreeMap,
    fs,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The rotel-agent binary: `$ROTEL_AGENT`, else the one inside python3's `rotel` package.
/// When there is none, the test is skipped through [`crate::skip::skip`] (callers
/// return on `None`); in a strict run (CI) that panics, naming rotel.
pub fn rotel_agent() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ROTEL_AGENT") {
        return Some(PathBuf::from(path));
    }
    let found = Command::new("python3")
        .args([
            "-c",
            "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        .filter(|path| path.is_file());
    if found.is_none()
        && let Err(error) = crate::skip::skip(
            "rotel-agent not found: python3 in PATH cannot import the rotel package \
             (pip package rotel; scripts/setup.sh installs it) and ROTEL_AGENT is not set",
        )
    {
        panic!("{error:#}");
    }
    found
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A rotel-agent process; killed when dropped.
pub struct Collector {
    child: Option<Child>,
    output: PathBuf,
}

impl Collector {
    pub fn start(binary: &Path, dir: &Path, name: &str, grpc_port: u16, http_port: u16) -> Self {
        Self::start_on(binary, dir, name, "127.0.0.1", grpc_port, http_port)
    }

    /// [`Self::start`] listening on `ip` (an address a pod's network namespace reaches).
    pub fn start_on(
        binary: &Path,
        dir: &Path,
        name: &str,
        ip: &str,
        grpc_port: u16,
        http_port: u16,
    ) -> Self {
        let output = dir.join(format!("{name}.out"));
        let stdout = fs::File::create(&output).expect("collector output file");
        let stderr = stdout.try_clone().expect("collector output file");
        let child = Command::new(binary)
            .args([
                "start",
                "--exporter",
                "blackhole",
                "--debug-log",
                "logs",
                "--debug-log-verbosity",
                "detailed",
                "--otlp-grpc-endpoint",
                &format!("{ip}:{grpc_port}"),
                "--otlp-http-endpoint",
                &format!("{ip}:{http_port}"),
                "--otlp-receiver-traces-disabled",
                "--otlp-receiver-metrics-disabled",
                "--pid-file",
            ])
            .arg(dir.join(format!("{name}.pid")))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start rotel-agent");
        let mut collector = Self {
            child: Some(child),
            output,
        };
        wait_for("the collector's ports", Duration::from_secs(15), || {
            if let Some(child) = collector.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "rotel-agent exited ({status}):\n{}",
                    fs::read_to_string(&collector.output).unwrap_or_default()
                );
            }
            [grpc_port, http_port]
                .iter()
                .all(|port| TcpStream::connect((ip, *port)).is_ok())
        });
        collector
    }

    /// SIGTERM, then SIGKILL after 10 s; waits for the exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Everything the collector printed so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.output).unwrap_or_default()
    }

    pub fn records(&self) -> Vec<Received> {
        parse_debug_log(&fs::read_to_string(&self.output).unwrap_or_default())
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One log record as the collector printed it.
#[derive(Debug, Clone, Default)]
pub struct Received {
    pub resource: BTreeMap<String, String>,
    pub event_name: Option<String>,
    pub timestamp: Option<String>,
    pub severity_text: Option<String>,
    pub body: Option<String>,
    pub attributes: BTreeMap<String, String>,
}

impl Received {
    pub fn str(&self, key: &str) -> Option<&str> {
        self.attributes
            .get(key)
            .and_then(|value| value.strip_prefix("Str(")?.strip_suffix(')'))
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        self.attributes
            .get(key)
            .and_then(|value| value.strip_prefix("Int(")?.strip_suffix(')')?.parse().ok())
    }

    pub fn resource_str(&self, key: &str) -> Option<&str> {
        self.resource
            .get(key)
            .and_then(|value| value.strip_prefix("Str(")?.strip_suffix(')'))
    }
}

/// Parses rotel's detailed debug log of logs (the collector's `debug` exporter format).
pub fn parse_debug_log(text: &str) -> Vec<Received> {
    #[derive(PartialEq)]
    enum Section {
        Other,
        Resource,
        Record,
    }
    let mut records = Vec::new();
    let mut resource = BTreeMap::new();
    let mut section = Section::Other;
    for line in text.lines() {
        if let Some(pair) = line.strip_prefix("     -> ") {
            let Some((key, value)) = pair.split_once(": ") else {
                continue;
            };
            match section {
                Section::Resource => {
                    resource.insert(key.to_owned(), value.to_owned());
                }
                Section::Record => {
                    if let Some(record) = records.last_mut() {
                        let record: &mut Received = record;
                        record.attributes.insert(key.to_owned(), value.to_owned());
                    }
                }
                Section::Other => {}
            }
            continue;
        }
        section = Section::Other;
        if line.starts_with("ResourceLog #") {
            resource = BTreeMap::new();
        } else if line == "Resource attributes:" {
            section = Section::Resource;
        } else if line.starts_with("LogRecord #") {
            records.push(Received {
                resource: resource.clone(),
                ..Received::default()
            });
        } else if line == "Attributes:" {
            section = Section::Record;
        } else if let Some(record) = records.last_mut() {
            if let Some(name) = line.strip_prefix("EventName: ") {
                record.event_name = Some(name.to_owned());
            } else if let Some(time) = line.strip_prefix("Timestamp: ") {
                record.timestamp = Some(time.to_owned());
            } else if let Some(text) = line.strip_prefix("SeverityText: ") {
                record.severity_text = Some(text.to_owned());
            } else if let Some(body) = line.strip_prefix("Body: ") {
                record.body = body
                    .strip_prefix("Str(")
                    .and_then(|body| body.strip_suffix(')'))
                    .map(str::to_owned);
            }
        }
    }
    records
}
