//! The product's own metrics: bytes per executable (`fleetsnitch_bytes_total`)
//! and executions (`fleetsnitch_exec_total`), labelled under the caps of
//! [`labels::LabelPolicy`].
//!
//! Traffic counters carry only `exe`, `direction` and the configured
//! dimensions; long values such as the sha256 live in
//! `fleetsnitch_executable_info`, to be joined on `exe`, unless `sha256` is
//! one of the configured dimensions (it then tells versions of one path
//! apart, under its cap like the others). An executable not seen for
//! `metrics.executable_expiry` loses its series and its places under the caps.

pub mod labels;

use std::{collections::HashMap, time::Duration};

use labels::{Dimension, LabelPolicy, OverflowMetrics, TrafficLabels};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Deserialize;

use crate::{
    model::{Activity, FlowRecord, Touched},
    support::{InvalidValue, check_duration},
    telemetry::{Direction, ExeLabels, Text},
};

/// The `metrics:` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Labels of fleetsnitch_bytes_total beyond exe and direction.
    pub bytes_labels: Vec<Dimension>,
    /// Distinct values per label (exe or any dimension) before folding into "other".
    pub label_caps: HashMap<String, usize>,
    /// Remote ports in this range (LOW-HIGH) are exported as "ephemeral".
    pub ephemeral_ports: String,
    /// Series of fleetsnitch_bytes_total before every optional label folds into "other".
    pub max_series: usize,
    /// An executable (or a version of one) not seen for this long loses its
    /// series in /metrics and its places under the caps; the journal keeps it.
    #[serde(with = "humantime_serde")]
    pub executable_expiry: Duration,
}

/// Default of `metrics.executable_expiry`.
pub const DEFAULT_EXECUTABLE_EXPIRY: Duration = Duration::from_secs(86_400);

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            bytes_labels: vec![Dimension::User, Dimension::RemotePort],
            label_caps: HashMap::new(),
            ephemeral_ports: "32768-60999".to_owned(),
            max_series: 10_000,
            executable_expiry: DEFAULT_EXECUTABLE_EXPIRY,
        }
    }
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<(), InvalidValue> {
        self.ephemeral_range()?;
        for (label, cap) in &self.label_caps {
            if label != labels::EXE_LABEL && label.parse::<Dimension>().is_err() {
                return Err(InvalidValue::new(
                    "metrics.label_caps",
                    label,
                    "not a label; use exe or one of the metrics.bytes_labels names",
                ));
            }
            if !(1..=1_000_000).contains(cap) {
                return Err(InvalidValue::new(
                    "metrics.label_caps",
                    format!("{label}: {cap}"),
                    "a cap must be between 1 and 1000000",
                ));
            }
        }
        if !(100..=10_000_000).contains(&self.max_series) {
            return Err(InvalidValue::new(
                "metrics.max_series",
                self.max_series,
                "must be between 100 and 10000000",
            ));
        }
        check_duration(
            "metrics.executable_expiry",
            self.executable_expiry,
            Duration::from_secs(5),
            Duration::from_secs(365 * 86_400),
            "must be between 5s and 365d",
        )
    }

    /// The ephemeral port range, `metrics.ephemeral_ports` parsed.
    pub fn ephemeral_range(&self) -> Result<std::ops::RangeInclusive<u16>, InvalidValue> {
        labels::parse_port_range(&self.ephemeral_ports).map_err(|reason| {
            InvalidValue::new("metrics.ephemeral_ports", &self.ephemeral_ports, reason)
        })
    }
}

/// `fleetsnitch_bytes_total`, `fleetsnitch_exec_total` and the label policy
/// that keeps their series bounded.
pub struct TrafficMetrics {
    bytes: Family<TrafficLabels, Counter>,
    exec: Family<ExeLabels, Counter>,
    policy: LabelPolicy,
    activity: Activity,
    /// When each `exe` value was last counted, in each family.
    bytes_touched: Touched<Text>,
    exec_touched: Touched<Text>,
}

impl TrafficMetrics {
    /// Registers the families; `config` must have been validated. Series
    /// expire by `activity`.
    pub fn register(
        registry: &mut Registry,
        config: &MetricsConfig,
        activity: Activity,
    ) -> Result<Self, InvalidValue> {
        let overflow = OverflowMetrics::default();
        let policy = LabelPolicy::new(
            &config.bytes_labels,
            &config.label_caps,
            config.ephemeral_range()?,
            config.max_series,
            &overflow,
        );
        let metrics = Self {
            bytes: Family::default(),
            exec: Family::default(),
            policy,
            activity,
            bytes_touched: Touched::default(),
            exec_touched: Touched::default(),
        };
        registry.register(
            "bytes",
            "Application payload bytes sent and received on network sockets, by executable",
            metrics.bytes.clone(),
        );
        registry.register(
            "exec",
            "Programs executed, by executable path (exec tracking)",
            metrics.exec.clone(),
        );
        registry.register(
            "label_overflow",
            "Distinct label values folded into \"other\" by the caps of metrics.label_caps (label=\"_series\": series folded by metrics.max_series)",
            overflow.overflow,
        );
        registry.register(
            "bytes_series",
            "Series of fleetsnitch_bytes_total exported now (created and not expired)",
            overflow.series,
        );
        Ok(metrics)
    }

    /// Whether flows should carry their hash before they are counted (the
    /// `sha256` label is exported).
    pub fn wants_sha256(&self) -> bool {
        self.policy.exports_sha256()
    }

