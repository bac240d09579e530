//! A client and a peer network namespace joined by a veth pair, removed on drop.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

use crate::process::{ip_bin, run_checked};
use crate::scenarios::{CLIENT_V4, CLIENT_V6, PEER_V4, PEER_V6};

/// veth end in the client namespace.
pub const CLIENT_IFACE: &str = "fsnc0";
/// veth end in the peer namespace.
pub const PEER_IFACE: &str = "fsnp0";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces (`fsn-cli-<pid>[-n]`, `fsn-peer-<pid>[-n]`) joined by a veth
/// pair: client 198.18.0.1/30 + fd00:f5::1/64, peer 198.18.0.2/30 + fd00:f5::2/64, all
/// links up. Dropping it deletes both namespaces (which removes the veth pair once the
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
                "link", "add", CLIENT_IFACE, "netns", c, "type", "veth", "peer", "name",
                PEER_IFACE, "netns", p,
            ],
        )?;
        let c4 = format!("{CLIENT_V4}/30");
        let p4 = format!("{PEER_V4}/30");
        let c6 = format!("{CLIENT_V6}/64");
        let p6 = format!("{PEER_V6}/64");
        for (ns, dev, v4, v6) in [(c, CLIENT_IFACE, &c4, &c6), (p, PEER_IFACE, &p4, &p6)] {
            run_checked(&ip, &["-n", ns, "addr", "add", v4, "dev", dev])?;
            run_checked(&ip, &["-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad"])?;
            run_checked(&ip, &["-n", ns, "link", "set", "lo", "up"])?;
            run_checked(&ip, &["-n", ns, "link", "set", dev, "up"])?;
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

impl Drop for NetnsPair {
    fn drop(&mut self) {
        let ip = ip_bin();
        for ns in [&self.client, &self.peer] {
            if !ns.is_empty() {
                if let Err(e) = run_checked(&ip, &["netns", "del", ns]) {
                    eprintln!("fleetsnitch-e2e: cleanup: {e:#}");
                }
            }
        }
    }
}
