//! Tests that cannot run here. Every skip of the suite goes through [`skip`], which
//! prints one `SKIP: <binary>::<test>: <reason>` line and decides what a skip means:
//!
//! - in a strict run (`FSN_E2E_STRICT=1`, which `scripts/test.sh` sets, or `CI=true`)
//!   a skip is a failure: [`skip`] returns an error naming the reason, and the test fails;
//! - otherwise (a developer's quick partial run, `FSN_E2E_STRICT=0`) the test returns
//!   and passes, and `scripts/test.sh` still counts it as skipped, with its reason.
//!
//! The `SKIP:` line goes straight to the process's standard error, past the test
//! harness's capture, so it shows up (and can be counted) whether the test passes or not.
//!
//! ```text
//! #[test]
//! fn counts_something() -> anyhow::Result<()> {
//!     require_root!("eBPF, network namespaces");
//!     let Some(prometheus) = skip::program("prometheus", "the prometheus package")? else {
//!         return Ok(());
//!     };
//!     // ...
//! }
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The environment variable that makes every skip a failure (`1`) or not (`0`).
pub const STRICT_VAR: &str = "FSN_E2E_STRICT";

/// Whether a skip fails the test: `FSN_E2E_STRICT=1`, or `CI` set to anything but
/// empty, `0` or `false` (CI services set `CI=true`). In CI a skip always fails,
/// whatever `FSN_E2E_STRICT` says.
pub fn strict() -> bool {
    strict_from(
        std::env::var(STRICT_VAR).ok().as_deref(),
        std::env::var("CI").ok().as_deref(),
    )
}

fn strict_from(strict: Option<&str>, ci: Option<&str>) -> bool {
    let on = |value: Option<&str>| {
        value.is_some_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
    };
    on(strict) || on(ci)
}

/// Whether this process runs as root (namespaces, raw sockets, eBPF and mounts need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The running test's name: libtest runs each test on a thread named after it.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .unwrap_or("?")
        .to_owned()
}

/// The test binary's name without cargo's hash (`accuracy`, `fleetsnitch_e2e`).
fn binary_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(Path::file_stem)
        .and_then(|stem| stem.to_str())
        .unwrap_or("?");
    strip_cargo_hash(stem).to_owned()
}

/// `accuracy-0123456789abcdef` -> `accuracy`.
fn strip_cargo_hash(stem: &str) -> &str {
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name
        }
        _ => stem,
    }
}

/// Reports that the current test cannot run here, as `SKIP: <binary>::<test>: <reason>`
/// on standard error. `Ok` means the test returns now and passes (not strict); in a
/// strict run it is an error naming the reason, and the test fails.
pub fn skip(reason: &str) -> Result<()> {
    let test = format!("{}::{}", binary_name(), current_test());
    // Unbuffered and uncaptured: the line shows up even when the test passes.
    let _ = writeln!(std::io::stderr().lock(), "\nSKIP: {test}: {reason}");
    if strict() {
        bail!(
            "{test} cannot run here: {reason}. A skip is a failure in a strict run \
             ({STRICT_VAR}=1 or CI=true); {STRICT_VAR}=0 turns that off outside CI"
        );
    }
    Ok(())
}

/// `Ok(true)` as root; otherwise reports a skip (see [`skip`]) naming what root is
/// needed for, and returns `Ok(false)`. Used through [`require_root!`](crate::require_root).
pub fn root_or_skip(needs: &str) -> Result<bool> {
    if is_root() {
        return Ok(true);
    }
    skip(&format!("needs root ({needs})"))?;
    Ok(false)
}

/// Finds `name` in `PATH`; when it is missing, reports a skip (see [`skip`]) naming
/// the program and `package`, the one that provides it (`scripts/setup.sh` installs
/// it), and returns `Ok(None)`.
pub fn program(name: &str, package: &str) -> Result<Option<PathBuf>> {
    if let Some(path) = find_in_path(name) {
        return Ok(Some(path));
    }
    skip(&format!(
        "{name} is not in PATH ({package}; scripts/setup.sh installs it)"
    ))?;
    Ok(None)
}

/// The first executable file called `name` in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// First line of a test that needs root: `require_root!("what for");`. Not root, it
/// reports a skip and returns from the test (which must return `anyhow::Result<()>`);
/// in a strict run the test fails, naming root.
#[macro_export]
macro_rules! require_root {
    ($needs:expr) => {
        if !$crate::skip::root_or_skip($needs)? {
            return Ok(());
        }
    };
}

/// Skips the rest of the test for `reason` (see [`skip`]): `skip_test!("why");`.
#[macro_export]
macro_rules! skip_test {
    ($reason:expr) => {{
        $crate::skip::skip($reason)?;
        return Ok(());
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_when_asked_or_in_ci() {
        assert!(!strict_from(None, None));
        assert!(strict_from(Some("1"), None));
        assert!(!strict_from(Some("0"), None));
        assert!(strict_from(None, Some("true")));
        assert!(strict_from(None, Some("1")));
        assert!(!strict_from(None, Some("false")));
        assert!(!strict_from(None, Some("")));
        // CI wins over a developer's switch.
        assert!(strict_from(Some("0"), Some("true")));
    }

    #[test]
    fn cargo_hash_is_stripped_from_binary_names() {
        assert_eq!(strip_cargo_hash("accuracy-0123456789abcdef"), "accuracy");
        assert_eq!(
            strip_cargo_hash("kernel_matrix-fedcba9876543210"),
            "kernel_matrix"
        );
        assert_eq!(strip_cargo_hash("rust_out"), "rust_out");
        assert_eq!(strip_cargo_hash("a-b"), "a-b");
    }

    #[test]
    fn programs_are_found_in_path() {
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("fsn-no-such-program").is_none());
    }
}
