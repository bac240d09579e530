//! Checks made before anything is loaded, so a missing privilege or kernel
//! feature is one clear sentence instead of an errno from deep inside a load.

use std::{fs, path::Path};

/// Linux capability numbers (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub const BTF_PATH: &str = crate::kernel::btf::PATH;
pub const TRACEFS_PATH: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "fleetsnitch needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) to load its kernel \
         programs; this process has neither: run it as root or grant those capabilities \
         (effective set: {effective:#x})"
    )]
    MissingCapabilities { effective: u64 },
    #[error("cannot read this process's capabilities from /proc/self/status: {0}")]
    Status(std::io::Error),
    #[error(
        "tracefs is not mounted at {TRACEFS_PATH} and mounting it failed ({0}): classic \
         tracepoints cannot be attached; mount it with `mount -t tracefs nodev {TRACEFS_PATH}`"
    )]
    NoTracefs(std::io::Error),
    #[error(
        "this kernel exposes no BTF at {BTF_PATH}: fleetsnitch reads kernel structures through \
         CO-RE and needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
}

/// Effective capabilities of this process.
pub fn effective_capabilities() -> Result<u64, PreflightError> {
    let status = fs::read_to_string("/proc/self/status").map_err(PreflightError::Status)?;
    Ok(parse_cap_eff(&status).unwrap_or(0))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

fn has(set: u64, capability: u32) -> bool {
    set & (1 << capability) != 0
}

/// Whether `set` allows loading tracing programs.
pub fn can_load_bpf(set: u64) -> bool {
    has(set, CAP_SYS_ADMIN) || (has(set, CAP_BPF) && has(set, CAP_PERFMON))
}

/// Everything that must hold before loading.
pub fn check() -> Result<(), PreflightError> {
    let effective = effective_capabilities()?;
    if !can_load_bpf(effective) {
        return Err(PreflightError::MissingCapabilities { effective });
    }
    if !Path::new(BTF_PATH).exists() {
        return Err(PreflightError::NoBtf);
    }
    ensure_tracefs()
}

/// Mounts tracefs where the kernel expects it if nothing is there yet: aya
/// looks up tracepoint ids in it, and a fresh host or container may not have it.
fn ensure_tracefs() -> Result<(), PreflightError> {
    let tracefs = Path::new(TRACEFS_PATH);
    if tracefs.join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    let target = std::ffi::CString::new(TRACEFS_PATH).expect("no NUL in a constant");
    // SAFETY: NUL-terminated strings valid for the duration of the call.
    let result = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result != 0 {
        return Err(PreflightError::NoTracefs(std::io::Error::last_os_error()));
    }
    tracing::info!(path = TRACEFS_PATH, "mounted tracefs");
    Ok(())
}

/// Raises RLIMIT_MEMLOCK for kernels older than 5.11, which charge BPF maps to it.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit value for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot raise RLIMIT_MEMLOCK; only kernels before 5.11 need it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_capabilities_allow_loading() {
        let status = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert!(can_load_bpf(parse_cap_eff(status).unwrap()));
    }

    #[test]
    fn bpf_without_perfmon_is_not_enough() {
        assert!(!can_load_bpf(1 << CAP_BPF));
        assert!(can_load_bpf((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(can_load_bpf(1 << CAP_SYS_ADMIN));
        assert!(!can_load_bpf(0));
    }

    #[test]
    fn missing_capabilities_message_says_what_to_do() {
        let text = PreflightError::MissingCapabilities { effective: 0 }.to_string();
        assert!(text.contains("CAP_BPF") && text.contains("root"), "{text}");
    }
}
