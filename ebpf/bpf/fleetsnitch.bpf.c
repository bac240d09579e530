// SPDX-License-Identifier: GPL-2.0
/*
 * fleetsnitch kernel programs: count the bytes every process sends and
 * receives per socket, in the kernel, and announce each process's identity
 * once through a ring buffer.
 *
 * Hooks, in the order the agent prefers them (exporter/src/probes.rs holds the
 * table that picks one per kernel):
 *
 *  - tp_btf sock_send_length / sock_recv_length (Linux >= 6.3): fire in
 *    process context at the end of sock_sendmsg / sock_recvmsg with the socket
 *    and the returned length, for every path that ends there: send*, write,
 *    sendmmsg/recvmmsg, sendfile and splice *to* a socket, io_uring.
 *  - fexit on inet_sendmsg, inet6_sendmsg, packet_sendmsg (and tcp_sendpage,
 *    udp_sendpage before 6.5) and the recvmsg twins: the same information
 *    where BPF trampolines work but the tracepoints do not exist yet (see
 *    "modes 2 and 3" below for why not sock_sendmsg).
 *  - kprobe + kretprobe on the same functions: oldest fallback; the entry
 *    probe stashes the socket per thread for the return probe.
 *
 *  - tracepoints syscalls:sys_{enter,exit}_splice: splice *from* a TCP socket
 *    reads through tcp_read_sock, which never reaches sock_recvmsg, so it is
 *    counted from the splice syscall's return value instead; receive hooks
 *    skip threads inside splice so nothing is counted twice.
 *  - tp_btf / tracepoint sched_process_exit: forget announced processes.
 *  - tp_btf / tracepoint sched_process_exec (exec tracking, off by default):
 *    every executed program, through its own ring buffer.
 *
 * Counting happens in two tables, each in slot 0 of an array of maps. The
 * common case goes to a fast one: an array of flow slots for the tp_btf
 * programs (`flow_slots`), a hash keyed by the socket's kernel address for
 * the others (`socket_traffic`). What does not fit there goes to a hash keyed
 * by process, executable and flow (`traffic`). The agent drains by putting
 * empty tables in the slots and reading the ones it took out (see `traffic`
 * below).
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "fleetsnitch.h"

#define AF_INET 2
#define AF_INET6 10
#define AF_PACKET 17
#define MSG_PEEK 2
#define S_IFMT 00170000
#define S_IFSOCK 0140000

char LICENSE[] SEC("license") = "GPL";

/*
 * The counting table: bytes per (process, executable, flow) since the last
 * drain. The agent creates the tables (sized by
 * collector.traffic_map_entries) and drains by swapping the one in slot 0
 * for an empty one. The kernel returns from a map-in-map update only after
 * an RCU grace period, once every program that could still hold the old
 * table has finished: no add can land in a table after the agent took it
 * out, so reading and deleting its entries loses nothing. (A generation
 * flag in one shared table could not promise that: a program preempted
 * between reading the flag and adding would add to an entry already read.)
 */
/* Sizes, not types: the struct types reach BTF only as forward declarations
 * through a map-in-map template, which the loader cannot size. */
struct traffic_table {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FS_TRAFFIC_TABLE_ENTRIES);
	__uint(key_size, sizeof(struct fs_traffic_key));
	__uint(value_size, sizeof(struct fs_traffic_value));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct traffic_table);
} traffic SEC(".maps");

/*
 * The per-socket tables: the same swap, keyed by the socket's kernel address
 * (8 bytes hash several times faster than the 48-byte flow key, the largest
 * cost of a call). Each entry keeps the flow it was created for, and only
 * bytes of exactly that flow are added to it (see count_by_socket).
 */
struct socket_table {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FS_SOCKET_TABLE_ENTRIES);
	__uint(key_size, sizeof(__u64));
	__uint(value_size, sizeof(struct fs_socket_traffic));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct socket_table);
} socket_traffic SEC(".maps");

#define BPF_F_MMAPABLE (1U << 10)

/*
 * The tp_btf programs' tables: an array of FS_FLOW_SLOTS slots, open
 * addressing on the flow key (see count_in_slots). An array lookup is a few
 * inlined instructions where a hash lookup is a call (about 25 ns on CPUs
 * whose returns go through a safe-return thunk) plus hashing: the largest
 * share of a call's cost. Drained by the same swap as `traffic`; the agent
 * maps the table it took out (BPF_F_MMAPABLE) to read and zero it. The
 * other modes keep `socket_traffic`: on kernels before 5.12 the verifier
 * refuses the compare-and-swap a slot is claimed with, in any program of
 * the object it loads.
 */
struct flow_slot_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FS_FLOW_SLOTS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct fs_flow_slot));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct flow_slot_table);
} flow_slots SEC(".maps");

/* An executable file, as the traffic key names it. */
struct exe_file {
	__u64 ino;
	__u32 dev;
	__u32 inode_generation;
};

