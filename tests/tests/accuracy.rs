//! End-to-end accuracy: every scenario's own byte counts against `fleetsnitch_bytes_total`.
//!
//! Needs root (network namespaces, raw sockets, eBPF) and the agent binary
//! (`cargo build -p fleetsnitch`, or `FLEETSNITCH_BIN=/path/to/fleetsnitch`). Skips when
//! not root.
//!
//! Each scenario runs from a uniquely named copy of `trafficgen` in the client namespace;
//! the peer services run from a copy of their own in the peer namespace and report their
//! own counts too. Every direction must equal what the programs counted themselves (the
//! program and the agent count the return values of the same calls), both when first
//! seen and in a final reading at the end; a scenario that cannot be exact says why in
//! its definition (`src/scenarios.rs`, `accuracy`) and is held to that bound instead.
//!
//! Environment knobs (all optional):
//! - `FSN_E2E_SCENARIOS=tcp_upload,loopback`: run only these scenarios.
//! - `FSN_E2E_SLOW_DRIP_SECS=N`: length of `slow_drip` (default 30).
//! - `FSN_E2E_WORKERS=N`: scenarios run at once (default 4).
//! - `FSN_E2E_KEEP=1`: keep the temporary directories (agent log, journal, exe copies).

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fleetsnitch_e2e::scenarios::{SCENARIOS, Scenario};
use fleetsnitch_e2e::{
    Accuracy, MetricsClient, NetnsPair, Report, Row, Testbed, agent_binary, bytes_for, difference,
    require_root, run_client,
};

/// Bound on one scenario run (the slow drip takes 30 s of it).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);
/// The agent must reflect traffic within 2 s; a direction expected to stay at 0 is read
/// this long after its scenario ended.
const SETTLE: Duration = Duration::from_millis(2500);
/// How long a non-zero direction may take to reach its expected value.
const WAIT: Duration = Duration::from_secs(10);

/// Progress lines go straight to the terminal (not captured by the test harness).
fn say(start: Instant, msg: &str) {
    let _ = writeln!(
        std::io::stderr().lock(),
        "[accuracy {:>6.1}s] {msg}",
        start.elapsed().as_secs_f64()
    );
}

fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

fn selected_scenarios() -> Vec<&'static Scenario> {
    match std::env::var("FSN_E2E_SCENARIOS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|name| {
                SCENARIOS
                    .iter()
                    .find(|s| s.name == name)
                    .unwrap_or_else(|| panic!("FSN_E2E_SCENARIOS: unknown scenario {name:?}"))
            })
            .collect(),
        _ => SCENARIOS.iter().collect(),
    }
}

fn row(
    scenario: &str,
    accuracy: Accuracy,
    direction: &str,
    expected: Option<u64>,
    reported: Option<f64>,
) -> Row {
    Row {
        scenario: scenario.to_owned(),
        direction: direction.to_owned(),
        expected,
        reported,
        accuracy,
        error: None,
        lag: None,
    }
}

fn error_row(scenario: &str, direction: &str, error: String) -> Row {
    Row {
        error: Some(error),
        ..row(scenario, Accuracy::Exact, direction, None, None)
    }
}

/// Waits for `exe`/`direction` to reach `expected`; records how long after `ended` it
/// got there.
fn wait_row(
    metrics: &MetricsClient,
    (scenario, accuracy): (&str, Accuracy),
    exe: &Path,
    direction: &str,
    expected: u64,
    ended: Instant,
) -> Row {
    match metrics.settle_bytes(exe, direction, expected, accuracy, WAIT) {
        Ok(v) => Row {
            lag: accuracy.accepts(expected, v).then(|| ended.elapsed()),
            ..row(scenario, accuracy, direction, Some(expected), v)
        },
        Err(e) => Row {
            error: Some(format!("scrape: {e:#}")),
            ..row(scenario, accuracy, direction, Some(expected), None)
        },
    }
}

/// Reads a direction expected to stay at 0, once the agent has had time to show it.
fn zero_row(
    metrics: &MetricsClient,
    (scenario, accuracy): (&str, Accuracy),
    exe: &Path,
    direction: &str,
    ended: Instant,
) -> Row {
    if let Some(d) = (ended + SETTLE).checked_duration_since(Instant::now()) {
        thread::sleep(d);
    }
    match metrics.bytes(exe, direction) {
        Ok(v) => row(scenario, accuracy, direction, Some(0), v),
        Err(e) => Row {
            error: Some(format!("scrape: {e:#}")),
            ..row(scenario, accuracy, direction, Some(0), None)
        },
    }
}

/// Compares both directions of `exe` with what it counted itself.
fn compare(
    metrics: &MetricsClient,
    scenario: (&str, Accuracy),
    exe: &Path,
    sent: u64,
    received: u64,
    ended: Instant,
) -> Vec<Row> {
    let dirs = [("sent", sent), ("received", received)];
    let mut rows = Vec::new();
    // Non-zero directions first: polling them also gives the agent time for the others.
    for (direction, expected) in dirs.iter().filter(|(_, e)| *e > 0) {
        rows.push(wait_row(
            metrics, scenario, exe, direction, *expected, ended,
        ));
    }
    for (direction, _) in dirs.iter().filter(|(_, e)| *e == 0) {
        rows.push(zero_row(metrics, scenario, exe, direction, ended));
    }
    rows.sort_by_key(|r| r.direction != "sent");
    rows
}

