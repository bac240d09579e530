//! Domains learnt from the DNS traffic itself: a real DNS server (dnsmasq) in
//! the peer namespace, three kinds of clients, and one address behind several
//! names. Needs root (eBPF, namespaces); skips otherwise.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{AgentGuard, ProcessGuard, Testbed, process, require_root};

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

#[test]
fn each_client_gets_the_domain_it_resolved() -> Result<()> {
    require_root!("eBPF, network namespaces");
    ensure!(
        Path::new(DNSMASQ).exists(),
        "{DNSMASQ} missing: run scripts/setup.sh"
    );
    let bed = Testbed::setup("fsn-domains")?
        .peer_with(&["--dns", "off"])
        .config("metrics:\n  bytes_labels: [domain, remote_port]\n")
        .start()?;
    let net = bed.net();
    // Three names for the one peer address.
    let mut dnsmasq = net.in_peer(
        Path::new(DNSMASQ),
        &[
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=198.18.0.2",
            "--port=53",
            "--host-record=alpha.test,198.18.0.2",
            "--host-record=beta.test,198.18.0.2",
            "--host-record=gamma.test,198.18.0.2",
            "--pid-file=",
            "--user=root",
            "--log-facility=-",
        ],
    );
    dnsmasq
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _dnsmasq = ProcessGuard::spawn("dnsmasq", &mut dnsmasq, Duration::from_secs(5))?;
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
        // dnsmasq may take a moment to bind: retry the first resolution briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let out = loop {
            let out = process::run_bounded(
                &mut net.in_client(
                    &exe,
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
            if out.status.success() || Instant::now() > deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        ensure!(
            out.status.success(),
            "dnsclient {mode} {name}: {}",
            out.stderr
        );
        ensure!(
            out.stdout.contains("\"address\":\"198.18.0.2\""),
            "{}",
            out.stdout
        );
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
