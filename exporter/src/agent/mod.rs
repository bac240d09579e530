//! Start-up, steady state and shutdown of the agent.

pub mod collector;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    thread,
};

use aya::{Btf, Ebpf, EbpfError, EbpfLoader};
use tokio::net::TcpListener;

use crate::{
    agent::collector::{Collector, CollectorError, Health},
    config::Config,
    enrichment::dns::DnsCacheConfig,
    enrichment::geoip::GeoIp,
    enrichment::kubernetes::PodResolver,
    host::preflight::{self, PreflightError},
    identity::hashing::Hasher,
    kernel::dns_capture::DnsCapture,
    kernel::probes::{self, NoModeFits, ProbeOutcome},
    sinks::connection_log::ConnectionLog,
    sinks::journal,
    sinks::metrics::labels::{self, LabelPolicy},
    sinks::metrics::{Metrics, ProbeLabels},
    sinks::otlp::{OtlpExporter, ResourceInfo},
    sinks::virustotal,
    web::http,
    web::server,
};

/// The kernel programs, compiled by build.rs.
static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fleetsnitch.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("cannot listen on {address} (web.listen_address): {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the kernel's BTF from {}: {source}", preflight::BTF_PATH)]
    Btf { source: aya::BtfError },
    #[error(
        "the kernel refused to load fleetsnitch's maps or programs: {detail}. BPF may be \
         restricted here (kernel.unprivileged_bpf_disabled, lockdown=confidentiality, a \
         seccomp profile or a container without CAP_BPF/CAP_PERFMON)"
    )]
    BpfRefused { detail: String },
    #[error(transparent)]
    NoProbe(#[from] NoModeFits),
    #[error(transparent)]
    Collector(#[from] CollectorError),
    #[error("cannot start a worker thread: {0}")]
    Thread(std::io::Error),
    #[error("GeoIP (geoip.country_database / geoip.asn_database): {0}")]
    GeoIp(#[from] crate::enrichment::geoip::GeoIpError),
    #[error("OTLP (otlp.*): {0}")]
    Otlp(#[from] crate::sinks::otlp::OtlpError),
    #[error("connection log (connection_log.*): {0}")]
    ConnectionLog(#[from] crate::sinks::connection_log::ConnectionLogError),
    #[error("VirusTotal: {0}")]
    VirusTotal(String),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    WebConfig(#[from] crate::web::config::WebConfigError),
    #[error(transparent)]
    Privileges(#[from] crate::host::privileges::PrivilegeError),
}

/// Hands the memory freed after loading (kernel BTF, object file, relocation
/// tables) back to the system: glibc keeps freed heap otherwise, and the
/// agent's resident size would carry its start-up peak for ever.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), AgentError> {
    preflight::check()?;
    preflight::raise_memlock_limit();

    // Bind first: a port in use is the cheapest failure to report.
    let address = config
        .listen_address()
        .expect("validated before the agent starts");
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| AgentError::Listen { address, source })?;
    let web_settings = match &config.web.config_file {
        Some(path) => Some((path, server::WebState::load(path)?)),
        None => None,
    };

    let geoip = open_geoip(&config)?;
    let btf = Btf::from_sys_fs().map_err(|source| AgentError::Btf { source })?;
    let mut ebpf = load_object(&config)?;
    // Exec tracking off: its probe is not attached (nor reported).
    let left_out: &[&str] = if config.exec.enabled {
        &[]
    } else {
        &[probes::EXEC_PROBE]
    };
    let outcomes = probes::attach_all(&mut ebpf, &btf, &config.probes.disabled_modes, left_out)?;
    // The parsed kernel BTF is tens of MiB and only needed to attach.
    drop(btf);

    let metrics = Arc::new(Metrics::new());
    export_probe_outcomes(&metrics, &outcomes);
    let health = Arc::new(Health::default());
    let sinks = start_sinks(&config)?;
    let (journal, journal_thread) = journal::spawn(config.journal.clone(), metrics.clone(), sinks)
        .map_err(AgentError::Thread)?;
    let virustotal = virustotal::spawn(&config.virustotal, metrics.clone(), Some(journal.clone()))
        .map_err(|error| AgentError::VirusTotal(error.to_string()))?;
    let hasher = Hasher::spawn(metrics.clone(), Some(journal.clone()), virustotal)
        .map_err(AgentError::Thread)?;
    let collector = Collector::new(
        &mut ebpf,
        metrics.clone(),
        health.clone(),
        hasher,
        Some(journal),
        label_policy(&config),
        config.collector.drain_interval,
    )?
    .with_ephemeral_ports_in_rollups(config.journal.record_ephemeral_ports)
    .with_geoip(geoip)
    .with_dns(start_dns_capture(&metrics), DnsCacheConfig::default())
    .with_pods(PodResolver::spawn(&config.kubernetes));
    let collector = if config.exec.enabled {
        tracing::info!("exec tracking on: every executed program is journaled");
        collector.with_exec(&mut ebpf, &config.exec)?
    } else {
        collector
    };

    release_freed_memory();

    let stop = Arc::new(AtomicBool::new(false));
    let collector_thread = {
        let stop = stop.clone();
        thread::Builder::new()
            .name("fleetsnitch-collector".into())
            .spawn(move || collector.run(stop))
            .map_err(AgentError::Thread)?
    };

    // Everything that needs more is loaded, attached, opened and bound.
    let kept = crate::host::privileges::drop_to_runtime_set()?;
    tracing::info!(
        kept = %crate::host::privileges::names(kept),
        "capabilities beyond the run-time set dropped in every thread"
    );

    tracing::info!(
        %address,
        telemetry_path = %config.web.telemetry_path,
        "fleetsnitch is counting; serving metrics"
    );
    let metrics_for_web = metrics.clone();
    let router = http::router(
        &config.web.telemetry_path,
        metrics,
        health,
        config.collector.drain_interval,
    );
    let served = match web_settings {
        Some((path, settings)) => {
            let state = server::WebState::new(path, settings, metrics_for_web);
            server::spawn_reloader(state.clone());
            server::serve(listener, router, state, shutdown_signal()).await
        }
        None => http::serve(listener, router, shutdown_signal()).await,
    };

    tracing::info!("shutting down: final drain, then detaching every probe");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if collector_thread.join().is_err() {
        tracing::error!("the collector thread panicked");
    }
    // The collector held the last journal handles (its own and the hasher's):
    // the journal thread now writes what is queued and stops.
    if journal_thread.join().is_err() {
        tracing::error!("the journal thread panicked");
    }
    // Dropping the object detaches every link and unloads every program.
    drop(ebpf);
    served.map_err(AgentError::Http)
}

fn load_object(config: &Config) -> Result<Ebpf, AgentError> {
    // Off, exec tracking keeps its ring buffer at one page.
    let exec_ring = if config.exec.enabled {
        config.exec.ring_buffer_bytes
    } else {
        4096
    };
    EbpfLoader::new()
        .map_max_entries("traffic", config.collector.traffic_map_entries)
        .map_max_entries("announced", config.collector.process_map_entries)
        .map_max_entries("events", config.collector.ring_buffer_bytes)
        .map_max_entries("exec_events", exec_ring)
        .override_global(
            "record_command_lines",
            &u32::from(config.exec.record_command_lines),
            true,
        )
        .load(BPF_OBJECT)
        .map_err(|error: EbpfError| AgentError::BpfRefused {
            detail: probes::error_chain(&error),
        })
}

/// Starts the OTLP exporter and the local connection log, when enabled.
fn start_sinks(config: &Config) -> Result<journal::Sinks, AgentError> {
    let otlp = if config.otlp.enabled {
        let mut resource = ResourceInfo::detect();
        resource.k8s_node_name = config
            .kubernetes
            .node_name
            .clone()
            .or_else(|| std::env::var(&config.kubernetes.node_name_env).ok());
        let exporter = OtlpExporter::start(&config.otlp, &resource)?;
        tracing::info!("OTLP log export enabled");
        Some(exporter)
    } else {
        None
    };
    let connection_log = if config.connection_log.enabled {
        Some(ConnectionLog::start(&config.connection_log)?)
    } else {
        None
    };
    Ok(journal::Sinks {
        otlp,
        connection_log,
    })
}

/// Starts DNS capture; without it the agent runs, with empty domains.
fn start_dns_capture(metrics: &Metrics) -> Option<DnsCapture> {
    match DnsCapture::start() {
        Ok((capture, probes)) => {
            for probe in probes {
                metrics
                    .probe_attached
                    .get_or_create(&ProbeLabels {
                        probe: probe.probe.to_owned(),
                        mode: if probe.error.is_some() {
                            "none"
                        } else {
                            probe.mode
                        }
                        .to_owned(),
                    })
                    .set(i64::from(probe.error.is_none()));
            }
            Some(capture)
        }
        Err(error) => {
            tracing::warn!(%error, "DNS capture unavailable: domains stay empty");
            for probe in ["dns_owners", "dns_answers"] {
                metrics
                    .probe_attached
                    .get_or_create(&ProbeLabels {
                        probe: probe.to_owned(),
                        mode: "none".to_owned(),
                    })
                    .set(0);
            }
            None
        }
    }
}

/// Opens the configured GeoIP databases; a configured file that cannot be
/// read stops the agent (an operator asked for it).
fn open_geoip(config: &Config) -> Result<Option<GeoIp>, AgentError> {
    let (country, asn) = (
        config.geoip.country_database.as_deref(),
        config.geoip.asn_database.as_deref(),
    );
    if country.is_none() && asn.is_none() {
        return Ok(None);
    }
    let geoip = GeoIp::open(country, asn)?;
    for database in geoip.databases() {
        tracing::info!(
            path = %database.path().display(),
            database_type = database.database_type(),
            "GeoIP database open"
        );
    }
    Ok(Some(geoip))
}

fn label_policy(config: &Config) -> LabelPolicy {
    let metrics = &config.metrics;
    let ephemeral = labels::parse_port_range(&metrics.ephemeral_ports)
        .expect("validated before the agent starts");
    LabelPolicy::new(
        &metrics.bytes_labels,
        &metrics.label_caps,
        ephemeral,
        metrics.max_series,
    )
}

fn export_probe_outcomes(metrics: &Metrics, outcomes: &[ProbeOutcome]) {
    for outcome in outcomes {
        let labels = ProbeLabels {
            probe: outcome.probe.to_owned(),
            mode: outcome.mode.unwrap_or("none").to_owned(),
        };
        metrics
            .probe_attached
            .get_or_create(&labels)
            .set(i64::from(outcome.mode.is_some()));
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the agent");
                let _ = interrupt.await;
                return;
            }
        };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
}
