//! Many distinct label values quickly, for the cardinality test.
//!
//! ```text
//! sweep ports   --peer ADDR --first P --count N          # one UDP datagram to each of N ports
//! sweep domains --server ADDR --count N --suffix test    # resolve d<i>.<suffix> with its own
//!                                                        # UDP queries, one datagram to each answer
//! ```
//! Prints `{"values":N,"sent":BYTES}`. Loops are bounded by --count.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::dnswire;

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
                sent += resolver.send(&dnswire::query(id, &name))?;
                let mut buffer = [0u8; 512];
                let length = resolver.recv(&mut buffer)?;
                let address = dnswire::first_a_record(&buffer[..length], id)
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
