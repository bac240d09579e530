//! Types shared between fleetsnitch's kernel programs (`bpf/*.bpf.c`) and the agent.
//!
//! Each struct mirrors one in `bpf/fleetsnitch.h` or `bpf/dns.h`. Their layouts
//! and the constants both sides use are listed once, in [`SHARED_STRUCTS`] and
//! [`SHARED_CONSTANTS`]: this crate asserts the offset of every field, and the
//! agent's build script turns the same lists into the `_Static_assert`s the C
//! headers include (see [`layout`]), so a change made to one side only fails
//! the build instead of corrupting data. The object files themselves are
//! compiled by the agent's build script.
#![no_std]

#[macro_use]
pub mod layout;

use layout::{ConstantLayout, StructLayout};

/// Length of a task's `comm`, NUL included.
pub const COMM_LEN: usize = 16;
/// Path components the kernel walks per executable.
pub const PATH_DEPTH: usize = 32;
/// Bytes kept per path component, NUL included.
pub const NAME_LEN: usize = 128;

/// Entries of the template of the `traffic` tables (see `bpf/fleetsnitch.h`).
pub const TRAFFIC_TABLE_ENTRIES: u32 = 65_536;

/// Entries of the template of the `socket_traffic` tables: a quarter of
/// [`TRAFFIC_TABLE_ENTRIES`].
pub const SOCKET_TABLE_ENTRIES: u32 = TRAFFIC_TABLE_ENTRIES / 4;

/// Bits of a `flow_slots` table's slot index (see `bpf/fleetsnitch.h`).
pub const FLOW_SLOT_BITS: u32 = 13;
/// Slots of each `flow_slots` table.
pub const FLOW_SLOTS: u32 = 1 << FLOW_SLOT_BITS;
/// Slots a flow probes before it goes to the `traffic` tables.
pub const FLOW_SLOT_PROBES: u32 = 4;
/// [`FlowSlot::state`]: free.
pub const SLOT_EMPTY: u32 = 0;
/// [`FlowSlot::state`]: taken by a program still filling it.
pub const SLOT_CLAIMED: u32 = 1;
/// [`FlowSlot::state`]: holds a flow and its counters.
pub const SLOT_READY: u32 = 2;

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

/// Key of the `traffic` tables: one (process, executable, flow) since the
/// last drain.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrafficKey {
    pub tgid: u32,
    /// Always zero.
    pub _pad: u32,
    pub exe_ino: u64,
    /// Kernel-internal `dev_t` (`MAJOR << 20 | MINOR`).
    pub exe_dev: u32,
    pub family: u16,
    pub protocol: u16,
    /// Host byte order.
    pub local_port: u16,
    /// Network byte order, as the kernel keeps it.
    pub remote_port: u16,
    /// `i_generation` of the executable's inode: a new file at a freed inode
    /// number has another one (0 where the file system sets none).
    pub exe_inode_generation: u32,
    /// IPv4 addresses fill the first four bytes; all zero when not connected.
    pub remote_addr: [u8; 16],
}

/// Value of the `traffic` tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrafficValue {
    /// Bytes, indexed by [`DIR_SENT`] / [`DIR_RECEIVED`].
    pub bytes: [u64; 2],
    pub sock_type: u16,
    pub _pad: [u16; 3],
    pub local_addr: [u8; 16],
}

/// Value of the `socket_traffic` tables (keyed by a socket's kernel
/// address): the flow the entry was created for, and its counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketTraffic {
    pub key: TrafficKey,
    pub value: TrafficValue,
}

/// One slot of a `flow_slots` table: a flow and its counters once `state`
/// is [`SLOT_READY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowSlot {
    pub state: u32,
    pub _pad: u32,
    /// Which image of the process claimed the slot: its address space's id
    /// (read by the programs only).
    pub image: u64,
    pub key: TrafficKey,
    pub value: TrafficValue,
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
    /// `i_generation` of the executable's inode.
    pub exe_inode_generation: u32,
    /// `i_generation` of the parent's executable's inode.
    pub parent_exe_inode_generation: u32,
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

/// Every struct shared with the C programs: field offsets, in order, padding
/// included. Adding a field means adding it here, in C and in Rust.
pub const SHARED_STRUCTS: &[StructLayout] = &[
    shared_struct!("fleetsnitch.h", fs_traffic_key = TrafficKey, size 48 {
        tgid @ 0,
        _pad @ 4,
        exe_ino @ 8,
        exe_dev @ 16,
        family @ 20,
        protocol @ 22,
        local_port @ 24,
        remote_port @ 26,
        exe_inode_generation @ 28,
        remote_addr @ 32,
    }),
    shared_struct!("fleetsnitch.h", fs_traffic_value = TrafficValue, size 40 {
        bytes @ 0,
        sock_type @ 16,
        _pad @ 18,
        local_addr @ 24,
    }),
    shared_struct!("fleetsnitch.h", fs_socket_traffic = SocketTraffic, size 88 {
        key @ 0,
        value @ 48,
    }),
    shared_struct!("fleetsnitch.h", fs_flow_slot = FlowSlot, size 104 {
        state @ 0,
        _pad @ 4,
        image @ 8,
        key @ 16,
        value @ 64,
    }),
    shared_struct!("fleetsnitch.h", fs_identity_event = IdentityEvent, size 4184 {
        kind @ 0,
        tgid @ 4,
        ppid @ 8,
        uid @ 12,
        start_time_ns @ 16,
        exe_ino @ 24,
        exe_dev @ 32,
        flags @ 36,
        parent_exe_ino @ 40,
        parent_exe_dev @ 48,
        depth @ 52,
        comm @ 56,
        cgroup_id @ 72,
        exe_inode_generation @ 80,
        parent_exe_inode_generation @ 84,
        names @ 88,
    }),
    shared_struct!("fleetsnitch.h", fs_exec_event = ExecEvent, size 5216 {
        identity @ 0,
        args_len @ 4184,
        args_flags @ 4188,
        args @ 4192,
    }),
    shared_struct!("fleetsnitch.h", fs_exit_event = ExitEvent, size 16 {
        kind @ 0,
        tgid @ 4,
        start_time_ns @ 8,
    }),
    shared_struct!("dns.h", fs_dns_event = DnsEvent, size 1064 {
        tgid @ 0,
        family @ 4,
        protocol @ 6,
        _pad @ 7,
        local_port @ 8,
        captured @ 10,
        payload_len @ 12,
        socket_cookie @ 16,
        server_addr @ 24,
        payload @ 40,
    }),
];

