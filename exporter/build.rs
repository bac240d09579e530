//! Compiles the kernel programs in `ebpf/bpf/` with clang into `$OUT_DIR`.
//!
//! The programs are C because reading kernel structures portably needs CO-RE
//! relocations (`preserve_access_index`), which only clang emits; aya applies
//! them at load time from the running kernel's BTF.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const SOURCES: &[&str] = &["fleetsnitch.bpf.c", "dns.bpf.c"];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let bpf_dir = manifest_dir.join("../ebpf/bpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo::rerun-if-changed={}", bpf_dir.display());
    println!("cargo::rerun-if-env-changed=CLANG");

    let clang = find_clang();
    for source in SOURCES {
        let object = out_dir.join(source.replace(".c", ".o"));
        compile(&clang, &bpf_dir, &bpf_dir.join(source), &object);
    }
}

/// `$CLANG`, else the first of the clang versions known to emit good BTF.
fn find_clang() -> String {
    if let Ok(clang) = env::var("CLANG") {
        return clang;
    }
    for candidate in [
        "clang-16", "clang-17", "clang-18", "clang-19", "clang-15", "clang",
    ] {
        let found = Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success());
        if found {
            return candidate.to_owned();
        }
    }
    panic!(
        "no clang found to build the eBPF programs: install clang-16 and libbpf-dev \
         (scripts/setup.sh does), or set CLANG to a clang binary"
    );
}

/// Debian keeps <asm/types.h>, which the UAPI headers need, per architecture.
fn multiarch_include() -> Option<PathBuf> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").ok()?;
    let dir = PathBuf::from(format!("/usr/include/{arch}-linux-gnu"));
    dir.is_dir().then_some(dir)
}

/// The kernel's name for the target architecture, for libbpf's bpf_tracing.h.
fn kernel_arch() -> &'static str {
    match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "arm64",
        Ok("riscv64") => "riscv",
        Ok("s390x") => "s390",
        Ok("powerpc64") => "powerpc",
        _ => "x86",
    }
}

fn compile(clang: &str, include_dir: &Path, source: &Path, object: &Path) {
    let mut command = Command::new(clang);
    command
        .args(["-g", "-O2", "-target", "bpf"])
        .arg(format!("-D__TARGET_ARCH_{}", kernel_arch()))
        .args(["-Wall", "-Werror", "-mcpu=v3"])
        .arg("-I")
        .arg(include_dir);
    if let Some(dir) = multiarch_include() {
        command.arg("-idirafter").arg(dir);
    }
    let output = command
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(object)
        .output()
        .unwrap_or_else(|err| panic!("running {clang} on {}: {err}", source.display()));
    if !output.status.success() {
        panic!(
            "{clang} failed on {}:\n{}\n(libbpf headers come from the libbpf-dev package)",
            source.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
