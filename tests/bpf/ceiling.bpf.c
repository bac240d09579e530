// SPDX-License-Identifier: GPL-2.0
/*
 * The benchmark's ceiling: the least a byte counter on the agent's hooks can
 * cost. Two programs on the same BTF tracepoints as the agent's
 * send_length_btf / recv_length_btf, each adding the call's length to one
 * per-CPU counter: no key, no hash, no shared cache line. A third on the hook
 * of the agent's DNS capture (cgroup_skb ingress on the root cgroup, every
 * packet delivered to a local socket) adds the packet's length. The agent's
 * cost above this is what its attribution (process, executable, flow) and its
 * look at each packet cost; these programs' own cost is the hooks' and the
 * statistics' (tests/src/ceiling.rs loads them; tests/src/bin/bench measures
 * with them).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct sock;

/* Slot 0: bytes sent, slot 1: bytes received, slot 2: bytes of packets
 * delivered (IP headers included), per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
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

SEC("cgroup_skb/ingress")
int ceiling_ingress(struct __sk_buff *skb)
{
	count(2, skb->len);
	/* Let every packet through, as the agent's program does. */
	return 1;
}
