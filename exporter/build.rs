//! Compiles the kernel programs in `ebpf/bpf/` with clang into `$OUT_DIR`.
//!
//! The programs are C because reading kernel structures portably needs CO-RE
//! relocations (`preserve_access_index`), which only clang emits; aya applies
//! them at load time from the running kernel's BTF.
//!
//! Before compiling, it writes `$OUT_DIR/include/<header>.layout.h` for each
//! header in `ebpf/bpf/`: `_Static_assert`s of the size and alignment of every
//! struct shared with the agent, the offset and size of each of its fields and
//! the value of each shared constant, all taken from the compiled Rust types
//! (`fleetsnitch_ebpf::SHARED_STRUCTS`, `SHARED_CONSTANTS`). Each header
//! includes its own, so clang refuses a C layout that differs from the Rust one.
//! (The build dependency is compiled for the build host; in a cross build the
//! offsets written in `ebpf/src/lib.rs` are also asserted for the target.)
//!
//! It also records what `--version` and `fleetsnitch_build_info` report: the
//! git revision and branch, the build date and the rustc version (see
//! [`emit_build_info`]).

use std::{
    collections::BTreeSet,
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use fleetsnitch_ebpf::{
    SHARED_CONSTANTS, SHARED_STRUCTS,
    layout::{ConstantLayout, StructLayout},
};

const SOURCES: &[&str] = &["fleetsnitch.bpf.c", "dns.bpf.c"];

/// Headers in `ebpf/bpf/` that declare the kernel's types, none of them shared
/// with the agent.
const KERNEL_HEADERS: &[&str] = &["kernel_types.h"];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let bpf_dir = manifest_dir.join("../ebpf/bpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo::rerun-if-changed={}", bpf_dir.display());
    println!("cargo::rerun-if-env-changed=CLANG");
    emit_build_info(&manifest_dir);
    pack_relative_relocations();

    let layout_dir = out_dir.join("include");
    if let Err(problem) = write_layout_headers(&bpf_dir, &layout_dir) {
        panic!("shared layouts (ebpf/src/lib.rs and ebpf/bpf/*.h) disagree: {problem}");
    }

    let clang = find_clang();
    for source in SOURCES {
        let object = out_dir.join(source.replace(".c", ".o"));
        compile(
            &clang,
            &[&bpf_dir, &layout_dir],
            &bpf_dir.join(source),
            &object,
        );
    }
}

/// The agent is a position-independent executable with some 34,000 relative
/// relocations: as RELA entries they take 0.8 MB that the loader reads at
/// every start and that stay resident; packed (DT_RELR, glibc 2.36 and
/// binutils 2.38 or later) they take a few kilobytes.
fn pack_relative_relocations() {
    let gnu_linux = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if gnu_linux {
        println!("cargo::rustc-link-arg-bin=fleetsnitch=-Wl,-z,pack-relative-relocs");
    }
}

/// Writes one `<stem>.layout.h` per shared header in `bpf_dir`, after checking
/// that every struct and `FS_` constant the header defines is listed on the
/// Rust side and that the header includes its layout file.
fn write_layout_headers(bpf_dir: &Path, layout_dir: &Path) -> Result<(), String> {
    let headers = shared_headers(bpf_dir)?;
    for listed in SHARED_STRUCTS
        .iter()
        .map(|s| s.header)
        .chain(SHARED_CONSTANTS.iter().map(|c| c.header))
    {
        if !headers.iter().any(|(name, _)| name == listed) {
            return Err(format!(
                "ebpf/src/lib.rs names the header {listed}, which is not in ebpf/bpf/"
            ));
        }
    }
    fs::create_dir_all(layout_dir)
        .map_err(|err| format!("creating {}: {err}", layout_dir.display()))?;
    for (name, text) in &headers {
        let structs: Vec<&StructLayout> =
            SHARED_STRUCTS.iter().filter(|s| s.header == name).collect();
        let constants: Vec<&ConstantLayout> = SHARED_CONSTANTS
            .iter()
            .filter(|c| c.header == name)
            .collect();
        check_header_is_listed(name, text, &structs, &constants)?;
        let layout_name = layout_header_name(name);
        let path = layout_dir.join(&layout_name);
        fs::write(&path, layout_header(name, &structs, &constants))
            .map_err(|err| format!("writing {}: {err}", path.display()))?;
    }
    Ok(())
}