/* tgid -> executable file last announced for it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 32768);
	__type(key, __u32);
	__type(value, struct exe_file);
} announced SEC(".maps");

/*
 * Thread id -> the identity event being built for the `events` ring. An
 * announcement is sent with only the path slots it fills (a few hundred bytes
 * where the whole record is over 4 KiB), so a small ring holds as many as a
 * big one would of whole records; bpf_ringbuf_output() needs the record built
 * elsewhere first, and only a per-thread place is safe from every program
 * kind: fexit programs run preemptible, so two threads on one CPU could share
 * a per-CPU buffer. The agent sizes it (two per possible CPU); a full table
 * counts as a lost event, and the next packet announces again.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u64);
	__type(value, struct fs_identity_event);
} identity_scratch SEC(".maps");

/* An all-zero identity event: what a scratch entry starts from. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fs_identity_event);
} identity_blank SEC(".maps");

/* Thread id -> fd_in of a splice in progress. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __s32);
} splice_calls SEC(".maps");

/* Entries of splice_calls: receives skip the lookup while there are none. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __s64);
} splices_in_flight SEC(".maps");

/* Thread id -> socket of a hooked sendmsg/recvmsg/sendpage in progress (kprobe mode). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, __u64);
} kprobe_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FS_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/*
 * Exec tracking: one record per exec. Its own ring buffer, so a burst of
 * execs never crowds out the announcements traffic attribution needs. The
 * agent sizes it from exec.ring_buffer_bytes (a page when exec tracking is
 * off: its programs are then not attached).
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} exec_events SEC(".maps");

/* Set by the agent at load time (exec.record_command_lines). */
volatile const __u32 record_command_lines = 0;

static __always_inline void stat_add(__u32 index, __u64 amount)
{
	__u64 *counter = bpf_map_lookup_elem(&stats, &index);

	if (counter)
		*counter += amount;
}

/*
 * Reads on the hot path. A tp_btf program's socket is a BTF pointer, and so
 * is bpf_get_current_task_btf()'s task: their fields are read with plain
 * loads, which the verifier makes fault-safe, where the other modes pay one
 * bpf_probe_read_kernel call per field, several times the cost. `btf` is a
 * constant once inlined, so each program keeps only its own kind of read.
 */
