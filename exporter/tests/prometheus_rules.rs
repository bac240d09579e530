//! The shipped alerting rules parse and pass their `promtool test rules` unit tests.

use std::{path::PathBuf, process::Command};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs promtool, or skips the test when it is not installed (through the suite's
/// one skip policy: in a strict run, CI, that fails naming promtool).
fn promtool(args: &[&str]) -> Option<std::process::Output> {
    let program = match fleetsnitch_e2e::skip::program("promtool", "Debian package prometheus") {
        Ok(found) => found?,
        Err(error) => panic!("{error:#}"),
    };
    let output = Command::new(&program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", program.display()));
    Some(output)
}

fn assert_success(output: std::process::Output) {
    assert!(
        output.status.success(),
        "promtool failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn shipped_rules_are_valid() {
    if let Some(output) = promtool(&[
        "check",
        "rules",
        "helm/fleetsnitch/rules/fleetsnitch.rules.yml",
    ]) {
        assert_success(output);
    }
}

#[test]
fn shipped_rules_pass_their_unit_tests() {
    if let Some(output) = promtool(&["test", "rules", "tests/rules/fleetsnitch.rules.test.yml"]) {
        assert_success(output);
    }
}

#[test]
fn fleet_rules_pass_their_unit_tests() {
    if let Some(output) = promtool(&["test", "rules", "tests/rules/fleet.rules.test.yml"]) {
        assert_success(output);
    }
}
