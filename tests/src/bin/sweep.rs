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
//! sweep share   --child PATH --rounds N                # one connected UDP socket used in turn
//!                                                        # by this process and a child running
//!                                                        # PATH (another executable), N rounds,
//!                                                        # then connected to a second port
//! sweep share-child --fd FD                              # (the child) one 37-byte datagram on
//!                                                        # FD per line read, its length printed
//! sweep handover --next PATH --rounds N                  # N datagrams on a connected UDP socket,
//!                                                        # then exec PATH (same process) which
//!                                                        # sends N more on the same socket
//! sweep reuse --first PATH --next PATH --rounds N        # PATH (first) sends N datagrams from a
//!                                                        # fixed local port and exits; the next
//!                                                        # PATH gets the same process id (root:
//!                                                        # ns_last_pid) and sends N more on the
//!                                                        # same flow
//! sweep reuse-send --local L --port P --rounds N --size S [--pid ID]
//!                                                        # (a program of `reuse`) N datagrams of
//!                                                        # S bytes from port L to port P; with
//!                                                        # --pid, only when its process id is ID
//! ```
//! Prints `{"values":N,"sent":BYTES}` (`share` adds the bytes by sender and
//! port, `handover` and `reuse` by program). Loops are bounded by --count or --rounds.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{Command, ExitCode, Stdio},
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
    match args.first().map(String::as_str) {
        Some("share") => {
            let rounds: u32 = option(args, "--rounds")?.parse()?;
            ensure!((1..=10_000).contains(&rounds), "--rounds is 1..=10000");
            println!("{}", share(Path::new(option(args, "--child")?), rounds)?);
            return Ok(());
        }
        Some("share-child") => return share_child(option(args, "--fd")?.parse()?),
        Some("handover") => {
            let rounds: u32 = option(args, "--rounds")?.parse()?;
            ensure!((1..=10_000).contains(&rounds), "--rounds is 1..=10000");
            return handover(Path::new(option(args, "--next")?), rounds);
        }
        Some("handover-next") => {
            return handover_next(
                option(args, "--fd")?.parse()?,
                option(args, "--rounds")?.parse()?,
                option(args, "--port")?.parse()?,
                option(args, "--before")?.parse()?,
            );
        }
        Some("reuse") => {
            let rounds: u32 = option(args, "--rounds")?.parse()?;
            ensure!((1..=10_000).contains(&rounds), "--rounds is 1..=10000");
            let programs = (
                Path::new(option(args, "--first")?),
                Path::new(option(args, "--next")?),
            );
            println!("{}", reuse(programs, rounds)?);
            return Ok(());
        }
        Some("reuse-send") => {
            let pid = match args.iter().any(|a| a == "--pid") {
                true => Some(option(args, "--pid")?.parse()?),
                false => None,
            };
            return reuse_send(
                option(args, "--local")?.parse()?,
                option(args, "--port")?.parse()?,
                option(args, "--rounds")?.parse()?,
                option(args, "--size")?.parse()?,
                pid,
            );
        }
        _ => {}
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
        _ => bail!("usage: sweep ports|domains|forks|hammer|share ..."),
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

/// Datagram sizes of `share`: the parent's, the child's, and the parent's
/// after connecting to the second port.
const SHARE_PARENT_BYTES: usize = 100;
const SHARE_CHILD_BYTES: usize = 37;
const SHARE_SECOND_BYTES: usize = 50;

/// A local UDP sink on a port below the ephemeral range, so that the agent's
/// `remote_port` label names it (ephemeral ports are folded).
fn low_port_sink() -> Result<(UdpSocket, u16)> {
    let start = 20_000 + (std::process::id() % 5_000) as u16;
    for port in (start..30_000).chain(20_000..start) {
        if let Ok(sink) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) {
            return Ok((sink, port));
        }
    }
    bail!("no free UDP port in 20000..30000")
}