#define HOT_READ(btf, src, a, ...) \
	((btf) ? ___arrow(src, a, ##__VA_ARGS__) : BPF_CORE_READ(src, a, ##__VA_ARGS__))

static __always_inline struct file *hot_task_exe_file(struct task_struct *task, bool btf)
{
	struct mm_struct *mm = HOT_READ(btf, task, mm);

	if (!mm)
		return NULL;
	return HOT_READ(btf, mm, exe_file);
}

/*
 * A file's identity: device, inode number and the inode's generation. The
 * number alone is reused for the next file created once the inode is freed;
 * the generation is drawn anew for each inode (0 on file systems that set
 * none, where the agent names traffic by its process instead).
 */
static __always_inline void hot_file_identity(struct file *file, __u64 *ino, __u32 *dev, __u32 *gen, bool btf)
{
	struct inode *inode;

	*ino = 0;
	*dev = 0;
	*gen = 0;
	if (!file)
		return;
	inode = HOT_READ(btf, file, f_inode);
	if (!inode)
		return;
	*ino = HOT_READ(btf, inode, i_ino);
	*dev = HOT_READ(btf, inode, i_sb, s_dev);
	*gen = HOT_READ(btf, inode, i_generation);
}

static __always_inline struct file *task_exe_file(struct task_struct *task)
{
	struct mm_struct *mm = BPF_CORE_READ(task, mm);

	if (!mm)
		return NULL;
	return BPF_CORE_READ(mm, exe_file);
}

static __always_inline void file_identity(struct file *file, __u64 *ino, __u32 *dev, __u32 *gen)
{
	hot_file_identity(file, ino, dev, gen, false);
}

/*
 * Walk the executable's dentries up to the root of the mount tree, crossing
 * mount points, and copy each name into its own slot (leaf first). Slot i is
 * written in iteration i whatever happens, so the verifier sees the same
 * state shape in every iteration and can prune: a separate depth counter
 * would make every path through the loop distinct. A mount crossing leaves
 * its slot empty; the agent skips empty slots.
 */
static __always_inline void fill_path(struct fs_identity_event *event, struct file *file)
{
	struct dentry *dentry = BPF_CORE_READ(file, f_path.dentry);
	struct vfsmount *vfsmnt = BPF_CORE_READ(file, f_path.mnt);
	__u32 mount_offset = bpf_core_field_offset(struct mount, mnt);
	struct mount *mnt = (void *)vfsmnt - mount_offset;

	event->depth = FS_PATH_DEPTH;
	for (__u32 slot = 0; slot < FS_PATH_DEPTH; slot++) {
		struct dentry *parent = BPF_CORE_READ(dentry, d_parent);

		event->names[slot][0] = 0;
		if (dentry == BPF_CORE_READ(vfsmnt, mnt_root) || dentry == parent) {
			struct mount *mnt_parent = BPF_CORE_READ(mnt, mnt_parent);

			if (mnt_parent == mnt || !mnt_parent) {
				event->depth = slot;
				return;
			}
			dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = mnt_parent;
			vfsmnt = (void *)mnt + mount_offset;
			continue;
		}
		const unsigned char *name = BPF_CORE_READ(dentry, d_name.name);

		if (bpf_probe_read_kernel_str(event->names[slot], FS_NAME_LEN, name) >= FS_NAME_LEN)
			event->flags |= FS_IDENTITY_PATH_TRUNCATED;
		dentry = parent;
	}
	/* Slots ran out before the root. */
	event->flags |= FS_IDENTITY_PATH_TRUNCATED;
}

/* Everything an identity event says about `task` and its executable. */
static __always_inline void fill_identity(struct fs_identity_event *event, __u32 kind, struct task_struct *task,
					  __u32 tgid, const struct exe_file *id, struct file *exe)
{
	event->kind = kind;
	event->tgid = tgid;
	event->uid = BPF_CORE_READ(task, cred, uid.val);
	event->start_time_ns = BPF_CORE_READ(task, start_time);
	event->exe_ino = id->ino;
	event->exe_dev = id->dev;
	event->exe_inode_generation = id->inode_generation;
	event->flags = 0;
	event->depth = 0;
	bpf_probe_read_kernel_str(event->comm, sizeof(event->comm), task->comm);

	struct task_struct *parent = BPF_CORE_READ(task, real_parent);

	event->ppid = BPF_CORE_READ(parent, tgid);
	/* Read now: a short-lived process's /proc/<pid>/cgroup is gone by the
	 * time the agent could look. */
	event->cgroup_id = bpf_get_current_cgroup_id();
	file_identity(task_exe_file(parent), &event->parent_exe_ino, &event->parent_exe_dev,
		      &event->parent_exe_inode_generation);

	if (exe)
		fill_path(event, exe);
	else
		event->flags |= FS_IDENTITY_NO_EXE;
}

/* Announce `task`'s identity once per (process, executable file). */
static __always_inline void announce(struct task_struct *task, __u32 tgid, const struct fs_traffic_key *key,
				     struct file *exe)
{
	struct exe_file id = {
		.ino = key->exe_ino,
		.dev = key->exe_dev,
		.inode_generation = key->exe_inode_generation,
	};
	struct exe_file *seen = bpf_map_lookup_elem(&announced, &tgid);

	if (seen && seen->ino == id.ino && seen->dev == id.dev && seen->inode_generation == id.inode_generation)
		return;

	__u64 thread = bpf_get_current_pid_tgid();
	const __u32 zero = 0;
	const struct fs_identity_event *blank = bpf_map_lookup_elem(&identity_blank, &zero);
	struct fs_identity_event *event = NULL;

	if (blank && bpf_map_update_elem(&identity_scratch, &thread, blank, BPF_ANY) == 0)
		event = bpf_map_lookup_elem(&identity_scratch, &thread);
	if (!event) {
		/* Not marked as announced, so the next packet tries again. */
		stat_add(FS_STAT_EVENTS_LOST, 1);
		bpf_map_delete_elem(&identity_scratch, &thread);
		return;
	}
	fill_identity(event, FS_EVENT_IDENTITY, task, tgid, &id, exe);

	/* The record up to its last filled path slot. */
	__u32 depth = event->depth;

	if (depth > FS_PATH_DEPTH)
		depth = FS_PATH_DEPTH;
	__u64 size = __builtin_offsetof(struct fs_identity_event, names) + (__u64)depth * FS_NAME_LEN;
	long sent = bpf_ringbuf_output(&events, event, size, 0);

	bpf_map_delete_elem(&identity_scratch, &thread);
	if (sent != 0) {
		stat_add(FS_STAT_EVENTS_LOST, 1);
		return;
	}
	if (bpf_map_update_elem(&announced, &tgid, &id, BPF_ANY) != 0)
		stat_add(FS_STAT_ANNOUNCED_MAP_FULL, 1);
}

/* The flow half of the key: family, protocol, ports and peer. */
static __always_inline void fill_flow(struct fs_traffic_key *key, struct sock *sk, __u16 family, bool btf)
{
	key->family = family;
	key->protocol = HOT_READ(btf, sk, sk_protocol);
	if (family == AF_PACKET)
		return;
	key->local_port = HOT_READ(btf, sk, __sk_common.skc_num);
	key->remote_port = HOT_READ(btf, sk, __sk_common.skc_dport);
	if (btf) {
		if (family == AF_INET)
			__builtin_memcpy(key->remote_addr, &sk->__sk_common.skc_daddr, 4);
		else
			__builtin_memcpy(key->remote_addr, &sk->__sk_common.skc_v6_daddr, 16);
	} else if (family == AF_INET) {
		BPF_CORE_READ_INTO(&key->remote_addr, sk, __sk_common.skc_daddr);
	} else {
		BPF_CORE_READ_INTO(&key->remote_addr, sk, __sk_common.skc_v6_daddr);
	}
}

/* What is only read once, when the key is created. */
static __always_inline void fill_socket(struct fs_traffic_value *value, struct sock *sk, __u16 family)
{
	value->sock_type = BPF_CORE_READ(sk, sk_type);
	if (family == AF_INET)
		BPF_CORE_READ_INTO(&value->local_addr, sk, __sk_common.skc_rcv_saddr);
	else if (family == AF_INET6)
		BPF_CORE_READ_INTO(&value->local_addr, sk, __sk_common.skc_v6_rcv_saddr);
}

static __always_inline bool same_flow(const struct fs_traffic_key *a, const struct fs_traffic_key *b)
{
	const __u64 *x = (const __u64 *)a;
	const __u64 *y = (const __u64 *)b;

	/* Six words, the whole key (its padding is always zero). */
	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4]) |
		(x[5] ^ y[5])) == 0;
}

