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

mod config;
mod http_client;
mod record;
mod worker;

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    str::FromStr,
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{InstrumentationScope, KeyValue, logs::LoggerProvider as _};
use opentelemetry_otlp::{
    Protocol, RetryPolicy, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::{
    Resource,
    logs::{LogExporter as _, SdkLoggerProvider},
};

use config::invalid;
pub use config::{
    ENV_ENDPOINT, ENV_HEADERS, ENV_LOGS_ENDPOINT, ENV_LOGS_HEADERS, ENV_LOGS_PROTOCOL,
    ENV_LOGS_TIMEOUT, ENV_PROTOCOL, ENV_TIMEOUT, OtlpConfig, OtlpError, OtlpProtocol,
    OtlpTlsConfig, ResolvedOtlp,
};
pub use record::{CONNECTION_EVENT_NAME, attr, event_name, unix_time};
pub use worker::OtlpCounters;

use worker::{Shared, Worker};

use crate::model::{Failures, Window};

/// `service.name` of every record.
pub const SERVICE_NAME: &str = "fleetsnitch";

/// Who is sending: the resource of every record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceInfo {
    /// `host.name`; [`ResourceInfo::detect`] reads the kernel's host name,
    /// which the node name replaces when the agent knows one (in a pod the
    /// kernel's host name is the pod's).
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
        Self::start_reporting(config, resource, Failures::none())
    }

    /// [`Self::start`], telling `failures` when export fails and works again.
    pub fn start_reporting(
        config: &OtlpConfig,
        resource: &ResourceInfo,
        failures: Failures,
    ) -> Result<Self, OtlpError> {
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
            failures,
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
