//! The agent's detail reaches a real OTLP collector (rotel), over gRPC and
//! over HTTP: a new executable's traffic to a peer arrives as connection
//! records carrying its path, hash, peer and exact byte counts, and the
//! journal's new_executable event arrives too. Needs root; skips otherwise.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use fleetsnitch_e2e::{
    TempDir, Testbed,
    otlp_collector::{Collector, Received, free_port, rotel_agent},
    require_root, run_client, sha256_file,
};

const BYTES: u64 = 25_000;

fn for_exe<'a>(records: &'a [Received], exe: &str) -> impl Iterator<Item = &'a Received> {
    records
        .iter()
        .filter(move |r| r.str("process.executable.path") == Some(exe))
}

fn delivers(protocol: &str) -> Result<()> {
    require_root!("eBPF, network namespaces");
    let Some(binary) = rotel_agent() else {
        return Ok(());
    };
    let collector_dir = TempDir::new("fsn-otlp-collector")?;
    let (grpc_port, http_port) = (free_port(), free_port());
    let collector = Collector::start(
        &binary,
        collector_dir.path(),
        "collector",
        grpc_port,
        http_port,
    );
    let port = if protocol == "grpc" {
        grpc_port
    } else {
        http_port
    };
    let bed = Testbed::setup("fsn-otlp")?
        .config(format!(
            "journal:\n  write_interval: 1s\n\
             otlp:\n  enabled: true\n  protocol: {protocol}\n  endpoint: http://127.0.0.1:{port}\n  batch_delay: 200ms\n"
        ))
        .peer()
        .start()?;

    let exe = bed.copy(
        "trafficgen",
        &format!("otlp-{}", protocol.replace('/', "-")),
    )?;
    let sha256 = sha256_file(&exe)?;
    run_client(
        bed.net(),
        &exe,
        "tcp_upload",
        &["--bytes", &BYTES.to_string()],
        Duration::from_secs(60),
    )?;
    bed.metrics().wait_for_bytes(&exe, "sent", BYTES)?;
    let path = exe.to_str().unwrap().to_owned();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = collector.records();
        let sent: i64 = for_exe(&records, &path)
            .filter(|r| r.int("network.peer.port") == Some(5001))
            .filter_map(|r| r.int("fleetsnitch.bytes.sent"))
            .sum();
        let announced = for_exe(&records, &path)
            .any(|r| r.str("fleetsnitch.event.kind") == Some("new_executable"));
        if sent == BYTES as i64 && announced {
            let connection = for_exe(&records, &path)
                .find(|r| r.int("network.peer.port") == Some(5001))
                .expect("a connection record");
            assert_eq!(
                connection.str("network.peer.address"),
                Some("198.18.0.2"),
                "{connection:?}"
            );
            assert_eq!(
                connection.str("network.transport"),
                Some("tcp"),
                "{connection:?}"
            );
            assert_eq!(
                connection.str("fleetsnitch.executable.sha256"),
                Some(sha256.as_str()),
                "{connection:?}"
            );
            let comm = connection
                .str("fleetsnitch.process.comm")
                .unwrap_or_default();
            assert!(
                !comm.is_empty() && path.rsplit('/').next().unwrap().starts_with(comm),
                "process name {comm:?}: {connection:?}"
            );
            assert_eq!(
                connection.resource_str("service.name"),
                Some("fleetsnitch"),
                "{connection:?}"
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{protocol}: collector got {sent} of {BYTES} bytes for {path}, new_executable event: {announced}\n{}",
                collector
                    .output()
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn records_reach_the_collector_over_grpc() -> Result<()> {
    delivers("grpc")
}

#[test]
fn records_reach_the_collector_over_http() -> Result<()> {
    delivers("http/protobuf")
}

#[test]
fn exported_and_dropped_are_counted() -> Result<()> {
    require_root!("eBPF");
    // A collector that does not exist: everything queues, then is dropped
    // past the bound, and the agent keeps running and counting.
    let bed = Testbed::setup("fsn-otlp-down")?
        .config(format!(
            "journal:\n  write_interval: 200ms\n\
             otlp:\n  enabled: true\n  protocol: grpc\n  endpoint: http://127.0.0.1:{}\n  max_queued_records: 1000\n",
            free_port()
        ))
        .start()?;
    let exe = bed.copy("trafficgen", "otlp-down")?;
    fleetsnitch_e2e::run_loopback(&exe, 10_000)?;
    bed.metrics().wait_for_bytes(&exe, "sent", 10_000)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = bed.metrics().text()?;
        let value = |name: &str| -> f64 {
            fleetsnitch_e2e::parse_samples(&text, name)
                .ok()
                .and_then(|s| s.first().map(|s| s.value))
                .unwrap_or(-1.0)
        };
        let (queued, errors) = (
            value("fleetsnitch_otlp_queued"),
            value("fleetsnitch_otlp_export_errors_total"),
        );
        if queued >= 1.0 && errors >= 1.0 {
            ensure!(
                value("fleetsnitch_otlp_exported_total") == 0.0,
                "nothing can have been exported"
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "queued {queued}, export errors {errors}:\n{}",
                bed.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
