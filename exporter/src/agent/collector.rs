//! Moves what the kernel counted into the identity table and the metrics.
//!
//! One thread owns the maps. It consumes process announcements from the ring
//! buffer as they arrive and, every drain interval, flips the generation the
//! kernel writes under, waits out programs still running with the old one,
//! then reads and deletes every key of the old generation. Deltas go into the
//! Prometheus counters, so `/metrics` is at most one interval behind.

use std::{
    collections::HashMap,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, RingBuf},
};
use fleetsnitch_ebpf::{
    Config, DIR_RECEIVED, DIR_SENT, EVENT_EXIT, EVENT_IDENTITY, EXEC_ARGS_TRUNCATED, ExecEvent,
    ExitEvent, IdentityEvent, Stat, TrafficKey, TrafficValue,
};

use crate::{
    config::ExecConfig,
    enrichment::dns::{DnsCache, DnsCacheConfig, DnsStats, Transport},
    enrichment::geoip::{GeoIp, GeoRef},
    enrichment::kubernetes::PodResolver,
    identity::hashing::{HashJob, Hasher},
    identity::processes::{ExeKey, IdentityTable, Process},
    kernel::dns_capture::DnsCapture,
    kernel::exec_events::{ExecReader, ExecRecord},
    kernel::flow,
    sinks::journal::{self, Input, JournalHandle, Rollup},
    sinks::metrics::labels::{FlowFacts, LabelPolicy, TrafficLabels},
    sinks::metrics::{
        Direction, DirectionLabels, ExeLabels, LabelLabels, MapLabels, Metrics, ResultLabels,
    },
};

const IPPROTO_TCP: u8 = 6;

/// Time given to programs that read the old generation before it is drained.
/// Tracing programs run with migration disabled for microseconds at most.
const GENERATION_GRACE: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot start the exec reader thread: {0}")]
    Thread(std::io::Error),
}

/// Shared with the HTTP server: when the counters were last drained.
#[derive(Debug, Default)]
pub struct Health {
    last_drain_unix_ms: AtomicU64,
}

impl Health {
    fn mark_drained(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_drain_unix_ms
            .store(now.as_millis() as u64, Ordering::Relaxed);
    }