/*
 * The common case, counted by socket: the first flow a socket carries after
 * a drain gets an entry keyed by the socket's address, holding that flow's
 * key; later calls with exactly that key add to it. Any other key on the
 * same address falls through to the flow table (returns false): a socket
 * shared with another process or executable, a UDP socket connected to
 * another peer, or a new socket at the address of a freed one (sockets are
 * freed and their memory reused within microseconds). So an address never
 * merges two flows, and every flow is counted under its own key either way.
 */
static __always_inline bool count_by_socket(struct sock *sk, const struct fs_traffic_key *key, long ret,
					    __u32 direction, struct task_struct *task, struct file *exe,
					    __u16 family)
{
	__u32 zero = 0;
	void *table = bpf_map_lookup_elem(&socket_traffic, &zero);

	if (!table)
		return false;

	__u64 address = (__u64)sk;
	struct fs_socket_traffic *entry = bpf_map_lookup_elem(table, &address);

	if (!entry) {
		/* First bytes of this socket since the last drain: as for a new
		 * flow-table key, the process is announced first. */
		announce(task, key->tgid, key, exe);

		struct fs_socket_traffic fresh = { .key = *key };

		fill_socket(&fresh.value, sk, family);
		fresh.value.bytes[direction & 1] = ret;
		if (bpf_map_update_elem(table, &address, &fresh, BPF_NOEXIST) == 0)
			return true;
		/* Another CPU created it between lookup and update, or the table
		 * is full (then the flow table takes the bytes). */
		entry = bpf_map_lookup_elem(table, &address);
		if (!entry)
			return false;
	}
	if (!same_flow(&entry->key, key))
		return false;
	__sync_fetch_and_add(&entry->value.bytes[direction & 1], ret);
	return true;
}

/*
 * The first slot a flow probes: its key's six words (process and flow; the
 * executable is not read on this path, so zero) folded by XOR, then
 * Fibonacci hashing (one multiply, top bits). A chained multiply per word
 * mixes better but costs its latency six times over, and a collision only
 * costs a probe: flows of one process differ in their ports, which the
 * multiply spreads over all the index bits.
 */
static __always_inline __u32 first_slot(const struct fs_traffic_key *key)
{
	__u64 word[6];

	_Static_assert(sizeof(word) == sizeof(*key), "the key is six words");
	__builtin_memcpy(word, key, sizeof(word));

	__u64 folded = (word[0] ^ word[1]) ^ (word[2] ^ word[3]) ^ (word[4] ^ word[5]);

	return (folded * 0x9e3779b97f4a7c15ULL) >> (64 - FS_FLOW_SLOT_BITS);
}

/*
 * A slot's state, read before its key. x86 keeps loads in order, so a plain
 * load (and a compiler barrier) suffices; elsewhere a fetching atomic, which
 * every JIT makes fully ordered, keeps a key still being written from being
 * read as if it were ready. (BPF load-acquire needs kernel 6.15 and clang 20.)
 */
static __always_inline __u32 slot_state(struct fs_flow_slot *slot)
{
#if defined(__TARGET_ARCH_x86)
	__u32 state = *(volatile __u32 *)&slot->state;

	asm volatile("" ::: "memory");
	return state;
#else
	return __sync_fetch_and_add(&slot->state, 0);
#endif
}

/*
 * Which run of which program a tp_btf call comes from, without reading the
 * executable: the id of its address space. x86 gives every mm a `ctx_id`
 * from a global counter when it is created (fork without CLONE_VM, exec) and
 * never hands one out twice while the system runs; all threads of an image
 * share it. With the thread group id it names one image of one process: a
 * reused process id comes with a new mm, an exec too. Two dependent loads
 * (task -> mm -> context) from lines that are read, not written, while a
 * process does network I/O. Reading the executable itself takes five (task,
 * mm, file, inode, superblock), mostly from lines a bulk copy has just
 * evicted. Rejected: the mm's or the file's address (both freed at the next
 * exec, and the exec after it can get the same addresses); the leader's start
 * time with the exec count (`self_exec_id` shares a line with the `pi_lock`
 * a waker takes, so a receive just after a wake-up missed there). A kernel
 * thread has no mm: its image is 0, and its tgid names it. A process that
 * changes its executable link without exec (prctl PR_SET_MM_EXE_FILE,
 * checkpoint/restore) keeps the executable its slots were claimed with until
 * the next drain.
 */
