//! Many distinct label values quickly, for the cardinality test.
//!
//! ```text
//! sweep ports   --peer ADDR --first P --count N          # one UDP datagram to each of N ports
//! sweep domains --server ADDR --count N --suffix test    # resolve d<i>.<suffix> with its own
//!                                                        # UDP queries, one datagram to each answer
//! ```
//! Prints `{"values":N,"sent":BYTES}`. Loops are bounded by --count.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sweep: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn option<'a>(args: &'a [String], name: &str) -> Result<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .with_context(|| format!("missing {name}"))
}

fn run(args: &[String]) -> Result<()> {
    let count: u32 = option(args, "--count")?.parse()?;
    ensure!(count <= 100_000, "--count is bounded to 100000");
    let mut sent = 0usize;
    match args.first().map(String::as_str) {
        Some("ports") => {
            let peer: IpAddr = option(args, "--peer")?.parse()?;
            let first: u16 = option(args, "--first")?.parse()?;
            for offset in 0..count {
                let port = first
                    .checked_add(u16::try_from(offset)?)
                    .context("port range overflows")?;
                // Connected, so the socket (and the kernel's key) carries the port.
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.connect(SocketAddr::new(peer, port))?;
                sent += socket.send(b"x")?;
            }
        }
        Some("domains") => {
            let server: IpAddr = option(args, "--server")?.parse()?;
            let suffix = option(args, "--suffix")?;
            let resolver = UdpSocket::bind("0.0.0.0:0")?;
            resolver.set_read_timeout(Some(Duration::from_secs(5)))?;
            resolver.connect(SocketAddr::new(server, 53))?;
            for index in 0..count {
                let name = format!("d{index}.{suffix}");
                let id = (index % 65_536) as u16;
                sent += resolver.send(&query(id, &name))?;
                let mut buffer = [0u8; 512];
                let length = resolver.recv(&mut buffer)?;
                let address = first_a_record(&buffer[..length], id)
                    .with_context(|| format!("answer for {name}"))?;
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.connect(SocketAddr::new(IpAddr::V4(address), 9))?;
                sent += socket.send(b"x")?;
            }
        }
        _ => bail!("usage: sweep ports|domains ..."),
    }
    println!("{{\"values\":{count},\"sent\":{sent}}}");
    Ok(())
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut message = id.to_be_bytes().to_vec();
    message.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.extend_from_slice(&[0, 0, 1, 0, 1]);
    message
}

fn first_a_record(message: &[u8], id: u16) -> Result<Ipv4Addr> {
    ensure!(
        message.len() >= 12 && message[..2] == id.to_be_bytes(),
        "not our answer"
    );
    let answers = u16::from_be_bytes([message[6], message[7]]);
    let mut at = skip_name(message, 12)? + 4;
    for _ in 0..answers {
        at = skip_name(message, at)?;
        let header = message.get(at..at + 10).context("truncated record")?;
        let kind = u16::from_be_bytes([header[0], header[1]]);
        let length = usize::from(u16::from_be_bytes([header[8], header[9]]));
        let data = message
            .get(at + 10..at + 10 + length)
            .context("truncated data")?;
        if kind == 1 && length == 4 {
            return Ok(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + length;
    }
    bail!("no A record")
}

fn skip_name(message: &[u8], mut at: usize) -> Result<usize> {
    loop {
        let length = *message.get(at).context("truncated name")?;
        if length & 0xc0 == 0xc0 {
            return Ok(at + 2);
        }
        at += 1 + usize::from(length);
        if length == 0 {
            return Ok(at);
        }
    }
}
