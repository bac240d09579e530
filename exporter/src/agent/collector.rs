//! The collector thread: the pipeline from the kernel to the sinks.
//!
//! One thread owns the maps. It consumes process announcements, DNS answers
//! and execs as they arrive and, every drain interval, drains the traffic
//! map: each entry is named (identity), enriched (domain, GeoIP, container,
//! pod) into a flow record, counted in `/metrics` and handed to the other
//! sinks. `/metrics` is at most one interval behind (with the `sha256`
//! label, a new executable's first bytes wait for its hash, up to
//! [`HASH_WAIT`]); the other sinks get each flow once the file that sent it
//! is hashed (or [`HASH_WAIT`] passed), so that every rollup carries the hash
//! of that very file. It records when each executable was seen, the clock
//! per-executable series expire by.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{Ebpf, maps::RingBuf};
use fleetsnitch_ebpf::{TrafficKey, TrafficValue};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use crate::{
    enrichment::flows::Enricher,
    identity::{
        execs::{self, ExecRecord},
        hashing::{HashJob, HashState, Hasher, ProcessKey},
        processes::{ExeKey, IdentityTable, Naming, Process},
    },
    kernel::{
        KernelError,
        announcements::{Announcement, Announcements},
        dns_capture::DnsCapture,
        exec_events::ExecReader,
        stats::KernelStats,
        take_map,
        traffic::TrafficMap,
    },
    model::{Activity, FlowRecord, Outbox, Record},
    sinks::metrics::TrafficMetrics,
    support::unix_now,
    telemetry::{Direction, DirectionLabels},
    web::health::Health,
};

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("cannot start the exec reader thread: {0}")]
    Thread(std::io::Error),
}

/// The collector's own metrics: its drains, and the bytes it could not name.
#[derive(Debug, Clone, Default)]
pub struct CollectorMetrics {
    drains: Counter,
    drain_errors: Counter,
    last_drain: Gauge<f64, std::sync::atomic::AtomicU64>,
    unresolved_bytes: Family<DirectionLabels, Counter>,
}

impl CollectorMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "drains",
            "Times the in-kernel counters were drained",
            metrics.drains.clone(),
        );
        registry.register(
            "drain_errors",
            "Drains of the in-kernel counters that failed",
            metrics.drain_errors.clone(),
        );
        registry.register_with_unit(
            "last_drain_timestamp",
            "Unix time of the last successful drain",
            Unit::Seconds,
            metrics.last_drain.clone(),
        );
        registry.register(
            "unresolved_bytes",
            "Bytes attributed to exe=\"[unknown]\" because the executable's path could not be found",
            metrics.unresolved_bytes.clone(),
        );
        for direction in Direction::ALL {
            metrics.unresolved(direction).inc_by(0);
        }
        metrics
    }

    fn unresolved(&self, direction: Direction) -> Counter {
        self.unresolved_bytes
            .get_or_create(&DirectionLabels { direction })
            .clone()
    }
}

/// Exec tracking: the reader of the `exec_events` ring buffer, and options.
struct ExecTracking {
    reader: ExecReader<ExecRecord>,
    record_command_lines: bool,
}

/// How long a flow waits for the hash of the file that sent it before it
/// goes to the sinks without (and, with the `sha256` label on, is counted as
/// `sha256="unavailable"`).
pub const HASH_WAIT: Duration = Duration::from_secs(5);

/// A flow held back from the sinks (and, with the `sha256` label, from
/// `/metrics`) until its executable is hashed.
struct AwaitingHash {
    flow: FlowRecord,
    exe: ExeKey,
    process: Option<ProcessKey>,
    since: Instant,
    /// Counted in `/metrics` already (the `sha256` label is off).
    counted: bool,
}

/// Flows [`Collector::hashed_since`] lets go.
#[derive(Default)]
struct Released {
    flows: Vec<FlowRecord>,
    /// Indices into `flows` of those not counted in `/metrics` yet.
    to_count: Vec<usize>,
}

