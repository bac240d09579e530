//! Cardinality under control: 10,000 distinct remote ports and 2,000 distinct
//! domains in well under a minute leave every label under its cap, the
//! overflow counters account for every folded value exactly, and the agent's
//! memory stays bounded. Needs root (eBPF, namespaces); skips otherwise.

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    AgentGuard, NetnsPair, ProcessGuard, Testbed, process, query_journal, require_root,
};

const PORT_CAP: usize = 200;
const DOMAIN_CAP: usize = 500;
const PORTS: u32 = 10_000;
const FIRST_PORT: u16 = 1024;
const DOMAINS: u32 = 2_000;

/// Address the peer answers for `d<index>.test`: one per name.
fn address_of(index: u32) -> String {
    format!("198.18.{}.{}", 1 + index / 250, 1 + index % 250)
}

fn scrape(agent: &AgentGuard) -> Result<String> {
    Ok(fleetsnitch_e2e::metrics::http_get(agent.addr, "/metrics", Duration::from_secs(10))?.body)
}

/// Distinct values of `label` on `fleetsnitch_bytes_total`, without "other" and "".
fn admitted(text: &str, label: &str) -> Result<BTreeSet<String>> {
    Ok(
        fleetsnitch_e2e::parse_samples(text, "fleetsnitch_bytes_total")?
            .into_iter()
            .filter_map(|s| s.labels.get(label).cloned())
            .filter(|v| !v.is_empty() && v != "other")
            .collect(),
    )
}

fn overflow(text: &str, label: &str) -> Result<u64> {
    Ok(
        fleetsnitch_e2e::parse_samples(text, "fleetsnitch_label_overflow_total")?
            .into_iter()
            .filter(|s| s.labels.get("label").map(String::as_str) == Some(label))
            .map(|s| s.value as u64)
            .sum(),
    )
}

fn ip(net: &NetnsPair, namespace: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", namespace];
    full.extend_from_slice(args);
    process::run_checked(&process::ip_bin(), &full)
        .map_err(|e| e.context(format!("ip -n {namespace} {args:?} ({})", net.client)))
}

fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .context("no VmHWM")
}

