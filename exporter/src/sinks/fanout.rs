//! Delivers every record to every sink: the journal, OTLP, the connection
//! log and VirusTotal. The journal is one sink among them: the others get
//! each window whether or not the journal can be written, so an off-host copy
//! never waits on the local disk.
//!
//! One thread owns the sinks. Producers (the collector, the hasher, the
//! VirusTotal checker) hand it records through an [`Outbox`]; it sums flows
//! into a window and, every `journal.write_interval`, hands the window to
//! OTLP and the connection log, then to the journal, and then the events the
//! journal found in it (new executable, new hash, modified) to the first two.
//! The recording policy of `journal.*` (ignore list, addresses, ports)
//! applies to every sink.

use std::{
    collections::HashMap,
    ops::RangeInclusive,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use super::{
    connection_log::ConnectionLog,
    journal::{IgnoreList, Journal, JournalConfig},
    otlp::OtlpExporter,
    virustotal::{Check, VirusTotalHandle},
};
use crate::{
    model::{
        Event, ExeKey, ExecutableSighting, FlowRecord, FlowTotals, Outbox, Record, Sha256, Window,
    },
    support::unix_now,
};

/// Records queued for the fan-out before the producers see them dropped.
pub const QUEUE_CAPACITY: usize = 4096;

/// Time the sinks get at shutdown to deliver what is queued.
const SINK_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long the hash of a file sighted is kept, for flows that reached the
/// fan-out before it (at least three write intervals).
const HASH_RETENTION: Duration = Duration::from_secs(300);

/// How long a flow whose hash is still being computed is held back when the
/// ignore list names hashes (so that an ignored program's first window is
/// ignored too); past it the flow is recorded without its hash.
const HASH_HOLD: Duration = Duration::from_secs(60);

/// How often the thread looks at its stop flag while it waits for records.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// What is recorded of a flow (the `journal.record_*` keys and the ignore
/// list), for every sink: `/metrics` counts every byte regardless.
#[derive(Debug, Clone)]
pub struct RecordPolicy {
    pub ignore: IgnoreList,
    pub addresses: bool,
    pub ports: bool,
    /// Keep ports in `ephemeral` (one record per source port) instead of
    /// leaving them out (one record per peer port).
    pub ephemeral_ports: bool,
    pub ephemeral: RangeInclusive<u16>,
}

impl RecordPolicy {
    pub fn new(config: &JournalConfig, ephemeral: RangeInclusive<u16>) -> Self {
        Self {
            ignore: config.ignore.clone(),
            addresses: config.record_addresses,
            ports: config.record_ports,
            ephemeral_ports: config.record_ephemeral_ports,
            ephemeral,
        }
    }

    /// `flow` as it is recorded, or `None` when it is ignored. The ignore
    /// list sees the flow as it came (an ignored port in the ephemeral range
    /// matches before ephemeral ports are left out).
    pub fn apply(&self, mut flow: FlowRecord) -> Option<FlowRecord> {
        if self.ignore.matches(&flow) {
            return None;
        }
        let peer = &mut flow.peer;
        if !self.ephemeral_ports {
            let keep = |port: Option<u16>| port.filter(|port| !self.ephemeral.contains(port));
            peer.local_port = keep(peer.local_port);
            peer.remote_port = keep(peer.remote_port);
        }
        if !self.addresses {
            peer.remote_address = None;
            peer.local_address = None;
        }
        if !self.ports {
            peer.local_port = None;
            peer.remote_port = None;
        }
        Some(flow)
    }
}

/// The sinks besides the journal; each is optional.
#[derive(Default)]
pub struct Sinks {
    pub otlp: Option<OtlpExporter>,
    pub connection_log: Option<ConnectionLog>,
    pub virustotal: Option<VirusTotalHandle>,
}

impl Sinks {
    /// Whether anything besides the journal wants windows.
    fn want_windows(&self) -> bool {
        self.otlp.is_some() || self.connection_log.is_some()
    }

    /// Hands a window to OTLP and the connection log; they queue it and never block.
    fn deliver(&self, window: &Window) {
        if let Some(otlp) = &self.otlp {
            otlp.export(window);
        }
        if let Some(log) = &self.connection_log {
            log.write(window);
        }
    }

    fn shutdown(&mut self) {
        if let Some(otlp) = self.otlp.as_mut() {
            otlp.shutdown(SINK_SHUTDOWN_GRACE);
        }
        if let Some(log) = self.connection_log.as_mut() {
            log.shutdown(SINK_SHUTDOWN_GRACE);
        }
    }
}

/// The running fan-out.
pub struct Fanout {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Fanout {
    /// Starts the thread; the journal is opened there. Records come from
    /// `records`, the receiving end of the producers' [`Outbox`].
    pub fn spawn(
        records: Receiver<Record>,
        journal: impl FnOnce() -> Journal + Send + 'static,
        sinks: Sinks,
        policy: RecordPolicy,
        write_interval: Duration,
    ) -> std::io::Result<Self> {
        // Flows reach the fan-out once their file is hashed (or after
        // collector::HASH_WAIT): a hash is needed here for a few windows at most.
        let hash_retention = HASH_RETENTION.max(write_interval * 3);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::Builder::new()
            .name("fleetsnitch-sinks".into())
            .spawn(move || {
                let mut state = State {
                    journal: journal(),
                    sinks,
                    policy,
                    hashes: HashMap::new(),
                    unhashable: HashMap::new(),
                    held: Vec::new(),
                    hash_retention: i64::try_from(hash_retention.as_secs()).unwrap_or(i64::MAX),
                    flows: FlowTotals::default(),
                    events: Vec::new(),
                    window_start: unix_now(),
                };
                state.run(&records, write_interval, &stopping);
                state.sinks.shutdown();
            })?;
        Ok(Self { stop, thread })
    }

    /// Delivers what is queued, a last window, and stops the sinks. Call it
    /// once the producers are done.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.thread.join().is_err() {
            tracing::error!("the sinks' thread panicked");
        }
    }
}