/// Every constant the C programs and the agent must agree on.
pub const SHARED_CONSTANTS: &[ConstantLayout] = &[
    shared_constant!("fleetsnitch.h", FS_COMM_LEN = COMM_LEN),
    shared_constant!("fleetsnitch.h", FS_PATH_DEPTH = PATH_DEPTH),
    shared_constant!("fleetsnitch.h", FS_NAME_LEN = NAME_LEN),
    shared_constant!(
        "fleetsnitch.h",
        FS_TRAFFIC_TABLE_ENTRIES = TRAFFIC_TABLE_ENTRIES
    ),
    shared_constant!(
        "fleetsnitch.h",
        FS_SOCKET_TABLE_ENTRIES = SOCKET_TABLE_ENTRIES
    ),
    shared_constant!("fleetsnitch.h", FS_FLOW_SLOT_BITS = FLOW_SLOT_BITS),
    shared_constant!("fleetsnitch.h", FS_FLOW_SLOTS = FLOW_SLOTS),
    shared_constant!("fleetsnitch.h", FS_FLOW_SLOT_PROBES = FLOW_SLOT_PROBES),
    shared_constant!("fleetsnitch.h", FS_SLOT_EMPTY = SLOT_EMPTY),
    shared_constant!("fleetsnitch.h", FS_SLOT_CLAIMED = SLOT_CLAIMED),
    shared_constant!("fleetsnitch.h", FS_SLOT_READY = SLOT_READY),
    shared_constant!("fleetsnitch.h", FS_DIR_SENT = DIR_SENT),
    shared_constant!("fleetsnitch.h", FS_DIR_RECEIVED = DIR_RECEIVED),
    shared_constant!(
        "fleetsnitch.h",
        FS_STAT_TRAFFIC_MAP_FULL = Stat::TrafficMapFull
    ),
    shared_constant!(
        "fleetsnitch.h",
        FS_STAT_UNATTRIBUTED_SENT_BYTES = Stat::UnattributedSentBytes
    ),
    shared_constant!(
        "fleetsnitch.h",
        FS_STAT_UNATTRIBUTED_RECEIVED_BYTES = Stat::UnattributedReceivedBytes
    ),
    shared_constant!("fleetsnitch.h", FS_STAT_EVENTS_LOST = Stat::EventsLost),
    shared_constant!(
        "fleetsnitch.h",
        FS_STAT_ANNOUNCED_MAP_FULL = Stat::AnnouncedMapFull
    ),
    shared_constant!(
        "fleetsnitch.h",
        FS_STAT_SPLICE_MAP_FULL = Stat::SpliceMapFull
    ),
    shared_constant!(
        "fleetsnitch.h",
        FS_STAT_EXEC_EVENTS_LOST = Stat::ExecEventsLost
    ),
    shared_constant!("fleetsnitch.h", FS_STAT_COUNT = Stat::ALL.len()),
    shared_constant!("fleetsnitch.h", FS_EVENT_IDENTITY = EVENT_IDENTITY),
    shared_constant!("fleetsnitch.h", FS_EVENT_EXIT = EVENT_EXIT),
    shared_constant!("fleetsnitch.h", FS_EVENT_EXEC = EVENT_EXEC),
    shared_constant!(
        "fleetsnitch.h",
        FS_IDENTITY_PATH_TRUNCATED = IDENTITY_PATH_TRUNCATED
    ),
    shared_constant!("fleetsnitch.h", FS_IDENTITY_NO_EXE = IDENTITY_NO_EXE),
    shared_constant!("fleetsnitch.h", FS_ARGS_LEN = ARGS_LEN),
    shared_constant!(
        "fleetsnitch.h",
        FS_EXEC_ARGS_TRUNCATED = EXEC_ARGS_TRUNCATED
    ),
    shared_constant!("fleetsnitch.h", FS_EXEC_ARGS_UNREAD = EXEC_ARGS_UNREAD),
    shared_constant!("dns.h", FS_DNS_PAYLOAD = DNS_PAYLOAD),
];

#[cfg(feature = "user")]
mod pod {
    use super::{
        DnsEvent, ExecEvent, ExitEvent, FlowSlot, IdentityEvent, SocketTraffic, TrafficKey,
        TrafficValue,
    };

    // SAFETY: plain `repr(C)` structs of integers with explicit padding fields,
    // valid for every bit pattern.
    unsafe impl aya::Pod for TrafficKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TrafficValue {}
    // SAFETY: `repr(C)`, two such structs, no implicit padding.
    unsafe impl aya::Pod for SocketTraffic {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowSlot {}
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
