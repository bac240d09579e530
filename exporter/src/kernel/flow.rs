//! Reading the flow the kernel recorded in each traffic key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fleetsnitch_ebpf::{TrafficKey, TrafficValue};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const AF_PACKET: u16 = 17;
const SOCK_RAW: u16 = 3;

/// What a traffic key says of its socket's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub transport: &'static str,
    pub local_address: Option<IpAddr>,
    pub local_port: Option<u16>,
    pub remote_address: Option<IpAddr>,
    pub remote_port: Option<u16>,
}

impl Endpoints {
    pub fn of(key: &TrafficKey, value: &TrafficValue) -> Self {
        Self {
            transport: transport(key, value),
            local_address: local_address(key, value),
            local_port: local_port(key, value),
            remote_address: remote_address(key),
            remote_port: remote_port(key, value),
        }
    }
}

/// The transport name used in the journal and in logs.
pub fn transport(key: &TrafficKey, value: &TrafficValue) -> &'static str {
    if key.family == AF_PACKET {
        return "packet";
    }
    match key.protocol {
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

/// The connected peer, if the socket has one (unconnected UDP and raw sockets do not).
pub fn remote_address(key: &TrafficKey) -> Option<IpAddr> {
    address_of(key.family, key.remote_addr)
}

/// The socket's own address, as the kernel read it when the flow's first
/// bytes of the window went through (unbound sockets have none).
pub fn local_address(key: &TrafficKey, value: &TrafficValue) -> Option<IpAddr> {
    address_of(key.family, value.local_addr)
}

fn address_of(family: u16, bytes: [u8; 16]) -> Option<IpAddr> {
    let address = match family {
        AF_INET => {
            let [a, b, c, d, ..] = bytes;
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        }
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical(),
        _ => return None,
    };
    (!address.is_unspecified()).then_some(address)
}

/// Raw and packet sockets have no ports: their "port" field holds a protocol.
fn has_ports(key: &TrafficKey, value: &TrafficValue) -> bool {
    key.family != AF_PACKET && value.sock_type != SOCK_RAW
}

pub fn remote_port(key: &TrafficKey, value: &TrafficValue) -> Option<u16> {
    if !has_ports(key, value) {
        return None;
    }
    Some(u16::from_be(key.remote_port)).filter(|&port| port != 0)
}

pub fn local_port(key: &TrafficKey, value: &TrafficValue) -> Option<u16> {
    if !has_ports(key, value) {
        return None;
    }
    Some(key.local_port).filter(|&port| port != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4() -> (TrafficKey, TrafficValue) {
        let mut key = TrafficKey {
            family: AF_INET,
            protocol: 6,
            local_port: 40000,
            remote_port: 443u16.to_be(),
            ..TrafficKey::default()
        };
        key.remote_addr[..4].copy_from_slice(&[198, 18, 0, 2]);
        let mut value = TrafficValue {
            sock_type: 1,
            ..TrafficValue::default()
        };
        value.local_addr[..4].copy_from_slice(&[198, 18, 0, 1]);
        (key, value)
    }

    #[test]
    fn tcp_over_ipv4_is_decoded() {
        let (key, value) = tcp4();
        assert_eq!(transport(&key, &value), "tcp");
        assert_eq!(remote_address(&key), Some("198.18.0.2".parse().unwrap()));
        assert_eq!(remote_port(&key, &value), Some(443));
        assert_eq!(local_port(&key, &value), Some(40000));
        assert_eq!(
            local_address(&key, &value),
            Some("198.18.0.1".parse().unwrap())
        );
    }

    #[test]
    fn unconnected_socket_has_no_peer() {
        let key = TrafficKey {
            family: AF_INET6,
            protocol: 17,
            ..TrafficKey::default()
        };
        let value = TrafficValue {
            sock_type: 2,
            ..TrafficValue::default()
        };
        assert_eq!(transport(&key, &value), "udp");
        assert_eq!(remote_address(&key), None);
        assert_eq!(remote_port(&key, &value), None);
    }

    #[test]
    fn raw_and_packet_sockets_have_no_ports() {
        let key = TrafficKey {
            family: AF_INET,
            protocol: 253,
            local_port: 253,
            ..TrafficKey::default()
        };
        let raw = TrafficValue {
            sock_type: SOCK_RAW,
            ..TrafficValue::default()
        };
        assert_eq!(transport(&key, &raw), "raw");
        assert_eq!(local_port(&key, &raw), None);
        let packet = TrafficKey {
            family: AF_PACKET,
            ..TrafficKey::default()
        };
        assert_eq!(transport(&packet, &TrafficValue::default()), "packet");
    }
}
