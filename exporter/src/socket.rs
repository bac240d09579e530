//! Reading the socket addressing the kernel captured with each traffic key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fleetsnitch_ebpf::TrafficValue;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const AF_PACKET: u16 = 17;
const SOCK_RAW: u16 = 3;

/// The transport name used in the journal and in logs.
pub fn transport(value: &TrafficValue) -> &'static str {
    if value.family == AF_PACKET {
        return "packet";
    }
    match value.protocol {
        6 => "tcp",
        17 => "udp",
        136 => "udplite",
        1 => "icmp",
        58 => "icmpv6",
        262 => "mptcp",
        _ if value.sock_type == SOCK_RAW => "raw",
        _ => "other",
    }
}

pub fn is_ipv6(value: &TrafficValue) -> bool {
    value.family == AF_INET6
}

/// The connected peer, if the socket has one (unconnected UDP and raw sockets do not).
pub fn remote_address(value: &TrafficValue) -> Option<IpAddr> {
    let address = match value.family {
        AF_INET => {
            let [a, b, c, d, ..] = value.remote_addr;
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        }
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(value.remote_addr)).to_canonical(),
        _ => return None,
    };
    (!address.is_unspecified()).then_some(address)
}

pub fn remote_port(value: &TrafficValue) -> Option<u16> {
    if value.family == AF_PACKET || value.sock_type == SOCK_RAW {
        return None;
    }
    Some(u16::from_be(value.remote_port)).filter(|&port| port != 0)
}

pub fn local_port(value: &TrafficValue) -> Option<u16> {
    if value.family == AF_PACKET || value.sock_type == SOCK_RAW {
        return None;
    }
    Some(value.local_port).filter(|&port| port != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4() -> TrafficValue {
        let mut value = TrafficValue {
            family: AF_INET,
            protocol: 6,
            sock_type: 1,
            local_port: 40000,
            remote_port: 443u16.to_be(),
            ..TrafficValue::default()
        };
        value.remote_addr[..4].copy_from_slice(&[198, 18, 0, 2]);
        value
    }

    #[test]
    fn tcp_over_ipv4_is_decoded() {
        let value = tcp4();
        assert_eq!(transport(&value), "tcp");
        assert_eq!(remote_address(&value), Some("198.18.0.2".parse().unwrap()));
        assert_eq!(remote_port(&value), Some(443));
        assert_eq!(local_port(&value), Some(40000));
    }

    #[test]
    fn unconnected_socket_has_no_peer() {
        let value = TrafficValue {
            family: AF_INET6,
            protocol: 17,
            sock_type: 2,
            ..TrafficValue::default()
        };
        assert_eq!(transport(&value), "udp");
        assert_eq!(remote_address(&value), None);
        assert_eq!(remote_port(&value), None);
    }

    #[test]
    fn raw_and_packet_sockets_have_no_ports() {
        let raw = TrafficValue {
            family: AF_INET,
            protocol: 253,
            sock_type: SOCK_RAW,
            local_port: 253,
            ..TrafficValue::default()
        };
        assert_eq!(transport(&raw), "raw");
        assert_eq!(local_port(&raw), None);
        let packet = TrafficValue {
            family: AF_PACKET,
            ..TrafficValue::default()
        };
        assert_eq!(transport(&packet), "packet");
    }
}
