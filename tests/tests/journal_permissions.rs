//! The journal lists every program and peer of the host: a new one is created
//! owner-only (file 0600, directory 0700), and an existing one that others may
//! read (or whose directory others may write) is reported at start: a warning
//! naming the path and mode, and `fleetsnitch_journal_loose_permissions{path}`.
//! Needs root (the agent loads eBPF); skips otherwise.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use anyhow::{Result, ensure};
use fleetsnitch_e2e::{AgentGuard, Testbed, require_root, wait_until};

fn mode(path: &Path) -> Result<u32> {
    Ok(fs::metadata(path)?.permissions().mode() & 0o7777)
}

fn reported(agent: &AgentGuard, path: &Path) -> Result<bool> {
    let line = format!(
        "fleetsnitch_journal_loose_permissions{{path=\"{}\"}} 1",
        path.display()
    );
    Ok(agent.metrics().text()?.lines().any(|l| l == line))
}

/// The log without terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn loose_journal_permissions_are_reported_and_new_journals_are_owner_only() -> Result<()> {
    require_root!("the agent loads eBPF");
    let setup = Testbed::setup("fsn-journal-perms")?;
    let dir = setup.dir().join("state");
    let journal = dir.join("journal.db");

    // A new journal: created owner-only, nothing reported.
    let mut bed = setup.journal(&journal).start()?;
    {
        let agent = &bed.agent;
        wait_until(Duration::from_secs(30), "journal created", || {
            Ok(journal.exists())
        })?;
        ensure!(
            mode(&journal)? == 0o600,
            "new journal mode {:o}",
            mode(&journal)?
        );
        ensure!(mode(&dir)? == 0o700, "new directory mode {:o}", mode(&dir)?);
        ensure!(
            !agent
                .metrics()
                .text()?
                .contains("fleetsnitch_journal_loose_permissions{"),
            "an owner-only journal was reported"
        );
        ensure!(
            !agent.log_tail(200).contains("open to other users"),
            "{}",
            agent.log_tail(30)
        );
    }
    bed.agent.stop();

    // The same journal made world-readable, in a world-writable directory.
    fs::set_permissions(&journal, fs::Permissions::from_mode(0o644))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
    bed.restart()?;
    let agent = &bed.agent;
    wait_until(
        Duration::from_secs(30),
        "loose permissions reported",
        || Ok(reported(agent, &journal)? && reported(agent, &dir)?),
    )?;
    let log = strip_ansi(&agent.log_tail(200));
    for (path, mode) in [(&journal, "644"), (&dir, "777")] {
        let named = log.lines().any(|line| {
            line.contains("open to other users")
                && line
                    .split_whitespace()
                    .any(|field| field == format!("path={}", path.display()))
                && line
                    .split_whitespace()
                    .any(|field| field == format!("mode={mode}"))
        });
        ensure!(
            named,
            "no warning naming {} and mode {mode}:\n{log}",
            path.display()
        );
    }
    // Reported, not repaired: the operator decides.
    ensure!(mode(&journal)? == 0o644);
    Ok(())
}
