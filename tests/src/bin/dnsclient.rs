//! Resolves a name one of three ways, connects to the address it got and
//! uploads some bytes, so a test can check the agent names the peer's domain.
//!
//! ```text
//! dnsclient getaddrinfo NAME --port P --bytes N
//! dnsclient udp NAME --server ADDR --port P --bytes N     # its own UDP query
//! dnsclient tcp NAME --server ADDR --port P --bytes N     # its own query over TCP
//! ```
//! `--linger SECS` keeps it running that long after the upload.
//! Prints `{"address":"...","local":"ADDR:PORT","sent":N}`: the address
//! connected to, the connection's own address and port, and the bytes the
//! upload's send calls returned.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::dnswire;

const TIMEOUT: Duration = Duration::from_secs(5);
const QUERY_ID: u16 = 0x4242;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dnsclient: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn option<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn run(args: &[String]) -> Result<()> {
    let (Some(mode), Some(name)) = (args.first(), args.get(1)) else {
        bail!("usage: dnsclient getaddrinfo|udp|tcp NAME [--server ADDR] --port P --bytes N");
    };
    let port: u16 = option(args, "--port").context("--port")?.parse()?;
    let bytes: usize = option(args, "--bytes").unwrap_or("10000").parse()?;
    let server = || -> Result<SocketAddr> {
        let ip: IpAddr = option(args, "--server").context("--server")?.parse()?;
        Ok(SocketAddr::new(ip, 53))
    };
    let address = match mode.as_str() {
        "getaddrinfo" => (name.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("getaddrinfo {name}"))?
            .find(SocketAddr::is_ipv4)
            .context("no IPv4 address")?
            .ip(),
        "udp" => IpAddr::V4(resolve_udp(name, server()?)?),
        "tcp" => IpAddr::V4(resolve_tcp(name, server()?)?),
        other => bail!("unknown mode {other}"),
    };
    let mut stream = TcpStream::connect_timeout(&SocketAddr::new(address, port), TIMEOUT)?;
    let chunk = vec![0x5a_u8; 4096];
    let mut sent = 0;
    while sent < bytes {
        let n = stream.write(&chunk[..(bytes - sent).min(chunk.len())])?;
        ensure!(n > 0, "peer closed");
        sent += n;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    // Wait for the peer to close, so every byte has been received.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let local = stream.local_addr()?;
    println!("{{\"address\":\"{address}\",\"local\":\"{local}\",\"sent\":{sent}}}");
    if let Some(seconds) = option(args, "--linger") {
        let seconds: f64 = seconds.parse().context("--linger")?;
        std::thread::sleep(Duration::from_secs_f64(seconds.clamp(0.0, 60.0)));
    }
    Ok(())
}

fn resolve_udp(name: &str, server: SocketAddr) -> Result<Ipv4Addr> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    // Unconnected: the query goes out with sendto, as many resolvers do it.
    socket.send_to(&dnswire::query(QUERY_ID, name), server)?;
    let mut buffer = [0u8; 1500];
    let (length, _) = socket.recv_from(&mut buffer)?;
    dnswire::first_a_record(&buffer[..length], QUERY_ID)
}

fn resolve_tcp(name: &str, server: SocketAddr) -> Result<Ipv4Addr> {
    let mut stream = TcpStream::connect_timeout(&server, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let message = dnswire::query(QUERY_ID, name);
    let mut framed = (message.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&message);
    stream.write_all(&framed)?;
    let mut length = [0u8; 2];
    stream.read_exact(&mut length)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut answer)?;
    dnswire::first_a_record(&answer, QUERY_ID)
}
