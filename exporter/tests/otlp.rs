//! OTLP log export against a real collector: rotel (PyPI package `rotel`, its
//! `rotel-agent` binary; `scripts/setup.sh` installs it), listening on loopback,
//! printing every log record it receives to its debug log:
//!
//! ```text
//! rotel-agent start --exporter blackhole --debug-log logs --debug-log-verbosity detailed \
//!   --otlp-grpc-endpoint 127.0.0.1:PORT --otlp-http-endpoint 127.0.0.1:PORT \
//!   --otlp-receiver-traces-disabled --otlp-receiver-metrics-disabled --pid-file DIR/rotel.pid
//! ```
//!
//! Over gRPC and over HTTP/protobuf: the records arrive with the expected
//! attributes and byte counts; with the collector stopped the queue keeps
//! exactly `max_queued_records`, drops and counts the rest, and delivers what
//! it kept once the collector is back.

use std::{
    collections::BTreeSet,
    net::TcpListener,
    time::{Duration, Instant},
};

use fleetsnitch::{
    model::{Bytes, Event, EventKind, FlowRecord, Peer, Program, Sha256, Window, Workload},
    sinks::otlp::{OtlpConfig, OtlpExporter, OtlpProtocol, ResourceInfo, attr},
};

const WINDOW_START: i64 = 1_767_225_600;
const SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

use fleetsnitch_e2e::otlp_collector::{Collector, Received, free_port, rotel_agent, wait_for};

fn endpoint(protocol: OtlpProtocol, grpc_port: u16, http_port: u16) -> String {
    match protocol {
        OtlpProtocol::Grpc => format!("http://127.0.0.1:{grpc_port}"),
        OtlpProtocol::HttpProtobuf => format!("http://127.0.0.1:{http_port}"),
    }
}

fn config(protocol: OtlpProtocol, endpoint: String, max_queued: usize) -> OtlpConfig {
    OtlpConfig {
        enabled: true,
        protocol: Some(protocol),
        endpoint: Some(endpoint),
        timeout: Some(Duration::from_secs(3)),
        max_queued_records: max_queued,
        max_batch_size: 10.min(max_queued),
        batch_delay: Duration::from_millis(50),
        retry_initial_backoff: Duration::from_millis(50),
        retry_max_backoff: Duration::from_millis(400),
        ..OtlpConfig::default()
    }
}

fn resource() -> ResourceInfo {
    ResourceInfo {
        host_name: Some("test-host".into()),
        k8s_node_name: Some("node-a".into()),
    }
}

/// A connection record whose remote port identifies it.
fn connection(id: u16) -> FlowRecord {
    FlowRecord {
        program: Program {
            exe: "/usr/bin/curl".into(),
            sha256: Sha256::from_hex(SHA256),
            parent: Some("/bin/bash".into()),
            uid: Some(1000),
            ..Program::default()
        },
        peer: Peer {
            transport: "tcp",
            local_port: Some(40_000 + id),
            remote_address: "192.0.2.10".parse().ok(),
            remote_port: Some(id),
            domain: Some("example.org".into()),
            ..Peer::default()
        },
        bytes: Bytes {
            sent: 100 * u64::from(id) + 1,
            received: 7 * u64::from(id) + 3,
        },
        ..FlowRecord::default()
    }
}

fn window(ids: impl IntoIterator<Item = u16>) -> Window {
    Window {
        start: WINDOW_START,
        seconds: 10,
        flows: ids.into_iter().map(connection).collect(),
        events: Vec::new(),
    }
}

