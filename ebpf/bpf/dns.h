/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Types shared between dns.bpf.c and the agent (twin: ebpf/src/lib.rs,
 * sizes asserted on both sides).
 */
#ifndef FLEETSNITCH_DNS_H
#define FLEETSNITCH_DNS_H

/* Bytes of a DNS answer copied to userspace; longer answers are cut here and
 * only their complete records are used. */
#define FS_DNS_PAYLOAD 1024

/* A DNS answer delivered to a local socket. */
struct fs_dns_event {
	/* Process that sent the query on this socket; 0 when unknown. */
	__u32 tgid;
	/* AF_INET or AF_INET6. */
	__u16 family;
	/* IPPROTO_UDP or IPPROTO_TCP. */
	__u8 protocol;
	__u8 _pad;
	/* Host byte order. */
	__u16 local_port;
	/* Bytes of `payload` filled. */
	__u16 captured;
	/* Length of the whole transport payload. */
	__u32 payload_len;
	__u64 socket_cookie;
	/* The DNS server; IPv4 addresses fill the first four bytes. */
	__u8 server_addr[16];
	__u8 payload[FS_DNS_PAYLOAD];
};

_Static_assert(sizeof(struct fs_dns_event) == 40 + FS_DNS_PAYLOAD, "fs_dns_event layout");

#endif
