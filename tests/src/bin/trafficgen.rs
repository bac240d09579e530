//! Traffic generator for the fleetsnitch end-to-end accuracy suite.
//!
//! ```text
//! trafficgen serve  [--v4 ADDR] [--v6 ADDR]
//! trafficgen client <scenario> [--peer-v4 ADDR] [--peer-v6 ADDR] [--bytes N] [--count N]
//!                   [--secs N] [--iface NAME]
//! trafficgen list
//! ```
//!
//! `serve` runs every peer service until killed and prints `ready` once all are bound;
//! each `stats` line on its stdin is answered with one JSON line
//! `{"scenario":"serve","sent":N,"received":M}` of what its own socket calls returned.
//! `client` runs one scenario and prints exactly one JSON line
//! `{"scenario":"...","sent":N,"received":M}`: the sums of what the send-side and the
//! receive-side socket calls returned in this process and its children.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use fleetsnitch_e2e::scenarios::{
    self, AF_PACKET_ETHERTYPE, PEER_V4, PEER_V6, RAW_IP_PROTO, SCENARIOS, SLOW_DRIP_SECS, ports,
};

/// Chunk size for bulk stream transfers.
const CHUNK: usize = 64 * 1024;
/// Bound on any single blocking socket operation.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a UDP receiver waits for one more datagram before deciding the rest are lost.
const UDP_IDLE: Duration = Duration::from_millis(1000);
/// Upper bound for sizes a peer accepts in a request (keeps a bad request from running forever).
const MAX_REQUEST_BYTES: u64 = 1 << 32;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trafficgen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    let mut s = String::from(
        "usage:\n  trafficgen serve [--v4 ADDR] [--v6 ADDR]   (prints `ready`; answers `stats` on stdin)\n  \
         trafficgen client <scenario> [--peer-v4 ADDR] [--peer-v6 ADDR] [--bytes N] [--count N] \
         [--secs N] [--iface NAME] [--linger SECS]\n  trafficgen list\n\nscenarios (default --bytes / --count):\n",
    );
    for sc in SCENARIOS {
        s.push_str(&format!(
            "  {:<18} {:>9} / {:<6} {}\n",
            sc.name, sc.bytes, sc.count, sc.help
        ));
    }
    s
}

fn run(args: &[String]) -> Result<()> {
    let Some(mode) = args.first() else {
        bail!("missing mode\n{}", usage());
    };
    let rest = &args[1..];
    match mode.as_str() {
        "serve" => {
            let opts = Opts::parse(rest, &["v4", "v6", "dns"])?;
            let v4: Ipv4Addr = opts.get_parsed("v4")?.unwrap_or(PEER_V4.parse()?);
            let v6: Ipv6Addr = opts.get_parsed("v6")?.unwrap_or(PEER_V6.parse()?);
            // `--dns off` leaves port 53 to a real DNS server in the same namespace.
            let dns = opts.get("dns") != Some("off");
            serve(v4, v6, dns)
        }
        "client" => {
            let Some(name) = rest.first() else {
                bail!("missing scenario\n{}", usage());
            };
            let sc = scenarios::scenario(name)
                .ok_or_else(|| anyhow!("unknown scenario {name:?}\n{}", usage()))?;
            let opts = Opts::parse(
                &rest[1..],
                &[
                    "peer-v4", "peer-v6", "bytes", "count", "secs", "iface", "linger",
                ],
            )?;
            // Run on after the scenario, as a service would: its file stays
            // reachable through the process (a container's file, from outside).
            let linger: Option<f64> = opts.get_parsed("linger")?;
            let ctx = Ctx {
                peer_v4: opts.get_parsed("peer-v4")?.unwrap_or(PEER_V4.parse()?),
                peer_v6: opts.get_parsed("peer-v6")?.unwrap_or(PEER_V6.parse()?),
                bytes: opts.get_parsed("bytes")?.unwrap_or(sc.bytes),
                count: opts.get_parsed("count")?.unwrap_or(sc.count),
                secs: opts.get_parsed("secs")?.unwrap_or(SLOW_DRIP_SECS),
                iface: opts.get("iface").map(str::to_owned),
                counts: Counts::default(),
            };
            let result = check_where(sc.name, &ctx).and_then(|()| run_scenario(sc.name, &ctx));
            if let Some(secs) = linger {
                std::thread::sleep(std::time::Duration::from_secs_f64(secs.clamp(0.0, 60.0)));
            }
            let (sent, received) = ctx.counts.get();
            match result {
                Ok(()) => {
                    println!(
                        "{{\"scenario\":\"{}\",\"sent\":{sent},\"received\":{received}}}",
                        sc.name
                    );
                    Ok(())
                }
                Err(e) => Err(e.context(format!(
                    "scenario {} failed after sent={sent} received={received}",
                    sc.name
                ))),
            }
        }
        "list" => {
            for sc in SCENARIOS {
                println!("{}", sc.name);
            }
            Ok(())
        }
        "help" | "--help" | "-h" => {
            print!("{}", usage());
            Ok(())
        }
        // Hidden sub-modes: re-executions of this same binary.
        "__child" => short_lived_child(rest),
        "__ownns-outer" => own_ns_outer(rest),
        "__ownns-inner" => own_ns_inner(rest),
        other => bail!("unknown mode {other:?}\n{}", usage()),
    }
}

// ---------------------------------------------------------------------------------------
// Option parsing (tiny, no dependency)

struct Opts(Vec<(String, String)>);

impl Opts {
    fn parse(args: &[String], known: &[&str]) -> Result<Self> {
        let mut out = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .ok_or_else(|| anyhow!("unexpected argument {a:?}"))?;
            let (key, value) = match key.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => {
                    let v = it
                        .next()
                        .ok_or_else(|| anyhow!("option --{key} needs a value"))?;
                    (key.to_owned(), v.clone())
                }
            };
            ensure!(known.contains(&key.as_str()), "unknown option --{key}");
            out.push((key, value));
        }
        Ok(Self(out))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn get_parsed<T>(&self, key: &str) -> Result<Option<T>>
    where
        T: std::str::FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        self.get(key)
            .map(|v| v.parse::<T>().with_context(|| format!("--{key} {v:?}")))
            .transpose()
    }
}

// ---------------------------------------------------------------------------------------
// Counting

/// Sums of what send-side / receive-side calls returned, shared by all threads.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    received: AtomicU64,
}

impl Counts {
    const fn new() -> Self {
        Self {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }
    fn sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn get(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

struct Ctx {
    peer_v4: Ipv4Addr,
    peer_v6: Ipv6Addr,
    bytes: u64,
    count: u64,
    secs: u64,
    iface: Option<String>,
    counts: Counts,
}

impl Ctx {
    fn v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.peer_v4), port)
    }
    fn v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.peer_v6), port)
    }
    /// `--bytes / --count`, at least 1.
    fn unit_size(&self) -> Result<usize> {
        ensure!(self.count > 0, "--count must be > 0");
        Ok(usize::try_from((self.bytes / self.count).max(1))?)
    }
}

/// Whether this network namespace has a usable default route (IPv4 or IPv6), i.e. is
/// attached to a real network rather than being a test namespace. Unknown counts as yes.
fn has_default_route() -> bool {
    let (Ok(v4), Ok(v6)) = (
        std::fs::read_to_string("/proc/net/route"),
        std::fs::read_to_string("/proc/net/ipv6_route"),
    ) else {
        return true;
    };
    // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
    let v4_default = v4.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 7 && f[1] == "00000000" && f[7] == "00000000"
    });
    // dest plen src splen next_hop metric refcnt use flags iface; the kernel's own
    // `::/0 ... lo` entry is a reject route (RTF_REJECT, 0x0200).
    let v6_default = v6.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 9
            && f[0].bytes().all(|b| b == b'0')
            && f[1] == "00"
            && u32::from_str_radix(f[8], 16).is_ok_and(|flags| flags & 0x0200 == 0)
            && f[9] != "lo"
    });
    v4_default || v6_default
}

