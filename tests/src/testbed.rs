//! The setting of one end-to-end test: a temporary directory, optionally the client and
//! peer namespaces with the peer services, and the agent started with a configuration.
//!
//! ```text
//! let bed = Testbed::setup("fsn-domains")?
//!     .peer()
//!     .config("metrics:\n  bytes_labels: [domain]\n")
//!     .start()?;
//! let exe = bed.copy("trafficgen", "by-address")?;
//! run_client(bed.net(), &exe, "tcp_upload", &[], Duration::from_secs(30))?;
//! bed.metrics().wait_for_bytes(&exe, "sent", 5_000)?;
//! ```
//!
//! The directory exists from [`Testbed::setup`] on, for files the test needs before the
//! agent starts. The journal is `<dir>/journal.db` unless [`Setup::journal`] says
//! otherwise, so it outlives the agent: [`Testbed::restart`] starts a new agent on the
//! same journal, configuration and address. Dropping the testbed stops the agent, then
//! the peer services, deletes the namespaces, then the directory. Mounts a test makes
//! belong in a directory of their own, created before the testbed, so that they are
//! unmounted before the testbed's directory is removed.
//!
//! [`Setup::in_pod`] starts the agent as the chart's pod runs it (see [`crate::pod`]):
//! a test written for the host then shows the same on a Kubernetes node.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

use crate::metrics::MetricsClient;
use crate::pod::{Pod, PodNetwork};
use crate::{
    AgentGuard, NetnsPair, PeerNet, PeerServer, TempDir, agent, agent_binary, exe_copy, program,
    write_config,
};

/// A testbed not started yet: what the agent and the namespaces will be.
#[must_use = "a setup does nothing until started"]
pub struct Setup {
    dir: TempDir,
    config: Option<String>,
    journal: Option<PathBuf>,
    addr: Option<SocketAddr>,
    args: Vec<String>,
    wrapper: Vec<String>,
    peer: Option<Vec<String>>,
    pod_network: Option<PodNetwork>,
}

impl Setup {
    /// The testbed's directory (exists already).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A copy of one of this crate's programs in the directory (see [`Testbed::copy`]).
    /// Copies made here exist before any process of the testbed does.
    pub fn copy(&self, program: &str, name: &str) -> Result<PathBuf> {
        copy_into(self.dir(), program, name)
    }

    /// The agent's configuration file (YAML), written to `<dir>/fleetsnitch.yaml` and
    /// passed as `--config.file`.
    pub fn config(mut self, yaml: impl Into<String>) -> Self {
        self.config = Some(yaml.into());
        self
    }

    /// Where the agent keeps its journal (default `<dir>/journal.db`).
    pub fn journal(mut self, path: impl Into<PathBuf>) -> Self {
        self.journal = Some(path.into());
        self
    }

    /// The address the agent listens on (default: a free port on 127.0.0.1, chosen at
    /// start), for a scraper configured before the agent starts.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// More command-line arguments for the agent.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// Starts the agent through `wrapper`, a command that ends by executing its
    /// arguments, e.g. `unshare --mount sh -c '...; exec "$@"' sh` (see
    /// [`AgentGuard::start_wrapped`]); restarts use it too.
    pub fn wrapped_in(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// Runs the agent in the chart's pod (see [`Pod::prepare`]): its own network, mount
    /// and UTS namespaces, the image as a read-only root, the node's `/` at `/host`,
    /// listening on the pod's address; restarts start it in the same pod.
    /// The pod's network exists from here on (see [`Self::host_address`]).
    pub fn in_pod(mut self) -> Result<Self> {
        self.pod_network = Some(PodNetwork::create()?);
        Ok(self)
    }

    /// Where the agent reaches a service the test runs on the host (a collector, an
    /// API server): 127.0.0.1, or in a pod the host's end of the pod's veth pair.
    pub fn host_address(&self) -> Ipv4Addr {
        self.pod_network
            .as_ref()
            .map_or(Ipv4Addr::LOCALHOST, PodNetwork::host_ip)
    }

    /// The client and peer namespaces, with the peer services running (see [`PeerNet`]).
    pub fn peer(self) -> Self {
        self.peer_with(&[])
    }

    /// [`Self::peer`] with options for `trafficgen serve` (e.g. `--dns off`).
    pub fn peer_with(mut self, serve_options: &[&str]) -> Self {
        self.peer = Some(serve_options.iter().map(|a| (*a).to_owned()).collect());
        self
    }

    /// Writes the configuration, starts the peer services (if asked for), then the agent,
    /// and waits until it is healthy.
    pub fn start(self) -> Result<Testbed> {
        let mut args = Vec::new();
        if let Some(yaml) = &self.config {
            let path = write_config(self.dir.path(), yaml)?;
            args.push("--config.file".to_owned());
            args.push(path.to_str().context("non-UTF-8 config path")?.to_owned());
        }
        args.extend(self.args);
        let peer = match &self.peer {
            Some(options) => {
                let options: Vec<&str> = options.iter().map(String::as_str).collect();
                Some(PeerNet::start(
                    &program("trafficgen")?,
                    self.dir.path(),
                    &options,
                )?)
            }
            None => None,
        };
        let journal = self
            .journal
            .unwrap_or_else(|| self.dir.path().join("journal.db"));
        let mut wrapper = self.wrapper;
        let pod = if let Some(network) = self.pod_network {
            ensure!(
                wrapper.is_empty() && self.addr.is_none(),
                "a testbed in a pod has the pod's command and address"
            );
            let pod = Pod::prepare(self.dir.path(), network, &journal, &args)?;
            wrapper = pod.wrapper().to_vec();
            args.extend(Pod::agent_args().map(str::to_owned));
            Some(pod)
        } else {
            None
        };
        let addr = match (self.addr, &pod) {
            (_, Some(pod)) => pod.addr(),
            (Some(addr), None) => addr,
            (None, None) => SocketAddr::from(([127, 0, 0, 1], agent::free_port()?)),
        };
        let bin = agent_binary()?;
        let mut agent = launch(&wrapper, &bin, addr, &journal, &args)?;
        if pod.is_some() {
            Pod::ensure_runs(agent.pid())?;
        }
        Ok(Testbed {
            agent,
            pod,
            peers: peer,
            bin,
            addr,
            journal,
            args,
            wrapper,
            dir: self.dir,
        })
    }
}

fn launch(
    wrapper: &[String],
    bin: &Path,
    addr: SocketAddr,
    journal: &Path,
    args: &[String],
) -> Result<AgentGuard> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    AgentGuard::start_wrapped(&wrapper, bin, addr, Some(journal), &args)
}

