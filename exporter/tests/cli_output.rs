//! What the binary prints before it loads anything: `--version`, and its log
//! lines in both `--log.format`s, written to a pipe (not a terminal), as a
//! service manager or a log shipper reads them. No root needed: a missing
//! configuration file is logged and the agent exits at once.

use std::process::{Command, Output};

fn fleetsnitch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetsnitch"))
        .args(args)
        // RUST_LOG would override --log.level.
        .env_remove("RUST_LOG")
        .output()
        .expect("run fleetsnitch")
}

#[test]
fn version_names_revision_build_date_and_rustc() {
    let output = fleetsnitch(&["--version"]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.starts_with(&format!("fleetsnitch {}\n", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let field = |name: &str| -> String {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} line in:\n{text}"))
            .trim()
            .to_owned()
    };
    let revision = field("revision");
    let checkout = concat!(env!("CARGO_MANIFEST_DIR"), "/../.git");
    if std::path::Path::new(checkout).exists() {
        // A git checkout records its commit: 40 hex digits.
        assert!(
            revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()),
            "revision {revision:?}"
        );
    } else {
        // A source tarball: nothing to know it from.
        assert_eq!(revision, "unknown");
    }
    assert!(!field("branch").is_empty());
    let date = field("build date");
    assert!(
        date.len() == 20 && date.starts_with("20") && date.ends_with('Z'),
        "build date {date:?}"
    );
    assert!(field("rustc").starts_with("rustc 1."), "{text}");
    assert!(field("target").contains("linux"), "{text}");
}

const MISSING: &str = "/nonexistent/fleetsnitch-cli-output.yaml";

#[test]
fn logfmt_is_the_default_and_carries_no_escape_codes() {
    let output = fleetsnitch(&["--config.file", MISSING]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let text = String::from_utf8(output.stderr).unwrap();
    assert!(!text.contains('\u{1b}'), "escape codes in: {text:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = lines[0];
    assert!(line.starts_with("time=20"), "{line}");
    assert!(line.contains(" level=error "), "{line}");
    assert!(line.contains(" target=fleetsnitch "), "{line}");
    assert!(
        line.contains(&format!(" msg=\"cannot read config file {MISSING}: ")),
        "{line}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let output = fleetsnitch(&["--config.file", MISSING, "--log.format", "json"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let text = String::from_utf8(output.stderr).unwrap();
    assert!(!text.contains('\u{1b}'), "escape codes in: {text:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let event: serde_json::Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}", lines[0]));
    assert_eq!(event["level"], "ERROR", "{event}");
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(&format!("cannot read config file {MISSING}"))),
        "{event}"
    );
    assert!(
        event["timestamp"]
            .as_str()
            .is_some_and(|t| t.starts_with("20"))
    );
}

#[test]
fn an_unknown_log_format_is_refused_naming_the_choices() {
    let output = fleetsnitch(&["--log.format", "xml"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let text = String::from_utf8(output.stderr).unwrap();
    assert!(
        text.contains("xml") && text.contains("logfmt") && text.contains("json"),
        "{text}"
    );
}
