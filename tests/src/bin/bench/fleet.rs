//! The fleet at scale: one real Prometheus scraping N simulated hosts, with the
//! shipped rules loaded.
//!
//! A busy host's page is captured from the real (release) agent with default
//! labels after `BUSY_EXECUTABLES` distinct programs (copies of trafficgen,
//! each sending and receiving on loopback) used the network. Each simulated
//! host serves that page varied the way a fleet varies: most programs are the
//! same build everywhere, some have one build per group of hosts (a staged
//! rollout), some exist on that host only (a user's tool). The figures: series
//! per busy host, Prometheus' memory and head series, rule evaluation time,
//! and the latency of every fleet dashboard query (range queries over the data
//! the run holds), next to the raw-series queries the recording rules replace.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    AgentGuard, TempDir,
    dashboards::{Expr, expressions_of, substitute},
    exe_copy,
    metrics::http_get,
    parse_samples, process, program,
    servers::{MetricsPages, Prometheus},
    workspace_root,
};
use sha2::{Digest, Sha256};

use super::{Row, median, status_kib};

/// Programs of the busy host whose page every simulated host starts from.
const BUSY_EXECUTABLES: usize = 120;
/// Of those, the first share is one build fleet-wide, the next one build per
/// group of hosts, the rest exist on one host only.
const SHARED: f64 = 0.7;
const PER_GROUP: f64 = 0.2;
const GROUPS: usize = 10;
/// The chart's ServiceMonitor default, and the evaluation interval too.
const SCRAPE_INTERVAL_SECONDS: u64 = 30;
/// Scrapes (and rule evaluations) before anything is measured.
const WARM_UP_SCRAPES: u64 = 6;
const QUERY_RUNS: usize = 3;
const QUERY_TARGET_SECONDS: f64 = 1.0;
const SERIES_TARGET: usize = 1_500;

/// The fleet overview's bandwidth panels as they read raw series before the
/// recording rules (same variables), for the with/without comparison.
const RAW_EQUIVALENTS: &[(&str, &str)] = &[
    (
        "Network bandwidth",
        r#"sum(rate(fleetsnitch_bytes_total{job=~"$job",host=~"$host",instance=~"$instance",namespace=~"$namespace"}[$__rate_interval]))"#,
    ),
    (
        "Executables using the network",
        r#"count(count by (exe) (fleetsnitch_bytes_total{job=~"$job",host=~"$host",instance=~"$instance",namespace=~"$namespace"}))"#,
    ),
    (
        "Bandwidth by executable (top 10)",
        r#"topk(10, sum by (exe, direction) (rate(fleetsnitch_bytes_total{job=~"$job",host=~"$host",instance=~"$instance",namespace=~"$namespace"}[$__rate_interval])))"#,
    ),
    (
        "Bandwidth by host",
        r#"sum by (host, instance, direction) (rate(fleetsnitch_bytes_total{job=~"$job",host=~"$host",instance=~"$instance",namespace=~"$namespace"}[$__rate_interval]))"#,
    ),
    (
        "Bandwidth by domain (top 10)",
        r#"label_replace(topk(10, sum by (domain) (rate(fleetsnitch_bytes_total{job=~"$job",host=~"$host",instance=~"$instance",namespace=~"$namespace"}[$__rate_interval]))), "domain", "(no name resolved)", "domain", "")"#,
    ),
    (
        "Bandwidth by country (top 10)",
        r#"label_replace(topk(10, sum by (country) (rate(fleetsnitch_bytes_total{job=~"$job",host=~"$host",instance=~"$instance",namespace=~"$namespace"}[$__rate_interval]))), "country", "(private or unknown)", "country", "")"#,
    ),
    (
        "Executables seen on only one host",
        r#"count by (host, instance, exe, sha256) (fleetsnitch_executable_info{job=~"$job",host=~"$host",instance=~"$instance"}) and on (exe, sha256) (count by (exe, sha256) (count by (exe, sha256, instance) (fleetsnitch_executable_info{job=~"$job",host=~"$host",instance=~"$instance"})) == 1)"#,
    ),
];

pub fn fleet(agent: &Path, hosts: &[usize]) -> Result<Vec<Row>> {
    let busy = capture_busy_page(agent)?;
    let series = busy.page.lines().filter(|l| !l.starts_with('#')).count();
    let mut rows = vec![Row::new(
        "series per busy host, default labels",
        format!(
            "{series} ({} programs used the network; {} lines of fleetsnitch_bytes_total)",
            busy.programs.len(),
            busy.page
                .lines()
                .filter(|l| l.starts_with("fleetsnitch_bytes_total{"))
                .count()
        ),
        &format!("<= {SERIES_TARGET}"),
        Some(series <= SERIES_TARGET),
    )];
    for &count in hosts {
        let fleet = scrape_fleet(&busy, count)?;
        // Each fleet's figures as soon as they are measured: a later, larger
        // fleet may take long or fail.
        super::print_table(&fleet);
        rows.extend(fleet);
    }
    Ok(rows)
}

