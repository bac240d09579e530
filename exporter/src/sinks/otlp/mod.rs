//! OTLP log export: one OpenTelemetry log record per connection rollup and one
//! per journal event, sent to the operators' collector over gRPC or
//! HTTP/protobuf (the `opentelemetry-otlp` exporter, TLS through rustls with ring).
//!
//! # Queueing
//!
//! The SDK's `BatchLogProcessor` is not used: it counts what it drops in a
//! private counter (only logged at shutdown) and discards a batch whose export
//! failed, so neither "nothing lost while records fit" nor "the drop counter is
//! exact" would hold. Instead a bounded queue of our own sits in front of the
//! exporter (`otlp/worker.rs`): [`OtlpExporter::export`] never blocks on the
//! network; at most `max_queued_records` records are held (the batch being
//! sent included); past that new records are dropped and counted (the oldest
//! are kept, so the start of an incident survives an outage, and a window's
//! events are queued before its traffic); a failed batch is
//! kept and retried with exponential back-off (`retry_initial_backoff`,
//! doubling up to `retry_max_backoff`, with jitter) until the collector takes
//! it. The exporter crate's own retries are turned off so that there is one
//! retry policy. Non-retryable answers (gRPC `InvalidArgument`,
//! `Unauthenticated`, ...; HTTP 4xx but 408/429) drop the batch and count it.
//!
//! # Configuration and the `OTEL_EXPORTER_OTLP_*` variables
//!
//! A value set in the configuration file wins; an unset one falls back to the
//! standard variable, the signal-specific one first, as the OpenTelemetry
//! specification has programmatic configuration take precedence:
//!
//! | setting | config key | then | then | default |
//! | --- | --- | --- | --- | --- |
//! | protocol | `otlp.protocol` | `OTEL_EXPORTER_OTLP_LOGS_PROTOCOL` | `OTEL_EXPORTER_OTLP_PROTOCOL` | `http/protobuf` |
//! | endpoint | `otlp.endpoint` (base URL: `/v1/logs` is appended for HTTP) | `OTEL_EXPORTER_OTLP_LOGS_ENDPOINT` (used as is) | `OTEL_EXPORTER_OTLP_ENDPOINT` (base URL) | `http://localhost:4317` (gRPC), `http://localhost:4318/v1/logs` (HTTP) |
//! | headers | `otlp.headers` | `OTEL_EXPORTER_OTLP_LOGS_HEADERS` | `OTEL_EXPORTER_OTLP_HEADERS` | none |
//! | timeout | `otlp.timeout` | `OTEL_EXPORTER_OTLP_LOGS_TIMEOUT` (ms) | `OTEL_EXPORTER_OTLP_TIMEOUT` (ms) | 10 s |
//!
//! Headers merge: the variable's headers are sent too, and on the same name
//! the configuration's value wins. `OTEL_RESOURCE_ATTRIBUTES` adds resource
//! attributes; `service.name`, `service.version`, `host.name` and
//! `k8s.node.name` are always the agent's own.

mod http_client;
mod record;
mod worker;

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use opentelemetry::{InstrumentationScope, KeyValue, logs::LoggerProvider as _};
use opentelemetry_otlp::{
    Protocol, RetryPolicy, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::{
    Resource,
    logs::{LogExporter as _, SdkLoggerProvider},
};
use serde::Deserialize;

pub use record::{CONNECTION_EVENT_NAME, attr, event_name, unix_time};
pub use worker::OtlpCounters;

use worker::{Shared, Worker};

use crate::model::Window;

/// `service.name` of every record.
pub const SERVICE_NAME: &str = "fleetsnitch";

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

fn invalid(
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

/// Who is sending: the resource of every record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceInfo {
    /// `host.name`; [`ResourceInfo::detect`] reads the kernel's host name.
    pub host_name: Option<String>,
    /// `k8s.node.name`, when running in Kubernetes.
    pub k8s_node_name: Option<String>,
}

impl ResourceInfo {
    /// This host's name, no node name.
    pub fn detect() -> Self {
        let host_name = fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty());
        Self {
            host_name,
            k8s_node_name: None,
        }
    }

    fn resource(&self, extra: &BTreeMap<String, String>) -> Resource {
        let mut attributes: Vec<KeyValue> = extra
            .iter()
            .map(|(key, value)| KeyValue::new(key.clone(), value.clone()))
            .collect();
        attributes.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        if let Some(host) = &self.host_name {
            attributes.push(KeyValue::new("host.name", host.clone()));
        }
        if let Some(node) = &self.k8s_node_name {
            attributes.push(KeyValue::new("k8s.node.name", node.clone()));
        }
        Resource::builder()
            .with_attributes(attributes)
            .with_service_name(SERVICE_NAME)
            .build()
    }
}

