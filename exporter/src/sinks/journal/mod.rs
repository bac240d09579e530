//! The local journal: every executable seen on this host (with its hashes,
//! names, parents and users), connection rollups per write window, and
//! events. It is what lets a restarted agent know a program is not new.
//!
//! One thread owns the SQLite connection. Other threads send it inputs over a
//! bounded channel; it writes them in one transaction per write interval.
//! When the journal cannot be written (missing, read-only, full disk) the
//! agent keeps counting: inputs wait in memory up to a bound and are retried,
//! and whatever is dropped is counted.

mod ignore;
mod schema;
mod store;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

pub use ignore::IgnoreList;
pub use store::{
    Batch, Event, EventKind, ExecutableSeen, ExecutableState, Rollup, Store, StoreError,
};

use crate::{
    config::JournalConfig,
    sinks::connection_log::ConnectionLog,
    sinks::metrics::{ExeLabels, ExecutableLabels, KindLabels, Metrics, PathLabels},
    sinks::otlp::{OtlpExporter, WindowRecords},
};

/// Where each window's records go besides the journal: OTLP and the local
/// connection log. They get every window whether or not the journal can be
/// written, so an off-host copy never waits on the local disk.
#[derive(Default)]
pub struct Sinks {
    pub otlp: Option<OtlpExporter>,
    pub connection_log: Option<ConnectionLog>,
}

/// Time the sinks get at shutdown to deliver what is queued.
const SINK_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Inputs queued for the journal thread before the producers see back-pressure.
const QUEUE_CAPACITY: usize = 4096;

pub enum Input {
    Executable(ExecutableSeen),
    Rollups(Vec<Rollup>),
    Event(Event),
}

/// The producers' side of the journal.
#[derive(Clone)]
pub struct JournalHandle {
    sender: SyncSender<Input>,
    metrics: Arc<Metrics>,
}

