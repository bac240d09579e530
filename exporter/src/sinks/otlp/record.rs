//! The records both sinks write (OTLP logs and the local connection log): one
//! per connection rollup and one per journal event, with everything the agent
//! knows of them. Optional fields the journal does not carry (process name,
//! user name, container, pod, GeoIP) are filled by the caller when it knows them.

use std::{
    borrow::Cow,
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry::logs::{AnyValue, LogRecord as _, Severity};
use opentelemetry_sdk::logs::SdkLogRecord;

use crate::sinks::journal::{Event, EventKind, Rollup};

/// Attribute names. OpenTelemetry semantic conventions where one exists
/// (process, network, server, container, k8s, geo registries), `fleetsnitch.*`
/// where none does.
pub mod attr {
    pub const PROCESS_EXECUTABLE_PATH: &str = "process.executable.path";
    /// Base name of the executable's path (the convention asks for the base name of `/proc/<pid>/exe`).
    pub const PROCESS_EXECUTABLE_NAME: &str = "process.executable.name";
    /// The kernel reports `cred->uid`, the real user id.
    pub const PROCESS_REAL_USER_ID: &str = "process.real_user.id";
    pub const PROCESS_REAL_USER_NAME: &str = "process.real_user.name";
    pub const NETWORK_PEER_ADDRESS: &str = "network.peer.address";
    pub const NETWORK_PEER_PORT: &str = "network.peer.port";
    pub const NETWORK_LOCAL_PORT: &str = "network.local.port";
    pub const NETWORK_TRANSPORT: &str = "network.transport";
    /// `ipv4` or `ipv6`, from the peer address.
    pub const NETWORK_TYPE: &str = "network.type";
    /// The domain the process resolved to the peer's address.
    pub const SERVER_ADDRESS: &str = "server.address";
    pub const CONTAINER_ID: &str = "container.id";
    pub const K8S_POD_NAME: &str = "k8s.pod.name";
    pub const K8S_NAMESPACE_NAME: &str = "k8s.namespace.name";
    pub const K8S_CONTAINER_NAME: &str = "k8s.container.name";
    pub const GEO_COUNTRY_ISO_CODE: &str = "geo.country.iso_code";

    /// No convention exists for a file's digest (only `process.executable.build_id.*`).
    pub const EXECUTABLE_SHA256: &str = "fleetsnitch.executable.sha256";
    /// No convention for the parent's executable (only `process.parent_pid`, which we do not have).
    pub const PARENT_EXECUTABLE_PATH: &str = "fleetsnitch.parent.executable.path";
    /// The kernel's task name (`comm`, 15 bytes at most); not `process.command` (argv\[0\]).
    pub const PROCESS_COMM: &str = "fleetsnitch.process.comm";
    pub const BYTES_SENT: &str = "fleetsnitch.bytes.sent";
    pub const BYTES_RECEIVED: &str = "fleetsnitch.bytes.received";
    pub const WINDOW_SECONDS: &str = "fleetsnitch.window.seconds";
    pub const PEER_ASN: &str = "fleetsnitch.peer.asn";
    pub const EVENT_KIND: &str = "fleetsnitch.event.kind";
    pub const EVENT_DETAIL: &str = "fleetsnitch.event.detail";
}

/// Event name of connection records; events are `fleetsnitch.<kind>`.
pub const CONNECTION_EVENT_NAME: &str = "fleetsnitch.connection";

/// The OTLP event name of a journal event kind.
pub fn event_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::NewExecutable => "fleetsnitch.new_executable",
        EventKind::NewHash => "fleetsnitch.new_hash",
        EventKind::Modified => "fleetsnitch.modified",
        EventKind::VirusTotal => "fleetsnitch.virustotal",
        EventKind::AgentError => "fleetsnitch.agent_error",
    }
}

/// One executable's traffic with one peer during one write window.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectionRecord {
    /// Absolute path of the executable (`[kernel]`, `[unknown]` when not a file).
    pub exe: String,
    /// `None` when the executable could not be hashed.
    pub sha256: Option<String>,
    /// Path of the parent process's executable.
    pub parent: Option<String>,
    pub uid: Option<u32>,
    /// The uid's name in this host's user database.
    pub user_name: Option<String>,
    /// The kernel's task name (`comm`).
    pub comm: Option<String>,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `raw`, `packet`, ...
    pub transport: Cow<'static, str>,
    pub local_port: Option<u16>,
    pub remote_address: Option<String>,
    pub remote_port: Option<u16>,
    /// The name the process resolved to the peer's address.
    pub domain: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub container_id: Option<String>,
    pub container_name: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    /// ISO 3166-1 alpha-2 code of the peer's country.
    pub country: Option<String>,
    /// Autonomous system number of the peer.
    pub asn: Option<u32>,
}

