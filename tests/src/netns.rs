//! A client and a peer network namespace joined by a veth pair, removed on drop.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::{ip_bin, run_bounded, run_checked};
use crate::scenarios::{CLIENT_V4, CLIENT_V6, PEER_V4, PEER_V6};

/// veth end in the client namespace.
pub const CLIENT_IFACE: &str = "fsnc0";
/// veth end in the peer namespace.
pub const PEER_IFACE: &str = "fsnp0";

/// MAC of the client veth end (locally administered).
pub const CLIENT_MAC: &str = "02:f5:00:00:00:01";
/// MAC of the peer veth end (locally administered).
pub const PEER_MAC: &str = "02:f5:00:00:00:02";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces (`fsn-cli-<pid>[-n]`, `fsn-peer-<pid>[-n]`) joined by a veth
/// pair: client 198.18.0.1/30 + fd00:f5::1/64, peer 198.18.0.2/30 + fd00:f5::2/64, all
/// links up, static neighbour entries on both sides. Dropping it deletes both namespaces (which removes the veth pair once the
/// processes inside have exited: stop them first).
pub struct NetnsPair {
    /// Client namespace name.
    pub client: String,
    /// Peer namespace name.
    pub peer: String,
}

impl NetnsPair {
    /// Creates and configures both namespaces.
    pub fn new() -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let suffix = if n == 0 {
            pid.to_string()
        } else {
            format!("{pid}-{n}")
        };
        let client = format!("fsn-cli-{suffix}");
        let peer = format!("fsn-peer-{suffix}");
        let ip = ip_bin();
        // A namespace with our pid in its name is a leftover of a dead process: remove it.
        for ns in [&client, &peer] {
            if Path::new("/var/run/netns").join(ns).exists() {
                let _ = run_checked(&ip, &["netns", "del", ns]);
            }
        }
        run_checked(&ip, &["netns", "add", &client])?;
        let mut guard = Self {
            client,
            peer: String::new(),
        };
        run_checked(&ip, &["netns", "add", &peer])?;
        guard.peer = peer;
        guard.configure().context("configure veth pair")?;
        Ok(guard)
    }

    fn configure(&self) -> Result<()> {
        let ip = ip_bin();
        let (c, p) = (self.client.as_str(), self.peer.as_str());
        run_checked(
            &ip,
            &[
                "link",
                "add",
                CLIENT_IFACE,
                "address",
                CLIENT_MAC,
                "netns",
                c,
                "type",
                "veth",
                "peer",
                "name",
                PEER_IFACE,
                "address",
                PEER_MAC,
                "netns",
                p,
            ],
        )?;
        let c4 = format!("{CLIENT_V4}/30");
        let p4 = format!("{PEER_V4}/30");
        let c6 = format!("{CLIENT_V6}/64");
        let p6 = format!("{PEER_V6}/64");
        let sides = [
            (c, CLIENT_IFACE, &c4, &c6, (PEER_V4, PEER_V6, PEER_MAC)),
            (p, PEER_IFACE, &p4, &p6, (CLIENT_V4, CLIENT_V6, CLIENT_MAC)),
        ];
        for (ns, dev, v4, v6, (other_v4, other_v6, other_mac)) in sides {
            run_checked(&ip, &["-n", ns, "addr", "add", v4, "dev", dev])?;
            run_checked(
                &ip,
                &["-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad"],
            )?;
            // Static neighbours: right after a veth comes up, the first ARP/NDP packets can
            // be lost (the peer joins its solicited-node group asynchronously), which
            // delays first packets by a 1 s retransmit. Scenarios need none of that.
            for addr in [other_v4, other_v6] {
                run_checked(
                    &ip,
                    &[
                        "-n",
                        ns,
                        "neigh",
                        "replace",
                        addr,
                        "lladdr",
                        other_mac,
                        "dev",
                        dev,
                        "nud",
                        "permanent",
                    ],
                )?;
            }
            run_checked(&ip, &["-n", ns, "link", "set", "lo", "up"])?;
            run_checked(&ip, &["-n", ns, "link", "set", dev, "up"])?;
        }
        for (ns, dev) in [(c, CLIENT_IFACE), (p, PEER_IFACE)] {
            wait_oper_up(&ip, ns, dev)?;
        }
        Ok(())
    }

    /// `ip netns exec <ns> <program> <args...>`.
    pub fn command(ns: &str, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(ip_bin());
        cmd.args(["netns", "exec", ns]).arg(program).args(args);
        cmd
    }

    /// A command run in the client namespace.
    pub fn in_client(&self, program: &Path, args: &[&str]) -> Command {
        Self::command(&self.client, program, args)
    }

    /// A command run in the peer namespace.
    pub fn in_peer(&self, program: &Path, args: &[&str]) -> Command {
        Self::command(&self.peer, program, args)
    }
}

/// Waits (bounded) until `dev` in `ns` is operationally up, i.e. its qdisc is active and
/// packets are no longer dropped.
fn wait_oper_up(ip: &Path, ns: &str, dev: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run_bounded(
            Command::new(ip).args(["-n", ns, "-o", "link", "show", "dev", dev]),
            Duration::from_secs(10),
        )?;
        if out.stdout.contains("state UP") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{dev} in {ns} is not up: {}", out.stdout.trim());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        let ip = ip_bin();
        for ns in [&self.client, &self.peer] {
            if !ns.is_empty()
                && let Err(e) = run_checked(&ip, &["netns", "del", ns])
            {
                eprintln!("fleetsnitch-e2e: cleanup: {e:#}");
            }
        }
    }
}
