//! Every PromQL expression of the shipped Grafana dashboards (`grafana-dashboards/`) and
//! every expression of the shipped alerting rules, evaluated by a real Prometheus
//! scraping a real agent: each must parse, and each dashboard expression must return at
//! least one series. The incidents some panels show (a VirusTotal detection, an
//! executable modified in place, a new executable) are caused by the test: a fake
//! VirusTotal API on loopback flags every file, a watched executable is written to,
//! and the journal starts empty. The health rules' incidents (lost events, full
//! maps, hash failures, missing probes, journal errors, a stalled drain, an agent
//! down, a new hash for a known path) are caused by
//! `every_health_rule_fires_when_its_incident_is_caused`.
//! Needs root (eBPF, network namespaces); skips otherwise.

use std::{
    collections::BTreeSet,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    TempDir, Testbed,
    agent::free_port,
    dashboards::{Expr, expressions_of},
    process, query_journal, require_root, run_client, run_loopback,
    servers::{Prometheus, rules_at_global_interval},
    skip, wait_until, workspace_root,
};

const HOST: &str = "dashboards-test-host";

/// Every expression of every dashboard file: panel targets (rows included),
/// annotations and template-variable queries.
fn dashboard_expressions() -> Result<Vec<Expr>> {
    let dir = workspace_root().join("grafana-dashboards");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    if files.len() < 3 {
        bail!(
            "expected three dashboards in {}, found {files:?}",
            dir.display()
        );
    }
    let mut out = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let dashboard: serde_json::Value = serde_json::from_str(&fs::read_to_string(&file)?)
            .with_context(|| format!("parse {}", file.display()))?;
        check_structure(&name, &dashboard)?;
        out.extend(expressions_of(&name, &dashboard)?);
    }
    Ok(out)
}

/// What makes a dashboard provisionable and usable as the issue asks.
fn check_structure(name: &str, d: &serde_json::Value) -> Result<()> {
    let uid = d["uid"].as_str().unwrap_or("");
    if uid.is_empty() || uid.len() > 40 {
        bail!("{name}: uid missing or longer than 40 characters");
    }
    if d["schemaVersion"].as_u64().unwrap_or(0) < 36 {
        bail!("{name}: schemaVersion {} is old", d["schemaVersion"]);
    }
    let vars = d["templating"]["list"].as_array().context("no variables")?;
    let has = |n: &str| vars.iter().any(|v| v["name"] == n);
    let ds = vars.iter().find(|v| v["name"] == "datasource");
    if !ds.is_some_and(|v| v["type"] == "datasource" && v["query"] == "prometheus") {
        bail!("{name}: no datasource variable of type prometheus");
    }
    for v in ["host", "instance", "namespace"] {
        if !has(v) {
            bail!("{name}: no `{v}` variable");
        }
    }
    let mut ids = BTreeSet::new();
    let mut stack: Vec<&serde_json::Value> = d["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        if !ids.insert(p["id"].as_u64().context("panel without id")?) {
            bail!("{name}: duplicate panel id {}", p["id"]);
        }
        if p["type"] != "row" && p["datasource"]["uid"] != "${datasource}" {
            bail!("{name}: panel {} does not use ${{datasource}}", p["title"]);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            if t["datasource"]["uid"] != "${datasource}" {
                bail!(
                    "{name}: a target of {} does not use ${{datasource}}",
                    p["title"]
                );
            }
        }
        stack.extend(p["panels"].as_array().into_iter().flatten());
    }
    Ok(())
}

