//! New-program alerts end to end: the agent, a real Prometheus evaluating the
//! shipped rules, a real Alertmanager posting to a webhook on loopback.
//! Needs root (eBPF, network namespaces); skips otherwise.

use std::{
    fs,
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fleetsnitch_e2e::{
    Testbed,
    agent::free_port,
    random_suffix, require_root, run_client,
    servers::{Alertmanager, Notification, Prometheus, Webhook},
    sha256_file, workspace_root,
};

const HOST: &str = "alerting-test-host";

fn prometheus_config(agent: SocketAddr, alertmanager: SocketAddr) -> String {
    let rules = workspace_root().join("helm/fleetsnitch/rules/fleetsnitch.rules.yml");
    format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{alertmanager}']\n\
         scrape_configs:\n  - job_name: fleetsnitch\n    static_configs:\n      \
         - targets: ['{agent}']\n        labels:\n          host: {HOST}\n",
        rules.display()
    )
}

/// Firing `FleetsnitchNewExecutable` alerts for `exe` among `notifications`.
fn new_executable_alerts(
    notifications: &[Notification],
    exe: &Path,
    after: Instant,
) -> Vec<serde_json::Value> {
    notifications
        .iter()
        .filter(|n| n.received >= after)
        .flat_map(|n| n.alerts("firing"))
        .filter(|alert| {
            alert["labels"]["alertname"] == "FleetsnitchNewExecutable"
                && alert["labels"]["exe"].as_str() == exe.to_str()
        })
        .collect()
}

fn wait_for_alert(
    webhook: &Webhook,
    exe: &Path,
    after: Instant,
    prometheus: &Prometheus,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(alert) = new_executable_alerts(&webhook.notifications(), exe, after).pop() {
            return Ok(alert);
        }
        if Instant::now() > deadline {
            bail!(
                "no FleetsnitchNewExecutable alert for {} within 90 s; received: {:#?}\nprometheus log:\n{}",
                exe.display(),
                webhook
                    .notifications()
                    .iter()
                    .map(|n| &n.body)
                    .collect::<Vec<_>>(),
                prometheus.log_tail(20)
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn new_program_alerts_once_and_a_modified_copy_alerts_again() -> Result<()> {
    require_root!("eBPF, network namespaces");
    let agent_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let webhook = Webhook::start()?;
    let alertmanager = Alertmanager::start(webhook.addr)?;
    let prometheus = Prometheus::start(&prometheus_config(agent_addr, alertmanager.addr))?;
    let mut bed = Testbed::setup("fsn-alerting")?
        .config("journal:\n  write_interval: 1s\n")
        .listen(agent_addr)
        .peer()
        .start()?;

    // A program this host has never seen talks to a peer.
    let novel = bed.copy("trafficgen", "novel")?;
    let novel_sha = sha256_file(&novel)?;
    let started = Instant::now();
    run_client(
        bed.net(),
        &novel,
        "tcp_upload",
        &["--bytes", "20000"],
        Duration::from_secs(60),
    )?;
    let alert = wait_for_alert(&webhook, &novel, started, &prometheus)?;
    assert_eq!(alert["labels"]["sha256"], novel_sha.as_str(), "{alert:#}");
    assert_eq!(alert["labels"]["host"], HOST, "{alert:#}");
    assert_eq!(
        alert["labels"]["instance"],
        agent_addr.to_string().as_str(),
        "{alert:#}"
    );
    eprintln!("first alert after {:?}", started.elapsed());

    // Restart the agent on the same journal: the program is known now.
    bed.agent.signal(libc::SIGTERM);
    bed.agent
        .wait_exit(Duration::from_secs(20))?
        .context("agent did not stop")?;
    let restarted = Instant::now();
    bed.restart()?;
    run_client(
        bed.net(),
        &novel,
        "tcp_upload",
        &["--bytes", "20000"],
        Duration::from_secs(60),
    )?;
    bed.metrics().wait_for_bytes(&novel, "sent", 20_000)?;
    // Wait until Prometheus has scraped the restarted agent's view of it...
    let selector = format!(
        "fleetsnitch_executable_first_seen_timestamp_seconds{{exe=\"{}\"}} < on(instance) group_left() fleetsnitch_start_time_seconds",
        novel.display()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus.query(&selector)?.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "Prometheus never saw the restarted agent report {}",
                novel.display()
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
    // ...and give rules and Alertmanager several rounds to (wrongly) alert.
    thread::sleep(Duration::from_secs(8));
    let again = new_executable_alerts(&webhook.notifications(), &novel, restarted);
    assert!(again.is_empty(), "alerted again after restart: {again:#?}");
    let firing = prometheus.query(&format!(
        "ALERTS{{alertname=\"FleetsnitchNewExecutable\",alertstate=\"firing\",exe=\"{}\"}}",
        novel.display()
    ))?;
    assert!(firing.is_empty(), "still firing after restart: {firing:?}");

    // A modified copy is a different program: it alerts.
    let modified = bed
        .dir()
        .join(format!("novel-modified-{}", random_suffix()));
    let mut content = fs::read(&novel)?;
    content.extend_from_slice(b"\0modified");
    fs::File::create(&modified)?.write_all(&content)?;
    fs::set_permissions(&modified, fs::Permissions::from_mode(0o755))?;
    let modified_sha = sha256_file(&modified)?;
    let before_modified = Instant::now();
    run_client(
        bed.net(),
        &modified,
        "tcp_upload",
        &["--bytes", "20000"],
        Duration::from_secs(60),
    )?;
    let alert = wait_for_alert(&webhook, &modified, before_modified, &prometheus)?;
    assert_eq!(
        alert["labels"]["sha256"],
        modified_sha.as_str(),
        "{alert:#}"
    );
    assert_eq!(alert["labels"]["host"], HOST, "{alert:#}");
    Ok(())
}
