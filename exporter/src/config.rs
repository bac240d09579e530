//! Configuration: the YAML file, then command-line flags on top of it.
//!
//! Every key has a default, so the agent runs without a file. Unknown keys and
//! out-of-range values are errors that name the file, the key and the value.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    enrichment::kubernetes::KubernetesConfig,
    sinks::connection_log::ConnectionLogConfig,
    sinks::journal::IgnoreList,
    sinks::metrics::labels::{self, Dimension},
    sinks::otlp::OtlpConfig,
};

/// Where `/metrics` is served unless configured otherwise.
pub const DEFAULT_LISTEN_ADDRESS: &str = "0.0.0.0:9941";
pub const DEFAULT_TELEMETRY_PATH: &str = "/metrics";
pub const DEFAULT_JOURNAL_PATH: &str = "/var/lib/fleetsnitch/journal.db";

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
        source: serde_yaml::Error,
    },
    #[error("invalid value for {key} ({value}): {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
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

/// Exec tracking: every executed program, not only those on the network.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ExecConfig {
    /// Journal and export every executed program. Off: the exec probe is not attached.
    pub enabled: bool,
    /// Size of the ring buffer carrying exec events to the agent.
    pub ring_buffer_bytes: u32,
    /// Read each program's command line (it may hold secrets) for the OTLP records.
    pub record_command_lines: bool,
    /// File descriptors held open on executables waiting to be hashed.
    pub max_open_files: u32,
}