    /// Adds one drain's flows to `fleetsnitch_bytes_total`.
    pub fn count_flows<'a>(&mut self, flows: impl IntoIterator<Item = &'a FlowRecord>) {
        let now = crate::support::unix_now();
        let mut totals: HashMap<TrafficLabels, u64> = HashMap::new();
        for flow in flows {
            for (direction, bytes) in [
                (Direction::Sent, flow.bytes.sent),
                (Direction::Received, flow.bytes.received),
            ] {
                if bytes > 0 {
                    *totals
                        .entry(self.policy.labels(flow, direction))
                        .or_default() += bytes;
                }
            }
        }
        for (labels, bytes) in totals {
            if labels.exe.0 != labels::OTHER {
                self.bytes_touched.touch(&labels.exe, now);
            }
            self.bytes.get_or_create(&labels).inc_by(bytes);
        }
    }

    /// Counts one execution of `exe` in `fleetsnitch_exec_total`.
    pub fn count_exec(&mut self, exe: &str) {
        let exe = self.policy.exec_exe_label(exe);
        let labels = ExeLabels { exe };
        if labels.exe.0 != labels::OTHER {
            if self.exec.get(&labels).is_none() {
                self.policy.hold_exec_exe(&labels.exe);
            }
            self.exec_touched
                .touch(&labels.exe, crate::support::unix_now());
        }
        self.exec.get_or_create(&labels).inc();
    }

    /// Removes the series of executables not seen for the expiry (at most
    /// once per sweep interval) and gives their places back.
    pub fn expire(&mut self, now: i64) {
        let activity = self.activity.clone();
        let stale = |exe: &Text, at: i64| activity.is_stale(&exe.0, None, at, now);
        let bytes = self.bytes_touched.sweep(&activity, now, stale);
        let exec = self.exec_touched.sweep(&activity, now, stale);
        if bytes.is_empty() && exec.is_empty() {
            return;
        }
        for exe in &bytes {
            for labels in self.policy.forget_exe(exe) {
                self.bytes.remove(&labels);
            }
        }
        for exe in exec {
            self.policy.forget_exec_exe(&exe);
            self.exec.remove(&ExeLabels { exe });
        }
        self.policy.release_unused();
        tracing::debug!(
            executables = bytes.len(),
            series = self.policy.series_count(),
            "series of executables not seen for metrics.executable_expiry removed"
        );
    }

    /// Whether `port` is in the ephemeral range (exported as "ephemeral").
    pub fn is_ephemeral(&self, port: u16) -> bool {
        self.policy.is_ephemeral(port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Bytes, Peer, Program},
        telemetry,
    };

    #[test]
    fn bytes_counter_is_exposed_with_exe_direction_and_escaped_labels() {
        let mut registry = telemetry::registry();
        let config = MetricsConfig {
            bytes_labels: vec![Dimension::Domain],
            ..MetricsConfig::default()
        };
        let mut metrics = TrafficMetrics::register(
            &mut registry,
            &config,
            Activity::new(DEFAULT_EXECUTABLE_EXPIRY),
        )
        .unwrap();
        let flow = FlowRecord {
            program: Program {
                exe: "/usr/bin/curl \"x\"\n\\".into(),
                ..Program::default()
            },
            peer: Peer {
                domain: Some("a\"b".into()),
                ..Peer::default()
            },
            bytes: Bytes {
                sent: 40,
                received: 0,
            },
            ..FlowRecord::default()
        };
        metrics.count_flows(&[
            flow.clone(),
            FlowRecord {
                bytes: Bytes {
                    sent: 2,
                    received: 0,
                },
                ..flow
            },
        ]);
        let text = telemetry::encode(&registry);
        assert!(
            text.contains(
                "fleetsnitch_bytes_total{exe=\"/usr/bin/curl \\\"x\\\"\\n\\\\\",direction=\"sent\",domain=\"a\\\"b\"} 42"
            ),
            "{text}"
        );
        assert!(
            !text.contains("direction=\"received\""),
            "no zero series: {text}"
        );
        assert!(text.contains("# TYPE fleetsnitch_bytes counter"), "{text}");
    }

    #[test]
    fn series_of_an_executable_not_seen_for_the_expiry_are_removed() {
        let mut registry = telemetry::registry();
        let config = MetricsConfig {
            bytes_labels: vec![],
            label_caps: HashMap::from([("exe".to_owned(), 1)]),
            ..MetricsConfig::default()
        };
        let activity = Activity::new(Duration::from_secs(60));
        let mut metrics =
            TrafficMetrics::register(&mut registry, &config, activity.clone()).unwrap();
        let flow = |exe: &str| FlowRecord {
            program: Program {
                exe: exe.into(),
                ..Program::default()
            },
            bytes: Bytes {
                sent: 10,
                received: 0,
            },
            ..FlowRecord::default()
        };
        metrics.count_flows(&[flow("/tmp/once")]);
        metrics.count_exec("/tmp/once");
        let now = crate::support::unix_now();
        activity.record("/tmp/once", None, now);
        metrics.count_flows(&[flow("/tmp/later")]);
        let text = telemetry::encode(&registry);
        assert!(text.contains("exe=\"other\""), "cap of 1 reached: {text}");

        metrics.expire(now + 61);
        let text = telemetry::encode(&registry);
        assert!(!text.contains("/tmp/once"), "expired: {text}");
        metrics.count_flows(&[flow("/tmp/later")]);
        let text = telemetry::encode(&registry);
        assert!(
            text.contains("fleetsnitch_bytes_total{exe=\"/tmp/later\",direction=\"sent\"} 10"),
            "the place was given back: {text}"
        );
        assert!(
            text.contains("fleetsnitch_bytes_series 2"),
            "later and other: {text}"
        );
    }
}
