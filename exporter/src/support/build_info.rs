//! What this binary is: version, git revision and branch, build date, rustc
//! and target, as `exporter/build.rs` recorded them. `--version` prints them,
//! `fleetsnitch_build_info` exports them, the landing page names them.
//! Values the build could not know (a source tarball without `.git`) are
//! `unknown`.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const REVISION: &str = env!("FLEETSNITCH_REVISION");
pub const BRANCH: &str = env!("FLEETSNITCH_BRANCH");
pub const BUILD_DATE: &str = env!("FLEETSNITCH_BUILD_DATE");
/// `rustc --version` of the compiler that built the agent.
pub const RUSTC_VERSION: &str = env!("FLEETSNITCH_RUSTC_VERSION");
pub const TARGET: &str = env!("FLEETSNITCH_TARGET");

/// The `--version` text (clap prints the program name before it).
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\n  revision:   ",
    env!("FLEETSNITCH_REVISION"),
    "\n  branch:     ",
    env!("FLEETSNITCH_BRANCH"),
    "\n  build date: ",
    env!("FLEETSNITCH_BUILD_DATE"),
    "\n  rustc:      ",
    env!("FLEETSNITCH_RUSTC_VERSION"),
    "\n  target:     ",
    env!("FLEETSNITCH_TARGET"),
);

/// The rustc version number alone (`1.95.0` of `rustc 1.95.0 (hash date)`),
/// for the `rustversion` label.
pub fn rustc_version_number() -> &'static str {
    RUSTC_VERSION
        .strip_prefix("rustc ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or(RUSTC_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_recorded_every_field() {
        for (name, value) in [
            ("revision", REVISION),
            ("branch", BRANCH),
            ("build date", BUILD_DATE),
            ("rustc", RUSTC_VERSION),
            ("target", TARGET),
        ] {
            assert!(!value.is_empty(), "{name} is empty");
        }
        assert!(RUSTC_VERSION.starts_with("rustc "), "{RUSTC_VERSION}");
        assert!(
            rustc_version_number().starts_with("1."),
            "{}",
            rustc_version_number()
        );
        // YYYY-MM-DDThh:mm:ssZ
        assert_eq!(BUILD_DATE.len(), 20, "{BUILD_DATE}");
        assert!(BUILD_DATE.ends_with('Z'), "{BUILD_DATE}");
        assert!(LONG_VERSION.starts_with(VERSION));
    }
}
