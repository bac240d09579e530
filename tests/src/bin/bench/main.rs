//! Overhead and footprint benchmarks of the agent, measured side by side in one
//! run: every figure with the agent running is compared with the same work
//! without it (rounds alternate, medians are compared), so a shared, noisy
//! machine shifts both sides alike. Prints a table: figure, measured, target,
//! verdict. Needs root (eBPF). `scripts/bench.sh` builds a release agent and
//! runs this.
//!
//! ```text
//! bench [--rounds N] [--footprint-seconds S] [--hosts 100,1000]
//!       [--only overhead|footprint|scrape|fleet]
//! ```

mod fleet;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleetsnitch_e2e::{
    AgentGuard, TempDir, agent_binary,
    ceiling::{self, Ceiling},
    exe_copy, is_root,
    metrics::http_get,
    parse_samples, process, write_config,
};

/// Bytes per TCP throughput measurement.
const TCP_BYTES: u64 = 2 << 30;
/// Datagrams per UDP rate measurement (64 bytes each).
const UDP_DATAGRAMS: u32 = 300_000;
/// Executables and connections per second of the footprint figure.
const CONNECTORS: u32 = 200;
const CONNECTIONS_PER_SECOND: u32 = 1_000;
/// Series of the scrape-time figure.
const SCRAPE_SERIES: u32 = 10_000;
const SCRAPES: usize = 21;

/// Programs that do not run on every send, receive or packet; every other
/// program of the agent does, and the 100 ns per-call target is about those.
const OFF_THE_HOT_PATH: &[&str] = &[
    "process_exit",
    "splice_enter",
    "splice_exit",
    "dns_owner_connect4",
    "dns_owner_connect6",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail,
    /// The rounds' spread crosses the target: some rounds meet it, some do not.
    Inconclusive,
    /// Reported for information, no target.
    Info,
}

struct Row {
    figure: String,
    measured: String,
    target: String,
    verdict: Verdict,
}

impl Row {
    /// `pass`: `None` for information, else whether the target is met.
    fn new(figure: &str, measured: String, target: &str, pass: Option<bool>) -> Self {
        Self {
            figure: figure.to_owned(),
            measured,
            target: target.to_owned(),
            verdict: match pass {
                Some(true) => Verdict::Pass,
                Some(false) => Verdict::Fail,
                None => Verdict::Info,
            },
        }
    }

    /// A ratio (agent / off, say) measured once per round, against a
    /// minimum: pass when every round meets it, FAIL when none does,
    /// inconclusive when the spread crosses it; information when there is no
    /// minimum. `on` and `off` are the rounds' values.
    fn ratio(
        figure: &str,
        unit: &str,
        scale: f64,
        on: &[f64],
        off: &[f64],
        minimum: Option<f64>,
    ) -> Self {
        let mut ratios: Vec<f64> = on.iter().zip(off).map(|(on, off)| on / off).collect();
        let (on_median, off_median) = (median(&mut on.to_vec()), median(&mut off.to_vec()));
        // Sorts the ratios: the first is the lowest, the last the highest.
        let ratio_median = median(&mut ratios);
        let (min, max) = (ratios[0], ratios[ratios.len() - 1]);
        let verdict = match minimum {
            None => Verdict::Info,
            Some(minimum) if min >= minimum => Verdict::Pass,
            Some(minimum) if max < minimum => Verdict::Fail,
            Some(_) => Verdict::Inconclusive,
        };
        Self {
            figure: figure.to_owned(),
            measured: format!(
                "{:.1}% median, spread {:.1}% to {:.1}% over {} rounds ({:.2} / {:.2} {unit}, medians)",
                ratio_median * 100.0,
                min * 100.0,
                max * 100.0,
                ratios.len(),
                on_median / scale,
                off_median / scale
            ),
            target: minimum.map_or_else(|| "-".to_owned(), |m| format!(">= {:.0}%", m * 100.0)),
            verdict,
        }
    }