#if !defined(__TARGET_ARCH_x86)
#error "image_of reads x86's mm->context.ctx_id: another architecture needs its own never-reused per-mm id"
#endif
static __always_inline __u64 image_of(struct task_struct *task)
{
	return task->mm->context.ctx_id;
}

/*
 * A slot's flow is this call's: the same process image and the same flow.
 * `key` has no executable yet; the slot's was read when it was claimed, by
 * the same image.
 */
static __always_inline bool slot_holds(const struct fs_flow_slot *slot, const struct fs_traffic_key *key,
				       __u64 image)
{
	const struct fs_traffic_key *held = &slot->key;
	__u64 held_addr[2], addr[2];

	__builtin_memcpy(held_addr, held->remote_addr, sizeof(held_addr));
	__builtin_memcpy(addr, key->remote_addr, sizeof(addr));
	return ((slot->image ^ image) |
		(held->tgid ^ key->tgid) | (held->family ^ key->family) | (held->protocol ^ key->protocol) |
		(held->local_port ^ key->local_port) | (held->remote_port ^ key->remote_port) |
		(held_addr[0] ^ addr[0]) | (held_addr[1] ^ addr[1])) == 0;
}

/* The executable half of a key; returns the executable's file. */
static __always_inline struct file *fill_executable(struct fs_traffic_key *key, struct task_struct *task, bool btf)
{
	struct file *exe = hot_task_exe_file(task, btf);

	hot_file_identity(exe, &key->exe_ino, &key->exe_dev, &key->exe_inode_generation, btf);
	return exe;
}

/*
 * The tp_btf programs' common case: the flow's slot in the `flow_slots`
 * table, found by probing up to FS_FLOW_SLOT_PROBES slots from the hash of
 * `key` (process and flow; its executable is not read yet). A ready slot
 * holding this flow for this process image takes the bytes. Otherwise the
 * first empty slot is claimed (compare-and-swap, so one program owns it),
 * filled with the full key and marked ready. A slot another CPU is filling is
 * passed over, so the same flow may get a second slot, which the agent adds
 * to the first; so does a flow of a process that exec'd (a new image). No
 * slot within the probes, or a claim lost to another CPU: the flow table
 * takes the bytes (returns false).
 */
static __always_inline bool count_in_slots(struct sock *sk, struct fs_traffic_key *key, long ret,
					   __u32 direction, struct task_struct *task, __u16 family)
{
	__u32 zero = 0;
	void *table = bpf_map_lookup_elem(&flow_slots, &zero);

	if (!table)
		return false;

	__u64 image = image_of(task);
	__u32 first = first_slot(key);
	struct fs_flow_slot *empty = NULL;

#pragma unroll
	for (__u32 probe = 0; probe < FS_FLOW_SLOT_PROBES; probe++) {
		__u32 index = (first + probe) & (FS_FLOW_SLOTS - 1);
		struct fs_flow_slot *slot = bpf_map_lookup_elem(table, &index);

		if (!slot)
			return false;

		__u32 state = slot_state(slot);

		if (state == FS_SLOT_READY && slot_holds(slot, key, image)) {
			__sync_fetch_and_add(&slot->value.bytes[direction & 1], ret);
			return true;
		}
		if (state == FS_SLOT_EMPTY) {
			/* No slot is emptied while the table counts: a flow
			 * already placed sits before the first empty slot. */
			empty = slot;
			break;
		}
	}
	if (!empty)
		return false;

	struct file *exe = fill_executable(key, task, true);

	/* A new flow: announced before it can be counted, as in the flow table,
	 * and before the claim, so the slot is filled quickly. */
	announce(task, key->tgid, key, exe);
	if (__sync_val_compare_and_swap(&empty->state, FS_SLOT_EMPTY, FS_SLOT_CLAIMED) != FS_SLOT_EMPTY)
		return false;
	empty->image = image;
	empty->key = *key;
	fill_socket(&empty->value, sk, family);
	empty->value.bytes[direction & 1] = ret;
	/* An exchange: ordered after the writes above on every CPU. */
	__sync_lock_test_and_set(&empty->state, FS_SLOT_READY);
	return true;
}

/*
 * The shared body of every send/receive hook. `btf`: `sk` is a BTF pointer
 * (tp_btf programs), read with plain loads.
 */