impl From<&Rollup> for ConnectionRecord {
    fn from(rollup: &Rollup) -> Self {
        Self {
            exe: rollup.exe.clone(),
            sha256: non_empty(&rollup.sha256),
            parent: rollup.parent.clone(),
            uid: rollup.uid,
            user_name: None,
            comm: rollup.comm.clone(),
            transport: Cow::Borrowed(rollup.transport),
            local_port: rollup.local_port,
            remote_address: rollup.remote_address.clone(),
            remote_port: rollup.remote_port,
            domain: rollup.domain.clone(),
            bytes_sent: rollup.bytes_sent,
            bytes_received: rollup.bytes_received,
            container_id: rollup.container_id.clone(),
            container_name: rollup.container_name.clone(),
            pod: rollup.pod.clone(),
            namespace: rollup.namespace.clone(),
            country: rollup.country.clone(),
            asn: rollup.asn,
        }
    }
}

impl ConnectionRecord {
    /// Base name of the executable path, as `process.executable.name` asks.
    pub fn exe_name(&self) -> &str {
        executable_name(&self.exe)
    }

    /// `ipv4` or `ipv6` when the peer address parses as an IP address.
    pub fn network_type(&self) -> Option<&'static str> {
        network_type(self.remote_address.as_deref()?)
    }
}

/// A journal event: new executable, new hash, modification, VirusTotal verdict, agent error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Unix seconds.
    pub time: i64,
    pub kind: EventKind,
    pub exe: Option<String>,
    pub sha256: Option<String>,
    pub detail: Option<String>,
}

impl From<&Event> for EventRecord {
    fn from(event: &Event) -> Self {
        Self {
            time: event.time,
            kind: event.kind,
            exe: event.exe.clone(),
            sha256: event.sha256.as_deref().and_then(non_empty),
            detail: event.detail.clone(),
        }
    }
}

/// What one journal write window hands to the sinks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WindowRecords {
    /// Unix seconds at the start of the window.
    pub start: i64,
    /// Length of the window.
    pub seconds: u64,
    pub connections: Vec<ConnectionRecord>,
    pub events: Vec<EventRecord>,
}

