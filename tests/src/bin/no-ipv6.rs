//! `no-ipv6 PROGRAM [ARGS...]`: runs PROGRAM as on a host booted with
//! `ipv6.disable=1`, where the kernel has no IPv6 socket family and
//! `socket(AF_INET6, ...)` fails with EAFNOSUPPORT. A seccomp filter, inherited
//! across exec, returns exactly that error for every `socket(AF_INET6, ...)`;
//! everything else is allowed. (`net.ipv6.conf.all.disable_ipv6=1` is not the
//! same: IPv6 sockets still exist there and `[::]` still binds.)

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context, Result, bail};

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64

/// Offsets in `struct seccomp_data`: nr, arch, then args[0] (its low 32 bits
/// first, little-endian).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;

const fn statement(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump_if_equal(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

fn refuse_ipv6_sockets() -> Result<()> {
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let mut program = [
        statement(load, ARCH),
        jump_if_equal(AUDIT_ARCH, 1, 0),
        statement(ret, libc::SECCOMP_RET_ALLOW),
        statement(load, NR),
        jump_if_equal(libc::SYS_socket as u32, 0, 3),
        statement(load, ARG0_LOW),
        jump_if_equal(libc::AF_INET6 as u32, 0, 1),
        statement(ret, libc::SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32),
        statement(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let filter = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: prctl with a filter that outlives the call (the kernel copies it).
    unsafe {
        // Root may install a filter without no_new_privs; anyone else needs it.
        if libc::geteuid() != 0 && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error()).context("PR_SET_NO_NEW_PRIVS");
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &filter as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("PR_SET_SECCOMP");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        bail!("usage: no-ipv6 PROGRAM [ARGS...]");
    };
    refuse_ipv6_sockets()?;
    let error = Command::new(&program).args(args).exec();
    Err(error).with_context(|| format!("exec {}", program.to_string_lossy()))
}
