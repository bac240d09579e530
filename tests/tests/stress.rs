//! Stress: more flows than the in-kernel traffic map holds, and more new
//! processes at once than the ring buffer can announce. Either nothing is
//! lost, or every loss is counted: bytes the map refused are in
//! `fleetsnitch_unattributed_bytes_total`, refusals in
//! `fleetsnitch_map_full_total`, lost announcements in
//! `fleetsnitch_events_lost_total`, and bytes whose executable could not be
//! named in `fleetsnitch_unresolved_bytes_total`. And one flow hammered
//! from every CPU across hundreds of drains is counted exactly.
//! Needs root (eBPF); skips otherwise.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use fleetsnitch_e2e::{Testbed, parse_samples, process, require_root, wait_until};

/// Runs a sweep copy; returns the bytes it says it sent.
fn run_sweep(exe: &Path, args: &[&str]) -> Result<u64> {
    let out = process::run_bounded(Command::new(exe).args(args), Duration::from_secs(60))?;
    ensure!(
        out.status.success(),
        "{} {args:?}: {}",
        exe.display(),
        out.stderr
    );
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("sweep output: {}", out.stdout))?;
    report["sent"]
        .as_u64()
        .context("no \"sent\" in sweep output")
}

fn total(text: &str, family: &str, label: Option<(&str, &str)>) -> Result<f64> {
    Ok(parse_samples(text, family)?
        .iter()
        .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v)))
        .map(|s| s.value)
        .sum())
}

#[test]
fn a_full_traffic_map_loses_no_byte_uncounted() -> Result<()> {
    require_root!("eBPF");
    let bed = Testbed::setup("fsn-stress-map")?
        .config("collector:\n  traffic_map_entries: 1024\n  drain_interval: 2s\n")
        .start()?;
    let before = bed.metrics().text()?;
    let sweeper = bed.copy("sweep", "flows")?;
    // 16,000 flows of one byte each, in well under one 2 s drain interval: the
    // 8,192 flow slots (tp_btf hooks) or the 256-entry socket table take
    // some, the 1,024-entry flow map must refuse most of the rest.
    let sent = run_sweep(
        &sweeper,
        &[
            "ports",
            "--peer",
            "127.0.0.1",
            "--first",
            "20000",
            "--count",
            "16000",
        ],
    )?;
    ensure!(sent == 16000, "the sweep sent {sent} bytes");

    let exe = sweeper.to_string_lossy().into_owned();
    let mut last = String::new();
    wait_until(Duration::from_secs(20), "attributed + unattributed", || {
        last = bed.metrics().text()?;
        let attributed = total(&last, "fleetsnitch_bytes_total", Some(("exe", &exe)))?;
        let unattributed = total(
            &last,
            "fleetsnitch_unattributed_bytes_total",
            Some(("direction", "sent")),
        )? - total(
            &before,
            "fleetsnitch_unattributed_bytes_total",
            Some(("direction", "sent")),
        )?;
        Ok(attributed + unattributed >= sent as f64 && attributed > 0.0)
    })?;
    let attributed = total(&last, "fleetsnitch_bytes_total", Some(("exe", &exe)))?;
    let missing = sent as f64 - attributed;
    let refused = total(
        &last,
        "fleetsnitch_map_full_total",
        Some(("map", "traffic")),
    )? - total(
        &before,
        "fleetsnitch_map_full_total",
        Some(("map", "traffic")),
    )?;
    eprintln!("{sent} one-byte flows: {attributed} attributed, {refused} insertions refused");
    ensure!(
        missing > 0.0,
        "the map never filled: the test proves nothing"
    );
    // Each refused flow is one byte of this sweep; other processes' refusals
    // during the sweep can only add to the count.
    ensure!(
        refused >= missing,
        "{missing} bytes were not attributed but only {refused} refusals were counted"
    );
    ensure!(
        attributed <= sent as f64,
        "more bytes attributed ({attributed}) than sent ({sent})"
    );
    Ok(())
}