fn copy_into(dir: &Path, program: &str, name: &str) -> Result<PathBuf> {
    exe_copy(&crate::program(program)?, dir, name)
}

/// A started testbed: the agent (and the peer namespaces, if asked for) running.
/// The parts are public, for a test that needs two of them at once.
pub struct Testbed {
    // Drop order: the agent, then its pod, the peer services and namespaces, then the
    // directory.
    /// The running agent.
    pub agent: AgentGuard,
    /// The chart's pod the agent runs in, if the setup asked for one.
    pub pod: Option<Pod>,
    /// The client and peer namespaces with the peer services, if the setup asked for them.
    pub peers: Option<PeerNet>,
    bin: PathBuf,
    addr: SocketAddr,
    journal: PathBuf,
    args: Vec<String>,
    wrapper: Vec<String>,
    dir: TempDir,
}

impl Testbed {
    /// A new testbed in `/tmp/<prefix>-<pid>[-n]`.
    pub fn setup(prefix: &str) -> Result<Setup> {
        Ok(Setup {
            dir: TempDir::new(prefix)?,
            config: None,
            journal: None,
            addr: None,
            args: Vec::new(),
            wrapper: Vec::new(),
            peer: None,
            pod_network: None,
        })
    }

    /// The testbed's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A copy of one of this crate's programs (`trafficgen`, `sweep`, `dnsclient`,
    /// `connector`) at `<dir>/<name>-<random>`, so its traffic has a path of its own.
    pub fn copy(&self, program: &str, name: &str) -> Result<PathBuf> {
        copy_into(self.dir(), program, name)
    }

    /// A scraper for the agent's `/metrics`.
    pub fn metrics(&self) -> MetricsClient {
        self.agent.metrics()
    }

    /// Where the agent listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The agent's journal.
    pub fn journal(&self) -> &Path {
        &self.journal
    }

    /// The last `n` lines of the agent's output.
    pub fn log_tail(&self, n: usize) -> String {
        self.agent.log_tail(n)
    }

    /// The client and peer namespaces. Panics if the setup did not ask for them.
    pub fn net(&self) -> &NetnsPair {
        &self.peers().net
    }

    /// The peer services. Panics if the setup did not ask for them.
    pub fn peer_server(&mut self) -> &mut PeerServer {
        &mut self
            .peers
            .as_mut()
            .expect("the testbed was set up without .peer()")
            .server
    }

    fn peers(&self) -> &PeerNet {
        self.peers
            .as_ref()
            .expect("the testbed was set up without .peer()")
    }

    /// Stops the agent (if it still runs) and starts a new one with the same
    /// configuration, arguments, journal and address.
    pub fn restart(&mut self) -> Result<()> {
        self.agent.stop();
        self.agent = launch(
            &self.wrapper,
            &self.bin,
            self.addr,
            &self.journal,
            &self.args,
        )?;
        Ok(())
    }
}
