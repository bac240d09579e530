//! The end of a `cargo test` run, counted: tests run, failed and skipped, each skip
//! with its reason. `scripts/test.sh` feeds the run's output to the `test-summary`
//! program, which prints [`Summary::render`].
//!
//! A skipped test passes outside a strict run (see [`crate::skip`]), so cargo counts
//! it as passed: the `SKIP: <binary>::<test>: <reason>` lines [`crate::skip::skip`]
//! prints are what tell it apart. In a strict run the same test failed, and counts as
//! skipped too (a skip is why it failed).

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What one `cargo test` run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Tests cargo reported as passed, skipped ones included.
    pub passed: u64,
    /// Tests cargo reported as failed, skipped ones (strict run) included.
    pub failed: u64,
    /// `#[ignore]` tests and ```` ```ignore ```` doc examples: never run.
    pub ignored: u64,
    /// `<binary>::<test>` of every failed test.
    pub failures: Vec<String>,
    /// `<binary>::<test>` -> why it was skipped.
    pub skips: BTreeMap<String, String>,
    /// Test binaries that started and never reported a result (crashed, killed).
    pub unfinished: Vec<String>,
}

/// `target/debug/deps/accuracy-0123456789abcdef)` or `...-hash` -> `accuracy`.
fn binary_of(running_line: &str) -> String {
    let inside = running_line
        .rsplit_once('(')
        .map_or(running_line, |(_, rest)| rest.trim_end_matches(')'));
    let file = inside.rsplit('/').next().unwrap_or(inside);
    match file.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name.to_owned()
        }
        _ => file.to_owned(),
    }
}