    /// A program's cost per call, measured once per round (`costs`, ns),
    /// against a maximum: pass when every round is within it, FAIL when none
    /// is, inconclusive when the spread crosses it; information when there is
    /// no maximum. `above`: the same program's cost above the ceiling's on
    /// its hook, each round against the ceiling of the same round, with the
    /// ceiling's own per-round costs.
    fn per_call(
        figure: &str,
        costs: &[f64],
        calls: u64,
        above: Option<(&str, &[f64], &[f64])>,
        maximum: Option<f64>,
    ) -> Self {
        let mut costs = costs.to_vec();
        // Sorts the costs: the first is the lowest, the last the highest.
        let cost_median = median(&mut costs);
        let (min, max) = (costs[0], costs[costs.len() - 1]);
        let verdict = match maximum {
            None => Verdict::Info,
            Some(maximum) if max <= maximum => Verdict::Pass,
            Some(maximum) if min > maximum => Verdict::Fail,
            Some(_) => Verdict::Inconclusive,
        };
        let mut measured = format!(
            "{cost_median:.0} ns median, spread {min:.0} to {max:.0} ns over {} rounds ({calls} calls)",
            costs.len()
        );
        if let Some((ceiling, differences, ceiling_costs)) = above
            && !differences.is_empty()
        {
            measured.push_str(&format!(
                "; {:.0} ns above `{ceiling}` ({:.0} ns; medians of the rounds, the hook's and \
                 the statistics' own cost)",
                median(&mut differences.to_vec()),
                median(&mut ceiling_costs.to_vec())
            ));
        }
        Self {
            figure: figure.to_owned(),
            measured,
            target: maximum.map_or_else(|| "-".to_owned(), |m| format!("<= {m:.0} ns")),
            verdict,
        }
    }
}

fn option<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} needs a value")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(rows) => {
            print_table(&rows);
            if rows.iter().any(|r| r.verdict == Verdict::Fail) {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(error) => {
            eprintln!("bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<Vec<Row>> {
    ensure!(is_root(), "the benchmarks need root (eBPF)");
    let rounds: usize = option(args, "--rounds", 5)?;
    let footprint_seconds: u32 = option(args, "--footprint-seconds", 30)?;
    ensure!((1..=50).contains(&rounds), "--rounds must be 1..=50");
    ensure!(
        (10..=600).contains(&footprint_seconds),
        "--footprint-seconds must be 10..=600"
    );
    let only: String = option(args, "--only", String::new())?;
    let hosts: Vec<usize> = option(args, "--hosts", "100,1000".to_owned())?
        .split(',')
        .map(|n| n.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .context("--hosts takes host counts separated by commas, e.g. 100,1000")?;
    ensure!(
        hosts.iter().all(|n| (1..=5_000).contains(n)),
        "--hosts: each count must be 1..=5000"
    );
    let agent = agent_binary()?;
    eprintln!("bench: agent {}", agent.display());
    let wanted = |part: &str| only.is_empty() || only == part;
    let mut rows = Vec::new();
    if wanted("overhead") {
        rows.extend(overhead(&agent, rounds)?);
    }
    if wanted("footprint") {
        rows.extend(footprint(&agent, footprint_seconds)?);
    }
    if wanted("scrape") {
        rows.push(scrape_time(&agent)?);
    }
    if wanted("fleet") {
        rows.extend(fleet::fleet(&agent, &hosts)?);
    }
    ensure!(
        !rows.is_empty(),
        "--only takes overhead, footprint, scrape or fleet"
    );
    Ok(rows)
}

fn print_table(rows: &[Row]) {
    println!("| figure | measured | target | verdict |");
    println!("| --- | --- | --- | --- |");
    for row in rows {
        let verdict = match row.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Inconclusive => "inconclusive",
            Verdict::Info => "info",
        };
        println!(
            "| {} | {} | {} | {verdict} |",
            row.figure, row.measured, row.target
        );
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Loopback TCP bulk throughput, in bytes per second.
fn tcp_throughput(bytes: u64) -> Result<f64> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let reader = thread::spawn(move || -> Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            let read = stream.read(&mut buffer)?;
            if read == 0 {
                return Ok(total);
            }
            total += read as u64;
        }
    });
    let mut client = TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; 64 << 10];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        client.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    drop(client);
    let received = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let seconds = start.elapsed().as_secs_f64();
    ensure!(received == sent, "received {received} of {sent} bytes");
    Ok(received as f64 / seconds)
}

