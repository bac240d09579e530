//! Counts a `cargo test` run: `test-summary <output file>` prints how many tests ran,
//! failed and were skipped (each skip with its reason) and exits non-zero when the run
//! does not prove what it should (see `fleetsnitch_e2e::summary`). `scripts/test.sh`
//! ends with it.

use std::process::ExitCode;

use fleetsnitch_e2e::{skip, summary::Summary};

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: test-summary <file with the output of cargo test>");
        return ExitCode::from(2);
    };
    let output = match std::fs::read(&path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(error) => {
            eprintln!(
                "test-summary: cannot read {}: {error}",
                path.to_string_lossy()
            );
            return ExitCode::from(2);
        }
    };
    let summary = Summary::parse(&output);
    let strict = skip::strict();
    println!("{}", summary.render(strict));
    if summary.ok(strict) && summary.passed + summary.failed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
