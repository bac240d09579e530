//! The `otlp:` section of the configuration and the `OTEL_EXPORTER_OTLP_*`
//! variables it falls back to (see the module documentation of `otlp`).

use std::{collections::BTreeMap, io, path::PathBuf, str::FromStr, time::Duration};

use http::{HeaderName, HeaderValue, Uri};
use serde::Deserialize;

pub const ENV_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const ENV_LOGS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT";
pub const ENV_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
pub const ENV_LOGS_HEADERS: &str = "OTEL_EXPORTER_OTLP_LOGS_HEADERS";
pub const ENV_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub const ENV_LOGS_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL";
pub const ENV_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
pub const ENV_LOGS_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT";

const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";
const DEFAULT_HTTP_ENDPOINT: &str = "http://localhost:4318";
const HTTP_LOGS_PATH: &str = "/v1/logs";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl OtlpProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

impl FromStr for OtlpProtocol {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim() {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            "http/json" => Err("http/json is not supported; use grpc or http/protobuf".to_owned()),
            _ => Err("expected grpc or http/protobuf".to_owned()),
        }
    }
}

/// TLS towards the collector, for `https://` endpoints.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpTlsConfig {
    /// PEM CA certificate(s) to trust instead of the built-in (webpki) roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain), with `key_file`, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// The `otlp:` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// Export log records. Off by default.
    pub enabled: bool,
    /// `grpc` or `http/protobuf`; unset: the environment, then `http/protobuf`.
    pub protocol: Option<OtlpProtocol>,
    /// Collector base URL (`/v1/logs` is appended for HTTP); unset: the environment, then localhost.
    pub endpoint: Option<String>,
    /// Headers (gRPC metadata) of every request, e.g. an authorization token.
    pub headers: BTreeMap<String, String>,
    /// Time limit of one export request; unset: the environment, then 10 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub tls: OtlpTlsConfig,
    /// Records held while the collector is slow or down; past it, new ones are dropped and counted.
    pub max_queued_records: usize,
    /// Records per export request.
    pub max_batch_size: usize,
    /// How long a record may wait for a fuller batch.
    #[serde(with = "humantime_serde")]
    pub batch_delay: Duration,
    /// Pause after the first failed export; doubles after each failure.
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    /// Longest pause between two attempts.
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Extra resource attributes (e.g. `deployment.environment.name`).
    pub resource_attributes: BTreeMap<String, String>,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            protocol: None,
            endpoint: None,
            headers: BTreeMap::new(),
            timeout: None,
            tls: OtlpTlsConfig::default(),
            max_queued_records: 10_000,
            max_batch_size: 512,
            batch_delay: Duration::from_secs(1),
            retry_initial_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(30),
            resource_attributes: BTreeMap::new(),
        }
    }
}

/// A configuration problem, naming the key (or environment variable) and value.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("invalid value for {key} ({value}): {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    #[error("cannot read {key} {path}: {source}")]
    ReadFile {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot build the OTLP exporter: {0}")]
    Build(String),
    #[error("cannot start the OTLP export thread: {0}")]
    Thread(io::Error),
}