/// Everything the collector thread owns.
pub struct Collector {
    traffic: TrafficMap,
    announcements: Announcements,
    stats: KernelStats,
    identities: IdentityTable,
    hasher: Hasher,
    enricher: Enricher,
    dns: Option<DnsCapture>,
    exec: Option<ExecTracking>,
    traffic_metrics: TrafficMetrics,
    outbox: Outbox,
    metrics: CollectorMetrics,
    health: Arc<Health>,
    drain_interval: Duration,
    activity: Activity,
    awaiting_hash: Vec<AwaitingHash>,
    /// Exited processes whose hashes are forgotten once flows waiting for
    /// them are counted.
    retired: VecDeque<(Instant, Vec<ProcessKey>)>,
    /// Unix time of the next pruning of the path table and of the clock.
    next_prune: i64,
}

/// The parts a [`Collector`] is made of, each started by the agent.
pub struct Parts {
    /// The counting tables, the first already in place (before attaching).
    pub traffic: TrafficMap,
    pub identities: IdentityTable,
    pub hasher: Hasher,
    pub enricher: Enricher,
    pub dns: Option<DnsCapture>,
    pub traffic_metrics: TrafficMetrics,
    pub outbox: Outbox,
    pub metrics: CollectorMetrics,
    pub stats: crate::kernel::stats::KernelStatsMetrics,
    pub health: Arc<Health>,
    pub drain_interval: Duration,
    /// When each executable was last seen; the collector records it.
    pub activity: Activity,
}

impl Collector {
    pub fn new(ebpf: &mut Ebpf, parts: Parts) -> Result<Self, CollectorError> {
        let stats = aya::maps::PerCpuArray::try_from(take_map(ebpf, "stats")?)
            .map_err(KernelError::map("stats"))?;
        Ok(Self {
            traffic: parts.traffic,
            announcements: Announcements::new(ebpf)?,
            stats: KernelStats::new(stats, parts.stats),
            identities: parts.identities,
            hasher: parts.hasher,
            enricher: parts.enricher,
            dns: parts.dns,
            exec: None,
            traffic_metrics: parts.traffic_metrics,
            outbox: parts.outbox,
            metrics: parts.metrics,
            health: parts.health,
            drain_interval: parts.drain_interval,
            activity: parts.activity,
            awaiting_hash: Vec::new(),
            retired: VecDeque::new(),
            next_prune: 0,
        })
    }

    /// Journals and exports every executed program (exec tracking), from the
    /// `exec_events` ring buffer, which a thread of its own reads.
    pub fn with_exec(
        mut self,
        ebpf: &mut Ebpf,
        max_open_files: usize,
        record_command_lines: bool,
        metrics: execs::ExecHoldMetrics,
    ) -> Result<Self, CollectorError> {
        let events = RingBuf::try_from(take_map(ebpf, "exec_events")?)
            .map_err(KernelError::map("exec_events"))?;
        crate::kernel::exec_events::ensure_descriptor_limit(max_open_files);
        let on_exec = execs::holding_files(self.hasher.holder(), max_open_files, metrics);
        let reader = ExecReader::spawn(events, on_exec).map_err(CollectorError::Thread)?;
        self.exec = Some(ExecTracking {
            reader,
            record_command_lines,
        });
        Ok(self)
    }

