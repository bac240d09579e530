/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Types shared between the kernel programs and the agent. Every struct and
 * FS_ constant here has a twin in ebpf/src/lib.rs, listed there with the
 * offset of each field; both sides assert the same layout at compile time
 * (this side through the generated header included at the end), so a change
 * to one that is not made to the other fails the build instead of corrupting
 * data.
 */
#ifndef FLEETSNITCH_H
#define FLEETSNITCH_H

#define FS_COMM_LEN 16
/* Path components walked per executable; deeper paths are marked truncated. */
#define FS_PATH_DEPTH 32
/* Bytes kept per path component (NUL included); longer names are marked truncated. */
#define FS_NAME_LEN 128

/*
 * Entries of the template of the `traffic` tables. The agent sizes its
 * tables by collector.traffic_map_entries; kernels before 5.10 accept only
 * tables of the template's size.
 */
#define FS_TRAFFIC_TABLE_ENTRIES 65536

/*
 * Entries of the template of the `socket_traffic` tables: a quarter of the
 * `traffic` tables' (the agent keeps that ratio for any
 * collector.traffic_map_entries; kernels before 5.10 take only this size).
 */
#define FS_SOCKET_TABLE_ENTRIES 16384

/*
 * Slots of each `flow_slots` table (tp_btf programs; see count_in_slots in
 * fleetsnitch.bpf.c): a power of two, the slot index is masked. Flows that
 * find no slot within FS_FLOW_SLOT_PROBES go to the `traffic` tables.
 */
#define FS_FLOW_SLOT_BITS 13
#define FS_FLOW_SLOTS (1 << FS_FLOW_SLOT_BITS)
#define FS_FLOW_SLOT_PROBES 4

/* fs_flow_slot.state: free; taken and being filled by one program; counting. */
#define FS_SLOT_EMPTY 0
#define FS_SLOT_CLAIMED 1
#define FS_SLOT_READY 2

/* Directions, used as indexes. */
#define FS_DIR_SENT 0
#define FS_DIR_RECEIVED 1

/* Indexes into the `stats` per-CPU array: what the kernel side could not do. */
enum fs_stat {
	/* A (process, socket) key could not be inserted into `traffic`. */
	FS_STAT_TRAFFIC_MAP_FULL = 0,
	/* Bytes that could not be attributed because `traffic` was full. */
	FS_STAT_UNATTRIBUTED_SENT_BYTES = 1,
	FS_STAT_UNATTRIBUTED_RECEIVED_BYTES = 2,
	/* An identity event did not fit in the ring buffer. */
	FS_STAT_EVENTS_LOST = 3,
	/* `announced` was full: identities may be announced more than once. */
	FS_STAT_ANNOUNCED_MAP_FULL = 4,
	/* `splice_calls` was full: a splice from a socket went uncounted. */
	FS_STAT_SPLICE_MAP_FULL = 5,
	/* An exec event did not fit in the `exec_events` ring buffer. */
	FS_STAT_EXEC_EVENTS_LOST = 6,
	FS_STAT_COUNT = 7,
};

/*
 * One (process, executable, flow) since the last drain. The flow is
 * the socket's addressing, not its kernel address: sockets are freed and
 * their memory reused by the next connection within microseconds, and a key
 * on the address would merge thousands of short connections into one.
 *
 * The executable is its file: device, inode number and the inode's
 * generation. A deleted file's inode number is soon given to a new file
 * (ext4 does at once); the generation (i_generation, drawn anew for each
 * inode by ext4, xfs, btrfs, tmpfs, f2fs) tells the two apart.
 */
struct fs_traffic_key {
	__u32 tgid;
	/* Zero: keeps exe_ino 8-byte aligned without hidden padding in a hashed key. */
	__u32 _pad;
	__u64 exe_ino;
	/* Kernel-internal dev_t of the executable's file system (MAJOR << 20 | MINOR). */
	__u32 exe_dev;
	__u16 family;
	__u16 protocol;
	/* Host byte order. */
	__u16 local_port;
	/* Network byte order, as the kernel keeps it. */
	__u16 remote_port;
	/* i_generation of the executable's inode; 0 where the file system sets none. */
	__u32 exe_inode_generation;
	/* IPv4 addresses fill the first four bytes; all zero when not connected. */
	__u8 remote_addr[16];
};

