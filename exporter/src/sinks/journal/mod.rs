//! The local journal: every executable seen on this host (with its hashes,
//! names, parents and users), flow records per write window, and events. It
//! is what lets a restarted agent know a program is not new.
//!
//! The fan-out thread owns it and hands it each window. It writes what it was
//! given in one transaction per write interval. When the journal cannot be
//! written (missing, read-only, full disk) the agent keeps counting: entries
//! wait in memory up to `journal.max_pending` and are retried, and whatever is
//! dropped is counted.

mod ignore;
mod schema;
mod store;

use std::{path::PathBuf, time::Duration};

pub use ignore::IgnoreList;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use serde::Deserialize;
pub use store::{
    Batch, DEFAULT_DESTINATION_LEARNING_PERIOD, DESTINATION_KINDS, ExecutableState, FirstRun,
    Store, StoreError, virustotal_events,
};

use crate::{
    model::{Activity, Event, EventKind, ExeKey, ExecutableSighting, FlowRecord, Sha256, Touched},
    support::{InvalidValue, check_duration, check_range, unix_now},
    telemetry::{
        ExeKindLabels, ExeLabels, ExecutableLabels, FirstSeenLabels, KindLabels, PathLabels, Text,
        UNAVAILABLE,
    },
};

pub const DEFAULT_JOURNAL_PATH: &str = "/var/lib/fleetsnitch/journal.db";

/// Default of `journal.command_line_max_bytes`.
pub const DEFAULT_COMMAND_LINE_MAX_BYTES: usize = 1024;

/// The `journal:` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// SQLite journal of every executable seen on this host.
    pub path: PathBuf,
    /// How often queued entries are written, in one transaction.
    #[serde(with = "humantime_serde")]
    pub write_interval: Duration,
    /// Connection rollups and events older than this many days are deleted
    /// (checked at every write). Executables are kept: forgetting one would
    /// announce it as new again.
    pub retention_days: u32,
    /// Record remote addresses in connection rollups.
    pub record_addresses: bool,
    /// Record local and remote ports in connection rollups.
    pub record_ports: bool,
    /// Record the command lines of each process and its parent in every
    /// sink's connection records (they can hold secrets: off by default).
    pub record_command_lines: bool,
    /// Longest command line kept, in bytes; longer ones are cut on a
    /// character boundary and end with `…`.
    pub command_line_max_bytes: usize,
    /// Record ports in the ephemeral range (`metrics.ephemeral_ports`) in
    /// connection rollups. Off, a client's connections to one peer port fold
    /// into one rollup per window instead of one per source port.
    pub record_ephemeral_ports: bool,
    /// Entries kept in memory while the journal cannot be written; beyond
    /// that they are dropped and counted in fleetsnitch_journal_dropped_total.
    pub max_pending: usize,
    /// Traffic kept out of the connection log.
    pub ignore: IgnoreList,
    /// A build (sha256) known on this host for this long that talks to a
    /// domain, country or AS it never talked to here is a new-destination
    /// event (journal, OTLP, fleetsnitch_new_destinations_total).
    #[serde(with = "humantime_serde")]
    pub destination_learning_period: Duration,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from(DEFAULT_JOURNAL_PATH),
            write_interval: Duration::from_secs(10),
            retention_days: 30,
            record_addresses: true,
            record_ports: true,
            record_command_lines: false,
            command_line_max_bytes: DEFAULT_COMMAND_LINE_MAX_BYTES,
            record_ephemeral_ports: false,
            max_pending: 100_000,
            ignore: IgnoreList::default(),
            destination_learning_period: DEFAULT_DESTINATION_LEARNING_PERIOD,
        }
    }
}

impl JournalConfig {
    pub fn validate(&self) -> Result<(), InvalidValue> {
        if self.path.as_os_str().is_empty() {
            return Err(InvalidValue::new("journal.path", "", "must not be empty"));
        }
        check_duration(
            "journal.write_interval",
            self.write_interval,
            Duration::from_millis(100),
            Duration::from_secs(3600),
            "must be between 100ms and 1h",
        )?;
        check_range("journal.retention_days", self.retention_days, 1, 36_500)?;
        check_range(
            "journal.command_line_max_bytes",
            self.command_line_max_bytes,
            16,
            65_536,
        )?;
        check_duration(
            "journal.destination_learning_period",
            self.destination_learning_period,
            Duration::ZERO,
            Duration::from_secs(3_650 * 86_400),
            "must be between 0s and 3650d",
        )?;
        check_range("journal.max_pending", self.max_pending, 1_000, 100_000_000)
    }
}

