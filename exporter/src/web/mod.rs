//! The HTTP endpoints and their security settings.

pub mod config;
pub mod health;
pub mod http;
pub mod listen;
pub mod server;

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use crate::support::InvalidValue;

/// Where `/metrics` is served unless configured otherwise: every address of
/// both families (`listen.rs`: dual-stack, IPv4 alone on hosts without IPv6).
pub const DEFAULT_LISTEN_ADDRESS: &str = "[::]:9941";
pub const DEFAULT_TELEMETRY_PATH: &str = "/metrics";

/// The `web:` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// `host:port` to serve `/metrics` and `/healthz` on; `[::]` is both families.
    pub listen_address: String,
    /// Path of the Prometheus endpoint.
    pub telemetry_path: String,
    /// Exporter-toolkit web configuration (TLS, client certificates, basic
    /// auth) for every path; re-read when it changes. None: plain HTTP.
    pub config_file: Option<PathBuf>,
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

impl WebConfig {
    pub fn validate(&self) -> Result<(), InvalidValue> {
        self.listen_address()?;
        if !self.telemetry_path.starts_with('/') || self.telemetry_path == "/healthz" {
            return Err(InvalidValue::new(
                "web.telemetry_path",
                &self.telemetry_path,
                "must start with '/' and must not be /healthz",
            ));
        }
        Ok(())
    }

    pub fn listen_address(&self) -> Result<SocketAddr, InvalidValue> {
        self.listen_address.parse().map_err(|err| {
            InvalidValue::new(
                "web.listen_address",
                &self.listen_address,
                format!("{err} (expected host:port, e.g. [::]:9941 or 0.0.0.0:9941)"),
            )
        })
    }
}