struct fs_traffic_value {
	__u64 bytes[2];
	__u16 sock_type;
	__u16 _pad[3];
	__u8 local_addr[16];
};

/*
 * Value of the `socket_traffic` tables, keyed by a socket's kernel address:
 * the flow the socket's first bytes since the last drain were counted for
 * (never changed afterwards), and its counters. Only bytes of exactly that
 * flow are added here (see count_by_socket in fleetsnitch.bpf.c).
 */
struct fs_socket_traffic {
	struct fs_traffic_key key;
	struct fs_traffic_value value;
};

/*
 * One slot of a `flow_slots` table: a flow and its counters. A program
 * claims an empty slot (compare-and-swap of `state`), writes the process
 * image, `key` and `value`, then marks it ready; from then on nothing but the
 * bytes changes, and only bytes of exactly that flow are added. The agent reads ready slots after
 * taking the table out, and zeroes them.
 */
struct fs_flow_slot {
	__u32 state;
	__u32 _pad;
	/* The process image that claimed the slot: its address space's id
	 * (x86 mm->context.ctx_id, never reused while the system runs). With
	 * the key's tgid it names one run of one program, so a call that
	 * matches it needs not read which executable it runs (see image_of).
	 * The agent does not read it. */
	__u64 image;
	struct fs_traffic_key key;
	struct fs_traffic_value value;
};

enum fs_event_kind {
	/* A process was seen doing network I/O for the first time (or after exec). */
	FS_EVENT_IDENTITY = 1,
	/* A process announced by FS_EVENT_IDENTITY exited. */
	FS_EVENT_EXIT = 2,
	/* A process executed a program (exec tracking, `exec_events` ring buffer). */
	FS_EVENT_EXEC = 3,
};

#define FS_IDENTITY_PATH_TRUNCATED 1u
#define FS_IDENTITY_NO_EXE 2u

struct fs_identity_event {
	__u32 kind;
	__u32 tgid;
	__u32 ppid;
	__u32 uid;
	__u64 start_time_ns;
	__u64 exe_ino;
	__u32 exe_dev;
	__u32 flags;
	__u64 parent_exe_ino;
	__u32 parent_exe_dev;
	/* Slots of `names` used, leaf first; empty slots mark mount crossings. */
	__u32 depth;
	char comm[FS_COMM_LEN];
	/* cgroup v2 id (the cgroup directory's inode) the process runs in. */
	__u64 cgroup_id;
	/* i_generation of the executable's and of the parent's executable's inode. */
	__u32 exe_inode_generation;
	__u32 parent_exe_inode_generation;
	char names[FS_PATH_DEPTH][FS_NAME_LEN];
};

/* Bytes of the command line kept per exec (NUL-separated arguments). */
#define FS_ARGS_LEN 1024
#define FS_EXEC_ARGS_TRUNCATED 1u
#define FS_EXEC_ARGS_UNREAD 2u

/* An exec: the new program's identity, then its command line when enabled. */
struct fs_exec_event {
	/* `kind` is FS_EVENT_EXEC. */
	struct fs_identity_event identity;
	/* Bytes of `args` filled. */
	__u32 args_len;
	__u32 args_flags;
	char args[FS_ARGS_LEN];
};

struct fs_exit_event {
	__u32 kind;
	__u32 tgid;
	__u64 start_time_ns;
};

/*
 * Generated by exporter/build.rs from the Rust twins (ebpf/src/lib.rs): a
 * _Static_assert of the size of every struct above, the offset and size of
 * each of its fields, and the value of every FS_ constant.
 */
#include "fleetsnitch.layout.h"

#endif