/// Traffic to the peer addresses (or frames on an interface) may only leave from a test
/// network namespace, never from one attached to a real network: there, 198.18.0.2 would
/// go out the default route. Loopback-only scenarios and loopback peers are fine anywhere.
fn check_where(name: &str, ctx: &Ctx) -> Result<()> {
    let loopback_only = matches!(
        name,
        "loopback" | "own_namespaces" | "local_ipc_and_peek" | "kernel_forward"
    );
    let loopback_peers = ctx.peer_v4.is_loopback() && ctx.peer_v6.is_loopback();
    if loopback_only || (loopback_peers && name != "af_packet") {
        return Ok(());
    }
    let hint = if name == "af_packet" {
        ""
    } else {
        " or point --peer-v4/--peer-v6 at loopback"
    };
    ensure!(
        !has_default_route(),
        "refusing to run {name} in a network namespace with a default route (the host's?): \
         run it inside a test namespace (ip netns exec <ns> ...){hint}"
    );
    Ok(())
}

fn run_scenario(name: &str, ctx: &Ctx) -> Result<()> {
    match name {
        "tcp_download" => tcp_download(ctx, ctx.v4(ports::TCP_SOURCE)),
        "tcp_upload" => tcp_upload(ctx, ctx.v4(ports::TCP_SINK)),
        "tcp_duplex" => tcp_duplex(ctx, ctx.v4(ports::TCP_ECHO)),
        "udp_both" => udp_echo_exchange(ctx, ctx.v4(ports::UDP_ECHO)),
        "icmp_echo" => icmp_echo(ctx),
        "udp_443" => udp_echo_exchange(ctx, ctx.v4(ports::UDP_QUIC)),
        "ipv6_tcp" => tcp_duplex(ctx, ctx.v6(ports::TCP_ECHO)),
        "udp_flood_53" => udp_flood_53(ctx),
        "raw_ip_253" => raw_ip_253(ctx),
        "short_lived" => short_lived(ctx),
        "af_packet" => af_packet(ctx),
        "io_uring_send" => io_uring_send(ctx),
        "io_uring_recv" => io_uring_recv(ctx),
        "sendfile_upload" => sendfile_upload(ctx),
        "splice_download" => splice_download(ctx),
        "sendmmsg" => sendmmsg(ctx),
        "recvmmsg" => recvmmsg(ctx),
        "loopback" => loopback(&ctx.counts, ctx.bytes),
        "own_namespaces" => own_namespaces(ctx),
        "slow_drip" => slow_drip(ctx),
        "many_tcp_conns" => many_tcp_conns(ctx),
        "parallel_burst" => parallel_burst(ctx),
        "ipv6_udp_download" => udp_download(ctx, ctx.v6(ports::UDP_SOURCE)),
        "local_ipc_and_peek" => local_ipc_and_peek(ctx),
        "kernel_forward" => kernel_forward(ctx),
        other => bail!("scenario {other:?} has no implementation"),
    }
}