#[test]
fn label_caps_hold_and_overflow_is_counted_exactly() -> Result<()> {
    require_root!("eBPF, network namespaces");
    ensure!(
        Path::new("/usr/sbin/dnsmasq").exists(),
        "dnsmasq missing: run scripts/setup.sh"
    );
    let setup = Testbed::setup("fsn-cardinality")?;
    // The namespaces without the peer services: the peer answers DNS through dnsmasq
    // and owns a whole /16.
    let net = NetnsPair::new()?;
    // The peer owns all of 198.18.0.0/16, so every name can get its own address.
    ip(
        &net,
        &net.peer,
        &["route", "add", "local", "198.18.0.0/16", "dev", "lo"],
    )?;
    ip(
        &net,
        &net.client,
        &["route", "add", "198.18.0.0/16", "via", "198.18.0.2"],
    )?;

    let hosts = setup.dir().join("hosts");
    let mut file = fs::File::create(&hosts)?;
    for index in 0..DOMAINS {
        writeln!(file, "{} d{index}.test", address_of(index))?;
    }
    drop(file);
    let addn_hosts = format!("--addn-hosts={}", hosts.display());
    let mut dnsmasq = net.in_peer(
        Path::new("/usr/sbin/dnsmasq"),
        &[
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            &addn_hosts,
            "--bind-interfaces",
            "--listen-address=198.18.0.2",
            "--port=53",
            "--pid-file=",
            "--user=root",
            "--cache-size=0",
        ],
    );
    dnsmasq
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _dnsmasq = ProcessGuard::spawn("dnsmasq", &mut dnsmasq, Duration::from_secs(5))?;

    let mut bed = setup
        .config(format!(
            "metrics:\n  bytes_labels: [remote_port, domain]\n  max_series: 100000\n  \
             label_caps: {{remote_port: {PORT_CAP}, domain: {DOMAIN_CAP}}}\n\
             journal:\n  record_ephemeral_ports: true\n"
        ))
        .start()?;
    let before = scrape(&bed.agent)?;
    let ports_before = admitted(&before, "remote_port")?;
    let domains_before = admitted(&before, "domain")?;

    let started = Instant::now();
    let ports_exe = bed.copy("sweep", "sweep-ports")?;
    let out = process::run_bounded(
        &mut net.in_client(
            &ports_exe,
            &[
                "ports",
                "--peer",
                "198.18.0.2",
                "--first",
                &FIRST_PORT.to_string(),
                "--count",
                &PORTS.to_string(),
            ],
        ),
        Duration::from_secs(60),
    )?;
    ensure!(out.status.success(), "sweep ports: {}", out.stderr);
    let domains_exe = bed.copy("sweep", "sweep-domains")?;
    // dnsmasq may need a moment to bind.
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = process::run_bounded(
            &mut net.in_client(
                &domains_exe,
                &[
                    "domains",
                    "--server",
                    "198.18.0.2",
                    "--suffix",
                    "test",
                    "--count",
                    &DOMAINS.to_string(),
                ],
            ),
            Duration::from_secs(60),
        )?;
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    ensure!(out.status.success(), "sweep domains: {}", out.stderr);
    let elapsed = started.elapsed();

    bed.metrics()
        .wait_for_bytes(&ports_exe, "sent", u64::from(PORTS))?;
    // Every datagram of the domain sweep (one per name) plus its queries.
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = scrape(&bed.agent)?;
        let seen = overflow(&text, "domain")? as usize + admitted(&text, "domain")?.len();
        if seen >= DOMAINS as usize || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(300));
    };

    // Every value the agent certainly saw: what it had before, the sweep, the
    // ports the sweeps themselves use (DNS, discard), and "ephemeral" for
    // dnsmasq's answers to the sweep's source ports.
    let mut ports_expected: BTreeSet<String> = ports_before.clone();
    ports_expected.extend((0..PORTS).map(|i| (u32::from(FIRST_PORT) + i).to_string()));
    ports_expected.extend(["53", "9", "ephemeral"].map(str::to_owned));
    let ports_now = admitted(&text, "remote_port")?;
    assert_eq!(ports_now.len(), PORT_CAP, "remote_port values exported");

    let mut domains_expected: BTreeSet<String> = domains_before.clone();
    domains_expected.extend((0..DOMAINS).map(|i| format!("d{i}.test")));
    let domains_now = admitted(&text, "domain")?;
    assert_eq!(
        domains_now.len(),
        DOMAIN_CAP,
        "domain values exported; DNS as the agent saw it: {}",
        text.lines()
            .filter(|l| l.starts_with("fleetsnitch_dns_"))
            .collect::<Vec<_>>()
            .join("; ")
    );

    let rss = peak_rss_kib(bed.agent.pid())?;
    eprintln!(
        "cardinality: {PORTS} ports and {DOMAINS} domains in {elapsed:?}; {} series; agent peak RSS {} KiB",
        fleetsnitch_e2e::parse_samples(&text, "fleetsnitch_bytes_series")?
            .first()
            .map_or(0.0, |s| s.value),
        rss
    );
    ensure!(
        elapsed < Duration::from_secs(60),
        "the sweeps took {elapsed:?}, not within a minute"
    );
    // A generous bound: what matters is that it does not grow with the values folded.
    assert!(rss < 256 * 1024, "peak RSS {rss} KiB");
    bed.agent.check_running()?;

    // Each folded value is counted once: admitted + folded is the number of
    // distinct values the agent saw. The host keeps talking while the test
    // runs (the CI runner, resolvers), so that number lies between what this
    // test sent and every value in the journal, which records each flow with
    // its raw port (ephemeral ones too, as configured above) and domain
    // (written in full at shutdown).
    bed.agent.signal(libc::SIGTERM);
    ensure!(
        bed.agent.wait_exit(Duration::from_secs(30))?.is_some(),
        "agent did not exit on SIGTERM"
    );
    let journal_ports: BTreeSet<String> = query_journal(
        bed.journal(),
        "SELECT DISTINCT remote_port FROM connections WHERE remote_port IS NOT NULL",
    )?
    .lines()
    .map(|port| match port.parse::<u16>() {
        Ok(p) if (32768..=60999).contains(&p) => "ephemeral".to_owned(),
        _ => port.to_owned(),
    })
    .collect();
    let journal_domains: BTreeSet<String> = query_journal(
        bed.journal(),
        "SELECT DISTINCT domain FROM connections WHERE domain IS NOT NULL AND domain != ''",
    )?
    .lines()
    .map(str::to_owned)
    .collect();
    for family in [
        "fleetsnitch_journal_dropped_total",
        "fleetsnitch_journal_write_errors_total",
    ] {
        let count: f64 = fleetsnitch_e2e::parse_samples(&text, family)?
            .iter()
            .map(|s| s.value)
            .sum();
        ensure!(
            count == 0.0,
            "{family} is {count}: the journal cannot bound the values seen"
        );
    }
    // A DNS answer the kernel could not hand over (its ring buffer full while the
    // collector lagged: a CPU-starved host) names no flow, and is counted: the
    // domains of this test missing from the journal are at most those losses.
    let answers_lost: f64 =
        fleetsnitch_e2e::parse_samples(&text, "fleetsnitch_dns_answers_lost_total")?
            .iter()
            .map(|s| s.value)
            .sum();
    for (label, sent, exported, journaled, cap, lost) in [
        (
            "remote_port",
            &ports_expected,
            &ports_now,
            &journal_ports,
            PORT_CAP,
            0.0,
        ),
        (
            "domain",
            &domains_expected,
            &domains_now,
            &journal_domains,
            DOMAIN_CAP,
            answers_lost,
        ),
    ] {
        let folded = overflow(&text, label)? as usize;
        let seen = cap + folded;
        let missing: Vec<&String> = sent.difference(journaled).collect();
        eprintln!(
            "{label}: {folded} folded; this test sent {} values, the journal holds {}, \
             {} missing, {lost} losses counted",
            sent.len(),
            journaled.len(),
            missing.len()
        );
        ensure!(
            missing.len() as f64 <= lost,
            "{label}: {} values sent but not journaled, {lost} losses counted: {:?}; \
             DNS as the agent saw it: {}",
            missing.len(),
            missing.iter().take(10).collect::<Vec<_>>(),
            text.lines()
                .filter(|l| l.starts_with("fleetsnitch_dns_"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        ensure!(
            exported.is_subset(journaled),
            "{label}: exported values the agent never saw: {:?}",
            exported.difference(journaled).take(10).collect::<Vec<_>>()
        );
        let least = sent.len() - missing.len();
        ensure!(
            (least..=journaled.len()).contains(&seen),
            "{label}: every folded value counted once: {cap} admitted + {folded} folded = \
             {seen}, expected between {least} (sent by this test and seen) and {} (journaled)",
            journaled.len()
        );
    }
    if overflow(&text, "domain")? == 0 {
        bail!("no domain was folded: the test did not exercise the cap");
    }
    Ok(())
}
