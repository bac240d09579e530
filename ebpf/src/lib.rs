//! Types shared between fleetsnitch's kernel programs (`bpf/*.bpf.c`) and the agent.
//!
//! Each struct mirrors one in `bpf/fleetsnitch.h`. Both sides assert the same
//! sizes and offsets at compile time, so the two definitions cannot drift apart
//! silently. The object file itself is compiled by the agent's build script.
#![no_std]

use core::mem::{offset_of, size_of};

/// Length of a task's `comm`, NUL included.
pub const COMM_LEN: usize = 16;
/// Path components the kernel walks per executable.
pub const PATH_DEPTH: usize = 32;
/// Bytes kept per path component, NUL included.
pub const NAME_LEN: usize = 128;

/// Index of sent bytes in [`TrafficValue::bytes`].
pub const DIR_SENT: usize = 0;
/// Index of received bytes in [`TrafficValue::bytes`].
pub const DIR_RECEIVED: usize = 1;

/// Indexes into the `stats` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    TrafficMapFull = 0,
    UnattributedSentBytes = 1,
    UnattributedReceivedBytes = 2,
    EventsLost = 3,
    AnnouncedMapFull = 4,
    SpliceMapFull = 5,
    ExecEventsLost = 6,
}

impl Stat {
    /// Every counter, in index order.
    pub const ALL: [Stat; 7] = [
        Stat::TrafficMapFull,
        Stat::UnattributedSentBytes,
        Stat::UnattributedReceivedBytes,
        Stat::EventsLost,
        Stat::AnnouncedMapFull,
        Stat::SpliceMapFull,
        Stat::ExecEventsLost,
    ];
}

/// The single entry of the `config` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    pub generation: u32,
    pub _pad: u32,
}

/// Key of the `traffic` hash: one (process, executable, flow) per generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TrafficKey {
    pub tgid: u32,
    pub generation: u32,
    pub exe_ino: u64,
    /// Kernel-internal `dev_t` (`MAJOR << 20 | MINOR`).
    pub exe_dev: u32,
    pub family: u16,
    pub protocol: u16,
    /// Host byte order.
    pub local_port: u16,
    /// Network byte order, as the kernel keeps it.
    pub remote_port: u16,
    pub _pad: u32,
    /// IPv4 addresses fill the first four bytes; all zero when not connected.
    pub remote_addr: [u8; 16],
}

/// Value of the `traffic` hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrafficValue {
    /// Bytes, indexed by [`DIR_SENT`] / [`DIR_RECEIVED`].
    pub bytes: [u64; 2],
    pub sock_type: u16,
    pub _pad: [u16; 3],
    pub local_addr: [u8; 16],
}

/// `kind` of a ring-buffer record.
pub const EVENT_IDENTITY: u32 = 1;
/// `kind` of a ring-buffer record.
pub const EVENT_EXIT: u32 = 2;

/// `kind` of a record of the `exec_events` ring buffer.
pub const EVENT_EXEC: u32 = 3;

/// The path did not fit in [`PATH_DEPTH`] components of [`NAME_LEN`] bytes.
pub const IDENTITY_PATH_TRUNCATED: u32 = 1;
/// The process has no executable (a kernel thread).
pub const IDENTITY_NO_EXE: u32 = 2;

/// A process seen doing network I/O for the first time, or after an exec.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IdentityEvent {
    pub kind: u32,
    pub tgid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub start_time_ns: u64,
    pub exe_ino: u64,
    pub exe_dev: u32,
    pub flags: u32,
    pub parent_exe_ino: u64,
    pub parent_exe_dev: u32,
    /// Filled entries of `names`, leaf first.
    pub depth: u32,
    pub comm: [u8; COMM_LEN],
    /// cgroup v2 id (the cgroup directory's inode) the process runs in.
    pub cgroup_id: u64,
    pub names: [[u8; NAME_LEN]; PATH_DEPTH],
}

/// Bytes of the command line kept per exec.
pub const ARGS_LEN: usize = 1024;
/// The command line was longer than [`ARGS_LEN`].
pub const EXEC_ARGS_TRUNCATED: u32 = 1;
/// The command line could not be read from the process's memory.
pub const EXEC_ARGS_UNREAD: u32 = 2;

/// A process executed a program (exec tracking).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    /// The new program's identity; `kind` is [`EVENT_EXEC`].
    pub identity: IdentityEvent,
    /// Bytes of `args` filled.
    pub args_len: u32,
    pub args_flags: u32,
    /// NUL-separated arguments, when `exec.record_command_lines` is on.
    pub args: [u8; ARGS_LEN],
}

/// An announced process exited.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    pub kind: u32,
    pub tgid: u32,
    pub start_time_ns: u64,
}

/// Bytes of a DNS answer copied to userspace (bpf/dns.h).
pub const DNS_PAYLOAD: usize = 1024;

/// A DNS answer delivered to a local socket (bpf/dns.bpf.c).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DnsEvent {
    /// Process that sent the query on this socket; 0 when unknown.
    pub tgid: u32,
    pub family: u16,
    pub protocol: u8,
    pub _pad: u8,
    /// Host byte order.
    pub local_port: u16,
    /// Bytes of `payload` filled.
    pub captured: u16,
    /// Length of the whole transport payload.
    pub payload_len: u32,
    pub socket_cookie: u64,
    /// IPv4 addresses fill the first four bytes.
    pub server_addr: [u8; 16],
    pub payload: [u8; DNS_PAYLOAD],
}

const _: () = assert!(size_of::<DnsEvent>() == 40 + DNS_PAYLOAD);

// The same numbers as the _Static_asserts in bpf/fleetsnitch.h.
const _: () = assert!(size_of::<Config>() == 8);
const _: () = assert!(size_of::<TrafficKey>() == 48);
const _: () = assert!(size_of::<TrafficValue>() == 40);
const _: () = assert!(size_of::<IdentityEvent>() == 80 + PATH_DEPTH * NAME_LEN);
const _: () = assert!(offset_of!(IdentityEvent, names) == 80);
const _: () = assert!(size_of::<ExitEvent>() == 16);
const _: () = assert!(size_of::<ExecEvent>() == 80 + PATH_DEPTH * NAME_LEN + 8 + ARGS_LEN);

#[cfg(feature = "user")]
mod pod {
    use super::{Config, DnsEvent, ExecEvent, ExitEvent, IdentityEvent, TrafficKey, TrafficValue};

    // SAFETY: plain `repr(C)` structs of integers with explicit padding fields,
    // valid for every bit pattern.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TrafficKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TrafficValue {}
    // SAFETY: ring buffer records: `repr(C)` integers and byte arrays with
    // explicit padding, valid for every bit pattern.
    unsafe impl aya::Pod for IdentityEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ExitEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ExecEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DnsEvent {}
}
