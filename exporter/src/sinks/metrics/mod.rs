//! Every metric the agent exports, registered once in a prometheus-client registry.
//!
//! Traffic counters carry only `exe` and `direction`; long values such as the
//! sha256 live in `fleetsnitch_executable_info`, to be joined on `exe`.

pub mod labels;

use std::{fmt::Write, sync::atomic::AtomicU64};

use crate::sinks::metrics::labels::TrafficLabels;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

/// A label value taken from the outside world (a path, a name), escaped as the
/// exposition format requires. prometheus-client writes label values verbatim,
/// so a quote or newline in an executable's path would otherwise break the page.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Text(pub String);

impl EncodeLabelValue for Text {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                other => encoder.write_char(other)?,
            }
        }
        Ok(())
    }
}

impl From<String> for Text {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Text {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Sent,
    Received,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Received => "received",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExecutableLabels {
    pub exe: Text,
    /// Hex sha256, or `unavailable` when hashing failed (see `fleetsnitch_hash_failures_total`).
    pub sha256: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExeLabels {
    pub exe: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LabelLabels {
    pub label: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub path: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: String,
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

pub struct Metrics {
    pub registry: Registry,
    pub bytes: Family<TrafficLabels, Counter>,
    pub label_overflow: Family<LabelLabels, Counter>,
    pub bytes_series: Gauge,
    pub executable_info: Family<ExecutableLabels, Gauge>,
    pub hash_failures: Family<ReasonLabels, Counter>,
    pub events_lost: Counter,
    pub map_full: Family<MapLabels, Counter>,
    pub unattributed_bytes: Family<DirectionLabels, Counter>,
    pub unresolved_bytes: Family<DirectionLabels, Counter>,
    pub probe_attached: Family<ProbeLabels, Gauge>,
    pub drains: Counter,
    pub drain_errors: Counter,
    pub last_drain_seconds: Gauge<f64, AtomicU64>,
    pub tracked_processes: Gauge,
    pub tracked_executables: Gauge,
    pub truncated_paths: Counter,
    pub web_config_reloads: Family<ResultLabels, Counter>,
    pub web_config_last_reload_successful: Gauge,
    pub journal_loose_permissions: Family<PathLabels, Gauge>,
    pub start_time_seconds: Gauge,
    pub executable_first_seen: Family<ExecutableLabels, Gauge>,
    pub path_first_seen: Family<ExeLabels, Gauge>,
    pub executable_modified: Family<ExeLabels, Gauge>,
    pub virustotal_detections: Family<ExecutableLabels, Gauge>,
    pub dns_messages: Family<ResultLabels, Counter>,
    pub otlp_exported: Counter,
    pub otlp_dropped: Counter,
    pub otlp_export_errors: Counter,
    pub otlp_queued: Gauge,
    pub connection_log_written: Counter,
    pub connection_log_dropped: Counter,
    pub connection_log_errors: Counter,
    pub dns_answers_lost: Counter,
    pub dns_cache_evictions: Counter,
    pub dns_cache_entries: Gauge,
    pub virustotal_lookups: Family<ResultLabels, Counter>,
    pub journal_events: Family<KindLabels, Counter>,
    pub journal_writes: Counter,
    pub journal_write_errors: Counter,
    pub journal_dropped: Counter,
    pub exec: ExecMetrics,
}

/// Exec tracking (`exec.enabled`): every executed program.
#[derive(Default)]
pub struct ExecMetrics {
    /// Executions per executable path (`exe` capped like every `exe` label).
    pub total: Family<ExeLabels, Counter>,
    /// Exec events the kernel could not deliver (exec ring buffer full).
    pub events_lost: Counter,
    /// Execs whose file could not be held open for hashing (exec.max_open_files reached).
    pub open_files_exhausted: Counter,
    /// 1 for executable paths journaled from execs that never used the network.
    pub exec_only: Family<ExeLabels, Gauge>,
}

impl ExecMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "exec",
            "Programs executed, by executable path (exec tracking)",
            self.total.clone(),
        );
        registry.register(
            "exec_events_lost",
            "Exec events the kernel could not deliver (exec ring buffer full)",
            self.events_lost.clone(),
        );
        registry.register(
            "exec_open_files_exhausted",
            "Executed programs whose file could not be held open for hashing (exec.max_open_files reached); hashed by path instead",
            self.open_files_exhausted.clone(),
        );
        registry.register(
            "executable_exec_only",
            "1 for executables seen executing that never used the network (exec tracking), 0 once they do; join on exe",
            self.exec_only.clone(),
        );
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fleetsnitch");
        let metrics = Self {
            bytes: Family::default(),
            label_overflow: Family::default(),
            bytes_series: Gauge::default(),
            executable_info: Family::default(),
            hash_failures: Family::default(),
            events_lost: Counter::default(),
            map_full: Family::default(),
            unattributed_bytes: Family::default(),
            unresolved_bytes: Family::default(),
            probe_attached: Family::default(),
            drains: Counter::default(),
            drain_errors: Counter::default(),
            last_drain_seconds: Gauge::default(),
            tracked_processes: Gauge::default(),
            tracked_executables: Gauge::default(),
            truncated_paths: Counter::default(),
            web_config_reloads: Family::default(),
            web_config_last_reload_successful: Gauge::default(),
            journal_loose_permissions: Family::default(),
            start_time_seconds: Gauge::default(),
            executable_first_seen: Family::default(),
            path_first_seen: Family::default(),
            executable_modified: Family::default(),
            virustotal_detections: Family::default(),
            dns_messages: Family::default(),
            otlp_exported: Counter::default(),
            otlp_dropped: Counter::default(),
            otlp_export_errors: Counter::default(),
            otlp_queued: Gauge::default(),
            connection_log_written: Counter::default(),
            connection_log_dropped: Counter::default(),
            connection_log_errors: Counter::default(),
            dns_answers_lost: Counter::default(),
            dns_cache_evictions: Counter::default(),
            dns_cache_entries: Gauge::default(),
            virustotal_lookups: Family::default(),
            journal_events: Family::default(),
            journal_writes: Counter::default(),
            journal_write_errors: Counter::default(),
            journal_dropped: Counter::default(),
            exec: ExecMetrics::default(),
            registry: Registry::default(),
        };
        metrics.exec.register(&mut registry);
        registry.register(
            "bytes",
            "Application payload bytes sent and received on network sockets, by executable",
            metrics.bytes.clone(),
        );
        registry.register(
            "label_overflow",
            "Distinct label values folded into \"other\" by the caps of metrics.label_caps (label=\"_series\": series folded by metrics.max_series)",
            metrics.label_overflow.clone(),
        );
        registry.register(
            "bytes_series",
            "Series of fleetsnitch_bytes_total created so far",
            metrics.bytes_series.clone(),
        );
        registry.register(
            "executable_info",
            "Executables seen on the network with their sha256; value 1, join on exe",
            metrics.executable_info.clone(),
        );
        registry.register(
            "hash_failures",
            "Executables that could not be hashed, by reason",
            metrics.hash_failures.clone(),
        );
        registry.register(
            "events_lost",
            "Process announcements the kernel could not deliver (ring buffer full)",
            metrics.events_lost.clone(),
        );
        registry.register(
            "map_full",
            "Insertions refused because an in-kernel map was full, by map",
            metrics.map_full.clone(),
        );
        registry.register(
            "unattributed_bytes",
            "Bytes counted in the kernel but not attributed to an executable (traffic map full)",
            metrics.unattributed_bytes.clone(),
        );
        registry.register(
            "unresolved_bytes",
            "Bytes attributed to exe=\"[unknown]\" because the executable's path could not be found",
            metrics.unresolved_bytes.clone(),
        );
        registry.register(
            "probe_attached",
            "Whether each probe is attached (1) or missing (0), and in which mode",
            metrics.probe_attached.clone(),
        );
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
            metrics.last_drain_seconds.clone(),
        );
        registry.register(
            "tracked_processes",
            "Processes with a known identity",
            metrics.tracked_processes.clone(),
        );
        registry.register(
            "tracked_executables",
            "Executables with a known path",
            metrics.tracked_executables.clone(),
        );
        registry.register(
            "truncated_paths",
            "Executable paths too deep or too long for the kernel walk, resolved through /proc",
            metrics.truncated_paths.clone(),
        );
        registry.register(
            "web_config_reloads",
            "Re-reads of --web.config.file by result (success, failure: old settings kept)",
            metrics.web_config_reloads.clone(),
        );
        registry.register(
            "web_config_last_reload_successful",
            "Whether the last re-read of --web.config.file was accepted (1) or rejected (0)",
            metrics.web_config_last_reload_successful.clone(),
        );
        registry.register(
            "journal_loose_permissions",
            "1 for a journal file or directory that others than its owner can read or write",
            metrics.journal_loose_permissions.clone(),
        );
        registry.register_with_unit(
            "start_time",
            "Unix time the agent started; executables first seen after it are new in this run",
            Unit::Seconds,
            metrics.start_time_seconds.clone(),
        );
        registry.register_with_unit(
            "executable_first_seen_timestamp",
            "Unix time each (executable, sha256) was first seen on this host, from the journal",
            Unit::Seconds,
            metrics.executable_first_seen.clone(),
        );
        registry.register_with_unit(
            "path_first_seen_timestamp",
            "Unix time each executable path was first seen on this host with any hash",
            Unit::Seconds,
            metrics.path_first_seen.clone(),
        );
        registry.register_with_unit(
            "executable_modified_timestamp",
            "Unix time an executable was last modified in place (seen through fanotify)",
            Unit::Seconds,
            metrics.executable_modified.clone(),
        );
        registry.register(
            "otlp_exported",
            "Log records the OTLP collector accepted",
            metrics.otlp_exported.clone(),
        );
        registry.register(
            "otlp_dropped",
            "Log records dropped: the queue (otlp.max_queued_records) was full or the collector rejected them",
            metrics.otlp_dropped.clone(),
        );
        registry.register(
            "otlp_export_errors",
            "Failed OTLP export attempts (retried with back-off)",
            metrics.otlp_export_errors.clone(),
        );
        registry.register(
            "otlp_queued",
            "Log records waiting for the OTLP collector",
            metrics.otlp_queued.clone(),
        );
        registry.register(
            "connection_log_written",
            "Records written to the local connection log",
            metrics.connection_log_written.clone(),
        );
        registry.register(
            "connection_log_dropped",
            "Records dropped because the connection log writer fell behind",
            metrics.connection_log_dropped.clone(),
        );
        registry.register(
            "connection_log_errors",
            "Connection log opens, writes or rotations that failed",
            metrics.connection_log_errors.clone(),
        );
        registry.register(
            "dns_messages",
            "DNS responses seen at the socket layer, by result (answer_recorded counts answers; parse_failure, ignored, truncated count messages)",
            metrics.dns_messages.clone(),
        );
        registry.register(
            "dns_answers_lost",
            "DNS responses the kernel could not deliver (DNS ring buffer full): their domains are missing",
            metrics.dns_answers_lost.clone(),
        );
        registry.register(
            "dns_cache_evictions",
            "DNS answers dropped before expiry because the cache was full",
            metrics.dns_cache_evictions.clone(),
        );
        registry.register(
            "dns_cache_entries",
            "DNS answers held (per process and per container)",
            metrics.dns_cache_entries.clone(),
        );
        registry.register(
            "virustotal_detections",
            "Engines that flag the executable as malicious or suspicious on VirusTotal",
            metrics.virustotal_detections.clone(),
        );
        registry.register(
            "virustotal_lookups",
            "VirusTotal requests by result (found, not_found, uploaded, rate_limited, http_error, malformed, transport_error, file_error)",
            metrics.virustotal_lookups.clone(),
        );
        registry.register(
            "journal_events",
            "Journal events by kind (new_executable, new_hash, modified, virustotal, agent_error)",
            metrics.journal_events.clone(),
        );
        registry.register(
            "journal_writes",
            "Transactions committed to the journal",
            metrics.journal_writes.clone(),
        );
        registry.register(
            "journal_write_errors",
            "Journal opens or writes that failed",
            metrics.journal_write_errors.clone(),
        );
        registry.register(
            "journal_dropped",
            "Journal entries dropped because the queue or the pending bound was full",
            metrics.journal_dropped.clone(),
        );
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        metrics.start_time_seconds.set(started);
        metrics.initialize_known_series();
        Self {
            registry,
            ..metrics
        }
    }