// ---------------------------------------------------------------------------------------
// Small I/O helpers. Every send/recv goes through one of these so it is counted.

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Writes all of `buf`, counting every `send` return value.
fn write_all_counted(mut w: impl Write, buf: &[u8], c: &Counts) -> io::Result<()> {
    let mut rest = buf;
    while !rest.is_empty() {
        match w.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                c.sent(n);
                rest = &rest[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `total` bytes in chunks.
fn send_bytes(mut w: impl Write, total: u64, c: &Counts) -> io::Result<()> {
    let buf = payload(CHUNK);
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        write_all_counted(&mut w, &buf[..n], c)?;
        left -= n as u64;
    }
    Ok(())
}

/// One `recv`, counted; retries on EINTR.
fn read_counted(mut r: impl Read, buf: &mut [u8], c: &Counts) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Ok(n) => {
                c.received(n);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads until EOF; returns the number of bytes read.
fn read_to_eof_counted(mut r: impl Read, c: &Counts) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = read_counted(&mut r, &mut buf, c)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Reads exactly `len` bytes (or until EOF); returns how many were read.
fn read_exact_counted(mut r: impl Read, len: u64, c: &Counts) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    while total < len {
        let want = (len - total).min(CHUNK as u64) as usize;
        let n = read_counted(&mut r, &mut buf[..want], c)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total)
}

/// Half-closes and waits for the peer to close, so everything sent was delivered.
fn finish_upload(s: &TcpStream, c: &Counts) -> Result<()> {
    s.shutdown(Shutdown::Write)?;
    read_to_eof_counted(s, c)?;
    Ok(())
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cvt_size(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

fn new_socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success we own the returned descriptor.
    let fd = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` outlives the call and the length matches its type.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn set_rcvtimeo(fd: RawFd, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` outlives the call and the length matches its type.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Big receive buffer so bursts of datagrams are not dropped (root may exceed rmem_max).
fn big_rcvbuf(fd: RawFd) {
    let size = 8 * 1024 * 1024;
    if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size).is_err() {
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, size);
    }
}

fn sockaddr_in(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// `sendto` on a raw descriptor, retrying transient errors a bounded number of times.
fn sendto_raw(
    fd: RawFd,
    buf: &[u8],
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> io::Result<usize> {
    let mut tries = 0;
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes and `addr` for `len` bytes.
        let rc = unsafe { libc::sendto(fd, buf.as_ptr().cast(), buf.len(), 0, addr, len) };
        match cvt_size(rc) {
            Ok(n) => return Ok(n),
            Err(e)
                if tries < 100
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::ENOBUFS | libc::EAGAIN)
                    ) =>
            {
                tries += 1;
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// UDP socket bound to the wildcard address of `peer`'s family and connected to `peer`.
fn udp_connected(peer: SocketAddr) -> Result<UdpSocket> {
    let bind: SocketAddr = match peer {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(bind)?;
    s.connect(peer)
        .with_context(|| format!("udp connect {peer}"))?;
    big_rcvbuf(s.as_raw_fd());
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One UDP `send` (connected socket), counted. Transient errors are retried a few times.
fn udp_send_counted(s: &UdpSocket, buf: &[u8], c: &Counts) -> Result<()> {
    let mut tries = 0;
    loop {
        match s.send(buf) {
            Ok(n) => {
                c.sent(n);
                return Ok(());
            }
            Err(e)
                if tries < 100
                    && (e.kind() == io::ErrorKind::Interrupted
                        || matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN))) =>
            {
                tries += 1;
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// One UDP `recv` with a timeout, counted. `Ok(None)` on timeout.
fn udp_recv_counted(s: &UdpSocket, buf: &mut [u8], c: &Counts) -> Result<Option<usize>> {
    loop {
        match s.recv(buf) {
            Ok(n) => {
                c.received(n);
                return Ok(Some(n));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios

fn tcp_download(ctx: &Ctx, addr: SocketAddr) -> Result<()> {
    let c = &ctx.counts;
    let s = connect(addr)?;
    write_all_counted(&s, &ctx.bytes.to_be_bytes(), c)?;
    let got = read_to_eof_counted(&s, c)?;
    ensure!(got == ctx.bytes, "downloaded {got} of {} bytes", ctx.bytes);
    Ok(())
}

fn tcp_upload(ctx: &Ctx, addr: SocketAddr) -> Result<()> {
    let s = connect(addr)?;
    send_bytes(&s, ctx.bytes, &ctx.counts)?;
    finish_upload(&s, &ctx.counts)
}

/// Sends `--bytes` to an echo service from one thread while the other reads the echo.
fn tcp_duplex(ctx: &Ctx, addr: SocketAddr) -> Result<()> {
    let c = &ctx.counts;
    let s = connect(addr)?;
    let got = thread::scope(|scope| -> Result<u64> {
        let writer = scope.spawn(|| -> Result<()> {
            send_bytes(&s, ctx.bytes, c)?;
            s.shutdown(Shutdown::Write)?;
            Ok(())
        });
        let got = read_to_eof_counted(&s, c);
        writer
            .join()
            .map_err(|_| anyhow!("writer thread panicked"))??;
        Ok(got?)
    })?;
    ensure!(
        got == ctx.bytes,
        "echo returned {got} of {} bytes",
        ctx.bytes
    );
    Ok(())
}

/// UDP datagrams to an echo service, in windows of 32 so the echoes are not dropped.
fn udp_echo_exchange(ctx: &Ctx, peer: SocketAddr) -> Result<()> {
    let c = &ctx.counts;
    let size = ctx.unit_size()?;
    let s = udp_connected(peer)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let buf = payload(size);
    let mut rbuf = vec![0u8; 65536];
    let mut sent = 0u64;
    let mut echoed = 0u64;
    while sent < ctx.count {
        let window = (ctx.count - sent).min(32);
        for _ in 0..window {
            udp_send_counted(&s, &buf, c)?;
        }
        sent += window;
        let mut got = 0;
        while got < window {
            match udp_recv_counted(&s, &mut rbuf, c)? {
                Some(_) => got += 1,
                None => break,
            }
        }
        echoed += got;
    }
    ensure!(
        echoed * 10 >= ctx.count * 9,
        "only {echoed} of {} echoes came back",
        ctx.count
    );
    Ok(())
}

/// Downloads `--count` datagrams from the UDP source with plain `recv`.
fn udp_download(ctx: &Ctx, peer: SocketAddr) -> Result<()> {
    let c = &ctx.counts;
    let size = ctx.unit_size()?;
    let s = udp_connected(peer)?;
    s.set_read_timeout(Some(UDP_IDLE))?;
    udp_send_counted(&s, &udp_source_request(ctx.count, size)?, c)?;
    let mut buf = vec![0u8; 65536];
    let mut got = 0u64;
    while got < ctx.count {
        match udp_recv_counted(&s, &mut buf, c)? {
            Some(_) => got += 1,
            None => break,
        }
    }
    ensure!(
        got * 10 >= ctx.count * 9,
        "only {got} of {} datagrams arrived",
        ctx.count
    );
    Ok(())
}

fn udp_source_request(count: u64, size: usize) -> Result<[u8; 8]> {
    let count = u32::try_from(count)?;
    let size = u32::try_from(size)?;
    ensure!(size <= 65_507, "datagram size {size} too large");
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&count.to_be_bytes());
    req[4..].copy_from_slice(&size.to_be_bytes());
    Ok(req)
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Raw ICMP echo, one request at a time. Every packet `recvfrom` returns is counted,
/// IP header included, whatever it is (the raw socket sees all ICMP in the namespace).
fn icmp_echo(ctx: &Ctx) -> Result<()> {
    let c = &ctx.counts;
    let size = ctx.unit_size()?;
    let fd = new_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP)
        .context("raw ICMP socket (needs CAP_NET_RAW)")?;
    let raw = fd.as_raw_fd();
    big_rcvbuf(raw);
    set_rcvtimeo(raw, Duration::from_millis(100))?;
    let dst = sockaddr_in(ctx.peer_v4, 0);
    let ident = (std::process::id() & 0xffff) as u16;
    let mut rbuf = vec![0u8; 65536];
    let mut replies = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    for seq in 0..ctx.count {
        let seq = (seq & 0xffff) as u16;
        let mut pkt = vec![0u8; 8 + size];
        pkt[0] = 8; // echo request
        pkt[4..6].copy_from_slice(&ident.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        pkt[8..].copy_from_slice(&payload(size));
        let ck = inet_checksum(&pkt);
        pkt[2..4].copy_from_slice(&ck.to_be_bytes());
        let n = sendto_raw(
            raw,
            &pkt,
            (&raw const dst).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )?;
        c.sent(n);
        // Read until our reply shows up (bounded); count everything read.
        let wait_until = (Instant::now() + Duration::from_secs(1)).min(deadline);
        while Instant::now() < wait_until {
            // SAFETY: `rbuf` is valid for its length; no source address requested.
            let rc = unsafe {
                libc::recvfrom(
                    raw,
                    rbuf.as_mut_ptr().cast(),
                    rbuf.len(),
                    0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            match cvt_size(rc) {
                Ok(n) => {
                    c.received(n);
                    if is_our_echo_reply(&rbuf[..n], ident, seq) {
                        replies += 1;
                        break;
                    }
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {}
                Err(e) => return Err(e).context("recvfrom on raw ICMP socket"),
            }
        }
    }
    ensure!(
        replies * 10 >= ctx.count * 9,
        "only {replies} of {} echo replies",
        ctx.count
    );
    Ok(())
}

fn is_our_echo_reply(pkt: &[u8], ident: u16, seq: u16) -> bool {
    let Some(&vhl) = pkt.first() else {
        return false;
    };
    let ihl = usize::from(vhl & 0x0f) * 4;
    let Some(icmp) = pkt.get(ihl..) else {
        return false;
    };
    icmp.len() >= 8
        && icmp[0] == 0
        && u16::from_be_bytes([icmp[4], icmp[5]]) == ident
        && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
}

fn dns_query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(48);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, QDCOUNT=1
    for label in ["udp-flood", "fsn-e2e", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]); // A, IN
    q
}

/// Many small DNS queries to port 53 as fast as possible; a second thread reads answers.
fn udp_flood_53(ctx: &Ctx) -> Result<()> {
    let c = &ctx.counts;
    ensure!(ctx.count > 0, "--count must be > 0");
    let s = udp_connected(ctx.v4(ports::UDP_DNS))?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let done = AtomicBool::new(false);
    let answers = thread::scope(|scope| -> Result<u64> {
        let reader = scope.spawn(|| -> Result<u64> {
            let mut buf = vec![0u8; 65536];
            let mut n = 0u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                match udp_recv_counted(&s, &mut buf, c)? {
                    Some(_) => n += 1,
                    None if done.load(Ordering::Acquire) => break,
                    None => {}
                }
                if n >= ctx.count {
                    break;
                }
            }
            Ok(n)
        });
        let send = (|| -> Result<()> {
            for i in 0..ctx.count {
                udp_send_counted(&s, &dns_query((i & 0xffff) as u16), c)?;
            }
            Ok(())
        })();
        done.store(true, Ordering::Release);
        let answers = reader
            .join()
            .map_err(|_| anyhow!("reader thread panicked"))??;
        send?;
        Ok(answers)
    })?;
    ensure!(answers > 0, "no DNS answer came back");
    Ok(())
}

fn raw_ip_253(ctx: &Ctx) -> Result<()> {
    let size = ctx.unit_size()?;
    let fd = new_socket(libc::AF_INET, libc::SOCK_RAW, RAW_IP_PROTO)
        .context("raw IP socket (needs CAP_NET_RAW)")?;
    let dst = sockaddr_in(ctx.peer_v4, 0);
    let buf = payload(size);
    for _ in 0..ctx.count {
        let n = sendto_raw(
            fd.as_raw_fd(),
            &buf,
            (&raw const dst).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )?;
        ctx.counts.sent(n);
    }
    Ok(())
}

/// First non-loopback interface (the client's veth in the test namespace).
fn default_iface() -> Result<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no non-loopback interface; pass --iface"))
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.trim().split(':').collect();
    ensure!(parts.len() == 6, "bad MAC {s:?}");
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {s:?}"))?;
    }
    Ok(mac)
}

/// Ethernet frames with an experimental ethertype, broadcast on the client veth (the peer
/// drops them silently). Send only: the socket is opened with protocol 0, so it receives
/// nothing.
fn af_packet(ctx: &Ctx) -> Result<()> {
    let size = ctx.unit_size()?;
    let iface = match &ctx.iface {
        Some(i) => i.clone(),
        None => default_iface()?,
    };
    let cname = CString::new(iface.clone())?;
    // SAFETY: `cname` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    ensure!(ifindex != 0, "no interface {iface}");
    let src = parse_mac(&std::fs::read_to_string(format!(
        "/sys/class/net/{iface}/address"
    ))?)?;
    let fd = new_socket(libc::AF_PACKET, libc::SOCK_RAW, 0)
        .context("AF_PACKET socket (needs CAP_NET_RAW)")?;
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = AF_PACKET_ETHERTYPE.to_be();
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let mut frame = Vec::with_capacity(14 + size);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&AF_PACKET_ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(&payload(size));
    for _ in 0..ctx.count {
        let n = sendto_raw(
            fd.as_raw_fd(),
            &frame,
            (&raw const sll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )?;
        ctx.counts.sent(n);
    }
    Ok(())
}

fn io_uring_send(ctx: &Ctx) -> Result<()> {
    use io_uring::{IoUring, opcode, types};
    let c = &ctx.counts;
    let s = connect(ctx.v4(ports::TCP_SINK))?;
    let mut ring = IoUring::new(8).context("io_uring_setup")?;
    let buf = payload(CHUNK);
    let mut left = ctx.bytes;
    let mut ops = 0u64;
    while left > 0 {
        ops += 1;
        ensure!(ops < 10_000_000, "too many io_uring sends");
        let len = left.min(CHUNK as u64) as u32;
        let sqe = opcode::Send::new(types::Fd(s.as_raw_fd()), buf.as_ptr(), len)
            .build()
            .user_data(1);
        // SAFETY: `buf` stays alive and unmodified until the completion is reaped below.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| anyhow!("submission queue full"))?;
        ring.submit_and_wait(1).context("io_uring_enter")?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| anyhow!("no completion"))?;
        let res = cqe.result();
        if res < 0 {
            if matches!(-res, libc::EINTR | libc::EAGAIN) {
                continue;
            }
            return Err(io::Error::from_raw_os_error(-res)).context("IORING_OP_SEND");
        }
        ensure!(res > 0, "IORING_OP_SEND returned 0");
        c.sent(res as usize);
        left -= res as u64;
    }
    finish_upload(&s, c)
}

fn io_uring_recv(ctx: &Ctx) -> Result<()> {
    use io_uring::{IoUring, opcode, types};
    let c = &ctx.counts;
    let s = connect(ctx.v4(ports::TCP_SOURCE))?;
    write_all_counted(&s, &ctx.bytes.to_be_bytes(), c)?;
    let mut ring = IoUring::new(8).context("io_uring_setup")?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    let mut ops = 0u64;
    loop {
        ops += 1;
        ensure!(ops < 10_000_000, "too many io_uring recvs");
        let sqe = opcode::Recv::new(types::Fd(s.as_raw_fd()), buf.as_mut_ptr(), CHUNK as u32)
            .build()
            .user_data(2);
        // SAFETY: `buf` stays alive and is not touched until the completion is reaped below.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| anyhow!("submission queue full"))?;
        ring.submit_and_wait(1).context("io_uring_enter")?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| anyhow!("no completion"))?;
        let res = cqe.result();
        if res < 0 {
            if matches!(-res, libc::EINTR | libc::EAGAIN) {
                continue;
            }
            return Err(io::Error::from_raw_os_error(-res)).context("IORING_OP_RECV");
        }
        if res == 0 {
            break;
        }
        c.received(res as usize);
        got += res as u64;
    }
    ensure!(got == ctx.bytes, "downloaded {got} of {} bytes", ctx.bytes);
    Ok(())
}

/// Removes a file on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn sendfile_upload(ctx: &Ctx) -> Result<()> {
    let c = &ctx.counts;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let tmp =
        TempFile(std::env::temp_dir().join(format!("fsn-sendfile-{}-{nanos}", std::process::id())));
    {
        let mut f = File::create(&tmp.0)?;
        let chunk = payload(CHUNK);
        let mut left = ctx.bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    let f = File::open(&tmp.0)?;
    let s = connect(ctx.v4(ports::TCP_SINK))?;
    let mut off: libc::off_t = 0;
    let mut calls = 0u64;
    while (off as u64) < ctx.bytes {
        calls += 1;
        ensure!(calls < 10_000_000, "too many sendfile calls");
        let want = (ctx.bytes - off as u64).min(1 << 30) as usize;
        // SAFETY: both descriptors are open; `off` is a valid in/out offset.
        let rc = unsafe { libc::sendfile(s.as_raw_fd(), f.as_raw_fd(), &mut off, want) };
        match cvt_size(rc) {
            Ok(0) => bail!("sendfile returned 0 at offset {off}"),
            Ok(n) => c.sent(n),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e).context("sendfile"),
        }
    }
    finish_upload(&s, c)
}

fn splice_download(ctx: &Ctx) -> Result<()> {
    let c = &ctx.counts;
    let s = connect(ctx.v4(ports::TCP_SOURCE))?;
    write_all_counted(&s, &ctx.bytes.to_be_bytes(), c)?;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 just returned these two descriptors and nobody else owns them.
    let (pr, pw) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let null = File::options().write(true).open("/dev/null")?;
    let mut got = 0u64;
    let mut calls = 0u64;
    loop {
        calls += 1;
        ensure!(calls < 10_000_000, "too many splice calls");
        // SAFETY: valid descriptors, no offsets (socket and pipe).
        let rc = unsafe {
            libc::splice(
                s.as_raw_fd(),
                std::ptr::null_mut(),
                pw.as_raw_fd(),
                std::ptr::null_mut(),
                CHUNK,
                libc::SPLICE_F_MOVE,
            )
        };
        let n = match cvt_size(rc) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e).context("splice socket -> pipe"),
        };
        c.received(n);
        got += n as u64;
        let mut left = n;
        while left > 0 {
            // SAFETY: valid descriptors, no offsets (pipe and /dev/null).
            let rc = unsafe {
                libc::splice(
                    pr.as_raw_fd(),
                    std::ptr::null_mut(),
                    null.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_MOVE,
                )
            };
            match cvt_size(rc) {
                Ok(0) => bail!("pipe drained early"),
                Ok(m) => left -= m,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e).context("splice pipe -> /dev/null"),
            }
        }
    }
    ensure!(got == ctx.bytes, "downloaded {got} of {} bytes", ctx.bytes);
    Ok(())
}

const MMSG_BATCH: usize = 64;

fn sendmmsg(ctx: &Ctx) -> Result<()> {
    let c = &ctx.counts;
    let size = ctx.unit_size()?;
    let s = udp_connected(ctx.v4(ports::UDP_SINK))?;
    let buf = payload(size);
    let mut iovs: Vec<libc::iovec> = (0..MMSG_BATCH)
        .map(|_| libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: size,
        })
        .collect();
    // SAFETY: all-zero is a valid mmsghdr.
    let mut msgs: Vec<libc::mmsghdr> = (0..MMSG_BATCH)
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut done = 0u64;
    let mut tries = 0u32;
    while done < ctx.count {
        let k = (ctx.count - done).min(MMSG_BATCH as u64) as usize;
        // SAFETY: `msgs[..k]` point at live iovecs over `buf`.
        let rc = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), k as u32, 0) };
        match cvt(rc) {
            Ok(n) => {
                for m in &msgs[..n as usize] {
                    c.sent(m.msg_len as usize);
                }
                done += n as u64;
            }
            Err(e)
                if tries < 1000
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::ENOBUFS | libc::EAGAIN)
                    ) =>
            {
                tries += 1;
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("sendmmsg"),
        }
    }
    Ok(())
}

fn recvmmsg(ctx: &Ctx) -> Result<()> {
    let c = &ctx.counts;
    let size = ctx.unit_size()?;
    let s = udp_connected(ctx.v4(ports::UDP_SOURCE))?;
    set_rcvtimeo(s.as_raw_fd(), UDP_IDLE)?;
    udp_send_counted(&s, &udp_source_request(ctx.count, size)?, c)?;
    let mut bufs: Vec<Vec<u8>> = (0..MMSG_BATCH).map(|_| vec![0u8; size.max(2048)]).collect();
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: all-zero is a valid mmsghdr.
    let mut msgs: Vec<libc::mmsghdr> = (0..MMSG_BATCH)
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    let mut got = 0u64;
    let mut calls = 0u64;
    while got < ctx.count {
        calls += 1;
        ensure!(calls < 10_000_000, "too many recvmmsg calls");
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_len = 0;
        }
        // SAFETY: `msgs` point at live iovecs over `bufs`; no timeout pointer.
        let rc = unsafe {
            libc::recvmmsg(
                s.as_raw_fd(),
                msgs.as_mut_ptr(),
                MMSG_BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        match cvt(rc) {
            Ok(n) => {
                for m in &msgs[..n as usize] {
                    c.received(m.msg_len as usize);
                }
                got += n as u64;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
            Err(e) => return Err(e).context("recvmmsg"),
        }
    }
    ensure!(
        got * 10 >= ctx.count * 9,
        "only {got} of {} datagrams arrived",
        ctx.count
    );
    Ok(())
}

/// TCP over 127.0.0.1 between two threads of this process.
fn loopback(c: &Counts, bytes: u64) -> Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1")?;
    let addr = listener.local_addr()?;
    let got = thread::scope(|scope| -> Result<u64> {
        let sender = scope.spawn(|| -> Result<()> {
            let s = connect(addr)?;
            send_bytes(&s, bytes, c)?;
            s.shutdown(Shutdown::Write)?;
            Ok(())
        });
        let received = (|| -> Result<u64> {
            let (s, _) = accept_timeout(&listener, CONNECT_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            Ok(read_to_eof_counted(&s, c)?)
        })();
        sender
            .join()
            .map_err(|_| anyhow!("sender thread panicked"))??;
        received
    })?;
    ensure!(
        got == bytes,
        "received {got} of {bytes} bytes over loopback"
    );
    Ok(())
}

fn accept_timeout(l: &TcpListener, timeout: Duration) -> Result<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                return Ok((s, a));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}

fn slow_drip(ctx: &Ctx) -> Result<()> {
    let c = &ctx.counts;
    let size = ctx.unit_size()?;
    let s = connect(ctx.v4(ports::TCP_ECHO))?;
    let buf = payload(size);
    let interval = Duration::from_secs(ctx.secs) / u32::try_from(ctx.count)?;
    let start = Instant::now();
    for i in 0..ctx.count {
        write_all_counted(&s, &buf, c)?;
        let got = read_exact_counted(&s, size as u64, c)?;
        ensure!(got == size as u64, "echo returned {got} of {size} bytes");
        let next = start + interval * u32::try_from(i + 1)?;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
    }
    finish_upload(&s, c)
}

fn many_tcp_conns(ctx: &Ctx) -> Result<()> {
    let c = &ctx.counts;
    let size = ctx.unit_size()?;
    let addr = ctx.v4(ports::TCP_ECHO);
    let threads = 4u64;
    let buf = payload(size);
    thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let n = ctx.count / threads + u64::from(t < ctx.count % threads);
                let buf = &buf;
                scope.spawn(move || -> Result<()> {
                    for _ in 0..n {
                        let s = connect(addr)?;
                        write_all_counted(&s, buf, c)?;
                        let got = read_exact_counted(&s, size as u64, c)?;
                        ensure!(got == size as u64, "echo returned {got} of {size} bytes");
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow!("thread panicked"))??;
        }
        Ok(())
    })
}

fn parallel_burst(ctx: &Ctx) -> Result<()> {
    let c = &ctx.counts;
    ensure!(ctx.count > 0, "--count must be > 0");
    let per_thread = ctx.bytes / ctx.count;
    thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..ctx.count)
            .map(|t| {
                scope.spawn(move || -> Result<()> {
                    if t % 2 == 0 {
                        let s = connect(ctx.v4(ports::TCP_SINK))?;
                        send_bytes(&s, per_thread, c)?;
                        finish_upload(&s, c)
                    } else {
                        let s = udp_connected(ctx.v4(ports::UDP_SINK))?;
                        let buf = payload(1200);
                        let mut left = per_thread;
                        while left > 0 {
                            let n = left.min(1200) as usize;
                            udp_send_counted(&s, &buf[..n], c)?;
                            left -= n as u64;
                        }
                        Ok(())
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow!("thread panicked"))??;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Scenarios that re-execute this binary

/// Reads `"<sent> <received>"` from a child's stdout.
fn parse_child_counts(line: &str) -> Result<(u64, u64)> {
    let mut it = line.split_whitespace();
    let (Some(s), Some(r), None) = (it.next(), it.next(), it.next()) else {
        bail!("bad child report {line:?}");
    };
    Ok((s.parse()?, r.parse()?))
}

/// How a child is started.
#[derive(Clone, Copy)]
enum Spawn {
    /// std's default: posix_spawn (clone with CLONE_VM|CLONE_VFORK, then exec).
    PosixSpawn,
    /// A real fork(), then exec (std falls back to it when a pre_exec hook is set; the
    /// hook also makes the child die with its parent).
    ForkExec,
}

/// Runs `/proc/self/exe <args>` and returns the counts it reported on stdout.
fn run_self(args: &[String], spawn: Spawn) -> Result<(u64, u64)> {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Spawn::ForkExec = spawn {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().context("spawn /proc/self/exe")?;
    let line = String::from_utf8_lossy(&out.stdout);
    let counts = parse_child_counts(line.trim());
    ensure!(
        out.status.success(),
        "child {args:?} failed ({}), reported {line:?}",
        out.status
    );
    counts
}

fn short_lived(ctx: &Ctx) -> Result<()> {
    let size = ctx.unit_size()?;
    let kinds = ["tcp-sink", "tcp-echo", "udp-echo"];
    let workers = 8u64;
    let next = AtomicU64::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= ctx.count {
                        break;
                    }
                    let args = vec![
                        "__child".to_owned(),
                        kinds[(i % 3) as usize].to_owned(),
                        ctx.peer_v4.to_string(),
                        size.to_string(),
                    ];
                    // Alternate the two ways a process starts another.
                    let spawn = if i.is_multiple_of(2) {
                        Spawn::ForkExec
                    } else {
                        Spawn::PosixSpawn
                    };
                    match run_self(&args, spawn) {
                        Ok((s, r)) => {
                            ctx.counts.sent.fetch_add(s, Ordering::Relaxed);
                            ctx.counts.received.fetch_add(r, Ordering::Relaxed);
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!("{e:#}")),
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    ensure!(
        failures.is_empty(),
        "{} of {} children failed; first: {}",
        failures.len(),
        ctx.count,
        failures[0]
    );
    Ok(())
}

/// Hidden sub-mode: one short-lived child. Prints `"<sent> <received>"` and exits.
fn short_lived_child(args: &[String]) -> Result<()> {
    let [kind, peer, size] = args else {
        bail!("usage: __child <tcp-sink|tcp-echo|udp-echo> PEER_V4 SIZE");
    };
    let peer: Ipv4Addr = peer.parse()?;
    let size: usize = size.parse()?;
    let c = Counts::default();
    let buf = payload(size);
    let result = (|| -> Result<()> {
        match kind.as_str() {
            "tcp-sink" => {
                // Send and exit at once: no wait for the peer.
                let s = connect((peer, ports::TCP_SINK).into())?;
                write_all_counted(&s, &buf, &c)?;
            }
            "tcp-echo" => {
                let s = connect((peer, ports::TCP_ECHO).into())?;
                write_all_counted(&s, &buf, &c)?;
                let got = read_exact_counted(&s, size as u64, &c)?;
                ensure!(got == size as u64, "echo returned {got} of {size} bytes");
            }
            "udp-echo" => {
                let s = udp_connected((peer, ports::UDP_ECHO).into())?;
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                for chunk in buf.chunks(1200) {
                    udp_send_counted(&s, chunk, &c)?;
                }
                let mut rbuf = vec![0u8; 65536];
                for _ in 0..buf.len().div_ceil(1200) {
                    if udp_recv_counted(&s, &mut rbuf, &c)?.is_none() {
                        break;
                    }
                }
            }
            other => bail!("unknown child kind {other:?}"),
        }
        Ok(())
    })();
    let (s, r) = c.get();
    println!("{s} {r}");
    result
}

fn own_namespaces(ctx: &Ctx) -> Result<()> {
    let (s, r) = run_self(
        &["__ownns-outer".to_owned(), ctx.bytes.to_string()],
        Spawn::ForkExec,
    )?;
    ctx.counts.sent.fetch_add(s, Ordering::Relaxed);
    ctx.counts.received.fetch_add(r, Ordering::Relaxed);
    Ok(())
}

/// Hidden sub-mode, a fresh single-threaded process: unshare pid+mount+net, fork (the child
/// is pid 1 of the new pid namespace), and exec this binary again there as `__ownns-inner`.
fn own_ns_outer(args: &[String]) -> Result<()> {
    let [bytes] = args else {
        bail!("usage: __ownns-outer BYTES");
    };
    let exe = CString::new(
        std::env::current_exe()?
            .into_os_string()
            .into_encoded_bytes(),
    )?;
    // SAFETY: plain syscall; this process has a single thread.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWNET) })
        .context("unshare(CLONE_NEWPID|CLONE_NEWNS|CLONE_NEWNET)")?;
    let argv0 = CString::new("trafficgen")?;
    let mode = CString::new("__ownns-inner")?;
    let bytes = CString::new(bytes.as_str())?;
    // SAFETY: single-threaded process; the child only calls async-signal-safe functions
    // (mount, socket, ioctl, execv, _exit) before exec.
    let pid = cvt(unsafe { libc::fork() }).context("fork")?;
    if pid == 0 {
        // SAFETY: see above; every pointer is a valid NUL-terminated string or null.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let root = c"/".as_ptr();
            let none = c"none".as_ptr();
            if libc::mount(
                none,
                root,
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                libc::_exit(90);
            }
            let proc_ = c"proc".as_ptr();
            if libc::mount(
                proc_,
                c"/proc".as_ptr(),
                proc_,
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ) != 0
            {
                libc::_exit(91);
            }
            if !lo_up() {
                libc::_exit(92);
            }
            let argv = [
                argv0.as_ptr(),
                mode.as_ptr(),
                bytes.as_ptr(),
                std::ptr::null(),
            ];
            libc::execv(exe.as_ptr(), argv.as_ptr());
            libc::_exit(93);
        }
    }
    let mut status = 0;
    // SAFETY: `pid` is our child.
    cvt(unsafe { libc::waitpid(pid, &mut status, 0) }).context("waitpid")?;
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "namespaced child failed (wait status {status:#x}; 90 mount /, 91 mount /proc, 92 lo up, 93 exec)"
    );
    Ok(())
}

/// Brings `lo` up with ioctls (no netlink, so no socket traffic of ours to count).
fn lo_up() -> bool {
    // SAFETY: plain syscalls on a local descriptor and a zeroed ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let mut ok = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0;
        if ok {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            ok = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) == 0;
        }
        libc::close(fd);
        ok
    }
}

/// Hidden sub-mode: pid 1 of its own pid+mount+net namespaces; loopback transfer.
fn own_ns_inner(args: &[String]) -> Result<()> {
    let [bytes] = args else {
        bail!("usage: __ownns-inner BYTES");
    };
    let bytes: u64 = bytes.parse()?;
    ensure!(
        std::process::id() == 1,
        "expected to be pid 1, am {}",
        std::process::id()
    );
    let c = Counts::default();
    let result = loopback(&c, bytes);
    let (s, r) = c.get();
    println!("{s} {r}");
    io::stdout().flush()?;
    result
}

// ---------------------------------------------------------------------------------------
// Peer services

fn bind_retry<T>(what: &str, mut f: impl FnMut() -> io::Result<T>) -> Result<T> {
    let mut last = None;
    for _ in 0..50 {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => {
                last = Some(e);
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Err(anyhow!(
        "bind {what}: {}",
        last.map_or_else(String::new, |e| e.to_string())
    ))
}

/// What the peer services' own socket calls returned (all threads).
static SERVE: Counts = Counts::new();

fn serve(v4: Ipv4Addr, v6: Ipv6Addr, dns: bool) -> Result<()> {
    for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
        for (port, handler) in [
            (ports::TCP_SINK, tcp_sink as fn(TcpStream) -> io::Result<()>),
            (ports::TCP_SOURCE, tcp_source),
            (ports::TCP_ECHO, tcp_echo),
        ] {
            let addr = SocketAddr::new(ip, port);
            let l = bind_retry(&addr.to_string(), || TcpListener::bind(addr))?;
            thread::spawn(move || accept_loop(l, handler));
        }
        for (port, kind) in [
            (ports::UDP_ECHO, UdpKind::Echo),
            (ports::UDP_QUIC, UdpKind::Echo),
            (ports::UDP_SOURCE, UdpKind::Source),
            (ports::UDP_SINK, UdpKind::Sink),
            (ports::UDP_DNS, UdpKind::Dns),
        ] {
            if port == ports::UDP_DNS && !dns {
                continue;
            }
            let addr = SocketAddr::new(ip, port);
            let s = bind_retry(&addr.to_string(), || UdpSocket::bind(addr))?;
            big_rcvbuf(s.as_raw_fd());
            let s = Arc::new(s);
            thread::spawn(move || udp_loop(s, kind));
        }
    }
    // Absorb raw IP protocol 253 so the peer does not answer with ICMP protocol-unreachable.
    let raw = new_socket(libc::AF_INET, libc::SOCK_RAW, RAW_IP_PROTO).context("raw socket 253")?;
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: `buf` is valid for its length.
            let rc = unsafe { libc::recv(raw.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            match cvt_size(rc) {
                Ok(n) => SERVE.received(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    eprintln!("trafficgen serve: raw 253: {e}");
                    return;
                }
            }
        }
    });
    println!("ready");
    io::stdout().flush()?;
    // Serve until killed. Each `stats` line on stdin is answered with one JSON line of
    // what the services' own socket calls returned so far; stdin at EOF changes nothing.
    for line in io::stdin().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "stats" {
            let (sent, received) = SERVE.get();
            println!("{{\"scenario\":\"serve\",\"sent\":{sent},\"received\":{received}}}");
            io::stdout().flush()?;
        }
    }
    loop {
        thread::park();
    }
}

fn accept_loop(l: TcpListener, handler: fn(TcpStream) -> io::Result<()>) {
    for conn in l.incoming() {
        match conn {
            Ok(s) => {
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                    let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
                    if let Err(e) = handler(s)
                        && !matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                        )
                    {
                        eprintln!("trafficgen serve: connection: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("trafficgen serve: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn tcp_sink(s: TcpStream) -> io::Result<()> {
    read_to_eof_counted(&s, &SERVE)?;
    Ok(())
}

fn tcp_source(s: TcpStream) -> io::Result<()> {
    let mut req = [0u8; 8];
    let mut got = 0;
    while got < req.len() {
        let n = read_counted(&s, &mut req[got..], &SERVE)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let n = u64::from_be_bytes(req);
    if n > MAX_REQUEST_BYTES {
        return Err(io::Error::other(format!("request for {n} bytes refused")));
    }
    send_bytes(&s, n, &SERVE)?;
    s.shutdown(Shutdown::Write)
}

fn tcp_echo(s: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_counted(&s, &mut buf, &SERVE)?;
        if n == 0 {
            return s.shutdown(Shutdown::Write);
        }
        write_all_counted(&s, &buf[..n], &SERVE)?;
    }
}

#[derive(Clone, Copy)]
enum UdpKind {
    Echo,
    Source,
    Sink,
    Dns,
}

fn udp_loop(s: Arc<UdpSocket>, kind: UdpKind) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match s.recv_from(&mut buf) {
            Ok(v) => {
                SERVE.received(v.0);
                v
            }
            Err(e) => {
                eprintln!("trafficgen serve: udp recv: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let pkt = &buf[..n];
        let reply = match kind {
            UdpKind::Sink => continue,
            UdpKind::Echo => pkt.to_vec(),
            UdpKind::Dns => dns_answer(pkt).unwrap_or_else(|| pkt.to_vec()),
            UdpKind::Source => {
                if n == 8 {
                    let count = u32::from_be_bytes([pkt[0], pkt[1], pkt[2], pkt[3]]);
                    let size = u32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]) as usize;
                    if size <= 65_507 && count <= 1_000_000 {
                        let s = Arc::clone(&s);
                        thread::spawn(move || udp_source_send(&s, from, count, size));
                    }
                }
                continue;
            }
        };
        if let Ok(n) = s.send_to(&reply, from) {
            SERVE.sent(n);
        }
    }
}

fn udp_source_send(s: &UdpSocket, to: SocketAddr, count: u32, size: usize) {
    let buf = payload(size);
    for i in 0..count {
        match s.send_to(&buf, to) {
            Ok(n) => SERVE.sent(n),
            Err(e) => {
                eprintln!("trafficgen serve: udp source send: {e}");
                thread::sleep(Duration::from_millis(1));
            }
        }
        // Light pacing so the client's receive queue keeps up.
        if i % 64 == 63 {
            thread::sleep(Duration::from_micros(200));
        }
    }
}

/// A minimal answer to a one-question DNS query: the question plus one A record
/// (198.18.0.2, TTL 60). `None` if `q` is not such a query.
fn dns_answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || q[4..6] != [0, 1] {
        return None;
    }
    let mut i = 12;
    loop {
        let len = usize::from(*q.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        i += len;
    }
    let qend = i + 4;
    if q.len() < qend {
        return None;
    }
    let mut a = Vec::with_capacity(qend + 16);
    a.extend_from_slice(&q[..2]);
    a.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    a.extend_from_slice(&q[12..qend]);
    a.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 0, 2]);
    Some(a)
}

// ---------------------------------------------------------------------------------------
// What is not this process's network traffic

/// TCP over 127.0.0.1 (counted), each read preceded by a `MSG_PEEK` of the same bytes
/// (not counted: the data stays in the socket), then local IPC that is not network
/// (not counted): `--bytes` x 4 over an AF_UNIX stream socketpair, 256 datagrams over
/// an AF_UNIX datagram socketpair, and a netlink route dump of the links.
fn local_ipc_and_peek(ctx: &Ctx) -> Result<()> {
    let c = &ctx.counts;
    let bytes = ctx.bytes;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1")?;
    let addr = listener.local_addr()?;
    let peeked = thread::scope(|scope| -> Result<u64> {
        let sender = scope.spawn(|| -> Result<()> {
            let s = connect(addr)?;
            send_bytes(&s, bytes, c)?;
            s.shutdown(Shutdown::Write)?;
            Ok(())
        });
        let peeked = (|| -> Result<u64> {
            let (s, _) = accept_timeout(&listener, CONNECT_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let mut buf = vec![0u8; CHUNK];
            let mut peeked = 0u64;
            loop {
                // SAFETY: `buf` is valid for its length for the duration of the call.
                let n = match cvt_size(unsafe {
                    libc::recv(
                        s.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_PEEK,
                    )
                }) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e).context("recv(MSG_PEEK)"),
                };
                if n == 0 {
                    return Ok(peeked);
                }
                peeked += n as u64;
                let got = read_exact_counted(&s, n as u64, c)?;
                ensure!(got == n as u64, "read {got} of {n} peeked bytes");
            }
        })();
        sender
            .join()
            .map_err(|_| anyhow!("sender thread panicked"))??;
        peeked
    })?;
    ensure!(
        peeked == bytes,
        "peeked {peeked} of {bytes} bytes over loopback"
    );
    let unix_stream = unix_stream_pair(bytes * 4)?;
    let unix_datagrams = unix_datagram_pair(256, 1000)?;
    let netlink = netlink_route_dump()?;
    eprintln!(
        "not counted: {peeked} bytes peeked, {unix_stream} over AF_UNIX stream, \
         {unix_datagrams} over AF_UNIX datagrams, {netlink} over netlink"
    );
    Ok(())
}

/// Moves `total` bytes through an AF_UNIX stream socketpair; returns what was read.
fn unix_stream_pair(total: u64) -> Result<u64> {
    let (a, b) = std::os::unix::net::UnixStream::pair().context("AF_UNIX socketpair")?;
    b.set_read_timeout(Some(IO_TIMEOUT))?;
    let ignored = Counts::new();
    let read = thread::scope(|scope| -> Result<u64> {
        let writer = scope.spawn(|| -> io::Result<()> {
            send_bytes(&a, total, &ignored)?;
            a.shutdown(Shutdown::Write)
        });
        let read = read_to_eof_counted(&b, &ignored)?;
        writer
            .join()
            .map_err(|_| anyhow!("AF_UNIX writer panicked"))??;
        Ok(read)
    })?;
    ensure!(
        read == total,
        "AF_UNIX stream: read {read} of {total} bytes"
    );
    Ok(read)
}

/// Sends `count` datagrams of `size` bytes through an AF_UNIX datagram socketpair;
/// returns the bytes read back.
fn unix_datagram_pair(count: usize, size: usize) -> Result<u64> {
    let (a, b) = std::os::unix::net::UnixDatagram::pair().context("AF_UNIX socketpair")?;
    b.set_read_timeout(Some(IO_TIMEOUT))?;
    let buf = payload(size);
    let mut back = vec![0u8; size];
    let mut read = 0u64;
    for _ in 0..count {
        ensure!(a.send(&buf)? == size, "short AF_UNIX datagram");
        read += b.recv(&mut back)? as u64;
    }
    ensure!(
        read == (count * size) as u64,
        "AF_UNIX datagrams: read {read} bytes"
    );
    Ok(read)
}

/// Asks the kernel for its links over NETLINK_ROUTE (RTM_GETLINK dump) and reads every
/// answer up to NLMSG_DONE; returns the bytes sent and read.
fn netlink_route_dump() -> Result<u64> {
    const RTM_GETLINK: u16 = 18;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_DONE: u16 = 3;
    const NLMSG_ERROR: u16 = 2;
    let fd = new_socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)
        .context("netlink socket")?;
    set_rcvtimeo(fd.as_raw_fd(), IO_TIMEOUT)?;
    // struct nlmsghdr + struct rtgenmsg (one byte, padded to four).
    let mut request = Vec::with_capacity(20);
    request.extend_from_slice(&20u32.to_ne_bytes());
    request.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    // SAFETY: `request` is valid for its length for the duration of the call.
    let mut moved =
        cvt_size(unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) })
            .context("send the netlink request")? as u64;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..10_000 {
        // SAFETY: `buf` is valid for its length for the duration of the call.
        let n =
            cvt_size(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) })
                .context("read the netlink answers")?;
        ensure!(n > 0, "netlink socket closed before NLMSG_DONE");
        moved += n as u64;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into()?) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into()?);
            match kind {
                NLMSG_DONE => return Ok(moved),
                NLMSG_ERROR => bail!("netlink answered with an error"),
                _ => {}
            }
            if len < 16 {
                bail!("bad netlink message length {len}");
            }
            at += (len + 3) & !3;
        }
    }
    bail!("no NLMSG_DONE in 10,000 netlink reads")
}

