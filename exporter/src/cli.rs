//! Command-line flags, in the Prometheus exporters' style; they override the file.

use std::path::PathBuf;

use clap::Parser;

use crate::{
    config::{Config, ConfigError},
    support::{build_info, logging::LogFormat},
};

#[derive(Debug, Parser)]
#[command(
    name = "fleetsnitch",
    version,
    long_version = build_info::LONG_VERSION,
    about = "Per-executable network accounting agent"
)]
pub struct Cli {
    /// YAML configuration file (see config.example.yaml); every key has a default.
    #[arg(long = "config.file", value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// Address to serve metrics on; [::] is both IPv4 and IPv6 [default: [::]:9941].
    #[arg(long = "web.listen-address", value_name = "HOST:PORT")]
    pub listen_address: Option<String>,
    /// Path under which to expose metrics [default: /metrics].
    #[arg(long = "web.telemetry-path", value_name = "PATH")]
    pub telemetry_path: Option<String>,
    /// Exporter-toolkit web configuration: TLS, client certificates and basic
    /// auth for every path (see README "Securing the endpoint").
    #[arg(long = "web.config.file", value_name = "PATH")]
    pub web_config_file: Option<PathBuf>,
    /// SQLite journal of executables seen [default: /var/lib/fleetsnitch/journal.db].
    #[arg(long = "journal.path", value_name = "PATH")]
    pub journal_path: Option<PathBuf>,
    /// Where the node's root file system is mounted when the agent runs in a
    /// mount namespace of its own (the chart mounts `/` at `/host`): user
    /// names, and executables whose process has exited, are read there.
    #[arg(long = "path.rootfs", value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// Print which kernel features and capabilities this host offers, then exit
    /// (non-zero when a requirement is missing); loads nothing.
    #[arg(long)]
    pub check: bool,
    /// Log filter, e.g. `info` or `fleetsnitch=debug` (RUST_LOG works too).
    #[arg(long = "log.level", value_name = "FILTER", default_value = "info")]
    pub log_level: String,
    /// Log line format on stderr: logfmt, or json (one object per line).
    #[arg(long = "log.format", value_enum, default_value_t = LogFormat::Logfmt)]
    pub log_format: LogFormat,
}

impl Cli {
    /// The configuration file (or the defaults) with the flags applied, validated.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config_file {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(address) = &self.listen_address {
            config.web.listen_address = address.clone();
        }
        if let Some(path) = &self.telemetry_path {
            config.web.telemetry_path = path.clone();
        }
        if let Some(path) = &self.web_config_file {
            config.web.config_file = Some(path.clone());
        }
        if let Some(path) = &self.journal_path {
            config.journal.path = path.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn flags_override_the_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "web:\n  listen_address: 127.0.0.1:1\n  telemetry_path: /m"
        )
        .unwrap();
        let cli = Cli::parse_from([
            "fleetsnitch",
            "--config.file",
            file.path().to_str().unwrap(),
            "--web.listen-address",
            "127.0.0.1:2",
        ]);
        let config = cli.config().unwrap();
        assert_eq!(config.web.listen_address, "127.0.0.1:2");
        assert_eq!(config.web.telemetry_path, "/m");
    }

    #[test]
    fn log_format_is_logfmt_unless_json_is_asked_for() {
        let cli = Cli::parse_from(["fleetsnitch"]);
        assert_eq!(cli.log_format, LogFormat::Logfmt);
        let cli = Cli::parse_from(["fleetsnitch", "--log.format", "json"]);
        assert_eq!(cli.log_format, LogFormat::Json);
        let err = Cli::try_parse_from(["fleetsnitch", "--log.format", "xml"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("xml") && err.contains("logfmt"), "{err}");
    }

    #[test]
    fn invalid_file_error_names_the_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "web: [").unwrap();
        let cli = Cli::parse_from([
            "fleetsnitch",
            "--config.file",
            file.path().to_str().unwrap(),
        ]);
        let err = cli.config().unwrap_err().to_string();
        assert!(err.contains(file.path().to_str().unwrap()), "{err}");
    }
}