/// What the journal exports: its own health, and what it knows of each
/// executable (first seen, exec only).
#[derive(Debug, Clone, Default)]
pub struct JournalMetrics {
    events: Family<KindLabels, Counter>,
    writes: Counter,
    write_errors: Counter,
    /// Entries dropped: the fan-out queue or the pending bound was full.
    pub dropped: Counter,
    loose_permissions: Family<PathLabels, Gauge>,
    executable_first_seen: Family<FirstSeenLabels, Gauge>,
    path_first_seen: Family<ExeLabels, Gauge>,
    exec_only: Family<ExeLabels, Gauge>,
    new_destinations: Family<ExeKindLabels, Counter>,
}

impl JournalMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "journal_events",
            "Journal events by kind (new_executable, new_hash, modified, virustotal, agent_error, new_destination)",
            metrics.events.clone(),
        );
        registry.register(
            "journal_writes",
            "Transactions committed to the journal",
            metrics.writes.clone(),
        );
        registry.register(
            "journal_write_errors",
            "Journal opens or writes that failed",
            metrics.write_errors.clone(),
        );
        registry.register(
            "journal_dropped",
            "Journal entries dropped because the queue or the pending bound was full",
            metrics.dropped.clone(),
        );
        registry.register(
            "journal_loose_permissions",
            "1 for a journal file or directory that others than its owner can read or write",
            metrics.loose_permissions.clone(),
        );
        registry.register_with_unit(
            "executable_first_seen_timestamp",
            "Unix time each (executable, sha256) was first seen on this host, from the journal; \
             parent, user, container_id, container_name, pod, namespace: who ran it then, where known",
            Unit::Seconds,
            metrics.executable_first_seen.clone(),
        );
        registry.register_with_unit(
            "path_first_seen_timestamp",
            "Unix time each executable path was first seen on this host with any hash",
            Unit::Seconds,
            metrics.path_first_seen.clone(),
        );
        registry.register(
            "executable_exec_only",
            "1 for executables seen executing that never used the network (exec tracking), 0 once they do; join on exe",
            metrics.exec_only.clone(),
        );
        registry.register(
            "new_destinations",
            "Destinations (kind: domain, country, asn) a build known longer than \
             journal.destination_learning_period talked to for the first time on this host; \
             which one is in the journal's events and the OTLP record",
            metrics.new_destinations.clone(),
        );
        // Known series start at zero, so `increase()` in alert rules sees their first increment.
        for kind in EventKind::ALL {
            metrics.event(kind).inc_by(0);
        }
        metrics
    }

    fn event(&self, kind: EventKind) -> Counter {
        self.events
            .get_or_create(&KindLabels {
                kind: kind.as_str().to_owned(),
            })
            .clone()
    }
}

/// The journal sink.
pub struct Journal {
    config: JournalConfig,
    metrics: JournalMetrics,
    /// The per-executable series it exports expire by this clock.
    activity: Activity,
    first_seen_touched: Touched<FirstSeenLabels>,
    path_touched: Touched<ExeLabels>,
    destinations_touched: Touched<ExeKindLabels>,
    store: Option<Store>,
    /// What waits to be written: this window, and older ones while the
    /// journal cannot be written.
    batch: Batch,
    window_start: i64,
    /// Last error logged, so a persisting failure is logged once, not every interval.
    last_error: Option<String>,
}

impl Journal {
    /// Opens the journal; one that cannot be opened now is retried at every
    /// flush. The series it exports of executables `activity` has not seen
    /// for its expiry are removed (the journal keeps the executables).
    pub fn open(config: JournalConfig, metrics: JournalMetrics, activity: Activity) -> Self {
        let mut journal = Self {
            config,
            metrics,
            activity,
            first_seen_touched: Touched::default(),
            path_touched: Touched::default(),
            destinations_touched: Touched::default(),
            store: None,
            batch: Batch::default(),
            window_start: unix_now(),
            last_error: None,
        };
        journal.ensure_open();
        journal
    }

