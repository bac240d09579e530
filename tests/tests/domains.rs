//! Domains learnt from the DNS traffic itself: a real DNS server (dnsmasq) in
//! the peer namespace, three kinds of clients, and one address behind several
//! names; and new destinations of a known program, journaled, exported over
//! OTLP to a real collector, counted, and alerted on by a real Prometheus.
//! Needs root (eBPF, namespaces).

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    AgentGuard, NetnsPair, ProcessGuard, TempDir, Testbed,
    otlp_collector::{Collector, free_port, rotel_agent},
    process, query_journal, require_root,
    servers::Prometheus,
    sha256_file, wait_until, workspace_root,
};

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` mounts over /etc/resolv.conf.
struct NetnsResolvConf(PathBuf);

impl NetnsResolvConf {
    fn new(namespace: &str, nameserver: &str) -> Result<Self> {
        let dir = Path::new("/etc/netns").join(namespace);
        fs::create_dir_all(&dir)?;
        fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\noptions attempts:1\n"),
        )?;
        Ok(Self(dir))
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Bytes reported for `exe` in `direction` with the given extra labels.
fn bytes_with(
    agent: &AgentGuard,
    exe: &Path,
    direction: &str,
    labels: &[(&str, &str)],
) -> Result<f64> {
    Ok(agent
        .metrics()
        .samples_for("fleetsnitch_bytes_total", exe, Some(direction))?
        .iter()
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum())
}

fn series_of(agent: &AgentGuard, exe: &Path) -> String {
    fleetsnitch_e2e::metrics::http_get(agent.addr, "/metrics", Duration::from_secs(5))
        .map(|r| {
            r.body
                .lines()
                .filter(|l| l.contains(exe.to_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// dnsmasq in the peer namespace, answering each of `names` with the peer's
/// address (198.18.0.2), and nothing else.
fn dnsmasq(net: &NetnsPair, names: &[&str]) -> Result<ProcessGuard> {
    ensure!(
        Path::new(DNSMASQ).exists(),
        "{DNSMASQ} missing: run scripts/setup.sh"
    );
    let records: Vec<String> = names
        .iter()
        .map(|name| format!("--host-record={name},198.18.0.2"))
        .collect();
    let mut args = vec![
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=198.18.0.2",
        "--port=53",
        "--pid-file=",
        "--user=root",
        "--log-facility=-",
    ];
    args.extend(records.iter().map(String::as_str));
    let mut command = net.in_peer(Path::new(DNSMASQ), &args);
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    ProcessGuard::spawn("dnsmasq", &mut command, Duration::from_secs(5))
}

/// `dnsclient <mode> <name>` (a copy of it, `exe`) in the client namespace:
/// resolves `name` at the peer's dnsmasq, then sends `bytes` to the answer's
/// port 5001; returns what it printed. dnsmasq may take a moment to bind:
/// the first resolution is retried briefly.
fn resolve_and_send(
    net: &NetnsPair,
    exe: &Path,
    mode: &str,
    name: &str,
    bytes: u64,
) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = process::run_bounded(
            &mut net.in_client(
                exe,
                &[
                    mode,
                    name,
                    "--server",
                    "198.18.0.2",
                    "--port",
                    "5001",
                    "--bytes",
                    &bytes.to_string(),
                ],
            ),
            Duration::from_secs(30),
        )?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        if Instant::now() > deadline {
            bail!("dnsclient {mode} {name}: {}", out.stderr);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn each_client_gets_the_domain_it_resolved() -> Result<()> {
    require_root!("eBPF, network namespaces");
    let bed = Testbed::setup("fsn-domains")?
        .peer_with(&["--dns", "off"])
        .config("metrics:\n  bytes_labels: [domain, remote_port]\n")
        .start()?;
    let net = bed.net();
    // Three names for the one peer address.
    let _dnsmasq = dnsmasq(net, &["alpha.test", "beta.test", "gamma.test"])?;
    let _resolv = NetnsResolvConf::new(&net.client, "198.18.0.2")?;
    let agent = &bed.agent;

    let cases = [
        ("getaddrinfo", "alpha.test", 30_000u64),
        ("udp", "beta.test", 20_000),
        ("tcp", "gamma.test", 10_000),
    ];
    let mut runs = Vec::new();
    for (mode, name, bytes) in cases {
        let exe = bed.copy("dnsclient", &format!("dns-{mode}"))?;
        let stdout = resolve_and_send(net, &exe, mode, name, bytes)?;
        ensure!(stdout.contains("\"address\":\"198.18.0.2\""), "{stdout}");
        runs.push((exe, name, bytes));
    }

    for (exe, name, bytes) in &runs {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reported = bytes_with(
                agent,
                exe,
                "sent",
                &[("domain", name), ("remote_port", "5001")],
            )?;
            if reported as u64 == *bytes {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: expected {bytes} bytes with domain={name}, remote_port=5001; reported {reported}; series:\n{}\nagent log:\n{}",
                    exe.display(),
                    series_of(agent, exe),
                    agent.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // No other program's name leaks onto a client's traffic to the shared address.
    for (exe, name, _) in &runs {
        for (_, other, _) in runs.iter().filter(|(_, other, _)| other != name) {
            let leaked = bytes_with(agent, exe, "sent", &[("domain", other)])?;
            assert_eq!(leaked, 0.0, "{} got {other}'s domain", exe.display());
        }
    }
    Ok(())
}

#[test]
fn no_answer_means_no_domain() -> Result<()> {
    require_root!("eBPF, network namespaces");
    let bed = Testbed::setup("fsn-nodomain")?
        .peer()
        .config("metrics:\n  bytes_labels: [domain]\n")
        .start()?;
    let agent = &bed.agent;
    let exe = bed.copy("trafficgen", "by-address")?;
    let out = process::run_bounded(
        &mut bed
            .net()
            .in_client(&exe, &["client", "tcp_upload", "--bytes", "5000"]),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "{}", out.stderr);
    agent
        .metrics()
        .wait_for_bytes(&exe, "sent", 5_000)
        .context("bytes never showed up")?;
    assert_eq!(
        bytes_with(agent, &exe, "sent", &[("domain", "")])?,
        5000.0,
        "{}",
        series_of(agent, &exe)
    );
    Ok(())
}

/// A program known for longer than its learning period that resolves a name
/// it never resolved here: one new-destination event per new name (none for
/// the name it used while learning, none for a name seen twice), in the
/// journal, over OTLP, in `fleetsnitch_new_destinations_total`, and
/// `FleetsnitchNewDestination` fires in a real Prometheus with the shipped
/// rules (its `increase()` half: the second new name; the first event of a
/// series is promtool's to check, as it needs 10 minutes of scrapes).
#[test]
fn a_known_program_talking_to_a_new_domain_raises_a_new_destination() -> Result<()> {
    require_root!("eBPF, network namespaces");
    const LEARNING_SECONDS: i64 = 4;
    let Some(rotel) = rotel_agent() else {
        return Ok(());
    };
    let collector_dir = TempDir::new("fsn-destinations-collector")?;
    let (grpc_port, http_port) = (free_port(), free_port());
    let collector = Collector::start(
        &rotel,
        collector_dir.path(),
        "collector",
        grpc_port,
        http_port,
    );
    let agent_addr = std::net::SocketAddr::from((
        std::net::Ipv4Addr::LOCALHOST,
        fleetsnitch_e2e::agent::free_port()?,
    ));
    let rules = workspace_root().join("helm/fleetsnitch/rules/fleetsnitch.rules.yml");
    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: fleetsnitch\n    static_configs:\n      \
         - targets: ['{agent_addr}']\n",
        rules.display()
    ))?;
    let bed = Testbed::setup("fsn-destinations")?
        .peer_with(&["--dns", "off"])
        .config(format!(
            "journal:\n  write_interval: 200ms\n  destination_learning_period: {LEARNING_SECONDS}s\n\
             otlp:\n  enabled: true\n  protocol: grpc\n  endpoint: http://127.0.0.1:{grpc_port}\n  batch_delay: 200ms\n"
        ))
        .listen(agent_addr)
        .start()?;
    let net = bed.net();
    let _dnsmasq = dnsmasq(net, &["alpha.test", "beta.test", "gamma.test"])?;
    let journal = bed.journal().to_owned();
    let exe = bed.copy("dnsclient", "destinations")?;
    let sha256 = sha256_file(&exe)?;
    let path = exe.to_str().context("path")?.to_owned();
    let rows = |sql: &str| query_journal(&journal, sql);

    // Learning: the program is new; alpha.test goes into the baseline.
    resolve_and_send(net, &exe, "udp", "alpha.test", 1_000)?;
    wait_until(
        Duration::from_secs(30),
        "alpha.test in the destination baseline",
        || {
            Ok(rows(&format!(
                "SELECT count(*) FROM destinations WHERE sha256 = '{sha256}' \
                 AND kind = 'domain' AND value = 'alpha.test'"
            ))? == "1")
        },
    )
    .with_context(|| format!("agent log:\n{}", bed.log_tail(30)))?;
    let first_seen: i64 = rows(&format!(
        "SELECT min(first_seen) FROM executables WHERE sha256 = '{sha256}'"
    ))?
    .parse()
    .context("first_seen")?;
    let learned_at = first_seen + LEARNING_SECONDS + 1;
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    };
    while unix_now() < learned_at {
        std::thread::sleep(Duration::from_millis(200));
    }

    // Learned: alpha.test again is known; beta.test is new (once), then
    // gamma.test, once Prometheus holds the counter at 1.
    resolve_and_send(net, &exe, "udp", "alpha.test", 1_000)?;
    resolve_and_send(net, &exe, "udp", "beta.test", 1_000)?;
    resolve_and_send(net, &exe, "udp", "beta.test", 1_000)?;
    let counter = format!("fleetsnitch_new_destinations_total{{exe=\"{path}\",kind=\"domain\"}}");
    let counted = |value: &str| -> Result<bool> {
        Ok(prometheus
            .query(&counter)?
            .iter()
            .any(|s| s["value"][1] == value))
    };
    wait_until(
        Duration::from_secs(30),
        "the counter at 1 in Prometheus",
        || counted("1"),
    )
    .with_context(|| format!("agent log:\n{}", bed.log_tail(30)))?;
    resolve_and_send(net, &exe, "udp", "gamma.test", 1_000)?;
    wait_until(
        Duration::from_secs(30),
        "the counter at 2 in Prometheus",
        || counted("2"),
    )?;

    let events = rows(&format!(
        "SELECT detail FROM events WHERE kind = 'new_destination' AND exe = '{path}' \
         AND sha256 = '{sha256}' ORDER BY id"
    ))?;
    assert_eq!(
        events, "domain beta.test\ndomain gamma.test",
        "journal events"
    );
    // With its context: the build, and who first ran it here (this test, as root).
    let firing = |prometheus: &Prometheus| -> Result<bool> {
        Ok(!prometheus
            .query(&format!(
                "ALERTS{{alertname=\"FleetsnitchNewDestination\",alertstate=\"firing\",exe=\"{path}\",\
                 kind=\"domain\",sha256=\"{sha256}\",user=\"root\"}}"
            ))?
            .is_empty())
    };
    wait_until(
        Duration::from_secs(30),
        "FleetsnitchNewDestination firing",
        || firing(&prometheus),
    )
    .with_context(|| format!("prometheus log:\n{}", prometheus.log_tail(20)))?;

    let mut exported = Vec::new();
    wait_until(Duration::from_secs(30), "both events over OTLP", || {
        exported = collector
            .records()
            .into_iter()
            .filter(|r| r.str("fleetsnitch.event.kind") == Some("new_destination"))
            .filter(|r| r.str("process.executable.path") == Some(path.as_str()))
            .filter_map(|r| r.str("fleetsnitch.event.detail").map(str::to_owned))
            .collect();
        Ok(exported.len() >= 2)
    })
    .with_context(|| format!("collector output:\n{}", collector.output()))?;
    exported.sort();
    assert_eq!(exported, ["domain beta.test", "domain gamma.test"]);
    Ok(())
}
