//! The alerts only a fleet can raise, end to end. One real agent's `/metrics`
//! page, captured after two programs used the network, becomes the page of
//! twelve hosts of one group that have run for a day (every first sighting
//! moved a day back); one host runs another build of a common program, and
//! three hosts get a build no host ran before. A real Prometheus scrapes the
//! twelve pages with the shipped rules, a real Alertmanager posts to a
//! webhook: `FleetsnitchNewToFleet` fires once for the three hosts,
//! `FleetsnitchDrift` once for the odd host, `FleetsnitchNewDestination` once
//! for the one host whose new-destination counter moves (every host's page has
//! one, flat elsewhere), nothing else of the fleet alerts fires, each carries
//! who ran the build (as the real agent labelled its first sighting), and
//! every recording rule of the shipped rules returns series (the host counts:
//! what the pages hold).
//!
//! Prometheus here is minutes old, so the 7-day memory of
//! `FleetsnitchNewToFleet` and the 30 minutes of `FleetsnitchDrift` cannot be
//! lived through: the rules file is loaded with `for: 30m` shortened to 5 s,
//! and those time constants are checked by `tests/rules/fleet.rules.test.yml`
//! (promtool). Needs root (eBPF).

use std::{
    collections::BTreeSet,
    fs,
    net::SocketAddr,
    path::Path,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    TempDir, Testbed,
    filesystems::copy_executable,
    metrics::http_get,
    program, require_root, run_loopback,
    servers::{Alertmanager, MetricsPages, Prometheus, Webhook, rules_at_global_interval},
    sha256_file, wait_until, workspace_root,
};

const HOSTS: usize = 12;
/// The hosts (1-based) that run the new build, and the one with another build.
const ROLLOUT_HOSTS: [usize; 3] = [1, 2, 3];
const ODD_HOST: usize = 12;
/// The host whose program talks to a new country during the test.
const DESTINATION_HOST: usize = 5;
const ROLLOUT_EXE: &str = "/opt/rollout/app";
const ROLLOUT_SHA256: &str = "5ca1ab1e00000000000000000000000000000000000000000000000000000001";
const ODD_SHA256: &str = "0dd0000000000000000000000000000000000000000000000000000000000002";
const FLEET_ALERTS: [&str; 3] = [
    "FleetsnitchNewToFleet",
    "FleetsnitchDrift",
    "FleetsnitchNewDestination",
];

/// A real agent's page once both programs are hashed and journaled: their
/// info, first sightings and bytes are on it.
fn capture_page(bed: &Testbed, programs: &[(&Path, &str)]) -> Result<String> {
    let mut page = String::new();
    wait_until(
        Duration::from_secs(60),
        "both programs hashed and journaled on /metrics",
        || {
            page = http_get(bed.addr(), "/metrics", Duration::from_secs(5))?.body;
            Ok(programs.iter().all(|(exe, sha256)| {
                let exe = format!("exe=\"{}\"", exe.display());
                let sha256 = format!("sha256=\"{sha256}\"");
                let has = |metric: &str, label: &str| {
                    page.lines().any(|line| {
                        line.starts_with(metric) && line.contains(&exe) && line.contains(label)
                    })
                };
                has("fleetsnitch_executable_info{", &sha256)
                    && has(
                        "fleetsnitch_executable_first_seen_timestamp_seconds{",
                        &sha256,
                    )
                    && has("fleetsnitch_path_first_seen_timestamp_seconds{", "")
                    && has("fleetsnitch_bytes_total{", "direction=\"sent\"")
            }))
        },
    )
    .with_context(|| format!("agent log:\n{}", bed.log_tail(30)))?;
    Ok(page)
}

fn is_first_seen(line: &str) -> bool {
    line.starts_with("fleetsnitch_executable_first_seen_timestamp_seconds{")
        || line.starts_with("fleetsnitch_path_first_seen_timestamp_seconds{")
}

/// `line` (a sample) with its value replaced.
fn with_value(line: &str, value: f64) -> Result<String> {
    let (series, _) = line
        .rsplit_once(' ')
        .with_context(|| format!("not a sample line: {line:?}"))?;
    Ok(format!("{series} {value}"))
}