pub(super) fn invalid(
    key: impl Into<String>,
    value: impl Into<String>,
    reason: impl Into<String>,
) -> OtlpError {
    OtlpError::Invalid {
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// Protocol, endpoint, headers and timeout after the environment was consulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedOtlp {
    pub protocol: OtlpProtocol,
    /// The URL requests go to (for HTTP, with the logs path).
    pub endpoint: String,
    pub headers: BTreeMap<String, String>,
    pub timeout: Duration,
}

impl OtlpConfig {
    /// Checks the values that do not depend on the environment.
    pub fn validate(&self) -> Result<(), OtlpError> {
        if self.max_queued_records == 0 {
            return Err(invalid(
                "otlp.max_queued_records",
                "0",
                "must be at least 1",
            ));
        }
        if self.max_batch_size == 0 || self.max_batch_size > self.max_queued_records {
            return Err(invalid(
                "otlp.max_batch_size",
                self.max_batch_size.to_string(),
                format!(
                    "must be between 1 and otlp.max_queued_records ({})",
                    self.max_queued_records
                ),
            ));
        }
        if self.retry_initial_backoff.is_zero()
            || self.retry_initial_backoff > self.retry_max_backoff
        {
            return Err(invalid(
                "otlp.retry_initial_backoff",
                humantime::format_duration(self.retry_initial_backoff).to_string(),
                "must be above zero and at most otlp.retry_max_backoff",
            ));
        }
        if self.timeout.is_some_and(|timeout| timeout.is_zero()) {
            return Err(invalid("otlp.timeout", "0s", "must be above zero"));
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) => Err(invalid(
                "otlp.tls.key_file",
                "(unset)",
                "otlp.tls.cert_file needs its key",
            )),
            (None, Some(_)) => Err(invalid(
                "otlp.tls.cert_file",
                "(unset)",
                "otlp.tls.key_file needs its certificate",
            )),
            _ => Ok(()),
        }
    }

    /// Resolves protocol, endpoint, headers and timeout against the process environment.
    pub fn resolve(&self) -> Result<ResolvedOtlp, OtlpError> {
        self.resolve_with(|name| std::env::var(name).ok())
    }

    /// [`Self::resolve`] with the environment given as a lookup function.
    pub fn resolve_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ResolvedOtlp, OtlpError> {
        let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        let protocol = match self.protocol {
            Some(protocol) => protocol,
            None => match first_env(&env, &[ENV_LOGS_PROTOCOL, ENV_PROTOCOL]) {
                Some((name, value)) => value
                    .parse()
                    .map_err(|reason| invalid(name, value, reason))?,
                None => OtlpProtocol::HttpProtobuf,
            },
        };

        let (endpoint, key) = match self.endpoint.as_deref().filter(|e| !e.trim().is_empty()) {
            Some(base) => (with_logs_path(protocol, base), "otlp.endpoint".to_owned()),
            None => match (env(ENV_LOGS_ENDPOINT), env(ENV_ENDPOINT)) {
                (Some(url), _) => (url.trim().to_owned(), ENV_LOGS_ENDPOINT.to_owned()),
                (None, Some(base)) => (with_logs_path(protocol, &base), ENV_ENDPOINT.to_owned()),
                (None, None) => (
                    match protocol {
                        OtlpProtocol::Grpc => DEFAULT_GRPC_ENDPOINT.to_owned(),
                        OtlpProtocol::HttpProtobuf => {
                            with_logs_path(protocol, DEFAULT_HTTP_ENDPOINT)
                        }
                    },
                    "otlp.endpoint".to_owned(),
                ),
            },
        };
        let uri: Uri = endpoint
            .parse()
            .map_err(|error: http::uri::InvalidUri| invalid(&key, &endpoint, error.to_string()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(invalid(
                key,
                endpoint,
                "expected an http:// or https:// URL with a host",
            ));
        }

        let mut headers = BTreeMap::new();
        if let Some((name, value)) = first_env(&env, &[ENV_LOGS_HEADERS, ENV_HEADERS]) {
            for pair in value
                .split(',')
                .map(str::trim)
                .filter(|pair| !pair.is_empty())
            {
                let Some((header, header_value)) = pair.split_once('=') else {
                    return Err(invalid(
                        name,
                        pair,
                        "expected name=value pairs separated by commas",
                    ));
                };
                headers.insert(
                    header.trim().to_ascii_lowercase(),
                    percent_decode(header_value.trim()),
                );
            }
        }
        for (name, value) in &self.headers {
            headers.insert(name.to_ascii_lowercase(), value.clone());
        }
        for (name, value) in &headers {
            HeaderName::from_str(name)
                .map_err(|error| invalid("otlp.headers", name, error.to_string()))?;
            HeaderValue::from_str(value)
                .map_err(|error| invalid("otlp.headers", name, error.to_string()))?;
        }

        let timeout = match self.timeout {
            Some(timeout) => timeout,
            None => match first_env(&env, &[ENV_LOGS_TIMEOUT, ENV_TIMEOUT]) {
                Some((name, value)) => match value.trim().parse::<u64>() {
                    Ok(millis) if millis > 0 => Duration::from_millis(millis),
                    _ => return Err(invalid(name, value, "expected milliseconds above zero")),
                },
                None => DEFAULT_TIMEOUT,
            },
        };

        Ok(ResolvedOtlp {
            protocol,
            endpoint,
            headers,
            timeout,
        })
    }
}

fn first_env(
    env: &impl Fn(&str) -> Option<String>,
    names: &[&'static str],
) -> Option<(&'static str, String)> {
    names
        .iter()
        .find_map(|name| env(name).map(|value| (*name, value)))
}

/// `base` with the OTLP/HTTP logs path appended, unless it already ends with it.
fn with_logs_path(protocol: OtlpProtocol, base: &str) -> String {
    let base = base.trim();
    match protocol {
        OtlpProtocol::Grpc => base.to_owned(),
        OtlpProtocol::HttpProtobuf if base.trim_end_matches('/').ends_with(HTTP_LOGS_PATH) => {
            base.to_owned()
        }
        OtlpProtocol::HttpProtobuf => format!("{}{HTTP_LOGS_PATH}", base.trim_end_matches('/')),
    }
}

/// Header values in the variables are percent-encoded (W3C baggage format).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && let Some(hex) = value.get(index + 1..index + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            index += 3;
            continue;
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        }
    }

    #[test]
    fn defaults_follow_the_specification() {
        let resolved = OtlpConfig::default().resolve_with(env_of(&[])).unwrap();
        assert_eq!(resolved.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(resolved.endpoint, "http://localhost:4318/v1/logs");
        assert_eq!(resolved.timeout, Duration::from_secs(10));
        assert!(resolved.headers.is_empty());

        let grpc = OtlpConfig {
            protocol: Some(OtlpProtocol::Grpc),
            ..OtlpConfig::default()
        };
        assert_eq!(
            grpc.resolve_with(env_of(&[])).unwrap().endpoint,
            "http://localhost:4317"
        );
    }

    #[test]
    fn environment_fills_what_the_file_leaves_unset() {
        let env = env_of(&[
            (ENV_PROTOCOL, "grpc"),
            (ENV_ENDPOINT, "http://collector:4317"),
            (ENV_HEADERS, "authorization=Bearer%20abc,x-team=net"),
            (ENV_TIMEOUT, "2500"),
        ]);
        let resolved = OtlpConfig::default().resolve_with(env).unwrap();
        assert_eq!(resolved.protocol, OtlpProtocol::Grpc);
        assert_eq!(resolved.endpoint, "http://collector:4317");
        assert_eq!(resolved.headers["authorization"], "Bearer abc");
        assert_eq!(resolved.headers["x-team"], "net");
        assert_eq!(resolved.timeout, Duration::from_millis(2500));

        // Signal-specific variables win over the generic ones, and the logs
        // endpoint is used as is.
        let env = env_of(&[
            (ENV_PROTOCOL, "grpc"),
            (ENV_LOGS_PROTOCOL, "http/protobuf"),
            (ENV_ENDPOINT, "http://generic:4318"),
            (ENV_LOGS_ENDPOINT, "https://logs.example:443/custom"),
            (ENV_TIMEOUT, "1000"),
            (ENV_LOGS_TIMEOUT, "3000"),
        ]);
        let resolved = OtlpConfig::default().resolve_with(env).unwrap();
        assert_eq!(resolved.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(resolved.endpoint, "https://logs.example:443/custom");
        assert_eq!(resolved.timeout, Duration::from_secs(3));

        let env = env_of(&[(ENV_ENDPOINT, "http://generic:4318/")]);
        assert_eq!(
            OtlpConfig::default().resolve_with(env).unwrap().endpoint,
            "http://generic:4318/v1/logs"
        );
    }

    #[test]
    fn the_file_wins_over_the_environment() {
        let config = OtlpConfig {
            protocol: Some(OtlpProtocol::HttpProtobuf),
            endpoint: Some("https://otlp.example".into()),
            headers: BTreeMap::from([("Authorization".into(), "Bearer file".into())]),
            timeout: Some(Duration::from_secs(4)),
            ..OtlpConfig::default()
        };
        let env = env_of(&[
            (ENV_LOGS_PROTOCOL, "grpc"),
            (ENV_LOGS_ENDPOINT, "http://env:4317"),
            (ENV_HEADERS, "authorization=Bearer env,x-env=1"),
            (ENV_LOGS_TIMEOUT, "100"),
        ]);
        let resolved = config.resolve_with(env).unwrap();
        assert_eq!(resolved.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(resolved.endpoint, "https://otlp.example/v1/logs");
        assert_eq!(resolved.headers["authorization"], "Bearer file");
        assert_eq!(resolved.headers["x-env"], "1");
        assert_eq!(resolved.timeout, Duration::from_secs(4));
    }

    #[test]
    fn bad_values_name_their_source() {
        let error = OtlpConfig::default()
            .resolve_with(env_of(&[(ENV_PROTOCOL, "http/json")]))
            .unwrap_err();
        assert!(error.to_string().contains(ENV_PROTOCOL), "{error}");
        let error = OtlpConfig::default()
            .resolve_with(env_of(&[(ENV_LOGS_TIMEOUT, "soon")]))
            .unwrap_err();
        assert!(error.to_string().contains(ENV_LOGS_TIMEOUT), "{error}");
        let config = OtlpConfig {
            endpoint: Some("collector:4317".into()),
            ..OtlpConfig::default()
        };
        let error = config.resolve_with(env_of(&[])).unwrap_err();
        assert!(error.to_string().contains("otlp.endpoint"), "{error}");
        let config = OtlpConfig {
            max_batch_size: 20,
            max_queued_records: 10,
            ..OtlpConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("otlp.max_batch_size")
        );
        let config = OtlpConfig {
            tls: OtlpTlsConfig {
                cert_file: Some("/c.pem".into()),
                ..OtlpTlsConfig::default()
            },
            ..OtlpConfig::default()
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn config_parses_from_yaml_with_defaults() {
        let config: OtlpConfig = yaml_serde::from_str(
            "enabled: true\nprotocol: grpc\nendpoint: https://collector:4317\ntimeout: 5s\n\
             headers: {authorization: Bearer x}\ntls: {ca_file: /etc/ca.pem}\nmax_queued_records: 100\n",
        )
        .unwrap();
        assert!(config.enabled);
        assert_eq!(config.protocol, Some(OtlpProtocol::Grpc));
        assert_eq!(config.timeout, Some(Duration::from_secs(5)));
        assert_eq!(config.max_batch_size, 512);
        assert_eq!(config.batch_delay, Duration::from_secs(1));
        assert!(yaml_serde::from_str::<OtlpConfig>("endpont: x").is_err());
        assert!(yaml_serde::from_str::<OtlpConfig>("protocol: http/json").is_err());
        assert!(!OtlpConfig::default().enabled);
    }
}
