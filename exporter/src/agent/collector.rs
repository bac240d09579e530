//! The collector thread: the pipeline from the kernel to the sinks.
//!
//! One thread owns the maps. It consumes process announcements, DNS answers
//! and execs as they arrive and, every drain interval, drains the traffic
//! map: each entry is named (identity), enriched (domain, GeoIP, container,
//! pod) into a flow record, counted in `/metrics` and handed to the other
//! sinks. `/metrics` is at most one interval behind.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
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
        hashing::{HashJob, Hasher},
        processes::{ExeKey, IdentityTable, Process},
    },
    kernel::{
        KernelError,
        announcements::{Announcement, Announcements},
        dns_capture::DnsCapture,
        exec_events::ExecReader,
        stats::KernelStats,
        take_map,
        traffic::{GENERATION_GRACE, TrafficMap},
    },
    model::{FlowRecord, Outbox, Record},
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
}

/// The parts a [`Collector`] is made of, each started by the agent.
pub struct Parts {
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
}

impl Collector {
    pub fn new(ebpf: &mut Ebpf, parts: Parts) -> Result<Self, CollectorError> {
        let stats = aya::maps::PerCpuArray::try_from(take_map(ebpf, "stats")?)
            .map_err(KernelError::map("stats"))?;
        Ok(Self {
            traffic: TrafficMap::new(ebpf)?,
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
            ..
        } = self;
        announcements.drain(|announcement| match announcement {
            Announcement::Identity(event) => {
                let recorded = identities.record(event);
                if let Some(path) = &recorded.new_exe {
                    tracing::debug!(exe = ?path, pid = event.tgid, "new executable");
                }
                if !recorded.process.exe.is_kernel() {
                    let (path, _) = identities.exe_path(event.tgid, recorded.process.exe);
                    hasher.request(HashJob::of(&recorded.process, path, unix_now()));
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
        self.traffic_metrics.count_exec(&record.path);
        let mut job = HashJob::of(&process, record.path, unix_now());
        job.file = record.file;
        job.used_network = false;
        job.command_line = record_command_lines
            .then(|| execs::command_line(&record.event))
            .flatten();
        self.hasher.request(job);
    }

    fn drain(&mut self) -> Result<(), CollectorError> {
        // Processes that exited before this flip have all their traffic in
        // the generation drained now: forget them only afterwards.
        let exited = self.identities.take_exited();
        self.traffic.flip()?;
        thread::sleep(GENERATION_GRACE);
        // Announcements precede their traffic in the ring buffer.
        self.read_events();
        let entries = self.traffic.take_previous()?;
        let mut flows = Vec::with_capacity(entries.len());
        for (key, value) in &entries {
            flows.push(self.flow(key, value));
        }
        self.traffic_metrics.count_flows(&flows);
        if !flows.is_empty() {
            self.outbox.send(Record::Flows(flows));
        }
        self.enricher.after_drain(&exited);
        self.identities.purge(exited);
        if let Some(dns) = &mut self.dns {
            dns.report_lost();
        }
        self.stats.report()?;
        Ok(())
    }

    /// One traffic entry as a flow record: its executable named (through
    /// `/proc` when the announcement was lost), then enriched.
    fn flow(&mut self, key: &TrafficKey, value: &TrafficValue) -> FlowRecord {
        let exe = ExeKey::from_kernel(key.exe_dev, key.exe_ino);
        let known_before = self.identities.known_path(exe).is_some();
        let (path, resolved) = self.identities.exe_path(key.tgid, exe);
        if resolved && !known_before && !exe.is_kernel() {
            // The announcement was lost; /proc named the executable instead.
            self.hasher.request(HashJob::unannounced(
                exe,
                key.tgid,
                path.clone(),
                unix_now(),
            ));
        }
        let process: Option<&Process> = self.identities.process(key.tgid);
        let flow = self
            .enricher
            .flow(key, value, path, self.hasher.sha256_of(exe), process);
        if !resolved {
            for (direction, bytes) in [
                (Direction::Sent, flow.bytes.sent),
                (Direction::Received, flow.bytes.received),
            ] {
                self.metrics.unresolved(direction).inc_by(bytes);
            }
        }
        flow
    }
}