/// `--bytes` sent over loopback TCP to a socket whose receive path a BPF sk_skb
/// program redirects (sockmap, `bpf_sk_redirect_map` to egress) to a second
/// connection: the kernel itself (a kworker running the socket's backlog) sends those
/// bytes on, and this process reads them at the far end. Counted: what this process
/// sent and read; the forwarding send belongs to the kernel, not to this process.
fn kernel_forward(ctx: &Ctx) -> Result<()> {
    let c = &ctx.counts;
    let bytes = ctx.bytes;
    // The connection the kernel forwards into, and its far end this process reads.
    let sink = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1")?;
    let onward = connect(sink.local_addr()?)?;
    let (far_end, _) = accept_timeout(&sink, CONNECT_TIMEOUT)?;
    far_end.set_read_timeout(Some(IO_TIMEOUT))?;
    // The connection this process sends on; its accepted end is redirected.
    let front = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1")?;
    let client = connect(front.local_addr()?)?;
    let (redirected, _) = accept_timeout(&front, CONNECT_TIMEOUT)?;
    let _redirect = sockmap::Redirect::new(redirected.as_raw_fd(), onward.as_raw_fd())?;
    let got = thread::scope(|scope| -> Result<u64> {
        let sender = scope.spawn(|| send_bytes(&client, bytes, c));
        let got = read_exact_counted(&far_end, bytes, c);
        sender
            .join()
            .map_err(|_| anyhow!("sender thread panicked"))??;
        Ok(got?)
    })?;
    ensure!(got == bytes, "the kernel forwarded {got} of {bytes} bytes");
    Ok(())
}

