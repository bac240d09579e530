//! The product's own metrics: bytes per executable (`fleetsnitch_bytes_total`)
//! and executions (`fleetsnitch_exec_total`), labelled under the caps of
//! [`labels::LabelPolicy`].
//!
//! Traffic counters carry only `exe`, `direction` and the configured
//! dimensions; long values such as the sha256 live in
//! `fleetsnitch_executable_info`, to be joined on `exe`.

pub mod labels;

use std::collections::HashMap;

use labels::{Dimension, LabelPolicy, OverflowMetrics, TrafficLabels};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Deserialize;

use crate::{
    model::FlowRecord,
    support::InvalidValue,
    telemetry::{Direction, ExeLabels},
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
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            bytes_labels: vec![Dimension::User, Dimension::RemotePort],
            label_caps: HashMap::new(),
            ephemeral_ports: "32768-60999".to_owned(),
            max_series: 10_000,
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
        Ok(())
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
}

impl TrafficMetrics {
    /// Registers the families; `config` must have been validated.
    pub fn register(registry: &mut Registry, config: &MetricsConfig) -> Result<Self, InvalidValue> {
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
            "Series of fleetsnitch_bytes_total created so far",
            overflow.series,
        );
        Ok(metrics)
    }

    /// Adds one drain's flows to `fleetsnitch_bytes_total`.
    pub fn count_flows(&mut self, flows: &[FlowRecord]) {
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
            self.bytes.get_or_create(&labels).inc_by(bytes);
        }
    }

    /// Counts one execution of `exe` in `fleetsnitch_exec_total`.
    pub fn count_exec(&mut self, exe: &str) {
        let exe = self.policy.exec_exe_label(exe);
        self.exec.get_or_create(&ExeLabels { exe }).inc();
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
        let mut metrics = TrafficMetrics::register(&mut registry, &config).unwrap();
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
}
