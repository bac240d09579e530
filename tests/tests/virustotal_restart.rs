//! VirusTotal verdicts survive a restart (issue #16): the agent asks about a
//! program once, journals the verdict, and after a restart on the same
//! journal exports it again without a single request. A local server speaks
//! the v3 files API (the real service cannot be reached from here) and
//! counts what it is asked. On the host and in the chart's pod (where the
//! journal is the pod's volume). Needs root (eBPF).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fleetsnitch_e2e::{
    Testbed, parse_samples, require_root, run_loopback, servers::HttpStub, sha256_file,
};

/// Engines the server says flag every file.
const MALICIOUS: u32 = 3;

/// The v3 files API: every file is known, with [`MALICIOUS`] detections.
fn virustotal(ip: Ipv4Addr) -> Result<HttpStub> {
    HttpStub::start(ip, |path| {
        if path.starts_with("/api/v3/files/") {
            (
                200,
                "application/json",
                format!(
                    r#"{{"data":{{"type":"file","attributes":{{"last_analysis_stats":
                       {{"malicious":{MALICIOUS},"suspicious":0,"harmless":0,"undetected":60}}}}}}}}"#
                ),
            )
        } else {
            (
                404,
                "application/json",
                r#"{"error":{"code":"NotFoundError"}}"#.to_owned(),
            )
        }
    })
}

/// The detections `/metrics` shows for (exe, sha256), once shown.
fn detections(bed: &Testbed, exe: &str, sha256: &str) -> Result<Option<f64>> {
    Ok(
        parse_samples(&bed.metrics().text()?, "fleetsnitch_virustotal_detections")?
            .iter()
            .find(|s| {
                s.labels.get("exe").map(String::as_str) == Some(exe)
                    && s.labels.get("sha256").map(String::as_str) == Some(sha256)
            })
            .map(|s| s.value),
    )
}

fn counter(bed: &Testbed, family: &str) -> Result<f64> {
    Ok(parse_samples(&bed.metrics().text()?, family)?
        .iter()
        .map(|s| s.value)
        .sum())
}

/// Runs `exe` until its verdict is on `/metrics`.
fn wait_for_verdict(bed: &Testbed, exe: &std::path::Path, sha256: &str) -> Result<()> {
    let path = exe.to_str().context("exe path")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    run_loopback(exe, 2_000)?;
    loop {
        if let Some(value) = detections(bed, path, sha256)? {
            if value != f64::from(MALICIOUS) {
                bail!("{path}: {value} detections, the server said {MALICIOUS}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no VirusTotal verdict for {path} within 30 s; agent log:\n{}",
                bed.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Agent {
    OnTheHost,
    InThePod,
}

fn restart_asks_nothing_again(name: &str, agent: Agent) -> Result<()> {
    let mut setup = Testbed::setup(name)?;
    if agent == Agent::InThePod {
        setup = setup.in_pod()?;
    }
    let server = virustotal(setup.host_address())?;
    let exe = setup.copy("trafficgen", "asked-once")?;
    let sha256 = sha256_file(&exe)?;
    let mut bed = setup
        .config(format!(
            "journal:\n  write_interval: 200ms\n\
             virustotal:\n  api_key: test-key\n  base_url: http://{}/api/v3\n  request_interval: 100ms\n",
            server.addr
        ))
        .start()?;
    let asked = |server: &HttpStub| {
        server
            .requests()
            .iter()
            .filter(|path| path.ends_with(&sha256))
            .count()
    };

    wait_for_verdict(&bed, &exe, &sha256)?;
    if asked(&server) != 1 {
        bail!("asked {} times: {:?}", asked(&server), server.requests());
    }
    // The verdict is journaled before the agent stops (SIGTERM writes the
    // last window), and read back at the next start.
    bed.restart()?;
    wait_for_verdict(&bed, &exe, &sha256)?;
    let reused = counter(&bed, "fleetsnitch_virustotal_reused_verdicts_total")?;
    if asked(&server) != 1 || reused < 1.0 {
        bail!(
            "after the restart the verdict must come from the journal: asked {} times, \
             {reused} reused; requests {:?}\nagent log:\n{}",
            asked(&server),
            server.requests(),
            bed.log_tail(30)
        );
    }
    drop(bed);
    Ok(())
}

#[test]
fn after_a_restart_known_verdicts_are_exported_without_a_request() -> Result<()> {
    require_root!("eBPF");
    restart_asks_nothing_again("fsn-vt-restart", Agent::OnTheHost)
}

#[test]
fn in_the_charts_pod_known_verdicts_survive_a_restart() -> Result<()> {
    require_root!("eBPF, network and mount namespaces");
    restart_asks_nothing_again("fsn-vt-restart-pod", Agent::InThePod)
}
