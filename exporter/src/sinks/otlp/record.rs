//! Flow records and events as OpenTelemetry log records: one per flow of a
//! window and one per event, with everything the agent knows of them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::logs::{AnyValue, LogRecord as _, Severity};
use opentelemetry_sdk::logs::SdkLogRecord;

use crate::model::{Bytes, Event, EventKind, FlowRecord, Peer, Program, Workload, executable_name};

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
    pub const NETWORK_LOCAL_ADDRESS: &str = "network.local.address";
    /// The arguments joined by spaces, as `/proc/<pid>/cmdline` has them.
    pub const PROCESS_COMMAND_LINE: &str = "process.command_line";
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
    pub const PARENT_EXECUTABLE_SHA256: &str = "fleetsnitch.parent.executable.sha256";
    /// The parent's task name (`comm`).
    pub const PARENT_COMM: &str = "fleetsnitch.parent.comm";
    pub const PARENT_COMMAND_LINE: &str = "fleetsnitch.parent.command_line";
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
        EventKind::NewDestination => "fleetsnitch.new_destination",
    }
}

/// A record waiting in the OTLP queue.
#[derive(Debug, Clone)]
pub(crate) enum Queued {
    Connection {
        window_start: i64,
        window_seconds: u64,
        record: Box<FlowRecord>,
    },
    Event(Event),
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
        | EventKind::VirusTotal
        | EventKind::NewDestination => (Severity::Warn, "WARN"),
    }
}

/// One line of text for the record's body: readable on its own in a log viewer.
pub(crate) fn connection_body(record: &FlowRecord, window_seconds: u64) -> String {
    let (program, peer) = (&record.program, &record.peer);
    let endpoint = match (peer.remote_address, peer.remote_port) {
        (Some(address), Some(port)) if address.is_ipv6() => format!("[{address}]:{port}"),
        (Some(address), Some(port)) => format!("{address}:{port}"),
        (Some(address), None) => address.to_string(),
        (None, Some(port)) => format!("port {port}"),
        (None, None) => "an unknown peer".to_owned(),
    };
    let domain = peer
        .domain
        .as_deref()
        .map(|domain| format!(" ({domain})"))
        .unwrap_or_default();
    format!(
        "{} {} {endpoint}{domain}: sent {} bytes, received {} bytes in {window_seconds} s",
        program.exe, peer.transport, record.bytes.sent, record.bytes.received
    )
}

pub(crate) fn event_body(record: &Event) -> String {
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
            add_flow_attributes(target, record);
            target.add_attribute(attr::WINDOW_SECONDS, int(*window_seconds));
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
                target.add_attribute(attr::EXECUTABLE_SHA256, sha256.to_string());
            }
            if let Some(detail) = &record.detail {
                target.add_attribute(attr::EVENT_DETAIL, detail.clone());
            }
        }
    }
}

/// Every field of a flow record as an attribute; unknown values are left out.
fn add_flow_attributes(target: &mut SdkLogRecord, record: &FlowRecord) {
    let FlowRecord {
        program:
            Program {
                exe,
                // Filled into sha256 by the fan-out before a window leaves.
                file: _,
                sha256,
                parent,
                parent_sha256,
                parent_name,
                command_line,
                parent_command_line,
                uid,
                user_name,
                comm,
            },
        peer,
        workload:
            Workload {
                container_id,
                container_name,
                pod,
                namespace,
            },
        bytes: Bytes { sent, received },
    } = record;
    let Peer {
        transport,
        local_address,
        local_port,
        remote_address,
        remote_port,
        domain,
        country,
        asn,
    } = peer;
    let mut text = |key: &'static str, value: &Option<String>| {
        if let Some(value) = value {
            target.add_attribute(key, value.clone());
        }
    };
    text(attr::PARENT_EXECUTABLE_PATH, parent);
    text(attr::PARENT_COMM, parent_name);
    text(attr::PROCESS_COMMAND_LINE, command_line);
    text(attr::PARENT_COMMAND_LINE, parent_command_line);
    text(attr::PROCESS_REAL_USER_NAME, user_name);
    text(attr::PROCESS_COMM, comm);
    text(attr::SERVER_ADDRESS, domain);
    text(attr::CONTAINER_ID, container_id);
    text(attr::K8S_CONTAINER_NAME, container_name);
    text(attr::K8S_POD_NAME, pod);
    text(attr::K8S_NAMESPACE_NAME, namespace);
    text(attr::GEO_COUNTRY_ISO_CODE, country);
    target.add_attribute(attr::PROCESS_EXECUTABLE_PATH, exe.clone());
    target.add_attribute(
        attr::PROCESS_EXECUTABLE_NAME,
        executable_name(exe).to_owned(),
    );
    if let Some(sha256) = sha256 {
        target.add_attribute(attr::EXECUTABLE_SHA256, sha256.to_string());
    }
    if let Some(sha256) = parent_sha256 {
        target.add_attribute(attr::PARENT_EXECUTABLE_SHA256, sha256.to_string());
    }
    let mut number = |key: &'static str, value: Option<i64>| {
        if let Some(value) = value {
            target.add_attribute(key, value);
        }
    };
    number(attr::PROCESS_REAL_USER_ID, uid.map(i64::from));
    number(attr::NETWORK_PEER_PORT, remote_port.map(i64::from));
    number(attr::NETWORK_LOCAL_PORT, local_port.map(i64::from));
    number(attr::PEER_ASN, asn.map(i64::from));
    target.add_attribute(attr::NETWORK_TRANSPORT, *transport);
    if let Some(network_type) = peer.network_type() {
        target.add_attribute(attr::NETWORK_TYPE, network_type);
    }
    if let Some(address) = remote_address {
        target.add_attribute(attr::NETWORK_PEER_ADDRESS, address.to_string());
    }
    if let Some(address) = local_address {
        target.add_attribute(attr::NETWORK_LOCAL_ADDRESS, address.to_string());
    }
    target.add_attribute(attr::BYTES_SENT, int(*sent));
    target.add_attribute(attr::BYTES_RECEIVED, int(*received));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_reads_on_its_own() {
        let record = FlowRecord {
            program: Program {
                exe: "/usr/bin/curl".into(),
                ..Program::default()
            },
            peer: Peer {
                transport: "tcp",
                remote_address: "fd00::2".parse().ok(),
                remote_port: Some(443),
                domain: Some("example.org".into()),
                ..Peer::default()
            },
            bytes: Bytes {
                sent: 10,
                received: 20,
            },
            ..FlowRecord::default()
        };
        assert_eq!(
            connection_body(&record, 10),
            "/usr/bin/curl tcp [fd00::2]:443 (example.org): sent 10 bytes, received 20 bytes in 10 s"
        );
    }
}