static __always_inline void account_with(struct sock *sk, long ret, __u32 direction, bool btf)
{
	if (ret <= 0 || !sk)
		return;

	__u16 family = HOT_READ(btf, sk, __sk_common.skc_family);

	/* Network sockets only: AF_UNIX, netlink and friends are local IPC. */
	if (family != AF_INET && family != AF_INET6 && family != AF_PACKET)
		return;

	struct task_struct *task = btf ? bpf_get_current_task_btf()
				       : (struct task_struct *)bpf_get_current_task();
	/*
	 * With a BTF task the thread group id is a plain load; elsewhere the
	 * helper is cheaper than a probe read. A helper call costs about 25 ns
	 * where returns go through a safe-return thunk (AMD SRSO mitigation),
	 * a third of the hook's own cost.
	 */
	__u32 tgid = btf ? (__u32)task->tgid : (__u32)(bpf_get_current_pid_tgid() >> 32);
	struct fs_traffic_key key = {
		.tgid = tgid,
	};

	fill_flow(&key, sk, family, btf);
	/* The slots find a flow without its executable (see image_of). */
	if (btf && count_in_slots(sk, &key, ret, direction, task, family))
		return;

	struct file *exe = fill_executable(&key, task, btf);

	if (!btf && count_by_socket(sk, &key, ret, direction, task, exe, family))
		return;

	__u32 zero = 0;
	void *table = bpf_map_lookup_elem(&traffic, &zero);

	/* Empty only before the agent put the first table in. */
	if (!table)
		return;

	struct fs_traffic_value *value = bpf_map_lookup_elem(table, &key);

	if (!value) {
		/* The flow's first bytes since the last drain: a process is
		 * announced before any of its flows exists, so a known key needs
		 * no announcement check. */
		announce(task, tgid, &key, exe);

		struct fs_traffic_value fresh = {};
		long err;

		fill_socket(&fresh, sk, family);
		fresh.bytes[direction & 1] = ret;
		err = bpf_map_update_elem(table, &key, &fresh, BPF_NOEXIST);
		if (err == 0)
			return;
		/* Another CPU created the key between lookup and update. */
		value = bpf_map_lookup_elem(table, &key);
		if (!value) {
			stat_add(FS_STAT_TRAFFIC_MAP_FULL, 1);
			stat_add(direction == FS_DIR_SENT ? FS_STAT_UNATTRIBUTED_SENT_BYTES
							  : FS_STAT_UNATTRIBUTED_RECEIVED_BYTES,
				 ret);
			return;
		}
	}
	__sync_fetch_and_add(&value->bytes[direction & 1], ret);
}

static __always_inline void account(struct sock *sk, long ret, __u32 direction)
{
	account_with(sk, ret, direction, false);
}

static __always_inline __s64 *splice_count(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&splices_in_flight, &zero);
}

static __always_inline bool in_splice(void)
{
	__s64 *count = splice_count();

	/* Almost always none: an array read instead of a hash lookup. */
	if (count && *count <= 0)
		return false;

	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	return bpf_map_lookup_elem(&splice_calls, &tid) != NULL;
}

static __always_inline void account_receive_with(struct sock *sk, long ret, int flags, bool btf)
{
	/* A peek leaves the data in the socket: it is counted when it is read. */
	if (flags & MSG_PEEK)
		return;
	if (in_splice())
		return;
	account_with(sk, ret, FS_DIR_RECEIVED, btf);
}

static __always_inline void account_receive(struct sock *sk, long ret, int flags)
{
	account_receive_with(sk, ret, flags, false);
}

/* --- mode 1: BTF tracepoints (Linux >= 6.3) ------------------------------ */