/// A queue for producers and its receiving end, dropped records counted in `dropped`.
pub fn outbox(dropped: prometheus_client::metrics::counter::Counter) -> (Outbox, Receiver<Record>) {
    Outbox::bounded(QUEUE_CAPACITY, dropped)
}

struct State {
    journal: Journal,
    sinks: Sinks,
    policy: RecordPolicy,
    /// The sha256 of each file sighted (and when), for flows drained before
    /// their executable was hashed: the file's own, never the path's latest.
    hashes: HashMap<ExeKey, (Sha256, i64)>,
    /// Files sighted that could not be hashed (and when): their flows are
    /// not held back waiting for a hash.
    unhashable: HashMap<ExeKey, i64>,
    /// Flows held back until their file's hash is known (and since when),
    /// while the ignore list names hashes.
    held: Vec<(FlowRecord, Instant)>,
    /// Seconds a sighted file's hash is kept.
    hash_retention: i64,
    /// This window's flows and events for the other sinks (the journal's
    /// batch may hold older windows while it cannot be written).
    flows: FlowTotals,
    events: Vec<Event>,
    window_start: i64,
}

impl State {
    fn run(&mut self, records: &Receiver<Record>, write_interval: Duration, stop: &AtomicBool) {
        let mut next_flush = Instant::now() + write_interval;
        loop {
            if stop.load(Ordering::Relaxed) {
                while let Ok(record) = records.try_recv() {
                    self.accept(record);
                }
                self.flush(true);
                return;
            }
            let wait = next_flush.saturating_duration_since(Instant::now());
            match records.recv_timeout(wait.min(STOP_CHECK)) {
                Ok(record) => self.accept(record),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.flush(true);
                    return;
                }
            }
            if Instant::now() >= next_flush {
                self.flush(false);
                next_flush = Instant::now() + write_interval;
            }
        }
    }

    fn accept(&mut self, record: Record) {
        match record {
            Record::Flows(flows) => {
                for flow in flows {
                    let flow = self.with_known_hash(flow);
                    if self.awaits_hash(&flow) {
                        self.held.push((flow, Instant::now()));
                    } else {
                        self.record(flow);
                    }
                }
            }
            Record::Executable(sighting) => self.accept_sighting(*sighting),
            Record::Event(event) => {
                if self.sinks.want_windows() {
                    self.events.push(event.clone());
                }
                self.journal.add_event(event);
            }
        }
    }

    /// `flow` with the hash of the file that sent it, when that is known here.
    fn with_known_hash(&self, mut flow: FlowRecord) -> FlowRecord {
        if flow.program.sha256.is_none()
            && let Some(file) = &flow.program.file
            && let Some((sha256, _)) = self.hashes.get(file)
        {
            flow.program.sha256 = Some(sha256.clone());
        }
        flow
    }

    /// Whether `flow` waits for its hash: the ignore list names hashes, and
    /// its file is still being hashed (neither hash nor failure known yet).
    fn awaits_hash(&self, flow: &FlowRecord) -> bool {
        self.policy.ignore.has_hashes()
            && flow.program.sha256.is_none()
            && flow
                .program
                .file
                .as_ref()
                .is_some_and(|file| !self.unhashable.contains_key(file))
    }

    /// Records `flow` in the journal and this window, unless the policy ignores it.
    fn record(&mut self, flow: FlowRecord) {
        let Some(flow) = self.policy.apply(flow) else {
            return;
        };
        if self.sinks.want_windows() {
            self.journal.add_flow(flow.clone());
            self.flows.add(flow);
        } else {
            self.journal.add_flow(flow);
        }
    }

    /// Records the held flows that `release` picks, with their hash if known now.
    fn release(&mut self, release: impl Fn(&FlowRecord, Instant) -> bool) {
        if self.held.is_empty() {
            return;
        }
        let (ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(flow, since)| release(flow, *since));
        self.held = still;
        for (flow, _) in ready {
            let flow = self.with_known_hash(flow);
            self.record(flow);
        }
    }

    fn accept_sighting(&mut self, sighting: ExecutableSighting) {
        let file = sighting.file;
        if let Some(sha256) = &sighting.sha256 {
            self.hashes.insert(
                sighting.file,
                (sha256.clone(), sighting.seen_at.max(unix_now())),
            );
            // The checker asks about each hash once.
            if let Some(virustotal) = &self.sinks.virustotal {
                virustotal.check(Check {
                    path: sighting.path.clone(),
                    sha256: sha256.clone(),
                });
            }
        } else {
            self.unhashable.insert(sighting.file, unix_now());
        }
        self.journal.add_executable(sighting);
        self.release(|flow, _| flow.program.file.as_ref() == Some(&file));
    }

    fn flush(&mut self, last: bool) {
        self.release(|_, since| last || since.elapsed() >= HASH_HOLD);
        let now = unix_now();
        let hashes = &self.hashes;
        let hash_of = |file: &ExeKey| hashes.get(file).map(|(sha256, _)| sha256.clone());
        let mut flows = std::mem::take(&mut self.flows);
        flows.fill_missing_hashes(hash_of);
        let window = Window {
            start: self.window_start,
            seconds: (now - self.window_start).max(1) as u64,
            flows: flows.records(),
            events: std::mem::take(&mut self.events),
        };
        self.window_start = now;
        if !window.is_empty() {
            self.sinks.deliver(&window);
        }
        let hashes = &self.hashes;
        let found = self.journal.flush(now, |file| {
            hashes.get(file).map(|(sha256, _)| sha256.clone())
        });
        let horizon = now.saturating_sub(self.hash_retention);
        self.hashes.retain(|_, (_, seen)| *seen >= horizon);
        self.unhashable.retain(|_, seen| *seen >= horizon);
        if self.sinks.want_windows() && !found.is_empty() {
            self.sinks.deliver(&Window {
                start: now,
                seconds: 0,
                flows: Vec::new(),
                events: found,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Peer, Program};

    fn flow(remote_port: u16, local_port: u16) -> FlowRecord {
        FlowRecord {
            program: Program {
                exe: "/usr/bin/curl".into(),
                ..Program::default()
            },
            peer: Peer {
                transport: "tcp",
                local_port: Some(local_port),
                remote_address: "10.1.2.3".parse().ok(),
                remote_port: Some(remote_port),
                domain: Some("api.example.com".into()),
                ..Peer::default()
            },
            ..FlowRecord::default()
        }
    }

    fn policy(config: &JournalConfig) -> RecordPolicy {
        RecordPolicy::new(config, 32768..=60999)
    }

    #[test]
    fn ephemeral_ports_are_left_out_unless_asked_for() {
        let config = JournalConfig::default();
        let recorded = policy(&config).apply(flow(443, 45_000)).unwrap();
        assert_eq!(
            (recorded.peer.local_port, recorded.peer.remote_port),
            (None, Some(443))
        );
        let keep = JournalConfig {
            record_ephemeral_ports: true,
            ..JournalConfig::default()
        };
        let recorded = policy(&keep).apply(flow(443, 45_000)).unwrap();
        assert_eq!(recorded.peer.local_port, Some(45_000));
    }

    /// The fan-out's state with a connection log in `dir`, ignoring `hash`.
    fn state(dir: &std::path::Path, hash: &str) -> State {
        let journal = JournalConfig {
            path: dir.join("journal.db"),
            ignore: IgnoreList {
                hashes: vec![hash.to_owned()],
                ..IgnoreList::default()
            },
            ..JournalConfig::default()
        };
        let log = super::super::connection_log::ConnectionLogConfig {
            enabled: true,
            path: dir.join("connections.jsonl"),
            ..Default::default()
        };
        State {
            journal: Journal::open(
                journal.clone(),
                super::super::journal::JournalMetrics::default(),
                crate::model::Activity::new(Duration::from_secs(3600)),
            ),
            sinks: Sinks {
                connection_log: Some(ConnectionLog::start(&log).unwrap()),
                ..Sinks::default()
            },
            policy: policy(&journal),
            hashes: HashMap::new(),
            unhashable: HashMap::new(),
            held: Vec::new(),
            hash_retention: 300,
            flows: FlowTotals::default(),
            events: Vec::new(),
            window_start: unix_now(),
        }
    }

    fn sighting(file: ExeKey, sha256: Option<Sha256>) -> ExecutableSighting {
        ExecutableSighting {
            path: "/usr/bin/curl".into(),
            file,
            sha256,
            hash_failure: None,
            name: "curl".into(),
            uid: 0,
            user_name: None,
            parent_path: None,
            workload: Default::default(),
            seen_at: unix_now(),
            modified: false,
            used_network: true,
            command_line: None,
        }
    }

    #[test]
    fn a_flow_waits_for_its_hash_while_hashes_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let ignored = Sha256::from_hex(&"ab".repeat(32)).unwrap();
        let mut state = state(dir.path(), ignored.as_str());
        let (slow, unhashable) = (
            ExeKey {
                dev: 1,
                ino: 2,
                generation: 3,
            },
            ExeKey {
                dev: 1,
                ino: 4,
                generation: 5,
            },
        );
        let unhashed = |file: ExeKey, remote_port: u16| {
            let mut flow = flow(remote_port, 45_000);
            flow.program.file = Some(file);
            flow
        };
        // Drained before their files were hashed (the collector gave up waiting).
        state.accept(Record::Flows(vec![
            unhashed(slow, 443),
            unhashed(unhashable, 8443),
        ]));
        state.flush(false);
        assert_eq!(state.held.len(), 2, "both wait for their hash");
        // The slow file's hash is the ignored one; the other cannot be hashed.
        state.accept(Record::Executable(Box::new(sighting(slow, Some(ignored)))));
        state.accept(Record::Executable(Box::new(sighting(unhashable, None))));
        assert!(state.held.is_empty());
        // A later flow of the unhashable file is not held.
        state.accept(Record::Flows(vec![unhashed(unhashable, 8443)]));
        assert!(state.held.is_empty());
        state.flush(true);
        state.sinks.shutdown();
        let log = std::fs::read_to_string(dir.path().join("connections.jsonl")).unwrap();
        let connections: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("\"record\":\"connection\""))
            .collect();
        assert_eq!(connections.len(), 1, "{log}");
        assert!(connections[0].contains("\"remote_port\":8443"), "{log}");
    }

    #[test]
    fn an_ignored_port_in_the_ephemeral_range_matches_before_it_is_left_out() {
        let config = JournalConfig {
            ignore: IgnoreList {
                ports: vec![51820],
                ..IgnoreList::default()
            },
            ..JournalConfig::default()
        };
        assert_eq!(policy(&config).apply(flow(51820, 45_000)), None);
        assert!(policy(&config).apply(flow(51821, 45_000)).is_some());
    }

    #[test]
    fn ignored_flows_are_dropped_and_addresses_and_ports_can_be_left_out() {
        let config = JournalConfig {
            ignore: IgnoreList {
                ports: vec![53],
                ..IgnoreList::default()
            },
            record_addresses: false,
            record_ports: false,
            ..JournalConfig::default()
        };
        let policy = policy(&config);
        assert_eq!(policy.apply(flow(53, 1000)), None);
        let recorded = policy.apply(flow(443, 1000)).unwrap();
        assert_eq!(recorded.peer.remote_address, None);
        assert_eq!(
            (recorded.peer.local_port, recorded.peer.remote_port),
            (None, None)
        );
        assert_eq!(
            recorded.peer.domain.as_deref(),
            Some("api.example.com"),
            "the rest stays"
        );
    }
}
