//! Names, ports and default sizes shared by `trafficgen` and the test harness.

use crate::metrics::Accuracy;

/// Client side of the veth pair.
pub const CLIENT_V4: &str = "198.18.0.1";
/// Peer side of the veth pair (where `trafficgen serve` listens).
pub const PEER_V4: &str = "198.18.0.2";
/// Client side, IPv6.
pub const CLIENT_V6: &str = "fd00:f5::1";
/// Peer side, IPv6.
pub const PEER_V6: &str = "fd00:f5::2";

/// Services that `trafficgen serve` runs in the peer namespace, on both addresses.
pub mod ports {
    /// TCP: reads until EOF and discards.
    pub const TCP_SINK: u16 = 5001;
    /// TCP: reads an 8-byte big-endian length N, writes N bytes, closes.
    pub const TCP_SOURCE: u16 = 5002;
    /// TCP: echoes everything until EOF.
    pub const TCP_ECHO: u16 = 5003;
    /// UDP: echoes every datagram to its sender.
    pub const UDP_ECHO: u16 = 6001;
    /// UDP: a request `count:u32be size:u32be` makes it send `count` datagrams of `size` bytes.
    pub const UDP_SOURCE: u16 = 6002;
    /// UDP: discards every datagram.
    pub const UDP_SINK: u16 = 6003;
    /// UDP echo on the QUIC port.
    pub const UDP_QUIC: u16 = 443;
    /// UDP DNS responder (answers every query with one A record, echoes anything else).
    pub const UDP_DNS: u16 = 53;
}

/// IP protocol number used by the `raw_ip_253` scenario (RFC 3692 experimental).
pub const RAW_IP_PROTO: i32 = 253;
/// Ethertype used by the `af_packet` scenario (IEEE 802 local experimental 1).
pub const AF_PACKET_ETHERTYPE: u16 = 0x88b5;

/// One scenario the generator can run.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// CLI name.
    pub name: &'static str,
    /// Default `--bytes` (meaning depends on the scenario, see `help`).
    pub bytes: u64,
    /// Default `--count` (units: datagrams, children, connections...; 0 = unused).
    pub count: u64,
    /// What the scenario does, and what `--bytes` / `--count` mean for it.
    pub help: &'static str,
    /// How closely `/metrics` must match what the scenario counted itself: exact where
    /// both count the same calls' return values; otherwise the smallest bound its
    /// cause needs, and why.
    pub accuracy: Accuracy,
}

const MIB: u64 = 1024 * 1024;

/// Every scenario, in the order the suite starts them (slow ones first).
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "slow_drip",
        bytes: 6_000,
        count: 60,
        help: "TCP echo: --count sends of --bytes/--count bytes spread evenly over --secs (default 30) s",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "short_lived",
        bytes: 300_000,
        count: 300,
        help: "--count child processes of /proc/self/exe (fork+exec and posix_spawn alternately), each sends --bytes/--count over TCP or UDP and exits",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "many_tcp_conns",
        bytes: 200_000,
        count: 2000,
        help: "--count TCP connections to the echo port, each echoes --bytes/--count bytes",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "tcp_download",
        bytes: 8 * MIB,
        count: 0,
        help: "TCP: download --bytes from the source port (8-byte request sent)",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "tcp_upload",
        bytes: 8 * MIB,
        count: 0,
        help: "TCP: upload --bytes to the sink port",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "tcp_duplex",
        bytes: 4 * MIB,
        count: 0,
        help: "TCP echo: send --bytes from one thread while another reads the echo",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "udp_both",
        bytes: 1_000_000,
        count: 1000,
        help: "UDP echo: --count datagrams of --bytes/--count bytes, echoes read back",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "icmp_echo",
        bytes: 100_000,
        count: 100,
        help: "raw ICMP socket: --count echo requests with --bytes/--count payload; every ICMP packet read is counted (IP header included)",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "udp_443",
        bytes: 1_200_000,
        count: 1000,
        help: "UDP echo on port 443: --count datagrams of --bytes/--count bytes",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "ipv6_tcp",
        bytes: 4 * MIB,
        count: 0,
        help: "TCP over IPv6 to the echo port: --bytes each way",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "udp_flood_53",
        bytes: 0,
        count: 20_000,
        help: "--count small DNS queries to UDP port 53 as fast as possible, answers read back (--bytes unused)",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "raw_ip_253",
        bytes: 200_000,
        count: 200,
        help: "raw IP socket, protocol 253: --count packets of --bytes/--count bytes, send only",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "af_packet",
        bytes: 200_000,
        count: 200,
        help: "AF_PACKET SOCK_RAW: --count Ethernet frames (14-byte header + --bytes/--count payload) on the client veth, send only",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "io_uring_send",
        bytes: 4 * MIB,
        count: 0,
        help: "TCP upload of --bytes with IORING_OP_SEND",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "io_uring_recv",
        bytes: 4 * MIB,
        count: 0,
        help: "TCP download of --bytes with IORING_OP_RECV (8-byte request sent with write)",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "sendfile_upload",
        bytes: 8 * MIB,
        count: 0,
        help: "TCP upload of --bytes with sendfile(2) from a temporary file",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "splice_download",
        bytes: 8 * MIB,
        count: 0,
        help: "TCP download of --bytes with splice(2) socket -> pipe -> /dev/null",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "sendmmsg",
        bytes: 4_000_000,
        count: 4000,
        help: "UDP: --count datagrams of --bytes/--count bytes to the sink with sendmmsg(2), 64 per call",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "recvmmsg",
        bytes: 4_000_000,
        count: 4000,
        help: "UDP: --count datagrams of --bytes/--count bytes from the source read with recvmmsg(2)",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "loopback",
        bytes: 8 * MIB,
        count: 0,
        help: "TCP over 127.0.0.1 between two threads of this process: --bytes, counted both ways",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "own_namespaces",
        bytes: 2 * MIB,
        count: 0,
        help: "a child in new pid+mount+net namespaces (pid 1 there) moves --bytes over its own loopback",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "parallel_burst",
        bytes: 16 * MIB,
        count: 4,
        help: "--count threads (half TCP, half UDP) send --bytes in total to the sinks concurrently",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "ipv6_udp_download",
        bytes: 2_000_000,
        count: 2000,
        help: "UDP over IPv6: --count datagrams of --bytes/--count bytes from the source",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "local_ipc_and_peek",
        bytes: 2 * MIB,
        count: 0,
        help: "TCP over 127.0.0.1: --bytes, every read preceded by a MSG_PEEK of it; then --bytes x 4 over AF_UNIX stream, 256 AF_UNIX datagrams and a netlink route dump, none of which counts (only the TCP reads and writes are in the report)",
        accuracy: Accuracy::Exact,
    },
    Scenario {
        name: "kernel_forward",
        bytes: 2 * MIB,
        count: 0,
        help: "TCP over 127.0.0.1: --bytes sent to a socket a BPF sockmap verdict redirects to a second connection, which the kernel sends them on (a kworker, exe=\"[kernel]\"); this process reads them at its far end",
        accuracy: Accuracy::Exact,
    },
];

/// Looks a scenario up by its CLI name.
pub fn scenario(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// Default duration of `slow_drip`, seconds.
pub const SLOW_DRIP_SECS: u64 = 30;
