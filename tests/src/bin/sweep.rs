//! Many distinct label values or processes quickly, for the cardinality and
//! incident tests.
//!
//! ```text
//! sweep ports   --peer ADDR --first P --count N          # one UDP datagram to each of N ports
//! sweep domains --server ADDR --count N --suffix test    # resolve d<i>.<suffix> with its own
//!                                                        # UDP queries, one datagram to each answer
//! sweep forks   --peer ADDR:PORT --count N               # N processes, released together, each
//!                                                        # sending one datagram
//! sweep hammer  --threads N --seconds S                  # N threads sending 64-byte datagrams on
//!                                                        # one shared connected UDP socket (one
//!                                                        # flow) to a local sink, for S seconds
//! ```
//! Prints `{"values":N,"sent":BYTES}`. Loops are bounded by --count.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    process::ExitCode,
    sync::Arc,
    thread,
    time::{Duration, Instant},
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
    if args.first().map(String::as_str) == Some("hammer") {
        let threads: u32 = option(args, "--threads")?.parse()?;
        let seconds: u64 = option(args, "--seconds")?.parse()?;
        ensure!((1..=64).contains(&threads), "--threads is 1..=64");
        ensure!((1..=120).contains(&seconds), "--seconds is 1..=120");
        let sent = hammer(threads, Duration::from_secs(seconds))?;
        println!("{{\"values\":{threads},\"sent\":{sent}}}");
        return Ok(());
    }
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
        Some("forks") => {
            let peer: SocketAddr = option(args, "--peer")?.parse()?;
            ensure!(count <= 2_000, "forks: --count is bounded to 2000");
            sent = fork_burst(peer, count)?;
        }
        _ => bail!("usage: sweep ports|domains|forks|hammer ..."),
    }
    println!("{{\"values\":{count},\"sent\":{sent}}}");
    Ok(())
}

/// Forks `count` children that wait on a pipe until all exist, then each sends
/// one datagram to `peer` and exits: `count` new processes announcing
/// themselves to the kernel within a few milliseconds. Returns the bytes sent.
fn fork_burst(peer: SocketAddr, count: u32) -> Result<usize> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-element array for pipe(2) to fill.
    ensure!(
        unsafe { libc::pipe(fds.as_mut_ptr()) } == 0,
        "pipe: {}",
        std::io::Error::last_os_error()
    );
    let [gate, release] = fds;
    let mut children = Vec::new();
    for _ in 0..count {
        // SAFETY: this program is single-threaded, so the child may run any code.
        match unsafe { libc::fork() } {
            -1 => break,
            0 => {
                let mut byte = 0u8;
                // SAFETY: plain fd calls on descriptors this process owns.
                unsafe {
                    libc::close(release);
                    // Returns at end of file: when the parent closes `release`.
                    libc::read(gate, (&raw mut byte).cast(), 1);
                }
                let sent = UdpSocket::bind("0.0.0.0:0")
                    .and_then(|socket| socket.send_to(b"x", peer))
                    .is_ok();
                // SAFETY: _exit skips the parent's atexit handlers and buffers.
                unsafe { libc::_exit(if sent { 0 } else { 1 }) }
            }
            child => children.push(child),
        }
    }
    // SAFETY: closing our own descriptors releases every child at once.
    unsafe {
        libc::close(gate);
        libc::close(release);
    }
    let mut sent = 0;
    for child in &children {
        let mut status = 0;
        // SAFETY: `child` is a child of this process; `status` is valid.
        unsafe { libc::waitpid(*child, &mut status, 0) };
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            sent += 1;
        }
    }
    ensure!(
        children.len() == count as usize,
        "fork failed after {} children: {}",
        children.len(),
        std::io::Error::last_os_error()
    );
    Ok(sent)
}

/// Datagrams one hammer thread sends at most, whatever the time allows.
const HAMMER_MAX_PER_THREAD: u64 = 20_000_000;

/// `threads` threads send 64-byte datagrams on one connected UDP socket for
/// `duration`: one flow (one process, one socket) the kernel programs add to
/// from every CPU at once. The sink never reads; datagrams past its buffer
/// are dropped by the kernel after the send succeeded, as the agent counts.
/// Returns the bytes the sends returned.
fn hammer(threads: u32, duration: Duration) -> Result<u64> {
    let sink = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    socket.connect(sink.local_addr()?)?;
    let socket = Arc::new(socket);
    let deadline = Instant::now() + duration;
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let socket = Arc::clone(&socket);
            thread::spawn(move || {
                let mut sent = 0u64;
                for _ in 0..HAMMER_MAX_PER_THREAD {
                    if Instant::now() >= deadline {
                        break;
                    }
                    if let Ok(length) = socket.send(&[0x5a; 64]) {
                        sent += length as u64;
                    }
                }
                sent
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker
            .join()
            .map_err(|_| anyhow::anyhow!("a hammer thread panicked"))?;
    }
    drop(sink);
    Ok(total)
}