/// Every `expr` of the shipped rules file (block scalars included).
fn rule_expressions() -> Result<Vec<Expr>> {
    let path = workspace_root().join("helm/fleetsnitch/rules/fleetsnitch.rules.yml");
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut out = Vec::new();
    let mut alert = String::from("?");
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            alert = name.trim().to_owned();
        } else if let Some(name) = trimmed.strip_prefix("- record:") {
            alert = name.trim().to_owned();
        } else if let Some(rest) = trimmed.strip_prefix("expr:") {
            let indent = line.len() - trimmed.len();
            let rest = rest.trim();
            let promql = if rest.starts_with('|') || rest.starts_with('>') {
                let mut body = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    body.push(next.trim());
                    i += 1;
                }
                body.join("\n")
            } else {
                rest.to_owned()
            };
            out.push(Expr {
                place: format!("rule {alert}"),
                promql,
                instant: true,
                label: None,
            });
        }
        i += 1;
    }
    if out.len() < 10 {
        bail!(
            "only {} rule expressions found in {}",
            out.len(),
            path.display()
        );
    }
    Ok(out)
}

/// A VirusTotal API stand-in: every `GET /files/{sha256}` answers that 3 engines flag
/// the file. Runs until the process exits.
fn fake_virustotal() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let body = r#"{"data":{"attributes":{"last_analysis_stats":{"malicious":3,"suspicious":0,"harmless":0,"undetected":60}}}}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(addr)
}

fn prometheus_config(agent: SocketAddr, rules: &Path) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: fleetsnitch\n    static_configs:\n      \
         - targets: ['{agent}']\n        labels:\n          host: {HOST}\n",
        rules.display()
    )
}

fn agent_config(virustotal: SocketAddr, dir: &Path) -> String {
    format!(
        "journal:\n  write_interval: 1s\n\
         virustotal:\n  api_key: test-key\n  base_url: http://{virustotal}/api/v3\n  request_interval: 50ms\n  timeout: 5s\n\
         metrics:\n  bytes_labels: [parent, user, uid, remote_port, transport, domain, country, asn, container_id, container_name, pod, namespace, sha256]\n\
         connection_log:\n  enabled: true\n  path: {}\n",
        dir.join("connections.jsonl").display()
    )
}

