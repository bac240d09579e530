//! Tests that cannot run here. Every skip of the suite goes through [`skip`], which
//! prints one `SKIP: <test>: <reason>` line and decides what a skip means: today the
//! test then passes. Making a skip fail (a strict mode for CI) is an edit of [`skip`]
//! alone.
//!
//! ```ignore
//! #[test]
//! fn counts_something() -> anyhow::Result<()> {
//!     require_root!("eBPF, network namespaces");
//!     // ...
//! }
//! ```

use anyhow::Result;

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

/// Reports that the current test cannot run here, as `SKIP: <test>: <reason>` on
/// stderr. `Ok` means the test returns now and passes; an error would make it fail
/// (the policy of a strict run, not in force yet).
pub fn skip(reason: &str) -> Result<()> {
    eprintln!("SKIP: {}: {reason}", current_test());
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

/// First line of a test that needs root: `require_root!("what for");`. Not root, it
/// reports a skip and returns from the test (which must return `anyhow::Result<()>`).
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
