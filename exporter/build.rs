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

const SOURCES: &[&str] = &["fleetsnitch.bpf.c"];

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

fn compile(clang: &str, include_dir: &Path, source: &Path, object: &Path) {
    let output = Command::new(clang)
        .args(["-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86"])
        .args(["-Wall", "-Werror", "-mcpu=v3"])
        .arg("-I")
        .arg(include_dir)
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