/// The OTLP log sink. Cheap to call from any thread: [`Self::export`] queues
/// and returns; a thread of its own talks to the collector.
pub struct OtlpExporter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    settings: ResolvedOtlp,
}

impl std::fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl OtlpExporter {
    /// Validates `config`, resolves it against the environment, reads the TLS
    /// files and starts the export thread. Whether `config.enabled` is set is
    /// the caller's business. Connecting is lazy: a collector that is down
    /// is not an error here.
    pub fn start(config: &OtlpConfig, resource: &ResourceInfo) -> Result<Self, OtlpError> {
        config.validate()?;
        let settings = config.resolve()?;
        let https = settings.endpoint.starts_with("https://");
        let tls = &config.tls;
        if !https && (tls.ca_file.is_some() || tls.cert_file.is_some()) {
            return Err(invalid(
                "otlp.tls",
                &settings.endpoint,
                "TLS files are set but the endpoint is not https://",
            ));
        }
        let ca = read_optional("otlp.tls.ca_file", tls.ca_file.as_deref())?;
        let cert = read_optional("otlp.tls.cert_file", tls.cert_file.as_deref())?;
        let key = read_optional("otlp.tls.key_file", tls.key_file.as_deref())?;

        let mut header_map = HeaderMap::new();
        for (name, value) in &settings.headers {
            // Checked by resolve().
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_str(name), HeaderValue::from_str(value))
            {
                header_map.insert(name, value);
            }
        }

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("otlp-export")
            .build()
            .map_err(OtlpError::Thread)?;
        let built = {
            // tonic's lazy channel spawns its worker on the current runtime.
            let _entered = runtime.enter();
            match settings.protocol {
                OtlpProtocol::Grpc => {
                    build_grpc(&settings, header_map, https, ca.as_deref(), cert.zip(key))
                }
                OtlpProtocol::HttpProtobuf => build_http(
                    &settings,
                    header_map,
                    https,
                    ca.as_deref(),
                    cert.as_deref().zip(key.as_deref()),
                ),
            }
        };
        let mut exporter = match built {
            Ok(exporter) => exporter,
            Err(error) => {
                // Dropping a runtime inside another one's context panics; this does not.
                runtime.shutdown_background();
                return Err(error);
            }
        };
        exporter.set_resource(&resource.resource(&config.resource_attributes));

        let scope = InstrumentationScope::builder(SERVICE_NAME)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let provider = SdkLoggerProvider::builder().build();
        let logger = provider.logger_with_scope(scope.clone());
        let shared = Arc::new(Shared::new(config.max_queued_records));
        let worker = Worker {
            shared: shared.clone(),
            exporter,
            logger,
            provider,
            scope,
            endpoint: settings.endpoint.clone(),
            max_batch: config.max_batch_size,
            batch_delay: config.batch_delay,
            timeout: settings.timeout,
            initial_backoff: config.retry_initial_backoff,
            max_backoff: config.retry_max_backoff,
        };
        let thread = std::thread::Builder::new()
            .name("otlp-export".to_owned())
            .spawn(move || runtime.block_on(worker.run()))
            .map_err(OtlpError::Thread)?;
        tracing::info!(
            protocol = settings.protocol.as_str(),
            endpoint = %settings.endpoint,
            max_queued_records = config.max_queued_records,
            "OTLP log export on"
        );
        Ok(Self {
            shared,
            thread: Some(thread),
            settings,
        })
    }

    /// Queues one log record per connection and per event of `window`. Never
    /// waits for the network; what does not fit the queue is dropped and
    /// counted. Returns how many records were dropped.
    pub fn export(&self, window: &Window) -> usize {
        self.shared.push(window)
    }

    /// The counters to export as `fleetsnitch_otlp_*`; readable from any thread.
    pub fn counters(&self) -> Arc<OtlpCounters> {
        self.shared.counters.clone()
    }

    /// Where and how records are sent.
    pub fn settings(&self) -> &ResolvedOtlp {
        &self.settings
    }

    /// Delivers what it can within `grace`, drops and counts the rest, and
    /// stops the export thread. Blocks the caller at most about `grace`
    /// (plus one request timeout if a request is under way). Later calls do nothing.
    pub fn shutdown(&mut self, grace: Duration) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.begin_shutdown(Instant::now() + grace);
        if thread.join().is_err() {
            tracing::error!("the OTLP export thread panicked");
        }
    }
}

