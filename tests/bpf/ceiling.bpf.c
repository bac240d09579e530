// SPDX-License-Identifier: GPL-2.0
/*
 * The benchmark's ceiling: the least a byte counter on the agent's hot hooks
 * can cost. Two programs on the same BTF tracepoints as the agent's
 * send_length_btf / recv_length_btf, each adding the call's length to one
 * per-CPU counter: no key, no hash, no shared cache line. The agent's cost
 * above this is what its attribution (process, executable, flow) costs; this
 * program's own cost is the hook's and the statistics' (tests/src/ceiling.rs
 * loads it; tests/src/bin/bench measures with it).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct sock;

/* Slot 0: bytes sent, slot 1: bytes received, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} ceiling_bytes SEC(".maps");

static __always_inline void count(__u32 slot, int length)
{
	__u64 *bytes;

	if (length <= 0)
		return;
	bytes = bpf_map_lookup_elem(&ceiling_bytes, &slot);
	if (bytes)
		*bytes += length;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(ceiling_send, struct sock *sk, int ret, int flags)
{
	count(0, ret);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(ceiling_recv, struct sock *sk, int ret, int flags)
{
	count(1, ret);
	return 0;
}