/// A real agent's page and the programs (exe label values) the run started.
struct BusyPage {
    page: String,
    programs: Vec<String>,
    /// The sha256 all copies share (they are copies of one file).
    sha256: String,
}

fn capture_busy_page(agent: &Path) -> Result<BusyPage> {
    let dir = TempDir::new("fsn-bench-fleet")?;
    let trafficgen = program("trafficgen")?;
    let sha256 = fleetsnitch_e2e::sha256_file(&trafficgen)?;
    let copies: Vec<PathBuf> = (0..BUSY_EXECUTABLES)
        .map(|i| exe_copy(&trafficgen, dir.path(), &format!("program-{i:03}")))
        .collect::<Result<_>>()?;
    let running = AgentGuard::start(agent)?;
    for copy in &copies {
        let out = process::run_bounded(
            Command::new(copy).args(["client", "loopback", "--bytes", "4096"]),
            Duration::from_secs(30),
        )?;
        ensure!(out.status.success(), "{}: {}", copy.display(), out.stderr);
    }
    let programs: Vec<String> = copies.iter().map(|c| c.display().to_string()).collect();
    // Every program hashed, journaled (first sightings) and counted both ways.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let page = http_get(running.addr, "/metrics", Duration::from_secs(10))?.body;
        let missing = programs
            .iter()
            .filter(|exe| {
                let label = format!("exe=\"{exe}\"");
                let has = |metric: &str| {
                    page.lines()
                        .any(|line| line.starts_with(metric) && line.contains(&label))
                };
                !(has("fleetsnitch_executable_info{")
                    && has("fleetsnitch_executable_first_seen_timestamp_seconds{")
                    && has("fleetsnitch_bytes_total{"))
            })
            .count();
        if missing == 0 {
            return Ok(BusyPage {
                page,
                programs,
                sha256,
            });
        }
        if Instant::now() > deadline {
            bail!("{missing} of {BUSY_EXECUTABLES} programs not complete on /metrics after 120 s");
        }
        thread::sleep(Duration::from_secs(1));
    }
}

