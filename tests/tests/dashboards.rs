//! Every PromQL expression of the shipped Grafana dashboards (`grafana-dashboards/`) and
//! every expression of the shipped alerting rules, evaluated by a real Prometheus
//! scraping a real agent: each must parse, and each dashboard expression must return at
//! least one series. The incidents some panels show (a VirusTotal detection, an
//! executable modified in place, a new executable) are caused by the test: a fake
//! VirusTotal API on loopback flags every file, a watched executable is written to,
//! and the journal starts empty.
//! Needs root (eBPF, network namespaces); skips otherwise.

use std::{
    collections::BTreeSet,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fleetsnitch_e2e::{
    AgentGuard, PeerNet, TempDir, agent::free_port, agent_binary, exe_copy, is_root, run_client,
    servers::Prometheus, workspace_root, write_config,
};

const HOST: &str = "dashboards-test-host";

/// What the dashboards' template variables become in the test: every variable is a
/// regex matcher with "All" = `.*`; Grafana's interval variables get fixed values.
const SUBSTITUTIONS: &[(&str, &str)] = &[
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    ("$__range", "5m"),
    ("$job", ".*"),
    ("$host", ".*"),
    ("$instance", ".*"),
    ("$namespace", ".*"),
    ("$exe", ".*"),
];

fn trafficgen() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trafficgen"))
}

fn substitute(expr: &str) -> String {
    let mut out = expr.to_owned();
    for (var, value) in SUBSTITUTIONS {
        out = out.replace(&format!("${{{}}}", &var[1..]), value);
        out = out.replace(var, value);
    }
    out
}

/// One expression found in a dashboard: where, and the PromQL.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Expr {
    place: String,
    promql: String,
}

fn collect_panels(dashboard: &str, panels: &[serde_json::Value], out: &mut Vec<Expr>) {
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(Expr {
                    place: format!("{dashboard} / {title} / {}", target["refId"]),
                    promql: substitute(expr),
                });
            }
        }
        if let Some(inner) = panel["panels"].as_array() {
            collect_panels(dashboard, inner, out);
        }
    }
}

/// `label_values(selector, label)` → `selector`; other variable queries as they are.
fn variable_query(query: &str) -> Option<String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, _label) = inner.rsplit_once(',')?;
    Some(substitute(selector.trim()))
}

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
        let before = out.len();
        collect_panels(&name, dashboard["panels"].as_array().unwrap(), &mut out);
        if out.len() == before {
            bail!("{name}: no panel expressions");
        }
        for annotation in dashboard["annotations"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(expr) = annotation["expr"].as_str() {
                out.push(Expr {
                    place: format!("{name} / annotation {}", annotation["name"]),
                    promql: substitute(expr),
                });
            }
        }
        for var in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let query = var["query"]["query"]
                .as_str()
                .or_else(|| var["query"].as_str());
            if var["type"] == "query" {
                let query = query.context("query variable without a query")?;
                let promql = variable_query(query)
                    .with_context(|| format!("{name}: variable query {query}"))?;
                out.push(Expr {
                    place: format!("{name} / variable {}", var["name"]),
                    promql,
                });
            }
        }
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

fn prometheus_config(agent: SocketAddr) -> String {
    let rules = workspace_root().join("helm/fleetsnitch/rules/fleetsnitch.rules.yml");
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
         metrics:\n  bytes_labels: [parent, user, uid, remote_port, transport, domain, country, asn, container_id, container_name, pod, namespace]\n\
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
    if which_prometheus().is_none() {
        eprintln!("SKIP: prometheus is not installed (scripts/setup.sh installs it)");
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

fn which_prometheus() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("prometheus"))
        .find(|p| p.is_file())
}

#[test]
fn every_dashboard_expression_returns_series_from_a_real_agent() -> Result<()> {
    if !is_root() {
        eprintln!("SKIP: needs root (eBPF, network namespaces)");
        return Ok(());
    }
    let exprs = dashboard_expressions()?;
    let rules = rule_expressions()?;
    let dir = TempDir::new("fsn-dashboards")?;
    let journal = dir.path().join("journal.db");
    let virustotal = fake_virustotal()?;
    let config = write_config(dir.path(), &agent_config(virustotal, dir.path()))?;
    let config = config.to_str().unwrap().to_owned();
    let agent_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let prometheus = Prometheus::start(&prometheus_config(agent_addr))?;
    let peers = PeerNet::start(&trafficgen(), dir.path(), &[])?;
    let mut agent = AgentGuard::start_at(
        &agent_binary()?,
        agent_addr,
        Some(&journal),
        &["--config.file", &config],
    )?;

    // Traffic, so that bytes series exist for a fresh program (a new executable).
    let client = exe_copy(&trafficgen(), dir.path(), "dash-client")?;
    for scenario in ["tcp_upload", "tcp_download"] {
        run_client(
            &peers.net,
            &client,
            scenario,
            &["--bytes", "50000"],
            Duration::from_secs(60),
        )?;
    }
    agent
        .metrics()
        .wait_for_bytes(&client, "sent", 50_000)
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
                agent.log_tail(30)
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
        &peers.net,
        &client,
        "tcp_upload",
        &["--bytes", "50000"],
        Duration::from_secs(60),
    )?;

    let missing = wait_for_series(&prometheus, &exprs, Duration::from_secs(120))?;
    agent.check_running()?;
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
    let caused = [
        "rule FleetsnitchNewExecutable",
        "rule FleetsnitchExecutableModified",
        "rule FleetsnitchVirusTotalDetection",
    ];
    let caused: Vec<Expr> = rules
        .iter()
        .filter(|e| caused.contains(&e.place.as_str()))
        .cloned()
        .collect();
    assert_eq!(caused.len(), 3, "rules renamed? {rules:#?}");
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