/// Every `*.h` in `bpf_dir` but the kernel's, with its text, sorted by name.
fn shared_headers(bpf_dir: &Path) -> Result<Vec<(String, String)>, String> {
    let entries =
        fs::read_dir(bpf_dir).map_err(|err| format!("reading {}: {err}", bpf_dir.display()))?;
    let mut headers = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|err| format!("reading {}: {err}", bpf_dir.display()))?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".h") || KERNEL_HEADERS.contains(&name) {
            continue;
        }
        let text = fs::read_to_string(&path)
            .map_err(|err| format!("reading {}: {err}", path.display()))?;
        headers.push((name.to_owned(), text));
    }
    headers.sort();
    Ok(headers)
}

fn layout_header_name(header: &str) -> String {
    format!("{}.layout.h", header.trim_end_matches(".h"))
}

/// Fails when `header` defines a struct or an `FS_` constant that
/// `ebpf/src/lib.rs` does not list for it, or does not include its layout file.
fn check_header_is_listed(
    header: &str,
    text: &str,
    structs: &[&StructLayout],
    constants: &[&ConstantLayout],
) -> Result<(), String> {
    let mut c_structs = BTreeSet::new();
    let mut c_constants = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        // A definition (`struct name {`), not a use (`struct name member;`).
        if let Some(rest) = line.strip_prefix("struct ")
            && let Some(tag) = rest.strip_suffix('{')
        {
            c_structs.insert(tag.trim().to_owned());
        }
        // `#define FS_NAME value`; `FS_NAME = value,` inside an enum.
        let name = line
            .strip_prefix("#define ")
            .map(str::trim_start)
            .unwrap_or(line);
        if name.starts_with("FS_") {
            let end = name
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(name.len());
            c_constants.insert(name[..end].to_owned());
        }
    }
    for tag in &c_structs {
        if !structs.iter().any(|s| s.c_name == tag) {
            return Err(format!(
                "struct {tag} in ebpf/bpf/{header} has no twin in SHARED_STRUCTS (ebpf/src/lib.rs)"
            ));
        }
    }
    for name in &c_constants {
        if !constants.iter().any(|c| c.c_name == name) {
            return Err(format!(
                "{name} in ebpf/bpf/{header} has no twin in SHARED_CONSTANTS (ebpf/src/lib.rs)"
            ));
        }
    }
    let include = format!("#include \"{}\"", layout_header_name(header));
    let listed = !structs.is_empty() || !constants.is_empty();
    if listed && !text.lines().any(|line| line.trim() == include) {
        return Err(format!(
            "ebpf/bpf/{header} shares types with the agent but lacks `{include}` \
             after its definitions"
        ));
    }
    Ok(())
}

