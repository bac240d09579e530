/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The few kernel structures fleetsnitch reads, declared with only the fields it
 * uses. `preserve_access_index` turns every field access into a CO-RE
 * relocation: the loader (aya) rewrites the offsets from the running kernel's
 * BTF, so nothing here depends on the layout of the kernel we were built on.
 */
#ifndef FLEETSNITCH_KERNEL_TYPES_H
#define FLEETSNITCH_KERNEL_TYPES_H
/* Tells libbpf's bpf_tracing.h to use the kernel's pt_regs field names. */
#define __VMLINUX_H__

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
typedef int pid_t;
typedef unsigned int dev_t;
typedef unsigned short umode_t;
typedef __u32 uid_t;

#define true 1
#define false 0
#define NULL ((void *)0)

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_ARRAY_OF_MAPS = 12,
	BPF_MAP_TYPE_RINGBUF = 27,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

typedef struct {
	uid_t val;
} kuid_t;

struct qstr {
	const unsigned char *name;
};

struct super_block {
	dev_t s_dev;
};

struct inode {
	umode_t i_mode;
	unsigned long i_ino;
	struct super_block *i_sb;
	__u32 i_generation;
};

struct dentry {
	struct dentry *d_parent;
	struct qstr d_name;
	struct inode *d_inode;
};

struct vfsmount {
	struct dentry *mnt_root;
};

struct mount {
	struct mount *mnt_parent;
	struct dentry *mnt_mountpoint;
	struct vfsmount mnt;
};

struct path {
	struct vfsmount *mnt;
	struct dentry *dentry;
};

struct file {
	struct path f_path;
	struct inode *f_inode;
	void *private_data;
};

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
};

struct files_struct {
	struct fdtable *fdt;
};

/* x86's per-address-space context: `ctx_id` is drawn from a global counter
 * when the mm is created and never reused while the system runs. */
typedef struct {
	__u64 ctx_id;
} mm_context_t;

struct mm_struct {
	struct file *exe_file;
	mm_context_t context;
	unsigned long arg_start;
	unsigned long arg_end;
};

struct cred {
	kuid_t uid;
};

struct task_struct {
	pid_t pid;
	pid_t tgid;
	__u64 start_time;
	struct task_struct *real_parent;
	struct mm_struct *mm;
	const struct cred *cred;
	struct files_struct *files;
	char comm[16];
};

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		/* Gives the address the kernel's 4-byte alignment, so a copy of it
		 * is four loads rather than sixteen bytes' worth of small ones. */
		__be32 u6_addr32[4];
	} in6_u;
};

struct sock_common {
	union {
		struct {
			__be32 skc_daddr;
			__be32 skc_rcv_saddr;
		};
	};
	union {
		struct {
			__be16 skc_dport;
			__u16 skc_num;
		};
	};
	unsigned short skc_family;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
};

struct sock {
	struct sock_common __sk_common;
	__u16 sk_type;
	__u16 sk_protocol;
};

struct socket {
	struct sock *sk;
};

struct linux_binprm {
	struct file *file;
};

#pragma clang attribute pop

#endif