#[test]
fn lost_announcements_are_counted_and_every_byte_is_accounted() -> Result<()> {
    require_root!("eBPF");
    // The smallest ring buffer: about 130 announcements of a three-name path
    // (a record carries only the path slots it fills).
    let mut bed = Testbed::setup("fsn-stress-ring")?
        .config("collector:\n  ring_buffer_bytes: 65536\n")
        .start()?;
    let before = bed.metrics().text()?;
    let burst = bed.copy("sweep", "burst")?;
    // The collector stuck while 300 new processes send: the 64 KiB ring holds
    // fewer than half of their announcements, the rest are lost whatever the
    // scheduling.
    let frozen = process::FrozenThread::freeze(bed.agent.pid(), "fleetsnitch-col")?;
    let sent = run_sweep(
        &burst,
        &["forks", "--peer", "127.0.0.1:9", "--count", "300"],
    )?;
    drop(frozen);
    let mut lost = 0.0;
    wait_until(
        Duration::from_secs(10),
        "lost announcements counted",
        || {
            let text = bed.metrics().text()?;
            lost = total(&text, "fleetsnitch_events_lost_total", None)?
                - total(&before, "fleetsnitch_events_lost_total", None)?;
            Ok(lost > 0.0)
        },
    )?;
    // Every child is a fork of one executable: its bytes are attributed to it
    // when any announcement of that executable arrived in time, else counted
    // as unresolved (exe="[unknown]"): never dropped.
    let exe = burst.to_string_lossy().into_owned();
    let mut last = String::new();
    let settled = wait_until(Duration::from_secs(20), "every byte accounted", || {
        last = bed.metrics().text()?;
        let attributed = total(&last, "fleetsnitch_bytes_total", Some(("exe", &exe)))?;
        let unresolved = total(
            &last,
            "fleetsnitch_unresolved_bytes_total",
            Some(("direction", "sent")),
        )? - total(
            &before,
            "fleetsnitch_unresolved_bytes_total",
            Some(("direction", "sent")),
        )?;
        Ok(attributed + unresolved >= sent as f64)
    });
    let attributed = total(&last, "fleetsnitch_bytes_total", Some(("exe", &exe)))?;
    eprintln!(
        "{sent} bytes from forked children, {lost} announcements lost, {attributed} attributed"
    );
    settled?;
    ensure!(
        attributed <= sent as f64 && attributed > 0.0,
        "{attributed} bytes attributed of {sent}"
    );
    Ok(())
}

/// One flow, added to from every CPU at once, drained ten times a second
/// for half a minute: every add lands in a table the agent reads exactly
/// once. A drain that reads an entry while a program still adds to it loses
/// that add (the programs run on while the agent takes a table out); the
/// total would then come up short.
#[test]
fn a_drain_loses_no_add_of_a_flow_hammered_across_hundreds_of_drains() -> Result<()> {
    require_root!("eBPF");
    let bed = Testbed::setup("fsn-stress-drain")?
        .config("collector:\n  drain_interval: 100ms\n")
        .start()?;
    let drains_before = total(&bed.metrics().text()?, "fleetsnitch_drains_total", None)?;
    let hammer = bed.copy("sweep", "hammer")?;
    // Four threads on one socket: more senders than this machine has cores,
    // so the collector drains while programs run on every CPU.
    let sent = run_sweep(&hammer, &["hammer", "--threads", "4", "--seconds", "30"])?;
    let drains = total(&bed.metrics().text()?, "fleetsnitch_drains_total", None)? - drains_before;
    let exe = hammer.to_string_lossy().into_owned();
    let sent_by = |text: &str| -> Result<f64> {
        Ok(parse_samples(text, "fleetsnitch_bytes_total")?
            .iter()
            .filter(|s| {
                s.labels.get("exe").map(String::as_str) == Some(exe.as_str())
                    && s.labels.get("direction").map(String::as_str) == Some("sent")
            })
            .map(|s| s.value)
            .sum())
    };
    let mut seen = 0.0;
    let settled = wait_until(Duration::from_secs(10), "every byte counted", || {
        seen = sent_by(&bed.metrics().text()?)?;
        Ok(seen >= sent as f64)
    });
    eprintln!(
        "{sent} bytes in 64-byte datagrams from 4 threads across {drains} drains: \
         expected {sent}, seen {seen}, diff {}",
        seen - sent as f64
    );
    ensure!(
        drains >= 200.0,
        "only {drains} drains while the flow was hammered: the test proves little"
    );
    ensure!(
        seen == sent as f64,
        "expected {sent} bytes, seen {seen}, diff {}",
        seen - sent as f64
    );
    settled
}