    /// Healthy once a drain succeeded within `max_age`.
    pub fn is_fresh(&self, max_age: Duration) -> bool {
        let last = self.last_drain_unix_ms.load(Ordering::Relaxed);
        if last == 0 {
            return false;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        now.saturating_sub(last) <= max_age.as_millis() as u64
    }
}

pub struct Collector {
    traffic: BpfHashMap<MapData, TrafficKey, TrafficValue>,
    config: Array<MapData, Config>,
    stats: PerCpuArray<MapData, u64>,
    events: RingBuf<MapData>,
    generation: u32,
    stats_seen: [u64; Stat::ALL.len()],
    identities: IdentityTable,
    hasher: Hasher,
    journal: Option<JournalHandle>,
    labels: LabelPolicy,
    geoip: Option<GeoIp>,
    pods: Option<PodResolver>,
    dns: Option<DnsCapture>,
    domains: DnsCache,
    dns_reported: DnsStats,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    drain_interval: Duration,
    /// Keep ephemeral ports in rollups (`journal.record_ephemeral_ports`).
    record_ephemeral_ports: bool,
    exec: Option<ExecTracking>,
}

/// Exec tracking: the reader of the `exec_events` ring buffer, and options.
struct ExecTracking {
    reader: ExecReader,
    record_command_lines: bool,
}

fn hash_job(process: &Process, path: String) -> HashJob {
    HashJob {
        exe: process.exe,
        tgid: process.tgid,
        path,
        name: process.comm.clone(),
        uid: process.uid,
        parent_path: process.parent_path.clone(),
        seen_at: journal::unix_now(),
        file: None,
        used_network: true,
        command_line: None,
    }
}

/// The NUL-separated arguments the kernel copied, joined by spaces.
fn command_line(event: &ExecEvent) -> Option<String> {
    let len = (event.args_len as usize).min(event.args.len());
    let args: Vec<String> = event.args[..len]
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    if args.is_empty() {
        return None;
    }
    let mut line = args.join(" ");
    if event.args_flags & EXEC_ARGS_TRUNCATED != 0 {
        line.push('…');
    }
    Some(line)
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CollectorError> {
    ebpf.take_map(name)
        .ok_or(CollectorError::MissingMap { name })
}

/// Values of `map` on `fleetsnitch_map_full_total`.
const TRAFFIC_MAP: &str = "traffic";
const ANNOUNCED_MAP: &str = "announced";
const SPLICE_MAP: &str = "splice_calls";

fn map_labels(map: &str) -> MapLabels {
    MapLabels {
        map: map.to_owned(),
    }
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> CollectorError {
    move |source| CollectorError::Map { name, source }
}

impl Collector {
    pub fn new(
        ebpf: &mut Ebpf,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        hasher: Hasher,
        journal: Option<JournalHandle>,
        labels: LabelPolicy,
        drain_interval: Duration,
    ) -> Result<Self, CollectorError> {
        let traffic =
            BpfHashMap::try_from(take_map(ebpf, "traffic")?).map_err(map_error("traffic"))?;
        let config = Array::try_from(take_map(ebpf, "config")?).map_err(map_error("config"))?;
        let stats = PerCpuArray::try_from(take_map(ebpf, "stats")?).map_err(map_error("stats"))?;
        let events = RingBuf::try_from(take_map(ebpf, "events")?).map_err(map_error("events"))?;
        Ok(Self {
            traffic,
            config,
            stats,
            events,
            generation: 0,
            stats_seen: [0; Stat::ALL.len()],
            identities: IdentityTable::default(),
            hasher,
            journal,
            labels,
            geoip: None,
            pods: None,
            dns: None,
            domains: DnsCache::new(DnsCacheConfig::default()),
            dns_reported: DnsStats::default(),
            metrics,
            health,
            drain_interval,
            record_ephemeral_ports: false,
            exec: None,
        })
    }

    /// Keeps ports in the ephemeral range in rollups (one per source port).
    pub fn with_ephemeral_ports_in_rollups(mut self, record: bool) -> Self {
        self.record_ephemeral_ports = record;
        self
    }

    /// Journals and exports every executed program (exec tracking), from the
    /// `exec_events` ring buffer, which a thread of its own reads.
    pub fn with_exec(
        mut self,
        ebpf: &mut Ebpf,
        config: &ExecConfig,
    ) -> Result<Self, CollectorError> {
        let events =
            RingBuf::try_from(take_map(ebpf, "exec_events")?).map_err(map_error("exec_events"))?;
        let reader =
            ExecReader::spawn(events, self.hasher.holder(), config.max_open_files as usize)
                .map_err(CollectorError::Thread)?;
        self.exec = Some(ExecTracking {
            reader,
            record_command_lines: config.record_command_lines,
        });
        Ok(self)
    }

    /// Names flows' peers from the DNS answers `capture` delivers.
    pub fn with_dns(mut self, capture: Option<DnsCapture>, cache: DnsCacheConfig) -> Self {
        self.dns = capture;
        self.domains = DnsCache::new(cache);
        self
    }

    /// Adds pod, namespace and container name to containers' flows.
    pub fn with_pods(mut self, pods: Option<PodResolver>) -> Self {
        self.pods = pods;
        self
    }

    /// Adds country and ASN to flows from these databases.
    pub fn with_geoip(mut self, geoip: Option<GeoIp>) -> Self {
        self.geoip = geoip;
        self
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
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                self.metrics.last_drain_seconds.set(now.as_secs_f64());
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
                fd: self.events.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.dns.as_ref().map_or(-1, DnsCapture::as_raw_fd),
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

    fn read_events(&mut self) {
        while let Some(item) = self.events.next() {
            let bytes: &[u8] = &item;
            let Some(kind) = bytes
                .get(..4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            else {
                continue;
            };
            match kind {
                EVENT_IDENTITY if bytes.len() >= size_of::<IdentityEvent>() => {
                    // SAFETY: the length was checked; IdentityEvent is plain integers
                    // and byte arrays, valid for any bit pattern.
                    let event: IdentityEvent =
                        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                    let recorded = self.identities.record(&event);
                    if let Some(path) = &recorded.new_exe {
                        tracing::debug!(exe = ?path, pid = event.tgid, "new executable");
                    }
                    if !recorded.process.exe.is_kernel() {
                        let (path, _) = self.identities.exe_path(event.tgid, recorded.process.exe);
                        self.hasher.request(hash_job(&recorded.process, path));
                    }
                }
                EVENT_EXIT if bytes.len() >= size_of::<ExitEvent>() => {
                    // SAFETY: as above.
                    let event: ExitEvent =
                        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                    self.identities.forget(event.tgid, event.start_time_ns);
                }
                other => tracing::warn!(
                    kind = other,
                    len = bytes.len(),
                    "unexpected ring buffer record"
                ),
            }
        }
        self.read_dns_answers();
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
        if record.budget_exhausted {
            self.metrics.exec.open_files_exhausted.inc();
        }
        let process = self
            .identities
            .exec_process(&record.event.identity, &record.path);
        let exe = self.labels.exec_exe_label(&record.path);
        self.metrics
            .exec
            .total
            .get_or_create(&ExeLabels { exe })
            .inc();
        let mut job = hash_job(&process, record.path);
        job.file = record.file;
        job.used_network = false;
        job.command_line = if record_command_lines {
            command_line(&record.event)
        } else {
            None
        };
        self.hasher.request(job);
    }

    /// Records the DNS answers processes received, after their identities:
    /// a process announces itself with its query, before the answer arrives.
    fn read_dns_answers(&mut self) {
        let Self {
            dns: Some(dns),
            domains,
            identities,
            ..
        } = self
        else {
            return;
        };
        dns.drain(|event| {
            if event.tgid == 0 {
                // The query went out before the agent started: owner unknown.
                return;
            }
            let container = identities
                .process(event.tgid)
                .and_then(|p| p.container.as_ref())
                .filter(|c| c.runtime.is_container())
                .map(|c| c.id.as_str());
            let captured = usize::from(event.captured).min(event.payload.len());
            let transport = if event.protocol == IPPROTO_TCP {
                Transport::Tcp
            } else {
                Transport::Udp
            };
            // Failures are counted by the cache; the payload is data, never trusted.
            let _ = domains.record_payload(
                event.tgid,
                container,
                &event.payload[..captured],
                event.payload_len as usize,
                transport,
            );
        });
    }

    fn drain(&mut self) -> Result<(), CollectorError> {
        // Processes that exited before this flip have all their traffic in
        // the generation drained now: forget them only afterwards.
        let exited = self.identities.take_exited();
        self.generation ^= 1;
        let config = Config {
            generation: self.generation,
            _pad: 0,
        };
        self.config.set(0, config, 0).map_err(map_error("config"))?;
        thread::sleep(GENERATION_GRACE);
        // Announcements precede their traffic in the ring buffer.
        self.read_events();

        let old_keys: Vec<TrafficKey> = self
            .traffic
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.generation != self.generation)
            .collect();
        let mut totals: HashMap<TrafficLabels, u64> = HashMap::new();
        let mut rollups = Vec::new();
        let mut unresolved = [0u64; 2];
        for key in old_keys {
            let value = match self.traffic.get(&key, 0) {
                Ok(value) => value,
                Err(MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(CollectorError::Map {
                        name: "traffic",
                        source,
                    });
                }
            };
            match self.traffic.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(CollectorError::Map {
                        name: "traffic",
                        source,
                    });
                }
            }
            let exe = ExeKey::from_kernel(key.exe_dev, key.exe_ino);
            let known_before = self.identities.known_path(exe).is_some();
            let (path, resolved) = self.identities.exe_path(key.tgid, exe);
            if resolved && !known_before && !exe.is_kernel() {
                // The announcement was lost; /proc named the executable instead.
                self.hasher.request(HashJob {
                    exe,
                    tgid: key.tgid,
                    path: path.clone(),
                    name: String::new(),
                    uid: 0,
                    parent_path: None,
                    seen_at: journal::unix_now(),
                    file: None,
                    used_network: true,
                    command_line: None,
                });
            }
            let process = self.identities.process(key.tgid);
            let remote = flow::remote_address(&key);
            let geo = match (&self.geoip, remote) {
                (Some(geoip), Some(ip)) => geoip.lookup_ref(ip),
                _ => GeoRef::default(),
            };
            let container = process
                .and_then(|p| p.container.as_ref())
                .filter(|c| c.runtime.is_container());
            let domain = remote.and_then(|ip| {
                self.domains
                    .domain_for(key.tgid, container.map(|c| c.id.as_str()), ip)
            });
            let pod = match (&self.pods, container) {
                (Some(pods), Some(container)) => pods.lookup(&container.id),
                _ => None,
            };
            let facts = FlowFacts {
                parent: process.and_then(|p| p.parent_path.as_deref()),
                uid: process.map(|p| p.uid),
                remote_port: flow::remote_port(&key, &value),
                transport: flow::transport(&key, &value),
                country: geo.country,
                asn: geo.asn,
                domain: domain.as_deref(),
                container_id: container.map(|c| c.id.as_str()),
                container_name: pod.as_ref().map(|p| p.container.as_str()),
                pod: pod.as_ref().map(|p| p.pod.as_str()),
                namespace: pod.as_ref().map(|p| p.namespace.as_str()),
            };
            if self.journal.is_some() {
                rollups.push(self.rollup(&key, &value, exe, &path, &facts));
            }
            for (index, direction) in [
                (DIR_SENT, Direction::Sent),
                (DIR_RECEIVED, Direction::Received),
            ] {
                let bytes = value.bytes[index];
                if bytes == 0 {
                    continue;
                }
                if !resolved {
                    unresolved[index] += bytes;
                }
                let labels = self.labels.labels(&path, direction, &facts);
                *totals.entry(labels).or_default() += bytes;
            }
        }
        if let Some(journal) = &self.journal
            && !rollups.is_empty()
        {
            journal.send(Input::Rollups(rollups));
        }
        for (labels, bytes) in totals {
            self.metrics.bytes.get_or_create(&labels).inc_by(bytes);
        }
        self.report_label_overflow();
        for (index, direction) in [
            (DIR_SENT, Direction::Sent),
            (DIR_RECEIVED, Direction::Received),
        ] {
            if unresolved[index] > 0 {
                self.metrics
                    .unresolved_bytes
                    .get_or_create(&DirectionLabels { direction })
                    .inc_by(unresolved[index]);
            }
        }
        for &(tgid, _) in &exited {
            self.domains.forget_process(tgid);
        }
        self.identities.purge(exited);
        self.domains.purge_expired();
        self.report_dns();
        self.report_kernel_stats()?;
        self.metrics
            .tracked_processes
            .set(self.identities.process_count() as i64);
        self.metrics
            .tracked_executables
            .set(self.identities.executable_count() as i64);
        Ok(())
    }

    /// DNS self-metrics: deltas of the cache's counters and of lost captures.
    fn report_dns(&mut self) {
        let lost = self.dns.as_mut().map_or(0, DnsCapture::take_lost);
        self.metrics.dns_answers_lost.inc_by(lost);
        let now = self.domains.stats();
        let before = std::mem::replace(&mut self.dns_reported, now);
        let count = |name: &str, delta: u64| {
            self.metrics
                .dns_messages
                .get_or_create(&ResultLabels {
                    result: name.to_owned(),
                })
                .inc_by(delta);
        };
        count(
            "answer_recorded",
            now.answers_recorded - before.answers_recorded,
        );
        count("parse_failure", now.parse_failures - before.parse_failures);
        count("ignored", now.ignored_messages - before.ignored_messages);
        count(
            "truncated",
            now.truncated_payloads - before.truncated_payloads,
        );
        self.metrics
            .dns_cache_evictions
            .inc_by(now.evictions - before.evictions);
        self.metrics
            .dns_cache_entries
            .set(self.domains.len() as i64);
    }

    fn report_label_overflow(&self) {
        for (label, folded) in self.labels.overflow() {
            let counter = self.metrics.label_overflow.get_or_create(&LabelLabels {
                label: label.to_owned(),
            });
            let reported = counter.get();
            if folded > reported {
                counter.inc_by(folded - reported);
            }
        }
        self.metrics
            .bytes_series
            .set(self.labels.series_count() as i64);
    }

    /// One flow's traffic in this drain, with everything known of it, as the
    /// journal and the sinks record it (uncapped: they are not Prometheus).
    fn rollup(
        &self,
        key: &TrafficKey,
        value: &TrafficValue,
        exe: ExeKey,
        path: &str,
        facts: &FlowFacts<'_>,
    ) -> Rollup {
        let owned = |text: Option<&str>| text.map(str::to_owned);
        let port = |port: Option<u16>| {
            port.filter(|port| self.record_ephemeral_ports || !self.labels.is_ephemeral(*port))
        };
        Rollup {
            exe: path.to_owned(),
            sha256: self.hasher.sha256_of(exe).unwrap_or_default(),
            parent: owned(facts.parent),
            uid: facts.uid,
            transport: flow::transport(key, value),
            local_port: port(flow::local_port(key, value)),
            remote_address: flow::remote_address(key).map(|a| a.to_string()),
            remote_port: port(facts.remote_port),
            domain: owned(facts.domain),
            bytes_sent: value.bytes[DIR_SENT],
            bytes_received: value.bytes[DIR_RECEIVED],
            comm: self.identities.process(key.tgid).map(|p| p.comm.clone()),
            container_id: owned(facts.container_id),
            container_name: owned(facts.container_name),
            pod: owned(facts.pod),
            namespace: owned(facts.namespace),
            country: owned(facts.country),
            asn: facts.asn,
        }
    }

    /// Turns the kernel's cumulative per-CPU counters into metric increments.
    fn report_kernel_stats(&mut self) -> Result<(), CollectorError> {
        for stat in Stat::ALL {
            let index = stat as u32;
            let total: u64 = self
                .stats
                .get(&index, 0)
                .map_err(map_error("stats"))?
                .iter()
                .sum();
            let delta = total.saturating_sub(self.stats_seen[index as usize]);
            self.stats_seen[index as usize] = total;
            if delta == 0 {
                continue;
            }
            match stat {
                Stat::TrafficMapFull => {
                    tracing::warn!(
                        refused = delta,
                        "traffic map full: raise collector.traffic_map_entries; bytes counted as unattributed"
                    );
                    self.metrics
                        .map_full
                        .get_or_create(&map_labels(TRAFFIC_MAP))
                        .inc_by(delta);
                }
                Stat::UnattributedSentBytes => {
                    self.metrics
                        .unattributed_bytes
                        .get_or_create(&DirectionLabels {
                            direction: Direction::Sent,
                        })
                        .inc_by(delta);
                }
                Stat::UnattributedReceivedBytes => {
                    self.metrics
                        .unattributed_bytes
                        .get_or_create(&DirectionLabels {
                            direction: Direction::Received,
                        })
                        .inc_by(delta);
                }
                Stat::EventsLost => {
                    tracing::warn!(
                        lost = delta,
                        "process announcements lost (ring buffer full): raise collector.ring_buffer_bytes"
                    );
                    self.metrics.events_lost.inc_by(delta);
                }
                Stat::AnnouncedMapFull => {
                    self.metrics
                        .map_full
                        .get_or_create(&map_labels(ANNOUNCED_MAP))
                        .inc_by(delta);
                }
                Stat::ExecEventsLost => {
                    tracing::warn!(
                        lost = delta,
                        "exec events lost (exec ring buffer full): raise exec.ring_buffer_bytes"
                    );
                    self.metrics.exec.events_lost.inc_by(delta);
                }
                Stat::SpliceMapFull => {
                    self.metrics
                        .map_full
                        .get_or_create(&map_labels(SPLICE_MAP))
                        .inc_by(delta);
                }
            }
        }
        let truncated = self.identities.truncated_paths();
        let reported = self.metrics.truncated_paths.get();
        if truncated > reported {
            self.metrics.truncated_paths.inc_by(truncated - reported);
        }
        Ok(())
    }
}