impl Default for ExecConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ring_buffer_bytes: 1 << 20,
            record_command_lines: false,
            max_open_files: 256,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GeoIpConfig {
    /// A country (or city) database: GeoLite2-Country/City or DB-IP country/city lite.
    pub country_database: Option<PathBuf>,
    /// An ASN database: GeoLite2-ASN or DB-IP ASN lite.
    pub asn_database: Option<PathBuf>,
}

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

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VirusTotalConfig {
    /// API key; checks are off without one. Prefer `api_key_file`.
    pub api_key: Option<String>,
    /// File holding the API key (surrounding whitespace ignored).
    pub api_key_file: Option<PathBuf>,
    /// Base URL of the v3 API.
    pub base_url: String,
    /// Minimum time between two requests (the public API allows 4 a minute).
    #[serde(with = "humantime_serde")]
    pub request_interval: Duration,
    /// Upload executables VirusTotal does not know. Off: uploading sends the file away.
    pub upload_unknown: bool,
    /// Larger files are never uploaded (32 MiB is the API's limit for a plain upload).
    pub max_upload_bytes: u64,
    /// Timeout of one request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for VirusTotalConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            api_key_file: None,
            base_url: "https://www.virustotal.com/api/v3".to_owned(),
            request_interval: Duration::from_secs(15),
            upload_unknown: false,
            max_upload_bytes: 32 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

impl VirusTotalConfig {
    /// The API key from `api_key` or `api_key_file`, if any.
    pub fn api_key(&self) -> Result<Option<String>, crate::sinks::virustotal::LookupError> {
        if let Some(key) = self
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
        {
            return Ok(Some(key.to_owned()));
        }
        let Some(path) = &self.api_key_file else {
            return Ok(None);
        };
        let key = std::fs::read_to_string(path).map_err(|err| {
            crate::sinks::virustotal::LookupError::File(format!(
                "virustotal.api_key_file {}: {err}",
                path.display()
            ))
        })?;
        Ok(Some(key.trim().to_owned()).filter(|k| !k.is_empty()))
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProbesConfig {
    /// Attachment modes never to use (tp_btf, fexit, kprobe, tracepoint), e.g. to
    /// force a fallback on a kernel where the preferred mode misbehaves.
    pub disabled_modes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// `host:port` to serve `/metrics` and `/healthz` on.
    pub listen_address: String,
    /// Path of the Prometheus endpoint.
    pub telemetry_path: String,
    /// Exporter-toolkit web configuration (TLS, client certificates, basic
    /// auth) for every path; re-read when it changes. None: plain HTTP.
    pub config_file: Option<PathBuf>,
}

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
    /// Record ports in the ephemeral range (`metrics.ephemeral_ports`) in
    /// connection rollups. Off, a client's connections to one peer port fold
    /// into one rollup per window instead of one per source port.
    pub record_ephemeral_ports: bool,
    /// Entries kept in memory while the journal cannot be written; beyond
    /// that they are dropped and counted in fleetsnitch_journal_dropped_total.
    pub max_pending: usize,
    /// Traffic kept out of the connection log.
    pub ignore: IgnoreList,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CollectorConfig {
    /// How often the in-kernel counters are drained into `/metrics`.
    #[serde(with = "humantime_serde")]
    pub drain_interval: Duration,
    /// Capacity of the in-kernel (process, socket) table per drain interval.
    pub traffic_map_entries: u32,
    /// Capacity of the in-kernel table of processes already announced.
    pub process_map_entries: u32,
    /// Size of the ring buffer carrying process identities to the agent.
    pub ring_buffer_bytes: u32,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            listen_address: DEFAULT_LISTEN_ADDRESS.to_owned(),
            telemetry_path: DEFAULT_TELEMETRY_PATH.to_owned(),
            config_file: None,
        }
    }
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from(DEFAULT_JOURNAL_PATH),
            write_interval: Duration::from_secs(10),
            retention_days: 30,
            record_addresses: true,
            record_ports: true,
            record_ephemeral_ports: false,
            max_pending: 100_000,
            ignore: IgnoreList::default(),
        }
    }
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            drain_interval: Duration::from_secs(1),
            traffic_map_entries: 65_536,
            process_map_entries: 32_768,
            ring_buffer_bytes: 1 << 20,
        }
    }
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
        let config: Self = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        Ok(config)
    }

    /// Checks every value the agent relies on; called after flags are applied.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_address()?;
        if !self.web.telemetry_path.starts_with('/') || self.web.telemetry_path == "/healthz" {
            return Err(invalid(
                "web.telemetry_path",
                &self.web.telemetry_path,
                "must start with '/' and must not be /healthz",
            ));
        }
        if self.journal.path.as_os_str().is_empty() {
            return Err(invalid("journal.path", "", "must not be empty"));
        }
        let write = self.journal.write_interval;
        if write < Duration::from_millis(100) || write > Duration::from_secs(3600) {
            return Err(invalid(
                "journal.write_interval",
                &humantime::format_duration(write).to_string(),
                "must be between 100ms and 1h",
            ));
        }
        check_range(
            "journal.retention_days",
            self.journal.retention_days,
            1,
            36_500,
        )?;
        if !(1_000..=100_000_000).contains(&self.journal.max_pending) {
            return Err(invalid(
                "journal.max_pending",
                &self.journal.max_pending.to_string(),
                "must be between 1000 and 100000000",
            ));
        }
        labels::parse_port_range(&self.metrics.ephemeral_ports).map_err(|reason| {
            invalid(
                "metrics.ephemeral_ports",
                &self.metrics.ephemeral_ports,
                &reason,
            )
        })?;
        for (label, cap) in &self.metrics.label_caps {
            if label != labels::EXE_LABEL && label.parse::<Dimension>().is_err() {
                return Err(invalid(
                    "metrics.label_caps",
                    label,
                    "not a label; use exe or one of the metrics.bytes_labels names",
                ));
            }
            if !(1..=1_000_000).contains(cap) {
                return Err(invalid(
                    "metrics.label_caps",
                    &format!("{label}: {cap}"),
                    "a cap must be between 1 and 1000000",
                ));
            }
        }
        if !(100..=10_000_000).contains(&self.metrics.max_series) {
            return Err(invalid(
                "metrics.max_series",
                &self.metrics.max_series.to_string(),
                "must be between 100 and 10000000",
            ));
        }
        let vt = &self.virustotal;
        if vt.request_interval < Duration::from_millis(10) {
            return Err(invalid(
                "virustotal.request_interval",
                &humantime::format_duration(vt.request_interval).to_string(),
                "must be at least 10ms",
            ));
        }
        if !(vt.base_url.starts_with("https://") || vt.base_url.starts_with("http://")) {
            return Err(invalid(
                "virustotal.base_url",
                &vt.base_url,
                "must be an http(s) URL",
            ));
        }
        let drain = self.collector.drain_interval;
        if drain < Duration::from_millis(100) || drain > Duration::from_secs(2) {
            return Err(invalid(
                "collector.drain_interval",
                &humantime::format_duration(drain).to_string(),
                "must be between 100ms and 2s: /metrics reflects traffic within 2 s",
            ));
        }
        check_range(
            "collector.traffic_map_entries",
            self.collector.traffic_map_entries,
            1_024,
            4 << 20,
        )?;
        check_range(
            "collector.process_map_entries",
            self.collector.process_map_entries,
            1_024,
            4 << 20,
        )?;
        let ring = self.collector.ring_buffer_bytes;
        if !ring.is_power_of_two() || !(64 << 10..=256 << 20).contains(&ring) {
            return Err(invalid(
                "collector.ring_buffer_bytes",
                &ring.to_string(),
                "must be a power of two between 65536 and 268435456",
            ));
        }
        let ring = self.exec.ring_buffer_bytes;
        if !ring.is_power_of_two() || !(64 << 10..=256 << 20).contains(&ring) {
            return Err(invalid(
                "exec.ring_buffer_bytes",
                &ring.to_string(),
                "must be a power of two between 65536 and 268435456",
            ));
        }
        check_range("exec.max_open_files", self.exec.max_open_files, 1, 65_536)?;
        for mode in &self.probes.disabled_modes {
            if !crate::kernel::probes::MODE_NAMES.contains(&mode.as_str()) {
                return Err(invalid(
                    "probes.disabled_modes",
                    mode,
                    &format!(
                        "unknown mode; known modes: {}",
                        crate::kernel::probes::MODE_NAMES.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn listen_address(&self) -> Result<SocketAddr, ConfigError> {
        self.web.listen_address.parse().map_err(|err| {
            invalid(
                "web.listen_address",
                &self.web.listen_address,
                &format!("{err} (expected host:port, e.g. 0.0.0.0:9941)"),
            )
        })
    }
}

fn check_range(key: &'static str, value: u32, min: u32, max: u32) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            key,
            &value.to_string(),
            &format!("must be between {min} and {max}"),
        ))
    }
}

fn invalid(key: &'static str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
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
