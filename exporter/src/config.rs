//! Configuration: the YAML file, then command-line flags on top of it.
//!
//! Every key has a default, so the agent runs without a file. Each section
//! belongs to the module it configures, which defines and validates it; this
//! file only composes them. Unknown keys and out-of-range values are errors
//! that name the file, the key and the value.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::support::InvalidValue;
pub use crate::{
    enrichment::{geoip::GeoIpConfig, kubernetes::KubernetesConfig},
    kernel::{CollectorConfig, exec_events::ExecConfig, probes::ProbesConfig},
    sinks::{
        connection_log::ConnectionLogConfig,
        journal::{DEFAULT_JOURNAL_PATH, JournalConfig},
        metrics::MetricsConfig,
        otlp::OtlpConfig,
        virustotal::VirusTotalConfig,
    },
    web::{DEFAULT_LISTEN_ADDRESS, DEFAULT_TELEMETRY_PATH, WebConfig},
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: yaml_serde::Error,
    },
    #[error(transparent)]
    Invalid(#[from] InvalidValue),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub web: WebConfig,
    pub journal: JournalConfig,
    pub collector: CollectorConfig,
    pub probes: ProbesConfig,
    pub virustotal: VirusTotalConfig,
    pub metrics: MetricsConfig,
    pub geoip: GeoIpConfig,
    pub kubernetes: KubernetesConfig,
    pub otlp: OtlpConfig,
    pub connection_log: ConnectionLogConfig,
    pub exec: ExecConfig,
}

