//! Country and ASN on real traffic: the agent with the GeoLite2 fixtures
//! (exporter/tests/data, which map the test peers' 198.18.0.0/15 to NL and
//! AS 64511). Needs root (eBPF, namespaces); skips otherwise.

use std::time::Duration;

use anyhow::{Result, ensure};
use fleetsnitch_e2e::{Testbed, agent_binary, process, require_root, workspace_root, write_config};

#[test]
fn traffic_carries_the_peers_country_and_asn() -> Result<()> {
    require_root!("eBPF, network namespaces");
    let data = workspace_root().join("exporter/tests/data");
    let bed = Testbed::setup("fsn-geoip")?
        .config(format!(
            "metrics:\n  bytes_labels: [country, asn]\ngeoip:\n  country_database: {}\n  asn_database: {}\n",
            data.join("GeoLite2-Country.mmdb").display(),
            data.join("GeoLite2-ASN.mmdb").display()
        ))
        .peer()
        .start()?;

    let exe = bed.copy("trafficgen", "geo")?;
    let out = process::run_bounded(
        &mut bed
            .net()
            .in_client(&exe, &["client", "tcp_upload", "--bytes", "40000"]),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "{}", out.stderr);
    bed.metrics().wait_for_bytes(&exe, "sent", 40_000)?;

    let sent = bed
        .metrics()
        .samples_for("fleetsnitch_bytes_total", &exe, Some("sent"))?;
    ensure!(sent.len() == 1, "one series expected: {sent:?}");
    assert_eq!(
        sent[0].labels.get("country").map(String::as_str),
        Some("NL"),
        "{sent:?}"
    );
    assert_eq!(
        sent[0].labels.get("asn").map(String::as_str),
        Some("64511"),
        "{sent:?}"
    );
    assert_eq!(sent[0].value, 40_000.0);
    Ok(())
}

#[test]
fn unreadable_database_stops_the_agent_naming_the_file() -> Result<()> {
    require_root!("the agent checks capabilities first");
    let dir = fleetsnitch_e2e::TempDir::new("fsn-geoip-bad")?;
    let config = write_config(
        dir.path(),
        "geoip:\n  country_database: /nonexistent/GeoLite2-Country.mmdb\n",
    )?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?.to_string();
    drop(listener);
    let out = process::run_bounded(
        std::process::Command::new(agent_binary()?).args([
            "--config.file",
            config.to_str().unwrap(),
            "--web.listen-address",
            &address,
            "--journal.path",
            dir.path().join("j.db").to_str().unwrap(),
        ]),
        Duration::from_secs(30),
    )?;
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("/nonexistent/GeoLite2-Country.mmdb"),
        "{}",
        out.stderr
    );
    Ok(())
}
