//! `podrun`: starts a program the way a container runtime starts the chart's
//! DaemonSet pod, without a container runtime.
//!
//! ```text
//! podrun --root DIR --hostname NAME [--netns NAME] [--bind SRC:DST[:ro]]...
//!        [--cap NAME]... [--env KEY=VALUE]... [--arg-map FROM=TO]...
//!        -- PROGRAM [ARG]...
//! ```
//!
//! - the pod's network namespace (`--netns`, made by `ip netns add`) when
//!   given (the chart's `hostNetwork: false`);
//! - its own mount, UTS and cgroup namespaces; the host's PID namespace
//!   (`hostPID: true`), with a proc file system of that namespace at `/proc`;
//! - `DIR` as the root file system (the image), read-only
//!   (`readOnlyRootFilesystem: true`), entered with `pivot_root` so nothing of
//!   the host's tree is left reachable by path;
//! - a tmpfs `/dev` with the usual character devices, a read-only sysfs at
//!   `/sys`, then the `--bind` mounts in order (the chart's hostPath, ConfigMap
//!   and Secret volumes);
//! - `--hostname` as host name (the pod's name);
//! - root, with exactly the `--cap` capabilities (every other one dropped from
//!   the bounding set, so executing the program as root yields just these);
//! - `--env` added to the environment (`NODE_NAME`, ...), `HOSTNAME` set;
//! - `PROGRAM` is the image's path of the program to run; the host's path of
//!   the program that the harness passes first is replaced by it, and any
//!   argument equal to a `--arg-map` FROM becomes its TO (the harness's host
//!   paths become the pod's paths).
//!
//! It ends by executing the program, which keeps `podrun`'s pid.

use std::{
    ffi::{CString, OsStr},
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    process::exit,
};

/// Capability names as `capabilities(7)` numbers them (and Kubernetes spells them).
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

#[derive(Default)]
struct Pod {
    root: PathBuf,
    hostname: String,
    netns: Option<String>,
    binds: Vec<(PathBuf, PathBuf, bool)>,
    caps: Vec<usize>,
    env: Vec<(String, String)>,
    arg_map: Vec<(String, String)>,
    command: Vec<String>,
}

fn main() {
    let pod = match parse(std::env::args().skip(1).collect()) {
        Ok(pod) => pod,
        Err(message) => {
            eprintln!("podrun: {message}");
            exit(2);
        }
    };
    let error = run(&pod);
    eprintln!("podrun: {error}");
    exit(1);
}