/// A BPF sockmap whose sk_skb verdict program sends everything one socket receives out
/// of another: raw `bpf(2)` calls, no library. Closing the descriptors (on drop)
/// detaches the program and empties the map.
mod sockmap {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    use anyhow::{Context, Result, bail};

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
    const BPF_PROG_TYPE_SK_SKB: u32 = 14;
    /// Verdict without a stream parser (Linux >= 5.13); the older stream verdict next.
    const ATTACH_TYPES: [(u32, &str); 2] =
        [(38, "BPF_SK_SKB_VERDICT"), (5, "BPF_SK_SKB_STREAM_VERDICT")];
    const BPF_FUNC_SK_REDIRECT_MAP: i32 = 52;
    /// Key of the socket the verdict sends to; the redirected socket sits at 1.
    const ONWARD: u32 = 0;

    #[repr(C)]
    #[derive(Default)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct MapElem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct ProgAttach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a bpf_attr prefix of the layout `cmd` expects, valid for the call.
        let rc =
            unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    fn owned(fd: libc::c_long) -> OwnedFd {
        // SAFETY: a descriptor bpf(2) just returned, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
    }

    /// One eBPF instruction: opcode, registers, offset, immediate.
    fn insn(code: u8, dst: u8, src: u8, imm: i32) -> u64 {
        u64::from(code) | (u64::from(dst | (src << 4)) << 8) | (u64::from(imm as u32) << 32)
    }