/// The page of a host that has run for a day: every first sighting a day old.
fn a_day_old(page: &str, now: f64) -> Result<String> {
    let mut out = String::with_capacity(page.len());
    for line in page.lines() {
        if is_first_seen(line) {
            out.push_str(&with_value(line, now - 86_400.0)?);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    Ok(out)
}

/// `page` with `exe`'s new-destination counter (kind country) at `count`: a
/// program known long enough that has found `count` new countries.
fn with_new_destinations(page: &str, exe: &Path, count: u32) -> Result<String> {
    // The agent writes no family without samples: the page has none yet.
    ensure!(
        !page.contains("fleetsnitch_new_destinations_total"),
        "the agent's page already has new-destination counts"
    );
    let body = page.strip_suffix("# EOF\n").unwrap_or(page);
    let eof = if body.len() < page.len() {
        "# EOF\n"
    } else {
        ""
    };
    Ok(format!(
        "{body}# TYPE fleetsnitch_new_destinations_total counter\n\
         fleetsnitch_new_destinations_total{{exe=\"{}\",kind=\"country\"}} {count}\n{eof}",
        exe.display()
    ))
}

/// `page` plus the new build: each sample of `template` (its exe label) again
/// for ROLLOUT_EXE with ROLLOUT_SHA256, first seen at `first_seen`.
fn with_rollout(page: &str, template: &Path, sha256: &str, first_seen: f64) -> Result<String> {
    let exe = format!("exe=\"{}\"", template.display());
    let mut out = String::with_capacity(page.len() * 2);
    let mut copied = 0;
    for line in page.lines() {
        out.push_str(line);
        out.push('\n');
        if !line.starts_with('#') && line.contains(&exe) {
            let copy = line
                .replace(&exe, &format!("exe=\"{ROLLOUT_EXE}\""))
                .replace(sha256, ROLLOUT_SHA256);
            let copy = if is_first_seen(&copy) {
                with_value(&copy, first_seen)?
            } else {
                copy
            };
            out.push_str(&copy);
            out.push('\n');
            copied += 1;
        }
    }
    ensure!(copied >= 3, "only {copied} samples of {exe} on the page");
    Ok(out)
}

/// Every recording rule of the shipped rules file (`- record:` lines).
fn recording_rules() -> Result<Vec<String>> {
    let path = workspace_root().join("helm/fleetsnitch/rules/fleetsnitch.rules.yml");
    let text = fs::read_to_string(&path)?;
    let records: Vec<String> = text
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("- record:"))
        .map(|name| name.trim().to_owned())
        .collect();
    ensure!(
        !records.is_empty(),
        "no recording rule in {}",
        path.display()
    );
    Ok(records)
}

/// The `for:` line of FleetsnitchDrift, as the rules file indents it.
const FOR_30M: &str = "\n        for: 30m\n";
/// FleetsnitchNewToFleet's `for`: the first sighting's context settles.
const FOR_2M: &str = "\n        for: 2m\n";

/// The shipped rules evaluated at the global interval, with `for: 30m`
/// (FleetsnitchDrift's) and `for: 2m` (FleetsnitchNewToFleet's) shortened
/// to 5 s.
fn rules_with_short_for(dir: &Path) -> Result<std::path::PathBuf> {
    let path = rules_at_global_interval(dir)?;
    let text = fs::read_to_string(&path)?;
    ensure!(
        text.matches(FOR_30M).count() == 1,
        "{} should have exactly one `for: 30m` (FleetsnitchDrift's)",
        path.display()
    );
    ensure!(
        text.matches(FOR_2M).count() == 1,
        "{} should have exactly one `for: 2m` (FleetsnitchNewToFleet's)",
        path.display()
    );
    fs::write(
        &path,
        text.replace(FOR_30M, "\n        for: 5s\n")
            .replace(FOR_2M, "\n        for: 5s\n"),
    )?;
    Ok(path)
}

/// The instance label of host `index` (0-based): what a scrape of a real
/// agent on that host would set.
fn instance(index: usize) -> String {
    format!("web{}:9941", index + 1)
}

fn prometheus_config(rules: &Path, pages: &MetricsPages, alertmanager: SocketAddr) -> String {
    let mut config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{alertmanager}']\n\
         scrape_configs:\n  - job_name: fleetsnitch\n    static_configs:\n",
        rules.display()
    );
    for index in 0..HOSTS {
        config.push_str(&format!(
            "      - targets: ['{}']\n        labels:\n          __metrics_path__: {}\n          \
             instance: {}\n          host: web{}\n          fleet_group: web\n",
            pages.addr,
            MetricsPages::path(index),
            instance(index),
            index + 1
        ));
    }
    config
}