impl Config {
    /// Reads and validates `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|err| match err {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses a YAML document; an empty document means every default.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let config: Self = yaml_serde::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        Ok(config)
    }

    /// Checks every value the agent relies on; called after flags are applied.
    /// (The OTLP and connection log sections are checked when those sinks start.)
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.web.validate()?;
        self.journal.validate()?;
        self.metrics.validate()?;
        self.virustotal.validate()?;
        self.collector.validate()?;
        self.exec.validate()?;
        self.probes.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn empty_document_is_all_defaults() {
        let config = Config::from_yaml("").unwrap();
        assert_eq!(config, Config::default());
        config.validate().unwrap();
    }

    #[test]
    fn keys_override_defaults() {
        let config = Config::from_yaml(
            "web:\n  listen_address: 127.0.0.1:1234\ncollector:\n  drain_interval: 500ms\n",
        )
        .unwrap();
        assert_eq!(config.web.listen_address, "127.0.0.1:1234");
        assert_eq!(config.collector.drain_interval, Duration::from_millis(500));
        assert_eq!(config.web.telemetry_path, DEFAULT_TELEMETRY_PATH);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::from_yaml("web:\n  listen_adress: 1.2.3.4:5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_adress"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn out_of_range_value_names_key_and_value() {
        let config = Config::from_yaml("collector:\n  drain_interval: 5s\n").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("collector.drain_interval"), "{err}");
        assert!(err.contains("5s"), "{err}");

        let config = Config::from_yaml("collector:\n  ring_buffer_bytes: 1000\n").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("collector.ring_buffer_bytes (1000)"), "{err}");
    }

    /// Every bounded key, just outside each end of its range: each is refused
    /// with an error that names the key and the value given.
    #[test]
    fn every_value_out_of_range_is_refused_naming_key_and_value() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "web:\n  listen_address: nowhere\n",
                "web.listen_address",
                "nowhere",
            ),
            (
                "web:\n  telemetry_path: metrics\n",
                "web.telemetry_path",
                "metrics",
            ),
            (
                "web:\n  telemetry_path: /healthz\n",
                "web.telemetry_path",
                "/healthz",
            ),
            ("journal:\n  path: ''\n", "journal.path", ""),
            (
                "journal:\n  write_interval: 50ms\n",
                "journal.write_interval",
                "50ms",
            ),
            (
                "journal:\n  write_interval: 2h\n",
                "journal.write_interval",
                "2h",
            ),
            (
                "journal:\n  retention_days: 0\n",
                "journal.retention_days",
                "0",
            ),
            (
                "journal:\n  retention_days: 36501\n",
                "journal.retention_days",
                "36501",
            ),
            (
                "journal:\n  destination_learning_period: 3651d\n",
                "journal.destination_learning_period",
                "9years 11months 28days 21h 50m 24s",
            ),
            (
                "journal:\n  max_pending: 999\n",
                "journal.max_pending",
                "999",
            ),
            (
                "journal:\n  max_pending: 100000001\n",
                "journal.max_pending",
                "100000001",
            ),
            (
                "metrics:\n  ephemeral_ports: 9-1\n",
                "metrics.ephemeral_ports",
                "9-1",
            ),
            (
                "metrics:\n  label_caps: {domain: 0}\n",
                "metrics.label_caps",
                "domain: 0",
            ),
            (
                "metrics:\n  executable_expiry: 4s\n",
                "metrics.executable_expiry",
                "4s",
            ),
            (
                "metrics:\n  executable_expiry: 366d\n",
                "metrics.executable_expiry",
                // humantime's year is 365.25 days.
                "1year 18h",
            ),
            (
                "metrics:\n  label_caps: {domain: 1000001}\n",
                "metrics.label_caps",
                "domain: 1000001",
            ),
            (
                "metrics:\n  label_caps: {colour: 5}\n",
                "metrics.label_caps",
                "colour",
            ),
            ("metrics:\n  max_series: 99\n", "metrics.max_series", "99"),
            (
                "metrics:\n  max_series: 10000001\n",
                "metrics.max_series",
                "10000001",
            ),
            (
                "virustotal:\n  request_interval: 5ms\n",
                "virustotal.request_interval",
                "5ms",
            ),
            (
                "virustotal:\n  base_url: ftp://vt\n",
                "virustotal.base_url",
                "ftp://vt",
            ),
            (
                "collector:\n  drain_interval: 50ms\n",
                "collector.drain_interval",
                "50ms",
            ),
            (
                "collector:\n  drain_interval: 3s\n",
                "collector.drain_interval",
                "3s",
            ),
            (
                "collector:\n  traffic_map_entries: 1023\n",
                "collector.traffic_map_entries",
                "1023",
            ),
            (
                "collector:\n  traffic_map_entries: 4194305\n",
                "collector.traffic_map_entries",
                "4194305",
            ),
            (
                "collector:\n  process_map_entries: 1023\n",
                "collector.process_map_entries",
                "1023",
            ),
            (
                "collector:\n  process_map_entries: 4194305\n",
                "collector.process_map_entries",
                "4194305",
            ),
            (
                "collector:\n  ring_buffer_bytes: 32768\n",
                "collector.ring_buffer_bytes",
                "32768",
            ),
            (
                "collector:\n  ring_buffer_bytes: 3145728\n",
                "collector.ring_buffer_bytes",
                "3145728",
            ),
            (
                "collector:\n  ring_buffer_bytes: 536870912\n",
                "collector.ring_buffer_bytes",
                "536870912",
            ),
            (
                "probes:\n  disabled_modes: [uprobe]\n",
                "probes.disabled_modes",
                "uprobe",
            ),
        ];
        for (yaml, key, value) in cases {
            let config = Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            let err = match config.validate() {
                Ok(()) => panic!("accepted: {yaml}"),
                Err(err) => err.to_string(),
            };
            assert!(err.contains(&format!("{key} ({value})")), "{yaml}: {err}");
        }
    }

    #[test]
    fn exec_tracking_is_off_by_default_and_its_values_are_checked() {
        assert!(!Config::default().exec.enabled);
        let config = Config::from_yaml("exec:\n  ring_buffer_bytes: 100000\n").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("exec.ring_buffer_bytes (100000)"), "{err}");
        let config = Config::from_yaml("exec:\n  max_open_files: 0\n").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("exec.max_open_files (0)"), "{err}");
    }

    #[test]
    fn unknown_probe_mode_is_named() {
        let config = Config::from_yaml("probes:\n  disabled_modes: [tp_btf, uprobe]\n").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("probes.disabled_modes (uprobe)"), "{err}");
    }

    #[test]
    fn unknown_label_is_named_with_the_known_ones() {
        let err = Config::from_yaml("metrics:\n  bytes_labels: [remote_port, colour]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("colour") && err.contains("container_id"),
            "{err}"
        );
        let config = Config::from_yaml("metrics:\n  label_caps: {domain: 0}\n").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("metrics.label_caps (domain: 0)"), "{err}");
        let config = Config::from_yaml("metrics:\n  ephemeral_ports: 9-1\n").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("metrics.ephemeral_ports (9-1)"), "{err}");
    }

    #[test]
    fn bad_listen_address_is_named() {
        let config = Config::from_yaml("web:\n  listen_address: nowhere\n").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("web.listen_address (nowhere)"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Config::from_file(Path::new("/nonexistent/fleetsnitch.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/fleetsnitch.yaml"), "{err}");
    }
}