    pub struct Redirect {
        _map: OwnedFd,
        _prog: OwnedFd,
    }

    impl Redirect {
        /// Everything `redirected` receives is sent out of `onward` by the kernel.
        pub fn new(redirected: RawFd, onward: RawFd) -> Result<Self> {
            let mut create = MapCreate {
                map_type: BPF_MAP_TYPE_SOCKMAP,
                key_size: 4,
                value_size: 4,
                max_entries: 2,
                ..MapCreate::default()
            };
            let map = owned(bpf(BPF_MAP_CREATE, &mut create).context("create a BPF sockmap")?);
            // r0 = bpf_sk_redirect_map(skb, map, ONWARD, 0 /* egress */); return r0
            let program = [
                insn(0x18, 2, 1, map.as_raw_fd()), // r2 = map (ld_imm64, pseudo map fd)
                0,
                insn(0xb7, 3, 0, ONWARD as i32), // r3 = key
                insn(0xb7, 4, 0, 0),             // r4 = flags: egress
                insn(0x85, 0, 0, BPF_FUNC_SK_REDIRECT_MAP),
                insn(0x95, 0, 0, 0), // exit
            ];
            let license = c"GPL";
            let mut log = vec![0u8; 64 * 1024];
            let mut load = ProgLoad {
                prog_type: BPF_PROG_TYPE_SK_SKB,
                insn_cnt: program.len() as u32,
                insns: program.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: 1,
                log_size: log.len() as u32,
                log_buf: log.as_mut_ptr() as u64,
                ..ProgLoad::default()
            };
            let prog = match bpf(BPF_PROG_LOAD, &mut load) {
                Ok(fd) => owned(fd),
                Err(error) => {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    bail!(
                        "load the sk_skb verdict program: {error}; verifier: {}",
                        String::from_utf8_lossy(&log[..end])
                    );
                }
            };
            let mut refused = Vec::new();
            let mut attached = false;
            for (attach_type, name) in ATTACH_TYPES {
                let mut attach = ProgAttach {
                    target_fd: map.as_raw_fd() as u32,
                    attach_bpf_fd: prog.as_raw_fd() as u32,
                    attach_type,
                    ..ProgAttach::default()
                };
                match bpf(BPF_PROG_ATTACH, &mut attach) {
                    Ok(_) => {
                        attached = true;
                        break;
                    }
                    Err(error) => refused.push(format!("{name}: {error}")),
                }
            }
            if !attached {
                bail!(
                    "attach the verdict program to the sockmap: {}",
                    refused.join("; ")
                );
            }
            // Sockets join after the program, so their receive path runs it.
            for (key, fd) in [(ONWARD, onward), (1, redirected)] {
                let value = fd as u32;
                let mut update = MapElem {
                    map_fd: map.as_raw_fd() as u32,
                    key: std::ptr::from_ref(&key) as u64,
                    value: std::ptr::from_ref(&value) as u64,
                    ..MapElem::default()
                };
                bpf(BPF_MAP_UPDATE_ELEM, &mut update)
                    .with_context(|| format!("put socket {fd} in the sockmap at {key}"))?;
            }
            Ok(Self {
                _map: map,
                _prog: prog,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_answer_roundtrip() {
        let q = dns_query(7);
        let a = dns_answer(&q).expect("answer");
        assert_eq!(&a[..2], &[0, 7]);
        assert_eq!(a.len(), q.len() + 16);
        assert!(dns_answer(&a).is_none(), "answers are not answered");
    }

    #[test]
    fn checksum_of_checksummed_packet_is_zero() {
        let mut pkt = vec![8u8, 0, 0, 0, 1, 2, 0, 3, 9, 9, 9];
        let ck = inet_checksum(&pkt);
        pkt[2..4].copy_from_slice(&ck.to_be_bytes());
        assert_eq!(inet_checksum(&pkt), 0);
    }

    #[test]
    fn child_counts_parse() {
        assert_eq!(parse_child_counts("12 34").unwrap(), (12, 34));
        assert!(parse_child_counts("12").is_err());
    }
}