    /// Runs until `stop` is set, then drains one last time.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut next_drain = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= next_drain {
                self.drain_and_report();
                next_drain = now + self.drain_interval;
            }
            let wait = next_drain.saturating_duration_since(Instant::now());
            self.wait_for_events(wait.min(Duration::from_millis(100)));
            self.read_events();
        }
        self.drain_and_report();
        // What still waits for a hash goes out as it is.
        let released = self.hashed_since(true);
        self.traffic_metrics
            .count_flows(released.to_count.iter().map(|&i| &released.flows[i]));
        if !released.flows.is_empty() {
            self.outbox.send(Record::Flows(released.flows));
        }
    }

    fn drain_and_report(&mut self) {
        match self.drain() {
            Ok(()) => {
                self.metrics.drains.inc();
                self.health.mark_drained();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                self.metrics.last_drain.set(now.as_secs_f64());
            }
            Err(error) => {
                self.metrics.drain_errors.inc();
                tracing::error!(%error, "draining the in-kernel counters failed");
            }
        }
    }

    /// Sleeps until a ring buffer has records, or `timeout`.
    fn wait_for_events(&self, timeout: Duration) {
        let mut fds = [
            libc::pollfd {
                fd: self.announcements.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.dns.as_ref().map_or(-1, |dns| dns.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: valid pollfds for the duration of the call; a negative fd is ignored.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis() as libc::c_int,
            )
        };
    }

    /// Announcements first (a process announces itself with its first
    /// traffic or DNS query), then DNS answers, then execs.
    fn read_events(&mut self) {
        let Self {
            announcements,
            identities,
            hasher,
            enricher,
            ..
        } = self;
        announcements.drain(|announcement| match announcement {
            Announcement::Identity(event) => {
                let recorded = identities.record(event);
                if let Some(path) = &recorded.new_exe {
                    tracing::debug!(exe = ?path, pid = event.tgid, "new executable");
                }
                if !recorded.process.exe.is_kernel() {
                    let path = match &recorded.process.path {
                        Some(path) => path.clone(),
                        None => identities.exe_path(event.tgid, recorded.process.exe).0,
                    };
                    let mut job = HashJob::of(&recorded.process, path, unix_now());
                    (job.user_name, job.workload) = enricher.run_context(&recorded.process);
                    hasher.request(job);
                    // Its parent too, once: its children's records carry its sha256.
                    if let Some(parent) = HashJob::parent_of(&recorded.process, unix_now())
                        && hasher.state(parent.exe, None).is_none()
                    {
                        hasher.request(parent);
                    }
                }
            }
            Announcement::Exit(event) => identities.forget(event.tgid, event.start_time_ns),
        });
        if let Some(dns) = &mut self.dns {
            let (identities, enricher) = (&self.identities, &mut self.enricher);
            dns.drain(|event| enricher.record_dns_answer(event, identities.process(event.tgid)));
        }
        self.read_exec_events();
    }

    /// Handles every exec the reader passed on since the last call.
    fn read_exec_events(&mut self) {
        let Some(exec) = self.exec.take() else {
            return;
        };
        for record in exec.reader.take() {
            self.record_exec(record, exec.record_command_lines);
        }
        self.exec = Some(exec);
    }

    /// One exec, its file already held by the reader: count it, and queue it
    /// for hashing and the journal.
    fn record_exec(&mut self, record: ExecRecord, record_command_lines: bool) {
        let process = self
            .identities
            .exec_process(&record.event.identity, &record.path);
        let now = unix_now();
        self.traffic_metrics.count_exec(&record.path);
        self.activity.record(&record.path, None, now);
        let mut job = HashJob::of(&process, record.path, now);
        (job.user_name, job.workload) = self.enricher.run_context(&process);
        // Its traffic, if any, is announced with a job of its own.
        job.process = None;
        job.file = record.file;
        job.used_network = false;
        job.command_line = record_command_lines
            .then(|| execs::command_line(&record.event))
            .flatten();
        self.hasher.request(job);
    }

    fn drain(&mut self) -> Result<(), CollectorError> {
        // Processes that exited before this swap have all their traffic in
        // the table drained now: forget them only afterwards.
        let exited = self.identities.take_exited();
        let entries = self.traffic.drain()?;
        // Announcements precede their traffic in the ring buffer: every
        // process of the drained table is announced by now.
        self.read_events();
        let now = unix_now();
        let count_unhashed = !self.traffic_metrics.wants_sha256();
        // One pass and no copies: at 1,000 new connections a second a drain
        // holds 2,000 records (both ends) of some 500 bytes and a dozen
        // strings each, so every extra vector or clone is a megabyte of heap
        // churn, which the allocator then keeps as RSS.
        let mut delivered = Vec::with_capacity(entries.len());
        let mut waiting = Vec::new();
        for (key, value) in &entries {
            match self.flow(key, value) {
                (flow, None) => delivered.push(flow),
                (flow, Some(pending)) => waiting.push((flow, pending)),
            }
        }
        let released = self.hashed_since(false);
        self.activity.record_all(
            delivered
                .iter()
                .chain(waiting.iter().map(|(flow, _)| flow))
                .chain(&released.flows)
                .map(|flow| (flow.program.exe.as_str(), flow.program.sha256.as_ref())),
            now,
        );
        let counted_while_waiting: &[_] = if count_unhashed { &waiting } else { &[] };
        self.traffic_metrics.count_flows(
            delivered
                .iter()
                .chain(counted_while_waiting.iter().map(|(flow, _)| flow))
                .chain(released.to_count.iter().map(|&i| &released.flows[i])),
        );
        let since = Instant::now();
        self.awaiting_hash.extend(
            waiting
                .into_iter()
                .map(|(flow, (exe, process))| AwaitingHash {
                    flow,
                    exe,
                    process,
                    since,
                    counted: count_unhashed,
                }),
        );
        delivered.extend(released.flows);
        if !delivered.is_empty() {
            self.outbox.send(Record::Flows(delivered));
        }
        self.enricher.after_drain(&exited);
        self.retire(exited.clone());
        self.identities.purge(exited);
        self.expire(now);
        if let Some(dns) = &mut self.dns {
            dns.report_lost();
        }
        self.stats.report()?;
        Ok(())
    }

    /// Flows held back for their hash that have it now, waited long enough,
    /// or (`all`) must go now, to deliver to the sinks; with the indices of
    /// those `/metrics` has not counted yet.
    fn hashed_since(&mut self, all: bool) -> Released {
        let mut released = Released::default();
        if self.awaiting_hash.is_empty() {
            return released;
        }
        let hasher = &self.hasher;
        self.awaiting_hash.retain_mut(|waiting| {
            let state = hasher.state(waiting.exe, waiting.process);
            if !all && state == Some(HashState::Pending) && waiting.since.elapsed() < HASH_WAIT {
                return true;
            }
            let mut flow = std::mem::take(&mut waiting.flow);
            flow.program.sha256 = state.as_ref().and_then(HashState::sha256).cloned();
            if !waiting.counted {
                released.to_count.push(released.flows.len());
            }
            released.flows.push(flow);
            false
        });
        released
    }

    /// Exited processes' hashes are forgotten once no flow may wait for them.
    fn retire(&mut self, exited: Vec<ProcessKey>) {
        while self
            .retired
            .front()
            .is_some_and(|(at, _)| at.elapsed() > HASH_WAIT)
        {
            if let Some((_, processes)) = self.retired.pop_front() {
                self.hasher.forget_processes(&processes);
            }
        }
        if !exited.is_empty() {
            self.retired.push_back((Instant::now(), exited));
        }
    }

    /// Series of executables not seen for the expiry leave `/metrics`; the
    /// path table and the clock forget what they no longer need.
    fn expire(&mut self, now: i64) {
        self.traffic_metrics.expire(now);
        if now < self.next_prune {
            return;
        }
        let interval = self.activity.sweep_interval();
        self.next_prune = now + i64::try_from(interval.as_secs()).unwrap_or(i64::MAX);
        self.identities.prune_paths(now, self.activity.expiry());
        self.activity.prune(now);
    }

    /// One traffic entry as a flow record: its executable named (by its
    /// process, its file, or through `/proc` when the announcement was
    /// lost), then enriched; with the file and process whose hash is still
    /// being computed, if it is.
    fn flow(
        &mut self,
        key: &TrafficKey,
        value: &TrafficValue,
    ) -> (FlowRecord, Option<(ExeKey, Option<ProcessKey>)>) {
        let exe = ExeKey::from_kernel(key.exe_dev, key.exe_ino, key.exe_inode_generation);
        let (path, naming) = self.identities.name(key.tgid, exe);
        if naming == Naming::Proc {
            // The announcement was lost; /proc named the executable instead.
            self.hasher.request(HashJob::unannounced(
                exe,
                key.tgid,
                path.clone(),
                unix_now(),
            ));
        }
        let (file, state, process_key) = if exe.is_kernel() || naming == Naming::Unresolved {
            (None, None, None)
        } else {
            let process_key = self
                .identities
                .process_running(key.tgid, exe)
                .map(|process| (process.tgid, process.start_time_ns));
            (Some(exe), self.hasher.state(exe, process_key), process_key)
        };
        let sha256 = state.as_ref().and_then(HashState::sha256).cloned();
        let process: Option<&Process> = self.identities.process(key.tgid);
        let parent_sha256 = process.and_then(|p| self.hasher.sha256_of(p.parent_exe));
        let flow = self
            .enricher
            .flow(key, value, path, file, sha256, process, parent_sha256);
        if !naming.is_resolved() {
            for (direction, bytes) in [
                (Direction::Sent, flow.bytes.sent),
                (Direction::Received, flow.bytes.received),
            ] {
                self.metrics.unresolved(direction).inc_by(bytes);
            }
        }
        let pending = (state == Some(HashState::Pending)).then_some((exe, process_key));
        (flow, pending)
    }
}