    /// Creates every series whose label values are known in advance at zero,
    /// so `increase()` in alert rules sees their first increment.
    fn initialize_known_series(&self) {
        for map in ["traffic", "announced", "splice_calls"] {
            self.map_full
                .get_or_create(&MapLabels {
                    map: map.to_owned(),
                })
                .inc_by(0);
        }
        for direction in [Direction::Sent, Direction::Received] {
            self.unattributed_bytes
                .get_or_create(&DirectionLabels { direction })
                .inc_by(0);
            self.unresolved_bytes
                .get_or_create(&DirectionLabels { direction })
                .inc_by(0);
        }
        for reason in ["process_exited", "replaced", "unreadable"] {
            self.hash_failures
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .inc_by(0);
        }
        for kind in [
            "new_executable",
            "new_hash",
            "modified",
            "virustotal",
            "agent_error",
        ] {
            self.journal_events
                .get_or_create(&KindLabels {
                    kind: kind.to_owned(),
                })
                .inc_by(0);
        }
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 << 10);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_counter_is_exposed_with_exe_and_direction() {
        let metrics = Metrics::new();
        metrics
            .bytes
            .get_or_create(&TrafficLabels {
                exe: "/usr/bin/curl \"x\"\n\\".into(),
                direction: Direction::Sent,
                extra: vec![(
                    crate::sinks::metrics::labels::Dimension::Domain,
                    "a\"b".into(),
                )],
            })
            .inc_by(42);
        let text = metrics.encode();
        assert!(
            text.contains(
                "fleetsnitch_bytes_total{exe=\"/usr/bin/curl \\\"x\\\"\\n\\\\\",direction=\"sent\",domain=\"a\\\"b\"} 42"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE fleetsnitch_bytes counter"), "{text}");
    }
}