fn parse(args: Vec<String>) -> Result<Pod, String> {
    let mut pod = Pod::default();
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        if flag == "--" {
            pod.command = args.collect();
            break;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--root" => pod.root = PathBuf::from(value),
            "--hostname" => pod.hostname = value,
            "--netns" => pod.netns = Some(value),
            "--bind" => {
                let mut parts = value.splitn(3, ':');
                let (Some(source), Some(target)) = (parts.next(), parts.next()) else {
                    return Err(format!("--bind {value}: expected SRC:DST[:ro]"));
                };
                let read_only = match parts.next() {
                    None | Some("rw") => false,
                    Some("ro") => true,
                    Some(other) => return Err(format!("--bind {value}: unknown option {other}")),
                };
                pod.binds
                    .push((PathBuf::from(source), PathBuf::from(target), read_only));
            }
            "--cap" => {
                let name = value.trim_start_matches("CAP_").to_ascii_uppercase();
                let number = CAPABILITIES
                    .iter()
                    .position(|known| *known == name)
                    .ok_or_else(|| format!("--cap {value}: unknown capability"))?;
                pod.caps.push(number);
            }
            "--env" => {
                let (key, val) = value
                    .split_once('=')
                    .ok_or_else(|| format!("--env {value}: expected KEY=VALUE"))?;
                pod.env.push((key.to_owned(), val.to_owned()));
            }
            "--arg-map" => {
                let (from, to) = value
                    .split_once('=')
                    .ok_or_else(|| format!("--arg-map {value}: expected FROM=TO"))?;
                pod.arg_map.push((from.to_owned(), to.to_owned()));
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if pod.root.as_os_str().is_empty() || pod.hostname.is_empty() {
        return Err("--root and --hostname are required".to_owned());
    }
    // PROGRAM, then the harness's own program path (replaced), then its arguments.
    if pod.command.len() < 2 {
        return Err("expected -- PROGRAM HOST-PROGRAM [ARG]...".to_owned());
    }
    Ok(pod)
}

/// Sets the pod up and executes its program; returns only on failure.
fn run(pod: &Pod) -> String {
    match setup(pod) {
        Ok(()) => {}
        Err(error) => return error,
    }
    let program = pod.command[0].clone();
    let mut argv = vec![program.clone()];
    for arg in &pod.command[2..] {
        let mapped = pod
            .arg_map
            .iter()
            .find(|(from, _)| from == arg)
            .map_or(arg.clone(), |(_, to)| to.clone());
        argv.push(mapped);
    }
    // SAFETY: single-threaded until exec; the environment is ours to change.
    unsafe {
        std::env::set_var("HOSTNAME", &pod.hostname);
        for (key, value) in &pod.env {
            std::env::set_var(key, value);
        }
    }
    let c_program = cstring(&program);
    let c_argv: Vec<CString> = argv.iter().map(|a| cstring(a)).collect();
    let mut pointers: Vec<*const libc::c_char> = c_argv.iter().map(|a| a.as_ptr()).collect();
    pointers.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and a NULL-terminated array that outlive the call.
    unsafe { libc::execv(c_program.as_ptr(), pointers.as_ptr()) };
    format!("exec {program}: {}", std::io::Error::last_os_error())
}

fn setup(pod: &Pod) -> Result<(), String> {
    if let Some(netns) = &pod.netns {
        let path = Path::new("/var/run/netns").join(netns);
        let file = fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: a valid descriptor of a network namespace.
        check(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
            "setns(network)",
        )?;
    }
    // SAFETY: plain system calls on this single-threaded process.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP) },
        "unshare(mount, uts, cgroup)",
    )?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let root = &pod.root;
    mount(Some(root), root, None, libc::MS_BIND | libc::MS_REC, None)?;
    let inside = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));

    let proc_dir = inside(Path::new("/proc"));
    mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    let dev = inside(Path::new("/dev"));
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("mode=755,size=65536k"),
    )?;
    for device in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(device);
        fs::write(&target, b"").map_err(|e| format!("{}: {e}", target.display()))?;
        mount(
            Some(&Path::new("/dev").join(device)),
            &target,
            None,
            libc::MS_BIND,
            None,
        )?;
    }
    let sys = inside(Path::new("/sys"));
    mount(
        Some(Path::new("sysfs")),
        &sys,
        Some("sysfs"),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    for (source, target, read_only) in &pod.binds {
        let target = inside(target);
        mount(
            Some(source),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        if *read_only {
            mount(
                None,
                &target,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                None,
            )?;
        }
    }
    // readOnlyRootFilesystem: the root mount only; volumes keep their own mode.
    mount(
        None,
        root,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
        None,
    )?;
    let name = pod.hostname.as_bytes();
    // SAFETY: a buffer of the given length.
    check(
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) },
        "sethostname",
    )?;
    std::env::set_current_dir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    let dot = cstring(".");
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one; the
    // detached unmount then leaves only the new root.
    check(
        unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as i32 },
        "pivot_root",
    )?;
    // SAFETY: unmounting the old root stacked on ".".
    check(
        unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) },
        "umount old root",
    )?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    drop_capabilities(&pod.caps)
}

/// Drops every capability but `keep` from the bounding set: executing a
/// program as root then yields exactly `keep` (permitted and effective).
fn drop_capabilities(keep: &[usize]) -> Result<(), String> {
    let last: usize = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .map_err(|e| format!("cap_last_cap: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("cap_last_cap: {e}"))?;
    for cap in (0..=last).filter(|cap| !keep.contains(cap)) {
        // SAFETY: a plain prctl; CAP_SETPCAP is still held until the last drop.
        check(
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) },
            &format!("drop capability {cap} from the bounding set"),
        )?;
    }
    Ok(())
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let c_source = source.map(|s| cstring_os(s.as_os_str()));
    let c_target = cstring_os(target.as_os_str());
    let c_fstype = fstype.map(cstring);
    let c_data = data.map(cstring);
    // SAFETY: NUL-terminated strings (or NULL) that outlive the call.
    let result = unsafe {
        libc::mount(
            c_source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            c_target.as_ptr(),
            c_fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            c_data
                .as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    check(
        result,
        &format!(
            "mount {} on {} ({})",
            source.map_or("none".into(), |s| s.display().to_string()),
            target.display(),
            fstype.unwrap_or("bind/remount")
        ),
    )
}

fn check(result: i32, what: &str) -> Result<(), String> {
    if result == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

fn cstring(text: &str) -> CString {
    CString::new(text).unwrap_or_else(|_| {
        eprintln!("podrun: NUL byte in {text:?}");
        exit(2)
    })
}

fn cstring_os(text: &OsStr) -> CString {
    CString::new(text.as_bytes()).unwrap_or_else(|_| {
        eprintln!("podrun: NUL byte in {text:?}");
        exit(2)
    })
}