impl Drop for OtlpExporter {
    /// Without [`OtlpExporter::shutdown`]: stop at once, counting what is left, without waiting.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shared.begin_shutdown(Instant::now());
        }
    }
}

fn read_optional(key: &'static str, path: Option<&Path>) -> Result<Option<Vec<u8>>, OtlpError> {
    path.map(|path| {
        fs::read(path).map_err(|source| OtlpError::ReadFile {
            key,
            path: path.to_owned(),
            source,
        })
    })
    .transpose()
}

fn build_grpc(
    settings: &ResolvedOtlp,
    headers: HeaderMap,
    https: bool,
    ca: Option<&[u8]>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<opentelemetry_otlp::LogExporter, OtlpError> {
    use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig, Identity};

    // Runs after the exporter added its own metadata (and that of the
    // environment), so the resolved headers win on the same name.
    let interceptor = move |mut request: tonic::Request<()>| {
        let mut merged = std::mem::take(request.metadata_mut()).into_headers();
        for (name, value) in &headers {
            merged.insert(name.clone(), value.clone());
        }
        *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(merged);
        Ok::<_, tonic::Status>(request)
    };
    let mut builder = opentelemetry_otlp::LogExporter::builder()
        .with_tonic()
        .with_endpoint(settings.endpoint.clone())
        .with_protocol(Protocol::Grpc)
        .with_timeout(settings.timeout)
        .with_retry_policy(RetryPolicy::disabled())
        .with_interceptor(interceptor);
    if https {
        let mut tls = ClientTlsConfig::new();
        tls = match ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_webpki_roots(),
        };
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        builder = builder.with_tls_config(tls);
    }
    builder
        .build()
        .map_err(|error| OtlpError::Build(error.to_string()))
}

fn build_http(
    settings: &ResolvedOtlp,
    headers: HeaderMap,
    https: bool,
    ca: Option<&[u8]>,
    identity: Option<(&[u8], &[u8])>,
) -> Result<opentelemetry_otlp::LogExporter, OtlpError> {
    let mut client = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout);
    if https {
        if let Some(ca) = ca {
            let certificates = reqwest::Certificate::from_pem_bundle(ca)
                .map_err(|error| invalid("otlp.tls.ca_file", "(PEM)", error.to_string()))?;
            client = client.tls_built_in_root_certs(false);
            for certificate in certificates {
                client = client.add_root_certificate(certificate);
            }
        }
        if let Some((cert, key)) = identity {
            let pem = [cert, b"\n", key].concat();
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|error| invalid("otlp.tls.cert_file", "(PEM)", error.to_string()))?;
            client = client.identity(identity);
        }
    }
    let client = client
        .build()
        .map_err(|error| OtlpError::Build(error.to_string()))?;
    opentelemetry_otlp::LogExporter::builder()
        .with_http()
        .with_endpoint(settings.endpoint.clone())
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(settings.timeout)
        .with_retry_policy(RetryPolicy::disabled())
        // The client sets the resolved headers on every request, over those
        // the exporter adds from the environment.
        .with_http_client(http_client::ReqwestHttpClient { client, headers })
        .build()
        .map_err(|error| OtlpError::Build(error.to_string()))
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
        let config: OtlpConfig = serde_yaml::from_str(
            "enabled: true\nprotocol: grpc\nendpoint: https://collector:4317\ntimeout: 5s\n\
             headers: {authorization: Bearer x}\ntls: {ca_file: /etc/ca.pem}\nmax_queued_records: 100\n",
        )
        .unwrap();
        assert!(config.enabled);
        assert_eq!(config.protocol, Some(OtlpProtocol::Grpc));
        assert_eq!(config.timeout, Some(Duration::from_secs(5)));
        assert_eq!(config.max_batch_size, 512);
        assert_eq!(config.batch_delay, Duration::from_secs(1));
        assert!(serde_yaml::from_str::<OtlpConfig>("endpont: x").is_err());
        assert!(serde_yaml::from_str::<OtlpConfig>("protocol: http/json").is_err());
        assert!(!OtlpConfig::default().enabled);
    }
}