/// `N passed; M failed; K ignored; ...` -> (N, M, K).
fn counts(result_line: &str) -> (u64, u64, u64) {
    let mut found = (0, 0, 0);
    for part in result_line.split([';', '.']) {
        let mut words = part.split_whitespace();
        let (Some(number), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(number) = number.parse::<u64>() else {
            continue;
        };
        match what {
            "passed" => found.0 = number,
            "failed" => found.1 = number,
            "ignored" => found.2 = number,
            _ => {}
        }
    }
    found
}

impl Summary {
    /// Reads the combined standard output and error of `cargo test`.
    pub fn parse(output: &str) -> Self {
        let mut summary = Self::default();
        let mut binary: Option<String> = None;
        let mut reported = true;
        let mut in_failure_list = false;
        for line in output.lines() {
            let trimmed = line.trim();
            if let Some(rest) = trimmed.strip_prefix("Running ") {
                if let (false, Some(previous)) = (reported, binary.take()) {
                    summary.unfinished.push(previous);
                }
                binary = Some(binary_of(rest));
                reported = false;
                in_failure_list = false;
                continue;
            }
            if let Some(crate_name) = trimmed.strip_prefix("Doc-tests ") {
                if let (false, Some(previous)) = (reported, binary.take()) {
                    summary.unfinished.push(previous);
                }
                binary = Some(format!("doc-tests {crate_name}"));
                reported = false;
                in_failure_list = false;
                continue;
            }
            if let Some(rest) = trimmed.strip_prefix("SKIP: ") {
                let (test, reason) = rest.split_once(": ").unwrap_or((rest, "no reason given"));
                summary
                    .skips
                    .entry(test.to_owned())
                    .or_insert_with(|| reason.to_owned());
                continue;
            }
            if trimmed.starts_with("test result: ") {
                let (passed, failed, ignored) = counts(trimmed);
                summary.passed += passed;
                summary.failed += failed;
                summary.ignored += ignored;
                reported = true;
                in_failure_list = false;
                continue;
            }
            if trimmed == "failures:" {
                in_failure_list = true;
                continue;
            }
            if in_failure_list {
                // The list of names: four spaces and a test path. The first
                // `failures:` block (each test's output) starts with `----`.
                match line.strip_prefix("    ") {
                    Some(name) if !name.trim().is_empty() && !name.contains(' ') => {
                        let prefix = binary.as_deref().unwrap_or("?");
                        summary.failures.push(format!("{prefix}::{}", name.trim()));
                    }
                    _ => in_failure_list = false,
                }
            }
        }
        if let (false, Some(previous)) = (reported, binary) {
            summary.unfinished.push(previous);
        }
        summary.failures.sort();
        summary.failures.dedup();
        summary
    }

    /// Skips whose test failed (a strict run) and skips whose test passed.
    fn split_skips(&self) -> (u64, u64) {
        let failed = self
            .skips
            .keys()
            .filter(|test| self.failures.contains(test))
            .count() as u64;
        (failed, self.skips.len() as u64 - failed)
    }

    /// Tests that ran to a verdict of their own: passed, and failed for a reason
    /// other than a skip.
    pub fn ran(&self) -> (u64, u64) {
        let (skipped_failed, skipped_passed) = self.split_skips();
        (
            self.passed.saturating_sub(skipped_passed),
            self.failed.saturating_sub(skipped_failed),
        )
    }

    /// Whether the run proves what it should: nothing failed, every binary finished,
    /// and, in a strict run, nothing was skipped or ignored.
    pub fn ok(&self, strict: bool) -> bool {
        let (_, failed) = self.ran();
        failed == 0
            && self.unfinished.is_empty()
            && !(strict && (!self.skips.is_empty() || self.ignored > 0))
            && (strict || self.skips.keys().all(|test| !self.failures.contains(test)))
    }

    /// The lines `scripts/test.sh` ends with.
    pub fn render(&self, strict: bool) -> String {
        let (passed, failed) = self.ran();
        let mut text = String::new();
        let _ = writeln!(
            text,
            "== tests: {} run ({passed} passed, {failed} failed), {} skipped, {} ignored{}",
            passed + failed,
            self.skips.len(),
            self.ignored,
            if strict {
                " -- strict run: a skip or an ignored test fails it"
            } else {
                " -- not strict (FSN_E2E_STRICT=0): skips pass"
            }
        );
        for test in &self.failures {
            if !self.skips.contains_key(test) {
                let _ = writeln!(text, "   failed   {test}");
            }
        }
        for (test, reason) in &self.skips {
            let _ = writeln!(text, "   skipped  {test}: {reason}");
        }
        for binary in &self.unfinished {
            let _ = writeln!(
                text,
                "   crashed  {binary}: the test binary ended without a result"
            );
        }
        if self.passed + self.failed + self.ignored == 0 && self.unfinished.is_empty() {
            let _ = writeln!(
                text,
                "   no test result in the output: cargo test stopped before running tests"
            );
        }
        let _ = write!(
            text,
            "== {}",
            if self.ok(strict) && self.passed + self.failed > 0 {
                "PASS"
            } else {
                "FAIL"
            }
        );
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "\
   Compiling fleetsnitch-e2e v0.1.0
     Running unittests src/lib.rs (target/debug/deps/fleetsnitch_e2e-0123456789abcdef)

running 2 tests
test metrics::tests::tolerance ... ok
test skip::tests::strict ... ok

test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

     Running tests/accuracy.rs (target/debug/deps/accuracy-fedcba9876543210)

running 1 test
test every_scenario_is_counted_per_executable ... 
SKIP: accuracy::every_scenario_is_counted_per_executable: needs root (network namespaces)
ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

     Running tests/otlp.rs (target/debug/deps/otlp-aaaaaaaaaaaaaaaa)

running 2 tests
test delivers_over_grpc ... 
SKIP: otlp::delivers_over_grpc: rotel-agent not found
FAILED
test unreachable_collector_queues ... FAILED

failures:

---- delivers_over_grpc stdout ----
thread 'delivers_over_grpc' panicked at tests/src/otlp_collector.rs:40:9:
otlp::delivers_over_grpc cannot run here: rotel-agent not found

failures:
    delivers_over_grpc
    unreachable_collector_queues

test result: FAILED. 0 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.03s

     Running tests/stress.rs (target/debug/deps/stress-bbbbbbbbbbbbbbbb)

running 1 test
test a_full_traffic_map_loses_no_byte_uncounted ... error: test failed, to rerun pass `--test stress`
   Doc-tests fleetsnitch_e2e

running 1 test
test tests/src/lib.rs - Thing (line 3) ... ignored

test result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s
";

    #[test]
    fn passes_failures_skips_and_crashes_are_told_apart() {
        let summary = Summary::parse(RUN);
        assert_eq!((summary.passed, summary.failed, summary.ignored), (3, 2, 1));
        assert_eq!(
            summary.failures,
            vec![
                "otlp::delivers_over_grpc".to_owned(),
                "otlp::unreachable_collector_queues".to_owned()
            ]
        );
        assert_eq!(
            summary
                .skips
                .get("accuracy::every_scenario_is_counted_per_executable"),
            Some(&"needs root (network namespaces)".to_owned())
        );
        assert_eq!(summary.skips.len(), 2);
        assert_eq!(summary.unfinished, vec!["stress".to_owned()]);
        // The skipped test that passed is not a pass; the one that failed is a skip.
        assert_eq!(summary.ran(), (2, 1));
        assert!(!summary.ok(false));
        let text = summary.render(true);
        assert!(
            text.starts_with("== tests: 3 run (2 passed, 1 failed), 2 skipped, 1 ignored"),
            "{text}"
        );
        assert!(
            text.contains("   failed   otlp::unreachable_collector_queues\n"),
            "{text}"
        );
        assert!(
            text.contains("   skipped  otlp::delivers_over_grpc: rotel-agent not found\n"),
            "{text}"
        );
        assert!(text.contains("   crashed  stress"), "{text}");
        assert!(text.ends_with("== FAIL"), "{text}");
    }

    #[test]
    fn a_skip_that_passed_fails_only_a_strict_run() {
        let run = "\
     Running tests/accuracy.rs (target/debug/deps/accuracy-fedcba9876543210)
test every_scenario_is_counted_per_executable ... 
SKIP: accuracy::every_scenario_is_counted_per_executable: needs root (eBPF)
ok
test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s
";
        let summary = Summary::parse(run);
        assert_eq!(summary.ran(), (0, 0));
        assert!(summary.ok(false));
        assert!(!summary.ok(true));
        assert!(
            summary
                .render(false)
                .contains("0 run (0 passed, 0 failed), 1 skipped")
        );
    }

    #[test]
    fn a_clean_run_passes() {
        let run = "\
     Running tests/journal.rs (target/debug/deps/journal-fedcba9876543210)
test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9.01s
";
        let summary = Summary::parse(run);
        assert!(summary.ok(true));
        assert!(summary.render(true).ends_with("== PASS"));
    }

    #[test]
    fn no_result_at_all_is_a_failure() {
        let summary = Summary::parse("error[E0425]: cannot find value `x` in this scope\n");
        assert!(
            summary
                .render(true)
                .contains("no test result in the output")
        );
        assert!(summary.render(true).ends_with("== FAIL"));
    }
}
