//! The benchmark's own parts that can be checked without timing anything.

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use anyhow::{Result, ensure};
use fleetsnitch_e2e::{ceiling::Ceiling, require_root};

/// The ceiling programs count on the hooks the agent counts on: every byte a
/// loopback UDP exchange sends and receives shows in their counters, and every
/// datagram delivered, with its headers, in the DNS capture hook's (other
/// traffic of the host can only add).
#[test]
fn ceiling_program_counts_what_is_sent_and_received() -> Result<()> {
    require_root!("eBPF");
    const DATAGRAMS: u64 = 500;
    const SIZE: usize = 100;
    let ceiling = Ceiling::attach()?;
    let (sent_before, received_before) = ceiling.bytes()?;
    let delivered_before = ceiling.delivered_bytes()?;

    let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    receiver.set_read_timeout(Some(Duration::from_secs(2)))?;
    let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    sender.connect(receiver.local_addr()?)?;
    let mut buffer = [0u8; 2 * SIZE];
    for _ in 0..DATAGRAMS {
        sender.send(&[0x5a; SIZE])?;
        let read = receiver.recv(&mut buffer)?;
        ensure!(read == SIZE, "received {read} bytes, sent {SIZE}");
    }

    let (sent, received) = ceiling.bytes()?;
    let delivered = ceiling.delivered_bytes()? - delivered_before;
    let expected = DATAGRAMS * SIZE as u64;
    // Each datagram reaches the receiver's socket with its UDP and IPv4 headers.
    let expected_delivered = DATAGRAMS * (SIZE as u64 + 8 + 20);
    let (sent, received) = (sent - sent_before, received - received_before);
    eprintln!(
        "ceiling: sent {sent}, received {received}, this test alone {expected} each way; \
         delivered {delivered}, this test alone {expected_delivered}"
    );
    ensure!(
        delivered >= expected_delivered,
        "ceiling counted {delivered} bytes delivered, this test alone delivered {expected_delivered}"
    );
    ensure!(
        sent >= expected,
        "ceiling counted {sent} bytes sent, this test alone sent {expected}"
    );
    ensure!(
        received >= expected,
        "ceiling counted {received} bytes received, this test alone received {expected}"
    );
    Ok(())
}