SEC("tp_btf/sock_send_length")
int BPF_PROG(send_length_btf, struct sock *sk, int ret, int flags)
{
	account_with(sk, ret, FS_DIR_SENT, true);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(recv_length_btf, struct sock *sk, int ret, int flags)
{
	account_receive_with(sk, ret, flags, true);
	return 0;
}

/*
 * --- modes 2 and 3: the protocol families' sendmsg/recvmsg ---------------
 *
 * Where the tracepoints do not exist, the hooks sit on the functions the
 * socket layer calls through sock->ops: inet_sendmsg, inet6_sendmsg and
 * packet_sendmsg (and their recvmsg twins). sock_sendmsg itself is not
 * enough: the syscalls reach the protocol through __sock_sendmsg (a separate
 * function in 5.10/6.1 stable, inlined from 6.6 on) and sendmmsg/recvmmsg
 * through the inlined sock_{send,recv}msg_nosec, so hooks on
 * sock_sendmsg/sock_recvmsg miss write, send, sendto, sendmsg and most of
 * sendmmsg/recvmmsg. Kernels before 6.5 send sendfile/splice data to TCP and
 * UDP through tcp_sendpage/udp_sendpage, which are hooked too where they
 * exist. The agent treats the inet6, packet and sendpage hooks as optional:
 * a kernel with IPv6 or AF_PACKET as modules, or without sendpage, still
 * runs the mode.
 */

/* --- mode 2: fexit ------------------------------------------------------ */

#define SENDMSG_FEXIT(name, function)                                                      \
	SEC("fexit/" #function)                                                            \
	int BPF_PROG(name, struct socket *sock, void *msg, __u64 size, int ret)            \
	{                                                                                  \
		account(BPF_CORE_READ(sock, sk), ret, FS_DIR_SENT);                        \
		return 0;                                                                  \
	}

#define RECVMSG_FEXIT(name, function)                                                      \
	SEC("fexit/" #function)                                                            \
	int BPF_PROG(name, struct socket *sock, void *msg, __u64 size, int flags, int ret) \
	{                                                                                  \
		account_receive(BPF_CORE_READ(sock, sk), ret, flags);                      \
		return 0;                                                                  \
	}

#define SENDPAGE_FEXIT(name, function)                                                           \
	SEC("fexit/" #function)                                                                  \
	int BPF_PROG(name, struct sock *sk, void *page, int offset, __u64 size, int flags, int ret) \
	{                                                                                        \
		account(sk, ret, FS_DIR_SENT);                                                   \
		return 0;                                                                        \
	}

SENDMSG_FEXIT(inet_sendmsg_fexit, inet_sendmsg)
SENDMSG_FEXIT(inet6_sendmsg_fexit, inet6_sendmsg)
SENDMSG_FEXIT(packet_sendmsg_fexit, packet_sendmsg)
SENDPAGE_FEXIT(tcp_sendpage_fexit, tcp_sendpage)
SENDPAGE_FEXIT(udp_sendpage_fexit, udp_sendpage)
RECVMSG_FEXIT(inet_recvmsg_fexit, inet_recvmsg)
RECVMSG_FEXIT(inet6_recvmsg_fexit, inet6_recvmsg)
RECVMSG_FEXIT(packet_recvmsg_fexit, packet_recvmsg)

/* --- mode 3: kprobe + kretprobe on the same functions -------------------- */

static __always_inline void stash_sock(struct sock *sk, int flags)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	/* Keep MSG_PEEK in the low bit: a socket pointer is always aligned. */
	__u64 entry = (__u64)sk | ((flags & MSG_PEEK) ? 1 : 0);

	bpf_map_update_elem(&kprobe_socks, &tid, &entry, BPF_ANY);
}

static __always_inline void take_sock(long ret, __u32 direction)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *entry = bpf_map_lookup_elem(&kprobe_socks, &tid);

	if (!entry)
		return;
	__u64 stashed = *entry;

	bpf_map_delete_elem(&kprobe_socks, &tid);
	struct sock *sk = (struct sock *)(stashed & ~1ULL);

	if (direction == FS_DIR_SENT)
		account(sk, ret, FS_DIR_SENT);
	else
		account_receive(sk, ret, (stashed & 1) ? MSG_PEEK : 0);
}

#define SENDMSG_KPROBE(name, function)                    \
	SEC("kprobe/" #function)                          \
	int BPF_KPROBE(name##_kprobe, struct socket *sock) \
	{                                                 \
		stash_sock(BPF_CORE_READ(sock, sk), 0);   \
		return 0;                                 \
	}                                                 \
	SEC("kretprobe/" #function)                       \
	int BPF_KRETPROBE(name##_kretprobe, int ret)      \
	{                                                 \
		take_sock(ret, FS_DIR_SENT);              \
		return 0;                                 \
	}

#define SENDPAGE_KPROBE(name, function)                \
	SEC("kprobe/" #function)                       \
	int BPF_KPROBE(name##_kprobe, struct sock *sk) \
	{                                              \
		stash_sock(sk, 0);                     \
		return 0;                              \
	}                                              \
	SEC("kretprobe/" #function)                    \
	int BPF_KRETPROBE(name##_kretprobe, int ret)   \
	{                                              \
		take_sock(ret, FS_DIR_SENT);           \
		return 0;                              \
	}

#define RECVMSG_KPROBE(name, function)                                                       \
	SEC("kprobe/" #function)                                                             \
	int BPF_KPROBE(name##_kprobe, struct socket *sock, void *msg, __u64 size, int flags) \
	{                                                                                    \
		stash_sock(BPF_CORE_READ(sock, sk), flags);                                  \
		return 0;                                                                    \
	}                                                                                    \
	SEC("kretprobe/" #function)                                                          \
	int BPF_KRETPROBE(name##_kretprobe, int ret)                                         \
	{                                                                                    \
		take_sock(ret, FS_DIR_RECEIVED);                                             \
		return 0;                                                                    \
	}

SENDMSG_KPROBE(inet_sendmsg, inet_sendmsg)
SENDMSG_KPROBE(inet6_sendmsg, inet6_sendmsg)
SENDMSG_KPROBE(packet_sendmsg, packet_sendmsg)
SENDPAGE_KPROBE(tcp_sendpage, tcp_sendpage)
SENDPAGE_KPROBE(udp_sendpage, udp_sendpage)
RECVMSG_KPROBE(inet_recvmsg, inet_recvmsg)
RECVMSG_KPROBE(inet6_recvmsg, inet6_recvmsg)
RECVMSG_KPROBE(packet_recvmsg, packet_recvmsg)

/* --- splice from a socket (every mode) ----------------------------------- */

struct syscall_enter_splice {
	__u64 common;
	__s32 nr;
	__s32 _pad;
	__u64 fd_in;
	__u64 off_in;
	__u64 fd_out;
};

struct syscall_exit {
	__u64 common;
	__s32 nr;
	__s32 _pad;
	__s64 ret;
};

SEC("tracepoint/syscalls/sys_enter_splice")
int splice_enter(struct syscall_enter_splice *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__s32 fd_in = (__s32)ctx->fd_in;

	__s64 *count = splice_count();

	if (bpf_map_update_elem(&splice_calls, &tid, &fd_in, BPF_NOEXIST) == 0) {
		if (count)
			__sync_fetch_and_add(count, 1);
	} else if (bpf_map_update_elem(&splice_calls, &tid, &fd_in, BPF_EXIST) != 0) {
		/* Neither a new entry nor a leftover of this thread to reuse. */
		stat_add(FS_STAT_SPLICE_MAP_FULL, 1);
	}
	return 0;
}

static __always_inline struct sock *socket_of_fd(__s32 fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;

	if (fd < 0 || (__u32)fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	if (!file)
		return NULL;
	if ((BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return NULL;
	struct socket *sock = BPF_CORE_READ(file, private_data);

	return BPF_CORE_READ(sock, sk);
}

SEC("tracepoint/syscalls/sys_exit_splice")
int splice_exit(struct syscall_exit *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__s32 *fd_in = bpf_map_lookup_elem(&splice_calls, &tid);

	if (!fd_in)
		return 0;
	__s32 fd = *fd_in;

	if (bpf_map_delete_elem(&splice_calls, &tid) == 0) {
		__s64 *count = splice_count();

		if (count)
			__sync_fetch_and_add(count, -1);
	}
	if (ctx->ret > 0)
		account(socket_of_fd(fd), ctx->ret, FS_DIR_RECEIVED);
	return 0;
}

/* --- process exit -------------------------------------------------------- */

static __always_inline void forget(struct task_struct *task)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;

	/* Only the thread-group leader's exit ends the process's identity. */
	if ((__u32)pid_tgid != tgid)
		return;
	if (!bpf_map_lookup_elem(&announced, &tgid))
		return;
	bpf_map_delete_elem(&announced, &tgid);

	struct fs_exit_event *event = bpf_ringbuf_reserve(&events, sizeof(*event), 0);

	if (!event) {
		stat_add(FS_STAT_EVENTS_LOST, 1);
		return;
	}
	event->kind = FS_EVENT_EXIT;
	event->tgid = tgid;
	event->start_time_ns = BPF_CORE_READ(task, start_time);
	bpf_ringbuf_submit(event, 0);
}

SEC("tracepoint/sched/sched_process_exit")
int process_exit(void *ctx)
{
	forget((struct task_struct *)bpf_get_current_task());
	return 0;
}

/* --- exec tracking ------------------------------------------------------- */

/*
 * sched_process_exec fires in the process that just executed, once the new
 * program's mm is in place: current's exe_file is the new executable and
 * mm->arg_start..arg_end its command line, still in the process's memory.
 * tp_btf is preferred (no tracefs needed); the classic tracepoint is the
 * fallback. Both exist on every kernel with ring buffers (>= 5.8).
 */
static __always_inline void read_command_line(struct fs_exec_event *event, struct task_struct *task)
{
	struct mm_struct *mm = BPF_CORE_READ(task, mm);
	unsigned long start = BPF_CORE_READ(mm, arg_start);
	unsigned long end = BPF_CORE_READ(mm, arg_end);
	__u64 len = end > start ? end - start : 0;

	if (len >= FS_ARGS_LEN) {
		if (len > FS_ARGS_LEN)
			event->args_flags |= FS_EXEC_ARGS_TRUNCATED;
		if (bpf_probe_read_user(event->args, FS_ARGS_LEN, (void *)start) == 0)
			event->args_len = FS_ARGS_LEN;
		else
			event->args_flags |= FS_EXEC_ARGS_UNREAD;
		return;
	}
	len &= FS_ARGS_LEN - 1;
	if (len == 0)
		return;
	if (bpf_probe_read_user(event->args, len, (void *)start) == 0)
		event->args_len = len;
	else
		event->args_flags |= FS_EXEC_ARGS_UNREAD;
}

static __always_inline void report_exec(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct file *exe = task_exe_file(task);
	struct exe_file id;

	file_identity(exe, &id.ino, &id.dev, &id.inode_generation);

	struct fs_exec_event *event = bpf_ringbuf_reserve(&exec_events, sizeof(*event), 0);

	if (!event) {
		stat_add(FS_STAT_EXEC_EVENTS_LOST, 1);
		return;
	}
	fill_identity(&event->identity, FS_EVENT_EXEC, task, tgid, &id, exe);
	event->args_len = 0;
	event->args_flags = 0;
	if (record_command_lines)
		read_command_line(event, task);
	bpf_ringbuf_submit(event, 0);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(process_exec_btf, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	report_exec();
	return 0;
}

SEC("tracepoint/sched/sched_process_exec")
int process_exec(void *ctx)
{
	report_exec();
	return 0;
}