/// Every firing fleet alert Alertmanager posted: (alertname, labels as text).
fn fleet_alerts(webhook: &Webhook) -> Vec<serde_json::Value> {
    webhook
        .notifications()
        .iter()
        .flat_map(|n| n.alerts("firing"))
        .filter(|alert| {
            alert["labels"]["alertname"]
                .as_str()
                .is_some_and(|name| FLEET_ALERTS.contains(&name))
        })
        .collect()
}

fn single_value(prometheus: &Prometheus, promql: &str) -> Result<f64> {
    let result = prometheus.query(promql)?;
    ensure!(
        result.len() == 1,
        "{promql}: {} series: {result:?}",
        result.len()
    );
    result[0]["value"][1]
        .as_str()
        .context("no value")?
        .parse()
        .with_context(|| format!("{promql}: {result:?}"))
}

#[test]
fn a_new_build_alerts_once_for_the_fleet_and_a_lone_build_alerts_for_its_host() -> Result<()> {
    require_root!("eBPF");
    let bed = Testbed::setup("fsn-fleet")?
        .config("journal:\n  write_interval: 1s\n")
        .start()?;
    let trafficgen = program("trafficgen")?;
    let common = bed.dir().join("fleet-common");
    let other = bed.dir().join("fleet-other");
    copy_executable(&trafficgen, &common, "\0fleet common")?;
    copy_executable(&trafficgen, &other, "\0fleet other")?;
    let (common_sha, other_sha) = (sha256_file(&common)?, sha256_file(&other)?);
    run_loopback(&common, 10_000)?;
    run_loopback(&other, 10_000)?;
    let page = capture_page(&bed, &[(&common, &common_sha), (&other, &other_sha)])?;
    drop(bed);

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let aged = a_day_old(&page, now)?;
    let mut pages = Vec::with_capacity(HOSTS);
    for host in 1..=HOSTS {
        let mut page = aged.clone();
        if host == ODD_HOST {
            page = page.replace(&common_sha, ODD_SHA256);
        }
        if ROLLOUT_HOSTS.contains(&host) {
            // Host 1 first, a second before host 2, and so on.
            page = with_rollout(&page, &other, &other_sha, now - 60.0 + host as f64)?;
        }
        pages.push(page);
    }
    // Every host found a new country for `common` long ago; one finds another
    // once Prometheus has scraped the first count.
    let flat = pages
        .iter()
        .map(|page| with_new_destinations(page, &common, 1))
        .collect::<Result<Vec<_>>>()?;
    let moved = with_new_destinations(&pages[DESTINATION_HOST - 1], &common, 2)?;
    let hosts = MetricsPages::serve(flat)?;
    let odd_instance = instance(ODD_HOST - 1);

    let dir = TempDir::new("fsn-fleet-rules")?;
    let rules = rules_with_short_for(dir.path())?;
    let webhook = Webhook::start()?;
    let alertmanager = Alertmanager::start(webhook.addr)?;
    let prometheus = Prometheus::start(&prometheus_config(&rules, &hosts, alertmanager.addr))?;

    wait_until(
        Duration::from_secs(60),
        "a few scrapes of the first count",
        || {
            Ok(prometheus
                .query("count_over_time(fleetsnitch_new_destinations_total[1m]) >= 3")?
                .len()
                == HOSTS)
        },
    )?;
    hosts.set(DESTINATION_HOST - 1, moved)?;

    // The alerts, then several more rounds for any other (wrong) fleet alert.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    loop {
        let names: BTreeSet<String> = fleet_alerts(&webhook)
            .iter()
            .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
            .collect();
        if names.len() == FLEET_ALERTS.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "fleet alerts after 90 s: {names:?}; ALERTS: {:?}\nprometheus log:\n{}",
                prometheus.query("ALERTS"),
                prometheus.log_tail(20)
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
    eprintln!("the fleet alerts after {:?}", started.elapsed());
    thread::sleep(Duration::from_secs(10));

    // Exactly three distinct alerts: one for the fleet, one for the odd host,
    // one for the host that found a new country.
    let alerts = fleet_alerts(&webhook);
    let distinct: BTreeSet<String> = alerts.iter().map(|a| a["labels"].to_string()).collect();
    ensure!(
        distinct.len() == 3,
        "expected one FleetsnitchNewToFleet, one FleetsnitchDrift and one \
         FleetsnitchNewDestination, got {}:\n{:#?}",
        distinct.len(),
        distinct
    );
    let named = |name: &str| -> Result<&serde_json::Value> {
        alerts
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .with_context(|| format!("no {name}"))
    };
    let new_build = named("FleetsnitchNewToFleet")?;
    ensure!(
        new_build["labels"]["exe"] == ROLLOUT_EXE
            && new_build["labels"]["sha256"] == ROLLOUT_SHA256
            && new_build["labels"]["instance"].is_null(),
        "FleetsnitchNewToFleet for the fleet, not a host: {new_build:#}"
    );
    // Context: who ran the build where it was first seen, as the real agent
    // labelled its first sighting (this test, as root, started the programs).
    let runner = std::env::current_exe()?.display().to_string();
    ensure!(
        new_build["labels"]["first_instance"] == instance(ROLLOUT_HOSTS[0] - 1).as_str()
            && new_build["labels"]["user"] == "root"
            && new_build["labels"]["parent"] == runner.as_str(),
        "FleetsnitchNewToFleet with the first sighting's host, user root and parent {runner}: \
         {new_build:#}"
    );
    // The host count as Prometheus evaluates it now: the first notification
    // may have gone out before a slow scrape brought in the last rollout host.
    let evaluated = prometheus.alerts()?;
    let new_build_now = evaluated
        .iter()
        .find(|a| a["labels"]["alertname"] == "FleetsnitchNewToFleet")
        .with_context(|| format!("FleetsnitchNewToFleet no longer active: {evaluated:#?}"))?;
    let description = new_build_now["annotations"]["description"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        description.starts_with("3 host(s) of job fleetsnitch run /opt/rollout/app"),
        "{new_build_now:#}"
    );
    let drift = named("FleetsnitchDrift")?;
    ensure!(
        drift["labels"]["instance"] == odd_instance.as_str()
            && drift["labels"]["exe"] == common.to_str().context("path")?
            && drift["labels"]["sha256"] == ODD_SHA256
            && drift["labels"]["host"] == format!("web{ODD_HOST}").as_str()
            && drift["labels"]["fleet_group"] == "web"
            && drift["labels"]["user"] == "root"
            && drift["labels"]["parent"] == runner.as_str(),
        "FleetsnitchDrift for web{ODD_HOST} ({odd_instance}), run by root from {runner}: {drift:#}"
    );
    let drift_now = evaluated
        .iter()
        .find(|a| a["labels"]["alertname"] == "FleetsnitchDrift")
        .with_context(|| format!("FleetsnitchDrift no longer active: {evaluated:#?}"))?;
    ensure!(
        drift_now["annotations"]["description"]
            .as_str()
            .unwrap_or_default()
            .contains("only 8.333% of the hosts"),
        "1 of 12 hosts: {drift_now:#}"
    );
    let destination = named("FleetsnitchNewDestination")?;
    ensure!(
        destination["labels"]["instance"] == instance(DESTINATION_HOST - 1).as_str()
            && destination["labels"]["exe"] == common.to_str().context("path")?
            && destination["labels"]["kind"] == "country"
            && destination["labels"]["sha256"] == common_sha.as_str()
            && destination["labels"]["user"] == "root"
            && destination["labels"]["parent"] == runner.as_str(),
        "FleetsnitchNewDestination for web{DESTINATION_HOST}'s {}, run by root from {runner}: \
         {destination:#}",
        common.display()
    );

    // Every recording rule has series; the host counts are the pages' own.
    for record in recording_rules()? {
        ensure!(
            !prometheus.query(&record)?.is_empty(),
            "{record} has no series"
        );
    }
    let common = common.display();
    for (promql, expected) in [
        (
            format!("job_fleet_group_exe:fleetsnitch_hosts:count{{exe=\"{common}\"}}"),
            12.0,
        ),
        (
            format!(
                "job_fleet_group_exe_sha256:fleetsnitch_hosts:count{{exe=\"{common}\",sha256=\"{common_sha}\"}}"
            ),
            11.0,
        ),
        (
            format!("sha256:fleetsnitch_hosts:count{{sha256=\"{ROLLOUT_SHA256}\"}}"),
            3.0,
        ),
        (
            format!("sha256:fleetsnitch_hosts:count{{sha256=\"{other_sha}\"}}"),
            12.0,
        ),
        (
            "count(job_host_instance_direction:fleetsnitch_bytes:rate5m{direction=\"sent\"})"
                .to_owned(),
            12.0,
        ),
    ] {
        let value = single_value(&prometheus, &promql)?;
        ensure!(value == expected, "{promql}: {value}, expected {expected}");
    }
    drop(prometheus);
    drop(alertmanager);
    drop(hosts);
    Ok(())
}