impl WindowRecords {
    /// The window's rollups and events, with the optional fields left empty.
    pub fn new(start: i64, seconds: u64, rollups: &[Rollup], events: &[Event]) -> Self {
        Self {
            start,
            seconds,
            connections: rollups.iter().map(ConnectionRecord::from).collect(),
            events: events.iter().map(EventRecord::from).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.connections.len() + self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty() && self.events.is_empty()
    }
}

/// A record waiting in the OTLP queue.
#[derive(Debug, Clone)]
pub(crate) enum Queued {
    Connection {
        window_start: i64,
        window_seconds: u64,
        record: Box<ConnectionRecord>,
    },
    Event(EventRecord),
}

pub fn executable_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

pub fn network_type(address: &str) -> Option<&'static str> {
    match address.parse::<IpAddr>().ok()? {
        IpAddr::V4(_) => Some("ipv4"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Some("ipv4"),
        IpAddr::V6(_) => Some("ipv6"),
    }
}

fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

pub fn unix_time(seconds: i64) -> SystemTime {
    if seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(seconds.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    }
}

fn int(value: u64) -> AnyValue {
    AnyValue::Int(i64::try_from(value).unwrap_or(i64::MAX))
}

fn severity(kind: EventKind) -> (Severity, &'static str) {
    match kind {
        EventKind::AgentError => (Severity::Error, "ERROR"),
        EventKind::NewExecutable
        | EventKind::NewHash
        | EventKind::Modified
        | EventKind::VirusTotal => (Severity::Warn, "WARN"),
    }
}

/// One line of text for the record's body: readable on its own in a log viewer.
pub(crate) fn connection_body(record: &ConnectionRecord, window_seconds: u64) -> String {
    let peer = match (&record.remote_address, record.remote_port) {
        (Some(address), Some(port)) if address.contains(':') => format!("[{address}]:{port}"),
        (Some(address), Some(port)) => format!("{address}:{port}"),
        (Some(address), None) => address.clone(),
        (None, Some(port)) => format!("port {port}"),
        (None, None) => "an unknown peer".to_owned(),
    };
    let domain = record
        .domain
        .as_deref()
        .map(|domain| format!(" ({domain})"))
        .unwrap_or_default();
    format!(
        "{} {} {peer}{domain}: sent {} bytes, received {} bytes in {window_seconds} s",
        record.exe, record.transport, record.bytes_sent, record.bytes_received
    )
}

pub(crate) fn event_body(record: &EventRecord) -> String {
    let mut body = record.kind.as_str().to_owned();
    if let Some(exe) = &record.exe {
        body.push(' ');
        body.push_str(exe);
    }
    if let Some(detail) = &record.detail {
        body.push_str(": ");
        body.push_str(detail);
    }
    body
}

/// Fills an SDK log record (made by the SDK's logger) from a queued record.
pub(crate) fn fill_sdk_record(target: &mut SdkLogRecord, queued: &Queued, observed: SystemTime) {
    target.set_observed_timestamp(observed);
    match queued {
        Queued::Connection {
            window_start,
            window_seconds,
            record,
        } => {
            target.set_event_name(CONNECTION_EVENT_NAME);
            target.set_timestamp(unix_time(*window_start));
            target.set_severity_number(Severity::Info);
            target.set_severity_text("INFO");
            target.set_body(AnyValue::from(connection_body(record, *window_seconds)));
            target.add_attribute(attr::PROCESS_EXECUTABLE_PATH, record.exe.clone());
            target.add_attribute(attr::PROCESS_EXECUTABLE_NAME, record.exe_name().to_owned());
            if let Some(sha256) = &record.sha256 {
                target.add_attribute(attr::EXECUTABLE_SHA256, sha256.clone());
            }
            if let Some(parent) = &record.parent {
                target.add_attribute(attr::PARENT_EXECUTABLE_PATH, parent.clone());
            }
            if let Some(uid) = record.uid {
                target.add_attribute(attr::PROCESS_REAL_USER_ID, i64::from(uid));
            }
            if let Some(name) = &record.user_name {
                target.add_attribute(attr::PROCESS_REAL_USER_NAME, name.clone());
            }
            if let Some(comm) = &record.comm {
                target.add_attribute(attr::PROCESS_COMM, comm.clone());
            }
            target.add_attribute(attr::NETWORK_TRANSPORT, record.transport.to_string());
            if let Some(network_type) = record.network_type() {
                target.add_attribute(attr::NETWORK_TYPE, network_type);
            }
            if let Some(address) = &record.remote_address {
                target.add_attribute(attr::NETWORK_PEER_ADDRESS, address.clone());
            }
            if let Some(port) = record.remote_port {
                target.add_attribute(attr::NETWORK_PEER_PORT, i64::from(port));
            }
            if let Some(port) = record.local_port {
                target.add_attribute(attr::NETWORK_LOCAL_PORT, i64::from(port));
            }
            if let Some(domain) = &record.domain {
                target.add_attribute(attr::SERVER_ADDRESS, domain.clone());
            }
            target.add_attribute(attr::BYTES_SENT, int(record.bytes_sent));
            target.add_attribute(attr::BYTES_RECEIVED, int(record.bytes_received));
            target.add_attribute(attr::WINDOW_SECONDS, int(*window_seconds));
            if let Some(id) = &record.container_id {
                target.add_attribute(attr::CONTAINER_ID, id.clone());
            }
            if let Some(name) = &record.container_name {
                target.add_attribute(attr::K8S_CONTAINER_NAME, name.clone());
            }
            if let Some(pod) = &record.pod {
                target.add_attribute(attr::K8S_POD_NAME, pod.clone());
            }
            if let Some(namespace) = &record.namespace {
                target.add_attribute(attr::K8S_NAMESPACE_NAME, namespace.clone());
            }
            if let Some(country) = &record.country {
                target.add_attribute(attr::GEO_COUNTRY_ISO_CODE, country.clone());
            }
            if let Some(asn) = record.asn {
                target.add_attribute(attr::PEER_ASN, i64::from(asn));
            }
        }
        Queued::Event(record) => {
            let (severity, text) = severity(record.kind);
            target.set_event_name(event_name(record.kind));
            target.set_timestamp(unix_time(record.time));
            target.set_severity_number(severity);
            target.set_severity_text(text);
            target.set_body(AnyValue::from(event_body(record)));
            target.add_attribute(attr::EVENT_KIND, record.kind.as_str());
            if let Some(exe) = &record.exe {
                target.add_attribute(attr::PROCESS_EXECUTABLE_PATH, exe.clone());
                target.add_attribute(
                    attr::PROCESS_EXECUTABLE_NAME,
                    executable_name(exe).to_owned(),
                );
            }
            if let Some(sha256) = &record.sha256 {
                target.add_attribute(attr::EXECUTABLE_SHA256, sha256.clone());
            }
            if let Some(detail) = &record.detail {
                target.add_attribute(attr::EVENT_DETAIL, detail.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_network_types() {
        assert_eq!(executable_name("/usr/bin/curl"), "curl");
        assert_eq!(executable_name("[kernel]"), "[kernel]");
        assert_eq!(network_type("10.0.0.1"), Some("ipv4"));
        assert_eq!(network_type("::ffff:10.0.0.1"), Some("ipv4"));
        assert_eq!(network_type("fd00::1"), Some("ipv6"));
        assert_eq!(network_type("not an address"), None);
    }

    #[test]
    fn rollup_conversion_keeps_every_field() {
        let rollup = Rollup {
            exe: "/usr/bin/curl".into(),
            sha256: String::new(),
            parent: Some("/bin/bash".into()),
            uid: Some(1000),
            transport: "tcp",
            local_port: Some(40000),
            remote_address: Some("fd00::2".into()),
            remote_port: Some(443),
            domain: Some("example.org".into()),
            bytes_sent: 10,
            bytes_received: 20,
            ..Rollup::default()
        };
        let record = ConnectionRecord::from(&rollup);
        assert_eq!(record.sha256, None);
        assert_eq!(record.network_type(), Some("ipv6"));
        assert_eq!(
            connection_body(&record, 10),
            "/usr/bin/curl tcp [fd00::2]:443 (example.org): sent 10 bytes, received 20 bytes in 10 s"
        );
    }
}