impl JournalHandle {
    /// Queues `input` without blocking; a full queue drops it and counts it.
    pub fn send(&self, input: Input) {
        match self.sender.try_send(input) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.metrics.journal_dropped.inc();
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Starts the journal thread. It stops, after a last flush, once every
/// [`JournalHandle`] is dropped.
pub fn spawn(
    config: JournalConfig,
    metrics: Arc<Metrics>,
    sinks: Sinks,
) -> std::io::Result<(JournalHandle, JoinHandle<()>)> {
    let (sender, receiver) = mpsc::sync_channel(QUEUE_CAPACITY);
    let handle = JournalHandle {
        sender,
        metrics: metrics.clone(),
    };
    let thread = thread::Builder::new()
        .name("fleetsnitch-journal".into())
        .spawn(move || {
            let mut writer = Writer::new(config, metrics, sinks);
            writer.run(receiver);
            writer.shutdown_sinks();
        })?;
    Ok((handle, thread))
}

struct Writer {
    config: JournalConfig,
    metrics: Arc<Metrics>,
    store: Option<Store>,
    batch: Batch,
    sinks: Sinks,
    /// Latest sha256 of each executable path, for rollups drained before
    /// their executable was hashed.
    hashes: HashMap<String, String>,
    /// This window's traffic and events for the sinks (the journal's batch
    /// may hold older windows while the journal cannot be written).
    window: Batch,
    window_start: i64,
    /// Last error logged, so a persisting failure is logged once, not every interval.
    last_error: Option<String>,
}

impl Writer {
    fn new(config: JournalConfig, metrics: Arc<Metrics>, sinks: Sinks) -> Self {
        let mut writer = Self {
            config,
            metrics,
            store: None,
            batch: Batch::default(),
            sinks,
            hashes: HashMap::new(),
            window: Batch::default(),
            window_start: unix_now(),
            last_error: None,
        };
        writer.ensure_open();
        writer
    }

    fn run(&mut self, receiver: mpsc::Receiver<Input>) {
        let mut next_flush = Instant::now() + self.config.write_interval;
        loop {
            let timeout = next_flush.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(timeout) {
                Ok(input) => self.accept(input),
                Err(RecvTimeoutError::Timeout) => {
                    self.flush();
                    next_flush = Instant::now() + self.config.write_interval;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.flush();
                    return;
                }
            }
        }
    }

    fn accept(&mut self, input: Input) {
        if self.batch.len() >= self.config.max_pending {
            self.metrics.journal_dropped.inc();
            return;
        }
        match input {
            Input::Executable(seen) => {
                if let Some(sha256) = &seen.sha256 {
                    self.hashes.insert(seen.path.clone(), sha256.clone());
                }
                self.batch.add_executable(seen);
            }
            Input::Rollups(rollups) => {
                for mut rollup in rollups {
                    if self.config.ignore.matches(&rollup) {
                        continue;
                    }
                    if !self.config.record_addresses {
                        rollup.remote_address = None;
                    }
                    if !self.config.record_ports {
                        rollup.local_port = None;
                        rollup.remote_port = None;
                    }
                    if self.has_sinks() {
                        self.window.add_rollup(rollup.clone());
                    }
                    self.batch.add_rollup(rollup);
                }
            }
            Input::Event(event) => {
                if self.has_sinks() {
                    self.window.events.push(event.clone());
                }
                self.batch.events.push(event);
            }
        }
    }

    fn ensure_open(&mut self) -> bool {
        if self.store.is_some() {
            return true;
        }
        match Store::open(&self.config.path) {
            Ok(store) => {
                tracing::info!(path = %self.config.path.display(), "journal open");
                for (path, _mode) in store::loose_permissions(&self.config.path) {
                    self.metrics
                        .journal_loose_permissions
                        .get_or_create(&PathLabels {
                            path: path.display().to_string().into(),
                        })
                        .set(1);
                }
                self.last_error = None;
                self.store = Some(store);
                true
            }
            Err(error) => {
                self.fail(&error);
                false
            }
        }
    }

    fn fail(&mut self, error: &StoreError) {
        self.metrics.journal_write_errors.inc();
        let text = error.to_string();
        if self.last_error.as_deref() != Some(text.as_str()) {
            tracing::error!(
                "{text}; traffic is still counted and /metrics served, journal entries wait in \
                 memory (up to journal.max_pending) and are retried every journal.write_interval"
            );
            self.last_error = Some(text);
        }
    }

    fn has_sinks(&self) -> bool {
        self.sinks.otlp.is_some() || self.sinks.connection_log.is_some()
    }

    /// Hands records to the sinks; they queue them and never block.
    fn send_to_sinks(&self, window: &WindowRecords) {
        if let Some(otlp) = &self.sinks.otlp {
            otlp.export(window);
        }
        if let Some(log) = &self.sinks.connection_log {
            log.write(window);
        }
        self.report_sinks();
    }

    fn report_sinks(&self) {
        let raise = |counter: &prometheus_client::metrics::counter::Counter, total: u64| {
            let reported = counter.get();
            if total > reported {
                counter.inc_by(total - reported);
            }
        };
        if let Some(otlp) = &self.sinks.otlp {
            let counters = otlp.counters();
            raise(&self.metrics.otlp_exported, counters.exported_total());
            raise(&self.metrics.otlp_dropped, counters.dropped_total());
            raise(
                &self.metrics.otlp_export_errors,
                counters.export_errors_total(),
            );
            self.metrics.otlp_queued.set(counters.queued() as i64);
        }
        if let Some(log) = &self.sinks.connection_log {
            let counters = log.counters();
            raise(
                &self.metrics.connection_log_written,
                counters.written_total(),
            );
            raise(
                &self.metrics.connection_log_dropped,
                counters.dropped_total(),
            );
            raise(&self.metrics.connection_log_errors, counters.errors_total());
        }
    }

    fn shutdown_sinks(&mut self) {
        if let Some(otlp) = self.sinks.otlp.as_mut() {
            otlp.shutdown(SINK_SHUTDOWN_GRACE);
        }
        if let Some(log) = self.sinks.connection_log.as_mut() {
            log.shutdown(SINK_SHUTDOWN_GRACE);
        }
        self.report_sinks();
    }

    fn flush(&mut self) {
        let now = unix_now();
        self.batch.fill_missing_hashes(&self.hashes);
        if self.has_sinks() {
            let mut window = std::mem::take(&mut self.window);
            window.fill_missing_hashes(&self.hashes);
            if !window.is_empty() {
                let seconds = (now - self.window_start).max(1) as u64;
                let records = WindowRecords::new(
                    self.window_start,
                    seconds,
                    &window.rollups(),
                    &window.events,
                );
                self.send_to_sinks(&records);
            }
        }
        if self.batch.is_empty() {
            self.window_start = now;
            return;
        }
        if !self.ensure_open() {
            return;
        }
        let store = self.store.as_mut().expect("opened above");
        let window_seconds = (now - self.window_start).max(1);
        let retention = Duration::from_secs(u64::from(self.config.retention_days) * 86_400);
        match store.flush(
            &self.batch,
            self.window_start,
            window_seconds,
            now,
            retention,
        ) {
            Ok((states, events)) => {
                self.metrics.journal_writes.inc();
                self.batch = Batch::default();
                self.window_start = now;
                if self.last_error.take().is_some() {
                    tracing::info!("journal writes succeed again");
                }
                self.publish(&states, &events);
                // Events the journal itself found (new executable, new hash,
                // modified) reach the sinks now; the others went with their window.
                let found: Vec<Event> = events
                    .into_iter()
                    .filter(|e| {
                        matches!(
                            e.kind,
                            EventKind::NewExecutable | EventKind::NewHash | EventKind::Modified
                        )
                    })
                    .collect();
                if self.has_sinks() && !found.is_empty() {
                    self.send_to_sinks(&WindowRecords::new(now, 0, &[], &found));
                }
            }
            Err(error) => {
                self.fail(&error);
                // A broken connection is reopened on the next flush.
                if matches!(error, StoreError::Write { .. }) && !self.config.path.exists() {
                    self.store = None;
                }
            }
        }
    }

    fn publish(&self, states: &[ExecutableState], events: &[Event]) {
        for state in states {
            let sha256 = if state.sha256.is_empty() {
                crate::identity::hashing::UNAVAILABLE.to_owned()
            } else {
                state.sha256.clone()
            };
            self.metrics
                .executable_first_seen
                .get_or_create(&ExecutableLabels {
                    exe: state.path.clone().into(),
                    sha256,
                })
                .set(state.first_seen);
            self.metrics
                .path_first_seen
                .get_or_create(&ExeLabels {
                    exe: state.path.clone().into(),
                })
                .set(state.path_first_seen);
            // Only programs exec tracking saw get a series; it drops to 0
            // when the program later uses the network.
            let exe = ExeLabels {
                exe: state.path.clone().into(),
            };
            let exec_only = &self.metrics.exec.exec_only;
            if !state.path_used_network {
                exec_only.get_or_create(&exe).set(1);
            } else if let Some(gauge) = exec_only.get(&exe) {
                gauge.set(0);
            }
        }
        for event in events {
            self.metrics
                .journal_events
                .get_or_create(&KindLabels {
                    kind: event.kind.as_str().to_owned(),
                })
                .inc();
            match event.kind {
                EventKind::NewExecutable | EventKind::NewHash | EventKind::Modified => {
                    tracing::info!(
                        kind = event.kind.as_str(),
                        exe = event.exe.as_deref().unwrap_or_default(),
                        sha256 = event.sha256.as_deref().unwrap_or_default(),
                        "journal event"
                    );
                }
                _ => {}
            }
        }
    }
}