fn hex_sha256(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// Host `host`'s page: program `i` of the busy page renamed and rebuilt
/// according to its share (fleet-wide, per group, this host only), every
/// first sighting a day old (a fleet that has run for a while: otherwise
/// every program of every host is new, and the per-host new-executable
/// alerts, one per program, dominate rule evaluation).
fn host_page(busy: &BusyPage, host: usize) -> String {
    let shared = (busy.programs.len() as f64 * SHARED) as usize;
    let grouped = shared + (busy.programs.len() as f64 * PER_GROUP) as usize;
    let renames: BTreeMap<&str, (String, String)> = busy
        .programs
        .iter()
        .enumerate()
        .map(|(i, exe)| {
            let (path, build) = if i < shared {
                (format!("/usr/bin/program-{i:03}"), "fleet".to_owned())
            } else if i < grouped {
                (
                    format!("/opt/staged/program-{i:03}"),
                    format!("group {}", host % GROUPS),
                )
            } else {
                (
                    format!("/home/user{host}/bin/tool-{i:03}"),
                    format!("host {host}"),
                )
            };
            let sha256 = hex_sha256(&format!("{path} {build}"));
            (exe.as_str(), (path, sha256))
        })
        .collect();
    let day_old = format!("{}", now() as i64 - 86_400);
    let mut out = String::with_capacity(busy.page.len() + busy.page.len() / 4);
    for line in busy.page.lines() {
        let aged;
        let line = if line.starts_with("fleetsnitch_executable_first_seen_timestamp_seconds{")
            || line.starts_with("fleetsnitch_path_first_seen_timestamp_seconds{")
        {
            let series = line.rsplit_once(' ').map_or(line, |(series, _)| series);
            aged = format!("{series} {day_old}");
            aged.as_str()
        } else {
            line
        };
        let renamed = line
            .split_once("exe=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .and_then(|(exe, _)| renames.get(exe).map(|r| (exe, r)));
        match renamed {
            Some((exe, (path, sha256))) => out.push_str(
                &line
                    .replace(&format!("exe=\"{exe}\""), &format!("exe=\"{path}\""))
                    .replace(
                        &format!("sha256=\"{}\"", busy.sha256),
                        &format!("sha256=\"{sha256}\""),
                    ),
            ),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn prometheus_config(rules: &Path, pages: &MetricsPages, hosts: usize) -> String {
    let mut config = format!(
        "global:\n  scrape_interval: {SCRAPE_INTERVAL_SECONDS}s\n  \
         evaluation_interval: {SCRAPE_INTERVAL_SECONDS}s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: fleetsnitch\n    static_configs:\n",
        rules.display()
    );
    for host in 0..hosts {
        config.push_str(&format!(
            "      - targets: ['{}']\n        labels: {{__metrics_path__: '{}', \
             instance: 'host{host}:9941', host: 'host{host}'}}\n",
            pages.addr,
            MetricsPages::path(host)
        ));
    }
    config
}

/// `rule_group` -> a per-group metric of Prometheus' own.
fn per_rule_group(text: &str, metric: &str) -> Result<BTreeMap<String, f64>> {
    Ok(parse_samples(text, metric)?
        .into_iter()
        .map(|s| {
            let group = s.labels.get("rule_group").cloned().unwrap_or_default();
            let group = group.rsplit(';').next().unwrap_or(&group).to_owned();
            (group, s.value)
        })
        .collect())
}

/// `rule_group` -> (last evaluation duration, evaluation interval), seconds.
fn rule_durations(prometheus: &Prometheus) -> Result<BTreeMap<String, (f64, f64)>> {
    let text = prometheus.own_metrics()?;
    let intervals = per_rule_group(&text, "prometheus_rule_group_interval_seconds")?;
    Ok(
        per_rule_group(&text, "prometheus_rule_group_last_duration_seconds")?
            .into_iter()
            .map(|(group, duration)| {
                let interval = intervals
                    .get(&group)
                    .copied()
                    .unwrap_or(SCRAPE_INTERVAL_SECONDS as f64);
                (group, (duration, interval))
            })
            .collect(),
    )
}

fn own_value(prometheus: &Prometheus, name: &str) -> Result<f64> {
    Ok(parse_samples(&prometheus.own_metrics()?, name)?
        .iter()
        .map(|s| s.value)
        .sum())
}

/// Median seconds of `QUERY_RUNS` runs of `expr` as Grafana runs it: a
/// variable's label values, an instant query at `end`, or a range query over
/// `[start, end]`.
fn time_query(prometheus: &Prometheus, expr: &Expr, start: f64, end: f64) -> Result<f64> {
    let promql = expr.promql.as_str();
    let mut times = Vec::with_capacity(QUERY_RUNS);
    for _ in 0..QUERY_RUNS {
        let began = Instant::now();
        if let Some(label) = &expr.label {
            prometheus.label_values(label, promql, start, end)
        } else if expr.instant {
            prometheus.query_within(promql, Duration::from_secs(120))
        } else {
            prometheus.query_range(promql, start, end, SCRAPE_INTERVAL_SECONDS as f64)
        }
        .with_context(|| promql.to_owned())?;
        times.push(began.elapsed().as_secs_f64());
    }
    Ok(median(&mut times))
}

fn fleet_overview_queries() -> Result<Vec<Expr>> {
    let file = workspace_root().join("grafana-dashboards/fleetsnitch-fleet-overview.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?,
    )
    .with_context(|| format!("parse {}", file.display()))?;
    expressions_of("fleet overview", &dashboard)
}

fn scrape_fleet(busy: &BusyPage, hosts: usize) -> Result<Vec<Row>> {
    eprintln!("bench: fleet of {hosts} hosts");
    let pages: Vec<String> = (0..hosts).map(|host| host_page(busy, host)).collect();
    let distinct_programs = pages
        .iter()
        .flat_map(|page| page.lines())
        .filter(|l| l.starts_with("fleetsnitch_executable_info{"))
        .filter_map(|l| l.split_once("exe=\"").and_then(|(_, r)| r.split_once('"')))
        .map(|(exe, _)| exe)
        .collect::<BTreeSet<&str>>()
        .len();
    let pages = MetricsPages::serve(pages)?;
    let rules = workspace_root().join("helm/fleetsnitch/rules/fleetsnitch.rules.yml");
    let mut prometheus = Prometheus::start(&prometheus_config(&rules, &pages, hosts))?;

    let up = format!("count(up{{job=\"fleetsnitch\"}} == 1) == {hosts}");
    let deadline = Instant::now() + Duration::from_secs(4 * SCRAPE_INTERVAL_SECONDS);
    while prometheus.query(&up)?.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "not every one of {hosts} targets up after {} s: {:?}",
                4 * SCRAPE_INTERVAL_SECONDS,
                prometheus.query("count by (health) (up)")
            );
        }
        thread::sleep(Duration::from_secs(1));
    }
    let data_start = now();
    thread::sleep(Duration::from_secs(
        WARM_UP_SCRAPES * SCRAPE_INTERVAL_SECONDS,
    ));
    prometheus.check_running()?;

    let rss_mib = status_kib(prometheus.pid(), "VmRSS:")? as f64 / 1024.0;
    let head_series = own_value(&prometheus, "prometheus_tsdb_head_series")?;
    let durations = rule_durations(&prometheus)?;
    // Rule work per second of Prometheus' time: each group's duration over its interval.
    let load: f64 = durations.values().map(|(d, i)| d / i).sum();
    let overrun: Vec<String> = durations
        .iter()
        .filter(|(_, (d, i))| d >= i)
        .map(|(g, (d, i))| format!("{g} {d:.0} s of {i:.0} s"))
        .collect();
    let (slowest_group, (slowest_group_seconds, slowest_group_interval)) = durations
        .iter()
        .max_by(|a, b| (a.1.0 / a.1.1).total_cmp(&(b.1.0 / b.1.1)))
        .map(|(g, s)| (g.clone(), *s))
        .unwrap_or_default();
    let missed = own_value(&prometheus, "prometheus_rule_group_iterations_missed_total")?;
    let mut rule_times = prometheus.rule_evaluation_times()?;
    rule_times.sort_by(|a, b| b.1.total_cmp(&a.1));
    let slowest_rules = rule_times
        .iter()
        .take(3)
        .map(|(name, seconds)| format!("{name} {:.0} ms", seconds * 1e3))
        .collect::<Vec<_>>()
        .join(", ");

    let end = now();
    let window_minutes = (end - data_start) / 60.0;
    let mut timed = Vec::new();
    for expr in fleet_overview_queries()? {
        let seconds = time_query(&prometheus, &expr, data_start, end)?;
        eprintln!("bench: {:>6.0} ms  {}", seconds * 1e3, expr.place);
        timed.push((expr.place, expr.instant, seconds));
    }
    let within = timed
        .iter()
        .filter(|(_, _, s)| *s <= QUERY_TARGET_SECONDS)
        .count();
    let (slowest_place, _, slowest) = timed
        .iter()
        .max_by(|a, b| a.2.total_cmp(&b.2))
        .cloned()
        .context("no fleet overview query")?;

    let mut rows = vec![
        Row::new(
            &format!("Prometheus at {hosts} hosts: head series, RSS"),
            format!(
                "{head_series:.0} series ({:.0} per host; {} distinct programs in the fleet), {rss_mib:.0} MiB",
                head_series / hosts as f64,
                distinct_programs
            ),
            "-",
            None,
        ),
        Row::new(
            &format!("rule evaluation at {hosts} hosts (every group, last round)"),
            format!(
                "{:.0} % of Prometheus' time; busiest group {slowest_group} {:.1} s every {:.0} s; slowest rules: {slowest_rules}; groups over their interval: {}; missed iterations {missed:.0}",
                load * 1e2,
                slowest_group_seconds,
                slowest_group_interval,
                if overrun.is_empty() {
                    "none".to_owned()
                } else {
                    overrun.join(", ")
                }
            ),
            "each group within its interval, none missed",
            Some(overrun.is_empty() && missed == 0.0),
        ),
        Row::new(
            &format!(
                "fleet dashboard queries at {hosts} hosts (tables instant, the rest over the {window_minutes:.1} min held, step {SCRAPE_INTERVAL_SECONDS} s; median of {QUERY_RUNS})"
            ),
            format!(
                "{within} of {} within {QUERY_TARGET_SECONDS} s; slowest {:.0} ms ({slowest_place})",
                timed.len(),
                slowest * 1e3
            ),
            &format!("every query <= {QUERY_TARGET_SECONDS} s"),
            Some(within == timed.len()),
        ),
    ];
    // With and without the recording rules, panel by panel.
    let recorded: BTreeMap<&str, (bool, f64)> = timed
        .iter()
        .filter_map(|(place, instant, s)| {
            RAW_EQUIVALENTS
                .iter()
                .find(|(title, _)| place.contains(&format!("/ {title} /")))
                .map(|(title, _)| (*title, (*instant, *s)))
        })
        .collect();
    ensure!(
        recorded.len() == RAW_EQUIVALENTS.len(),
        "the fleet overview lost a panel the benchmark compares: found {:?}",
        recorded.keys()
    );
    for (title, raw) in RAW_EQUIVALENTS {
        let (instant, recorded_seconds) = recorded[title];
        let raw = Expr {
            place: (*title).to_owned(),
            promql: substitute(raw),
            instant,
            label: None,
        };
        let raw_seconds = time_query(&prometheus, &raw, data_start, end)?;
        rows.push(Row::new(
            &format!("\"{title}\" at {hosts} hosts: recorded / raw series"),
            format!(
                "{:.0} ms / {:.0} ms",
                recorded_seconds * 1e3,
                raw_seconds * 1e3
            ),
            "-",
            None,
        ));
    }
    drop(prometheus);
    drop(pages);
    Ok(rows)
}