/// A `/proc/<pid>/status` memory field (`RssAnon`, `RssFile`...), in KiB.
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Nobody scrapes, traffic keeps bringing new peers and new processes: the
/// agent's memory levels off instead of growing with what it has seen (an
/// hour of a busy host, compressed into phases of new values).
#[test]
fn memory_levels_off_without_a_scraper() -> Result<()> {
    require_root!("eBPF");
    const PHASES: u16 = 8;
    // Phases before the caches and the allocator are judged settled.
    const SETTLING: usize = 4;
    const PORTS_PER_PHASE: u16 = 5_000;
    let mut bed = Testbed::setup("fsn-stress-memory")?
        .config("journal:\n  write_interval: 500ms\nmetrics:\n  bytes_labels: [remote_port]\n")
        .start()?;
    let pid = bed.agent.pid();
    let sweeper = bed.copy("sweep", "phases")?;
    let mut samples = Vec::new();
    let mut file_backed = Vec::new();
    for phase in 0..PHASES {
        let first = (1_024 + phase * PORTS_PER_PHASE).to_string();
        run_sweep(
            &sweeper,
            &[
                "ports",
                "--peer",
                "127.0.0.1",
                "--first",
                &first,
                "--count",
                &PORTS_PER_PHASE.to_string(),
            ],
        )?;
        run_sweep(
            &sweeper,
            &["forks", "--peer", "127.0.0.1:9", "--count", "300"],
        )?;
        // Drained, journaled and forgotten what exited.
        std::thread::sleep(Duration::from_secs(3));
        samples.push(status_kib(pid, "RssAnon")?);
        file_backed.push(status_kib(pid, "RssFile")?);
    }
    bed.agent.check_running()?;
    eprintln!(
        "agent anonymous RSS after each phase (KiB): {samples:?}; file-backed: {file_backed:?}"
    );
    // The first phases size the caches and the allocator; after that, phases
    // of new values must not keep adding memory. A leak is heap: anonymous
    // memory; it grows with every phase (a per-value leak of 64 bytes adds
    // 300 KiB a phase). The heap reaching its working set grows once, in one
    // phase, and then stays: a step, not a leak. So the median of the last
    // phases' growths is judged, and their total is bounded too. File-backed
    // pages are the agent's own binary paged in as code paths first run (the
    // debug build's are tens of MiB), not growth.
    let growths: Vec<i64> = samples[SETTLING - 1..]
        .windows(2)
        .map(|pair| pair[1] as i64 - pair[0] as i64)
        .collect();
    let mut sorted = growths.clone();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2];
    let total: i64 = growths.iter().sum();
    eprintln!(
        "growth per phase over the last {} phases (KiB): {growths:?}",
        growths.len()
    );
    ensure!(
        median <= 256,
        "anonymous RSS kept growing, by {median} KiB a phase (median) over the last {} phases of \
         new values: {samples:?}",
        growths.len()
    );
    ensure!(
        total <= 4 * 1024,
        "anonymous RSS grew by {total} KiB over the last {} phases of new values: {samples:?}",
        growths.len()
    );
    Ok(())
}
