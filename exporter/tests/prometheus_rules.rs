//! The shipped alerting rules parse and pass their `promtool test rules` unit tests.

use std::{path::PathBuf, process::Command};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .output()
    {
        Ok(output) => Some(output),
        Err(error) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: promtool not runnable ({error}); scripts/setup.sh installs it");
            None
        }
        Err(error) => panic!("promtool is required in CI: {error}"),
    }
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
