//! What the host allows: preflight checks, capabilities, `--check`.

pub mod preflight;
pub mod privileges;
pub mod readiness;