/// The text of `<stem>.layout.h`: one `_Static_assert` per number the two
/// sides must agree on, each message naming the struct and field.
fn layout_header(header: &str, structs: &[&StructLayout], constants: &[&ConstantLayout]) -> String {
    let guard = format!(
        "FLEETSNITCH_LAYOUT_{}",
        header.trim_end_matches(".h").to_uppercase()
    );
    let mut lines = vec![
        "/* Generated by exporter/build.rs from SHARED_STRUCTS and SHARED_CONSTANTS in".to_owned(),
        format!(" * ebpf/src/lib.rs: the layout ebpf/bpf/{header} must have. Do not edit. */"),
        format!("#ifndef {guard}"),
        format!("#define {guard}"),
    ];
    for s in structs {
        let (c, rust, size, align) = (s.c_name, s.rust_name, s.size, s.align);
        lines.push(String::new());
        lines.push(format!(
            "_Static_assert(sizeof(struct {c}) == {size}, \
             \"struct {c}: size is not {size}, the size of {rust} in ebpf/src/lib.rs\");"
        ));
        lines.push(format!(
            "_Static_assert(_Alignof(struct {c}) == {align}, \
             \"struct {c}: alignment is not {align}, that of {rust} in ebpf/src/lib.rs\");"
        ));
        for f in s.fields {
            let (name, offset, size) = (f.name, f.offset, f.size);
            lines.push(format!(
                "_Static_assert(__builtin_offsetof(struct {c}, {name}) == {offset}, \
                 \"struct {c}: field {name} is not at offset {offset}, \
                 where {rust}::{name} is in ebpf/src/lib.rs\");"
            ));
            lines.push(format!(
                "_Static_assert(sizeof(((struct {c} *)0)->{name}) == {size}, \
                 \"struct {c}: field {name} is not of size {size}, \
                 the size of {rust}::{name} in ebpf/src/lib.rs\");"
            ));
        }
    }
    if !constants.is_empty() {
        lines.push(String::new());
    }
    for k in constants {
        let (name, rust, value) = (k.c_name, k.rust_name, k.value);
        lines.push(format!(
            "_Static_assert({name} == {value}, \
             \"{name} is not {value}, the value of {rust} in ebpf/src/lib.rs\");"
        ));
    }
    lines.push(String::new());
    lines.push("#endif".to_owned());
    lines.push(String::new());
    lines.join("\n")
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

fn compile(clang: &str, include_dirs: &[&Path], source: &Path, object: &Path) {
    let mut command = Command::new(clang);
    command
        .args(["-g", "-O2", "-target", "bpf"])
        .arg(format!("-D__TARGET_ARCH_{}", kernel_arch()))
        .args(["-Wall", "-Werror", "-mcpu=v3"]);
    for dir in include_dirs {
        command.arg("-I").arg(dir);
    }
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

/// Sets `FLEETSNITCH_REVISION`, `FLEETSNITCH_BRANCH`, `FLEETSNITCH_BUILD_DATE`,
/// `FLEETSNITCH_RUSTC_VERSION` and `FLEETSNITCH_TARGET` for the crate
/// (`src/support/build_info.rs`).
///
/// The revision and branch come from git when the workspace is a git checkout
/// of its own; a build from a source tarball (no `.git`, or inside another
/// repository) says `unknown`, unless `FLEETSNITCH_REVISION` /
/// `FLEETSNITCH_BRANCH` are set in the build's environment (as a packaging
/// script or image build that knows them can do). The date honours
/// `SOURCE_DATE_EPOCH`, for reproducible builds; otherwise it is when this
/// script last ran (it reruns when HEAD moves).
fn emit_build_info(manifest_dir: &Path) {
    for variable in [
        "FLEETSNITCH_REVISION",
        "FLEETSNITCH_BRANCH",
        "SOURCE_DATE_EPOCH",
    ] {
        println!("cargo::rerun-if-env-changed={variable}");
    }
    let workspace = manifest_dir.join("..");
    let git = |args: &[&str]| -> Option<String> {
        let output = Command::new("git")
            .arg("-C")
            .arg(&workspace)
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
        (output.status.success() && !text.is_empty()).then_some(text)
    };
    // Only this workspace's own repository: a tarball unpacked inside some other
    // checkout must not report that checkout's commit.
    let own_repository = git(&["rev-parse", "--show-toplevel"])
        .and_then(|top| fs::canonicalize(top).ok())
        .zip(fs::canonicalize(&workspace).ok())
        .is_some_and(|(top, workspace)| top == workspace);
    let from_git = |args: &[&str]| if own_repository { git(args) } else { None };

    let revision = env::var("FLEETSNITCH_REVISION")
        .ok()
        .filter(|value| !value.is_empty())
        .or_else(|| from_git(&["rev-parse", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    let branch = env::var("FLEETSNITCH_BRANCH")
        .ok()
        .filter(|value| !value.is_empty())
        .or_else(|| from_git(&["rev-parse", "--abbrev-ref", "HEAD"]).filter(|b| b != "HEAD"))
        .unwrap_or_else(|| "unknown".to_owned());
    if own_repository {
        // Rerun when a commit is made or another branch is checked out. Only
        // files that exist: cargo takes a missing one as changed, and a
        // checkout whose refs were never packed has no packed-refs, so every
        // build would rerun this script and recompile the agent. (Packing
        // deletes the loose ref, which reruns it and picks up packed-refs.)
        let watch = |path: String| {
            let path = workspace.join(path);
            if path.exists() {
                println!("cargo::rerun-if-changed={}", path.display());
            }
        };
        for name in ["HEAD", "packed-refs"] {
            if let Some(path) = from_git(&["rev-parse", "--git-path", name]) {
                watch(path);
            }
        }
        if let Some(reference) = from_git(&["symbolic-ref", "-q", "HEAD"])
            && let Some(path) = from_git(&["rev-parse", "--git-path", &reference])
        {
            watch(path);
        }
    }

    let build_time = env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|epoch| epoch.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|since| since.as_secs())
                .unwrap_or_default()
        });
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let rustc_version = Command::new(&rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());

    println!("cargo::rustc-env=FLEETSNITCH_REVISION={revision}");
    println!("cargo::rustc-env=FLEETSNITCH_BRANCH={branch}");
    println!(
        "cargo::rustc-env=FLEETSNITCH_BUILD_DATE={}",
        rfc3339_utc(build_time)
    );
    println!("cargo::rustc-env=FLEETSNITCH_RUSTC_VERSION={rustc_version}");
    println!(
        "cargo::rustc-env=FLEETSNITCH_TARGET={}",
        env::var("TARGET").unwrap_or_else(|_| "unknown".to_owned())
    );
}

/// `seconds` since the epoch as `YYYY-MM-DDThh:mm:ssZ` (proleptic Gregorian,
/// from the day count; no date crate in the build script).
fn rfc3339_utc(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let second_of_day = seconds % 86_400;
    // Days since 0000-03-01, so that leap days fall at the end of a year.
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3_600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}