fn delivers_records_with_their_attributes(protocol: OtlpProtocol) {
    let Some(binary) = rotel_agent() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (grpc_port, http_port) = (free_port(), free_port());
    let collector = Collector::start(&binary, dir.path(), "collector", grpc_port, http_port);
    let mut exporter = OtlpExporter::start(
        &config(protocol, endpoint(protocol, grpc_port, http_port), 100),
        &resource(),
    )
    .expect("exporter starts");

    let ipv6 = FlowRecord {
        program: Program {
            exe: "/usr/sbin/ntpd".into(),
            file: None,
            sha256: None,
            parent: Some("/sbin/init".into()),
            parent_sha256: Sha256::from_hex(&"ef".repeat(32)),
            parent_name: Some("systemd".into()),
            command_line: Some("ntpd -g \\xff".into()),
            parent_command_line: Some("/sbin/init splash".into()),
            uid: Some(0),
            user_name: Some("root".into()),
            comm: Some("ntpd".into()),
        },
        peer: Peer {
            transport: "udp",
            local_address: "2001:db8::1".parse().ok(),
            local_port: Some(123),
            remote_address: "2001:db8::7".parse().ok(),
            remote_port: Some(123),
            domain: None,
            country: Some("DE".into()),
            asn: Some(64_500),
        },
        workload: Workload {
            container_id: Some("0123456789abcdef".into()),
            container_name: Some("ntp".into()),
            pod: Some("ntp-7d9f".into()),
            namespace: Some("infra".into()),
        },
        bytes: Bytes {
            sent: 48,
            received: 96,
        },
    };
    let records = Window {
        start: WINDOW_START,
        seconds: 10,
        flows: vec![connection(443), ipv6],
        events: vec![
            Event {
                time: WINDOW_START + 3,
                kind: EventKind::NewExecutable,
                exe: Some("/tmp/new-tool".into()),
                sha256: Sha256::from_hex(SHA256),
                detail: None,
            },
            Event {
                time: WINDOW_START + 4,
                kind: EventKind::AgentError,
                exe: None,
                sha256: None,
                detail: Some("probe \"x\" failed: EPERM".into()),
            },
        ],
    };
    assert_eq!(exporter.export(&records), 0);
    wait_for(
        "4 records at the collector",
        Duration::from_secs(30),
        || collector.records().len() >= 4,
    );
    let received = collector.records();
    assert_eq!(received.len(), 4, "{received:#?}");

    for record in &received {
        assert_eq!(record.resource_str("service.name"), Some("fleetsnitch"));
        assert_eq!(
            record.resource_str("service.version"),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(record.resource_str("host.name"), Some("test-host"));
        assert_eq!(record.resource_str("k8s.node.name"), Some("node-a"));
    }

    let by_exe = |exe: &str| {
        received
            .iter()
            .find(|r| {
                r.event_name.as_deref() == Some("fleetsnitch.connection")
                    && r.str(attr::PROCESS_EXECUTABLE_PATH) == Some(exe)
            })
            .unwrap_or_else(|| panic!("no connection record of {exe}: {received:#?}"))
    };
    let curl = by_exe("/usr/bin/curl");
    assert_eq!(
        curl.timestamp.as_deref(),
        Some((WINDOW_START * 1_000_000_000).to_string().as_str())
    );
    assert_eq!(curl.severity_text.as_deref(), Some("INFO"));
    assert_eq!(curl.str(attr::PROCESS_EXECUTABLE_NAME), Some("curl"));
    assert_eq!(curl.str(attr::EXECUTABLE_SHA256), Some(SHA256));
    assert_eq!(curl.str(attr::PARENT_EXECUTABLE_PATH), Some("/bin/bash"));
    assert_eq!(curl.int(attr::PROCESS_REAL_USER_ID), Some(1000));
    assert_eq!(curl.str(attr::NETWORK_TRANSPORT), Some("tcp"));
    assert_eq!(curl.str(attr::NETWORK_TYPE), Some("ipv4"));
    assert_eq!(curl.str(attr::NETWORK_PEER_ADDRESS), Some("192.0.2.10"));
    assert_eq!(curl.int(attr::NETWORK_PEER_PORT), Some(443));
    assert_eq!(curl.int(attr::NETWORK_LOCAL_PORT), Some(40_443));
    assert_eq!(curl.str(attr::SERVER_ADDRESS), Some("example.org"));
    assert_eq!(curl.int(attr::BYTES_SENT), Some(44_301));
    assert_eq!(curl.int(attr::BYTES_RECEIVED), Some(3_104));
    assert_eq!(curl.int(attr::WINDOW_SECONDS), Some(10));
    assert_eq!(curl.str(attr::CONTAINER_ID), None);
    assert_eq!(
        curl.body.as_deref(),
        Some(
            "/usr/bin/curl tcp 192.0.2.10:443 (example.org): sent 44301 bytes, received 3104 bytes in 10 s"
        )
    );

    let ntpd = by_exe("/usr/sbin/ntpd");
    assert_eq!(ntpd.str(attr::NETWORK_TYPE), Some("ipv6"));
    assert_eq!(ntpd.str(attr::NETWORK_TRANSPORT), Some("udp"));
    assert_eq!(ntpd.str(attr::NETWORK_PEER_ADDRESS), Some("2001:db8::7"));
    assert_eq!(ntpd.int(attr::BYTES_SENT), Some(48));
    assert_eq!(ntpd.int(attr::BYTES_RECEIVED), Some(96));
    assert_eq!(ntpd.int(attr::PROCESS_REAL_USER_ID), Some(0));
    assert_eq!(ntpd.str(attr::PROCESS_REAL_USER_NAME), Some("root"));
    assert_eq!(ntpd.str(attr::PROCESS_COMM), Some("ntpd"));
    assert_eq!(ntpd.str(attr::PROCESS_COMMAND_LINE), Some("ntpd -g \\xff"));
    assert_eq!(ntpd.str(attr::PARENT_EXECUTABLE_PATH), Some("/sbin/init"));
    let parent_sha256 = "ef".repeat(32);
    assert_eq!(
        ntpd.str(attr::PARENT_EXECUTABLE_SHA256),
        Some(parent_sha256.as_str())
    );
    assert_eq!(ntpd.str(attr::PARENT_COMM), Some("systemd"));
    assert_eq!(
        ntpd.str(attr::PARENT_COMMAND_LINE),
        Some("/sbin/init splash")
    );
    assert_eq!(ntpd.str(attr::NETWORK_LOCAL_ADDRESS), Some("2001:db8::1"));
    assert_eq!(ntpd.str(attr::CONTAINER_ID), Some("0123456789abcdef"));
    assert_eq!(ntpd.str(attr::K8S_CONTAINER_NAME), Some("ntp"));
    assert_eq!(ntpd.str(attr::K8S_POD_NAME), Some("ntp-7d9f"));
    assert_eq!(ntpd.str(attr::K8S_NAMESPACE_NAME), Some("infra"));
    assert_eq!(ntpd.str(attr::GEO_COUNTRY_ISO_CODE), Some("DE"));
    assert_eq!(ntpd.int(attr::PEER_ASN), Some(64_500));
    assert_eq!(ntpd.str(attr::EXECUTABLE_SHA256), None);
    assert_eq!(ntpd.str(attr::SERVER_ADDRESS), None);

    let new = received
        .iter()
        .find(|r| r.event_name.as_deref() == Some("fleetsnitch.new_executable"))
        .expect("the new_executable event");
    assert_eq!(
        new.str(attr::PROCESS_EXECUTABLE_PATH),
        Some("/tmp/new-tool")
    );
    assert_eq!(new.str(attr::PROCESS_EXECUTABLE_NAME), Some("new-tool"));
    assert_eq!(new.str(attr::EXECUTABLE_SHA256), Some(SHA256));
    assert_eq!(new.str(attr::EVENT_KIND), Some("new_executable"));
    assert_eq!(new.severity_text.as_deref(), Some("WARN"));
    assert_eq!(
        new.timestamp.as_deref(),
        Some(((WINDOW_START + 3) * 1_000_000_000).to_string().as_str())
    );
    let error = received
        .iter()
        .find(|r| r.event_name.as_deref() == Some("fleetsnitch.agent_error"))
        .expect("the agent_error event");
    assert_eq!(error.severity_text.as_deref(), Some("ERROR"));
    assert_eq!(
        error.str(attr::EVENT_DETAIL),
        Some("probe \"x\" failed: EPERM")
    );

    let counters = exporter.counters();
    wait_for("exported_total = 4", Duration::from_secs(10), || {
        counters.exported_total() == 4
    });
    assert_eq!(counters.dropped_total(), 0);
    assert_eq!(counters.queued(), 0);
    exporter.shutdown(Duration::from_secs(5));
}

#[test]
fn grpc_delivers_records_with_their_attributes() {
    delivers_records_with_their_attributes(OtlpProtocol::Grpc);
}

#[test]
fn http_delivers_records_with_their_attributes() {
    delivers_records_with_their_attributes(OtlpProtocol::HttpProtobuf);
}

/// Remote ports (record ids) of the connection records a collector printed.
fn ids(records: &[Received]) -> Vec<u16> {
    records
        .iter()
        .filter_map(|record| record.int(attr::NETWORK_PEER_PORT))
        .map(|port| u16::try_from(port).unwrap())
        .collect()
}

fn survives_a_collector_outage(protocol: OtlpProtocol) {
    const BOUND: usize = 40;
    let Some(binary) = rotel_agent() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (grpc_port, http_port) = (free_port(), free_port());
    let mut first = Collector::start(&binary, dir.path(), "first", grpc_port, http_port);
    let mut exporter = OtlpExporter::start(
        &config(protocol, endpoint(protocol, grpc_port, http_port), BOUND),
        &resource(),
    )
    .expect("exporter starts");
    let counters = exporter.counters();
    let mut fed = 0u64;

    // Collector up: everything arrives.
    let phase1: Vec<u16> = (1..=20).collect();
    for chunk in phase1.chunks(10) {
        assert_eq!(exporter.export(&window(chunk.iter().copied())), 0);
        fed += chunk.len() as u64;
    }
    wait_for("phase 1 at the collector", Duration::from_secs(30), || {
        counters.exported_total() == 20 && first.records().len() == 20
    });
    first.stop();
    assert_eq!(counters.dropped_total(), 0);

    // Collector down: the queue keeps BOUND records, drops and counts the rest.
    let phase2: Vec<u16> = (101..=200).collect();
    for chunk in phase2.chunks(10) {
        exporter.export(&window(chunk.iter().copied()));
        fed += chunk.len() as u64;
        assert!(counters.queued() <= BOUND as u64, "queue above its bound");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for(
        "failed attempts while down",
        Duration::from_secs(30),
        || counters.export_errors_total() >= 2,
    );
    assert_eq!(counters.queued(), BOUND as u64);
    assert_eq!(counters.dropped_total(), (phase2.len() - BOUND) as u64);
    assert_eq!(counters.exported_total(), 20);

    // Collector back on the same ports: delivery resumes.
    let second = Collector::start(&binary, dir.path(), "second", grpc_port, http_port);
    wait_for("the kept records", Duration::from_secs(30), || {
        counters.exported_total() == 20 + BOUND as u64 && second.records().len() == BOUND
    });
    assert_eq!(counters.queued(), 0);
    let phase3: Vec<u16> = (301..=310).collect();
    exporter.export(&window(phase3.iter().copied()));
    fed += phase3.len() as u64;
    wait_for("phase 3 at the collector", Duration::from_secs(30), || {
        second.records().len() == BOUND + phase3.len()
    });
    exporter.shutdown(Duration::from_secs(5));

    let mut received = ids(&first.records());
    received.extend(ids(&second.records()));
    let unique: BTreeSet<u16> = received.iter().copied().collect();
    assert_eq!(unique.len(), received.len(), "a record arrived twice");
    let expected: BTreeSet<u16> = phase1
        .iter()
        .chain(&phase2[..BOUND])
        .chain(&phase3)
        .copied()
        .collect();
    assert_eq!(
        unique, expected,
        "the kept records are the first {BOUND} of the outage"
    );
    let received = received.len() as u64;
    assert_eq!(counters.exported_total(), received);
    assert_eq!(
        counters.dropped_total(),
        fed - received,
        "drops counted exactly"
    );
    assert_eq!(counters.dropped_total(), 60);
    assert_eq!(counters.queued(), 0);
}

#[test]
fn grpc_survives_a_collector_outage() {
    survives_a_collector_outage(OtlpProtocol::Grpc);
}

#[test]
fn http_survives_a_collector_outage() {
    survives_a_collector_outage(OtlpProtocol::HttpProtobuf);
}

/// Records still queued when the agent stops are dropped and counted, and
/// records handed over after that too; the caller is never held longer than the grace.
#[test]
fn shutdown_counts_what_it_could_not_deliver() {
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
        // Nothing listens there.
        let port = free_port();
        let mut exporter = OtlpExporter::start(
            &config(protocol, format!("http://127.0.0.1:{port}"), 100),
            &resource(),
        )
        .unwrap();
        let counters = exporter.counters();
        exporter.export(&window(1..=5));
        let start = Instant::now();
        exporter.shutdown(Duration::from_millis(300));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(counters.exported_total(), 0);
        assert_eq!(counters.dropped_total(), 5);
        assert_eq!(counters.queued(), 0);
        exporter.export(&window(6..=7));
        assert_eq!(counters.dropped_total(), 7);
    }
}

#[test]
fn export_never_waits_for_the_network() {
    // A blackholed collector: a listener that accepts nothing.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let exporter = OtlpExporter::start(
        &config(OtlpProtocol::Grpc, format!("http://127.0.0.1:{port}"), 1000),
        &resource(),
    )
    .unwrap();
    let start = Instant::now();
    for chunk in 0..100u16 {
        exporter.export(&window(chunk * 10..chunk * 10 + 10));
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "export() blocked: {:?}",
        start.elapsed()
    );
    assert_eq!(exporter.counters().dropped_total(), 0);
    assert_eq!(exporter.counters().queued(), 1000);
    drop(exporter);
}

#[test]
fn bad_configuration_is_refused_with_its_key() {
    let error = OtlpExporter::start(
        &OtlpConfig {
            endpoint: Some("http://127.0.0.1:4318".into()),
            tls: fleetsnitch::sinks::otlp::OtlpTlsConfig {
                ca_file: Some("/nonexistent/ca.pem".into()),
                ..Default::default()
            },
            ..OtlpConfig::default()
        },
        &resource(),
    )
    .unwrap_err();
    assert!(error.to_string().contains("otlp.tls"), "{error}");
    let error = OtlpExporter::start(
        &OtlpConfig {
            endpoint: Some("https://127.0.0.1:4318".into()),
            tls: fleetsnitch::sinks::otlp::OtlpTlsConfig {
                ca_file: Some("/nonexistent/ca.pem".into()),
                ..Default::default()
            },
            ..OtlpConfig::default()
        },
        &resource(),
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("otlp.tls.ca_file")
            && error.to_string().contains("/nonexistent/ca.pem"),
        "{error}"
    );
}
