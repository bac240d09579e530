// SPDX-License-Identifier: GPL-2.0
/*
 * DNS answers, taken from the traffic itself so every resolver is covered:
 * libc, static binaries and Go programs that send their own queries, and
 * programs behind a local caching resolver (whose answers they receive over
 * loopback).
 *
 *  - cgroup/connect{4,6} and cgroup/sendmsg{4,6} on the root cgroup run in
 *    the querying process's context when it connects or sends to port 53:
 *    they note which process owns the socket (by socket cookie).
 *  - cgroup_skb/ingress on the root cgroup sees every packet delivered to a
 *    local socket; packets from port 53 (UDP or TCP) are copied, with the
 *    owner noted above, to the `dns_events` ring buffer. Everything else
 *    costs a header read and a compare.
 *
 * Every program returns 1: they observe and never drop or rewrite traffic.
 */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "dns.h"

#define AF_INET 2
#define AF_INET6 10
#define DNS_PORT 53
/* Fragment offset and more-fragments bits of iphdr.frag_off. */
#define IP_FRAGMENTED 0x3fff

char LICENSE[] SEC("license") = "GPL";

/* Socket cookie -> process that queried a DNS server on it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u32);
} dns_owners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	/* Records carry only the bytes captured: about 1,000 answers of a typical
	 * 150 bytes (240 of the largest captured), and the agent wakes on the
	 * first one. Mapped whole into the agent, so it counts in its RSS twice. */
	__uint(max_entries, 256 * 1024);
} dns_events SEC(".maps");

/* Where an answer's record is built before it is copied into the ring at its
 * length. Per CPU is safe here: the program runs in softirq, or with softirqs
 * off, never preempted by another run of itself on the same CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fs_dns_event);
} dns_scratch SEC(".maps");

/* Answers that did not fit in the ring buffer. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} dns_lost SEC(".maps");

static __always_inline void remember_owner(struct bpf_sock_addr *ctx)
{
	if (ctx->user_port != bpf_htons(DNS_PORT))
		return;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	bpf_map_update_elem(&dns_owners, &cookie, &tgid, BPF_ANY);
}

SEC("cgroup/connect4")
int dns_owner_connect4(struct bpf_sock_addr *ctx)
{
	remember_owner(ctx);
	return 1;
}

SEC("cgroup/connect6")
int dns_owner_connect6(struct bpf_sock_addr *ctx)
{
	remember_owner(ctx);
	return 1;
}

SEC("cgroup/sendmsg4")
int dns_owner_sendmsg4(struct bpf_sock_addr *ctx)
{
	remember_owner(ctx);
	return 1;
}

SEC("cgroup/sendmsg6")
int dns_owner_sendmsg6(struct bpf_sock_addr *ctx)
{
	remember_owner(ctx);
	return 1;
}

/*
 * Every packet the host receives passes here, and almost none is a DNS
 * answer: when the headers are in the linear data, rule the packet out with
 * plain loads (a transport other than UDP/TCP, or a source port other than
 * 53) before any bpf_skb_load_bytes call. False means "look closer".
 */
static __always_inline bool surely_not_dns(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 transport_offset;
	__u8 protocol;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data;

		if ((void *)(ip + 1) > end)
			return false;
		protocol = ip->protocol;
		transport_offset = ip->ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data;

		if ((void *)(ip6 + 1) > end)
			return false;
		protocol = ip6->nexthdr;
		transport_offset = sizeof(*ip6);
	} else {
		return true;
	}
	if (protocol != IPPROTO_UDP && protocol != IPPROTO_TCP)
		return true;

	/* The source port opens both the UDP and the TCP header. */
	__be16 *source = data + transport_offset;

	if ((void *)(source + 1) > end)
		return false;
	return *source != bpf_htons(DNS_PORT);
}

SEC("cgroup_skb/ingress")
int dns_answers(struct __sk_buff *skb)
{
	__u8 server[16] = {};
	__u16 family;
	__u8 protocol;
	__u32 offset;

	if (surely_not_dns(skb))
		return 1;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
			return 1;
		if (ip.frag_off & bpf_htons(IP_FRAGMENTED))
			return 1;
		family = AF_INET;
		protocol = ip.protocol;
		offset = ip.ihl * 4;
		__builtin_memcpy(server, &ip.saddr, 4);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
			return 1;
		family = AF_INET6;
		/* Extension headers are not followed: DNS answers do not carry them. */
		protocol = ip6.nexthdr;
		offset = sizeof(ip6);
		__builtin_memcpy(server, &ip6.saddr, 16);
	} else {
		return 1;
	}

	__u16 local_port;

	if (protocol == IPPROTO_UDP) {
		struct udphdr udp;

		if (bpf_skb_load_bytes(skb, offset, &udp, sizeof(udp)) < 0)
			return 1;
		if (udp.source != bpf_htons(DNS_PORT))
			return 1;
		local_port = bpf_ntohs(udp.dest);
		offset += sizeof(udp);
	} else if (protocol == IPPROTO_TCP) {
		struct tcphdr tcp;

		if (bpf_skb_load_bytes(skb, offset, &tcp, sizeof(tcp)) < 0)
			return 1;
		if (tcp.source != bpf_htons(DNS_PORT))
			return 1;
		local_port = bpf_ntohs(tcp.dest);
		offset += tcp.doff * 4;
	} else {
		return 1;
	}

	if (offset >= skb->len)
		return 1;
	__u32 payload_len = skb->len - offset;
	__u32 captured = payload_len < FS_DNS_PAYLOAD ? payload_len : FS_DNS_PAYLOAD;

	__u32 zero = 0;
	struct fs_dns_event *event = bpf_map_lookup_elem(&dns_scratch, &zero);

	if (!event)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u32 *owner = bpf_map_lookup_elem(&dns_owners, &cookie);

	event->tgid = owner ? *owner : 0;
	event->family = family;
	event->protocol = protocol;
	event->_pad = 0;
	event->local_port = local_port;
	event->payload_len = payload_len;
	event->socket_cookie = cookie;
	__builtin_memcpy(event->server_addr, server, sizeof(server));
	/*
	 * A length the verifier can bound to 1..FS_DNS_PAYLOAD from its bit
	 * pattern alone: for 1 <= captured <= FS_DNS_PAYLOAD (a power of two)
	 * this is captured itself. Older verifiers (5.10, 6.1) learn nothing
	 * from "!= 0" tests and refuse a size that may be zero; the empty asm
	 * keeps clang from folding the expression back into the comparisons.
	 */
	__u32 length = captured - 1;

	asm volatile("" : "+r"(length));
	length = (length & (FS_DNS_PAYLOAD - 1)) + 1;
	if (bpf_skb_load_bytes(skb, offset, event->payload, length) < 0)
		return 1;
	event->captured = length;
	if (bpf_ringbuf_output(&dns_events, event, __builtin_offsetof(struct fs_dns_event, payload) + length,
			       0) != 0) {
		__u64 *lost = bpf_map_lookup_elem(&dns_lost, &zero);

		if (lost)
			*lost += 1;
	}
	return 1;
}