/// One connected UDP socket carried, in turn, by this process and by a child
/// running another executable, `rounds` times (both within one drain), then
/// connected to a second port and used `rounds` times more. Returns the
/// report: what each sent to each port.
fn share(child: &Path, rounds: u32) -> Result<String> {
    let (_first_sink, first_port) = low_port_sink()?;
    let (_second_sink, second_port) = low_port_sink()?;
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    socket.connect((Ipv4Addr::LOCALHOST, first_port))?;
    // The child inherits the socket across exec.
    keep_across_exec(socket.as_raw_fd())?;
    let mut running = Command::new(child)
        .args(["share-child", "--fd", &socket.as_raw_fd().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", child.display()))?;
    let mut to_child = running.stdin.take().context("child stdin")?;
    let mut from_child = BufReader::new(running.stdout.take().context("child stdout")?);
    let (mut parent_first, mut child_first) = (0u64, 0u64);
    for _ in 0..rounds {
        parent_first += socket.send(&[0x5a; SHARE_PARENT_BYTES])? as u64;
        to_child.write_all(b"send\n")?;
        to_child.flush()?;
        let mut line = String::new();
        ensure!(
            from_child.read_line(&mut line)? > 0,
            "the child ended early"
        );
        child_first += line
            .trim()
            .parse::<u64>()
            .with_context(|| format!("child said {line:?}"))?;
    }
    drop(to_child);
    let status = running.wait()?;
    ensure!(status.success(), "the child failed: {status}");
    socket.connect((Ipv4Addr::LOCALHOST, second_port))?;
    let mut parent_second = 0u64;
    for _ in 0..rounds {
        parent_second += socket.send(&[0x5a; SHARE_SECOND_BYTES])? as u64;
    }
    Ok(format!(
        "{{\"values\":3,\"sent\":{},\"first_port\":{first_port},\"second_port\":{second_port},\
         \"parent_first\":{parent_first},\"child_first\":{child_first},\
         \"parent_second\":{parent_second}}}",
        parent_first + child_first + parent_second
    ))
}

/// Datagram sizes of `handover`: before the exec and after it.
const HANDOVER_FIRST_BYTES: usize = 100;
const HANDOVER_NEXT_BYTES: usize = 37;

/// Clears close-on-exec on `fd`, so that the program exec'd next keeps it.
fn keep_across_exec(fd: i32) -> Result<()> {
    // SAFETY: fcntl on a descriptor this process owns, no pointers.
    ensure!(
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == 0,
        "fcntl(F_SETFD): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// One connected UDP socket carried across an exec: this program sends
/// `rounds` datagrams, then the same process becomes `next` (another
/// executable), which sends `rounds` more on the same socket and prints the
/// report. Same process id, same flow, two programs, within one drain.
fn handover(next: &Path, rounds: u32) -> Result<()> {
    let (sink, port) = low_port_sink()?;
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    socket.connect((Ipv4Addr::LOCALHOST, port))?;
    let mut before = 0u64;
    for _ in 0..rounds {
        before += socket.send(&[0x5a; HANDOVER_FIRST_BYTES])? as u64;
    }
    // The sink stays open across the exec too: a datagram to a closed port
    // would make the next send fail.
    keep_across_exec(sink.as_raw_fd())?;
    keep_across_exec(socket.as_raw_fd())?;
    let error = Command::new(next)
        .args([
            "handover-next",
            "--fd",
            &socket.as_raw_fd().to_string(),
            "--rounds",
            &rounds.to_string(),
            "--port",
            &port.to_string(),
            "--before",
            &before.to_string(),
        ])
        .exec();
    Err(error).with_context(|| format!("exec {}", next.display()))
}

/// The program `handover` becomes: `rounds` datagrams on the socket it was
/// handed, then the report.
fn handover_next(fd: i32, rounds: u32, port: u16, before: u64) -> Result<()> {
    ensure!((1..=10_000).contains(&rounds), "--rounds is 1..=10000");
    // SAFETY: the program before this exec passed this descriptor, a UDP
    // socket, and nothing else here owns it.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    let mut after = 0u64;
    for _ in 0..rounds {
        after += socket.send(&[0x5a; HANDOVER_NEXT_BYTES])? as u64;
    }
    println!(
        "{{\"values\":2,\"sent\":{},\"port\":{port},\"pid\":{},\"first\":{before},\"next\":{after}}}",
        before + after,
        std::process::id()
    );
    Ok(())
}

/// Datagram sizes of `reuse`: the first program's and the next one's.
const REUSE_FIRST_BYTES: usize = 100;
const REUSE_NEXT_BYTES: usize = 37;
/// Tries at giving the next program the first one's process id: another
/// process on the host may fork between the write to `ns_last_pid` and ours.
const REUSE_ATTEMPTS: u32 = 200;
/// What `reuse-send` prints when it did not get the process id it wanted.
const REUSE_MISSED: &str = "missed";

/// Two programs, one after the other, with the same process id and the same
/// flow (local port, peer) within one drain: `first` sends `rounds`
/// datagrams and exits, then `next` is started with the id `first` had
/// (`/proc/sys/kernel/ns_last_pid` set just below it, retried when another
/// process takes it first) and sends `rounds` more. Returns the report: the
/// bytes of each program, the port and the id.
fn reuse((first, next): (&Path, &Path), rounds: u32) -> Result<String> {
    let (_sink, port) = low_port_sink()?;
    // A local port of our choosing for both programs: bound once here to
    // have the kernel pick a free one, then left for them.
    let local = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let send = |program: &Path, size: usize, pid: Option<u32>| -> Result<(u32, String)> {
        let mut command = Command::new(program);
        command.args([
            "reuse-send",
            "--local",
            &local.to_string(),
            "--port",
            &port.to_string(),
            "--rounds",
            &rounds.to_string(),
            "--size",
            &size.to_string(),
        ]);
        if let Some(pid) = pid {
            command.args(["--pid", &pid.to_string()]);
        }
        let child = command
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", program.display()))?;
        let id = child.id();
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "{} failed: {}",
            program.display(),
            out.status
        );
        Ok((id, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    };
    let (pid, said) = send(first, REUSE_FIRST_BYTES, None)?;
    let first_bytes: u64 = said
        .parse()
        .with_context(|| format!("first said {said:?}"))?;
    for attempt in 1..=REUSE_ATTEMPTS {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .context("write /proc/sys/kernel/ns_last_pid (needs root)")?;
        let (_, said) = send(next, REUSE_NEXT_BYTES, Some(pid))?;
        if said == REUSE_MISSED {
            continue;
        }
        let next_bytes: u64 = said
            .parse()
            .with_context(|| format!("next said {said:?}"))?;
        return Ok(format!(
            "{{\"values\":2,\"sent\":{},\"port\":{port},\"pid\":{pid},\"attempts\":{attempt},\
             \"first\":{first_bytes},\"next\":{next_bytes}}}",
            first_bytes + next_bytes
        ));
    }
    bail!("process id {pid} was not given to the next program in {REUSE_ATTEMPTS} tries")
}

/// A program of `reuse`: `rounds` datagrams of `size` bytes from local port
/// `local` to port `port`, the bytes sent printed; with `pid`, nothing sent
/// (and "missed" printed) unless this process has that id.
fn reuse_send(local: u16, port: u16, rounds: u32, size: usize, pid: Option<u32>) -> Result<()> {
    ensure!((1..=10_000).contains(&rounds), "--rounds is 1..=10000");
    ensure!((1..=1_000).contains(&size), "--size is 1..=1000");
    if pid.is_some_and(|pid| pid != std::process::id()) {
        println!("{REUSE_MISSED}");
        return Ok(());
    }
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, local))
        .with_context(|| format!("bind 127.0.0.1:{local}"))?;
    socket.connect((Ipv4Addr::LOCALHOST, port))?;
    let datagram = vec![0x5a; size];
    let mut sent = 0u64;
    for _ in 0..rounds {
        sent += socket.send(&datagram)? as u64;
    }
    println!("{sent}");
    Ok(())
}

/// The child of `share`: one datagram on the inherited socket per line read,
/// its length printed, until standard input ends.
fn share_child(fd: i32) -> Result<()> {
    // SAFETY: the parent passed this descriptor, a UDP socket, to this
    // process, and nothing else here owns it.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        line?;
        let sent = socket.send(&[0x5a; SHARE_CHILD_BYTES])?;
        writeln!(out, "{sent}")?;
        out.flush()?;
    }
    Ok(())
}
