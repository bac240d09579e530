//! The benchmark's ceiling programs (`tests/bpf/ceiling.bpf.c`): a byte
//! counter on the agent's two hot tracepoints and on the hook of its DNS
//! capture (cgroup_skb ingress on the root cgroup) that does nothing else, so
//! the benchmark can say how far the agent is from the least any counter
//! there costs.
//!
//! The program is compiled when it is attached, with the clang the agent's own
//! build uses (`CLANG`, else the first of clang-16..19 found), so the product's
//! build does not carry a program only the benchmark loads.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use aya::{
    Btf, Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType},
};

use crate::{TempDir, cgroups, process};

/// Program name -> the tracepoint it attaches to (the agent's
/// `send_length_btf` / `recv_length_btf` hooks).
pub const PROGRAMS: [(&str, &str); 2] = [
    ("ceiling_send", "sock_send_length"),
    ("ceiling_recv", "sock_recv_length"),
];

/// The program on the DNS capture's hook (the agent's `dns_answers`).
pub const INGRESS_PROGRAM: &str = "ceiling_ingress";

/// Whether `name` is one of the ceiling's programs.
pub fn is_ceiling_program(name: &str) -> bool {
    name == INGRESS_PROGRAM || PROGRAMS.iter().any(|(program, _)| *program == name)
}

/// The ceiling programs, attached while this lives.
pub struct Ceiling {
    // Dropping the object detaches and unloads the programs.
    _ebpf: Ebpf,
    bytes: PerCpuArray<MapData, u64>,
}

impl Ceiling {
    /// Compiles, loads and attaches the ceiling program.
    pub fn attach() -> Result<Self> {
        let scratch = TempDir::new("ceiling")?;
        let object = scratch.path().join("ceiling.bpf.o");
        compile(&source(), &object)?;
        let bytes = std::fs::read(&object).with_context(|| format!("read {}", object.display()))?;
        let mut ebpf = Ebpf::load(&bytes).context("load the ceiling object")?;
        let btf = Btf::from_sys_fs().context("read the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
        for (name, tracepoint) in PROGRAMS {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the ceiling object"))?
                .try_into()
                .with_context(|| format!("program {name} is not a BTF tracepoint program"))?;
            program
                .load(tracepoint, &btf)
                .with_context(|| format!("load {name} for tp_btf/{tracepoint}"))?;
            program
                .attach()
                .with_context(|| format!("attach {name} to tp_btf/{tracepoint}"))?;
        }
        // The cgroup v2 root, where the agent attaches its DNS capture.
        let root = cgroups::cgroup2_mount()?;
        let cgroup = File::open(&root).with_context(|| format!("open {}", root.display()))?;
        let program: &mut CgroupSkb = ebpf
            .program_mut(INGRESS_PROGRAM)
            .with_context(|| format!("program {INGRESS_PROGRAM} missing from the ceiling object"))?
            .try_into()
            .with_context(|| format!("program {INGRESS_PROGRAM} is not a cgroup_skb program"))?;
        program
            .load()
            .with_context(|| format!("load {INGRESS_PROGRAM}"))?;
        // As the agent attaches `dns_answers`: the two never run together.
        program
            .attach(
                &cgroup,
                CgroupSkbAttachType::Ingress,
                CgroupAttachMode::Single,
            )
            .with_context(|| {
                format!(
                    "attach {INGRESS_PROGRAM} to {} (ingress; is an agent running?)",
                    root.display()
                )
            })?;
        let map = ebpf
            .take_map("ceiling_bytes")
            .context("map ceiling_bytes missing from the ceiling object")?;
        let bytes = PerCpuArray::try_from(map).context("ceiling_bytes is not a per-CPU array")?;
        Ok(Self { _ebpf: ebpf, bytes })
    }

    /// Bytes sent and received through every socket of the host since
    /// attaching, summed over CPUs.
    pub fn bytes(&self) -> Result<(u64, u64)> {
        Ok((self.slot(0)?, self.slot(1)?))
    }

    /// Bytes of the packets delivered to local sockets since attaching (IP
    /// headers included), summed over CPUs.
    pub fn delivered_bytes(&self) -> Result<u64> {
        self.slot(2)
    }

    fn slot(&self, index: u32) -> Result<u64> {
        let values = self
            .bytes
            .get(&index, 0)
            .with_context(|| format!("read ceiling_bytes[{index}]"))?;
        Ok(values.iter().sum())
    }
}

fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf/ceiling.bpf.c")
}

fn clang() -> Result<String> {
    if let Ok(clang) = std::env::var("CLANG") {
        return Ok(clang);
    }
    for candidate in ["clang-16", "clang-17", "clang-18", "clang-19", "clang"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success())
        {
            return Ok(candidate.to_owned());
        }
    }
    bail!(
        "no clang found to compile {} (scripts/setup.sh installs clang-16)",
        source().display()
    )
}

fn compile(source: &Path, object: &Path) -> Result<()> {
    let clang = clang()?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x86",
        "aarch64" => "arm64",
        other => other,
    };
    let mut command = Command::new(&clang);
    command
        .args([
            "-g", "-O2", "-target", "bpf", "-Wall", "-Werror", "-mcpu=v3",
        ])
        .arg(format!("-D__TARGET_ARCH_{arch}"));
    // Debian keeps <asm/types.h>, which the UAPI headers need, per architecture.
    let multiarch = PathBuf::from(format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH));
    if multiarch.is_dir() {
        command.arg("-idirafter").arg(multiarch);
    }
    command.arg("-c").arg(source).arg("-o").arg(object);
    let out = process::run_bounded(&mut command, Duration::from_secs(60))
        .with_context(|| format!("run {clang} on {}", source.display()))?;
    if !out.status.success() {
        bail!("{clang} failed on {}:\n{}", source.display(), out.stderr);
    }
    Ok(())
}