/// Runs one scenario from its own executable copy and compares both directions.
fn check_scenario(
    net: &NetnsPair,
    metrics: &MetricsClient,
    sc: &Scenario,
    exe: &Path,
    start: Instant,
) -> Vec<Row> {
    let mut extra: Vec<String> = Vec::new();
    if sc.name == "slow_drip"
        && let Some(secs) = env_num("FSN_E2E_SLOW_DRIP_SECS")
    {
        extra.extend(["--secs".to_owned(), secs.to_string()]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let began = Instant::now();
    let scenario = (sc.name, sc.accuracy);
    let report = match run_client(net, exe, sc.name, &extra, CLIENT_TIMEOUT) {
        Ok(r) => r,
        Err(e) => {
            say(start, &format!("{}: scenario FAILED: {e:#}", sc.name));
            let msg = format!("scenario failed: {e:#}");
            return vec![
                error_row(sc.name, "sent", msg.clone()),
                error_row(sc.name, "received", msg),
            ];
        }
    };
    let ended = Instant::now();
    say(
        start,
        &format!(
            "{}: ran in {:.1}s, sent={} received={} ({})",
            sc.name,
            (ended - began).as_secs_f64(),
            report.sent,
            report.received,
            exe.display()
        ),
    );
    compare(metrics, scenario, exe, report.sent, report.received, ended)
}

#[test]
fn every_scenario_is_counted_per_executable() -> Result<()> {
    require_root!("network namespaces, raw sockets, eBPF");
    let start = Instant::now();
    let agent_bin = agent_binary()?;
    let scenarios = selected_scenarios();
    let workers = env_num("FSN_E2E_WORKERS").unwrap_or(4).max(1);

    // Copies first, before any child process exists (see `exe_copy` on ETXTBSY).
    let setup = Testbed::setup("fsn-e2e")?;
    let jobs: VecDeque<(&Scenario, PathBuf)> = scenarios
        .iter()
        .map(|sc| Ok((*sc, setup.copy("trafficgen", sc.name)?)))
        .collect::<Result<_>>()?;

    // The peer services run from a copy of their own too.
    let mut bed = setup
        .peer()
        .start()
        .context("start the peer services and the agent")?;
    let peer_exe = bed.peer_server().exe().to_owned();
    let net = bed.net();
    say(
        start,
        &format!(
            "peer ready in {} / {}; agent {} healthy on {} (log: {})",
            net.client,
            net.peer,
            agent_bin.display(),
            bed.addr(),
            bed.agent.log_path().display()
        ),
    );
    let metrics = bed.metrics();

    let total = jobs.len();
    let queue = Mutex::new(jobs);
    let results: Mutex<Vec<(usize, PathBuf, Vec<Row>)>> = Mutex::new(Vec::new());
    let order = |name: &str| scenarios.iter().position(|s| s.name == name).unwrap_or(0);
    thread::scope(|scope| {
        for _ in 0..workers.min(total as u64) {
            scope.spawn(|| {
                loop {
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let Some((sc, exe)) = job else { break };
                    let rows = check_scenario(net, &metrics, sc, &exe, start);
                    results.lock().unwrap_or_else(|p| p.into_inner()).push((
                        order(sc.name),
                        exe,
                        rows,
                    ));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(i, _, _)| *i);

    // The peer services' own counts, once every connection is finished.
    let mut extra_rows = Vec::new();
    match bed.peer_server().settled_stats() {
        Ok(stats) => {
            let settled = Instant::now();
            say(
                start,
                &format!(
                    "peer_serve: sent={} received={} ({})",
                    stats.sent,
                    stats.received,
                    peer_exe.display()
                ),
            );
            let rows = compare(
                &metrics,
                ("(peer) serve", Accuracy::Exact),
                &peer_exe,
                stats.sent,
                stats.received,
                settled,
            );
            results.push((usize::MAX, peer_exe.clone(), rows));
        }
        Err(e) => extra_rows.push(error_row("(peer) serve", "-", format!("{e:#}"))),
    }

    // Final reading of every row: no counter may have moved past its expectation since.
    match metrics.scrape() {
        Ok(samples) => {
            for (_, exe, rows) in &mut results {
                let exe = exe.to_string_lossy();
                for r in rows.iter_mut().filter(|r| r.expected.is_some()) {
                    if r.error.is_none() {
                        r.reported = bytes_for(&samples, &exe, &r.direction);
                    }
                }
            }
        }
        Err(e) => extra_rows.push(error_row("(final scrape)", "-", format!("{e:#}"))),
    }

    let mut report = Report {
        rows: results
            .into_iter()
            .flat_map(|(_, _, rows)| rows)
            .chain(extra_rows)
            .collect(),
    };
    for (what, check) in [
        ("(agent)", bed.agent.check_running()),
        ("(peer)", bed.peer_server().check_running()),
    ] {
        if let Err(e) = check {
            report.rows.push(error_row(what, "-", format!("{e:#}")));
        }
    }
    let table = report.render();
    say(
        start,
        &format!("done, {} scenarios\n{table}", scenarios.len()),
    );
    let failures: Vec<String> = report
        .failures()
        .iter()
        .map(|r| {
            let numbers = r.expected.map_or_else(
                || "no expectation".to_owned(),
                |e| format!("{} ({})", difference(e, r.reported), r.accuracy.label()),
            );
            let error = r
                .error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            format!("{} {}: {numbers}{error}", r.scenario, r.direction)
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} rows disagree:\n  {}\n\n{table}",
        failures.len(),
        report.rows.len(),
        failures.join("\n  ")
    );
    Ok(())
}