/// Polls every expression until each returns a series (bounded); returns the ones
/// that never did, with the last error or "no series".
fn wait_for_series(
    prometheus: &Prometheus,
    exprs: &[Expr],
    bound: Duration,
) -> Result<Vec<(Expr, String)>> {
    let deadline = Instant::now() + bound;
    let mut pending: Vec<Expr> = exprs.to_vec();
    let mut last = Vec::new();
    loop {
        last.clear();
        for expr in &pending {
            match prometheus.query(&expr.promql) {
                Ok(result) if !result.is_empty() => {}
                Ok(_) => last.push((expr.clone(), "no series".to_owned())),
                Err(e) => last.push((expr.clone(), format!("{e:#}"))),
            }
        }
        pending = last.iter().map(|(e, _)| e.clone()).collect();
        if pending.is_empty() || Instant::now() > deadline {
            return Ok(last);
        }
        thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn dashboard_and_rule_expressions_parse() -> Result<()> {
    // Needs no agent: only a Prometheus without targets, to parse.
    let dashboards = dashboard_expressions()?;
    let rules = rule_expressions()?;
    if skip::program("prometheus", "Debian package prometheus")?.is_none() {
        return Ok(());
    }
    let prometheus = Prometheus::start("global:\n  scrape_interval: 1m\n")?;
    let mut failures = Vec::new();
    for expr in dashboards.iter().chain(&rules) {
        if let Err(e) = prometheus.query(&expr.promql) {
            failures.push(format!("{}: {e:#}", expr.place));
        }
    }
    assert!(
        failures.is_empty(),
        "expressions Prometheus rejects:\n{}",
        failures.join("\n")
    );
    eprintln!(
        "{} dashboard and {} rule expressions parse",
        dashboards.len(),
        rules.len()
    );
    Ok(())
}

/// Rules whose incidents `every_dashboard_expression_returns_series_from_a_real_agent`
/// causes; `every_health_rule_fires_when_its_incident_is_caused` causes the rest.
const CAUSED_WITH_THE_DASHBOARDS: [&str; 3] = [
    "rule FleetsnitchNewExecutable",
    "rule FleetsnitchExecutableModified",
    "rule FleetsnitchVirusTotalDetection",
];

#[test]
fn every_dashboard_expression_returns_series_from_a_real_agent() -> Result<()> {
    require_root!("eBPF, network namespaces");
    let exprs = dashboard_expressions()?;
    let rules = rule_expressions()?;
    let setup = Testbed::setup("fsn-dashboards")?;
    let virustotal = fake_virustotal()?;
    let config = agent_config(virustotal, setup.dir());
    let agent_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let rules_dir = TempDir::new("fsn-dashboards-rules")?;
    let rules_file = rules_at_global_interval(rules_dir.path())?;
    let prometheus = Prometheus::start(&prometheus_config(agent_addr, &rules_file))?;
    let mut bed = setup.config(config).listen(agent_addr).peer().start()?;

    // Traffic, so that bytes series exist for a fresh program (a new executable).
    let client = bed.copy("trafficgen", "dash-client")?;
    // The upload's 50,000 bytes and the download's 8-byte request.
    let mut sent = 0;
    for scenario in ["tcp_upload", "tcp_download"] {
        sent += run_client(
            bed.net(),
            &client,
            scenario,
            &["--bytes", "50000"],
            Duration::from_secs(60),
        )?
        .sent;
    }
    bed.metrics()
        .wait_for_bytes(&client, "sent", sent)
        .context("client bytes never showed in /metrics")?;

    // Incident: a watched executable written to in place (once it has been hashed).
    let info = format!(
        "fleetsnitch_executable_info{{exe=\"{}\",sha256!=\"unavailable\"}}",
        client.display()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus.query(&info)?.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "{} was never hashed: {}",
                client.display(),
                bed.log_tail(30)
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
    fs::OpenOptions::new()
        .append(true)
        .open(&client)?
        .write_all(b"\0modified in place")?;
    // More traffic after the modification, for rates over the last minute.
    run_client(
        bed.net(),
        &client,
        "tcp_upload",
        &["--bytes", "50000"],
        Duration::from_secs(60),
    )?;

    let missing = wait_for_series(&prometheus, &exprs, Duration::from_secs(120))?;
    bed.agent.check_running()?;
    assert!(
        missing.is_empty(),
        "dashboard expressions without series:\n{}\nprometheus log:\n{}",
        missing
            .iter()
            .map(|(e, why)| format!("{}: {why}\n    {}", e.place, e.promql))
            .collect::<Vec<_>>()
            .join("\n"),
        prometheus.log_tail(20)
    );
    eprintln!("{} dashboard expressions returned series", exprs.len());

    // Rules: every one parses; the incidents this test causes make theirs fire.
    let caused: Vec<Expr> = rules
        .iter()
        .filter(|e| CAUSED_WITH_THE_DASHBOARDS.contains(&e.place.as_str()))
        .cloned()
        .collect();
    assert_eq!(
        caused.len(),
        CAUSED_WITH_THE_DASHBOARDS.len(),
        "rules renamed? {rules:#?}"
    );
    let missing = wait_for_series(&prometheus, &caused, Duration::from_secs(30))?;
    assert!(
        missing.is_empty(),
        "caused incidents not seen: {missing:#?}"
    );
    for rule in &rules {
        let result = prometheus
            .query(&rule.promql)
            .with_context(|| rule.place.clone())?;
        eprintln!("{}: {} series", rule.place, result.len());
    }
    Ok(())
}

/// Runs a copy of `sweep` in this namespace; fails with its stderr.
fn run_sweep(exe: &Path, args: &[&str]) -> Result<()> {
    let out = process::run_bounded(Command::new(exe).args(args), Duration::from_secs(60))?;
    ensure!(
        out.status.success(),
        "{} {args:?}: {}",
        exe.display(),
        out.stderr
    );
    Ok(())
}

/// A size-limited tmpfs mounted for the test, lazily unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let options = format!("size={size},mode=0700");
        let target = dir.to_str().context("non-UTF-8 temporary path")?;
        process::run_checked(
            Path::new("mount"),
            &["-t", "tmpfs", "-o", &options, "tmpfs", target],
        )?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Writes zeros until the file system refuses more (ENOSPC).
    fn fill(&self) -> Result<()> {
        let mut filler = fs::File::create(self.dir.join("filler"))?;
        let chunk = vec![0u8; 64 << 10];
        // Bounded: the file system is a few MiB at most.
        for _ in 0..1024 {
            match filler.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(()),
                Err(e) => return Err(e).context("filling the journal's file system"),
            }
        }
        bail!("{} never filled up", self.dir.display())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = process::run_checked(Path::new("umount"), &["-l", &self.dir.to_string_lossy()]);
    }
}

/// Whether `promql` returns a series whose `instance` is `instance`.
fn fires_for(prometheus: &Prometheus, promql: &str, instance: SocketAddr) -> Result<bool> {
    let instance = instance.to_string();
    Ok(prometheus
        .query(promql)?
        .iter()
        .any(|series| series["metric"]["instance"].as_str() == Some(instance.as_str())))
}

fn rule<'a>(rules: &'a [Expr], name: &str) -> Result<&'a Expr> {
    rules
        .iter()
        .find(|r| r.place == format!("rule {name}"))
        .with_context(|| format!("no rule {name} in the shipped rules"))
}

