//! Names, ports and default sizes shared by `trafficgen` and the test harness.

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
}

const MIB: u64 = 1024 * 1024;

/// Every scenario, in the order the suite starts them (slow ones first).
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "slow_drip",
        bytes: 6_000,
        count: 60,
        help: "TCP echo: --count sends of --bytes/--count bytes spread evenly over --secs (default 30) s",
    },
    Scenario {
        name: "short_lived",
        bytes: 300_000,
        count: 300,
        help: "--count child processes of /proc/self/exe (fork+exec and posix_spawn alternately), each sends --bytes/--count over TCP or UDP and exits",
    },
    Scenario {
        name: "many_tcp_conns",
        bytes: 200_000,
        count: 2000,
        help: "--count TCP connections to the echo port, each echoes --bytes/--count bytes",
    },
    Scenario {
        name: "tcp_download",
        bytes: 8 * MIB,
        count: 0,
        help: "TCP: download --bytes from the source port (8-byte request sent)",
    },
    Scenario {
        name: "tcp_upload",
        bytes: 8 * MIB,
        count: 0,
        help: "TCP: upload --bytes to the sink port",
    },
    Scenario {
        name: "tcp_duplex",
        bytes: 4 * MIB,
        count: 0,
        help: "TCP echo: send --bytes from one thread while another reads the echo",
    },
    Scenario {
        name: "udp_both",
        bytes: 1_000_000,
        count: 1000,
        help: "UDP echo: --count datagrams of --bytes/--count bytes, echoes read back",
    },
    Scenario {
        name: "icmp_echo",
        bytes: 100_000,
        count: 100,
        help: "raw ICMP socket: --count echo requests with --bytes/--count payload; every ICMP packet read is counted (IP header included)",
    },
    Scenario {
        name: "udp_443",
        bytes: 1_200_000,
        count: 1000,
        help: "UDP echo on port 443: --count datagrams of --bytes/--count bytes",
    },
    Scenario {
        name: "ipv6_tcp",
        bytes: 4 * MIB,
        count: 0,
        help: "TCP over IPv6 to the echo port: --bytes each way",
    },
    Scenario {
        name: "udp_flood_53",
        bytes: 0,
        count: 20_000,
        help: "--count small DNS queries to UDP port 53 as fast as possible, answers read back (--bytes unused)",
    },
    Scenario {
        name: "raw_ip_253",
        bytes: 200_000,
        count: 200,
        help: "raw IP socket, protocol 253: --count packets of --bytes/--count bytes, send only",
    },
    Scenario {
        name: "af_packet",
        bytes: 200_000,
        count: 200,
        help: "AF_PACKET SOCK_RAW: --count Ethernet frames (14-byte header + --bytes/--count payload) on the client veth, send only",
    },
    Scenario {
        name: "io_uring_send",
        bytes: 4 * MIB,
        count: 0,
        help: "TCP upload of --bytes with IORING_OP_SEND",
    },
    Scenario {
        name: "io_uring_recv",
        bytes: 4 * MIB,
        count: 0,
        help: "TCP download of --bytes with IORING_OP_RECV (8-byte request sent with write)",
    },
    Scenario {
        name: "sendfile_upload",
        bytes: 8 * MIB,
        count: 0,
        help: "TCP upload of --bytes with sendfile(2) from a temporary file",
    },
    Scenario {
        name: "splice_download",
        bytes: 8 * MIB,
        count: 0,
        help: "TCP download of --bytes with splice(2) socket -> pipe -> /dev/null",
    },
    Scenario {
        name: "sendmmsg",
        bytes: 4_000_000,
        count: 4000,
        help: "UDP: --count datagrams of --bytes/--count bytes to the sink with sendmmsg(2), 64 per call",
    },
    Scenario {
        name: "recvmmsg",
        bytes: 4_000_000,
        count: 4000,
        help: "UDP: --count datagrams of --bytes/--count bytes from the source read with recvmmsg(2)",
    },
    Scenario {
        name: "loopback",
        bytes: 8 * MIB,
        count: 0,
        help: "TCP over 127.0.0.1 between two threads of this process: --bytes, counted both ways",
    },
    Scenario {
        name: "own_namespaces",
        bytes: 2 * MIB,
        count: 0,
        help: "a child in new pid+mount+net namespaces (pid 1 there) moves --bytes over its own loopback",
    },
    Scenario {
        name: "parallel_burst",
        bytes: 16 * MIB,
        count: 4,
        help: "--count threads (half TCP, half UDP) send --bytes in total to the sinks concurrently",
    },
    Scenario {
        name: "ipv6_udp_download",
        bytes: 2_000_000,
        count: 2000,
        help: "UDP over IPv6: --count datagrams of --bytes/--count bytes from the source",
    },
];

/// Looks a scenario up by its CLI name.
pub fn scenario(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// Default duration of `slow_drip`, seconds.
pub const SLOW_DRIP_SECS: u64 = 30;