    /// Whether another entry fits under `journal.max_pending`; counts it dropped if not.
    fn has_room(&self) -> bool {
        if self.batch.len() >= self.config.max_pending {
            self.metrics.dropped.inc();
            return false;
        }
        true
    }

    pub fn add_executable(&mut self, sighting: ExecutableSighting) {
        if self.has_room() {
            self.batch.add_executable(sighting);
        }
    }

    pub fn add_flow(&mut self, flow: FlowRecord) {
        if self.has_room() {
            self.batch.add_flow(flow);
        }
    }

    pub fn add_event(&mut self, event: Event) {
        if self.has_room() {
            self.batch.events.push(event);
        }
    }

    fn ensure_open(&mut self) -> bool {
        if self.store.is_some() {
            return true;
        }
        match Store::open(&self.config.path) {
            Ok(store) => {
                let store =
                    store.with_destination_learning_period(self.config.destination_learning_period);
                tracing::info!(path = %self.config.path.display(), "journal open");
                for (path, _mode) in store::loose_permissions(&self.config.path) {
                    self.metrics
                        .loose_permissions
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
        self.metrics.write_errors.inc();
        let text = error.to_string();
        if self.last_error.as_deref() != Some(text.as_str()) {
            tracing::error!(
                "{text}; traffic is still counted and /metrics served, journal entries wait in \
                 memory (up to journal.max_pending) and are retried every journal.write_interval"
            );
            self.last_error = Some(text);
        }
    }

    /// Writes what waits, in one transaction, filling the hashes of flows
    /// drained before their executable was hashed with the hash of the file
    /// that sent (`hash_of`). Returns the events the journal found (new
    /// executable, new hash, modified), which the other sinks get once they
    /// are written.
    pub fn flush(&mut self, now: i64, hash_of: impl Fn(&ExeKey) -> Option<Sha256>) -> Vec<Event> {
        self.expire(now);
        self.batch.fill_missing_hashes(hash_of);
        if self.batch.is_empty() {
            self.window_start = now;
            return Vec::new();
        }
        if !self.ensure_open() {
            return Vec::new();
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
                self.metrics.writes.inc();
                self.batch = Batch::default();
                self.window_start = now;
                if self.last_error.take().is_some() {
                    tracing::info!("journal writes succeed again");
                }
                self.publish(&states, &events);
                events
                    .into_iter()
                    .filter(|event| event.kind.is_found_by_journal())
                    .collect()
            }
            Err(error) => {
                self.fail(&error);
                // A broken connection is reopened on the next flush.
                if matches!(error, StoreError::Write { .. }) && !self.config.path.exists() {
                    self.store = None;
                }
                Vec::new()
            }
        }
    }

    /// Removes the series of executables (and versions) not seen for the expiry.
    fn expire(&mut self, now: i64) {
        let activity = self.activity.clone();
        for labels in self.first_seen_touched.sweep(&activity, now, |labels, at| {
            let version = &labels.version;
            let sha256 = Some(version.sha256.as_str()).filter(|sha256| *sha256 != UNAVAILABLE);
            activity.is_stale(&version.exe.0, sha256, at, now)
        }) {
            self.metrics.executable_first_seen.remove(&labels);
        }
        for exe in self.path_touched.sweep(&activity, now, |exe, at| {
            activity.is_stale(&exe.exe.0, None, at, now)
        }) {
            self.metrics.path_first_seen.remove(&exe);
            self.metrics.exec_only.remove(&exe);
        }
        for labels in self
            .destinations_touched
            .sweep(&activity, now, |labels, at| {
                activity.is_stale(&labels.exe.0, None, at, now)
            })
        {
            self.metrics.new_destinations.remove(&labels);
        }
    }

    fn publish(&mut self, states: &[ExecutableState], events: &[Event]) {
        let now = unix_now();
        for state in states {
            let labels = first_seen_labels(state);
            self.metrics
                .executable_first_seen
                .get_or_create(&labels)
                .set(state.first_seen);
            self.first_seen_touched.touch(&labels, now);
            let exe = ExeLabels::new(&state.path);
            self.path_touched.touch(&exe, now);
            self.metrics
                .path_first_seen
                .get_or_create(&exe)
                .set(state.path_first_seen);
            // Only programs exec tracking saw get a series; it drops to 0
            // when the program later uses the network.
            let exec_only = &self.metrics.exec_only;
            if !state.path_used_network {
                exec_only.get_or_create(&exe).set(1);
            } else if let Some(gauge) = exec_only.get(&exe) {
                gauge.set(0);
            }
        }
        for event in events {
            self.metrics.event(event.kind).inc();
            if event.kind == EventKind::NewDestination
                && let (Some(exe), Some(kind)) = (
                    &event.exe,
                    event.detail.as_deref().and_then(store::destination_kind),
                )
            {
                let labels = ExeKindLabels {
                    exe: exe.as_str().into(),
                    kind: kind.to_owned(),
                };
                self.metrics.new_destinations.get_or_create(&labels).inc();
                self.destinations_touched.touch(&labels, now);
            }
            if event.kind.is_found_by_journal() {
                tracing::info!(
                    kind = event.kind.as_str(),
                    exe = event.exe.as_deref().unwrap_or_default(),
                    sha256 = event.sha256.as_ref().map_or("", Sha256::as_str),
                    "journal event"
                );
            }
        }
    }
}

/// The first-seen series of a version, labelled with who ran it then where
/// the journal knows (the labels of `fleetsnitch_bytes_total` of that name,
/// as they were at that sighting).
fn first_seen_labels(state: &ExecutableState) -> FirstSeenLabels {
    let sha256 = Some(state.sha256.as_str()).filter(|sha256| !sha256.is_empty());
    let FirstRun {
        parent,
        user,
        workload,
    } = &state.first_run;
    let context = [
        ("parent", parent),
        ("user", user),
        ("container_id", &workload.container_id),
        ("container_name", &workload.container_name),
        ("pod", &workload.pod),
        ("namespace", &workload.namespace),
    ]
    .into_iter()
    .filter_map(|(name, value)| {
        let value = value.as_deref().filter(|value| !value.is_empty())?;
        Some((name, Text(value.to_owned())))
    })
    .collect();
    FirstSeenLabels {
        version: ExecutableLabels::new(&state.path, sha256),
        context,
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;
    use crate::model::Workload;

    /// The first-seen series names who ran the version, leaves out what is
    /// unknown (no empty labels) and escapes what it writes.
    #[test]
    fn first_seen_series_carries_who_ran_it_where_known() {
        let mut registry = Registry::default();
        let metrics = JournalMetrics::register(&mut registry);
        let state = |sha256: &str, first_run: FirstRun| ExecutableState {
            path: "/usr/bin/tool".into(),
            sha256: sha256.into(),
            first_seen: 100,
            path_first_seen: 100,
            path_used_network: true,
            first_run,
        };
        let known = state(
            "aa",
            FirstRun {
                parent: Some("/bin/ba\"sh".into()),
                user: Some("alice".into()),
                workload: Workload {
                    pod: Some("web-1".into()),
                    namespace: Some("shop".into()),
                    container_name: Some(String::new()),
                    ..Workload::default()
                },
            },
        );
        let unknown = state("", FirstRun::default());
        for state in [&known, &unknown] {
            metrics
                .executable_first_seen
                .get_or_create(&first_seen_labels(state))
                .set(state.first_seen);
        }
        let mut page = String::new();
        encode(&mut page, &registry).unwrap();
        assert!(
            page.contains(
                "executable_first_seen_timestamp_seconds{exe=\"/usr/bin/tool\",sha256=\"aa\",\
                 parent=\"/bin/ba\\\"sh\",user=\"alice\",pod=\"web-1\",namespace=\"shop\"} 100"
            ),
            "{page}"
        );
        assert!(
            page.contains(
                "executable_first_seen_timestamp_seconds{exe=\"/usr/bin/tool\",sha256=\"unavailable\"} 100"
            ),
            "{page}"
        );
    }
}