/// Every health rule of the shipped rules, each made to fire by the fault it
/// describes, caused for real: a Prometheus scrapes a faulty agent (tiny maps
/// and ring buffer, no tracepoints, its journal on a tmpfs then filled up, its
/// collector thread frozen), a healthy agent that restarts and then sees a
/// known path with a new hash, and a target where no agent listens. Each rule
/// must return a series for the faulty instance, and the fault rules none for
/// the healthy one.
#[test]
fn every_health_rule_fires_when_its_incident_is_caused() -> Result<()> {
    require_root!("eBPF, tmpfs mounts, ptrace");
    let rules = rule_expressions()?;
    // (rule, the instance it must fire for); the faulty agent's own rules must
    // not fire for the healthy one.
    let faulty_rules = [
        "FleetsnitchEventsLost",
        "FleetsnitchMapFull",
        "FleetsnitchUnattributedBytes",
        "FleetsnitchHashFailures",
        "FleetsnitchProbeNotAttached",
        "FleetsnitchJournalWriteErrors",
        "FleetsnitchJournalDropped",
        "FleetsnitchDrainStalled",
    ];
    let healthy_rules = ["FleetsnitchNewHashForKnownExecutable"];
    let down_rules = ["FleetsnitchAgentDown"];
    // Caused with exec tracking on, in tests/tests/exec_tracking.rs
    // (exec_tracking_alerts_fire_in_prometheus).
    let exec_tracking_rules = [
        "FleetsnitchNewExecutableWithoutNetwork",
        "FleetsnitchExecEventsLost",
    ];
    // Caused on twelve hosts' pages in tests/tests/fleet.rs, which also reads
    // back every recording rule (their names hold a colon, alerts' do not).
    let fleet_rules = ["FleetsnitchNewToFleet", "FleetsnitchDrift"];
    // Caused in tests/tests/domains.rs (a known program resolving new names).
    let destination_rules = ["FleetsnitchNewDestination"];
    // Caused in tests/tests/failures.rs (fanotify unavailable, a corrupt GeoIP
    // database, a collector nobody listens for, a full connection-log file
    // system, VirusTotal and the Kubernetes API answering 500).
    let failure_rules = [
        "FleetsnitchModificationWatchFailing",
        "FleetsnitchGeoIpLookupErrors",
        "FleetsnitchOtlpExportFailing",
        "FleetsnitchConnectionLogErrors",
        "FleetsnitchVirusTotalErrors",
        "FleetsnitchKubernetesApiUnreachable",
    ];
    let records = rules
        .iter()
        .map(|rule| rule.place.clone())
        .filter(|place| place.contains(':'));
    let covered: BTreeSet<String> = faulty_rules
        .iter()
        .chain(&healthy_rules)
        .chain(&down_rules)
        .chain(&exec_tracking_rules)
        .chain(&fleet_rules)
        .chain(&destination_rules)
        .chain(&failure_rules)
        .map(|name| format!("rule {name}"))
        .chain(records)
        .chain(CAUSED_WITH_THE_DASHBOARDS.iter().map(|p| (*p).to_owned()))
        .collect();
    let uncovered: Vec<&str> = rules
        .iter()
        .map(|r| r.place.as_str())
        .filter(|place| !covered.contains(*place))
        .collect();
    ensure!(uncovered.is_empty(), "rules no test causes: {uncovered:?}");

    let faulty = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let healthy = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    // Nobody listens there: an agent that is down.
    let down = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let rules_file = workspace_root().join("helm/fleetsnitch/rules/fleetsnitch.rules.yml");
    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: fleetsnitch\n    static_configs:\n      \
         - targets: ['{faulty}', '{healthy}', '{down}']\n",
        rules_file.display()
    ))?;

    // The faulty agent's journal: a small tmpfs, in a directory of its own so that
    // it is unmounted before the testbed's directory is removed.
    let mounts = TempDir::new("fsn-incidents-mnt")?;
    let journal_fs = Tmpfs::mount(&mounts.path().join("faulty-journal"), "1m")?;
    let mut faulty_bed = Testbed::setup("fsn-incidents-faulty")?
        .config(
            "journal:\n  write_interval: 1s\n  max_pending: 1000\n\
             collector:\n  traffic_map_entries: 1024\n  ring_buffer_bytes: 65536\n\
             probes:\n  disabled_modes: [tracepoint]\n",
        )
        .journal(journal_fs.dir.join("journal.db"))
        .listen(faulty)
        .start()?;
    let mut healthy_bed = Testbed::setup("fsn-incidents-healthy")?
        .config("journal:\n  write_interval: 1s\n")
        .listen(healthy)
        .start()?;
    let healthy_journal = healthy_bed.journal().to_owned();

    // Prometheus must hold the counters at 0 before the faults: `increase()`
    // sees nothing of a series whose first sample is already the incident.
    wait_until(Duration::from_secs(60), "two scrapes of each agent", || {
        Ok(fires_for(
            &prometheus,
            "count_over_time(fleetsnitch_map_full_total{map=\"traffic\"}[1m]) >= 2",
            faulty,
        )? && fires_for(
            &prometheus,
            "count_over_time(fleetsnitch_hash_failures_total{reason=\"process_exited\"}[1m]) >= 2",
            faulty,
        )? && fires_for(
            &prometheus,
            "count_over_time(fleetsnitch_events_lost_total[1m]) >= 2",
            healthy,
        )?)
    })?;

    // The faulty agent's journal can no longer grow.
    journal_fs.fill()?;

    // Its collector stops: nothing drains the kernel's maps and ring buffer.
    let frozen = process::FrozenThread::freeze(faulty_bed.agent.pid(), "fleetsnitch-col")?;
    let frozen_at = Instant::now();
    // A program dropped, run once and deleted: gone before anyone can hash it.
    let dropped = faulty_bed.copy("sweep", "dropped")?;
    run_sweep(
        &dropped,
        &[
            "ports",
            "--peer",
            "127.0.0.1",
            "--first",
            "9",
            "--count",
            "1",
        ],
    )?;
    fs::remove_file(&dropped)?;
    // More new processes than 64 KiB of ring buffer can announce (about 130
    // records of a three-name path) while the collector is stuck.
    let burst = faulty_bed.copy("sweep", "burst")?;
    run_sweep(
        &burst,
        &["forks", "--peer", "127.0.0.1:9", "--count", "300"],
    )?;
    // More flows than the 8,192 flow slots and 1024 traffic map entries hold.
    let ports = faulty_bed.copy("sweep", "ports")?;
    run_sweep(
        &ports,
        &[
            "ports",
            "--peer",
            "127.0.0.1",
            "--first",
            "20000",
            "--count",
            "12000",
        ],
    )?;

    // Meanwhile, the healthy agent: a program it knows comes back with another
    // hash after a restart.
    let client = healthy_bed.copy("trafficgen", "known")?;
    run_loopback(&client, 10_000)?;
    let known = format!(
        "SELECT count(*) FROM executables WHERE path = '{}' AND sha256 != ''",
        client.display()
    );
    wait_until(
        Duration::from_secs(30),
        "the healthy journal knows the client",
        || Ok(query_journal(&healthy_journal, &known)? == "1"),
    )
    .with_context(|| {
        format!(
            "journal: {:?}\nhealthy agent:\n{}",
            query_journal(&healthy_journal, "SELECT path, sha256 FROM executables"),
            healthy_bed.log_tail(30)
        )
    })?;
    healthy_bed.agent.signal(libc::SIGTERM);
    ensure!(
        healthy_bed
            .agent
            .wait_exit(Duration::from_secs(30))?
            .is_some(),
        "the healthy agent did not stop"
    );
    let mut upgraded = fs::read(&client)?;
    upgraded.extend_from_slice(b"\0upgraded");
    let staged = client.with_extension("new");
    fs::write(&staged, &upgraded)?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))?;
    fs::rename(&staged, &client)?;
    healthy_bed.restart()?;
    run_loopback(&client, 10_000)?;

    // The collector has been stuck for over a minute: the drain rule fires
    // while /metrics is still served.
    let stalled = rule(&rules, "FleetsnitchDrainStalled")?;
    let remaining = Duration::from_secs(62).saturating_sub(frozen_at.elapsed());
    thread::sleep(remaining);
    wait_until(Duration::from_secs(30), "drain stall seen", || {
        fires_for(&prometheus, &stalled.promql, faulty)
    })?;
    drop(frozen);

    // Resumed, the faulty agent finds what it missed and journals flows into a
    // full file system, past journal.max_pending.
    run_sweep(
        &ports,
        &[
            "ports",
            "--peer",
            "127.0.0.1",
            "--first",
            "30000",
            "--count",
            "2000",
        ],
    )?;

    let mut missing = Vec::new();
    // The drain stall was seen while it lasted; the rest stay for their windows.
    let after_the_stall: Vec<&str> = faulty_rules
        .into_iter()
        .filter(|name| *name != "FleetsnitchDrainStalled")
        .collect();
    for (names, instance) in [
        (&after_the_stall[..], faulty),
        (&healthy_rules[..], healthy),
        (&down_rules[..], down),
    ] {
        for name in names {
            let expr = rule(&rules, name)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !fires_for(&prometheus, &expr.promql, instance)? {
                if Instant::now() > deadline {
                    missing.push(format!("{name} for {instance}"));
                    break;
                }
                thread::sleep(Duration::from_secs(1));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "incidents caused but their rules returned nothing: {missing:?}\nfaulty agent:\n{}",
        faulty_bed.log_tail(40)
    );
    // The faults were the faulty agent's own: the healthy one saw the same
    // traffic without them.
    for name in faulty_rules
        .iter()
        .filter(|name| **name != "FleetsnitchHashFailures")
    {
        let expr = rule(&rules, name)?;
        ensure!(
            !fires_for(&prometheus, &expr.promql, healthy)?,
            "{name} fired for the healthy agent:\n{}",
            healthy_bed.log_tail(40)
        );
    }
    faulty_bed.agent.check_running()?;
    Ok(())
}