/// Loopback UDP send rate of 64-byte datagrams, in datagrams per second, with
/// a receiver reading them (so the receive path runs too).
fn udp_rate(count: u32) -> Result<f64> {
    let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    receiver.set_read_timeout(Some(Duration::from_millis(200)))?;
    let addr = receiver.local_addr()?;
    let done = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let reading = {
        let (done, received) = (done.clone(), received.clone());
        thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            // Ends once the sender is done and nothing arrives for 200 ms.
            loop {
                match receiver.recv(&mut buffer) {
                    Ok(_) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) if done.load(Ordering::Relaxed) => return,
                    Err(_) => {}
                }
            }
        })
    };
    let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    sender.connect(addr)?;
    let payload = [0x5au8; 64];
    let start = Instant::now();
    for _ in 0..count {
        // A full receive buffer drops datagrams; the send itself succeeds.
        sender.send(&payload)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = reading.join();
    Ok(f64::from(count) / seconds)
}

/// Per-program BPF statistics: id -> (name, run_time_ns, run_cnt).
fn bpf_stats() -> Result<HashMap<u64, (String, u64, u64)>> {
    let out = process::run_bounded(
        Command::new("bpftool").args(["prog", "show", "--json"]),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "bpftool prog show: {}", out.stderr);
    let programs: serde_json::Value =
        serde_json::from_str(&out.stdout).context("bpftool prog show --json")?;
    Ok(programs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["id"].as_u64()?,
                (
                    p["name"].as_str().unwrap_or_default().to_owned(),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                ),
            ))
        })
        .collect())
}

/// `kernel.bpf_stats_enabled` on while alive, restored when dropped.
struct BpfStatsEnabled {
    previous: String,
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStatsEnabled {
    fn enable() -> Result<Self> {
        let previous = fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("read {BPF_STATS_SYSCTL}"))?;
        fs::write(BPF_STATS_SYSCTL, "1").with_context(|| format!("write {BPF_STATS_SYSCTL}"))?;
        Ok(Self {
            previous: previous.trim().to_owned(),
        })
    }
}

impl Drop for BpfStatsEnabled {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS_SYSCTL, &self.previous);
    }
}

/// What runs on the hot hooks while a round measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing: the baseline.
    Off,
    /// The ceiling programs (`tests/bpf/ceiling.bpf.c`): one per-CPU byte
    /// counter on the agent's two hot tracepoints and on its DNS capture's
    /// hook (cgroup_skb ingress), the least a counter there costs.
    Ceiling,
    /// The agent with its defaults.
    Agent,
}

impl State {
    /// The order of a round's measurements: reversed every other round, so
    /// that whatever drifts during a round (a neighbour starting, caches
    /// warming) favours no state. The ceiling sits between the two others
    /// either way.
    fn order(round: usize) -> [State; 3] {
        if round.is_multiple_of(2) {
            [State::Off, State::Ceiling, State::Agent]
        } else {
            [State::Agent, State::Ceiling, State::Off]
        }
    }

    fn name(self) -> &'static str {
        match self {
            State::Off => "off",
            State::Ceiling => "ceiling",
            State::Agent => "agent",
        }
    }
}

/// Each state's measurements, one per round.
#[derive(Default)]
struct Rates {
    tcp: Vec<f64>,
    udp: Vec<f64>,
}

/// The ceiling's program measuring the same hook as each of the agent's
/// programs, for the per-call costs net of what any program there costs.
const CEILING_OF: &[(&str, &str)] = &[
    ("send_length_btf", "ceiling_send"),
    ("recv_length_btf", "ceiling_recv"),
    ("dns_answers", ceiling::INGRESS_PROGRAM),
];

/// The traffic of a per-call measurement, reported apart: a program's cost
/// per call depends on what ran just before it (a 64 KiB copy leaves little of
/// its data in the cache, a 64-byte datagram most of it).
const WORKLOADS: [&str; 2] = ["64-byte UDP", "TCP bulk"];

