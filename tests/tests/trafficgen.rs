//! Self-test of the traffic generator (no agent needed): every scenario runs against the
//! peer services and reports the byte counts its defaults imply. Needs root; skips
//! otherwise.

use std::io::Write;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use fleetsnitch_e2e::scenarios::{SCENARIOS, Scenario};
use fleetsnitch_e2e::{ClientReport, NetnsPair, PeerServer, program, require_root, run_client};

/// What a count must be.
#[derive(Debug, Clone, Copy)]
enum Check {
    Exact(u64),
    /// Inclusive range (datagram loss, extra ICMP...).
    Range(u64, u64),
}

impl Check {
    fn ok(self, v: u64) -> bool {
        match self {
            Check::Exact(e) => v == e,
            Check::Range(lo, hi) => (lo..=hi).contains(&v),
        }
    }
}

use Check::{Exact, Range};

/// What each scenario must report with its default `--bytes` / `--count`.
fn expected(sc: &Scenario) -> (Check, Check) {
    let (b, n) = (sc.bytes, sc.count);
    let unit = b.checked_div(n).unwrap_or(0);
    let req = 8; // download request
    let at_least_90 = |x: u64| Range(x * 9 / 10, x);
    match sc.name {
        "slow_drip" | "many_tcp_conns" => (Exact(n * unit), Exact(n * unit)),
        // A third of the children only send, a third echo over TCP, a third over UDP.
        "short_lived" => (
            Exact(n * unit),
            Range(n / 3 * unit, 2 * n.div_ceil(3) * unit),
        ),
        "tcp_download" | "io_uring_recv" | "splice_download" => (Exact(req), Exact(b)),
        "tcp_upload" | "io_uring_send" | "sendfile_upload" | "parallel_burst" => {
            (Exact(b), Exact(0))
        }
        "tcp_duplex" | "ipv6_tcp" | "loopback" | "own_namespaces" => (Exact(b), Exact(b)),
        // Only the TCP bytes are reported: the peeks, AF_UNIX and netlink are not.
        "local_ipc_and_peek" => (Exact(b), Exact(b)),
        // What it sent, and the same bytes read back after the kernel forwarded them.
        "kernel_forward" => (Exact(b), Exact(b)),
        "udp_both" | "udp_443" => (Exact(n * unit), at_least_90(n * unit)),
        // Raw ICMP: 8-byte header + payload out; 20-byte IP header + the same back, plus
        // whatever other ICMP reached the socket.
        "icmp_echo" => (
            Exact(n * (8 + unit)),
            Range(n * (28 + unit) * 9 / 10, 4 * n * (28 + unit)),
        ),
        // 40-byte queries, 56-byte answers.
        "udp_flood_53" => (Exact(40 * n), Range(56, 56 * n)),
        "raw_ip_253" | "sendmmsg" => (Exact(n * unit), Exact(0)),
        "af_packet" => (Exact(n * (14 + unit)), Exact(0)),
        "recvmmsg" | "ipv6_udp_download" => (Exact(req), at_least_90(n * unit)),
        other => panic!("no expectation for scenario {other}"),
    }
}

#[test]
fn every_scenario_reports_what_its_defaults_imply() -> Result<()> {
    require_root!("network namespaces, raw sockets");
    let start = Instant::now();
    let trafficgen = &program("trafficgen")?;
    let net = NetnsPair::new().expect("create network namespaces");
    let mut peer = PeerServer::start(&net, trafficgen).expect("start peer");
    let failures = Mutex::new(Vec::new());
    let queue = Mutex::new(SCENARIOS.iter().collect::<Vec<_>>());
    thread::scope(|scope| {
        for _ in 0..3 {
            scope.spawn(|| {
                loop {
                    let Some(sc) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                        break;
                    };
                    let extra: &[&str] = if sc.name == "slow_drip" {
                        &["--secs", "3"]
                    } else {
                        &[]
                    };
                    let began = Instant::now();
                    let res = run_client(&net, trafficgen, sc.name, extra, Duration::from_secs(60));
                    let took = began.elapsed();
                    let (want_sent, want_recv) = expected(sc);
                    let problem = match res {
                        Err(e) => Some(format!("{}: {e:#}", sc.name)),
                        Ok(ClientReport { sent, received })
                            if !want_sent.ok(sent) || !want_recv.ok(received) =>
                        {
                            Some(format!(
                                "{}: sent={sent} (want {want_sent:?}), received={received} \
                                 (want {want_recv:?})",
                                sc.name
                            ))
                        }
                        Ok(_) if took > Duration::from_secs(20) => {
                            Some(format!("{}: took {took:?}", sc.name))
                        }
                        Ok(_) => None,
                    };
                    if let Some(p) = problem {
                        failures.lock().unwrap_or_else(|p| p.into_inner()).push(p);
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    // The peer counts its own bytes: at least what the TCP uploads delivered to it.
    match peer.settled_stats() {
        Ok(stats) => {
            let floor = SCENARIOS
                .iter()
                .filter(|s| matches!(s.name, "tcp_upload" | "sendfile_upload" | "io_uring_send"))
                .map(|s| s.bytes)
                .sum::<u64>();
            if stats.received < floor || stats.sent < floor {
                failures.push(format!("peer stats too low: {stats:?} (floor {floor})"));
            }
        }
        Err(e) => failures.push(format!("peer stats: {e:#}")),
    }
    let _ = writeln!(
        std::io::stderr().lock(),
        "trafficgen self-test: {} scenarios in {:.1}s",
        SCENARIOS.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