/// (program name, workload) -> round -> (run_time_ns, run_cnt) of that
/// round's measured window.
type Calls = BTreeMap<(String, &'static str), BTreeMap<usize, (u64, u64)>>;

/// Runs each workload once more with the kernel's BPF statistics on, and
/// records what each program loaded since `before_start` cost in `round`. A
/// pass of its own: the statistics cost a clock read per call, which the
/// rates must not pay.
fn count_calls(before_start: &HashSet<u64>, round: usize, calls: &mut Calls) -> Result<()> {
    let _stats = BpfStatsEnabled::enable()?;
    for workload in WORKLOADS {
        let before = bpf_stats()?;
        if workload == WORKLOADS[0] {
            udp_rate(UDP_DATAGRAMS / 2)?;
        } else {
            tcp_throughput(TCP_BYTES / 4)?;
        }
        for (id, (name, time, count)) in bpf_stats()? {
            if before_start.contains(&id) {
                continue;
            }
            let (time0, count0) = before.get(&id).map_or((0, 0), |(_, t, c)| (*t, *c));
            let entry = calls
                .entry((name, workload))
                .or_default()
                .entry(round)
                .or_default();
            entry.0 += time.saturating_sub(time0);
            entry.1 += count.saturating_sub(count0);
        }
    }
    Ok(())
}

/// Throughput and packet rate with nothing, with the ceiling program and with
/// the agent, and the per-call cost of each program while it ran.
fn overhead(agent: &std::path::Path, rounds: usize) -> Result<Vec<Row>> {
    let (mut off, mut ceiling, mut on) = (Rates::default(), Rates::default(), Rates::default());
    let mut calls = Calls::new();
    for round in 0..rounds {
        for state in State::order(round) {
            let before_start: HashSet<u64> = bpf_stats()?.into_keys().collect();
            let rates = match state {
                State::Off => &mut off,
                State::Ceiling => &mut ceiling,
                State::Agent => &mut on,
            };
            match state {
                State::Off => {
                    rates.tcp.push(tcp_throughput(TCP_BYTES)?);
                    rates.udp.push(udp_rate(UDP_DATAGRAMS)?);
                }
                State::Ceiling => {
                    let _attached = Ceiling::attach()?;
                    rates.tcp.push(tcp_throughput(TCP_BYTES)?);
                    rates.udp.push(udp_rate(UDP_DATAGRAMS)?);
                    count_calls(&before_start, round, &mut calls)?;
                }
                State::Agent => {
                    let running = AgentGuard::start(agent)?;
                    // Let start-up work (hashing what already runs) settle.
                    thread::sleep(Duration::from_secs(2));
                    rates.tcp.push(tcp_throughput(TCP_BYTES)?);
                    rates.udp.push(udp_rate(UDP_DATAGRAMS)?);
                    count_calls(&before_start, round, &mut calls)?;
                    drop(running);
                }
            }
        }
        eprintln!(
            "bench: round {}/{rounds} ({}): tcp {:.2}/{:.2}/{:.2} GB/s, udp {:.0}/{:.0}/{:.0} \
             datagrams/s (off/ceiling/agent)",
            round + 1,
            State::order(round).map(State::name).join(", then "),
            off.tcp[round] / 1e9,
            ceiling.tcp[round] / 1e9,
            on.tcp[round] / 1e9,
            off.udp[round],
            ceiling.udp[round],
            on.udp[round]
        );
    }
    let mut rows = Vec::new();
    for (what, unit, scale, minimum, pick) in [
        (
            "loopback TCP bulk throughput",
            "GB/s",
            1e9,
            0.97,
            (|r: &Rates| r.tcp.clone()) as fn(&Rates) -> Vec<f64>,
        ),
        (
            "loopback UDP 64-byte send rate",
            "datagrams/s",
            1.0,
            0.95,
            |r: &Rates| r.udp.clone(),
        ),
    ] {
        let (off, ceiling, on) = (pick(&off), pick(&ceiling), pick(&on));
        rows.push(Row::ratio(
            &format!("{what}, agent / off"),
            unit,
            scale,
            &on,
            &off,
            Some(minimum),
        ));
        rows.push(Row::ratio(
            &format!("{what}, ceiling / off"),
            unit,
            scale,
            &ceiling,
            &off,
            None,
        ));
        rows.push(Row::ratio(
            &format!("{what}, agent / ceiling"),
            unit,
            scale,
            &on,
            &ceiling,
            None,
        ));
    }
    // A round's cost per call of a program, in rounds where it ran.
    let per_round = |name: &str, workload: &'static str| -> BTreeMap<usize, f64> {
        calls
            .get(&(name.to_owned(), workload))
            .into_iter()
            .flatten()
            .filter(|(_, (_, count))| *count > 0)
            .map(|(round, (time, count))| (*round, *time as f64 / *count as f64))
            .collect()
    };
    for ((name, workload), rounds) in &calls {
        let costs = per_round(name, workload);
        if costs.is_empty() {
            continue;
        }
        let count: u64 = rounds.values().map(|(_, count)| count).sum();
        let hot = !ceiling::is_ceiling_program(name) && !OFF_THE_HOT_PATH.contains(&name.as_str());
        // Above the ceiling: each round against the ceiling of that round.
        let ceiling = CEILING_OF
            .iter()
            .find(|(program, _)| program == name)
            .map(|(_, ceiling)| (*ceiling, per_round(ceiling, workload)));
        let (differences, ceiling_costs): (Vec<f64>, Vec<f64>) = ceiling
            .as_ref()
            .map(|(_, floor)| {
                costs
                    .iter()
                    .filter_map(|(round, cost)| floor.get(round).map(|f| (cost - f, *f)))
                    .unzip()
            })
            .unwrap_or_default();
        let costs: Vec<f64> = costs.into_values().collect();
        rows.push(Row::per_call(
            &format!("per-call cost of `{name}`, {workload}"),
            &costs,
            count,
            ceiling
                .as_ref()
                .map(|(ceiling, _)| (*ceiling, &differences[..], &ceiling_costs[..])),
            hot.then_some(100.0),
        ));
    }
    Ok(rows)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime + stime) as f64 / ticks)
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Children killed when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU share and RSS of the agent while 200 executables open 1,000 new
/// connections per second between them.
fn footprint(agent: &std::path::Path, seconds: u32) -> Result<Vec<Row>> {
    let dir = TempDir::new("fsn-bench-footprint")?;
    let connector = std::env::current_exe()?
        .parent()
        .context("bench has no directory")?
        .join("connector");
    ensure!(
        connector.is_file(),
        "{} missing: build the tests crate's bins",
        connector.display()
    );
    let copies: Vec<PathBuf> = (0..CONNECTORS)
        .map(|i| exe_copy(&connector, dir.path(), &format!("connector-{i:03}")))
        .collect::<Result<_>>()?;

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let accepted = Arc::new(AtomicU64::new(0));
    {
        let accepted = accepted.clone();
        // Serves until the process exits: read each connection to its end.
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let mut sink = [0u8; 256];
                while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                accepted.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    let mut running = AgentGuard::start(agent)?;
    let pid = running.pid();
    thread::sleep(Duration::from_secs(2));
    let per_executable = CONNECTIONS_PER_SECOND / CONNECTORS;
    let mut children = Children(Vec::new());
    for copy in &copies {
        children.0.push(
            Command::new(copy)
                .args([
                    "--addr",
                    &addr.to_string(),
                    "--per-second",
                    &per_executable.to_string(),
                    "--seconds",
                    &seconds.to_string(),
                ])
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("spawn {}", copy.display()))?,
        );
    }
    // Measure the steady part: every connector started, and the 200 new
    // executables hashed (a one-time cost of about 90 MB read, not load).
    thread::sleep(Duration::from_secs(3));
    let accepted_at_start = accepted.load(Ordering::Relaxed);
    let cpu_at_start = cpu_seconds(pid)?;
    let started = Instant::now();
    let mut steady_rss = 0;
    let window = Duration::from_secs(u64::from(seconds) - 4);
    while started.elapsed() < window {
        steady_rss = steady_rss.max(status_kib(pid, "VmRSS:")?);
        thread::sleep(Duration::from_millis(500));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_share = (cpu_seconds(pid)? - cpu_at_start) / elapsed;
    let rate = (accepted.load(Ordering::Relaxed) - accepted_at_start) as f64 / elapsed;
    let peak = status_kib(pid, "VmHWM:")?;
    for child in &mut children.0 {
        let _ = child.wait();
    }
    running.check_running()?;
    drop(running);
    Ok(vec![
        Row::new(
            "agent CPU at 1,000 new connections/s across 200 executables",
            format!(
                "{:.2}% of one core ({rate:.0} connections/s measured over {elapsed:.0} s)",
                cpu_share * 100.0
            ),
            "<= 1%",
            Some(cpu_share <= 0.01),
        ),
        Row::new(
            "agent RSS at that load (largest sample)",
            format!("{:.1} MiB", steady_rss as f64 / 1024.0),
            "<= 20 MiB",
            Some(steady_rss <= 20 * 1024),
        ),
        Row::new(
            "agent peak RSS since start (VmHWM, includes loading)",
            format!("{:.1} MiB", peak as f64 / 1024.0),
            "<= 32 MiB",
            Some(peak <= 32 * 1024),
        ),
    ])
}

/// Time to scrape `/metrics` with 10,000 series of `fleetsnitch_bytes_total`.
fn scrape_time(agent: &std::path::Path) -> Result<Row> {
    let dir = TempDir::new("fsn-bench-scrape")?;
    let config = write_config(
        dir.path(),
        "metrics:\n  bytes_labels: [remote_port]\n  max_series: 100000\n  \
         label_caps: {remote_port: 65536}\n",
    )?;
    let running = AgentGuard::start_with_args(agent, &["--config.file", config.to_str().unwrap()])?;
    // One datagram to each of 10,000 ports below the ephemeral range, each from
    // a connected socket (an unconnected one carries no remote port).
    for port in 1_024..1_024 + SCRAPE_SERIES {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        socket.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port as u16)))?;
        socket.send(b"x")?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let series = loop {
        let text = http_get(running.addr, "/metrics", Duration::from_secs(10))?.body;
        let series = parse_samples(&text, "fleetsnitch_bytes_series")?
            .first()
            .map_or(0.0, |s| s.value);
        if series >= f64::from(SCRAPE_SERIES) {
            break series;
        }
        if Instant::now() > deadline {
            bail!("only {series} series after 60 s");
        }
        thread::sleep(Duration::from_millis(500));
    };
    let mut times = Vec::with_capacity(SCRAPES);
    let mut size = 0;
    for _ in 0..SCRAPES {
        let start = Instant::now();
        size = http_get(running.addr, "/metrics", Duration::from_secs(10))?
            .body
            .len();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let scrape_ms = median(&mut times);
    Ok(Row::new(
        "`/metrics` scrape time at 10,000 series",
        format!(
            "{scrape_ms:.1} ms (median of {SCRAPES}; {series:.0} series, {:.1} MiB)",
            size as f64 / (1 << 20) as f64
        ),
        "<= 100 ms",
        Some(scrape_ms <= 100.0),
    ))
}

#[cfg(test)]
mod tests {
    use super::{Row, Verdict};

    #[test]
    fn a_ratio_passes_only_when_every_round_meets_the_target() {
        let off = [100.0, 100.0, 100.0];
        let row = Row::ratio("x", "u", 1.0, &[96.0, 97.0, 99.0], &off, Some(0.95));
        assert_eq!(row.verdict, Verdict::Pass, "{}", row.measured);
        let row = Row::ratio("x", "u", 1.0, &[90.0, 94.0, 93.0], &off, Some(0.95));
        assert_eq!(row.verdict, Verdict::Fail, "{}", row.measured);
        // The median (96%) meets the target, one round (94%) does not.
        let row = Row::ratio("x", "u", 1.0, &[94.0, 96.0, 99.0], &off, Some(0.95));
        assert_eq!(row.verdict, Verdict::Inconclusive, "{}", row.measured);
        assert!(
            row.measured
                .starts_with("96.0% median, spread 94.0% to 99.0% over 3 rounds"),
            "{}",
            row.measured
        );
    }

    #[test]
    fn a_per_call_cost_passes_only_when_every_round_is_within_the_limit() {
        let row = Row::per_call("x", &[91.0, 97.0, 94.0], 30, None, Some(100.0));
        assert_eq!(row.verdict, Verdict::Pass, "{}", row.measured);
        let row = Row::per_call("x", &[101.0, 130.0, 117.0], 30, None, Some(100.0));
        assert_eq!(row.verdict, Verdict::Fail, "{}", row.measured);
        // The median (98 ns) is within the limit, one round (106 ns) is not.
        let above = [36.0, 40.0, 44.0];
        let ceiling = [58.0, 58.0, 62.0];
        let row = Row::per_call(
            "x",
            &[94.0, 98.0, 106.0],
            30,
            Some(("c", &above, &ceiling)),
            Some(100.0),
        );
        assert_eq!(row.verdict, Verdict::Inconclusive, "{}", row.measured);
        assert!(
            row.measured.starts_with(
                "98 ns median, spread 94 to 106 ns over 3 rounds (30 calls); 40 ns above `c` (58 ns;"
            ),
            "{}",
            row.measured
        );
        let row = Row::per_call("x", &[500.0], 3, None, None);
        assert_eq!(row.verdict, Verdict::Info, "{}", row.measured);
    }

    #[test]
    fn each_round_is_its_own_ratio() {
        // Off was slow in round 1 and on in round 2: per-round ratios 200%
        // and 50%, where the ratio of medians would hide the spread.
        let row = Row::ratio("x", "u", 1.0, &[200.0, 50.0], &[100.0, 100.0], Some(0.97));
        assert_eq!(row.verdict, Verdict::Inconclusive, "{}", row.measured);
        assert!(
            row.measured.contains("spread 50.0% to 200.0%"),
            "{}",
            row.measured
        );
    }
}
